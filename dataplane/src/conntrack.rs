//! Per-worker flow table: the storage under the NAT (`nat::Nat`).
//!
//! What it owns: the building blocks of the flow table — a preallocated slab of `Session`s (one per 5-tuple
//! flow, 56 bytes), a slab of `Mapping`s (one per inside endpoint, RFC 4787 endpoint-independent mapping, 16
//! bytes), the open-addressing hash indexes over them (the per-source flow counters live directly in an index:
//! their hash is a bijection of the address), one LRU list per timeout class, and the TCP tracker.
//!
//! Why it is shaped so (VPP NAT44-ED habits):
//! - Everything is allocated in `new` and sized from `max_flows`; the data path never allocates. Slab slots are
//!   `u32` indexes; free slots form an intrusive free list.
//! - The indexes are linear-probing tables of `(hash, slot)` pairs (8 bytes) at a load factor ≤ 4/5, with
//!   backward-shift deletion (no tombstones, so lookups never degrade after churn). The full 32-bit hash stored in
//!   each entry filters almost every false candidate without touching the slab.
//! - Expiry: each timeout class (UDP, ICMP, TCP handshake, TCP transitory, TCP established) has a fixed timeout, so a list kept in
//!   last-seen order is also in expiry order. Refreshing moves a session to the tail at most once per second
//!   (its `last_seen` is kept in whole seconds), so the fast path rarely touches neighbours. Expiry pops from the
//!   heads with a budget: no stop-the-world sweep.
//! - TCP tracking keeps, per side, the next sequence number and the window the side advertised, enough to tell an
//!   in-window RST from an out-of-window one (RFC 5382 / RFC 5961 spirit).

pub(crate) use crate::wire::tcp::{self, Segment};

/// "No slot": empty index entry, end of a list.
pub(crate) const NONE: u32 = u32::MAX;

/// Timeout classes, one LRU list each.
pub(crate) const CLASS_UDP: u8 = 0;
pub(crate) const CLASS_ICMP: u8 = 1;
pub(crate) const CLASS_TCP_TRANSITORY: u8 = 2;
pub(crate) const CLASS_TCP_ESTABLISHED: u8 = 3;
/// Handshake in progress (SYN seen one or both ways, not yet established): the transitory timeout applies, but it
/// is counted apart (`syn_sent` in the stats).
pub(crate) const CLASS_TCP_SYN: u8 = 4;
pub(crate) const CLASSES: usize = 5;
/// Marks a free session slot.
pub(crate) const CLASS_FREE: u8 = 0xff;

// ---------------------------------------------------------------------------------------------------------------
// Index
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Slot {
    hash: u32,
    val: u32,
}

const EMPTY: Slot = Slot { hash: 0, val: NONE };

/// Linear-probing hash index from a 32-bit hash to a slab slot. The caller compares the candidate slot's key.
pub(crate) struct Index {
    slots: Box<[Slot]>,
}

impl Index {
    /// An index for up to `entries` entries at load factor ≤ 4/5 (linear probing stays short there, and the
    /// memory-per-flow budget of 128 bytes needs the headroom).
    pub fn with_capacity(entries: usize) -> Index {
        let cap = (entries + entries / 4 + 1).max(8);
        Index { slots: vec![EMPTY; cap].into_boxed_slice() }
    }

    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    /// Home slot: multiply-shift reduction (works for any table size).
    #[inline]
    fn home(&self, hash: u32) -> usize {
        ((hash as u64 * self.slots.len() as u64) >> 32) as usize
    }

    #[inline]
    pub fn find(&self, hash: u32, eq: impl FnMut(u32) -> bool) -> Option<u32> {
        self.find_pos(hash, eq).map(|i| self.slots[i].val)
    }

    /// Inserts `val` (the caller knows its key is absent). Returns false only if the table is full, which sizing
    /// rules out.
    #[inline]
    pub fn insert(&mut self, hash: u32, val: u32) -> bool {
        let n = self.slots.len();
        let mut i = self.home(hash);
        for _ in 0..n {
            if self.slots[i].val == NONE {
                self.slots[i] = Slot { hash, val };
                return true;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        false
    }

    /// One probe serving both a lookup and the insertion that follows a miss: `Ok(pos)` of the entry whose value
    /// satisfies `eq` among those with `hash`, or `Err(pos)` of the empty slot that ends the probe sequence — where
    /// [`Index::insert_at`] puts the key as long as the index is not modified in between (`Err(usize::MAX)` if
    /// the table is full, which sizing rules out).
    #[inline]
    pub fn probe(&self, hash: u32, mut eq: impl FnMut(u32) -> bool) -> Result<usize, usize> {
        let n = self.slots.len();
        let mut i = self.home(hash);
        for _ in 0..n {
            let s = self.slots[i];
            if s.val == NONE {
                return Err(i);
            }
            if s.hash == hash && eq(s.val) {
                return Ok(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        Err(usize::MAX)
    }

    /// [`Index::probe`] answering with the value found rather than its position. (Its own copy of the loop: written
    /// as `probe` + `value_at` it costs the established path 8 more instructions per packet, callgrind.)
    #[inline]
    pub fn lookup(&self, hash: u32, mut eq: impl FnMut(u32) -> bool) -> Result<u32, usize> {
        let n = self.slots.len();
        let mut i = self.home(hash);
        for _ in 0..n {
            let s = self.slots[i];
            if s.val == NONE {
                return Err(i);
            }
            if s.hash == hash && eq(s.val) {
                return Ok(s.val);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        Err(usize::MAX)
    }

    /// Stores `(hash, val)` at `pos`, the empty slot an [`Index::probe`] for `hash` ended on (the index unchanged
    /// since). Any other position falls back to [`Index::insert`].
    #[inline]
    pub fn insert_at(&mut self, pos: usize, hash: u32, val: u32) -> bool {
        match self.slots.get_mut(pos) {
            Some(s) if s.val == NONE => {
                *s = Slot { hash, val };
                true
            }
            _ => self.insert(hash, val),
        }
    }

    /// Reads the home slot of `hash` (its value), so that a lookup that follows finds it in cache: a prefetch in
    /// safe code, for overlapping several independent cache misses.
    #[inline]
    pub fn peek(&self, hash: u32) -> u32 {
        self.slots.get(self.home(hash)).map_or(NONE, |s| s.val)
    }

    /// Starts loading the home slot of `hash` into the cache (a prefetch: nothing waits for it) and returns its
    /// position, for [`Index::value_if_home`] once the load has had time to land.
    #[inline]
    pub fn prefetch_home(&self, hash: u32) -> usize {
        let pos = self.home(hash);
        prefetch_index::prefetch_index(&self.slots, pos);
        pos
    }

    /// The value at `pos` if that slot holds `hash` (the likely answer of a lookup whose home slot is `pos`), else
    /// `NONE`.
    #[inline]
    pub fn value_if_home(&self, pos: usize, hash: u32) -> u32 {
        match self.slots.get(pos) {
            Some(s) if s.hash == hash => s.val,
            _ => NONE,
        }
    }

    /// Position of the entry whose value satisfies `eq` among those with `hash`.
    #[inline]
    pub fn find_pos(&self, hash: u32, mut eq: impl FnMut(u32) -> bool) -> Option<usize> {
        let n = self.slots.len();
        let mut i = self.home(hash);
        for _ in 0..n {
            let s = self.slots[i];
            if s.val == NONE {
                return None;
            }
            if s.hash == hash && eq(s.val) {
                return Some(i);
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        None
    }

    /// The value stored at `pos` (from [`Index::find_pos`]).
    #[inline]
    pub fn value_at(&self, pos: usize) -> u32 {
        self.slots.get(pos).map_or(NONE, |s| s.val)
    }

    /// Replaces the value at `pos` (same hash, so the entry stays where it is).
    #[inline]
    pub fn set_value_at(&mut self, pos: usize, val: u32) {
        if let Some(s) = self.slots.get_mut(pos) {
            s.val = val;
        }
    }

    /// Removes the entry `(hash, val)` with backward-shift deletion.
    pub fn remove(&mut self, hash: u32, val: u32) {
        if let Some(pos) = self.find_pos(hash, |v| v == val) {
            self.remove_at(pos);
        }
    }

    /// Removes the entry at `pos` with backward-shift deletion (no tombstones).
    pub fn remove_at(&mut self, pos: usize) {
        let n = self.slots.len();
        if pos >= n || self.slots[pos].val == NONE {
            return;
        }
        let mut hole = pos;
        let mut j = hole;
        loop {
            j += 1;
            if j == n {
                j = 0;
            }
            let s = self.slots[j];
            if s.val == NONE || j == hole {
                break;
            }
            let h = self.home(s.hash);
            // The entry at j may move back into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { h > hole && h <= j } else { h > hole || h <= j };
            if !stays {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = EMPTY;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Slab entries
// ---------------------------------------------------------------------------------------------------------------

/// One side of a TCP connection as seen by the NAT.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TcpPeer {
    /// Next sequence number this side will send (highest `seq + len` seen, SYN and FIN counted).
    pub nxt: u32,
    /// The highest acknowledgment this side sent: the next sequence number it expects (its RCV.NXT), valid once
    /// the session's `SESSION_*_ACKED` flag for this side is set.
    pub ack: u32,
}

pub(crate) const TCP_SYN_OUT: u8 = 1;
pub(crate) const TCP_SYN_IN: u8 = 2;
pub(crate) const TCP_ESTABLISHED: u8 = 4;
pub(crate) const TCP_FIN_OUT: u8 = 8;
pub(crate) const TCP_FIN_IN: u8 = 16;
pub(crate) const TCP_RST: u8 = 32;
pub(crate) const TCP_OUT_SEEN: u8 = 64;
pub(crate) const TCP_IN_SEEN: u8 = 128;

/// Session flag: the policy has not judged this flow's destination (created by an inbound packet under
/// address-dependent filtering); its next outbound packet is judged.
pub(crate) const SESSION_UNJUDGED: u8 = 1;
/// Session flag: the destination is one of our own egress endpoints (hairpin, RFC 4787 REQ-9): outbound packets
/// are translated both ways.
pub(crate) const SESSION_HAIRPIN: u8 = 2;
/// Session flag: the far side of a hairpinned flow (created by the hairpin's inbound leg). It is a reply flow:
/// never judged by the policy.
pub(crate) const SESSION_HAIRPIN_PEER: u8 = 4;
/// Session flags: the inside (outbound) / outside (inbound) side has sent an ACK, so its `TcpPeer::ack` is known.
pub(crate) const SESSION_OUT_ACKED: u8 = 8;
pub(crate) const SESSION_IN_ACKED: u8 = 16;

/// One flow (5-tuple). `in_*` is the inside endpoint, `remote_*` the outside one; the external endpoint is
/// `(egress[ip_idx], ext_port)`. 56 bytes; `repr(C)` keeps what every packet reads (key, translation, timer,
/// generation) in the first 32 bytes and the TCP window state and LRU links after it.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Session {
    pub in_addr: u32,
    pub remote_addr: u32,
    pub in_port: u16,
    pub remote_port: u16,
    pub ext_port: u16,
    pub ip_idx: u8,
    pub proto: u8,
    pub class: u8,
    pub tcp_flags: u8,
    pub flags: u8,
    /// Window scale from each side's SYN (low nibble: inside, high nibble: outside), `tcp::NO_WINDOW_SCALE` when absent.
    pub wscales: u8,
    /// Largest window each side advertised, in units of its window scale once both sides use scaling.
    pub out_win: u16,
    pub in_win: u16,
    /// Whole seconds of the last refresh.
    pub last_seen: u32,
    /// Low 32 bits of the policy generation that last judged this flow.
    pub generation: u32,
    pub out: TcpPeer,
    pub inn: TcpPeer,
    /// LRU links; `next` doubles as the free-list link.
    pub prev: u32,
    pub next: u32,
}

impl Session {
    pub const FREE: Session = Session {
        in_addr: 0,
        remote_addr: 0,
        prev: NONE,
        next: NONE,
        last_seen: 0,
        generation: 0,
        out: TcpPeer { nxt: 0, ack: 0 },
        inn: TcpPeer { nxt: 0, ack: 0 },
        in_port: 0,
        remote_port: 0,
        ext_port: 0,
        ip_idx: 0,
        proto: 0,
        class: CLASS_FREE,
        tcp_flags: 0,
        flags: 0,
        wscales: tcp::NO_WINDOW_SCALE | tcp::NO_WINDOW_SCALE << 4,
        out_win: 0,
        in_win: 0,
    };
}

/// One endpoint-independent mapping: inside `(in_addr, in_port, proto)` ↔ external `(egress[ip_idx], ext_port)`.
/// Lives while at least one session uses it. 16 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mapping {
    pub in_addr: u32,
    /// Sessions using this mapping; when free, the free-list link.
    pub refs: u32,
    pub in_port: u16,
    pub ext_port: u16,
    pub ip_idx: u8,
    pub proto: u8,
    /// Sessions of this mapping that inbound packets created (address-dependent filtering), not yet judged.
    pub unsolicited: u16,
}

impl Mapping {
    pub const FREE: Mapping =
        Mapping { in_addr: 0, refs: NONE, in_port: 0, ext_port: 0, ip_idx: 0, proto: 0, unsolicited: 0 };
}

// ---------------------------------------------------------------------------------------------------------------
// LRU lists
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
pub(crate) struct Lru {
    pub head: u32,
    pub tail: u32,
    pub len: u32,
}

impl Lru {
    pub const EMPTY: Lru = Lru { head: NONE, tail: NONE, len: 0 };
}

/// Appends `sid` to the tail of `lru`.
#[inline]
pub(crate) fn lru_push(sessions: &mut [Session], lru: &mut Lru, sid: u32) {
    let tail = lru.tail;
    if let Some(s) = sessions.get_mut(sid as usize) {
        s.prev = tail;
        s.next = NONE;
    }
    if tail == NONE {
        lru.head = sid;
    } else if let Some(t) = sessions.get_mut(tail as usize) {
        t.next = sid;
    }
    lru.tail = sid;
    lru.len += 1;
}

/// Unlinks `sid` from `lru`.
#[inline]
pub(crate) fn lru_unlink(sessions: &mut [Session], lru: &mut Lru, sid: u32) {
    let (prev, next) = match sessions.get(sid as usize) {
        Some(s) => (s.prev, s.next),
        None => return,
    };
    if prev == NONE {
        lru.head = next;
    } else if let Some(p) = sessions.get_mut(prev as usize) {
        p.next = next;
    }
    if next == NONE {
        lru.tail = prev;
    } else if let Some(n) = sessions.get_mut(next as usize) {
        n.prev = prev;
    }
    lru.len = lru.len.saturating_sub(1);
}

// ---------------------------------------------------------------------------------------------------------------
// Hashing
// ---------------------------------------------------------------------------------------------------------------

/// Keyed hash of two 64-bit words (folded multiply, as foldhash). The key comes from the std `RandomState` so an
/// inside host cannot precompute colliding flows.
#[inline]
pub(crate) fn hash2(seed: (u64, u64), a: u64, b: u64) -> u32 {
    let r = ((a ^ seed.0) as u128).wrapping_mul((b ^ seed.1) as u128 | 1);
    let x = (r as u64) ^ ((r >> 64) as u64);
    let x = (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x ^ (x >> 32)) as u32
}

/// A keyed bijection of a 32-bit address: equal hashes mean equal addresses, so an index keyed by it needs no
/// slab to compare keys (the per-source flow counters store the count directly as the index value).
#[inline]
pub(crate) fn hash_addr(seed: u64, addr: u32) -> u32 {
    // Each step (xor with a constant, multiply by an odd constant, xor-shift right) is invertible.
    let mut x = addr ^ (seed as u32);
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b | 1);
    x ^= x >> 16;
    x ^ ((seed >> 32) as u32)
}

// ---------------------------------------------------------------------------------------------------------------
// TCP tracking
// ---------------------------------------------------------------------------------------------------------------

/// RFC 5382: invalid flag combinations (SYN+FIN, SYN+RST, NULL) create no state.
#[inline]
pub(crate) fn tcp_flags_invalid(flags: u8) -> bool {
    let f = flags & 0x3f;
    f & (tcp::SYN | tcp::FIN) == (tcp::SYN | tcp::FIN)
        || f & (tcp::SYN | tcp::RST) == (tcp::SYN | tcp::RST)
        || f == 0
}

/// Outcome of tracking one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcpVerdict {
    /// Forward; the session's timeout class may have changed.
    Forward,
    /// RST not at exactly the sequence number its receiver expects: ignore it (drop, state kept).
    RstOutOfWindow,
    /// A segment outside the window (or a SYN that does not belong to the connection): drop, state kept.
    OutOfWindow,
}

#[inline]
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The smallest window an acknowledgment may lag behind (Linux conntrack's `MAXACKWINDOW` floor).
const MIN_ACK_WINDOW: u32 = 66_000;

/// One direction's view of a session: the sender's and receiver's state and flags.
struct Sides {
    snd_seen: u8,
    rcv_seen: u8,
    syn_bit: u8,
    fin_bit: u8,
    snd_acked: u8,
    rcv_acked: u8,
    /// Shift of the sender's / receiver's nibble in `Session::wscales`.
    snd_nibble: u32,
    rcv_nibble: u32,
}

impl Sides {
    fn of(outbound: bool) -> Sides {
        if outbound {
            Sides {
                snd_seen: TCP_OUT_SEEN,
                rcv_seen: TCP_IN_SEEN,
                syn_bit: TCP_SYN_OUT,
                fin_bit: TCP_FIN_OUT,
                snd_acked: SESSION_OUT_ACKED,
                rcv_acked: SESSION_IN_ACKED,
                snd_nibble: 0,
                rcv_nibble: 4,
            }
        } else {
            Sides {
                snd_seen: TCP_IN_SEEN,
                rcv_seen: TCP_OUT_SEEN,
                syn_bit: TCP_SYN_IN,
                fin_bit: TCP_FIN_IN,
                snd_acked: SESSION_IN_ACKED,
                rcv_acked: SESSION_OUT_ACKED,
                snd_nibble: 4,
                rcv_nibble: 0,
            }
        }
    }
}

impl Session {
    fn wscale(&self, nibble: u32) -> u8 {
        (self.wscales >> nibble) & 0x0f
    }

    /// Whether both sides offered window scaling (RFC 7323: only then are windows scaled).
    fn both_scale(&self) -> bool {
        self.wscale(0) != tcp::NO_WINDOW_SCALE && self.wscale(4) != tcp::NO_WINDOW_SCALE
    }

    /// The shift a side's stored window units use.
    fn win_shift(&self, nibble: u32) -> u32 {
        if self.both_scale() {
            u32::from(self.wscale(nibble).min(14))
        } else {
            0
        }
    }

    fn win_units(&mut self, nibble: u32) -> &mut u16 {
        if nibble == 0 {
            &mut self.out_win
        } else {
            &mut self.in_win
        }
    }

    /// The largest window the side advertised, in bytes.
    fn max_win(&self, nibble: u32) -> u32 {
        let units = if nibble == 0 { self.out_win } else { self.in_win };
        u32::from(units.max(1)) << self.win_shift(nibble)
    }
}

/// Updates `s`'s TCP state with a segment travelling `outbound` (inside → outside) or inbound, after checking
/// that it belongs to the connection: a blind attacker who knows the 4-tuple but not the sequence numbers can
/// neither move the state nor end the flow.
///
/// - The first segment from each side is its SYN; a SYN+ACK must acknowledge the other side's SYN exactly; a SYN
///   repeated later must carry the same initial sequence number (a new SYN after the connection closed starts
///   over: TIME-WAIT reuse).
/// - Once the receiver has acknowledged something, a segment must lie in the window as Linux conntrack checks it:
///   it starts at most the receiver's largest window past the receiver's last ACK, ends at most that window
///   behind what the sender already sent, and acknowledges nothing the receiver has not sent (nor more than a
///   window behind it).
/// - An RST is accepted only at exactly the sequence number its receiver expects (its last ACK), or the sender's
///   next sequence number (RFC 5961 §3: an RST in the window but not exact would get a challenge ACK from the
///   endpoint; the gateway drops it instead, and the endpoint's real RST, which answers the challenge with the
///   exact number, passes). Before the receiver acknowledged anything, only an RST acknowledging its SYN.
///
/// Segments that fail are dropped by the caller and change nothing.
pub(crate) fn tcp_track(s: &mut Session, outbound: bool, seg: &Segment) -> TcpVerdict {
    let d = Sides::of(outbound);
    let (snd, rcv) = if outbound { (s.out, s.inn) } else { (s.inn, s.out) };
    let snd_seen = s.tcp_flags & d.snd_seen != 0;
    let rcv_seen = s.tcp_flags & d.rcv_seen != 0;
    let rcv_acked = s.flags & d.rcv_acked != 0;

    if seg.flags & tcp::RST != 0 {
        let valid = if rcv_acked {
            seg.seq == rcv.ack || (snd_seen && seg.seq == snd.nxt)
        } else {
            // The receiver has sent only its SYN: an RST answering it must acknowledge it (RFC 793, SYN-SENT).
            rcv_seen && seg.flags & tcp::ACK != 0 && seg.ack == rcv.nxt
        };
        if !valid {
            return TcpVerdict::RstOutOfWindow;
        }
        s.tcp_flags |= TCP_RST;
        return TcpVerdict::Forward;
    }

    let end = seg
        .seq
        .wrapping_add(seg.payload)
        .wrapping_add(u32::from(seg.flags & tcp::SYN != 0))
        .wrapping_add(u32::from(seg.flags & tcp::FIN != 0));
    let mut first = !snd_seen;
    if seg.flags & tcp::SYN != 0 {
        let closed = s.tcp_flags & TCP_RST != 0
            || s.tcp_flags & (TCP_FIN_OUT | TCP_FIN_IN) == (TCP_FIN_OUT | TCP_FIN_IN);
        if closed && seg.flags & tcp::ACK == 0 {
            // A new connection on the same 5-tuple after the old one closed (TIME-WAIT reuse): start over.
            let (flags, class) = (s.flags & !(SESSION_OUT_ACKED | SESSION_IN_ACKED), s.class);
            *s = Session {
                tcp_flags: 0,
                flags,
                class,
                out: TcpPeer::default(),
                inn: TcpPeer::default(),
                wscales: tcp::NO_WINDOW_SCALE | tcp::NO_WINDOW_SCALE << 4,
                out_win: 0,
                in_win: 0,
                ..*s
            };
            first = true;
        } else if snd_seen && end != snd.nxt {
            // A SYN with another initial sequence number on a live connection is not this connection's.
            return TcpVerdict::OutOfWindow;
        }
        if seg.flags & tcp::ACK != 0 && !(rcv_seen && seg.ack == if outbound { s.inn.nxt } else { s.out.nxt })
        {
            // A SYN+ACK must acknowledge the other side's SYN exactly: a blind one cannot take the handshake over.
            return TcpVerdict::OutOfWindow;
        }
        if first {
            let had_both = s.both_scale();
            s.wscales = (s.wscales & !(0x0f << d.snd_nibble))
                | (seg.wscale.min(tcp::NO_WINDOW_SCALE) << d.snd_nibble);
            if !had_both && s.both_scale() {
                // Windows stored so far (the other side's SYN) were unscaled: express them in that side's units.
                let shift = s.win_shift(d.rcv_nibble);
                let units = s.win_units(d.rcv_nibble);
                *units = (*units >> shift).max(1);
            }
        }
        s.tcp_flags |= d.syn_bit;
    } else if first {
        // Each side's first segment is its SYN.
        return TcpVerdict::OutOfWindow;
    } else if rcv_acked {
        let rcv_win = s.max_win(d.rcv_nibble);
        let snd_win = s.max_win(d.snd_nibble);
        let (rcv_now, snd_now) = if outbound { (s.inn, s.out) } else { (s.out, s.inn) };
        let upper = !seq_after(seg.seq, rcv_now.ack.wrapping_add(rcv_win));
        let lower = !seq_after(snd_now.nxt.wrapping_sub(rcv_win), end);
        let ack = seg.flags & tcp::ACK == 0
            || (!seq_after(seg.ack, rcv_now.nxt)
                && !seq_after(rcv_now.nxt.wrapping_sub(snd_win.max(MIN_ACK_WINDOW)), seg.ack));
        if !(upper && lower && ack) {
            return TcpVerdict::OutOfWindow;
        }
    }

    // Windows in SYNs are never scaled (RFC 7323); a SYN's window is stored in the sender's units.
    let shift = s.win_shift(d.snd_nibble);
    let win_units = if seg.flags & tcp::SYN != 0 {
        (u32::from(seg.window) >> shift).clamp(1, u32::from(u16::MAX)) as u16
    } else {
        seg.window
    };
    let acked = s.flags & d.snd_acked != 0;
    let units = s.win_units(d.snd_nibble);
    if first || win_units > *units {
        *units = win_units;
    }
    let snd = if outbound { &mut s.out } else { &mut s.inn };
    if first || seq_after(end, snd.nxt) {
        snd.nxt = end;
    }
    if seg.flags & tcp::ACK != 0 {
        if !acked || seq_after(seg.ack, snd.ack) {
            snd.ack = seg.ack;
        }
        s.flags |= d.snd_acked;
    }
    s.tcp_flags |= d.snd_seen;
    if seg.flags & tcp::FIN != 0 {
        s.tcp_flags |= d.fin_bit;
    }
    if seg.flags & tcp::ACK != 0
        && seg.flags & tcp::SYN == 0
        && s.tcp_flags & (TCP_SYN_OUT | TCP_SYN_IN) == (TCP_SYN_OUT | TCP_SYN_IN)
    {
        s.tcp_flags |= TCP_ESTABLISHED;
    }
    TcpVerdict::Forward
}

/// The timeout class a TCP session's state puts it in (RFC 5382 REQ-5: established vs transitory).
#[inline]
pub(crate) fn tcp_class(tcp_flags: u8) -> u8 {
    let closing =
        tcp_flags & TCP_RST != 0 || tcp_flags & (TCP_FIN_OUT | TCP_FIN_IN) == (TCP_FIN_OUT | TCP_FIN_IN);
    if closing {
        CLASS_TCP_TRANSITORY
    } else if tcp_flags & TCP_ESTABLISHED != 0 {
        CLASS_TCP_ESTABLISHED
    } else {
        CLASS_TCP_SYN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // The index agrees with a HashMap model under random insert/remove, including heavy collisions.
        #[test]
        fn index_matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u32..64, 0u32..4), 1..400)) {
            let mut idx = Index::with_capacity(64);
            let mut model = std::collections::HashMap::new();
            for (insert, key, hbits) in ops {
                // Few distinct hashes force long probe chains and wrap-around.
                let hash = hbits.wrapping_mul(0x4000_0001) ^ (key & 1);
                if insert {
                    if let std::collections::hash_map::Entry::Vacant(e) = model.entry(key) {
                        prop_assert!(idx.insert(hash, key));
                        e.insert(hash);
                    }
                } else if let Some(h) = model.remove(&key) {
                    idx.remove(h, key);
                }
                for (k, h) in &model {
                    prop_assert_eq!(idx.find(*h, |v| v == *k), Some(*k));
                }
                prop_assert_eq!(idx.find(hash, |v| v == 1000), None);
            }
        }
    }

    #[test]
    fn invalid_flag_combinations() {
        assert!(tcp_flags_invalid(0));
        assert!(tcp_flags_invalid(tcp::SYN | tcp::FIN));
        assert!(tcp_flags_invalid(tcp::SYN | tcp::RST | tcp::ACK));
        assert!(!tcp_flags_invalid(tcp::SYN));
        assert!(!tcp_flags_invalid(tcp::SYN | tcp::ACK));
        assert!(!tcp_flags_invalid(tcp::RST));
        assert!(!tcp_flags_invalid(tcp::FIN | tcp::ACK));
    }
}
