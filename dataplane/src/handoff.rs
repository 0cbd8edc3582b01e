//! Frames one worker hands to another: bounded, lock-free, allocation-free.
//!
//! Why: the NAT port space of each egress IP is split into one slice per worker, so the worker that owns a reply
//! is known from its destination port alone (`nat::reply_owner`). When the NIC delivers a reply (or a hairpinned
//! packet) to another worker's queue, that worker copies the frame into the owner's [`Handoffs`] queue; the owner
//! drains it once per loop iteration and finishes the job with its own conntrack. Each worker's UMEM is its own, so
//! the frame is copied (at most [`HANDOFF_FRAME_BYTES`]). A full queue drops the frame under
//! `handoff_queue_full`: never block a worker.

use crossbeam_queue::ArrayQueue;

use crate::stats::DropReason;

/// Largest frame that can be handed over (a 1500-byte MTU frame with two VLAN tags fits).
pub const HANDOFF_FRAME_BYTES: usize = 1536;

/// What the receiving worker must do with the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffKind {
    /// A packet from outside whose destination port this worker owns: translate back, send inside.
    Inbound,
    /// A hairpinned packet, already SNATed by the sender: translate the destination, send inside.
    Hairpin,
}

/// One handed-over frame, stored inline in the queue's preallocated slots.
#[derive(Clone, Copy)]
pub struct HandoffFrame {
    pub kind: HandoffKind,
    len: u16,
    bytes: [u8; HANDOFF_FRAME_BYTES],
}

impl std::fmt::Debug for HandoffFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoffFrame").field("kind", &self.kind).field("len", &self.len).finish()
    }
}

impl HandoffFrame {
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..usize::from(self.len)]
    }
}

/// One inbound queue per worker.
#[derive(Debug)]
pub struct Handoffs {
    queues: Vec<ArrayQueue<HandoffFrame>>,
}

impl Handoffs {
    /// Queues for `workers` workers, each holding at most `capacity` frames.
    pub fn new(workers: usize, capacity: usize) -> Handoffs {
        Handoffs { queues: (0..workers.max(1)).map(|_| ArrayQueue::new(capacity.max(1))).collect() }
    }

    pub fn workers(&self) -> usize {
        self.queues.len()
    }

    /// Copies `frame` into worker `to`'s queue.
    pub fn push(&self, to: u16, kind: HandoffKind, frame: &[u8]) -> Result<(), DropReason> {
        let queue = self.queues.get(usize::from(to)).ok_or(DropReason::HandoffQueueFull)?;
        if frame.len() > HANDOFF_FRAME_BYTES {
            return Err(DropReason::FrameTooLarge);
        }
        let mut slot = HandoffFrame { kind, len: frame.len() as u16, bytes: [0; HANDOFF_FRAME_BYTES] };
        slot.bytes[..frame.len()].copy_from_slice(frame);
        queue.push(slot).map_err(|_| DropReason::HandoffQueueFull)
    }

    /// The next frame handed to worker `me`.
    pub fn pop(&self, me: u16) -> Option<HandoffFrame> {
        self.queues.get(usize::from(me))?.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_arrive_in_order_at_their_worker_only() {
        let h = Handoffs::new(2, 4);
        h.push(1, HandoffKind::Inbound, b"first").unwrap();
        h.push(1, HandoffKind::Hairpin, b"second").unwrap();
        assert!(h.pop(0).is_none());
        let mut a = h.pop(1).unwrap();
        assert_eq!((a.kind, a.bytes_mut() as &[u8]), (HandoffKind::Inbound, &b"first"[..]));
        let mut b = h.pop(1).unwrap();
        assert_eq!((b.kind, b.bytes_mut() as &[u8]), (HandoffKind::Hairpin, &b"second"[..]));
        assert!(h.pop(1).is_none());
    }

    #[test]
    fn a_full_queue_an_unknown_worker_and_an_oversized_frame_are_refused() {
        let h = Handoffs::new(1, 1);
        h.push(0, HandoffKind::Inbound, b"x").unwrap();
        assert_eq!(h.push(0, HandoffKind::Inbound, b"y"), Err(DropReason::HandoffQueueFull));
        assert_eq!(h.push(7, HandoffKind::Inbound, b"y"), Err(DropReason::HandoffQueueFull));
        let big = vec![0u8; HANDOFF_FRAME_BYTES + 1];
        assert_eq!(Handoffs::new(1, 1).push(0, HandoffKind::Inbound, &big), Err(DropReason::FrameTooLarge));
    }
}
