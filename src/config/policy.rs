//! `[policy]`, `[[group]]`, `[[rule]]`: the L3/L4 policy model and its validation. The meaning at packet time is
//! documented in `dataplane::policy` (and for operators in `conf/README.md`); `crate::policy` compiles this model
//! into a snapshot.
//!
//! Validation reports every problem of a file with its line and column: values that do not parse (prefixes with
//! host bits set or too long, port ranges reversed or out of range, malformed host patterns), references that do
//! not resolve (unknown groups, egress IPs in no group), and rules that contradict each other (one prefix with two
//! actions for the same traffic in one group). A rule that can never decide because others always win is only a
//! warning: the policy still means something, probably not what its author wanted.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;

use dataplane::policy::{HostPattern, PortRange, Prefix};
use serde::Deserialize;
use toml::Spanned;

use super::{Config, Diagnostics, Source};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Forward every denied flow and count it as "would deny".
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: Spanned<String>,
    /// Source prefixes; an inside address belongs to the group owning its longest matching source prefix.
    #[serde(default)]
    pub sources: Vec<Spanned<String>>,
    /// IPv4 addresses the group's flows leave from (one per inside host, chosen by rendezvous hashing).
    #[serde(default)]
    pub egress_ips: Vec<Spanned<String>>,
    /// NAT ports (mappings) the group may hold on each of its egress IPs; unset: no cap beyond the port space.
    pub max_ports_per_egress_ip: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionConfig {
    Allow,
    Deny,
    L7,
}

impl fmt::Display for ActionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActionConfig::Allow => "allow",
            ActionConfig::Deny => "deny",
            ActionConfig::L7 => "l7",
        })
    }
}

/// One entry of `ports`: `443` or `"443"` or `"8000-8100"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A stable name for metrics, audit lines and `explain` (unique within its group); default: the position.
    pub name: Option<Spanned<String>>,
    pub group: Spanned<String>,
    /// Destination prefixes (at least one, or `to_hosts`).
    #[serde(default)]
    pub to: Vec<Spanned<String>>,
    /// Destinations by DNS name: their `A` records, followed as they change.
    #[serde(default)]
    pub to_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
    /// Default `any`.
    #[serde(default)]
    pub proto: Option<Spanned<Proto>>,
    /// Destination ports; empty = every port.
    #[serde(default)]
    pub ports: Vec<Spanned<PortSpec>>,
    pub action: Spanned<ActionConfig>,
    /// For `l7` rules: the SNI / Host names allowed.
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// For `l7` rules: the HTTP methods allowed (all when absent).
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// For `l7` rules: the paths allowed: `/exact`, `/prefix/*`, `regex:PATTERN` (all when absent).
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    /// For `l7` rules: headers every request must carry: `name` or `name: value`.
    #[serde(default)]
    pub headers: Vec<Spanned<String>>,
    /// For `l7` rules: the oldest TLS version a ClientHello may offer as its newest ("1.2", "1.3").
    #[serde(default)]
    pub min_tls_version: Option<Spanned<String>>,
    /// For `l7` rules: requests (HTTP requests, TLS connections) per client address: `REQUESTS/PERIOD`, as "100/1m".
    #[serde(default)]
    pub rate_limit: Option<Spanned<String>>,
    /// For `l7` rules: originate TLS towards the destination for plain HTTP clients: "simple" or "mutual".
    #[serde(default)]
    pub upstream_tls: Option<Spanned<String>>,
    /// With `upstream_tls`: the destination port of the TLS connection (default 443).
    #[serde(default)]
    pub upstream_port: Option<Spanned<i64>>,
    /// With `upstream_tls`: the server name sent and verified (default: the request's Host).
    #[serde(default)]
    pub upstream_sni: Option<Spanned<String>>,
    /// With `upstream_tls`: PEM file of the CAs that verify the server (default: the system's roots).
    #[serde(default)]
    pub upstream_ca: Option<Spanned<String>>,
    /// With `upstream_tls = "mutual"`: PEM files of the client certificate chain and its private key.
    #[serde(default)]
    pub upstream_cert: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_key: Option<Spanned<String>>,
    /// For `l7` rules: upstream connections the rule's clients may hold at once (beyond: `503`).
    #[serde(default)]
    pub max_upstream_connections: Option<Spanned<i64>>,
    #[serde(default)]
    pub dry_run: bool,
}

impl RuleConfig {
    pub fn proto(&self) -> Proto {
        self.proto.as_ref().map_or(Proto::Any, |p| *p.get_ref())
    }
}

/// Parses one `ports` entry (1–65535, first ≤ last).
pub fn parse_port_spec(spec: &PortSpec) -> Result<PortRange, String> {
    match spec {
        PortSpec::Number(n) => {
            let port = port_number(*n)?;
            Ok(PortRange { first: port, last: port })
        }
        PortSpec::Text(s) => parse_port_range(s),
    }
}

fn port_number(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port {n} is out of range (1-65535)")),
    }
}

/// Parses `"443"` or `"8000-8100"` (1–65535, first ≤ last).
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let one = |t: &str| -> Result<u16, String> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("\"{s}\" is not a port or port range (e.g. \"443\" or \"8000-8100\")"));
        }
        port_number(t.parse().unwrap_or(i64::MAX))
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => (one(s)?, one(s)?),
    };
    if first > last {
        return Err(format!("port range {first}-{last} is reversed (write {last}-{first})"));
    }
    Ok(PortRange { first, last })
}

/// Cross-section checks of the policy model.
pub fn validate(config: &Config, src: &Source, diags: &mut Diagnostics) {
    let egress_owners = validate_groups(config, src, diags);
    validate_egress_ips(config, &egress_owners, src, diags);
    let group_names: HashSet<&str> = config.group.iter().map(|g| g.name.get_ref().as_str()).collect();
    let mut checked = Vec::new();
    let mut groups_needing_egress = HashSet::new();
    for (index, rule) in config.rule.iter().enumerate() {
        let errors_before = diags.errors.len();
        let r = check_rule(index, rule, &group_names, src, diags);
        if *rule.get_ref().action.get_ref() != ActionConfig::Deny {
            groups_needing_egress.insert(r.group);
        }
        if diags.errors.len() == errors_before {
            checked.push(r);
        }
    }
    check_conflicts_and_shadows(&checked, src, diags);
    check_rule_names(config, src, diags);
    for g in &config.group {
        let name = g.name.get_ref().as_str();
        if groups_needing_egress.contains(name) && g.egress_ips.is_empty() {
            diags.error(
                src,
                g.name.span(),
                format!("group \"{name}\" has allow or l7 rules but no egress_ips"),
            );
        }
    }
}

/// Rule names: non-empty, at most 64 characters of letters, digits, `-`, `_` and `.` (they become metric labels and
/// audit fields), and unique within their group.
fn check_rule_names(config: &Config, src: &Source, diags: &mut Diagnostics) {
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for rule in &config.rule {
        let r = rule.get_ref();
        let Some(name) = &r.name else { continue };
        let text = name.get_ref().as_str();
        let valid = !text.is_empty()
            && text.len() <= 64
            && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            diags.error(
                src,
                name.span(),
                format!("rule name \"{text}\": 1-64 letters, digits, '-', '_' or '.'"),
            );
        } else if !seen.insert((r.group.get_ref().as_str(), text)) {
            diags.error(
                src,
                name.span(),
                format!("rule name \"{text}\" is used twice in group \"{}\"", r.group.get_ref()),
            );
        }
    }
}

/// Why IPv6 sources and destinations are only warned about: this version forwards IPv4 only.
pub const IPV6_NOT_ENFORCED: &str = "IPv6 is not enforced by this version: egressd forwards IPv4 only and \
     drops transit IPv6 (counted as ipv6_unsupported), whatever the rules say";

/// Names, sources and egress IPs of the groups. Returns the owner of each valid egress IP.
fn validate_groups<'a>(
    config: &'a Config,
    src: &Source,
    diags: &mut Diagnostics,
) -> HashMap<Ipv4Addr, &'a str> {
    let mut group_names: HashSet<&str> = HashSet::new();
    let mut egress_owner: HashMap<Ipv4Addr, &str> = HashMap::new();
    let mut source_owner: HashMap<Prefix, &str> = HashMap::new();
    for g in &config.group {
        let name = g.name.get_ref().as_str();
        if name.is_empty() {
            diags.error(src, g.name.span(), "group name is empty");
        }
        if !group_names.insert(name) {
            diags.error(src, g.name.span(), format!("duplicate group name \"{name}\""));
        }
        if g.sources.is_empty() {
            diags.warn(src, g.name.span(), format!("group \"{name}\" has no sources and never matches"));
        }
        for s in &g.sources {
            match s.get_ref().parse::<Prefix>() {
                Err(e) => diags.error(src, s.span(), e.to_string()),
                Ok(p) => match source_owner.insert(p, name) {
                    Some(other) if other == name => {
                        diags.error(src, s.span(), format!("source {p} is listed twice"))
                    }
                    Some(other) => {
                        diags.error(src, s.span(), format!("source {p} is already in group \"{other}\""))
                    }
                    None if !p.is_ipv4() => {
                        diags.warn(src, s.span(), format!("source {p}: {IPV6_NOT_ENFORCED}"))
                    }
                    None => {}
                },
            }
        }
        if let Some(limit) = &g.max_ports_per_egress_ip {
            if !(1..=65535).contains(limit.get_ref()) {
                diags.error(
                    src,
                    limit.span(),
                    format!("max_ports_per_egress_ip: {} must be 1..=65535", limit.get_ref()),
                );
            }
        }
        for ip in &g.egress_ips {
            match ip.get_ref().parse::<IpAddr>() {
                Err(_) => diags.error(src, ip.span(), format!("\"{}\" is not an IP address", ip.get_ref())),
                Ok(IpAddr::V6(_)) => {
                    diags.error(src, ip.span(), "egress IPs must be IPv4 (the NAT is NAT44)")
                }
                Ok(IpAddr::V4(a)) => {
                    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
                        diags.error(src, ip.span(), format!("{a} cannot be an egress IP"));
                    } else {
                        match egress_owner.insert(a, name) {
                            Some(other) if other == name => {
                                diags.error(src, ip.span(), format!("egress IP {a} is listed twice"))
                            }
                            Some(other) => {
                                // Groups may share an egress IP; without caps one of them can take all its ports.
                                let capped = |group: &str| {
                                    config.group.iter().any(|g| {
                                        g.name.get_ref() == group && g.max_ports_per_egress_ip.is_some()
                                    })
                                };
                                if !capped(name) || !capped(other) {
                                    diags.warn(
                                        src,
                                        ip.span(),
                                        format!(
                                            "egress IP {a} is shared with group \"{other}\": without \
                                             max_ports_per_egress_ip on both groups, one can take all its ports"
                                        ),
                                    )
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
        }
    }
    egress_owner
}

/// `[dataplane] egress_ips` and the groups' egress IPs must agree: every address egressd owns serves some group,
/// and (when the dataplane lists its addresses) every group leaves from one of them.
fn validate_egress_ips(
    config: &Config,
    owners: &HashMap<Ipv4Addr, &str>,
    src: &Source,
    diags: &mut Diagnostics,
) {
    let dataplane_ips: HashSet<Ipv4Addr> = config.dataplane.egress_ips().into_iter().collect();
    for ip in &config.dataplane.egress_ips {
        let addr = *ip.get_ref();
        if !owners.contains_key(&addr) {
            diags.error(
                src,
                ip.span(),
                format!("egress IP {addr} is in no group (add it to a [[group]]'s egress_ips, or remove it)"),
            );
        }
    }
    if dataplane_ips.is_empty() {
        return;
    }
    for g in &config.group {
        for ip in &g.egress_ips {
            if let Ok(addr) = ip.get_ref().parse::<Ipv4Addr>() {
                if !dataplane_ips.contains(&addr) {
                    diags.error(src, ip.span(), format!("egress IP {addr} is not in [dataplane] egress_ips"));
                }
            }
        }
    }
}

/// A rule whose own fields are valid, reduced to what the cross-rule checks need.
struct CheckedRule<'a> {
    index: usize,
    /// Line of the `[[rule]]` header.
    line: usize,
    header: Range<usize>,
    group: &'a str,
    to: Vec<(Prefix, Range<usize>)>,
    except: Vec<Prefix>,
    traffic: Traffic,
    action: ActionConfig,
}

/// Checks one rule on its own; the result is only used when no error was reported.
fn check_rule<'a>(
    index: usize,
    rule: &'a Spanned<RuleConfig>,
    group_names: &HashSet<&str>,
    src: &Source,
    diags: &mut Diagnostics,
) -> CheckedRule<'a> {
    let header = rule.span();
    let r = rule.get_ref();
    let group = r.group.get_ref().as_str();
    if !group_names.contains(group) {
        diags.error(src, r.group.span(), format!("unknown group \"{group}\""));
    }
    let action = *r.action.get_ref();
    let proto = r.proto();
    if r.to.is_empty() && r.to_hosts.is_empty() {
        diags.error(
            src,
            header.clone(),
            "rule has no `to` destinations (write \"0.0.0.0/0\" for everywhere) and no `to_hosts`",
        );
    }
    for (i, h) in r.to_hosts.iter().enumerate() {
        if let Err(e) = check_dns_name(h.get_ref()) {
            diags.error(src, h.span(), format!("to_hosts: {e}"));
        } else if r.to_hosts[..i].iter().any(|o| o.get_ref() == h.get_ref()) {
            diags.error(src, h.span(), format!("to_hosts: \"{}\" is listed twice", h.get_ref()));
        }
    }
    let mut to: Vec<(Prefix, Range<usize>)> = Vec::new();
    for t in &r.to {
        match t.get_ref().parse::<Prefix>() {
            Err(e) => diags.error(src, t.span(), e.to_string()),
            Ok(p) if to.iter().any(|(q, _)| *q == p) => {
                diags.error(src, t.span(), format!("{p} is listed twice"))
            }
            Ok(p) => {
                if !p.is_ipv4() {
                    diags.warn(src, t.span(), format!("{p}: {IPV6_NOT_ENFORCED}"));
                }
                to.push((p, t.span()))
            }
        }
    }
    let mut except = Vec::new();
    for e in &r.except {
        match e.get_ref().parse::<Prefix>() {
            Err(err) => diags.error(src, e.span(), err.to_string()),
            Ok(p) => {
                if to.iter().any(|(t, _)| *t == p) {
                    diags.error(src, e.span(), format!("except {p} removes a whole `to` prefix"));
                } else if to.len() == r.to.len() && !to.iter().any(|(t, _)| t.covers(&p)) {
                    // (Only when every `to` parsed: an except inside a malformed `to` is not a second error.)
                    diags.error(
                        src,
                        e.span(),
                        format!("except {p} is inside none of the rule's `to` prefixes"),
                    );
                } else {
                    except.push(p);
                }
            }
        }
    }
    let mut ports = Vec::new();
    for p in &r.ports {
        match parse_port_spec(p.get_ref()) {
            Err(e) => diags.error(src, p.span(), e),
            Ok(range) => ports.push(range),
        }
    }
    if !r.ports.is_empty() && proto == Proto::Icmp {
        diags.error(
            src,
            r.ports[0].span(),
            "ports need proto \"tcp\", \"udp\" or \"any\" (ICMP has no ports)",
        );
    }
    match action {
        ActionConfig::L7 => {
            if r.hosts.is_empty() {
                diags.error(
                    src,
                    r.action.span(),
                    "an l7 rule needs `hosts` (the SNI / Host names it allows)",
                );
            }
            if proto != Proto::Tcp {
                let span = r.proto.as_ref().map_or(r.action.span(), |p| p.span());
                diags.error(src, span, "an l7 rule needs proto = \"tcp\" (SNI and Host travel over TCP)");
            }
        }
        _ => {
            if let Some(h) = r.hosts.first() {
                diags.error(src, h.span(), "hosts are only allowed on rules with action = \"l7\"");
            }
            let l7_only = [
                ("methods are", r.methods.first()),
                ("paths are", r.paths.first()),
                ("headers are", r.headers.first()),
                ("min_tls_version is", r.min_tls_version.as_ref()),
                ("rate_limit is", r.rate_limit.as_ref()),
                ("upstream_tls is", r.upstream_tls.as_ref()),
            ];
            if let Some(v) = &r.max_upstream_connections {
                diags.error(
                    src,
                    v.span(),
                    "max_upstream_connections is only checked on rules with action = \"l7\"",
                );
            }
            for (what, first) in l7_only {
                if let Some(v) = first {
                    diags.error(src, v.span(), format!("{what} only checked on rules with action = \"l7\""));
                }
            }
        }
    }
    for m in &r.methods {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if m.get_ref().is_empty() || !m.get_ref().chars().all(token) {
            diags.error(src, m.span(), format!("methods: {:?} is not an HTTP method", m.get_ref()));
        } else if m.get_ref().chars().any(|c| c.is_ascii_lowercase()) {
            diags.warn(
                src,
                m.span(),
                format!(
                    "methods: {:?} has lowercase letters; methods are case-sensitive (GET, not get)",
                    m.get_ref()
                ),
            );
        }
    }
    for p in &r.paths {
        if let Err(e) = dataplane::policy::l7::PathPattern::parse(p.get_ref()) {
            diags.error(src, p.span(), e);
        }
    }
    for h in &r.headers {
        if let Err(e) = dataplane::policy::l7::HeaderCondition::parse(h.get_ref()) {
            diags.error(src, h.span(), e);
        }
    }
    if let Some(v) = &r.min_tls_version {
        if let Err(e) = dataplane::policy::l7::parse_tls_version(v.get_ref()) {
            diags.error(src, v.span(), format!("min_tls_version: {e}"));
        }
    }
    if let Some(v) = &r.rate_limit {
        if let Err(e) = dataplane::policy::l7::RateLimit::parse(v.get_ref()) {
            diags.error(src, v.span(), e);
        }
    }
    check_upstream_tls(src, &r.tls_keys(), diags);
    if let Some(v) = &r.max_upstream_connections {
        if !(1..=1_000_000).contains(v.get_ref()) {
            diags.error(
                src,
                v.span(),
                format!("max_upstream_connections: {} must be 1..=1000000", v.get_ref()),
            );
        }
    }
    let http_conditions = r.methods.first().or(r.paths.first()).or(r.headers.first());
    if let (Some(c), ActionConfig::L7) = (http_conditions, action) {
        if r.ports.iter().any(|p| parse_port_spec(p.get_ref()).is_ok_and(|p| p.first <= 443 && 443 <= p.last))
        {
            diags.warn(
                src,
                c.span(),
                "methods, paths and headers can only be checked on plaintext HTTP: TLS connections under this rule \
                 (port 443) will be refused",
            );
        }
    }
    for h in &r.hosts {
        if let Err(e) = HostPattern::parse(h.get_ref()) {
            diags.error(src, h.span(), e.to_string());
        }
    }
    CheckedRule {
        index,
        line: src.line_col(header.start).0,
        header,
        group,
        to,
        except,
        traffic: Traffic::of(proto, &ports),
        action,
    }
}

/// Within each group: the same prefix with two actions for overlapping traffic is an error; a rule that never
/// decides (each of its `to` prefixes is taken first by an earlier rule with the same prefix, or tiled by more
/// specific prefixes of other rules, for all of its traffic) is a warning. The shadow check is conservative: it
/// may miss a shadowed rule (e.g. one covered only by several rules' combined ports), never flags a live one.
fn check_conflicts_and_shadows(rules: &[CheckedRule<'_>], src: &Source, diags: &mut Diagnostics) {
    // Same (group, prefix): rule positions in file order.
    let mut same_prefix: HashMap<(&str, Prefix), Vec<usize>> = HashMap::new();
    // Per group: every `to` prefix as (family, first, last, length, rule position), sorted.
    let mut by_group: HashMap<&str, Vec<TiledPrefix>> = HashMap::new();
    for (pos, r) in rules.iter().enumerate() {
        for (t, _) in &r.to {
            same_prefix.entry((r.group, *t)).or_default().push(pos);
            let (first, last) = prefix_bounds(t);
            by_group.entry(r.group).or_default().push(TiledPrefix {
                ipv4: t.is_ipv4(),
                first,
                last,
                prefix: *t,
                rule: pos,
            });
        }
    }
    for list in by_group.values_mut() {
        list.sort_unstable_by_key(|e| (e.ipv4, e.first, e.prefix.prefix_len(), e.rule));
    }
    let excepts_miss = |q: &CheckedRule<'_>, p: &Prefix| !q.except.iter().any(|e| e.overlaps(p));
    for (pos, r) in rules.iter().enumerate() {
        let mut shadowing_lines: Vec<usize> = Vec::new();
        let mut all_shadowed = !r.to.is_empty();
        for (t, span) in &r.to {
            let earlier =
                same_prefix[&(r.group, *t)].iter().map(|&q| &rules[q]).filter(|q| q.index < r.index);
            let mut shadowed = false;
            let mut conflict_reported = false;
            for q in earlier {
                if q.action != r.action && q.traffic.overlaps(&r.traffic) && !conflict_reported {
                    diags.error(
                        src,
                        span.clone(),
                        format!(
                            "{t} is also a destination of the rule at line {} with action {} for some of the same \
                             traffic (one prefix cannot have two actions in group \"{}\")",
                            q.line, q.action, r.group
                        ),
                    );
                    conflict_reported = true;
                }
                if !shadowed && q.traffic.covers(&r.traffic) && excepts_miss(q, t) {
                    shadowed = true;
                    shadowing_lines.push(q.line);
                }
            }
            if !shadowed {
                // Tiled by strictly more specific prefixes of rules that take all of this rule's traffic?
                let (t_first, t_last) = prefix_bounds(t);
                let list = &by_group[r.group];
                let start = list.partition_point(|e| (e.ipv4, e.first) < (t.is_ipv4(), t_first));
                let mut next_uncovered = Some(t_first);
                let mut lines = Vec::new();
                for &TiledPrefix { ipv4: v4, first, last, prefix: p, rule: q } in &list[start..] {
                    let Some(cursor) = next_uncovered else { break };
                    if v4 != t.is_ipv4() || first > t_last || first > cursor {
                        break;
                    }
                    let other = &rules[q];
                    if q == pos || p.prefix_len() <= t.prefix_len() || !other.traffic.covers(&r.traffic) {
                        continue;
                    }
                    if excepts_miss(other, &p) && last >= cursor {
                        next_uncovered = last.checked_add(1);
                        lines.push(other.line);
                    }
                }
                if next_uncovered.is_none_or(|c| c > t_last) {
                    shadowed = true;
                    shadowing_lines.extend(lines);
                }
            }
            all_shadowed &= shadowed;
        }
        if all_shadowed {
            shadowing_lines.sort_unstable();
            shadowing_lines.dedup();
            let lines: Vec<String> = shadowing_lines.iter().take(5).map(usize::to_string).collect();
            let more = if shadowing_lines.len() > 5 { ", ..." } else { "" };
            diags.warn(
                src,
                r.header.clone(),
                format!(
                    "rule never decides: every destination and port it matches is taken first by the rule(s) at \
                     line {}{more} (more specific prefix, or same prefix written earlier)",
                    lines.join(", ")
                ),
            );
        }
    }
}

/// A `to` prefix of a rule as an address range, for the shadow check.
#[derive(Clone, Copy)]
struct TiledPrefix {
    ipv4: bool,
    first: u128,
    last: u128,
    prefix: Prefix,
    /// Position in the checked rules.
    rule: usize,
}

/// First and last address of a prefix, right-aligned (IPv4 in the low 32 bits).
fn prefix_bounds(p: &Prefix) -> (u128, u128) {
    let (first, bits) = match p.addr() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let host_bits = bits - u32::from(p.prefix_len());
    let host = if host_bits == 0 { 0 } else { u128::MAX >> (128 - host_bits) };
    (first, first | host)
}

/// The packets a rule matches, destinations aside: per protocol class (TCP, UDP, ICMP, any other), which
/// destination ports. Mirrors `RuleSpec::matches_proto_port`: a rule with ports matches only TCP and UDP.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Traffic([ClassPorts; 4]);

#[derive(Clone, Debug, PartialEq, Eq)]
enum ClassPorts {
    Nothing,
    Every,
    /// Sorted, merged (disjoint, non-adjacent) ranges.
    Some(Vec<PortRange>),
}

impl Traffic {
    fn of(proto: Proto, ports: &[PortRange]) -> Traffic {
        use ClassPorts::{Every, Nothing};
        let l4 = if ports.is_empty() { Every } else { ClassPorts::Some(merge_ranges(ports)) };
        let portless = if ports.is_empty() { Every } else { Nothing };
        Traffic(match proto {
            Proto::Any => [l4.clone(), l4, portless.clone(), portless],
            Proto::Tcp => [l4, Nothing, Nothing, Nothing],
            Proto::Udp => [Nothing, l4, Nothing, Nothing],
            Proto::Icmp => [Nothing, Nothing, Every, Nothing],
        })
    }

    /// Some packet matches both.
    fn overlaps(&self, other: &Traffic) -> bool {
        self.0.iter().zip(&other.0).any(|pair| match pair {
            (ClassPorts::Nothing, _) | (_, ClassPorts::Nothing) => false,
            (ClassPorts::Every, _) | (_, ClassPorts::Every) => true,
            (ClassPorts::Some(a), ClassPorts::Some(b)) => {
                a.iter().any(|x| b.iter().any(|y| x.first <= y.last && y.first <= x.last))
            }
        })
    }

    /// Every packet matching `inner` matches `self`.
    fn covers(&self, inner: &Traffic) -> bool {
        self.0.iter().zip(&inner.0).all(|pair| match pair {
            (_, ClassPorts::Nothing) | (ClassPorts::Every, _) => true,
            (ClassPorts::Nothing, _) | (ClassPorts::Some(_), ClassPorts::Every) => false,
            (ClassPorts::Some(outer), ClassPorts::Some(inner)) => {
                inner.iter().all(|i| outer.iter().any(|o| o.first <= i.first && i.last <= o.last))
            }
        })
    }
}

fn merge_ranges(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => last.last = last.last.max(r.last),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests;

/// A name `to_hosts` can resolve: lowercase letters, digits and `-` in dot-separated labels of 1-63 characters,
/// 253 characters at most; not an address, no wildcard.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.contains('*') {
        return Err(format!(
            "\"{name}\": wildcards cannot be resolved (egressd does not snoop DNS): list each name"
        ));
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("\"{name}\" is an address: put it in `to`"));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "\"{name}\" is not a DNS name (lowercase letters, digits and '-' in labels of 1-63, dot-separated)"
        ));
    }
    Ok(())
}

/// The `upstream_*` keys of a rule, a service or a subset: one reading for validation and compilation.
#[derive(Clone, Copy, Default)]
pub struct TlsKeys<'a> {
    pub mode: Option<&'a Spanned<String>>,
    /// Rules only: the TLS connection's destination port.
    pub port: Option<&'a Spanned<i64>>,
    pub sni: Option<&'a Spanned<String>>,
    pub ca: Option<&'a Spanned<String>>,
    pub cert: Option<&'a Spanned<String>>,
    pub key: Option<&'a Spanned<String>>,
}

impl TlsKeys<'_> {
    /// The TLS to originate, if a mode is given (validated before).
    pub fn upstream_tls(&self) -> Option<dataplane::policy::l7::UpstreamTls> {
        let text = |v: Option<&Spanned<String>>| v.map(|v| v.get_ref().clone());
        self.mode.map(|mode| dataplane::policy::l7::UpstreamTls {
            mutual: mode.get_ref() == "mutual",
            port: self.port.map_or(443, |p| *p.get_ref() as u16),
            sni: text(self.sni),
            ca_file: text(self.ca),
            cert_file: text(self.cert),
            key_file: text(self.key),
        })
    }
}

impl RuleConfig {
    pub fn tls_keys(&self) -> TlsKeys<'_> {
        TlsKeys {
            mode: self.upstream_tls.as_ref(),
            port: self.upstream_port.as_ref(),
            sni: self.upstream_sni.as_ref(),
            ca: self.upstream_ca.as_ref(),
            cert: self.upstream_cert.as_ref(),
            key: self.upstream_key.as_ref(),
        }
    }
}

/// `upstream_*` keys: a known mode, the files mutual TLS needs (and only then), files that load.
pub fn check_upstream_tls(src: &Source, r: &TlsKeys<'_>, diags: &mut Diagnostics) {
    let mode = match r.mode {
        None => {
            let stray = [r.sni, r.ca, r.cert, r.key];
            if let Some(v) = stray.into_iter().flatten().next() {
                diags.error(
                    src,
                    v.span(),
                    "upstream_sni, upstream_ca, upstream_cert and upstream_key need upstream_tls",
                );
            }
            if let Some(v) = r.port {
                diags.error(src, v.span(), "upstream_port needs upstream_tls");
            }
            return;
        }
        Some(mode) => mode,
    };
    let mutual = match mode.get_ref().as_str() {
        "simple" => false,
        "mutual" => true,
        other => {
            diags.error(
                src,
                mode.span(),
                format!("upstream_tls: \"{other}\" must be \"simple\" or \"mutual\""),
            );
            return;
        }
    };
    if let Some(v) = r.port {
        if !(1..=65535).contains(v.get_ref()) {
            diags.error(src, v.span(), format!("upstream_port: {} must be 1..=65535", v.get_ref()));
        }
    }
    if let Some(v) = r.sni {
        if v.get_ref().contains('*') {
            diags.error(
                src,
                v.span(),
                format!("upstream_sni: \"{}\": a server name cannot be a wildcard", v.get_ref()),
            );
        } else if let Err(e) = check_dns_name(v.get_ref()) {
            diags.error(src, v.span(), format!("upstream_sni: {e}"));
        }
    }
    match (mutual, r.cert, r.key) {
        (true, Some(_), Some(_)) | (false, None, None) => {}
        (true, _, _) => {
            diags.error(src, mode.span(), "upstream_tls = \"mutual\" needs upstream_cert and upstream_key")
        }
        (false, Some(v), _) | (false, _, Some(v)) => {
            diags.error(src, v.span(), "upstream_cert and upstream_key are for upstream_tls = \"mutual\"")
        }
    }
    for (key, value) in [("upstream_ca", r.ca), ("upstream_cert", r.cert)] {
        if let Some(v) = value {
            if let Err(e) = crate::l7::origination::load_certificates(v.get_ref()) {
                diags.error(src, v.span(), format!("{key}: {e}"));
            }
        }
    }
    if let Some(v) = r.key {
        if let Err(e) = crate::l7::origination::load_key(v.get_ref()) {
            diags.error(src, v.span(), format!("upstream_key: {e}"));
            return;
        }
    }
    // The files load one by one: do they make a client configuration (a key that fits its certificate, a
    // certificate rustls accepts)?
    if let (true, Some(cert), Some(_), Some(tls)) = (mutual, r.cert, r.key, r.upstream_tls()) {
        if let Err(e) = crate::l7::origination::client_config(&tls) {
            diags.error(src, cert.span(), format!("upstream_cert: {e}"));
        }
    }
}
