//! Fragmented datagrams through the NAT without reassembly (RFC 4787 REQ-14, "virtual reassembly" as VPP does).
//!
//! Only a datagram's first fragment carries the ports the NAT needs. The pipeline translates that fragment like
//! any packet and records here what it did under the datagram's key (source, destination, protocol and IP
//! identification, as they arrived): the addresses it ended up with, and where it went (out of which interface,
//! or to which worker). Later fragments of the datagram look the key up and get the same address rewrite and the
//! same way out; their payload is never touched (the first fragment's L4 checksum, updated incrementally, already
//! covers the whole datagram). A later fragment that arrives before its first waits in the pipeline for a short
//! while, bounded in number.
//!
//! The table is fixed-size (allocated once), open-addressed with a short probe, and entries expire
//! [`FRAGMENT_TIMEOUT_NANOS`] after their last fragment: a flood of first fragments fills it (new ones are then
//! dropped as `fragment_table_full`) but never grows memory or slows the lookup.

use crate::handoff::HandoffKind;
use crate::time::Instant;
use crate::wire::ipv4;
use crate::Side;

/// How long a datagram's translation is kept after its last fragment was seen.
pub const FRAGMENT_TIMEOUT_NANOS: u64 = 2_000_000_000;
/// Datagrams one worker tracks at once.
pub const FRAGMENT_TABLE_SLOTS: usize = 1024;
/// Slots a lookup or insertion looks at.
const PROBE: usize = 8;

/// A datagram's identity as its fragments arrive: RFC 791's (source, destination, protocol, identification).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: u32,
    pub dst: u32,
    pub id: u16,
    pub proto: u8,
}

impl FragmentKey {
    /// The key of the IPv4 header at the start of `ip` (at least 20 bytes).
    pub fn of(ip: &ipv4::Fixed) -> FragmentKey {
        FragmentKey {
            src: ipv4::src(ip),
            dst: ipv4::dst(ip),
            id: ipv4::identification(ip),
            proto: ipv4::protocol(ip),
        }
    }

    fn slot(&self) -> usize {
        let h = (u64::from(self.src) << 32 | u64::from(self.dst))
            ^ (u64::from(self.id) << 8 | u64::from(self.proto));
        (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize
    }
}

/// What the first fragment became, for the datagram's other fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentRoute {
    /// Rewrite the addresses to these and send out of `out`.
    Out { out: Side, src: u32, dst: u32 },
    /// The first fragment was handed to `worker` (which owns the flow): hand the others after it.
    HandOff { worker: u16, kind: HandoffKind },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    key: FragmentKey,
    route: FragmentRoute,
    expires: Instant,
}

/// One worker's fragment translations.
pub struct FragmentTable {
    slots: Box<[Option<Entry>]>,
}

impl std::fmt::Debug for FragmentTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FragmentTable").field("slots", &self.slots.len()).finish_non_exhaustive()
    }
}

impl Default for FragmentTable {
    fn default() -> Self {
        FragmentTable { slots: vec![None; FRAGMENT_TABLE_SLOTS].into_boxed_slice() }
    }
}

impl FragmentTable {
    fn probe(&self, key: &FragmentKey) -> impl Iterator<Item = usize> {
        let start = key.slot();
        let n = self.slots.len();
        (0..PROBE.min(n)).map(move |i| (start + i) % n)
    }

    /// Records (or refreshes) what a datagram's first fragment became. `false` when every slot the key may use
    /// holds a live datagram: the caller drops the fragment.
    pub fn insert(&mut self, now: Instant, key: FragmentKey, route: FragmentRoute) -> bool {
        let expires = Instant(now.as_nanos().saturating_add(FRAGMENT_TIMEOUT_NANOS));
        let mut free = None;
        for i in self.probe(&key) {
            match self.slots[i] {
                Some(e) if e.key == key => {
                    self.slots[i] = Some(Entry { key, route, expires });
                    return true;
                }
                Some(e) if e.expires > now => {}
                _ => free = free.or(Some(i)),
            }
        }
        let Some(i) = free else { return false };
        self.slots[i] = Some(Entry { key, route, expires });
        true
    }

    /// The translation of the datagram `key`, if its first fragment was seen and the entry is live; refreshes it.
    pub fn lookup(&mut self, now: Instant, key: &FragmentKey) -> Option<FragmentRoute> {
        for i in self.probe(key) {
            if let Some(e) = &mut self.slots[i] {
                if e.key == *key && e.expires > now {
                    e.expires = Instant(now.as_nanos().saturating_add(FRAGMENT_TIMEOUT_NANOS));
                    return Some(e.route);
                }
            }
        }
        None
    }

    /// Live datagrams.
    #[cfg(test)]
    fn live(&self, now: Instant) -> usize {
        self.slots.iter().flatten().filter(|e| e.expires > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u16) -> FragmentKey {
        FragmentKey { src: 0x0a0a_0002, dst: 0xcb00_710a, id, proto: 17 }
    }

    const OUT: FragmentRoute = FragmentRoute::Out { out: Side::Outside, src: 0xc000_020a, dst: 0xcb00_710a };

    #[test]
    fn a_recorded_datagram_is_found_until_it_times_out() {
        let mut t = FragmentTable::default();
        assert!(t.insert(Instant(0), key(7), OUT));
        assert_eq!(t.lookup(Instant(1), &key(7)), Some(OUT));
        assert_eq!(t.lookup(Instant(1), &key(8)), None);
        // Each fragment refreshes it; past the timeout from the last one it is gone.
        assert_eq!(t.lookup(Instant(FRAGMENT_TIMEOUT_NANOS), &key(7)), Some(OUT));
        assert_eq!(t.lookup(Instant(2 * FRAGMENT_TIMEOUT_NANOS), &key(7)), None);
        assert_eq!(t.live(Instant(2 * FRAGMENT_TIMEOUT_NANOS)), 0);
    }

    #[test]
    fn a_full_table_refuses_new_datagrams_and_reuses_expired_slots() {
        let mut t = FragmentTable::default();
        let mut stored = 0;
        for id in 0..u16::MAX {
            stored += usize::from(t.insert(Instant(0), key(id), OUT));
        }
        assert!(stored <= FRAGMENT_TABLE_SLOTS);
        assert_eq!(t.live(Instant(0)), stored);
        // Every live datagram is still found; a new one may be refused, never another's entry overwritten.
        let refused = (0..u16::MAX).filter(|&id| t.lookup(Instant(1), &key(id)).is_none()).count();
        assert_eq!(refused, u16::MAX as usize - stored);
        // Once they expire, slots are taken again.
        assert!(t.insert(Instant(3 * FRAGMENT_TIMEOUT_NANOS), key(1), OUT));
    }
}
