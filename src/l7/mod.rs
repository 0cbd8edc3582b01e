//! The L7 path's thread: drives the client-side TCP endpoints (`dataplane::l7::stack`), the per-connection
//! engine (`dataplane::l7::Connection`) and the upstream connections (kernel TCP sockets bound to the group's
//! egress IP and a port of `[l7] upstream_ports`, which the NAT never allocates and the XDP program leaves to the
//! kernel: the kernel brings SACK, congestion control and path-MTU discovery towards the internet).
//!
//! One thread, one mio poll: packets punted by the workers wake it; upstream sockets are edge-triggered; every
//! 50 ms it visits every connection for deadlines, idle timeouts and smoltcp's retransmissions. Like the workers
//! it keeps polling (yielding the core between empty polls) for `[dataplane] idle_spin_us` after its last work
//! before it sleeps, so that the packets of one exchange do not each pay a wake-up. It never blocks a worker: its
//! queues are bounded both ways and full ones drop (TCP retransmits).
//!
//! Per connection: the engine judges the client's bytes; once it wants upstream, the thread connects (connect
//! timeout → the client is reset), replays what the engine judged, and relays the upstream's bytes to the client
//! untouched. Refusals go to the client as the engine wrote them (a TLS alert, a 403), then FIN. Half-closes pass
//! both ways. At the end one access line (target `egressd::l7`) and, for a refusal, one audit line.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::l7::balance::Balancer;
use dataplane::l7::punt::{Punt, PuntedPacket};
use dataplane::l7::ratelimit::RateLimiter;
use dataplane::l7::stack::{ClientStack, FourTuple, StackDrop, StackLimits};
use dataplane::l7::{Connection, L7Limits, Protocol, UpstreamRoute};
use dataplane::policy::l7::UpstreamTls;
use dataplane::policy::service::{RetryOn, ServiceId};
use dataplane::policy::{PolicySnapshot, RuleId, SharedPolicy};
use dataplane::time::Instant;
use dataplane::wire::response::ResponseEvent;
// Keys come from clients (addresses, ports): seeded foldhash, much faster than SipHash.
use foldhash::HashMap;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::l7::L7Settings;

pub mod dns;
pub mod origination;

use origination::Upstream;

const DNS: Token = Token(usize::MAX);

const WAKE: Token = Token(0);
/// How often every connection is visited for its timers.
const SWEEP_NANOS: u64 = 50_000_000;
/// Punted packets taken per loop iteration before the sockets get a turn.
const PUNT_BURST: usize = 1024;

/// The driver's [`Upstreams`], borrowed field by field (so a connection of `conns` can be held beside it).
macro_rules! upstreams {
    ($driver:ident) => {
        Upstreams {
            poll: &$driver.poll,
            tokens: &mut $driver.tokens,
            ports: &mut $driver.ports,
            rule_counts: &mut $driver.upstream_counts,
            service_connections: &mut $driver.service_connections,
            balancer: &mut $driver.balancer,
            pools: &mut $driver.pools,
            pool_closed: &$driver.t.stats.pool_closed,
        }
    };
}

/// Counters the admin endpoint exports.
#[derive(Debug)]
pub struct L7Stats {
    pub open: AtomicU64,
    /// Seconds from a connection's first packet to the decision on its first bytes (allowed or refused).
    pub decision_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Connections by what they are doing now (recomputed every sweep).
    pub classifying: AtomicU64,
    pub verifying: AtomicU64,
    pub relaying: AtomicU64,
    pub closing: AtomicU64,
    pub accepted: AtomicU64,
    pub allowed: AtomicU64,
    /// Refused connections (or requests), by reason.
    pub refused: Mutex<BTreeMap<&'static str, u64>>,
    pub upstream_failed: AtomicU64,
    pub over_limit: AtomicU64,
    pub over_source_limit: AtomicU64,
    pub stray_packets: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Service endpoints that failed (connect failure, 5xx first response).
    pub endpoint_failures: AtomicU64,
    /// Outlier ejections since start, and endpoints ejected now.
    pub ejections: AtomicU64,
    pub ejected_endpoints: AtomicU64,
    /// Upstream connections of services taken from the pool, closed there (idle too long, closed by the server or
    /// written to while idle: found by the sweep or when a client would have taken it), and idle in it now.
    pub pool_reused: AtomicU64,
    pub pool_closed: AtomicU64,
    pub pool_idle: AtomicU64,
    /// Requests sent again after a failed attempt.
    pub retries: AtomicU64,
}

impl Default for L7Stats {
    fn default() -> Self {
        let buckets = [0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];
        L7Stats {
            open: AtomicU64::new(0),
            decision_seconds: prometheus_client::metrics::histogram::Histogram::new(buckets),
            classifying: AtomicU64::new(0),
            verifying: AtomicU64::new(0),
            relaying: AtomicU64::new(0),
            closing: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            refused: Mutex::new(BTreeMap::new()),
            upstream_failed: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            over_source_limit: AtomicU64::new(0),
            stray_packets: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            endpoint_failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ejected_endpoints: AtomicU64::new(0),
            pool_reused: AtomicU64::new(0),
            pool_closed: AtomicU64::new(0),
            pool_idle: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }
}

/// Everything the thread needs.
pub struct L7Thread {
    pub punt: Arc<Punt>,
    pub policy: Arc<SharedPolicy>,
    pub settings: L7Settings,
    pub stats: Arc<L7Stats>,
    pub stop: Arc<AtomicBool>,
    /// Egress IPs the upstream connections may leave from.
    pub egress_ips: Vec<Ipv4Addr>,
    /// Largest packet sent to clients (the inside MTU).
    pub mtu: usize,
    /// With `verify_destination = "dns"`: the DNS server to ask.
    pub resolver: Option<std::net::SocketAddr>,
    /// How long the thread keeps polling after its last work before it sleeps (`[dataplane] idle_spin_us`).
    pub idle_spin: Duration,
}

/// Where a connection's upstream goes.
struct Target {
    server: SocketAddrV4,
    /// TLS to originate, and the key of its cached client configuration.
    tls: Option<UpstreamTls>,
    tls_key: (u32, u32, u32),
    /// The server name for TLS when the settings name none: the first request's Host.
    host: String,
    service: Option<ServiceTarget>,
    /// From a request sent to the last byte of its answer (a service route's `request_timeout_secs`).
    request_timeout_nanos: Option<u64>,
    /// A service's own connect timeout (else `[l7] connect_timeout`).
    connect_timeout_secs: Option<u64>,
}

/// A connection routed to a service: which one, and the endpoints tried.
struct ServiceTarget {
    id: ServiceId,
    name: String,
    route: String,
    subset: Option<usize>,
    subset_name: String,
    tried: Vec<SocketAddrV4>,
    attempts: u32,
    /// Counted in the balancer's in-flight connections.
    opened: bool,
    /// Counted in the service's upstream connections (`max_connections`).
    counted: bool,
    /// Waiting for one of the service's `max_connections` since then (counted in its waiting connections).
    waiting_since: Option<Instant>,
    /// Retries of the request upstream, and the service's policy for them.
    retries_done: u32,
    retries: u32,
    retry_on: RetryOn,
    /// Requests the upstream connection carried before this client had it (taken from the pool), and the
    /// client's requests when it got it.
    requests_before: u32,
    requests_at_attach: u32,
}

struct Conn {
    engine: Connection,
    worker: u16,
    egress: Ipv4Addr,
    started: Instant,
    last_activity: Instant,
    upstream: Option<Upstream>,
    token: Option<Token>,
    local_port: Option<u16>,
    connect_started: Instant,
    connected: bool,
    upstream_failed: bool,
    upstream_eof: bool,
    upstream_write_shut: bool,
    client_closed: bool,
    /// The client's handshake completed (before it, "cannot receive" means "not yet", not "finished").
    client_established: bool,
    bytes_down: u64,
    /// When the upstream's first byte came (for the access line's upstream time).
    first_byte_at: Option<Instant>,
    /// Under TLS origination: whether the handshake completed.
    tls_established: bool,
    /// The upstream socket may have something to read: set by its poll events and when a new one is opened,
    /// cleared only when a read finds it empty (not on a short read: under edge-triggered polling only the
    /// kernel's "would block" proves it drained). A packet from the client then costs no read of an empty socket.
    upstream_readable: bool,
    /// The rule whose upstream connection count this connection's upstream is in.
    counted_rule: Option<u32>,
    /// Where the upstream goes, chosen when the engine first wants it.
    target: Option<Target>,
    /// Bytes went upstream then and nothing came back since (for the request timeout).
    awaiting_since: Option<Instant>,
    /// Upstream connections replaced because a request went to another route.
    reroutes: u32,
    end: &'static str,
    /// The decision on the first bytes was recorded in the histogram.
    decided: bool,
}

impl L7Thread {
    pub fn spawn(self) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        self.punt.set_wake(Box::new(move || {
            let _ = waker.wake();
        }));
        Ok(std::thread::Builder::new().name("egressd-l7".into()).spawn(move || {
            let mut driver = Driver::new(self, poll);
            driver.run();
        })?)
    }
}

struct Driver {
    t: L7Thread,
    poll: Poll,
    stack: ClientStack,
    conns: HashMap<FourTuple, Conn>,
    tokens: HashMap<Token, FourTuple>,
    next_token: usize,
    ports: HashMap<Ipv4Addr, VecDeque<u16>>,
    buf: Vec<u8>,
    limits: L7Limits,
    resolver: Option<dns::Resolver>,
    rate_limits: RateLimiter,
    tls_configs: origination::Configs,
    /// Upstream connections open per rule index (for `max_upstream_connections`).
    upstream_counts: HashMap<u32, u32>,
    balancer: Balancer,
    /// Per service: upstream connections open, and client connections waiting for one (`max_connections`).
    service_connections: HashMap<String, u32>,
    service_waiting: HashMap<String, u32>,
    pools: HashMap<PoolKey, Vec<Pooled>>,
    /// Connections to pump again at once (a service connection moving to its next endpoint).
    again: Vec<FourTuple>,
}

impl Driver {
    fn new(t: L7Thread, poll: Poll) -> Driver {
        let s = t.settings;
        let ports = t
            .egress_ips
            .iter()
            .map(|ip| (*ip, (s.upstream_ports.0..=s.upstream_ports.1).collect()))
            .collect();
        let stack = ClientStack::new(
            StackLimits {
                max_connections: s.max_connections,
                max_per_source: s.max_connections_per_source,
                socket_buffer: s.socket_buffer,
                mtu: t.mtu,
            },
            std::process::id().into(),
        );
        let limits = L7Limits {
            classify_timeout_nanos: s.classify_timeout_secs * 1_000_000_000,
            verify_destination: t.resolver.is_some(),
            ..L7Limits::default()
        };
        let resolver = t.resolver.and_then(|server| {
            let made =
                dns::Resolver::new(server, s.dns_min_ttl_secs, s.dns_max_ttl_secs).and_then(|mut r| {
                    poll.registry().register(&mut r.socket, DNS, Interest::READABLE)?;
                    Ok(r)
                });
            made.map_err(|e| tracing::error!(error = %e, "cannot open the L7 resolver's socket")).ok()
        });
        Driver {
            t,
            poll,
            stack,
            conns: HashMap::default(),
            tokens: HashMap::default(),
            next_token: 1,
            ports,
            buf: vec![0; 64 * 1024],
            limits,
            resolver,
            rate_limits: RateLimiter::new(),
            tls_configs: origination::Configs::default(),
            upstream_counts: HashMap::default(),
            balancer: Balancer::new(),
            service_connections: HashMap::default(),
            service_waiting: HashMap::default(),
            pools: HashMap::default(),
            again: Vec::new(),
        }
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut touched: Vec<FourTuple> = Vec::new();
        let mut resolved: Vec<(FourTuple, Vec<Ipv4Addr>)> = Vec::new();
        let mut last_sweep = Instant::ZERO;
        // When the thread last had a packet, a connection to visit or a poll event.
        let mut last_busy = Instant::ZERO;
        while !self.t.stop.load(Ordering::Relaxed) {
            let now = Instant::monotonic();
            let mut taken = 0;
            while taken < PUNT_BURST {
                let Some(p) = self.t.punt.pop_for_l7() else { break };
                taken += 1;
                if let Some(key) = self.on_punted(now, &p) {
                    touched.push(key);
                }
            }
            touched.append(&mut self.again);
            let busy = taken > 0 || !touched.is_empty();
            if busy {
                last_busy = now;
            }
            let spinning = now.saturating_since(last_busy) < self.t.idle_spin;
            let wait = if !busy && !spinning && self.t.punt.park() {
                Some(Duration::from_millis(10))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, wait) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "L7 poll failed");
                }
            }
            self.t.punt.unpark();
            let now = Instant::monotonic();
            if !events.is_empty() {
                last_busy = now;
            } else if !busy && spinning {
                std::thread::yield_now();
            }
            for event in events.iter() {
                if event.token() == DNS {
                    if let Some(r) = self.resolver.as_mut() {
                        r.on_readable(now, &mut resolved);
                    }
                } else if let Some(key) = self.tokens.get(&event.token()) {
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        if let Some(conn) = self.conns.get_mut(key) {
                            conn.upstream_readable = true;
                        }
                    }
                    touched.push(*key);
                }
            }
            if now.as_nanos().saturating_sub(last_sweep.as_nanos()) >= SWEEP_NANOS {
                last_sweep = now;
                touched.extend(self.conns.keys().copied());
                self.count_states();
                let ejected = self.balancer.ejected_count(now) as u64;
                self.t.stats.ejected_endpoints.store(ejected, Ordering::Relaxed);
                let policy = self.t.policy.load_full();
                let mut upstreams = upstreams!(self);
                upstreams.sweep_pools(now, &policy, &mut self.buf);
                let idle = self.pools.values().map(Vec::len).sum::<usize>() as u64;
                self.t.stats.pool_idle.store(idle, Ordering::Relaxed);
                if let Some(r) = self.resolver.as_mut() {
                    r.on_tick(now, &mut resolved);
                }
            }
            let policy = self.t.policy.load_full();
            for (key, answers) in resolved.drain(..) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.engine.on_resolved(&answers, *key.server.ip(), &policy);
                    touched.push(key);
                }
            }
            // Once per connection per round, however many of its packets and events came (a download's ACKs would
            // otherwise pump the same connection once each).
            touched.sort_unstable_by_key(|k| {
                (u32::from(*k.client.ip()), k.client.port(), u32::from(*k.server.ip()), k.server.port())
            });
            touched.dedup();
            for key in touched.drain(..) {
                self.pump(now, key, &policy);
            }
        }
        for (_, mut conn) in self.conns.drain() {
            if let Some(s) = conn.upstream.as_mut() {
                s.shutdown_both();
            }
        }
    }

    /// A packet from a client: into its endpoint; a new connection gets its engine.
    fn on_punted(&mut self, now: Instant, p: &PuntedPacket) -> Option<FourTuple> {
        let punt = &self.t.punt;
        let worker = p.worker;
        let mut emit = |packet: &[u8]| {
            if let Some(out) = PuntedPacket::new(packet, worker, 0, Ipv4Addr::UNSPECIFIED) {
                punt.to_worker(out);
            }
        };
        match self.stack.on_packet(now, p.packet(), &mut emit) {
            Ok(key) => {
                self.conns.entry(key).or_insert_with(|| {
                    self.t.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    self.t.stats.open.fetch_add(1, Ordering::Relaxed);
                    Conn {
                        engine: Connection::new(now, RuleId(p.rule), self.limits)
                            .with_dialled_port(key.server.port()),
                        worker,
                        egress: p.egress,
                        started: now,
                        last_activity: now,
                        upstream: None,
                        token: None,
                        local_port: None,
                        connect_started: now,
                        connected: false,
                        upstream_failed: false,
                        upstream_eof: false,
                        upstream_write_shut: false,
                        client_closed: false,
                        client_established: false,
                        bytes_down: 0,
                        first_byte_at: None,
                        tls_established: false,
                        upstream_readable: false,
                        counted_rule: None,
                        target: None,
                        awaiting_since: None,
                        reroutes: 0,
                        end: "",
                        decided: false,
                    }
                });
                Some(key)
            }
            Err(StackDrop::TooManyConnections) => {
                self.t.stats.over_limit.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(StackDrop::TooManyFromSource) => {
                self.t.stats.over_source_limit.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.t.stats.stray_packets.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Moves everything that can move on one connection, then lets its endpoint send.
    fn pump(&mut self, now: Instant, key: FourTuple, policy: &PolicySnapshot) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let stack = &mut self.stack;
        let buf = &mut self.buf;
        let settings = self.t.settings;
        conn.engine.on_timeout(now);
        conn.client_established |= stack.is_established(&key);
        // The client sent its FIN (only meaningful once its handshake completed).
        let client_finished = conn.client_established && !stack.client_may_send(&key);

        // Client → engine.
        loop {
            let room = conn.engine.room().min(buf.len());
            if room == 0 {
                break;
            }
            let n = stack.recv(&key, &mut buf[..room]);
            if n == 0 {
                break;
            }
            conn.last_activity = now;
            conn.engine.on_client_data(&buf[..n], policy);
        }
        // What the engine asks before a judged request goes on: its rule's rate limit, then (verify_destination =
        // "dns") that the name resolves to the address the client dialled, then for a service's route the subset
        // (weights split requests, not connections). Answering one may judge the next pipelined request, which
        // asks again.
        loop {
            if let Some(limit) = conn.engine.take_admission() {
                let admitted = self.rate_limits.admit(now, conn.engine.rule(), *key.client.ip(), limit);
                conn.engine.on_admitted(admitted, policy);
                continue;
            }
            if let Some((id, route)) = conn.engine.take_subset_pick() {
                let subset = policy
                    .services()
                    .get(id)
                    .and_then(|service| self.balancer.pick_subset(service, policy.generation(), route));
                conn.engine.on_subset_picked(subset, policy);
                continue;
            }
            if let Some(name) = conn.engine.take_resolution() {
                let answers = match self.resolver.as_mut() {
                    Some(r) => r.lookup(now, &name, key),
                    None => Some(Vec::new()),
                };
                if let Some(answers) = answers {
                    conn.engine.on_resolved(&answers, *key.server.ip(), policy);
                    continue;
                }
            }
            break;
        }

        // A request for another route: once the upstream has answered everything before it (or closed), that
        // connection goes and the request gets one for its route.
        if conn.engine.wants_reroute()
            && (conn.engine.upstream_idle() || conn.upstream_eof || conn.upstream_failed)
        {
            upstreams!(self).park_or_release(now, conn, policy);
            conn.target = None;
            conn.connected = false;
            conn.upstream_eof = false;
            conn.upstream_failed = false;
            conn.upstream_write_shut = false;
            conn.awaiting_since = None;
            conn.reroutes += 1;
            conn.engine.on_rerouted(policy);
        }
        if !conn.decided && (conn.engine.wants_upstream() || conn.engine.summary().refusal.is_some()) {
            conn.decided = true;
            let secs = now.as_nanos().saturating_sub(conn.started.as_nanos()) as f64 / 1e9;
            self.t.stats.decision_seconds.observe(secs);
        }
        // Where the upstream goes: a service's endpoint (the request's route), else the dialled address (under the
        // rule's TLS origination, its upstream port).
        if conn.engine.wants_upstream() && conn.target.is_none() {
            match choose_target(now, &key, &conn.engine, policy, &mut self.balancer) {
                Ok(target) => conn.target = Some(target),
                Err(detail) => conn.engine.on_no_endpoint(&detail),
            }
        }
        // Upstream: connect once the engine wants it, within the rule's connection limit.
        let rule = conn.engine.rule().0;
        let limit =
            policy.l7_conditions(conn.engine.rule()).and_then(|c| c.conditions().max_upstream_connections);
        let held = self.upstream_counts.get(&rule).copied().unwrap_or(0);
        if conn.engine.wants_upstream() && conn.upstream.is_none() && limit.is_some_and(|l| held >= l) {
            conn.engine.on_upstream_busy();
        }
        let mut connect_failure: Option<String> = None;
        let connect_timeout_secs = conn
            .target
            .as_ref()
            .and_then(|t| t.connect_timeout_secs)
            .unwrap_or(settings.connect_timeout_secs);
        let mut wants = conn.engine.wants_upstream() && conn.upstream.is_none() && !conn.upstream_failed;
        // A service at its `max_connections`: wait for one (within `max_pending_requests` and the connect timeout).
        if let (true, Some(Target { service: Some(svc), .. })) = (wants, conn.target.as_mut()) {
            let limits = policy
                .services()
                .get(svc.id)
                .filter(|s| s.name() == svc.name)
                .map(|s| (s.spec().max_connections, s.spec().max_pending_requests));
            let open = self.service_connections.get(&svc.name).copied().unwrap_or(0);
            if let Some((Some(max), pending_cap)) = limits.filter(|(max, _)| max.is_some_and(|m| open >= m)) {
                wants = false;
                let waiting = self.service_waiting.entry(svc.name.clone()).or_default();
                let refusal = match svc.waiting_since {
                    None if pending_cap.is_some_and(|cap| *waiting >= cap) => {
                        Some(format!("{open} of {max} connections open, {waiting} waiting"))
                    }
                    None => {
                        *waiting += 1;
                        svc.waiting_since = Some(now);
                        None
                    }
                    Some(since)
                        if now.as_nanos().saturating_sub(since.as_nanos())
                            > connect_timeout_secs * 1_000_000_000 =>
                    {
                        Some(format!("no connection freed within {connect_timeout_secs} s"))
                    }
                    Some(_) => None,
                };
                if let Some(detail) = refusal {
                    if svc.waiting_since.take().is_some() {
                        *waiting = waiting.saturating_sub(1);
                    }
                    conn.engine.on_upstream_refused(dataplane::l7::Refusal::ServiceOverloaded, &detail);
                }
            } else if svc.waiting_since.take().is_some() {
                if let Some(w) = self.service_waiting.get_mut(&svc.name) {
                    *w = w.saturating_sub(1);
                }
            }
        }
        // An idle upstream connection to the chosen endpoint, kept from an earlier client, is taken first.
        if wants && conn.target.as_ref().is_some_and(|t| t.service.is_some()) {
            let mut upstreams = upstreams!(self);
            if upstreams.take_pooled(conn, key, policy, buf) {
                wants = false;
                conn.connected = true;
                conn.connect_started = now;
                *self.upstream_counts.entry(rule).or_default() += 1;
                conn.counted_rule = Some(rule);
                if let Some(Target { server, service: Some(svc), .. }) = conn.target.as_mut() {
                    *self.service_connections.entry(svc.name.clone()).or_default() += 1;
                    svc.counted = true;
                    self.balancer.on_opened(&svc.name, *server);
                    svc.opened = true;
                }
                conn.engine.on_upstream_connected();
                self.t.stats.pool_reused.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (true, Some(target)) = (wants, conn.target.as_mut()) {
            match connect(&mut self.ports, conn.egress, target.server) {
                Ok((mut stream, port)) => {
                    if let Some(svc) = target.service.as_mut() {
                        *self.service_connections.entry(svc.name.clone()).or_default() += 1;
                        svc.counted = true;
                        svc.requests_before = 0;
                        svc.requests_at_attach = conn.engine.summary().requests_allowed.saturating_sub(1);
                    }
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.tokens.insert(token, key);
                        conn.token = Some(token);
                    }
                    conn.upstream = Some(Upstream::Plain(stream));
                    conn.upstream_readable = true;
                    conn.local_port = Some(port);
                    *self.upstream_counts.entry(rule).or_default() += 1;
                    conn.counted_rule = Some(rule);
                    conn.connect_started = now;
                }
                Err(e) => {
                    tracing::debug!(error = %e, server = %target.server, "upstream connect failed");
                    connect_failure = Some(e.to_string());
                }
            }
        }
        if let (Some(stream), false, Some(target)) =
            (conn.upstream.as_ref(), conn.connected, conn.target.as_mut())
        {
            match stream.tcp().take_error() {
                Ok(Some(e)) | Err(e) => connect_failure = Some(e.to_string()),
                Ok(None) => {
                    if stream.tcp().peer_addr().is_ok() {
                        conn.connected = true;
                        if let Some(service) = target.service.as_mut() {
                            self.balancer.on_opened(&service.name, target.server);
                            service.opened = true;
                        }
                        if let Some(tls) = &target.tls {
                            // TLS on the connected socket, for the configured name or the connection's Host.
                            let name = tls.sni.as_deref().unwrap_or(&target.host);
                            let plain = conn.upstream.take();
                            let started = self
                                .tls_configs
                                .get(policy.generation(), target.tls_key, tls)
                                .and_then(|config| {
                                    plain.map_or(Err("no socket".into()), |p| p.start_tls(config, name))
                                });
                            match started {
                                Ok(upstream) => conn.upstream = Some(upstream),
                                Err(e) => {
                                    conn.engine.on_upstream_tls_failed(&e);
                                    conn.upstream_eof = true;
                                }
                            }
                        }
                        conn.engine.on_upstream_connected();
                    } else if now.as_nanos().saturating_sub(conn.connect_started.as_nanos())
                        > connect_timeout_secs * 1_000_000_000
                    {
                        connect_failure = Some(format!("no answer within {connect_timeout_secs} s"));
                    }
                }
            }
        }
        if let Some(detail) = connect_failure {
            // Nothing was sent: the socket, its port and its places in the counts are given back.
            upstreams!(self).release(conn);
            match conn.target.as_mut() {
                // A service: the endpoint is marked, and the next one tried while attempts remain.
                Some(Target { server, service: Some(svc), .. }) => {
                    self.t.stats.endpoint_failures.fetch_add(1, Ordering::Relaxed);
                    endpoint_failed(now, &mut self.balancer, &self.t.stats, policy, svc, *server, &detail);
                    let next = policy
                        .services()
                        .get(svc.id)
                        .filter(|s| svc.attempts < s.spec().connect_attempts)
                        .and_then(|s| {
                            self.balancer.pick_endpoint(now, s, policy.generation(), svc.subset, &svc.tried)
                        });
                    match next {
                        Some(next) => {
                            tracing::debug!(failed = %server, next = %next, "trying the next endpoint");
                            svc.tried.push(next);
                            svc.attempts += 1;
                            *server = next;
                            self.again.push(key);
                        }
                        None => {
                            let tried: Vec<String> = svc.tried.iter().map(ToString::to_string).collect();
                            conn.engine.on_no_endpoint(&format!("{} ({detail})", tried.join(", ")));
                        }
                    }
                }
                _ => conn.upstream_failed = true,
            }
        }
        if conn.upstream_failed && !conn.client_closed {
            // A refused or unreachable upstream: the client is reset at once, never left hanging.
            stack.abort(&key);
            conn.client_closed = true;
            conn.end = "upstream_failed";
            self.t.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
        }

        // The client finished after every answer, or asked to close and has them all: its upstream connection is
        // kept for the next client (if it may be), instead of being half-closed.
        settle_after_answers(&mut upstreams!(self), stack, now, key, conn, policy, client_finished);
        // Why the request upstream must go again (a retry), if it must.
        let mut retry: Option<String> = None;
        if let (Some(stream), true) = (conn.upstream.as_mut(), conn.connected) {
            // What TLS failed at, before the server said anything: the client gets 502 with the reason.
            let mut tls_failure: Option<String> = None;
            let mut failed = |e: &std::io::Error, stream: &Upstream, bytes_down: u64| {
                if stream.is_tls() && (stream.is_handshaking() || bytes_down == 0) && tls_failure.is_none() {
                    tls_failure = Some(e.to_string());
                }
            };
            if let Err(e) = stream.flush_tls() {
                if e.kind() != ErrorKind::WouldBlock {
                    failed(&e, stream, conn.bytes_down);
                    conn.upstream_eof = true;
                }
            }
            // Engine → upstream (also after the server's FIN: a half-closed server may still read).
            loop {
                let data = conn.engine.to_upstream();
                if data.is_empty() {
                    break;
                }
                match stream.write(data) {
                    Ok(n) => {
                        conn.engine.upstream_sent(n, policy);
                        conn.last_activity = now;
                        if !conn.engine.answer_end_unknown() {
                            // (Bytes of an upgraded connection are not requests: nothing is due for them.)
                            conn.awaiting_since = Some(now);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failed(&e, stream, conn.bytes_down);
                        conn.upstream_eof = true;
                        break;
                    }
                }
            }
            // A failed attempt at a request safe to repeat is retried (see `retry` below), if the service allows.
            let retry_policy = conn
                .target
                .as_ref()
                .and_then(|t| t.service.as_ref())
                .filter(|svc| svc.retries_done < svc.retries)
                .map(|svc| svc.retry_on);
            // Upstream → client, as much as the client's socket takes.
            while !conn.upstream_eof && retry.is_none() && conn.upstream_readable {
                let room = stack.send_room(&key).min(buf.len());
                if room == 0 {
                    break;
                }
                let could_retry = conn.engine.can_retry();
                let reset_retry = retry_policy.is_some_and(|on| on.reset) && could_retry;
                match stream.read(&mut buf[..room]) {
                    Ok(0) if reset_retry => retry = Some("closed before answering".to_string()),
                    Ok(0) => conn.upstream_eof = true,
                    Ok(n) => {
                        // A service endpoint is judged by every response: a 5xx is a failure, anything else a success.
                        let mut statuses = [0u16; 4];
                        let mut seen = 0;
                        conn.engine.on_upstream_data(&buf[..n], &mut |e| {
                            if let (ResponseEvent::Status(code), Some(slot)) = (e, statuses.get_mut(seen)) {
                                *slot = code;
                                seen += 1;
                            }
                        });
                        if let Some(Target { server, service: Some(svc), .. }) = conn.target.as_ref() {
                            for &status in &statuses[..seen] {
                                if status >= 500 {
                                    self.t.stats.endpoint_failures.fetch_add(1, Ordering::Relaxed);
                                    let why = format!("answered {status}");
                                    endpoint_failed(
                                        now,
                                        &mut self.balancer,
                                        &self.t.stats,
                                        policy,
                                        svc,
                                        *server,
                                        &why,
                                    );
                                } else {
                                    self.balancer.on_success(&svc.name, *server);
                                }
                            }
                        }
                        if let (true, Some(on)) = (could_retry, retry_policy) {
                            if let Some(status) = statuses[..seen].iter().find(|s| on.status(**s)) {
                                // Nothing of this answer goes to the client: the request goes again.
                                retry = Some(format!("answered {status}"));
                                break;
                            }
                        }
                        stack.send(&key, &buf[..n]);
                        if conn.engine.upstream_idle() || conn.engine.answer_end_unknown() {
                            // Every answer is whole (or where they end cannot be told): no deadline runs.
                            conn.awaiting_since = None;
                        }
                        conn.bytes_down += n as u64;
                        conn.first_byte_at.get_or_insert(now);
                        conn.last_activity = now;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        conn.upstream_readable = false;
                        break;
                    }
                    Err(e) if reset_retry && !stream.is_handshaking() => retry = Some(e.to_string()),
                    Err(e) => {
                        failed(&e, stream, conn.bytes_down);
                        conn.upstream_eof = true;
                    }
                }
            }
            conn.tls_established |= stream.is_tls() && !stream.is_handshaking();
            if let Some(why) = tls_failure {
                conn.engine.on_upstream_tls_failed(&why);
            }
            // The request timeout, as Envoy's route timeout: from the request going up to the last byte of its
            // answer. Before any of the answer reached the client it gets 504 (or the request goes again); after
            // that no status can follow, and the client is reset. Either way the endpoint counts as failed and the
            // upstream connection is dropped.
            let timeout = conn.target.as_ref().and_then(|t| t.request_timeout_nanos);
            if let (Some(since), Some(limit)) = (conn.awaiting_since, timeout) {
                let timed_out = now.as_nanos().saturating_sub(since.as_nanos()) > limit && !conn.upstream_eof;
                let (answer_started, secs) = (conn.engine.answer_started(), limit / 1_000_000_000);
                // (`can_retry` holds only while nothing of the answer has come.)
                if timed_out
                    && retry.is_none()
                    && retry_policy.is_some_and(|on| on.reset)
                    && conn.engine.can_retry()
                {
                    retry = Some(format!("no answer within {secs} s"));
                } else if timed_out && retry.is_none() {
                    let detail = if answer_started {
                        format!("answer not complete within {secs} s")
                    } else {
                        format!("no answer within {secs} s")
                    };
                    if let Some(Target { server, service: Some(svc), .. }) = conn.target.as_ref() {
                        self.t.stats.endpoint_failures.fetch_add(1, Ordering::Relaxed);
                        endpoint_failed(
                            now,
                            &mut self.balancer,
                            &self.t.stats,
                            policy,
                            svc,
                            *server,
                            &detail,
                        );
                    }
                    if answer_started {
                        conn.engine.on_answer_cut(&detail);
                        if !conn.client_closed {
                            stack.abort(&key);
                            conn.client_closed = true;
                            conn.end = "upstream_timeout";
                        }
                    } else {
                        conn.engine.on_upstream_refused(dataplane::l7::Refusal::UpstreamTimeout, &detail);
                    }
                    stream.shutdown_both();
                    conn.upstream_eof = true;
                    conn.awaiting_since = None;
                }
            }
            // The client finished sending (or was refused after allowed requests): pass the half-close on.
            let client_done = client_finished || conn.engine.refusal_waits();
            if client_done
                && conn.engine.to_upstream().is_empty()
                && !stream.has_pending_output()
                && !conn.upstream_write_shut
            {
                stream.shutdown_write();
                conn.upstream_write_shut = true;
            }
        }

        if let Some(why) = retry {
            // The failed attempt's connection goes; the request goes again on a new one, to another endpoint of
            // the subset when there is one.
            upstreams!(self).release(conn);
            if let Some(Target { server, service: Some(svc), .. }) = conn.target.as_mut() {
                if !why.starts_with("answered") {
                    // A reset or a timeout is the endpoint's failure too (a 5xx was counted as it came).
                    self.t.stats.endpoint_failures.fetch_add(1, Ordering::Relaxed);
                    endpoint_failed(now, &mut self.balancer, &self.t.stats, policy, svc, *server, &why);
                }
                svc.retries_done += 1;
                let service = policy.services().get(svc.id).filter(|s| s.name() == svc.name);
                let next = service.and_then(|s| {
                    let generation = policy.generation();
                    self.balancer
                        .pick_endpoint(now, s, generation, svc.subset, &svc.tried)
                        .or_else(|| self.balancer.pick_endpoint(now, s, generation, svc.subset, &[]))
                });
                tracing::debug!(endpoint = %server, next = ?next, reason = why.as_str(), "retrying the request");
                if let Some(next) = next {
                    if !svc.tried.contains(&next) {
                        svc.tried.push(next);
                    }
                    *server = next;
                }
            }
            self.t.stats.retries.fetch_add(1, Ordering::Relaxed);
            conn.connected = false;
            conn.upstream_eof = false;
            conn.upstream_write_shut = false;
            conn.awaiting_since = None;
            conn.engine.on_retry();
            self.again.push(key);
        }
        // Answers that completed just now for a client that asked to close: the FIN leaves with their last bytes,
        // not a round later.
        settle_after_answers(&mut upstreams!(self), stack, now, key, conn, policy, false);
        // The refusal, once whatever the upstream still had to say has gone first.
        let upstream_done = conn.upstream.is_none() || conn.upstream_eof || conn.upstream_failed;
        if !conn.engine.to_client().is_empty() && (!conn.engine.refusal_waits() || upstream_done) {
            let n = stack.send(&key, conn.engine.to_client());
            conn.engine.client_sent(n);
        }
        if !conn.client_closed {
            let refused_and_said =
                conn.engine.should_close() && (!conn.engine.refusal_waits() || upstream_done);
            let client_gone_undecided =
                client_finished && conn.upstream.is_none() && !conn.engine.wants_upstream();
            if refused_and_said {
                stack.close(&key);
                conn.client_closed = true;
                conn.end = "refused";
            } else if conn.upstream_eof && conn.engine.to_client().is_empty() && !conn.engine.wants_reroute()
            {
                // Everything for the client is in its socket: the FIN follows it, in the last segment when it
                // fits (waiting for the client's acknowledgement first would cost a round trip and a segment).
                stack.close(&key);
                conn.client_closed = true;
                conn.end =
                    if conn.engine.summary().refusal.is_some() { "refused" } else { "upstream_closed" };
            } else if client_gone_undecided {
                stack.close(&key);
                conn.client_closed = true;
                conn.end = "client_closed";
            } else if now.as_nanos().saturating_sub(conn.last_activity.as_nanos())
                > settings.idle_timeout_secs * 1_000_000_000
            {
                stack.abort(&key);
                conn.client_closed = true;
                conn.end = "idle_timeout";
            }
        }

        // The upstream just finished answering before a request for another route: reroute on the next round.
        let asked_close_done = conn.engine.client_asked_close() && conn.upstream.is_some();
        if (conn.engine.wants_reroute() || asked_close_done)
            && (conn.engine.upstream_idle() || conn.upstream_eof)
        {
            self.again.push(key);
        }
        let punt = &self.t.punt;
        let worker = conn.worker;
        stack.poll(now, &key, &mut |packet: &[u8]| {
            if let Some(out) = PuntedPacket::new(packet, worker, 0, Ipv4Addr::UNSPECIFIED) {
                punt.to_worker(out);
            }
        });

        let upstream_over = conn.upstream.is_none() || conn.upstream_eof || conn.upstream_failed;
        if stack.is_finished(&key) && upstream_over {
            self.finish(now, key, policy);
        } else if stack.is_finished(&key) && !conn.upstream_write_shut {
            // The client is gone: so is the upstream.
            if let Some(s) = conn.upstream.as_mut() {
                s.shutdown_both();
            }
            conn.upstream_eof = true;
        }
    }

    /// Publishes how many connections are in each phase.
    fn count_states(&self) {
        let (mut classifying, mut verifying, mut relaying, mut closing) = (0, 0, 0, 0);
        for conn in self.conns.values() {
            if conn.client_closed || conn.engine.summary().refusal.is_some() {
                closing += 1;
            } else if conn.connected {
                relaying += 1;
            } else if conn.engine.wants_upstream() || conn.engine.poll_timeout().is_none() {
                verifying += 1;
            } else {
                classifying += 1;
            }
        }
        let stats = &self.t.stats;
        for (gauge, n) in [
            (&stats.classifying, classifying),
            (&stats.verifying, verifying),
            (&stats.relaying, relaying),
            (&stats.closing, closing),
        ] {
            gauge.store(n, Ordering::Relaxed);
        }
    }

    /// The connection is over: log it, give its port back, forget it.
    fn finish(&mut self, now: Instant, key: FourTuple, policy: &PolicySnapshot) {
        self.stack.remove(&key);
        let Some(mut conn) = self.conns.remove(&key) else { return };
        // For the access line: the port the upstream connection left from.
        let local_port = conn.local_port;
        upstreams!(self).release(&mut conn);
        if let Some(Target { service: Some(svc), .. }) = &conn.target {
            if let Some(n) = self.service_waiting.get_mut(&svc.name).filter(|_| svc.waiting_since.is_some()) {
                *n = n.saturating_sub(1);
            }
        }
        let stats = &self.t.stats;
        stats.open.fetch_sub(1, Ordering::Relaxed);
        let summary = conn.engine.summary();
        stats.bytes_up.fetch_add(summary.bytes_up, Ordering::Relaxed);
        stats.bytes_down.fetch_add(conn.bytes_down, Ordering::Relaxed);
        let rule = rule_label(policy, conn.engine.rule());
        let protocol = match summary.protocol {
            Some(Protocol::Tls) => "tls",
            Some(Protocol::Http) => "http",
            None => "",
        };
        let (verdict, reason) = match summary.refusal {
            Some(r) => ("refused", r.as_str()),
            None if conn.upstream_failed => ("allowed", "upstream_failed"),
            None if conn.connected => ("allowed", ""),
            None => ("undecided", ""),
        };
        if let Some(r) = summary.refusal {
            *stats.refused.lock().unwrap_or_else(|e| e.into_inner()).entry(r.as_str()).or_default() += 1;
            tracing::info!(
                target: "egressd::audit",
                client = %key.client,
                server = %key.server,
                name = summary.name.as_str(),
                protocol,
                rule = rule.as_str(),
                reason = r.as_str(),
                detail = summary.upstream_error.as_str(),
                "l7 refused"
            );
        } else if conn.connected {
            stats.allowed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(r) = summary.dry_run_refusal {
            tracing::info!(
                target: "egressd::audit",
                client = %key.client,
                server = %key.server,
                name = summary.name.as_str(),
                protocol,
                rule = rule.as_str(),
                reason = r.as_str(),
                "l7 refusal let through (dry run)"
            );
        }
        let egress = SocketAddrV4::new(conn.egress, local_port.unwrap_or(0));
        // TLS egressd originated: established, failed, or none; and the time from connecting to the first byte.
        let upstream_tls = match (summary.refusal, conn.tls_established) {
            (Some(dataplane::l7::Refusal::UpstreamTlsFailed), _) => "failed",
            (_, true) => "established",
            _ => "",
        };
        let service = conn.target.as_ref().and_then(|t| t.service.as_ref());
        // The address the upstream connection went to (a service's endpoint, or the destination).
        let upstream = conn.target.as_ref().map_or(key.server, |t| t.server);
        let upstream_first_byte_ms = conn
            .first_byte_at
            .map_or(0, |t| t.as_nanos().saturating_sub(conn.connect_started.as_nanos()) / 1_000_000);
        tracing::info!(
            target: "egressd::l7",
            client = %key.client,
            server = %key.server,
            egress = %egress,
            protocol,
            name = summary.name.as_str(),
            method = summary.method.as_str(),
            path = summary.path.as_str(),
            requests = summary.requests_allowed,
            rule = rule.as_str(),
            verdict,
            reason,
            bytes_up = summary.bytes_up,
            bytes_down = conn.bytes_down,
            upstream_tls,
            upstream_first_byte_ms,
            service = service.map_or("", |s| s.name.as_str()),
            route = service.map_or("", |s| s.route.as_str()),
            subset = service.map_or("", |s| s.subset_name.as_str()),
            upstream = %upstream,
            duration_ms = now.as_nanos().saturating_sub(conn.started.as_nanos()) / 1_000_000,
            end = conn.end,
            "l7 connection"
        );
    }
}

/// A non-blocking connection from `egress` (a free port of the L7 range) to `server`.
fn connect(
    ports: &mut HashMap<Ipv4Addr, VecDeque<u16>>,
    egress: Ipv4Addr,
    server: SocketAddrV4,
) -> std::io::Result<(TcpStream, u16)> {
    let free = ports.entry(egress).or_default();
    let port = free.pop_front().ok_or_else(|| std::io::Error::other("no free L7 upstream port"))?;
    let attempt = (|| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(egress, port)).into())?;
        match socket.connect(&SocketAddr::V4(server).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(socket.into()))
    })();
    match attempt {
        Ok(stream) => Ok((stream, port)),
        Err(e) => {
            free.push_back(port);
            Err(e)
        }
    }
}

/// Idle upstream connections of services, kept for the next client: by service, endpoint, TLS configuration
/// (policy generation and owner, so a reload's new certificates are never mixed with old sessions) and egress IP.
type PoolKey = (String, SocketAddrV4, Option<(u64, (u32, u32, u32))>, Ipv4Addr);

/// Most idle connections kept per pool key.
const MAX_POOLED_PER_KEY: usize = 32;

struct Pooled {
    upstream: Upstream,
    /// It stays registered with the poll under this token while idle (its events are ignored: no client holds
    /// it), so parking and taking it cost no `epoll_ctl`.
    token: Token,
    local_port: u16,
    since: Instant,
    /// Requests it carried.
    requests: u32,
}

/// Once every answer is in: a client that finished (`client_finished`) or asked to close leaves its upstream
/// connection to the pool, if it may be kept, or closed; one that asked to close gets its FIN after the answers.
fn settle_after_answers(
    upstreams: &mut Upstreams<'_>,
    stack: &mut ClientStack,
    now: Instant,
    key: FourTuple,
    conn: &mut Conn,
    policy: &PolicySnapshot,
    client_finished: bool,
) {
    let closing_after_answers = conn.engine.client_asked_close() && conn.engine.upstream_idle();
    if (client_finished || closing_after_answers)
        && conn.upstream.is_some()
        && conn.engine.to_upstream().is_empty()
        && conn.engine.upstream_reusable()
        && conn.target.as_ref().is_some_and(|t| t.service.is_some())
    {
        if upstreams.park_or_release(now, conn, policy) {
            conn.end = "client_closed";
        } else {
            conn.upstream_eof = true;
        }
        if closing_after_answers && !conn.client_closed {
            // The client asked for the close: a FIN after the answers it has in its socket.
            stack.close(&key);
            conn.client_closed = true;
            conn.end = "done";
        }
    }
}

impl Pooled {
    /// Nothing arrived while it was idle: no FIN, no reset, no bytes nobody asked for (`buf`: scratch space).
    fn is_alive(&mut self, buf: &mut [u8]) -> bool {
        matches!(self.upstream.read(&mut buf[..1]), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }
}

/// Closes an idle pooled connection, gives its local port back and counts it in `closed`.
fn close_pooled(
    poll: &Poll,
    ports: &mut HashMap<Ipv4Addr, VecDeque<u16>>,
    closed: &AtomicU64,
    egress: Ipv4Addr,
    pooled: &mut Pooled,
) {
    pooled.upstream.shutdown_both();
    let _ = poll.registry().deregister(pooled.upstream.tcp_mut());
    ports.entry(egress).or_default().push_back(pooled.local_port);
    closed.fetch_add(1, Ordering::Relaxed);
}

fn pool_key(conn: &Conn, generation: u64) -> Option<PoolKey> {
    // Only plain HTTP clients share upstream connections: a TLS client's session is its own.
    if conn.engine.summary().protocol != Some(Protocol::Http) {
        return None;
    }
    let target = conn.target.as_ref()?;
    let svc = target.service.as_ref()?;
    let tls = target.tls.as_ref().map(|_| (generation, target.tls_key));
    Some((svc.name.clone(), target.server, tls, conn.egress))
}

/// What an upstream connection holds in the driver: its token, its port, its places in the rule's and the
/// service's counts and in the balancer's in-flight connections.
struct Upstreams<'a> {
    poll: &'a Poll,
    tokens: &'a mut HashMap<Token, FourTuple>,
    ports: &'a mut HashMap<Ipv4Addr, VecDeque<u16>>,
    rule_counts: &'a mut HashMap<u32, u32>,
    service_connections: &'a mut HashMap<String, u32>,
    balancer: &'a mut Balancer,
    pools: &'a mut HashMap<PoolKey, Vec<Pooled>>,
    pool_closed: &'a AtomicU64,
}

impl Upstreams<'_> {
    /// Keeps `conn`'s upstream connection for the next client if it can carry more: a service's, connected, idle
    /// (every response ended, framing known), not closed either way, its TLS established, under the service's
    /// `max_requests_per_connection`. Otherwise closes it. Either way `conn` no longer holds it.
    fn park_or_release(&mut self, now: Instant, conn: &mut Conn, policy: &PolicySnapshot) -> bool {
        let service = conn.target.as_ref().and_then(|t| t.service.as_ref());
        let spec = service.and_then(|svc| policy.services().get(svc.id).filter(|s| s.name() == svc.name));
        let requests = service.map_or(0, |svc| {
            svc.requests_before
                + conn.engine.summary().requests_allowed.saturating_sub(svc.requests_at_attach)
        });
        let key = pool_key(conn, policy.generation());
        let keep = spec.is_some_and(|s| {
            s.spec().pool_idle_timeout_secs > 0
                && s.spec().max_requests_per_connection.is_none_or(|m| requests < m)
        }) && conn.connected
            && !conn.upstream_eof
            && !conn.upstream_write_shut
            && !conn.upstream_failed
            && conn.engine.upstream_reusable()
            && conn.upstream.as_ref().is_some_and(|u| !u.is_tls() || conn.tls_established)
            && key.as_ref().is_some_and(|k| self.pools.get(k).is_none_or(|v| v.len() < MAX_POOLED_PER_KEY));
        if !keep {
            self.release(conn);
            return false;
        }
        let (Some(key), Some(token)) = (key, conn.token) else {
            self.release(conn);
            return false;
        };
        let (Some(upstream), Some(local_port)) = (conn.upstream.take(), conn.local_port.take()) else {
            self.release(conn);
            return false;
        };
        self.pools.entry(key).or_default().push(Pooled { upstream, token, local_port, since: now, requests });
        // Idle in the pool, it holds no place in the rule's and the service's counts, and its token no longer
        // names `conn`.
        self.release(conn);
        true
    }

    /// An idle connection of the pool for `conn`'s target, attached to it. One the server closed or wrote to while
    /// it was idle is closed instead, and the next one tried (`buf`: scratch space).
    fn take_pooled(
        &mut self,
        conn: &mut Conn,
        key: FourTuple,
        policy: &PolicySnapshot,
        buf: &mut [u8],
    ) -> bool {
        let Some(pool_key) = pool_key(conn, policy.generation()) else { return false };
        let pooled = loop {
            let Some(mut pooled) = self.pools.get_mut(&pool_key).and_then(Vec::pop) else { return false };
            if pooled.is_alive(buf) {
                break pooled;
            }
            close_pooled(self.poll, self.ports, self.pool_closed, conn.egress, &mut pooled);
        };
        let token = pooled.token;
        self.tokens.insert(token, key);
        conn.token = Some(token);
        conn.tls_established = pooled.upstream.is_tls();
        // Found empty just now; whatever comes later raises a poll event under its token.
        conn.upstream_readable = false;
        conn.upstream = Some(pooled.upstream);
        conn.local_port = Some(pooled.local_port);
        let requests_now = conn.engine.summary().requests_allowed;
        if let Some(svc) = conn.target.as_mut().and_then(|t| t.service.as_mut()) {
            svc.requests_before = pooled.requests;
            // This client's requests so far went before it had the connection, except the one it is for.
            svc.requests_at_attach = requests_now.saturating_sub(1);
        }
        true
    }

    /// Closes pooled connections idle longer than their service allows, closed by the server, or that sent
    /// something nobody asked for (`buf`: scratch space).
    fn sweep_pools(&mut self, now: Instant, policy: &PolicySnapshot, buf: &mut [u8]) {
        let services = policy.services();
        for ((service, _, _, egress), pooled) in self.pools.iter_mut() {
            let idle_nanos = services
                .iter()
                .find(|s| s.name() == service)
                .map_or(0, |s| u64::from(s.spec().pool_idle_timeout_secs) * 1_000_000_000);
            pooled.retain_mut(|p| {
                let expired = now.as_nanos().saturating_sub(p.since.as_nanos()) >= idle_nanos;
                let alive = !expired && p.is_alive(buf);
                if !alive {
                    close_pooled(self.poll, self.ports, self.pool_closed, *egress, p);
                }
                alive
            });
        }
        self.pools.retain(|_, v| !v.is_empty());
    }

    /// Closes `conn`'s upstream connection and gives back all it holds.
    fn release(&mut self, conn: &mut Conn) {
        if let Some(mut stream) = conn.upstream.take() {
            stream.shutdown_both();
            let _ = self.poll.registry().deregister(stream.tcp_mut());
        }
        if let Some(token) = conn.token.take() {
            self.tokens.remove(&token);
        }
        if let Some(port) = conn.local_port.take() {
            self.ports.entry(conn.egress).or_default().push_back(port);
        }
        if let Some(n) = conn.counted_rule.take().and_then(|r| self.rule_counts.get_mut(&r)) {
            *n = n.saturating_sub(1);
        }
        if let Some(Target { server, service: Some(svc), .. }) = conn.target.as_mut() {
            if std::mem::take(&mut svc.counted) {
                if let Some(n) = self.service_connections.get_mut(&svc.name) {
                    *n = n.saturating_sub(1);
                }
            }
            if std::mem::take(&mut svc.opened) {
                self.balancer.on_closed(&svc.name, *server);
            }
        }
    }
}

/// Where the upstream of `engine`'s connection goes (see [`Target`]); an error when its service has no endpoint.
fn choose_target(
    now: Instant,
    key: &FourTuple,
    engine: &Connection,
    policy: &PolicySnapshot,
    balancer: &mut Balancer,
) -> Result<Target, String> {
    let host = engine.summary().name.clone();
    if let Some(UpstreamRoute { service: id, route, subset }) = engine.upstream_route() {
        let services = policy.services();
        // The route was chosen under this snapshot unless a reload came in between: then the id may name another
        // service, which the Host no longer leads to.
        let service = services
            .get(id)
            .filter(|_| services.lookup(&host, key.server.port()) == Some(id))
            .ok_or_else(|| format!("the service of {host} changed with a reload"))?;
        let generation = policy.generation();
        let server = balancer.pick_endpoint(now, service, generation, subset, &[]).ok_or_else(|| {
            format!("subset {} of service {} has no endpoint", service.subset_name(subset), service.name())
        })?;
        // A TLS client's session passes through untouched: egressd neither wraps it in TLS of its own nor can it
        // see where a request ends (no request timeout, no retries).
        let client_tls = engine.summary().protocol == Some(Protocol::Tls);
        return Ok(Target {
            server,
            tls: service.tls(subset).filter(|_| !client_tls).cloned(),
            tls_key: (1, id.0, subset.map_or(0, |s| s as u32 + 1)),
            host,
            service: Some(ServiceTarget {
                id,
                name: service.name().to_string(),
                route: service.route_name(route).to_string(),
                subset,
                subset_name: service.subset_name(subset).to_string(),
                tried: vec![server],
                attempts: 1,
                opened: false,
                counted: false,
                waiting_since: None,
                retries_done: 0,
                retries: if client_tls { 0 } else { service.spec().retries },
                retry_on: service.spec().retry_on,
                requests_before: 0,
                requests_at_attach: 0,
            }),
            request_timeout_nanos: service
                .request_timeout_secs(route)
                .filter(|_| !client_tls)
                .map(|s| u64::from(s) * 1_000_000_000),
            connect_timeout_secs: service.spec().connect_timeout_secs.map(u64::from),
        });
    }
    let tls = policy.l7_conditions(engine.rule()).and_then(|c| c.conditions().upstream_tls.clone());
    let server = match &tls {
        Some(t) => SocketAddrV4::new(*key.server.ip(), t.port),
        None => key.server,
    };
    let host = engine.upstream_host().map_or(host, str::to_string);
    Ok(Target {
        server,
        tls,
        tls_key: (0, engine.rule().0, 0),
        host,
        service: None,
        request_timeout_nanos: None,
        connect_timeout_secs: None,
    })
}

/// A service endpoint failed (`why`): the balancer counts it, and an ejection is logged and counted.
fn endpoint_failed(
    now: Instant,
    balancer: &mut Balancer,
    stats: &L7Stats,
    policy: &PolicySnapshot,
    svc: &ServiceTarget,
    server: SocketAddrV4,
    why: &str,
) {
    let Some(service) = policy.services().get(svc.id).filter(|s| s.name() == svc.name) else { return };
    if balancer.on_failure(now, service, svc.subset, server) {
        stats.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            service = svc.name.as_str(),
            endpoint = %server,
            reason = why,
            "endpoint ejected after consecutive failures"
        );
    }
}

fn rule_label(policy: &PolicySnapshot, rule: RuleId) -> String {
    policy.rule(rule).and_then(|r| r.name.clone()).unwrap_or_else(|| (rule.0 + 1).to_string())
}
