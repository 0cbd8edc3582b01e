//! `egressd check CONFIG [--strict]`: validate, compile, print a summary; exit 1 with file:line:col errors (and,
//! with `--strict`, on any warning: for CI pipelines that lint policies).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Treat warnings as errors: exit 1 when there is any.
    #[arg(long)]
    pub strict: bool,
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    match crate::config::load(&args.config.config) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{}: {w}", if args.strict { "error (--strict)" } else { "warning" });
            }
            if args.strict && !loaded.warnings.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
            let started = std::time::Instant::now();
            let snapshot = match crate::policy::compile(&loaded.config, 1) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}: {e}", args.config.config.display());
                    return Ok(ExitCode::FAILURE);
                }
            };
            let s = snapshot.stats();
            println!("{}: ok", args.config.config.display());
            println!(
                "groups {}, rules {}, source prefixes {}, destination leaves {}, port runs {}, trie nodes {}",
                s.groups, s.rules, s.source_prefixes, s.destination_leaves, s.port_runs, s.trie_nodes
            );
            println!(
                "tables {} KiB, compiled in {:?}, warnings {}",
                s.table_bytes.div_ceil(1024),
                started.elapsed(),
                loaded.warnings.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(ExitCode::FAILURE)
        }
    }
}
