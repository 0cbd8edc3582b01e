//! The pinned poll loop that ties the `xsk` ports to the [`Pipeline`].
//!
//! One worker per configured core. It owns one inside and one outside [`Port`] (the same queue index on both
//! interfaces), its [`Pipeline`] and its [`WorkerStats`] (which it alone writes). Per iteration, for each
//! direction: take a burst off the rx ring, run the pipeline on each frame, copy forwarded frames into the other
//! port's tx ring, give the rx frames back; then reap completions, refill the fill rings and kick TX.
//!
//! Idle behaviour ([`IdleMode`]): `Busy` spins forever (lowest latency, burns its core). `Adaptive` (default)
//! keeps polling for `idle_spin` after the last frame it moved, giving way to any other runnable thread between
//! polls (`sched_yield`), then blocks in `poll()` on both sockets for at most `idle_timeout_ms`: a frame wakes it
//! at once, and an idle gateway costs no CPU. Polling on after traffic spares the next packet of a conversation
//! (a request's answer, the next request) a wake-up; yielding keeps the spin from taking the CPU from the
//! kernel's NAPI threads, the L7 thread and other work on machines where the worker shares its core.
//!
//! Once per iteration it also finishes frames other workers handed over (`crate::handoff`), expires idle flows
//! within a budget, and about once a second publishes its NAT gauges.
//!
//! A shared `AtomicBool` stops every worker; the loop checks it once per iteration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::nat::FlowHint;
use crate::pipeline::{Action, Pipeline, PREFETCH_DISTANCE, PREFETCH_HINTS};
use crate::stats::WorkerStats;
use crate::time::Instant;
use crate::xsk::{wait_readable, Port};
use crate::Side;

/// How long an adaptive worker polls on after traffic by default (`[dataplane] idle_spin_us`).
pub const DEFAULT_IDLE_SPIN_US: u64 = 50_000;

/// How a worker waits when there is no traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IdleMode {
    /// Never block: poll the rings continuously.
    Busy,
    /// Poll while there is traffic and for `idle_spin` after it, yielding between empty polls; then block in
    /// `poll()`.
    #[default]
    Adaptive,
}

/// A worker's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Core to pin the thread to (`None`: leave it to the scheduler).
    pub core: Option<usize>,
    pub idle: IdleMode,
    /// How long an adaptive worker keeps polling after the last frame it moved before it blocks.
    pub idle_spin: std::time::Duration,
    /// Longest block in `poll()`; bounds how late the stop flag is noticed.
    pub idle_timeout_ms: i32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            core: None,
            idle: IdleMode::Adaptive,
            idle_spin: std::time::Duration::from_micros(DEFAULT_IDLE_SPIN_US),
            idle_timeout_ms: 20,
        }
    }
}

/// One worker: two ports, a pipeline, counters.
#[derive(Debug)]
pub struct Worker {
    pub config: WorkerConfig,
    pub inside: Port,
    pub outside: Port,
    pub pipeline: Pipeline,
    pub stop: Arc<AtomicBool>,
}

impl Worker {
    /// Runs the loop on the current thread until `stop` is set. Pins the thread first if a core is configured.
    pub fn run(mut self) {
        if let Some(core) = self.config.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(core, "cannot pin worker to core; running unpinned");
            }
        }
        let stats = self.pipeline.stats().clone();
        // The L7 path's wake-up socket too, so that its packets for clients do not wait out an idle sleep.
        let mut fds = vec![self.inside.fd(), self.outside.fd()];
        // The L7 wake-up socket's bit in what `wait_readable` returns.
        let l7_wake_bit = 1u8 << fds.len();
        fds.extend(self.pipeline.l7_wake_fd());
        // When this worker last moved a frame (or had transmissions in flight).
        let mut last_busy = Instant::monotonic();
        let mut last_gauges = Instant::ZERO;
        // Where hairpinned frames are copied on their way back out of the port they came in by, and handed-over
        // frames out of their ring (allocated once).
        let mut scratch = vec![0u8; crate::handoff::HANDOFF_JUMBO_BYTES];
        while !self.stop.load(Ordering::Relaxed) {
            stats.loops.inc();
            self.pipeline.begin_batch();
            let (inside, outside) = (&mut self.inside, &mut self.outside);
            let moved =
                forward_burst(Side::Inside, inside, outside, &mut self.pipeline, &stats, &mut scratch)
                    + forward_burst(Side::Outside, inside, outside, &mut self.pipeline, &stats, &mut scratch);
            let now = Instant::monotonic();
            let moved = moved + self.drain_handoffs(now, &stats, &mut scratch);
            let moved = moved + self.drain_l7(&stats, &mut scratch);
            let moved = moved + self.pipeline.answer_flow_query(now);
            if self.pipeline.has_held() {
                self.release_held(now, &stats);
            }
            self.pipeline.poll_expiry(now, EXPIRY_BUDGET);
            if now.saturating_since(last_gauges).as_nanos() >= GAUGE_INTERVAL_NANOS {
                self.publish_gauges(&stats);
                last_gauges = now;
            }
            for port in [&mut self.inside, &mut self.outside] {
                port.reap_completions();
                port.refill();
            }
            if moved > 0 || self.inside.tx_outstanding() || self.outside.tx_outstanding() {
                last_busy = now;
                continue;
            }
            match self.config.idle {
                IdleMode::Busy => std::hint::spin_loop(),
                IdleMode::Adaptive if now.saturating_since(last_busy) >= self.config.idle_spin => {
                    let mut woken_by_l7 = false;
                    if self.pipeline.l7_park() {
                        let ready = wait_readable(&fds, self.config.idle_timeout_ms);
                        woken_by_l7 = ready & l7_wake_bit != 0;
                    }
                    self.pipeline.l7_unpark(woken_by_l7);
                }
                IdleMode::Adaptive => std::thread::yield_now(),
            }
        }
        self.publish_gauges(&stats);
        tracing::debug!(
            inside_bogus_completions = self.inside.bogus_completions(),
            outside_bogus_completions = self.outside.bogus_completions(),
            inside_frames_lent_to_kernel = self.inside.frames_lent_to_kernel(),
            outside_frames_lent_to_kernel = self.outside.frames_lent_to_kernel(),
            "worker stopped"
        );
    }
}

impl Worker {
    /// Finishes up to one burst of frames other workers handed to this one (packets from inside whose endpoint this
    /// worker owns, replies whose NAT port it owns, hairpinned packets); each leaves by the port its action names.
    /// Returns how many were taken.
    fn drain_handoffs(&mut self, now: Instant, stats: &WorkerStats, scratch: &mut [u8]) -> usize {
        let handoffs = self.pipeline.handoffs().clone();
        let me = self.pipeline.worker();
        let (pipeline, inside, outside) = (&mut self.pipeline, &mut self.inside, &mut self.outside);
        let mut taken = 0;
        while taken < HANDOFF_BURST {
            let finished = handoffs.pop_with(me, scratch, |kind, frame| {
                let action = pipeline.process_handoff(now, kind, frame);
                stage(action, frame, pipeline, inside, outside, stats);
            });
            if finished.is_none() {
                break;
            }
            taken += 1;
        }
        if taken > 0 {
            self.inside.flush_tx(stats, Side::Inside);
            self.outside.flush_tx(stats, Side::Outside);
        }
        taken
    }
}

impl Worker {
    /// Sends up to one burst of the L7 path's packets for clients out of the inside port.
    fn drain_l7(&mut self, stats: &WorkerStats, scratch: &mut [u8]) -> usize {
        let inside = &mut self.inside;
        let taken = self.pipeline.drain_l7(HANDOFF_BURST, scratch, |frame| {
            if let Err(e) = inside.stage_tx(frame) {
                stats.count_drop(e.drop_reason());
            }
        });
        if taken > 0 {
            self.inside.flush_tx(stats, Side::Inside);
        }
        taken
    }

    /// Republishes the NAT gauges and the kernel's socket drop counters for the admin endpoint.
    fn publish_gauges(&self, stats: &WorkerStats) {
        self.pipeline.publish_gauges();
        for (side, port) in [(Side::Inside, &self.inside), (Side::Outside, &self.outside)] {
            if let Some(d) = port.kernel_drops() {
                let slots = &stats.kernel_drops[crate::stats::side_index(side)];
                for (slot, v) in
                    slots.iter().zip([d.rx_ring_full, d.fill_ring_empty, d.rx_dropped, d.invalid_descriptors])
                {
                    slot.store(v, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends the frames whose neighbour has resolved since they were held.
    fn release_held(&mut self, now: Instant, stats: &WorkerStats) {
        let (inside, outside) = (&mut self.inside, &mut self.outside);
        self.pipeline.release_held(now, |out, frame| {
            let port = port_on(out, inside, outside);
            if let Err(e) = port.stage_tx(frame) {
                stats.count_drop(e.drop_reason());
            }
        });
        self.inside.flush_tx(stats, Side::Inside);
        self.outside.flush_tx(stats, Side::Outside);
    }
}

/// The port a frame leaving by `side` goes out of.
fn port_on<'a>(side: Side, inside: &'a mut Port, outside: &'a mut Port) -> &'a mut Port {
    match side {
        Side::Inside => inside,
        Side::Outside => outside,
    }
}

/// Most handed-over frames finished per loop iteration.
const HANDOFF_BURST: usize = 64;
/// Most idle flows expired per loop iteration: expiry never stalls forwarding.
const EXPIRY_BUDGET: usize = 64;
/// How often the NAT gauges are republished for the admin endpoint.
const GAUGE_INTERVAL_NANOS: u128 = 1_000_000_000;

/// Stages what `action` says to send: the rewritten `frame` or the pipeline's reply, on the port the action names.
#[inline]
fn stage(
    action: Action,
    frame: &[u8],
    pipeline: &Pipeline,
    inside: &mut Port,
    outside: &mut Port,
    stats: &WorkerStats,
) {
    let (out, bytes) = match action {
        Action::Forward { out, len } => (out, &frame[..len.min(frame.len())]),
        // An ICMP error: copied out of the pipeline's buffer now, before the next frame can overwrite it.
        Action::Reply { out, len } => {
            let reply = pipeline.reply_frame();
            (out, &reply[..len.min(reply.len())])
        }
        // Dropped, held and handed-off frames need nothing more here (their bytes were copied where needed).
        Action::Drop(_) | Action::HandedOff | Action::Held | Action::Punted => return,
    };
    if let Err(e) = port_on(out, inside, outside).stage_tx(bytes) {
        stats.count_drop(e.drop_reason());
    }
}

/// One burst from the port on `side`: pipeline each frame and stage what it sends on the port its [`Action`]
/// names, then flush. A hairpinned packet goes back out of the port it came in by: its bytes sit in that port's
/// UMEM, so they are copied through `scratch` (sized for the largest frame) before being staged there.
fn forward_burst(
    side: Side,
    inside: &mut Port,
    outside: &mut Port,
    pipeline: &mut Pipeline,
    stats: &WorkerStats,
    scratch: &mut [u8],
) -> usize {
    let (from, to) = match side {
        Side::Inside => (inside, outside),
        Side::Outside => (outside, inside),
    };
    let n = from.receive(stats);
    if n == 0 {
        to.flush_tx(stats, side.other());
        return 0;
    }
    stats.batches.inc();
    let now = Instant::monotonic();
    let mut sent_back = false;
    // Overlap the cache misses of the flow lookups (see `FlowHint`): index slots 2 × distance frames ahead,
    // sessions one distance ahead.
    let mut hints = [FlowHint::NONE; PREFETCH_HINTS];
    let prefetch = pipeline.prefetch_pays();
    if prefetch {
        for (j, hint) in hints.iter_mut().enumerate().take(n) {
            *hint = pipeline.prefetch_flow(side, from.received_frame(j));
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
                // Frame i's slot in the ring: its hint was used a distance ago.
                hints[i % PREFETCH_HINTS] =
                    pipeline.prefetch_flow(side, from.received_frame(i + PREFETCH_HINTS));
            }
        }
        let frame = from.received_frame(i);
        stats.rx(side).add(frame.len());
        let staged = match pipeline.process(now, side, frame) {
            Action::Forward { out, len } if out != side => to.stage_tx(&frame[..len.min(frame.len())]),
            Action::Forward { len, .. } => {
                let len = len.min(frame.len()).min(scratch.len());
                scratch[..len].copy_from_slice(&frame[..len]);
                sent_back = true;
                from.stage_tx(&scratch[..len])
            }
            // An ICMP error: copied out of the pipeline's buffer now, before the next frame can overwrite it.
            Action::Reply { out, len } => {
                let reply = pipeline.reply_frame();
                let reply = &reply[..len.min(reply.len())];
                sent_back |= out == side;
                if out == side {
                    from.stage_tx(reply)
                } else {
                    to.stage_tx(reply)
                }
            }
            // Dropped, held and handed-off frames need nothing more here (their bytes were copied where needed).
            Action::Drop(_) | Action::HandedOff | Action::Held | Action::Punted => Ok(()),
        };
        if let Err(e) = staged {
            stats.count_drop(e.drop_reason());
        }
    }
    from.release_received();
    to.flush_tx(stats, side.other());
    if sent_back {
        from.flush_tx(stats, side);
    }
    n
}
