//! Snapshot tests: the documented precedence on hand-made cases, and the compiled tables against a linear-scan
//! reference matcher on random policies and packets (IPv4 and IPv6).

use super::*;
use proptest::prelude::*;

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn rule(group: GroupId, to: &[&str], proto: ProtoMatch, ports: &[(u16, u16)], action: Action) -> RuleSpec {
    let ports = ports.iter().map(|&(first, last)| PortRange { first, last }).collect();
    RuleSpec::new(group, to.iter().map(|s| p(s)).collect(), proto, ports, action)
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn most_specific_matching_prefix_wins_even_against_other_protocols() {
    let mut b = PolicyBuilder::new();
    let g = b.add_group("payments", vec![v4("198.51.100.10")]);
    b.add_source(g, p("10.10.1.0/24"));
    let wide_tcp = b.add_rule(rule(g, &["203.0.0.0/16"], ProtoMatch::Tcp, &[(443, 443)], Action::Allow));
    let narrow_udp = b.add_rule(rule(g, &["203.0.113.0/24"], ProtoMatch::Udp, &[], Action::Deny));
    let s = b.build(1).unwrap();
    let src = v4("10.10.1.5");
    let d = s.evaluate_v4(src, v4("203.0.113.9"), ip_proto::TCP, 443);
    assert_eq!((d.verdict, d.rule, d.group), (Verdict::Allow, Some(wide_tcp), Some(g)));
    let d = s.evaluate_v4(src, v4("203.0.113.9"), ip_proto::UDP, 443);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny(DenyReason::Rule), Some(narrow_udp)));
    let d = s.evaluate_v4(src, v4("203.0.113.9"), ip_proto::TCP, 80);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny(DenyReason::DefaultDeny), None));
    let d = s.evaluate_v4(v4("10.10.2.1"), v4("203.0.113.9"), ip_proto::TCP, 443);
    assert_eq!((d.verdict, d.group), (Verdict::Deny(DenyReason::NoGroup), None));
    assert_eq!(d.drop_reason(), Some(DropReason::NoGroup));
    assert_eq!(s.generation(), 1);
}

#[test]
fn except_removes_and_ties_go_to_the_first_rule() {
    let mut b = PolicyBuilder::new();
    let g = b.add_group("g", vec![v4("198.51.100.10"), v4("198.51.100.11")]);
    b.add_source(g, p("10.0.0.0/8"));
    let mut allow = rule(g, &["203.0.113.0/24"], ProtoMatch::Any, &[], Action::Allow);
    allow.except = vec![p("203.0.113.128/25")];
    let first = b.add_rule(allow);
    let mut audit = rule(g, &["203.0.113.0/24"], ProtoMatch::Tcp, &[], Action::Deny);
    audit.dry_run = true;
    let second = b.add_rule(audit);
    let s = b.build(0).unwrap();
    let src = v4("10.1.2.3");
    assert_eq!(s.evaluate_v4(src, v4("203.0.113.5"), ip_proto::TCP, 1).rule, Some(first));
    let d = s.evaluate_v4(src, v4("203.0.113.200"), ip_proto::TCP, 1);
    assert_eq!((d.verdict, d.rule, d.dry_run), (Verdict::Deny(DenyReason::Rule), Some(second), true));
    assert!(d.forwards());
    assert_eq!(d.drop_reason(), None);
    assert_eq!(
        s.evaluate_v4(src, v4("203.0.113.200"), ip_proto::UDP, 1).verdict,
        Verdict::Deny(DenyReason::DefaultDeny)
    );
    // Paired pooling: stable per source, and every egress IP gets used.
    let ip = s.egress_ip_for(g, src);
    assert_eq!(ip, s.egress_ip_for(g, src));
    let used: std::collections::HashSet<_> =
        (0..64u32).filter_map(|i| s.egress_ip_for(g, Ipv4Addr::from(0x0a00_0000 + i))).collect();
    assert_eq!(used.len(), 2);
    assert_eq!(s.group_name(g), "g");
    assert_eq!(s.group_name(GroupId(9)), "");
    assert!(s.egress_ips(GroupId(9)).is_empty());
}

#[test]
fn same_source_prefix_in_two_groups_is_refused() {
    let mut b = PolicyBuilder::new();
    let a = b.add_group("a", vec![]);
    let c = b.add_group("c", vec![]);
    b.add_source(a, p("10.0.0.0/8"));
    b.add_source(c, p("10.0.0.0/8"));
    assert!(matches!(b.build(0), Err(BuildError::SourceInTwoGroups { .. })));
}

#[test]
fn prefixes_parse_strictly() {
    assert_eq!("10.0.0.1/8".parse::<Prefix>(), Err(PrefixError::HostBitsSet { network: p("10.0.0.0/8") }));
    assert_eq!("10.0.0.0/33".parse::<Prefix>(), Err(PrefixError::TooLong { len: 33, max: 32 }));
    assert!(matches!("10.0.0.0/".parse::<Prefix>(), Err(PrefixError::Syntax(_))));
    assert_eq!(p("2001:db8::1").prefix_len(), 128);
}

/// The documented rule, as a linear scan.
fn reference(
    groups: &[Vec<Prefix>],
    rules: &[RuleSpec],
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> (Option<u32>, Option<u32>) {
    let group = groups
        .iter()
        .enumerate()
        .flat_map(|(g, ps)| ps.iter().filter(|p| p.contains(src)).map(move |p| (p.prefix_len(), g as u32)))
        .max_by_key(|&(len, _)| len)
        .map(|(_, g)| g);
    let Some(group) = group else { return (None, None) };
    let mut best: Option<(u8, u32)> = None;
    for (i, r) in rules.iter().enumerate() {
        if r.group.0 != group || !r.matches_proto_port(proto, port) {
            continue;
        }
        if let Some(m) = r.matching_prefix(dst) {
            if best.is_none_or(|(len, _)| m.prefix_len() > len) {
                best = Some((m.prefix_len(), i as u32));
            }
        }
    }
    (Some(group), best.map(|(_, r)| r))
}

fn arb_prefix(v6: bool) -> impl Strategy<Value = Prefix> {
    // A small address pool so prefixes nest and collide.
    (0u8..4, any::<u8>(), 0u8..=40).prop_map(move |(hi, lo, len)| {
        if v6 {
            let a = Ipv6Addr::new(0x2001, 0xdb8, hi as u16, 0, 0, 0, 0, lo as u16);
            Prefix::truncating(IpAddr::V6(a), len.saturating_mul(3).min(128))
        } else {
            Prefix::truncating(IpAddr::V4(Ipv4Addr::new(10, hi, lo, lo / 3)), len.min(32))
        }
    })
}

fn arb_rule(groups: u32, v6: bool) -> impl Strategy<Value = RuleSpec> {
    (
        0..groups,
        prop::collection::vec(arb_prefix(v6), 1..3),
        prop::collection::vec(arb_prefix(v6), 0..2),
        prop_oneof![
            Just(ProtoMatch::Any),
            Just(ProtoMatch::Tcp),
            Just(ProtoMatch::Udp),
            Just(ProtoMatch::Icmp)
        ],
        prop::collection::vec((0u16..100, 0u16..20), 0..3),
        prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::L7)],
        any::<bool>(),
    )
        .prop_map(move |(group, to, except, proto, ports, action, dry_run)| RuleSpec {
            group: GroupId(group),
            to,
            except,
            proto,
            ports: ports.into_iter().map(|(f, w)| PortRange { first: f, last: f + w }).collect(),
            action,
            dry_run,
            hosts: vec![],
            name: None,
            l7: Default::default(),
        })
}

fn check_against_reference(
    v6: bool,
    global_dry_run: bool,
    sources: Vec<Vec<Prefix>>,
    rules: Vec<RuleSpec>,
    packets: Vec<(usize, usize, u8, u16, u128)>,
) -> Result<(), TestCaseError> {
    let mut b = PolicyBuilder::new();
    b.dry_run(global_dry_run);
    let mut seen = std::collections::HashSet::new();
    let mut groups: Vec<Vec<Prefix>> = vec![];
    for ps in &sources {
        let g = b.add_group(format!("g{}", groups.len()), vec![]);
        let kept: Vec<Prefix> = ps.iter().copied().filter(|p| seen.insert(*p)).collect();
        for &p in &kept {
            b.add_source(g, p);
        }
        groups.push(kept);
    }
    for r in &rules {
        b.add_rule(r.clone());
    }
    let snap = b.build(7).unwrap();
    let all: Vec<Prefix> = sources
        .iter()
        .flatten()
        .chain(rules.iter().flat_map(|r| r.to.iter().chain(&r.except)))
        .copied()
        .collect();
    let addr_near = |i: usize, noise: u128| -> IpAddr {
        let base = all[i % all.len()];
        let host_bits =
            if v6 { 128 - u32::from(base.prefix_len()) } else { 32 - u32::from(base.prefix_len()) };
        let host = if host_bits == 0 { 0 } else { noise & (u128::MAX >> (128 - host_bits)) };
        match base.addr() {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) | host as u32)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) | host)),
        }
    };
    for (si, di, proto_pick, port, noise) in packets {
        let proto =
            [ip_proto::TCP, ip_proto::UDP, ip_proto::ICMP, ip_proto::ICMPV6, 47][proto_pick as usize % 5];
        let (src, dst) = (addr_near(si, noise), addr_near(di, noise.rotate_left(17)));
        let got = snap.evaluate(src, dst, proto, port);
        let (group, rule) = reference(&groups, &rules, src, dst, proto, port);
        prop_assert_eq!(got.group.map(|g| g.0), group, "{} -> {} proto {} port {}", src, dst, proto, port);
        prop_assert_eq!(got.rule.map(|r| r.0), rule, "{} -> {} proto {} port {}", src, dst, proto, port);
        if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
            prop_assert_eq!(snap.evaluate_v4(s, d, proto, port), got);
        }
        let expected = match (group, rule) {
            (None, _) => Verdict::Deny(DenyReason::NoGroup),
            (Some(_), None) => Verdict::Deny(DenyReason::DefaultDeny),
            (Some(_), Some(r)) => match rules[r as usize].action {
                Action::Allow => Verdict::Allow,
                Action::Deny => Verdict::Deny(DenyReason::Rule),
                Action::L7 => Verdict::L7,
            },
        };
        prop_assert_eq!(got.verdict, expected);
        // Dry run: the deciding rule's flag or the global switch; never on an allow.
        let dry_run = match rule.map(|r| &rules[r as usize]) {
            None => global_dry_run,
            Some(r) => r.action != Action::Allow && (r.dry_run || global_dry_run),
        };
        prop_assert_eq!(got.dry_run, dry_run);
    }
    Ok(())
}

proptest! {
    #[test]
    fn compiled_tables_agree_with_reference_v4(
        sources in prop::collection::vec(prop::collection::vec(arb_prefix(false), 1..3), 1..4),
        rules in prop::collection::vec(arb_rule(3, false), 0..16),
        packets in prop::collection::vec((any::<usize>(), any::<usize>(), 0u8..5, 0u16..130, any::<u128>()), 0..64),
        global_dry_run in any::<bool>(),
    ) {
        let rules: Vec<RuleSpec> = rules.into_iter().map(|mut r| { r.group.0 %= sources.len() as u32; r }).collect();
        check_against_reference(false, global_dry_run, sources, rules, packets)?;
    }

    #[test]
    fn compiled_tables_agree_with_reference_v6(
        sources in prop::collection::vec(prop::collection::vec(arb_prefix(true), 1..3), 1..4),
        rules in prop::collection::vec(arb_rule(3, true), 0..16),
        packets in prop::collection::vec((any::<usize>(), any::<usize>(), 0u8..5, 0u16..130, any::<u128>()), 1..64),
        global_dry_run in any::<bool>(),
    ) {
        let rules: Vec<RuleSpec> = rules.into_iter().map(|mut r| { r.group.0 %= sources.len() as u32; r }).collect();
        check_against_reference(true, global_dry_run, sources, rules, packets)?;
    }
}

proptest! {
    // Paired pooling (RFC 4787 REQ-2) keeps its answers: the trimmed `egress_ip_for` picks exactly the IP the plain
    // rendezvous hash picks (max of mix64((src << 32) | ip), the last one on a tie), for any group size, duplicate
    // IPs included, so hosts keep their egress IP across an upgrade as across reloads.
    #[test]
    fn egress_ip_for_matches_plain_rendezvous(
        ips in proptest::collection::vec(prop_oneof![any::<u32>(), 0u32..4], 0..20),
        srcs in proptest::collection::vec(any::<u32>(), 1..50),
    ) {
        let ips: Vec<Ipv4Addr> = ips.into_iter().map(Ipv4Addr::from).collect();
        let mut b = PolicyBuilder::new();
        let g = b.add_group("g", ips.clone());
        let s = b.build(0).unwrap();
        for src in srcs {
            let src = Ipv4Addr::from(src);
            let want = ips
                .iter()
                .copied()
                .max_by_key(|ip| mix64((u64::from(u32::from(src)) << 32) | u64::from(u32::from(*ip))));
            prop_assert_eq!(s.egress_ip_for(g, src), want);
        }
        prop_assert_eq!(s.egress_ip_for(GroupId(7), Ipv4Addr::LOCALHOST), None);
    }
}
