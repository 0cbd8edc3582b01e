//! NAT engine throughput on prebuilt IPv4 packets (no I/O): the established-flow fast path, new flows, and the
//! memory a worker's tables take per flow at 1 M flows.
//!
//! `cargo bench --bench nat -- --warm-up-time 1 --measurement-time 3`
//! Targets: ≥ 20 M established packets/s/core, ≥ 2 M new flows/s/core, ≤ 128 bytes per flow.
//! Same-run baseline: [`PlainNat`], a bare hash-map NAT, run alternately with the NAT; the bench prints the ratios.
//!
//! The `_prefetch` variants make the worker's two prefetch passes over each group of packets first
//! (`Nat::prefetch_flow`, `Nat::prefetch_session`). `NAT_PROFILE=new` (or `established`,
//! `established_1m`, each with an optional `_prefetch`) runs only that loop, without criterion (for a profiler,
//! or quick A/B runs):
//! `NAT_PROFILE=new valgrind --tool=callgrind --toggle-collect='*Nat*outbound*' target/release/deps/nat-…`.

use std::cell::RefCell;
use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use dataplane::nat::{FlowHint, Nat, NatConfig, MAX_EGRESS_IPS};
use dataplane::pipeline::{PREFETCH_DISTANCE, PREFETCH_HINTS};
use dataplane::policy::{Action, PolicyBuilder, PolicySnapshot, ProtoMatch, RuleSpec};
use dataplane::time::Instant;
use dataplane::wire::checksum;

const BATCH: usize = 1024;
const SLOT: usize = 64;
const FLOWS: usize = 10_000;

fn policy() -> PolicySnapshot {
    let mut b = PolicyBuilder::new();
    let egress = (0..MAX_EGRESS_IPS as u8).map(|i| Ipv4Addr::new(192, 0, 2, 10 + i)).collect();
    let g = b.add_group("apps", egress);
    b.add_source(g, "10.0.0.0/8".parse().unwrap());
    b.add_rule(RuleSpec::new(g, vec!["0.0.0.0/0".parse().unwrap()], ProtoMatch::Any, vec![], Action::Allow));
    b.build(1).unwrap()
}

/// A UDP packet of flow `i` (distinct inside endpoint per `i`) in a `SLOT`-byte slot.
fn packet(i: usize, out: &mut [u8]) {
    let src = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let mut v = Vec::with_capacity(SLOT);
    etherparse::PacketBuilder::ipv4(src, [203, 0, 113, 5], 64)
        .udp(10000 + (i % 50000) as u16, 443)
        .write(&mut v, b"0123456789abcdef")
        .unwrap();
    out[..v.len()].copy_from_slice(&v);
}

const PKT_LEN: usize = 20 + 8 + 16;

/// Translates the batch in `buf` outbound; with `prefetch`, with the worker's two prefetch stages
/// (`Nat::prefetch_flow` twice `PREFETCH_DISTANCE` packets ahead, `Nat::prefetch_session` one distance ahead).
fn run_batch(nat: &mut Nat, now: Instant, buf: &mut [u8], pol: &PolicySnapshot, prefetch: bool) {
    let mut hints = [FlowHint::NONE; PREFETCH_HINTS];
    let packet = |k: usize| k * SLOT..k * SLOT + PKT_LEN;
    if prefetch {
        for (k, hint) in hints.iter_mut().enumerate() {
            *hint = nat.prefetch_flow(false, &buf[packet(k)]);
        }
        for hint in &hints[..PREFETCH_DISTANCE] {
            nat.prefetch_session(*hint);
        }
    }
    for k in 0..BATCH {
        if prefetch {
            if k + PREFETCH_DISTANCE < BATCH {
                nat.prefetch_session(hints[(k + PREFETCH_DISTANCE) % PREFETCH_HINTS]);
            }
            if k + PREFETCH_HINTS < BATCH {
                hints[k % PREFETCH_HINTS] = nat.prefetch_flow(false, &buf[packet(k + PREFETCH_HINTS)]);
            }
        }
        let r = nat.outbound(now, &mut buf[packet(k)], pol);
        black_box(r.is_ok());
    }
}

/// This thread's CPU time in ns. On shared cores wall-clock figures include time other processes ran; CPU time
/// does not, so the benches also print a rate by CPU time.
fn thread_cpu_ns() -> u64 {
    // `cpu-time` wraps clock_gettime(CLOCK_THREAD_CPUTIME_ID), keeping `unsafe` out of the repository's benches.
    cpu_time::ThreadTime::try_now().map_or(0, |t| t.as_duration().as_nanos() as u64)
}

/// Runs `routine` on `rounds` fresh batches from `setup`, timing only `routine` by thread CPU time; returns
/// packets per second.
fn cpu_rate<T>(rounds: usize, mut setup: impl FnMut() -> T, mut routine: impl FnMut(&mut T)) -> f64 {
    let mut spent = 0u64;
    for _ in 0..rounds {
        let mut input = setup();
        let t0 = thread_cpu_ns();
        routine(&mut input);
        spent += thread_cpu_ns() - t0;
    }
    (rounds * BATCH) as f64 / (spent as f64 / 1e9)
}

/// Batches of established flows: `flows` prebuilt packets, handed out in a scattered order.
struct EstablishedBatches {
    pristine: Vec<u8>,
    order: Vec<usize>,
    next: usize,
}

impl EstablishedBatches {
    /// Builds the packets and shows each one (untranslated) to `open`, which makes it an established flow.
    fn new(flows: usize, mut open: impl FnMut(&[u8])) -> Self {
        let mut pristine = vec![0u8; flows * SLOT];
        for i in 0..flows {
            packet(i, &mut pristine[i * SLOT..(i + 1) * SLOT]);
            open(&pristine[i * SLOT..i * SLOT + PKT_LEN]);
        }
        let order = (0..flows).map(|i| (i * 7919) % flows).collect();
        EstablishedBatches { pristine, order, next: 0 }
    }

    fn batch(&mut self) -> Vec<u8> {
        let flows = self.order.len();
        let mut buf = vec![0u8; BATCH * SLOT];
        for k in 0..BATCH {
            let i = self.order[(self.next + k) % flows];
            buf[k * SLOT..(k + 1) * SLOT].copy_from_slice(&self.pristine[i * SLOT..(i + 1) * SLOT]);
        }
        self.next = (self.next + BATCH) % flows;
        buf
    }
}

/// Batches of new flows: each packet from a new inside host.
#[derive(Default)]
struct NewFlowBatches {
    flow: usize,
}

impl NewFlowBatches {
    fn batch(&mut self) -> Vec<u8> {
        let mut buf = vec![0u8; BATCH * SLOT];
        for k in 0..BATCH {
            packet(self.flow % (1 << 22), &mut buf[k * SLOT..(k + 1) * SLOT]);
            self.flow += 1;
        }
        buf
    }
}

/// Live flows at which the new-flow benches empty their table (untimed) before the next batch.
const NEW_FLOWS_EMPTIED_AT: usize = 500_000;

/// Before a new-flow batch: once the table holds [`NEW_FLOWS_EMPTIED_AT`] flows, expires everything and moves the
/// clock `now` (seconds) past the port quarantine.
fn make_room(nat: &mut Nat, now: &mut u64) {
    if nat.stats().flows() as usize + BATCH > NEW_FLOWS_EMPTIED_AT {
        *now += 1000;
        nat.poll_expiry(Instant::from_secs(*now), usize::MAX);
        *now += 1000;
    }
}

fn established(c: &mut Criterion) {
    established_with(c, false, FLOWS);
    established_with(c, true, FLOWS);
    established_with(c, false, BIG_FLOWS);
    established_with(c, true, BIG_FLOWS);
}

/// Established flows in a full-size table (CPU-time rate only; no criterion run).
const BIG_FLOWS: usize = 1_000_000;

fn established_with(c: &mut Criterion, prefetch: bool, flows: usize) {
    let pol = policy();
    let max_flows = if flows > FLOWS { 1 << 20 } else { 1 << 16 };
    let mut nat =
        Nat::new(&NatConfig { max_flows, max_flows_per_source: 1 << 20, ..NatConfig::default() }, 0);
    let mut batches = EstablishedBatches::new(flows, |p| {
        nat.outbound(Instant::ZERO, &mut p.to_vec(), &pol).unwrap();
    });
    let mut g = c.benchmark_group("nat");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut setup = || batches.batch();
    let mut routine = |buf: &mut Vec<u8>| run_batch(&mut nat, Instant::from_secs(1), buf, &pol, prefetch);
    let size = if flows == BIG_FLOWS { "1m" } else { "10k" };
    let name = suffix(&format!("established_outbound_udp_{size}_flows"), prefetch);
    if profiling() {
        let rate = cpu_rate(2000, &mut setup, &mut routine);
        println!("{name}: {:.2} M/s by thread CPU time", rate / 1e6);
        return;
    }
    if flows != BIG_FLOWS {
        g.bench_function(&name, |b| b.iter_batched_ref(&mut setup, &mut routine, BatchSize::PerIteration));
    }
    g.finish();
    let rate = cpu_rate(2000, &mut setup, &mut routine);
    println!("{name}: {:.1} M packets/s by thread CPU time", rate / 1e6);
}

fn suffix(name: &str, prefetch: bool) -> String {
    if prefetch {
        format!("{name}_prefetch")
    } else {
        name.to_string()
    }
}

fn profiling() -> bool {
    std::env::var_os("NAT_PROFILE").is_some()
}

fn new_flows(c: &mut Criterion) {
    new_flows_with(c, false);
    new_flows_with(c, true);
}

fn new_flows_with(c: &mut Criterion, prefetch: bool) {
    let pol = policy();
    let cfg = NatConfig { max_flows: 1 << 20, max_flows_per_source: 1 << 20, ..NatConfig::default() };
    let nat = Nat::new(&cfg, 0);
    println!(
        "nat memory: {} bytes for {} flows = {:.1} bytes/flow",
        nat.bytes_allocated(),
        cfg.max_flows,
        nat.bytes_allocated() as f64 / f64::from(cfg.max_flows)
    );
    let nat = RefCell::new(nat);
    let mut g = c.benchmark_group("nat");
    g.throughput(Throughput::Elements(BATCH as u64));
    // Distinct inside endpoints (one new mapping + session each); when the table is half full, everything is
    // expired and the clock jumps past the port quarantine (outside the timed part).
    let mut batches = NewFlowBatches::default();
    let mut now = 0u64;
    let mut setup = || {
        make_room(&mut nat.borrow_mut(), &mut now);
        (batches.batch(), now)
    };
    let mut routine = |(buf, now): &mut (Vec<u8>, u64)| {
        run_batch(&mut nat.borrow_mut(), Instant::from_secs(*now), buf, &pol, prefetch)
    };
    let name = suffix("new_flows_udp", prefetch);
    if profiling() {
        let rate = cpu_rate(2000, &mut setup, &mut routine);
        println!("{name}: {:.2} M/s by thread CPU time", rate / 1e6);
        return;
    }
    g.bench_function(&name, |b| b.iter_batched_ref(&mut setup, &mut routine, BatchSize::PerIteration));
    let rate = cpu_rate(1000, &mut setup, &mut routine);
    println!("{name}: {:.2} M flows/s by thread CPU time", rate / 1e6);
    let s = nat.borrow().stats();
    println!("nat new flows: {} live flows, {} allocation failures", s.flows(), s.allocation_failures);
    g.finish();
}

// -----------------------------------------------------------------------------------------------------------
// Same-run baseline
// -----------------------------------------------------------------------------------------------------------

/// Source and destination address and port, protocol.
type FiveTuple = (u32, u32, u16, u16, u8);

/// The least any NAT does per packet, written plainly: one hash map from the outbound 5-tuple to the egress
/// `ip:port`, the source rewritten with incremental IPv4 and UDP checksum updates. No policy, paired pooling, port
/// allocation, reply index, limits, timers or input checks. It moves with the machine as egressd's NAT does, so
/// NAT/plain ratios measured side by side hold on a host whose absolute figures swing 3× with other tenants.
struct PlainNat {
    flows: rustc_hash::FxHashMap<FiveTuple, (u32, u16)>,
    egress: u32,
}

impl PlainNat {
    fn new(capacity: usize) -> Self {
        let flows = rustc_hash::FxHashMap::with_capacity_and_hasher(capacity, Default::default());
        PlainNat { flows, egress: u32::from(Ipv4Addr::new(192, 0, 2, 10)) }
    }

    /// Translates one 20-byte-header IPv4/UDP packet, creating its flow (source port kept) when it is new.
    fn outbound(&mut self, p: &mut [u8]) -> bool {
        let rd32 = |p: &[u8], o: usize| u32::from_be_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
        let rd16 = |p: &[u8], o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
        if p.len() < 28 {
            return false;
        }
        let (src, dst, sport, dport) = (rd32(p, 12), rd32(p, 16), rd16(p, 20), rd16(p, 22));
        let egress = self.egress;
        let &mut (ext_ip, ext_port) =
            self.flows.entry((src, dst, sport, dport, p[9])).or_insert((egress, sport));
        let ip_check = checksum::update32(rd16(p, 10), src, ext_ip);
        let udp_check =
            checksum::update16_udp(checksum::update32_udp(rd16(p, 26), src, ext_ip), sport, ext_port);
        p[10..12].copy_from_slice(&ip_check.to_be_bytes());
        p[12..16].copy_from_slice(&ext_ip.to_be_bytes());
        p[20..22].copy_from_slice(&ext_port.to_be_bytes());
        p[26..28].copy_from_slice(&udp_check.to_be_bytes());
        true
    }
}

/// Never inlined: inlined, the plain loop's rate moved with the untimed setup code around its callers (new flows
/// 5–7 M/s in one build of this file, 7–10 in a reshuffled one, alternating runs); as a function of its own it
/// measured the same in both.
#[inline(never)]
fn run_plain_batch(plain: &mut PlainNat, buf: &mut [u8]) {
    for k in 0..BATCH {
        black_box(plain.outbound(&mut buf[k * SLOT..k * SLOT + PKT_LEN]));
    }
}

/// Prints the median of 7 NAT/plain ratios, each from `rounds` batches of either, run alternately by thread CPU
/// time.
fn alternate(
    label: &str,
    rounds: usize,
    mut nat: impl FnMut(usize) -> f64,
    mut plain: impl FnMut(usize) -> f64,
) {
    const RUNS: usize = 7;
    let mut r: Vec<(f64, f64, f64)> = (0..RUNS)
        .map(|_| {
            let (n, b) = (nat(rounds), plain(rounds));
            (n / b, n, b)
        })
        .collect();
    r.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, n, b) = r[RUNS / 2];
    println!(
        "{label}: NAT/plain {ratio:.2}x (median of {RUNS} alternating runs; that run {:.2} / {:.2} M/s by CPU time)",
        n / 1e6,
        b / 1e6
    );
}

/// egressd's NAT against [`PlainNat`] on the same packets, alternating in one process: established flows (10 000,
/// scattered order) and new flows (the tables emptied at [`NEW_FLOWS_EMPTIED_AT`] flows, untimed).
fn against_plain(c: &mut Criterion) {
    let pol = policy();
    let mut nat =
        Nat::new(&NatConfig { max_flows: 1 << 16, max_flows_per_source: 1 << 20, ..NatConfig::default() }, 0);
    let mut plain = PlainNat::new(1 << 16);
    let batches = RefCell::new(EstablishedBatches::new(FLOWS, |p| {
        nat.outbound(Instant::ZERO, &mut p.to_vec(), &pol).unwrap();
        plain.outbound(&mut p.to_vec());
    }));
    let setup = || batches.borrow_mut().batch();
    let mut g = c.benchmark_group("nat");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("plain_established_outbound_udp_10k_flows", |b| {
        b.iter_batched_ref(setup, |buf| run_plain_batch(&mut plain, buf), BatchSize::PerIteration)
    });
    alternate(
        "established, 10k flows",
        300,
        |rounds| cpu_rate(rounds, setup, |buf| run_batch(&mut nat, Instant::from_secs(1), buf, &pol, false)),
        |rounds| cpu_rate(rounds, setup, |buf| run_plain_batch(&mut plain, buf)),
    );

    let cfg = NatConfig { max_flows: 1 << 20, max_flows_per_source: 1 << 20, ..NatConfig::default() };
    let nat = RefCell::new((Nat::new(&cfg, 0), 0u64));
    let plain = RefCell::new(PlainNat::new(1 << 20));
    let batches = RefCell::new(NewFlowBatches::default());
    let nat_setup = || {
        let (n, now) = &mut *nat.borrow_mut();
        make_room(n, now);
        batches.borrow_mut().batch()
    };
    let plain_setup = || {
        let mut p = plain.borrow_mut();
        if p.flows.len() + BATCH > NEW_FLOWS_EMPTIED_AT {
            p.flows.clear();
        }
        batches.borrow_mut().batch()
    };
    let nat_routine = |buf: &mut Vec<u8>| {
        let (n, now) = &mut *nat.borrow_mut();
        run_batch(n, Instant::from_secs(*now), buf, &pol, false)
    };
    let plain_routine = |buf: &mut Vec<u8>| run_plain_batch(&mut plain.borrow_mut(), buf);
    g.bench_function("plain_new_flows_udp", |b| {
        b.iter_batched_ref(plain_setup, plain_routine, BatchSize::PerIteration)
    });
    g.finish();
    alternate(
        "new flows",
        200,
        |rounds| cpu_rate(rounds, nat_setup, nat_routine),
        |rounds| cpu_rate(rounds, plain_setup, plain_routine),
    );
}

criterion_group!(benches, established, new_flows, against_plain);

fn main() {
    match std::env::var("NAT_PROFILE").as_deref() {
        Ok("new") => new_flows_with(&mut Criterion::default(), false),
        Ok("new_prefetch") => new_flows_with(&mut Criterion::default(), true),
        Ok("established") => established_with(&mut Criterion::default(), false, FLOWS),
        Ok("established_prefetch") => established_with(&mut Criterion::default(), true, FLOWS),
        Ok("established_1m") => established_with(&mut Criterion::default(), false, BIG_FLOWS),
        Ok("established_1m_prefetch") => established_with(&mut Criterion::default(), true, BIG_FLOWS),
        Ok("plain") => {
            against_plain(&mut Criterion::default().measurement_time(std::time::Duration::from_secs(1)))
        }
        Ok(_) => {
            eprintln!("NAT_PROFILE: new, established, established_1m (each optionally with _prefetch), plain")
        }
        Err(_) => {
            benches();
            Criterion::default().configure_from_args().final_summary();
        }
    }
}
