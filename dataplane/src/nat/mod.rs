//! SNAT to fixed egress IPs with connection tracking: one [`Nat`] per worker, sans-IO.
//!
//! What it owns: the worker's flows ([`crate::conntrack`] slabs, indexes and LRU lists), its endpoint-independent
//! mappings, its share of every egress IP's port space, and the in-place translation of IPv4 packets both ways
//! (ICMP errors included) with incremental checksum updates (RFC 1624).
//!
//! What it promises: no allocation after [`Nat::new`], no panic on any input, every refusal is one
//! [`DropReason`], and time only ever comes in as an argument.
//!
//! Where things are: this file holds the engine (flows and mappings, limits, the outbound and inbound legs);
//! `ports.rs` the egress port space (slices per worker, allocation, quarantine, group caps); `icmp_error.rs` ICMP
//! errors both ways; `packet.rs` reading and rewriting the headers; `tests.rs` one test per behaviour below.
//!
//! # Behaviour (a well-made NAT: RFC 4787 UDP, RFC 5382 TCP, RFC 5508 ICMP, RFC 6888, RFC 7857)
//! - **Mapping**: endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1) for UDP, TCP and ICMP echo identifiers:
//!   keyed by inside `(ip, port, proto)`, the same egress `ip:port` for every destination. Paired pooling (4787
//!   REQ-2): the egress IP is `policy.egress_ip_for(group, src)`; an existing mapping keeps its IP.
//! - **Ports**: no overloading (4787 REQ-3, 5382 REQ-7): an egress `ip:port:proto` has one owner at a time. Each
//!   egress IP's two port ranges, 1–1023 and 1024–65535, are each split into `workers` contiguous slices, so the
//!   worker owning a reply is [`reply_owner`]`(port)` — a function of the port alone. Port 0 is never allocated.
//!   A worker allocates only in its slices: the original port is tried first; when it is taken, the next free
//!   port of the slice, found by a rotating cursor. Source ports 1–1023 stay in 1–1023 (REQ-3a); ICMP echo
//!   identifiers always use the 1024–65535 range.
//! - **One owner per inside endpoint** (REQ-1 with several workers): the inside endpoint `(ip, port)` belongs to
//!   the worker whose slice holds its source port (ICMP echo: its identifier; an inside ICMP error: the quoted
//!   flow's inside port). A packet from inside that reaches another worker is handed to the owner untouched
//!   ([`Outbound::OtherWorker`]), so an endpoint has one mapping for every destination, its original port is
//!   always in its owner's slice (kept unless another host holds it), and replies still find the owner from the
//!   destination port alone. `max_flows_per_source` is enforced per worker (the configured limit divided by the
//!   number of workers): an inside address whose source ports spread evenly over the port space gets the whole
//!   limit, one that crowds its ports into one slice gets that worker's share.
//! - **Quarantine** (RFC 6888 REQ-8): a port freed when its last session expires is not reused for
//!   `port_quarantine_secs` (default 120 s).
//! - **Filtering**: address-dependent for UDP (4787 REQ-8): an inbound datagram is accepted from any port of a
//!   remote address the inside endpoint has sent to, and creates a session that the policy judges on its next
//!   outbound packet. TCP and ICMP echo are filtered address-and-port-dependently (5382 REQ-3 allows it): inbound
//!   packets must match a session. Unsolicited inbound traffic creates nothing (`NoMapping`, 5382 REQ-4).
//! - **Policy**: judged on the first packet of a flow (`evaluate_v4(src, dst, proto, dst_port)`; ICMP echo uses
//!   port 0, as the policy defines for ICMP). The session records the policy generation; when it changes the next
//!   outbound packet is judged again: still allowed → goes on; now denied → the session is removed and the packet
//!   dropped with the deny reason. Dry-run denials forward and return [`Outbound::DryRunDenied`] on the first
//!   packet. `l7` verdicts create no state ([`Outbound::L7`]).
//! - **Timers** (5 classes, one LRU list each): UDP 300 s, ICMP 60 s, TCP established 7440 s, TCP transitory
//!   (handshake, FIN both ways, RST) 240 s. Outbound packets refresh; inbound packets refresh too except RSTs and
//!   ICMP errors, which never do (5382 REQ-9/10, 5508 REQ-6). Expiry is incremental: [`Nat::poll_expiry`] pops
//!   expired heads within a budget.
//! - **ICMP errors** (types 3, 11, 12) quoting a translated packet are translated both ways, outer and quoted
//!   headers and all checksums, and never end or refresh the flow (5508 REQ-4/6). Inside hosts' errors about
//!   inbound packets (e.g. port unreachable) are translated outbound the same way, but only from the quoted
//!   packet's inside endpoint to its sender, from a source in a group, for a live flow, and cut to the quoted
//!   header + 8 bytes: the policy does not judge them, so they must carry nothing else out of the network.
//! - **Hairpinning** (4787 REQ-9): an outbound packet to one of our egress `ip:port` mappings is SNATed and then
//!   goes through the inbound leg of the port's owner (here: [`Outbound::Hairpin`]; another worker:
//!   [`Outbound::HairpinOtherWorker`], whose [`Nat::inbound_hairpin`] finishes it). Hairpinned traffic is
//!   filtered endpoint-independently (both ends are ours) and the far side's session is a reply flow the policy
//!   does not judge. From the wire, packets whose source is one of our egress IPs never create state
//!   (anti-spoofing). ICMP echo is not hairpinned (the inbound leg only accepts echo replies).
//! - **Limits**: `max_flows` sessions per worker (`ConntrackFull`), `max_flows_per_source` per inside address
//!   (`SourceFlowLimit`, 6888 REQ-4/5), [`MAX_UDP_SESSIONS_PER_REMOTE_ADDR`] UDP sessions per mapping and remote
//!   address (`SourceFlowLimit`), no free port (`OutOfPorts`). Sessions that inbound packets create (address-
//!   dependent filtering) do not count against the inside address: they are bounded by
//!   [`MAX_UNSOLICITED_PER_MAPPING`] per mapping and a quarter of the table (`UnsolicitedFlowLimit`) until the
//!   inside host sends on them. A group with `max_ports_per_egress_ip` holds at most that many mappings on each
//!   of its egress IPs (`GroupPortLimit`), so a group sharing an egress IP cannot take all its ports. At most [`MAX_EGRESS_IPS`] distinct egress IPs per
//!   worker; flows needing another one are dropped as `OutOfPorts`.
//! - **Reload and egress IPs**: a mapping keeps its egress IP while that IP stays in its source's group, even if
//!   paired pooling would now pick another (an added IP does not break running flows). When a reload removes the
//!   IP from the group, each of its flows is dropped (`NoEgressIp`) on its next outbound packet, and the next new
//!   flow of the inside endpoint retires the old mapping and gets a new one. Flows are re-judged on outbound
//!   packets only (a receive-only UDP flow is not).

use std::net::Ipv4Addr;

use crate::conntrack::*;
use crate::drop::DropReason;
use crate::policy::{Decision, PolicySnapshot, Verdict};
use crate::time::Instant;
use crate::wire::transport::{self, Transport};
use crate::wire::{checksum, icmp, ip_proto, ipv4, read_u16, read_u32, udp, write_u16, write_u32};

pub mod flows;
mod icmp_error;
mod invariants;
mod log;
mod packet;
pub use log::FlowEnd as NatFlowEnd;
pub use log::{NatLogMode, NatLogQueue, NatLogRecord, DEFAULT_RECORDS_PER_SEC};
mod ports;
#[cfg(test)]
mod tests;

use log::{endpoint, FlowEnd, FlowKey, FlowLog};
use packet::*;
use ports::*;
pub use ports::{reply_owner, MAX_GROUP_PORT_COUNTERS};

pub use crate::stats::MAX_EGRESS_IPS;

const EGRESS_BUCKETS: usize = 64;
const BUCKET_EMPTY: u8 = 0xff;
const BUCKET_SHARED: u8 = 0xfe;
const _: () = assert!(MAX_EGRESS_IPS < BUCKET_SHARED as usize);

/// The bucket of an egress IP in [`Nat::egress_index`]'s table (multiply-shift: the top 6 bits).
#[inline]
fn egress_bucket_of(addr: u32) -> usize {
    (addr.wrapping_mul(0x9e37_79b1) >> 26) as usize
}

/// UDP sessions one mapping may hold towards one remote address (different remote ports). They share one hash in
/// the inbound index (that is how address-dependent filtering finds them), so the cap bounds that probe run.
/// Beyond it new sessions are refused as `SourceFlowLimit`.
pub const MAX_UDP_SESSIONS_PER_REMOTE_ADDR: u32 = 128;

/// Sessions inbound packets may create on one mapping (address-dependent filtering: another port of a remote
/// address the endpoint sent to). Such sessions have their own bounds, this one and a quarter of the worker's
/// table, and never count against the inside host's `max_flows_per_source`: an outsider (or a spoofer) cannot
/// use up an inside host's quota.
pub const MAX_UNSOLICITED_PER_MAPPING: u16 = 32;

/// Idle timeouts in seconds. `Default` is the RFC defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// RFC 4787 REQ-5: ≥ 120 s, 300 s recommended.
    pub udp_secs: u32,
    /// RFC 5382 REQ-5: ≥ 2 h 4 min.
    pub tcp_established_secs: u32,
    /// RFC 5382 REQ-5 / RFC 7857: 4 min for handshakes and closing connections.
    pub tcp_transitory_secs: u32,
    /// RFC 5508 REQ-2: ≥ 60 s.
    pub icmp_secs: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { udp_secs: 300, tcp_established_secs: 7440, tcp_transitory_secs: 240, icmp_secs: 60 }
    }
}

/// One worker's NAT sizing and timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// Sessions (5-tuple flows) this worker holds at most.
    pub max_flows: u32,
    /// Sessions one inside address holds at most on this worker (RFC 6888 REQ-4/5).
    pub max_flows_per_source: u32,
    pub timeouts: Timeouts,
    /// A freed egress port is not reused for this long (RFC 6888 REQ-8).
    pub port_quarantine_secs: u32,
    /// Number of workers sharing each egress IP's port space.
    pub workers: u16,
    /// ICMP errors the pipeline sends for flows the NAT refuses (out of ports → 3/13, off by default).
    pub icmp_errors: crate::icmp::IcmpErrors,
    /// TCP ports of every egress IP the NAT never allocates: the L7 path's upstream connections use them.
    pub reserved_tcp_ports: Option<(u16, u16)>,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            max_flows: 1 << 20,
            max_flows_per_source: 16384,
            timeouts: Timeouts::default(),
            port_quarantine_secs: 120,
            workers: 1,
            icmp_errors: crate::icmp::IcmpErrors::default(),
            reserved_tcp_ports: None,
        }
    }
}

/// Where an outbound packet goes after [`Nat::outbound`] translated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Send out of the outside interface.
    Forward,
    /// The destination was one of our egress `ip:port` mappings: translated both ways, send back inside.
    Hairpin,
    /// As `Hairpin`, but the destination port belongs to worker `n`: the source is translated; hand the packet to
    /// worker `n`, whose [`Nat::inbound_hairpin`] translates the destination and returns `Forward` (send inside).
    HairpinOtherWorker(u16),
    /// The inside endpoint belongs to worker `n` (its source port, echo identifier or, for an ICMP error, the
    /// quoted flow's inside port lies in that worker's slice): nothing was changed or created; hand the packet to
    /// worker `n`, whose [`Nat::outbound`] translates it.
    OtherWorker(u16),
    /// The policy says `l7`: nothing was changed or created.
    L7,
    /// First packet of a flow the policy denies in dry run: translated and tracked like `Forward`; count it.
    DryRunDenied,
}

/// Where an inbound packet goes after [`Nat::inbound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Translated: send out of the inside interface.
    Forward,
    /// The packet belongs to worker `n` (its port is in that worker's slice); nothing was changed.
    OtherWorker(u16),
}

/// What [`Nat::prefetch_flow`] learned of a packet, for [`Nat::prefetch_session`].
///
/// At a million flows every packet's index slot and session are DRAM misses (about 100 ns each, one after the
/// other). A worker takes its frames in bursts, so it overlaps them as VPP's NAT does: first it hashes every
/// frame of the burst and prefetches the index slots, then it reads those slots and prefetches the sessions they
/// name, then it processes the frames, whose lookups now hit the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHint {
    hash: u32,
    /// Index position of the home slot; `u32::MAX`: nothing to prefetch.
    pos: u32,
    inbound: bool,
}

/// Live flows from which the prefetch passes run: their sessions and index slots (about 66 bytes a flow) then
/// take a megabyte, half the L2 cache of the machines egressd was measured on.
pub const PREFETCH_MIN_FLOWS: u32 = 16_384;

impl FlowHint {
    pub const NONE: FlowHint = FlowHint { hash: 0, pos: u32::MAX, inbound: false };
}

/// Ports in use on one egress IP by this worker, per protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressPorts {
    pub ip: Ipv4Addr,
    pub tcp: u32,
    pub udp: u32,
    pub icmp: u32,
}

impl EgressPorts {
    const EMPTY: EgressPorts = EgressPorts { ip: Ipv4Addr::UNSPECIFIED, tcp: 0, udp: 0, icmp: 0 };
}

/// A snapshot of one worker's NAT gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatStats {
    pub tcp_syn_sent: u32,
    pub tcp_established: u32,
    pub tcp_transitory: u32,
    pub udp: u32,
    pub icmp: u32,
    pub mappings: u32,
    /// Port allocations that found no free port (each also dropped a packet as `OutOfPorts`).
    pub allocation_failures: u64,
    /// Translation log records this worker could not send (rate bound or full queue).
    pub log_suppressed: u64,
    egress: [EgressPorts; MAX_EGRESS_IPS],
    egress_len: usize,
}

impl NatStats {
    /// Writes these gauges where the admin endpoint reads them (relaxed stores; the worker's only writes there).
    pub fn publish(&self, gauges: &crate::stats::NatGauges) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&gauges.tcp_syn_sent, self.tcp_syn_sent.into());
        set(&gauges.tcp_established, self.tcp_established.into());
        set(&gauges.tcp_transitory, self.tcp_transitory.into());
        set(&gauges.udp, self.udp.into());
        set(&gauges.icmp, self.icmp.into());
        set(&gauges.mappings, self.mappings.into());
        set(&gauges.allocation_failures, self.allocation_failures);
        set(&gauges.log_suppressed, self.log_suppressed);
        let ports = self.egress_ports();
        for (slot, e) in gauges.egress.iter().zip(ports) {
            set(&slot[0], u32::from(e.ip).into());
            set(&slot[1], e.tcp.into());
            set(&slot[2], e.udp.into());
            set(&slot[3], e.icmp.into());
        }
        set(&gauges.egress_len, ports.len() as u64);
    }

    /// All sessions.
    pub fn flows(&self) -> u32 {
        self.tcp_syn_sent + self.tcp_established + self.tcp_transitory + self.udp + self.icmp
    }

    /// Ports in use per egress IP this worker has used.
    pub fn egress_ports(&self) -> &[EgressPorts] {
        &self.egress[..self.egress_len.min(MAX_EGRESS_IPS)]
    }
}

/// One NAT engine per worker. See the module docs.
pub struct Nat {
    worker: u16,
    workers: u16,
    timeouts: [u32; CLASSES],
    quarantine: u32,
    max_flows: u32,
    per_source: u32,
    /// Sessions created by inbound packets and not yet judged, and their bound.
    unsolicited: u32,
    max_unsolicited: u32,
    seed: (u64, u64),

    sessions: Box<[Session]>,
    free_session: u32,
    session_count: u32,
    /// The translation log, when on ([`Nat::set_log`]).
    flow_log: Option<FlowLog>,
    /// Inside 5-tuple → session.
    out_idx: Index,
    /// External 5-tuple → session (UDP: hashed without the remote port, for address-dependent filtering).
    in_idx: Index,
    lru: [Lru; CLASSES],

    mappings: Box<[Mapping]>,
    free_mapping: u32,
    mapping_count: u32,
    /// Inside `(ip, port, proto)` → mapping.
    map_idx: Index,
    /// Inside address → flows it holds (the value is the count; the hash is a bijection of the address).
    sources: Index,
    /// Per capped group and egress IP: mappings held (see [`MAX_GROUP_PORT_COUNTERS`]).
    group_ports: Box<[GroupPorts]>,
    /// Per mapping: the `group_ports` counter it counts in, or `NO_GROUP_SLOT`.
    mapping_group: Box<[u16]>,

    egress: [u32; MAX_EGRESS_IPS],
    egress_len: usize,
    /// `egress` positions by [`egress_bucket_of`] (see [`Nat::egress_index`]).
    egress_bucket: [u8; EGRESS_BUCKETS],
    /// Policy generation whose egress IPs were last added to `egress`.
    egress_generation: Option<u64>,
    /// `[ip][proto class][port offset]` slot values; offsets 0.. are the low slice, then the high slice.
    ports: Box<[u32]>,
    low: (u32, u32),
    high: (u32, u32),
    per_table: usize,
    /// Ports in use per `[ip][proto class][low/high slice]`: a full slice fails at once instead of being searched.
    in_use: [[[u32; 2]; PCS]; MAX_EGRESS_IPS],
    /// Next port offset to try, per `[ip][proto class][low/high]`.
    cursor: [[[u32; 2]; PCS]; MAX_EGRESS_IPS],
    allocation_failures: u64,
    /// The policy's answer the last time `outbound` consulted it (see [`Nat::take_decision`]).
    last_decision: Option<Decision>,
}

/// What a new session's index insertions need, computed once: the outbound index hash and the empty slot its
/// lookup ended on (`usize::MAX`: probe again), the inbound index hash, and the source counter's hash and probe.
struct NewSlots {
    ho: u32,
    out_pos: usize,
    hi: u32,
    hs: u32,
    src: Result<usize, usize>,
}

/// What a refused segment is dropped as.
#[inline]
fn tcp_verdict(verdict: TcpVerdict) -> Result<(), DropReason> {
    match verdict {
        TcpVerdict::Forward => Ok(()),
        TcpVerdict::RstOutOfWindow => Err(DropReason::TcpRstOutOfWindow),
        TcpVerdict::OutOfWindow => Err(DropReason::TcpOutOfWindow),
    }
}

#[inline]
fn secs(now: Instant) -> u32 {
    (now.as_nanos() / 1_000_000_000).min(u64::from(u32::MAX >> 1)) as u32
}

#[inline]
fn low_gen(g: u64) -> u32 {
    g as u32
}

impl Nat {
    /// A worker's engine; allocates every table (sized from `config.max_flows`) here and never again.
    pub fn new(config: &NatConfig, worker: u16) -> Nat {
        let workers = config.workers.max(1);
        let worker = worker.min(workers - 1);
        let max_flows = config.max_flows.clamp(1, IN_USE - 2);
        let n = max_flows as usize;
        let t = &config.timeouts;
        let mut timeouts = [0u32; CLASSES];
        timeouts[CLASS_UDP as usize] = t.udp_secs;
        timeouts[CLASS_ICMP as usize] = t.icmp_secs;
        timeouts[CLASS_TCP_TRANSITORY as usize] = t.tcp_transitory_secs;
        timeouts[CLASS_TCP_ESTABLISHED as usize] = t.tcp_established_secs;
        timeouts[CLASS_TCP_SYN as usize] = t.tcp_transitory_secs;

        let mut sessions = vec![Session::FREE; n].into_boxed_slice();
        for (i, s) in sessions.iter_mut().enumerate() {
            s.next = if i + 1 < n { i as u32 + 1 } else { NONE };
        }
        let mut mappings = vec![Mapping::FREE; n].into_boxed_slice();
        for (i, m) in mappings.iter_mut().enumerate() {
            m.refs = if i + 1 < n { i as u32 + 1 } else { NONE };
        }
        let low = slice_of(LOW_FIRST, LOW_LEN, workers, worker);
        let high = slice_of(HIGH_FIRST, HIGH_LEN, workers, worker);
        let per_table = ((low.1 - low.0) + (high.1 - high.0)) as usize;
        let seed = {
            use std::hash::BuildHasher;
            let rs = std::collections::hash_map::RandomState::new();
            (rs.hash_one(0x5eed_u64), rs.hash_one(0xfeed_u64))
        };
        let mut nat = Nat {
            worker,
            workers,
            timeouts,
            quarantine: config.port_quarantine_secs,
            max_flows,
            per_source: config.max_flows_per_source.max(1),
            unsolicited: 0,
            max_unsolicited: (max_flows / 4).max(1),
            seed,
            sessions,
            free_session: 0,
            session_count: 0,
            flow_log: None,
            out_idx: Index::with_capacity(n),
            in_idx: Index::with_capacity(n),
            lru: [Lru::EMPTY; CLASSES],
            mappings,
            free_mapping: 0,
            mapping_count: 0,
            map_idx: Index::with_capacity(n),
            sources: Index::with_capacity(n),
            group_ports: vec![GroupPorts::default(); MAX_GROUP_PORT_COUNTERS].into_boxed_slice(),
            mapping_group: vec![NO_GROUP_SLOT; n].into_boxed_slice(),
            egress: [0; MAX_EGRESS_IPS],
            egress_len: 0,
            egress_bucket: [BUCKET_EMPTY; EGRESS_BUCKETS],
            egress_generation: None,
            ports: vec![0u32; per_table * PCS * MAX_EGRESS_IPS].into_boxed_slice(),
            low,
            high,
            per_table,
            in_use: [[[0; 2]; PCS]; MAX_EGRESS_IPS],
            cursor: [[[0; 2]; PCS]; MAX_EGRESS_IPS],
            allocation_failures: 0,
            last_decision: None,
        };
        if let Some((first, last)) = config.reserved_tcp_ports {
            nat.reserve_tcp_ports(first, last);
        }
        nat
    }

    /// Marks TCP ports `first..=last` of every egress IP as never free in this worker's slices: a "free from"
    /// second no clock reaches, so allocation skips them and lookups find no mapping there.
    fn reserve_tcp_ports(&mut self, first: u16, last: u16) {
        for ip_idx in 0..MAX_EGRESS_IPS as u8 {
            for port in first..=last {
                if let Some(slot) = self.port_slot(ip_idx, PC_TCP, port) {
                    self.ports[slot] = !IN_USE;
                }
            }
        }
    }

    /// The worker that owns `port` (see [`reply_owner`]).
    pub fn reply_owner(&self, egress_ip: Ipv4Addr, proto: u8, port: u16) -> u16 {
        reply_owner(self.workers, egress_ip, proto, port)
    }

    /// Heap bytes held by this engine (all allocated in `new`).
    pub fn bytes_allocated(&self) -> usize {
        std::mem::size_of_val(&*self.sessions)
            + std::mem::size_of_val(&*self.mappings)
            + std::mem::size_of_val(&*self.mapping_group)
            + std::mem::size_of_val(&*self.group_ports)
            + std::mem::size_of_val(&*self.ports)
            + self.out_idx.bytes()
            + self.in_idx.bytes()
            + self.map_idx.bytes()
            + self.sources.bytes()
    }

    pub fn stats(&self) -> NatStats {
        let mut egress = [EgressPorts::EMPTY; MAX_EGRESS_IPS];
        for (i, e) in egress.iter_mut().enumerate().take(self.egress_len) {
            *e = EgressPorts {
                ip: Ipv4Addr::from(self.egress[i]),
                tcp: self.in_use[i][PC_TCP].iter().sum(),
                udp: self.in_use[i][PC_UDP].iter().sum(),
                icmp: self.in_use[i][PC_ICMP].iter().sum(),
            };
        }
        NatStats {
            tcp_syn_sent: self.lru[CLASS_TCP_SYN as usize].len,
            tcp_established: self.lru[CLASS_TCP_ESTABLISHED as usize].len,
            tcp_transitory: self.lru[CLASS_TCP_TRANSITORY as usize].len,
            udp: self.lru[CLASS_UDP as usize].len,
            icmp: self.lru[CLASS_ICMP as usize].len,
            mappings: self.mapping_count,
            allocation_failures: self.allocation_failures,
            log_suppressed: self.log_suppressed(),
            egress,
            egress_len: self.egress_len,
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Hashing and lookups
    // -----------------------------------------------------------------------------------------------------------

    #[inline]
    fn out_hash(&self, in_addr: u32, in_port: u16, remote: u32, remote_port: u16, proto: u8) -> u32 {
        hash2(
            self.seed,
            (u64::from(in_addr) << 32) | u64::from(remote),
            (u64::from(in_port) << 32) | (u64::from(remote_port) << 16) | u64::from(proto),
        )
    }

    /// UDP sessions hash without the remote port, so one probe sequence finds both the exact session and any
    /// session of the same mapping with the same remote address (address-dependent filtering, RFC 4787 REQ-8).
    #[inline(always)]
    fn in_hash(&self, ip_idx: u8, ext_port: u16, remote: u32, remote_port: u16, proto: u8) -> u32 {
        let rp = if proto == ip_proto::UDP { 0 } else { remote_port };
        hash2(
            (self.seed.1, self.seed.0),
            (u64::from(ip_idx) << 32) | u64::from(remote),
            (u64::from(ext_port) << 32) | (u64::from(rp) << 16) | u64::from(proto),
        )
    }

    #[inline]
    fn map_hash(&self, in_addr: u32, in_port: u16, proto: u8) -> u32 {
        hash2(self.seed, u64::from(in_addr), (u64::from(in_port) << 8) | u64::from(proto) | (1 << 40))
    }

    #[inline]
    fn find_out(&self, in_addr: u32, in_port: u16, remote: u32, remote_port: u16, proto: u8) -> Option<u32> {
        let h = self.out_hash(in_addr, in_port, remote, remote_port, proto);
        self.probe_out(h, in_addr, in_port, remote, remote_port, proto).ok()
    }

    /// The session of an inside 5-tuple whose [`Nat::out_hash`] is `h`, or where its index entry goes.
    #[inline]
    fn probe_out(
        &self,
        h: u32,
        in_addr: u32,
        in_port: u16,
        remote: u32,
        remote_port: u16,
        proto: u8,
    ) -> Result<u32, usize> {
        let sessions = &self.sessions;
        self.out_idx.lookup(h, |v| {
            sessions.get(v as usize).is_some_and(|s| {
                s.in_addr == in_addr
                    && s.remote_addr == remote
                    && s.in_port == in_port
                    && s.remote_port == remote_port
                    && s.proto == proto
            })
        })
    }

    /// The session of an external 5-tuple, and (UDP) a session of the same mapping and remote address with
    /// another remote port (a "sibling") and how many such siblings were passed (all of them on a miss).
    #[inline]
    fn find_in(
        &self,
        ip_idx: u8,
        ext_port: u16,
        remote: u32,
        remote_port: u16,
        proto: u8,
    ) -> (Option<u32>, u32, u32) {
        let h = self.in_hash(ip_idx, ext_port, remote, remote_port, proto);
        let sessions = &self.sessions;
        let mut sibling = NONE;
        let mut siblings = 0;
        let exact = self.in_idx.find(h, |v| {
            sessions.get(v as usize).is_some_and(|s| {
                let same = s.ip_idx == ip_idx
                    && s.ext_port == ext_port
                    && s.remote_addr == remote
                    && s.proto == proto;
                if same && s.remote_port != remote_port {
                    sibling = v;
                    siblings += 1;
                }
                same && s.remote_port == remote_port
            })
        });
        (exact, sibling, siblings)
    }

    #[inline]
    fn find_mapping(&self, in_addr: u32, in_port: u16, proto: u8) -> Option<u32> {
        let h = self.map_hash(in_addr, in_port, proto);
        let pos = self.probe_mapping(h, in_addr, in_port, proto).ok()?;
        Some(self.map_idx.value_at(pos))
    }

    /// The index position of inside endpoint `(in_addr, in_port, proto)`'s mapping ([`Nat::map_hash`] `h`), or
    /// where its entry goes.
    #[inline]
    fn probe_mapping(&self, h: u32, in_addr: u32, in_port: u16, proto: u8) -> Result<usize, usize> {
        let mappings = &self.mappings;
        self.map_idx.probe(h, |v| {
            mappings
                .get(v as usize)
                .is_some_and(|m| m.in_addr == in_addr && m.in_port == in_port && m.proto == proto)
        })
    }

    /// The position of `addr` in the egress table. It runs on every new flow (twice) and every inbound packet, so
    /// a 64-bucket direct-mapped table answers first; only a bucket two egress IPs share falls back to a scan.
    #[inline]
    fn egress_index(&self, addr: u32) -> Option<u8> {
        match self.egress_bucket[egress_bucket_of(addr)] {
            BUCKET_EMPTY => None,
            BUCKET_SHARED => self.egress[..self.egress_len].iter().position(|&a| a == addr).map(|i| i as u8),
            i => (self.egress[usize::from(i)] == addr).then_some(i),
        }
    }

    /// Whether `addr` is one of the egress IPs this worker translates to.
    #[inline]
    pub fn is_egress_ip(&self, addr: Ipv4Addr) -> bool {
        self.egress_index(u32::from(addr)).is_some()
    }

    /// The policy decision the last [`Nat::outbound`] call acted on, if it consulted the policy (a new flow, a
    /// flow judged again after a reload, or a flow that keeps no state: denied or `l7`). For counters and audit.
    pub fn take_decision(&mut self) -> Option<Decision> {
        self.last_decision.take()
    }

    /// Learns the egress IPs of a new policy snapshot before any packet needs them: a worker that only ever sees
    /// replies (RSS put the outbound flows on another queue) must still recognise its egress IPs. Cheap when the
    /// generation is unchanged; the pipeline calls it once per batch.
    pub fn sync_policy(&mut self, policy: &PolicySnapshot) {
        self.sync_egress(policy);
    }

    /// Whether egress IP `ip_idx` is still one of `group`'s egress IPs.
    fn egress_listed(&self, policy: &PolicySnapshot, group: crate::policy::GroupId, ip_idx: u8) -> bool {
        let ip = Ipv4Addr::from(self.egress[usize::from(ip_idx)]);
        policy.egress_ips(group).contains(&ip)
    }

    /// Adds the policy's egress IPs to this worker's table (once per policy generation). The table never
    /// shrinks: mappings on a removed IP keep working until they expire. Runs per packet, so only the
    /// generation check is inlined.
    #[inline]
    fn sync_egress(&mut self, policy: &PolicySnapshot) {
        if self.egress_generation != Some(policy.generation()) {
            self.add_egress_ips(policy);
        }
    }

    #[cold]
    fn add_egress_ips(&mut self, policy: &PolicySnapshot) {
        self.egress_generation = Some(policy.generation());
        for g in 0..policy.group_count() {
            for ip in policy.egress_ips(crate::policy::GroupId(g as u32)) {
                let a = u32::from(*ip);
                if self.egress_index(a).is_none() && self.egress_len < MAX_EGRESS_IPS {
                    let b = &mut self.egress_bucket[egress_bucket_of(a)];
                    *b = if *b == BUCKET_EMPTY { self.egress_len as u8 } else { BUCKET_SHARED };
                    self.egress[self.egress_len] = a;
                    self.egress_len += 1;
                }
            }
        }
    }

    /// The counter of the inside address whose [`hash_addr`] is `h`: its position, or where it goes.
    #[inline]
    fn source_probe(&self, h: u32) -> Result<usize, usize> {
        // The hash is a bijection of the address: an equal hash is the same address.
        self.sources.probe(h, |_| true)
    }

    fn source_add(&mut self, addr: u32, delta: i32) {
        let h = hash_addr(self.seed.0, addr);
        match self.sources.find_pos(h, |_| true) {
            Some(pos) => {
                let c = self.sources.value_at(pos).saturating_add_signed(delta);
                if c == 0 {
                    self.sources.remove_at(pos);
                } else {
                    self.sources.set_value_at(pos, c);
                }
            }
            None => {
                if delta > 0 {
                    self.sources.insert(h, delta as u32);
                }
            }
        }
    }

    /// Checks the flow limits for a new session of the inside address whose [`hash_addr`] is `hs`; returns the
    /// probe of its counter for [`Nat::insert_session`].
    #[inline]
    fn check_limits(&self, hs: u32) -> Result<Result<usize, usize>, DropReason> {
        if self.session_count >= self.max_flows || self.free_session == NONE {
            return Err(DropReason::ConntrackFull);
        }
        let src = self.source_probe(hs);
        let count = match src {
            Ok(pos) => self.sources.value_at(pos),
            Err(_) => 0,
        };
        if count >= self.per_source {
            return Err(DropReason::SourceFlowLimit);
        }
        Ok(src)
    }

    /// Creates the mapping of inside `(addr, port, proto)` (absent; its index entry goes at `map_pos`, from
    /// [`Nat::probe_mapping`] with hash `hm`) on `ip_idx`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn create_mapping(
        &mut self,
        hm: u32,
        map_pos: usize,
        in_addr: u32,
        in_port: u16,
        proto: u8,
        ip_idx: u8,
        now_s: u32,
    ) -> Result<u32, DropReason> {
        let mid = self.free_mapping;
        if mid == NONE {
            return Err(DropReason::ConntrackFull);
        }
        let Some(ext_port) = self.alloc_port(ip_idx, proto, in_port, mid, now_s) else {
            self.allocation_failures += 1;
            return Err(DropReason::OutOfPorts);
        };
        let next_free = self.mappings[mid as usize].refs;
        self.free_mapping = next_free;
        self.mappings[mid as usize] =
            Mapping { in_addr, refs: 0, in_port, ext_port, ip_idx, proto, unsolicited: 0 };
        self.mapping_count += 1;
        self.map_idx.insert_at(map_pos, hm, mid);
        Ok(mid)
    }

    /// Creates a session on mapping `mid` towards `(remote, remote_port)`. Limits are checked by the caller,
    /// [`Nat::check_limits`] giving `src`, the probe of the source counter (hash `hs`).
    #[allow(clippy::too_many_arguments)]
    fn create_session(
        &mut self,
        mid: u32,
        remote: u32,
        remote_port: u16,
        now_s: u32,
        flags: u8,
        generation: u32,
        hs: u32,
        src: Result<usize, usize>,
    ) -> u32 {
        let m = self.mappings[mid as usize];
        let ho = self.out_hash(m.in_addr, m.in_port, remote, remote_port, m.proto);
        let hi = self.in_hash(m.ip_idx, m.ext_port, remote, remote_port, m.proto);
        let slots = NewSlots { ho, out_pos: usize::MAX, hi, hs, src };
        self.insert_session(mid, remote, remote_port, now_s, flags, generation, &slots)
    }

    /// [`Nat::create_session`] with the hashes and index probes the caller already has. Inlined: its many
    /// arguments would otherwise go through the stack on every new flow.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn insert_session(
        &mut self,
        mid: u32,
        remote: u32,
        remote_port: u16,
        now_s: u32,
        flags: u8,
        generation: u32,
        slots: &NewSlots,
    ) -> u32 {
        let sid = self.free_session;
        let m = self.mappings[mid as usize];
        let next_free = self.sessions[sid as usize].next;
        self.free_session = next_free;
        self.session_count += 1;
        let class = match m.proto {
            ip_proto::TCP => CLASS_TCP_SYN,
            ip_proto::UDP => CLASS_UDP,
            _ => CLASS_ICMP,
        };
        self.sessions[sid as usize] = Session {
            in_addr: m.in_addr,
            remote_addr: remote,
            in_port: m.in_port,
            remote_port,
            ext_port: m.ext_port,
            ip_idx: m.ip_idx,
            proto: m.proto,
            class,
            flags,
            last_seen: now_s,
            generation,
            ..Session::FREE
        };
        self.mappings[mid as usize].refs += 1;
        self.out_idx.insert_at(slots.out_pos, slots.ho, sid);
        self.in_idx.insert(slots.hi, sid);
        lru_push(&mut self.sessions, &mut self.lru[usize::from(class)], sid);
        if self.flow_log.is_some() {
            self.log_created(sid, now_s, flags);
        }
        if flags & SESSION_UNJUDGED != 0 {
            // Created by an inbound packet: its own bounds, not the inside host's quota.
            self.unsolicited += 1;
            self.mappings[mid as usize].unsolicited += 1;
            return sid;
        }
        match slots.src {
            Ok(pos) => self.sources.set_value_at(pos, self.sources.value_at(pos).saturating_add(1)),
            Err(pos) => _ = self.sources.insert_at(pos, slots.hs, 1),
        }
        sid
    }

    /// Removes a session; frees its mapping (port into quarantine) when it was the last user.
    fn remove_session(&mut self, sid: u32, now_s: u32, why: FlowEnd) {
        let Some(&s) = self.sessions.get(sid as usize) else { return };
        if s.class == CLASS_FREE {
            return;
        }
        let key = self.flow_log.is_some().then(|| self.flow_key(&s));
        if let (Some(log), Some(key)) = (self.flow_log.as_mut(), key) {
            log.ended(Instant::from_secs(u64::from(now_s)), sid, key, why);
        }
        lru_unlink(&mut self.sessions, &mut self.lru[usize::from(s.class)], sid);
        let ho = self.out_hash(s.in_addr, s.in_port, s.remote_addr, s.remote_port, s.proto);
        self.out_idx.remove(ho, sid);
        let hi = self.in_hash(s.ip_idx, s.ext_port, s.remote_addr, s.remote_port, s.proto);
        self.in_idx.remove(hi, sid);
        let unsolicited = s.flags & SESSION_UNJUDGED != 0;
        if unsolicited {
            self.unsolicited = self.unsolicited.saturating_sub(1);
        } else {
            self.source_add(s.in_addr, -1);
        }
        self.sessions[sid as usize] = Session { next: self.free_session, ..Session::FREE };
        self.free_session = sid;
        self.session_count -= 1;
        let mid = self.mapping_of_session(&s);
        if let Some(mid) = mid {
            let m = &mut self.mappings[mid as usize];
            m.refs = m.refs.saturating_sub(1);
            if unsolicited {
                m.unsolicited = m.unsolicited.saturating_sub(1);
            }
            if m.refs == 0 {
                let m = *m;
                let slot = std::mem::replace(&mut self.mapping_group[mid as usize], NO_GROUP_SLOT);
                if let Some(counter) = self.group_ports.get_mut(usize::from(slot)) {
                    counter.count = counter.count.saturating_sub(1);
                }
                let h = self.map_hash(m.in_addr, m.in_port, m.proto);
                self.map_idx.remove(h, mid);
                self.free_port(m.ip_idx, m.proto, m.ext_port, now_s);
                self.mappings[mid as usize] = Mapping { refs: self.free_mapping, ..Mapping::FREE };
                self.free_mapping = mid;
                self.mapping_count -= 1;
            }
        }
    }

    /// The mapping a session uses: the port table names it exactly (even a retired one no longer in the
    /// inside-endpoint index).
    fn mapping_of_session(&self, s: &Session) -> Option<u32> {
        self.mapping_at(s.ip_idx, s.proto, s.ext_port).filter(|&mid| {
            self.mappings.get(mid as usize).is_some_and(|m| m.in_addr == s.in_addr && m.in_port == s.in_port)
        })
    }

    /// Moves a session to the tail of its class's list with `last_seen = now_s` (a refresh), or to a new class.
    #[inline]
    fn touch(&mut self, sid: u32, class: u8, now_s: u32) {
        let Some(s) = self.sessions.get(sid as usize) else { return };
        if s.class == class && s.last_seen == now_s {
            return;
        }
        let old = usize::from(s.class);
        lru_unlink(&mut self.sessions, &mut self.lru[old], sid);
        if let Some(s) = self.sessions.get_mut(sid as usize) {
            s.class = class;
            s.last_seen = now_s;
        }
        lru_push(&mut self.sessions, &mut self.lru[usize::from(class)], sid);
    }

    /// Expires at most `budget` idle sessions (their mappings go when their last session goes). Returns how many
    /// sessions were removed. No sweep: each class's list is in expiry order, so only expired heads are visited.
    pub fn poll_expiry(&mut self, now: Instant, budget: usize) -> usize {
        let now_s = secs(now);
        let mut removed = 0;
        for class in 0..CLASSES {
            while removed < budget {
                let head = self.lru[class].head;
                let Some(s) = self.sessions.get(head as usize) else { break };
                if now_s < s.last_seen.saturating_add(self.timeouts[class]) {
                    break;
                }
                let why = if class == usize::from(CLASS_TCP_TRANSITORY) {
                    FlowEnd::TcpClosed
                } else {
                    FlowEnd::Idle
                };
                self.remove_session(head, now_s, why);
                removed += 1;
            }
        }
        removed
    }

    // -----------------------------------------------------------------------------------------------------------
    // Outbound
    // -----------------------------------------------------------------------------------------------------------

    /// Turns the translation log on (`mode` other than `Off`): records go to `queue`, at most `records_per_sec`.
    /// Allocates the per-flow figures (packets and bytes each way) beside the sessions.
    pub fn set_log(&mut self, mode: NatLogMode, records_per_sec: u32, queue: std::sync::Arc<NatLogQueue>) {
        self.flow_log = (mode != NatLogMode::Off)
            .then(|| FlowLog::new(mode, records_per_sec, queue, self.sessions.len(), self.worker));
    }

    /// Translation log records this worker could not send (rate bound or full queue).
    pub fn log_suppressed(&self) -> u64 {
        self.flow_log.as_ref().map_or(0, |l| l.suppressed)
    }

    /// What a translation log record says of session `s`.
    fn flow_key(&self, s: &Session) -> FlowKey {
        FlowKey {
            proto: s.proto,
            inside: endpoint(s.in_addr, s.in_port),
            egress: endpoint(self.egress.get(usize::from(s.ip_idx)).copied().unwrap_or(0), s.ext_port),
            remote: endpoint(s.remote_addr, s.remote_port),
            generation: s.generation,
        }
    }

    #[cold]
    fn log_created(&mut self, sid: u32, now_s: u32, flags: u8) {
        let key = self.flow_key(&self.sessions[sid as usize]);
        // A session an inbound packet created was never judged; otherwise the decision that let it in.
        let decision = if flags & SESSION_UNJUDGED != 0 { None } else { self.last_decision };
        if let Some(log) = self.flow_log.as_mut() {
            let (group, rule) = decision.map_or((None, None), |d| (d.group, d.rule));
            log.created(Instant::from_secs(u64::from(now_s)), sid, key, group, rule);
        }
    }

    /// Whether the flow tables have outgrown the cache, so that [`Nat::prefetch_flow`] pays for itself. With fewer
    /// flows every lookup hits the cache anyway and the prefetch passes are pure cost (about 10 % of the one-flow
    /// case in the pipeline bench).
    #[inline]
    pub fn prefetch_pays(&self) -> bool {
        self.session_count >= PREFETCH_MIN_FLOWS
    }

    /// First pass over a burst (see [`FlowHint`]): reads the flow key of `packet` (an IPv4 packet from inside when
    /// `from_outside` is false, a reply to an egress IP when it is true), computes the hash of its index and starts
    /// loading the index slot a lookup starts at. Decides nothing and changes nothing: any bytes are fine, a
    /// packet of no flow just costs the load.
    #[inline]
    pub fn prefetch_flow(&self, from_outside: bool, packet: &[u8]) -> FlowHint {
        let Some(h) = ipv4::fixed(packet) else { return FlowHint::NONE };
        let ihl = ipv4::header_len(h);
        let proto = ipv4::protocol(h);
        let (src, dst) = (ipv4::src(h), ipv4::dst(h));
        let (sport, dport) = match proto {
            ip_proto::TCP | ip_proto::UDP => {
                (read_u16(packet, ihl + udp::SRC_PORT), read_u16(packet, ihl + udp::DST_PORT))
            }
            ip_proto::ICMP => (read_u16(packet, ihl + icmp::IDENTIFIER), 0),
            _ => return FlowHint::NONE,
        };
        if from_outside {
            let Some(ip_idx) = self.egress_index(dst) else { return FlowHint::NONE };
            let (ext_port, remote_port) = if proto == ip_proto::ICMP { (sport, 0) } else { (dport, sport) };
            let hash = self.in_hash(ip_idx, ext_port, src, remote_port, proto);
            FlowHint { hash, pos: self.in_idx.prefetch_home(hash) as u32, inbound: true }
        } else {
            let hash = self.out_hash(src, sport, dst, dport, proto);
            FlowHint { hash, pos: self.out_idx.prefetch_home(hash) as u32, inbound: false }
        }
    }

    /// Second pass over a burst: reads the index slot [`Nat::prefetch_flow`] loaded and starts loading the
    /// session it names, so that the translation that follows finds both in cache.
    #[inline]
    pub fn prefetch_session(&self, hint: FlowHint) {
        if hint.pos == u32::MAX {
            return;
        }
        let index = if hint.inbound { &self.in_idx } else { &self.out_idx };
        let sid = index.value_if_home(hint.pos as usize, hint.hash);
        if sid != NONE {
            // A session is 56 bytes and may straddle two cache lines; the start of the next one is on the second.
            prefetch_index::prefetch_index(&self.sessions, sid as usize);
            prefetch_index::prefetch_index(&self.sessions, sid as usize + 1);
        }
    }

    /// Inside → outside. `packet` is the IPv4 packet (header through total length), already validated by the
    /// pipeline (version, IHL, lengths, header checksum, not a fragment). Rewrites the source (and for hairpin the
    /// destination) in place.
    pub fn outbound(
        &mut self,
        now: Instant,
        packet: &mut [u8],
        policy: &PolicySnapshot,
    ) -> Result<Outbound, DropReason> {
        self.outbound_admitting(now, packet, policy, |_| true)
    }

    /// [`Nat::outbound`], with `admit` asked about the source of every new flow before it is judged or takes
    /// any state (the pipeline's reverse-path check): a source it refuses is dropped as `SourceNotInside`.
    /// Established flows were admitted when they began, so they pay nothing for it.
    #[inline]
    pub fn outbound_admitting(
        &mut self,
        now: Instant,
        packet: &mut [u8],
        policy: &PolicySnapshot,
        admit: impl FnOnce(Ipv4Addr) -> bool,
    ) -> Result<Outbound, DropReason> {
        self.sync_egress(policy);
        let (l4, kind) = parse(packet, true)?;
        if kind == Kind::IcmpError {
            return self.outbound_icmp_error(packet, &l4, policy);
        }
        // RFC 4787 REQ-1 across workers: one owner per inside endpoint, whichever queue its packets arrive on.
        if let Some(owner) = self.other_owner(l4.sport) {
            return Ok(Outbound::OtherWorker(owner));
        }
        let now_s = secs(now);
        let tcp = l4.proto == ip_proto::TCP;
        // RFC 5382: invalid flag combinations (SYN+FIN, SYN+RST, NULL) create no state and are
        // never forwarded.
        if tcp && tcp_flags_invalid(l4.seg.flags) {
            return Err(DropReason::InvalidTcpFlags);
        }
        let gen = low_gen(policy.generation());
        let mut result = Outbound::Forward;
        let ho = self.out_hash(l4.src, l4.sport, l4.dst, l4.dport, l4.proto);
        let sid = match self.probe_out(ho, l4.src, l4.sport, l4.dst, l4.dport, l4.proto) {
            Ok(sid) => {
                let s = self.sessions[sid as usize];
                if s.flags & SESSION_HAIRPIN_PEER == 0
                    && (s.generation != gen || s.flags & SESSION_UNJUDGED != 0)
                {
                    // Reload: the flow is judged again on its next packet.
                    let d = policy.evaluate_v4(
                        Ipv4Addr::from(l4.src),
                        Ipv4Addr::from(l4.dst),
                        l4.proto,
                        l4.dport,
                    );
                    self.last_decision = Some(d);
                    let denied = match d.verdict {
                        Verdict::Allow => None,
                        Verdict::L7 => Some(DropReason::L7Unavailable),
                        Verdict::Deny(r) if !d.dry_run => Some(r.drop_reason()),
                        Verdict::Deny(_) => None,
                    };
                    // Its egress IP was taken away from its group: the flow cannot go on from it.
                    let ip_gone = d.group.is_some_and(|g| !self.egress_listed(policy, g, s.ip_idx));
                    let denied = denied.or(ip_gone.then_some(DropReason::NoEgressIp));
                    if let Some(reason) = denied {
                        let why = if ip_gone { FlowEnd::EgressIpRemoved } else { FlowEnd::PolicyChanged };
                        self.remove_session(sid, now_s, why);
                        return Err(reason);
                    }
                    if s.flags & SESSION_UNJUDGED != 0 {
                        // An inbound-created session the host now uses: from here on it is the host's flow.
                        self.unsolicited = self.unsolicited.saturating_sub(1);
                        if let Some(mid) = self.mapping_of_session(&s) {
                            let m = &mut self.mappings[mid as usize];
                            m.unsolicited = m.unsolicited.saturating_sub(1);
                        }
                        self.source_add(s.in_addr, 1);
                    }
                    let s = &mut self.sessions[sid as usize];
                    s.generation = gen;
                    s.flags &= !SESSION_UNJUDGED;
                }
                sid
            }
            Err(out_pos) => {
                if !admit(Ipv4Addr::from(l4.src)) {
                    return Err(DropReason::SourceNotInside);
                }
                // The policy first: every packet of an `l7` flow (not only its SYN) goes to the L7 path, which
                // keeps no state here.
                let d =
                    policy.evaluate_v4(Ipv4Addr::from(l4.src), Ipv4Addr::from(l4.dst), l4.proto, l4.dport);
                self.last_decision = Some(d);
                match d.verdict {
                    Verdict::Allow => {}
                    Verdict::L7 => return Ok(Outbound::L7),
                    Verdict::Deny(r) if !d.dry_run => return Err(r.drop_reason()),
                    Verdict::Deny(_) => result = Outbound::DryRunDenied,
                }
                // RFC 5382: a TCP flow starts with a SYN (a bare SYN; SYN+ACK with no state is not a new flow).
                if tcp && l4.seg.flags & (tcp::SYN | tcp::ACK) != tcp::SYN {
                    return Err(DropReason::TcpNotSyn);
                }
                // RFC 4787 REQ-2: paired pooling.
                let egress = d.group.and_then(|g| policy.egress_ip_for(g, Ipv4Addr::from(l4.src)));
                let Some(egress) = egress else { return Err(DropReason::NoEgressIp) };
                let Some(ip_idx) = self.egress_index(u32::from(egress)) else {
                    self.allocation_failures += 1;
                    return Err(DropReason::OutOfPorts);
                };
                // A new flow in a big table costs a cache miss in each of the mapping index, the source counters
                // and the inbound index (most new mappings keep their original port: that is the slot to guess).
                // Issue the three loads together so the misses overlap; their value is only consumed at the end,
                // so nothing waits for them here. Each hash is computed once, and each index is probed once:
                // a miss's probe ends on the empty slot where the new entry goes.
                let hm = self.map_hash(l4.src, l4.sport, l4.proto);
                let hs = hash_addr(self.seed.0, l4.src);
                let hi = self.in_hash(ip_idx, l4.sport, l4.dst, l4.dport, l4.proto);
                let warm = self.map_idx.peek(hm) ^ self.sources.peek(hs) ^ self.in_idx.peek(hi);
                let src = self.check_limits(hs)?;
                let mut map_pos = self.probe_mapping(hm, l4.src, l4.sport, l4.proto);
                if let (Ok(pos), Some(g)) = (map_pos, d.group) {
                    let old_ip = self.mappings[self.map_idx.value_at(pos) as usize].ip_idx;
                    if !self.egress_listed(policy, g, old_ip) {
                        // A reload took this mapping's egress IP away from the group: retire the mapping (its
                        // sessions keep it, and its port, until they go) and map the endpoint afresh.
                        self.map_idx.remove_at(pos);
                        map_pos = Err(usize::MAX);
                    }
                }
                let mid = match map_pos {
                    Ok(pos) => self.map_idx.value_at(pos),
                    Err(pos) => {
                        // A group with a port cap: it may not take more of this egress IP's ports.
                        let capped = d.group.and_then(|g| policy.group_port_limit(g));
                        let slot = match capped {
                            Some((key, limit)) => self.group_counter(key, ip_idx, limit)?,
                            None => NO_GROUP_SLOT,
                        };
                        let mid = self.create_mapping(hm, pos, l4.src, l4.sport, l4.proto, ip_idx, now_s)?;
                        if let Some(counter) = self.group_ports.get_mut(usize::from(slot)) {
                            counter.count += 1;
                            self.mapping_group[mid as usize] = slot;
                        }
                        mid
                    }
                };
                let m = self.mappings[mid as usize];
                if l4.proto == ip_proto::UDP && m.refs >= MAX_UDP_SESSIONS_PER_REMOTE_ADDR {
                    let (_, _, siblings) = self.find_in(m.ip_idx, m.ext_port, l4.dst, l4.dport, l4.proto);
                    if siblings >= MAX_UDP_SESSIONS_PER_REMOTE_ADDR {
                        return Err(DropReason::SourceFlowLimit);
                    }
                }
                let flags = if self.egress_index(l4.dst).is_some() { SESSION_HAIRPIN } else { 0 };
                let hi = if (m.ip_idx, m.ext_port) == (ip_idx, l4.sport) {
                    hi
                } else {
                    self.in_hash(m.ip_idx, m.ext_port, l4.dst, l4.dport, l4.proto)
                };
                let slots = NewSlots { ho, out_pos, hi, hs, src };
                let sid = self.insert_session(mid, l4.dst, l4.dport, now_s, flags, gen, &slots);
                std::hint::black_box(warm);
                sid
            }
        };
        let mut class = self.sessions[sid as usize].class;
        if tcp {
            let s = &mut self.sessions[sid as usize];
            tcp_verdict(tcp_track(s, true, &l4.seg))?;
            class = tcp_class(s.tcp_flags);
        }
        // Outbound packets refresh the flow (RFC 4787 REQ-6, RFC 5382).
        self.touch(sid, class, now_s);
        let s = self.sessions[sid as usize];
        let egress = self.egress[usize::from(s.ip_idx)];
        let port_off = if l4.proto == ip_proto::ICMP { icmp::IDENTIFIER } else { udp::SRC_PORT };
        rewrite(packet, l4.ihl, l4.proto, ipv4::SRC, egress, port_off, s.ext_port);
        if let Some(log) = self.flow_log.as_mut() {
            log.count(sid, true, packet.len());
        }
        if s.flags & SESSION_HAIRPIN != 0 {
            // RFC 4787 REQ-9: hairpinning. The SNATed packet now looks like an inbound one from our own egress
            // endpoint; the owner of the destination port runs the inbound leg.
            if let Some(owner) = self.other_owner(l4.dport) {
                return Ok(Outbound::HairpinOtherWorker(owner));
            }
            return match self.inbound_hairpin(now, packet)? {
                Inbound::Forward => Ok(Outbound::Hairpin),
                Inbound::OtherWorker(w) => Ok(Outbound::HairpinOtherWorker(w)),
            };
        }
        Ok(result)
    }

    // -----------------------------------------------------------------------------------------------------------
    // Inbound
    // -----------------------------------------------------------------------------------------------------------

    /// Outside → inside: a packet addressed to an egress IP. Translates the destination back (for an ICMP error,
    /// the outer destination and the quoted packet's source), or says which worker owns it.
    ///
    /// A packet from the wire whose source is one of our own egress IPs never creates state (it would be a
    /// spoofed hairpin); hairpinned packets handed over by another worker go through [`Nat::inbound_hairpin`].
    pub fn inbound(&mut self, now: Instant, packet: &mut [u8]) -> Result<Inbound, DropReason> {
        self.inbound_leg(now, packet, false)
    }

    /// The inbound leg of a hairpinned packet that another worker SNATed and handed over
    /// ([`Outbound::HairpinOtherWorker`]): translates the destination like [`Nat::inbound`], creating the far
    /// side's session if needed (hairpinned traffic is filtered endpoint-independently). `Forward` means: send it
    /// out of the inside interface.
    pub fn inbound_hairpin(&mut self, now: Instant, packet: &mut [u8]) -> Result<Inbound, DropReason> {
        self.inbound_leg(now, packet, true)
    }

    fn inbound_leg(
        &mut self,
        now: Instant,
        packet: &mut [u8],
        from_hairpin: bool,
    ) -> Result<Inbound, DropReason> {
        let (l4, kind) = parse(packet, false)?;
        let Some(ip_idx) = self.egress_index(l4.dst) else {
            return Err(DropReason::NotForEgressIp);
        };
        if kind == Kind::IcmpError {
            return self.inbound_icmp_error(packet, &l4, ip_idx);
        }
        // Echo replies carry the external identifier where TCP/UDP carry the destination port.
        let (ext_port, remote_port) =
            if l4.proto == ip_proto::ICMP { (l4.sport, 0) } else { (l4.dport, l4.sport) };
        if let Some(owner) = self.other_owner(ext_port) {
            return Ok(Inbound::OtherWorker(owner));
        }
        let now_s = secs(now);
        let tcp = l4.proto == ip_proto::TCP;
        if tcp && tcp_flags_invalid(l4.seg.flags) {
            return Err(DropReason::InvalidTcpFlags);
        }
        let (exact, sibling, siblings) = self.find_in(ip_idx, ext_port, l4.src, remote_port, l4.proto);
        let sid = match exact {
            Some(sid) => sid,
            None => {
                let hairpin = from_hairpin && self.egress_index(l4.src).is_some();
                if !hairpin && sibling == NONE {
                    // RFC 5382 REQ-4 / RFC 4787 REQ-8: unsolicited inbound traffic creates nothing.
                    return Err(DropReason::NoMapping);
                }
                if tcp && l4.seg.flags & (tcp::SYN | tcp::ACK) != tcp::SYN {
                    return Err(DropReason::NoMapping);
                }
                let Some(mid) = self.mapping_at(ip_idx, l4.proto, ext_port) else {
                    return Err(DropReason::NoMapping);
                };
                let in_addr = self.mappings[mid as usize].in_addr;
                let hs = hash_addr(self.seed.0, in_addr);
                let src = if hairpin {
                    self.check_limits(hs)?
                } else {
                    // Created by an outsider's packet: bounded on its own, never from the inside host's quota.
                    if self.session_count >= self.max_flows || self.free_session == NONE {
                        return Err(DropReason::ConntrackFull);
                    }
                    if self.unsolicited >= self.max_unsolicited
                        || self.mappings[mid as usize].unsolicited >= MAX_UNSOLICITED_PER_MAPPING
                        || siblings >= MAX_UDP_SESSIONS_PER_REMOTE_ADDR
                    {
                        return Err(DropReason::UnsolicitedFlowLimit);
                    }
                    Err(usize::MAX)
                };
                if siblings >= MAX_UDP_SESSIONS_PER_REMOTE_ADDR {
                    return Err(DropReason::SourceFlowLimit);
                }
                // Hairpin peer: a reply flow, never judged. UDP sibling (address-dependent filtering): judged by
                // the policy on its first outbound packet.
                let flags = if hairpin { SESSION_HAIRPIN | SESSION_HAIRPIN_PEER } else { SESSION_UNJUDGED };
                let gen = if sibling != NONE { self.sessions[sibling as usize].generation } else { 0 };
                self.create_session(mid, l4.src, remote_port, now_s, flags, gen, hs, src)
            }
        };
        let s = &mut self.sessions[sid as usize];
        let mut class = s.class;
        let mut refresh = true;
        if tcp {
            // RFC 5382 / 5961: a segment outside the window, or an RST not exactly where its receiver expects it,
            // is ignored; the state is kept.
            tcp_verdict(tcp_track(s, false, &l4.seg))?;
            class = tcp_class(s.tcp_flags);
            // RSTs do not refresh (a valid one moves the flow to transitory, kept 4 min from now).
            refresh = l4.seg.flags & tcp::RST == 0 || class != s.class;
        }
        let s = *s;
        if refresh {
            self.touch(sid, class, now_s);
        }
        let port_off = if l4.proto == ip_proto::ICMP { icmp::IDENTIFIER } else { udp::DST_PORT };
        rewrite(packet, l4.ihl, l4.proto, ipv4::DST, s.in_addr, port_off, s.in_port);
        if let Some(log) = self.flow_log.as_mut() {
            log.count(sid, false, packet.len());
        }
        Ok(Inbound::Forward)
    }

    /// For tests and the bench: the external endpoint of inside `(addr, port, proto)`.
    pub fn mapping_of(&self, in_addr: Ipv4Addr, in_port: u16, proto: u8) -> Option<(Ipv4Addr, u16)> {
        let m = self.mappings.get(self.find_mapping(u32::from(in_addr), in_port, proto)? as usize)?;
        Some((Ipv4Addr::from(*self.egress.get(usize::from(m.ip_idx))?), m.ext_port))
    }
}
