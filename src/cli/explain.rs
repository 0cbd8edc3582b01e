//! `egressd explain CONFIG --src IP --dst IP[:PORT] [--proto tcp|udp|icmp] [--host NAME] [--json]`: how the policy
//! judges one flow.
//!
//! The verdict comes from [`PolicySnapshot::evaluate`], the very lookup the workers run, on a snapshot compiled
//! by the same `crate::policy::compile`; this module only adds the words around it: which group and rule (with
//! their file:line), the egress IP the flow would leave from, and a one-line reason reconstructed from the rules
//! as written (the most specific matching destination, the excepts that did or did not apply, the rules it beat).
//! Exit status 0 whatever the verdict; 1 when the configuration or the flow cannot be read.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use dataplane::policy::{DenyReason, GroupId, PolicySnapshot, RuleId, RuleSpec, Verdict};
use dataplane::wire::ip_proto;
use serde::Serialize;

use crate::config::Loaded;

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// Source address of the flow (an inside workload).
    #[arg(long)]
    pub src: String,
    /// Destination: IP, IP:PORT or [IPv6]:PORT. The port is required for tcp and udp.
    #[arg(long)]
    pub dst: String,
    /// Protocol of the flow: tcp, udp or icmp.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// SNI or Host name the client would present (checked against the hosts of an l7 rule). Alias: --sni.
    #[arg(long, alias = "sni")]
    pub host: Option<String>,
    /// HTTP method of the request (checked against an l7 rule's `methods`; default GET with --path).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path of the request (checked against an l7 rule's `paths`; default / with --method).
    #[arg(long)]
    pub path: Option<String>,
    /// A request header, `NAME:VALUE` (repeatable): checked against the rule's `headers` and a service's routes.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The flow to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (`ip_proto::TCP`, `UDP` or `ICMP`).
    pub proto: u8,
    /// Destination port; 0 for ICMP.
    pub port: u16,
    pub host: Option<String>,
    /// The HTTP request's method and path, if given.
    pub method: Option<String>,
    pub path: Option<String>,
    /// Request headers (lowercase names), if given.
    pub headers: Vec<(String, String)>,
}

/// `NAME:VALUE` → (lowercase name, trimmed value).
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) =
        text.split_once(':').ok_or_else(|| format!("--header {text:?}: expected NAME:VALUE"))?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)) {
        return Err(format!("--header {text:?}: {name:?} is not a header name"));
    }
    Ok((name.to_ascii_lowercase(), value.trim().to_string()))
}

impl Flow {
    /// Parses the command-line form. Errors are one line, naming the bad argument.
    pub fn parse(src: &str, dst: &str, proto: &str, host: Option<&str>) -> Result<Flow, String> {
        let src: IpAddr = src.trim().parse().map_err(|_| format!("--src: \"{src}\" is not an IP address"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => ip_proto::TCP,
            "udp" => ip_proto::UDP,
            "icmp" => ip_proto::ICMP,
            _ => return Err(format!("--proto: \"{proto}\" is not tcp, udp or icmp")),
        };
        let dst_text = dst.trim();
        let (dst, port) = if let Ok(addr) = dst_text.parse::<IpAddr>() {
            (addr, None)
        } else if let Ok(sa) = dst_text.parse::<SocketAddr>() {
            (sa.ip(), Some(sa.port()))
        } else {
            return Err(format!("--dst: \"{dst}\" is not IP, IP:PORT or [IPv6]:PORT"));
        };
        let port = match (proto, port) {
            (ip_proto::ICMP, _) => 0,
            (_, Some(0)) => return Err("--dst: port 0 is not a destination port".to_string()),
            (_, Some(port)) => port,
            (_, None) => {
                return Err(format!("--dst: give the destination port for tcp and udp, as in {dst}:443"))
            }
        };
        if src.is_ipv4() != dst.is_ipv4() {
            return Err("--src and --dst must be of the same address family".to_string());
        }
        Ok(Flow {
            src,
            dst,
            proto,
            port,
            host: host.map(str::to_string),
            method: None,
            path: None,
            headers: Vec::new(),
        })
    }

    fn proto_name(&self) -> &'static str {
        match self.proto {
            ip_proto::TCP => "tcp",
            ip_proto::UDP => "udp",
            _ => "icmp",
        }
    }

    /// `tcp 10.0.0.5 -> 203.0.113.7:443`
    pub fn describe(&self) -> String {
        let dst = match (self.proto, self.dst) {
            (ip_proto::ICMP, d) => d.to_string(),
            (_, d) => SocketAddr::new(d, self.port).to_string(),
        };
        format!("{} {} -> {}", self.proto_name(), self.src, dst)
    }
}

/// What `explain` prints; the JSON form is this struct.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub flow: String,
    /// `allow`, `deny` (a deny rule), `l7`, `default-deny` (no rule of the group matched), `no-group`, or
    /// `ipv6-unsupported` (an IPv6 flow: dropped by this version whatever the policy says).
    pub verdict: &'static str,
    /// The source's group.
    pub group: Option<String>,
    /// Where the group is defined, `file:line` of its name.
    pub group_at: Option<String>,
    /// The deciding rule, `file:line` of its `[[rule]]` header.
    pub rule: Option<String>,
    /// The deciding rule's `name`, if it has one.
    pub rule_name: Option<String>,
    /// The address the flow leaves from (null when the flow is not forwarded).
    pub egress_ip: Option<String>,
    /// A denial that is forwarded and counted (global or per-rule dry run); on l7, host mismatches pass too.
    pub dry_run: bool,
    /// `L4` (decided here) or `L7` (handed to the L7 path, which checks the host).
    pub layer: &'static str,
    /// Whether the dataplane forwards the first packet at L4 (allow, or a dry-run denial).
    pub forwarded: bool,
    /// One line: why.
    pub reason: String,
    /// With `--host` on an l7 verdict: whether the rule's host patterns allow it.
    pub host_allowed: Option<bool>,
    /// With `--method`/`--path` on an l7 rule with request conditions: whether they allow the request.
    pub request_allowed: Option<bool>,
    /// The policy's `to_hosts` names and the addresses they resolve to now (asked when explain runs).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub to_hosts: std::collections::BTreeMap<String, Vec<String>>,
    /// With `--host` naming a service on the flow's port: the service, and where the request goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRoute>,
}

/// Where a request for a service goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRoute {
    pub service: String,
    /// The matching route's name; null: none matches (the client gets 404).
    pub route: Option<String>,
    /// The route's subsets with their share in percent and their endpoints.
    pub subsets: Vec<SubsetShare>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SubsetShare {
    /// Empty: every endpoint of the service.
    pub subset: String,
    /// The share of connections, in percent (one decimal).
    pub percent: String,
    pub endpoints: Vec<String>,
    /// "plain", "simple TLS (server name ...)" or "mutual TLS (server name ...)".
    pub upstream: String,
}

/// Judges `flow` with `snapshot` (compiled from `loaded`) and says why.
pub fn explain_flow(loaded: &Loaded, snapshot: &PolicySnapshot, flow: &Flow) -> Explanation {
    let decision = snapshot.evaluate(flow.src, flow.dst, flow.proto, flow.port);
    let path = loaded.source.path.display().to_string();
    let rule_at = |id: RuleId| {
        let line =
            loaded.config.rule.get(id.0 as usize).map_or(0, |r| loaded.source.line_col(r.span().start).0);
        format!("{path}:{line}")
    };
    let group_at = |g: GroupId| {
        let line = loaded
            .config
            .group
            .get(g.0 as usize)
            .map_or(0, |c| loaded.source.line_col(c.name.span().start).0);
        format!("{path}:{line}")
    };
    let verdict = match decision.verdict {
        Verdict::Allow => "allow",
        Verdict::L7 => "l7",
        Verdict::Deny(DenyReason::Rule) => "deny",
        Verdict::Deny(DenyReason::DefaultDeny) => "default-deny",
        Verdict::Deny(DenyReason::NoGroup) => "no-group",
    };
    let leaves = decision.forwards() || decision.verdict == Verdict::L7;
    let egress_ip = match (decision.group, flow.src) {
        (Some(g), IpAddr::V4(src)) if leaves => snapshot.egress_ip_for(g, src).map(|ip| ip.to_string()),
        _ => None,
    };
    // Rules of the source's group, in file order.
    let group_rules: Vec<(RuleId, &RuleSpec)> = match decision.group {
        Some(g) => (0..snapshot.rule_count() as u32)
            .map(RuleId)
            .filter_map(|id| snapshot.rule(id).map(|r| (id, r)))
            .filter(|(_, r)| r.group == g)
            .collect(),
        None => Vec::new(),
    };
    let mut reason = String::new();
    let mut host_allowed = None;
    let mut service = None;
    let mut request_allowed = None;
    match (decision.group, decision.rule.and_then(|id| snapshot.rule(id).map(|r| (id, r)))) {
        (None, _) => reason.push_str(&format!("source {} is in no group's sources", flow.src)),
        (Some(g), None) => {
            let _ =
                write!(reason, "no rule of group \"{}\" matches {}", snapshot.group_name(g), flow.describe());
            let misses = near_misses(&group_rules, flow, &rule_at);
            if !misses.is_empty() {
                let _ = write!(reason, " ({})", misses.join("; "));
            }
        }
        (Some(_), Some((id, spec))) => {
            let matched = spec.matching_prefix(flow.dst).map_or("?".to_string(), |p| p.to_string());
            let _ = write!(reason, "longest matching destination {matched} in rule at {}", rule_at(id));
            if !spec.ports.is_empty() {
                let ranges: Vec<String> = spec
                    .ports
                    .iter()
                    .map(|r| {
                        if r.first == r.last {
                            r.first.to_string()
                        } else {
                            format!("{}-{}", r.first, r.last)
                        }
                    })
                    .collect();
                let _ = write!(reason, ", port {} in ports [{}]", flow.port, ranges.join(", "));
            }
            if !spec.except.is_empty() {
                let list: Vec<String> = spec.except.iter().map(ToString::to_string).collect();
                let _ = write!(reason, "; except {} did not match", list.join(", "));
            }
            let beaten: Vec<String> = group_rules
                .iter()
                .filter(|(other, r)| *other != id && r.matches_proto_port(flow.proto, flow.port))
                .filter_map(|(other, r)| {
                    r.matching_prefix(flow.dst).map(|p| format!("{} ({p})", rule_at(*other)))
                })
                .take(3)
                .collect();
            if !beaten.is_empty() {
                let _ = write!(reason, "; beats rule at {}", beaten.join(", "));
            }
            if decision.verdict == Verdict::L7 {
                let hosts: Vec<String> = spec.hosts.iter().map(ToString::to_string).collect();
                match &flow.host {
                    Some(host) => {
                        let allowed = snapshot.host_allowed(id, host);
                        host_allowed = Some(allowed);
                        match spec.hosts.iter().find(|p| p.matches(host)) {
                            Some(p) => {
                                let _ = write!(reason, "; host {host} matches {p}");
                            }
                            None => {
                                let _ = write!(
                                    reason,
                                    "; host {host} matches none of {}: the L7 path refuses it{}",
                                    hosts.join(", "),
                                    if decision.dry_run {
                                        " (dry run: lets it through and counts it)"
                                    } else {
                                        ""
                                    }
                                );
                            }
                        }
                        if let (true, Some(c)) = (allowed, snapshot.l7_conditions(id)) {
                            request_allowed = explain_request(c, flow, &mut reason);
                        }
                        if allowed && request_allowed != Some(false) {
                            service = explain_service(snapshot, flow, host, &mut reason);
                        }
                    }
                    None => {
                        let _ = write!(reason, "; the L7 path checks SNI/Host against {}", hosts.join(", "));
                    }
                }
            }
        }
    }
    if flow.src.is_ipv6() {
        // The policy's answer is shown for when IPv6 is forwarded; today the dataplane drops the flow.
        return Explanation {
            flow: flow.describe(),
            verdict: "ipv6-unsupported",
            group: decision.group.map(|g| snapshot.group_name(g).to_string()),
            group_at: decision.group.map(group_at),
            rule: decision.rule.map(rule_at),
            rule_name: decision.rule.and_then(|id| snapshot.rule(id)).and_then(|r| r.name.clone()),
            egress_ip: None,
            dry_run: false,
            layer: "L4",
            forwarded: false,
            reason: format!(
                "dropped and counted as ipv6_unsupported: this version forwards IPv4 only and drops transit IPv6 \
                 (the policy would say {verdict}: {reason})"
            ),
            host_allowed,
            request_allowed,
            to_hosts: Default::default(),
            service,
        };
    }
    if matches!(decision.verdict, Verdict::Deny(_)) {
        reason.push_str(if decision.dry_run {
            "; dry run: forwarded and counted"
        } else {
            "; dropped and counted"
        });
    }
    Explanation {
        flow: flow.describe(),
        verdict,
        group: decision.group.map(|g| snapshot.group_name(g).to_string()),
        group_at: decision.group.map(group_at),
        rule: decision.rule.map(rule_at),
        rule_name: decision.rule.and_then(|id| snapshot.rule(id)).and_then(|r| r.name.clone()),
        egress_ip,
        dry_run: decision.dry_run,
        layer: if decision.verdict == Verdict::L7 { "L7" } else { "L4" },
        forwarded: decision.forwards(),
        reason,
        host_allowed,
        request_allowed,
        to_hosts: Default::default(),
        service,
    }
}

/// With `--host` naming a service on the flow's port: the route the request takes (by `--method`, `--path` and
/// `--header`), its subsets' shares, endpoints and upstream TLS.
fn explain_service(
    snapshot: &PolicySnapshot,
    flow: &Flow,
    host: &str,
    reason: &mut String,
) -> Option<ServiceRoute> {
    let services = snapshot.services();
    let service = services.get(services.lookup(host, flow.port)?)?;
    let (method, path) = (flow.method.as_deref().unwrap_or("GET"), flow.path.as_deref().unwrap_or("/"));
    let header = |name: &str| flow.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_bytes());
    // A TLS client shows only the name: its route is the first without conditions on the request.
    let tls_clients = match service.tls_route() {
        Some(r) => format!(
            "TLS clients naming it take route {}, their own TLS passed through",
            service.route_name(r)
        ),
        None => "TLS clients naming it are refused (every route needs to see the request)".to_string(),
    };
    let Some(route) = service.route(method, path, header) else {
        let _ = write!(
            reason,
            "; service {}: no route matches {method} {path}, the client gets 404; {tls_clients}",
            service.name()
        );
        return Some(ServiceRoute { service: service.name().to_string(), route: None, subsets: Vec::new() });
    };
    let destinations = service.destinations(route);
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum::<u64>().max(1);
    let subsets: Vec<SubsetShare> = destinations
        .iter()
        .map(|d| SubsetShare {
            subset: service.subset_name(d.subset).to_string(),
            percent: format!("{}", (f64::from(d.weight) * 1000.0 / total as f64).round() / 10.0),
            endpoints: service
                .members(d.subset)
                .iter()
                .map(|&i| service.spec().endpoints[i].address.to_string())
                .collect(),
            upstream: match service.tls(d.subset) {
                None => "plain".to_string(),
                Some(tls) => format!(
                    "{} TLS (server name {})",
                    if tls.mutual { "mutual" } else { "simple" },
                    tls.sni.as_deref().unwrap_or(host)
                ),
            },
        })
        .collect();
    let shares: Vec<String> = subsets
        .iter()
        .map(|s| {
            let name = if s.subset.is_empty() { "every endpoint" } else { s.subset.as_str() };
            format!("{name} {}% ({}; {})", s.percent, s.endpoints.join(", "), s.upstream)
        })
        .collect();
    let _ = write!(
        reason,
        "; service {}, route {}: to {} instead of the dialled address; {tls_clients}",
        service.name(),
        service.route_name(route),
        shares.join(", ")
    );
    Some(ServiceRoute {
        service: service.name().to_string(),
        route: Some(service.route_name(route).to_string()),
        subsets,
    })
}

/// What an l7 rule's request conditions require, and with `--method`/`--path` whether they allow the request
/// (headers are named, not checked: explain has none).
fn explain_request(c: &dataplane::policy::l7::CompiledL7, flow: &Flow, reason: &mut String) -> Option<bool> {
    let cond = c.conditions();
    let list = |items: Vec<String>| items.join(", ");
    let mut needs = Vec::new();
    if !cond.methods.is_empty() {
        needs.push(format!("methods {}", list(cond.methods.clone())));
    }
    if !cond.paths.is_empty() {
        needs.push(format!("paths {}", list(cond.paths.iter().map(ToString::to_string).collect())));
    }
    if !cond.headers.is_empty() {
        needs.push(format!("headers {}", list(cond.headers.iter().map(ToString::to_string).collect())));
    }
    if let Some(v) = cond.min_tls_version {
        needs.push(format!("TLS ≥ 1.{}", v.saturating_sub(0x0301)));
    }
    if let Some(limit) = cond.rate_limit {
        needs.push(format!(
            "at most {} per {} s from each client address (then 429, or an alert for TLS)",
            limit.requests, limit.per_secs
        ));
    }
    if !needs.is_empty() {
        let _ = write!(reason, "; requests must also meet: {}", needs.join("; "));
    }
    if let Some(tls) = &cond.upstream_tls {
        let _ = write!(
            reason,
            "; requests leave over {} TLS to port {} (server name {}), plain HTTP clients only",
            if tls.mutual { "mutual" } else { "simple" },
            tls.port,
            tls.sni.as_deref().unwrap_or("the Host")
        );
    }
    if flow.method.is_none() && flow.path.is_none() {
        return None;
    }
    let (method, path) = (flow.method.as_deref().unwrap_or("GET"), flow.path.as_deref().unwrap_or("/"));
    // The headers given with --header; without any, headers as the rule wants them (explain judges method and
    // path).
    let wanted = |name: &str| {
        if !flow.headers.is_empty() {
            return flow.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_bytes());
        }
        cond.headers.iter().find(|h| h.name == name).map(|h| h.value.as_deref().unwrap_or("").as_bytes())
    };
    match c.check_request(method, path, wanted) {
        Ok(()) => {
            let _ = write!(reason, "; {method} {path} is allowed");
            Some(true)
        }
        Err(d) => {
            let _ = write!(reason, "; {method} {path} is refused with 403 ({})", d.as_str());
            Some(false)
        }
    }
}

/// Rules whose destinations contain the flow's but which did not match: an except took it out, or the protocol
/// or port differs.
fn near_misses(
    group_rules: &[(RuleId, &RuleSpec)],
    flow: &Flow,
    rule_at: &dyn Fn(RuleId) -> String,
) -> Vec<String> {
    let mut misses = Vec::new();
    for (id, r) in group_rules {
        if !r.to.iter().any(|p| p.contains(flow.dst)) {
            continue;
        }
        if let Some(e) = r.except.iter().find(|e| e.contains(flow.dst)) {
            misses.push(format!("rule at {}: except {e} contains {}", rule_at(*id), flow.dst));
        } else if !r.matches_proto_port(flow.proto, flow.port) {
            misses.push(format!("rule at {} covers {} but not {}", rule_at(*id), flow.dst, proto_port(flow)));
        }
        if misses.len() == 3 {
            break;
        }
    }
    misses
}

fn proto_port(flow: &Flow) -> String {
    match flow.proto {
        ip_proto::ICMP => "icmp".to_string(),
        _ => format!("{}/{}", flow.proto_name(), flow.port),
    }
}

impl Explanation {
    /// The text form: one `key: value` line each.
    pub fn to_text(&self) -> String {
        let none = || "-".to_string();
        let group = match (&self.group, &self.group_at) {
            (Some(g), Some(at)) => format!("{g} ({at})"),
            _ => "none".to_string(),
        };
        let mut out = String::new();
        let _ = writeln!(out, "flow:      {}", self.flow);
        let _ = writeln!(out, "group:     {group}");
        let rule = match (&self.rule_name, &self.rule) {
            (Some(name), Some(at)) => format!("{name} ({at})"),
            (_, at) => at.clone().unwrap_or_else(none),
        };
        let _ = writeln!(out, "rule:      {rule}");
        let _ = writeln!(out, "verdict:   {}", self.verdict);
        let _ = writeln!(out, "dry_run:   {}", self.dry_run);
        let _ = writeln!(
            out,
            "egress IP: {}",
            self.egress_ip.clone().unwrap_or_else(|| "none (not forwarded)".into())
        );
        let _ = writeln!(out, "layer:     {}", self.layer);
        if let Some(allowed) = self.host_allowed {
            let _ = writeln!(out, "host:      {}", if allowed { "allowed" } else { "refused" });
        }
        if let Some(allowed) = self.request_allowed {
            let _ = writeln!(out, "request:   {}", if allowed { "allowed" } else { "refused (403)" });
        }
        if let Some(s) = &self.service {
            let _ = writeln!(out, "service:   {}", s.service);
            match &s.route {
                None => {
                    let _ = writeln!(out, "route:     none matches (404)");
                }
                Some(route) => {
                    let _ = writeln!(out, "route:     {route}");
                    for share in &s.subsets {
                        let name =
                            if share.subset.is_empty() { "(every endpoint)" } else { share.subset.as_str() };
                        let _ = writeln!(
                            out,
                            "subset:    {name} {}% -> {} over {}",
                            share.percent,
                            share.endpoints.join(", "),
                            share.upstream
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "why:       {}", self.reason);
        for (name, addresses) in &self.to_hosts {
            let now = if addresses.is_empty() { "no address".to_string() } else { addresses.join(", ") };
            let _ = writeln!(out, "to_hosts:  {name} = {now}");
        }
        out
    }
}

pub fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let loaded = match crate::config::load(&args.config.config) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let flow = match Flow::parse(&args.src, &args.dst, &args.proto, args.host.as_deref()) {
        Ok(flow) => match args.headers.iter().map(|h| parse_header(h)).collect::<Result<Vec<_>, _>>() {
            Ok(headers) => Flow { method: args.method.clone(), path: args.path.clone(), headers, ..flow },
            Err(e) => {
                eprintln!("egressd explain: {e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        Err(e) => {
            eprintln!("egressd explain: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // `to_hosts` names stand for what they resolve to now, asked from the resolver the gateway would use.
    let names = crate::policy::dns_names(&loaded.config);
    let settings = loaded.config.l7.settings();
    let answers = match settings.resolver.or_else(crate::l7::dns::system_resolver) {
        Some(server) if !names.is_empty() => {
            let watcher = crate::fqdn::FqdnWatcher::start(
                names.clone(),
                server,
                settings.dns_min_ttl_secs,
                settings.dns_max_ttl_secs,
                std::time::Duration::from_secs(3),
            )?;
            watcher.shared.answers()
        }
        _ => names.iter().map(|n| (n.clone(), Vec::new())).collect(),
    };
    let snapshot = match crate::policy::compile_with_names(&loaded.config, 1, &answers) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", args.config.config.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut explanation = explain_flow(&loaded, &snapshot, &flow);
    explanation.to_hosts = answers
        .into_iter()
        .map(|(name, addresses)| (name, addresses.iter().map(ToString::to_string).collect()))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string(&explanation)?);
    } else {
        print!("{}", explanation.to_text());
        if flow.host.is_some() && explanation.host_allowed.is_none() {
            println!("note:      --host plays no part: the verdict is decided at L4");
        }
        if explanation.layer == "L7" {
            println!(
                "note:      the L7 path checks the TLS SNI, or each HTTP request's Host, against the rule's hosts"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
