//! Criterion throughput of the pure pipeline (`Pipeline::process`: parse, policy, conntrack + NAT, route,
//! rewrite; no I/O) on prebuilt batches of 1024 64-byte IPv4/UDP frames, `begin_batch` every 64 frames as the
//! worker does. `Throughput::Elements`: packets/s on one core.
//!
//! `process` rewrites frames in place (TTL, addresses, ports, MACs), so every iteration runs on a fresh copy of
//! its batch, made outside the timed region (`iter_batched_ref`, or before the clock starts in `iter_custom`).
//!
//! `cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "support.rs"]
mod support;
use support::{
    batch, established, mixed_pattern, new_flows, pipeline, run, spread_flows, Batch, Kind, BATCH,
};

/// Benches `process` over copies of `frames` through `p`.
fn bench_batch(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    p: &mut dataplane::pipeline::Pipeline,
    frames: &Batch,
) {
    c.bench_function(name, |b| {
        b.iter_batched_ref(|| frames.clone(), |frames| black_box(run(p, frames)), BatchSize::SmallInput)
    });
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    for rules in [10usize, 10_000, 100_000] {
        let mut p = pipeline(rules);
        // Outbound UDP of 1024 established flows: parse, conntrack hit, SNAT rewrite, route, TTL, MACs.
        let est = established(&mut p, batch(&[Kind::Allowed]));
        bench_batch(&mut group, &format!("established/{rules}_rules"), &mut p, &est);
        // Default-denied UDP from inside: parse, conntrack miss, policy lookup, drop counted.
        bench_batch(&mut group, &format!("denied/{rules}_rules"), &mut p, &batch(&[Kind::Denied]));
        // 80 % established outbound, 15 % their replies, 5 % denied, interleaved.
        let mixed = established(&mut p, batch(&mixed_pattern()));
        bench_batch(&mut group, &format!("mixed_80_15_5/{rules}_rules"), &mut p, &mixed);
        if rules == 10 {
            // Replies to 1024 established flows: parse, reverse lookup, DNAT rewrite, route, TTL, MACs.
            let replies = established(&mut p, batch(&[Kind::Reply]));
            bench_batch(&mut group, "replies/10_rules", &mut p, &replies);
        }
        if rules != 10_000 {
            // A new flow per packet: policy lookup, NAT port allocation, conntrack insert, rewrite. A fresh
            // pipeline (untimed) whenever the table nears 900 000 flows.
            group.bench_function(format!("new_flows/{rules}_rules"), |b| {
                let mut q = pipeline(rules);
                let mut next = 0u64;
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        if next >= 900_000 {
                            q = pipeline(rules);
                            next = 0;
                        }
                        let mut frames = new_flows(next, BATCH);
                        next += BATCH as u64;
                        let start = Instant::now();
                        black_box(run(&mut q, &mut frames));
                        spent += start.elapsed();
                    }
                    spent
                })
            });
        }
    }

    // Live flows: the same established traffic with 1 flow in the table vs 1 000 000 (10-rule policy).
    let mut one = pipeline(10);
    let single = established(&mut one, spread_flows(0, 0, BATCH));
    bench_batch(&mut group, "established_live_flows/1", &mut one, &single);
    let mut big = pipeline(10);
    let mut filled = 0;
    for chunk in 0..(1_000_000 / BATCH) {
        filled += run(&mut big, &mut spread_flows(chunk * BATCH, 1, BATCH));
    }
    assert!(big.nat().stats().flows() as usize >= filled * 99 / 100, "1 M flows should be live");
    // 64 batches, each 1024 flows scattered over the table (stride 977), visited in turn so caches stay cold.
    let batches: Vec<Batch> = (0..64).map(|i| spread_flows(i * 15_013, 977, BATCH)).collect();
    let mut turn = 0usize;
    group.bench_function("established_live_flows/1000000", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let mut frames = batches[turn % batches.len()].clone();
                turn += 1;
                let start = Instant::now();
                black_box(run(&mut big, &mut frames));
                spent += start.elapsed();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
