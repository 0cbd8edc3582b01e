//! What must hold of a [`Nat`]'s tables after any sequence of packets, checked in full (O(table)): for the
//! fuzzer, which calls [`Nat::check_invariants`] after every frame, and for tests. Never called on the data path.
//!
//! - every live session is found by both indexes under its own key, and counts match the slabs and LRU lists;
//! - every live mapping holds its external `(ip, proto, port)` in the port table, so no port is held twice;
//! - the mapping is a bijection: no two live mappings share an external endpoint, and no two mappings in the
//!   inside-endpoint index share an inside endpoint (a retired mapping, out of the index, may linger while its
//!   last sessions drain);
//! - a mapping's reference count is the number of sessions using it, and every session's mapping exists.

use std::collections::HashSet;

use super::Nat;
use crate::conntrack::*;

impl Nat {
    /// Checks the tables' invariants; the first one broken, described.
    pub fn check_invariants(&self) -> Result<(), String> {
        // Free mappings: the free list. Flags indexed by mapping id (not hash sets): the fuzzer calls this after
        // every frame, so it must stay cheap for small tables.
        let mut is_free = vec![false; self.mappings.len()];
        let mut m = self.free_mapping;
        while m != NONE {
            match is_free.get_mut(m as usize) {
                Some(seen) if *seen => return Err(format!("mapping free list loops at {m}")),
                Some(seen) => *seen = true,
                None => return Err(format!("mapping free list points past the slab at {m}")),
            }
            m = self.mappings[m as usize].refs;
        }
        let live_mappings: Vec<u32> =
            (0..self.mappings.len() as u32).filter(|&m| !is_free[m as usize]).collect();
        if live_mappings.len() as u32 != self.mapping_count {
            return Err(format!("{} live mappings, count says {}", live_mappings.len(), self.mapping_count));
        }
        let mut external = HashSet::new();
        let mut inside_indexed = HashSet::new();
        for &mid in &live_mappings {
            let m = self.mappings[mid as usize];
            if self.mapping_at(m.ip_idx, m.proto, m.ext_port) != Some(mid) {
                return Err(format!("mapping {mid} ({m:?}) does not hold its port"));
            }
            if !external.insert((m.ip_idx, m.proto, m.ext_port)) {
                return Err(format!("external endpoint of mapping {mid} ({m:?}) held twice"));
            }
            let h = self.map_hash(m.in_addr, m.in_port, m.proto);
            if self.map_idx.find(h, |v| v == mid).is_some()
                && !inside_indexed.insert((m.in_addr, m.in_port, m.proto))
            {
                return Err(format!("inside endpoint of mapping {mid} ({m:?}) indexed twice"));
            }
        }

        let mut sessions = 0u32;
        let mut refs = vec![0u32; self.mappings.len()];
        let mut per_class = [0u32; CLASSES];
        for (sid, s) in self.sessions.iter().enumerate() {
            if s.class == CLASS_FREE {
                continue;
            }
            let sid = sid as u32;
            sessions += 1;
            if let Some(n) = per_class.get_mut(usize::from(s.class)) {
                *n += 1;
            } else {
                return Err(format!("session {sid} has class {}", s.class));
            }
            let ho = self.out_hash(s.in_addr, s.in_port, s.remote_addr, s.remote_port, s.proto);
            if self.out_idx.find(ho, |v| v == sid).is_none() {
                return Err(format!("session {sid} ({s:?}) missing from the outbound index"));
            }
            let hi = self.in_hash(s.ip_idx, s.ext_port, s.remote_addr, s.remote_port, s.proto);
            if self.in_idx.find(hi, |v| v == sid).is_none() {
                return Err(format!("session {sid} ({s:?}) missing from the inbound index"));
            }
            match self.mapping_of_session(s) {
                Some(mid) if !is_free.get(mid as usize).copied().unwrap_or(true) => refs[mid as usize] += 1,
                _ => return Err(format!("session {sid} ({s:?}) has no live mapping")),
            }
        }
        if sessions != self.session_count {
            return Err(format!("{sessions} live sessions, count says {}", self.session_count));
        }
        for (class, n) in per_class.iter().enumerate() {
            if self.lru[class].len != *n {
                return Err(format!(
                    "LRU list {class} counts {}, {n} sessions are in it",
                    self.lru[class].len
                ));
            }
        }
        for &mid in &live_mappings {
            let m = self.mappings[mid as usize];
            let used = refs[mid as usize];
            if m.refs != used {
                return Err(format!("mapping {mid} ({m:?}) counts {} sessions, {used} use it", m.refs));
            }
        }
        Ok(())
    }
}
