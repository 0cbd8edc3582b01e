//! Reading the kernel's routing state over rtnetlink: dumps of the IPv4 rules, routes (every table) and
//! neighbours, turned into the sans-IO [`RoutingState`]; and [`RouteEvents`], a socket subscribed to the kernel's
//! change notifications, so that the control thread re-reads the state when it changes instead of polling.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::rule::{RuleAction as NlRuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::routing::{KernelRoute, KernelRouteKind, KernelRule, RoutingState, RuleAction};

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Sends one dump request and collects every message of the answer.
fn dump(
    socket: &mut Socket,
    request: RouteNetlinkMessage,
    seq: u32,
) -> std::io::Result<Vec<RouteNetlinkMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut buf = vec![0; message.header.length as usize];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut answer = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n]).map_err(invalid)?;
            let length = message.header.length as usize;
            if length == 0 {
                return Err(invalid("netlink message of length 0"));
            }
            offset += (length + 3) & !3;
            if message.header.sequence_number != seq {
                continue;
            }
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(answer),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(inner) => answer.push(inner),
                _ => {}
            }
        }
    }
}

/// Reads the rules, routes and neighbours (IPv4).
pub fn read_state() -> std::io::Result<RoutingState> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Inet;
    let mut rules: Vec<KernelRule> = dump(&mut socket, RouteNetlinkMessage::GetRule(rule), 1)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(r) => Some(parse_rule(&r)),
            _ => None,
        })
        .collect();
    rules.sort_by_key(|r| r.priority);

    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    let routes = dump(&mut socket, RouteNetlinkMessage::GetRoute(route), 2)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => parse_route(&r),
            _ => None,
        })
        .collect();

    let mut neighbour = NeighbourMessage::default();
    neighbour.header.family = AddressFamily::Inet;
    let neighbours = dump(&mut socket, RouteNetlinkMessage::GetNeighbour(neighbour), 3)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => parse_neighbour(&n),
            _ => None,
        })
        .collect();
    Ok(RoutingState { rules, routes, neighbours })
}

/// One rule, with the selectors egressd cannot decide ahead of a packet named in `per_packet`.
pub fn parse_rule(message: &RuleMessage) -> KernelRule {
    let h = &message.header;
    let mut rule = KernelRule::lookup(0, u32::from(h.table));
    let mut per_packet: Vec<String> = Vec::new();
    if h.dst_len > 0 {
        per_packet.push("a destination prefix".into());
    }
    if h.tos != 0 {
        per_packet.push("TOS".into());
    }
    let (mut mark, mut mask) = (None, u32::MAX);
    let mut table = u32::from(h.table);
    let mut goto = None;
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Source(IpAddr::V4(a)) => rule.source = Some((*a, h.src_len)),
            RuleAttribute::Iifname(name) => rule.iif = Some(name.clone()),
            RuleAttribute::Oifname(name) => rule.oif = Some(name.clone()),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = *m,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Goto(p) => goto = Some(*p),
            RuleAttribute::SuppressPrefixLen(n) if *n != u32::MAX => rule.suppress_prefixlen = Some(*n),
            RuleAttribute::Destination(_) => {}
            RuleAttribute::IpProtocol(_) => per_packet.push("ipproto".into()),
            RuleAttribute::SourcePortRange(_) => per_packet.push("sport".into()),
            RuleAttribute::DestinationPortRange(_) => per_packet.push("dport".into()),
            RuleAttribute::UidRange(r) if !(r.start == 0 && r.end == u32::MAX) => {
                per_packet.push("uidrange".into())
            }
            RuleAttribute::TunId(_) => per_packet.push("tun_id".into()),
            RuleAttribute::L3MDev(true) => per_packet.push("l3mdev (VRF)".into()),
            RuleAttribute::Realm(_) => per_packet.push("realms".into()),
            _ => {}
        }
    }
    rule.fwmark = mark.filter(|m| *m != 0 || mask != u32::MAX).map(|m| (m, mask));
    rule.invert = h.flags.contains(RuleFlags::Invert);
    rule.action = match h.action {
        NlRuleAction::ToTable => RuleAction::Lookup(table),
        NlRuleAction::Goto => RuleAction::Goto(goto.unwrap_or(u32::MAX)),
        NlRuleAction::Nop => RuleAction::Nop,
        NlRuleAction::Blackhole | NlRuleAction::Unreachable | NlRuleAction::Prohibit => RuleAction::Reject,
        _ => RuleAction::Nop,
    };
    rule.per_packet = (!per_packet.is_empty()).then(|| per_packet.join(" and "));
    rule
}

/// One route; `None` for what forwarding never uses (local, broadcast, multicast, …).
pub fn parse_route(message: &RouteMessage) -> Option<KernelRoute> {
    let h = &message.header;
    if h.address_family != AddressFamily::Inet {
        return None;
    }
    let mut table = u32::from(h.table);
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let (mut oif, mut gateway, mut nexthop_object) = (None, None, false);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = *a,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            // Multipath: the kernel hashes each flow onto one of the hops; egressd takes the first.
            RouteAttribute::MultiPath(hops) if oif.is_none() => {
                if let Some(hop) = hops.first() {
                    oif = Some(hop.interface_index);
                    gateway = hop.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                        _ => None,
                    });
                }
            }
            RouteAttribute::NhId(_) => nexthop_object = true,
            _ => {}
        }
    }
    let kind = match h.kind {
        // A route through a nexthop object (`ip nexthop`) names no interface here: not out of ours.
        RouteType::Unicast if nexthop_object && oif.is_none() => KernelRouteKind::Reject,
        RouteType::Unicast => KernelRouteKind::Unicast { oif, gateway },
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit => KernelRouteKind::Reject,
        RouteType::Throw => KernelRouteKind::Throw,
        _ => return None,
    };
    Some(KernelRoute { table, destination, prefix_len: h.destination_prefix_length.min(32), kind })
}

/// A complete neighbour entry: `(ifindex, address, MAC)`.
pub fn parse_neighbour(message: &NeighbourMessage) -> Option<(u32, Ipv4Addr, [u8; 6])> {
    let h = &message.header;
    let valid = matches!(
        h.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !valid {
        return None;
    }
    let mut address = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => address = Some(*a),
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => {}
        }
    }
    let mac = mac.filter(|m| *m != [0; 6])?;
    Some((h.ifindex, address?, mac))
}

/// rtnetlink multicast groups: links, neighbours, IPv4 addresses, routes and rules.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;

/// The kernel's notifications of routing changes, read without blocking.
pub struct RouteEvents {
    socket: Socket,
    buf: Vec<u8>,
}

impl std::fmt::Debug for RouteEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteEvents").finish_non_exhaustive()
    }
}

impl RouteEvents {
    /// Subscribes to link, address, route, rule and neighbour changes of this network namespace.
    pub fn subscribe() -> std::io::Result<RouteEvents> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        Ok(RouteEvents { socket, buf: vec![0; 64 * 1024] })
    }

    /// Whether anything changed since the last call (reads every pending notification). A lost notification
    /// (the socket's buffer overflowed) counts as a change: the caller re-reads everything anyway.
    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return changed,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteNextHop;
    use netlink_packet_route::rule::RulePortRange;

    // Every message goes through its wire form, as the kernel would send it.
    fn roundtrip(m: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut message = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
        message.finalize();
        let mut buf = vec![0; message.header.length as usize];
        message.serialize(&mut buf);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap().payload {
            NetlinkPayload::InnerMessage(inner) => inner,
            other => panic!("{other:?}"),
        }
    }

    fn route_roundtrip(m: &RouteMessage) -> RouteMessage {
        match roundtrip(RouteNetlinkMessage::NewRoute(m.clone())) {
            RouteNetlinkMessage::NewRoute(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn rule_roundtrip(m: &RuleMessage) -> RuleMessage {
        match roundtrip(RouteNetlinkMessage::NewRule(m.clone())) {
            RouteNetlinkMessage::NewRule(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn neighbour_roundtrip(m: &NeighbourMessage) -> NeighbourMessage {
        match roundtrip(RouteNetlinkMessage::NewNeighbour(m.clone())) {
            RouteNetlinkMessage::NewNeighbour(n) => n,
            other => panic!("{other:?}"),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn route(
        table: u8,
        kind: RouteType,
        dst: Option<(&str, u8)>,
        attributes: Vec<RouteAttribute>,
    ) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = table;
        m.header.kind = kind;
        if let Some((a, len)) = dst {
            m.header.destination_prefix_length = len;
            m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(ip(a))));
        }
        m.attributes.extend(attributes);
        m
    }

    #[test]
    fn routes_are_read_with_their_table_interface_gateway_and_kind() {
        let default = route(
            254,
            RouteType::Unicast,
            None,
            vec![RouteAttribute::Oif(3), RouteAttribute::Gateway(RouteAddress::Inet(ip("192.0.2.2")))],
        );
        assert_eq!(
            parse_route(&route_roundtrip(&default)),
            Some(KernelRoute {
                table: 254,
                destination: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                kind: KernelRouteKind::Unicast { oif: Some(3), gateway: Some(ip("192.0.2.2")) }
            })
        );
        // Tables above 255 travel in an attribute.
        let big = route(
            252,
            RouteType::Unicast,
            Some(("10.0.0.0", 8)),
            vec![RouteAttribute::Table(1000), RouteAttribute::Oif(2)],
        );
        let big = parse_route(&route_roundtrip(&big)).unwrap();
        assert_eq!((big.table, big.destination, big.prefix_len), (1000, ip("10.0.0.0"), 8));
        assert_eq!(big.kind, KernelRouteKind::Unicast { oif: Some(2), gateway: None });
        let blackhole = route(100, RouteType::BlackHole, Some(("203.0.113.66", 32)), vec![]);
        assert_eq!(parse_route(&route_roundtrip(&blackhole)).unwrap().kind, KernelRouteKind::Reject);
        let throw = route(100, RouteType::Throw, Some(("198.51.100.0", 24)), vec![]);
        assert_eq!(parse_route(&route_roundtrip(&throw)).unwrap().kind, KernelRouteKind::Throw);
        for kind in [RouteType::Local, RouteType::Broadcast, RouteType::Multicast] {
            assert_eq!(
                parse_route(&route_roundtrip(&route(255, kind, Some(("192.0.2.1", 32)), vec![]))),
                None
            );
        }
        // Multipath: the first hop.
        let hop = |ifindex, gw: &str| {
            let mut h = RouteNextHop::default();
            h.interface_index = ifindex;
            h.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(ip(gw))));
            h
        };
        let ecmp = route(
            254,
            RouteType::Unicast,
            None,
            vec![RouteAttribute::MultiPath(vec![hop(3, "192.0.2.2"), hop(3, "192.0.2.3")])],
        );
        assert_eq!(
            parse_route(&route_roundtrip(&ecmp)).unwrap().kind,
            KernelRouteKind::Unicast { oif: Some(3), gateway: Some(ip("192.0.2.2")) }
        );
    }

    #[test]
    fn rules_are_read_with_their_selectors_and_actions() {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.src_len = 32;
        m.header.table = 100;
        m.header.action = NlRuleAction::ToTable;
        m.attributes = vec![
            RuleAttribute::Priority(1000),
            RuleAttribute::Source(IpAddr::V4(ip("192.0.2.11"))),
            RuleAttribute::Iifname("gw-in".into()),
        ];
        let rule = parse_rule(&rule_roundtrip(&m));
        assert_eq!(rule.priority, 1000);
        assert_eq!(rule.source, Some((ip("192.0.2.11"), 32)));
        assert_eq!(rule.iif.as_deref(), Some("gw-in"));
        assert_eq!(rule.action, RuleAction::Lookup(100));
        assert_eq!((rule.fwmark, rule.invert, rule.per_packet.as_deref()), (None, false, None));

        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = NlRuleAction::ToTable;
        m.header.flags = RuleFlags::Invert;
        m.attributes = vec![
            RuleAttribute::Table(5000),
            RuleAttribute::FwMark(0x10),
            RuleAttribute::FwMask(0xff),
            RuleAttribute::DestinationPortRange(RulePortRange { start: 443, end: 443 }),
        ];
        let rule = parse_rule(&rule_roundtrip(&m));
        assert_eq!(rule.action, RuleAction::Lookup(5000));
        assert_eq!((rule.fwmark, rule.invert), (Some((0x10, 0xff)), true));
        assert_eq!(rule.per_packet.as_deref(), Some("dport"));

        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = NlRuleAction::Unreachable;
        m.header.dst_len = 8;
        let rule = parse_rule(&rule_roundtrip(&m));
        assert_eq!(rule.action, RuleAction::Reject);
        assert_eq!(rule.per_packet.as_deref(), Some("a destination prefix"));
    }

    #[test]
    fn only_complete_neighbours_with_a_mac_are_kept() {
        let neighbour = |state, mac: Option<Vec<u8>>| {
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.ifindex = 3;
            m.header.state = state;
            m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip("192.0.2.2"))));
            if let Some(mac) = mac {
                m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac));
            }
            parse_neighbour(&neighbour_roundtrip(&m))
        };
        let mac = vec![2, 0, 0, 0, 1, 2];
        for state in [NeighbourState::Reachable, NeighbourState::Stale, NeighbourState::Permanent] {
            assert_eq!(neighbour(state, Some(mac.clone())), Some((3, ip("192.0.2.2"), [2, 0, 0, 0, 1, 2])));
        }
        for state in [NeighbourState::Incomplete, NeighbourState::Failed] {
            assert_eq!(neighbour(state, Some(mac.clone())), None);
        }
        assert_eq!(neighbour(NeighbourState::Reachable, None), None);
        assert_eq!(neighbour(NeighbourState::Reachable, Some(vec![1, 2, 3])), None);
        assert_eq!(neighbour(NeighbourState::Reachable, Some(vec![0; 6])), None);
    }

    /// In the test's own namespace: the dumps answer, and the main table's routes are among what they return.
    #[test]
    fn the_kernel_answers_the_dumps() {
        let state = read_state().expect("rtnetlink dumps");
        assert!(
            state.rules.iter().any(|r| r.action == RuleAction::Lookup(super::super::routing::MAIN_TABLE)),
            "{:?}",
            state.rules
        );
        assert!(state.rules.windows(2).all(|w| w[0].priority <= w[1].priority));
    }
}
