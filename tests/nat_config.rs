//! `[nat]` from a TOML file drives the engine: the configured UDP timeout and per-worker share take effect.

use std::net::Ipv4Addr;

use dataplane::drop::DropReason;
use dataplane::nat::{reply_owner, Nat, Outbound};
use dataplane::policy::{Action, PolicyBuilder, ProtoMatch, RuleSpec};
use dataplane::time::Instant;
use egressd::config::{parse, Source};

#[test]
fn nat_section_configures_the_engine() {
    let text =
        "[dataplane]\ninside = \"in0\"\noutside = \"out0\"\n\n[nat]\nmax_flows = 4\nudp_timeout = \"2m\"\n";
    let loaded = parse(Source::new("egressd.toml", text)).unwrap();
    let engine = loaded.config.nat.to_engine(2);
    assert_eq!((engine.max_flows, engine.workers, engine.timeouts.udp_secs), (2, 2, 120));

    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", vec![Ipv4Addr::new(192, 0, 2, 10)]);
    b.add_source(g, "10.0.0.0/8".parse().unwrap());
    b.add_rule(RuleSpec::new(g, vec!["0.0.0.0/0".parse().unwrap()], ProtoMatch::Any, vec![], Action::Allow));
    let pol = b.build(1).unwrap();

    let mut nat = Nat::new(&engine, 1);
    let mut pkts: Vec<Vec<u8>> = (0..3u16)
        .map(|i| {
            let mut v = Vec::new();
            etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 5], 64)
                .udp(50000 + i, 53)
                .write(&mut v, b"q")
                .unwrap();
            v
        })
        .collect();
    assert_eq!(nat.outbound(Instant::ZERO, &mut pkts[0], &pol), Ok(Outbound::Forward));
    assert_eq!(nat.outbound(Instant::ZERO, &mut pkts[1], &pol), Ok(Outbound::Forward));
    // This worker's share of max_flows = 4 over 2 workers is 2.
    assert_eq!(nat.outbound(Instant::ZERO, &mut pkts[2], &pol), Err(DropReason::ConntrackFull));
    let ext = u16::from_be_bytes([pkts[0][20], pkts[0][21]]);
    assert_eq!(reply_owner(2, Ipv4Addr::new(192, 0, 2, 10), 17, ext), 1);

    // The configured 2 min UDP timeout.
    assert_eq!(nat.poll_expiry(Instant::from_secs(119), 10), 0);
    assert_eq!(nat.poll_expiry(Instant::from_secs(120), 10), 2);
    let mut reply = Vec::new();
    etherparse::PacketBuilder::ipv4([203, 0, 113, 5], [192, 0, 2, 10], 64)
        .udp(53, ext)
        .write(&mut reply, b"a")
        .unwrap();
    assert_eq!(nat.inbound(Instant::from_secs(121), &mut reply), Err(DropReason::NoMapping));
}
