//! Pipeline tests: frames built with etherparse through `Pipeline::process`, on a virtual clock, asserting the
//! action, the rewritten bytes and the drop counters.

use super::*;
use crate::nexthop::{InterfaceTable, Route};
use crate::policy::{Action as PolicyAction, GroupId, PolicyBuilder, PortRange, ProtoMatch, RuleSpec};
use proptest::prelude::*;

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const EXT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn lab_table(with_ext_neighbour: bool) -> NextHopTable {
    NextHopTable {
        inside: InterfaceTable::new(
            GW_IN_MAC,
            vec![Route { destination: ip("10.10.0.0"), prefix_len: 16, gateway: None }],
            vec![(ip("10.10.0.2"), CLIENT_MAC)],
        ),
        outside: InterfaceTable::new(
            GW_OUT_MAC,
            vec![
                Route { destination: ip("0.0.0.0"), prefix_len: 0, gateway: Some(ip("192.0.2.2")) },
                Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None },
            ],
            if with_ext_neighbour { vec![(ip("192.0.2.2"), EXT_MAC)] } else { vec![] },
        ),
        outside_from: Vec::new(),
    }
}

fn pipeline(table: NextHopTable) -> Pipeline {
    Pipeline::single(
        Arc::new(WorkerStats::default()),
        NextHops::fixed(table),
        Arc::new(allow_all()),
        &small_nat(),
    )
}

fn rule(group: GroupId, to: &str, proto: ProtoMatch, ports: &[(u16, u16)], action: PolicyAction) -> RuleSpec {
    let ports = ports.iter().map(|&(first, last)| PortRange { first, last }).collect();
    RuleSpec::new(group, vec![to.parse().unwrap()], proto, ports, action)
}

fn small_nat() -> NatConfig {
    NatConfig { max_flows: 4096, max_flows_per_source: 1024, ..NatConfig::default() }
}

/// One group holding every IPv4 source, allowed everywhere.
fn allow_all() -> SharedPolicy {
    let mut b = PolicyBuilder::new();
    let g = b.add_group("all", vec![EGRESS_IP]);
    b.add_source(g, "0.0.0.0/0".parse().unwrap());
    b.add_rule(rule(g, "0.0.0.0/0", ProtoMatch::Any, &[], PolicyAction::Allow));
    crate::policy::shared(b.build(1).unwrap())
}

/// 10.10.0.0/24: UDP 53 to 203.0.113.0/24 allowed, 203.0.113.128/25 denied by rule, TCP 443 to l7;
/// everything else default-denied. 10.10.9.0/24 is in no group.
fn lab_policy(dry_run: bool, generation: u64) -> PolicySnapshot {
    let mut b = PolicyBuilder::new();
    b.dry_run(dry_run);
    let g = b.add_group("web", vec![EGRESS_IP]);
    b.add_source(g, "10.10.0.0/24".parse().unwrap());
    b.add_rule(rule(g, "203.0.113.0/24", ProtoMatch::Udp, &[(53, 53)], PolicyAction::Allow));
    b.add_rule(rule(g, "203.0.113.128/25", ProtoMatch::Any, &[], PolicyAction::Deny));
    let mut l7 = rule(g, "198.51.100.0/24", ProtoMatch::Tcp, &[(443, 443)], PolicyAction::L7);
    l7.hosts = vec![crate::policy::HostPattern::parse("example.com").unwrap()];
    b.add_rule(l7);
    b.build(generation).unwrap()
}

fn tcp_frame(src: [u8; 4], dst: [u8; 4], dst_port: u16) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC)
        .ipv4(src, dst, 64)
        .tcp(40000, dst_port, 1, 1024)
        .syn();
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).unwrap();
    out
}

#[test]
fn policy_judges_packets_from_inside_and_counts_each_denial_under_its_reason() {
    let policy = Arc::new(crate::policy::shared(lab_policy(false, 1)));
    let stats = Arc::new(WorkerStats::default());
    let audit = Arc::new(AuditQueue::new(16));
    let mut p = Pipeline::single(stats.clone(), NextHops::fixed(lab_table(true)), policy, &small_nat())
        .with_audit(audit.clone());
    let mut send = |f: Vec<u8>| p.process(Instant::ZERO, Side::Inside, &mut f.clone());
    assert!(matches!(send(udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"q")), Action::Forward { .. }));
    assert_eq!(
        send(udp_frame([10, 10, 0, 2], [203, 0, 113, 200], 64, b"q")),
        Action::Drop(DropReason::PolicyDeny)
    );
    assert_eq!(send(tcp_frame([10, 10, 0, 2], [203, 0, 113, 10], 80)), Action::Drop(DropReason::DefaultDeny));
    assert_eq!(send(tcp_frame([10, 10, 9, 2], [203, 0, 113, 10], 53)), Action::Drop(DropReason::NoGroup));
    assert_eq!(
        send(tcp_frame([10, 10, 0, 2], [198, 51, 100, 7], 443)),
        Action::Drop(DropReason::L7Unavailable)
    );
    for reason in
        [DropReason::PolicyDeny, DropReason::DefaultDeny, DropReason::NoGroup, DropReason::L7Unavailable]
    {
        assert_eq!(stats.drops(reason), 1, "{reason:?}");
    }
    // Which rule decided: rule 0 (allow) once, rule 1 (deny) once, rule 2 (l7) once.
    let hits = stats.rule_hits.load();
    assert_eq!((hits.generation, hits.len()), (1, 3));
    assert_eq!((hits.get(0), hits.get(1), hits.get(2)), (1, 1, 1));
    assert_eq!(stats.flows_allowed.get(), 1);
    // One audit event per denial, in order, with the flow and the deciding rule.
    let events: Vec<AuditEvent> = std::iter::from_fn(|| audit.pop()).collect();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!((events[0].dst, events[0].rule), (ip("203.0.113.200"), Some(crate::policy::RuleId(1))));
    assert_eq!((events[1].dst_port, events[1].rule), (80, None));
    assert_eq!((events[2].src, events[2].group), (ip("10.10.9.2"), None));
}

#[test]
fn dry_run_forwards_what_it_would_deny_and_counts_it() {
    let policy = Arc::new(crate::policy::shared(lab_policy(true, 1)));
    let stats = Arc::new(WorkerStats::default());
    let mut p = Pipeline::single(stats.clone(), NextHops::fixed(lab_table(true)), policy, &small_nat());
    let mut f = tcp_frame([10, 10, 0, 2], [203, 0, 113, 10], 80);
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
    assert_eq!(stats.flows_dry_run_denied.get(), 1);
    assert_eq!(stats.drops(DropReason::DefaultDeny), 0);
}

#[test]
fn a_swapped_policy_takes_effect_at_the_next_batch() {
    let policy = Arc::new(crate::policy::shared(lab_policy(false, 1)));
    let mut p = Pipeline::single(
        Arc::new(WorkerStats::default()),
        NextHops::fixed(lab_table(true)),
        policy.clone(),
        &small_nat(),
    );
    let frame = tcp_frame([10, 10, 0, 2], [203, 0, 113, 10], 80);
    assert_eq!(
        p.process(Instant::ZERO, Side::Inside, &mut frame.clone()),
        Action::Drop(DropReason::DefaultDeny)
    );
    policy.store(Arc::new({
        let mut b = PolicyBuilder::new();
        let g = b.add_group("web", vec![EGRESS_IP]);
        b.add_source(g, "10.10.0.0/24".parse().unwrap());
        b.add_rule(rule(g, "203.0.113.0/24", ProtoMatch::Tcp, &[(80, 80)], PolicyAction::Allow));
        b.build(2).unwrap()
    }));
    // Within the batch the old snapshot holds; the next batch sees the new one.
    assert_eq!(
        p.process(Instant::ZERO, Side::Inside, &mut frame.clone()),
        Action::Drop(DropReason::DefaultDeny)
    );
    p.begin_batch();
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut frame.clone()), Action::Forward { .. }));
}

#[test]
fn udp_header_cut_short_inside_a_consistent_ip_packet_is_truncated() {
    let mut p = pipeline(lab_table(true));
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"");
    // Cut the packet inside the UDP header and fix the IPv4 total length and checksum to match.
    let cut = 14 + 20 + 3;
    f.truncate(cut);
    f[16..18].copy_from_slice(&(23u16).to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum::compute(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::Truncated));
}

fn udp_frame(src: [u8; 4], dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
    udp_frame_from_port(src, 4000, dst, ttl, payload)
}

fn udp_frame_from_port(src: [u8; 4], sport: u16, dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
    let builder =
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC).ipv4(src, dst, ttl).udp(sport, 53);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

fn ip_header_ok(frame: &[u8], ip_start: usize) -> bool {
    let ihl = usize::from(frame[ip_start] & 0xf) * 4;
    checksum::verify(&frame[ip_start..ip_start + ihl])
}

#[test]
fn forwards_udp_outward_with_ttl_decremented_and_macs_rewritten() {
    let mut p = pipeline(lab_table(true));
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"hello");
    let len = f.len();
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { out: Side::Outside, len });
    assert_eq!(&f[0..6], &EXT_MAC);
    assert_eq!(&f[6..12], &GW_OUT_MAC);
    assert_eq!(f[14 + 8], 63);
    assert!(ip_header_ok(&f, 14));
    // SNAT: the source is the group's egress IP, and the UDP checksum is still right.
    let headers = etherparse::PacketHeaders::from_ethernet_slice(&f).unwrap();
    let Some(etherparse::NetHeaders::Ipv4(ip4, _)) = &headers.net else { panic!("not IPv4") };
    assert_eq!(Ipv4Addr::from(ip4.source), EGRESS_IP);
    let Some(etherparse::TransportHeader::Udp(udp)) = &headers.transport else { panic!("not UDP") };
    assert_eq!(udp.checksum, udp.calc_checksum_ipv4(ip4, headers.payload.slice()).unwrap());
    assert_eq!(headers.payload.slice(), b"hello");
}

/// Sends one UDP datagram 10.10.0.2:4000 → 203.0.113.10:53 out; returns the egress port it was mapped to.
fn open_udp_flow(p: &mut Pipeline) -> u16 {
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"q");
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
    u16::from_be_bytes([f[34], f[35]])
}

#[test]
fn forwards_replies_inward_translated_back() {
    let mut p = pipeline(lab_table(true));
    let port = open_udp_flow(&mut p);
    let builder = etherparse::PacketBuilder::ethernet2(EXT_MAC, GW_OUT_MAC)
        .ipv4([203, 0, 113, 10], EGRESS_IP.octets(), 2)
        .udp(53, port);
    let mut f = Vec::new();
    builder.write(&mut f, b"x").unwrap();
    let len = f.len();
    assert_eq!(p.process(Instant::ZERO, Side::Outside, &mut f), Action::Forward { out: Side::Inside, len });
    assert_eq!(&f[0..6], &CLIENT_MAC);
    assert_eq!(&f[6..12], &GW_IN_MAC);
    assert_eq!(f[14 + 8], 1);
    assert!(ip_header_ok(&f, 14));
    assert_eq!(&f[30..34], &[10, 10, 0, 2]);
    assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
}

/// Two pipelines sharing one hand-off queue pair, as two workers do.
fn two_workers() -> (Pipeline, Pipeline) {
    let handoffs = Arc::new(Handoffs::new(2, 8));
    let policy = Arc::new(allow_all());
    let nat = NatConfig { workers: 2, ..small_nat() };
    let worker = |i| {
        let stats = Arc::new(WorkerStats::default());
        Pipeline::new(stats, NextHops::fixed(lab_table(true)), policy.clone(), &nat, i, handoffs.clone())
    };
    (worker(0), worker(1))
}

/// Finishes the next frame handed to `p`: its action and the frame as it would leave.
fn finish_handoff(p: &mut Pipeline) -> Option<(Action, Vec<u8>)> {
    let handoffs = p.handoffs().clone();
    let mut scratch = vec![0u8; crate::handoff::HANDOFF_JUMBO_BYTES];
    handoffs.pop_with(p.worker(), &mut scratch, |kind, frame| {
        (p.process_handoff(Instant::ZERO, kind, frame), frame.to_vec())
    })
}

/// A reply whose NAT port belongs to worker 0 arrives on worker 1's queue: worker 1 hands it over through the
/// bounded queue, worker 0 translates it and sends it inside.
#[test]
fn a_reply_on_another_workers_queue_is_handed_to_the_port_owner() {
    let (mut w0, mut w1) = two_workers();
    let port = open_udp_flow(&mut w0);
    assert_eq!(crate::nat::reply_owner(2, EGRESS_IP, 17, port), 0);
    let builder = etherparse::PacketBuilder::ethernet2(EXT_MAC, GW_OUT_MAC)
        .ipv4([203, 0, 113, 10], EGRESS_IP.octets(), 64)
        .udp(53, port);
    let mut reply = Vec::new();
    builder.write(&mut reply, b"answer").unwrap();
    assert_eq!(w1.process(Instant::ZERO, Side::Outside, &mut reply), Action::HandedOff);
    assert!(finish_handoff(&mut w1).is_none(), "nothing for worker 1");
    let (action, f) = finish_handoff(&mut w0).expect("worker 0 got the frame");
    assert_eq!(action, Action::Forward { out: Side::Inside, len: reply.len() });
    assert_eq!(&f[30..34], &[10, 10, 0, 2]);
    assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
    assert_eq!(&f[0..6], &CLIENT_MAC);
}

/// RFC 4787 REQ-1 with two workers: a packet from inside whose source port lies in worker 0's slice arrives on
/// worker 1's queue; worker 1 hands it over untouched, worker 0 maps it (original port kept) and sends it out.
/// The same endpoint's next flow, arriving at worker 0 directly, gets the same mapping.
#[test]
fn an_outbound_packet_on_another_workers_queue_is_handed_to_the_endpoint_owner() {
    let (mut w0, mut w1) = two_workers();
    let mut first = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"q");
    let sent = first.clone();
    assert_eq!(w1.process(Instant::ZERO, Side::Inside, &mut first), Action::HandedOff);
    assert_eq!(first, sent, "the handing worker changes nothing");
    assert_eq!(w1.nat().stats().mappings, 0, "and creates nothing");
    assert_eq!(w1.stats().handed_off.get(), 1);
    let (action, f) = finish_handoff(&mut w0).expect("worker 0 got the frame");
    assert_eq!(action, Action::Forward { out: Side::Outside, len: sent.len() });
    assert_eq!(&f[26..30], &EGRESS_IP.octets());
    assert_eq!(u16::from_be_bytes([f[34], f[35]]), 4000, "original port kept");
    assert_eq!(&f[0..6], &EXT_MAC);
    let mut second = udp_frame([10, 10, 0, 2], [198, 51, 100, 10], 64, b"q");
    assert!(matches!(w0.process(Instant::ZERO, Side::Inside, &mut second), Action::Forward { .. }));
    assert_eq!(&second[26..30], &EGRESS_IP.octets());
    assert_eq!(u16::from_be_bytes([second[34], second[35]]), 4000, "one mapping for both destinations");
    assert_eq!(w0.nat().stats().mappings, 1);
}

/// RFC 4787 REQ-9 through the pipeline: an inside host reaching another inside host's egress ip:port is
/// translated both ways and sent back inside.
#[test]
fn hairpinned_packets_go_back_inside_translated_both_ways() {
    let mut p = pipeline(lab_table(true));
    let port = open_udp_flow(&mut p);
    let mut f = udp_frame([10, 10, 0, 3], EGRESS_IP.octets(), 64, b"hairpin");
    // The frame is UDP 4000 → 53 by construction; aim it at the first flow's mapping.
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[40..42].copy_from_slice(&[0, 0]); // UDP checksum 0: none
    let len = f.len();
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { out: Side::Inside, len });
    assert_eq!(&f[26..30], &EGRESS_IP.octets(), "source translated to the egress IP");
    assert_eq!(&f[30..34], &[10, 10, 0, 2], "destination translated to the mapped inside host");
    assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4000);
    assert!(ip_header_ok(&f, 14));
}

#[test]
fn unsolicited_traffic_from_outside_is_dropped() {
    let mut p = pipeline(lab_table(true));
    let mut to_inside = udp_frame([203, 0, 113, 10], [10, 10, 0, 2], 64, b"x");
    assert_eq!(
        p.process(Instant::ZERO, Side::Outside, &mut to_inside),
        Action::Drop(DropReason::NotForEgressIp)
    );
    open_udp_flow(&mut p);
    let mut to_unmapped = udp_frame([203, 0, 113, 10], EGRESS_IP.octets(), 64, b"x");
    assert_eq!(
        p.process(Instant::ZERO, Side::Outside, &mut to_unmapped),
        Action::Drop(DropReason::NoMapping)
    );
}

#[test]
fn padding_past_the_ip_total_length_is_trimmed_not_rejected() {
    let mut p = pipeline(lab_table(true));
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"");
    let unpadded = f.len();
    f.resize(60, 0);
    assert_eq!(
        p.process(Instant::ZERO, Side::Inside, &mut f),
        Action::Forward { out: Side::Outside, len: unpadded }
    );
}

/// Reverse-path validation on the inside: a source the inside interface has no route to is spoofed, dropped
/// before it takes any NAT state; off, it is judged like any other.
#[test]
fn spoofed_inside_sources_are_dropped_before_the_nat() {
    let mut p = pipeline(lab_table(true));
    for src in [[10, 99, 9, 9], [192, 0, 2, 10], [203, 0, 113, 10]] {
        let mut f = udp_frame(src, [203, 0, 113, 10], 64, b"spoofed");
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::SourceNotInside));
    }
    assert_eq!(p.nat().stats().flows(), 0);
    let mut real = udp_frame([10, 10, 7, 7], [203, 0, 113, 10], 64, b"ok");
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut real), Action::Forward { .. }));
    let mut off = pipeline(lab_table(true)).with_source_validation(false);
    let mut f = udp_frame([10, 99, 9, 9], [203, 0, 113, 10], 64, b"spoofed");
    assert!(matches!(off.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
}

// --- MTU: ICMP 3/4 (RFC 1191) and MSS clamping ---

/// lab_table with MTUs: inside 3000, outside 1500, and the inside address known.
fn mtu_table() -> NextHopTable {
    let mut t = lab_table(true);
    t.inside = t.inside.with_mtu(3000).with_address(Some(GW_IN_IP));
    t.outside = t.outside.with_mtu(1500);
    t
}

/// A packet larger than the MTU of the interface it would leave by is dropped (`mtu_exceeded`), takes no NAT
/// state, and its sender gets ICMP 3/4 with that MTU, quoting the packet as it was sent.
#[test]
fn rfc1191_too_big_packets_are_answered_with_fragmentation_needed() {
    let mut p = pipeline(mtu_table());
    let mut big = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, &[1u8; 1600]);
    big[20] |= 0x40; // DF
    big[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::compute(&big[14..34]);
    big[24..26].copy_from_slice(&c.to_be_bytes());
    let sent = big.clone();
    let Action::Reply { out: Side::Inside, len } = p.process(Instant::ZERO, Side::Inside, &mut big) else {
        panic!("expected ICMP 3/4")
    };
    let r = &p.reply_frame()[..len];
    assert_eq!(&r[0..6], &CLIENT_MAC);
    assert_eq!((&r[26..30], &r[30..34]), (&GW_IN_IP.octets()[..], &[10, 10, 0, 2][..]));
    assert_eq!((r[34], r[35]), (3, 4));
    assert_eq!(u16::from_be_bytes([r[40], r[41]]), 1500, "the next-hop MTU");
    assert_eq!(&r[42..62], &sent[14..34], "quotes the packet as its sender sent it");
    assert!(checksum::verify(&r[34..]));
    assert_eq!(p.stats().drops(DropReason::MtuExceeded), 1);
    assert_eq!(p.nat().stats().flows(), 0);
    // A packet that fits leaves; from outside, a packet too big for the inside MTU is answered outward.
    let mut fits = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, &[1u8; 1400]);
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut fits), Action::Forward { .. }));
    let mut inbound = udp_frame([203, 0, 113, 10], EGRESS_IP.octets(), 64, &[2u8; 3100]);
    inbound[0..12].copy_from_slice(&[GW_OUT_MAC, EXT_MAC].concat());
    assert!(matches!(
        p.process(Instant::ZERO, Side::Outside, &mut inbound),
        Action::Reply { out: Side::Outside, .. }
    ));
    assert_eq!(p.stats().drops(DropReason::MtuExceeded), 2);
}

/// `clamp_mss`: a SYN's MSS above the smaller MTU less 40 is lowered, its checksum kept valid; smaller ones and
/// other segments are untouched; off, nothing changes.
#[test]
fn mss_clamping_lowers_syn_mss_to_fit_the_smaller_mtu() {
    let syn = |mss: u16, flags: &str| {
        let mut b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC)
            .ipv4([10, 10, 0, 2], [203, 0, 113, 10], 64)
            .tcp(40000, 443, 1, 1024)
            .options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(mss),
                etherparse::TcpOptionElement::Noop,
            ])
            .unwrap();
        for f in flags.chars() {
            b = if f == 'S' { b.syn() } else { b.ack(1) };
        }
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    };
    let mss_of = |f: &[u8]| u16::from_be_bytes([f[54 + 2], f[54 + 3]]);
    let tcp_ok = |f: &[u8]| {
        let tcp = &f[34..];
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        checksum::finish(checksum::sum(tcp, checksum::sum(&pseudo, 0))) == 0
    };
    let mut p = pipeline(mtu_table()).with_mss_clamp(true);
    let mut big = syn(8960, "S");
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut big), Action::Forward { .. }));
    assert_eq!(mss_of(&big), 1460);
    assert!(tcp_ok(&big));
    let mut off = pipeline(mtu_table());
    let mut unclamped = syn(8960, "S");
    assert!(matches!(off.process(Instant::ZERO, Side::Inside, &mut unclamped), Action::Forward { .. }));
    assert_eq!(mss_of(&unclamped), 8960, "off by default");
    let mut fine = syn(1200, "S");
    let mut q = pipeline(mtu_table()).with_mss_clamp(true);
    assert!(matches!(q.process(Instant::ZERO, Side::Inside, &mut fine), Action::Forward { .. }));
    assert_eq!(mss_of(&fine), 1200);
    assert!(tcp_ok(&fine));
}

// --- RFC 4787 REQ-14: fragments ---

/// The fragments of one UDP datagram from `src:sport` to `dst:53` with `payload`, split after `first_len`
/// payload bytes (a multiple of 8, counted after the 8-byte UDP header), IP id 0x4242, arriving on `side`.
fn udp_fragments(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    payload: &[u8],
    first_len: usize,
    side: Side,
) -> (Vec<u8>, Vec<u8>) {
    let (dst_mac, src_mac) =
        if side == Side::Inside { (GW_IN_MAC, CLIENT_MAC) } else { (GW_OUT_MAC, EXT_MAC) };
    let mut whole = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(sport, 53)
        .write(&mut whole, payload)
        .unwrap();
    let udp = &whole[34..];
    let split = 8 + first_len;
    let frag = |data: &[u8], offset: usize, more: bool| {
        let mut f = whole[..34].to_vec();
        f.extend_from_slice(data);
        f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&0x4242u16.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&flags.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    (frag(&udp[..split], 0, true), frag(&udp[split..], split, false))
}

/// Reassembles translated fragments (in IP offset order) and checks the UDP checksum of the whole datagram:
/// the first fragment's incremental update must cover every fragment.
fn reassembled_udp_checksum_ok(first: &[u8], second: &[u8]) -> bool {
    let mut udp = first[34..].to_vec();
    udp.extend_from_slice(&second[34..]);
    let mut pseudo = first[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    checksum::finish(checksum::sum(&udp, checksum::sum(&pseudo, 0))) == 0
}

/// A fragmented UDP datagram both ways, fragments in order and out of order: every fragment gets the first
/// one's address rewrite, the payload is untouched, and the reassembled datagram's checksum holds.
#[test]
fn rfc4787_req14_fragmented_datagrams_are_translated_both_ways() {
    let mut p = pipeline(lab_table(true));
    let payload: Vec<u8> = (0..200u8).collect();
    let (mut first, mut second) =
        udp_fragments([10, 10, 0, 2], 4000, [203, 0, 113, 10], &payload, 96, Side::Inside);
    let lens = (first.len(), second.len());
    assert_eq!(
        p.process(Instant::ZERO, Side::Inside, &mut first),
        Action::Forward { out: Side::Outside, len: lens.0 }
    );
    assert_eq!(
        p.process(Instant::ZERO, Side::Inside, &mut second),
        Action::Forward { out: Side::Outside, len: lens.1 }
    );
    for f in [&first, &second] {
        assert_eq!(&f[26..30], &EGRESS_IP.octets(), "every fragment leaves from the egress IP");
        assert_eq!(&f[0..6], &EXT_MAC);
        assert!(ip_header_ok(f, 14));
    }
    assert_eq!(&second[34..], &payload[96..], "a later fragment's payload is untouched");
    assert!(reassembled_udp_checksum_ok(&first, &second));
    let port = u16::from_be_bytes([first[34], first[35]]);

    // The answer, fragmented, its second fragment first: it waits, then follows its first.
    let (mut first, mut second) =
        udp_fragments([203, 0, 113, 10], 53, EGRESS_IP.octets(), &payload, 64, Side::Outside);
    first[36..38].copy_from_slice(&port.to_be_bytes());
    // (The destination port changed: recompute the UDP checksum over the whole datagram.)
    first[40..42].copy_from_slice(&[0, 0]);
    let mut udp = first[34..].to_vec();
    udp.extend_from_slice(&second[34..]);
    let mut pseudo = first[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    let c = checksum::finish(checksum::sum(&udp, checksum::sum(&pseudo, 0)));
    first[40..42].copy_from_slice(&c.to_be_bytes());
    assert_eq!(p.process(Instant(1), Side::Outside, &mut second), Action::Held);
    assert!(matches!(
        p.process(Instant(2), Side::Outside, &mut first),
        Action::Forward { out: Side::Inside, .. }
    ));
    let mut released = Vec::new();
    p.release_held(Instant(3), |out, f| released.push((out, f.to_vec())));
    assert_eq!(released.len(), 1);
    let (out, second) = &released[0];
    assert_eq!(*out, Side::Inside);
    assert_eq!(&second[30..34], &[10, 10, 0, 2]);
    assert_eq!(&second[0..6], &CLIENT_MAC);
    assert!(ip_header_ok(second, 14));
    assert!(reassembled_udp_checksum_ok(&first, second));
    assert_eq!(u16::from_be_bytes([first[36], first[37]]), 4000);
    assert!(!p.has_held());
}

/// Hostile fragments: a later fragment whose first never comes waits a second and is dropped
/// (`fragment_unmatched`), at most HOLD_FRAGMENTS wait at once, and a flood of first fragments fills the
/// table and then drops (`fragment_table_full`), leaving memory and other datagrams alone.
#[test]
fn fragments_without_a_first_and_floods_of_first_fragments_are_bounded() {
    let mut p = pipeline(lab_table(true));
    let payload = [7u8; 64];
    for i in 0..(HOLD_FRAGMENTS + 3) {
        let (_, mut second) =
            udp_fragments([10, 10, 0, 2], 4000 + i as u16, [203, 0, 113, 10], &payload, 32, Side::Inside);
        second[18..20].copy_from_slice(&(i as u16).to_be_bytes());
        second[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&second[14..34]);
        second[24..26].copy_from_slice(&c.to_be_bytes());
        let expected =
            if i < HOLD_FRAGMENTS { Action::Held } else { Action::Drop(DropReason::FragmentUnmatched) };
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut second), expected);
    }
    p.release_held(Instant(HOLD_FRAGMENT_NANOS), |_, _| panic!("no first fragment came"));
    assert_eq!(p.stats().drops(DropReason::FragmentUnmatched) as usize, HOLD_FRAGMENTS + 3);
    assert!(!p.has_held());
    assert_eq!(p.nat().stats().flows(), 0, "later fragments create no NAT state");

    let mut forwarded = 0;
    for id in 0..(2 * crate::fragments::FRAGMENT_TABLE_SLOTS as u16) {
        let (mut first, _) =
            udp_fragments([10, 10, 0, 2], 5000, [203, 0, 113, 10], &payload, 32, Side::Inside);
        first[18..20].copy_from_slice(&id.to_be_bytes());
        first[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&first[14..34]);
        first[24..26].copy_from_slice(&c.to_be_bytes());
        match p.process(Instant::ZERO, Side::Inside, &mut first) {
            Action::Forward { .. } => forwarded += 1,
            Action::Drop(DropReason::FragmentTableFull) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(forwarded <= crate::fragments::FRAGMENT_TABLE_SLOTS && forwarded > 0);
    assert!(p.stats().drops(DropReason::FragmentTableFull) > 0);
}

/// Two workers: the first fragment goes to the worker that owns the flow, and the later fragments that
/// arrive at the other worker follow it there.
#[test]
fn later_fragments_follow_their_first_to_the_owning_worker() {
    let (mut w0, mut w1) = two_workers();
    let payload = [9u8; 100];
    // Source port 40000 belongs to worker 1; both fragments arrive at worker 0.
    let (mut first, mut second) =
        udp_fragments([10, 10, 0, 2], 40000, [203, 0, 113, 10], &payload, 48, Side::Inside);
    assert_eq!(w0.process(Instant::ZERO, Side::Inside, &mut first), Action::HandedOff);
    assert_eq!(w0.process(Instant::ZERO, Side::Inside, &mut second), Action::HandedOff);
    let (a, first) = finish_handoff(&mut w1).expect("the first fragment");
    let (b, second) = finish_handoff(&mut w1).expect("the second fragment");
    assert!(matches!(
        (a, b),
        (Action::Forward { out: Side::Outside, .. }, Action::Forward { out: Side::Outside, .. })
    ));
    assert_eq!((&first[26..30], &second[26..30]), (&EGRESS_IP.octets()[..], &EGRESS_IP.octets()[..]));
    assert_eq!(u16::from_be_bytes([first[34], first[35]]), 40000);
    assert!(reassembled_udp_checksum_ok(&first, &second));
}

/// VLAN hopping: a tagged frame is dropped under `vlan_tagged` from either side, never forwarded with the tag
/// its sender chose (one tag, two tags, 802.1ad).
#[test]
fn vlan_tagged_frames_are_refused_from_both_sides() {
    let mut p = pipeline(lab_table(true));
    let plain = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"v");
    let tagged = |tags: &[[u8; 4]]| {
        let mut f = plain[..12].to_vec();
        for tag in tags {
            f.extend_from_slice(tag);
        }
        f.extend_from_slice(&plain[12..]);
        f
    };
    let q = [0x81, 0x00, 0x00, 0x07];
    let ad = [0x88, 0xa8, 0x00, 0x07];
    for tags in [&[q][..], &[q, q], &[ad], &[ad, q]] {
        for side in [Side::Inside, Side::Outside] {
            let mut f = tagged(tags);
            assert_eq!(p.process(Instant::ZERO, side, &mut f), Action::Drop(DropReason::VlanTagged));
        }
    }
    assert_eq!(p.stats().drops(DropReason::VlanTagged), 8);
    let mut untagged = plain.clone();
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut untagged), Action::Forward { .. }));
}

/// Each hostile variation of a valid frame, and the reason it must be dropped under.
#[test]
fn hostile_frames_are_dropped_under_their_reason() {
    let good = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"payload!");
    let fix_checksum = |f: &mut Vec<u8>| {
        f[24] = 0;
        f[25] = 0;
        let ihl = usize::from(f[14] & 0xf) * 4;
        let end = (14 + ihl).min(f.len());
        let c = checksum::compute(&f[14..end]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    };
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation, DropReason)> = vec![
        ("truncated ethernet", Box::new(|f| f.truncate(13)), DropReason::Truncated),
        ("truncated ip", Box::new(|f| f.truncate(14 + 19)), DropReason::Truncated),
        ("arp", Box::new(|f| f[12..14].copy_from_slice(&[0x08, 0x06])), DropReason::NotIp),
        ("ipv6", Box::new(|f| f[12..14].copy_from_slice(&[0x86, 0xdd])), DropReason::Ipv6Unsupported),
        ("version 6 in ipv4", Box::new(|f| f[14] = 0x65), DropReason::IpVersionMismatch),
        ("ihl 4", Box::new(|f| f[14] = 0x44), DropReason::BadIpHeader),
        ("ihl beyond frame", Box::new(|f| f[14] = 0x4f), DropReason::BadIpHeader),
        (
            "total length beyond frame",
            Box::new(|f| {
                f[16..18].copy_from_slice(&1000u16.to_be_bytes());
            }),
            DropReason::BadIpLength,
        ),
        (
            "total length below header",
            Box::new(|f| {
                f[16..18].copy_from_slice(&19u16.to_be_bytes());
            }),
            DropReason::BadIpLength,
        ),
        ("bad checksum", Box::new(|f| f[24] ^= 0xff), DropReason::BadIpChecksum),
        // A first fragment too short for its UDP header.
        (
            "tiny first fragment",
            Box::new(|f| {
                f[20] |= 0x20;
                f[16..18].copy_from_slice(&24u16.to_be_bytes())
            }),
            DropReason::Truncated,
        ),
        ("ttl 1", Box::new(|f| f[22] = 1), DropReason::TtlExceeded),
        ("ttl 0", Box::new(|f| f[22] = 0), DropReason::TtlExceeded),
        ("no route", Box::new(|f| f[30..34].copy_from_slice(&[10, 99, 0, 1])), DropReason::NoRoute),
    ];
    for (name, mutate, reason) in cases {
        // "no route": gw has no default route outside, and 10.99.0.1 is not on-link.
        let mut table = lab_table(true);
        if name == "no route" {
            table.outside = InterfaceTable::new(
                GW_OUT_MAC,
                vec![Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None }],
                vec![],
            );
        }
        let mut p = pipeline(table);
        let mut f = good.clone();
        mutate(&mut f);
        // Mutations of covered header fields get a valid checksum, so the intended check is what fails.
        if name != "bad checksum"
            && f.len() >= 34
            && (f[14] & 0xf) >= 5
            && 14 + usize::from(f[14] & 0xf) * 4 <= f.len()
        {
            fix_checksum(&mut f);
        }
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(reason), "{name}");
        assert_eq!(p.stats().drops(reason), 1, "{name}");
    }
}

/// A new flow that cannot leave takes no NAT session or port: no route out of the outside interface, or an
/// unresolved next hop when the hold queue is full. Neither counts as an allowed flow.
#[test]
fn flows_that_cannot_leave_take_no_nat_state_and_are_not_counted_as_allowed() {
    let mut table = lab_table(true);
    table.outside = InterfaceTable::new(
        GW_OUT_MAC,
        vec![Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None }],
        vec![],
    );
    let mut p = pipeline(table);
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"nowhere");
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::NoRoute));
    // On-link destinations with no neighbour: the first HOLD_FRAMES wait (and map), the rest are refused.
    for i in 0..HOLD_FRAMES + 4 {
        let mut f = udp_frame([10, 10, 0, 2], [192, 0, 2, 100 + i as u8], 64, b"unresolved");
        let action = p.process(Instant::ZERO, Side::Inside, &mut f);
        let expected = if i < HOLD_FRAMES { Action::Held } else { Action::Drop(DropReason::NoNeighbour) };
        assert_eq!(action, expected, "destination {i}");
    }
    assert_eq!(p.nat().stats().flows() as usize, HOLD_FRAMES, "only the held frames took sessions");
    assert_eq!(p.stats().flows_allowed.get(), 0, "a waiting frame has not left");
    assert_eq!(p.stats().drops(DropReason::NoRoute), 1);
    assert_eq!(p.stats().drops(DropReason::NoNeighbour), 4);
    // Unresolved after the hold time: dropped, and still not counted as allowed.
    p.release_held(Instant(HOLD_NANOS), |_, _| panic!("nothing resolved"));
    assert_eq!(p.stats().drops(DropReason::NoNeighbour) as usize, 4 + HOLD_FRAMES);
    assert_eq!(p.stats().flows_allowed.get(), 0);
}

/// Out of ports: the policy allowed the flow, but it is refused, so it counts as `out_of_ports`, not as an
/// allowed flow or a hit of its rule.
#[test]
fn a_flow_refused_after_the_policy_allowed_it_is_not_counted_as_allowed() {
    let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
    let allowed = p.stats().flows_allowed.get();
    let hits = p.stats().rule_hits.load().get(0);
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"refused");
    assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Reply { .. }));
    assert_eq!(p.stats().flows_allowed.get(), allowed);
    assert_eq!(p.stats().rule_hits.load().get(0), hits);
    assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1);
}

#[test]
fn frames_wait_for_an_unknown_neighbour_then_leave_or_time_out() {
    let hops = NextHops::fixed(lab_table(false));
    let resolve = hops.resolve.clone();
    let stats = Arc::new(WorkerStats::default());
    let mut p = Pipeline::single(stats.clone(), hops.clone(), Arc::new(allow_all()), &small_nat());
    let frame = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"wait");
    for i in 0..(HOLD_FRAMES as u64 + 2) {
        let mut f = frame.clone();
        let expect =
            if i < HOLD_FRAMES as u64 { Action::Held } else { Action::Drop(DropReason::NoNeighbour) };
        assert_eq!(p.process(Instant(i), Side::Inside, &mut f), expect, "frame {i}");
    }
    // One resolution request per interval, not one per frame.
    assert_eq!(resolve.drain().collect::<Vec<_>>(), vec![ip("192.0.2.2")]);
    assert_eq!(stats.drops(DropReason::NoNeighbour), 2);

    // Not resolved yet: nothing leaves.
    let mut sent = Vec::new();
    p.release_held(Instant(1000), |out, f| sent.push((out, f.to_vec())));
    assert!(sent.is_empty());

    // The control thread learns the neighbour: the held frames leave, routed and rewritten, in order.
    hops.table.store(Arc::new(lab_table(true)));
    p.begin_batch();
    assert_eq!(stats.flows_allowed.get(), 0, "nothing has left yet");
    p.release_held(Instant(2000), |out, f| sent.push((out, f.to_vec())));
    assert_eq!(sent.len(), HOLD_FRAMES);
    // The flow's first packet left: it counts as allowed now, once.
    assert_eq!(stats.flows_allowed.get(), 1);
    for (out, f) in &sent {
        assert_eq!(*out, Side::Outside);
        assert_eq!((&f[0..6], &f[6..12], f[14 + 8]), (&EXT_MAC[..], &GW_OUT_MAC[..], 63));
        assert!(ip_header_ok(f, 14));
    }
    assert!(!p.has_held());

    // A neighbour that never resolves: the frame is dropped after the hold time.
    hops.table.store(Arc::new(lab_table(false)));
    p.begin_batch();
    let mut f = frame.clone();
    assert_eq!(p.process(Instant(3000), Side::Inside, &mut f), Action::Held);
    p.release_held(Instant(3000 + HOLD_NANOS - 1), |_, _| panic!("not yet"));
    assert!(p.has_held());
    p.release_held(Instant(3000 + HOLD_NANOS), |_, _| panic!("never resolved"));
    assert!(!p.has_held());
    assert_eq!(stats.drops(DropReason::NoNeighbour), 3);
}

/// A UDP frame with `options` (a multiple of 4 bytes) in its IPv4 header, checksum right.
fn with_ip_options(options: &[u8]) -> Vec<u8> {
    let f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"opt");
    let mut with_opt = f[..34].to_vec();
    with_opt.extend_from_slice(options);
    with_opt.extend_from_slice(&f[34..]);
    with_opt[14] = 0x45 + (options.len() / 4) as u8;
    let total = u16::from_be_bytes([with_opt[16], with_opt[17]]) + options.len() as u16;
    with_opt[16..18].copy_from_slice(&total.to_be_bytes());
    with_opt[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::compute(&with_opt[14..34 + options.len()]);
    with_opt[24..26].copy_from_slice(&c.to_be_bytes());
    with_opt
}

#[test]
fn ip_options_are_forwarded() {
    // NOPs + EOL, and a record-route option.
    for options in [&[1, 1, 1, 0][..], &[7, 7, 4, 0, 0, 0, 0, 0]] {
        let mut f = with_ip_options(options);
        let len = f.len();
        let mut p = pipeline(lab_table(true));
        assert_eq!(
            p.process(Instant::ZERO, Side::Inside, &mut f),
            Action::Forward { out: Side::Outside, len }
        );
        assert!(ip_header_ok(&f, 14));
    }
}

/// RFC 7126: loose and strict source routes are never forwarded; malformed options are bad headers.
#[test]
fn source_routed_and_malformed_options_are_dropped() {
    let mut p = pipeline(lab_table(true));
    let lsrr = [1, 0x83, 7, 4, 192, 0, 2, 99];
    let ssrr = [0x89, 7, 4, 192, 0, 2, 99, 0];
    for options in [&lsrr[..], &ssrr] {
        for side in [Side::Inside, Side::Outside] {
            let mut f = with_ip_options(options);
            assert_eq!(p.process(Instant::ZERO, side, &mut f), Action::Drop(DropReason::SourceRoute));
        }
    }
    assert_eq!(p.stats().drops(DropReason::SourceRoute), 4);
    for options in [&[7, 9, 4, 0][..], &[7, 1, 0, 0], &[1, 1, 1, 7]] {
        let mut f = with_ip_options(options);
        assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::BadIpHeader));
    }
}

// --- out of ports → drop, count `out_of_ports`, optionally ICMP 3/13 ---

const GW_IN_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);

fn icmp_on(per_sec: u32, burst: u32) -> IcmpErrors {
    IcmpErrors { on_out_of_ports: true, per_sec, burst }
}

/// Hand-off rings of a 64-worker gateway, built once: the out-of-ports pipelines (one per proptest case) hand
/// nothing over that a test looks at, and 4096 rings per case would dominate the test's time.
fn sixty_four_workers_handoffs() -> Arc<Handoffs> {
    static HANDOFFS: std::sync::OnceLock<Arc<Handoffs>> = std::sync::OnceLock::new();
    HANDOFFS.get_or_init(|| Arc::new(Handoffs::new(64, 8))).clone()
}

/// Worker 2 of 64 (1008 high UDP ports on the egress IP, 3040–4047, owner of the test frames' source port
/// 4000) with every UDP port held by 10.10.0.9.
fn out_of_udp_ports(icmp: IcmpErrors, inside_addr: Option<Ipv4Addr>) -> Pipeline {
    let nat = NatConfig {
        workers: 64,
        max_flows: 4096,
        max_flows_per_source: 4096,
        icmp_errors: icmp,
        ..NatConfig::default()
    };
    let mut table = lab_table(true);
    table.inside = table.inside.with_address(inside_addr);
    let mut p = Pipeline::new(
        Arc::new(WorkerStats::default()),
        NextHops::fixed(table),
        Arc::new(allow_all()),
        &nat,
        2,
        sixty_four_workers_handoffs(),
    );
    for i in 0..1008 {
        let mut f = udp_frame_from_port([10, 10, 0, 9], 3040 + i, [203, 0, 113, 10], 64, b"fill");
        let action = p.process(Instant::ZERO, Side::Inside, &mut f);
        assert!(matches!(action, Action::Forward { .. }), "flow {i}: {action:?}");
    }
    assert_eq!(p.stats().drops(DropReason::OutOfPorts), 0);
    p
}

/// Parses an ICMP error frame and checks what every 3/13 must be; returns (IP source, IP destination,
/// quoted bytes).
fn parse_admin_prohibited(r: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    let h = etherparse::PacketHeaders::from_ethernet_slice(r).expect("the reply parses");
    let Some(etherparse::NetHeaders::Ipv4(ip4, _)) = &h.net else { panic!("not IPv4") };
    assert_eq!(ip4.header_checksum, ip4.calc_header_checksum(), "IP header checksum");
    assert_eq!(ip4.time_to_live, 64);
    assert!(!ip4.dont_fragment && !ip4.more_fragments);
    assert_eq!(usize::from(ip4.total_len), 20 + 8 + h.payload.slice().len(), "IP total length");
    let Some(etherparse::TransportHeader::Icmpv4(icmp)) = &h.transport else { panic!("not ICMP") };
    assert_eq!(
        icmp.icmp_type,
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
        ),
        "type 3 code 13"
    );
    let mut recomputed = icmp.clone();
    recomputed.update_checksum(h.payload.slice());
    assert_eq!(recomputed.checksum, icmp.checksum, "ICMP checksum");
    (Ipv4Addr::from(ip4.source), Ipv4Addr::from(ip4.destination), h.payload.slice().to_vec())
}

#[test]
fn out_of_ports_with_icmp_on_drops_counts_and_answers_3_13_from_the_inside_address() {
    let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
    let original = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"new flow");
    let mut f = original.clone();
    let Action::Reply { out, len } = p.process(Instant::ZERO, Side::Inside, &mut f) else {
        panic!("expected a reply")
    };
    assert_eq!(out, Side::Inside);
    assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1, "still dropped and counted");
    assert_eq!(p.stats().icmp_errors_sent.get(), 1);
    let r = p.reply_frame()[..len].to_vec();
    assert_eq!(&r[0..6], &CLIENT_MAC, "back to the client's MAC");
    assert_eq!(&r[6..12], &GW_IN_MAC, "from the inside interface's MAC");
    assert_eq!(&r[12..14], &[0x08, 0x00]);
    let (src, dst, quoted) = parse_admin_prohibited(&r);
    assert_eq!(src, GW_IN_IP, "RFC 1812 4.3.2.4: an address of the interface the error leaves by");
    assert_eq!(dst, ip("10.10.0.2"));
    // The whole original datagram (it is short), as received: header and the first 8 bytes at least.
    assert_eq!(quoted, &original[14..]);
    assert_eq!(f, original, "the refused frame is not rewritten");
}

#[test]
fn without_an_inside_address_the_error_comes_from_the_original_destination() {
    let mut p = out_of_udp_ports(icmp_on(1000, 50), None);
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"new flow");
    let Action::Reply { len, .. } = p.process(Instant::ZERO, Side::Inside, &mut f) else {
        panic!("expected a reply")
    };
    let (src, dst, _) = parse_admin_prohibited(&p.reply_frame()[..len]);
    assert_eq!((src, dst), (ip("203.0.113.10"), ip("10.10.0.2")));
}

#[test]
fn out_of_ports_with_icmp_off_is_a_silent_counted_drop() {
    let mut p = out_of_udp_ports(IcmpErrors::default(), Some(GW_IN_IP));
    let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"new flow");
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::OutOfPorts));
    assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1);
    assert_eq!(p.stats().icmp_errors_sent.get(), 0);
    assert_eq!(p.stats().icmp_errors_rate_limited.get(), 0);
}

/// RFC 1122 3.2.2 / RFC 1812 4.3.2.7 through the pipeline: no error about an ICMP error, a non-first
/// fragment, or a packet from a multicast source (the writer's own tests cover each rule).
#[test]
fn packets_that_must_not_be_answered_get_no_reply_when_out_of_ports() {
    // (Source validation off: the multicast source must reach the ICMP writer's own check.)
    let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP)).with_source_validation(false);
    let mut multicast_src = udp_frame([224, 0, 0, 5], [203, 0, 113, 10], 64, b"m");
    assert_eq!(
        p.process(Instant::ZERO, Side::Inside, &mut multicast_src),
        Action::Drop(DropReason::OutOfPorts)
    );
    let mut fragment = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"frag");
    fragment[20..22].copy_from_slice(&1u16.to_be_bytes());
    fragment[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::compute(&fragment[14..34]);
    fragment[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut fragment), Action::Held, "waits for its first");
    // An ICMP error from inside quoting nothing the NAT knows.
    let mut quoted = udp_frame([203, 0, 113, 10], [10, 10, 0, 2], 64, b"q");
    // Quoting the inside port 4000, so that this worker owns the quoted flow's endpoint.
    quoted[36..38].copy_from_slice(&4000u16.to_be_bytes());
    let mut icmp_error = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GW_IN_MAC)
        .ipv4([10, 10, 0, 2], [203, 0, 113, 10], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut icmp_error, &quoted[14..])
        .unwrap();
    let action = p.process(Instant::ZERO, Side::Inside, &mut icmp_error);
    assert!(matches!(action, Action::Drop(_)), "{action:?}");
    assert_eq!(p.stats().icmp_errors_sent.get(), 0);
    assert_eq!(p.stats().icmp_errors_rate_limited.get(), 0, "refused before the rate limit");
}

#[test]
fn icmp_errors_are_rate_limited_per_worker_and_refill_with_time() {
    let mut p = out_of_udp_ports(icmp_on(10, 3), Some(GW_IN_IP));
    let send = |p: &mut Pipeline, at: u64, sport: u16| {
        let mut f = udp_frame_from_port([10, 10, 0, 2], sport, [203, 0, 113, 10], 64, b"fill");
        matches!(p.process(Instant(at), Side::Inside, &mut f), Action::Reply { .. })
    };
    // Source ports in this worker's slice (3040–4047): it owns these endpoints and refuses them itself.
    let answered: Vec<bool> = (0..5).map(|i| send(&mut p, 0, 3500 + i)).collect();
    assert_eq!(answered, [true, true, true, false, false], "burst of 3");
    assert_eq!(p.stats().icmp_errors_rate_limited.get(), 2);
    assert!(!send(&mut p, 99_999_999, 3600), "10/s: not before 100 ms");
    assert!(send(&mut p, 100_000_000, 3601), "one token after 100 ms");
    assert!(!send(&mut p, 100_000_000, 3602));
    assert_eq!(p.stats().icmp_errors_sent.get(), 4);
    assert_eq!(p.stats().drops(DropReason::OutOfPorts), 8, "every refused packet is counted");
}

#[test]
fn a_vlan_tagged_frame_is_dropped_not_answered_when_out_of_ports() {
    let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
    let plain = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, b"tagged");
    let mut f = plain[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00, 0x20, 0x07]); // PCP 1, VID 7
    f.extend_from_slice(&plain[12..]);
    assert_eq!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Drop(DropReason::VlanTagged));
    assert_eq!(p.stats().icmp_errors_sent.get(), 0);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(mut f in proptest::collection::vec(any::<u8>(), 0..200), inside in any::<bool>()) {
        let mut p = pipeline(lab_table(true));
        let side = if inside { Side::Inside } else { Side::Outside };
        let n = f.len();
        if let Action::Forward { len, .. } = p.process(Instant::ZERO, side, &mut f) {
            prop_assert!(len <= n);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic_and_forward_only_valid_headers(
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        flips in proptest::collection::vec((0usize..120, any::<u8>()), 0..6),
        cut in 0usize..130,
        inside in any::<bool>(),
    ) {
        let (src, dst) = if inside { ([10, 10, 0, 2], [203, 0, 113, 10]) } else { ([203, 0, 113, 10], [10, 10, 0, 2]) };
        let mut f = udp_frame(src, dst, 64, &payload);
        for (at, x) in flips {
            if let Some(b) = f.get_mut(at) { *b ^= x; }
        }
        f.truncate(cut.max(1));
        let mut p = pipeline(lab_table(true));
        let side = if inside { Side::Inside } else { Side::Outside };
        let n = f.len();
        match p.process(Instant::ZERO, side, &mut f) {
            Action::Forward { len, out } => {
                prop_assert!(len <= n);
                prop_assert_eq!(out, side.other());
                let l3 = ipv4::parse_frame(&f[..len]).expect("forwarded frame still parses");
                prop_assert_eq!(l3.ip_end, len);
            }
            Action::Drop(reason) => prop_assert_eq!(p.stats().drops(reason), 1),
            Action::HandedOff => prop_assert!(false, "a lone worker never hands off"),
            Action::Held => prop_assert!(false, "every neighbour is known"),
            Action::Punted => prop_assert!(false, "no L7 path in this pipeline"),
            Action::Reply { .. } => prop_assert!(false, "ICMP errors are off by default"),
        }
    }

    /// Out of ports with ICMP errors on: mutated frames never panic, and every reply is a well-formed 3/13.
    #[test]
    fn mutated_frames_out_of_ports_get_only_well_formed_replies(
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        flips in proptest::collection::vec((0usize..60, any::<u8>()), 0..4),
        cut in 0usize..130,
    ) {
        let mut p = out_of_udp_ports(icmp_on(1000, 50), Some(GW_IN_IP));
        let mut f = udp_frame([10, 10, 0, 2], [203, 0, 113, 10], 64, &payload);
        for (at, x) in flips {
            if let Some(b) = f.get_mut(at) { *b ^= x; }
        }
        f.truncate(cut.max(1));
        if let Action::Reply { out, len } = p.process(Instant::ZERO, Side::Inside, &mut f) {
            prop_assert_eq!(out, Side::Inside);
            prop_assert!(len <= crate::icmp::MAX_REPLY_FRAME);
            let r = &p.reply_frame()[..len];
            let l3 = ipv4::parse_frame(r).expect("the reply parses");
            prop_assert_eq!(l3.ip_end, len);
            prop_assert_eq!(r[l3.ip_start + 9], 1);
            prop_assert!(checksum::verify(&r[l3.ip_start + l3.header_len..]), "ICMP checksum");
            prop_assert_eq!(&r[l3.ip_start + 20..l3.ip_start + 22], &[3, 13]);
            prop_assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1);
        }
    }
}
