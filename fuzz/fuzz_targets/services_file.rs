//! The control plane's services-file parser
//! (`tandem_control_plane::source::file::parse`): YAML text (serde-saphyr, with its
//! budget) into the desired state handed to the index. The file is written by
//! operators, or by whatever renders a ConfigMap.
//!
//! Checks, beyond "no panic" and no runaway memory or time: what is accepted
//! holds only what the parser promises (DNS-label names, ports and weights not
//! 0, each endpoint under its own address, finite non-negative caller shares),
//! parsing is deterministic, and a rejection names a line inside the text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_control_plane::source::file::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let result = parse(text);
    assert_eq!(result, parse(text), "parsing is not deterministic");
    match result {
        Ok(content) => {
            for (key, spec) in &content.services {
                assert!(dns_label(&key.name) && dns_label(&key.namespace), "{key}");
                assert_ne!(key.port, 0);
                for (address, endpoint) in &spec.endpoints {
                    assert_eq!(*address, endpoint.address);
                    assert_ne!(address.port(), 0);
                    assert!(endpoint.weight >= 1);
                }
                for share in spec.callers.values() {
                    assert!(share.is_finite() && *share >= 0.0);
                }
                if let Some(check) = &spec.policy.health_check {
                    assert!(check.path.starts_with('/'));
                    assert!(check.unhealthy_threshold >= 1 && check.healthy_threshold >= 1);
                }
            }
            for name in content.nodes.keys() {
                assert!(!name.is_empty());
            }
        }
        Err(error) => {
            // YAML breaks lines at CR LF, LF and a lone CR.
            let lines = text
                .replace("\r\n", "\n")
                .replace('\r', "\n")
                .split('\n')
                .count() as u32;
            if let Some(line) = error.line {
                assert!(
                    line <= lines,
                    "error on line {line} of a {lines}-line text: {error}"
                );
            }
            assert!(!error.message.is_empty());
        }
    }
});

fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
