//! Criterion throughput of the pure pipeline (`Pipeline::process`: parse, policy, conntrack + NAT, route,
//! rewrite; no I/O) on prebuilt batches of 1024 64-byte IPv4/UDP frames, `begin_batch` every 64 frames as the
//! worker does. `Throughput::Elements`: packets/s on one core.
//!
//! `process` rewrites frames in place (TTL, addresses, ports, MACs), so every iteration runs on a fresh copy of
//! its batch, made outside the timed region (`iter_batched_ref`, or before the clock starts in `iter_custom`).
//!
//! `cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 3`

use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dataplane::drop::DropReason;
use dataplane::pipeline::Pipeline;

#[path = "support.rs"]
mod support;
use support::{
    batch, established, mixed_pattern, new_flows, pipeline, run, run_handed_over, run_without_prefetch,
    spread_flows, two_workers, Batch, Kind, BATCH,
};

/// New flows one bench pipeline takes before it is replaced: fewer than the 64 512 ports of its egress IP.
const NEW_FLOWS_PER_PIPELINE: u64 = 60_000;

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Benches `process` over copies of the batch `make` returns (given the pipeline, which it may warm up). Nothing is
/// built unless the bench is selected (so `cargo bench -- established/10_rules` or a profiler start fast).
fn bench_batch(group: &mut Group<'_>, name: &str, rules: usize, make: impl Fn(&mut Pipeline) -> Batch) {
    let mut state: Option<(Pipeline, Batch)> = None;
    group.bench_function(name, |b| {
        let (p, frames) = state.get_or_insert_with(|| {
            let mut p = pipeline(rules);
            let frames = make(&mut p);
            (p, frames)
        });
        b.iter_batched_ref(|| frames.clone(), |f| black_box(run(p, f)), BatchSize::SmallInput)
    });
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    for rules in [10usize, 10_000, 100_000] {
        // Outbound UDP of 1024 established flows: parse, conntrack hit, SNAT rewrite, route, TTL, MACs.
        bench_batch(&mut group, &format!("established/{rules}_rules"), rules, |p| {
            established(p, batch(&[Kind::Allowed]))
        });
        // Default-denied UDP from inside: parse, conntrack miss, policy lookup, drop counted.
        bench_batch(&mut group, &format!("denied/{rules}_rules"), rules, |_| batch(&[Kind::Denied]));
        // 80 % established outbound, 15 % their replies, 5 % denied, interleaved.
        bench_batch(&mut group, &format!("mixed_80_15_5/{rules}_rules"), rules, |p| {
            established(p, batch(&mixed_pattern()))
        });
        if rules == 10 {
            // Replies to 1024 established flows: parse, reverse lookup, DNAT rewrite, route, TTL, MACs.
            bench_batch(&mut group, "replies/10_rules", rules, |p| established(p, batch(&[Kind::Reply])));
        }
        if rules != 10_000 {
            // A new flow per packet: policy lookup, NAT port allocation, conntrack insert, rewrite. Each flow is a
            // new mapping on the group's one egress IP, so a fresh pipeline (untimed) comes before its 64 512 high
            // ports run out (past that the bench would time `OutOfPorts` drops, not new flows).
            let mut state: Option<(Pipeline, u64)> = None;
            group.bench_function(format!("new_flows/{rules}_rules"), |b| {
                let (q, next) = state.get_or_insert_with(|| (pipeline(rules), 0));
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        if *next + BATCH as u64 > NEW_FLOWS_PER_PIPELINE {
                            *q = pipeline(rules);
                            *next = 0;
                        }
                        let mut frames = new_flows(*next, BATCH);
                        *next += BATCH as u64;
                        let start = Instant::now();
                        black_box(run(q, &mut frames));
                        spent += start.elapsed();
                    }
                    spent
                })
            });
        }
    }

    // Two workers, established outbound flows owned by worker 0: arriving at the owner's queue, and arriving at the
    // other worker's queue, which hands each frame over (a 1.5 KiB slot copy each way) for the owner to finish. The
    // second counts both workers' time per packet: what the hand-off costs a packet that RSS put on the wrong queue.
    let mut state: Option<(Pipeline, Pipeline, Batch, Vec<u8>)> = None;
    let mut two = |b: &mut criterion::Bencher<'_>, handed_over: bool| {
        let (w0, w1, frames, scratch) = state.get_or_insert_with(|| {
            let (mut w0, w1) = two_workers(10);
            let frames = established(&mut w0, batch(&[Kind::Allowed]));
            (w0, w1, frames, vec![0; dataplane::handoff::HANDOFF_JUMBO_BYTES])
        });
        b.iter_batched_ref(
            || frames.clone(),
            |f| {
                let forwarded = if handed_over { run_handed_over(w1, w0, f, scratch) } else { run(w0, f) };
                assert_eq!(forwarded, BATCH, "every frame forwarded by its owner");
                black_box(forwarded)
            },
            BatchSize::SmallInput,
        )
    };
    group.bench_function("two_workers/at_owner", |b| two(b, false));
    group.bench_function("two_workers/handed_over", |b| two(b, true));

    // The NAT translation log's cost: established traffic with `[nat] log = "all"` (per-flow packet and byte
    // counts on every packet) against the same pipeline without it, in the same run.
    for (name, log) in [("off", false), ("on", true)] {
        let mut state: Option<(Pipeline, Batch)> = None;
        group.bench_function(format!("established_nat_log/{name}"), |b| {
            let (p, frames) = state.get_or_insert_with(|| {
                let mut p = pipeline(10);
                if log {
                    let queue = std::sync::Arc::new(dataplane::nat::NatLogQueue::new(1 << 16));
                    p = p.with_nat_log(dataplane::nat::NatLogMode::All, 1_000_000, queue);
                }
                let frames = established(&mut p, batch(&[Kind::Allowed]));
                (p, frames)
            });
            b.iter_batched_ref(|| frames.clone(), |f| black_box(run(p, f)), BatchSize::SmallInput)
        });
    }

    // Live flows: the same established traffic with 1 flow in the table vs 1 000 000 (10-rule policy), each with
    // the worker's prefetch passes (`run`) and without them (`run_without_prefetch`, the same-run baseline).
    type Runner = fn(&mut Pipeline, &mut Batch) -> usize;
    let runners: [(&str, Runner); 2] = [("", run), ("_no_prefetch", run_without_prefetch)];
    for (suffix, runner) in runners {
        let mut state: Option<(Pipeline, Batch)> = None;
        group.bench_function(format!("established_live_flows/1{suffix}"), |b| {
            let (p, frames) = state.get_or_insert_with(|| {
                let mut p = pipeline(10);
                let frames = established(&mut p, spread_flows(0, 0, BATCH));
                (p, frames)
            });
            b.iter_batched_ref(|| frames.clone(), |f| black_box(runner(p, f)), BatchSize::SmallInput)
        });
    }
    let big: RefCell<Option<(Pipeline, Vec<Batch>, usize)>> = RefCell::new(None);
    let build_big = || {
        let mut big = pipeline(10);
        let mut filled = 0;
        for chunk in 0..(1_000_000 / BATCH) {
            filled += run(&mut big, &mut spread_flows(chunk * BATCH, 1, BATCH));
        }
        assert!(big.nat().stats().flows() as usize >= filled * 99 / 100, "1 M flows should be live");
        // 64 batches, each 1024 flows scattered over the table (stride 977), visited in turn: caches stay cold.
        let batches: Vec<Batch> = (0..64).map(|i| spread_flows(i * 15_013, 977, BATCH)).collect();
        (big, batches, 0)
    };
    for (suffix, runner) in runners {
        group.bench_function(format!("established_live_flows/1000000{suffix}"), |b| {
            let mut state = big.borrow_mut();
            let (big, batches, turn) = state.get_or_insert_with(build_big);
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let mut frames = batches[*turn % batches.len()].clone();
                    *turn += 1;
                    let start = Instant::now();
                    black_box(runner(big, &mut frames));
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    // The prefetch passes' worth, robust to a noisy shared machine: both runners alternate on the same table, round
    // after round, and the median of the per-round ratios is printed (criterion's figures above come minutes apart).
    if let Some((big, batches, turn)) = big.borrow_mut().as_mut() {
        let mut ratios: Vec<f64> = (0..21)
            .map(|_| {
                let mut time = |runner: Runner, turn: &mut usize| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..32 {
                        let mut frames = batches[*turn % batches.len()].clone();
                        *turn += 1;
                        let start = Instant::now();
                        black_box(runner(big, &mut frames));
                        spent += start.elapsed();
                    }
                    spent.as_secs_f64()
                };
                let without = time(run_without_prefetch, turn);
                let with = time(run, turn);
                without / with
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "established_live_flows/1000000: prefetch passes {:.2}x the packets/s without them (median of 21 \
             alternating rounds; range {:.2}-{:.2})",
            ratios[10], ratios[0], ratios[20]
        );
    }
    // New flows at an egress IP whose 64 512 ports are all taken (a client flooding new flows): each is refused as
    // `out_of_ports` without a search of the port slice (that search once made this 10 K/s).
    // The refused flows must be new inside endpoints: `new_flows` repeats its endpoints after 253 × 64 000 flows
    // (a repeated one has a mapping, needs no port, and would be forwarded), so a full pipeline is built afresh,
    // untimed, before that.
    let full_pipeline = || {
        let mut q = pipeline(10);
        let mut k = 0;
        while k < 64_512 {
            run(&mut q, &mut new_flows(k, BATCH));
            k += BATCH as u64;
        }
        (q, k)
    };
    const DISTINCT_ENDPOINTS: u64 = 253 * 64_000;
    let mut state: Option<(Pipeline, u64)> = None;
    group.bench_function("new_flows_out_of_ports/10_rules", |b| {
        let (q, next) = state.get_or_insert_with(full_pipeline);
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if *next + BATCH as u64 > DISTINCT_ENDPOINTS {
                    (*q, *next) = full_pipeline();
                }
                let mut frames = new_flows(*next, BATCH);
                *next += BATCH as u64;
                let refused = q.stats().drops(DropReason::OutOfPorts);
                let start = Instant::now();
                let forwarded = run(q, &mut frames);
                spent += start.elapsed();
                assert_eq!(forwarded, 0, "the egress IP has no free port left");
                assert_eq!(q.stats().drops(DropReason::OutOfPorts) - refused, BATCH as u64);
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
