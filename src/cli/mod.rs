//! The command line: one module per subcommand; this one owns parsing and dispatch.

pub mod assets;
pub mod check;
pub mod doctor;
pub mod explain;
pub mod flows;
pub mod import;
pub mod log_writer;
pub mod reload;
pub mod run;
pub mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "egressd",
    version,
    about = "Egress gateway on AF_XDP: default-deny policy and SNAT to fixed egress IPs",
    long_about = "egressd forwards the traffic that leaves a cluster through a dedicated egress node: every \
packet from the inside interface passes a default-deny policy (source groups, destination CIDRs, protocols, \
ports; TLS and HTTP flows checked by name on the L7 path) and leaves by the outside interface from its group's \
fixed egress IP (SNAT with connection tracking). Worker threads pinned to cores busy-poll AF_XDP sockets; the \
kernel keeps ARP and the node's own traffic.",
    after_long_help = "FILES:\n  /etc/egressd/egressd.toml  the configuration (egressd check validates it)\n  \
/usr/share/doc/egressd/examples/  example policies\n\nSIGNALS:\n  SIGHUP reloads the configuration (a refused \
file keeps the running one); SIGINT and SIGTERM detach the XDP programs and stop.\n\nEXIT STATUS:\n  0 on \
success; 1 when a check fails or a request is refused; 2 on a usage error.\n\nSEE ALSO:\n  egressd-run(8), \
egressd-check(8), egressd-explain(8), egressd-flows(8), egressd-doctor(8), egressd-import(8); the admin endpoint serves /metrics, \
/healthz, /readyz and /flows on 127.0.0.1:9900 by default."
)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: attach to the interfaces and forward until SIGINT/SIGTERM. SIGHUP reloads the policy.
    Run(run::RunArgs),
    /// Validate and compile a configuration; print a summary. Exit 1 on any error.
    Check(check::CheckArgs),
    /// Show how the policy judges one flow: group, deciding rule, verdict, egress IP, and why.
    Explain(explain::ExplainArgs),
    /// Print a running gateway's counters.
    Stats(stats::StatsArgs),
    /// Ask a running gateway to re-read its configuration.
    Reload(AdminArgs),
    /// Check this node's setup against a configuration (interfaces, queues, MTU, egress IPs, ip_forward, next
    /// hops, XDP, the running gateway) and say how to fix what is wrong. Exit 1 on any failure.
    Doctor(doctor::DoctorArgs),
    /// List a running gateway's live flows, or delete them (--delete), like conntrack -L / -D.
    Flows(flows::FlowsArgs),
    /// Translate Istio or Cilium YAML into egressd rules (printed; with a comment for what is not translated).
    Import(import::ImportArgs),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets(assets::AssetsArgs),
}

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The running gateway's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:9900")]
    pub admin: SocketAddr,
    /// File holding the bearer token of an admin endpoint with `remote_control` (control requests only).
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
}

impl AdminArgs {
    /// The bearer token from `--token-file`, if one is named.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
        Ok(Some(token.trim().to_string()))
    }
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path to the TOML configuration.
    pub config: PathBuf,
}

/// Logs go to stderr in batches (see [`log_writer`]). The returned guard writes what is pending when dropped;
/// keep it until the program ends.
pub fn init_logging(format: LogFormat) -> log_writer::FlushGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = log_writer::batched_stderr();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::check(args),
        Command::Explain(args) => explain::explain(args),
        Command::Stats(args) => stats::stats(args),
        Command::Reload(args) => reload::reload(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Flows(args) => flows::flows(args),
        Command::Import(args) => import::run(args),
        Command::GenerateAssets(args) => assets::generate(args),
    }
}
