//! Where an endpoint or a proxy runs: the balancer's tiers compare localities.

/// Kubernetes' topology: region, zone and an optional subzone. Empty strings are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Locality {
    pub region: String,
    pub zone: String,
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "String::is_empty"))]
    pub subzone: String,
}

impl Locality {
    /// Parses `REGION/ZONE` or `REGION/ZONE/SUBZONE` (the proxy's `--locality`,
    /// `tandem simulate --from`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [region, zone] | [region, zone, _] if !region.is_empty() && !zone.is_empty() => {
                Ok(Self {
                    region: region.to_string(),
                    zone: zone.to_string(),
                    subzone: parts.get(2).unwrap_or(&"").to_string(),
                })
            }
            _ => Err(format!(
                "locality {s:?} is not REGION/ZONE or REGION/ZONE/SUBZONE"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let l = Locality::parse("eu-west-1/eu-west-1a").unwrap();
        assert_eq!(
            (l.region.as_str(), l.zone.as_str()),
            ("eu-west-1", "eu-west-1a")
        );
        assert_eq!(Locality::parse("r/z/s").unwrap().subzone, "s");
        assert!(Locality::parse("just-a-zone").is_err());
        assert!(Locality::parse("/z").is_err());
    }
}
