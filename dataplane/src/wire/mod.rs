//! Views over frame bytes and the arithmetic to rewrite them in place.
//!
//! Contract (as smoltcp's `wire`): nothing here panics on any input. Parsing (with etherparse) returns offsets
//! and an error naming the layer; rewriting goes through small accessors on `&mut [u8]` that are only called on
//! ranges the parser has checked, and keep checksums valid with incremental updates (RFC 1624).

pub mod checksum;

/// Bytes of an Ethernet header (destination, source, EtherType).
pub const ETH_HEADER_LEN: usize = 14;
/// Bytes of one 802.1Q / 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
