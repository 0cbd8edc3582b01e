//! Why a frame is not forwarded: [`DropReason`], the one list every layer drops under. Each reason is a counter
//! (`egressd_drops_total{reason="…"}`) and tests assert on them. This module imports nothing from the crate, so
//! every layer may use it.

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
    /// The L7 path's queue was full (the client retransmits).
    L7QueueFull => "l7_queue_full",

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
