//! egressd's packet engine.
//!
//! Three layers, as in `DESIGN.md`:
//! - [`wire`]: pure views over frame bytes and checksum arithmetic. No I/O, no `unsafe`.
//! - the sans-IO engine: [`policy`] (compiled, immutable lookup tables), [`conntrack`] + [`nat`] (flow state and
//!   address translation), [`pipeline`] (`process(now, frame) -> action`). Time is always an argument.
//! - I/O: [`xsk`] (AF_XDP UMEM and rings: the only module allowed `unsafe`) and [`worker`] (the pinned poll loop
//!   tying `xsk` to `pipeline`).
//!
//! [`icmp`] writes the ICMP errors the gateway originates (out of NAT ports → 3/13).
//!
//! [`stats`] holds the per-worker counters every layer writes to; every dropped frame maps to one
//! [`stats::DropReason`].
#![deny(unsafe_code)]

pub mod audit;
pub mod conntrack;
pub mod fragments;
pub mod frames;
pub mod handoff;
pub mod icmp;
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
