//! Frames one worker hands to another: bounded, lock-free, allocation-free, in order.
//!
//! Why: every packet of a flow must be handled by the one worker that holds its state. Each egress IP's port space
//! is split into one slice per worker, and the worker whose slice holds a port owns it both ways:
//! - an inside endpoint `(ip, port)` belongs to the worker whose slice holds its source port (for ICMP echo: its
//!   identifier), so that worker can always keep the original port and one endpoint gets one mapping whatever
//!   queue its packets arrive on (RFC 4787 REQ-1 across workers);
//! - a reply belongs to the worker whose slice holds its destination (egress) port (`nat::reply_owner`).
//!
//! When the NIC delivers a frame to another worker's queue, that worker copies it here; the owner drains its rings
//! once per loop iteration and finishes the job with its own conntrack. Each worker's UMEM is its own, so the frame
//! is copied.
//!
//! Shape: one single-producer single-consumer ring per (sender, receiver) pair, holding variable-length records
//! (a header word, then the frame) in 64-bit words. A copy costs the frame's length, not a fixed slot size (a first
//! version with 1.5 KiB slots in a `crossbeam` `ArrayQueue` spent most of a hand-off zeroing and moving slots), any
//! frame a UMEM frame holds fits, and one sender's frames reach the receiver in the order they were sent (TCP
//! segments of one flow are never reordered by the hand-off). The words are atomics written and read with relaxed
//! ordering; the ring's tail (published with `Release` by the sender) and head (published by the receiver) order
//! them, so no `unsafe` is needed. A full ring drops the frame under `handoff_queue_full`: never block a worker.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::drop::DropReason;

/// Largest frame that can be handed over: a 4096-byte UMEM frame less the kernel's 256-byte XDP headroom.
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

impl HandoffKind {
    const ALL: [HandoffKind; 3] = [HandoffKind::Outbound, HandoffKind::Inbound, HandoffKind::Hairpin];
}

/// Bytes of frames one receiver's rings hold together (about `frames` 1500-byte frames), split over its senders.
const AVERAGE_FRAME_BYTES: usize = 1536;
/// Smallest ring: 4 KiB (a jumbo frame, or 56 minimum-size frames), so a ring always holds a burst of small
/// frames. Memory grows with the square of the worker count only through this floor: two workers take 2 × 2 MiB
/// for 1024 frames each, 64 workers 64 × 64 × 32 KiB.
const MIN_RING_WORDS: usize = 512;

/// One sender → receiver ring of 64-bit words. Positions count words and only grow; `mask` maps them to slots.
struct Ring {
    words: Box<[AtomicU64]>,
    mask: usize,
    /// Next word the receiver reads (written by the receiver only).
    head: CachePadded<AtomicUsize>,
    /// Next word the sender writes (written by the sender only).
    tail: CachePadded<AtomicUsize>,
}

impl Ring {
    fn new(words: usize) -> Ring {
        let words = words.next_power_of_two();
        Ring {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            mask: words - 1,
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// Words a record of a `len`-byte frame takes: its header and the frame rounded up to whole words.
    fn record_words(len: usize) -> usize {
        1 + len.div_ceil(8)
    }

    /// Sender side: appends one record, or refuses when the ring lacks room.
    fn push(&self, kind: HandoffKind, frame: &[u8]) -> bool {
        let need = Ring::record_words(frame.len());
        let tail = self.tail.load(Ordering::Relaxed);
        // Acquire: the receiver has finished reading every word before `head`, so they may be overwritten.
        let head = self.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) + need > self.words.len() {
            return false;
        }
        let header = frame.len() as u64 | (kind as u64) << 16;
        self.words[tail & self.mask].store(header, Ordering::Relaxed);
        let mut at = tail.wrapping_add(1);
        let mut chunks = frame.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
            self.words[at & self.mask].store(word, Ordering::Relaxed);
            at = at.wrapping_add(1);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.words[at & self.mask].store(u64::from_ne_bytes(last), Ordering::Relaxed);
        }
        // Release: the record's words are visible to the receiver before the new tail is.
        self.tail.store(tail.wrapping_add(need), Ordering::Release);
        true
    }

    /// Receiver side: copies the oldest record's frame into `scratch` and consumes it; its kind and length.
    fn pop_into(&self, scratch: &mut [u8]) -> Option<(HandoffKind, usize)> {
        let head = self.head.load(Ordering::Relaxed);
        // Acquire: every word of the records before `tail` is visible.
        let tail = self.tail.load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let header = self.words[head & self.mask].load(Ordering::Relaxed);
        let len = (header & 0xffff) as usize;
        let kind = HandoffKind::ALL.get((header >> 16) as usize & 0xff).copied();
        let need = Ring::record_words(len);
        let copied = len.min(scratch.len());
        let mut at = head.wrapping_add(1);
        for chunk in scratch[..copied].chunks_mut(8) {
            let word = self.words[at & self.mask].load(Ordering::Relaxed).to_ne_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
            at = at.wrapping_add(1);
        }
        // Release: the words are read before the sender may overwrite them.
        self.head.store(head.wrapping_add(need), Ordering::Release);
        // Only this crate's senders write here; a record it cannot read whole is consumed and skipped.
        match kind {
            Some(kind) if copied == len && need <= tail.wrapping_sub(head) => Some((kind, len)),
            _ => Some((HandoffKind::Outbound, 0)),
        }
    }
}

/// One receiver's rings, one per sender, and where its next drain starts (so no sender is always served last).
struct Receiver {
    from: Vec<Ring>,
    next: AtomicUsize,
}

/// Every worker's inbound rings.
pub struct Handoffs {
    receivers: Vec<Receiver>,
}

impl std::fmt::Debug for Handoffs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoffs").field("workers", &self.receivers.len()).finish_non_exhaustive()
    }
}

impl Handoffs {
    /// Rings for `workers` workers; each worker's rings hold together about `frames` 1500-byte frames (many more
    /// small ones), and at least 4 KiB per sender.
    pub fn new(workers: usize, frames: usize) -> Handoffs {
        let workers = workers.max(1);
        let per_sender =
            (frames.max(1) * AVERAGE_FRAME_BYTES / 8 / workers.saturating_sub(1).max(1)).max(MIN_RING_WORDS);
        let receivers = (0..workers)
            .map(|to| Receiver {
                // A worker never hands a frame to itself: its own ring stays minimal.
                from: (0..workers).map(|from| Ring::new(if from == to { 1 } else { per_sender })).collect(),
                next: AtomicUsize::new(0),
            })
            .collect();
        Handoffs { receivers }
    }

    pub fn workers(&self) -> usize {
        self.receivers.len()
    }

    /// Copies `frame` into the ring from worker `from` to worker `to`. Each ring has one sender: only worker
    /// `from` may push as `from`.
    pub fn push(&self, from: u16, to: u16, kind: HandoffKind, frame: &[u8]) -> Result<(), DropReason> {
        if frame.len() > HANDOFF_JUMBO_BYTES {
            return Err(DropReason::FrameTooLarge);
        }
        let ring = self
            .receivers
            .get(usize::from(to))
            .and_then(|r| r.from.get(usize::from(from)))
            .ok_or(DropReason::HandoffQueueFull)?;
        ring.push(kind, frame).then_some(()).ok_or(DropReason::HandoffQueueFull)
    }

    /// Takes the next frame handed to worker `me` (senders served in turn, each sender's frames in order), copies
    /// it into `scratch` (at least [`HANDOFF_JUMBO_BYTES`] long) and gives it to `f` with its kind; `None` when
    /// nothing waits. Only worker `me` may call it.
    pub fn pop_with<R>(
        &self,
        me: u16,
        scratch: &mut [u8],
        f: impl FnOnce(HandoffKind, &mut [u8]) -> R,
    ) -> Option<R> {
        let receiver = self.receivers.get(usize::from(me))?;
        let senders = receiver.from.len();
        let start = receiver.next.load(Ordering::Relaxed);
        for i in 0..senders {
            let from = (start + i) % senders;
            if let Some((kind, len)) = receiver.from[from].pop_into(scratch) {
                receiver.next.store((from + 1) % senders, Ordering::Relaxed);
                return Some(f(kind, &mut scratch[..len]));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pop(h: &Handoffs, me: u16) -> Option<(HandoffKind, Vec<u8>)> {
        let mut scratch = vec![0u8; HANDOFF_JUMBO_BYTES];
        h.pop_with(me, &mut scratch, |kind, bytes| (kind, bytes.to_vec()))
    }

    #[test]
    fn frames_arrive_in_order_at_their_worker_only() {
        let h = Handoffs::new(2, 4);
        h.push(0, 1, HandoffKind::Inbound, b"first").unwrap();
        h.push(0, 1, HandoffKind::Hairpin, b"second").unwrap();
        h.push(0, 1, HandoffKind::Outbound, b"third, longer than one word").unwrap();
        assert!(pop(&h, 0).is_none());
        assert_eq!(pop(&h, 1), Some((HandoffKind::Inbound, b"first".to_vec())));
        assert_eq!(pop(&h, 1), Some((HandoffKind::Hairpin, b"second".to_vec())));
        assert_eq!(pop(&h, 1), Some((HandoffKind::Outbound, b"third, longer than one word".to_vec())));
        assert!(pop(&h, 1).is_none());
    }

    #[test]
    fn senders_are_served_in_turn() {
        let h = Handoffs::new(3, 4);
        for i in 0..3u8 {
            h.push(1, 0, HandoffKind::Inbound, &[1, i]).unwrap();
            h.push(2, 0, HandoffKind::Inbound, &[2, i]).unwrap();
        }
        let order: Vec<Vec<u8>> = std::iter::from_fn(|| pop(&h, 0).map(|(_, f)| f)).collect();
        assert_eq!(order, [[1, 0], [2, 0], [1, 1], [2, 1], [1, 2], [2, 2]].map(|f| f.to_vec()));
    }

    #[test]
    fn a_full_ring_an_unknown_worker_and_an_oversized_frame_are_refused() {
        let h = Handoffs::new(2, 1);
        let jumbo = vec![7u8; HANDOFF_JUMBO_BYTES];
        let mut pushed = 0;
        while h.push(0, 1, HandoffKind::Inbound, &jumbo).is_ok() {
            pushed += 1;
        }
        // 4 KiB of ring: one record of 481 words.
        assert_eq!(pushed, 1);
        assert_eq!(h.push(0, 1, HandoffKind::Inbound, &jumbo), Err(DropReason::HandoffQueueFull));
        assert_eq!(pop(&h, 1), Some((HandoffKind::Inbound, jumbo.clone())));
        h.push(0, 1, HandoffKind::Inbound, &jumbo).unwrap();
        assert_eq!(h.push(0, 7, HandoffKind::Inbound, b"y"), Err(DropReason::HandoffQueueFull));
        assert_eq!(h.push(7, 0, HandoffKind::Inbound, b"y"), Err(DropReason::HandoffQueueFull));
        let big = vec![0u8; HANDOFF_JUMBO_BYTES + 1];
        assert_eq!(h.push(1, 0, HandoffKind::Inbound, &big), Err(DropReason::FrameTooLarge));
    }

    /// Two threads, one ring: every frame arrives once, whole, in order, through many wrap-arounds.
    #[test]
    fn a_sender_and_a_receiver_on_two_threads_keep_every_frame_whole_and_in_order() {
        let h = std::sync::Arc::new(Handoffs::new(2, 1));
        const FRAMES: u32 = 20_000;
        let sender = {
            let h = h.clone();
            std::thread::spawn(move || {
                for n in 0..FRAMES {
                    let len = 1 + (n as usize * 7919) % 1600;
                    let frame: Vec<u8> = (0..len).map(|i| (n as usize + i) as u8).collect();
                    while h.push(0, 1, HandoffKind::Inbound, &frame).is_err() {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut scratch = vec![0u8; HANDOFF_JUMBO_BYTES];
        let mut n = 0u32;
        while n < FRAMES {
            let got = h.pop_with(1, &mut scratch, |kind, frame| {
                let len = 1 + (n as usize * 7919) % 1600;
                assert_eq!((kind, frame.len()), (HandoffKind::Inbound, len), "frame {n}");
                assert!(
                    frame.iter().enumerate().all(|(i, &b)| b == (n as usize + i) as u8),
                    "frame {n} mangled"
                );
            });
            if got.is_some() {
                n += 1;
            }
        }
        sender.join().unwrap();
        assert!(pop(&h, 1).is_none());
    }

    proptest! {
        /// The rings against a model: per (sender, receiver) FIFO queues of bounded byte capacity.
        #[test]
        fn rings_behave_like_bounded_fifos(ops in proptest::collection::vec((0u16..3, 0u16..3, 0usize..2000, any::<bool>()), 1..300)) {
            let h = Handoffs::new(3, 1);
            let mut model: Vec<std::collections::VecDeque<Vec<u8>>> = vec![Default::default(); 9];
            for (i, (from, to, len, push)) in ops.into_iter().enumerate() {
                if push {
                    let frame: Vec<u8> = (0..len).map(|b| (b + i) as u8).collect();
                    let q = &mut model[usize::from(to) * 3 + usize::from(from)];
                    let used: usize = q.iter().map(|f| Ring::record_words(f.len())).sum();
                    let cap = if from == to { 1 } else { MIN_RING_WORDS };
                    let fits = used + Ring::record_words(len) <= cap;
                    prop_assert_eq!(h.push(from, to, HandoffKind::Hairpin, &frame).is_ok(), fits);
                    if fits {
                        q.push_back(frame);
                    }
                } else {
                    // The receiver `to` drains one frame: whichever sender's turn it is, in order per sender.
                    let got = pop(&h, to);
                    match got {
                        None => prop_assert!((0..3).all(|f| model[usize::from(to) * 3 + f].is_empty())),
                        Some((kind, frame)) => {
                            prop_assert_eq!(kind, HandoffKind::Hairpin);
                            let sender = (0..3).find(|f| model[usize::from(to) * 3 + f].front() == Some(&frame));
                            prop_assert!(sender.is_some(), "a frame that is no sender's oldest");
                            model[usize::from(to) * 3 + sender.unwrap_or(0)].pop_front();
                        }
                    }
                }
            }
        }
    }
}
