//! Longest-prefix-match tables: a compressed multibit trie in the style of Poptrie (Asai & Ohara, SIGCOMM 2015).
//!
//! A table maps every address of one family to a `u32` value (a group, or a destination leaf). It is built once
//! from a list of prefixes and never changes. Shape:
//! - a direct-indexed root of `2^root_bits` entries (16 bits for big tables, 8 for small ones, so a group with a
//!   handful of prefixes costs about 1 KiB, not the 32 MiB of a DIR-24-8 table);
//! - below it, nodes of stride 6 (64 slots). A node stores two 64-bit vectors instead of 64 pointers: which slots
//!   have a child node, and where a new run of equal leaf values starts. Children and leaves live in contiguous
//!   arrays, and a slot's index is a `popcount` of the vector below it. Leaf pushing makes every slot either a
//!   child or a final value, so a lookup never backtracks. A node whose leaf slots all hold one value (the usual
//!   case: a longer prefix inside a uniform block) keeps that value in the node, saving a dependent read.
//!
//! A lookup reads at most `1 + ceil((bits - root_bits) / 6)` entries (4 for IPv4 with a 16-bit root), whatever
//! the number of prefixes. Lookups use `get` and fall back to the table's default value, so a corrupt index can
//! never panic; the builder guarantees it cannot happen.

use std::ops::Range;

/// Entry of the root array: a final value, or (with [`NODE_FLAG`]) the index of a node.
pub(crate) const NODE_FLAG: u32 = 1 << 31;
/// Stride of every node below the root.
const STRIDE: u32 = 6;

/// The largest value a table can store (values carry [`NODE_FLAG`] in the same word).
pub const MAX_VALUE: u32 = NODE_FLAG - 1;

#[derive(Clone, Copy, Debug, Default)]
struct Node {
    /// Bit `s` set: slot `s` is a child node.
    children: u64,
    /// Bit `s` set: slot `s` is a leaf slot whose value differs from the previous leaf slot's (or is the first).
    leaf_runs: u64,
    child_base: u32,
    /// Index of the node's first leaf in [`LpmTable::leaves`]; or, with [`INLINE_LEAF`], the value of the node's
    /// only leaf run itself (most nodes: a longer prefix inside one value), which saves the lookup a dependent read.
    leaf_base: u32,
}

/// In [`Node::leaf_base`]: the rest of the word is the node's one leaf value, not an index. (Leaf indices stay
/// below it: a table would need 2^31 leaves, 8 GiB, to reach it.)
const INLINE_LEAF: u32 = 1 << 31;

/// An immutable longest-prefix-match table over `bits`-wide keys (32 for IPv4, 128 for IPv6).
#[derive(Clone, Debug)]
pub struct LpmTable {
    bits: u32,
    root_bits: u32,
    root: Vec<u32>,
    nodes: Vec<Node>,
    leaves: Vec<u32>,
    default: u32,
}

/// Number of set bits of `vector` in positions `0..=slot`.
#[inline(always)]
fn rank(vector: u64, slot: u32) -> u32 {
    (vector << (63 - slot)).count_ones()
}

impl LpmTable {
    /// Builds a table from `(network, prefix length, value)` triples, keys right-aligned in a `u128` (an IPv4
    /// address is `u32::from(addr) as u128`). Longest prefix wins; an address covered by no prefix maps to
    /// `default`. Host bits of `network` are ignored; for two entries with the same prefix the last one wins.
    /// Values above [`MAX_VALUE`] are clamped to `default`.
    /// The root is 16 bits wide for tables of 2048 prefixes or more, 8 bits below that.
    pub fn build(bits: u32, entries: &[(u128, u8, u32)], default: u32) -> LpmTable {
        let root_bits = if entries.len() >= 2048 { 16 } else { 8 };
        LpmTable::build_with_root(bits, entries, default, root_bits)
    }

    /// [`build`](Self::build) with a root of `root_bits` (1–16) bits: 16 makes every prefix up to /16 a single
    /// read, for 256 KiB.
    pub fn build_with_root(bits: u32, entries: &[(u128, u8, u32)], default: u32, root_bits: u32) -> LpmTable {
        let bits = bits.clamp(1, 128);
        let default = if default > MAX_VALUE { 0 } else { default };
        let ranges = prefixes_to_ranges(bits, entries, default);
        let root_bits = root_bits.clamp(1, 16).min(bits);
        let mut table =
            LpmTable { bits, root_bits, root: Vec::new(), nodes: Vec::new(), leaves: Vec::new(), default };
        // Boundaries strictly after address 0, with the value that starts there.
        let boundaries = &ranges[1..];
        let mut root = Vec::with_capacity(1 << root_bits);
        let mut children = Vec::new();
        table.scan_block(0, 0, root_bits, ranges[0].1, boundaries, &mut root, &mut children);
        table.nodes.resize(children.len(), Node::default());
        let work = children
            .into_iter()
            .enumerate()
            .map(|(i, (slot, value, boundaries, block_start))| {
                root[slot as usize] = NODE_FLAG | i as u32;
                PendingNode { index: i as u32, block_start, offset: root_bits, value, boundaries }
            })
            .collect();
        table.root = root;
        table.build_nodes(boundaries, work);
        table
    }

    /// The root entry of `key` (an IPv4 address as `u32`): its value, or (with the top bit set) the node the walk
    /// goes on in. What [`lookup_u32`](Self::lookup_u32) returns when the top bit is clear.
    #[inline(always)]
    pub(crate) fn root_entry_u32(&self, key: u32) -> u32 {
        let key = u64::from(key) << 32;
        self.root.get((key >> (64 - self.root_bits)) as usize).copied().unwrap_or(self.default)
    }

    /// The value of the longest prefix containing `key` (an IPv4 address as `u32`). Never panics.
    #[inline]
    pub fn lookup_u32(&self, key: u32) -> u32 {
        let mut entry = self.root_entry_u32(key);
        let key = u64::from(key) << 32;
        let mut offset = self.root_bits;
        while entry & NODE_FLAG != 0 {
            entry = self.step_u32(entry, key, offset);
            offset += STRIDE;
        }
        entry
    }

    /// The value of the longest prefix containing `key` (an IPv6 address as `u128`). Never panics.
    #[inline]
    pub fn lookup_u128(&self, key: u128) -> u32 {
        if self.bits != 128 {
            // An IPv4 table asked about a 128-bit key: look up its low 32 bits.
            return self.lookup_u32(key as u32);
        }
        let mut entry = match self.root.get((key >> (128 - self.root_bits)) as usize) {
            Some(&e) => e,
            None => return self.default,
        };
        let mut offset = self.root_bits;
        while entry & NODE_FLAG != 0 {
            let Some(node) = self.nodes.get((entry & !NODE_FLAG) as usize) else { return self.default };
            let width = STRIDE.min(128u32.saturating_sub(offset)).max(1);
            let slot = (key.wrapping_shl(offset) >> (128 - width)) as u32;
            entry = self.step(node, slot);
            offset += STRIDE;
        }
        entry
    }

    /// One node below the root for an IPv4 key: `entry` (with [`NODE_FLAG`]) names the node, `offset` is the
    /// number of key bits consumed above it. As one iteration of [`lookup_u32`](Self::lookup_u32)'s loop.
    #[inline(always)]
    fn step_u32(&self, entry: u32, key: u64, offset: u32) -> u32 {
        let Some(node) = self.nodes.get((entry & !NODE_FLAG) as usize) else { return self.default };
        let slot = (key.wrapping_shl(offset) >> (64 - slot_width_u32(offset))) as u32;
        self.step(node, slot)
    }

    #[inline(always)]
    fn step(&self, node: &Node, slot: u32) -> u32 {
        let slot = slot & 63;
        if node.children & (1u64 << slot) != 0 {
            NODE_FLAG | node.child_base.wrapping_add(rank(node.children, slot) - 1)
        } else if node.leaf_base & INLINE_LEAF != 0 {
            node.leaf_base & !INLINE_LEAF
        } else {
            let index = node.leaf_base.wrapping_add(rank(node.leaf_runs, slot).wrapping_sub(1));
            self.leaves.get(index as usize).copied().unwrap_or(self.default)
        }
    }

    /// Heap bytes used by the table.
    pub fn memory_bytes(&self) -> usize {
        self.root.len() * 4 + self.nodes.len() * std::mem::size_of::<Node>() + self.leaves.len() * 4
    }

    /// Number of nodes below the root.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Appends to `entries` the `2^width` slot entries of the block of `2^(bits - offset)` addresses starting at
    /// `block_start`, and to `children` the slots that need a node (their entry is a [`NODE_FLAG`] placeholder),
    /// as `(slot, value at the sub-block start, range of boundaries inside it, sub-block start)`. `value` is the
    /// value at `block_start`; `boundaries` are the value changes strictly inside the block, sorted. Runs of slots
    /// with no change are filled in bulk, so a call costs O(boundaries) plus the fill, not a search per slot.
    #[allow(clippy::too_many_arguments)]
    fn scan_block(
        &self,
        block_start: u128,
        offset: u32,
        width: u32,
        mut value: u32,
        boundaries: &[(u128, u32)],
        entries: &mut Vec<u32>,
        children: &mut Vec<(u32, u32, Range<usize>, u128)>,
    ) {
        let sub_bits = self.bits - offset - width;
        let slot_count = 1u32 << width;
        let mut rest = boundaries;
        let mut consumed = 0usize;
        let mut slot = 0u32;
        while slot < slot_count {
            let sub_start = block_start + ((slot as u128) << sub_bits);
            // Changes at or before the sub-block start set its starting value.
            while let Some(&(start, v)) = rest.first() {
                if start > sub_start {
                    break;
                }
                value = v;
                rest = &rest[1..];
                consumed += 1;
            }
            // Every slot before the one holding the next change is uniform.
            let next_change_slot = rest.first().map_or(slot_count, |&(start, _)| {
                u32::try_from((start - block_start) >> sub_bits).unwrap_or(u32::MAX).min(slot_count)
            });
            if next_change_slot > slot {
                entries.resize(entries.len() + (next_change_slot - slot) as usize, value);
                slot = next_change_slot;
                continue;
            }
            // The next change is strictly inside this slot: it becomes a node.
            let sub_last = sub_start + ((1u128 << sub_bits) - 1);
            let inside = rest.iter().take_while(|&&(start, _)| start <= sub_last).count();
            children.push((slot, value, consumed..consumed + inside, sub_start));
            entries.push(NODE_FLAG);
            if let Some(&(_, v)) = rest[..inside].last() {
                value = v;
            }
            rest = &rest[inside..];
            consumed += inside;
            slot += 1;
        }
    }

    /// Builds the nodes below the root, depth first from an explicit work list (no recursion, and no allocation
    /// per node: the scratch vectors are reused).
    fn build_nodes(&mut self, boundaries: &[(u128, u32)], mut work: Vec<PendingNode>) {
        let mut entries: Vec<u32> = Vec::with_capacity(1 << STRIDE);
        let mut children = Vec::new();
        while let Some(p) = work.pop() {
            let width = STRIDE.min(self.bits - p.offset);
            let inside = &boundaries[p.boundaries.clone()];
            entries.clear();
            children.clear();
            self.scan_block(p.block_start, p.offset, width, p.value, inside, &mut entries, &mut children);
            // Children are contiguous, in slot order, so a child's index is `child_base + rank - 1`.
            let child_base = self.nodes.len() as u32;
            self.nodes.resize(self.nodes.len() + children.len(), Node::default());
            let mut node = Node { leaf_base: self.leaves.len() as u32, child_base, ..Node::default() };
            let mut last_leaf = None;
            for (slot, &e) in entries.iter().enumerate() {
                if e == NODE_FLAG {
                    node.children |= 1 << slot;
                } else if last_leaf != Some(e) {
                    node.leaf_runs |= 1 << slot;
                    self.leaves.push(e);
                    last_leaf = Some(e);
                }
            }
            if node.leaf_runs.count_ones() == 1 {
                if let Some(value) = self.leaves.pop() {
                    node.leaf_base = INLINE_LEAF | value;
                }
            }
            if let Some(slot) = self.nodes.get_mut(p.index as usize) {
                *slot = node;
            }
            let base = p.boundaries.start;
            for (i, (_, value, range, block_start)) in children.drain(..).enumerate() {
                work.push(PendingNode {
                    index: child_base + i as u32,
                    block_start,
                    offset: p.offset + width,
                    value,
                    boundaries: base + range.start..base + range.end,
                });
            }
        }
    }
}

/// Width in bits of the slot of a node `offset` bits into an IPv4 key.
#[inline(always)]
fn slot_width_u32(offset: u32) -> u32 {
    STRIDE.min(32u32.saturating_sub(offset)).max(1)
}

/// A node reserved in [`LpmTable::nodes`] and still to be built.
struct PendingNode {
    index: u32,
    block_start: u128,
    offset: u32,
    /// The value at `block_start`.
    value: u32,
    /// The changes strictly inside the node's block, as a range of the table's boundaries.
    boundaries: Range<usize>,
}

/// Turns prefixes (longest wins) into the sorted list of `(first address, value)` runs covering the whole space,
/// starting at address 0, adjacent runs having different values.
fn prefixes_to_ranges(bits: u32, entries: &[(u128, u8, u32)], default: u32) -> Vec<(u128, u32)> {
    let max: u128 = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    let mut prefixes: Vec<(u128, u128, u32)> = entries
        .iter()
        .map(|&(net, len, value)| {
            let len = u32::from(len).min(bits);
            let host = if len == bits { 0 } else { max >> len };
            let first = (net & max) & !host;
            (first, first | host, if value > MAX_VALUE { default } else { value })
        })
        .collect();
    // Containing prefixes first: by start, then by size descending; for duplicates keep the last one written.
    prefixes.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    prefixes.dedup_by(|later, earlier| {
        if later.0 == earlier.0 && later.1 == earlier.1 {
            earlier.2 = later.2;
            true
        } else {
            false
        }
    });
    let mut ranges: Vec<(u128, u32)> = vec![(0, default)];
    let emit = |ranges: &mut Vec<(u128, u32)>, start: u128, value: u32| {
        if ranges.last().is_some_and(|&(s, _)| s == start) {
            ranges.pop();
        }
        if ranges.last().is_some_and(|&(_, v)| v == value) {
            return;
        }
        ranges.push((start, value));
    };
    // Stack of open prefixes: (last address, value); each one nested in the one below it.
    let mut open: Vec<(u128, u32)> = Vec::new();
    for &(first, last, value) in &prefixes {
        while let Some(&(top_last, _)) = open.last() {
            if top_last >= first {
                break;
            }
            open.pop();
            let resumed = open.last().map_or(default, |&(_, v)| v);
            emit(&mut ranges, top_last + 1, resumed);
        }
        emit(&mut ranges, first, value);
        open.push((last, value));
    }
    while let Some((top_last, _)) = open.pop() {
        if top_last == max {
            break;
        }
        let resumed = open.last().map_or(default, |&(_, v)| v);
        emit(&mut ranges, top_last + 1, resumed);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(bits: u32, entries: &[(u128, u8, u32)], default: u32, key: u128) -> u32 {
        let mut best: Option<(u8, u32)> = None;
        for &(net, len, value) in entries {
            let shift = bits - u32::from(len);
            let matches = len == 0 || (key >> shift) == (net >> shift);
            if matches && best.is_none_or(|(l, _)| len >= l) {
                best = Some((len, value));
            }
        }
        best.map_or(default, |(_, v)| v)
    }

    #[test]
    fn ipv4_longest_prefix_wins_and_default_elsewhere() {
        let ip = |a: u8, b: u8, c: u8, d: u8| u32::from_be_bytes([a, b, c, d]) as u128;
        let entries = [(ip(10, 0, 0, 0), 8, 1), (ip(10, 1, 0, 0), 16, 2), (ip(10, 1, 2, 3), 32, 3)];
        let t = LpmTable::build(32, &entries, 0);
        assert_eq!(t.lookup_u32(u32::from_be_bytes([10, 9, 9, 9])), 1);
        assert_eq!(t.lookup_u32(u32::from_be_bytes([10, 1, 9, 9])), 2);
        assert_eq!(t.lookup_u32(u32::from_be_bytes([10, 1, 2, 3])), 3);
        assert_eq!(t.lookup_u32(u32::from_be_bytes([10, 1, 2, 4])), 2);
        assert_eq!(t.lookup_u32(u32::from_be_bytes([11, 0, 0, 0])), 0);
        assert_eq!(t.lookup_u32(u32::MAX), 0);
    }

    #[test]
    fn default_route_and_top_of_space() {
        let t = LpmTable::build(32, &[(0, 0, 7), (u32::MAX as u128, 32, 9)], 0);
        assert_eq!(t.lookup_u32(0), 7);
        assert_eq!(t.lookup_u32(u32::MAX), 9);
        assert_eq!(t.lookup_u32(u32::MAX - 1), 7);
        let t6 = LpmTable::build(128, &[(0, 0, 7), (u128::MAX, 128, 9)], 0);
        assert_eq!(t6.lookup_u128(u128::MAX), 9);
        assert_eq!(t6.lookup_u128(u128::MAX - 1), 7);
        assert_eq!(t6.lookup_u128(0), 7);
    }

    #[test]
    fn small_tables_stay_small() {
        let t = LpmTable::build(32, &[(u32::from_be_bytes([192, 0, 2, 0]) as u128, 24, 1)], 0);
        assert!(t.memory_bytes() < 4096, "{} bytes", t.memory_bytes());
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_linear_scan_v4(
            raw in proptest::collection::vec((proptest::num::u32::ANY, 0u8..=32, 1u32..50), 0..60),
            probes in proptest::collection::vec((0usize..60, proptest::num::u32::ANY, 0u8..=32), 1..200),
        ) {
            let entries: Vec<(u128, u8, u32)> = raw.iter().map(|&(a, l, v)| {
                let masked = if l == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(l))) };
                (masked as u128, l, v)
            }).collect();
            let mut dedup = entries.clone();
            // The table keeps the last of duplicate prefixes; make the reference do the same.
            dedup.reverse();
            let mut seen = std::collections::HashSet::new();
            dedup.retain(|&(n, l, _)| seen.insert((n, l)));
            let t = LpmTable::build(32, &entries, 0);
            // Every root width: the default ones (8, 16) and odd ones.
            let wide = [3, 13, 16].map(|root| LpmTable::build_with_root(32, &entries, 0, root));
            for &(pick, noise, keep) in &probes {
                // Bias keys toward the prefixes: keep `keep` bits of a prefix, randomise the rest.
                let key = match entries.get(pick) {
                    Some(&(n, _, _)) if keep > 0 => {
                        let mask = u32::MAX << (32 - u32::from(keep));
                        ((n as u32) & mask) | (noise & !mask)
                    }
                    _ => noise,
                };
                let want = naive(32, &dedup, 0, key as u128);
                proptest::prop_assert_eq!(t.lookup_u32(key), want);
                for table in &wide {
                    proptest::prop_assert_eq!(table.lookup_u32(key), want);
                }
            }
        }

        #[test]
        fn agrees_with_linear_scan_v6(
            raw in proptest::collection::vec((proptest::num::u128::ANY, 0u8..=128, 1u32..50), 0..40),
            probes in proptest::collection::vec((0usize..40, proptest::num::u128::ANY, 0u8..=128), 1..100),
        ) {
            let entries: Vec<(u128, u8, u32)> = raw.iter().map(|&(a, l, v)| {
                let masked = if l == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(l))) };
                (masked, l, v)
            }).collect();
            let mut dedup = entries.clone();
            dedup.reverse();
            let mut seen = std::collections::HashSet::new();
            dedup.retain(|&(n, l, _)| seen.insert((n, l)));
            let t = LpmTable::build(128, &entries, 0);
            for &(pick, noise, keep) in &probes {
                let key = match entries.get(pick) {
                    Some(&(n, _, _)) if keep > 0 => {
                        let mask = u128::MAX << (128 - u32::from(keep));
                        (n & mask) | (noise & !mask)
                    }
                    _ => noise,
                };
                proptest::prop_assert_eq!(t.lookup_u128(key), naive(128, &dedup, 0, key));
            }
        }
    }
}
