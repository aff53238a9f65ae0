//! Compiles the .proto files with protox (pure Rust), so building Tandem needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tandem/discovery/v1/discovery.proto",
        "proto/tandem/demo/v1/greeter.proto",
        "proto/tandem/identity/v1/identity.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
