//! Criterion throughput of the pure pipeline (`Pipeline::process`, no I/O) on prebuilt batches of 1024 64-byte
//! IPv4/UDP frames, `begin_batch` every 64 frames as the worker does. `Throughput::Elements`: packets/s per core.
//!
//! `process` rewrites frames in place (TTL, MACs), so each iteration gets a fresh copy of the batch through
//! `iter_batched_ref`: the 64 KiB copy is setup and is not timed.
//!
//! Until NAT is merged there is no conntrack: "allowed" means judged by the policy and forwarded (the per-packet
//! policy lookup is the new-flow path of the later NAT pipeline); replies pass outside → inside untranslated.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

#[path = "support.rs"]
mod support;
use support::{batch, mixed_pattern, pipeline, run, Kind, BATCH};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    let cases: [(&str, Vec<Kind>); 4] = [
        // Allowed UDP from inside, 1024 flows: parse, policy lookup, route, TTL, MACs.
        ("allowed", vec![Kind::Allowed]),
        // Default-denied UDP from inside: parse, policy lookup, drop counted.
        ("denied", vec![Kind::Denied]),
        // Replies from outside: parse, route, TTL, MACs (no policy).
        ("replies", vec![Kind::Reply]),
        // 80 % allowed, 15 % replies, 5 % denied, interleaved.
        ("mixed_80_15_5", mixed_pattern()),
    ];
    for rules in [10usize, 10_000, 100_000] {
        let mut p = pipeline(rules);
        for (name, pattern) in &cases {
            if *name == "replies" && rules != 10 {
                continue; // replies never consult the policy
            }
            let frames = batch(pattern);
            group.bench_function(format!("{name}/{rules}_rules"), |b| {
                b.iter_batched_ref(
                    || frames.clone(),
                    |frames| black_box(run(&mut p, frames)),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
