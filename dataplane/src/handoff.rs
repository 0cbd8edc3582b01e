//! Frames one worker hands to another: bounded, lock-free, allocation-free.
//!
//! Why: every packet of a flow must be handled by the one worker that holds its state. Each egress IP's port space
//! is split into one slice per worker, and the worker whose slice holds a port owns it both ways:
//! - an inside endpoint `(ip, port)` belongs to the worker whose slice holds its source port (for ICMP echo: its
//!   identifier), so that worker can always keep the original port and one endpoint gets one mapping whatever
//!   queue its packets arrive on (RFC 4787 REQ-1 across workers);
//! - a reply belongs to the worker whose slice holds its destination (egress) port (`nat::reply_owner`).
//!
//! When the NIC delivers a frame to another worker's queue, that worker copies it into the owner's queue here; the
//! owner drains it once per loop iteration and finishes the job with its own conntrack. Each worker's UMEM is its
//! own, so the frame is copied. Frames up to [`HANDOFF_FRAME_BYTES`] (1500-byte MTU) go through a queue of
//! 1.5 KiB slots; larger ones, up to [`HANDOFF_JUMBO_BYTES`] (what a 4096-byte UMEM frame holds), through a
//! smaller queue of bigger slots, so ordinary frames do not pay for jumbo slots. A full queue drops the frame under
//! `handoff_queue_full`: never block a worker.

use crossbeam_queue::ArrayQueue;

use crate::stats::DropReason;

/// Largest frame of the ordinary queue (a 1500-byte MTU frame with two VLAN tags fits).
pub const HANDOFF_FRAME_BYTES: usize = 1536;
/// Largest frame that can be handed over at all: a 4096-byte UMEM frame less the kernel's 256-byte XDP headroom.
pub const HANDOFF_JUMBO_BYTES: usize = 4096 - 256;

/// What the receiving worker must do with the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffKind {
    /// A packet from inside whose source endpoint this worker owns: the whole outbound leg (policy, SNAT).
    Outbound,
    /// A packet from outside whose destination port this worker owns: translate back, send inside.
    Inbound,
    /// A hairpinned packet, already SNATed by the sender: translate the destination, send inside.
    Hairpin,
}

/// One handed-over frame, stored inline in the queue's preallocated slots.
#[derive(Clone, Copy)]
struct Slot<const N: usize> {
    kind: HandoffKind,
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> Slot<N> {
    fn filled(kind: HandoffKind, frame: &[u8]) -> Slot<N> {
        let mut slot = Slot { kind, len: frame.len() as u16, bytes: [0; N] };
        slot.bytes[..frame.len()].copy_from_slice(frame);
        slot
    }
}

/// One worker's inbound queues.
struct Queues {
    ordinary: ArrayQueue<Slot<HANDOFF_FRAME_BYTES>>,
    jumbo: ArrayQueue<Slot<HANDOFF_JUMBO_BYTES>>,
}

/// One pair of inbound queues per worker.
pub struct Handoffs {
    queues: Vec<Queues>,
}

impl std::fmt::Debug for Handoffs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoffs").field("workers", &self.queues.len()).finish_non_exhaustive()
    }
}

impl Handoffs {
    /// Queues for `workers` workers, each holding at most `capacity` ordinary frames and an eighth of that (at
    /// least 8) jumbo frames.
    pub fn new(workers: usize, capacity: usize) -> Handoffs {
        let capacity = capacity.max(1);
        let queues = (0..workers.max(1))
            .map(|_| Queues {
                ordinary: ArrayQueue::new(capacity),
                jumbo: ArrayQueue::new((capacity / 8).max(8)),
            })
            .collect();
        Handoffs { queues }
    }

    pub fn workers(&self) -> usize {
        self.queues.len()
    }

    /// Copies `frame` into worker `to`'s queue.
    pub fn push(&self, to: u16, kind: HandoffKind, frame: &[u8]) -> Result<(), DropReason> {
        let queues = self.queues.get(usize::from(to)).ok_or(DropReason::HandoffQueueFull)?;
        let pushed = if frame.len() <= HANDOFF_FRAME_BYTES {
            queues.ordinary.push(Slot::filled(kind, frame)).is_ok()
        } else if frame.len() <= HANDOFF_JUMBO_BYTES {
            queues.jumbo.push(Slot::filled(kind, frame)).is_ok()
        } else {
            return Err(DropReason::FrameTooLarge);
        };
        pushed.then_some(()).ok_or(DropReason::HandoffQueueFull)
    }

    /// Takes the next frame handed to worker `me` (ordinary frames first) and gives it to `f` with its kind;
    /// `None` when nothing waits.
    pub fn pop_with<R>(&self, me: u16, f: impl FnOnce(HandoffKind, &mut [u8]) -> R) -> Option<R> {
        let queues = self.queues.get(usize::from(me))?;
        if let Some(mut slot) = queues.ordinary.pop() {
            return Some(f(slot.kind, &mut slot.bytes[..usize::from(slot.len)]));
        }
        let mut slot = queues.jumbo.pop()?;
        Some(f(slot.kind, &mut slot.bytes[..usize::from(slot.len)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pop(h: &Handoffs, me: u16) -> Option<(HandoffKind, Vec<u8>)> {
        h.pop_with(me, |kind, bytes| (kind, bytes.to_vec()))
    }

    #[test]
    fn frames_arrive_in_order_at_their_worker_only() {
        let h = Handoffs::new(2, 4);
        h.push(1, HandoffKind::Inbound, b"first").unwrap();
        h.push(1, HandoffKind::Hairpin, b"second").unwrap();
        h.push(1, HandoffKind::Outbound, b"third").unwrap();
        assert!(pop(&h, 0).is_none());
        assert_eq!(pop(&h, 1), Some((HandoffKind::Inbound, b"first".to_vec())));
        assert_eq!(pop(&h, 1), Some((HandoffKind::Hairpin, b"second".to_vec())));
        assert_eq!(pop(&h, 1), Some((HandoffKind::Outbound, b"third".to_vec())));
        assert!(pop(&h, 1).is_none());
    }

    #[test]
    fn jumbo_frames_go_through_their_own_queue_intact() {
        let h = Handoffs::new(1, 4);
        let big: Vec<u8> = (0..HANDOFF_JUMBO_BYTES).map(|i| i as u8).collect();
        let edge = vec![7u8; HANDOFF_FRAME_BYTES];
        h.push(0, HandoffKind::Outbound, &big).unwrap();
        h.push(0, HandoffKind::Inbound, &edge).unwrap();
        // Ordinary frames are drained first; the jumbo one comes out whole after them.
        assert_eq!(pop(&h, 0), Some((HandoffKind::Inbound, edge)));
        assert_eq!(pop(&h, 0), Some((HandoffKind::Outbound, big)));
        assert!(pop(&h, 0).is_none());
    }

    #[test]
    fn a_full_queue_an_unknown_worker_and_an_oversized_frame_are_refused() {
        let h = Handoffs::new(1, 1);
        h.push(0, HandoffKind::Inbound, b"x").unwrap();
        assert_eq!(h.push(0, HandoffKind::Inbound, b"y"), Err(DropReason::HandoffQueueFull));
        assert_eq!(h.push(7, HandoffKind::Inbound, b"y"), Err(DropReason::HandoffQueueFull));
        let big = vec![0u8; HANDOFF_JUMBO_BYTES + 1];
        assert_eq!(Handoffs::new(1, 1).push(0, HandoffKind::Inbound, &big), Err(DropReason::FrameTooLarge));
        let jumbo = vec![0u8; HANDOFF_FRAME_BYTES + 1];
        let h = Handoffs::new(1, 1);
        for _ in 0..8 {
            h.push(0, HandoffKind::Inbound, &jumbo).unwrap();
        }
        assert_eq!(h.push(0, HandoffKind::Inbound, &jumbo), Err(DropReason::HandoffQueueFull));
    }
}
