//! `egressd run`: brings the gateway up, keeps its control-plane state fresh, and takes it down cleanly.
//!
//! Start-up, in order (any failure undoes what was done and exits non-zero with the reason):
//! 1. read the kernel's routes and neighbours for both interfaces ([`crate::fib`]);
//! 2. compile the policy;
//! 3. per worker `i`: open an AF_XDP port on queue `i` of the inside and of the outside interface;
//! 4. attach egressd's XDP program to both interfaces (it passes ARP and the node's own traffic to the kernel)
//!    and steer each queue to its port;
//! 5. start the workers, pinned one per configured core, then the admin endpoint; mark ready.
//!
//! The main thread then runs the control loop: publish a new next-hop snapshot when the kernel's tables change,
//! ask the kernel to resolve next hops the workers missed, reload the policy on SIGHUP, and stop on
//! SIGINT/SIGTERM: `/healthz` turns 503, the XDP programs are detached first (new frames go back to the
//! kernel), the workers finish their burst and exit, and their sockets and UMEMs are freed as they drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use dataplane::audit::{AuditEvent, AuditQueue};
use dataplane::drop::DropReason;
use dataplane::handoff::Handoffs;
use dataplane::l7::punt::Punt;
use dataplane::nat::{NatLogQueue, NatLogRecord};
use dataplane::nexthop::{NextHopTable, ResolveQueue};
use dataplane::pipeline::{NextHops, Pipeline};
use dataplane::policy::{PolicySnapshot, Verdict};
use dataplane::stats::WorkerStats;
use dataplane::worker::{IdleMode, Worker, WorkerConfig};
use dataplane::xsk::xdp::{XdpModeChoice, XdpProgram};
use dataplane::xsk::{Port, PortConfig};

use crate::admin::{self, AdminState};
use crate::config::dataplane::{IdleMode as IdleConfig, XdpMode};
use crate::config::Loaded;
use crate::fib::{self, Fib};
use crate::policy::PolicyReloader;

/// Frames each worker's handoff queue holds (replies that arrived on another worker's queue).
const HANDOFF_QUEUE_FRAMES: usize = 1024;
/// Denials waiting for the control thread to write them to the audit log.
const AUDIT_QUEUE_EVENTS: usize = 4096;
/// Translation log records waiting for the control thread (it drains them every tick).
const NAT_LOG_QUEUE_RECORDS: usize = 65536;
/// Packets on their way to and from the L7 thread, each way (2 KiB each).
const L7_QUEUE_PACKETS: usize = 4096;
/// How often the interfaces' MTUs and the XDP programs' counters are read.
const INTERFACE_REFRESH: Duration = Duration::from_millis(250);
/// The routing tables are re-read when the kernel says they changed, and this often besides (a notification can
/// be lost when the socket's buffer overflows; the overflow itself also triggers a re-read).
const FIB_SAFETY_REFRESH: Duration = Duration::from_secs(10);
/// Without change notifications, the routing tables are re-read this often.
const FIB_POLL: Duration = Duration::from_millis(250);
/// How long the control loop sleeps between checks of signals and resolution requests.
const CONTROL_TICK: Duration = Duration::from_millis(20);

/// Everything `run` needs besides the parsed configuration.
#[derive(Debug)]
pub struct RunOptions {
    pub config_path: PathBuf,
}

/// Runs the gateway until SIGINT or SIGTERM.
pub fn run(loaded: Loaded, options: RunOptions) -> anyhow::Result<()> {
    let config = &loaded.config;
    let dp = &config.dataplane;
    let inside = dp.inside.get_ref().clone();
    let outside = dp.outside.get_ref().clone();

    let stop_requested = Arc::new(AtomicBool::new(false));
    let reload_requested = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop_requested.clone()).context("installing signal handlers")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload_requested.clone())
        .context("installing signal handlers")?;

    let egress_ips = egress_ips(&loaded);
    let fib = Fib::new(&inside, &outside);
    let (table, mut routing_warnings) =
        fib.read(&egress_ips).context("reading the kernel's routes and neighbours")?;
    for warning in &routing_warnings {
        tracing::warn!("{warning}");
    }
    // The kernel says when its routes, rules, neighbours or links change; without the subscription, poll.
    let mut route_events = match fib::netlink::RouteEvents::subscribe() {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to routing changes; re-reading the tables every 250 ms");
            None
        }
    };
    // A frame longer than a UMEM frame holds is dropped by the kernel with no word to egressd: refuse to start.
    let frame_size = dp.frame_size();
    let mut mtus = Vec::with_capacity(2);
    for interface in [&inside, &outside] {
        let mtu = fib::interface_mtu(interface)?;
        fib::check_mtu(interface, mtu, frame_size).map_err(anyhow::Error::msg)?;
        mtus.push((interface.clone(), std::sync::atomic::AtomicU32::new(mtu)));
    }
    // Resolve the routers now rather than dropping the first packets that need them.
    resolve_gateways(&table, &inside, &outside);
    let next_hops =
        NextHops { table: Arc::new(ArcSwap::from_pointee(table)), resolve: Arc::new(ResolveQueue::new(256)) };

    // `to_hosts` names: resolved before the first policy is compiled (up to 3 s), then followed.
    let l7_settings = config.l7.settings();
    let dns_names = crate::policy::dns_names(config);
    let fqdn = match l7_settings.resolver.or_else(crate::l7::dns::system_resolver) {
        Some(server) => Some(
            crate::fqdn::FqdnWatcher::start(
                dns_names,
                server,
                l7_settings.dns_min_ttl_secs,
                l7_settings.dns_max_ttl_secs,
                Duration::from_secs(3),
            )
            .context("starting the to_hosts resolver")?,
        ),
        None if !dns_names.is_empty() => {
            anyhow::bail!("rules with to_hosts need a DNS server: set [l7] resolver (no nameserver in /etc/resolv.conf)")
        }
        None => None,
    };
    let first_answers = fqdn
        .as_ref()
        .map(|w| w.shared.take_changed().unwrap_or_else(|| w.shared.answers()))
        .unwrap_or_default();
    let reloader = Arc::new(PolicyReloader::running(crate::policy::restart_only_settings(config)));
    *reloader.fqdn.lock().unwrap_or_else(|e| e.into_inner()) = fqdn.as_ref().map(|w| w.shared.clone());
    let snapshot =
        reloader.start(config, first_answers).map_err(|e| anyhow::anyhow!("compiling the policy: {e}"))?;
    let policy = Arc::new(ArcSwap::from_pointee(snapshot));

    // The L7 path runs when the policy has an `l7` rule at start: its upstream ports are then reserved.
    let l7_active = l7_active(config);
    let (first, last) = l7_settings.upstream_ports;
    let l7_upstream: Vec<(Ipv4Addr, u16, u16)> =
        if l7_active { egress_ips.iter().map(|ip| (*ip, first, last)).collect() } else { Vec::new() };
    let node_addrs = fib::node_addresses(&egress_ips).context("listing the node's addresses")?;
    tracing::info!(
        ?egress_ips,
        ?node_addrs,
        "addresses: egress IPs are egressd's, node addresses stay with the kernel"
    );

    let port_config =
        PortConfig { frame_size: dp.frame_size(), ring_size: dp.ring_size(), batch_size: dp.batch_size() };
    let cores = dp.cores();
    let mut ports = Vec::with_capacity(cores.len());
    for queue in 0..cores.len() as u32 {
        let inside_port = Port::open(&inside, queue, port_config)?;
        let outside_port = Port::open(&outside, queue, port_config)?;
        tracing::info!(
            queue,
            inside = inside_port.bind_mode().as_str(),
            outside = outside_port.bind_mode().as_str(),
            tx_per_syscall = inside_port.tx_per_kick().min(outside_port.tx_per_kick()),
            "AF_XDP sockets bound"
        );
        ports.push((inside_port, outside_port));
    }

    let mode = match dp.xdp_mode {
        XdpMode::Auto => XdpModeChoice::Auto,
        XdpMode::Native => XdpModeChoice::Native,
        XdpMode::Skb => XdpModeChoice::Skb,
    };
    let mut programs = Vec::with_capacity(2);
    for interface in [&inside, &outside] {
        let program = XdpProgram::attach(interface, mode, &node_addrs, &l7_upstream)?;
        tracing::info!(interface = %interface, mode = program.mode().as_str(), "XDP program attached");
        programs.push(program);
    }
    for (inside_port, outside_port) in &ports {
        programs[0].register(inside_port)?;
        programs[1].register(outside_port)?;
    }

    let workers_count = cores.len() as u16;
    let mut nat_config = config.nat.to_engine(workers_count);
    if l7_active {
        nat_config.reserved_tcp_ports = Some(l7_settings.upstream_ports);
    }
    let punt = if l7_active {
        Some(Punt::new(cores.len(), L7_QUEUE_PACKETS).context("making the L7 path's queues")?)
    } else {
        None
    };
    let handoffs = Arc::new(Handoffs::new(cores.len(), HANDOFF_QUEUE_FRAMES));
    let audit = Arc::new(AuditQueue::new(AUDIT_QUEUE_EVENTS));
    let nat_log = Arc::new(NatLogQueue::new(NAT_LOG_QUEUE_RECORDS));
    let flow_queries = Arc::new(dataplane::nat::flows::FlowQueries::new(cores.len()));
    tracing::info!(
        max_flows_per_worker = nat_config.max_flows,
        udp_timeout_s = nat_config.timeouts.udp_secs,
        tcp_established_timeout_s = nat_config.timeouts.tcp_established_secs,
        "NAT sized"
    );
    let stop_workers = Arc::new(AtomicBool::new(false));
    let mut stats = Vec::with_capacity(cores.len());
    let mut workers = Vec::with_capacity(cores.len());
    for (i, ((inside_port, outside_port), core)) in ports.into_iter().zip(cores.iter().copied()).enumerate() {
        let worker_stats = Arc::new(WorkerStats::default());
        stats.push(worker_stats.clone());
        let worker = Worker {
            config: WorkerConfig {
                core: Some(core),
                idle: match dp.idle {
                    IdleConfig::Busy => IdleMode::Busy,
                    IdleConfig::Adaptive => IdleMode::Adaptive,
                },
                idle_spin: dp.idle_spin(),
                ..WorkerConfig::default()
            },
            inside: inside_port,
            outside: outside_port,
            pipeline: Pipeline::new(
                worker_stats,
                next_hops.clone(),
                policy.clone(),
                &nat_config,
                i as u16,
                handoffs.clone(),
            )
            .with_audit(audit.clone())
            .with_flow_queries(flow_queries.clone())
            .with_nat_log(config.nat.log_mode(), config.nat.log_rate(), nat_log.clone())
            .with_l7_if(punt.clone())
            .with_mss_clamp(dp.clamp_mss)
            .with_source_validation(dp.source_validation.unwrap_or(true)),
            stop: stop_workers.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("egressd-w{i}"))
            .spawn(move || worker.run())
            .context("starting a worker thread")?;
        tracing::info!(worker = i, core, "worker started");
        workers.push(handle);
    }

    let l7_stats = Arc::new(crate::l7::L7Stats::default());
    let resolver = l7_settings
        .verify_destination
        .then(|| l7_settings.resolver.or_else(crate::l7::dns::system_resolver))
        .flatten();
    if l7_settings.verify_destination && resolver.is_none() {
        anyhow::bail!(
            "[l7] verify_destination = \"dns\" needs a DNS server: set [l7] resolver, or a nameserver in /etc/resolv.conf"
        );
    }
    let l7_thread = match &punt {
        Some(punt) => {
            let inside_mtu = mtus.first().map_or(1500, |(_, m)| m.load(Ordering::Relaxed) as usize);
            let handle = crate::l7::L7Thread {
                punt: punt.clone(),
                policy: policy.clone(),
                settings: l7_settings,
                stats: l7_stats.clone(),
                stop: stop_workers.clone(),
                egress_ips: egress_ips.clone(),
                mtu: inside_mtu,
                resolver,
                idle_spin: dp.idle_spin(),
            }
            .spawn()
            .context("starting the L7 thread")?;
            tracing::info!(upstream_ports = ?l7_settings.upstream_ports, "L7 path started");
            Some(handle)
        }
        None => None,
    };

    let mut admin_state = AdminState::new(stats);
    admin_state.l7 = punt.clone().map(|p| (l7_stats.clone(), p));
    admin_state.control = admin::control_policy(&config.admin)?;
    admin_state.policy = Some(policy.clone());
    admin_state.fqdn = fqdn.as_ref().map(|w| w.shared.clone());
    admin_state.flows = Some(flow_queries);
    admin_state.interface_mtu = mtus;
    admin_state.largest_mtu = dataplane::xsk::largest_mtu(frame_size);
    admin_state.max_flows = u64::from(nat_config.max_flows) * u64::from(workers_count);
    {
        let reloader = reloader.clone();
        let policy = policy.clone();
        let path = options.config_path.clone();
        admin_state.reload = Some(Box::new(move || {
            reloader
                .reload(&path, &policy)
                .map(|(generation, restart)| {
                    let mut summary = format!("policy generation {generation} loaded");
                    for line in restart {
                        summary.push('\n');
                        summary.push_str(&line);
                    }
                    summary
                })
                .map_err(|errors| errors.to_string())
        }));
    }
    let admin_state = Arc::new(admin_state);
    admin::spawn(config.admin.listen(), admin_state.clone())?;
    admin_state.ready.store(true, Ordering::Relaxed);
    tracing::info!(workers = workers.len(), "egressd is forwarding");
    // systemd (Type=notify): ready once the workers poll and the XDP programs are attached.
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let mut watchdog = Watchdog::new(&admin_state);

    let mut last_interface_refresh = Instant::now();
    let mut last_fib_read = Instant::now();
    while !stop_requested.load(Ordering::Relaxed) {
        std::thread::sleep(CONTROL_TICK);
        watchdog.tick(&admin_state);
        if reload_requested.swap(false, Ordering::Relaxed) {
            // Outcome is logged and counted by the reload itself.
            let _ = admin_state.reload();
        }
        if let Some(names) = fqdn.as_ref().and_then(|w| w.shared.take_changed()) {
            reloader.names_changed(names, &policy);
        }
        while let Some(event) = audit.pop() {
            write_audit(&event, &policy.load());
        }
        if let Some(first) = nat_log.pop() {
            let clock = WallClock::now();
            let policy = policy.load();
            for record in std::iter::once(first).chain(std::iter::from_fn(|| nat_log.pop())) {
                write_nat_log(&record, &policy, &clock);
            }
        }
        // Frames wait in the workers; the kernel's neighbour notification brings the answer.
        for hop in next_hops.resolve.drain() {
            let interface = if on_link(&next_hops.table.load().inside, hop) { &inside } else { &outside };
            tracing::debug!(%hop, %interface, "asking the kernel to resolve a next hop");
            fib::request_resolution(interface, hop);
        }
        if last_interface_refresh.elapsed() >= INTERFACE_REFRESH {
            last_interface_refresh = Instant::now();
            let mut ipv6 = 0;
            for program in &programs {
                match program.drops() {
                    Ok(drops) => ipv6 += drops.ipv6_unsupported,
                    Err(e) => tracing::warn!(error = %e, "cannot read the XDP program's drop counters"),
                }
            }
            admin_state.xdp_drops[DropReason::Ipv6Unsupported as usize].store(ipv6, Ordering::Relaxed);
            watch_mtus(&admin_state, frame_size);
        }
        let reread = match &mut route_events {
            Some(events) => events.changed() || last_fib_read.elapsed() >= FIB_SAFETY_REFRESH,
            None => last_fib_read.elapsed() >= FIB_POLL,
        };
        if reread {
            last_fib_read = Instant::now();
            match fib.read(&egress_ips) {
                Ok((table, warnings)) => {
                    if warnings != routing_warnings {
                        for warning in warnings.iter().filter(|w| !routing_warnings.contains(w)) {
                            tracing::warn!("{warning}");
                        }
                        routing_warnings = warnings;
                    }
                    resolve_gateways(&table, &inside, &outside);
                    if table != **next_hops.table.load() {
                        tracing::debug!(
                            routes_by_source = table.routes_by_source(),
                            "next-hop table changed"
                        );
                        next_hops.table.store(Arc::new(table));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot refresh next hops; keeping the last table"),
            }
        }
    }

    tracing::info!("stopping: detaching XDP programs, then stopping workers");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    admin_state.stopping.store(true, Ordering::Relaxed);
    for mut program in programs {
        if let Err(e) = program.detach() {
            tracing::error!(error = %e, "detaching XDP program");
        }
    }
    stop_workers.store(true, Ordering::Relaxed);
    for worker in workers {
        if worker.join().is_err() {
            anyhow::bail!("a worker thread panicked");
        }
    }
    if let Some(l7) = l7_thread {
        if l7.join().is_err() {
            anyhow::bail!("the L7 thread panicked");
        }
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Re-reads the interfaces' MTUs: a change that makes frames too long for the UMEM is logged as an error (and shows
/// in `egressd_interface_mtu_too_large`), since the kernel then drops those frames without a word.
fn watch_mtus(admin_state: &AdminState, frame_size: u32) {
    for (interface, last) in &admin_state.interface_mtu {
        let Ok(mtu) = fib::interface_mtu(interface) else { continue };
        if last.swap(mtu, Ordering::Relaxed) == mtu {
            continue;
        }
        match fib::check_mtu(interface, mtu, frame_size) {
            Ok(()) => tracing::info!(%interface, mtu, "interface MTU changed"),
            Err(e) => tracing::error!(%interface, mtu, "{e}"),
        }
    }
}

/// Tells systemd about the gateway's state when it runs under `Type=notify` (nothing otherwise).
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// systemd's watchdog (`WatchdogSec=`): fed from the control loop, and only while every worker makes progress
/// (its loop counter moves: a worker iterates at least every `idle_timeout_ms`, traffic or not), so a stuck worker
/// gets the gateway restarted.
struct Watchdog {
    interval: Option<Duration>,
    last_ping: Instant,
    last_loops: Vec<u64>,
    /// Whether the last check found a worker that made no progress (logged once per stall).
    stalled: bool,
}

impl Watchdog {
    fn new(state: &AdminState) -> Watchdog {
        let interval = sd_notify::watchdog_enabled().map(|d| d / 2);
        if let Some(d) = interval {
            tracing::info!(ping_every_ms = d.as_millis() as u64, "systemd watchdog enabled");
        }
        let last_loops = state.workers.iter().map(|w| w.loops.get()).collect();
        Watchdog { interval, last_ping: Instant::now(), last_loops, stalled: false }
    }

    fn tick(&mut self, state: &AdminState) {
        let Some(interval) = self.interval else { return };
        if self.last_ping.elapsed() < interval {
            return;
        }
        let loops: Vec<u64> = state.workers.iter().map(|w| w.loops.get()).collect();
        let all_moved = loops.iter().zip(&self.last_loops).all(|(now, before)| now != before);
        if all_moved {
            notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            self.last_ping = Instant::now();
            self.last_loops = loops;
            self.stalled = false;
        } else if !self.stalled {
            tracing::error!("a worker made no progress: not feeding the systemd watchdog");
            self.stalled = true;
        }
    }
}

/// Whether the policy has an `l7` rule (then the L7 path runs).
pub fn l7_active(config: &crate::config::Config) -> bool {
    config
        .rule
        .iter()
        .any(|r| matches!(r.get_ref().action.get_ref(), crate::config::policy::ActionConfig::L7))
}

/// The addresses whose traffic belongs to egressd: `[dataplane] egress_ips` and every group's egress IPs.
pub fn egress_ips(loaded: &Loaded) -> Vec<Ipv4Addr> {
    let mut ips = loaded.config.dataplane.egress_ips();
    for group in &loaded.config.group {
        ips.extend(group.egress_ips.iter().filter_map(|ip| ip.get_ref().parse::<Ipv4Addr>().ok()));
    }
    ips.sort();
    ips.dedup();
    ips
}

/// Asks the kernel to resolve every route gateway of both interfaces that has no neighbour entry yet.
fn resolve_gateways(table: &NextHopTable, inside: &str, outside: &str) {
    let by_source = table.outside_from.iter().map(|(_, t)| (t, outside));
    for (side, interface) in [(&table.inside, inside), (&table.outside, outside)].into_iter().chain(by_source)
    {
        for gateway in side.unresolved_gateways() {
            fib::request_resolution(interface, gateway);
        }
    }
}

/// Whether `hop` lies in one of the interface's connected (on-link) prefixes.
fn on_link(table: &dataplane::nexthop::InterfaceTable, hop: Ipv4Addr) -> bool {
    table.routes().iter().any(|r| {
        let mask = u32::MAX.checked_shl(32 - u32::from(r.prefix_len.min(32))).unwrap_or(0);
        r.gateway.is_none() && u32::from(hop) & mask == u32::from(r.destination) & mask
    })
}

/// How a rule is named in audit lines: its `name`, else its position among the `[[rule]]` tables (from 1). The
/// name is only known for the policy generation that decided.
fn rule_label(policy: &PolicySnapshot, generation: u64, rule: dataplane::policy::RuleId) -> Option<String> {
    let named = (policy.generation() == generation).then(|| policy.rule(rule)).flatten();
    Some(named.and_then(|r| r.name.clone()).unwrap_or_else(|| (rule.0 + 1).to_string()))
}

/// Converts the engine's monotonic seconds to wall-clock time.
struct WallClock {
    wall: std::time::SystemTime,
    monotonic_secs: u64,
}

impl WallClock {
    fn now() -> WallClock {
        WallClock {
            wall: std::time::SystemTime::now(),
            monotonic_secs: dataplane::time::Instant::monotonic().as_nanos() / 1_000_000_000,
        }
    }

    fn at(&self, monotonic_secs: u32) -> String {
        let ago = self.monotonic_secs.saturating_sub(u64::from(monotonic_secs));
        let when = self.wall.checked_sub(std::time::Duration::from_secs(ago)).unwrap_or(self.wall);
        humantime::format_rfc3339_seconds(when).to_string()
    }
}

/// One translation log line per record (target `egressd::nat`; a JSON object with `--log-format json`).
fn write_nat_log(record: &NatLogRecord, policy: &PolicySnapshot, clock: &WallClock) {
    let proto = match record.proto {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        _ => "other",
    };
    let current = policy.generation() as u32 == record.generation;
    let group =
        record.group.filter(|_| current).map(|g| policy.group_name(g).to_string()).unwrap_or_default();
    let rule = record
        .rule
        .and_then(|r| rule_label(policy, policy.generation(), r).filter(|_| current))
        .unwrap_or_default();
    let start = clock.at(record.started_secs);
    match record.end {
        None => tracing::info!(
            target: "egressd::nat",
            event = "created",
            proto,
            inside = %record.inside,
            egress = %record.egress,
            remote = %record.remote,
            group,
            rule,
            start,
            worker = record.worker,
            "nat mapping created"
        ),
        Some(end) => tracing::info!(
            target: "egressd::nat",
            event = "closed",
            proto,
            inside = %record.inside,
            egress = %record.egress,
            remote = %record.remote,
            group,
            rule,
            start,
            end = clock.at(record.ended_secs),
            packets_out = record.packets_out,
            packets_in = record.packets_in,
            bytes_out = record.bytes_out,
            bytes_in = record.bytes_in,
            reason = end.as_str(),
            worker = record.worker,
            "nat flow closed"
        ),
    }
}

/// One audit line per reported denial (target `egressd::audit`; a JSON object with `--log-format json`).
fn write_audit(event: &AuditEvent, policy: &PolicySnapshot) {
    let proto = match event.proto {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        _ => "other",
    };
    let verdict = match event.verdict {
        Verdict::Deny(reason) => reason.drop_reason().as_str(),
        Verdict::Allow => "allow",
        Verdict::L7 => "l7",
    };
    // Group names are only meaningful for the generation that decided.
    let group = event
        .group
        .filter(|_| policy.generation() == event.generation)
        .map(|g| policy.group_name(g).to_string())
        .unwrap_or_default();
    tracing::info!(
        target: "egressd::audit",
        src = %event.src,
        dst = %event.dst,
        proto,
        dst_port = event.dst_port,
        group,
        rule = event.rule.and_then(|r| rule_label(policy, event.generation, r)).unwrap_or_default(),
        verdict,
        dry_run = event.dry_run,
        policy_generation = event.generation,
        worker = event.worker,
        "flow denied"
    );
}
