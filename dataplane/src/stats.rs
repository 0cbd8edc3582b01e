//! Per-worker counters.
//!
//! Every frame the gateway does not forward is dropped under exactly one [`DropReason`], and every reason is a
//! counter (`egressd_drops_total{reason="…"}`); tests assert on them. Each worker owns one [`WorkerStats`] and is
//! its only writer, so an increment is a relaxed load + store (no locked instruction); readers (metrics, `stats`)
//! sum all workers with relaxed loads and may see a value a few packets old.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::drop::DropReason;
use crate::Side;

/// A counter with a single writer (its worker): increments are plain load + store, reads are relaxed.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: no read-modify-write needed, so no locked instruction on the hot path.
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Packets and bytes through one direction of one interface.
#[derive(Debug, Default)]
pub struct PacketBytes {
    pub packets: Counter,
    pub bytes: Counter,
}

impl PacketBytes {
    #[inline]
    pub fn add(&self, len: usize) {
        self.packets.inc();
        self.bytes.add(len as u64);
    }
}

/// One worker's counters. Written only by that worker; read by anyone.
#[derive(Debug)]
pub struct WorkerStats {
    /// Frames received, indexed by [`Side`] of arrival.
    pub rx: [PacketBytes; 2],
    /// Frames transmitted, indexed by [`Side`] of departure.
    pub tx: [PacketBytes; 2],
    /// Frames dropped, indexed by [`DropReason`].
    pub drops: [Counter; DropReason::COUNT],
    /// New flows the policy allowed (or allowed in dry-run while it would have denied).
    pub flows_allowed: Counter,
    /// New flows a dry-run rule would have denied but let through.
    pub flows_dry_run_denied: Counter,
    /// Batches processed (rx bursts that returned at least one frame).
    pub batches: Counter,
    /// Loop iterations of the worker (idle ones included, at least one per `idle_timeout_ms`): it is alive.
    pub loops: Counter,
    /// The worker's NAT gauges, republished about once a second.
    pub nat: NatGauges,
    /// Policy decisions per rule of the snapshot the worker runs (replaced when the policy is reloaded).
    pub rule_hits: arc_swap::ArcSwap<RuleHits>,
    /// Audit events left out by the rate limit or because the audit queue was full.
    pub audit_suppressed: Counter,
    /// Frames copied to the worker that owns their NAT port.
    pub handed_off: Counter,
    /// Packets of `l7` flows handed to the L7 path.
    pub l7_punted: Counter,
    /// ICMP errors the pipeline wrote (out of NAT ports → 3/13) and handed to the worker to send.
    pub icmp_errors_sent: Counter,
    /// ICMP errors left unsent by the per-worker rate limit.
    pub icmp_errors_rate_limited: Counter,
    /// Frames the kernel dropped at this worker's AF_XDP sockets before egressd saw them, per side:
    /// [rx ring full, fill ring empty, other, invalid descriptors] (republished about once a second).
    pub kernel_drops: [[AtomicU64; 4]; 2],
}

/// Names of the `kernel_drops` slots, in order.
pub const KERNEL_DROP_REASONS: [&str; 4] =
    ["rx_ring_full", "fill_ring_empty", "rx_dropped", "invalid_descriptor"];

/// Policy decisions per rule, for one policy generation. Written by one worker.
#[derive(Debug)]
pub struct RuleHits {
    pub generation: u64,
    hits: Box<[Counter]>,
}

impl RuleHits {
    /// Zeroed counters for `rules` rules (allocates: called on reload, never per packet).
    pub fn new(generation: u64, rules: usize) -> RuleHits {
        RuleHits { generation, hits: (0..rules).map(|_| Counter::default()).collect() }
    }

    #[inline]
    pub fn hit(&self, rule: usize) {
        if let Some(c) = self.hits.get(rule) {
            c.inc();
        }
    }

    pub fn get(&self, rule: usize) -> u64 {
        self.hits.get(rule).map_or(0, Counter::get)
    }

    pub fn len(&self) -> usize {
        self.hits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }
}

/// Egress IPs one worker can translate to (the NAT preallocates its port tables for them; the gauges list each).
pub const MAX_EGRESS_IPS: usize = 16;

/// A worker's conntrack/NAT gauges as of its last publication: written by the worker (relaxed stores, about once
/// a second, never per packet), read by the admin endpoint.
#[derive(Debug, Default)]
pub struct NatGauges {
    pub tcp_syn_sent: AtomicU64,
    pub tcp_established: AtomicU64,
    pub tcp_transitory: AtomicU64,
    pub udp: AtomicU64,
    pub icmp: AtomicU64,
    pub mappings: AtomicU64,
    pub allocation_failures: AtomicU64,
    pub log_suppressed: AtomicU64,
    /// Per egress IP this worker has used: (IPv4 as u32, TCP, UDP, ICMP ports in use).
    pub egress: [[AtomicU64; 4]; MAX_EGRESS_IPS],
    pub egress_len: AtomicU64,
}

impl NatGauges {
    /// (egress IP, TCP, UDP, ICMP ports in use) for each egress IP this worker has used.
    pub fn egress_ports(&self) -> impl Iterator<Item = (std::net::Ipv4Addr, u64, u64, u64)> + '_ {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let n = (get(&self.egress_len) as usize).min(self.egress.len());
        self.egress[..n]
            .iter()
            .map(move |e| (std::net::Ipv4Addr::from(get(&e[0]) as u32), get(&e[1]), get(&e[2]), get(&e[3])))
    }
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            rx: Default::default(),
            tx: Default::default(),
            drops: std::array::from_fn(|_| Counter::default()),
            flows_allowed: Counter::default(),
            flows_dry_run_denied: Counter::default(),
            batches: Counter::default(),
            loops: Counter::default(),
            nat: NatGauges::default(),
            rule_hits: arc_swap::ArcSwap::from_pointee(RuleHits::new(0, 0)),
            audit_suppressed: Counter::default(),
            handed_off: Counter::default(),
            l7_punted: Counter::default(),
            icmp_errors_sent: Counter::default(),
            icmp_errors_rate_limited: Counter::default(),
            kernel_drops: Default::default(),
        }
    }
}

impl WorkerStats {
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].inc();
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].get()
    }

    #[inline]
    pub fn rx(&self, side: Side) -> &PacketBytes {
        &self.rx[side_index(side)]
    }

    #[inline]
    pub fn tx(&self, side: Side) -> &PacketBytes {
        &self.tx[side_index(side)]
    }
}

#[inline]
pub fn side_index(side: Side) -> usize {
    match side {
        Side::Inside => 0,
        Side::Outside => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_by_discriminant_and_named_uniquely() {
        let mut names = std::collections::HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(names.insert(r.as_str()), "duplicate name {}", r.as_str());
            assert!(r.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
        }
    }

    #[test]
    fn counters_accumulate_per_reason_and_side() {
        let s = WorkerStats::default();
        s.count_drop(DropReason::NoMapping);
        s.count_drop(DropReason::NoMapping);
        s.count_drop(DropReason::Truncated);
        s.rx(Side::Outside).add(60);
        assert_eq!(s.drops(DropReason::NoMapping), 2);
        assert_eq!(s.drops(DropReason::Truncated), 1);
        assert_eq!(s.drops(DropReason::OutOfPorts), 0);
        assert_eq!(s.rx(Side::Outside).bytes.get(), 60);
        assert_eq!(s.rx(Side::Inside).packets.get(), 0);
    }
}
