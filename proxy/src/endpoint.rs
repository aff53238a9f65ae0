//! What the proxy knows about one backend endpoint, as discovery described it.

use std::net::SocketAddr;

use tandem_balancer::Health;
use tandem_proto::discovery::v1 as pb;

use crate::shared::HttpVersion;

/// The balancer's type: the proxy compares endpoints' localities with its own.
pub use tandem_balancer::Locality;

/// A locality as discovery sends it.
pub fn locality_from_proto(l: &pb::Locality) -> Locality {
    Locality {
        region: l.region.clone(),
        zone: l.zone.clone(),
        subzone: l.subzone.clone(),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Unknown: HTTP/1.1, which every HTTP server speaks, or HTTP/2 for gRPC.
    #[default]
    Unspecified,
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    /// The HTTP version to speak to the endpoint. Without a hint, HTTP/1.1: a browser
    /// that negotiated h2 with us must still reach an app that only speaks HTTP/1.1.
    /// gRPC always needs HTTP/2.
    #[inline]
    pub fn version_for(self, grpc: bool) -> HttpVersion {
        match self {
            Protocol::Http2 => HttpVersion::Http2,
            _ if grpc => HttpVersion::Http2,
            _ => HttpVersion::Http1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointMeta {
    pub address: SocketAddr,
    pub weight: u32,
    pub health: Health,
    pub locality: Locality,
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

impl EndpointMeta {
    pub fn static_backend(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            health: Health::Healthy,
            locality: Locality::default(),
            protocol: Protocol::Unspecified,
            name: String::new(),
            identity: String::new(),
        }
    }

    /// Validates one endpoint of a discovery update.
    pub fn from_proto(e: &pb::Endpoint) -> Result<Self, String> {
        let address: SocketAddr = e
            .address
            .parse()
            .map_err(|_| format!("endpoint address {:?} is not ip:port", e.address))?;
        if e.weight == 0 {
            return Err(format!("endpoint {address} has weight 0"));
        }
        let health = match pb::Health::try_from(e.health) {
            Ok(pb::Health::Healthy) => Health::Healthy,
            Ok(pb::Health::Draining) => Health::Draining,
            Ok(pb::Health::Unhealthy) => Health::Unhealthy,
            // An endpoint whose health we cannot read must not receive traffic.
            Ok(pb::Health::Unspecified) | Err(_) => Health::Unhealthy,
        };
        let protocol = match pb::Protocol::try_from(e.protocol) {
            Ok(pb::Protocol::Http1) => Protocol::Http1,
            Ok(pb::Protocol::Http2) => Protocol::Http2,
            Ok(pb::Protocol::Opaque) => Protocol::Opaque,
            _ => Protocol::Unspecified,
        };
        Ok(Self {
            address,
            weight: e.weight,
            health,
            locality: e
                .locality
                .as_ref()
                .map(locality_from_proto)
                .unwrap_or_default(),
            protocol,
            name: e.name.clone(),
            identity: e.identity.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_versions() {
        use HttpVersion::*;
        assert_eq!(Protocol::Unspecified.version_for(false), Http1);
        assert_eq!(
            Protocol::Unspecified.version_for(true),
            Http2,
            "gRPC needs HTTP/2"
        );
        assert_eq!(
            Protocol::Http1.version_for(true),
            Http2,
            "even against the hint"
        );
        assert_eq!(Protocol::Http2.version_for(false), Http2);
    }

    #[test]
    fn malformed_endpoints_are_rejected() {
        let mut e = pb::Endpoint {
            address: "10.0.0.1".into(),
            weight: 1,
            ..Default::default()
        };
        assert!(EndpointMeta::from_proto(&e).is_err());
        e.address = "10.0.0.1:80".into();
        e.weight = 0;
        assert!(EndpointMeta::from_proto(&e).is_err());
        e.weight = 2;
        e.health = 99;
        assert_eq!(
            EndpointMeta::from_proto(&e).unwrap().health,
            Health::Unhealthy
        );
    }
}
