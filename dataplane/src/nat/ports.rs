//! The egress port space: each egress IP's ports cut into one slice per worker (`port_owner`), allocation with
//! the original port first and a bounded search (RFC 4787 REQ-3/3a, RFC 5382 REQ-7), quarantine of freed ports
//! (RFC 6888 REQ-8), and the per-group port caps.

use super::*;

/// (group, egress IP) pairs whose mappings one worker counts, for groups with `max_ports_per_egress_ip`.
pub const MAX_GROUP_PORT_COUNTERS: usize = 1024;
pub(super) const NO_GROUP_SLOT: u16 = u16::MAX;

/// Mappings one capped group holds on one egress IP (this worker's share). `key == 0`: a free counter.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct GroupPorts {
    pub(super) key: u32,
    pub(super) ip_idx: u8,
    pub(super) count: u32,
}

pub(super) const LOW_FIRST: u32 = 1;
pub(super) const LOW_LEN: u32 = 1023;
pub(super) const HIGH_FIRST: u32 = 1024;
/// Most port slots one allocation looks at before giving up with `OutOfPorts` (Linux's NAT gives up after 128
/// random tries); a search costs at most a few microseconds, and the next allocation continues where it stopped.
pub(super) const MAX_PORT_PROBES: u32 = 4096;
pub(super) const HIGH_LEN: u32 = 65536 - 1024;

/// The worker that owns egress `port` (of any egress IP and protocol) when `workers` share the port space: the
/// ranges 1–1023 and 1024–65535 are each cut into `workers` contiguous slices. Port 0 → worker 0 (never
/// allocated). Usable without a [`Nat`], e.g. to steer replies.
#[inline]
pub fn reply_owner(workers: u16, _egress_ip: Ipv4Addr, _proto: u8, port: u16) -> u16 {
    port_owner(workers, port)
}

#[inline]
pub(super) fn port_owner(workers: u16, port: u16) -> u16 {
    let w = u32::from(workers.max(1));
    let p = u32::from(port);
    if p == 0 {
        0
    } else if p < HIGH_FIRST {
        ((p - LOW_FIRST) * w / LOW_LEN) as u16
    } else {
        ((p - HIGH_FIRST) * w / HIGH_LEN) as u16
    }
}

/// `[first, end)` of `worker`'s slice of a range: the ports `p` with `(p - first) * workers / len == worker`.
pub(super) fn slice_of(first: u32, len: u32, workers: u16, worker: u16) -> (u32, u32) {
    let w = u32::from(workers.max(1));
    let k = u32::from(worker);
    let start = (k * len).div_ceil(w);
    let end = ((k + 1) * len).div_ceil(w);
    (first + start.min(len), first + end.min(len))
}

/// Port slot values: `IN_USE | mapping` while held; otherwise the second from which the port may be allocated
/// again (0 = never used).
pub(super) const IN_USE: u32 = 1 << 31;

/// Protocol classes of the port tables.
pub(super) const PC_TCP: usize = 0;
pub(super) const PC_UDP: usize = 1;
pub(super) const PC_ICMP: usize = 2;
pub(super) const PCS: usize = 3;

#[inline]
pub(super) fn proto_class(proto: u8) -> usize {
    match proto {
        ip_proto::TCP => PC_TCP,
        ip_proto::UDP => PC_UDP,
        _ => PC_ICMP,
    }
}

impl Nat {
    /// The worker that owns `port` when it is another one than this (with one worker, never: no arithmetic).
    #[inline]
    pub(super) fn other_owner(&self, port: u16) -> Option<u16> {
        if self.workers == 1 {
            return None;
        }
        let owner = port_owner(self.workers, port);
        (owner != self.worker).then_some(owner)
    }

    /// The port table slot of `(ip, proto class, port)` if `port` is in this worker's slices.
    #[inline]
    pub(super) fn port_slot(&self, ip_idx: u8, pc: usize, port: u16) -> Option<usize> {
        let p = u32::from(port);
        let off = if p >= self.low.0 && p < self.low.1 {
            p - self.low.0
        } else if p >= self.high.0 && p < self.high.1 {
            (self.low.1 - self.low.0) + (p - self.high.0)
        } else {
            return None;
        };
        Some((usize::from(ip_idx) * PCS + pc) * self.per_table + off as usize)
    }

    /// The mapping holding external `(ip, port, proto)`, if this worker holds it.
    #[inline]
    pub(super) fn mapping_at(&self, ip_idx: u8, proto: u8, port: u16) -> Option<u32> {
        let slot = self.port_slot(ip_idx, proto_class(proto), port)?;
        let v = *self.ports.get(slot)?;
        (v & IN_USE != 0).then_some(v & !IN_USE)
    }

    // -----------------------------------------------------------------------------------------------------------
    // Allocation
    // -----------------------------------------------------------------------------------------------------------

    /// RFC 4787 REQ-3 / 5382 REQ-7 (no overloading), REQ-3a (1–1023 stays in 1–1023), original port first,
    /// RFC 6888 REQ-8 (quarantine): a free external port for `orig` on `ip_idx`, marked as held by `mapping`.
    pub(super) fn alloc_port(
        &mut self,
        ip_idx: u8,
        proto: u8,
        orig: u16,
        mapping: u32,
        now_s: u32,
    ) -> Option<u16> {
        let pc = proto_class(proto);
        let low = proto != ip_proto::ICMP && orig != 0 && u32::from(orig) < HIGH_FIRST;
        let (first, end) = if low { self.low } else { self.high };
        let len = end - first;
        let slice = usize::from(!low);
        let in_use = self.in_use[usize::from(ip_idx)][pc][slice];
        if len == 0 || in_use >= len {
            // Every port of the slice is taken: no search (a client flooding new flows at a full egress IP would
            // otherwise cost a scan of the whole slice per packet).
            return None;
        }
        let base_off = if low { 0 } else { self.low.1 - self.low.0 };
        let table = (usize::from(ip_idx) * PCS + pc) * self.per_table;
        let ports = &mut self.ports;
        let mut take = |off: u32| -> bool {
            let i = table + (base_off + off) as usize;
            match ports.get_mut(i) {
                Some(v) if *v & IN_USE == 0 && *v <= now_s => {
                    *v = IN_USE | mapping;
                    true
                }
                _ => false,
            }
        };
        let o = u32::from(orig);
        let port = if o >= first && o < end && take(o - first) {
            Some(orig)
        } else {
            let cur = &mut self.cursor[usize::from(ip_idx)][pc][slice];
            let mut found = None;
            // From the cursor onwards (wrapping without a division per step), at most MAX_PORT_PROBES slots, as
            // Linux's NAT bounds its search: free slots can all be in quarantine, and a full scan per new flow would
            // let a client stall the worker. The cursor keeps the place, so the next flow searches further on.
            let mut off = if *cur < len { *cur } else { 0 };
            for _ in 0..len.min(MAX_PORT_PROBES) {
                let next = if off + 1 == len { 0 } else { off + 1 };
                if take(off) {
                    *cur = next;
                    found = Some((first + off) as u16);
                    break;
                }
                off = next;
            }
            if found.is_none() {
                *cur = off;
            }
            found
        };
        if port.is_some() {
            self.in_use[usize::from(ip_idx)][pc][slice] += 1;
        }
        port
    }

    pub(super) fn free_port(&mut self, ip_idx: u8, proto: u8, port: u16, now_s: u32) {
        let pc = proto_class(proto);
        if let Some(slot) = self.port_slot(ip_idx, pc, port) {
            if let Some(v) = self.ports.get_mut(slot) {
                // RFC 6888 REQ-8: not reusable before the quarantine has passed.
                *v = now_s.saturating_add(self.quarantine).min(IN_USE - 1);
                // Allocated ports lie in their slice, so the port says which slice it came from.
                let slice = usize::from(u32::from(port) >= HIGH_FIRST);
                let u = &mut self.in_use[usize::from(ip_idx)][pc][slice];
                *u = u.saturating_sub(1);
            }
        }
    }

    /// The counter of capped group `key` on egress IP `ip_idx`, if the group may take one more port there (its cap,
    /// `limit` for all workers together, is shared evenly among them); `GroupPortLimit` otherwise, or when every
    /// counter is in use.
    #[cold]
    pub(super) fn group_counter(&mut self, key: u32, ip_idx: u8, limit: u32) -> Result<u16, DropReason> {
        let share = limit.div_ceil(u32::from(self.workers)).max(1);
        let mut free = None;
        for (i, c) in self.group_ports.iter().enumerate() {
            if c.key == key && c.ip_idx == ip_idx {
                return if c.count < share { Ok(i as u16) } else { Err(DropReason::GroupPortLimit) };
            }
            if free.is_none() && (c.key == 0 || c.count == 0) {
                free = Some(i);
            }
        }
        let i = free.ok_or(DropReason::GroupPortLimit)?;
        self.group_ports[i] = GroupPorts { key, ip_idx, count: 0 };
        Ok(i as u16)
    }
}
