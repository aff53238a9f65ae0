//! Logging set-up: `tracing` to stderr, filtered by `RUST_LOG` (default `info`),
//! human-readable or one JSON object per line (`--log-format json`).

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" | "text" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?}: use plain or json")),
        }
    }
}

/// Without `RUST_LOG`: info, but not kube's client, which logs every retry against an
/// unreachable API server; the control plane reports an outage itself, once, with the reason.
const DEFAULT_FILTER: &str = "info,kube_client=off";

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored),
/// which lets `tandem demo` start servers in-process without fighting over the logger.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
