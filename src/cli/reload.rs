//! `egressd reload`: ask a running gateway to re-read its configuration.

use std::process::ExitCode;

pub fn reload(_args: super::AdminArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("reload is not implemented yet")
}
