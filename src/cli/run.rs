//! `egressd run CONFIG`: validate the configuration, then run the gateway (`crate::gateway`) until SIGINT/SIGTERM.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let path = args.config.config;
    let loaded = match crate::config::load(&path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    crate::gateway::run(loaded, crate::gateway::RunOptions { config_path: path })?;
    Ok(ExitCode::SUCCESS)
}
