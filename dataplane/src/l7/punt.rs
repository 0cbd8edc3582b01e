//! Packets between the workers and the L7 thread.
//!
//! A worker punts every packet of an `l7` flow (from inside, the client's side) into one bounded queue shared by
//! all workers; the L7 thread answers through one bounded queue per worker, which that worker drains and sends
//! out of its inside port. Neither side ever blocks: a full queue drops the packet (counted; TCP retransmits).
//! The L7 thread parks when it has nothing to do; a worker wakes it (through the callback the thread installed)
//! only when it is parked, so a busy L7 thread costs the workers no system call. The other way round, an idle
//! worker sleeps in `poll()` on its sockets and on a wake-up socket of its own, which the L7 thread writes to only
//! when that worker is parked.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
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
/// A worker's wake-up: the read end it polls, the write end the L7 thread writes a byte to, and whether the
/// worker is (about to be) asleep.
struct WorkerWake {
    read: UnixStream,
    write: UnixStream,
    parked: AtomicBool,
}

pub struct Punt {
    to_l7: ArrayQueue<PuntedPacket>,
    to_workers: Vec<ArrayQueue<PuntedPacket>>,
    worker_wakes: Vec<WorkerWake>,
    parked: AtomicBool,
    wake: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Packets dropped because the queue towards the L7 thread or a worker was full.
    pub dropped_to_l7: AtomicU64,
    pub dropped_to_workers: AtomicU64,
}

impl Punt {
    /// Queues for `workers` workers, each way `capacity` packets deep. Fails only if the wake-up sockets cannot
    /// be made.
    pub fn new(workers: usize, capacity: usize) -> std::io::Result<Arc<Punt>> {
        let worker_wakes = (0..workers.max(1))
            .map(|_| {
                let (read, write) = UnixStream::pair()?;
                read.set_nonblocking(true)?;
                write.set_nonblocking(true)?;
                Ok(WorkerWake { read, write, parked: AtomicBool::new(false) })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Arc::new(Punt {
            to_l7: ArrayQueue::new(capacity.max(1)),
            to_workers: (0..workers.max(1)).map(|_| ArrayQueue::new(capacity.max(1))).collect(),
            worker_wakes,
            parked: AtomicBool::new(false),
            wake: std::sync::OnceLock::new(),
            dropped_to_l7: AtomicU64::new(0),
            dropped_to_workers: AtomicU64::new(0),
        }))
    }

    /// The socket worker `worker` adds to its `poll()` set: readable when the L7 thread has woken it.
    pub fn worker_wake_fd(&self, worker: u16) -> Option<RawFd> {
        self.worker_wakes.get(usize::from(worker)).map(|w| w.read.as_raw_fd())
    }

    /// On worker `worker`, before it sleeps: from now on the L7 thread wakes it. False if packets for it arrived
    /// in the meantime (then it must not sleep).
    pub fn worker_park(&self, worker: u16) -> bool {
        let (Some(wake), Some(queue)) =
            (self.worker_wakes.get(usize::from(worker)), self.to_workers.get(usize::from(worker)))
        else {
            return true;
        };
        wake.parked.store(true, Ordering::SeqCst);
        if !queue.is_empty() {
            wake.parked.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// On worker `worker` after it woke: no more wake-ups needed. `woken`: its wake-up socket was readable, and
    /// the bytes are read away (only then: a read that finds nothing is a wasted system call per sleep).
    pub fn worker_unpark(&self, worker: u16, woken: bool) {
        if let Some(wake) = self.worker_wakes.get(usize::from(worker)) {
            wake.parked.store(false, Ordering::SeqCst);
            if woken {
                // One byte per wake-up, and one wake-up per sleep: a few bytes at most are waiting.
                let mut sink = [0u8; 64];
                while matches!((&wake.read).read(&mut sink), Ok(n) if n == sink.len()) {}
            }
        }
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
        let worker = if usize::from(packet.worker) < self.to_workers.len() { packet.worker } else { 0 };
        let queue = self.to_workers.get(usize::from(worker));
        if queue.is_none_or(|q| q.push(packet).is_err()) {
            self.dropped_to_workers.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if let Some(wake) = self.worker_wakes.get(usize::from(worker)) {
            if wake.parked.swap(false, Ordering::SeqCst) {
                // A full socket buffer means a wake-up is already pending.
                let _ = (&wake.write).write(&[1]);
            }
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
        let punt = Punt::new(2, 2).unwrap();
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
        assert!(punt.worker_park(1));
        assert!(punt.to_worker(p));
        // The parked worker's socket is readable; unparking after the wake-up reads it empty.
        let fd = punt.worker_wake_fd(1).unwrap();
        assert_eq!(crate::xsk::wait_readable(&[fd], 0), 1, "the wake-up byte was written");
        punt.worker_unpark(1, true);
        assert_eq!(crate::xsk::wait_readable(&[fd], 0), 0, "read away: the next sleep is not cut short");
        assert!(!punt.worker_park(1), "a packet is waiting: do not sleep");
        punt.worker_unpark(1, false);
        assert_eq!(punt.pop_for_worker(1).map(|p| p.len), Some(4));
        assert!(punt.pop_for_worker(0).is_none());
        assert!(PuntedPacket::new(&[0; PUNT_MAX_PACKET + 1], 0, 0, Ipv4Addr::UNSPECIFIED).is_none());
    }
}
