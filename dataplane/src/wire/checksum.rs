//! Internet checksum (RFC 1071) and its incremental update (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! Rewriting an address or port changes a few 16-bit words; recomputing over the whole packet would cost a pass
//! over the payload per packet. The incremental form costs a few adds regardless of length.

/// One's-complement sum of `data` as big-endian 16-bit words (odd trailing byte padded with zero), folded to
/// 16 bits but not complemented. Start with `initial = 0`.
///
/// Reads eight bytes at a time with an end-around carry: since 2^16 ≡ 1 (mod 2^16 − 1), a big-endian 64-bit word
/// adds the same as its four 16-bit words (RFC 1071 §2(B)), and an IPv4 header takes three adds, not ten.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    let mut add = |word: u64| {
        let (total, carry) = acc.overflowing_add(word);
        acc = total + u64::from(carry);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        add(u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    }
    // The tail, in pieces that each start on a 16-bit boundary (where a word sits in the sum does not matter).
    let mut rest = chunks.remainder();
    if let [a, b, c, d, tail @ ..] = rest {
        add(u64::from(u32::from_be_bytes([*a, *b, *c, *d])));
        rest = tail;
    }
    if let [a, b, tail @ ..] = rest {
        add(u64::from(u16::from_be_bytes([*a, *b])));
        rest = tail;
    }
    if let [last] = rest {
        // An odd last byte is padded with zero: the high half of its 16-bit word (RFC 1071).
        add(u64::from(*last) << 8);
    }
    fold64(acc)
}

fn fold64(acc: u64) -> u32 {
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    let acc = (acc & 0xffff_ffff) + (acc >> 32);
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    acc as u32
}

/// Folds a 32-bit one's-complement accumulator to 16 bits and complements it: the value to store.
pub fn finish(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The checksum to store for `data` (e.g. an IPv4 header whose checksum field is zero).
pub fn compute(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

/// True if `data`, checksum field included, verifies (sums to 0xffff).
#[inline]
pub fn verify(data: &[u8]) -> bool {
    match <&[u8; 20]>::try_from(data) {
        Ok(header) => verify20(header),
        Err(_) => finish(sum(data, 0)) == 0,
    }
}

/// [`verify`] for a 20-byte IPv4 header (no options: nearly every packet), without a loop or folds. Five 32-bit
/// words cannot overflow a u64, and since 2^16 ≡ 1 (mod 0xffff) the folded sum is 0xffff exactly when the plain
/// sum is a nonzero multiple of 0xffff (folding maps only 0 to 0). The words are read in native byte order: that
/// multiplies the sum by 2^8 (mod 0xffff) on a little-endian machine, which keeps it zero or nonzero (RFC 1071
/// §2(B)), and saves the byte swaps.
#[inline(always)]
fn verify20(h: &[u8; 20]) -> bool {
    let w = |i: usize| u64::from(u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
    let s = w(0) + w(4) + w(8) + w(12) + w(16);
    s != 0 && s % 0xffff == 0
}

/// [`finish`] for the sums of an incremental update (below 2^20, up to 16 words of 16 bits): two folds always
/// suffice, so no loop.
#[inline(always)]
pub fn finish_small(acc: u32) -> u16 {
    let a = (acc & 0xffff) + (acc >> 16);
    let a = (a & 0xffff) + (a >> 16);
    !(a as u16)
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = (!check as u32) + (!old as u32) + (new as u32);
    finish_small(acc)
}

/// As [`update16`] for a 32-bit field (an IPv4 address), treated as two 16-bit words.
#[inline]
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    let acc = (!check as u32)
        + (!(old >> 16) as u16 as u32)
        + (!(old as u16) as u32)
        + (new >> 16)
        + (new & 0xffff);
    finish_small(acc)
}

/// As [`update16`] for a UDP checksum, where 0 means "no checksum" (IPv4 only) and must stay 0, and a computed
/// 0 is sent as 0xffff (RFC 768).
#[inline]
pub fn update16_udp(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match update16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// As [`update32`] with the UDP rules of [`update16_udp`].
#[inline]
pub fn update32_udp(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match update32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // IPv4 header from RFC 1071 discussions / Wikipedia's worked example: checksum 0xb861.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
        0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn computes_the_known_ipv4_header_checksum() {
        assert_eq!(compute(&HDR), 0xb861);
        let mut h = HDR;
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verify(&h));
        h[15] ^= 1;
        assert!(!verify(&h));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    /// RFC 1071 word by word, the obvious way.
    fn sum_by_16_bit_words(data: &[u8], initial: u32) -> u32 {
        let mut acc = u64::from(initial);
        for pair in data.chunks(2) {
            acc += u64::from(pair[0]) << 8 | u64::from(*pair.get(1).unwrap_or(&0));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u32
    }

    #[test]
    fn carries_wrap_around_in_long_runs_of_ones() {
        let ones = [0xffu8; 1501];
        assert_eq!(sum(&ones, 0), sum_by_16_bit_words(&ones, 0));
        assert_eq!(sum(&ones, u32::MAX), sum_by_16_bit_words(&ones, u32::MAX));
        assert_eq!(sum(&[], 0), 0);
    }

    proptest! {
        #[test]
        fn word_at_a_time_sum_matches_the_16_bit_reference(
            data in proptest::collection::vec(any::<u8>(), 0..200), initial in any::<u32>(),
        ) {
            prop_assert_eq!(sum(&data, initial), sum_by_16_bit_words(&data, initial));
        }

        #[test]
        fn incremental_update_matches_recomputation(
            mut data in proptest::collection::vec(any::<u8>(), 12..64),
            word in 0usize..4, new16 in any::<u16>(), new32 in any::<u32>(),
        ) {
            // Word 0 holds the checksum; words 1.. are covered data.
            data[0] = 0; data[1] = 0;
            let c = compute(&data);
            let off = 2 + word * 2;
            let old16 = u16::from_be_bytes([data[off], data[off + 1]]);
            data[off..off + 2].copy_from_slice(&new16.to_be_bytes());
            let inc = update16(c, old16, new16);
            prop_assert!(verify_with(&data, inc));

            let old32 = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
            data[4..8].copy_from_slice(&new32.to_be_bytes());
            let inc2 = update32(inc, old32, new32);
            prop_assert!(verify_with(&data, inc2));
        }
    }

    fn verify_with(data: &[u8], check: u16) -> bool {
        let mut d = data.to_vec();
        d[0..2].copy_from_slice(&check.to_be_bytes());
        verify(&d)
    }

    /// An IPv4-header-sized input: random, or with its checksum made right and then maybe one bit flipped.
    fn header20() -> impl Strategy<Value = [u8; 20]> {
        (any::<[u8; 20]>(), 0u8..3, 0usize..160).prop_map(|(mut h, how, bit)| {
            if how > 0 {
                h[10] = 0;
                h[11] = 0;
                let c = compute(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
            }
            if how == 2 {
                h[bit / 8] ^= 1 << (bit % 8);
            }
            h
        })
    }

    proptest! {
        #[test]
        fn the_20_byte_verify_agrees_with_the_general_one(h in header20()) {
            prop_assert_eq!(verify(&h), finish(sum_by_16_bit_words(&h, 0)) == 0);
            prop_assert_eq!(verify(&h), finish(sum(&h, 0)) == 0);
        }

        #[test]
        fn loop_free_update_folds_agree_with_finish(check in any::<u16>(), old in any::<u32>(), new in any::<u32>()) {
            let acc16 = (!check as u32) + (!(old as u16) as u32) + (new as u16 as u32);
            prop_assert_eq!(update16(check, old as u16, new as u16), finish(acc16));
            let acc32 = (!check as u32)
                + (!(old >> 16) as u16 as u32)
                + (!(old as u16) as u32)
                + (new >> 16)
                + (new & 0xffff);
            prop_assert_eq!(update32(check, old, new), finish(acc32));
        }
    }

    #[test]
    fn the_20_byte_verify_edge_cases() {
        // All zeros sums to 0, not 0xffff: it does not verify; all ones does (0xffff is "minus zero").
        assert!(!verify(&[0u8; 20]));
        assert!(verify(&[0xffu8; 20]));
        assert_eq!(verify(&[0xffu8; 20]), finish(sum(&[0xffu8; 20], 0)) == 0);
        let mut h = HDR;
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verify(&h));
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(update16_udp(0, 1, 2), 0);
        // Find an update that yields 0 under plain arithmetic and check it is sent as 0xffff.
        for new in 0..=u16::MAX {
            if update16(0xfffe, 0, new) == 0 {
                assert_eq!(update16_udp(0xfffe, 0, new), 0xffff);
                return;
            }
        }
        panic!("no update produced a zero checksum");
    }
}
