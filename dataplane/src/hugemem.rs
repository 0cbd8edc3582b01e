//! Big flat tables (the conntrack indexes, later the session slab) in memory the kernel may back with 2 MiB
//! transparent huge pages.
//!
//! A NAT table sized for a million flows is over 100 MiB touched at random: with 4 KiB pages nearly every lookup
//! also misses the TLB and walks the page tables, which profiles showed as the single most expensive instruction
//! of the established path. Hosts usually run THP in `madvise` mode, so ordinary heap allocations stay on small
//! pages; this module maps the table anonymously and asks for huge pages with `madvise(MADV_HUGEPAGE)`
//! (memmap2), then views the bytes as a typed slice (bytemuck, so only plain-old-data element types qualify and
//! no `unsafe` is needed). Where the kernel declines, the table works the same on small pages.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;
use memmap2::{Advice, MmapMut};

/// A fixed-length slice of `T` in its own anonymous mapping, huge pages requested.
pub struct HugeSlice<T: Pod> {
    map: MmapMut,
    len: usize,
    _elements: PhantomData<T>,
}

impl<T: Pod> HugeSlice<T> {
    /// `len` copies of `value`. Allocation failure aborts, as it does for a `Vec`.
    pub fn filled(len: usize, value: T) -> HugeSlice<T> {
        let layout = std::alloc::Layout::array::<T>(len.max(1))
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<T>()));
        let Ok(map) = MmapMut::map_anon(layout.size()) else { std::alloc::handle_alloc_error(layout) };
        // Best effort: without THP (or with it disabled) the mapping simply stays on small pages.
        let _ = map.advise(Advice::HugePage);
        let mut slice = HugeSlice { map, len, _elements: PhantomData };
        slice.fill(value);
        slice
    }

    /// Bytes of the elements (the mapping rounds up to a page).
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T: Pod> Deref for HugeSlice<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        // A page-aligned mapping of exactly `len` elements: the cast cannot fail.
        bytemuck::cast_slice(&self.map[..self.len * std::mem::size_of::<T>()])
    }
}

impl<T: Pod> DerefMut for HugeSlice<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        let bytes = self.len * std::mem::size_of::<T>();
        bytemuck::cast_slice_mut(&mut self.map[..bytes])
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for HugeSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeSlice").field("len", &self.len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_len_copies_and_writes_stick() {
        let mut s = HugeSlice::filled(1000, [7u32, 9u32]);
        assert_eq!(s.len(), 1000);
        assert!(s.iter().all(|&v| v == [7, 9]));
        s[999] = [1, 2];
        assert_eq!(s[999], [1, 2]);
        assert_eq!(s.bytes(), 8000);
    }

    #[test]
    fn empty_is_fine() {
        let s = HugeSlice::filled(0, 0u64);
        assert!(s.is_empty());
    }

    #[test]
    fn a_large_table_gets_huge_pages_when_the_host_allows_them() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !(thp.contains("[always]") || thp.contains("[madvise]")) {
            eprintln!("SKIPPED: transparent huge pages are off on this host ({})", thp.trim());
            return;
        }
        let before = anon_huge_kib();
        let s = HugeSlice::filled(8 << 20, 1u64); // 64 MiB
        let after = anon_huge_kib();
        assert_eq!(s[12345], 1);
        assert!(after >= before + 4096, "AnonHugePages {before} -> {after} kB after a 64 MiB table");
    }

    fn anon_huge_kib() -> u64 {
        std::fs::read_to_string("/proc/self/smaps_rollup")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("AnonHugePages:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}
