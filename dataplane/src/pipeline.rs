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

use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::{audit_limiter, AuditEvent, AuditQueue};
use crate::drop::DropReason;
use crate::fragments::{FragmentKey, FragmentRoute, FragmentTable};
use crate::handoff::{HandoffKind, Handoffs};
use crate::icmp::{IcmpErrors, Unreachable, MAX_REPLY_FRAME};
use crate::nat::{Inbound, Nat, NatConfig, Outbound};
use crate::nexthop::{NextHop, NextHopTable, ResolveQueue};
use crate::policy::{Decision, PolicySnapshot, SharedPolicy, Verdict};
use crate::stats::{RuleHits, WorkerStats};
use crate::time::{Instant, TokenBucket};
use crate::wire::{checksum, ETH_HEADER_LEN};
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
    /// The frame was dropped (its reason counted) and answered: transmit the first `len` bytes of
    /// [`Pipeline::reply_frame`] out of `out` before the next `process` call; this frame can be released.
    Reply { out: Side, len: usize },
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// Repeat a resolution request for the same next hop at most this often (the queue is not a per-packet log).
const RESOLVE_REPEAT_NANOS: u64 = 100_000_000;

/// Where the layers of a validated IPv4 frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Frame {
    /// Offset of the IPv4 header in the frame.
    pub ip_start: usize,
    /// Offset just past the IPv4 total length (any Ethernet padding starts here).
    pub ip_end: usize,
    /// IPv4 header length in bytes (IHL × 4); the transport header starts at `ip_start + header_len`.
    pub header_len: usize,
    /// The header's more-fragments flag and fragment offset (0: not a fragment).
    pub fragment: u16,
}

impl Ipv4Frame {
    /// A fragment other than the first: it carries no transport header.
    #[inline]
    pub fn is_later_fragment(&self) -> bool {
        self.fragment & IPV4_FRAGMENT_OFFSET_MASK != 0
    }

    /// The first fragment of a fragmented datagram: it carries the transport header.
    #[inline]
    pub fn is_first_fragment(&self) -> bool {
        self.fragment == IPV4_MORE_FRAGMENTS
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Steps 1 and 2: Ethernet (+ one tag) and IPv4 validation. Does not look at the TTL. Always inlined: it runs once
/// per packet, and as a call it cost 30 instructions more per packet (measured when a second caller had made the
/// compiler outline it).
#[inline(always)]
pub fn parse_ipv4_frame(frame: &[u8]) -> Result<Ipv4Frame, DropReason> {
    let ethertype = be16(frame, 12).ok_or(DropReason::Truncated)?;
    let ip_start = ETH_HEADER_LEN;
    if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        // The interfaces are not configured for VLANs: a tag the sender chose must never reach the other side.
        return Err(DropReason::VlanTagged);
    }
    match ethertype {
        ETHERTYPE_IPV4 => {}
        ETHERTYPE_IPV6 => return Err(DropReason::Ipv6Unsupported),
        _ => return Err(DropReason::NotIp),
    }
    let ip = frame.get(ip_start..).unwrap_or(&[]);
    // The fixed header as an array: its fields are read without bounds checks.
    let Some(fixed) = ip.first_chunk::<IPV4_MIN_HEADER_LEN>() else {
        return Err(DropReason::Truncated);
    };
    if fixed[0] >> 4 != 4 {
        return Err(DropReason::IpVersionMismatch);
    }
    let header_len = usize::from(fixed[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER_LEN || header_len > ip.len() {
        return Err(DropReason::BadIpHeader);
    }
    let total_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if total_len < header_len || total_len > ip.len() {
        return Err(DropReason::BadIpLength);
    }
    if !checksum::verify(&ip[..header_len]) {
        return Err(DropReason::BadIpChecksum);
    }
    if header_len > IPV4_MIN_HEADER_LEN {
        check_ipv4_options(&ip[IPV4_MIN_HEADER_LEN..header_len])?;
    }
    let fragment =
        u16::from_be_bytes([fixed[6], fixed[7]]) & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET_MASK);
    Ok(Ipv4Frame { ip_start, ip_end: ip_start + total_len, header_len, fragment })
}

/// Lowers the MSS option of a TCP SYN in `packet` (an IPv4 packet with a `header_len`-byte header) to `max_mss`,
/// keeping the TCP checksum valid (RFC 1624). Anything else is left alone.
fn clamp_syn_mss(packet: &mut [u8], header_len: usize, max_mss: u16) {
    const SYN: u8 = 0x02;
    if packet.get(9) != Some(&crate::wire::ip_proto::TCP) {
        return;
    }
    let Some(tcp) = packet.get_mut(header_len..) else { return };
    if tcp.len() < 20 || tcp[13] & SYN == 0 {
        return;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    let Some((head, _)) = tcp.split_at_mut_checked(data_offset) else { return };
    let (fixed, mut options) = head.split_at_mut(20.min(head.len()));
    while let Some(&kind) = options.first() {
        match kind {
            0 => break,
            1 => options = &mut options[1..],
            _ => {
                let len = usize::from(options.get(1).copied().unwrap_or(0));
                if len < 2 || len > options.len() {
                    break;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([options[2], options[3]]);
                    if mss > max_mss {
                        options[2..4].copy_from_slice(&max_mss.to_be_bytes());
                        let check = u16::from_be_bytes([fixed[16], fixed[17]]);
                        fixed[16..18].copy_from_slice(&checksum::update16(check, mss, max_mss).to_be_bytes());
                    }
                    return;
                }
                options = &mut options[len..];
            }
        }
    }
}

/// The fixed IPv4 header at `ip_start` of a parsed frame.
#[inline]
fn ip_fixed(frame: &[u8], ip_start: usize) -> Option<&[u8; 20]> {
    frame.get(ip_start..)?.first_chunk::<20>()
}

/// IPv4 options (rare, so walked only when present): well-formed, and no loose or strict source route (RFC 7126
/// 4.3/4.4: a router must not forward source-routed packets; they steer traffic past filters).
#[cold]
fn check_ipv4_options(mut options: &[u8]) -> Result<(), DropReason> {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    const LSRR: u8 = 0x83;
    const SSRR: u8 = 0x89;
    while let Some(&kind) = options.first() {
        match kind {
            EOL => break,
            NOP => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1).ok_or(DropReason::BadIpHeader)?);
                if len < 2 || len > options.len() {
                    return Err(DropReason::BadIpHeader);
                }
                if kind == LSRR || kind == SSRR {
                    return Err(DropReason::SourceRoute);
                }
                options = &options[len..];
            }
        }
    }
    Ok(())
}

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
    /// Clamp the MSS of TCP SYNs to the smaller interface MTU less 40 (`[dataplane] clamp_mss`).
    clamp_mss: bool,
    /// Drop packets from inside whose source the inside interface has no route to (`[dataplane]
    /// source_validation`, on by default).
    validate_sources: bool,
}

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
            icmp_errors,
            icmp_bucket: TokenBucket::new(icmp_errors.per_sec, icmp_errors.burst, Instant::ZERO),
            icmp_ip_id: 0,
            reply: vec![0; MAX_REPLY_FRAME].into_boxed_slice(),
            allowed: None,
            fragments: FragmentTable::default(),
            held_fragments: Vec::with_capacity(HOLD_FRAGMENTS),
            clamp_mss: false,
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
    pub fn with_audit(mut self, queue: Arc<AuditQueue>) -> Pipeline {
        self.audit = Some(queue);
        self
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
    fn out_of_ports_reply(&mut self, now: Instant, frame: &[u8], l3: &Ipv4Frame) -> Option<usize> {
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
        l3: &Ipv4Frame,
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
        l3: &Ipv4Frame,
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
        let l3 = parse_ipv4_frame(frame)?;
        let ttl_at = l3.ip_start + 8;
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
        if self.clamp_mss {
            let mtu = self.snapshot.inside.mtu.min(self.snapshot.outside.mtu);
            if mtu > 40 {
                let max_mss = (mtu - 40).min(u32::from(u16::MAX)) as u16;
                clamp_syn_mss(&mut frame[l3.ip_start..l3.ip_end], l3.header_len, max_mss);
            }
        }
        // A first fragment goes through the NAT like any packet; what it becomes is recorded for the rest.
        let first_fragment =
            l3.is_first_fragment().then(|| ip_fixed(frame, l3.ip_start).map(FragmentKey::of));
        // From inside, the next hop first: a packet that cannot leave (no route, or an unresolved next hop and no
        // room to wait for it) must not take a NAT session and port. The NAT does not change the destination of a
        // packet that leaves by the outside, so the answer serves `route` below. (A hairpinned packet, to one of
        // our egress IPs, goes back inside and is routed there.)
        let mut outside_l2 = None;
        if leg.is_outbound() {
            let dst = Ipv4Addr::from(u32::from_be_bytes([
                frame[l3.ip_start + 16],
                frame[l3.ip_start + 17],
                frame[l3.ip_start + 18],
                frame[l3.ip_start + 19],
            ]));
            if !self.nat.is_egress_ip(dst) {
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
            let translated = ip_fixed(frame, l3.ip_start).ok_or(DropReason::Truncated)?;
            let (src, dst) = (
                u32::from_be_bytes([translated[12], translated[13], translated[14], translated[15]]),
                u32::from_be_bytes([translated[16], translated[17], translated[18], translated[19]]),
            );
            self.record_fragment(now, key, FragmentRoute::Out { out, src, dst })?;
        }

        // The NAT may have shortened the packet (an inside ICMP error's quote is cut to 8 bytes): send what the IP
        // header now says, never more than arrived.
        let total_len = usize::from(u16::from_be_bytes([frame[l3.ip_start + 2], frame[l3.ip_start + 3]]));
        let ip_end = (l3.ip_start + total_len).min(l3.ip_end);
        let l3 = Ipv4Frame { ip_end, ..l3 };
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
        l3: Ipv4Frame,
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
    fn hold(&mut self, now: Instant, out: Side, frame: &[u8], l3: Ipv4Frame) {
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
        let (Some(macs), Some(ip)) = (l2.first_chunk_mut::<12>(), l3.first_chunk_mut::<20>()) else {
            return Err(DropReason::Truncated);
        };
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let l2 = match known_l2.map_or_else(|| self.snapshot.lookup_l2(out, dst), Ok) {
            Ok(l2) => l2,
            Err(NextHop::NoNeighbour(hop)) => {
                self.request_resolution(now, hop);
                return Err(DropReason::NoNeighbour);
            }
            Err(_) => return Err(DropReason::NoRoute),
        };

        // TTL and protocol share one 16-bit word of the header checksum. The TTL is its high byte (and > 1), so
        // the decrement lowers the word by 0x0100 whatever the protocol: RFC 1624's ~m + m' is ~0x0100 + 0.
        ip[8] -= 1;
        let check = u16::from_be_bytes([ip[10], ip[11]]);
        ip[10..12].copy_from_slice(&checksum::update16(check, 0x0100, 0).to_be_bytes());

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
        l3: Ipv4Frame,
    ) -> Result<Action, DropReason> {
        let key = ip_fixed(frame, l3.ip_start).map(FragmentKey::of).ok_or(DropReason::Truncated)?;
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
        l3: Ipv4Frame,
        route: FragmentRoute,
    ) -> Result<Action, DropReason> {
        match route {
            FragmentRoute::HandOff { worker, kind } => {
                self.handoffs.push(self.worker, worker, kind, &frame[..l3.ip_end])?;
                self.stats.handed_off.inc();
                Ok(Action::HandedOff)
            }
            FragmentRoute::Out { out, src, dst } => {
                let ip = frame.get_mut(l3.ip_start..l3.ip_start + 20).ok_or(DropReason::Truncated)?;
                for (at, new) in [(12, src), (16, dst)] {
                    let old = u32::from_be_bytes([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
                    if old != new {
                        ip[at..at + 4].copy_from_slice(&new.to_be_bytes());
                        let check = u16::from_be_bytes([ip[10], ip[11]]);
                        ip[10..12].copy_from_slice(&checksum::update32(check, old, new).to_be_bytes());
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
            let key = ip_fixed(&held.bytes, ip_start).map(FragmentKey::of);
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
            let l3 = Ipv4Frame { ip_start, ip_end: len, header_len: 20, fragment: IPV4_FRAGMENT_OFFSET_MASK };
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
            if let Some(decision) = self.nat.take_decision() {
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
                Outbound::L7 => Err(DropReason::L7Unavailable),
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
mod tests {
    use super::*;
    use crate::nexthop::{InterfaceTable, Route};
    use crate::policy::{Action as PolicyAction, GroupId, PolicyBuilder, PortRange, ProtoMatch, RuleSpec};
    use proptest::prelude::*;

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
    const EXT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
    const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lab_table(with_ext_neighbour: bool) -> NextHopTable {
        NextHopTable {
            inside: InterfaceTable::new(
                GW_IN_MAC,
                vec![Route { destination: ip("10.10.0.0"), prefix_len: 16, gateway: None }],
                vec![(ip("10.10.0.2"), CLIENT_MAC)],
            ),
            outside: InterfaceTable::new(
                GW_OUT_MAC,
                vec![
                    Route { destination: ip("0.0.0.0"), prefix_len: 0, gateway: Some(ip("192.0.2.2")) },
                    Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None },
                ],
                if with_ext_neighbour { vec![(ip("192.0.2.2"), EXT_MAC)] } else { vec![] },
            ),
        }
    }

    fn pipeline(table: NextHopTable) -> Pipeline {
        Pipeline::single(
            Arc::new(WorkerStats::default()),
            NextHops::fixed(table),
            Arc::new(allow_all()),
            &small_nat(),
        )
    }

    fn rule(
        group: GroupId,
        to: &str,
        proto: ProtoMatch,
        ports: &[(u16, u16)],
        action: PolicyAction,
    ) -> RuleSpec {
        let ports = ports.iter().map(|&(first, last)| PortRange { first, last }).collect();
        RuleSpec::new(group, vec![to.parse().unwrap()], proto, ports, action)
    }

    fn small_nat() -> NatConfig {
        NatConfig { max_flows: 4096, max_flows_per_source: 1024, ..NatConfig::default() }
    }

    /// One group holding every IPv4 source, allowed everywhere.
    fn allow_all() -> SharedPolicy {
        let mut b = PolicyBuilder::new();
        let g = b.add_group("all", vec![EGRESS_IP]);
        b.add_source(g, "0.0.0.0/0".parse().unwrap());
        b.add_rule(rule(g, "0.0.0.0/0", ProtoMatch::Any, &[], PolicyAction::Allow));
        crate::policy::shared(b.build(1).unwrap())
    }

    /// 10.10.0.0/24: UDP 53 to 203.0.113.0/24 allowed, 203.0.113.128/25 denied by rule, TCP 443 to l7;
    /// everything else default-denied. 10.10.9.0/24 is in no group.
    fn lab_policy(dry_run: bool, generation: u64) -> PolicySnapshot {
        let mut b = PolicyBuilder::new();
        b.dry_run(dry_run);
        let g = b.add_group("web", vec![EGRESS_IP]);
        b.add_source(g, "10.10.0.0/24".parse().unwrap());
        b.add_rule(rule(g, "203.0.113.0/24", ProtoMatch::Udp, &[(53, 53)], PolicyAction::Allow));
        b.add_rule(rule(g, "203.0.113.128/25", ProtoMatch::Any, &[], PolicyAction::Deny));
        let mut l7 = rule(g, "198.51.100.0/24", ProtoMatch::Tcp, &[(443, 443)], PolicyAction::L7);
        l7.hosts = vec![crate::policy::HostPattern::parse("example.com").unwrap()];
        b.add_rule(l7);
        b.build(generation).unwrap()
    }

    fn tcp_frame(src: [u8; 4], dst: [u8; 4], dst_port: u16) -> Vec<u8> {
        let builder = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC)
            .ipv4(src, dst, 64)
            .tcp(40000, dst_port, 1, 1024)
            .syn();
        let mut out = Vec::with_capacity(builder.size(0));
        builder.write(&mut out, &[]).unwrap();
        out
    }

    #[test]
    fn policy_judges_packets_from_inside_and_counts_each_denial_under_its_reason() {
        let policy = Arc::new(crate::policy::shared(lab_policy(false, 1)));
        let stats = Arc::new(WorkerStats::default());
        let audit = Arc::new(AuditQueue::new(16));
        let mut p = Pipeline::single(stats.clone(), NextHops::fixed(lab_table(true)), policy, &small_nat())
            .with_audit(audit.clone());
        let mut send = |f: Vec<u8>| p.process(Instant::ZERO, Side::Inside, &mut f.clone());
        assert!(matches!(
            send(udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"q")),
            Action::Forward { .. }
        ));
        assert_eq!(
            send(udp_frame([10, 10, 0, 2], [203, 0, 113, 200], 64, b"q")),
            Action::Drop(DropReason::PolicyDeny)
        );
        assert_eq!(
            send(tcp_frame([10, 10, 0, 2], [203, 0, 113, 10], 80)),
            Action::Drop(DropReason::DefaultDeny)
        );
        assert_eq!(send(tcp_frame([10, 10, 9, 2], [203, 0, 113, 10], 53)), Action::Drop(DropReason::NoGroup));
        assert_eq!(
            send(tcp_frame([10, 10, 0, 2], [198, 51, 100, 7], 443)),
            Action::Drop(DropReason::L7Unavailable)
        );
        for reason in
            [DropReason::PolicyDeny, DropReason::DefaultDeny, DropReason::NoGroup, DropReason::L7Unavailable]
        {
            assert_eq!(stats.drops(reason), 1, "{reason:?}");
        }
        // Which rule decided: rule 0 (allow) once, rule 1 (deny) once, rule 2 (l7) once.
        let hits = stats.rule_hits.load();
        assert_eq!((hits.generation, hits.len()), (1, 3));
        assert_eq!((hits.get(0), hits.get(1), hits.get(2)), (1, 1, 1));
        assert_eq!(stats.flows_allowed.get(), 1);
        // One audit event per denial, in order, with the flow and the deciding rule.
        let events: Vec<AuditEvent> = std::iter::from_fn(|| audit.pop()).collect();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!((events[0].dst, events[0].rule), (ip("203.0.113.200"), Some(crate::policy::RuleId(1))));
        assert_eq!((events[1].dst_port, events[1].rule), (80, None));
        assert_eq!((events[2].src, events[2].group), (ip("10.10.9.2"), None));
    }

    #[test]
    fn dry_run_forwards_what_it_would_deny_and_counts_it() {
        let policy = Arc::new(crate::policy::shared(lab_policy(true, 1)));
        let stats = Arc::new(WorkerStats::default());
        let mut p = Pipeline::single(stats.clone(), NextHops::fixed(lab_table(true)), policy, &small_nat());
        let mut f = tcp_frame([10, 10, 0, 2], [203, 0, 113, 10], 80);
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
        assert_eq!(stats.flows_dry_run_denied.get(), 1);
        assert_eq!(stats.drops(DropReason::DefaultDeny), 0);
    }

    #[test]
    fn a_swapped_policy_takes_effect_at_the_next_batch() {
        let policy = Arc::new(crate::policy::shared(lab_policy(false, 1)));
        let mut p = Pipeline::single(
            Arc::new(WorkerStats::default()),
            NextHops::fixed(lab_table(true)),
            policy.clone(),
            &small_nat(),
        );
        let frame = tcp_frame([10, 10, 0, 2], [203, 0, 113, 10], 80);
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut frame.clone()),
            Action::Drop(DropReason::DefaultDeny)
        );
        policy.store(Arc::new({
            let mut b = PolicyBuilder::new();
            let g = b.add_group("web", vec![EGRESS_IP]);
            b.add_source(g, "10.10.0.0/24".parse().unwrap());
            b.add_rule(rule(g, "203.0.113.0/24", ProtoMatch::Tcp, &[(80, 80)], PolicyAction::Allow));
            b.build(2).unwrap()
        }));
        // Within the batch the old snapshot holds; the next batch sees the new one.
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut frame.clone()),
            Action::Drop(DropReason::DefaultDeny)
        );
        p.begin_batch();
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut frame.clone()), Action::Forward { .. }));
    }

    #[test]
    fn udp_header_cut_short_inside_a_consistent_ip_packet_is_truncated() {
        let mut p = pipeline(lab_table(true));
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"");
        // Cut the packet inside the UDP header and fix the IPv4 total length and checksum to match.
        let cut = 14 + 20 + 3;
        f.truncate(cut);
        f[16..18].copy_from_slice(&(23u16).to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum::compute(&f[14..34]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::Truncated));
    }

    fn udp_frame(src: [u8; 4], dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        udp_frame_from_port(src, 4000, dst, ttl, payload)
    }

    fn udp_frame_from_port(src: [u8; 4], sport: u16, dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        let builder =
            etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC).ipv4(src, dst, ttl).udp(sport, 53);
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn ip_header_ok(frame: &[u8], ip_start: usize) -> bool {
        let ihl = usize::from(frame[ip_start] & 0xf) * 4;
        checksum::verify(&frame[ip_start..ip_start + ihl])
    }

    #[test]
    fn forwards_udp_outward_with_ttl_decremented_and_macs_rewritten() {
        let mut p = pipeline(lab_table(true));
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"hello");
        let len = f.len();
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut f),
            Action::Forward { out: Side::Outside, len }
        );
        assert_eq!(&f[0..6], &EXT_MAC);
        assert_eq!(&f[6..12], &GW_OUT_MAC);
        assert_eq!(f[14 + 8], 63);
        assert!(ip_header_ok(&f, 14));
        // SNAT: the source is the group's egress IP, and the UDP checksum is still right.
        let headers = etherparse::PacketHeaders::from_ethernet_slice(&f).unwrap();
        let Some(etherparse::NetHeaders::Ipv4(ip4, _)) = &headers.net else { panic!("not IPv4") };
        assert_eq!(Ipv4Addr::from(ip4.source), EGRESS_IP);
        let Some(etherparse::TransportHeader::Udp(udp)) = &headers.transport else { panic!("not UDP") };
        assert_eq!(udp.checksum, udp.calc_checksum_ipv4(ip4, headers.payload.slice()).unwrap());
        assert_eq!(headers.payload.slice(), b"hello");
    }

    /// Sends one UDP datagram 10.10.0.2:4000 → 203.0.113.10:53 out; returns the egress port it was mapped to.
    fn open_udp_flow(p: &mut Pipeline) -> u16 {
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"q");
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
        u16::from_be_bytes([f[34], f[35]])
    }

    #[test]
    fn forwards_replies_inward_translated_back() {
        let mut p = pipeline(lab_table(true));
        let port = open_udp_flow(&mut p);
        let builder = etherparse::PacketBuilder::ethernet2(EXT_MAC, GW_OUT_MAC)
            .ipv4([203, 0, 113, 10], EGRESS_IP.octets(), 2)
            .udp(53, port);
        let mut f = Vec::new();
        builder.write(&mut f, b"x").unwrap();
        let len = f.len();
        assert_eq!(
            p.process(Instant::ZERO, Side::Outside, &mut f),
            Action::Forward { out: Side::Inside, len }
        );
        assert_eq!(&f[0..6], &CLIENT_MAC);
        assert_eq!(&f[6..12], &GW_IN_MAC);
        assert_eq!(f[14 + 8], 1);
        assert!(ip_header_ok(&f, 14));
        assert_eq!(&f[30..34], &[10, 10, 0, 2]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
    }

    /// Two pipelines sharing one hand-off queue pair, as two workers do.
    fn two_workers() -> (Pipeline, Pipeline) {
        let handoffs = Arc::new(Handoffs::new(2, 8));
        let policy = Arc::new(allow_all());
        let nat = NatConfig { workers: 2, ..small_nat() };
        let worker = |i| {
            let stats = Arc::new(WorkerStats::default());
            Pipeline::new(stats, NextHops::fixed(lab_table(true)), policy.clone(), &nat, i, handoffs.clone())
        };
        (worker(0), worker(1))
    }

    /// Finishes the next frame handed to `p`: its action and the frame as it would leave.
    fn finish_handoff(p: &mut Pipeline) -> Option<(Action, Vec<u8>)> {
        let handoffs = p.handoffs().clone();
        let mut scratch = vec![0u8; crate::handoff::HANDOFF_JUMBO_BYTES];
        handoffs.pop_with(p.worker(), &mut scratch, |kind, frame| {
            (p.process_handoff(Instant::ZERO, kind, frame), frame.to_vec())
        })
    }

    /// A reply whose NAT port belongs to worker 0 arrives on worker 1's queue: worker 1 hands it over through the
    /// bounded queue, worker 0 translates it and sends it inside.
    #[test]
    fn a_reply_on_another_workers_queue_is_handed_to_the_port_owner() {
        let (mut w0, mut w1) = two_workers();
        let port = open_udp_flow(&mut w0);
        assert_eq!(crate::nat::reply_owner(2, EGRESS_IP, 17, port), 0);
        let builder = etherparse::PacketBuilder::ethernet2(EXT_MAC, GW_OUT_MAC)
            .ipv4([203, 0, 113, 10], EGRESS_IP.octets(), 64)
            .udp(53, port);
        let mut reply = Vec::new();
        builder.write(&mut reply, b"answer").unwrap();
        assert_eq!(w1.process(Instant::ZERO, Side::Outside, &mut reply), Action::HandedOff);
        assert!(finish_handoff(&mut w1).is_none(), "nothing for worker 1");
        let (action, f) = finish_handoff(&mut w0).expect("worker 0 got the frame");
        assert_eq!(action, Action::Forward { out: Side::Inside, len: reply.len() });
        assert_eq!(&f[30..34], &[10, 10, 0, 2]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
        assert_eq!(&f[0..6], &CLIENT_MAC);
    }

    /// RFC 4787 REQ-1 with two workers: a packet from inside whose source port lies in worker 0's slice arrives on
    /// worker 1's queue; worker 1 hands it over untouched, worker 0 maps it (original port kept) and sends it out.
    /// The same endpoint's next flow, arriving at worker 0 directly, gets the same mapping.
    #[test]
    fn an_outbound_packet_on_another_workers_queue_is_handed_to_the_endpoint_owner() {
        let (mut w0, mut w1) = two_workers();
        let mut first = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"q");
        let sent = first.clone();
        assert_eq!(w1.process(Instant::ZERO, Side::Inside, &mut first), Action::HandedOff);
        assert_eq!(first, sent, "the handing worker changes nothing");
        assert_eq!(w1.nat().stats().mappings, 0, "and creates nothing");
        assert_eq!(w1.stats().handed_off.get(), 1);
        let (action, f) = finish_handoff(&mut w0).expect("worker 0 got the frame");
        assert_eq!(action, Action::Forward { out: Side::Outside, len: sent.len() });
        assert_eq!(&f[26..30], &EGRESS_IP.octets());
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 4000, "original port kept");
        assert_eq!(&f[0..6], &EXT_MAC);
        let mut second = udp_frame([10, 10, 0, 2], [198, 51, 100, 10], 64, b"q");
        assert!(matches!(w0.process(Instant::ZERO, Side::Inside, &mut second), Action::Forward { .. }));
        assert_eq!(&second[26..30], &EGRESS_IP.octets());
        assert_eq!(u16::from_be_bytes([second[34], second[35]]), 4000, "one mapping for both destinations");
        assert_eq!(w0.nat().stats().mappings, 1);
    }

    /// RFC 4787 REQ-9 through the pipeline: an inside host reaching another inside host's egress ip:port is
    /// translated both ways and sent back inside.
    #[test]
    fn hairpinned_packets_go_back_inside_translated_both_ways() {
        let mut p = pipeline(lab_table(true));
        let port = open_udp_flow(&mut p);
        let mut f = udp_frame([10, 10, 0, 3], EGRESS_IP.octets(), 64, b"hairpin");
        // The frame is UDP 4000 → 53 by construction; aim it at the first flow's mapping.
        f[36..38].copy_from_slice(&port.to_be_bytes());
        f[40..42].copy_from_slice(&[0, 0]); // UDP checksum 0: none
        let len = f.len();
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut f),
            Action::Forward { out: Side::Inside, len }
        );
        assert_eq!(&f[26..30], &EGRESS_IP.octets(), "source translated to the egress IP");
        assert_eq!(&f[30..34], &[10, 10, 0, 2], "destination translated to the mapped inside host");
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
        assert!(ip_header_ok(&f, 14));
    }

    #[test]
    fn unsolicited_traffic_from_outside_is_dropped() {
        let mut p = pipeline(lab_table(true));
        let mut to_inside = udp_frame([203, 0, 113, 10], [10, 10, 0, 2], 64, b"x");
        assert_eq!(
            p.process(Instant::ZERO, Side::Outside, &mut to_inside),
            Action::Drop(DropReason::NotForEgressIp)
        );
        open_udp_flow(&mut p);
        let mut to_unmapped = udp_frame([203, 0, 113, 10], EGRESS_IP.octets(), 64, b"x");
        assert_eq!(
            p.process(Instant::ZERO, Side::Outside, &mut to_unmapped),
            Action::Drop(DropReason::NoMapping)
        );
    }

    #[test]
    fn padding_past_the_ip_total_length_is_trimmed_not_rejected() {
        let mut p = pipeline(lab_table(true));
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"");
        let unpadded = f.len();
        f.resize(60, 0);
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut f),
            Action::Forward { out: Side::Outside, len: unpadded }
        );
    }

    /// Reverse-path validation on the inside: a source the inside interface has no route to is spoofed, dropped
    /// before it takes any NAT state; off, it is judged like any other.
    #[test]
    fn spoofed_inside_sources_are_dropped_before_the_nat() {
        let mut p = pipeline(lab_table(true));
        for src in [[10, 99, 9, 9], [192, 0, 2, 10], [203, 0, 113, 10]] {
            let mut f = udp_frame(src, [203, 0, 113, 10], 64, b"spoofed");
            assert_eq!(
                p.process(Instant::ZERO, Side::Inside, &mut f),
                Action::Drop(DropReason::SourceNotInside)
            );
        }
        assert_eq!(p.nat().stats().flows(), 0);
        let mut real = udp_frame([10, 10, 7, 7], [203, 0, 113, 10], 64, b"ok");
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut real), Action::Forward { .. }));
        let mut off = pipeline(lab_table(true)).with_source_validation(false);
        let mut f = udp_frame([10, 99, 9, 9], [203, 0, 113, 10], 64, b"spoofed");
        assert!(matches!(off.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
    }

    // --- MTU: ICMP 3/4 (RFC 1191) and MSS clamping ---

    /// lab_table with MTUs: inside 3000, outside 1500, and the inside address known.
    fn mtu_table() -> NextHopTable {
        let mut t = lab_table(true);
        t.inside = t.inside.with_mtu(3000).with_address(Some(GW_IN_IP));
        t.outside = t.outside.with_mtu(1500);
        t
    }

    /// A packet larger than the MTU of the interface it would leave by is dropped (`mtu_exceeded`), takes no NAT
    /// state, and its sender gets ICMP 3/4 with that MTU, quoting the packet as it was sent.
    #[test]
    fn rfc1191_too_big_packets_are_answered_with_fragmentation_needed() {
        let mut p = pipeline(mtu_table());
        let mut big = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, &[1u8; 1600]);
        big[20] |= 0x40; // DF
        big[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&big[14..34]);
        big[24..26].copy_from_slice(&c.to_be_bytes());
        let sent = big.clone();
        let Action::Reply { out: Side::Inside, len } = p.process(Instant::ZERO, Side::Inside, &mut big)
        else {
            panic!("expected ICMP 3/4")
        };
        let r = &p.reply_frame()[..len];
        assert_eq!(&r[0..6], &CLIENT_MAC);
        assert_eq!((&r[26..30], &r[30..34]), (&GW_IN_IP.octets()[..], &[10, 10, 0, 2][..]));
        assert_eq!((r[34], r[35]), (3, 4));
        assert_eq!(u16::from_be_bytes([r[40], r[41]]), 1500, "the next-hop MTU");
        assert_eq!(&r[42..62], &sent[14..34], "quotes the packet as its sender sent it");
        assert!(checksum::verify(&r[34..]));
        assert_eq!(p.stats().drops(DropReason::MtuExceeded), 1);
        assert_eq!(p.nat().stats().flows(), 0);
        // A packet that fits leaves; from outside, a packet too big for the inside MTU is answered outward.
        let mut fits = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, &[1u8; 1400]);
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut fits), Action::Forward { .. }));
        let mut inbound = udp_frame([203, 0, 113, 10], EGRESS_IP.octets(), 64, &[2u8; 3100]);
        inbound[0..12].copy_from_slice(&[GW_OUT_MAC, EXT_MAC].concat());
        assert!(matches!(
            p.process(Instant::ZERO, Side::Outside, &mut inbound),
            Action::Reply { out: Side::Outside, .. }
        ));
        assert_eq!(p.stats().drops(DropReason::MtuExceeded), 2);
    }

    /// `clamp_mss`: a SYN's MSS above the smaller MTU less 40 is lowered, its checksum kept valid; smaller ones and
    /// other segments are untouched; off, nothing changes.
    #[test]
    fn mss_clamping_lowers_syn_mss_to_fit_the_smaller_mtu() {
        let syn = |mss: u16, flags: &str| {
            let mut b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC)
                .ipv4([10, 10, 0, 2], [203, 0, 113, 10], 64)
                .tcp(40000, 443, 1, 1024)
                .options(&[
                    etherparse::TcpOptionElement::MaximumSegmentSize(mss),
                    etherparse::TcpOptionElement::Noop,
                ])
                .unwrap();
            for f in flags.chars() {
                b = if f == 'S' { b.syn() } else { b.ack(1) };
            }
            let mut out = Vec::new();
            b.write(&mut out, &[]).unwrap();
            out
        };
        let mss_of = |f: &[u8]| u16::from_be_bytes([f[54 + 2], f[54 + 3]]);
        let tcp_ok = |f: &[u8]| {
            let tcp = &f[34..];
            let mut pseudo = f[26..34].to_vec();
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            checksum::finish(checksum::sum(tcp, checksum::sum(&pseudo, 0))) == 0
        };
        let mut p = pipeline(mtu_table()).with_mss_clamp(true);
        let mut big = syn(8960, "S");
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut big), Action::Forward { .. }));
        assert_eq!(mss_of(&big), 1460);
        assert!(tcp_ok(&big));
        let mut off = pipeline(mtu_table());
        let mut unclamped = syn(8960, "S");
        assert!(matches!(off.process(Instant::ZERO, Side::Inside, &mut unclamped), Action::Forward { .. }));
        assert_eq!(mss_of(&unclamped), 8960, "off by default");
        let mut fine = syn(1200, "S");
        let mut q = pipeline(mtu_table()).with_mss_clamp(true);
        assert!(matches!(q.process(Instant::ZERO, Side::Inside, &mut fine), Action::Forward { .. }));
        assert_eq!(mss_of(&fine), 1200);
        assert!(tcp_ok(&fine));
    }

    // --- RFC 4787 REQ-14: fragments ---

    /// The fragments of one UDP datagram from `src:sport` to `dst:53` with `payload`, split after `first_len`
    /// payload bytes (a multiple of 8, counted after the 8-byte UDP header), IP id 0x4242, arriving on `side`.
    fn udp_fragments(
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        payload: &[u8],
        first_len: usize,
        side: Side,
    ) -> (Vec<u8>, Vec<u8>) {
        let (dst_mac, src_mac) =
            if side == Side::Inside { (GW_IN_MAC, CLIENT_MAC) } else { (GW_OUT_MAC, EXT_MAC) };
        let mut whole = Vec::new();
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv4(src, dst, 64)
            .udp(sport, 53)
            .write(&mut whole, payload)
            .unwrap();
        let udp = &whole[34..];
        let split = 8 + first_len;
        let frag = |data: &[u8], offset: usize, more: bool| {
            let mut f = whole[..34].to_vec();
            f.extend_from_slice(data);
            f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            f[18..20].copy_from_slice(&0x4242u16.to_be_bytes());
            let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            f[20..22].copy_from_slice(&flags.to_be_bytes());
            f[24..26].copy_from_slice(&[0, 0]);
            let c = checksum::compute(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
            f
        };
        (frag(&udp[..split], 0, true), frag(&udp[split..], split, false))
    }

    /// Reassembles translated fragments (in IP offset order) and checks the UDP checksum of the whole datagram:
    /// the first fragment's incremental update must cover every fragment.
    fn reassembled_udp_checksum_ok(first: &[u8], second: &[u8]) -> bool {
        let mut udp = first[34..].to_vec();
        udp.extend_from_slice(&second[34..]);
        let mut pseudo = first[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        checksum::finish(checksum::sum(&udp, checksum::sum(&pseudo, 0))) == 0
    }

    /// A fragmented UDP datagram both ways, fragments in order and out of order: every fragment gets the first
    /// one's address rewrite, the payload is untouched, and the reassembled datagram's checksum holds.
    #[test]
    fn rfc4787_req14_fragmented_datagrams_are_translated_both_ways() {
        let mut p = pipeline(lab_table(true));
        let payload: Vec<u8> = (0..200u8).collect();
        let (mut first, mut second) =
            udp_fragments([10, 10, 0, 2], 4000, [203, 0, 113, 10], &payload, 96, Side::Inside);
        let lens = (first.len(), second.len());
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut first),
            Action::Forward { out: Side::Outside, len: lens.0 }
        );
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut second),
            Action::Forward { out: Side::Outside, len: lens.1 }
        );
        for f in [&first, &second] {
            assert_eq!(&f[26..30], &EGRESS_IP.octets(), "every fragment leaves from the egress IP");
            assert_eq!(&f[0..6], &EXT_MAC);
            assert!(ip_header_ok(f, 14));
        }
        assert_eq!(&second[34..], &payload[96..], "a later fragment's payload is untouched");
        assert!(reassembled_udp_checksum_ok(&first, &second));
        let port = u16::from_be_bytes([first[34], first[35]]);

        // The answer, fragmented, its second fragment first: it waits, then follows its first.
        let (mut first, mut second) =
            udp_fragments([203, 0, 113, 10], 53, EGRESS_IP.octets(), &payload, 64, Side::Outside);
        first[36..38].copy_from_slice(&port.to_be_bytes());
        // (The destination port changed: recompute the UDP checksum over the whole datagram.)
        first[40..42].copy_from_slice(&[0, 0]);
        let mut udp = first[34..].to_vec();
        udp.extend_from_slice(&second[34..]);
        let mut pseudo = first[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        let c = checksum::finish(checksum::sum(&udp, checksum::sum(&pseudo, 0)));
        first[40..42].copy_from_slice(&c.to_be_bytes());
        assert_eq!(p.process(Instant(1), Side::Outside, &mut second), Action::Held);
        assert!(matches!(
            p.process(Instant(2), Side::Outside, &mut first),
            Action::Forward { out: Side::Inside, .. }
        ));
        let mut released = Vec::new();
        p.release_held(Instant(3), |out, f| released.push((out, f.to_vec())));
        assert_eq!(released.len(), 1);
        let (out, second) = &released[0];
        assert_eq!(*out, Side::Inside);
        assert_eq!(&second[30..34], &[10, 10, 0, 2]);
        assert_eq!(&second[0..6], &CLIENT_MAC);
        assert!(ip_header_ok(second, 14));
        assert!(reassembled_udp_checksum_ok(&first, second));
        assert_eq!(u16::from_be_bytes([first[36], first[37]]), 4000);
        assert!(!p.has_held());
    }

    /// Hostile fragments: a later fragment whose first never comes waits a second and is dropped
    /// (`fragment_unmatched`), at most HOLD_FRAGMENTS wait at once, and a flood of first fragments fills the
    /// table and then drops (`fragment_table_full`), leaving memory and other datagrams alone.
    #[test]
    fn fragments_without_a_first_and_floods_of_first_fragments_are_bounded() {
        let mut p = pipeline(lab_table(true));
        let payload = [7u8; 64];
        for i in 0..(HOLD_FRAGMENTS + 3) {
            let (_, mut second) =
                udp_fragments([10, 10, 0, 2], 4000 + i as u16, [203, 0, 113, 10], &payload, 32, Side::Inside);
            second[18..20].copy_from_slice(&(i as u16).to_be_bytes());
            second[24..26].copy_from_slice(&[0, 0]);
            let c = checksum::compute(&second[14..34]);
            second[24..26].copy_from_slice(&c.to_be_bytes());
            let expected =
                if i < HOLD_FRAGMENTS { Action::Held } else { Action::Drop(DropReason::FragmentUnmatched) };
            assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut second), expected);
        }
        p.release_held(Instant(HOLD_FRAGMENT_NANOS), |_, _| panic!("no first fragment came"));
        assert_eq!(p.stats().drops(DropReason::FragmentUnmatched) as usize, HOLD_FRAGMENTS + 3);
        assert!(!p.has_held());
        assert_eq!(p.nat().stats().flows(), 0, "later fragments create no NAT state");

        let mut forwarded = 0;
        for id in 0..(2 * crate::fragments::FRAGMENT_TABLE_SLOTS as u16) {
            let (mut first, _) =
                udp_fragments([10, 10, 0, 2], 5000, [203, 0, 113, 10], &payload, 32, Side::Inside);
            first[18..20].copy_from_slice(&id.to_be_bytes());
            first[24..26].copy_from_slice(&[0, 0]);
            let c = checksum::compute(&first[14..34]);
            first[24..26].copy_from_slice(&c.to_be_bytes());
            match p.process(Instant::ZERO, Side::Inside, &mut first) {
                Action::Forward { .. } => forwarded += 1,
                Action::Drop(DropReason::FragmentTableFull) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(forwarded <= crate::fragments::FRAGMENT_TABLE_SLOTS && forwarded > 0);
        assert!(p.stats().drops(DropReason::FragmentTableFull) > 0);
    }

    /// Two workers: the first fragment goes to the worker that owns the flow, and the later fragments that
    /// arrive at the other worker follow it there.
    #[test]
    fn later_fragments_follow_their_first_to_the_owning_worker() {
        let (mut w0, mut w1) = two_workers();
        let payload = [9u8; 100];
        // Source port 40000 belongs to worker 1; both fragments arrive at worker 0.
        let (mut first, mut second) =
            udp_fragments([10, 10, 0, 2], 40000, [203, 0, 113, 10], &payload, 48, Side::Inside);
        assert_eq!(w0.process(Instant::ZERO, Side::Inside, &mut first), Action::HandedOff);
        assert_eq!(w0.process(Instant::ZERO, Side::Inside, &mut second), Action::HandedOff);
        let (a, first) = finish_handoff(&mut w1).expect("the first fragment");
        let (b, second) = finish_handoff(&mut w1).expect("the second fragment");
        assert!(matches!(
            (a, b),
            (Action::Forward { out: Side::Outside, .. }, Action::Forward { out: Side::Outside, .. })
        ));
        assert_eq!((&first[26..30], &second[26..30]), (&EGRESS_IP.octets()[..], &EGRESS_IP.octets()[..]));
        assert_eq!(u16::from_be_bytes([first[34], first[35]]), 40000);
        assert!(reassembled_udp_checksum_ok(&first, &second));
    }

    /// VLAN hopping: a tagged frame is dropped under `vlan_tagged` from either side, never forwarded with the tag
    /// its sender chose (one tag, two tags, 802.1ad).
    #[test]
    fn vlan_tagged_frames_are_refused_from_both_sides() {
        let mut p = pipeline(lab_table(true));
        let plain = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"v");
        let tagged = |tags: &[[u8; 4]]| {
            let mut f = plain[..12].to_vec();
            for tag in tags {
                f.extend_from_slice(tag);
            }
            f.extend_from_slice(&plain[12..]);
            f
        };
        let q = [0x81, 0x00, 0x00, 0x07];
        let ad = [0x88, 0xa8, 0x00, 0x07];
        for tags in [&[q][..], &[q, q], &[ad], &[ad, q]] {
            for side in [Side::Inside, Side::Outside] {
                let mut f = tagged(tags);
                assert_eq!(p.process(Instant::ZERO, side, &mut f), Action::Drop(DropReason::VlanTagged));
            }
        }
        assert_eq!(p.stats().drops(DropReason::VlanTagged), 8);
        let mut untagged = plain.clone();
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut untagged), Action::Forward { .. }));
    }

    /// Each hostile variation of a valid frame, and the reason it must be dropped under.
    #[test]
    fn hostile_frames_are_dropped_under_their_reason() {
        let good = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"payload!");
        let fix_checksum = |f: &mut Vec<u8>| {
            f[24] = 0;
            f[25] = 0;
            let ihl = usize::from(f[14] & 0xf) * 4;
            let end = (14 + ihl).min(f.len());
            let c = checksum::compute(&f[14..end]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        };
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Mutation, DropReason)> = vec![
            ("truncated ethernet", Box::new(|f| f.truncate(13)), DropReason::Truncated),
            ("truncated ip", Box::new(|f| f.truncate(14 + 19)), DropReason::Truncated),
            ("arp", Box::new(|f| f[12..14].copy_from_slice(&[0x08, 0x06])), DropReason::NotIp),
            ("ipv6", Box::new(|f| f[12..14].copy_from_slice(&[0x86, 0xdd])), DropReason::Ipv6Unsupported),
            ("version 6 in ipv4", Box::new(|f| f[14] = 0x65), DropReason::IpVersionMismatch),
            ("ihl 4", Box::new(|f| f[14] = 0x44), DropReason::BadIpHeader),
            ("ihl beyond frame", Box::new(|f| f[14] = 0x4f), DropReason::BadIpHeader),
            (
                "total length beyond frame",
                Box::new(|f| {
                    f[16..18].copy_from_slice(&1000u16.to_be_bytes());
                }),
                DropReason::BadIpLength,
            ),
            (
                "total length below header",
                Box::new(|f| {
                    f[16..18].copy_from_slice(&19u16.to_be_bytes());
                }),
                DropReason::BadIpLength,
            ),
            ("bad checksum", Box::new(|f| f[24] ^= 0xff), DropReason::BadIpChecksum),
            // A first fragment too short for its UDP header.
            (
                "tiny first fragment",
                Box::new(|f| {
                    f[20] |= 0x20;
                    f[16..18].copy_from_slice(&24u16.to_be_bytes())
                }),
                DropReason::Truncated,
            ),
            ("ttl 1", Box::new(|f| f[22] = 1), DropReason::TtlExceeded),
            ("ttl 0", Box::new(|f| f[22] = 0), DropReason::TtlExceeded),
            ("no route", Box::new(|f| f[30..34].copy_from_slice(&[10, 99, 0, 1])), DropReason::NoRoute),
        ];
        for (name, mutate, reason) in cases {
            // "no route": gw has no default route outside, and 10.99.0.1 is not on-link.
            let mut table = lab_table(true);
            if name == "no route" {
                table.outside = InterfaceTable::new(
                    GW_OUT_MAC,
                    vec![Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None }],
                    vec![],
                );
            }
            let mut p = pipeline(table);
            let mut f = good.clone();
            mutate(&mut f);
            // Mutations of covered header fields get a valid checksum, so the intended check is what fails.
            if name != "bad checksum"
                && f.len() >= 34
                && (f[14] & 0xf) >= 5
                && 14 + usize::from(f[14] & 0xf) * 4 <= f.len()
            {
                fix_checksum(&mut f);
            }
            assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(reason), "{name}");
            assert_eq!(p.stats().drops(reason), 1, "{name}");
        }
    }

    /// A new flow that cannot leave takes no NAT session or port: no route out of the outside interface, or an
    /// unresolved next hop when the hold queue is full. Neither counts as an allowed flow.
    #[test]
    fn flows_that_cannot_leave_take_no_nat_state_and_are_not_counted_as_allowed() {
        let mut table = lab_table(true);
        table.outside = InterfaceTable::new(
            GW_OUT_MAC,
            vec![Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None }],
            vec![],
        );
        let mut p = pipeline(table);
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"nowhere");
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::NoRoute));
        // On-link destinations with no neighbour: the first HOLD_FRAMES wait (and map), the rest are refused.
        for i in 0..HOLD_FRAMES + 4 {
            let mut f = udp_frame([10, 10, 0, 2], [192, 0, 2, 100 + i as u8], 64, b"unresolved");
            let action = p.process(Instant::ZERO, Side::Inside, &mut f);
            let expected = if i < HOLD_FRAMES { Action::Held } else { Action::Drop(DropReason::NoNeighbour) };
            assert_eq!(action, expected, "destination {i}");
        }
        assert_eq!(p.nat().stats().flows() as usize, HOLD_FRAMES, "only the held frames took sessions");
        assert_eq!(p.stats().flows_allowed.get(), 0, "a waiting frame has not left");
        assert_eq!(p.stats().drops(DropReason::NoRoute), 1);
        assert_eq!(p.stats().drops(DropReason::NoNeighbour), 4);
        // Unresolved after the hold time: dropped, and still not counted as allowed.
        p.release_held(Instant(HOLD_NANOS), |_, _| panic!("nothing resolved"));
        assert_eq!(p.stats().drops(DropReason::NoNeighbour) as usize, 4 + HOLD_FRAMES);
        assert_eq!(p.stats().flows_allowed.get(), 0);
    }

    /// Out of ports: the policy allowed the flow, but it is refused, so it counts as `out_of_ports`, not as an
    /// allowed flow or a hit of its rule.
    #[test]
    fn a_flow_refused_after_the_policy_allowed_it_is_not_counted_as_allowed() {
        let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
        let allowed = p.stats().flows_allowed.get();
        let hits = p.stats().rule_hits.load().get(0);
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"refused");
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Reply { .. }));
        assert_eq!(p.stats().flows_allowed.get(), allowed);
        assert_eq!(p.stats().rule_hits.load().get(0), hits);
        assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1);
    }

    #[test]
    fn frames_wait_for_an_unknown_neighbour_then_leave_or_time_out() {
        let hops = NextHops::fixed(lab_table(false));
        let resolve = hops.resolve.clone();
        let stats = Arc::new(WorkerStats::default());
        let mut p = Pipeline::single(stats.clone(), hops.clone(), Arc::new(allow_all()), &small_nat());
        let frame = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"wait");
        for i in 0..(HOLD_FRAMES as u64 + 2) {
            let mut f = frame.clone();
            let expect =
                if i < HOLD_FRAMES as u64 { Action::Held } else { Action::Drop(DropReason::NoNeighbour) };
            assert_eq!(p.process(Instant(i), Side::Inside, &mut f), expect, "frame {i}");
        }
        // One resolution request per interval, not one per frame.
        assert_eq!(resolve.drain().collect::<Vec<_>>(), vec![ip("192.0.2.2")]);
        assert_eq!(stats.drops(DropReason::NoNeighbour), 2);

        // Not resolved yet: nothing leaves.
        let mut sent = Vec::new();
        p.release_held(Instant(1000), |out, f| sent.push((out, f.to_vec())));
        assert!(sent.is_empty());

        // The control thread learns the neighbour: the held frames leave, routed and rewritten, in order.
        hops.table.store(Arc::new(lab_table(true)));
        p.begin_batch();
        assert_eq!(stats.flows_allowed.get(), 0, "nothing has left yet");
        p.release_held(Instant(2000), |out, f| sent.push((out, f.to_vec())));
        assert_eq!(sent.len(), HOLD_FRAMES);
        // The flow's first packet left: it counts as allowed now, once.
        assert_eq!(stats.flows_allowed.get(), 1);
        for (out, f) in &sent {
            assert_eq!(*out, Side::Outside);
            assert_eq!((&f[0..6], &f[6..12], f[14 + 8]), (&EXT_MAC[..], &GW_OUT_MAC[..], 63));
            assert!(ip_header_ok(f, 14));
        }
        assert!(!p.has_held());

        // A neighbour that never resolves: the frame is dropped after the hold time.
        hops.table.store(Arc::new(lab_table(false)));
        p.begin_batch();
        let mut f = frame.clone();
        assert_eq!(p.process(Instant(3000), Side::Inside, &mut f), Action::Held);
        p.release_held(Instant(3000 + HOLD_NANOS - 1), |_, _| panic!("not yet"));
        assert!(p.has_held());
        p.release_held(Instant(3000 + HOLD_NANOS), |_, _| panic!("never resolved"));
        assert!(!p.has_held());
        assert_eq!(stats.drops(DropReason::NoNeighbour), 3);
    }

    /// A UDP frame with `options` (a multiple of 4 bytes) in its IPv4 header, checksum right.
    fn with_ip_options(options: &[u8]) -> Vec<u8> {
        let f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"opt");
        let mut with_opt = f[..34].to_vec();
        with_opt.extend_from_slice(options);
        with_opt.extend_from_slice(&f[34..]);
        with_opt[14] = 0x45 + (options.len() / 4) as u8;
        let total = u16::from_be_bytes([with_opt[16], with_opt[17]]) + options.len() as u16;
        with_opt[16..18].copy_from_slice(&total.to_be_bytes());
        with_opt[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&with_opt[14..34 + options.len()]);
        with_opt[24..26].copy_from_slice(&c.to_be_bytes());
        with_opt
    }

    #[test]
    fn ip_options_are_forwarded() {
        // NOPs + EOL, and a record-route option.
        for options in [&[1, 1, 1, 0][..], &[7, 7, 4, 0, 0, 0, 0, 0]] {
            let mut f = with_ip_options(options);
            let len = f.len();
            let mut p = pipeline(lab_table(true));
            assert_eq!(
                p.process(Instant::ZERO, Side::Inside, &mut f),
                Action::Forward { out: Side::Outside, len }
            );
            assert!(ip_header_ok(&f, 14));
        }
    }

    /// RFC 7126: loose and strict source routes are never forwarded; malformed options are bad headers.
    #[test]
    fn source_routed_and_malformed_options_are_dropped() {
        let mut p = pipeline(lab_table(true));
        let lsrr = [1, 0x83, 7, 4, 192, 0, 2, 99];
        let ssrr = [0x89, 7, 4, 192, 0, 2, 99, 0];
        for options in [&lsrr[..], &ssrr] {
            for side in [Side::Inside, Side::Outside] {
                let mut f = with_ip_options(options);
                assert_eq!(p.process(Instant::ZERO, side, &mut f), Action::Drop(DropReason::SourceRoute));
            }
        }
        assert_eq!(p.stats().drops(DropReason::SourceRoute), 4);
        for options in [&[7, 9, 4, 0][..], &[7, 1, 0, 0], &[1, 1, 1, 7]] {
            let mut f = with_ip_options(options);
            assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::BadIpHeader));
        }
    }

    // --- out of ports → drop, count `out_of_ports`, optionally ICMP 3/13 ---

    const GW_IN_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);

    fn icmp_on(per_sec: u32, burst: u32) -> IcmpErrors {
        IcmpErrors { on_out_of_ports: true, per_sec, burst }
    }

    /// Hand-off rings of a 64-worker gateway, built once: the out-of-ports pipelines (one per proptest case) hand
    /// nothing over that a test looks at, and 4096 rings per case would dominate the test's time.
    fn sixty_four_workers_handoffs() -> Arc<Handoffs> {
        static HANDOFFS: std::sync::OnceLock<Arc<Handoffs>> = std::sync::OnceLock::new();
        HANDOFFS.get_or_init(|| Arc::new(Handoffs::new(64, 8))).clone()
    }

    /// Worker 2 of 64 (1008 high UDP ports on the egress IP, 3040–4047, owner of the test frames' source port
    /// 4000) with every UDP port held by 10.10.0.9.
    fn out_of_udp_ports(icmp: IcmpErrors, inside_addr: Option<Ipv4Addr>) -> Pipeline {
        let nat = NatConfig {
            workers: 64,
            max_flows: 4096,
            max_flows_per_source: 4096,
            icmp_errors: icmp,
            ..NatConfig::default()
        };
        let mut table = lab_table(true);
        table.inside = table.inside.with_address(inside_addr);
        let mut p = Pipeline::new(
            Arc::new(WorkerStats::default()),
            NextHops::fixed(table),
            Arc::new(allow_all()),
            &nat,
            2,
            sixty_four_workers_handoffs(),
        );
        for i in 0..1008 {
            let mut f = udp_frame_from_port([10, 10, 0, 9], 3040 + i, [203, 0, 113, 10], 64, b"fill");
            let action = p.process(Instant::ZERO, Side::Inside, &mut f);
            assert!(matches!(action, Action::Forward { .. }), "flow {i}: {action:?}");
        }
        assert_eq!(p.stats().drops(DropReason::OutOfPorts), 0);
        p
    }

    /// Parses an ICMP error frame and checks what every 3/13 must be; returns (IP source, IP destination,
    /// quoted bytes).
    fn parse_admin_prohibited(r: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
        let h = etherparse::PacketHeaders::from_ethernet_slice(r).expect("the reply parses");
        let Some(etherparse::NetHeaders::Ipv4(ip4, _)) = &h.net else { panic!("not IPv4") };
        assert_eq!(ip4.header_checksum, ip4.calc_header_checksum(), "IP header checksum");
        assert_eq!(ip4.time_to_live, 64);
        assert!(!ip4.dont_fragment && !ip4.more_fragments);
        assert_eq!(usize::from(ip4.total_len), 20 + 8 + h.payload.slice().len(), "IP total length");
        let Some(etherparse::TransportHeader::Icmpv4(icmp)) = &h.transport else { panic!("not ICMP") };
        assert_eq!(
            icmp.icmp_type,
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
            ),
            "type 3 code 13"
        );
        let mut recomputed = icmp.clone();
        recomputed.update_checksum(h.payload.slice());
        assert_eq!(recomputed.checksum, icmp.checksum, "ICMP checksum");
        (Ipv4Addr::from(ip4.source), Ipv4Addr::from(ip4.destination), h.payload.slice().to_vec())
    }

    #[test]
    fn out_of_ports_with_icmp_on_drops_counts_and_answers_3_13_from_the_inside_address() {
        let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
        let original = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"new flow");
        let mut f = original.clone();
        let Action::Reply { out, len } = p.process(Instant::ZERO, Side::Inside, &mut f) else {
            panic!("expected a reply")
        };
        assert_eq!(out, Side::Inside);
        assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1, "still dropped and counted");
        assert_eq!(p.stats().icmp_errors_sent.get(), 1);
        let r = p.reply_frame()[..len].to_vec();
        assert_eq!(&r[0..6], &CLIENT_MAC, "back to the client's MAC");
        assert_eq!(&r[6..12], &GW_IN_MAC, "from the inside interface's MAC");
        assert_eq!(&r[12..14], &[0x08, 0x00]);
        let (src, dst, quoted) = parse_admin_prohibited(&r);
        assert_eq!(src, GW_IN_IP, "RFC 1812 4.3.2.4: an address of the interface the error leaves by");
        assert_eq!(dst, ip("10.10.0.2"));
        // The whole original datagram (it is short), as received: header and the first 8 bytes at least.
        assert_eq!(quoted, &original[14..]);
        assert_eq!(f, original, "the refused frame is not rewritten");
    }

    #[test]
    fn without_an_inside_address_the_error_comes_from_the_original_destination() {
        let mut p = out_of_udp_ports(icmp_on(1000, 50), None);
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"new flow");
        let Action::Reply { len, .. } = p.process(Instant::ZERO, Side::Inside, &mut f) else {
            panic!("expected a reply")
        };
        let (src, dst, _) = parse_admin_prohibited(&p.reply_frame()[..len]);
        assert_eq!((src, dst), (ip("203.0.113.10"), ip("10.10.0.2")));
    }

    #[test]
    fn out_of_ports_with_icmp_off_is_a_silent_counted_drop() {
        let mut p = out_of_udp_ports(IcmpErrors::default(), Some(GW_IN_IP));
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"new flow");
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::OutOfPorts));
        assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1);
        assert_eq!(p.stats().icmp_errors_sent.get(), 0);
        assert_eq!(p.stats().icmp_errors_rate_limited.get(), 0);
    }

    /// RFC 1122 3.2.2 / RFC 1812 4.3.2.7 through the pipeline: no error about an ICMP error, a non-first
    /// fragment, or a packet from a multicast source (the writer's own tests cover each rule).
    #[test]
    fn packets_that_must_not_be_answered_get_no_reply_when_out_of_ports() {
        // (Source validation off: the multicast source must reach the ICMP writer's own check.)
        let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP)).with_source_validation(false);
        let mut multicast_src = udp_frame([224, 0, 0, 5], [203, 0, 113, 10], 64, b"m");
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut multicast_src),
            Action::Drop(DropReason::OutOfPorts)
        );
        let mut fragment = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"frag");
        fragment[20..22].copy_from_slice(&1u16.to_be_bytes());
        fragment[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&fragment[14..34]);
        fragment[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut fragment),
            Action::Held,
            "waits for its first"
        );
        // An ICMP error from inside quoting nothing the NAT knows.
        let mut quoted = udp_frame([203, 0, 113, 10], [10, 10, 0, 2], 64, b"q");
        // Quoting the inside port 4000, so that this worker owns the quoted flow's endpoint.
        quoted[36..38].copy_from_slice(&4000u16.to_be_bytes());
        let mut icmp_error = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC)
            .ipv4([10, 10, 0, 2], [203, 0, 113, 10], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut icmp_error, &quoted[14..])
            .unwrap();
        let action = p.process(Instant::ZERO, Side::Inside, &mut icmp_error);
        assert!(matches!(action, Action::Drop(_)), "{action:?}");
        assert_eq!(p.stats().icmp_errors_sent.get(), 0);
        assert_eq!(p.stats().icmp_errors_rate_limited.get(), 0, "refused before the rate limit");
    }

    #[test]
    fn icmp_errors_are_rate_limited_per_worker_and_refill_with_time() {
        let mut p = out_of_udp_ports(icmp_on(10, 3), Some(GW_IN_IP));
        let send = |p: &mut Pipeline, at: u64, sport: u16| {
            let mut f = udp_frame_from_port([10, 10, 0, 2], sport, [203, 0, 113, 10], 64, b"fill");
            matches!(p.process(Instant(at), Side::Inside, &mut f), Action::Reply { .. })
        };
        // Source ports in this worker's slice (3040–4047): it owns these endpoints and refuses them itself.
        let answered: Vec<bool> = (0..5).map(|i| send(&mut p, 0, 3500 + i)).collect();
        assert_eq!(answered, [true, true, true, false, false], "burst of 3");
        assert_eq!(p.stats().icmp_errors_rate_limited.get(), 2);
        assert!(!send(&mut p, 99_999_999, 3600), "10/s: not before 100 ms");
        assert!(send(&mut p, 100_000_000, 3601), "one token after 100 ms");
        assert!(!send(&mut p, 100_000_000, 3602));
        assert_eq!(p.stats().icmp_errors_sent.get(), 4);
        assert_eq!(p.stats().drops(DropReason::OutOfPorts), 8, "every refused packet is counted");
    }

    #[test]
    fn a_vlan_tagged_frame_is_dropped_not_answered_when_out_of_ports() {
        let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
        let plain = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"tagged");
        let mut f = plain[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x20, 0x07]); // PCP 1, VID 7
        f.extend_from_slice(&plain[12..]);
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::VlanTagged));
        assert_eq!(p.stats().icmp_errors_sent.get(), 0);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(mut f in proptest::collection::vec(any::<u8>(), 0..200), inside in any::<bool>()) {
            let mut p = pipeline(lab_table(true));
            let side = if inside { Side::Inside } else { Side::Outside };
            let n = f.len();
            if let Action::Forward { len, .. } = p.process(Instant::ZERO, side, &mut f) {
                prop_assert!(len <= n);
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic_and_forward_only_valid_headers(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            flips in proptest::collection::vec((0usize..120, any::<u8>()), 0..6),
            cut in 0usize..130,
            inside in any::<bool>(),
        ) {
            let (src, dst) = if inside { ([10, 10, 0, 2], [203, 0, 113, 10]) } else { ([203, 0, 113, 10], [10, 10, 0, 2]) };
            let mut f = udp_frame(src, dst, 64, &payload);
            for (at, x) in flips {
                if let Some(b) = f.get_mut(at) { *b ^= x; }
            }
            f.truncate(cut.max(1));
            let mut p = pipeline(lab_table(true));
            let side = if inside { Side::Inside } else { Side::Outside };
            let n = f.len();
            match p.process(Instant::ZERO, side, &mut f) {
                Action::Forward { len, out } => {
                    prop_assert!(len <= n);
                    prop_assert_eq!(out, side.other());
                    let l3 = parse_ipv4_frame(&f[..len]).expect("forwarded frame still parses");
                    prop_assert_eq!(l3.ip_end, len);
                }
                Action::Drop(reason) => prop_assert_eq!(p.stats().drops(reason), 1),
                Action::HandedOff => prop_assert!(false, "a lone worker never hands off"),
                Action::Held => prop_assert!(false, "every neighbour is known"),
                Action::Reply { .. } => prop_assert!(false, "ICMP errors are off by default"),
            }
        }

        /// Out of ports with ICMP errors on: mutated frames never panic, and every reply is a well-formed 3/13.
        #[test]
        fn mutated_frames_out_of_ports_get_only_well_formed_replies(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            flips in proptest::collection::vec((0usize..60, any::<u8>()), 0..4),
            cut in 0usize..130,
        ) {
            let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
            let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, &payload);
            for (at, x) in flips {
                if let Some(b) = f.get_mut(at) { *b ^= x; }
            }
            f.truncate(cut.max(1));
            if let Action::Reply { out, len } = p.process(Instant::ZERO, Side::Inside, &mut f) {
                prop_assert_eq!(out, Side::Inside);
                prop_assert!(len <= crate::icmp::MAX_REPLY_FRAME);
                let r = &p.reply_frame()[..len];
                let l3 = parse_ipv4_frame(r).expect("the reply parses");
                prop_assert_eq!(l3.ip_end, len);
                prop_assert_eq!(r[l3.ip_start + 9], 1);
                prop_assert!(checksum::verify(&r[l3.ip_start + l3.header_len..]), "ICMP checksum");
                prop_assert_eq!(&r[l3.ip_start + 20..l3.ip_start + 22], &[3, 13]);
                prop_assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1);
            }
        }
    }
}
