//! The start-up announcement.
//!
//! Every Tandem server prints exactly one line to stdout once all its listeners are
//! bound: `{"listening":{"proxy":"127.0.0.1:4140","admin":"127.0.0.1:4191"}}`. Logs
//! go to stderr, so this line is the only thing on stdout. `tandem demo` and the
//! end-to-end tests read it to learn the ports the OS gave (`--listen 127.0.0.1:0`).

use std::io::Write;
use std::net::SocketAddr;

/// Prints the listening line for the named addresses and flushes stdout.
pub fn listening(addrs: &[(&str, SocketAddr)]) {
    let map: serde_json::Map<String, serde_json::Value> = addrs
        .iter()
        .map(|(name, addr)| (name.to_string(), addr.to_string().into()))
        .collect();
    let line = serde_json::json!({ "listening": map });
    let mut out = std::io::stdout().lock();
    // A closed stdout (the parent went away) must not stop the server.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Parses a listening line back into `(name, address)` pairs; `None` for any other line.
pub fn parse_listening(line: &str) -> Option<Vec<(String, SocketAddr)>> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let map = value.get("listening")?.as_object()?;
    map.iter()
        .map(|(k, v)| Some((k.clone(), v.as_str()?.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let line = r#"{"listening":{"admin":"127.0.0.1:2","proxy":"127.0.0.1:1"}}"#;
        let parsed = parse_listening(line).unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(parse_listening("some log line").is_none());
    }
}
