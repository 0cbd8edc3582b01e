//! Where a forwarded packet goes next at layer 2: a user-space mirror of the kernel's IPv4 routes and neighbour
//! table for the two interfaces egressd owns.
//!
//! The kernel keeps resolving neighbours (ARP stays with the kernel: the XDP program passes it up), so egressd
//! does not hard-code MACs. A control thread (`egressd::fib`) reads the kernel's tables every few hundred
//! milliseconds and publishes a [`NextHopTable`] snapshot with an atomic pointer swap; workers read it once per
//! batch. This module is the pure part: the snapshot and its lookup, sans-IO and unit-tested.
//!
//! Lookup: longest prefix over the routes of the outgoing interface (a gateway is rarely more than a handful of
//! routes per interface, so a linear scan over routes sorted by prefix length is the fastest structure); the next
//! hop is the route's gateway, or the destination itself for an on-link route; its MAC comes from the
//! neighbour snapshot (binary search). No allocation on lookup.

use std::net::Ipv4Addr;

use crate::Side;

pub type Mac = [u8; 6];

/// One IPv4 route of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
    /// `None` for an on-link (connected) route.
    pub gateway: Option<Ipv4Addr>,
}

impl Route {
    fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - n.min(32) as u32),
        }
    }
}

/// Routes and neighbours of one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceTable {
    /// The interface's own MAC: the source MAC of frames sent out of it.
    pub mac: Mac,
    /// The interface's own IPv4 address, if it has one: the source of ICMP errors the gateway sends out of it.
    pub address: Option<Ipv4Addr>,
    /// The interface's MTU: larger packets are not sent out of it (0: not known, not checked).
    pub mtu: u32,
    /// Sorted longest prefix first.
    routes: Vec<Route>,
    /// Sorted by address; only complete (resolved) entries.
    neighbours: Vec<(Ipv4Addr, Mac)>,
    /// `routes` in the same order, ready for the per-packet scan: mask and network precomputed, and a gateway's
    /// MAC looked up once per snapshot instead of once per packet.
    compiled: Vec<CompiledRoute>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CompiledRoute {
    mask: u32,
    network: u32,
    /// `None` for an on-link route.
    gateway: Option<Ipv4Addr>,
    /// The gateway's MAC, if the neighbour table has it.
    gateway_mac: Option<Mac>,
}

impl InterfaceTable {
    pub fn new(mac: Mac, mut routes: Vec<Route>, mut neighbours: Vec<(Ipv4Addr, Mac)>) -> InterfaceTable {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix_len));
        neighbours.sort_by_key(|(ip, _)| *ip);
        neighbours.dedup_by_key(|(ip, _)| *ip);
        let mut table =
            InterfaceTable { mac, address: None, mtu: 0, routes, neighbours, compiled: Vec::new() };
        table.compiled = table
            .routes
            .iter()
            .map(|r| CompiledRoute {
                mask: r.mask(),
                network: u32::from(r.destination) & r.mask(),
                gateway: r.gateway,
                gateway_mac: r.gateway.and_then(|gw| table.neighbour(gw)),
            })
            .collect();
        table
    }

    /// The same table with the interface's IPv4 address set.
    pub fn with_address(mut self, address: Option<Ipv4Addr>) -> InterfaceTable {
        self.address = address;
        self
    }

    /// Whether a route out of this interface covers `addr` (reverse-path check of a source).
    #[inline]
    pub fn routes_to(&self, addr: Ipv4Addr) -> bool {
        self.route_for(addr).is_some()
    }

    pub fn with_mtu(mut self, mtu: u32) -> InterfaceTable {
        self.mtu = mtu;
        self
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn neighbours(&self) -> &[(Ipv4Addr, Mac)] {
        &self.neighbours
    }

    /// The next hop for `dst` out of this interface: the gateway of the longest matching route, or `dst` itself
    /// when that route is on-link. `None`: no route.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        self.route_for(dst).map(|r| r.gateway.unwrap_or(dst))
    }

    #[inline]
    fn route_for(&self, dst: Ipv4Addr) -> Option<&CompiledRoute> {
        let dst = u32::from(dst);
        self.compiled.iter().find(|r| dst & r.mask == r.network)
    }

    /// The routes' gateways that have no neighbour entry yet.
    pub fn unresolved_gateways(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.routes().iter().filter_map(|r| r.gateway).filter(|g| self.neighbour(*g).is_none())
    }

    pub fn neighbour(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.neighbours.binary_search_by_key(&ip, |(a, _)| *a).ok().map(|i| self.neighbours[i].1)
    }
}

/// Destination MAC, then source MAC: how they start an Ethernet header.
#[inline]
fn l2_header(dst: Mac, src: Mac) -> [u8; 12] {
    let mut h = [0; 12];
    h[..6].copy_from_slice(&dst);
    h[6..].copy_from_slice(&src);
    h
}

/// The outcome of a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// Send with these MACs.
    Resolved { src: Mac, dst: Mac },
    /// No route out of that interface covers the destination.
    NoRoute,
    /// The next hop is known but its MAC is not (yet): ask the kernel to resolve it.
    NoNeighbour(Ipv4Addr),
}

/// Routes and neighbours of both interfaces: one immutable snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NextHopTable {
    pub inside: InterfaceTable,
    pub outside: InterfaceTable,
}

impl NextHopTable {
    pub fn side(&self, side: Side) -> &InterfaceTable {
        match side {
            Side::Inside => &self.inside,
            Side::Outside => &self.outside,
        }
    }

    /// Layer-2 addresses for a packet to `dst` leaving by `out`.
    #[inline]
    pub fn lookup(&self, out: Side, dst: Ipv4Addr) -> NextHop {
        let table = self.side(out);
        let Some(route) = table.route_for(dst) else { return NextHop::NoRoute };
        let (hop, mac) = match route.gateway {
            Some(gateway) => (gateway, route.gateway_mac),
            None => (dst, table.neighbour(dst)),
        };
        match mac {
            Some(mac) => NextHop::Resolved { src: table.mac, dst: mac },
            None => NextHop::NoNeighbour(hop),
        }
    }

    /// As [`lookup`](Self::lookup), for the per-packet path: a resolved next hop as the first 12 bytes of the
    /// Ethernet header (destination MAC, then source MAC), written with one copy.
    #[inline]
    pub fn lookup_l2(&self, out: Side, dst: Ipv4Addr) -> Result<[u8; 12], NextHop> {
        match self.lookup(out, dst) {
            NextHop::Resolved { src, dst } => Ok(l2_header(dst, src)),
            other => Err(other),
        }
    }
}

/// Next hops whose MAC a worker needed and did not find: workers push, the control thread drains and asks the
/// kernel to resolve them. Bounded; when full a request is dropped (the next packet asks again).
#[derive(Debug)]
pub struct ResolveQueue(crossbeam_queue::ArrayQueue<Ipv4Addr>);

impl ResolveQueue {
    pub fn new(capacity: usize) -> ResolveQueue {
        ResolveQueue(crossbeam_queue::ArrayQueue::new(capacity.max(1)))
    }

    /// Never blocks, never allocates.
    pub fn request(&self, next_hop: Ipv4Addr) {
        let _ = self.0.push(next_hop);
    }

    /// Takes every pending request, duplicates removed (order kept).
    pub fn drain(&self) -> impl Iterator<Item = Ipv4Addr> {
        let mut seen: Vec<Ipv4Addr> = Vec::new();
        while let Some(ip) = self.0.pop() {
            if !seen.contains(&ip) {
                seen.push(ip);
            }
        }
        seen.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lab() -> NextHopTable {
        NextHopTable {
            inside: InterfaceTable::new(
                [2, 0, 0, 0, 0, 1],
                vec![
                    Route { destination: ip("10.10.0.0"), prefix_len: 24, gateway: None },
                    Route { destination: ip("10.10.1.0"), prefix_len: 24, gateway: None },
                    Route { destination: ip("10.20.0.0"), prefix_len: 16, gateway: Some(ip("10.10.0.254")) },
                ],
                vec![(ip("10.10.0.2"), [2, 0, 0, 0, 0, 2]), (ip("10.10.0.254"), [2, 0, 0, 0, 0, 0xfe])],
            ),
            outside: InterfaceTable::new(
                [2, 0, 0, 0, 1, 1],
                vec![
                    Route { destination: ip("0.0.0.0"), prefix_len: 0, gateway: Some(ip("192.0.2.2")) },
                    Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None },
                ],
                vec![(ip("192.0.2.2"), [2, 0, 0, 0, 1, 2])],
            ),
        }
    }

    #[test]
    fn default_route_goes_via_its_gateway() {
        assert_eq!(
            lab().lookup(Side::Outside, ip("203.0.113.10")),
            NextHop::Resolved { src: [2, 0, 0, 0, 1, 1], dst: [2, 0, 0, 0, 1, 2] }
        );
    }

    #[test]
    fn longest_prefix_wins_and_on_link_uses_the_destination() {
        let t = lab();
        // 192.0.2.7 is on-link (the /24 beats the default route): its own MAC is needed, and unknown.
        assert_eq!(t.lookup(Side::Outside, ip("192.0.2.7")), NextHop::NoNeighbour(ip("192.0.2.7")));
        assert_eq!(
            t.lookup(Side::Inside, ip("10.10.0.2")),
            NextHop::Resolved { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] }
        );
        assert_eq!(
            t.lookup(Side::Inside, ip("10.20.3.4")),
            NextHop::Resolved { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 0xfe] }
        );
    }

    #[test]
    fn an_unresolved_gateway_asks_for_the_gateway_not_the_destination() {
        let t = NextHopTable {
            outside: InterfaceTable::new(
                [2, 0, 0, 0, 1, 1],
                vec![Route { destination: ip("0.0.0.0"), prefix_len: 0, gateway: Some(ip("192.0.2.2")) }],
                vec![(ip("192.0.2.3"), [2, 0, 0, 0, 1, 3])],
            ),
            ..NextHopTable::default()
        };
        assert_eq!(t.lookup(Side::Outside, ip("203.0.113.10")), NextHop::NoNeighbour(ip("192.0.2.2")));
    }

    #[test]
    fn no_route_out_of_an_interface_without_a_covering_prefix() {
        assert_eq!(lab().lookup(Side::Inside, ip("8.8.8.8")), NextHop::NoRoute);
        assert_eq!(NextHopTable::default().lookup(Side::Outside, ip("1.1.1.1")), NextHop::NoRoute);
    }

    #[test]
    fn host_route_and_prefix_edge_cases() {
        let t = InterfaceTable::new(
            [0; 6],
            vec![
                Route { destination: ip("10.0.0.0"), prefix_len: 8, gateway: Some(ip("1.1.1.1")) },
                Route { destination: ip("10.1.2.3"), prefix_len: 32, gateway: Some(ip("2.2.2.2")) },
            ],
            vec![],
        );
        assert_eq!(t.next_hop(ip("10.1.2.3")), Some(ip("2.2.2.2")));
        assert_eq!(t.next_hop(ip("10.1.2.4")), Some(ip("1.1.1.1")));
        assert_eq!(t.next_hop(ip("11.0.0.0")), None);
    }
}
