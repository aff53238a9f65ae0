//! Generated code for Tandem's gRPC APIs.
//!
//! - [`discovery::v1`]: the control plane → proxy discovery stream.
//! - [`identity::v1`]: a proxy's certificate for its workload identity.
//! - [`demo::v1`]: the tiny greeter that `tandem backend` serves for demos and tests.

pub mod codec;

pub mod discovery {
    pub mod v1 {
        #![allow(clippy::all, missing_docs, rust_2018_idioms)]
        tonic::include_proto!("tandem.discovery.v1");
    }
}

pub mod demo {
    pub mod v1 {
        #![allow(clippy::all, missing_docs, rust_2018_idioms)]
        tonic::include_proto!("tandem.demo.v1");
    }
}

pub mod identity {
    pub mod v1 {
        #![allow(clippy::all, missing_docs, rust_2018_idioms)]
        tonic::include_proto!("tandem.identity.v1");
    }
}
