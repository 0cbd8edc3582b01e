//! The per-frame decision: parse, validate, policy + NAT, route, rewrite, and say where the frame goes.
//!
//! Sans-IO: [`Pipeline::process`] takes `now` and one frame's bytes (in place, in UMEM) and returns an
//! [`Action`]; the worker does the I/O. Workers call it for each frame of a burst after
//! [`Pipeline::begin_batch`], which loads the next-hop snapshot once per batch. No allocation per frame, and no
//! input makes it panic (a proptest feeds it random and mutated frames).
//!
//! Steps, in order:
//! 1. Ethernet, untagged: egressd's interfaces carry no VLANs, so an 802.1Q/802.1ad-tagged frame is dropped
//!    ([`DropReason::VlanTagged`]) rather than forwarded with a tag its sender chose (VLAN hopping). Non-IP ethertypes
//!    never get here in production (the XDP program passes them to the kernel) but are counted if they do.
//! 2. IPv4 validation: version, IHL ≥ 5 and within the frame, total length within the frame (a frame padded past
//!    the IP total length is fine: the padding is dropped on output), header checksum, no fragments (the gateway
//!    does not reassemble and non-first fragments carry no ports, so NAT could not track them), TTL > 1.
//!    IPv6 → [`DropReason::Ipv6Unsupported`] (NAT44 only).
//! 3. Policy and NAT on the IPv4 packet in place (`frame[ip_start..ip_end]`): see [`Pipeline::translate`]. The
//!    policy snapshot, like the next-hop table, is loaded once per batch.
//! 4. Next hop: route + neighbour lookup out of the chosen interface. A missing neighbour's resolution is
//!    requested from the control thread and the frame waits, copied aside, as the kernel's ARP queue does (at
//!    most [`HOLD_FRAMES`] for at most [`HOLD_NANOS`]; beyond that [`DropReason::NoNeighbour`]).
//! 5. TTL decrement with an incremental header checksum update (RFC 1624), MAC rewrite.
//!
//! A new flow from inside that finds no free NAT port is dropped as `out_of_ports`; when `[nat]
//! icmp_on_out_of_ports` is on, the client also gets an ICMP 3/13 (rate-limited per worker, see [`crate::icmp`]),
//! written into the pipeline's reply buffer: [`Action::Reply`].
//!
//! Counting: the pipeline counts every drop it decides in [`WorkerStats`]; the worker counts rx/tx and the drops
//! it decides itself (ring full, bad descriptors).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::{audit_limiter, AuditEvent, AuditQueue};
use crate::drop::DropReason;
use crate::fragments::{FragmentKey, FragmentRoute, FragmentTable};
use crate::handoff::{HandoffKind, Handoffs};
use crate::icmp::{IcmpErrors, Unreachable, MAX_REPLY_FRAME};
use crate::l7::punt::{Punt, PuntedPacket};
use crate::nat::flows::{ActiveQuery, FlowQueries};
use crate::nat::{FlowHint, Inbound, Nat, NatConfig, NatLogMode, NatLogQueue, Outbound};
use crate::nexthop::{NextHop, NextHopTable, ResolveQueue};
use crate::policy::{Decision, PolicySnapshot, SharedPolicy, Verdict};
use crate::stats::{RuleHits, WorkerStats};
use crate::time::{Instant, TokenBucket};
use crate::wire::{
    checksum, ethernet, ip_proto, ipv4, read_u16, read_u32, tcp, write_u16, write_u32, AddressFamily,
};
use crate::Side;

/// What to do with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Transmit the first `len` bytes of the (rewritten) frame out of `out`.
    Forward { out: Side, len: usize },
    /// Do not forward; the reason has been counted.
    Drop(DropReason),
    /// Copied to the worker that owns the flow's NAT port; this frame can be released.
    HandedOff,
    /// Copied aside until its next hop's MAC is known ([`Pipeline::release_held`]); this frame can be released.
    Held,
    /// A packet of an `l7` flow, copied to the L7 path; this frame can be released.
    Punted,
    /// The frame was dropped (its reason counted) and answered: transmit the first `len` bytes of
    /// [`Pipeline::reply_frame`] out of `out` before the next `process` call; this frame can be released.
    Reply { out: Side, len: usize },
}

/// Repeat a resolution request for the same next hop at most this often (the queue is not a per-packet log).
const RESOLVE_REPEAT_NANOS: u64 = 100_000_000;

/// Where next-hop snapshots come from and where resolution requests go.
#[derive(Clone, Debug)]
pub struct NextHops {
    pub table: Arc<ArcSwap<NextHopTable>>,
    pub resolve: Arc<ResolveQueue>,
}

impl NextHops {
    /// A fixed table and a fresh request queue (tests, benches).
    pub fn fixed(table: NextHopTable) -> NextHops {
        NextHops { table: Arc::new(ArcSwap::from_pointee(table)), resolve: Arc::new(ResolveQueue::new(64)) }
    }
}

/// One worker's pipeline. Not shared: each worker owns one.
pub struct Pipeline {
    stats: Arc<WorkerStats>,
    next_hops: NextHops,
    snapshot: Arc<NextHopTable>,
    policy: Arc<SharedPolicy>,
    policy_snapshot: Arc<PolicySnapshot>,
    nat: Nat,
    worker: u16,
    handoffs: Arc<Handoffs>,
    last_resolve_request: Option<(Ipv4Addr, Instant)>,
    /// Frames waiting for their next hop's MAC (preallocated, at most [`HOLD_FRAMES`]).
    held: Vec<HeldFrame>,
    /// Per-rule decision counters of the current policy generation (also published in `stats.rule_hits`).
    rule_hits: Arc<RuleHits>,
    audit: Option<Arc<AuditQueue>>,
    audit_limiter: TokenBucket,
    /// The admin thread's flow listings and deletions, and the one this worker is answering.
    flow_queries: Option<Arc<FlowQueries>>,
    flow_query: Option<ActiveQuery>,
    icmp_errors: IcmpErrors,
    icmp_bucket: TokenBucket,
    /// IP identification of the next ICMP error.
    icmp_ip_id: u16,
    /// Where ICMP errors are written ([`MAX_REPLY_FRAME`] bytes, allocated once).
    reply: Box<[u8]>,
    /// An allow decision of the frame in hand: counted (rule hit, `flows_allowed`) only once the frame leaves.
    allowed: Option<Decision>,
    /// What first fragments became, for the rest of their datagrams.
    fragments: FragmentTable,
    /// Later fragments waiting for their datagram's first (preallocated, at most [`HOLD_FRAGMENTS`]).
    held_fragments: Vec<HeldFrame>,
    /// Where packets of `l7` flows go.
    l7: Option<Arc<Punt>>,
    /// Clamp the MSS of TCP SYNs to the smaller interface MTU less 40 (`[dataplane] clamp_mss`).
    clamp_mss: bool,
    /// Drop packets from inside whose source the inside interface has no route to (`[dataplane]
    /// source_validation`, on by default).
    validate_sources: bool,
}

/// How far ahead of the frame it processes a worker prefetches (see [`FlowHint`]): frame `i + 2 × distance`'s
/// index slot, frame `i + distance`'s session, then frame `i`. Each load gets the work of `distance` frames (a few
/// hundred ns) to land. 8 measured best in the `established_live_flows` bench (`bench/RESULTS.md`).
pub const PREFETCH_DISTANCE: usize = 8;
/// Hints a worker keeps in flight: a ring indexed by frame number modulo this.
pub const PREFETCH_HINTS: usize = 2 * PREFETCH_DISTANCE;

/// Frames a worker keeps while their neighbour resolves (the kernel's default `unres_qlen` is of this order).
pub const HOLD_FRAMES: usize = 16;
/// Later fragments a worker keeps while their datagram's first fragment has not arrived.
pub const HOLD_FRAGMENTS: usize = 32;
/// How long a later fragment waits for its first before it is dropped as `fragment_unmatched`.
pub const HOLD_FRAGMENT_NANOS: u64 = 1_000_000_000;
/// How long a frame waits for its neighbour before it is dropped as `no_neighbour`.
pub const HOLD_NANOS: u64 = 1_000_000_000;
/// Any frame a UMEM frame can hold can be held (a 4096-byte UMEM frame less the kernel's headroom).
const HOLD_FRAME_BYTES: usize = crate::handoff::HANDOFF_JUMBO_BYTES;

#[derive(Clone, Copy)]
struct HeldFrame {
    out: Side,
    since: Instant,
    /// The allow decision of the flow's first packet, counted when the frame leaves.
    allowed: Option<Decision>,
    ip_start: u16,
    len: u16,
    bytes: [u8; HOLD_FRAME_BYTES],
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("worker", &self.worker).finish_non_exhaustive()
    }
}

/// Where a translated packet goes next.
enum Next {
    Out(Side),
    HandOff(u16, HandoffKind),
    /// Copied to the L7 path.
    Punted,
}

/// How a frame reached this worker.
#[derive(Clone, Copy)]
enum Leg {
    Arrived(Side),
    HandedOver(HandoffKind),
}

impl Leg {
    /// Whether the frame came from inside (on this worker's queue, or handed over by the worker that received it).
    #[inline]
    fn is_outbound(self) -> bool {
        matches!(self, Leg::Arrived(Side::Inside) | Leg::HandedOver(HandoffKind::Outbound))
    }
}

impl Pipeline {
    /// Worker `worker`'s pipeline; `handoffs` is shared by all workers, `nat` sized for this worker.
    pub fn new(
        stats: Arc<WorkerStats>,
        next_hops: NextHops,
        policy: Arc<SharedPolicy>,
        nat: &NatConfig,
        worker: u16,
        handoffs: Arc<Handoffs>,
    ) -> Pipeline {
        let snapshot = next_hops.table.load_full();
        let policy_snapshot = policy.load_full();
        let icmp_errors = nat.icmp_errors;
        let nat = {
            let mut engine = Nat::new(nat, worker);
            engine.sync_policy(&policy_snapshot);
            engine
        };
        let mut pipeline = Pipeline {
            stats,
            next_hops,
            snapshot,
            policy,
            policy_snapshot,
            nat,
            worker,
            handoffs,
            last_resolve_request: None,
            held: Vec::with_capacity(HOLD_FRAMES),
            rule_hits: Arc::new(RuleHits::new(0, 0)),
            audit: None,
            audit_limiter: audit_limiter(),
            flow_queries: None,
            flow_query: None,
            icmp_errors,
            icmp_bucket: TokenBucket::new(icmp_errors.per_sec, icmp_errors.burst, Instant::ZERO),
            icmp_ip_id: 0,
            reply: vec![0; MAX_REPLY_FRAME].into_boxed_slice(),
            allowed: None,
            fragments: FragmentTable::default(),
            held_fragments: Vec::with_capacity(HOLD_FRAGMENTS),
            clamp_mss: false,
            l7: None,
            validate_sources: true,
        };
        pipeline.publish_rule_hits();
        pipeline
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    pub fn nat(&self) -> &Nat {
        &self.nat
    }

    /// The frame an [`Action::Reply`] refers to (its first `len` bytes).
    pub fn reply_frame(&self) -> &[u8] {
        &self.reply
    }

    /// A lone worker's pipeline (worker 0 of 1, its own handoff queue): tests, benches, tools.
    pub fn single(
        stats: Arc<WorkerStats>,
        next_hops: NextHops,
        policy: Arc<SharedPolicy>,
        nat: &NatConfig,
    ) -> Pipeline {
        let nat = NatConfig { workers: 1, ..*nat };
        Pipeline::new(stats, next_hops, policy, &nat, 0, Arc::new(Handoffs::new(1, 64)))
    }

    /// Call once per burst, before the burst's [`process`](Self::process) calls: picks up the newest next-hop
    /// and policy snapshots (one atomic load each; an `Arc` is replaced only when a new one was published).
    pub fn begin_batch(&mut self) {
        let current = self.next_hops.table.load();
        if !Arc::ptr_eq(&current, &self.snapshot) {
            self.snapshot = arc_swap::Guard::into_inner(current);
        }
        let current = self.policy.load();
        if !Arc::ptr_eq(&current, &self.policy_snapshot) {
            self.policy_snapshot = arc_swap::Guard::into_inner(current);
            self.publish_rule_hits();
        }
        self.nat.sync_policy(&self.policy_snapshot);
    }

    /// Lowers the MSS option of TCP SYNs, both ways, to what the smaller interface MTU carries (MTU − 40): TCP
    /// peers then never send segments too big for the path through the gateway, even where ICMP is filtered.
    pub fn with_mss_clamp(mut self, on: bool) -> Pipeline {
        self.clamp_mss = on;
        self
    }

    /// Reverse-path source validation on the inside (as `rp_filter` strict mode): a packet from inside whose
    /// source the inside interface has no route back to is spoofed and dropped (`source_not_inside`) before it
    /// can take a NAT port or a per-source quota. On by default.
    pub fn with_source_validation(mut self, on: bool) -> Pipeline {
        self.validate_sources = on;
        self
    }

    /// Sends denial events to `queue` (the control thread writes the audit log).
    /// Turns the NAT translation log on (see [`crate::nat::NatLogMode`]).
    pub fn with_nat_log(
        mut self,
        mode: NatLogMode,
        records_per_sec: u32,
        queue: Arc<NatLogQueue>,
    ) -> Pipeline {
        self.nat.set_log(mode, records_per_sec, queue);
        self
    }

    /// [`Pipeline::with_l7`] when there is an L7 path.
    pub fn with_l7_if(self, punt: Option<Arc<Punt>>) -> Pipeline {
        match punt {
            Some(punt) => self.with_l7(punt),
            None => self,
        }
    }

    /// Punts the packets of `l7` flows to the L7 path (without it they are dropped as `l7_unavailable`).
    pub fn with_l7(mut self, punt: Arc<Punt>) -> Pipeline {
        self.l7 = Some(punt);
        self
    }

    pub fn with_audit(mut self, queue: Arc<AuditQueue>) -> Pipeline {
        self.audit = Some(queue);
        self
    }

    /// Answers the admin thread's flow listings and deletions (see [`crate::nat::flows`]).
    pub fn with_flow_queries(mut self, queries: Arc<FlowQueries>) -> Pipeline {
        self.flow_queries = Some(queries);
        self
    }

    /// Does one bounded step of a pending flow query; returns 1 if it did work (so the worker does not park
    /// while a query makes progress), 0 otherwise.
    pub fn answer_flow_query(&mut self, now: Instant) -> usize {
        let Some(queries) = &self.flow_queries else { return 0 };
        if let Some(query) = queries.poll_query(self.worker) {
            self.flow_query = Some(ActiveQuery::new(query));
        }
        let Some(active) = self.flow_query.as_mut() else { return 0 };
        let policy = &self.policy_snapshot;
        match self.nat.answer_flow_query(now, active, queries, |addr| policy.group_of(IpAddr::V4(addr))) {
            // Waiting for the admin thread to read a page: nothing to do until it does.
            None => 0,
            Some(done) => {
                if done {
                    self.flow_query = None;
                }
                1
            }
        }
    }

    /// Fresh per-rule counters for the policy generation now running (allocates; only when the policy changes).
    fn publish_rule_hits(&mut self) {
        let hits =
            Arc::new(RuleHits::new(self.policy_snapshot.generation(), self.policy_snapshot.rule_count()));
        self.rule_hits = hits.clone();
        self.stats.rule_hits.store(hits);
    }

    /// Counts a policy decision the NAT acted on, and reports denials to the audit log (rate-limited). An allow is
    /// counted only for a frame that is forwarded ([`Pipeline::counted`]): a flow the NAT, the route or a limit
    /// then refuses is counted under that reason instead.
    fn observe(&mut self, now: Instant, decision: Decision, packet: &[u8]) {
        if decision.verdict == Verdict::Allow {
            self.allowed = Some(decision);
            return;
        }
        if let Some(rule) = decision.rule {
            self.rule_hits.hit(rule.0 as usize);
        }
        if let Verdict::Deny(_) = decision.verdict {
            let Some(queue) = &self.audit else { return };
            let generation = self.policy_snapshot.generation();
            let reported = self.audit_limiter.take(now)
                && AuditEvent::new(packet, &decision, generation, self.worker).is_some_and(|e| queue.push(e));
            if !reported {
                self.stats.audit_suppressed.inc();
            }
        }
    }

    /// Decides what happens to one frame that arrived on `arrived_on`, rewriting it in place when it is to be
    /// forwarded. Every drop is counted under its reason before returning.
    pub fn process(&mut self, now: Instant, arrived_on: Side, frame: &mut [u8]) -> Action {
        self.counted(now, Leg::Arrived(arrived_on), frame)
    }

    /// Whether the worker should prefetch at all ([`Nat::prefetch_pays`]): checked once a burst.
    #[inline]
    pub fn prefetch_pays(&self) -> bool {
        self.nat.prefetch_pays()
    }

    /// First prefetch stage, [`PREFETCH_DISTANCE`] frames before the second (see [`FlowHint`]): starts loading
    /// the index slot of the frame's flow.
    #[inline]
    pub fn prefetch_flow(&self, arrived_on: Side, frame: &[u8]) -> FlowHint {
        match (ethernet::network_layer(frame), frame.get(ethernet::HEADER_LEN..)) {
            (Ok(AddressFamily::Ipv4), Some(packet)) => {
                self.nat.prefetch_flow(arrived_on == Side::Outside, packet)
            }
            _ => FlowHint::NONE,
        }
    }

    /// Second prefetch stage, [`PREFETCH_DISTANCE`] frames before the frame is processed: starts loading the session the slot loaded by [`Pipeline::prefetch_flow`] names.
    #[inline]
    pub fn prefetch_session(&self, hint: FlowHint) {
        self.nat.prefetch_session(hint);
    }

    /// The queues through which workers hand frames to each other (this worker drains `worker()`'s).
    pub fn handoffs(&self) -> &Arc<Handoffs> {
        &self.handoffs
    }

    /// This pipeline's worker index.
    pub fn worker(&self) -> u16 {
        self.worker
    }

    /// Finishes a frame another worker handed over (from [`Handoffs::pop_with`]): its NAT leg on this worker's
    /// conntrack, then routing; rewrites `frame` in place like [`Pipeline::process`].
    pub fn process_handoff(&mut self, now: Instant, kind: HandoffKind, frame: &mut [u8]) -> Action {
        self.counted(now, Leg::HandedOver(kind), frame)
    }

    /// Expires at most `budget` idle flows; returns how many went.
    pub fn poll_expiry(&mut self, now: Instant, budget: usize) -> usize {
        self.nat.poll_expiry(now, budget)
    }

    /// Publishes the NAT gauges into this worker's stats (for the admin endpoint).
    pub fn publish_gauges(&self) {
        self.nat.stats().publish(&self.stats.nat);
    }

    fn counted(&mut self, now: Instant, leg: Leg, frame: &mut [u8]) -> Action {
        let action = match self.forward(now, leg, frame) {
            Ok(action) => action,
            Err(reason) => {
                self.stats.count_drop(reason);
                Action::Drop(reason)
            }
        };
        // (A held frame took its decision along: it counts when it leaves.)
        if let Some(decision) = self.allowed.take() {
            if matches!(action, Action::Forward { .. } | Action::HandedOff) {
                self.count_allowed(decision);
            }
        }
        action
    }

    /// Counts an allowed flow whose first packet left: its rule's hit and `flows_allowed`.
    fn count_allowed(&mut self, decision: Decision) {
        if let Some(rule) = decision.rule {
            self.rule_hits.hit(rule.0 as usize);
        }
        self.stats.flows_allowed.inc();
    }

    /// Out of ports: drop, count `out_of_ports`, optionally ICMP 3/13. Writes the ICMP error for
    /// a refused frame (still as received: the NAT rewrites nothing before it allocates) into the reply buffer,
    /// if enabled, allowed (RFC 1812 4.3.2.7) and within the rate limit; returns its length.
    fn out_of_ports_reply(&mut self, now: Instant, frame: &[u8], l3: &ipv4::Frame) -> Option<usize> {
        if !self.icmp_errors.on_out_of_ports {
            return None;
        }
        let from = self.snapshot.inside.address;
        self.icmp_reply(now, Unreachable::AdminProhibited, frame, l3, from)
    }

    /// Writes an ICMP destination unreachable about the packet in `frame` into the reply buffer, from `from`, if
    /// the packet may be answered (RFC 1812 4.3.2.7) and the rate limit allows; counts it; returns its length.
    fn icmp_reply(
        &mut self,
        now: Instant,
        kind: Unreachable,
        frame: &[u8],
        l3: &ipv4::Frame,
        from: Option<Ipv4Addr>,
    ) -> Option<usize> {
        // Write first (cheap, into our own buffer), charge the bucket only for a packet that may be answered.
        let (start, end, id) = (l3.ip_start, l3.ip_end, self.icmp_ip_id);
        let len = crate::icmp::write_unreachable(kind, frame, start, end, from, id, &mut self.reply)?;
        if !self.icmp_bucket.take(now) {
            self.stats.icmp_errors_rate_limited.inc();
            return None;
        }
        self.icmp_ip_id = self.icmp_ip_id.wrapping_add(1);
        self.stats.icmp_errors_sent.inc();
        Some(len)
    }

    /// A packet too big for the interface it would leave by: `mtu_exceeded`, answered with ICMP 3/4 carrying the
    /// MTU from the address of the interface it arrived on (rate-limited with the other errors; never about an
    /// ICMP error, a later fragment, or a broadcast/multicast packet).
    #[cold]
    fn too_big(
        &mut self,
        now: Instant,
        frame: &[u8],
        l3: &ipv4::Frame,
        arrived: Side,
        mtu: usize,
    ) -> Result<Action, DropReason> {
        let kind = Unreachable::FragmentationNeeded { next_hop_mtu: mtu.min(0xffff) as u16 };
        let from = self.snapshot.side(arrived).address;
        let len = self.icmp_reply(now, kind, frame, l3, from).ok_or(DropReason::MtuExceeded)?;
        // Answered, and still a drop.
        self.stats.count_drop(DropReason::MtuExceeded);
        Ok(Action::Reply { out: arrived, len })
    }

    fn forward(&mut self, now: Instant, leg: Leg, frame: &mut [u8]) -> Result<Action, DropReason> {
        let l3 = ipv4::parse_frame(frame)?;
        let ttl_at = l3.ip_start + ipv4::TTL;
        if frame[ttl_at] <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        // A packet larger than the MTU of the interface it would leave by: dropped, and its sender told the MTU
        // (RFC 1191 path-MTU discovery), whether or not DF is set (egressd does not fragment; hosts honour the
        // reported MTU and fragment or shrink their segments themselves). Checked before the NAT: no state, and
        // the error quotes the packet as its sender sent it.
        let (arrived, leaves) = match leg {
            Leg::Arrived(side) => (side, side.other()),
            Leg::HandedOver(HandoffKind::Outbound) => (Side::Inside, Side::Outside),
            Leg::HandedOver(HandoffKind::Inbound) => (Side::Outside, Side::Inside),
            Leg::HandedOver(HandoffKind::Hairpin) => (Side::Inside, Side::Inside),
        };
        let mtu = self.snapshot.side(leaves).mtu as usize;
        if mtu != 0 && l3.ip_end - l3.ip_start > mtu {
            return self.too_big(now, frame, &l3, arrived, mtu);
        }
        if l3.is_later_fragment() {
            return self.forward_later_fragment(now, frame, l3);
        }
        if self.clamp_mss && frame.get(l3.ip_start + ipv4::PROTOCOL) == Some(&ip_proto::TCP) {
            let mtu = self.snapshot.inside.mtu.min(self.snapshot.outside.mtu);
            if mtu > 40 {
                let max_mss = (mtu - 40).min(u32::from(u16::MAX)) as u16;
                tcp::clamp_syn_mss(&mut frame[l3.ip_start + l3.header_len..l3.ip_end], max_mss);
            }
        }
        // A first fragment goes through the NAT like any packet; what it becomes is recorded for the rest.
        let first_fragment = l3
            .is_first_fragment()
            .then(|| frame.get(l3.ip_start..).and_then(ipv4::fixed).map(FragmentKey::of));
        // From inside, the next hop first: a packet that cannot leave (no route, or an unresolved next hop and no
        // room to wait for it) must not take a NAT session and port. The NAT does not change the destination of a
        // packet that leaves by the outside, so the answer serves `route` below. (A hairpinned packet, to one of
        // our egress IPs, goes back inside and is routed there.)
        let mut outside_l2 = None;
        if leg.is_outbound() {
            let dst = Ipv4Addr::from(read_u32(frame, l3.ip_start + ipv4::DST));
            // With routes by source (policy routing), the route depends on the egress IP the NAT picks: `route`
            // looks it up after the translation.
            if !self.nat.is_egress_ip(dst) && !self.snapshot.routes_by_source() {
                match self.snapshot.lookup_l2(Side::Outside, dst) {
                    Ok(l2) => outside_l2 = Some(l2),
                    Err(NextHop::NoNeighbour(hop)) => {
                        if self.held.len() >= HOLD_FRAMES || l3.ip_end > HOLD_FRAME_BYTES {
                            self.request_resolution(now, hop);
                            return Err(DropReason::NoNeighbour);
                        }
                    }
                    Err(_) => return Err(DropReason::NoRoute),
                }
            }
        }

        let out = match self.translate(now, leg, &mut frame[l3.ip_start..l3.ip_end]) {
            Ok(Next::Out(side)) => side,
            Err(DropReason::OutOfPorts) if leg.is_outbound() => {
                let Some(len) = self.out_of_ports_reply(now, frame, &l3) else {
                    return Err(DropReason::OutOfPorts);
                };
                // Answered, and still a drop.
                self.stats.count_drop(DropReason::OutOfPorts);
                return Ok(Action::Reply { out: Side::Inside, len });
            }
            Err(reason) => return Err(reason),
            Ok(Next::Punted) => return Ok(Action::Punted),
            Ok(Next::HandOff(worker, kind)) => {
                if let Some(key) = first_fragment.flatten() {
                    self.record_fragment(now, key, FragmentRoute::HandOff { worker, kind })?;
                }
                self.handoffs.push(self.worker, worker, kind, &frame[..l3.ip_end])?;
                self.stats.handed_off.inc();
                return Ok(Action::HandedOff);
            }
        };
        if let Some(key) = first_fragment.flatten() {
            let translated = frame.get(l3.ip_start..).and_then(ipv4::fixed).ok_or(DropReason::Truncated)?;
            let (src, dst) = (ipv4::src(translated), ipv4::dst(translated));
            self.record_fragment(now, key, FragmentRoute::Out { out, src, dst })?;
        }

        // The NAT may have shortened the packet (an inside ICMP error's quote is cut to 8 bytes): send what the IP
        // header now says, never more than arrived.
        let total_len = usize::from(read_u16(frame, l3.ip_start + ipv4::TOTAL_LEN));
        let ip_end = (l3.ip_start + total_len).min(l3.ip_end);
        let l3 = ipv4::Frame { ip_end, ..l3 };
        let l2 = if out == Side::Outside { outside_l2 } else { None };
        self.route_or_hold(now, out, frame, l3, l2)
    }

    /// [`Pipeline::route`], and when the next hop's MAC is unknown, keep the frame until the neighbour resolves
    /// (or a deadline), as the kernel's ARP queue does.
    #[inline(always)]
    fn route_or_hold(
        &mut self,
        now: Instant,
        out: Side,
        frame: &mut [u8],
        l3: ipv4::Frame,
        known_l2: Option<[u8; 12]>,
    ) -> Result<Action, DropReason> {
        match self.route(now, out, frame, l3.ip_start, l3.ip_end, known_l2) {
            Err(DropReason::NoNeighbour)
                if self.held.len() < HOLD_FRAMES && l3.ip_end <= HOLD_FRAME_BYTES =>
            {
                self.hold(now, out, frame, l3);
                Ok(Action::Held)
            }
            result => result,
        }
    }

    #[cold]
    fn hold(&mut self, now: Instant, out: Side, frame: &[u8], l3: ipv4::Frame) {
        let mut held = HeldFrame {
            out,
            since: now,
            allowed: self.allowed.take(),
            ip_start: l3.ip_start as u16,
            len: l3.ip_end as u16,
            bytes: [0; HOLD_FRAME_BYTES],
        };
        held.bytes[..l3.ip_end].copy_from_slice(&frame[..l3.ip_end]);
        self.held.push(held);
    }

    /// Routes a translated frame out of `out`: next-hop lookup (unless `known_l2`, the MACs, is known), TTL
    /// decrement, MAC rewrite. Always inlined: once per forwarded packet, and its result need not go through memory.
    #[inline(always)]
    fn route(
        &mut self,
        now: Instant,
        out: Side,
        frame: &mut [u8],
        ip_start: usize,
        ip_end: usize,
        known_l2: Option<[u8; 12]>,
    ) -> Result<Action, DropReason> {
        // The MACs and the fixed IPv4 header as arrays, split once: no bounds check per field. Every frame routed
        // here was parsed, so both are there.
        let (l2, l3) = frame.split_at_mut(ip_start.min(frame.len()));
        let (Some(macs), Some(ip)) = (l2.first_chunk_mut::<{ ethernet::MACS_LEN }>(), ipv4::fixed_mut(l3))
        else {
            return Err(DropReason::Truncated);
        };
        let dst = Ipv4Addr::from(ipv4::dst(ip));
        let src = Ipv4Addr::from(ipv4::src(ip));
        let l2 = match known_l2.map_or_else(|| self.snapshot.lookup_l2_from(out, src, dst), Ok) {
            Ok(l2) => l2,
            Err(NextHop::NoNeighbour(hop)) => {
                self.request_resolution(now, hop);
                return Err(DropReason::NoNeighbour);
            }
            Err(_) => return Err(DropReason::NoRoute),
        };

        // TTL and protocol share one 16-bit word of the header checksum. The TTL is its high byte (and > 1), so
        // the decrement lowers the word by 0x0100 whatever the protocol: RFC 1624's ~m + m' is ~0x0100 + 0.
        ip[ipv4::TTL] -= 1;
        let check = u16::from_be_bytes([ip[ipv4::CHECKSUM], ip[ipv4::CHECKSUM + 1]]);
        ip[ipv4::CHECKSUM..ipv4::CHECKSUM + 2]
            .copy_from_slice(&checksum::update16(check, 0x0100, 0).to_be_bytes());

        *macs = l2;
        Ok(Action::Forward { out, len: ip_end })
    }

    /// Whether frames wait for a neighbour.
    pub fn has_held(&self) -> bool {
        !self.held.is_empty() || !self.held_fragments.is_empty()
    }

    /// Retries the frames waiting for a neighbour: those whose neighbour is now known go to `emit(out, frame)`;
    /// those still unresolved after [`HOLD_NANOS`] (or now without a route) are dropped and counted.
    pub fn release_held(&mut self, now: Instant, mut emit: impl FnMut(Side, &[u8])) {
        self.release_held_fragments(now, &mut emit);
        let mut i = 0;
        while i < self.held.len() {
            let mut held = self.held[i];
            let (ip_start, len) = (usize::from(held.ip_start), usize::from(held.len));
            // `route` leaves the frame untouched unless it forwards it; its resolution requests are rate-limited.
            let routed = self.route(now, held.out, &mut held.bytes[..len], ip_start, len, None);
            if routed == Err(DropReason::NoNeighbour)
                && now.saturating_since(held.since).as_nanos() < u128::from(HOLD_NANOS)
            {
                i += 1;
                continue;
            }
            // `remove`, not `swap_remove`: what waited leaves in the order it came.
            self.held.remove(i);
            match routed {
                Ok(Action::Forward { out, len }) => {
                    emit(out, &held.bytes[..len]);
                    if let Some(decision) = held.allowed {
                        self.count_allowed(decision);
                    }
                }
                Ok(_) => {}
                Err(reason) => self.stats.count_drop(reason),
            }
        }
    }

    /// Records what a datagram's first fragment became; a full table drops the fragment (the rest of the datagram
    /// could not follow it).
    fn record_fragment(
        &mut self,
        now: Instant,
        key: FragmentKey,
        route: FragmentRoute,
    ) -> Result<(), DropReason> {
        if self.fragments.insert(now, key, route) {
            Ok(())
        } else {
            Err(DropReason::FragmentTableFull)
        }
    }

    /// A fragment after the first (RFC 4787 REQ-14): no transport header, so it follows its datagram's first
    /// fragment: the same address rewrite and the same way out. One that comes before its first waits for it
    /// (at most [`HOLD_FRAGMENTS`], for [`HOLD_FRAGMENT_NANOS`]).
    #[cold]
    fn forward_later_fragment(
        &mut self,
        now: Instant,
        frame: &mut [u8],
        l3: ipv4::Frame,
    ) -> Result<Action, DropReason> {
        let key = frame
            .get(l3.ip_start..)
            .and_then(ipv4::fixed)
            .map(FragmentKey::of)
            .ok_or(DropReason::Truncated)?;
        match self.fragments.lookup(now, &key) {
            Some(route) => self.follow_first_fragment(now, frame, l3, route),
            None if self.held_fragments.len() < HOLD_FRAGMENTS && l3.ip_end <= HOLD_FRAME_BYTES => {
                let mut held = HeldFrame {
                    out: Side::Outside,
                    since: now,
                    allowed: None,
                    ip_start: l3.ip_start as u16,
                    len: l3.ip_end as u16,
                    bytes: [0; HOLD_FRAME_BYTES],
                };
                held.bytes[..l3.ip_end].copy_from_slice(&frame[..l3.ip_end]);
                self.held_fragments.push(held);
                Ok(Action::Held)
            }
            None => Err(DropReason::FragmentUnmatched),
        }
    }

    /// Sends a later fragment the way its first went: rewritten and routed, or handed to the first's worker.
    fn follow_first_fragment(
        &mut self,
        now: Instant,
        frame: &mut [u8],
        l3: ipv4::Frame,
        route: FragmentRoute,
    ) -> Result<Action, DropReason> {
        match route {
            FragmentRoute::HandOff { worker, kind } => {
                self.handoffs.push(self.worker, worker, kind, &frame[..l3.ip_end])?;
                self.stats.handed_off.inc();
                Ok(Action::HandedOff)
            }
            FragmentRoute::Out { out, src, dst } => {
                let ip =
                    frame.get_mut(l3.ip_start..).and_then(ipv4::fixed_mut).ok_or(DropReason::Truncated)?;
                for (at, new) in [(ipv4::SRC, src), (ipv4::DST, dst)] {
                    let old = read_u32(ip, at);
                    if old != new {
                        write_u32(ip, at, new);
                        let check = read_u16(ip, ipv4::CHECKSUM);
                        write_u16(ip, ipv4::CHECKSUM, checksum::update32(check, old, new));
                    }
                }
                self.route_or_hold(now, out, frame, l3, None)
            }
        }
    }

    /// Later fragments whose first has come since go its way (to `emit`, or handed over); those that waited
    /// [`HOLD_FRAGMENT_NANOS`] in vain are dropped as `fragment_unmatched`.
    fn release_held_fragments(&mut self, now: Instant, emit: &mut impl FnMut(Side, &[u8])) {
        let mut i = 0;
        while i < self.held_fragments.len() {
            let mut held = self.held_fragments[i];
            let (ip_start, len) = (usize::from(held.ip_start), usize::from(held.len));
            let key = &held.bytes.get(ip_start..).and_then(ipv4::fixed).map(FragmentKey::of);
            let route = key.and_then(|key| self.fragments.lookup(now, &key));
            let waited = now.saturating_since(held.since).as_nanos() >= u128::from(HOLD_FRAGMENT_NANOS);
            if route.is_none() && !waited {
                i += 1;
                continue;
            }
            self.held_fragments.remove(i);
            let Some(route) = route else {
                self.stats.count_drop(DropReason::FragmentUnmatched);
                continue;
            };
            let l3 = ipv4::Frame {
                ip_start,
                ip_end: len,
                header_len: ipv4::MIN_HEADER_LEN,
                fragment: ipv4::FRAGMENT_OFFSET_MASK,
            };
            match self.follow_first_fragment(now, &mut held.bytes[..len], l3, route) {
                Ok(Action::Forward { out, len }) => emit(out, &held.bytes[..len]),
                Ok(_) => {}
                Err(reason) => self.stats.count_drop(reason),
            }
        }
    }

    /// Policy and NAT: receives the IPv4 packet (header through total length, padding excluded), already
    /// validated and with TTL > 1. From inside, `Nat::outbound` judges new flows by the policy snapshot and
    /// translates the source; from outside, `Nat::inbound` translates replies back. A packet whose endpoint (inside
    /// source, or egress port of a reply) another worker owns is handed to that worker, which runs this same step
    /// on it. The forwarding step after it routes by the (translated) destination and fixes TTL and MACs.
    #[inline]
    fn translate(&mut self, now: Instant, leg: Leg, packet: &mut [u8]) -> Result<Next, DropReason> {
        if leg.is_outbound() {
            // Reverse-path check of a new flow's source (established flows passed it when they began).
            let (validate, inside) = (self.validate_sources, &self.snapshot.inside);
            let admit = |src| !validate || inside.routes_to(src);
            let result = self.nat.outbound_admitting(now, packet, &self.policy_snapshot, admit);
            let decision = self.nat.take_decision();
            if let Some(decision) = decision {
                self.observe(now, decision, packet);
            }
            return match result? {
                Outbound::Forward => Ok(Next::Out(Side::Outside)),
                Outbound::DryRunDenied => {
                    self.stats.flows_dry_run_denied.inc();
                    Ok(Next::Out(Side::Outside))
                }
                Outbound::Hairpin => Ok(Next::Out(Side::Inside)),
                Outbound::HairpinOtherWorker(worker) => Ok(Next::HandOff(worker, HandoffKind::Hairpin)),
                Outbound::OtherWorker(worker) if matches!(leg, Leg::Arrived(_)) => {
                    Ok(Next::HandOff(worker, HandoffKind::Outbound))
                }
                // Handed to us because we own the endpoint, yet we do not: never bounce it again.
                Outbound::OtherWorker(_) => Err(DropReason::NoMapping),
                Outbound::L7 => self.punt(packet, decision),
            };
        }
        let result = match leg {
            Leg::HandedOver(HandoffKind::Hairpin) => self.nat.inbound_hairpin(now, packet)?,
            _ => self.nat.inbound(now, packet)?,
        };
        match result {
            Inbound::Forward => Ok(Next::Out(Side::Inside)),
            Inbound::OtherWorker(worker) if matches!(leg, Leg::Arrived(_)) => {
                Ok(Next::HandOff(worker, HandoffKind::Inbound))
            }
            // Handed to us because we own the port, yet we do not: never bounce it again.
            Inbound::OtherWorker(_) => Err(DropReason::NoMapping),
        }
    }

    /// Hands a packet of an `l7` flow to the L7 path, with its rule and the egress IP its group leaves from.
    fn punt(&mut self, packet: &[u8], decision: Option<Decision>) -> Result<Next, DropReason> {
        let (Some(punt), Some(decision)) = (&self.l7, decision) else {
            return Err(DropReason::L7Unavailable);
        };
        let (Some(group), Some(rule)) = (decision.group, decision.rule) else {
            return Err(DropReason::L7Unavailable);
        };
        let src = Ipv4Addr::from(crate::wire::read_u32(packet, ipv4::SRC));
        let egress = self.policy_snapshot.egress_ip_for(group, src).ok_or(DropReason::NoEgressIp)?;
        let punted =
            PuntedPacket::new(packet, self.worker, rule.0, egress).ok_or(DropReason::FrameTooLarge)?;
        if punt.to_l7(punted) {
            self.stats.l7_punted.inc();
            Ok(Next::Punted)
        } else {
            Err(DropReason::L7QueueFull)
        }
    }

    /// The L7 path's wake-up socket for this worker (for its `poll()` set), when there is an L7 path.
    pub fn l7_wake_fd(&self) -> Option<std::os::fd::RawFd> {
        self.l7.as_ref()?.worker_wake_fd(self.worker)
    }

    /// Before the worker sleeps: false if the L7 path already has packets for it.
    pub fn l7_park(&self) -> bool {
        self.l7.as_ref().is_none_or(|p| p.worker_park(self.worker))
    }

    /// After the worker woke; `woken` if its L7 wake-up socket was readable.
    pub fn l7_unpark(&self, woken: bool) {
        if let Some(p) = &self.l7 {
            p.worker_unpark(self.worker, woken);
        }
    }

    /// Sends the L7 path's packets for clients this worker owes: each framed for its next hop on the inside and
    /// passed to `send`. Returns how many were taken (at most `budget`).
    pub fn drain_l7(&mut self, budget: usize, frame: &mut [u8], mut send: impl FnMut(&[u8])) -> usize {
        let Some(punt) = self.l7.clone() else { return 0 };
        let mut taken = 0;
        while taken < budget {
            let Some(p) = punt.pop_for_worker(self.worker) else { break };
            taken += 1;
            let packet = p.packet();
            let len = ethernet::HEADER_LEN + packet.len();
            // (The L7 stack writes whole IPv4 packets within its MTU: both are never expected, and still counted.)
            let Some(out) = frame.get_mut(..len) else {
                self.stats.count_drop(DropReason::FrameTooLarge);
                continue;
            };
            let Some(dst) = ipv4::fixed(packet).map(|h| Ipv4Addr::from(ipv4::dst(h))) else {
                self.stats.count_drop(DropReason::BadIpLength);
                continue;
            };
            match self.snapshot.lookup_l2(Side::Inside, dst) {
                Ok(macs) => {
                    out[..ethernet::MACS_LEN].copy_from_slice(&macs);
                    out[ethernet::ETHERTYPE..ethernet::HEADER_LEN]
                        .copy_from_slice(&ethernet::ethertype::IPV4.to_be_bytes());
                    out[ethernet::HEADER_LEN..].copy_from_slice(packet);
                    send(out);
                }
                Err(NextHop::NoNeighbour(hop)) => {
                    // The client just sent us a packet, so this is rare; TCP retransmits once it resolves.
                    let now = Instant::monotonic();
                    self.request_resolution(now, hop);
                    self.stats.count_drop(DropReason::NoNeighbour);
                }
                Err(_) => self.stats.count_drop(DropReason::NoRoute),
            }
        }
        taken
    }

    fn request_resolution(&mut self, now: Instant, hop: Ipv4Addr) {
        if let Some((last, at)) = self.last_resolve_request {
            if last == hop && now.saturating_since(at).as_nanos() < u128::from(RESOLVE_REPEAT_NANOS) {
                return;
            }
        }
        self.last_resolve_request = Some((hop, now));
        self.next_hops.resolve.request(hop);
    }
}

#[cfg(test)]
mod tests;
