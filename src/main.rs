#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = egressd::cli::Cli::parse();
    egressd::cli::init_logging(cli.log_format);
    match egressd::cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egressd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
