//! `egressd flows`: list or delete a running gateway's live flows through its admin endpoint (what
//! `conntrack -L` and `conntrack -D` do for the kernel's NAT).

use std::fmt::Write as _;
use std::process::ExitCode;

use crate::flows::{parse_endpoint, FlowDeletion, FlowListing, DEFAULT_LIMIT};

#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub admin: super::AdminArgs,
    /// Inside (client) address, prefix or endpoint: ADDR[/LEN][:PORT].
    #[arg(long, value_parser = endpoint)]
    pub inside: Option<String>,
    /// Egress address or endpoint: IP[:PORT] ("who was 192.0.2.10:40123?").
    #[arg(long, value_parser = endpoint)]
    pub egress: Option<String>,
    /// Remote (destination) address, prefix or endpoint: ADDR[/LEN][:PORT].
    #[arg(long, value_parser = endpoint)]
    pub remote: Option<String>,
    /// Protocol.
    #[arg(long, value_parser = ["tcp", "udp", "icmp"])]
    pub proto: Option<String>,
    /// State.
    #[arg(long, value_parser = ["syn_sent", "established", "closing", "active", "unsolicited"])]
    pub state: Option<String>,
    /// Source group of the inside address (its name in the running policy).
    #[arg(long)]
    pub group: Option<String>,
    /// Most flows to list.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    pub limit: u32,
    /// Print the admin endpoint's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Remove the matching flows instead of listing them (their next packets start new flows, judged anew).
    #[arg(long)]
    pub delete: bool,
    /// With --delete and no filter: remove every flow.
    #[arg(long, requires = "delete")]
    pub all: bool,
}

fn endpoint(text: &str) -> Result<String, String> {
    parse_endpoint(text).map(|_| text.to_string())
}

impl FlowsArgs {
    fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("inside", &self.inside),
            ("egress", &self.egress),
            ("remote", &self.remote),
            ("proto", &self.proto),
            ("state", &self.state),
            ("group", &self.group),
        ] {
            if let Some(v) = value {
                q.append_pair(key, v);
            }
        }
        if self.delete {
            if self.all {
                q.append_pair("all", "yes");
            }
        } else {
            q.append_pair("limit", &self.limit.to_string());
        }
        q.finish()
    }
}

pub fn flows(args: FlowsArgs) -> anyhow::Result<ExitCode> {
    let token = args.admin.token()?;
    let query = args.query();
    let (method, path) = if args.delete { ("POST", "/flows/delete") } else { ("GET", "/flows") };
    let (status, body) = crate::admin::http_request_with(
        args.admin.admin,
        method,
        &format!("{path}?{query}"),
        token.as_deref(),
    )?;
    if status != 200 {
        eprintln!("egressd flows: {} ({status})", body.trim());
        return Ok(ExitCode::FAILURE);
    }
    if args.json {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    if args.delete {
        let deletion: FlowDeletion = serde_json::from_str(&body)?;
        println!("{} flow(s) deleted", deletion.deleted);
    } else {
        let listing: FlowListing = serde_json::from_str(&body)?;
        print!("{}", table(&listing, args.limit));
    }
    Ok(ExitCode::SUCCESS)
}

/// The listing as a table, one flow per line.
fn table(listing: &FlowListing, limit: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<21} {:<21} {:<21} {:<12} {:<12} {:>6} {:>8} {:>3}",
        "PROTO", "INSIDE", "EGRESS", "REMOTE", "STATE", "GROUP", "IDLE", "EXPIRES", "W"
    );
    for f in &listing.flows {
        let _ = write!(
            out,
            "{:<5} {:<21} {:<21} {:<21} {:<12} {:<12} {:>5}s {:>7}s {:>3}",
            f.proto, f.inside, f.egress, f.remote, f.state, f.group, f.idle_secs, f.expires_in_secs, f.worker
        );
        if let (Some(po), Some(pi), Some(bo), Some(bi)) =
            (f.packets_out, f.packets_in, f.bytes_out, f.bytes_in)
        {
            let _ = write!(out, "  out {po} pkt {bo} B, in {pi} pkt {bi} B");
        }
        if f.hairpin {
            out.push_str("  hairpin");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} flow(s){}",
        listing.flows.len(),
        if listing.truncated { format!(", more match (raise --limit above {limit})") } else { String::new() }
    );
    out
}
