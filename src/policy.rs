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

/// Compiles a validated configuration. Errors only if the model was not validated first.
pub fn compile(config: &Config, generation: u64) -> Result<PolicySnapshot, String> {
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
        b.add_rule(RuleSpec {
            group,
            to: prefixes(&r.to)?,
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
        });
    }
    b.build(generation).map_err(|e| e.to_string())
}

/// The destination as written for explain: not used on the data path.
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// Reloads the policy into a shared snapshot; serialises concurrent reloads (SIGHUP and `POST /reload`).
#[derive(Debug, Default)]
pub struct PolicyReloader {
    lock: Mutex<()>,
    /// Successful swaps.
    pub reloads: AtomicU64,
    /// Rejected files.
    pub failures: AtomicU64,
}

impl PolicyReloader {
    /// Re-reads `path`, validates and compiles it, and swaps it in with generation = current + 1. On error the
    /// running policy stays, `failures` goes up, and the file:line:col errors are logged and returned.
    pub fn reload(&self, path: &Path, shared: &SharedPolicy) -> Result<u64, ConfigErrors> {
        let _serialised = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = crate::config::load(path).and_then(|loaded| {
            let generation = shared.load().generation() + 1;
            compile(&loaded.config, generation).map_err(|m| {
                ConfigErrors(vec![ConfigError { path: path.to_path_buf(), line: 0, column: 0, message: m }])
            })
        });
        match result {
            Ok(snapshot) => {
                let generation = snapshot.generation();
                shared.store(Arc::new(snapshot));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(generation, "policy reloaded");
                Ok(generation)
            }
            Err(errors) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%errors, "policy reload rejected; keeping the running policy");
                Err(errors)
            }
        }
    }
}
