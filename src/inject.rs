//! `tandem inject`: the webhook's mutation, offline, on YAML files or stdin
//! (multi-document streams and Lists). Workloads (Pods, Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, Jobs, CronJobs) get the proxy in their pod template;
//! every other document is written back unchanged. The result goes to stdout, what
//! happened to each workload to stderr:
//!
//! ```sh
//! tandem inject app.yaml | kubectl apply -f -
//! kubectl get deploy web -o yaml | tandem inject - | kubectl apply -f -
//! ```

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use tandem_control_plane::injection::InjectArgs;
use tandem_control_plane::injection::manifests::inject_stream;

#[derive(Debug, clap::Args)]
pub struct InjectCommand {
    /// YAML files to inject; `-` or none: stdin.
    pub files: Vec<PathBuf>,
    /// Say nothing on stderr about each workload.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub inject: InjectArgs,
}

pub fn run(args: InjectCommand) -> anyhow::Result<()> {
    let config = args.inject.validate().map_err(anyhow::Error::msg)?;
    let files = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files
    };
    // Everything is read and injected before anything is written: an error leaves
    // stdout empty, never half a stream.
    let mut out = String::new();
    let mut notes = Vec::new();
    for file in &files {
        let (name, text) = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read stdin")?;
            ("-".to_string(), text)
        } else {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            (file.display().to_string(), text)
        };
        let (injected, file_notes) = inject_stream(&text, &name, &config)?;
        if !out.is_empty() && !injected.is_empty() {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            if !injected.starts_with("---") {
                out.push_str("---\n");
            }
        }
        out.push_str(&injected);
        notes.extend(file_notes.into_iter().map(|n| (name.clone(), n)));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write stdout")?;
    if !args.quiet {
        let mut stderr = std::io::stderr().lock();
        for (file, note) in notes {
            let _ = writeln!(stderr, "{file}: {note}");
        }
    }
    Ok(())
}
