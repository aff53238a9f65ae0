//! HTTP/2 conformance: every test of h2spec's `generic`, `http2` and `hpack`
//! sections against a real proxy (in front of a real backend), over h2c (prior
//! knowledge, plain port) and over TLS (ALPN h2).
//!
//! The h2spec binary is built by `tests/cluster/build-tools.sh h2spec` (pinned in
//! `tests/cluster/tools/h2spec/go.mod`); `scripts/test.sh` builds it and exports
//! `TANDEM_H2SPEC`. Without it, these tests fail (never skip) and say how to build it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;

/// The whole run, both processes started: h2spec itself takes well under a second
/// when everything passes (no case waits out its timeout), and up to its timeout
/// for each case that fails.
const LIMIT: Duration = Duration::from_secs(180);
/// h2spec's timeout per test case, in seconds (`-o`): roomy, for a loaded machine.
const CASE_TIMEOUT: &str = "5";
const SECTIONS: [&str; 3] = ["generic", "http2", "hpack"];

/// Tests allowed to fail over h2c, with the reason (the README lists them).
const H2C_EXCEPTIONS: &[(&str, &str)] = &[(
    "http2/3.5/2",
    "Sends invalid connection preface: the plain port serves HTTP/1.1 and h2c \
     alike, so bytes that are not the h2c preface are an HTTP/1.1 request, and \
     garbage gets an HTTP/1.1 400 before the close (over TLS, ALPN h2 says \
     HTTP/2 and the proxy just closes: that passes)",
)];
/// Tests allowed to fail over TLS: none.
const TLS_EXCEPTIONS: &[(&str, &str)] = &[];

#[tokio::test]
async fn h2spec_passes_over_h2c() {
    bounded(LIMIT, async {
        let h2spec = h2spec();
        let backend = backend("instance-1").await;
        let proxy = static_proxy(&[backend.addr("http")], &[]).await;
        let dir = TestDir::new("h2spec-h2c");
        let report = run(&h2spec, proxy.addr("proxy"), false, &dir).await;
        check("h2c", &report, H2C_EXCEPTIONS);
    })
    .await
}

#[tokio::test]
async fn h2spec_passes_over_tls() {
    bounded(LIMIT, async {
        let h2spec = h2spec();
        let dir = TestDir::new("h2spec-tls");
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("generate a certificate");
        let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let backend = backend("instance-1").await;
        let tls = [
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        let proxy = static_proxy(&[backend.addr("http")], &tls).await;
        let report = run(&h2spec, proxy.addr("proxy"), true, &dir).await;
        check("TLS", &report, TLS_EXCEPTIONS);
    })
    .await
}

/// The h2spec binary: `TANDEM_H2SPEC`, or where `build-tools.sh` builds it.
fn h2spec() -> PathBuf {
    built_tool("h2spec", "h2spec", "TANDEM_H2SPEC")
}

/// Runs h2spec's sections against the proxy at `addr`; returns its JUnit report.
async fn run(h2spec: &Path, addr: std::net::SocketAddr, tls: bool, dir: &TestDir) -> String {
    let report = dir.path("report.xml");
    let mut command = tokio::process::Command::new(h2spec);
    command
        .args(SECTIONS)
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-o", CASE_TIMEOUT, "-j"])
        .arg(&report)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if tls {
        command.args(["-t", "-k"]);
    }
    // h2spec exits non-zero when a test fails; the report says which.
    let output = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", h2spec.display()));
    std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "h2spec wrote no report ({e}; exit {}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// One test case of the report: `section/number/index` (as h2spec's own output
/// numbers it, e.g. `http2/5.1/8`), its description, and why it did not pass.
struct Case {
    id: String,
    name: String,
    outcome: Option<String>,
}

/// The test cases of an h2spec JUnit report (plain string scanning: h2spec's
/// writer, Go's encoding/xml, always writes `<testcase ...>...</testcase>`).
fn cases(report: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut package = String::new();
    let mut index = 0;
    let mut rest = report;
    while let Some(at) = rest.find("<testcase ") {
        rest = &rest[at..];
        let end = rest
            .find("</testcase>")
            .expect("a <testcase> without its end tag");
        let case = &rest[..end];
        rest = &rest[end..];
        let attr = |name: &str| {
            let key = format!(" {name}=\"");
            let start = case.find(&key).map(|i| i + key.len())?;
            let len = case[start..].find('"')?;
            Some(case[start..start + len].to_string())
        };
        let this_package = attr("package").expect("a test case without its package");
        if this_package != package {
            package = this_package;
            index = 0;
        }
        index += 1;
        let body = &case[case.find('>').unwrap() + 1..];
        let outcome = ["failure", "error", "skipped"]
            .into_iter()
            .find(|tag| body.contains(&format!("<{tag}")))
            .map(|tag| {
                let text = body.trim().trim_start_matches(&format!("<{tag}>"));
                format!("{tag}: {}", text.trim_end_matches(&format!("</{tag}>")))
            });
        cases.push(Case {
            id: format!("{package}/{index}"),
            name: attr("classname").unwrap_or_default(),
            outcome,
        });
    }
    cases
}

/// Asserts every test passed, but for the named exceptions.
fn check(transport: &str, report: &str, exceptions: &[(&str, &str)]) {
    let cases = cases(report);
    for section in SECTIONS {
        assert!(
            cases
                .iter()
                .any(|c| c.id.starts_with(&format!("{section}/"))),
            "over {transport}: no test of h2spec's {section} section ran:\n{report}"
        );
    }
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c.outcome.is_some())
        .filter(|c| !exceptions.iter().any(|(id, _)| *id == c.id))
        .map(|c| format!("{} {}\n  {}", c.id, c.name, c.outcome.as_ref().unwrap()))
        .collect();
    let passed = cases.iter().filter(|c| c.outcome.is_none()).count();
    eprintln!(
        "h2spec over {transport}: {} tests, {passed} passed, {} failed ({} named exceptions)",
        cases.len(),
        cases.len() - passed,
        exceptions.len()
    );
    assert!(
        failed.is_empty(),
        "h2spec over {transport}: {} test(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
