//! `egressd explain CONFIG --src IP --dst IP:PORT`. (Issue 4.)

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
}

pub fn explain(_args: ExplainArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("explain is not implemented yet (issue 4)")
}
