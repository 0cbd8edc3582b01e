//! Who holds each UMEM frame: the ledger behind one AF_XDP socket's UMEM.
//!
//! A UMEM frame is always in exactly one place: free in user space, lent to the kernel on the fill ring, handed
//! back on the rx ring and being processed, being written for transmission, or lent to the kernel on the tx ring
//! until the completion ring returns it. Losing a frame starves the socket; lending one twice lets the kernel
//! write into a frame we are reading. [`FrameLedger`] makes every move explicit and refuses moves that do not
//! match where a frame is, so a kernel (or bug) handing back a frame we never lent is caught and counted instead
//! of corrupting a frame in flight.
//!
//! Pure and allocation-free after construction (the free list is a preallocated stack), so it is tested against
//! an in-memory model of the kernel's FIFO rings without a kernel (see the proptest below), as s2n-quic-xdp tests
//! its ring cursor against a FIFO oracle.

/// Where one frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameState {
    /// In user space, unused.
    Free,
    /// Lent to the kernel on the fill ring, waiting for a received packet.
    InFill,
    /// Returned on the rx ring; user space is reading it.
    Received,
    /// Taken by user space to write a packet for transmission, not yet on the tx ring.
    Writing,
    /// Lent to the kernel on the tx ring; returns on the completion ring.
    InTx,
}

/// A move the ledger refused because the frame was not where the move requires (or does not exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame {frame}: expected {expected:?}, found {found:?}")]
pub struct LedgerError {
    pub frame: u32,
    pub expected: FrameState,
    /// `None` when the index is outside the UMEM.
    pub found: Option<FrameState>,
}

/// The state of every frame of one UMEM, and a stack of the free ones.
#[derive(Debug, Clone)]
pub struct FrameLedger {
    states: Vec<FrameState>,
    free: Vec<u32>,
    counts: [u32; 5],
}

fn slot(s: FrameState) -> usize {
    match s {
        FrameState::Free => 0,
        FrameState::InFill => 1,
        FrameState::Received => 2,
        FrameState::Writing => 3,
        FrameState::InTx => 4,
    }
}

impl FrameLedger {
    /// A ledger of `frames` frames, all free. Lower indices are handed out first.
    pub fn new(frames: u32) -> FrameLedger {
        FrameLedger {
            states: vec![FrameState::Free; frames as usize],
            free: (0..frames).rev().collect(),
            counts: [frames, 0, 0, 0, 0],
        }
    }

    pub fn state(&self, frame: u32) -> Option<FrameState> {
        self.states.get(frame as usize).copied()
    }

    /// How many frames are in `state`.
    pub fn count(&self, state: FrameState) -> u32 {
        self.counts[slot(state)]
    }

    #[cfg(test)]
    fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    fn set(&mut self, frame: u32, to: FrameState) {
        let from = &mut self.states[frame as usize];
        self.counts[slot(*from)] -= 1;
        self.counts[slot(to)] += 1;
        *from = to;
    }

    fn take_free(&mut self, to: FrameState) -> Option<u32> {
        let frame = self.free.pop()?;
        self.set(frame, to);
        Some(frame)
    }

    fn give_back(&mut self, frame: u32) {
        self.set(frame, FrameState::Free);
        self.free.push(frame);
    }

    fn expect(&self, frame: u32, expected: FrameState) -> Result<(), LedgerError> {
        match self.state(frame) {
            Some(s) if s == expected => Ok(()),
            found => Err(LedgerError { frame, expected, found }),
        }
    }

    /// Takes a free frame to put on the fill ring (Free → InFill). `None` when no frame is free.
    pub fn lend_for_fill(&mut self) -> Option<u32> {
        self.take_free(FrameState::InFill)
    }

    /// Takes a free frame to write a packet into for transmission (Free → Writing).
    pub fn take_for_tx(&mut self) -> Option<u32> {
        self.take_free(FrameState::Writing)
    }

    /// The kernel returned `frame` on the rx ring (InFill → Received).
    pub fn received(&mut self, frame: u32) -> Result<(), LedgerError> {
        self.expect(frame, FrameState::InFill)?;
        self.set(frame, FrameState::Received);
        Ok(())
    }

    /// Done reading a received frame (Received → Free).
    pub fn release_received(&mut self, frame: u32) -> Result<(), LedgerError> {
        self.expect(frame, FrameState::Received)?;
        self.give_back(frame);
        Ok(())
    }

    /// A frame being written went on the tx ring (Writing → InTx).
    pub fn submitted(&mut self, frame: u32) -> Result<(), LedgerError> {
        self.expect(frame, FrameState::Writing)?;
        self.set(frame, FrameState::InTx);
        Ok(())
    }

    /// A frame being written will not be sent after all (e.g. tx ring full) (Writing → Free).
    pub fn cancel_tx(&mut self, frame: u32) -> Result<(), LedgerError> {
        self.expect(frame, FrameState::Writing)?;
        self.give_back(frame);
        Ok(())
    }

    /// The kernel returned `frame` on the completion ring (InTx → Free).
    pub fn completed(&mut self, frame: u32) -> Result<(), LedgerError> {
        self.expect(frame, FrameState::InTx)?;
        self.give_back(frame);
        Ok(())
    }

    /// Frames not yet given back to user space (on the fill ring or awaiting completion). Non-zero at shutdown
    /// means the kernel still holds them; the UMEM is unmapped only after the socket is closed.
    pub fn lent_to_kernel(&self) -> u32 {
        self.count(FrameState::InFill) + self.count(FrameState::InTx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn a_frame_moves_through_fill_rx_and_back() {
        let mut l = FrameLedger::new(2);
        let a = l.lend_for_fill().unwrap();
        assert_eq!(l.state(a), Some(FrameState::InFill));
        l.received(a).unwrap();
        assert_eq!(l.count(FrameState::Received), 1);
        l.release_received(a).unwrap();
        assert_eq!(l.free_count(), 2);
    }

    #[test]
    fn refuses_frames_the_kernel_was_never_lent() {
        let mut l = FrameLedger::new(4);
        assert_eq!(
            l.received(1),
            Err(LedgerError { frame: 1, expected: FrameState::InFill, found: Some(FrameState::Free) })
        );
        assert_eq!(l.received(99).unwrap_err().found, None);
        let t = l.take_for_tx().unwrap();
        // A completion for a frame still being written is refused.
        assert!(l.completed(t).is_err());
        l.submitted(t).unwrap();
        // Completing twice is refused the second time.
        l.completed(t).unwrap();
        assert!(l.completed(t).is_err());
        assert_eq!(l.free_count(), 4);
    }

    #[test]
    fn runs_dry_and_recovers() {
        let mut l = FrameLedger::new(3);
        let got: Vec<u32> = std::iter::from_fn(|| l.lend_for_fill()).collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(l.take_for_tx(), None);
        l.received(1).unwrap();
        l.release_received(1).unwrap();
        assert_eq!(l.take_for_tx(), Some(1));
    }

    /// Operations a worker and the kernel perform; the kernel side is modelled as FIFO rings.
    #[derive(Debug, Clone)]
    enum Op {
        Fill(u8),
        KernelReceives(u8),
        Release(u8),
        TakeTx(u8),
        Submit(u8),
        Cancel(u8),
        KernelCompletes(u8),
        /// A bogus descriptor from the kernel: must be refused and change nothing.
        BogusRx(u32),
        BogusCompletion(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..8).prop_map(Op::Fill),
            (0u8..8).prop_map(Op::KernelReceives),
            (0u8..8).prop_map(Op::Release),
            (0u8..8).prop_map(Op::TakeTx),
            (0u8..8).prop_map(Op::Submit),
            (0u8..4).prop_map(Op::Cancel),
            (0u8..8).prop_map(Op::KernelCompletes),
            (0u32..40).prop_map(Op::BogusRx),
            (0u32..40).prop_map(Op::BogusCompletion),
        ]
    }

    proptest! {
        /// The ledger against a model: FIFO fill/rx and tx/completion rings plus user-held lists. No frame is
        /// ever lost, held in two places, or accepted back from a place it was not lent to.
        #[test]
        fn ledger_matches_a_fifo_ring_model(frames in 1u32..32, ops in proptest::collection::vec(op(), 1..200)) {
            let mut l = FrameLedger::new(frames);
            let mut fill_ring: VecDeque<u32> = VecDeque::new();
            let mut received: Vec<u32> = Vec::new();
            let mut writing: Vec<u32> = Vec::new();
            let mut tx_ring: VecDeque<u32> = VecDeque::new();
            for op in ops {
                match op {
                    Op::Fill(n) => for _ in 0..n {
                        match l.lend_for_fill() { Some(f) => fill_ring.push_back(f), None => break }
                    },
                    Op::KernelReceives(n) => for _ in 0..n {
                        let Some(f) = fill_ring.pop_front() else { break };
                        l.received(f).unwrap();
                        received.push(f);
                    },
                    Op::Release(n) => for _ in 0..n {
                        let Some(f) = received.pop() else { break };
                        l.release_received(f).unwrap();
                    },
                    Op::TakeTx(n) => for _ in 0..n {
                        match l.take_for_tx() { Some(f) => writing.push(f), None => break }
                    },
                    Op::Submit(n) => for _ in 0..n {
                        let Some(f) = writing.pop() else { break };
                        l.submitted(f).unwrap();
                        tx_ring.push_back(f);
                    },
                    Op::Cancel(n) => for _ in 0..n {
                        let Some(f) = writing.pop() else { break };
                        l.cancel_tx(f).unwrap();
                    },
                    Op::KernelCompletes(n) => for _ in 0..n {
                        let Some(f) = tx_ring.pop_front() else { break };
                        l.completed(f).unwrap();
                    },
                    Op::BogusRx(f) => {
                        if !fill_ring.contains(&f) {
                            let before = l.state(f);
                            prop_assert!(l.received(f).is_err());
                            prop_assert_eq!(l.state(f), before);
                        }
                    }
                    Op::BogusCompletion(f) => {
                        if !tx_ring.contains(&f) {
                            let before = l.state(f);
                            prop_assert!(l.completed(f).is_err());
                            prop_assert_eq!(l.state(f), before);
                        }
                    }
                }
                // Every frame is in exactly one place, and the ledger agrees with the model about which.
                let mut seen = vec![0u8; frames as usize];
                for (&f, st) in fill_ring.iter().map(|f| (f, FrameState::InFill))
                    .chain(received.iter().map(|f| (f, FrameState::Received)))
                    .chain(writing.iter().map(|f| (f, FrameState::Writing)))
                    .chain(tx_ring.iter().map(|f| (f, FrameState::InTx)))
                {
                    seen[f as usize] += 1;
                    prop_assert_eq!(l.state(f), Some(st));
                }
                prop_assert!(seen.iter().all(|&c| c <= 1));
                let held = seen.iter().filter(|&&c| c == 1).count() as u32;
                prop_assert_eq!(l.free_count() + held, frames);
                prop_assert_eq!(l.count(FrameState::Free), l.free_count());
                prop_assert_eq!(l.lent_to_kernel(), (fill_ring.len() + tx_ring.len()) as u32);
            }
        }
    }
}
