//! The NAT translation log: one record when a flow's translation is created and one when the flow ends, with
//! its packets and bytes each way — what `conntrack -E` and Cloud NAT's logs give, and what an abuse report about
//! an egress IP and port needs ("who was 192.0.2.10:40123 at 14:02?").
//!
//! Workers never format or write: a worker copies a [`NatLogRecord`] into the bounded [`NatLogQueue`] it shares
//! with the control thread, which writes the lines. A worker sends at most its token bucket's rate; what it
//! cannot send (bucket empty, queue full) it counts as suppressed, so a flood of new flows costs it a counter,
//! never a stall. With `sampled`, one flow in N is logged, chosen when it is created (both of its records or
//! neither). Counting packets and bytes per flow takes a second array beside the sessions, allocated only when
//! the log is on, so a gateway that does not log keeps its 124 bytes per flow.

use std::net::{Ipv4Addr, SocketAddrV4};

use crossbeam_queue::ArrayQueue;

use crate::policy::{GroupId, RuleId};
use crate::time::{Instant, TokenBucket};

/// Which flows are logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NatLogMode {
    #[default]
    Off,
    All,
    /// One flow in `one_in` (1: all).
    Sampled {
        one_in: u32,
    },
}

/// How many records a worker may send per second (token bucket; the burst is as large).
pub const DEFAULT_RECORDS_PER_SEC: u32 = 10_000;

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    /// Idle past its timeout (UDP, ICMP, established TCP, or a handshake that never completed).
    Idle,
    /// TCP closed (FIN both ways or RST), then its transitory timer ran out.
    TcpClosed,
    /// A reload's policy no longer allows it.
    PolicyChanged,
    /// Its egress IP was taken from its group.
    EgressIpRemoved,
    /// An operator removed it (`egressd flows --delete`).
    Deleted,
}

impl FlowEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Idle => "idle_timeout",
            FlowEnd::TcpClosed => "tcp_closed",
            FlowEnd::PolicyChanged => "policy_changed",
            FlowEnd::EgressIpRemoved => "egress_ip_removed",
            FlowEnd::Deleted => "deleted",
        }
    }
}

/// One translation log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatLogRecord {
    /// `None`: the translation was created; `Some`: the flow ended, and why.
    pub end: Option<FlowEnd>,
    pub proto: u8,
    /// For ICMP echo the ports are the identifiers.
    pub inside: SocketAddrV4,
    pub egress: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub group: Option<GroupId>,
    pub rule: Option<RuleId>,
    /// Policy generation (low 32 bits) that judged the flow.
    pub generation: u32,
    /// Monotonic seconds (the engine's clock) at creation and, for an end record, at the end.
    pub started_secs: u32,
    pub ended_secs: u32,
    pub packets_out: u32,
    pub packets_in: u32,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub worker: u16,
}

/// Records on their way from the workers to the control thread (many producers, one consumer).
#[derive(Debug)]
pub struct NatLogQueue(ArrayQueue<NatLogRecord>);

impl NatLogQueue {
    pub fn new(capacity: usize) -> NatLogQueue {
        NatLogQueue(ArrayQueue::new(capacity.max(1)))
    }

    pub fn pop(&self) -> Option<NatLogRecord> {
        self.0.pop()
    }
}

/// Per-flow figures the log needs, beside the session of the same index.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FlowFigures {
    started_secs: u32,
    packets_out: u32,
    packets_in: u32,
    bytes_out: u64,
    bytes_in: u64,
    group: Option<GroupId>,
    rule: Option<RuleId>,
    logged: bool,
}

/// A worker's side of the log.
pub(super) struct FlowLog {
    mode: NatLogMode,
    queue: std::sync::Arc<NatLogQueue>,
    bucket: TokenBucket,
    figures: Box<[FlowFigures]>,
    /// Records not sent (rate or full queue), for `egressd_nat_log_suppressed_total`.
    pub(super) suppressed: u64,
    /// Flows seen, for sampling.
    created: u32,
    worker: u16,
}

/// What a record says about the session it is for (the NAT fills it in).
pub(super) struct FlowKey {
    pub proto: u8,
    pub inside: SocketAddrV4,
    pub egress: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub generation: u32,
}

impl FlowLog {
    pub(super) fn new(
        mode: NatLogMode,
        records_per_sec: u32,
        queue: std::sync::Arc<NatLogQueue>,
        sessions: usize,
        worker: u16,
    ) -> FlowLog {
        let rate = records_per_sec.max(1);
        FlowLog {
            mode,
            queue,
            bucket: TokenBucket::new(rate, rate, Instant::ZERO),
            figures: vec![FlowFigures::default(); sessions].into_boxed_slice(),
            suppressed: 0,
            created: 0,
            worker,
        }
    }

    /// A session was created at index `sid`.
    pub(super) fn created(
        &mut self,
        now: Instant,
        sid: u32,
        key: FlowKey,
        group: Option<GroupId>,
        rule: Option<RuleId>,
    ) {
        let now_secs = (now.as_nanos() / 1_000_000_000) as u32;
        self.created = self.created.wrapping_add(1);
        let logged = match self.mode {
            NatLogMode::Off => false,
            NatLogMode::All => true,
            NatLogMode::Sampled { one_in } => self.created.is_multiple_of(one_in.max(1)),
        };
        let Some(f) = self.figures.get_mut(sid as usize) else { return };
        *f = FlowFigures { started_secs: now_secs, group, rule, logged, ..FlowFigures::default() };
        if logged {
            let record = self.record(sid, &key, None, now_secs);
            self.send(now, record);
        }
    }

    /// A packet of the flow at `sid` went through (`outbound`: from inside), `len` bytes of IP.
    #[inline]
    pub(super) fn count(&mut self, sid: u32, outbound: bool, len: usize) {
        if let Some(f) = self.figures.get_mut(sid as usize) {
            if outbound {
                f.packets_out = f.packets_out.wrapping_add(1);
                f.bytes_out = f.bytes_out.wrapping_add(len as u64);
            } else {
                f.packets_in = f.packets_in.wrapping_add(1);
                f.bytes_in = f.bytes_in.wrapping_add(len as u64);
            }
        }
    }

    /// Packets and bytes of the flow at `sid` so far.
    pub(super) fn counts(&self, sid: u32) -> Option<super::flows::FlowCounts> {
        self.figures.get(sid as usize).map(|f| super::flows::FlowCounts {
            packets_out: f.packets_out,
            packets_in: f.packets_in,
            bytes_out: f.bytes_out,
            bytes_in: f.bytes_in,
        })
    }

    /// The session at `sid` ended.
    pub(super) fn ended(&mut self, now: Instant, sid: u32, key: FlowKey, why: FlowEnd) {
        let now_secs = (now.as_nanos() / 1_000_000_000) as u32;
        if self.figures.get(sid as usize).is_some_and(|f| f.logged) {
            let record = self.record(sid, &key, Some(why), now_secs);
            self.send(now, record);
        }
    }

    fn record(&self, sid: u32, key: &FlowKey, end: Option<FlowEnd>, now_secs: u32) -> NatLogRecord {
        let f = self.figures.get(sid as usize).copied().unwrap_or_default();
        NatLogRecord {
            end,
            proto: key.proto,
            inside: key.inside,
            egress: key.egress,
            remote: key.remote,
            group: f.group,
            rule: f.rule,
            generation: key.generation,
            started_secs: f.started_secs,
            ended_secs: now_secs,
            packets_out: f.packets_out,
            packets_in: f.packets_in,
            bytes_out: f.bytes_out,
            bytes_in: f.bytes_in,
            worker: self.worker,
        }
    }

    fn send(&mut self, now: Instant, record: NatLogRecord) {
        if !self.bucket.take(now) || self.queue.0.push(record).is_err() {
            self.suppressed += 1;
        }
    }
}

/// `SocketAddrV4` from the engine's host-order address and port.
pub(super) fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr), port)
}
