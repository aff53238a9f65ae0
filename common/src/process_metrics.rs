//! `process_*` metrics (CPU seconds, resident memory, open fds, threads) read from
//! `/proc/self` at scrape time, as Prometheus' own client libraries export them.
//! Steady RSS is a product feature of the proxy, so it is always on the dashboard.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Linux exposes `/proc/<pid>/stat` times in USER_HZ, which is 100 on every architecture
/// Tandem targets (it is part of the kernel ABI, independent of CONFIG_HZ).
const USER_HZ: f64 = 100.0;

#[derive(Debug, Default)]
pub struct ProcessCollector;

#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    resident_bytes: i64,
    threads: i64,
    open_fds: i64,
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it follow its ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields are numbered from 3 (state) in proc(5): utime=14, stime=15, threads=20, rss=24.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<i64>().ok());
    let page_size = 4096;
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count() as i64)
        .unwrap_or(0);
    Some(Sample {
        cpu_seconds: (field(14)? + field(15)?) as f64 / USER_HZ,
        resident_bytes: field(24)? * page_size,
        threads: field(20)?,
        open_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            ("process_threads", "Number of OS threads", s.threads),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let s = super::sample().expect("/proc/self is readable");
        assert!(s.resident_bytes > 0);
        assert!(s.threads >= 1);
        assert!(s.open_fds >= 1);
    }
}
