//! Packets between the workers and the L7 thread.
//!
//! A worker punts every packet of an `l7` flow (from inside, the client's side) into one bounded queue shared by
//! all workers; the L7 thread answers through one bounded queue per worker, which that worker drains and sends
//! out of its inside port. Neither side ever blocks: a full queue drops the packet (counted; TCP retransmits).
//! The L7 thread parks when it has nothing to do; a worker wakes it (through the callback the thread installed)
//! only when it is parked, so a busy L7 thread costs the workers no system call.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

/// Largest IPv4 packet carried (the inside MTU must not exceed it; bigger packets are dropped).
pub const PUNT_MAX_PACKET: usize = 2048;

/// One IPv4 packet and what the worker knew of it.
#[derive(Clone, Copy)]
pub struct PuntedPacket {
    pub len: u16,
    /// The worker that punted it (towards the L7 thread) or that must send it (towards a client).
    pub worker: u16,
    /// The `l7` rule that matched (towards the L7 thread).
    pub rule: u32,
    /// The egress IP the flow's group leaves from (towards the L7 thread).
    pub egress: Ipv4Addr,
    pub bytes: [u8; PUNT_MAX_PACKET],
}

impl PuntedPacket {
    pub fn packet(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(PUNT_MAX_PACKET)]
    }

    /// A packet to carry, or `None` if it is too large.
    pub fn new(packet: &[u8], worker: u16, rule: u32, egress: Ipv4Addr) -> Option<PuntedPacket> {
        if packet.len() > PUNT_MAX_PACKET {
            return None;
        }
        let mut p =
            PuntedPacket { len: packet.len() as u16, worker, rule, egress, bytes: [0; PUNT_MAX_PACKET] };
        p.bytes[..packet.len()].copy_from_slice(packet);
        Some(p)
    }
}

/// The queues and the wake-up between the workers and the L7 thread.
pub struct Punt {
    to_l7: ArrayQueue<PuntedPacket>,
    to_workers: Vec<ArrayQueue<PuntedPacket>>,
    parked: AtomicBool,
    wake: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Packets dropped because the queue towards the L7 thread or a worker was full.
    pub dropped_to_l7: AtomicU64,
    pub dropped_to_workers: AtomicU64,
}

impl Punt {
    pub fn new(workers: usize, capacity: usize) -> Arc<Punt> {
        Arc::new(Punt {
            to_l7: ArrayQueue::new(capacity.max(1)),
            to_workers: (0..workers.max(1)).map(|_| ArrayQueue::new(capacity.max(1))).collect(),
            parked: AtomicBool::new(false),
            wake: std::sync::OnceLock::new(),
            dropped_to_l7: AtomicU64::new(0),
            dropped_to_workers: AtomicU64::new(0),
        })
    }

    /// The L7 thread's wake-up (set once, before the workers start punting).
    pub fn set_wake(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wake.set(wake);
    }

    /// From a worker: hands a packet to the L7 thread. False (and counted) when the queue is full.
    pub fn to_l7(&self, packet: PuntedPacket) -> bool {
        if self.to_l7.push(packet).is_err() {
            self.dropped_to_l7.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.parked.load(Ordering::Acquire) {
            self.parked.store(false, Ordering::Release);
            if let Some(wake) = self.wake.get() {
                wake();
            }
        }
        true
    }

    /// On the L7 thread: the next punted packet.
    pub fn pop_for_l7(&self) -> Option<PuntedPacket> {
        self.to_l7.pop()
    }

    /// On the L7 thread, before it waits: from now on workers wake it. Returns false if packets arrived in the
    /// meantime (then it must not wait).
    pub fn park(&self) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        if !self.to_l7.is_empty() {
            self.parked.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// On the L7 thread after waking.
    pub fn unpark(&self) {
        self.parked.store(false, Ordering::Release);
    }

    /// From the L7 thread: a packet for a client, sent by worker `packet.worker`.
    pub fn to_worker(&self, packet: PuntedPacket) -> bool {
        let queue = self.to_workers.get(usize::from(packet.worker)).or(self.to_workers.first());
        if queue.is_none_or(|q| q.push(packet).is_err()) {
            self.dropped_to_workers.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// On worker `worker`: the next packet the L7 thread has for a client.
    pub fn pop_for_worker(&self, worker: u16) -> Option<PuntedPacket> {
        self.to_workers.get(usize::from(worker))?.pop()
    }

    pub fn workers(&self) -> usize {
        self.to_workers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_cross_both_ways_and_a_parked_thread_is_woken_once() {
        let punt = Punt::new(2, 2);
        let woken = Arc::new(AtomicU64::new(0));
        let w = woken.clone();
        punt.set_wake(Box::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        let p = PuntedPacket::new(b"\x45abc", 1, 7, Ipv4Addr::new(192, 0, 2, 30)).unwrap();
        assert!(punt.to_l7(p));
        assert_eq!(woken.load(Ordering::Relaxed), 0, "not parked: no wake-up");
        assert!(!punt.park(), "a packet is waiting: do not wait");
        let got = punt.pop_for_l7().unwrap();
        assert_eq!((got.packet(), got.worker, got.rule), (&b"\x45abc"[..], 1, 7));
        assert!(punt.park());
        assert!(punt.to_l7(p) && punt.to_l7(p));
        assert_eq!(woken.load(Ordering::Relaxed), 1, "woken by the first, not the second");
        assert!(!punt.to_l7(p), "full");
        assert_eq!(punt.dropped_to_l7.load(Ordering::Relaxed), 1);
        assert!(punt.to_worker(p));
        assert_eq!(punt.pop_for_worker(1).map(|p| p.len), Some(4));
        assert!(punt.pop_for_worker(0).is_none());
        assert!(PuntedPacket::new(&[0; PUNT_MAX_PACKET + 1], 0, 0, Ipv4Addr::UNSPECIFIED).is_none());
    }
}
