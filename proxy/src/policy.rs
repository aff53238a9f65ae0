//! Per-service traffic policy from the control plane: active health checks and a
//! request timeout. Validated on arrival like every other part of an update.

use std::time::Duration;

use tandem_proto::discovery::v1 as pb;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    pub health_check: Option<HealthCheck>,
    pub request_timeout: Option<Duration>,
}

impl Policy {
    pub fn from_proto(p: &pb::Policy) -> Result<Self, String> {
        let health_check = match &p.health_check {
            None => None,
            Some(h) if h.path.is_empty() => None,
            Some(h) => {
                if !h.path.starts_with('/') {
                    return Err(format!(
                        "health check path {:?} does not start with /",
                        h.path
                    ));
                }
                Some(HealthCheck {
                    path: h.path.clone(),
                    // Guard against a zero interval hammering endpoints.
                    interval: Duration::from_millis(h.interval_ms.max(100) as u64),
                    timeout: Duration::from_millis(h.timeout_ms.max(10) as u64),
                    unhealthy_threshold: h.unhealthy_threshold.max(1),
                    healthy_threshold: h.healthy_threshold.max(1),
                })
            }
        };
        Ok(Self {
            health_check,
            request_timeout: (p.request_timeout_ms > 0)
                .then(|| Duration::from_millis(p.request_timeout_ms as u64)),
        })
    }
}
