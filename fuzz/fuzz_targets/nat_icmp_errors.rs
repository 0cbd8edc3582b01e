//! The NAT engine's ICMP error handling: a few flows are set up (both protocols, several inside endpoints), then
//! ICMP errors arrive from outside (inbound leg) and from inside (outbound leg) quoting arbitrary bytes — a real
//! flow's packet with bytes changed, or noise. Never a panic; a flow is never ended or refreshed by an error;
//! the tables keep their invariants.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::*;
use dataplane::nat::{Nat, NatConfig};
use dataplane::time::Instant;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Error {
    from_outside: bool,
    /// The flow the quote starts from.
    about: Pkt,
    kind: u8,
    cut: u8,
    /// Changes to the quoted bytes (offset, value).
    edits: Vec<(u8, u8)>,
    /// Or noise instead of a quoted packet.
    noise: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    flows: Vec<Pkt>,
    errors: Vec<Error>,
}

fuzz_target!(|input: Input| {
    let policy = policy_of_generation(1);
    let mut nat = Nat::new(&NatConfig { max_flows: 32, workers: 1, ..NatConfig::default() }, 0);
    let now = Instant::from_secs(10);
    for p in input.flows.iter().take(16) {
        let mut p = *p;
        p.from_outside = false;
        let mut ip = p.ip_packet(&p.endpoints(|_, _, _| None));
        let _ = nat.outbound(now, &mut ip, &policy);
    }
    let flows_before = nat.stats().flows();
    for e in input.errors.iter().take(32) {
        let mapping = |ip, port, proto| nat.mapping_of(ip, port, proto);
        let mut quoted_pkt = e.about;
        quoted_pkt.from_outside = !e.from_outside;
        quoted_pkt.aim = true;
        let ends = quoted_pkt.endpoints(mapping);
        let mut quoted = match &e.noise {
            Some(noise) => noise.clone(),
            None => quoted_pkt.ip_packet(&ends),
        };
        if e.from_outside && e.noise.is_none() {
            // A packet that left carries the egress endpoint as its source.
            let (inside, port) = e.about.inside_endpoint();
            if let Some((egress, ext)) = mapping(inside, port, e.about.proto_number()) {
                quoted[12..16].copy_from_slice(&egress.octets());
                if quoted.len() >= 24 && e.about.proto_number() != 1 {
                    quoted[20..22].copy_from_slice(&ext.to_be_bytes());
                }
            }
        }
        for &(at, value) in e.edits.iter().take(4) {
            if !quoted.is_empty() {
                let at = usize::from(at) % quoted.len();
                quoted[at] = value;
            }
        }
        let (src, dst) = if e.from_outside {
            (ends.dst, EGRESS[usize::from(e.about.egress) % 2].octets())
        } else {
            (ends.dst, ends.src)
        };
        let mut error = icmp_error(src, dst, e.kind, &quoted, 8 + usize::from(e.cut));
        if e.from_outside {
            let _ = nat.inbound(now, &mut error);
        } else {
            let _ = nat.outbound(now, &mut error, &policy);
        }
        assert_eq!(nat.stats().flows(), flows_before, "an ICMP error created or ended a flow");
        if let Err(broken) = nat.check_invariants() {
            panic!("NAT invariant broken after {e:?}: {broken}");
        }
    }
});
