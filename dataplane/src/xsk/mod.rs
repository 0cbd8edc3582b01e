//! AF_XDP I/O: one [`Port`] per (interface, queue) a worker owns: its UMEM, fill/completion/rx/tx rings and
//! socket (xsk-rs 0.11 over libxdp), plus the XDP program that steers frames to it ([`xdp`]).
//!
//! This is the only module allowed `unsafe`; every block says why it is sound. The soundness argument is always
//! the same: a frame's bytes are touched only while the [`FrameLedger`] says user space holds it (received, or
//! being written), and every descriptor the kernel hands back is checked against the UMEM's bounds and the
//! ledger before its bytes are looked at (a bad one is counted as [`DropReason::BadRxDescriptor`]).
//!
//! Shape of the data path, per burst:
//! - [`Port::receive`] takes up to `batch` descriptors off the rx ring; [`Port::received_frame`] lends out each
//!   frame's bytes for the pipeline to rewrite in place; [`Port::release_received`] returns them all.
//! - Forwarding crosses interfaces, and an xsk-rs UMEM cannot be shared with a socket on another interface, so
//!   [`Port::stage_tx`] copies the frame into a free frame of the *other* port's UMEM (64–1500 bytes of memcpy)
//!   and [`Port::flush_tx`] puts the burst on the tx ring and kicks the kernel with `sendto()` (copy-mode TX moves
//!   only on a syscall; zero-copy only when `needs_wakeup` says so).
//! - [`Port::reap_completions`] returns transmitted frames; [`Port::refill`] keeps the fill ring topped up and
//!   honours the fill ring's `needs_wakeup`.
//!
//! Frame budget: each UMEM has `2 × ring_size` frames; at most `ring_size` are lent for reception (fill ring +
//! frames being processed), the rest serve transmission, so a TX burst can never starve reception or the reverse.
//!
//! Binding tries zero-copy first and falls back to copy mode (veth has no zero-copy); [`Port::bind_mode`] tells
//! which, for the logs. The socket never loads libxdp's default XDP program (`INHIBIT_PROG_LOAD`): egressd loads
//! its own, which keeps ARP and the node's own traffic in the kernel.

mod frames;
pub mod xdp;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem};

use crate::drop::DropReason;
use crate::stats::WorkerStats;
use crate::Side;
use frames::FrameLedger;

/// Frames the kernel transmits per `sendto()` on a copy-mode socket by default (`TX_BATCH_SIZE` in
/// net/xdp/xsk.c).
const COPY_MODE_TX_PER_KICK: usize = 32;
/// `XDP_MAX_TX_SKB_BUDGET` (linux/if_xdp.h, kernel 6.17+): raises that per-`sendto()` budget, up to the tx ring
/// size. Older kernels refuse it with `ENOPROTOOPT` and keep 32.
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;
/// The budget egressd asks for: a whole rx burst and more leave on one syscall.
const WANTED_TX_PER_KICK: usize = 256;

/// Bytes the kernel keeps in front of every frame it receives into a UMEM frame (`XDP_PACKET_HEADROOM`).
pub const XDP_PACKET_HEADROOM: u32 = 256;

/// The longest frame a UMEM frame of `frame_size` bytes receives. The kernel drops longer ones before egressd sees
/// them, counting them only in the socket's `rx_dropped`.
pub fn largest_frame(frame_size: u32) -> u32 {
    frame_size.saturating_sub(XDP_PACKET_HEADROOM)
}

/// The largest interface MTU whose frames fit a UMEM frame of `frame_size` bytes: the frame carries the MTU plus
/// the Ethernet header and the one VLAN tag the pipeline accepts (2048 → 1774, 4096 → 3822). Jumbo frames beyond
/// one page would need AF_XDP multi-buffer, which egressd does not use.
pub fn largest_mtu(frame_size: u32) -> u32 {
    largest_frame(frame_size).saturating_sub(18)
}

/// Sizes of one port's UMEM and rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Bytes per UMEM frame (2048 or 4096); the kernel reserves 256 of them as XDP headroom.
    pub frame_size: u32,
    /// Size of each of the four rings (power of two). The UMEM has twice as many frames.
    pub ring_size: u32,
    /// Largest burst taken off the rx ring at once.
    pub batch_size: usize,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig { frame_size: 2048, ring_size: 2048, batch_size: 64 }
    }
}

/// How the socket is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    /// The NIC DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies frames between its buffers and the UMEM (veth, or drivers without AF_XDP support).
    Copy,
}

impl BindMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BindMode::ZeroCopy => "zero-copy",
            BindMode::Copy => "copy",
        }
    }
}

/// The kernel's drop counters of one AF_XDP socket (cumulative since the socket was created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelDrops {
    pub rx_ring_full: u64,
    pub fill_ring_empty: u64,
    pub rx_dropped: u64,
    pub invalid_descriptors: u64,
}

/// Why a frame could not be staged for transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageError {
    /// Every TX frame is in flight: the tx side is saturated.
    NoFreeFrame,
    /// The frame does not fit in one UMEM frame.
    TooLarge,
}

impl StageError {
    pub fn drop_reason(self) -> DropReason {
        match self {
            StageError::NoFreeFrame => DropReason::TxRingFull,
            StageError::TooLarge => DropReason::FrameTooLarge,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("invalid AF_XDP configuration: {0}")]
    Config(String),
    #[error("cannot create UMEM for {interface}: {source}")]
    Umem { interface: String, source: xsk_rs::umem::UmemCreateError },
    #[error("cannot bind AF_XDP socket to {interface} queue {queue} (zero-copy: {zero_copy}; copy: {copy})")]
    Bind { interface: String, queue: u32, zero_copy: String, copy: String },
    #[error(
        "AF_XDP socket on {interface} queue {queue} has no fill/completion rings (queue already bound?)"
    )]
    NoFillRing { interface: String, queue: u32 },
}

/// One AF_XDP socket with its own UMEM, bound to one (interface, queue).
pub struct Port {
    interface: String,
    queue: u32,
    mode: BindMode,
    // Rings before the UMEM: they hold the socket, which must close before the UMEM is unmapped.
    fill: FillQueue,
    comp: CompQueue,
    tx: TxQueue,
    rx: RxQueue,
    umem: Umem,
    /// The descriptor xsk-rs made for each frame (data segment start), indexed by frame number.
    frame_descs: Vec<FrameDesc>,
    ledger: FrameLedger,
    frame_size: usize,
    umem_len: usize,
    /// Most frames lent for reception at once (fill ring + frames being processed).
    rx_budget: u32,
    batch_size: usize,
    /// Scratch, preallocated to `batch_size` / `ring_size`: no allocation on the data path.
    received: Vec<FrameDesc>,
    received_frames: Vec<u32>,
    staged: Vec<FrameDesc>,
    staged_frames: Vec<u32>,
    scratch: Vec<FrameDesc>,
    /// Completions the ledger refused (the kernel returned a frame we never sent): counted, never trusted.
    bogus_completions: u64,
    /// Frames one copy-mode `sendto()` transmits (see [`XDP_MAX_TX_SKB_BUDGET`]).
    tx_per_kick: usize,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("interface", &self.interface)
            .field("queue", &self.queue)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Port {
    /// Creates a UMEM and binds a socket to `interface`/`queue`, zero-copy if the driver allows, copy otherwise.
    pub fn open(interface: &str, queue: u32, config: PortConfig) -> Result<Port, PortError> {
        let bad = |e: &dyn std::fmt::Display| PortError::Config(e.to_string());
        let ring = QueueSize::new(config.ring_size).map_err(|e| bad(&e))?;
        let frame_size = FrameSize::new(config.frame_size).map_err(|e| bad(&e))?;
        let frame_count = config.ring_size.checked_mul(2).ok_or_else(|| bad(&"ring_size too large"))?;
        let umem_config = UmemConfig::builder()
            .frame_size(frame_size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| bad(&e))?;
        let frame_count_nz =
            std::num::NonZeroU32::new(frame_count).ok_or_else(|| bad(&"ring_size is zero"))?;
        let (umem, frame_descs) = Umem::new(umem_config, frame_count_nz, false)
            .map_err(|source| PortError::Umem { interface: interface.to_string(), source })?;
        let if_name: Interface =
            interface.parse().map_err(|_| bad(&format!("interface name {interface:?} is not valid")))?;

        let socket_config = |flags: BindFlags| {
            SocketConfig::builder()
                .rx_queue_size(ring)
                .tx_queue_size(ring)
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(flags | BindFlags::XDP_USE_NEED_WAKEUP)
                .build()
        };
        // SAFETY: the UMEM is new and not shared with any other socket, so the shared-UMEM precondition of
        // `Socket::new` (INHIBIT_PROG_LOAD when re-binding a bound pair) does not apply; we set the flag anyway.
        let zero_copy =
            unsafe { xsk_rs::Socket::new(socket_config(BindFlags::XDP_ZEROCOPY), &umem, &if_name, queue) };
        let (mode, (tx, rx, rings)) = match zero_copy {
            Ok(sockets) => (BindMode::ZeroCopy, sockets),
            Err(zc_err) => {
                // SAFETY: as above; the failed zero-copy attempt left no socket bound to this pair.
                let copy = unsafe {
                    xsk_rs::Socket::new(socket_config(BindFlags::XDP_COPY), &umem, &if_name, queue)
                };
                match copy {
                    Ok(sockets) => (BindMode::Copy, sockets),
                    Err(copy_err) => {
                        return Err(PortError::Bind {
                            interface: interface.to_string(),
                            queue,
                            zero_copy: format!("{zc_err:?}"),
                            copy: format!("{copy_err:?}"),
                        })
                    }
                }
            }
        };
        let (fill, comp) =
            rings.ok_or_else(|| PortError::NoFillRing { interface: interface.to_string(), queue })?;
        let batch_size = config.batch_size.clamp(1, config.ring_size as usize);
        let ring_len = config.ring_size as usize;
        let mut port = Port {
            interface: interface.to_string(),
            queue,
            mode,
            fill,
            comp,
            tx,
            rx,
            umem,
            frame_descs,
            ledger: FrameLedger::new(frame_count),
            frame_size: config.frame_size as usize,
            umem_len: frame_count as usize * config.frame_size as usize,
            rx_budget: config.ring_size,
            batch_size,
            received: vec![FrameDesc::default(); batch_size],
            received_frames: Vec::with_capacity(batch_size),
            staged: Vec::with_capacity(ring_len),
            staged_frames: Vec::with_capacity(ring_len),
            scratch: vec![FrameDesc::default(); ring_len],
            bogus_completions: 0,
            tx_per_kick: COPY_MODE_TX_PER_KICK,
        };
        if mode == BindMode::Copy {
            port.tx_per_kick = port.raise_tx_budget(WANTED_TX_PER_KICK.min(ring_len));
        }
        port.refill();
        Ok(port)
    }

    /// Asks the kernel to transmit up to `budget` frames per copy-mode `sendto()`. Returns the budget in force.
    fn raise_tx_budget(&mut self, budget: usize) -> usize {
        let Ok(value) = libc::c_uint::try_from(budget) else { return COPY_MODE_TX_PER_KICK };
        if budget <= COPY_MODE_TX_PER_KICK {
            return COPY_MODE_TX_PER_KICK;
        }
        let fd = self.tx.fd().as_raw_fd();
        // SAFETY: `fd` is this port's live AF_XDP socket (owned by `self.tx`); `value` is a c_uint on the stack
        // that outlives the call, and its size is what the option expects. setsockopt only reads it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_XDP,
                XDP_MAX_TX_SKB_BUDGET,
                (&value as *const libc::c_uint).cast(),
                std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            budget
        } else {
            COPY_MODE_TX_PER_KICK
        }
    }

    /// Frames one copy-mode `sendto()` moves (32 unless the kernel took a larger `XDP_MAX_TX_SKB_BUDGET`).
    pub fn tx_per_kick(&self) -> usize {
        self.tx_per_kick
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn queue(&self) -> u32 {
        self.queue
    }

    pub fn bind_mode(&self) -> BindMode {
        self.mode
    }

    /// The socket's file descriptor, for the XSKMAP and for `poll()`.
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// UMEM frames still on the fill ring or awaiting a TX completion (logged when a worker stops: the UMEM is
    /// unmapped only after the socket is closed, so these are not leaked, but a large number means the kernel was
    /// still busy with them).
    pub fn frames_lent_to_kernel(&self) -> u32 {
        self.ledger.lent_to_kernel()
    }

    pub fn bogus_completions(&self) -> u64 {
        self.bogus_completions
    }

    /// Frame number of a descriptor the kernel returned, if it lies inside this UMEM with its data.
    fn frame_of(&self, addr: usize, len: usize) -> Option<u32> {
        let frame = addr / self.frame_size;
        let offset = addr % self.frame_size;
        (addr < self.umem_len && offset.checked_add(len)? <= self.frame_size).then_some(frame as u32)
    }

    /// Puts free frames on the fill ring until `ring_size` frames are lent for reception. Wakes the kernel if the
    /// fill ring asks for it. Returns how many were added.
    pub fn refill(&mut self) -> usize {
        let lent =
            self.ledger.count(frames::FrameState::InFill) + self.ledger.count(frames::FrameState::Received);
        let want = self.rx_budget.saturating_sub(lent);
        let room = self.fill.nb_free(want).min(want).min(self.scratch.len() as u32);
        let mut n = 0;
        while n < room as usize {
            let Some(frame) = self.ledger.lend_for_fill() else { break };
            self.scratch[n] = self.frame_descs[frame as usize];
            n += 1;
        }
        if n > 0 {
            // SAFETY: the descriptors are this UMEM's own (from `Umem::new`), and the ledger just moved each frame
            // from Free to InFill, so user space holds no reference to them and none is on another ring.
            // `nb_free` reported room for `n`, so `produce` takes all of them (it is all-or-nothing).
            let produced = unsafe { self.fill.produce(&self.scratch[..n]) };
            debug_assert_eq!(produced, n);
        }
        if self.fill.needs_wakeup() {
            // Errors here are transient (the next burst retries); the fill ring itself is intact.
            let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
        }
        n
    }

    /// Takes up to one burst of received frames off the rx ring. Returns how many are valid (readable with
    /// [`received_frame`](Self::received_frame)); descriptors outside the UMEM or for frames the kernel was not
    /// lent are counted as [`DropReason::BadRxDescriptor`] and skipped.
    pub fn receive(&mut self, stats: &WorkerStats) -> usize {
        debug_assert!(self.received_frames.is_empty(), "release_received not called");
        self.received_frames.clear();
        // SAFETY: `received` is scratch space xsk-rs overwrites with the kernel's descriptors; we read their
        // bytes only after validating them below.
        let n = unsafe { self.rx.consume(&mut self.received[..self.batch_size]) };
        let mut valid = 0;
        for i in 0..n {
            let desc = self.received[i];
            match self.frame_of(desc.addr(), desc.lengths().data()) {
                Some(frame) if self.ledger.received(frame).is_ok() => {
                    self.received[valid] = desc;
                    self.received_frames.push(frame);
                    valid += 1;
                }
                _ => stats.count_drop(DropReason::BadRxDescriptor),
            }
        }
        self.prefetch_received(valid);
        valid
    }

    /// Starts loading the first cache line of each received frame. In copy mode the kernel wrote them on the
    /// NAPI core, so each first touch is a cache miss; asked for all at once, the misses overlap instead of
    /// stalling the pipeline one frame at a time.
    fn prefetch_received(&self, count: usize) {
        #[cfg(target_arch = "x86_64")]
        for desc in &self.received[..count] {
            // SAFETY: `desc` was validated by `frame_of` (inside this UMEM) and its frame is Received, so the
            // kernel no longer writes it; the `Data` view only yields a pointer, and a prefetch reads nothing
            // architecturally (it cannot fault, even on a bad address).
            unsafe {
                let data = self.umem.data(desc);
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    data.contents().as_ptr().cast(),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = count;
    }

    /// The bytes of the `i`-th valid frame of the current burst, to be read and rewritten in place.
    pub fn received_frame(&mut self, i: usize) -> &mut [u8] {
        if i >= self.received_frames.len() {
            return &mut [];
        }
        let desc = &mut self.received[i];
        // SAFETY: `desc` was returned by this socket's rx ring, lies inside this UMEM (`frame_of`), and the ledger
        // moved its frame to Received, so the kernel no longer writes it and no other reference exists: the
        // returned borrow is tied to `&mut self`, and `release_received` (which gives the frame back) needs
        // `&mut self` too.
        let mut data = unsafe { self.umem.data_mut(desc) };
        let bytes = data.contents_mut();
        let len = bytes.len();
        // SAFETY: `bytes` points into the UMEM mapping, which lives as long as `self.umem` (and so `self`); the
        // `DataMut` wrapper only borrows `desc`, which we do not touch while the slice is alive.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr(), len) }
    }

    /// Gives every frame of the current burst back (they return to the fill ring on the next refill).
    pub fn release_received(&mut self) {
        for &frame in &self.received_frames {
            let released = self.ledger.release_received(frame);
            debug_assert!(released.is_ok());
        }
        self.received_frames.clear();
    }

    /// Copies `frame` into a free TX frame of this port, to go out on the next [`flush_tx`](Self::flush_tx).
    pub fn stage_tx(&mut self, frame: &[u8]) -> Result<(), StageError> {
        let Some(index) = self.ledger.take_for_tx() else { return Err(StageError::NoFreeFrame) };
        let mut desc = self.frame_descs[index as usize];
        // SAFETY: the descriptor is this UMEM's own and the ledger just moved the frame from Free to Writing, so
        // neither the kernel nor another reference touches it.
        let mut data = unsafe { self.umem.data_mut(&mut desc) };
        let mut cursor = data.cursor();
        cursor.set_pos(0);
        if cursor.buf_len() < frame.len() || cursor.write_all(frame).is_err() {
            let cancelled = self.ledger.cancel_tx(index);
            debug_assert!(cancelled.is_ok());
            return Err(StageError::TooLarge);
        }
        self.staged.push(desc);
        self.staged_frames.push(index);
        Ok(())
    }

    /// Puts the staged frames on the tx ring (counting them as transmitted out of `side`, or as
    /// [`DropReason::TxRingFull`] if the ring has no room) and kicks the kernel. Returns how many went out.
    pub fn flush_tx(&mut self, stats: &WorkerStats, side: Side) -> usize {
        let staged = self.staged.len();
        let mut sent = 0;
        if staged > 0 {
            let room = self.tx.nb_free(staged as u32) as usize;
            sent = room.min(staged);
            if sent > 0 {
                // SAFETY: every staged descriptor is this UMEM's, in state Writing (held only by us), and goes on
                // the tx ring once: the ledger marks them InTx right below. `nb_free` reported room for `sent`.
                let produced = unsafe { self.tx.produce(&self.staged[..sent]) };
                debug_assert_eq!(produced, sent);
            }
            for (i, &frame) in self.staged_frames.iter().enumerate() {
                if i < sent {
                    let ok = self.ledger.submitted(frame);
                    debug_assert!(ok.is_ok());
                    stats.tx(side).add(self.staged[i].lengths().data());
                } else {
                    let ok = self.ledger.cancel_tx(frame);
                    debug_assert!(ok.is_ok());
                    stats.count_drop(DropReason::TxRingFull);
                }
            }
            self.staged.clear();
            self.staged_frames.clear();
        }
        self.kick_tx(sent);
        sent
    }

    /// Copy mode transmits only inside a syscall, and the kernel sends at most `tx_per_kick` frames per call, so
    /// we kick once per started group of that many frames just put on the ring (at least once while anything is
    /// outstanding): too few kicks would leave frames on the ring and let it fill up under load. Zero-copy kicks
    /// once, and only when the ring says it needs a wakeup.
    fn kick_tx(&mut self, just_sent: usize) {
        let outstanding = self.ledger.count(frames::FrameState::InTx) > 0;
        let kicks = match self.mode {
            BindMode::Copy if outstanding => just_sent.div_ceil(self.tx_per_kick).max(1),
            BindMode::ZeroCopy if outstanding && self.tx.needs_wakeup() => 1,
            _ => 0,
        };
        for _ in 0..kicks {
            // EAGAIN/EBUSY/ENOBUFS are swallowed by xsk-rs: the next kick retries.
            let _ = self.tx.wakeup();
        }
    }

    /// Takes transmitted frames off the completion ring and frees them. Returns how many.
    pub fn reap_completions(&mut self) -> usize {
        // SAFETY: `scratch` receives the kernel's descriptors; we only use their addresses, validated below.
        let n = unsafe { self.comp.consume(&mut self.scratch[..]) };
        for i in 0..n {
            let addr = self.scratch[i].addr();
            let ok = self.frame_of(addr, 0).is_some_and(|frame| self.ledger.completed(frame).is_ok());
            if !ok {
                self.bogus_completions += 1;
            }
        }
        n
    }

    /// What the kernel dropped on this socket before egressd could see it (`XDP_STATISTICS`): frames lost because
    /// the rx ring was full, because the fill ring was empty, for other reasons, and invalid descriptors. One
    /// `getsockopt`; the worker reads it about once a second. `None` if the kernel refuses.
    pub fn kernel_drops(&self) -> Option<KernelDrops> {
        let s = self.rx.fd().xdp_statistics().ok()?;
        Some(KernelDrops {
            rx_ring_full: s.rx_ring_full(),
            fill_ring_empty: s.rx_fill_ring_empty_descs(),
            rx_dropped: s.rx_dropped(),
            invalid_descriptors: s.rx_invalid_descs() + s.tx_invalid_descs(),
        })
    }

    /// True if frames await completion (the worker keeps polling until they are back).
    pub fn tx_outstanding(&self) -> bool {
        self.ledger.count(frames::FrameState::InTx) > 0
    }
}

/// Blocks until one of `fds` (at most 8) is readable or `timeout_ms` passes. Returns which were readable, bit `i`
/// for `fds[i]`. Interrupted calls return early (the caller re-checks its stop flag).
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> u8 {
    let mut pollfds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; 8];
    let n = fds.len().min(pollfds.len());
    for (p, &fd) in pollfds.iter_mut().zip(fds) {
        *p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    }
    // SAFETY: `pollfds` is a live array of `n` initialised pollfd structs that outlives the call; poll only
    // writes their `revents` fields.
    let ready = unsafe { libc::poll(pollfds.as_mut_ptr(), n as libc::nfds_t, timeout_ms) };
    if ready <= 0 {
        return 0;
    }
    pollfds[..n]
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents & libc::POLLIN != 0)
        .fold(0, |mask, (i, _)| mask | 1 << i)
}
