//! NAT tests, one per behaviour listed in the module docs (named after the RFC requirement), on real IPv4
//! packets built with etherparse, with every checksum verified by a full recomputation. Time is virtual.

use super::*;
use crate::policy::{Action, PolicyBuilder, Prefix, ProtoMatch, RuleSpec};
use etherparse::PacketBuilder;
use proptest::prelude::*;
use std::net::SocketAddrV4;

type A = [u8; 4];
const C1: A = [10, 0, 0, 1];
const C2: A = [10, 0, 0, 2];
const SRV: A = [203, 0, 113, 5];
const SRV2: A = [198, 51, 100, 7];
const DENIED: A = [203, 0, 113, 66];
const EG: A = [192, 0, 2, 10];
const EG2: A = [192, 0, 2, 11];

fn ip(a: A) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn rule(g: crate::policy::GroupId, to: &str, action: Action) -> RuleSpec {
    RuleSpec::new(g, vec![p(to)], ProtoMatch::Any, vec![], action)
}

/// 10.0.0.0/8 may reach everything but 203.0.113.66 (denied); egress IPs as given. 172.16.0.0/12 has no egress IP.
fn policy_with(generation: u64, egress: &[A], deny_denied: bool) -> PolicySnapshot {
    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", egress.iter().map(|a| ip(*a)).collect());
    b.add_source(g, p("10.0.0.0/8"));
    if deny_denied {
        b.add_rule(rule(g, "203.0.113.66/32", Action::Deny));
    }
    b.add_rule(rule(g, "0.0.0.0/0", Action::Allow));
    let h = b.add_group("no-egress", vec![]);
    b.add_source(h, p("172.16.0.0/12"));
    b.add_rule(rule(h, "0.0.0.0/0", Action::Allow));
    b.build(generation).unwrap()
}

fn policy() -> PolicySnapshot {
    policy_with(1, &[EG], true)
}

fn cfg() -> NatConfig {
    NatConfig { max_flows: 1024, ..NatConfig::default() }
}

fn t(s: u64) -> Instant {
    Instant::from_secs(s)
}

fn udp(src: A, sport: u16, dst: A, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut v, b"hello, world!").unwrap();
    v
}

/// TCP segment; `flags` letters: S F R A (A uses `ack`). Segments carry 4 bytes of data, SYNs none.
fn tcp(src: A, sport: u16, dst: A, dport: u16, seq: u32, ack: u32, flags: &str) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 64000);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'F' => b.fin(),
            'R' => b.rst(),
            'A' => b.ack(ack),
            _ => b,
        };
    }
    let mut v = Vec::new();
    b.write(&mut v, if flags.contains('S') { b"" } else { b"data" }).unwrap();
    v
}

fn echo(src: A, dst: A, id: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64);
    let b = if reply { b.icmpv4_echo_reply(id, 1) } else { b.icmpv4_echo_request(id, 1) };
    let mut v = Vec::new();
    b.write(&mut v, b"ping").unwrap();
    v
}

/// An IPv4 packet with `payload` (header checksum set).
fn ipv4(src: A, dst: A, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    let len = (20 + payload.len()) as u16;
    v[2..4].copy_from_slice(&len.to_be_bytes());
    let c = checksum::compute(&v);
    v[10..12].copy_from_slice(&c.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// ICMP error `ty`/`code` from `src` to `dst` quoting the first `quote_len` bytes of `quoted`.
fn icmp_error(src: A, dst: A, ty: u8, code: u8, quoted: &[u8], quote_len: usize) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[..quote_len.min(quoted.len())]);
    let c = checksum::compute(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, &icmp)
}

fn src_of(pkt: &[u8]) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(read_u32(pkt, 12)), if pkt[9] == 1 { read_u16(pkt, 24) } else { read_u16(pkt, 20) })
}

fn dst_of(pkt: &[u8]) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(read_u32(pkt, 16)), if pkt[9] == 1 { read_u16(pkt, 24) } else { read_u16(pkt, 22) })
}

/// Full recomputation of the IPv4 header checksum and the L4 checksum (TCP/UDP with pseudo header; UDP 0 means
/// none; ICMP over the whole message).
fn checksums_ok(pkt: &[u8]) -> bool {
    // What leaves is what the total length says (the NAT may shorten a packet: an inside ICMP error's quote).
    let pkt = &pkt[..usize::from(read_u16(pkt, 2)).min(pkt.len())];
    let ihl = usize::from(pkt[0] & 0xf) * 4;
    if !checksum::verify(&pkt[..ihl]) {
        return false;
    }
    let l4 = &pkt[ihl..];
    match pkt[9] {
        6 | 17 => {
            if pkt[9] == 17 && read_u16(l4, 6) == 0 {
                return true;
            }
            let mut ph = Vec::new();
            ph.extend_from_slice(&pkt[12..20]);
            ph.extend_from_slice(&[0, pkt[9]]);
            ph.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            checksum::finish(checksum::sum(l4, checksum::sum(&ph, 0))) == 0
        }
        _ => checksum::verify(l4),
    }
}

fn out(nat: &mut Nat, now: u64, pkt: &mut [u8], pol: &PolicySnapshot) -> Result<Outbound, DropReason> {
    let r = nat.outbound(t(now), pkt, pol);
    if r.is_ok() && r != Ok(Outbound::L7) {
        assert!(checksums_ok(pkt), "bad checksum after outbound {r:?}");
    }
    r
}

fn inb(nat: &mut Nat, now: u64, pkt: &mut [u8]) -> Result<Inbound, DropReason> {
    let r = nat.inbound(t(now), pkt);
    if r == Ok(Inbound::Forward) {
        assert!(checksums_ok(pkt), "bad checksum after inbound");
    }
    r
}

/// Sends an outbound UDP packet and returns its translated source.
fn udp_out(
    nat: &mut Nat,
    now: u64,
    src: A,
    sport: u16,
    dst: A,
    dport: u16,
    pol: &PolicySnapshot,
) -> (Ipv4Addr, u16) {
    let mut pk = udp(src, sport, dst, dport);
    assert_eq!(out(nat, now, &mut pk, pol), Ok(Outbound::Forward));
    src_of(&pk)
}

// ---------------------------------------------------------------------------------------------------------------
// Mapping
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn rfc4787_req1_endpoint_independent_mapping() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let a = udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    let b = udp_out(&mut nat, 1, C1, 40000, SRV2, 123, &pol);
    let c = udp_out(&mut nat, 2, C1, 40000, SRV, 54, &pol);
    assert_eq!(a, (ip(EG), 40000), "original port first");
    assert_eq!((a, a), (b, c));
    assert_eq!(nat.stats().mappings, 1);
    assert_eq!(nat.stats().udp, 3);
}

#[test]
fn rfc5382_req1_endpoint_independent_mapping_tcp_and_icmp_ids() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut s1 = tcp(C1, 50000, SRV, 443, 1, 0, "S");
    let mut s2 = tcp(C1, 50000, SRV2, 80, 1, 0, "S");
    assert_eq!(out(&mut nat, 0, &mut s1, &pol), Ok(Outbound::Forward));
    assert_eq!(out(&mut nat, 0, &mut s2, &pol), Ok(Outbound::Forward));
    assert_eq!(src_of(&s1), src_of(&s2));
    let mut e1 = echo(C1, SRV, 7, false);
    let mut e2 = echo(C1, SRV2, 7, false);
    assert_eq!(out(&mut nat, 0, &mut e1, &pol), Ok(Outbound::Forward));
    assert_eq!(out(&mut nat, 0, &mut e2, &pol), Ok(Outbound::Forward));
    assert_eq!(src_of(&e1), src_of(&e2));
    assert_eq!(src_of(&e1).0, ip(EG));
    // The echo reply comes back to the inside identifier.
    let ext_id = src_of(&e1).1;
    let mut r = echo(SRV, EG, ext_id, true);
    assert_eq!(inb(&mut nat, 1, &mut r), Ok(Inbound::Forward));
    assert_eq!(dst_of(&r), (ip(C1), 7));
    assert_eq!(nat.stats().icmp, 2);
}

#[test]
fn rfc4787_req2_paired_pooling() {
    let pol = policy_with(1, &[EG, EG2, [192, 0, 2, 12]], true);
    let mut nat = Nat::new(&cfg(), 0);
    for host in 1..=20u8 {
        let src = [10, 0, 1, host];
        let want = pol.egress_ip_for(pol.group_of(ip(src).into()).unwrap(), ip(src)).unwrap();
        for port in [1000u16, 20000, 30001] {
            let (e, _) = udp_out(&mut nat, 0, src, port, SRV, 53, &pol);
            assert_eq!(e, want);
        }
        let mut s = tcp(src, 40000, SRV2, 443, 9, 0, "S");
        out(&mut nat, 0, &mut s, &pol).unwrap();
        assert_eq!(src_of(&s).0, want);
    }
}

#[test]
fn rfc4787_req3_no_port_overloading_contention_keeps_one_port_for_all_destinations() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let a = udp_out(&mut nat, 0, C1, 5000, SRV, 53, &pol);
    assert_eq!(a.1, 5000);
    // C2 wants the same port: it gets another one, the same for every destination (unlike Linux's per-destination
    // choice).
    let b1 = udp_out(&mut nat, 0, C2, 5000, SRV, 53, &pol);
    let b2 = udp_out(&mut nat, 0, C2, 5000, SRV2, 53, &pol);
    assert_ne!(b1, a);
    assert_eq!(b1, b2);
    assert!(b1.1 >= 1024);
    // Replies go to the right host.
    let mut r = udp(SRV, 53, EG, b1.1);
    assert_eq!(inb(&mut nat, 1, &mut r), Ok(Inbound::Forward));
    assert_eq!(dst_of(&r), (ip(C2), 5000));
    let mut r = udp(SRV, 53, EG, 5000);
    assert_eq!(inb(&mut nat, 1, &mut r), Ok(Inbound::Forward));
    assert_eq!(dst_of(&r), (ip(C1), 5000));
    // TCP port 5000 is a different space from UDP port 5000.
    let mut s = tcp(C2, 5000, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut s, &pol).unwrap();
    assert_eq!(src_of(&s).1, 5000);
}

#[test]
fn rfc4787_req3a_privileged_ports_stay_privileged() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let a = udp_out(&mut nat, 0, C1, 123, SRV, 123, &pol);
    let b = udp_out(&mut nat, 0, C2, 123, SRV, 123, &pol);
    assert_eq!(a.1, 123);
    assert_ne!(b.1, 123);
    assert!((1..1024).contains(&b.1), "{b:?}");
    let c = udp_out(&mut nat, 0, C2, 40000, SRV, 123, &pol);
    assert!(c.1 >= 1024);
}

#[test]
fn several_first_packets_of_one_flow_in_one_batch_get_one_mapping() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut batch: Vec<Vec<u8>> = (0..4).map(|_| tcp(C1, 40000, SRV, 443, 100, 0, "S")).collect();
    batch.extend((0..4).map(|_| udp(C1, 40001, SRV, 53)));
    for pk in &mut batch {
        assert_eq!(out(&mut nat, 0, pk, &pol), Ok(Outbound::Forward));
    }
    assert!(batch[..4].iter().all(|p| src_of(p) == src_of(&batch[0])));
    assert!(batch[4..].iter().all(|p| src_of(p) == src_of(&batch[4])));
    let s = nat.stats();
    assert_eq!((s.mappings, s.tcp_syn_sent, s.udp), (2, 1, 1));
}

// ---------------------------------------------------------------------------------------------------------------
// Filtering
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn rfc5382_req4_unsolicited_inbound_creates_nothing() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    let before = nat.stats();
    for mut pk in [
        udp(SRV, 53, EG, 40001),
        tcp(SRV, 443, EG, 40000, 1, 0, "S"),
        tcp(SRV, 443, EG, 40000, 1, 5, "A"),
        echo(SRV, EG, 40000, true),
        udp(SRV2, 53, EG, 40000),
    ] {
        assert_eq!(inb(&mut nat, 1, &mut pk), Err(DropReason::NoMapping));
    }
    // Inbound echo requests to an egress IP are not answered or forwarded.
    assert_eq!(inb(&mut nat, 1, &mut echo(SRV, EG, 1, false)), Err(DropReason::NoMapping));
    // Not an egress IP at all.
    assert_eq!(inb(&mut nat, 1, &mut udp(SRV, 53, SRV2, 40000)), Err(DropReason::NotForEgressIp));
    assert_eq!(nat.stats(), before);
}

#[test]
fn rfc4787_req8_address_dependent_filtering_for_udp() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let (_, ext) = udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    // Same remote address, other port: accepted (address-dependent), creates a session.
    let mut r = udp(SRV, 5353, EG, ext);
    assert_eq!(inb(&mut nat, 1, &mut r), Ok(Inbound::Forward));
    assert_eq!(dst_of(&r), (ip(C1), 40000));
    assert_eq!(nat.stats().udp, 2);
    // The inside host answers: judged by the policy now (allowed), translated with the same mapping.
    assert_eq!(udp_out(&mut nat, 2, C1, 40000, SRV, 5353, &pol), (ip(EG), ext));
    // Other remote address: dropped.
    assert_eq!(inb(&mut nat, 1, &mut udp(SRV2, 53, EG, ext)), Err(DropReason::NoMapping));
    // TCP is filtered per address and port: a SYN from another port of the same server is dropped.
    let mut s = tcp(C1, 41000, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut s, &pol).unwrap();
    let mut syn = tcp(SRV, 444, EG, src_of(&s).1, 9, 0, "S");
    assert_eq!(inb(&mut nat, 1, &mut syn), Err(DropReason::NoMapping));
}

#[test]
fn address_dependent_sibling_is_judged_on_its_first_outbound_packet() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    // A mapping towards the denied server cannot exist, so use a policy where a specific port is denied.
    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", vec![ip(EG)]);
    b.add_source(g, p("10.0.0.0/8"));
    let mut deny = rule(g, "203.0.113.0/24", Action::Deny);
    deny.proto = ProtoMatch::Udp;
    deny.ports = vec![crate::policy::PortRange { first: 9999, last: 9999 }];
    b.add_rule(deny);
    b.add_rule(rule(g, "0.0.0.0/0", Action::Allow));
    let pol2 = b.build(1).unwrap();
    let (_, ext) = udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol2);
    assert_eq!(inb(&mut nat, 1, &mut udp(SRV, 9999, EG, ext)), Ok(Inbound::Forward));
    let mut reply = udp(C1, 40000, SRV, 9999);
    assert_eq!(out(&mut nat, 2, &mut reply, &pol2), Err(DropReason::PolicyDeny));
    assert_eq!(nat.stats().udp, 1, "the unjudged session was removed");
    let _ = pol;
}

// ---------------------------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn policy_denies_create_nothing_and_l7_and_missing_egress_ip_are_reported() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut pk = udp(C1, 40000, DENIED, 53);
    let orig = pk.clone();
    assert_eq!(out(&mut nat, 0, &mut pk, &pol), Err(DropReason::PolicyDeny));
    assert_eq!(pk, orig, "nothing leaves untranslated, nothing is half-rewritten");
    assert_eq!(out(&mut nat, 0, &mut udp([192, 168, 0, 1], 1, SRV, 53), &pol), Err(DropReason::NoGroup));
    assert_eq!(out(&mut nat, 0, &mut udp([172, 16, 0, 1], 1, SRV, 53), &pol), Err(DropReason::NoEgressIp));
    assert_eq!(nat.stats().flows(), 0);

    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", vec![ip(EG)]);
    b.add_source(g, p("10.0.0.0/8"));
    b.add_rule(rule(g, "0.0.0.0/0", Action::L7));
    let l7 = b.build(1).unwrap();
    let mut pk = tcp(C1, 40000, SRV, 443, 1, 0, "S");
    let orig = pk.clone();
    assert_eq!(out(&mut nat, 0, &mut pk, &l7), Ok(Outbound::L7));
    assert_eq!(pk, orig);
    // Later segments of the flow go to the L7 path too.
    assert_eq!(out(&mut nat, 0, &mut tcp(C1, 40000, SRV, 443, 2, 1, "A"), &l7), Ok(Outbound::L7));
    assert_eq!(nat.stats().flows(), 0);
}

#[test]
fn dry_run_denials_forward_and_are_reported_on_the_first_packet() {
    let mut b = PolicyBuilder::new();
    b.dry_run(true);
    let g = b.add_group("apps", vec![ip(EG)]);
    b.add_source(g, p("10.0.0.0/8"));
    let pol = b.build(1).unwrap();
    let mut nat = Nat::new(&cfg(), 0);
    let mut pk = udp(C1, 40000, SRV, 53);
    assert_eq!(out(&mut nat, 0, &mut pk, &pol), Ok(Outbound::DryRunDenied));
    assert_eq!(src_of(&pk).0, ip(EG));
    assert_eq!(out(&mut nat, 0, &mut udp(C1, 40000, SRV, 53), &pol), Ok(Outbound::Forward));
}

#[test]
fn reload_keeps_flows_and_rechecks_a_flow_whose_rule_was_removed() {
    let allow_all = policy_with(1, &[EG], false);
    let mut nat = Nat::new(&cfg(), 0);
    udp_out(&mut nat, 0, C1, 40000, DENIED, 53, &allow_all);
    udp_out(&mut nat, 0, C1, 40001, SRV, 53, &allow_all);
    let mut syn = tcp(C1, 40002, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut syn, &allow_all).unwrap();
    // Reload: the rule allowing DENIED is replaced by a deny.
    let reloaded = policy_with(2, &[EG], true);
    assert_eq!(udp_out(&mut nat, 1, C1, 40001, SRV, 53, &reloaded).1, 40001, "still allowed: kept");
    let mut pk = udp(C1, 40000, DENIED, 53);
    assert_eq!(out(&mut nat, 1, &mut pk, &reloaded), Err(DropReason::PolicyDeny));
    assert_eq!(nat.stats().udp, 1, "the denied flow's session is gone");
    // Its replies are no longer accepted.
    assert_eq!(inb(&mut nat, 1, &mut udp(DENIED, 53, EG, 40000)), Err(DropReason::NoMapping));
    // The TCP flow goes on under the new generation.
    let mut ack = tcp(C1, 40002, SRV, 443, 2, 1, "A");
    assert_eq!(out(&mut nat, 1, &mut ack, &reloaded), Ok(Outbound::Forward));
}

#[test]
fn reload_that_removes_an_egress_ip_moves_its_flows_and_adding_one_keeps_them() {
    let one = policy_with(1, &[EG], true);
    let mut nat = Nat::new(&cfg(), 0);
    udp_out(&mut nat, 0, C1, 40000, SRV, 53, &one);
    udp_out(&mut nat, 0, C1, 40000, SRV2, 53, &one);
    // An IP is added: running flows keep theirs (even if paired pooling would now pick the other).
    let two = policy_with(2, &[EG, EG2], true);
    assert_eq!(udp_out(&mut nat, 1, C1, 40000, SRV, 53, &two).0, ip(EG));
    // EG is removed: its flows stop on their next packet; the next new flow gets a fresh mapping on EG2, while the
    // retired mapping's port stays held by its last session until that goes.
    let moved = policy_with(3, &[EG2], true);
    assert_eq!(out(&mut nat, 2, &mut udp(C1, 40000, SRV, 53), &moved), Err(DropReason::NoEgressIp));
    let (e, _) = udp_out(&mut nat, 2, C1, 40000, [198, 51, 100, 99], 53, &moved);
    assert_eq!(e, ip(EG2));
    assert_eq!(nat.stats().mappings, 2);
    assert_eq!(out(&mut nat, 2, &mut udp(C1, 40000, SRV2, 53), &moved), Err(DropReason::NoEgressIp));
    assert_eq!(nat.stats().mappings, 1);
    assert_eq!(nat.stats().egress_ports()[0], EgressPorts { ip: ip(EG), tcp: 0, udp: 0, icmp: 0 });
    // The new mapping serves every destination again.
    assert_eq!(udp_out(&mut nat, 3, C1, 40000, SRV2, 53, &moved).0, ip(EG2));
}

/// An egress IP taken away and given back before a flow's next packet: the flow never stopped, so it goes on from
/// its old port, which its retired mapping held all along, beside the endpoint's new mapping.
#[test]
fn a_flow_whose_egress_ip_comes_back_before_its_next_packet_goes_on_from_its_old_port() {
    let one = policy_with(1, &[EG], true);
    let mut nat = Nat::new(&cfg(), 0);
    let mut syn = tcp(C1, 40000, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut syn, &one).unwrap();
    assert_eq!(src_of(&syn), (ip(EG), 40000));
    inb(&mut nat, 0, &mut tcp(SRV, 443, EG, 40000, 100, 2, "SA")).unwrap();
    // EG goes: a new flow of the endpoint retires its mapping and maps it afresh on EG2.
    let moved = policy_with(2, &[EG2], true);
    let mut syn2 = tcp(C1, 40000, SRV2, 443, 1, 0, "S");
    out(&mut nat, 1, &mut syn2, &moved).unwrap();
    assert_eq!(src_of(&syn2), (ip(EG2), 40000));
    assert_eq!(nat.stats().mappings, 2, "the retired mapping still holds EG:40000");
    // EG comes back before the first flow says anything: it goes on from EG:40000, and replies reach it.
    let back = policy_with(3, &[EG, EG2], true);
    let mut ack = tcp(C1, 40000, SRV, 443, 2, 101, "A");
    assert_eq!(out(&mut nat, 2, &mut ack, &back), Ok(Outbound::Forward));
    assert_eq!(src_of(&ack), (ip(EG), 40000));
    let mut reply = tcp(SRV, 443, EG, 40000, 101, 6, "A");
    assert_eq!(inb(&mut nat, 2, &mut reply), Ok(Inbound::Forward));
    assert_eq!(dst_of(&reply), (ip(C1), 40000));
    // New flows of the endpoint use its live mapping on EG2.
    let mut syn3 = tcp(C1, 40000, [198, 51, 100, 99], 443, 1, 0, "S");
    out(&mut nat, 2, &mut syn3, &back).unwrap();
    assert_eq!(src_of(&syn3), (ip(EG2), 40000));
}

// ---------------------------------------------------------------------------------------------------------------
// Timers (virtual clock)
// ---------------------------------------------------------------------------------------------------------------

fn expire_all(nat: &mut Nat, now: u64) -> usize {
    nat.poll_expiry(t(now), usize::MAX)
}

#[test]
fn rfc4787_req5_udp_timeout_5_min_default_refreshed_by_outbound() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    assert_eq!(expire_all(&mut nat, 299), 0);
    udp_out(&mut nat, 200, C1, 40000, SRV, 53, &pol); // refresh
    assert_eq!(expire_all(&mut nat, 499), 0);
    // Inbound datagrams refresh too (RFC 4787 REQ-6 allows it); but not past the outbound-refreshed deadline here.
    assert_eq!(expire_all(&mut nat, 500), 1);
    assert_eq!(nat.stats().mappings, 0);
    assert_eq!(inb(&mut nat, 501, &mut udp(SRV, 53, EG, 40000)), Err(DropReason::NoMapping));
}

#[test]
fn rfc4787_req5_udp_timeout_2_min_minimum_is_honoured_when_configured() {
    let pol = policy();
    let c = NatConfig { timeouts: Timeouts { udp_secs: 120, ..Timeouts::default() }, ..cfg() };
    let mut nat = Nat::new(&c, 0);
    udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    assert_eq!(expire_all(&mut nat, 119), 0);
    assert_eq!(expire_all(&mut nat, 120), 1);
}

/// Opens C1:40000 → SRV:443 through the three-way handshake; returns the external port.
fn handshake(nat: &mut Nat, now: u64, pol: &PolicySnapshot) -> u16 {
    let mut syn = tcp(C1, 40000, SRV, 443, 1000, 0, "S");
    assert_eq!(out(nat, now, &mut syn, pol), Ok(Outbound::Forward));
    let ext = src_of(&syn).1;
    let mut synack = tcp(SRV, 443, EG, ext, 5000, 1001, "SA");
    assert_eq!(inb(nat, now, &mut synack), Ok(Inbound::Forward));
    let mut ack = tcp(C1, 40000, SRV, 443, 1001, 5001, "A");
    assert_eq!(out(nat, now, &mut ack, pol), Ok(Outbound::Forward));
    assert_eq!(nat.stats().tcp_established, 1);
    ext
}

#[test]
fn rfc5382_req5_tcp_established_2h_4min() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    handshake(&mut nat, 0, &pol);
    assert_eq!(expire_all(&mut nat, 7439), 0);
    assert_eq!(expire_all(&mut nat, 7440), 1);
    assert_eq!(nat.stats().flows(), 0);
}

#[test]
fn rfc5382_req5_tcp_transitory_4_min_handshake_and_fin_both_ways() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    // A SYN nobody answers: transitory.
    out(&mut nat, 0, &mut tcp(C2, 1, SRV, 443, 1, 0, "S"), &pol).unwrap();
    assert_eq!(nat.stats().tcp_syn_sent, 1);
    assert_eq!(expire_all(&mut nat, 239), 0);
    assert_eq!(expire_all(&mut nat, 240), 1);
    // FIN both ways: transitory, 4 min.
    let ext = handshake(&mut nat, 1000, &pol);
    out(&mut nat, 1000, &mut tcp(C1, 40000, SRV, 443, 1001, 5001, "FA"), &pol).unwrap();
    assert_eq!(nat.stats().tcp_established, 1, "half close stays established");
    inb(&mut nat, 1000, &mut tcp(SRV, 443, EG, ext, 5001, 1006, "FA")).unwrap();
    assert_eq!(nat.stats().tcp_transitory, 1);
    assert_eq!(expire_all(&mut nat, 1239), 0);
    assert_eq!(expire_all(&mut nat, 1240), 1);
}

#[test]
fn rfc5508_req2_icmp_query_timeout_60s() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    out(&mut nat, 0, &mut echo(C1, SRV, 9, false), &pol).unwrap();
    assert_eq!(expire_all(&mut nat, 59), 0);
    assert_eq!(expire_all(&mut nat, 60), 1);
}

#[test]
fn expiry_respects_the_budget() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    for port in 0..100 {
        udp_out(&mut nat, 0, C1, 20000 + port, SRV, 53, &pol);
    }
    assert_eq!(nat.poll_expiry(t(300), 30), 30);
    assert_eq!(nat.poll_expiry(t(300), 100), 70);
    assert_eq!(nat.stats().flows(), 0);
}

// ---------------------------------------------------------------------------------------------------------------
// TCP state
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn rfc5382_invalid_flags_and_non_syn_first_packets_create_no_state() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    for flags in ["SF", "SR", "", "SRA", "SFA"] {
        assert_eq!(
            out(&mut nat, 0, &mut tcp(C1, 40000, SRV, 443, 1, 0, flags), &pol),
            Err(DropReason::InvalidTcpFlags),
            "{flags}"
        );
    }
    for flags in ["A", "F", "FA", "R", "RA", "SA"] {
        assert_eq!(
            out(&mut nat, 0, &mut tcp(C1, 40000, SRV, 443, 1, 0, flags), &pol),
            Err(DropReason::TcpNotSyn),
            "{flags}"
        );
    }
    assert_eq!(nat.stats().flows(), 0);
}

#[test]
fn rfc5382_syn_retransmits_reuse_the_mapping() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut a = tcp(C1, 40000, SRV, 443, 1, 0, "S");
    let mut b = tcp(C1, 40000, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut a, &pol).unwrap();
    out(&mut nat, 3, &mut b, &pol).unwrap();
    assert_eq!(a, b);
    assert_eq!(nat.stats().tcp_syn_sent, 1);
}

#[test]
fn rfc5382_req2_simultaneous_open() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut syn = tcp(C1, 40000, SRV, 443, 1000, 0, "S");
    out(&mut nat, 0, &mut syn, &pol).unwrap();
    let ext = src_of(&syn).1;
    // The server's own SYN crosses ours.
    assert_eq!(inb(&mut nat, 0, &mut tcp(SRV, 443, EG, ext, 5000, 0, "S")), Ok(Inbound::Forward));
    out(&mut nat, 0, &mut tcp(C1, 40000, SRV, 443, 1000, 5001, "SA"), &pol).unwrap();
    inb(&mut nat, 0, &mut tcp(SRV, 443, EG, ext, 5000, 1001, "SA")).unwrap();
    out(&mut nat, 0, &mut tcp(C1, 40000, SRV, 443, 1001, 5001, "A"), &pol).unwrap();
    assert_eq!(nat.stats().tcp_established, 1);
}

#[test]
fn rfc5382_valid_rst_is_translated_and_kept_4_min_out_of_window_rst_is_ignored() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let ext = handshake(&mut nat, 0, &pol);
    // Far outside the window: ignored, state kept.
    let mut bad = tcp(SRV, 443, EG, ext, 5001u32.wrapping_add(0x4000_0000), 0, "R");
    assert_eq!(inb(&mut nat, 10, &mut bad), Err(DropReason::TcpRstOutOfWindow));
    assert_eq!(nat.stats().tcp_established, 1);
    // In window: translated, transitory for 4 min from now.
    let mut rst = tcp(SRV, 443, EG, ext, 5001, 0, "R");
    assert_eq!(inb(&mut nat, 100, &mut rst), Ok(Inbound::Forward));
    assert_eq!(dst_of(&rst), (ip(C1), 40000));
    assert_eq!(nat.stats().tcp_transitory, 1);
    assert_eq!(expire_all(&mut nat, 339), 0);
    assert_eq!(expire_all(&mut nat, 340), 1);
}

/// RFC 5961 §3 / Linux conntrack window tracking: a blind attacker who knows the 4-tuple but not the sequence
/// numbers can neither move the state (an ACK half the sequence space away used to advance it) nor end the flow
/// (an RST up to a window behind or ahead used to be accepted). Only an RST at exactly the sequence its receiver
/// expects ends it.
#[test]
fn rfc5961_blind_segments_neither_move_the_state_nor_reset_the_flow() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let ext = handshake(&mut nat, 0, &pol);
    // The server has sent 5001 so far; the client's last ACK says it expects 5001. Spoofing the server:
    let blind = [
        (5001u32.wrapping_add(0x8000_0000), "A", DropReason::TcpOutOfWindow),
        (5001u32.wrapping_add(0x8000_0000), "R", DropReason::TcpRstOutOfWindow),
        (5001 + 200_000, "A", DropReason::TcpOutOfWindow), // beyond the client's 64 000-byte window
        (5001 - 1000, "R", DropReason::TcpRstOutOfWindow), // behind: in the old window, not exact
        (5001 + 1000, "R", DropReason::TcpRstOutOfWindow), // ahead: in the window, not exact
        (5001 + 1000, "RA", DropReason::TcpRstOutOfWindow),
    ];
    for (seq, flags, reason) in blind {
        let mut pk = tcp(SRV, 443, EG, ext, seq, 1005, flags);
        let sent = pk.clone();
        assert_eq!(inb(&mut nat, 1, &mut pk), Err(reason), "seq {seq} {flags}");
        assert_eq!(pk, sent);
    }
    // A SYN with another initial sequence number, and an ACK for data the client never sent.
    assert_eq!(
        inb(&mut nat, 1, &mut tcp(SRV, 443, EG, ext, 777, 1001, "SA")),
        Err(DropReason::TcpOutOfWindow)
    );
    assert_eq!(
        inb(&mut nat, 1, &mut tcp(SRV, 443, EG, ext, 5001, 90_000, "A")),
        Err(DropReason::TcpOutOfWindow)
    );
    assert_eq!(nat.stats().tcp_established, 1);
    // The connection still works both ways: in-window data, and a retransmission of old data.
    assert_eq!(inb(&mut nat, 2, &mut tcp(SRV, 443, EG, ext, 5001, 1005, "A")), Ok(Inbound::Forward));
    assert_eq!(out(&mut nat, 2, &mut tcp(C1, 40000, SRV, 443, 1005, 5005, "A"), &pol), Ok(Outbound::Forward));
    assert_eq!(inb(&mut nat, 2, &mut tcp(SRV, 443, EG, ext, 5001, 1009, "A")), Ok(Inbound::Forward));
    // An RST exactly at the client's last ACK (5005) is the server's own: accepted, the flow turns transitory.
    let mut rst = tcp(SRV, 443, EG, ext, 5005, 0, "R");
    assert_eq!(inb(&mut nat, 3, &mut rst), Ok(Inbound::Forward));
    assert_eq!(dst_of(&rst), (ip(C1), 40000));
    assert_eq!(nat.stats().tcp_transitory, 1);
}

/// The handshake cannot be taken over blind: a SYN+ACK that does not acknowledge the client's SYN, or a bare ACK
/// before the server's SYN, is dropped, and the real SYN+ACK still completes it.
#[test]
fn a_blind_syn_ack_or_early_ack_does_not_take_the_handshake_over() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut syn = tcp(C1, 40000, SRV, 443, 1000, 0, "S");
    out(&mut nat, 0, &mut syn, &pol).unwrap();
    let ext = src_of(&syn).1;
    assert_eq!(
        inb(&mut nat, 0, &mut tcp(SRV, 443, EG, ext, 9, 77_777, "SA")),
        Err(DropReason::TcpOutOfWindow)
    );
    assert_eq!(inb(&mut nat, 0, &mut tcp(SRV, 443, EG, ext, 9, 1001, "A")), Err(DropReason::TcpOutOfWindow));
    assert_eq!(inb(&mut nat, 0, &mut tcp(SRV, 443, EG, ext, 5000, 1001, "SA")), Ok(Inbound::Forward));
    assert_eq!(out(&mut nat, 0, &mut tcp(C1, 40000, SRV, 443, 1001, 5001, "A"), &pol), Ok(Outbound::Forward));
    assert_eq!(nat.stats().tcp_established, 1);
}

/// RFC 7323: with window scaling on both sides the window is the advertised value shifted by the sender's scale;
/// the SYN's own window is not scaled.
#[test]
fn scaled_windows_bound_the_segments_that_pass() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let seg = |src: A, sport: u16, dst: A, dport: u16, seq: u32, ack: Option<u32>, syn: bool, window: u16| {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, window);
        if syn {
            b = b.syn().options(&[etherparse::TcpOptionElement::WindowScale(7)]).unwrap();
        }
        if let Some(ack) = ack {
            b = b.ack(ack);
        }
        let mut v = Vec::new();
        b.write(&mut v, if syn { b"" } else { b"data" }).unwrap();
        v
    };
    let mut syn = seg(C1, 40000, SRV, 443, 1000, None, true, 64240);
    out(&mut nat, 0, &mut syn, &pol).unwrap();
    let ext = src_of(&syn).1;
    inb(&mut nat, 0, &mut seg(SRV, 443, EG, ext, 5000, Some(1001), true, 65535)).unwrap();
    // The client advertises 1000 × 128 = 128 000 bytes.
    out(&mut nat, 0, &mut seg(C1, 40000, SRV, 443, 1001, Some(5001), false, 1000), &pol).unwrap();
    let at = |off: u32| seg(SRV, 443, EG, ext, 5001 + off, Some(1005), false, 500);
    assert_eq!(inb(&mut nat, 1, &mut at(100_000)), Ok(Inbound::Forward), "inside the scaled window");
    assert_eq!(inb(&mut nat, 1, &mut at(200_000)), Err(DropReason::TcpOutOfWindow), "beyond it");
}

#[test]
fn inbound_rst_does_not_refresh_an_established_flow() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let ext = handshake(&mut nat, 0, &pol);
    // An out-of-window RST late in the flow's life does not extend it.
    let mut bad = tcp(SRV, 443, EG, ext, 5001u32.wrapping_add(0x8000_0000), 0, "R");
    assert_eq!(inb(&mut nat, 7000, &mut bad), Err(DropReason::TcpRstOutOfWindow));
    assert_eq!(expire_all(&mut nat, 7440), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn udp_zero_checksum_stays_zero() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut pk = udp(C1, 40000, SRV, 53);
    pk[26] = 0;
    pk[27] = 0;
    let mut c2 = udp(C2, 40000, SRV, 53);
    c2[26..28].copy_from_slice(&[0, 0]);
    out(&mut nat, 0, &mut pk, &pol).unwrap();
    out(&mut nat, 0, &mut c2, &pol).unwrap();
    assert_eq!(&pk[26..28], &[0, 0]);
    assert_eq!(&c2[26..28], &[0, 0]);
    assert_ne!(src_of(&c2).1, 40000);
}

#[test]
fn ip_options_are_skipped_to_find_l4() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let plain = udp(C1, 40000, SRV, 53);
    // Insert 4 bytes of options (NOPs) and fix IHL, length and checksum.
    let mut pk = plain[..20].to_vec();
    pk.extend_from_slice(&[1, 1, 1, 0]);
    pk.extend_from_slice(&plain[20..]);
    pk[0] = 0x46;
    let len = pk.len() as u16;
    pk[2..4].copy_from_slice(&len.to_be_bytes());
    pk[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::compute(&pk[..24]);
    pk[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(out(&mut nat, 0, &mut pk, &pol), Ok(Outbound::Forward));
    assert_eq!(read_u16(&pk, 24), 40000);
    assert_eq!(Ipv4Addr::from(read_u32(&pk, 12)), ip(EG));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // RFC 1624: every incremental update agrees with a full recomputation, both ways, for any ports and payload.
    #[test]
    fn incremental_checksums_match_full_recomputation(
        proto in 0u8..3, sport in 1u16.., dport in 1u16.., host in 1u8..250,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let pol = policy();
        let mut nat = Nat::new(&cfg(), 0);
        let src = [10, 1, 0, host];
        // A second host on the same port forces a port change, not just an address change.
        let mut first = udp([10, 2, 0, host], sport, SRV, dport);
        let _ = nat.outbound(t(0), &mut first, &pol);
        let build = |s: A, sp: u16, d: A, dp: u16, syn: bool| -> Vec<u8> {
            let b = PacketBuilder::ipv4(s, d, 64);
            let mut v = Vec::new();
            match proto {
                0 => b.udp(sp, dp).write(&mut v, &payload).unwrap(),
                1 => {
                    let b = b.tcp(sp, dp, 7, 1000);
                    let b = if syn { b.syn() } else { b.ack(1) };
                    b.write(&mut v, &payload).unwrap()
                }
                _ => {
                    let b = if syn { b.icmpv4_echo_request(sp, 1) } else { b.icmpv4_echo_reply(sp, 1) };
                    b.write(&mut v, &payload).unwrap()
                }
            }
            v
        };
        let mut pk = build(src, sport, SRV, dport, true);
        let r = nat.outbound(t(0), &mut pk, &pol);
        prop_assert!(r.is_ok(), "{r:?}");
        prop_assert!(checksums_ok(&pk));
        let (e, ext) = src_of(&pk);
        prop_assert_eq!(e, ip(EG));
        let mut reply = if proto == 2 { build(SRV, ext, EG, 0, false) } else { build(SRV, dport, EG, ext, false) };
        if proto == 1 {
            // SYN-ACK for the tracker.
            reply.clear();
            // It acknowledges the SYN and its data.
            let ack = 8 + payload.len() as u32;
            PacketBuilder::ipv4(SRV, EG, 64).tcp(dport, ext, 99, 1000).syn().ack(ack).write(&mut reply, &payload).unwrap();
        }
        let r = nat.inbound(t(0), &mut reply);
        prop_assert_eq!(r, Ok(Inbound::Forward));
        prop_assert!(checksums_ok(&reply));
        prop_assert_eq!(Ipv4Addr::from(read_u32(&reply, 16)), ip(src));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// ICMP errors
// ---------------------------------------------------------------------------------------------------------------

fn quoted_ok(pkt: &[u8]) -> bool {
    let q = &pkt[28..];
    let qihl = usize::from(q[0] & 0xf) * 4;
    checksum::verify(&q[..qihl])
}

#[test]
fn rfc5508_req4_icmp_errors_are_translated_outer_and_quoted_headers() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    // C2 takes 40000 first so C1's port is translated.
    udp_out(&mut nat, 0, C2, 40000, SRV2, 53, &pol);
    let mut sent = udp(C1, 40000, SRV, 53);
    out(&mut nat, 0, &mut sent, &pol).unwrap();
    let ext = src_of(&sent).1;
    assert_ne!(ext, 40000);
    for (ty, code, quote_len) in [(3u8, 3u8, 28usize), (11, 0, sent.len()), (12, 0, 28), (3, 4, sent.len())] {
        // From the server or a router on the way.
        let mut err = icmp_error([198, 18, 0, 1], EG, ty, code, &sent, quote_len);
        assert_eq!(inb(&mut nat, 50, &mut err), Ok(Inbound::Forward), "type {ty}");
        assert_eq!(Ipv4Addr::from(read_u32(&err, 16)), ip(C1));
        // Quoted header: source back to the inside endpoint.
        assert_eq!(Ipv4Addr::from(read_u32(&err, 28 + 12)), ip(C1));
        assert_eq!(read_u16(&err, 48), 40000);
        assert!(quoted_ok(&err));
        if quote_len == sent.len() {
            // The whole datagram is quoted: its UDP checksum is valid for the inside addresses again.
            assert!(checksums_ok(&err[28..]), "quoted UDP checksum");
            assert_eq!(&err[28..], &udp(C1, 40000, SRV, 53)[..]);
        }
    }
    // TCP, full quote and an 8-byte quote (no TCP checksum inside).
    let mut syn = tcp(C1, 40000, SRV, 443, 1, 0, "S");
    let mut syn2 = tcp(C2, 40000, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut syn2, &pol).unwrap();
    out(&mut nat, 0, &mut syn, &pol).unwrap();
    for ql in [28, syn.len()] {
        let mut err = icmp_error(SRV, EG, 3, 1, &syn, ql);
        assert_eq!(inb(&mut nat, 50, &mut err), Ok(Inbound::Forward));
        assert_eq!(read_u16(&err, 48), 40000);
        if ql == syn.len() {
            assert_eq!(&err[28..], &tcp(C1, 40000, SRV, 443, 1, 0, "S")[..]);
        }
    }
    // A quoted echo request.
    let mut e = echo(C1, SRV, 77, false);
    out(&mut nat, 0, &mut e, &pol).unwrap();
    let mut err = icmp_error(SRV, EG, 3, 1, &e, e.len());
    assert_eq!(inb(&mut nat, 50, &mut err), Ok(Inbound::Forward));
    assert_eq!(&err[28..], &echo(C1, SRV, 77, false)[..]);
}

#[test]
fn rfc5508_req6_icmp_errors_never_end_or_refresh_the_flow() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut sent = udp(C1, 40000, SRV, 53);
    out(&mut nat, 0, &mut sent, &pol).unwrap();
    let mut err = icmp_error(SRV, EG, 3, 3, &sent, 28);
    assert_eq!(inb(&mut nat, 299, &mut err), Ok(Inbound::Forward));
    assert_eq!(nat.stats().udp, 1);
    assert_eq!(expire_all(&mut nat, 300), 1, "not refreshed by the error");
}

#[test]
fn rfc5508_req3_bad_icmp_or_embedded_checksum_and_unknown_flows_are_dropped() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut sent = udp(C1, 40000, SRV, 53);
    out(&mut nat, 0, &mut sent, &pol).unwrap();
    let good = icmp_error(SRV, EG, 3, 3, &sent, 28);
    let mut bad = good.clone();
    bad[22] ^= 0xff; // ICMP checksum
    assert_eq!(inb(&mut nat, 1, &mut bad), Err(DropReason::BadIcmpChecksum));
    // REQ-3a: corrupt the quoted IP header checksum and fix the ICMP checksum so only the embedded one is bad.
    let mut q = sent.clone();
    q[10] ^= 0x55;
    let mut bad = icmp_error(SRV, EG, 3, 3, &q, 28);
    assert_eq!(inb(&mut nat, 1, &mut bad), Err(DropReason::BadIcmpChecksum));
    // An error about a flow we do not know.
    let other = udp(EG, 41111, SRV, 53);
    let mut err = icmp_error(SRV, EG, 3, 3, &other, 28);
    assert_eq!(inb(&mut nat, 1, &mut err), Err(DropReason::IcmpErrorNoMapping));
    // Truncated quotes.
    let mut err = icmp_error(SRV, EG, 3, 3, &sent, 24);
    assert_eq!(inb(&mut nat, 1, &mut err), Err(DropReason::Truncated));
    assert_eq!(nat.stats().udp, 1);
}

#[test]
fn outbound_icmp_errors_from_inside_hosts_are_translated() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    udp_out(&mut nat, 0, C2, 40000, SRV, 53, &pol);
    let (_, ext) = udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    // The server's reply, translated to C1, which answers port unreachable.
    let mut reply = udp(SRV, 53, EG, ext);
    inb(&mut nat, 1, &mut reply).unwrap();
    let mut err = icmp_error(C1, SRV, 3, 3, &reply, reply.len());
    assert_eq!(out(&mut nat, 2, &mut err, &pol), Ok(Outbound::Forward));
    assert_eq!(Ipv4Addr::from(read_u32(&err, 12)), ip(EG));
    // The quote is cut to the quoted IP header and 8 bytes (RFC 792), translated back to what the server sent.
    assert_eq!(read_u16(&err, 2), 56);
    assert_eq!(&err[28..56], &udp(SRV, 53, EG, ext)[..28]);
    // About no flow: dropped.
    let mut err = icmp_error(C1, SRV, 3, 3, &udp(SRV, 53, C1, 1), 28);
    assert_eq!(out(&mut nat, 2, &mut err, &pol), Err(DropReason::IcmpErrorNoMapping));
}

/// ICMP errors are the one packet from inside the policy does not judge: they must not carry anything else out.
/// Spoofed or misdirected ones (another inside address, another destination than the flow's peer, a source in
/// no group) are dropped under their reason, and a long tail never leaves.
#[test]
fn inside_icmp_errors_leave_only_from_the_flows_endpoint_to_its_peer_cut_to_8_bytes() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let (_, ext) = udp_out(&mut nat, 0, C1, 46000, SRV, 7000, &pol);
    let mut reply = udp(SRV, 7000, EG, ext);
    inb(&mut nat, 1, &mut reply).unwrap();
    // The quote of the live flow's reply, followed by 1 KB of payload a covert channel would carry.
    let mut quoted = reply.clone();
    quoted.extend(std::iter::repeat_n(0x5a, 1024));
    let cases: [(A, A, DropReason); 4] = [
        (C2, SRV, DropReason::IcmpErrorMismatch), // another inside host
        ([10, 99, 9, 9], SRV, DropReason::IcmpErrorMismatch), // a spoofed inside address
        (C1, DENIED, DropReason::IcmpErrorMismatch), // to a destination that is not the peer
        (C1, SRV2, DropReason::IcmpErrorMismatch),
    ];
    for (src, dst, reason) in cases {
        for ty in [3u8, 11, 12] {
            let mut err = icmp_error(src, dst, ty, 0, &quoted, quoted.len());
            let sent = err.clone();
            assert_eq!(out(&mut nat, 2, &mut err, &pol), Err(reason), "{src:?} → {dst:?} type {ty}");
            assert_eq!(err, sent, "a refused error is left untouched");
        }
    }
    // From the endpoint to its peer: translated, and only the header + 8 bytes of the quote leave.
    let mut err = icmp_error(C1, SRV, 3, 3, &quoted, quoted.len());
    assert_eq!(out(&mut nat, 2, &mut err, &pol), Ok(Outbound::Forward));
    assert_eq!(usize::from(read_u16(&err, 2)), 20 + 8 + 20 + 8);
    assert!(checksums_ok(&err));
    assert!(!err[..56].contains(&0x5a), "nothing of the tail is within the length that leaves");
    // After a reload that takes the source out of every group, its errors are refused too.
    let mut b = PolicyBuilder::new();
    let g = b.add_group("elsewhere", vec![ip(EG)]);
    b.add_source(g, p("192.168.0.0/16"));
    b.add_rule(rule(g, "0.0.0.0/0", Action::Allow));
    let ungrouped = b.build(2).unwrap();
    let mut err = icmp_error(C1, SRV, 3, 3, &quoted, quoted.len());
    assert_eq!(out(&mut nat, 3, &mut err, &ungrouped), Err(DropReason::NoGroup));
}

// ---------------------------------------------------------------------------------------------------------------
// Hairpinning
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn rfc4787_req9_hairpinning() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    // C2 has a mapping (e.g. learnt through STUN).
    let (_, b_ext) = udp_out(&mut nat, 0, C2, 6000, SRV, 3478, &pol);
    // C1 sends to C2's external endpoint: translated both ways, sent back inside.
    let mut pk = udp(C1, 7000, EG, b_ext);
    assert_eq!(out(&mut nat, 1, &mut pk, &pol), Ok(Outbound::Hairpin));
    assert!(checksums_ok(&pk));
    let a_ext = src_of(&pk);
    assert_eq!(a_ext.0, ip(EG));
    assert_eq!(dst_of(&pk), (ip(C2), 6000));
    // C2 answers C1's external endpoint.
    let mut back = udp(C2, 6000, EG, a_ext.1);
    assert_eq!(out(&mut nat, 2, &mut back, &pol), Ok(Outbound::Hairpin));
    assert_eq!(src_of(&back), (ip(EG), b_ext));
    assert_eq!(dst_of(&back), (ip(C1), 7000));
    // TCP.
    let mut syn = tcp(C2, 6001, SRV, 443, 1, 0, "S");
    out(&mut nat, 0, &mut syn, &pol).unwrap();
    let mut hs = tcp(C1, 7001, EG, src_of(&syn).1, 1, 0, "S");
    assert_eq!(out(&mut nat, 1, &mut hs, &pol), Ok(Outbound::Hairpin));
    assert_eq!(dst_of(&hs), (ip(C2), 6001));
    // Nobody holds the port: nothing.
    assert_eq!(out(&mut nat, 1, &mut udp(C1, 7002, EG, 9), &pol), Err(DropReason::NoMapping));
}

#[test]
fn hairpin_to_another_workers_port_is_handed_over() {
    let pol = policy();
    let c = NatConfig { workers: 2, ..cfg() };
    let mut w0 = Nat::new(&c, 0);
    let mut w1 = Nat::new(&c, 1);
    // A mapping on worker 1 (high half of the port space).
    let (_, b_ext) = udp_out(&mut w1, 0, C2, 60000, SRV, 3478, &pol);
    assert_eq!(reply_owner(2, ip(EG), 17, b_ext), 1);
    let mut pk = udp(C1, 7000, EG, b_ext);
    assert_eq!(out(&mut w0, 1, &mut pk, &pol), Ok(Outbound::HairpinOtherWorker(1)));
    // From the wire, a packet claiming to come from our own egress IP creates nothing (anti-spoofing).
    let mut spoofed = pk.clone();
    assert_eq!(w1.inbound(t(1), &mut spoofed), Err(DropReason::NoMapping));
    assert_eq!(w1.inbound_hairpin(t(1), &mut pk), Ok(Inbound::Forward));
    assert!(checksums_ok(&pk));
    assert_eq!(dst_of(&pk), (ip(C2), 60000));
}

// ---------------------------------------------------------------------------------------------------------------
// Workers and port slices
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn port_slices_partition_the_port_space_and_reply_owner_agrees() {
    for workers in [1u16, 2, 3, 4, 7, 16, 64] {
        let mut owner = vec![u16::MAX; 65536];
        for w in 0..workers {
            for (first, len) in [(LOW_FIRST, LOW_LEN), (HIGH_FIRST, HIGH_LEN)] {
                let (a, b) = slice_of(first, len, workers, w);
                for p in a..b {
                    assert_eq!(owner[p as usize], u16::MAX, "port {p} in two slices");
                    owner[p as usize] = w;
                }
            }
        }
        for p in 1..=65535u16 {
            assert_eq!(owner[p as usize], port_owner(workers, p), "workers {workers} port {p}");
        }
        assert_eq!(port_owner(workers, 0), 0);
    }
}

#[test]
fn each_worker_allocates_only_in_its_slice_and_points_replies_to_the_owner() {
    let pol = policy();
    let c = NatConfig { workers: 4, ..cfg() };
    let mut nats: Vec<Nat> = (0..4).map(|w| Nat::new(&c, w)).collect();
    for port in [80u16, 1000, 20000, 50000, 65535] {
        // Only the endpoint's owner maps it; every other worker hands it over untouched.
        let owner = port_owner(4, port);
        for (w, nat) in nats.iter_mut().enumerate().filter(|(w, _)| *w != usize::from(owner)) {
            let mut pk = udp(C1, port, SRV, 53);
            let sent = pk.clone();
            assert_eq!(out(nat, 0, &mut pk, &pol), Ok(Outbound::OtherWorker(owner)), "worker {w}");
            assert_eq!(pk, sent);
        }
        let nat = &mut nats[usize::from(owner)];
        let (_, ext) = udp_out(nat, 0, C1, port, SRV, 53, &pol);
        assert_eq!(ext, port, "original port first: it is always in the owner's slice");
        assert_eq!(nat.reply_owner(ip(EG), 17, ext), owner);
        // Another host with the same port on the same worker gets another port of the same slice and range.
        let (_, other) = udp_out(nat, 0, C2, port, SRV, 53, &pol);
        assert_ne!(other, port);
        assert_eq!(port_owner(4, other), owner);
        assert_eq!(port < 1024, other < 1024);
    }
    // A reply arriving at the wrong worker names its owner and is left untouched.
    let (_, ext) = udp_out(&mut nats[3], 0, C2, 64000, SRV, 53, &pol);
    let mut r = udp(SRV, 53, EG, ext);
    let orig = r.clone();
    assert_eq!(nats[0].inbound(t(1), &mut r), Ok(Inbound::OtherWorker(3)));
    assert_eq!(r, orig);
    // So does an ICMP error quoting one of worker 3's packets, and an echo reply to one of its identifiers.
    let mut sent = udp(C2, 64000, SRV, 53);
    nats[3].outbound(t(0), &mut sent, &pol).unwrap();
    let mut err = icmp_error(SRV, EG, 3, 3, &sent, 28);
    assert_eq!(nats[0].inbound(t(1), &mut err), Ok(Inbound::OtherWorker(3)));
    assert_eq!(nats[3].inbound(t(1), &mut err), Ok(Inbound::Forward));
    let mut e = echo(C1, SRV, 40000, false);
    assert_eq!(nats[2].outbound(t(0), &mut e, &pol), Ok(Outbound::Forward));
    let mut reply = echo(SRV, EG, src_of(&e).1, true);
    assert_eq!(nats[1].inbound(t(1), &mut reply), Ok(Inbound::OtherWorker(2)));
    assert_eq!(nats[2].inbound(t(1), &mut reply), Ok(Inbound::Forward));
    assert_eq!(dst_of(&reply), (ip(C1), 40000));
}

/// An ICMP error an inside host sends about a reply it got (port unreachable) belongs to the worker owning the
/// quoted flow's inside port, whichever worker receives it.
#[test]
fn an_inside_icmp_error_goes_to_the_worker_owning_the_quoted_flow() {
    let pol = policy();
    let c = NatConfig { workers: 2, ..cfg() };
    let (mut w0, mut w1) = (Nat::new(&c, 0), Nat::new(&c, 1));
    let (_, ext) = udp_out(&mut w1, 0, C1, 60000, SRV, 53, &pol);
    let mut reply = udp(SRV, 53, EG, ext);
    assert_eq!(inb(&mut w1, 1, &mut reply), Ok(Inbound::Forward));
    let mut unreachable = icmp_error(C1, SRV, 3, 3, &reply, 28);
    let sent = unreachable.clone();
    assert_eq!(out(&mut w0, 2, &mut unreachable, &pol), Ok(Outbound::OtherWorker(1)));
    assert_eq!(unreachable, sent);
    assert_eq!(out(&mut w1, 2, &mut unreachable, &pol), Ok(Outbound::Forward));
    assert_eq!(src_of(&unreachable).0, ip(EG));
}

#[test]
fn stats_count_flows_by_state_and_ports_by_egress_ip() {
    let pol = policy_with(1, &[EG], true);
    let mut nat = Nat::new(&cfg(), 0);
    handshake(&mut nat, 0, &pol);
    out(&mut nat, 0, &mut tcp(C2, 1, SRV, 443, 1, 0, "S"), &pol).unwrap();
    udp_out(&mut nat, 0, C1, 5, SRV, 53, &pol);
    udp_out(&mut nat, 0, C1, 5, SRV2, 53, &pol);
    out(&mut nat, 0, &mut echo(C1, SRV, 1, false), &pol).unwrap();
    let s = nat.stats();
    assert_eq!((s.tcp_syn_sent, s.tcp_established, s.tcp_transitory, s.udp, s.icmp), (1, 1, 0, 2, 1));
    assert_eq!(s.flows(), 5);
    assert_eq!(s.mappings, 4);
    assert_eq!(s.egress_ports(), &[EgressPorts { ip: ip(EG), tcp: 2, udp: 1, icmp: 1 }]);
}

// ---------------------------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn table_full_refuses_new_flows_and_keeps_established_ones() {
    let pol = policy();
    let c = NatConfig { max_flows: 8, ..cfg() };
    let mut nat = Nat::new(&c, 0);
    let ext = handshake(&mut nat, 0, &pol);
    for port in 0..7 {
        udp_out(&mut nat, 0, C2, 30000 + port, SRV, 53, &pol);
    }
    assert_eq!(out(&mut nat, 1, &mut udp(C2, 1, SRV, 53), &pol), Err(DropReason::ConntrackFull));
    assert_eq!(out(&mut nat, 1, &mut tcp(C1, 40000, SRV, 443, 1001, 5001, "A"), &pol), Ok(Outbound::Forward));
    assert_eq!(inb(&mut nat, 1, &mut tcp(SRV, 443, EG, ext, 5001, 1001, "A")), Ok(Inbound::Forward));
}

#[test]
fn rfc6888_req4_per_source_flow_limit() {
    let pol = policy();
    let c = NatConfig { max_flows_per_source: 3, ..cfg() };
    let mut nat = Nat::new(&c, 0);
    for port in 0..3 {
        udp_out(&mut nat, 0, C1, 30000 + port, SRV, 53, &pol);
    }
    assert_eq!(out(&mut nat, 0, &mut udp(C1, 1, SRV, 53), &pol), Err(DropReason::SourceFlowLimit));
    // Other sources are not starved.
    udp_out(&mut nat, 0, C2, 1, SRV, 53, &pol);
    // Expiry gives the source its budget back.
    expire_all(&mut nat, 300);
    udp_out(&mut nat, 301, C1, 1, SRV, 53, &pol);
}

/// Two groups share one egress IP; the first is capped at 10 ports on it: its 11th mapping is refused
/// (`GroupPortLimit`) while the other group keeps mapping, and expiry gives the capped group its ports back. The
/// cap follows the group's name across a reload that renumbers the groups.
#[test]
fn a_group_port_cap_keeps_one_group_from_starving_another_on_a_shared_egress_ip() {
    let build = |generation: u64, swapped: bool| {
        let mut b = PolicyBuilder::new();
        let mut add = |name: &str, src: &str, cap: Option<u32>| {
            let g = b.add_group(name, vec![ip(EG)]);
            b.add_source(g, p(src));
            b.add_rule(rule(g, "0.0.0.0/0", Action::Allow));
            if let Some(cap) = cap {
                b.group_port_limit(g, cap);
            }
        };
        if swapped {
            add("calm", "10.2.0.0/16", None);
            add("noisy", "10.1.0.0/16", Some(10));
        } else {
            add("noisy", "10.1.0.0/16", Some(10));
            add("calm", "10.2.0.0/16", None);
        }
        b.build(generation).unwrap()
    };
    let pol = build(1, false);
    let mut nat = Nat::new(&cfg(), 0);
    for port in 0..10 {
        udp_out(&mut nat, 0, [10, 1, 0, 1], 20000 + port, SRV, 53, &pol);
    }
    assert_eq!(out(&mut nat, 0, &mut udp([10, 1, 0, 2], 1, SRV, 53), &pol), Err(DropReason::GroupPortLimit));
    // Its existing mappings keep working (new sessions on them take no port).
    udp_out(&mut nat, 0, [10, 1, 0, 1], 20000, SRV2, 53, &pol);
    for port in 0..50 {
        udp_out(&mut nat, 0, [10, 2, 0, 1], 20000 + port, SRV, 53, &pol);
    }
    // A reload that renumbers the groups: the cap still knows what "noisy" holds.
    let renumbered = build(2, true);
    assert_eq!(
        out(&mut nat, 1, &mut udp([10, 1, 0, 3], 1, SRV, 53), &renumbered),
        Err(DropReason::GroupPortLimit)
    );
    expire_all(&mut nat, 400);
    udp_out(&mut nat, 401, [10, 1, 0, 3], 1, SRV, 53, &renumbered);
}

#[test]
fn udp_sessions_of_one_mapping_towards_one_address_are_capped() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    for port in 0..MAX_UDP_SESSIONS_PER_REMOTE_ADDR as u16 {
        udp_out(&mut nat, 0, C1, 40000, SRV, 1000 + port, &pol);
    }
    assert_eq!(out(&mut nat, 0, &mut udp(C1, 40000, SRV, 9), &pol), Err(DropReason::SourceFlowLimit));
    assert_eq!(inb(&mut nat, 0, &mut udp(SRV, 9, EG, 40000)), Err(DropReason::UnsolicitedFlowLimit));
    // Other addresses are unaffected.
    udp_out(&mut nat, 0, C1, 40000, SRV2, 9, &pol);
}

/// Sessions created by inbound packets (address-dependent filtering: other ports of a server the host talks to)
/// have their own bound and never use the inside host's quota: a server (or someone spoofing it) that sprays
/// every mapped port from many source ports cannot lock the host out of its own new flows.
#[test]
fn inbound_created_sessions_do_not_use_the_inside_hosts_quota() {
    let pol = policy();
    let c = NatConfig { max_flows: 32768, max_flows_per_source: 200, ..cfg() };
    let mut nat = Nat::new(&c, 0);
    let mapped: Vec<u16> = (0..130).map(|i| udp_out(&mut nat, 0, C1, 30000 + i, SRV, 53, &pol).1).collect();
    let (mut created, mut refused) = (0, 0);
    for &ext in &mapped {
        for remote_port in 0..64u16 {
            match inb(&mut nat, 1, &mut udp(SRV, 2000 + remote_port, EG, ext)) {
                Ok(Inbound::Forward) => created += 1,
                Err(DropReason::UnsolicitedFlowLimit) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(created, 130 * usize::from(MAX_UNSOLICITED_PER_MAPPING), "bounded per mapping");
    assert_eq!(refused, 130 * (64 - usize::from(MAX_UNSOLICITED_PER_MAPPING)));
    // The host still has its own quota: 200 - 130 new flows.
    for i in 0..70 {
        udp_out(&mut nat, 2, C1, 40000 + i, SRV2, 53, &pol);
    }
    assert_eq!(out(&mut nat, 2, &mut udp(C1, 50000, SRV2, 53), &pol), Err(DropReason::SourceFlowLimit));
    // When the host answers on an inbound-created session, it becomes the host's own flow (and counts).
    let mut answer = udp(C1, 30000, SRV, 2000);
    assert_eq!(out(&mut nat, 3, &mut answer, &pol), Ok(Outbound::Forward));
    assert_eq!(nat.unsolicited as usize, 130 * usize::from(MAX_UNSOLICITED_PER_MAPPING) - 1);
    // Expiry returns everything: the table is empty, no count left behind.
    expire_all(&mut nat, 1000);
    assert_eq!((nat.stats().flows(), nat.unsolicited, nat.mapping_count), (0, 0, 0));
    let c1 = hash_addr(nat.seed.0, u32::from(ip(C1)));
    assert_eq!(nat.sources.find(c1, |_| true), None, "C1's flow count went back to nothing");

    // Across all mappings, inbound-created sessions take at most a quarter of the table.
    let mut small = Nat::new(&NatConfig { max_flows: 1024, ..c }, 0);
    for i in 0..130 {
        let ext = udp_out(&mut small, 0, C1, 30000 + i, SRV, 53, &pol).1;
        for remote_port in 0..8u16 {
            let _ = small.inbound(t(1), &mut udp(SRV, 2000 + remote_port, EG, ext));
        }
    }
    assert_eq!(small.unsolicited, 256);
}

#[test]
fn rfc6888_req8_port_exhaustion_and_quarantine() {
    let pol = policy();
    // 64 workers: worker 5 owns 1008 high ports.
    let c = NatConfig { workers: 64, max_flows: 4096, max_flows_per_source: 4096, ..cfg() };
    let mut nat = Nat::new(&c, 5);
    let (a, b) = slice_of(HIGH_FIRST, HIGH_LEN, 64, 5);
    let n = (b - a) as usize;
    // Every inside endpoint uses the slice's first port: worker 5 owns them all.
    let sport = a as u16;
    let mut used = std::collections::HashSet::new();
    for i in 0..n {
        let host = [10, 9, (i / 200) as u8, (i % 200) as u8 + 1];
        let (_, ext) = udp_out(&mut nat, 0, host, sport, SRV, 53, &pol);
        assert!(used.insert(ext), "external port {ext} used twice");
        assert!((a..b).contains(&u32::from(ext)));
    }
    assert_eq!(nat.stats().egress_ports()[0].udp, n as u32);
    assert_eq!(out(&mut nat, 0, &mut udp(C1, sport, SRV, 53), &pol), Err(DropReason::OutOfPorts));
    assert_eq!(nat.stats().allocation_failures, 1);
    // TCP has its own ports.
    out(&mut nat, 0, &mut tcp(C1, sport, SRV, 443, 1, 0, "S"), &pol).unwrap();
    // Everything idles out at 300 s; the ports are quarantined for 120 s.
    assert_eq!(expire_all(&mut nat, 300), n + 1);
    assert_eq!(nat.stats().egress_ports()[0].udp, 0);
    assert_eq!(out(&mut nat, 419, &mut udp(C1, sport, SRV, 53), &pol), Err(DropReason::OutOfPorts));
    let (_, ext) = udp_out(&mut nat, 420, C1, sport, SRV, 53, &pol);
    assert!(used.contains(&ext));
}

#[test]
fn rfc6888_req8_port_search_is_bounded_and_resumes_where_it_stopped() {
    let pol = policy();
    // 8 workers: worker 5 owns 8064 high ports, more than one search looks at.
    let c = NatConfig { workers: 8, max_flows: 16384, max_flows_per_source: 16384, ..cfg() };
    let mut nat = Nat::new(&c, 5);
    let (a, b) = slice_of(HIGH_FIRST, HIGH_LEN, 8, 5);
    let n = (b - a) as usize;
    let kept = 5000;
    assert!(n > kept && kept > MAX_PORT_PROBES as usize);
    // Every inside endpoint uses the slice's first port (worker 5 owns them all): the first keeps it, every later
    // flow takes the next port in order.
    let sport = a as u16;
    let host = |i: usize| [10, 9, (i / 200) as u8, (i % 200) as u8 + 1];
    for i in 0..n {
        let (_, ext) = udp_out(&mut nat, 0, host(i), sport, SRV, 53, &pol);
        assert_eq!(u32::from(ext), a + i as u32);
    }
    // The first `kept` flows stay busy; the rest idle out at 300 s and sit in quarantine until 421 s.
    for i in 0..kept {
        udp_out(&mut nat, 200, host(i), sport, SRV, 53, &pol);
    }
    assert_eq!(expire_all(&mut nat, 301), n - kept);
    // From the cursor (back at the slice start) the first search meets only busy ports and gives up…
    let newcomer = [10, 9, 250, 1];
    assert_eq!(out(&mut nat, 421, &mut udp(newcomer, sport, SRV, 53), &pol), Err(DropReason::OutOfPorts));
    // …and the next one carries on from there and finds the first free port.
    let (_, ext) = udp_out(&mut nat, 421, newcomer, sport, SRV, 53, &pol);
    assert_eq!(u32::from(ext), a + kept as u32);
}

#[test]
fn session_is_56_bytes_and_memory_per_flow_is_reported() {
    assert_eq!(std::mem::size_of::<Session>(), 56);
    assert_eq!(std::mem::size_of::<Mapping>(), 16);
    let nat = Nat::new(&NatConfig { max_flows: 1 << 16, ..NatConfig::default() }, 0);
    let per_flow = nat.bytes_allocated() / (1 << 16);
    // The port tables (16 egress IPs × 3 protocols × 64 K ports × 4 bytes) dominate at small sizes; at 1 M flows
    // the bench reports the figure against the 128-byte target.
    assert!(per_flow < 400, "{per_flow}");
}

// ---------------------------------------------------------------------------------------------------------------
// Hostile input and invariants
// ---------------------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..120), proto in 0u8..4) {
        let pol = policy();
        let mut nat = Nat::new(&cfg(), 0);
        if bytes.len() > 20 {
            bytes[0] = 0x45;
            bytes[9] = [1, 6, 17, 47][proto as usize];
            bytes[12..16].copy_from_slice(&C1);
        }
        let mut b2 = bytes.clone();
        let _ = nat.outbound(t(0), &mut bytes, &pol);
        if b2.len() > 20 {
            b2[16..20].copy_from_slice(&EG);
        }
        let _ = nat.inbound(t(0), &mut b2);
        let _ = nat.poll_expiry(t(1000), 10);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Udp {
        host: u8,
        port: u16,
        dst: u8,
    },
    Syn {
        host: u8,
        port: u16,
        dst: u8,
    },
    Rst {
        host: u8,
        port: u16,
        dst: u8,
    },
    Reply {
        host: u8,
        port: u16,
        dst: u8,
    },
    Advance(u16),
    Expire(u8),
    /// Switch to policy `n % 3` (egress IPs {EG, EG2}, {EG2} or {EG}) under a new generation.
    Reload(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let h = 1u8..6;
    let pt = prop_oneof![Just(1000u16), Just(1001), Just(40000), Just(40001), Just(65535), 1u16..];
    let d = 0u8..3;
    prop_oneof![
        (h.clone(), pt.clone(), d.clone()).prop_map(|(host, port, dst)| Op::Udp { host, port, dst }),
        (h.clone(), pt.clone(), d.clone()).prop_map(|(host, port, dst)| Op::Syn { host, port, dst }),
        (h.clone(), pt.clone(), d.clone()).prop_map(|(host, port, dst)| Op::Rst { host, port, dst }),
        (h, pt, d).prop_map(|(host, port, dst)| Op::Reply { host, port, dst }),
        (0u16..400).prop_map(Op::Advance),
        any::<u8>().prop_map(Op::Expire),
        any::<u8>().prop_map(Op::Reload),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    // The mapping is a bijection (inside endpoint ↔ egress ip:port:proto), no external port is held twice, and a
    // port freed at time T is not handed out again before T + quarantine (RFC 6888 REQ-8). "Held" is read from
    // every live mapping, retired ones included: a reload that moves an endpoint to another egress IP retires its
    // old mapping, whose sessions keep the old port until they go, and may take it up again when a later reload
    // gives the IP back. Only a port that left the table counts as freed.
    #[test]
    fn mappings_stay_a_bijection_and_quarantined_ports_are_not_reused(ops in proptest::collection::vec(op(), 1..120)) {
        let mut generation = 1;
        let mut pol = policy_with(generation, &[EG, EG2], true);
        let c = NatConfig { workers: 2, max_flows: 64, max_flows_per_source: 16, ..cfg() };
        let mut nat = Nat::new(&c, 1);
        let mut now = 0u64;
        // (egress ip index, proto, port) → time it left the port table.
        let mut freed: std::collections::HashMap<(u8, u8, u16), u64> = Default::default();
        let mut held = std::collections::HashSet::new();
        let dsts = [SRV, SRV2, DENIED];
        for op in ops {
            match op {
                Op::Udp { host, port, dst } | Op::Syn { host, port, dst } | Op::Rst { host, port, dst } => {
                    let src = [10, 0, 0, host];
                    let mut pk = match op {
                        Op::Udp { .. } => udp(src, port, dsts[dst as usize], 53),
                        Op::Syn { .. } => tcp(src, port, dsts[dst as usize], 443, 1, 0, "S"),
                        _ => tcp(src, port, dsts[dst as usize], 443, 2, 0, "R"),
                    };
                    if nat.outbound(t(now), &mut pk, &pol).is_ok() {
                        prop_assert!(checksums_ok(&pk));
                    }
                }
                Op::Reply { host, port, dst } => {
                    if let Some((e, ext)) = nat.mapping_of(ip([10, 0, 0, host]), port, 17) {
                        let mut r = udp(dsts[dst as usize], 53, e.octets(), ext);
                        if nat.inbound(t(now), &mut r) == Ok(Inbound::Forward) {
                            prop_assert_eq!(dst_of(&r), (ip([10, 0, 0, host]), port));
                        }
                    }
                }
                Op::Advance(s) => now += u64::from(s),
                Op::Expire(b) => { nat.poll_expiry(t(now), usize::from(b)); }
                Op::Reload(n) => {
                    generation += 1;
                    let sets: [&[A]; 3] = [&[EG, EG2], &[EG2], &[EG]];
                    pol = policy_with(generation, sets[usize::from(n % 3)], true);
                }
            }
            // Every live mapping, retired or not, holds one external port, and the port table names it back.
            let mut now_held = std::collections::HashSet::new();
            for (mid, m) in nat.mappings.iter().enumerate() {
                if m.proto == 0 {
                    continue; // free
                }
                let key = (m.ip_idx, m.proto, m.ext_port);
                prop_assert!(now_held.insert(key), "external {key:?} held twice");
                prop_assert_eq!(nat.mapping_at(m.ip_idx, m.proto, m.ext_port), Some(mid as u32));
                prop_assert_eq!(port_owner(2, m.ext_port), 1);
                prop_assert_eq!(m.in_port < 1024, m.ext_port < 1024);
                if !held.contains(&key) {
                    if let Some(t0) = freed.remove(&key) {
                        prop_assert!(now >= t0 + 120, "port {key:?} reused at {now}, freed at {t0}");
                    }
                }
            }
            for key in held.difference(&now_held) {
                freed.insert(*key, now);
            }
            held = now_held;
            // The inside-endpoint view names live mappings only.
            for host in 1..6u8 {
                for port in [1000u16, 1001, 40000, 40001, 65535] {
                    for proto in [6u8, 17] {
                        if let Some(mid) = nat.find_mapping(u32::from(ip([10, 0, 0, host])), port, proto) {
                            let m = nat.mappings[mid as usize];
                            prop_assert_eq!((m.in_addr, m.in_port, m.proto), (u32::from(ip([10, 0, 0, host])), port, proto));
                            prop_assert!(held.contains(&(m.ip_idx, m.proto, m.ext_port)));
                        }
                    }
                }
            }
            let s = nat.stats();
            let in_use: u32 = s.egress_ports().iter().map(|e| e.tcp + e.udp + e.icmp).sum();
            prop_assert_eq!(in_use as usize, held.len());
            prop_assert_eq!(s.mappings as usize, held.len());
        }
    }
}

/// The egress table's direct-mapped lookup agrees with a scan for every address, shared buckets included, and
/// ignores IPs beyond the table's 16.
#[test]
fn egress_index_agrees_with_a_scan() {
    // Two addresses sharing a bucket first, then others: 20 in all.
    let cand: Vec<A> = (0..=255u8).map(|i| [192, 0, 2, i]).collect();
    let bucket = |a: &A| egress_bucket_of(u32::from(ip(*a)));
    let (x, y) = (0..256)
        .flat_map(|i| (i + 1..256).map(move |j| (i, j)))
        .find(|&(i, j)| bucket(&cand[i]) == bucket(&cand[j]))
        .unwrap();
    let mut ips = vec![cand[x], cand[y]];
    ips.extend(cand.iter().enumerate().filter(|&(i, _)| i != x && i != y).map(|(_, a)| *a).take(18));
    let mut nat = Nat::new(&cfg(), 0);
    nat.sync_policy(&policy_with(1, &ips, false));
    assert_eq!(nat.egress_len, MAX_EGRESS_IPS);
    let mut buckets = std::collections::HashSet::new();
    for (i, a) in ips.iter().enumerate() {
        let addr = u32::from(ip(*a));
        let want = (i < MAX_EGRESS_IPS).then_some(i as u8);
        assert_eq!(nat.egress_index(addr), want, "{a:?}");
        if i < MAX_EGRESS_IPS && !buckets.insert(egress_bucket_of(addr)) {
            assert_eq!(nat.egress_bucket[egress_bucket_of(addr)], BUCKET_SHARED);
        }
    }
    assert!(buckets.len() < MAX_EGRESS_IPS, "the test covers a shared bucket");
    for x in 0..100_000u32 {
        let addr = x.wrapping_mul(0x0101_0101) ^ 0xc000_0200;
        let scan = nat.egress[..nat.egress_len].iter().position(|&a| a == addr).map(|i| i as u8);
        assert_eq!(nat.egress_index(addr), scan);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Prefetch hints
// ---------------------------------------------------------------------------------------------------------------

/// The session a hint's index slot names (what `prefetch_session` loads), or `NONE`.
fn hinted_session(nat: &Nat, hint: FlowHint) -> u32 {
    if hint == FlowHint::NONE {
        return NONE;
    }
    let index = if hint.inbound { &nat.in_idx } else { &nat.out_idx };
    index.value_if_home(hint.pos as usize, hint.hash)
}

#[test]
fn prefetch_hints_name_the_session_the_packet_will_use_both_ways() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let mut tcp_syn = tcp([10, 0, 0, 5], 40001, [198, 51, 100, 9], 443, 1000, 0, "S");
    let mut udp_out_pkt = udp([10, 0, 0, 5], 5353, [198, 51, 100, 9], 53);
    let mut ping = echo([10, 0, 0, 5], [198, 51, 100, 9], 77, false);
    for pkt in [&mut tcp_syn, &mut udp_out_pkt, &mut ping] {
        let original = pkt.clone();
        assert_eq!(hinted_session(&nat, nat.prefetch_flow(false, &original)), NONE, "no flow yet");
        assert_eq!(out(&mut nat, 1, pkt, &pol), Ok(Outbound::Forward));
        let (l4, _) = parse(&original, true).unwrap();
        let sid = nat.find_out(l4.src, l4.sport, l4.dst, l4.dport, l4.proto).expect("the flow exists");
        assert_eq!(hinted_session(&nat, nat.prefetch_flow(false, &original)), sid, "outbound hint");
        // The reply, as it arrives at the egress IP.
        let (egress, port) = src_of(pkt);
        let reply = match l4.proto {
            ip_proto::TCP => tcp([198, 51, 100, 9], 443, egress.octets(), port, 5000, 1001, "SA"),
            ip_proto::UDP => udp([198, 51, 100, 9], 53, egress.octets(), port),
            _ => echo([198, 51, 100, 9], egress.octets(), port, true),
        };
        assert_eq!(
            hinted_session(&nat, nat.prefetch_flow(true, &reply)),
            sid,
            "inbound hint, proto {}",
            l4.proto
        );
    }
    // Not for an egress IP, not a transport the NAT knows, not IPv4 at all: nothing to prefetch.
    assert_eq!(nat.prefetch_flow(true, &udp([198, 51, 100, 9], 53, [203, 0, 113, 99], 1024)), FlowHint::NONE);
    assert_eq!(
        nat.prefetch_flow(false, &ipv4([10, 0, 0, 5], [198, 51, 100, 9], 47, &[0; 8])),
        FlowHint::NONE
    );
    assert_eq!(nat.prefetch_flow(false, &[0x60; 40]), FlowHint::NONE);
    assert!(!nat.prefetch_pays(), "three flows fit in any cache");
}

proptest::proptest! {
    #[test]
    fn prefetch_hints_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), from_outside: bool) {
        let nat = Nat::new(&cfg(), 0);
        let hint = nat.prefetch_flow(from_outside, &bytes);
        nat.prefetch_session(hint);
        nat.prefetch_session(FlowHint { hash: 1, pos: u32::MAX - 1, inbound: from_outside });
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Translation log
// ---------------------------------------------------------------------------------------------------------------

fn logging_nat(mode: NatLogMode, per_sec: u32) -> (Nat, std::sync::Arc<NatLogQueue>) {
    let queue = std::sync::Arc::new(NatLogQueue::new(64));
    let mut nat = Nat::new(&cfg(), 0);
    nat.set_log(mode, per_sec, queue.clone());
    (nat, queue)
}

fn drain(queue: &NatLogQueue) -> Vec<NatLogRecord> {
    std::iter::from_fn(|| queue.pop()).collect()
}

#[test]
fn the_translation_log_records_creation_and_end_with_counts() {
    let pol = policy();
    let (mut nat, queue) = logging_nat(NatLogMode::All, 1000);
    let (egress, port) = udp_out(&mut nat, 10, C1, 40000, SRV, 53, &pol);
    let created = drain(&queue);
    assert_eq!(created.len(), 1);
    let c = created[0];
    assert_eq!(c.end, None);
    assert_eq!(
        (c.inside, c.egress, c.remote),
        (SocketAddrV4::new(ip(C1), 40000), SocketAddrV4::new(egress, port), SocketAddrV4::new(ip(SRV), 53),)
    );
    assert_eq!((c.proto, c.started_secs), (ip_proto::UDP, 10));
    assert!(c.group.is_some() && c.rule.is_some(), "the decision that allowed it");
    udp_out(&mut nat, 11, C1, 40000, SRV, 53, &pol);
    assert_eq!(inb(&mut nat, 12, &mut udp(SRV, 53, EG, port)), Ok(Inbound::Forward));
    assert!(drain(&queue).is_empty(), "packets are counted, not logged");
    assert_eq!(expire_all(&mut nat, 12 + 300), 1);
    let ended = drain(&queue);
    assert_eq!(ended.len(), 1);
    let e = ended[0];
    assert_eq!(e.end, Some(NatFlowEnd::Idle));
    assert_eq!((e.started_secs, e.ended_secs), (10, 312));
    let len = udp(C1, 40000, SRV, 53).len() as u64;
    assert_eq!((e.packets_out, e.packets_in, e.bytes_out, e.bytes_in), (2, 1, 2 * len, len));
}

#[test]
fn the_translation_log_names_why_a_flow_ended() {
    let (mut nat, queue) = logging_nat(NatLogMode::All, 1000);
    let pol = policy();
    // A TCP flow that closes: FIN both ways, then the transitory timer.
    let port = handshake(&mut nat, 0, &pol);
    out(&mut nat, 1, &mut tcp(C1, 40000, SRV, 443, 1001, 5001, "FA"), &pol).unwrap();
    inb(&mut nat, 1, &mut tcp(SRV, 443, EG, port, 5001, 1006, "FA")).unwrap();
    drain(&queue);
    assert_eq!(expire_all(&mut nat, 1 + 240), 1);
    assert_eq!(drain(&queue).iter().map(|r| r.end).collect::<Vec<_>>(), vec![Some(NatFlowEnd::TcpClosed)]);
    // A flow whose rule a reload removed ends on its next packet.
    udp_out(&mut nat, 300, C1, 40001, [203, 0, 113, 66], 53, &policy_with(1, &[EG], false));
    drain(&queue);
    let stricter = policy_with(2, &[EG], true);
    assert!(out(&mut nat, 301, &mut udp(C1, 40001, [203, 0, 113, 66], 53), &stricter).is_err());
    assert_eq!(
        drain(&queue).iter().map(|r| r.end).collect::<Vec<_>>(),
        vec![Some(NatFlowEnd::PolicyChanged)]
    );
}

#[test]
fn the_translation_log_samples_and_bounds_its_rate() {
    let pol = policy();
    let (mut nat, queue) = logging_nat(NatLogMode::Sampled { one_in: 4 }, 1000);
    for i in 0..40 {
        udp_out(&mut nat, 5, C1, 41000 + i, SRV, 53, &pol);
    }
    assert_eq!(drain(&queue).len(), 10, "one flow in four");
    expire_all(&mut nat, 1000);
    assert_eq!(drain(&queue).len(), 10, "the same flows' ends, and only theirs");

    // 5 records a second: a burst of 30 new flows sends 5 and counts 25 as suppressed.
    let (mut nat, queue) = logging_nat(NatLogMode::All, 5);
    for i in 0..30 {
        udp_out(&mut nat, 7, C1, 42000 + i, SRV, 53, &pol);
    }
    assert_eq!(drain(&queue).len(), 5);
    assert_eq!(nat.log_suppressed(), 25);

    // Off: nothing, and no figures allocated.
    let (mut nat, queue) = logging_nat(NatLogMode::Off, 1000);
    udp_out(&mut nat, 5, C1, 43000, SRV, 53, &pol);
    assert!(drain(&queue).is_empty() && nat.flow_log.is_none());
}

#[test]
fn reserved_tcp_ports_are_never_allocated_but_udp_keeps_them() {
    let pol = policy();
    let c = NatConfig { reserved_tcp_ports: Some((40000, 40015)), ..cfg() };
    let mut nat = Nat::new(&c, 0);
    let mut syn = tcp(C1, 40000, SRV, 443, 1000, 0, "S");
    assert_eq!(out(&mut nat, 0, &mut syn, &pol), Ok(Outbound::Forward));
    let port = src_of(&syn).1;
    assert!(!(40000..=40015).contains(&port), "TCP 40000 is the L7 path's: got {port}");
    assert_eq!(udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol).1, 40000, "UDP is not reserved");
    // A reply to a reserved port finds no mapping (the kernel, not the NAT, owns those).
    assert_eq!(inb(&mut nat, 0, &mut tcp(SRV, 443, EG, 40005, 1, 1, "SA")), Err(DropReason::NoMapping));
    for i in 0..64 {
        let mut syn = tcp(C2, 40000 + i, SRV, 443, 1, 0, "S");
        out(&mut nat, 0, &mut syn, &pol).unwrap();
        assert!(!(40000..=40015).contains(&src_of(&syn).1));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Live flows (`egressd flows`)
// ---------------------------------------------------------------------------------------------------------------

use super::flows::{FlowFilter, FlowPage, FlowQueries, FlowQuery, FlowState, FLOWS_PER_PAGE};

/// Runs `query` on `nat` through the mailboxes the way the worker and the admin thread do, and returns the flows
/// listed and the number deleted.
fn run_query(nat: &mut Nat, now: u64, query: FlowQuery, pol: &PolicySnapshot) -> (Vec<flows::FlowInfo>, u32) {
    let queries = FlowQueries::new(1);
    queries.ask(0, query, (0..4).map(|_| FlowPage::empty()).collect());
    let mut active = flows::ActiveQuery::new(queries.poll_query(0).expect("the query arrives"));
    let (mut listed, mut deleted) = (Vec::new(), 0);
    for _ in 0..100_000 {
        let step = nat.answer_flow_query(t(now), &mut active, &queries, |a| pol.group_of(a.into()));
        while let Some(page) = queries.take_page(0) {
            assert_eq!(page.query, query.id);
            assert!(page.flows.len() <= FLOWS_PER_PAGE);
            listed.extend_from_slice(&page.flows);
            deleted += page.deleted;
            let done = page.done;
            queries.lend(0, page);
            if done {
                return (listed, deleted);
            }
        }
        assert_ne!(step, None, "pages were lent back, so the worker always has one");
    }
    panic!("the query never finished");
}

fn list(nat: &mut Nat, now: u64, filter: FlowFilter, pol: &PolicySnapshot) -> Vec<flows::FlowInfo> {
    run_query(nat, now, FlowQuery { id: 7, filter, delete: false, limit: u32::MAX }, pol).0
}

#[test]
fn flows_are_listed_with_their_translation_state_and_timers() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    let tcp_port = handshake(&mut nat, 100, &pol);
    let (_, udp_port) = udp_out(&mut nat, 110, C2, 5353, SRV2, 53, &pol);
    let mut flows = list(&mut nat, 130, FlowFilter::default(), &pol);
    flows.sort_by_key(|f| f.proto);
    assert_eq!(flows.len(), 2);
    let (tcp, udp) = (flows[0], flows[1]);
    assert_eq!(
        (tcp.proto, tcp.inside, tcp.egress, tcp.remote, tcp.state),
        (
            ip_proto::TCP,
            SocketAddrV4::new(ip(C1), 40000),
            SocketAddrV4::new(ip(EG), tcp_port),
            SocketAddrV4::new(ip(SRV), 443),
            FlowState::Established
        )
    );
    assert_eq!((tcp.idle_secs, tcp.expires_in_secs), (30, 7440 - 30));
    assert_eq!(
        (udp.state, udp.egress.port(), udp.idle_secs, udp.expires_in_secs),
        (FlowState::Active, udp_port, 20, 280)
    );
    assert_eq!(tcp.counts, None, "packets and bytes are kept only while the translation log is on");
}

#[test]
fn flow_filters_select_by_every_field() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    handshake(&mut nat, 0, &pol);
    udp_out(&mut nat, 0, C2, 5353, SRV2, 53, &pol);
    udp_out(&mut nat, 0, C2, 5354, SRV, 123, &pol);
    let count = |nat: &mut Nat, f: FlowFilter| list(nat, 1, f, &pol).len();
    let any = FlowFilter::default();
    assert_eq!(count(&mut nat, any), 3);
    assert_eq!(count(&mut nat, FlowFilter { inside: Some(Prefix::truncating(ip(C2).into(), 32)), ..any }), 2);
    assert_eq!(count(&mut nat, FlowFilter { inside: Some(Prefix::truncating(ip(C1).into(), 8)), ..any }), 3);
    assert_eq!(count(&mut nat, FlowFilter { inside_port: Some(5354), ..any }), 1);
    assert_eq!(
        count(&mut nat, FlowFilter { remote: Some(Prefix::truncating(ip(SRV).into(), 32)), ..any }),
        2
    );
    assert_eq!(count(&mut nat, FlowFilter { remote_port: Some(53), ..any }), 1);
    assert_eq!(count(&mut nat, FlowFilter { proto: Some(ip_proto::TCP), ..any }), 1);
    assert_eq!(count(&mut nat, FlowFilter { state: Some(FlowState::Established), ..any }), 1);
    assert_eq!(count(&mut nat, FlowFilter { state: Some(FlowState::SynSent), ..any }), 0);
    assert_eq!(count(&mut nat, FlowFilter { egress_ip: Some(ip(EG)), ..any }), 3);
    assert_eq!(count(&mut nat, FlowFilter { egress_ip: Some(ip(EG2)), ..any }), 0);
    let apps = pol.group_of(ip(C1).into());
    assert!(apps.is_some());
    assert_eq!(count(&mut nat, FlowFilter { group: apps, ..any }), 3);
    let other = pol.group_of(Ipv4Addr::new(172, 16, 0, 1).into());
    assert_eq!(count(&mut nat, FlowFilter { group: other, ..any }), 0);
}

#[test]
fn a_listing_of_many_flows_comes_in_bounded_pages_and_honours_its_limit() {
    let pol = policy();
    let mut nat = Nat::new(&NatConfig { max_flows: 4096, max_flows_per_source: 4096, ..cfg() }, 0);
    for i in 0..2000u16 {
        udp_out(&mut nat, 0, C1, 20000 + i, SRV, 53, &pol);
    }
    let flows = list(&mut nat, 1, FlowFilter::default(), &pol);
    assert_eq!(flows.len(), 2000);
    let mut ports: Vec<u16> = flows.iter().map(|f| f.inside.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 2000, "every flow once");
    let query = FlowQuery { id: 9, filter: FlowFilter::default(), delete: false, limit: 700 };
    assert_eq!(run_query(&mut nat, 1, query, &pol).0.len(), 700);
}

#[test]
fn deleting_flows_removes_them_frees_their_ports_and_keeps_the_rest() {
    let pol = policy();
    let (mut nat, queue) = logging_nat(NatLogMode::All, 1000);
    let tcp_port = handshake(&mut nat, 0, &pol);
    let (_, udp_port) = udp_out(&mut nat, 0, C2, 5353, SRV2, 53, &pol);
    drain(&queue);
    let filter = FlowFilter { inside: Some(Prefix::truncating(ip(C1).into(), 32)), ..FlowFilter::default() };
    let (listed, deleted) = run_query(&mut nat, 5, FlowQuery { id: 3, filter, delete: true, limit: 0 }, &pol);
    assert_eq!((listed.len(), deleted), (0, 1));
    assert_eq!(nat.stats().flows(), 1);
    assert_eq!(nat.mapping_of(ip(C1), 40000, ip_proto::TCP), None, "its mapping went with its last flow");
    let ended = drain(&queue);
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].end, ended[0].inside.port()), (Some(NatFlowEnd::Deleted), 40000));
    // The deleted flow's replies find nothing; the other flow still translates.
    assert_eq!(
        inb(&mut nat, 6, &mut tcp(SRV, 443, EG, tcp_port, 5001, 1001, "A")),
        Err(DropReason::NoMapping)
    );
    assert_eq!(inb(&mut nat, 6, &mut udp(SRV2, 53, EG, udp_port)), Ok(Inbound::Forward));
    // Counters show while the log is on.
    let left = list(&mut nat, 7, FlowFilter::default(), &pol);
    let counts = left[0].counts.expect("the log keeps counts");
    assert_eq!((counts.packets_out, counts.packets_in), (1, 1));
}

#[test]
fn an_abandoned_query_gives_way_to_the_next_one() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    udp_out(&mut nat, 0, C1, 40000, SRV, 53, &pol);
    let queries = FlowQueries::new(1);
    let first = FlowQuery { id: 1, filter: FlowFilter::default(), delete: false, limit: u32::MAX };
    queries.ask(0, first, vec![FlowPage::empty()]);
    let mut active = flows::ActiveQuery::new(queries.poll_query(0).unwrap());
    assert_eq!(nat.answer_flow_query(t(1), &mut active, &queries, |_| None), Some(true));
    // The admin thread gave up before reading; a new query reclaims the page.
    queries.ask(0, FlowQuery { id: 2, ..first }, Vec::new());
    let mut active = flows::ActiveQuery::new(queries.poll_query(0).unwrap());
    assert_eq!(nat.answer_flow_query(t(1), &mut active, &queries, |_| None), Some(true));
    let page = queries.take_page(0).expect("the reclaimed page carries the answer");
    assert_eq!((page.query, page.flows.len(), page.done), (2, 1, true));
    // No page lent: the worker waits instead of spinning through the table.
    let mut active = flows::ActiveQuery::new(FlowQuery { id: 3, ..first });
    assert_eq!(nat.answer_flow_query(t(1), &mut active, &queries, |_| None), None);
}

// ---------------------------------------------------------------------------------------------------------------
// Invariants (what the fuzzer checks after every frame)
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn the_invariant_check_passes_on_real_traffic_and_catches_broken_tables() {
    let pol = policy();
    let mut nat = Nat::new(&cfg(), 0);
    assert_eq!(nat.check_invariants(), Ok(()));
    handshake(&mut nat, 0, &pol);
    udp_out(&mut nat, 0, C1, 40000, SRV2, 53, &pol);
    udp_out(&mut nat, 0, C2, 5353, SRV, 53, &pol);
    assert_eq!(nat.check_invariants(), Ok(()));
    // A mapping counting one session too many.
    let mut broken = Nat::new(&cfg(), 0);
    udp_out(&mut broken, 0, C1, 40000, SRV2, 53, &pol);
    let mid =
        broken.map_idx.find(broken.map_hash(u32::from(ip(C1)), 40000, ip_proto::UDP), |_| true).unwrap();
    broken.mappings[mid as usize].refs += 1;
    assert!(broken.check_invariants().unwrap_err().contains("counts 2 sessions, 1 use it"));
    // A second mapping claiming the first one's external port.
    let mut broken = Nat::new(&cfg(), 0);
    udp_out(&mut broken, 0, C1, 40000, SRV2, 53, &pol);
    udp_out(&mut broken, 0, C2, 40001, SRV2, 53, &pol);
    let first = broken.mappings.iter().position(|m| m.in_port == 40000).unwrap();
    let second = broken.mappings.iter().position(|m| m.in_port == 40001).unwrap();
    broken.mappings[second].ext_port = broken.mappings[first].ext_port;
    assert!(broken.check_invariants().is_err());
    // Expiry keeps them.
    expire_all(&mut nat, 100_000);
    assert_eq!(nat.check_invariants(), Ok(()));
    assert_eq!(nat.stats().flows(), 0);
}
