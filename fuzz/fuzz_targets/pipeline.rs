//! The frame pipeline end to end on a virtual clock: frames in both directions (well-formed packets from small
//! address and port pools, ICMP errors quoting them, corrupted copies, raw bytes) against a small policy, with
//! reloads and time passing. After every frame: no panic, the action fits the frame, and the NAT's tables hold
//! their invariants (the mapping stays a bijection, no port is held twice, counts and indexes agree).
#![no_main]

mod common;

use std::sync::Arc;

use arbitrary::Arbitrary;
use common::*;
use dataplane::nat::NatConfig;
use dataplane::pipeline::{Action, NextHops, Pipeline};
use dataplane::stats::WorkerStats;
use dataplane::time::Instant;
use dataplane::Side;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Packet(Pkt),
    /// An ICMP error about `about`: from outside, about a packet that left (quoting its translated form); from
    /// inside, about one that came in.
    IcmpError {
        about: Pkt,
        kind: u8,
        cut: u8,
    },
    /// A packet with one byte changed (checksums then usually fail; sometimes they do not matter).
    Corrupt {
        pkt: Pkt,
        at: u16,
        value: u8,
    },
    Raw {
        from_outside: bool,
        bytes: Vec<u8>,
    },
    Advance {
        secs: u16,
    },
    Reload,
}

fuzz_target!(|ops: Vec<Op>| {
    let policy = Arc::new(dataplane::policy::SharedPolicy::new(policy_of_generation(1)));
    let nat = NatConfig { max_flows: 64, max_flows_per_source: 24, ..NatConfig::default() };
    let mut pipeline = Pipeline::single(
        Arc::new(WorkerStats::default()),
        NextHops::fixed(next_hops()),
        policy.clone(),
        &nat,
    );
    let mut now = Instant::from_secs(1);
    let mut generation = 1;
    let mut buf = vec![0u8; 2048];
    for op in ops.iter().take(256) {
        pipeline.begin_batch();
        let frame = {
            let mapping = |ip, port, proto| pipeline.nat().mapping_of(ip, port, proto);
            match op {
                Op::Packet(p) => {
                    Some((p.from_outside, frame(p.from_outside, &p.ip_packet(&p.endpoints(mapping)))))
                }
                Op::IcmpError { about, kind, cut } => {
                    // The quoted packet as it travelled: outbound ones with their translated source.
                    let mut quoted = *about;
                    quoted.from_outside = !about.from_outside;
                    let e = quoted.endpoints(mapping);
                    let mut ip = quoted.ip_packet(&e);
                    let (src, dst) = if about.from_outside {
                        // An error from a remote router about a packet that left: it quotes the egress endpoint.
                        if let Some((egress, port)) = {
                            let (i, p) = about.inside_endpoint();
                            mapping(i, p, about.proto_number())
                        } {
                            ip[12..16].copy_from_slice(&egress.octets());
                            if ip.len() >= 24 && about.proto_number() != 1 {
                                ip[20..22].copy_from_slice(&port.to_be_bytes());
                            }
                        }
                        (e.dst, [ip[12], ip[13], ip[14], ip[15]])
                    } else {
                        // An inside host's error about a packet that came in.
                        (e.dst, e.src)
                    };
                    let error = icmp_error(src, dst, *kind, &ip, 8 + usize::from(*cut));
                    Some((about.from_outside, frame(about.from_outside, &error)))
                }
                Op::Corrupt { pkt, at, value } => {
                    let mut f = frame(pkt.from_outside, &pkt.ip_packet(&pkt.endpoints(mapping)));
                    let at = usize::from(*at) % f.len();
                    f[at] = *value;
                    Some((pkt.from_outside, f))
                }
                Op::Raw { from_outside, bytes } => Some((*from_outside, bytes.clone())),
                Op::Advance { secs } => {
                    now = Instant::from_secs(now.as_nanos() as u64 / 1_000_000_000 + u64::from(*secs));
                    None
                }
                Op::Reload => {
                    generation += 1;
                    policy.store(policy_of_generation(generation));
                    None
                }
            }
        };
        if let Some((from_outside, f)) = frame {
            let len = f.len().min(buf.len());
            buf[..len].copy_from_slice(&f[..len]);
            let side = if from_outside { Side::Outside } else { Side::Inside };
            match pipeline.process(now, side, &mut buf[..len]) {
                Action::Forward { len: out, .. } => {
                    assert!(out <= len, "forwards {out} bytes of a {len}-byte frame")
                }
                Action::Reply { len: out, .. } => assert!(out <= pipeline.reply_frame().len()),
                Action::Drop(_) | Action::HandedOff | Action::Held | Action::Punted => {}
            }
        }
        if pipeline.has_held() {
            pipeline.release_held(now, |_, f| assert!(f.len() <= 2048));
        }
        pipeline.poll_expiry(now, 64);
        if let Err(broken) = pipeline.nat().check_invariants() {
            panic!("NAT invariant broken after {op:?}: {broken}");
        }
    }
});
