//! The admin HTTP endpoint: `/metrics` (OpenMetrics or Prometheus text, as the scraper asks), `/healthz`,
//! `/readyz`, `POST /reload`, `GET /flows` and `POST /flows/delete` (see [`crate::flows`]).
//!
//! It listens on loopback by default and runs on its own thread, never on a worker's core: a scrape reads the
//! workers' single-writer counters with relaxed loads, so it cannot stall the data path. Anything else the
//! program wants exported (NAT port use, policy generation) is added as an extra [`Collector`].

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::exposition::Exposition;
use anyhow::Context;
use dataplane::drop::DropReason;
use dataplane::policy::{Action as PolicyAction, RuleId, SharedPolicy};
use dataplane::stats::{side_index, WorkerStats, KERNEL_DROP_REASONS};
use dataplane::Side;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What reloading does: returns a one-line summary, or the reason the new file was refused.
pub type ReloadFn = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Shared between the admin thread and the rest of the program.
pub struct AdminState {
    /// One entry per worker; each is written only by its worker.
    pub workers: Vec<Arc<WorkerStats>>,
    /// Set once every worker is polling and the XDP programs are attached.
    pub ready: AtomicBool,
    /// Set when shutdown starts: `/healthz` and `/readyz` then answer 503 so a load balancer drains us.
    pub stopping: AtomicBool,
    /// Re-reads the configuration; `None` where the program has nothing to reload.
    pub reload: Option<ReloadFn>,
    /// Reload attempts that succeeded / were refused.
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// When the last reload attempt ended (Unix seconds; 0: none yet) and whether it succeeded.
    pub last_reload_unix: AtomicU64,
    pub last_reload_ok: AtomicBool,
    /// More metrics from other parts of the program.
    pub extra_collectors: Vec<Arc<dyn Collector>>,
    /// The running policy, to name the rules in the per-rule decision counters.
    pub policy: Option<Arc<SharedPolicy>>,
    /// The resolver of the rules' `to_hosts` names.
    pub fqdn: Option<Arc<crate::fqdn::FqdnShared>>,
    /// Frames the XDP programs dropped before any worker saw them, by reason (kept fresh by the control loop);
    /// added to the workers' counts of the same reason.
    pub xdp_drops: [AtomicU64; DropReason::COUNT],
    /// Who may use control requests (`POST /reload`).
    pub control: ControlPolicy,
    /// Each interface egressd owns and its MTU as last read (kept fresh by the control loop).
    pub interface_mtu: Vec<(String, AtomicU32)>,
    /// The largest MTU the configured `frame_size` carries.
    pub largest_mtu: u32,
    /// How many flows the NAT tables hold, all workers together (0: not known, not exported).
    pub max_flows: u64,
    /// The L7 path's counters and queues, when it runs.
    pub l7: Option<(Arc<crate::l7::L7Stats>, Arc<dataplane::l7::punt::Punt>)>,
    /// The workers' mailboxes for `GET /flows` and `POST /flows/delete`.
    pub flows: Option<Arc<dataplane::nat::flows::FlowQueries>>,
}

/// Up to this many rules, `/metrics` lists every rule's decisions, zeros included (so unused rules show); a larger
/// policy lists only the rules that decided something, so a 100 000-rule policy does not put 100 000 series into
/// every scrape.
const PER_RULE_SERIES_FOR_EVERY_RULE_UP_TO: usize = 1000;

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").field("workers", &self.workers.len()).finish_non_exhaustive()
    }
}

impl AdminState {
    pub fn new(workers: Vec<Arc<WorkerStats>>) -> AdminState {
        AdminState {
            workers,
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            reload: None,
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_unix: AtomicU64::new(0),
            last_reload_ok: AtomicBool::new(true),
            extra_collectors: Vec::new(),
            policy: None,
            fqdn: None,
            xdp_drops: std::array::from_fn(|_| AtomicU64::new(0)),
            control: ControlPolicy::LoopbackOnly,
            interface_mtu: Vec::new(),
            largest_mtu: u32::MAX,
            max_flows: 0,
            l7: None,
            flows: None,
        }
    }

    /// Runs the reload hook and counts the outcome.
    pub fn reload(&self) -> Result<String, String> {
        let Some(reload) = &self.reload else {
            return Err("this process has nothing to reload".into());
        };
        let result = reload();
        match &result {
            Ok(_) => self.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_reload_unix.store(now, Ordering::Relaxed);
        self.last_reload_ok.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    /// The Prometheus text exposition of every metric.
    /// What `/readyz` and `egressd_ready` report: the workers poll and shutdown has not started.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed)
    }

    pub fn render_metrics(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CoreCollector(Arc::clone(self))));
        for extra in &self.extra_collectors {
            registry.register_collector(Box::new(SharedCollector(Arc::clone(extra))));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Lets a collector that other parts of the program also hold be registered for one scrape.
#[derive(Debug)]
struct SharedCollector(Arc<dyn Collector>);

impl Collector for SharedCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// Sums the workers' counters at scrape time.
#[derive(Debug)]
struct CoreCollector(Arc<AdminState>);

/// One metric's labels.
type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in series {
        if labels.is_empty() {
            // An unlabelled metric has one series.
            return metric.encode(family);
        } else {
            metric.encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    family(
        encoder,
        name,
        help,
        MetricType::Counter,
        series.into_iter().map(|(l, v)| (l, ConstCounter::new(v))),
    )
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let as_gauge = |(l, v): (Labels, u64)| (l, ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)));
    family(encoder, name, help, MetricType::Gauge, series.into_iter().map(as_gauge))
}

/// Egress ports per IP and protocol: TCP and UDP use 1–65535, ICMP echo identifiers 1024–65535.
const PORTS_PER_IP: [(&str, u64); 3] = [("tcp", 65535), ("udp", 65535), ("icmp", 64512)];

impl Collector for CoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let sum = |f: &dyn Fn(&WorkerStats) -> u64| state.workers.iter().map(|w| f(w)).sum::<u64>();
        let sides = [Side::Inside, Side::Outside];
        let by_side = |f: &dyn Fn(&WorkerStats, Side) -> u64| {
            sides.map(|side| (vec![("side", side.as_str().to_string())], sum(&|w: &WorkerStats| f(w, side))))
        };

        let rx_packets = by_side(&|w, side| w.rx(side).packets.get());
        counters(&mut encoder, "egressd_rx_packets", "Frames received, by interface side.", rx_packets)?;
        let per_worker = state.workers.iter().enumerate().flat_map(|(i, w)| {
            sides.map(|side| {
                (
                    vec![("worker", i.to_string()), ("side", side.as_str().to_string())],
                    w.rx(side).packets.get(),
                )
            })
        });
        let loops =
            state.workers.iter().enumerate().map(|(i, w)| (vec![("worker", i.to_string())], w.loops.get()));
        counters(
            &mut encoder,
            "egressd_worker_loops",
            "Poll loops each worker has run; a worker whose count stops moving is stalled.",
            loops,
        )?;
        let ready = u64::from(state.is_ready());
        gauges(&mut encoder, "egressd_ready", "1 while /readyz answers 200.", [(vec![], ready)])?;
        counters(
            &mut encoder,
            "egressd_worker_rx_packets",
            "Frames received, by worker (= queue) and interface side: how the NIC spreads traffic over the workers.",
            per_worker,
        )?;
        let mtus: Vec<(String, u32)> =
            state.interface_mtu.iter().map(|(i, m)| (i.clone(), m.load(Ordering::Relaxed))).collect();
        let label = |i: &String| vec![("interface", i.clone())];
        gauges(
            &mut encoder,
            "egressd_interface_mtu",
            "MTU of each interface egressd owns.",
            mtus.iter().map(|(i, m)| (label(i), u64::from(*m))),
        )?;
        gauges(
            &mut encoder,
            "egressd_interface_mtu_too_large",
            "1 while an interface's MTU exceeds what the UMEM frame size carries (longer frames are lost).",
            mtus.iter().map(|(i, m)| (label(i), u64::from(*m > state.largest_mtu))),
        )?;
        let rx_bytes = by_side(&|w, side| w.rx(side).bytes.get());
        counters(&mut encoder, "egressd_rx_bytes", "Bytes received, by interface side.", rx_bytes)?;
        let tx_packets = by_side(&|w, side| w.tx(side).packets.get());
        counters(&mut encoder, "egressd_tx_packets", "Frames transmitted, by interface side.", tx_packets)?;
        let tx_bytes = by_side(&|w, side| w.tx(side).bytes.get());
        counters(&mut encoder, "egressd_tx_bytes", "Bytes transmitted, by interface side.", tx_bytes)?;

        let drops = DropReason::ALL.iter().map(|&r| {
            let in_xdp = state.xdp_drops[r as usize].load(Ordering::Relaxed);
            (vec![("reason", r.as_str().to_string())], sum(&|w: &WorkerStats| w.drops(r)) + in_xdp)
        });
        counters(&mut encoder, "egressd_drops", "Frames not forwarded, by reason.", drops)?;

        counters(
            &mut encoder,
            "egressd_flows_allowed",
            "New flows the policy let through.",
            [(vec![], sum(&|w: &WorkerStats| w.flows_allowed.get()))],
        )?;
        counters(
            &mut encoder,
            "egressd_flows_dry_run_denied",
            "New flows a dry-run rule would have denied but let through.",
            [(vec![], sum(&|w: &WorkerStats| w.flows_dry_run_denied.get()))],
        )?;

        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let flows = [
            ("tcp_syn_sent", sum(&|w: &WorkerStats| get(&w.nat.tcp_syn_sent))),
            ("tcp_established", sum(&|w: &WorkerStats| get(&w.nat.tcp_established))),
            ("tcp_transitory", sum(&|w: &WorkerStats| get(&w.nat.tcp_transitory))),
            ("udp", sum(&|w: &WorkerStats| get(&w.nat.udp))),
            ("icmp", sum(&|w: &WorkerStats| get(&w.nat.icmp))),
        ];
        let flows = flows.map(|(state, v)| (vec![("state", state.to_string())], v));
        gauges(&mut encoder, "egressd_nat_flows", "Tracked flows, by state.", flows)?;
        if state.max_flows > 0 {
            gauges(
                &mut encoder,
                "egressd_nat_flows_max",
                "Flows the NAT tables hold, all workers together ([nat] max_flows).",
                [(vec![], state.max_flows)],
            )?;
        }
        gauges(
            &mut encoder,
            "egressd_nat_mappings",
            "Endpoint-independent mappings (inside ip:port:proto → egress ip:port).",
            [(vec![], sum(&|w: &WorkerStats| get(&w.nat.mappings)))],
        )?;
        counters(
            &mut encoder,
            "egressd_nat_port_allocation_failures",
            "New flows that found no free egress port.",
            [(vec![], sum(&|w: &WorkerStats| get(&w.nat.allocation_failures)))],
        )?;
        counters(
            &mut encoder,
            "egressd_nat_log_suppressed",
            "NAT translation log records not written: over the rate bound ([nat] log_rate) or the queue was full.",
            [(vec![], sum(&|w: &WorkerStats| get(&w.nat.log_suppressed)))],
        )?;
        if let Some((l7, punt)) = &state.l7 {
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            gauges(
                &mut encoder,
                "egressd_l7_connections_open",
                "Client connections the L7 path holds.",
                [(vec![], g(&l7.open))],
            )?;
            gauges(
                &mut encoder,
                "egressd_l7_connections_in_phase",
                "L7 client connections by phase: classifying (waiting for the first bytes), connecting (allowed or \
                 being verified, no upstream yet), relaying, closing.",
                [
                    (vec![("phase", "classifying".to_string())], g(&l7.classifying)),
                    (vec![("phase", "connecting".to_string())], g(&l7.verifying)),
                    (vec![("phase", "relaying".to_string())], g(&l7.relaying)),
                    (vec![("phase", "closing".to_string())], g(&l7.closing)),
                ],
            )?;
            let histogram = encoder.encode_descriptor(
                "egressd_l7_decision_seconds",
                "Time from a connection's first packet to the decision on its ClientHello or first request.",
                None,
                MetricType::Histogram,
            )?;
            l7.decision_seconds.encode(histogram)?;
            counters(
                &mut encoder,
                "egressd_l7_punted_packets",
                "Packets of l7 flows the workers handed to the L7 path.",
                [(vec![], sum(&|w: &WorkerStats| w.l7_punted.get()))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_connections",
                "Client connections the L7 path accepted.",
                [(vec![], g(&l7.accepted))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_allowed",
                "L7 connections whose name (SNI or every request's Host) was allowed and reached upstream.",
                [(vec![], g(&l7.allowed))],
            )?;
            let refused: Vec<(Labels, u64)> = l7
                .refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.to_string())], *n))
                .collect();
            counters(
                &mut encoder,
                "egressd_l7_refused",
                "L7 connections (or requests) refused, by reason (host_not_allowed, no_sni, ambiguous_length, ...).",
                refused,
            )?;
            counters(
                &mut encoder,
                "egressd_l7_upstream_failures",
                "Allowed L7 connections whose upstream could not be reached (the client was reset).",
                [(vec![], g(&l7.upstream_failed))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_endpoint_failures",
                "Failures of service endpoints: connect failures (each retried on another endpoint while attempts \
                 remain) and 5xx first responses.",
                [(vec![], g(&l7.endpoint_failures))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_outlier_ejections",
                "Service endpoints ejected for failing several times in a row.",
                [(vec![], g(&l7.ejections))],
            )?;
            gauges(
                &mut encoder,
                "egressd_l7_ejected_endpoints",
                "Service endpoints ejected now.",
                [(vec![], g(&l7.ejected_endpoints))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_retries",
                "Requests of services sent again after a gateway error, a reset or a timeout (safe requests only).",
                [(vec![], g(&l7.retries))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_pool_reused",
                "Idle upstream connections of services a new client connection reused.",
                [(vec![], g(&l7.pool_reused))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_pool_closed",
                "Idle upstream connections closed in the pool (idle timeout, closed by the server).",
                [(vec![], g(&l7.pool_closed))],
            )?;
            gauges(
                &mut encoder,
                "egressd_l7_pool_idle",
                "Idle upstream connections of services kept for the next client.",
                [(vec![], g(&l7.pool_idle))],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_dropped_packets",
                "Packets of L7 flows dropped: over max_connections, of no connection, or a full queue.",
                [
                    (vec![("reason", "over_limit".to_string())], g(&l7.over_limit)),
                    (vec![("reason", "over_source_limit".to_string())], g(&l7.over_source_limit)),
                    (vec![("reason", "no_connection".to_string())], g(&l7.stray_packets)),
                    (vec![("reason", "queue_full_to_l7".to_string())], g(&punt.dropped_to_l7)),
                    (vec![("reason", "queue_full_to_workers".to_string())], g(&punt.dropped_to_workers)),
                ],
            )?;
            counters(
                &mut encoder,
                "egressd_l7_bytes",
                "Bytes the L7 path relayed, by direction.",
                [
                    (vec![("direction", "up".to_string())], g(&l7.bytes_up)),
                    (vec![("direction", "down".to_string())], g(&l7.bytes_down)),
                ],
            )?;
        }
        let mut in_use: std::collections::BTreeMap<(std::net::Ipv4Addr, &str), u64> = Default::default();
        for w in &state.workers {
            for (ip, tcp, udp, icmp) in w.nat.egress_ports() {
                for (proto, n) in [("tcp", tcp), ("udp", udp), ("icmp", icmp)] {
                    *in_use.entry((ip, proto)).or_default() += n;
                }
            }
        }
        let labels = |ip: &std::net::Ipv4Addr, proto: &str| {
            vec![("egress_ip", ip.to_string()), ("proto", proto.to_string())]
        };
        gauges(
            &mut encoder,
            "egressd_nat_ports_in_use",
            "Egress ports held by mappings, per egress IP and protocol.",
            in_use.iter().map(|((ip, proto), n)| (labels(ip, proto), *n)),
        )?;
        gauges(
            &mut encoder,
            "egressd_nat_ports_free",
            "Egress ports still free, per egress IP and protocol.",
            in_use.iter().map(|((ip, proto), n)| {
                let total = PORTS_PER_IP.iter().find(|(p, _)| p == proto).map_or(0, |(_, t)| *t);
                (labels(ip, proto), total.saturating_sub(*n))
            }),
        )?;

        if let Some(policy) = &state.policy {
            let snapshot = policy.load();
            let hits: Vec<_> = state.workers.iter().map(|w| w.rule_hits.load_full()).collect();
            let every_rule = snapshot.rule_count() <= PER_RULE_SERIES_FOR_EVERY_RULE_UP_TO;
            let series = (0..snapshot.rule_count()).filter_map(|i| {
                let rule = snapshot.rule(RuleId(i as u32))?;
                let action = match rule.action {
                    PolicyAction::Allow => "allow",
                    PolicyAction::Deny => "deny",
                    PolicyAction::L7 => "l7",
                };
                // Workers still on an older generation are not counted against the new rule numbering.
                let n: u64 =
                    hits.iter().filter(|h| h.generation == snapshot.generation()).map(|h| h.get(i)).sum();
                if n == 0 && !every_rule {
                    return None;
                }
                let labels = vec![
                    ("group", snapshot.group_name(rule.group).to_string()),
                    ("rule", rule.name.clone().unwrap_or_else(|| (i + 1).to_string())),
                    ("action", action.to_string()),
                ];
                Some((labels, n))
            });
            counters(
                &mut encoder,
                "egressd_policy_decisions",
                "Policy decisions per rule (rule = its name, or its position among the [[rule]] tables from 1) since the last \
                 reload: new flows, flows judged again after a reload, and each packet of denied or l7 flows. \
                 Policies of more than 1000 rules list only the rules that decided something.",
                series,
            )?;
        }
        let kernel_drops = sides.iter().flat_map(|&side| {
            KERNEL_DROP_REASONS.iter().enumerate().map(move |(i, reason)| {
                let n = sum(&|w: &WorkerStats| w.kernel_drops[side_index(side)][i].load(Ordering::Relaxed));
                (vec![("side", side.as_str().to_string()), ("reason", reason.to_string())], n)
            })
        });
        counters(
            &mut encoder,
            "egressd_kernel_drops",
            "Frames the kernel dropped at egressd's AF_XDP sockets before egressd saw them (XDP_STATISTICS).",
            kernel_drops.collect::<Vec<_>>(),
        )?;
        counters(
            &mut encoder,
            "egressd_handoffs",
            "Frames a worker copied to the worker owning their NAT port (replies on another worker's queue).",
            [(vec![], sum(&|w: &WorkerStats| w.handed_off.get()))],
        )?;
        counters(
            &mut encoder,
            "egressd_icmp_errors_sent",
            "ICMP errors egressd originated (3/13 for flows refused as out_of_ports, 3/4 for packets too big).",
            [(vec![], sum(&|w: &WorkerStats| w.icmp_errors_sent.get()))],
        )?;
        counters(
            &mut encoder,
            "egressd_icmp_errors_rate_limited",
            "ICMP errors left unsent by the per-worker rate limit ([nat] icmp_rate, icmp_burst).",
            [(vec![], sum(&|w: &WorkerStats| w.icmp_errors_rate_limited.get()))],
        )?;
        counters(
            &mut encoder,
            "egressd_audit_suppressed",
            "Denials left out of the audit log by its rate limit.",
            [(vec![], sum(&|w: &WorkerStats| w.audit_suppressed.get()))],
        )?;
        gauges(
            &mut encoder,
            "egressd_last_reload_timestamp_seconds",
            "When the last reload attempt ended (Unix time; 0 before the first).",
            [(vec![], state.last_reload_unix.load(Ordering::Relaxed))],
        )?;
        gauges(
            &mut encoder,
            "egressd_last_reload_success",
            "1 if the last reload attempt was applied (or none was made), 0 if the file was refused.",
            [(vec![], u64::from(state.last_reload_ok.load(Ordering::Relaxed)))],
        )?;
        if let Some(policy) = &state.policy {
            gauges(
                &mut encoder,
                "egressd_policy_generation",
                "Generation of the running policy (1 at start, +1 per applied reload or to_hosts change).",
                [(vec![], policy.load().generation())],
            )?;
        }
        if let Some(fqdn) = &state.fqdn {
            counters(
                &mut encoder,
                "egressd_to_hosts_updates",
                "Times the addresses of the rules' to_hosts names changed (each recompiles the policy).",
                [(vec![], fqdn.updates.load(Ordering::Relaxed))],
            )?;
            counters(
                &mut encoder,
                "egressd_to_hosts_lookup_failures",
                "Lookups of to_hosts names that got no usable answer (the last answer holds until its TTL ends).",
                [(vec![], fqdn.failures.load(Ordering::Relaxed))],
            )?;
        }
        gauges(
            &mut encoder,
            "egressd_build_info",
            "Always 1; the labels say which egressd is running.",
            [(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        counters(
            &mut encoder,
            "egressd_reloads",
            "Configuration reloads, by result.",
            [
                (vec![("result", "ok".to_string())], state.reloads_ok.load(Ordering::Relaxed)),
                (vec![("result", "failed".to_string())], state.reloads_failed.load(Ordering::Relaxed)),
            ],
        )?;
        let workers = ConstGauge::new(state.workers.len() as i64);
        workers.encode(encoder.encode_descriptor(
            "egressd_workers",
            "Dataplane worker threads.",
            None,
            workers.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Who may send control requests (`POST /reload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPolicy {
    /// Only from a loopback peer (the default, and all a loopback `listen` can get anyway).
    LoopbackOnly,
    /// From anywhere, with `Authorization: Bearer <token>` (`remote_control = true`, `token_file`).
    Token(String),
}

/// The control policy `[admin]` asks for; reads the token file.
pub fn control_policy(admin: &crate::config::admin::AdminConfig) -> anyhow::Result<ControlPolicy> {
    match (&admin.token_file, admin.remote_control()) {
        (Some(path), true) => {
            let path = path.get_ref();
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("admin token_file {}", path.display()))?
                .trim()
                .to_string();
            anyhow::ensure!(
                token.len() >= 16,
                "admin token_file {}: the token must be at least 16 characters",
                path.display()
            );
            Ok(ControlPolicy::Token(token))
        }
        _ => Ok(ControlPolicy::LoopbackOnly),
    }
}

impl ControlPolicy {
    /// Whether a control request from `peer` with these headers may act.
    fn allows(&self, peer: Option<&std::net::SocketAddr>, headers: &[tiny_http::Header]) -> bool {
        match self {
            ControlPolicy::LoopbackOnly => peer.is_some_and(|p| p.ip().is_loopback()),
            ControlPolicy::Token(token) => headers.iter().any(|h| {
                h.field.equiv("Authorization")
                    && h.value.as_str().strip_prefix("Bearer ") == Some(token.as_str())
            }),
        }
    }
}

/// Starts the admin server on its own thread. Fails if the address cannot be bound.
pub fn spawn(listen: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<JoinHandle<()>> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("admin endpoint: cannot listen on {listen}"))?;
    tracing::info!(%listen, "admin endpoint listening");
    let handle = std::thread::Builder::new().name("egressd-admin".into()).spawn(move || {
        for request in server.incoming_requests() {
            respond(&state, request);
        }
    })?;
    Ok(handle)
}

fn respond(state: &Arc<AdminState>, mut request: tiny_http::Request) {
    use tiny_http::Method;
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let (status, body, content_type) = match (request.method(), path.as_str()) {
        (Method::Get, "/metrics") => {
            let accept = request.headers().iter().find(|h| h.field.equiv("Accept")).map(|h| h.value.as_str());
            let format = Exposition::negotiate(accept);
            (200, format.render(state.render_metrics()), format.content_type())
        }
        (Method::Get, "/healthz") => {
            if state.stopping.load(Ordering::Relaxed) {
                (503, "stopping\n".into(), "text/plain")
            } else {
                (200, "ok\n".into(), "text/plain")
            }
        }
        (Method::Get, "/readyz") => {
            if state.is_ready() {
                (200, "ready\n".into(), "text/plain")
            } else {
                (503, "not ready\n".into(), "text/plain")
            }
        }
        (Method::Post, "/reload") | (Method::Get, "/flows") | (Method::Post, "/flows/delete")
            if !state.control.allows(request.remote_addr(), request.headers()) =>
        {
            (
                403,
                "control requests (reload, flows) need a loopback peer, or remote_control with a bearer token ([admin])\n"
                    .into(),
                "text/plain",
            )
        }
        (Method::Get, "/flows") | (Method::Post, "/flows/delete") => {
            let query = request.url().split_once('?').map_or("", |(_, q)| q).to_string();
            flows_response(state, request.method() == &Method::Get, &query)
        }
        (Method::Post, "/reload") => {
            // Drain the body, if any; the reload reads the file named at start-up.
            let _ = std::io::copy(&mut request.as_reader().take(64 * 1024), &mut std::io::sink());
            match state.reload() {
                Ok(summary) => (200, format!("{summary}\n"), "text/plain"),
                Err(reason) => (422, format!("{reason}\n"), "text/plain"),
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/reload" | "/flows" | "/flows/delete") => {
            (405, "method not allowed\n".into(), "text/plain")
        }
        _ => (404, "not found: try /metrics, /healthz, /readyz, POST /reload, /flows, POST /flows/delete\n".into(), "text/plain"),
    };
    let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header is valid");
    let response = tiny_http::Response::from_string(body).with_status_code(status).with_header(header);
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "admin: client went away");
    }
}

/// `GET /flows` (`list`) or `POST /flows/delete`: JSON, or the reason in plain text.
fn flows_response(state: &Arc<AdminState>, list: bool, query: &str) -> (u16, String, &'static str) {
    let (Some(queries), Some(policy)) = (&state.flows, &state.policy) else {
        return (404, "this gateway has no flow table\n".into(), "text/plain");
    };
    let policy = policy.load_full();
    let answer = if list {
        crate::flows::list(queries, &policy, query).map(|l| serde_json::to_string(&l))
    } else {
        crate::flows::delete(queries, &policy, query).map(|d| serde_json::to_string(&d))
    };
    match answer {
        Ok(Ok(json)) => (200, json + "\n", "application/json"),
        Ok(Err(e)) => (500, format!("{e}\n"), "text/plain"),
        Err(e) => (e.status, e.message + "\n", "text/plain"),
    }
}

/// A minimal HTTP/1.0 client for the CLI's `stats` and `reload` (loopback, plain text; no TLS needed).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request_with(addr, method, path, None)
}

/// [`http_request`], with `Authorization: Bearer <token>` when a token is given.
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use std::io::Write;
    use std::time::Duration;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the admin endpoint at {addr} (is egressd running?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("malformed response from {addr}"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_traffic() -> Arc<AdminState> {
        let w1 = Arc::new(WorkerStats::default());
        let w2 = Arc::new(WorkerStats::default());
        w1.rx(Side::Inside).add(100);
        w2.rx(Side::Inside).add(50);
        w2.tx(Side::Outside).add(60);
        w1.count_drop(DropReason::NoMapping);
        w2.count_drop(DropReason::NoMapping);
        w2.kernel_drops[0][0].store(5, Ordering::Relaxed);
        w1.icmp_errors_sent.add(3);
        w2.icmp_errors_sent.inc();
        w2.icmp_errors_rate_limited.add(7);
        let mut state = AdminState::new(vec![w1, w2]);
        state.xdp_drops[DropReason::Ipv6Unsupported as usize].store(9, Ordering::Relaxed);
        state.interface_mtu =
            vec![("gw-in".into(), AtomicU32::new(1500)), ("gw-out".into(), AtomicU32::new(3000))];
        state.largest_mtu = 1774;
        Arc::new(state)
    }

    #[test]
    fn metrics_sum_workers_and_name_every_drop_reason() {
        let text = state_with_traffic().render_metrics();
        assert!(text.contains("egressd_rx_packets_total{side=\"inside\"} 2"), "{text}");
        assert!(text.contains("egressd_rx_bytes_total{side=\"inside\"} 150"), "{text}");
        assert!(text.contains("egressd_tx_packets_total{side=\"outside\"} 1"), "{text}");
        assert!(text.contains("egressd_drops_total{reason=\"no_mapping\"} 2"), "{text}");
        assert!(text.contains("egressd_interface_mtu{interface=\"gw-out\"} 3000"), "{text}");
        assert!(text.contains("egressd_interface_mtu_too_large{interface=\"gw-in\"} 0"), "{text}");
        assert!(text.contains("egressd_interface_mtu_too_large{interface=\"gw-out\"} 1"), "{text}");
        // Drops the XDP program counted join the workers' under the same reason.
        assert!(text.contains("egressd_drops_total{reason=\"ipv6_unsupported\"} 9"), "{text}");
        for r in DropReason::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", r.as_str())), "missing {}", r.as_str());
        }
        assert!(text.contains("egressd_workers 2"), "{text}");
        assert!(
            text.contains(&format!("egressd_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
        assert!(text.contains("\negressd_last_reload_success 1\n"), "{text}");
        assert!(text.contains("egressd_worker_rx_packets_total{worker=\"1\",side=\"inside\"} 1"), "{text}");
        assert!(
            text.contains("egressd_kernel_drops_total{side=\"inside\",reason=\"rx_ring_full\"} 5"),
            "{text}"
        );
        // Unlabelled series print without braces; NAT flows are labelled by state.
        assert!(text.contains("\negressd_nat_mappings 0\n"), "{text}");
        assert!(text.contains("egressd_nat_flows{state=\"tcp_established\"} 0"), "{text}");
        assert!(text.contains("\negressd_icmp_errors_sent_total 4\n"), "{text}");
        assert!(text.contains("\negressd_icmp_errors_rate_limited_total 7\n"), "{text}");
    }

    /// A policy of `rules` allow rules for one group, its snapshot shared, and one worker whose counters say that
    /// rule 2 (index 1) decided 3 flows.
    fn state_with_rules(rules: usize) -> Arc<AdminState> {
        use dataplane::policy::{PolicyBuilder, Prefix, ProtoMatch, RuleSpec};
        let mut b = PolicyBuilder::new();
        let g = b.add_group("web".to_string(), vec![std::net::Ipv4Addr::new(192, 0, 2, 10)]);
        b.add_source(g, Prefix::truncating("10.10.0.0".parse().unwrap(), 16));
        for i in 0..rules {
            let to = Prefix::truncating(std::net::Ipv4Addr::from(0x0a00_0000 + ((i as u32) << 8)).into(), 24);
            b.add_rule(RuleSpec::new(g, vec![to], ProtoMatch::Any, vec![], PolicyAction::Allow));
        }
        let snapshot = b.build(1).unwrap();
        let worker = Arc::new(WorkerStats::default());
        let hits = dataplane::stats::RuleHits::new(1, rules);
        for _ in 0..3 {
            hits.hit(1);
        }
        worker.rule_hits.store(Arc::new(hits));
        let mut state = AdminState::new(vec![worker]);
        state.policy = Some(Arc::new(dataplane::policy::shared(snapshot)));
        Arc::new(state)
    }

    #[test]
    fn per_rule_series_list_every_rule_of_a_small_policy_and_only_used_rules_of_a_large_one() {
        let series =
            |text: &str| text.lines().filter(|l| l.starts_with("egressd_policy_decisions_total{")).count();
        let small = state_with_rules(3).render_metrics();
        assert!(
            small.contains(r#"egressd_policy_decisions_total{group="web",rule="2",action="allow"} 3"#),
            "{small}"
        );
        assert!(
            small.contains(r#"egressd_policy_decisions_total{group="web",rule="1",action="allow"} 0"#),
            "{small}"
        );
        assert_eq!(series(&small), 3);

        let large = state_with_rules(PER_RULE_SERIES_FOR_EVERY_RULE_UP_TO + 1).render_metrics();
        assert!(
            large.contains(r#"egressd_policy_decisions_total{group="web",rule="2",action="allow"} 3"#),
            "{large}"
        );
        assert_eq!(series(&large), 1, "only the rule that decided something");
    }

    #[test]
    fn endpoints_answer_over_http() {
        let mut state = AdminState::new(vec![Arc::new(WorkerStats::default())]);
        state.reload = Some(Box::new(|| Err("conf.toml:3:7: bad CIDR".into())));
        let state = Arc::new(state);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        spawn(addr, Arc::clone(&state)).unwrap();

        assert_eq!(http_request(addr, "GET", "/healthz").unwrap().0, 200);
        assert_eq!(http_request(addr, "GET", "/readyz").unwrap().0, 503);
        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(http_request(addr, "GET", "/readyz").unwrap().0, 200);

        let (status, body) = http_request(addr, "POST", "/reload").unwrap();
        assert_eq!(status, 422);
        assert!(body.contains("conf.toml:3:7"));
        assert_eq!(state.reloads_failed.load(Ordering::Relaxed), 1);

        let (status, body) = http_request(addr, "GET", "/metrics").unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("egressd_reloads_total{result=\"failed\"} 1"), "{body}");
        assert!(body.contains("\negressd_last_reload_success 0\n"), "{body}");
        assert!(body.contains("\negressd_ready 1\n"), "{body}");
        assert!(body.contains("egressd_worker_loops_total{worker=\"0\"} 0\n"), "{body}");
        assert!(!body.contains("egressd_nat_flows_max"), "not exported while unknown: {body}");
        assert!(!body.contains("\negressd_last_reload_timestamp_seconds 0\n"), "{body}");
        assert_eq!(http_request(addr, "GET", "/nope").unwrap().0, 404);

        state.stopping.store(true, Ordering::Relaxed);
        assert!(http_request(addr, "GET", "/metrics").unwrap().1.contains("\negressd_ready 0\n"));
        assert_eq!(http_request(addr, "GET", "/healthz").unwrap().0, 503);
        assert_eq!(http_request(addr, "GET", "/readyz").unwrap().0, 503);
    }

    /// With remote control on, a control request needs the bearer token; metrics stay readable without it.
    #[test]
    fn control_requests_need_the_token_when_remote_control_is_on() {
        let mut state = AdminState::new(vec![Arc::new(WorkerStats::default())]);
        state.reload = Some(Box::new(|| Ok("policy generation 2 loaded".into())));
        state.control = ControlPolicy::Token("0123456789abcdef-secret".into());
        let state = Arc::new(state);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        spawn(addr, Arc::clone(&state)).unwrap();
        assert_eq!(http_request(addr, "POST", "/reload").unwrap().0, 403);
        assert_eq!(http_request_with(addr, "POST", "/reload", Some("wrong")).unwrap().0, 403);
        assert_eq!(state.reloads_ok.load(Ordering::Relaxed), 0, "refused requests do not reload");
        let (status, body) =
            http_request_with(addr, "POST", "/reload", Some("0123456789abcdef-secret")).unwrap();
        assert_eq!((status, body.trim()), (200, "policy generation 2 loaded"));
        assert_eq!(http_request(addr, "GET", "/metrics").unwrap().0, 200);
    }

    #[test]
    fn the_default_control_policy_accepts_loopback_peers_only() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert!(ControlPolicy::LoopbackOnly.allows(Some(&local), &[]));
        assert!(!ControlPolicy::LoopbackOnly.allows(Some(&remote), &[]));
        assert!(!ControlPolicy::LoopbackOnly.allows(None, &[]));
    }
}
