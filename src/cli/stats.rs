//! `egressd stats`: fetch and print a running gateway's counters from its admin endpoint.

use std::process::ExitCode;

pub fn stats(_args: super::AdminArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("stats is not implemented yet")
}
