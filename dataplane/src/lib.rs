//! egressd's packet engine: the architecture a contributor needs, in one place.
//!
//! egressd sits on an egress node between an **inside** interface (traffic from the cluster) and an **outside**
//! one (towards the internet). An XDP program per interface sends IPv4 transit traffic to AF_XDP sockets and
//! leaves ARP and the node's own traffic to the kernel; pinned workers take frames off the rings, decide, rewrite
//! in place and transmit. Everything that talks to the kernel's configuration (routes, neighbours, the XDP maps,
//! signals, the admin endpoint) lives in the `egressd` crate above this one.
//!
//! Three layers, the arrows pointing down only:
//! - [`wire`]: pure views over frame bytes and checksum arithmetic. No I/O, no `unsafe`.
//! - the sans-IO engine: [`policy`] (compiled, immutable lookup tables, swapped atomically on reload),
//!   [`conntrack`] + [`nat`] (flow state and address translation, per worker), [`fragments`] (what first fragments
//!   became), [`pipeline`] (`process(now, side, frame) -> Action`). Time is always an argument, so timers are
//!   tested on a virtual clock.
//! - I/O: [`xsk`] (AF_XDP UMEM and rings: the only module allowed `unsafe`) and [`worker`] (the pinned poll loop
//!   tying `xsk` to `pipeline`).
//!
//! Per burst a worker: takes frames off both rx rings; runs each through the pipeline (parse → policy and NAT →
//! next hop → TTL and MACs); stages what leaves on the port the action names; finishes frames other workers
//! handed it ([`handoff`]: every packet is handled by the one worker that owns its flow); releases frames that
//! waited for a neighbour or their first fragment; expires idle flows within a budget; reaps and refills rings.
//!
//! Rules every change keeps: the data path never panics on input and never allocates per packet (proptests and
//! `tests/no_alloc.rs`); every frame not forwarded is counted under one [`drop::DropReason`]; memory is bounded
//! by configuration (flows, hand-off rings, held frames, fragment table) and full tables refuse new work, never
//! grow; security checks come before any state is created.
//!
//! [`icmp`] writes the ICMP errors the gateway originates (3/13 out of NAT ports, 3/4 packet too big).
//!
//! [`l7`] is the L7 path's engine: flows of `l7` rules are punted by the workers ([`l7::punt`]) to an L7 thread
//! (in the `egressd` crate) that terminates the client's TCP on smoltcp ([`l7::stack`]) and lets each connection's
//! [`l7::Connection`] judge the ClientHello or every HTTP request before anything goes upstream. The pipeline
//! decides only that a flow is `l7`; it keeps no NAT state for it.
//!
//! [`stats`] holds the per-worker counters every layer writes to.
#![deny(unsafe_code)]

pub mod audit;
pub mod conntrack;
pub mod drop;
pub mod fragments;
pub mod handoff;
pub mod icmp;
pub mod l7;
pub mod nat;
pub mod nexthop;
pub mod pipeline;
pub mod policy;
pub mod stats;
pub mod time;
pub mod wire;
pub mod worker;
#[allow(unsafe_code)]
pub mod xsk;

/// Which interface a frame arrived on or leaves by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Towards the workloads (the cluster).
    Inside,
    /// Towards the internet or partner network; egress IPs live here.
    Outside,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Inside => Side::Outside,
            Side::Outside => Side::Inside,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Inside => "inside",
            Side::Outside => "outside",
        }
    }
}
