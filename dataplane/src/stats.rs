//! Per-worker counters.
//!
//! Every frame the gateway does not forward is dropped under exactly one [`DropReason`], and every reason is a
//! counter (`egressd_drops_total{reason="…"}`); tests assert on them. Each worker owns one [`WorkerStats`] and is
//! its only writer, so an increment is a relaxed load + store (no locked instruction); readers (metrics, `stats`)
//! sum all workers with relaxed loads and may see a value a few packets old.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Side;

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )+) => {
        /// Why a frame was not forwarded. The string is the Prometheus label value and never changes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason {
            $( $(#[$doc])* $variant, )+
        }

        impl DropReason {
            /// Every reason, in declaration order (the index is the discriminant).
            pub const ALL: &'static [DropReason] = &[ $( DropReason::$variant, )+ ];
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name used in metrics and logs.
            pub fn as_str(self) -> &'static str {
                match self { $( DropReason::$variant => $name, )+ }
            }
        }
    };
}

drop_reasons! {
    // --- frame and header validity (hostile or unsupported input) ---
    /// Frame ends before a header it announces (any layer).
    Truncated => "truncated",
    /// Ethertype is neither IPv4 nor IPv6 (ARP and friends go to the kernel before reaching us).
    NotIp => "not_ip",
    /// An 802.1Q/802.1ad-tagged frame: egressd's interfaces carry no VLANs, and a tag its sender chose must never
    /// be carried to the other side.
    VlanTagged => "vlan_tagged",
    /// IP version nibble does not match the ethertype.
    IpVersionMismatch => "ip_version_mismatch",
    /// IPv4 IHL < 5, or header longer than the packet.
    BadIpHeader => "bad_ip_header",
    /// IPv4 total length shorter than the header or beyond the frame.
    BadIpLength => "bad_ip_length",
    /// IPv4 header checksum does not verify.
    BadIpChecksum => "bad_ip_checksum",
    /// IPv4 loose or strict source route option (RFC 7126: never forwarded).
    SourceRoute => "source_route",
    /// A fragment after the first whose datagram's first fragment did not come (within a second), or too many
    /// such fragments were already waiting.
    FragmentUnmatched => "fragment_unmatched",
    /// A first fragment when the worker already tracks as many fragmented datagrams as it can.
    FragmentTableFull => "fragment_table_full",
    /// TTL or hop limit would reach zero.
    TtlExceeded => "ttl_exceeded",
    /// Transit IPv6: this version forwards IPv4 only. The XDP program drops it before any worker sees it (the
    /// node's own, link-local, multicast and neighbour-discovery IPv6 go to the kernel); a worker that meets an IPv6
    /// frame anyway drops it under the same reason.
    Ipv6Unsupported => "ipv6_unsupported",
    /// TCP/UDP/ICMP header malformed (e.g. TCP data offset < 5 or beyond the packet).
    BadL4Header => "bad_l4_header",
    /// A transport the gateway cannot translate (not TCP, UDP or ICMP).
    UnsupportedProtocol => "unsupported_protocol",
    /// Frame larger than a UMEM chunk.
    FrameTooLarge => "frame_too_large",
    /// Packet larger than the MTU of the interface it would leave by (answered with ICMP 3/4 and the MTU).
    MtuExceeded => "mtu_exceeded",
    /// RX descriptor pointing outside the UMEM.
    BadRxDescriptor => "bad_rx_descriptor",

    /// A packet from inside whose source the inside interface has no route back to: spoofed (`[dataplane]
    /// source_validation`, rp_filter style).
    SourceNotInside => "source_not_inside",

    // --- policy ---
    /// Source address belongs to no group.
    NoGroup => "no_group",
    /// An explicit deny rule matched.
    PolicyDeny => "policy_deny",
    /// No rule of the source's group matched (default deny).
    DefaultDeny => "default_deny",
    /// The flow needs the L7 path, which is not available.
    L7Unavailable => "l7_unavailable",

    // --- conntrack and NAT ---
    /// Flow table full: new flows are refused, established ones keep working.
    ConntrackFull => "conntrack_full",
    /// The source already holds its configured maximum of flows.
    SourceFlowLimit => "source_flow_limit",
    /// Sessions created by inbound packets (address-dependent filtering) are at their own bound: per mapping, or
    /// a quarter of the table. They never use the inside host's quota.
    UnsolicitedFlowLimit => "unsolicited_flow_limit",
    /// No free port on the egress IP for this flow (or more egress IPs than a worker's port tables hold).
    OutOfPorts => "out_of_ports",
    /// The source's group holds its `max_ports_per_egress_ip` on the egress IP.
    GroupPortLimit => "group_port_limit",
    /// The policy allowed the flow but the source's group has no egress IP to translate it to.
    NoEgressIp => "no_egress_ip",
    /// Packet from outside matches no mapping (unsolicited inbound).
    NoMapping => "no_mapping",
    /// ICMP error quoting a packet of no known flow.
    IcmpErrorNoMapping => "icmp_error_no_mapping",
    /// ICMP error from inside whose outer addresses are not the quoted flow's inside endpoint and peer.
    IcmpErrorMismatch => "icmp_error_mismatch",
    /// Invalid TCP flag combination (SYN+FIN, SYN+RST, none set).
    InvalidTcpFlags => "invalid_tcp_flags",
    /// First packet of a TCP flow is not a SYN.
    TcpNotSyn => "tcp_not_syn",
    /// RST not at exactly the sequence number its receiver expects (ignored, state kept; RFC 5961).
    TcpRstOutOfWindow => "tcp_rst_out_of_window",
    /// TCP segment outside the connection's window, or a SYN that does not belong to it (ignored, state kept).
    TcpOutOfWindow => "tcp_out_of_window",
    /// ICMP checksum, or an embedded IP header checksum, does not verify.
    BadIcmpChecksum => "bad_icmp_checksum",
    /// ICMP type the gateway does not translate.
    UnsupportedIcmp => "unsupported_icmp",

    // --- forwarding ---
    /// Packet from outside not addressed to an egress IP.
    NotForEgressIp => "not_for_egress_ip",
    /// No route to the destination out of the chosen interface.
    NoRoute => "no_route",
    /// Next hop's MAC address unknown (resolution requested from the kernel).
    NoNeighbour => "no_neighbour",
    /// TX ring full.
    TxRingFull => "tx_ring_full",
    /// Reply belongs to another worker and its hand-over queue is full.
    HandoffQueueFull => "handoff_queue_full",
}

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
    /// The worker's NAT gauges, republished about once a second.
    pub nat: NatGauges,
    /// Policy decisions per rule of the snapshot the worker runs (replaced when the policy is reloaded).
    pub rule_hits: arc_swap::ArcSwap<RuleHits>,
    /// Audit events left out by the rate limit or because the audit queue was full.
    pub audit_suppressed: Counter,
    /// Frames copied to the worker that owns their NAT port.
    pub handed_off: Counter,
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
    /// Per egress IP this worker has used: (IPv4 as u32, TCP, UDP, ICMP ports in use).
    pub egress: [[AtomicU64; 4]; crate::nat::MAX_EGRESS_IPS],
    pub egress_len: AtomicU64,
}

impl NatGauges {
    pub fn publish(&self, s: &crate::nat::NatStats) {
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&self.tcp_syn_sent, s.tcp_syn_sent.into());
        set(&self.tcp_established, s.tcp_established.into());
        set(&self.tcp_transitory, s.tcp_transitory.into());
        set(&self.udp, s.udp.into());
        set(&self.icmp, s.icmp.into());
        set(&self.mappings, s.mappings.into());
        set(&self.allocation_failures, s.allocation_failures);
        let ports = s.egress_ports();
        for (slot, e) in self.egress.iter().zip(ports) {
            set(&slot[0], u32::from(e.ip).into());
            set(&slot[1], e.tcp.into());
            set(&slot[2], e.udp.into());
            set(&slot[3], e.icmp.into());
        }
        set(&self.egress_len, ports.len() as u64);
    }

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
            nat: NatGauges::default(),
            rule_hits: arc_swap::ArcSwap::from_pointee(RuleHits::new(0, 0)),
            audit_suppressed: Counter::default(),
            handed_off: Counter::default(),
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
