//! Zero-copy views over frame bytes, one file per protocol, and the checksum arithmetic to rewrite them in place.
//!
//! Every other layer reads and writes packets through here: [`ethernet`] (with the VLAN tags it refuses),
//! [`ipv4`] (the validated frame layout, options, the fixed header's fields), [`tcp`], [`udp`], [`icmp`] (field
//! offsets, flags, options), [`transport`] (the fields the NAT tracks, read once per packet), [`checksum`]
//! (RFC 1071 sums, RFC 1624 incremental updates), and for the L7 path the byte streams it judges: [`tls`] (the
//! ClientHello) and [`http`] (HTTP/1.1 request heads and body framing). smoltcp's `wire` module is the model: named offsets instead of
//! magic numbers, and views that never trust a length they read.
//!
//! **Contract, for every function in this module:** no input makes it panic (a read past the end yields `None`,
//! an error, or 0 where documented; a write past the end writes nothing), nothing allocates, nothing is `unsafe`.
//! The property tests in `wire/tests.rs` feed arbitrary bytes to every parser and compare what they read with
//! etherparse, an independent parser.
//!
//! IPv4 is the only family the gateway forwards today; [`AddressFamily`] is where IPv6 joins (the Ethernet layer
//! already names it, and the pipeline drops it under its own reason).

pub mod checksum;
pub mod ethernet;
pub mod http;
pub mod icmp;
pub mod ipv4;
pub mod response;
pub mod tcp;
pub mod tls;
pub mod transport;
pub mod udp;

#[cfg(test)]
mod tests;

/// The network layer a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    Ipv4,
    Ipv6,
}

/// IP protocol numbers (IANA) the gateway tells apart.
pub mod ip_proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// The big-endian 16-bit word at `at`, or `None` past the end.
#[inline]
pub fn get_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at.checked_add(1)?)?]))
}

/// The big-endian 16-bit word at `at`, or 0 past the end (for fields a parser has already shown are there).
#[inline]
pub fn read_u16(bytes: &[u8], at: usize) -> u16 {
    match bytes.get(at..at.saturating_add(2)) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

/// The big-endian 32-bit word at `at`, or 0 past the end.
#[inline]
pub fn read_u32(bytes: &[u8], at: usize) -> u32 {
    match bytes.get(at..at.saturating_add(4)) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

/// Writes `value` big-endian at `at`; nothing past the end.
#[inline]
pub fn write_u16(bytes: &mut [u8], at: usize, value: u16) {
    if let Some(b) = bytes.get_mut(at..at.saturating_add(2)) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

/// Writes `value` big-endian at `at`; nothing past the end.
#[inline]
pub fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    if let Some(b) = bytes.get_mut(at..at.saturating_add(4)) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}
