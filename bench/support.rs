//! Prebuilt traffic and policies for the pipeline bench (`bench/pipeline.rs`) and the allocation test
//! (`tests/no_alloc.rs`): the lab's addresses and MACs, 64-byte IPv4/UDP frames in one flat buffer, and policies
//! of any size built with [`PolicyBuilder`], and a NAT pipeline with flows already established.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::sync::Arc;

use dataplane::nat::{FlowHint, NatConfig};
use dataplane::nexthop::{InterfaceTable, NextHopTable, Route};
use dataplane::pipeline::{Action, NextHops, Pipeline, PREFETCH_DISTANCE, PREFETCH_HINTS};
use dataplane::policy::{Action as PolicyAction, PolicyBuilder, PortRange, ProtoMatch, RuleSpec};
use dataplane::stats::WorkerStats;
use dataplane::time::Instant;
use dataplane::Side;

pub const FRAME_LEN: usize = 64;
pub const BATCH: usize = 1024;
/// Frames per `begin_batch`, as the worker's rx burst.
pub const BURST: usize = 64;

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const EXT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];

/// What one frame of a batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 10.10.0.2:1024+i → 203.0.113.(1+i%16):7, allowed by the web group (established once [`established`] ran).
    Allowed,
    /// 10.10.0.2 → 198.18.0.x:7, matched by no rule: default deny.
    Denied,
    /// The server's answer to an established `Allowed` flow, to the egress IP and mapped port (outside → inside).
    Reply,
}

/// A batch of frames, laid out back to back, with the side each arrives on.
#[derive(Clone)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub sides: Vec<Side>,
    pub kinds: Vec<Kind>,
}

impl Batch {
    fn with_capacity(n: usize) -> Batch {
        Batch { bytes: Vec::with_capacity(n * FRAME_LEN), sides: vec![], kinds: vec![] }
    }

    fn push(&mut self, frame: &[u8; FRAME_LEN], side: Side, kind: Kind) {
        self.bytes.extend_from_slice(frame);
        self.sides.push(side);
        self.kinds.push(kind);
    }

    pub fn len(&self) -> usize {
        self.sides.len()
    }
}

/// A 64-byte Ethernet/IPv4/UDP frame, UDP checksum 0 ("none", allowed for IPv4).
pub fn udp_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> [u8; FRAME_LEN] {
    let mut built = Vec::with_capacity(FRAME_LEN);
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut built, &[0; FRAME_LEN - 42])
        .expect("a 64-byte UDP frame");
    let mut f = [0u8; FRAME_LEN];
    f.copy_from_slice(&built);
    f[40..42].copy_from_slice(&[0, 0]);
    f
}

/// An outbound frame from the client (inside). UDP checksum 0 ("none", allowed for IPv4).
pub fn outbound(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> [u8; FRAME_LEN] {
    udp_frame(src, dst, sport, dport, GW_IN_MAC, CLIENT_MAC)
}

/// Frame `i` of kind `Allowed` or `Denied` (1024 source ports, 16 servers).
pub fn frame(kind: Kind, i: usize) -> ([u8; FRAME_LEN], Side) {
    let client = Ipv4Addr::new(10, 10, 0, 2);
    let port = 1024 + (i % 1024) as u16;
    match kind {
        Kind::Allowed => {
            (outbound(client, port, Ipv4Addr::new(203, 0, 113, 1 + (i % 16) as u8), 7), Side::Inside)
        }
        Kind::Denied => (outbound(client, port, Ipv4Addr::new(198, 18, 0, (i % 256) as u8), 7), Side::Inside),
        Kind::Reply => panic!("replies are built from translated frames: see `established`"),
    }
}

/// The reply a server sends to a translated outbound frame: addresses and ports swapped, from ext0 to gw-out.
pub fn reply_to(translated: &[u8]) -> [u8; FRAME_LEN] {
    let ip4 =
        |at: usize| Ipv4Addr::new(translated[at], translated[at + 1], translated[at + 2], translated[at + 3]);
    let port = |at: usize| u16::from_be_bytes([translated[at], translated[at + 1]]);
    udp_frame(ip4(30), ip4(26), port(36), port(34), GW_OUT_MAC, EXT_MAC)
}

/// `BATCH` frames of kinds `Allowed`/`Denied` following `pattern` (repeated). `Reply` slots are filled by
/// [`established`].
pub fn batch(pattern: &[Kind]) -> Batch {
    let mut b = Batch::with_capacity(BATCH);
    for i in 0..BATCH {
        let kind = pattern[i % pattern.len()];
        let (f, side) = if kind == Kind::Reply { frame(Kind::Allowed, i) } else { frame(kind, i) };
        b.push(&f, side, kind);
    }
    b
}

/// Runs a copy of `b` through `p` (establishing its allowed flows), then turns every `Reply` slot into the reply
/// to what its outbound frame became. Returns the batch to measure: outbound frames of established flows,
/// denials and replies.
pub fn established(p: &mut Pipeline, mut b: Batch) -> Batch {
    let mut translated = b.clone();
    run(p, &mut translated);
    for i in 0..b.len() {
        if b.kinds[i] == Kind::Reply {
            let reply = reply_to(&translated.bytes[i * FRAME_LEN..(i + 1) * FRAME_LEN]);
            b.bytes[i * FRAME_LEN..(i + 1) * FRAME_LEN].copy_from_slice(&reply);
            b.sides[i] = Side::Outside;
        }
    }
    b
}

/// Outbound frames of `n` distinct flows starting at flow number `first` (for new-flow runs): 254 sources of
/// the web group × 64 000 source ports × 2 destination ports (7, 9999) × 256 servers.
pub fn new_flows(first: u64, n: usize) -> Batch {
    let mut b = Batch::with_capacity(n);
    for k in first..first + n as u64 {
        let host = 2 + (k % 253) as u8;
        let rest = k / 253;
        let sport = 1024 + (rest % 64_000) as u16;
        let rest = rest / 64_000;
        let dport = if rest % 2 == 0 { 7 } else { 9999 };
        let server = Ipv4Addr::new(203, 0, 113, (rest / 2 % 256) as u8);
        b.push(&outbound(Ipv4Addr::new(10, 10, 0, host), sport, server, dport), Side::Inside, Kind::Allowed);
    }
    b
}

/// Flow `k` (< 2^20) of a large table: 128 inside hosts 10.10.0.(2..130) × 16 source ports × 256 servers
/// 203.0.113.x × destination ports 7 and 9999 (8 192 sessions per source, 2 048 NAT mappings).
pub fn spread_flow(k: usize) -> [u8; FRAME_LEN] {
    let host = 2 + (k % 128) as u8;
    let sport = 1024 + (k / 128 % 16) as u16;
    let server = Ipv4Addr::new(203, 0, 113, (k / 2048 % 256) as u8);
    let dport = if (k >> 19) & 1 == 0 { 7 } else { 9999 };
    outbound(Ipv4Addr::new(10, 10, 0, host), sport, server, dport)
}

/// Outbound frames of flows `first`, `first + stride`, … (mod 2^20), `n` of them.
pub fn spread_flows(first: usize, stride: usize, n: usize) -> Batch {
    let mut b = Batch::with_capacity(n);
    for j in 0..n {
        b.push(&spread_flow((first + j * stride) % (1 << 20)), Side::Inside, Kind::Allowed);
    }
    b
}

/// 80 % allowed, 15 % replies, 5 % denied, interleaved (a 20-frame pattern).
pub fn mixed_pattern() -> Vec<Kind> {
    let mut p = vec![Kind::Allowed; 16];
    p.extend([Kind::Reply; 3]);
    p.push(Kind::Denied);
    // Spread them out rather than in runs.
    p.swap(4, 16);
    p.swap(9, 17);
    p.swap(14, 18);
    p
}

pub fn lab_table() -> NextHopTable {
    let ip = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
    NextHopTable {
        inside: InterfaceTable::new(
            GW_IN_MAC,
            vec![Route { destination: ip(10, 10, 0, 0), prefix_len: 16, gateway: None }],
            vec![(ip(10, 10, 0, 2), CLIENT_MAC)],
        ),
        outside: InterfaceTable::new(
            GW_OUT_MAC,
            vec![
                Route { destination: ip(0, 0, 0, 0), prefix_len: 0, gateway: Some(ip(192, 0, 2, 2)) },
                Route { destination: ip(192, 0, 2, 0), prefix_len: 24, gateway: None },
            ],
            vec![(ip(192, 0, 2, 2), EXT_MAC)],
        ),
        outside_from: Vec::new(),
    }
}

/// A policy of `rules` rules over 10 groups: the lab's web group (10.10.0.0/24) allowed UDP 7 and 9999 to
/// 203.0.113.0/24 by its last rule, after `rules - 1` others spread over the 10 groups, each allowing TCP 443 or
/// UDP 53 to its own /32 in 100.64.0.0/10 (so every lookup walks a table of that size).
pub fn policy(rules: usize) -> dataplane::policy::SharedPolicy {
    let mut b = PolicyBuilder::new();
    let groups: Vec<_> = (0..10u8)
        .map(|g| {
            let id = b.add_group(format!("g{g}"), vec![Ipv4Addr::new(192, 0, 2, 10 + g % 2)]);
            b.add_source(id, format!("10.10.{g}.0/24").parse().unwrap());
            id
        })
        .collect();
    for i in 0..rules.saturating_sub(1) {
        let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i as u32);
        let (proto, port) = if i % 2 == 0 { (ProtoMatch::Tcp, 443) } else { (ProtoMatch::Udp, 53) };
        b.add_rule(RuleSpec::new(
            groups[i % groups.len()],
            vec![format!("{dst}/32").parse().unwrap()],
            proto,
            vec![PortRange { first: port, last: port }],
            PolicyAction::Allow,
        ));
    }
    b.add_rule(RuleSpec::new(
        groups[0],
        vec!["203.0.113.0/24".parse().unwrap()],
        ProtoMatch::Udp,
        vec![PortRange { first: 7, last: 7 }, PortRange { first: 9999, last: 9999 }],
        PolicyAction::Allow,
    ));
    dataplane::policy::shared(b.build(1).expect("bench policy builds"))
}

/// A lone worker's pipeline with NAT (the default `NatConfig`: 1 M flows) and a policy of `rules` rules.
pub fn pipeline(rules: usize) -> Pipeline {
    Pipeline::single(
        Arc::new(WorkerStats::default()),
        NextHops::fixed(lab_table()),
        Arc::new(policy(rules)),
        &NatConfig::default(),
    )
}

/// Workers 0 and 1 of a two-worker gateway (hand-off rings sized as the gateway sizes them),
/// with NAT and a policy of `rules` rules. The bench flows' source ports (1024–2047) lie in worker 0's slice.
pub fn two_workers(rules: usize) -> (Pipeline, Pipeline) {
    let handoffs = Arc::new(dataplane::handoff::Handoffs::new(2, 1024));
    let policy = Arc::new(policy(rules));
    let nat = NatConfig { workers: 2, ..NatConfig::default() };
    let worker = |i| {
        let stats = Arc::new(WorkerStats::default());
        Pipeline::new(stats, NextHops::fixed(lab_table()), policy.clone(), &nat, i, handoffs.clone())
    };
    (worker(0), worker(1))
}

/// Runs the batch as two workers would when every frame arrives on the queue of the worker that does not own its
/// endpoint: `arrived` hands each frame over, `owner` drains its rings after every [`BURST`] (as its loop does)
/// into `scratch` ([`dataplane::handoff::HANDOFF_JUMBO_BYTES`] long) and finishes them. Returns how many frames
/// the owner forwarded.
#[inline]
pub fn run_handed_over(
    arrived: &mut Pipeline,
    owner: &mut Pipeline,
    batch: &mut Batch,
    scratch: &mut [u8],
) -> usize {
    let handoffs = owner.handoffs().clone();
    let me = owner.worker();
    let mut forwarded = 0;
    for burst in batch.bytes.chunks_mut(FRAME_LEN * BURST) {
        arrived.begin_batch();
        owner.begin_batch();
        for frame in burst.chunks_exact_mut(FRAME_LEN) {
            arrived.process(Instant::ZERO, Side::Inside, frame);
        }
        while let Some(action) =
            handoffs.pop_with(me, scratch, |kind, frame| owner.process_handoff(Instant::ZERO, kind, frame))
        {
            forwarded += usize::from(matches!(action, Action::Forward { .. }));
        }
    }
    forwarded
}

/// Runs the whole batch through the pipeline as the worker would: `begin_batch` every [`BURST`] frames, and, when
/// the pipeline says it pays, the worker's two prefetch stages ([`PREFETCH_DISTANCE`] and twice that many frames
/// ahead, within the burst). Returns how many frames were forwarded.
#[inline]
pub fn run(pipeline: &mut Pipeline, batch: &mut Batch) -> usize {
    let mut forwarded = 0;
    let mut hints = [FlowHint::NONE; PREFETCH_HINTS];
    for (frames, sides) in batch.bytes.chunks_mut(FRAME_LEN * BURST).zip(batch.sides.chunks(BURST)) {
        pipeline.begin_batch();
        let n = sides.len();
        let frame = |j: usize| j * FRAME_LEN..(j + 1) * FRAME_LEN;
        let prefetch = pipeline.prefetch_pays();
        if prefetch {
            for (j, hint) in hints.iter_mut().enumerate().take(n) {
                *hint = pipeline.prefetch_flow(sides[j], &frames[frame(j)]);
            }
            for hint in &hints[..n.min(PREFETCH_DISTANCE)] {
                pipeline.prefetch_session(*hint);
            }
        }
        for i in 0..n {
            if prefetch {
                if i + PREFETCH_DISTANCE < n {
                    pipeline.prefetch_session(hints[(i + PREFETCH_DISTANCE) % PREFETCH_HINTS]);
                }
                if i + PREFETCH_HINTS < n {
                    let j = i + PREFETCH_HINTS;
                    hints[i % PREFETCH_HINTS] = pipeline.prefetch_flow(sides[j], &frames[frame(j)]);
                }
            }
            if let Action::Forward { .. } = pipeline.process(Instant::ZERO, sides[i], &mut frames[frame(i)]) {
                forwarded += 1;
            }
        }
    }
    forwarded
}

/// [`run`] without the prefetch passes: the same-run baseline that shows what they are worth.
#[inline]
pub fn run_without_prefetch(pipeline: &mut Pipeline, batch: &mut Batch) -> usize {
    let mut forwarded = 0;
    for (i, (frame, &side)) in batch.bytes.chunks_exact_mut(FRAME_LEN).zip(&batch.sides).enumerate() {
        if i % BURST == 0 {
            pipeline.begin_batch();
        }
        if let Action::Forward { .. } = pipeline.process(Instant::ZERO, side, frame) {
            forwarded += 1;
        }
    }
    forwarded
}
