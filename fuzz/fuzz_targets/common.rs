//! What the NAT and pipeline targets share: a small policy, a next-hop table, and frames built from a structured
//! description, so that most inputs are packets the NAT takes seriously (valid checksums, addresses and ports
//! from small pools that collide) rather than noise the first check refuses.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use dataplane::nexthop::{InterfaceTable, NextHopTable, Route};
use dataplane::policy::{Action, PolicyBuilder, PolicySnapshot, ProtoMatch, RuleSpec};
use etherparse::{Icmpv4Type, PacketBuilder};

pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
pub const EXT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
pub const EGRESS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)];

pub const INSIDE: [[u8; 4]; 4] = [[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3], [10, 0, 0, 4]];
/// Allowed, denied by rule, allowed, our own egress IP (hairpin), an inside host, not ours.
pub const REMOTE: [[u8; 4]; 6] = [
    [203, 0, 113, 5],
    [203, 0, 113, 200],
    [198, 51, 100, 7],
    [192, 0, 2, 10],
    [10, 0, 0, 2],
    [192, 0, 2, 99],
];
pub const PORTS: [u16; 8] = [40000, 40001, 53, 1, 1023, 1024, 65535, 0];
pub const REMOTE_PORTS: [u16; 5] = [53, 80, 443, 7, 9];

/// [`policy`] of `generation`, compiled once per process: compiling the tables costs more than running a whole
/// input, and a snapshot never changes once built, so inputs stay reproducible.
pub fn policy_of_generation(generation: u64) -> Arc<PolicySnapshot> {
    static BUILT: Mutex<Vec<Arc<PolicySnapshot>>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    while built.len() as u64 <= generation {
        let next = built.len() as u64;
        built.push(Arc::new(policy(next)));
    }
    built[generation as usize].clone()
}

/// 10.0.0.0/8 leaves from 192.0.2.10/.11 to anything but 203.0.113.128/25.
pub fn policy(generation: u64) -> PolicySnapshot {
    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", EGRESS.to_vec());
    b.add_source(g, "10.0.0.0/8".parse().unwrap());
    b.add_rule(RuleSpec::new(
        g,
        vec!["203.0.113.128/25".parse().unwrap()],
        ProtoMatch::Any,
        vec![],
        Action::Deny,
    ));
    b.add_rule(RuleSpec::new(g, vec!["0.0.0.0/0".parse().unwrap()], ProtoMatch::Any, vec![], Action::Allow));
    b.build(generation).unwrap()
}

/// The inside on-link with three of its four hosts resolved (the fourth makes frames wait); the outside via
/// 192.0.2.2.
pub fn next_hops() -> NextHopTable {
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    NextHopTable {
        inside: InterfaceTable::new(
            GW_IN_MAC,
            vec![Route { destination: ip("10.0.0.0"), prefix_len: 8, gateway: None }],
            INSIDE[..3].iter().map(|a| (Ipv4Addr::from(*a), CLIENT_MAC)).collect(),
        ),
        outside: InterfaceTable::new(
            GW_OUT_MAC,
            vec![
                Route { destination: ip("0.0.0.0"), prefix_len: 0, gateway: Some(ip("192.0.2.2")) },
                Route { destination: ip("192.0.2.0"), prefix_len: 24, gateway: None },
            ],
            vec![(ip("192.0.2.2"), EXT_MAC)],
        ),
        outside_from: Vec::new(),
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Proto {
    Tcp,
    Udp,
    Echo,
}

/// One packet between an inside endpoint and a remote one, either way.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Pkt {
    pub from_outside: bool,
    pub proto: Proto,
    pub inside: u8,
    pub inside_port: u8,
    pub remote: u8,
    pub remote_port: u8,
    /// From outside: which egress IP, and whether to aim at the mapping the inside endpoint really has.
    pub egress: u8,
    pub aim: bool,
    pub raw_port: u16,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ttl: u8,
    pub payload: u8,
}

pub struct Endpoints {
    pub src: [u8; 4],
    pub sport: u16,
    pub dst: [u8; 4],
    pub dport: u16,
}

impl Pkt {
    pub fn proto_number(&self) -> u8 {
        match self.proto {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Echo => 1,
        }
    }

    pub fn inside_endpoint(&self) -> (Ipv4Addr, u16) {
        (
            Ipv4Addr::from(INSIDE[usize::from(self.inside) % INSIDE.len()]),
            PORTS[usize::from(self.inside_port) % PORTS.len()],
        )
    }

    /// Source and destination; `mapping` answers the external endpoint an inside endpoint has, if any.
    pub fn endpoints(&self, mapping: impl Fn(Ipv4Addr, u16, u8) -> Option<(Ipv4Addr, u16)>) -> Endpoints {
        let (inside, inside_port) = self.inside_endpoint();
        let remote = REMOTE[usize::from(self.remote) % REMOTE.len()];
        let remote_port = REMOTE_PORTS[usize::from(self.remote_port) % REMOTE_PORTS.len()];
        if self.from_outside {
            let (ip, port) = match mapping(inside, inside_port, self.proto_number()) {
                Some(m) if self.aim => m,
                _ => (EGRESS[usize::from(self.egress) % EGRESS.len()], self.raw_port),
            };
            Endpoints { src: remote, sport: remote_port, dst: ip.octets(), dport: port }
        } else {
            Endpoints { src: inside.octets(), sport: inside_port, dst: remote, dport: remote_port }
        }
    }

    /// The IPv4 packet (no Ethernet header).
    pub fn ip_packet(&self, e: &Endpoints) -> Vec<u8> {
        let ttl = self.ttl.max(1);
        let payload = vec![0x5a; usize::from(self.payload % 64)];
        let b = PacketBuilder::ipv4(e.src, e.dst, ttl);
        let mut out = Vec::new();
        match self.proto {
            Proto::Tcp => {
                let mut t = b.tcp(e.sport, e.dport, self.seq, 65535);
                if self.flags & 1 != 0 {
                    t = t.syn();
                }
                if self.flags & 2 != 0 {
                    t = t.ack(self.ack);
                }
                if self.flags & 4 != 0 {
                    t = t.fin();
                }
                if self.flags & 8 != 0 {
                    t = t.rst();
                }
                if self.flags & 16 != 0 {
                    t = t.psh();
                }
                t.write(&mut out, &payload).unwrap();
            }
            Proto::Udp => b.udp(e.sport, e.dport).write(&mut out, &payload).unwrap(),
            Proto::Echo => {
                // From inside a request with the inside port as identifier; from outside a reply to the port.
                let id = if self.from_outside { e.dport } else { e.sport };
                let ty = if self.from_outside == (self.flags & 1 == 0) {
                    Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id, seq: self.seq as u16 })
                } else {
                    Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id, seq: self.seq as u16 })
                };
                b.icmpv4(ty).write(&mut out, &payload).unwrap();
            }
        }
        out
    }
}

/// An Ethernet frame around `ip`, addressed to the gateway's side it arrives on.
pub fn frame(from_outside: bool, ip: &[u8]) -> Vec<u8> {
    let (src, dst) = if from_outside { (EXT_MAC, GW_OUT_MAC) } else { (CLIENT_MAC, GW_IN_MAC) };
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(ip);
    f
}

/// An ICMP error from `src` to `dst` quoting `quoted` (cut to `cut` bytes when shorter).
pub fn icmp_error(src: [u8; 4], dst: [u8; 4], kind: u8, quoted: &[u8], cut: usize) -> Vec<u8> {
    let ty = match kind % 4 {
        0 => Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
        1 => Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 },
        ),
        2 => Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        _ => {
            Icmpv4Type::ParameterProblem(etherparse::icmpv4::ParameterProblemHeader::PointerIndicatesError(0))
        }
    };
    let quoted = &quoted[..quoted.len().min(cut)];
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).icmpv4(ty).write(&mut out, quoted).unwrap();
    out
}
