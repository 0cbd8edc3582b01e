//! Policy routing, sans-IO: from the kernel's rules, routes and neighbours (as read by `netlink`) to the
//! [`NextHopTable`] the workers use.
//!
//! egressd forwards packets the kernel never sees, so it must pick the next hop the kernel would have picked.
//! On egress nodes that is often not the main table: `ip rule add from 192.0.2.11 lookup 100` sends one egress
//! IP's traffic through its own uplink. For each kind of traffic the workers route — out of the outside
//! interface from each egress IP, out of the inside interface towards clients — this module walks the rules in
//! priority order as the kernel's `fib_rules_lookup` does and yields the chain of tables to consult:
//! - a rule matches on what is known of that traffic ahead of time: source address (the egress IP, or none for
//!   replies towards clients), input interface (the other interface egressd owns), no firewall mark, no output
//!   interface; `not` inverts;
//! - a rule that selects on something only a packet knows (destination prefix, TOS, protocol, ports, UID range,
//!   tunnel id, VRF) cannot be decided per table and is skipped, with a warning naming it;
//! - `lookup TABLE` adds the table (with `suppress_prefixlength N`, its routes of prefix length N or shorter act
//!   as `throw`), `goto` jumps, `nop` goes on, `blackhole`/`unreachable`/`prohibit` end the chain with no route.
//!
//! In each table, routes out of the interface become next hops; blackhole, unreachable and prohibit routes, and
//! routes out of any other interface, end the lookup with no route (the kernel would not send the packet here);
//! `throw` routes go on to the next table.

use std::net::Ipv4Addr;

use dataplane::nexthop::{InterfaceTable, Mac, NextHopTable, RouteAction, TableRoute};

/// The main table's id.
pub const MAIN_TABLE: u32 = 254;

/// What a kernel route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelRouteKind {
    /// Out of interface `oif` (ifindex; `None`: none given), via `gateway` or on-link.
    Unicast {
        oif: Option<u32>,
        gateway: Option<Ipv4Addr>,
    },
    /// Blackhole, unreachable, prohibit.
    Reject,
    Throw,
}

/// One IPv4 route of any table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    pub table: u32,
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
    pub kind: KernelRouteKind,
}

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    Lookup(u32),
    Goto(u32),
    Nop,
    /// Blackhole, unreachable, prohibit.
    Reject,
}

/// One IPv4 policy routing rule (`ip rule`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRule {
    pub priority: u32,
    pub source: Option<(Ipv4Addr, u8)>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    /// `(mark, mask)`.
    pub fwmark: Option<(u32, u32)>,
    pub invert: bool,
    pub action: RuleAction,
    pub suppress_prefixlen: Option<u32>,
    /// A selector only a packet can decide (e.g. "to 10.0.0.0/8", "dport 443"): the rule is skipped.
    pub per_packet: Option<String>,
}

impl KernelRule {
    /// The kernel's three default rules (`ip rule` on a fresh node).
    pub fn defaults() -> Vec<KernelRule> {
        [(0, 255), (32766, MAIN_TABLE), (32767, 253)]
            .into_iter()
            .map(|(priority, table)| KernelRule::lookup(priority, table))
            .collect()
    }

    pub fn lookup(priority: u32, table: u32) -> KernelRule {
        KernelRule {
            priority,
            source: None,
            iif: None,
            oif: None,
            fwmark: None,
            invert: false,
            action: RuleAction::Lookup(table),
            suppress_prefixlen: None,
            per_packet: None,
        }
    }

    /// Whether the rule matches traffic from `source` (`None`: any address) arriving on `iif`.
    fn matches(&self, source: Option<Ipv4Addr>, iif: &str) -> bool {
        let source_ok = match (self.source, source) {
            (None, _) | (Some((_, 0)), _) => true,
            (Some((net, len)), Some(src)) => {
                let mask = u32::MAX << (32 - u32::from(len.min(32)));
                u32::from(src) & mask == u32::from(net) & mask
            }
            (Some(_), None) => false,
        };
        let matched = source_ok
            && self.iif.as_deref().is_none_or(|i| i == iif)
            && self.oif.is_none()
            && self.fwmark.is_none_or(|(mark, mask)| mark & mask == 0);
        matched != self.invert
    }
}

/// An interface egressd owns, as the routing tables name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: Mac,
    pub mtu: u32,
    pub address: Option<Ipv4Addr>,
}

/// The kernel's routing state, as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingState {
    /// Sorted by priority (the kernel's order).
    pub rules: Vec<KernelRule>,
    pub routes: Vec<KernelRoute>,
    /// `(ifindex, address, MAC)` of complete entries.
    pub neighbours: Vec<(u32, Ipv4Addr, Mac)>,
}

/// The tables a chain consults, with each one's `suppress_prefixlength`; and whether it ends in a reject rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub tables: Vec<(u32, Option<u32>)>,
    pub rejects: bool,
}

impl RoutingState {
    /// The chain of tables for traffic from `source` arriving on `iif`; rules skipped go to `warnings`.
    pub fn chain(&self, source: Option<Ipv4Addr>, iif: &str, warnings: &mut Vec<String>) -> Chain {
        let mut chain = Chain::default();
        let mut i = 0;
        // A `goto` only jumps forward (the kernel refuses backward ones), so this ends; the bound is for safety.
        let mut steps = 0;
        while let Some(rule) = self.rules.get(i) {
            steps += 1;
            if steps > self.rules.len() * 2 + 2 {
                break;
            }
            if let Some(selector) = &rule.per_packet {
                let warning = format!(
                    "ip rule {} selects on {selector}, which egressd cannot decide per routing table: skipped",
                    rule.priority
                );
                if !warnings.contains(&warning) {
                    warnings.push(warning);
                }
                i += 1;
                continue;
            }
            if !rule.matches(source, iif) {
                i += 1;
                continue;
            }
            match rule.action {
                RuleAction::Lookup(table) => {
                    chain.tables.push((table, rule.suppress_prefixlen));
                    i += 1;
                }
                RuleAction::Goto(priority) => {
                    let target =
                        self.rules.iter().position(|r| r.priority >= priority && r.priority > rule.priority);
                    i = target.unwrap_or(self.rules.len());
                }
                RuleAction::Nop => i += 1,
                RuleAction::Reject => {
                    chain.rejects = true;
                    break;
                }
            }
        }
        chain
    }

    /// The table of `link` for `chain`.
    pub fn interface_table(&self, link: &Link, chain: &Chain) -> InterfaceTable {
        let mut tables: Vec<Vec<TableRoute>> = chain
            .tables
            .iter()
            .map(|&(table, suppress)| {
                self.routes
                    .iter()
                    .filter(|r| r.table == table)
                    .map(|r| {
                        let action = match r.kind {
                            _ if suppress.is_some_and(|n| u32::from(r.prefix_len) <= n) => RouteAction::Throw,
                            KernelRouteKind::Unicast { oif: Some(oif), gateway } if oif == link.ifindex => {
                                RouteAction::Via(gateway)
                            }
                            KernelRouteKind::Unicast { .. } | KernelRouteKind::Reject => RouteAction::Reject,
                            KernelRouteKind::Throw => RouteAction::Throw,
                        };
                        TableRoute { destination: r.destination, prefix_len: r.prefix_len, action }
                    })
                    .collect()
            })
            .collect();
        if chain.rejects {
            tables.push(vec![TableRoute {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                action: RouteAction::Reject,
            }]);
        }
        let neighbours = self
            .neighbours
            .iter()
            .filter(|(ifindex, _, _)| *ifindex == link.ifindex)
            .map(|&(_, ip, mac)| (ip, mac))
            .collect();
        InterfaceTable::from_chain(link.mac, tables, neighbours).with_address(link.address).with_mtu(link.mtu)
    }

    /// The workers' snapshot: towards clients, replies from anywhere arriving on the outside; out of the outside,
    /// traffic from inside with no known source, and from each egress IP whose rules pick other tables.
    pub fn next_hops(
        &self,
        inside: &Link,
        outside: &Link,
        egress_ips: &[Ipv4Addr],
        warnings: &mut Vec<String>,
    ) -> NextHopTable {
        let inside_chain = self.chain(None, &outside.name, warnings);
        let outside_chain = self.chain(None, &inside.name, warnings);
        let mut outside_from = Vec::new();
        for &ip in egress_ips {
            let chain = self.chain(Some(ip), &inside.name, warnings);
            if chain != outside_chain {
                outside_from.push((ip, self.interface_table(outside, &chain)));
            }
        }
        NextHopTable {
            inside: self.interface_table(inside, &inside_chain),
            outside: self.interface_table(outside, &outside_chain),
            outside_from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::nexthop::NextHop;
    use dataplane::Side;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const IN: u32 = 2;
    const OUT: u32 = 3;
    const OTHER: u32 = 4;
    const IN_MAC: Mac = [2, 0, 0, 0, 0, 1];
    const OUT_MAC: Mac = [2, 0, 0, 0, 1, 1];
    const GW_MAC: Mac = [2, 0, 0, 0, 1, 2];
    const GW2_MAC: Mac = [2, 0, 0, 0, 1, 3];

    fn links() -> (Link, Link) {
        let link =
            |name: &str, ifindex, mac| Link { name: name.into(), ifindex, mac, mtu: 1500, address: None };
        (link("gw-in", IN, IN_MAC), link("gw-out", OUT, OUT_MAC))
    }

    fn route(table: u32, dst: &str, len: u8, kind: KernelRouteKind) -> KernelRoute {
        KernelRoute { table, destination: ip(dst), prefix_len: len, kind }
    }

    fn via(oif: u32, gw: &str) -> KernelRouteKind {
        KernelRouteKind::Unicast { oif: Some(oif), gateway: Some(ip(gw)) }
    }

    fn on_link(oif: u32) -> KernelRouteKind {
        KernelRouteKind::Unicast { oif: Some(oif), gateway: None }
    }

    /// The lab node: clients on gw-in, the uplink 192.0.2.2 on gw-out, a second uplink 192.0.2.3.
    fn lab() -> RoutingState {
        let mut rules = KernelRule::defaults();
        rules.sort_by_key(|r| r.priority);
        RoutingState {
            rules,
            routes: vec![
                route(MAIN_TABLE, "0.0.0.0", 0, via(OUT, "192.0.2.2")),
                route(MAIN_TABLE, "192.0.2.0", 24, on_link(OUT)),
                route(MAIN_TABLE, "10.10.0.0", 24, on_link(IN)),
                route(MAIN_TABLE, "10.10.1.0", 24, on_link(IN)),
                route(100, "0.0.0.0", 0, via(OUT, "192.0.2.3")),
                route(255, "192.0.2.1", 32, KernelRouteKind::Reject),
            ],
            neighbours: vec![
                (OUT, ip("192.0.2.2"), GW_MAC),
                (OUT, ip("192.0.2.3"), GW2_MAC),
                (IN, ip("10.10.0.2"), [9; 6]),
            ],
        }
    }

    fn with_rule(mut state: RoutingState, rule: KernelRule) -> RoutingState {
        state.rules.push(rule);
        state.rules.sort_by_key(|r| r.priority);
        state
    }

    fn next_hops(state: &RoutingState) -> (NextHopTable, Vec<String>) {
        let (inside, outside) = links();
        let mut warnings = Vec::new();
        let t = state.next_hops(&inside, &outside, &[ip("192.0.2.10"), ip("192.0.2.11")], &mut warnings);
        (t, warnings)
    }

    fn out_mac(t: &NextHopTable, src: &str, dst: &str) -> Result<Mac, NextHop> {
        t.lookup_l2_from(Side::Outside, ip(src), ip(dst)).map(|l2| l2[..6].try_into().unwrap())
    }

    #[test]
    fn without_policy_routing_the_main_table_serves_everything() {
        let (t, warnings) = next_hops(&lab());
        assert!(warnings.is_empty());
        assert!(!t.routes_by_source());
        assert_eq!(out_mac(&t, "192.0.2.11", "203.0.113.10"), Ok(GW_MAC));
        // Routes out of the other interface do not leave by this one: no fallback to the default route.
        assert_eq!(t.lookup(Side::Outside, ip("10.10.0.2")), NextHop::NoRoute);
        assert_eq!(t.lookup(Side::Inside, ip("10.10.0.2")), NextHop::Resolved { src: IN_MAC, dst: [9; 6] });
        assert_eq!(t.lookup(Side::Inside, ip("8.8.8.8")), NextHop::NoRoute);
    }

    #[test]
    fn a_source_rule_gives_one_egress_ip_its_own_uplink() {
        let rule = KernelRule { source: Some((ip("192.0.2.11"), 32)), ..KernelRule::lookup(100, 100) };
        let (t, _) = next_hops(&with_rule(lab(), rule));
        assert!(t.routes_by_source());
        assert_eq!(out_mac(&t, "192.0.2.11", "203.0.113.10"), Ok(GW2_MAC));
        assert_eq!(out_mac(&t, "192.0.2.10", "203.0.113.10"), Ok(GW_MAC), "the other egress IP keeps main");
        // Table 100 has no on-link route for 192.0.2.0/24, but its default route matches first.
        assert_eq!(out_mac(&t, "192.0.2.11", "192.0.2.7"), Ok(GW2_MAC));
        // Clients are reached as before.
        assert_eq!(t.lookup(Side::Inside, ip("10.10.0.2")), NextHop::Resolved { src: IN_MAC, dst: [9; 6] });
    }

    #[test]
    fn a_table_without_a_match_falls_through_to_the_next_rule() {
        let mut state = with_rule(lab(), KernelRule::lookup(100, 101));
        state.routes.push(route(101, "203.0.113.0", 24, via(OUT, "192.0.2.3")));
        let (t, _) = next_hops(&state);
        assert_eq!(out_mac(&t, "192.0.2.10", "203.0.113.10"), Ok(GW2_MAC));
        assert_eq!(out_mac(&t, "192.0.2.10", "198.51.100.10"), Ok(GW_MAC), "main's default route");
    }

    #[test]
    fn throw_suppress_and_reject_routes_act_as_in_the_kernel() {
        let mut state = with_rule(lab(), KernelRule::lookup(100, 100));
        state.routes.push(route(100, "198.51.100.0", 24, KernelRouteKind::Throw));
        state.routes.push(route(100, "203.0.113.66", 32, KernelRouteKind::Reject));
        state.routes.push(route(100, "203.0.113.0", 24, via(OTHER, "172.16.0.1")));
        let (t, _) = next_hops(&state);
        assert_eq!(out_mac(&t, "192.0.2.10", "198.51.100.10"), Ok(GW_MAC), "throw: on to main");
        assert_eq!(out_mac(&t, "192.0.2.10", "203.0.113.66"), Err(NextHop::NoRoute), "blackhole");
        assert_eq!(out_mac(&t, "192.0.2.10", "203.0.113.10"), Err(NextHop::NoRoute), "leaves by another NIC");
        assert_eq!(out_mac(&t, "192.0.2.10", "8.8.8.8"), Ok(GW2_MAC));
        // wg-quick's `lookup main suppress_prefixlength 0`: main's default route is ignored, its others kept.
        let mut state = lab();
        state.rules = vec![
            KernelRule { suppress_prefixlen: Some(0), ..KernelRule::lookup(32764, MAIN_TABLE) },
            KernelRule::lookup(32765, 100),
        ];
        let (t, _) = next_hops(&state);
        assert_eq!(out_mac(&t, "192.0.2.10", "8.8.8.8"), Ok(GW2_MAC));
        assert_eq!(t.lookup(Side::Outside, ip("192.0.2.2")), NextHop::Resolved { src: OUT_MAC, dst: GW_MAC });
    }

    #[test]
    fn rules_match_on_source_iif_mark_and_inversion_and_reject_ends_the_chain() {
        let lookup100 = KernelRule::lookup(100, 100);
        let cases = [
            (KernelRule { iif: Some("gw-in".into()), ..lookup100.clone() }, true),
            (KernelRule { iif: Some("eth9".into()), ..lookup100.clone() }, false),
            (KernelRule { oif: Some("gw-out".into()), ..lookup100.clone() }, false),
            (KernelRule { fwmark: Some((1, u32::MAX)), ..lookup100.clone() }, false),
            (KernelRule { source: Some((ip("192.0.2.0"), 24)), ..lookup100.clone() }, true),
            (KernelRule { source: Some((ip("192.0.2.0"), 24)), invert: true, ..lookup100.clone() }, false),
            (KernelRule { source: Some((ip("10.0.0.0"), 8)), ..lookup100.clone() }, false),
        ];
        for (rule, applies) in cases {
            let (t, _) = next_hops(&with_rule(lab(), rule.clone()));
            let want = if applies { GW2_MAC } else { GW_MAC };
            assert_eq!(out_mac(&t, "192.0.2.10", "8.8.8.8"), Ok(want), "{rule:?}");
        }
        let blackhole = KernelRule { action: RuleAction::Reject, ..KernelRule::lookup(100, 0) };
        let (t, _) = next_hops(&with_rule(lab(), blackhole));
        assert_eq!(out_mac(&t, "192.0.2.10", "8.8.8.8"), Err(NextHop::NoRoute));
        assert_eq!(t.lookup(Side::Inside, ip("10.10.0.2")), NextHop::NoRoute);
        // goto skips the rules in between.
        let mut state =
            with_rule(lab(), KernelRule { action: RuleAction::Goto(200), ..KernelRule::lookup(50, 0) });
        state = with_rule(state, KernelRule::lookup(100, 100));
        let (t, _) = next_hops(&state);
        assert_eq!(out_mac(&t, "192.0.2.10", "8.8.8.8"), Ok(GW_MAC));
    }

    #[test]
    fn a_rule_only_a_packet_can_decide_is_skipped_with_a_warning() {
        let rule = KernelRule { per_packet: Some("dport 443".into()), ..KernelRule::lookup(100, 100) };
        let (t, warnings) = next_hops(&with_rule(lab(), rule));
        assert_eq!(out_mac(&t, "192.0.2.10", "8.8.8.8"), Ok(GW_MAC));
        assert_eq!(warnings.len(), 1, "one warning, not one per chain: {warnings:?}");
        assert!(warnings[0].contains("ip rule 100 selects on dport 443"), "{warnings:?}");
    }
}
