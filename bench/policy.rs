//! Policy benchmarks: first-packet lookups against compiled snapshots of 10, 10 000 and 100 000 rules, and the
//! time to compile 100 000 rules and publish the snapshot (what a reload costs).
//!
//! Policies are random but fixed (seeded): IPv4 destination prefixes /16–/32 spread over 4 groups, random
//! protocols and ports, allow or deny. Each lookup batch is 1024 prebuilt packets, half aimed inside a rule's
//! prefix and half anywhere, from sources spread over the groups. `policy_lookup` judges them one at a time
//! (`evaluate_v4`) and keeps only `forwards()`, so the compiler drops the rest of each `Decision`.
//!
//! `policy_reload_file` is what SIGHUP costs end to end: `PolicyReloader::reload` of a 100 000-rule TOML file
//! (read, parse, validate with file:line:column bookkeeping, compile, swap).
//!
//! Run briefly on a shared machine: `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use dataplane::policy::{
    Action, PolicyBuilder, PolicySnapshot, PortRange, Prefix, ProtoMatch, RuleSpec, SharedPolicy,
};
use dataplane::wire::ip_proto;

const GROUPS: u32 = 4;

/// What the policy reads of a flow's first packet.
#[derive(Clone, Copy)]
struct PacketV4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    dst_port: u16,
}
const BATCH: usize = 1024;

/// SplitMix64: a small seeded generator, so every run benches the same policy and packets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Group g's sources: 10.g.0.0/16.
fn group_source(g: u32) -> Prefix {
    Prefix::truncating(Ipv4Addr::new(10, g as u8, 0, 0).into(), 16)
}

/// `count` random rules over the groups.
fn random_rules(count: usize, rng: &mut Rng) -> Vec<RuleSpec> {
    (0..count)
        .map(|_| {
            let len = 16 + rng.below(17) as u8;
            let to = Prefix::truncating(Ipv4Addr::from(rng.next() as u32).into(), len);
            let proto = match rng.below(3) {
                0 => ProtoMatch::Tcp,
                1 => ProtoMatch::Udp,
                _ => ProtoMatch::Any,
            };
            let ports = match rng.below(3) {
                0 => vec![],
                1 => {
                    let p = 1 + rng.below(65535) as u16;
                    vec![PortRange { first: p, last: p }]
                }
                _ => {
                    let first = 1 + rng.below(60000) as u16;
                    vec![PortRange { first, last: first + rng.below(5000) as u16 }]
                }
            };
            let group = dataplane::policy::GroupId(rng.below(u64::from(GROUPS)) as u32);
            let action = if rng.below(4) == 0 { Action::Deny } else { Action::Allow };
            RuleSpec::new(group, vec![to], proto, ports, action)
        })
        .collect()
}

fn builder(rules: &[RuleSpec]) -> PolicyBuilder {
    let mut b = PolicyBuilder::new();
    for g in 0..GROUPS {
        let id = b.add_group(format!("g{g}"), vec![Ipv4Addr::new(192, 0, 2, 10 + g as u8)]);
        b.add_source(id, group_source(g));
    }
    for r in rules {
        b.add_rule(r.clone());
    }
    b
}

/// 1024 first packets. Half aim inside some rule's prefix.
fn random_packets(rules: &[RuleSpec], rng: &mut Rng) -> Vec<PacketV4> {
    (0..BATCH)
        .map(|i| {
            let src = Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, rng.below(u64::from(GROUPS)) as u8, 0, 0))
                    | (rng.next() as u32 & 0xffff),
            );
            let dst = match rules.get(rng.below(rules.len() as u64) as usize).and_then(|r| r.to.first()) {
                Some(p) if i % 2 == 0 => {
                    let base = match p.addr() {
                        std::net::IpAddr::V4(a) => u32::from(a),
                        std::net::IpAddr::V6(_) => 0,
                    };
                    let host_bits = 32 - u32::from(p.prefix_len());
                    let host =
                        if host_bits == 0 { 0 } else { rng.next() as u32 & (u32::MAX >> (32 - host_bits)) };
                    Ipv4Addr::from(base | host)
                }
                _ => Ipv4Addr::from(rng.next() as u32),
            };
            let proto = if rng.below(2) == 0 { ip_proto::TCP } else { ip_proto::UDP };
            PacketV4 { src, dst, proto, dst_port: 1 + rng.below(65535) as u16 }
        })
        .collect()
}

/// The policy sizes every lookup bench runs.
const SIZES: [usize; 3] = [10, 10_000, 100_000];

/// One lookup bench group: per policy size, the seeded policy and its 1024 packets, and an iteration of `lookup`
/// over them (given a preallocated slice of decisions), whose result is kept so nothing is optimised away.
fn lookup_group(c: &mut Criterion, name: &str, lookup: impl Fn(&PolicySnapshot, &[PacketV4]) -> u32) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(BATCH as u64));
    for count in SIZES {
        let mut rng = Rng(count as u64);
        let rules = random_rules(count, &mut rng);
        let snapshot: PolicySnapshot = builder(&rules).build(1).expect("builds");
        let packets = random_packets(&rules, &mut rng);
        group.bench_with_input(BenchmarkId::from_parameter(count), &packets, |b, packets| {
            b.iter(|| black_box(lookup(&snapshot, packets)))
        });
    }
    group.finish();
}

/// Lookups per second: `PolicySnapshot::evaluate_v4` over a batch of 1024 packets, per policy size (only
/// `forwards()` of each decision is kept).
fn lookups(c: &mut Criterion) {
    lookup_group(c, "policy_lookup", |snapshot, packets| {
        packets
            .iter()
            .map(|p| u32::from(snapshot.evaluate_v4(p.src, p.dst, p.proto, p.dst_port).forwards()))
            .sum()
    });
}

/// Reload cost: `PolicyBuilder::build` of 100 000 rules plus the `ArcSwap::store` that publishes the snapshot.
fn compile_and_swap(c: &mut Criterion) {
    let mut rng = Rng(7);
    let rules = random_rules(100_000, &mut rng);
    let shared: SharedPolicy = dataplane::policy::shared(PolicySnapshot::empty(0));
    let mut group = c.benchmark_group("policy_compile_swap");
    group.sample_size(10);
    group.bench_function("100000", |b| {
        b.iter_batched(
            || builder(&rules),
            |b| {
                let snapshot = b.build(1).expect("builds");
                shared.store(Arc::new(snapshot));
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// A policy file with a dataplane section, GROUPS groups and `rules` as `[[rule]]` tables. A rule whose group and
/// prefix an earlier one already has is left out: validation rejects two actions for one prefix in a group.
fn policy_toml(rules: &[RuleSpec]) -> String {
    use std::fmt::Write;
    let mut text = String::from(
        "[dataplane]\ninside = \"in0\"\noutside = \"out0\"\n\
         egress_ips = [\"192.0.2.10\", \"192.0.2.11\", \"192.0.2.12\", \"192.0.2.13\"]\n\n",
    );
    for g in 0..GROUPS {
        let source = group_source(g);
        let _ = writeln!(
            text,
            "[[group]]\nname = \"g{g}\"\nsources = [\"{source}\"]\negress_ips = [\"192.0.2.{}\"]\n",
            10 + g
        );
    }
    let mut seen = std::collections::HashSet::new();
    for r in rules.iter().filter(|r| seen.insert((r.group.0, r.to.clone()))) {
        let to: Vec<String> = r.to.iter().map(|p| format!("\"{p}\"")).collect();
        let proto = match r.proto {
            ProtoMatch::Tcp => "tcp",
            ProtoMatch::Udp => "udp",
            _ => "any",
        };
        let ports: Vec<String> = r
            .ports
            .iter()
            .map(|p| {
                if p.first == p.last {
                    format!("\"{}\"", p.first)
                } else {
                    format!("\"{}-{}\"", p.first, p.last)
                }
            })
            .collect();
        let action = if r.action == Action::Deny { "deny" } else { "allow" };
        let _ = write!(
            text,
            "[[rule]]\ngroup = \"g{}\"\nto = [{}]\nproto = \"{proto}\"\naction = \"{action}\"\n",
            r.group.0,
            to.join(", ")
        );
        if !ports.is_empty() && proto != "any" {
            let _ = writeln!(text, "ports = [{}]", ports.join(", "));
        }
        text.push('\n');
    }
    text
}

/// Reload cost end to end: `PolicyReloader::reload` of a 100 000-rule file (read, parse, validate, compile, swap).
fn reload_file(c: &mut Criterion) {
    let mut rng = Rng(7);
    let rules = random_rules(100_000, &mut rng);
    let path = std::env::temp_dir().join(format!("egressd-bench-policy-{}.toml", std::process::id()));
    std::fs::write(&path, policy_toml(&rules)).expect("writes the policy file");
    let shared: SharedPolicy = dataplane::policy::shared(PolicySnapshot::empty(0));
    let reloader = egressd::policy::PolicyReloader::default();
    if let Err(e) = reloader.reload(&path, &shared) {
        panic!("the generated policy must load: {e}");
    }
    let mut group = c.benchmark_group("policy_reload_file");
    group.sample_size(10);
    group.bench_function("100000", |b| b.iter(|| reloader.reload(&path, &shared).expect("reloads")));
    group.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, lookups, compile_and_swap, reload_file);
criterion_main!(benches);
