//! `[policy]`, `[[group]]`, `[[rule]]`: the L3/L4 policy model and its validation. The meaning at packet time is
//! documented in `dataplane::policy`; `crate::policy` compiles this model into a snapshot.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

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
    #[serde(default)]
    pub sources: Vec<Spanned<String>>,
    #[serde(default)]
    pub egress_ips: Vec<Spanned<String>>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub group: Spanned<String>,
    pub to: Vec<Spanned<String>>,
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
    #[serde(default)]
    pub proto: Option<Spanned<Proto>>,
    #[serde(default)]
    pub ports: Vec<Spanned<String>>,
    pub action: Spanned<ActionConfig>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub dry_run: bool,
}

impl RuleConfig {
    pub fn proto(&self) -> Proto {
        self.proto.as_ref().map_or(Proto::Any, |p| *p.get_ref())
    }
}

/// Parses `"443"` or `"8000-8100"` (1–65535, first ≤ last).
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let one = |t: &str| -> Result<u16, String> {
        let n: u32 = t
            .trim()
            .parse()
            .map_err(|_| format!("\"{s}\" is not a port or port range (e.g. \"443\" or \"8000-8100\")"))?;
        if n == 0 || n > 65535 {
            return Err(format!("port {n} is out of range (1-65535)"));
        }
        Ok(n as u16)
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => (one(s)?, one(s)?),
    };
    if first > last {
        return Err(format!("port range {first}-{last} is reversed"));
    }
    Ok(PortRange { first, last })
}

/// Cross-section checks of the policy model.
pub fn validate(config: &Config, src: &Source, diags: &mut Diagnostics) {
    let mut group_names: HashMap<&str, usize> = HashMap::new();
    let mut egress_owner: HashMap<Ipv4Addr, &str> = HashMap::new();
    let mut source_owner: HashMap<Prefix, &str> = HashMap::new();
    for g in &config.group {
        let name = g.name.get_ref().as_str();
        if name.is_empty() {
            diags.error(src, g.name.span(), "group name is empty");
        }
        if group_names.insert(name, 0).is_some() {
            diags.error(src, g.name.span(), format!("duplicate group name \"{name}\""));
        }
        if g.sources.is_empty() {
            diags.warn(src, g.name.span(), format!("group \"{name}\" has no sources and never matches"));
        }
        for s in &g.sources {
            match s.get_ref().parse::<Prefix>() {
                Err(e) => diags.error(src, s.span(), e.to_string()),
                Ok(p) => {
                    if let Some(other) = source_owner.insert(p, name) {
                        diags.error(src, s.span(), format!("source {p} is already in group \"{other}\""));
                    }
                }
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
                    } else if let Some(other) = egress_owner.insert(a, name) {
                        diags.error(
                            src,
                            ip.span(),
                            format!("egress IP {a} is already used by group \"{other}\""),
                        );
                    }
                }
            }
        }
    }
    // Per group: (prefix, proto, ports, action, rule index) for conflict and shadow checks.
    type Seen = (Prefix, Proto, Vec<PortRange>, ActionConfig, usize, bool);
    let mut by_group: HashMap<&str, Vec<Seen>> = HashMap::new();
    let mut groups_needing_egress: HashMap<&str, usize> = HashMap::new();
    for (index, r) in config.rule.iter().enumerate() {
        let group = r.group.get_ref().as_str();
        if !group_names.contains_key(group) {
            diags.error(src, r.group.span(), format!("unknown group \"{group}\""));
        }
        let action = *r.action.get_ref();
        let proto = r.proto();
        if action != ActionConfig::Deny {
            groups_needing_egress.entry(group).or_insert(index);
        }
        if r.to.is_empty() {
            diags.error(src, r.action.span(), "rule has no `to` destinations");
        }
        let mut to = Vec::new();
        for t in &r.to {
            match t.get_ref().parse::<Prefix>() {
                Err(e) => diags.error(src, t.span(), e.to_string()),
                Ok(p) if to.contains(&p) => diags.error(src, t.span(), format!("{p} is listed twice")),
                Ok(p) => to.push(p),
            }
        }
        for e in &r.except {
            match e.get_ref().parse::<Prefix>() {
                Err(err) => diags.error(src, e.span(), err.to_string()),
                Ok(p) => {
                    if to.contains(&p) {
                        diags.error(src, e.span(), format!("except {p} removes a whole `to` prefix"));
                    } else if !to.iter().any(|t| t.covers(&p)) {
                        diags.error(
                            src,
                            e.span(),
                            format!("except {p} is inside none of the rule's `to` prefixes"),
                        );
                    }
                }
            }
        }
        let mut ports = Vec::new();
        for p in &r.ports {
            match parse_port_range(p.get_ref()) {
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
                    diags.error(src, r.action.span(), "an l7 rule needs `hosts`");
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
            }
        }
        for h in &r.hosts {
            if let Err(e) = HostPattern::parse(h.get_ref()) {
                diags.error(src, h.span(), e.to_string());
            }
        }
        // Conflicts (same prefix, overlapping traffic, different action) and shadowing (same prefix, earlier rule
        // covering the same traffic, no except).
        let seen = by_group.entry(group).or_default();
        let mut shadowed_by = None;
        let overlap = |a: &[PortRange], b: &[PortRange]| {
            a.is_empty()
                || b.is_empty()
                || a.iter().any(|x| b.iter().any(|y| x.first <= y.last && y.first <= x.last))
        };
        let covers_ports = |outer: &[PortRange], inner: &[PortRange]| {
            outer.is_empty()
                || (!inner.is_empty()
                    && inner.iter().all(|i| outer.iter().any(|o| o.first <= i.first && i.last <= o.last)))
        };
        let proto_overlap = |a: Proto, b: Proto| a == Proto::Any || b == Proto::Any || a == b;
        let mut all_shadowed = !to.is_empty();
        for (t, span) in to.iter().zip(&r.to) {
            let mut this_shadowed = false;
            for (p, pr, ports2, act, other, has_except) in seen.iter() {
                if p != t || !proto_overlap(*pr, proto) || !overlap(ports2, &ports) {
                    continue;
                }
                if *act != action {
                    diags.error(
                        src,
                        span.span(),
                        format!(
                            "{t} is also in rule #{} of group \"{group}\" with a conflicting action",
                            other + 1
                        ),
                    );
                }
                if !has_except && (*pr == Proto::Any || *pr == proto) && covers_ports(ports2, &ports) {
                    this_shadowed = true;
                    shadowed_by = Some(*other);
                }
            }
            all_shadowed &= this_shadowed;
        }
        if all_shadowed {
            if let Some(other) = shadowed_by {
                diags.warn(
                    src,
                    r.action.span(),
                    format!("rule #{} never decides: shadowed by rule #{}", index + 1, other + 1),
                );
            }
        }
        for t in to {
            seen.push((t, proto, ports.clone(), action, index, !r.except.is_empty()));
        }
    }
    for g in &config.group {
        let name = g.name.get_ref().as_str();
        if groups_needing_egress.contains_key(name) && g.egress_ips.is_empty() {
            diags.error(
                src,
                g.name.span(),
                format!("group \"{name}\" has allow or l7 rules but no egress_ips"),
            );
        }
    }
}
