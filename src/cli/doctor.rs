//! `egressd doctor CONFIG [--admin ADDR]`: checks a node's setup against its configuration and says what is
//! wrong and how to fix it — the troubleshooting runbook as one command. Run it on the node (in the gateway's
//! network namespace). Each check prints `ok`, `warn` or `FAIL` with the fix; the exit code is 1 if any failed.
//!
//! Checks: the configuration loads; both interfaces exist and are up; the XDP program is attached (and in which
//! mode); the NIC has at least as many queues as workers; the MTUs fit `frame_size`; every egress IP is an
//! address of the outside interface; `ip_forward` is off; the routes' next hops are resolved; the admin endpoint
//! answers, is ready, runs which policy generation, and which drop reasons moved.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Path to the TOML configuration the gateway runs with.
    pub config: PathBuf,
    #[command(flatten)]
    pub admin: super::AdminArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Report {
    text: String,
    worst: Level,
}

impl Report {
    fn say(&mut self, level: Level, what: &str, detail: impl AsRef<str>) {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        let _ = writeln!(self.text, "{tag}  {what}: {}", detail.as_ref());
        self.worst = self.worst.max(level);
    }
}

fn sysfs(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

pub fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut r = Report { text: String::new(), worst: Level::Ok };
    let loaded = match crate::config::load(&args.config) {
        Ok(loaded) => {
            r.say(Level::Ok, "configuration", format!("{} loads", args.config.display()));
            loaded
        }
        Err(e) => {
            r.say(Level::Fail, "configuration", format!("{e} (fix the file; `egressd check` explains)"));
            print!("{}", r.text);
            return Ok(ExitCode::FAILURE);
        }
    };
    let config = &loaded.config;
    let dp = &config.dataplane;
    let workers = dp.cores().len().max(1);
    for (role, interface) in [("inside", dp.inside.get_ref()), ("outside", dp.outside.get_ref())] {
        let base = format!("/sys/class/net/{interface}");
        let Some(state) = sysfs(&format!("{base}/operstate")) else {
            r.say(
                Level::Fail,
                &format!("{role} interface"),
                format!("{interface} does not exist here (wrong name, or not in this namespace)"),
            );
            continue;
        };
        // IFF_UP: set administratively up. The operational state adds the carrier.
        let admin_up = sysfs(&format!("{base}/flags"))
            .and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok())
            .is_some_and(|f| f & 1 != 0);
        if !admin_up {
            r.say(
                Level::Fail,
                &format!("{role} interface"),
                format!("{interface} is down: ip link set {interface} up"),
            );
        } else if state == "down" {
            r.say(Level::Warn, &format!("{role} interface"), format!("{interface} is up but has no carrier"));
        } else {
            r.say(Level::Ok, &format!("{role} interface"), format!("{interface} is {state}"));
        }
        let queues = std::fs::read_dir(format!("{base}/queues"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                    .count()
            })
            .unwrap_or(0);
        if queues < workers {
            r.say(
                Level::Fail,
                &format!("{role} queues"),
                format!("{interface} has {queues} rx queue(s) for {workers} worker(s): ethtool -L {interface} combined {workers}"),
            );
        } else {
            r.say(Level::Ok, &format!("{role} queues"), format!("{queues} rx queue(s), {workers} worker(s)"));
        }
        match crate::fib::interface_mtu(interface) {
            Ok(mtu) => match crate::fib::check_mtu(interface, mtu, dp.frame_size()) {
                Ok(()) => r.say(
                    Level::Ok,
                    &format!("{role} MTU"),
                    format!("{mtu} fits frame_size {}", dp.frame_size()),
                ),
                Err(e) => r.say(Level::Fail, &format!("{role} MTU"), e),
            },
            Err(e) => r.say(Level::Warn, &format!("{role} MTU"), e.to_string()),
        }
        let link = std::process::Command::new("ip").args(["-d", "link", "show", "dev", interface]).output();
        let link = link.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        if link.contains("xdpgeneric") {
            r.say(
                Level::Warn,
                &format!("{role} XDP"),
                "attached in generic (skb) mode: slower; the driver lacks native XDP",
            );
        } else if link.contains("prog/xdp") || link.contains(" xdp") {
            r.say(Level::Ok, &format!("{role} XDP"), "attached");
        } else {
            r.say(
                Level::Warn,
                &format!("{role} XDP"),
                "no XDP program attached: egressd is not running on it",
            );
        }
    }
    let outside = dp.outside.get_ref();
    let addresses: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .map(|all| {
            all.into_iter()
                .filter(|a| &a.name == outside)
                .filter_map(|a| match a.ip() {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    std::net::IpAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let egress_ips = crate::gateway::egress_ips(&loaded);
    let missing: Vec<String> =
        egress_ips.iter().filter(|ip| !addresses.contains(ip)).map(|ip| ip.to_string()).collect();
    if missing.is_empty() {
        r.say(Level::Ok, "egress IPs", format!("{} on {outside}", egress_ips.len()));
    } else {
        r.say(
            Level::Fail,
            "egress IPs",
            format!(
                "{} not on {outside}: the kernel will not answer ARP for them (ip addr add {}/32 dev {outside})",
                missing.join(", "),
                missing[0]
            ),
        );
    }
    match sysfs("/proc/sys/net/ipv4/ip_forward").as_deref() {
        Some("0") => {
            r.say(Level::Ok, "ip_forward", "off: nothing crosses the node when egressd is not running")
        }
        Some(_) => r.say(
            Level::Fail,
            "ip_forward",
            "on: traffic can cross the node unfiltered when egressd stops (sysctl -w net.ipv4.ip_forward=0)",
        ),
        None => r.say(Level::Warn, "ip_forward", "cannot read /proc/sys/net/ipv4/ip_forward"),
    }
    match crate::fib::Fib::new(dp.inside.get_ref(), outside).read(&egress_ips) {
        Ok((table, warnings)) => {
            for warning in warnings {
                r.say(Level::Warn, "policy routing", warning);
            }
            if table.routes_by_source() {
                let own: Vec<String> = table.outside_from.iter().map(|(ip, _)| ip.to_string()).collect();
                r.say(
                    Level::Ok,
                    "policy routing",
                    format!(
                        "{} routed by tables of their own (ip rule), the rest by the main chain",
                        own.join(", ")
                    ),
                );
            }
            let unresolved: Vec<String> = [&table.inside, &table.outside]
                .into_iter()
                .chain(table.outside_from.iter().map(|(_, t)| t))
                .flat_map(|side| side.unresolved_gateways())
                .map(|gateway| gateway.to_string())
                .collect();
            if unresolved.is_empty() {
                r.say(Level::Ok, "next hops", "every route's gateway is resolved");
            } else {
                r.say(
                    Level::Warn,
                    "next hops",
                    format!("{} not resolved yet (egressd asks the kernel when traffic needs them; ping them to check)", unresolved.join(", ")),
                );
            }
        }
        Err(e) => r.say(Level::Fail, "next hops", format!("cannot read routes and neighbours: {e}")),
    }
    match crate::admin::http_request(args.admin.admin, "GET", "/readyz") {
        Ok((200, _)) => {
            r.say(Level::Ok, "admin endpoint", format!("{} answers and is ready", args.admin.admin))
        }
        Ok((status, body)) => r.say(
            Level::Fail,
            "admin endpoint",
            format!("{} answers {status} to /readyz: {}", args.admin.admin, body.trim()),
        ),
        Err(e) => r.say(
            Level::Fail,
            "admin endpoint",
            format!("{e}; check `systemctl status egressd` and [admin] listen"),
        ),
    }
    if let Ok((200, metrics)) = crate::admin::http_request(args.admin.admin, "GET", "/metrics") {
        let value = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit_once(' '))
                .map(|(_, v)| v.to_string())
        };
        if let Some(generation) = value("egressd_policy_generation ") {
            let last_ok = value("egressd_last_reload_success ").is_none_or(|v| v == "1");
            let level = if last_ok { Level::Ok } else { Level::Warn };
            r.say(
                level,
                "policy",
                format!(
                    "generation {generation}{}",
                    if last_ok { "" } else { "; the last reload was refused (see the log)" }
                ),
            );
        }
        let mut drops: Vec<(f64, String)> = metrics
            .lines()
            .filter(|l| l.starts_with("egressd_drops_total{"))
            .filter_map(|l| {
                let (series, v) = l.rsplit_once(' ')?;
                let reason = series.split('"').nth(1)?.to_string();
                Some((v.parse::<f64>().ok()?, reason))
            })
            .filter(|(v, _)| *v > 0.0)
            .collect();
        drops.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top: Vec<String> = drops.iter().take(5).map(|(v, reason)| format!("{reason} {v}")).collect();
        r.say(Level::Ok, "drops", if top.is_empty() { "none".to_string() } else { top.join(", ") });
    }
    print!("{}", r.text);
    Ok(if r.worst == Level::Fail { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
