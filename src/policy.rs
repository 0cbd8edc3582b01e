//! Compiles the validated TOML policy model into a `dataplane::policy::PolicySnapshot`, and reloads it into the
//! live `SharedPolicy`.
//!
//! Reload: re-read the file, validate it fully, compile, then swap atomically; a bad file is rejected with its
//! file:line:col errors, the failure counter goes up and the running policy stays. Each successful swap bumps the
//! generation; established flows whose rule changed are judged again on their next packet (the NAT stores the
//! generation per flow and re-evaluates when it differs).

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dataplane::policy::{
    Action, GroupId, HostPattern, PolicyBuilder, PolicySnapshot, Prefix, ProtoMatch, RuleSpec, SharedPolicy,
};

use crate::config::policy::{parse_port_spec, ActionConfig, Proto};
use crate::config::{Config, ConfigError, ConfigErrors};
pub use crate::fqdn::ResolvedNames;

/// Compiles a validated configuration. Errors only if the model was not validated first. `to_hosts` names have
/// no addresses here: see [`compile_with_names`].
pub fn compile(config: &Config, generation: u64) -> Result<PolicySnapshot, String> {
    compile_with_names(config, generation, &ResolvedNames::new())
}

/// Every name the rules' `to_hosts` use, once each.
pub fn dns_names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> =
        config.rule.iter().flat_map(|r| r.get_ref().to_hosts.iter().map(|h| h.get_ref().clone())).collect();
    names.sort();
    names.dedup();
    names
}

/// [`compile`], with each `to_hosts` name standing for its current addresses (`names`; a name without any
/// adds no destination: a rule with only such names matches nothing).
pub fn compile_with_names(
    config: &Config,
    generation: u64,
    names: &ResolvedNames,
) -> Result<PolicySnapshot, String> {
    let mut b = PolicyBuilder::new();
    b.dry_run(config.policy.dry_run);
    let mut ids = std::collections::HashMap::new();
    for g in &config.group {
        let ips = g.egress_ips.iter().filter_map(|s| s.get_ref().parse().ok()).collect();
        let id = b.add_group(g.name.get_ref().clone(), ips);
        if let Some(limit) = &g.max_ports_per_egress_ip {
            b.group_port_limit(id, *limit.get_ref());
        }
        ids.insert(g.name.get_ref().as_str(), id);
        for s in &g.sources {
            b.add_source(id, s.get_ref().parse::<Prefix>().map_err(|e| e.to_string())?);
        }
    }
    for r in config.rule.iter().map(toml::Spanned::get_ref) {
        let group: GroupId = *ids.get(r.group.get_ref().as_str()).ok_or("unknown group")?;
        let prefixes = |v: &[toml::Spanned<String>]| -> Result<Vec<Prefix>, String> {
            v.iter().map(|s| s.get_ref().parse::<Prefix>().map_err(|e| e.to_string())).collect()
        };
        let mut to = prefixes(&r.to)?;
        for name in &r.to_hosts {
            for addr in names.get(name.get_ref()).into_iter().flatten() {
                let host = Prefix::truncating(IpAddr::V4(*addr), 32);
                if !to.contains(&host) {
                    to.push(host);
                }
            }
        }
        b.add_rule(RuleSpec {
            group,
            to,
            except: prefixes(&r.except)?,
            proto: match r.proto() {
                Proto::Tcp => ProtoMatch::Tcp,
                Proto::Udp => ProtoMatch::Udp,
                Proto::Icmp => ProtoMatch::Icmp,
                Proto::Any => ProtoMatch::Any,
            },
            ports: r.ports.iter().map(|p| parse_port_spec(p.get_ref())).collect::<Result<_, _>>()?,
            action: match r.action.get_ref() {
                ActionConfig::Allow => Action::Allow,
                ActionConfig::Deny => Action::Deny,
                ActionConfig::L7 => Action::L7,
            },
            dry_run: r.dry_run,
            name: r.name.as_ref().map(|n| n.get_ref().clone()),
            hosts: r
                .hosts
                .iter()
                .map(|h| HostPattern::parse(h.get_ref()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?,
            l7: l7_conditions(r)?,
        });
    }
    for s in &config.service {
        b.add_service(crate::config::service::compile(s.get_ref())?);
    }
    b.build(generation).map_err(|e| e.to_string())
}

/// An `l7` rule's conditions on requests and hellos (validated before: errors here are only a safety net).
fn l7_conditions(
    r: &crate::config::policy::RuleConfig,
) -> Result<dataplane::policy::l7::L7Conditions, String> {
    use dataplane::policy::l7::{parse_tls_version, HeaderCondition, L7Conditions, PathPattern, RateLimit};
    Ok(L7Conditions {
        methods: r.methods.iter().map(|m| m.get_ref().clone()).collect(),
        paths: r.paths.iter().map(|p| PathPattern::parse(p.get_ref())).collect::<Result<_, _>>()?,
        headers: r.headers.iter().map(|h| HeaderCondition::parse(h.get_ref())).collect::<Result<_, _>>()?,
        min_tls_version: r.min_tls_version.as_ref().map(|v| parse_tls_version(v.get_ref())).transpose()?,
        rate_limit: r.rate_limit.as_ref().map(|v| RateLimit::parse(v.get_ref())).transpose()?,
        upstream_tls: r.tls_keys().upstream_tls(),
        max_upstream_connections: r.max_upstream_connections.as_ref().map(|v| *v.get_ref() as u32),
    })
}

/// The destination as written for explain: not used on the data path.
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// The settings a reload cannot change in a running gateway (interfaces, workers, rings, NAT sizing and timers, the
/// admin endpoint), each as `([section] key, value)`: a reload compares them with the running ones and says which
/// changed and need a restart, instead of ignoring them.
pub fn restart_only_settings(config: &Config) -> Vec<(&'static str, String)> {
    let dp = &config.dataplane;
    let nat = &config.nat;
    let admin = &config.admin;
    vec![
        ("[dataplane] inside", dp.inside.get_ref().clone()),
        ("[dataplane] outside", dp.outside.get_ref().clone()),
        ("[dataplane] cores", format!("{:?}", dp.cores())),
        ("[dataplane] batch_size", dp.batch_size().to_string()),
        ("[dataplane] ring_size", dp.ring_size().to_string()),
        ("[dataplane] frame_size", dp.frame_size().to_string()),
        ("[dataplane] idle", format!("{:?}", dp.idle)),
        ("[dataplane] idle_spin_us", dp.idle_spin().as_micros().to_string()),
        ("[dataplane] xdp_mode", format!("{:?}", dp.xdp_mode)),
        ("[dataplane] egress_ips", format!("{:?}", dp.egress_ips())),
        ("[dataplane] clamp_mss", dp.clamp_mss.to_string()),
        ("[dataplane] source_validation", dp.source_validation.unwrap_or(true).to_string()),
        ("[nat] max_flows", nat.max_flows().to_string()),
        ("[nat] max_flows_per_source", nat.max_flows_per_source().to_string()),
        ("[nat] timers", format!("{:?}", nat.timeouts())),
        ("[nat] port_quarantine", nat.port_quarantine_secs().to_string()),
        ("[nat] icmp errors", format!("{:?}", nat.icmp_errors())),
        ("[nat] log", format!("{:?}", nat.log_mode())),
        ("[l7]", format!("{:?}", config.l7.settings())),
        ("l7 path (an `l7` rule at start)", crate::gateway::l7_active(config).to_string()),
        ("[nat] log_rate", nat.log_rate().to_string()),
        ("[admin] listen", admin.listen().to_string()),
        ("[admin] remote_control", admin.remote_control().to_string()),
        ("[admin] token_file", format!("{:?}", admin.token_file.as_ref().map(|t| t.get_ref()))),
    ]
}

/// One line per restart-only setting that differs between `running` and `new`.
pub fn needs_restart(running: &[(&'static str, String)], new: &[(&'static str, String)]) -> Vec<String> {
    running
        .iter()
        .zip(new)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((key, a), (_, b))| {
            format!("{key} changed ({a} -> {b}): takes effect after a restart; {a} stays")
        })
        .collect()
}

/// Reloads the policy into a shared snapshot; serialises concurrent reloads (SIGHUP and `POST /reload`).
#[derive(Debug, Default)]
pub struct PolicyReloader {
    lock: Mutex<()>,
    /// The restart-only settings the gateway runs with (see [`restart_only_settings`]).
    pub running: Vec<(&'static str, String)>,
    /// Successful swaps.
    pub reloads: AtomicU64,
    /// Rejected files.
    pub failures: AtomicU64,
    /// The configuration running now, and the current addresses of its `to_hosts` names: a DNS change recompiles
    /// them without reading the file.
    current: Mutex<Option<(Config, ResolvedNames)>>,
    /// The resolver of `to_hosts` names, told the names of each configuration swapped in.
    pub fqdn: Mutex<Option<Arc<crate::fqdn::FqdnShared>>>,
}

impl PolicyReloader {
    /// A reloader for a gateway running with these restart-only settings.
    pub fn running(settings: Vec<(&'static str, String)>) -> PolicyReloader {
        PolicyReloader { running: settings, ..PolicyReloader::default() }
    }

    /// Compiles the first policy (generation 1) with the names' first answers and remembers both.
    pub fn start(&self, config: &Config, names: ResolvedNames) -> Result<PolicySnapshot, String> {
        let snapshot = compile_with_names(config, 1, &names)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((config.clone(), names));
        Ok(snapshot)
    }

    /// The `to_hosts` names' addresses changed: recompiles the running configuration with them and swaps it in
    /// (a new generation; not counted as a reload). Returns the generation.
    pub fn names_changed(&self, names: ResolvedNames, shared: &SharedPolicy) -> Option<u64> {
        let _serialised = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (config, held) = current.as_mut()?;
        *held = names;
        let generation = shared.load().generation() + 1;
        match compile_with_names(config, generation, held) {
            Ok(snapshot) => {
                shared.store(Arc::new(snapshot));
                let mut listed: Vec<String> = held.iter().map(|(n, a)| format!("{n}={a:?}")).collect();
                listed.sort();
                tracing::info!(generation, names = %listed.join(" "), "policy recompiled: to_hosts addresses changed");
                Some(generation)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot recompile the policy with new to_hosts addresses");
                None
            }
        }
    }

    /// Re-reads `path`, validates and compiles it, and swaps it in with generation = current + 1. On error the
    /// running policy stays, `failures` goes up, and the file:line:col errors are logged and returned.
    /// Returns the new generation and, one line each, the changed settings that need a restart (also logged).
    pub fn reload(&self, path: &Path, shared: &SharedPolicy) -> Result<(u64, Vec<String>), ConfigErrors> {
        let _serialised = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = crate::config::load(path).and_then(|loaded| {
            let generation = shared.load().generation() + 1;
            let restart = needs_restart(&self.running, &restart_only_settings(&loaded.config));
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let names = current.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
            let compiled = compile_with_names(&loaded.config, generation, &names);
            let snapshot = compiled.map_err(|m| {
                ConfigErrors(vec![ConfigError { path: path.to_path_buf(), line: 0, column: 0, message: m }])
            })?;
            let new_names = dns_names(&loaded.config);
            *current = Some((loaded.config, names));
            Ok((snapshot, restart, new_names))
        });
        match result {
            Ok((snapshot, restart, new_names)) => {
                let generation = snapshot.generation();
                shared.store(Arc::new(snapshot));
                if let Some(fqdn) = self.fqdn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    fqdn.set_names(new_names);
                }
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(generation, "policy reloaded");
                for line in &restart {
                    tracing::warn!("reload: {line}");
                }
                Ok((generation, restart))
            }
            Err(errors) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%errors, "policy reload rejected; keeping the running policy");
                Err(errors)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Source};

    fn settings(extra: &str) -> Vec<(&'static str, String)> {
        let text = format!("[dataplane]\ninside = \"a\"\noutside = \"b\"\n{extra}");
        restart_only_settings(&parse(Source::new("t.toml", text)).unwrap().config)
    }

    #[test]
    fn a_reload_names_each_changed_setting_that_needs_a_restart() {
        let running = settings("cores = [1]\n");
        assert!(needs_restart(&running, &settings("cores = [1]\n")).is_empty());
        let changed = settings("cores = [0, 1]\nring_size = 4096\n[nat]\nudp_timeout = 600\n");
        let lines = needs_restart(&running, &changed);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(
            lines[0],
            "[dataplane] cores changed ([1] -> [0, 1]): takes effect after a restart; [1] stays"
        );
        assert!(lines[1].starts_with("[dataplane] ring_size changed (2048 -> 4096)"), "{}", lines[1]);
        assert!(lines[2].starts_with("[nat] timers changed"), "{}", lines[2]);
    }
}

#[cfg(test)]
mod to_hosts_tests {
    use super::*;
    use crate::config::{parse, Source};
    use dataplane::policy::Verdict;

    #[test]
    fn a_name_stands_for_its_current_addresses_and_for_nothing_without_any() {
        let text = "[dataplane]\ninside = \"a\"\noutside = \"b\"\n[[group]]\nname = \"apps\"\n\
                    sources = [\"10.0.0.0/24\"]\negress_ips = [\"192.0.2.10\"]\n\
                    [[rule]]\ngroup = \"apps\"\nproto = \"tcp\"\nports = [5432]\naction = \"allow\"\n\
                    to_hosts = [\"db.example\"]\n";
        let config = parse(Source::new("t.toml", text.to_string())).unwrap().config;
        assert_eq!(dns_names(&config), ["db.example"]);
        let src: IpAddr = "10.0.0.5".parse().unwrap();
        let verdict = |names: &ResolvedNames, dst: &str| {
            compile_with_names(&config, 1, names)
                .unwrap()
                .evaluate(src, dst.parse().unwrap(), 6, 5432)
                .verdict
        };
        let mut names = ResolvedNames::new();
        assert!(
            matches!(verdict(&names, "192.0.2.7"), Verdict::Deny(_)),
            "not resolved yet: nothing allowed"
        );
        names.insert("db.example".into(), vec!["192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap()]);
        assert_eq!(verdict(&names, "192.0.2.7"), Verdict::Allow);
        assert_eq!(verdict(&names, "192.0.2.8"), Verdict::Allow);
        assert!(matches!(verdict(&names, "192.0.2.9"), Verdict::Deny(_)));
        names.insert("db.example".into(), Vec::new());
        assert!(matches!(verdict(&names, "192.0.2.7"), Verdict::Deny(_)), "answers gone: nothing allowed");
    }
}
