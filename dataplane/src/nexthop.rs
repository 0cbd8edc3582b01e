//! Where a forwarded packet goes next at layer 2: a user-space mirror of the kernel's IPv4 routes and neighbour
//! table for the two interfaces egressd owns.
//!
//! The kernel keeps resolving neighbours (ARP stays with the kernel: the XDP program passes it up), so egressd
//! does not hard-code MACs. A control thread (`egressd::fib`) reads the kernel's rules, routes and neighbours over
//! rtnetlink when they change and publishes a [`NextHopTable`] snapshot with an atomic pointer swap; workers read
//! it once per batch. This module is the pure part: the snapshot and its lookup, sans-IO and unit-tested.
//!
//! Lookup: each interface's table is the chain of routing tables policy routing consults, flattened: each table's
//! routes longest prefix first, tables in order, with `throw` jumping to the next table and reject routes ending
//! the lookup (a gateway is rarely more than a handful of routes per interface, so a linear scan is the fastest
//! structure). When policy routing gives an egress IP tables of its own, its packets use that table
//! ([`NextHopTable::lookup_l2_from`]). The next hop is the route's gateway, or the destination itself for an
//! on-link route; its MAC comes from the neighbour snapshot (binary search). No allocation on lookup.

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

/// What a route of a routing table does with the packets it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteAction {
    /// Out of this interface, via the gateway (`None`: on-link, to the destination itself).
    Via(Option<Ipv4Addr>),
    /// Not out of this interface: a blackhole, unreachable or prohibit route, or a route out of another
    /// interface. The lookup ends with no route, as the kernel's would not send it here.
    Reject,
    /// `throw`: not in this table; the lookup goes on with the next table of the chain.
    Throw,
}

/// One route of one routing table, as the lookup sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRoute {
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
    pub action: RouteAction,
}

impl From<Route> for TableRoute {
    fn from(r: Route) -> TableRoute {
        TableRoute {
            destination: r.destination,
            prefix_len: r.prefix_len,
            action: RouteAction::Via(r.gateway),
        }
    }
}

/// Routes and neighbours of one interface.
///
/// The routes form a chain of routing tables, in the order the kernel's policy routing rules (`ip rule`) would
/// consult them for the traffic this table serves: the longest match in the first table that has one wins, as
/// in the kernel (a `throw` route sends the lookup on to the next table). Without policy routing the chain is
/// the main table alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceTable {
    /// The interface's own MAC: the source MAC of frames sent out of it.
    pub mac: Mac,
    /// The interface's own IPv4 address, if it has one: the source of ICMP errors the gateway sends out of it.
    pub address: Option<Ipv4Addr>,
    /// The interface's MTU: larger packets are not sent out of it (0: not known, not checked).
    pub mtu: u32,
    /// The forwarding routes out of this interface, for display and for resolving gateways.
    routes: Vec<Route>,
    /// Sorted by address; only complete (resolved) entries.
    neighbours: Vec<(Ipv4Addr, Mac)>,
    /// The chain, ready for the per-packet scan: each table's routes longest prefix first, tables in chain order,
    /// mask and network precomputed, and a gateway's MAC looked up once per snapshot instead of once per packet.
    compiled: Vec<CompiledRoute>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CompiledRoute {
    mask: u32,
    network: u32,
    action: CompiledAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CompiledAction {
    /// `None` gateway: on-link; the gateway's MAC, if the neighbour table has it.
    Via {
        gateway: Option<Ipv4Addr>,
        gateway_mac: Option<Mac>,
    },
    Reject,
    /// Go on at this index of `compiled` (the next table's first route).
    Throw(u32),
}

fn mask_of(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

impl InterfaceTable {
    /// A table of one routing table (the main table, with no policy routing).
    pub fn new(mac: Mac, routes: Vec<Route>, neighbours: Vec<(Ipv4Addr, Mac)>) -> InterfaceTable {
        InterfaceTable::from_chain(mac, vec![routes.into_iter().map(TableRoute::from).collect()], neighbours)
    }

    /// A table of a chain of routing tables, in the order policy routing consults them.
    pub fn from_chain(
        mac: Mac,
        mut chain: Vec<Vec<TableRoute>>,
        mut neighbours: Vec<(Ipv4Addr, Mac)>,
    ) -> InterfaceTable {
        neighbours.sort_by_key(|(ip, _)| *ip);
        neighbours.dedup_by_key(|(ip, _)| *ip);
        let mut routes = Vec::new();
        for table in &mut chain {
            table.sort_by_key(|r| std::cmp::Reverse(r.prefix_len));
            for r in table.iter() {
                if let RouteAction::Via(gateway) = r.action {
                    let route = Route { destination: r.destination, prefix_len: r.prefix_len, gateway };
                    if !routes.contains(&route) {
                        routes.push(route);
                    }
                }
            }
        }
        let mut table =
            InterfaceTable { mac, address: None, mtu: 0, routes, neighbours, compiled: Vec::new() };
        let mut compiled = Vec::new();
        for routes in &chain {
            let next_table = (compiled.len() + routes.len()) as u32;
            compiled.extend(routes.iter().map(|r| CompiledRoute {
                mask: mask_of(r.prefix_len),
                network: u32::from(r.destination) & mask_of(r.prefix_len),
                action: match r.action {
                    RouteAction::Via(gateway) => CompiledAction::Via {
                        gateway,
                        gateway_mac: gateway.and_then(|gw| table.neighbour(gw)),
                    },
                    RouteAction::Reject => CompiledAction::Reject,
                    RouteAction::Throw => CompiledAction::Throw(next_table),
                },
            }));
        }
        table.compiled = compiled;
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
        self.route_for(dst).map(|(gateway, _)| gateway.unwrap_or(dst))
    }

    /// The route out of this interface for `dst`: `(gateway, its MAC)`; `None` when the chain has no route, or its
    /// route does not leave here.
    #[inline]
    fn route_for(&self, dst: Ipv4Addr) -> Option<(Option<Ipv4Addr>, Option<Mac>)> {
        let dst = u32::from(dst);
        let mut i = 0;
        while let Some(r) = self.compiled.get(i) {
            if dst & r.mask == r.network {
                match r.action {
                    CompiledAction::Via { gateway, gateway_mac } => return Some((gateway, gateway_mac)),
                    CompiledAction::Reject => return None,
                    CompiledAction::Throw(next) => {
                        i = next as usize;
                        continue;
                    }
                }
            }
            i += 1;
        }
        None
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
    /// Egress IPs whose traffic policy routing sends through other tables than `outside`'s, with their own
    /// table (same interface, other routes). Empty without policy routing.
    pub outside_from: Vec<(Ipv4Addr, InterfaceTable)>,
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
        self.table(out, None).lookup(dst)
    }

    /// The table that routes a packet from `src` (`None`: not known) leaving by `out`.
    #[inline]
    fn table(&self, out: Side, src: Option<Ipv4Addr>) -> &InterfaceTable {
        match (out, src) {
            (Side::Outside, Some(src)) if !self.outside_from.is_empty() => {
                self.outside_from.iter().find(|(from, _)| *from == src).map_or(&self.outside, |(_, t)| t)
            }
            _ => self.side(out),
        }
    }

    /// Whether policy routing gives some egress IP routes of its own, so that the next hop out of the outside
    /// depends on the packet's (translated) source.
    #[inline]
    pub fn routes_by_source(&self) -> bool {
        !self.outside_from.is_empty()
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

    /// As [`lookup_l2`](Self::lookup_l2), for a packet from `src` (policy routing may pick its table by source).
    #[inline]
    pub fn lookup_l2_from(&self, out: Side, src: Ipv4Addr, dst: Ipv4Addr) -> Result<[u8; 12], NextHop> {
        match self.table(out, Some(src)).lookup(dst) {
            NextHop::Resolved { src, dst } => Ok(l2_header(dst, src)),
            other => Err(other),
        }
    }
}

impl InterfaceTable {
    /// Layer-2 addresses for a packet to `dst` leaving by this interface.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> NextHop {
        let table = self;
        let Some((gateway, gateway_mac)) = self.route_for(dst) else { return NextHop::NoRoute };
        let (hop, mac) = match gateway {
            Some(gateway) => (gateway, gateway_mac),
            None => (dst, table.neighbour(dst)),
        };
        match mac {
            Some(mac) => NextHop::Resolved { src: table.mac, dst: mac },
            None => NextHop::NoNeighbour(hop),
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
            outside_from: Vec::new(),
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
