//! No allocation per packet in steady state: a counting global allocator around `System` proves that
//! `Pipeline::process` (with `begin_batch` every 64 frames, as the worker calls it) allocates nothing over
//! 10 000 packets of each kind once warm (established flows, denials, replies, the 80/15/5 mix, new flows), for a
//! 10-rule and a 100 000-rule policy.
//!
//! The counting allocator comes from the `allocation-counter` crate (a dev-dependency that installs itself as the
//! global allocator of this test binary and counts per thread), so the repository's only `unsafe` stays in
//! `dataplane::xsk`.

#[path = "../bench/support.rs"]
mod support;
use support::{
    batch, established, mixed_pattern, new_flows, pipeline, run, run_handed_over, two_workers, Kind, BATCH,
};

/// Allocations made on this thread while `f` runs.
fn allocations_during(f: impl FnOnce()) -> u64 {
    allocation_counter::measure(f).count_total
}

#[test]
fn the_counter_sees_allocations() {
    let n = allocations_during(|| drop(std::hint::black_box(vec![1u8; 100])));
    assert!(n >= 1, "the counting allocator must see a Vec allocation");
}

#[test]
fn pipeline_process_does_not_allocate_per_packet_in_steady_state() {
    let cases: [(&str, Vec<Kind>); 4] = [
        ("established", vec![Kind::Allowed]),
        ("denied", vec![Kind::Denied]),
        ("replies", vec![Kind::Reply]),
        ("mixed 80/15/5", mixed_pattern()),
    ];
    for rules in [10, 100_000] {
        let mut p = pipeline(rules);
        for (name, pattern) in &cases {
            let template = established(&mut p, batch(pattern));
            // Fresh copies prepared outside the counted region (`process` decrements the TTL in place).
            let rounds = 10_000usize.div_ceil(BATCH);
            let mut copies: Vec<_> = (0..rounds + 1).map(|_| template.clone()).collect();
            // Warm up: first lookups, lazily built state.
            let warm = run(&mut p, &mut copies[rounds]);
            let mut forwarded = 0;
            let n = allocations_during(|| {
                for copy in &mut copies[..rounds] {
                    forwarded += run(&mut p, copy);
                }
            });
            assert_eq!(n, 0, "{name}, {rules} rules: {n} allocations over {} packets", rounds * BATCH);
            let expected = rounds * template.kinds.iter().filter(|&&k| k != Kind::Denied).count();
            assert_eq!(
                forwarded, expected,
                "{name}, {rules} rules: forwarded count (warm-up forwarded {warm})"
            );
        }
    }
}

#[test]
fn new_flows_do_not_allocate_either() {
    let mut p = pipeline(10);
    let warm = run(&mut p, &mut new_flows(0, BATCH));
    assert_eq!(warm, BATCH);
    let mut frames: Vec<_> = (1..=10).map(|i| new_flows(i * BATCH as u64, BATCH)).collect();
    let mut forwarded = 0;
    let n = allocations_during(|| {
        for f in &mut frames {
            forwarded += run(&mut p, f);
        }
    });
    assert_eq!(n, 0, "{n} allocations over {} new flows", 10 * BATCH);
    assert_eq!(forwarded, 10 * BATCH);
    assert_eq!(p.nat().stats().flows() as usize, 11 * BATCH);
}

/// Packets handed to the worker that owns their endpoint: copied into a preallocated ring and out into the
/// owner's scratch buffer, so the hand-off allocates nothing.
#[test]
fn handing_packets_to_their_owner_does_not_allocate() {
    let (mut owner, mut arrived) = two_workers(10);
    let template = established(&mut owner, batch(&[Kind::Allowed]));
    let mut scratch = vec![0u8; dataplane::handoff::HANDOFF_JUMBO_BYTES];
    let mut copies: Vec<_> = (0..11).map(|_| template.clone()).collect();
    assert_eq!(run_handed_over(&mut arrived, &mut owner, &mut copies[10], &mut scratch), BATCH);
    let mut forwarded = 0;
    let n = allocations_during(|| {
        for copy in &mut copies[..10] {
            forwarded += run_handed_over(&mut arrived, &mut owner, copy, &mut scratch);
        }
    });
    assert_eq!(n, 0, "{n} allocations over {} handed-over packets", 10 * BATCH);
    assert_eq!(forwarded, 10 * BATCH);
    assert_eq!(arrived.stats().handed_off.get(), 11 * BATCH as u64);
}

/// Out of NAT ports with `icmp_on_out_of_ports`: the ICMP 3/13 is written into the pipeline's own buffer, so
/// answering allocates nothing either.
#[test]
fn icmp_errors_for_out_of_ports_do_not_allocate() {
    use dataplane::drop::DropReason;
    use dataplane::handoff::Handoffs;
    use dataplane::icmp::IcmpErrors;
    use dataplane::nat::NatConfig;
    use dataplane::pipeline::{Action, NextHops, Pipeline};
    use dataplane::stats::WorkerStats;
    use dataplane::time::Instant;
    use dataplane::Side;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    // Worker 5 of 64 owns the 1008 high ports 6064-7071 of the egress IP (and the inside endpoints with those
    // source ports): 10.10.0.2 fills them all, then 10.10.0.3's new endpoints there find none.
    let nat = NatConfig {
        workers: 64,
        max_flows: 4096,
        max_flows_per_source: 4096,
        icmp_errors: IcmpErrors { on_out_of_ports: true, per_sec: 1_000_000, burst: 1_000_000 },
        ..NatConfig::default()
    };
    let mut p = Pipeline::new(
        Arc::new(WorkerStats::default()),
        NextHops::fixed(support::lab_table()),
        Arc::new(support::policy(10)),
        &nat,
        5,
        Arc::new(Handoffs::new(64, 8)),
    );
    let (client, server) = (Ipv4Addr::new(10, 10, 0, 2), Ipv4Addr::new(203, 0, 113, 10));
    for port in 6064..7072 {
        let mut f = support::outbound(client, port, server, 7);
        assert!(matches!(p.process(Instant::ZERO, Side::Inside, &mut f), Action::Forward { .. }));
    }
    let other = Ipv4Addr::new(10, 10, 0, 3);
    let mut frames: Vec<_> = (6064..7064).map(|port| support::outbound(other, port, server, 7)).collect();
    let warm = p.process(Instant::ZERO, Side::Inside, &mut support::outbound(other, 7071, server, 7));
    assert!(matches!(warm, Action::Reply { .. }), "{warm:?}");
    let mut replies = 0;
    let n = allocations_during(|| {
        for f in &mut frames {
            if let Action::Reply { len, .. } = p.process(Instant::ZERO, Side::Inside, f) {
                replies += usize::from(p.reply_frame()[len - 1] == f[f.len() - 1]);
            }
        }
    });
    assert_eq!(n, 0, "{n} allocations over {} ICMP errors", frames.len());
    assert_eq!(replies, frames.len());
    assert_eq!(p.stats().drops(DropReason::OutOfPorts), 1001);
}
