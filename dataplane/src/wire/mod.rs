//! Views over frame bytes and the arithmetic to rewrite them in place.
//!
//! Contract: nothing here panics on any input. Today this module holds the header constants and the checksum
//! arithmetic (full sums, and incremental updates per RFC 1624) that the parsers in `pipeline` and `nat` use;
//! frame parsing itself still lives beside its users.

pub mod checksum;

/// Bytes of an Ethernet header (destination, source, EtherType).
pub const ETH_HEADER_LEN: usize = 14;
/// Bytes of one 802.1Q / 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;

/// IP protocol numbers (IANA) the gateway tells apart.
pub mod ip_proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}
