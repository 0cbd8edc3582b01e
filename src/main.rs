#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = egressd::cli::Cli::parse();
    let logging = egressd::cli::init_logging(cli.log_format);
    let result = egressd::cli::dispatch(cli);
    // Queued log lines go out before the error that ends the program.
    drop(logging);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egressd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
