//! Policy denials reported to the control thread, which writes them to the audit log.
//!
//! Workers never log: formatting a log line allocates and costs microseconds. A worker copies a small
//! [`AuditEvent`] into the bounded [`AuditQueue`] shared by all workers, at most [`AUDIT_EVENTS_PER_SEC`] per
//! second (token bucket, [`audit_limiter`]), and counts what it left out; the control thread drains the queue and
//! writes one line per event (JSON with `--log-format json`). A flood of denied packets therefore costs the
//! worker one counter increment per packet beyond the budget, and the log stays readable.

use std::net::Ipv4Addr;

use crossbeam_queue::ArrayQueue;

use crate::policy::{Decision, GroupId, RuleId, Verdict};
use crate::time::{Instant, TokenBucket};

/// Events one worker may report per second (the burst is as large).
pub const AUDIT_EVENTS_PER_SEC: u32 = 100;

/// One denied (or dry-run denied) packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Destination port (TCP/UDP), ICMP: 0.
    pub dst_port: u16,
    pub group: Option<GroupId>,
    pub rule: Option<RuleId>,
    pub verdict: Verdict,
    /// Forwarded anyway (dry run).
    pub dry_run: bool,
    /// The policy generation that decided.
    pub generation: u64,
    pub worker: u16,
}

impl AuditEvent {
    /// The event for an IPv4 `packet` (header through total length, validated) that `decision` judged.
    pub fn new(packet: &[u8], decision: &Decision, generation: u64, worker: u16) -> Option<AuditEvent> {
        let header_len = usize::from(*packet.first()? & 0x0f) * 4;
        let addr = |at: usize| packet.get(at..at + 4).map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]));
        let proto = *packet.get(9)?;
        let dst_port = match proto {
            6 | 17 => {
                packet.get(header_len + 2..header_len + 4).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
            }
            _ => 0,
        };
        Some(AuditEvent {
            src: addr(12)?,
            dst: addr(16)?,
            proto,
            dst_port,
            group: decision.group,
            rule: decision.rule,
            verdict: decision.verdict,
            dry_run: decision.dry_run,
            generation,
            worker,
        })
    }
}

/// Shared by every worker (many producers) and the control thread (the consumer).
#[derive(Debug)]
pub struct AuditQueue(ArrayQueue<AuditEvent>);

impl AuditQueue {
    pub fn new(capacity: usize) -> AuditQueue {
        AuditQueue(ArrayQueue::new(capacity.max(1)))
    }

    /// Never blocks or allocates; false when the queue is full (the event is lost and should be counted).
    pub fn push(&self, event: AuditEvent) -> bool {
        self.0.push(event).is_ok()
    }

    pub fn pop(&self) -> Option<AuditEvent> {
        self.0.pop()
    }
}

/// A worker's rate limit for audit events: [`AUDIT_EVENTS_PER_SEC`] per second, a burst as large.
pub fn audit_limiter() -> TokenBucket {
    TokenBucket::new(AUDIT_EVENTS_PER_SEC, AUDIT_EVENTS_PER_SEC, Instant::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_allows_a_burst_then_its_rate() {
        let mut l = audit_limiter();
        let t0 = Instant::from_secs(10);
        let allowed = (0..1000).filter(|_| l.take(t0)).count();
        assert_eq!(allowed, AUDIT_EVENTS_PER_SEC as usize);
        assert!(!l.take(t0));
        // 100 ms later: 10 more.
        let t1 = Instant(t0.0 + 100_000_000);
        assert_eq!((0..1000).filter(|_| l.take(t1)).count(), 10);
    }

    #[test]
    fn events_read_the_flow_from_the_packet() {
        let builder =
            etherparse::PacketBuilder::ipv4([10, 10, 1, 2], [203, 0, 113, 10], 64).tcp(40000, 443, 1, 1024);
        let mut packet = Vec::new();
        builder.write(&mut packet, &[]).unwrap();
        let decision = Decision {
            verdict: Verdict::Deny(crate::policy::DenyReason::DefaultDeny),
            group: Some(GroupId(1)),
            rule: None,
            dry_run: false,
        };
        let e = AuditEvent::new(&packet, &decision, 7, 0).unwrap();
        assert_eq!(
            (e.src, e.dst, e.proto, e.dst_port),
            ([10, 10, 1, 2].into(), [203, 0, 113, 10].into(), 6, 443)
        );
        assert_eq!((e.group, e.generation), (Some(GroupId(1)), 7));
        assert!(AuditEvent::new(&packet[..10], &decision, 7, 0).is_none());
        let q = AuditQueue::new(1);
        assert!(q.push(e));
        assert!(!q.push(e), "full");
        assert_eq!(q.pop(), Some(e));
    }
}
