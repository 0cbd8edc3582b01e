//! Ethernet II frames: the header's fields, and which network layer follows.
//!
//! egressd's interfaces carry no VLANs, so a tagged frame is refused here rather than parsed further: a tag its
//! sender chose must never be carried to the other side (VLAN hopping).

use super::AddressFamily;
use crate::drop::DropReason;

/// Bytes of an Ethernet header (destination, source, EtherType).
pub const HEADER_LEN: usize = 14;
/// Bytes of one 802.1Q / 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Offset of the destination MAC.
pub const DST: usize = 0;
/// Offset of the source MAC.
pub const SRC: usize = 6;
/// Offset of the EtherType (or the TPID of a tag).
pub const ETHERTYPE: usize = 12;
/// Bytes of both MAC addresses, which a router rewrites together.
pub const MACS_LEN: usize = 12;

/// EtherType values the gateway tells apart.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q customer tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service tag (Q-in-Q).
    pub const QINQ: u16 = 0x88a8;
}

/// Which network layer `frame` carries; its header starts at [`HEADER_LEN`].
#[inline(always)]
pub fn network_layer(frame: &[u8]) -> Result<AddressFamily, DropReason> {
    let Some(&[high, low]) = frame.get(ETHERTYPE..ETHERTYPE + 2).and_then(|b| b.first_chunk::<2>()) else {
        return Err(DropReason::Truncated);
    };
    match u16::from_be_bytes([high, low]) {
        ethertype::IPV4 => Ok(AddressFamily::Ipv4),
        other => not_ipv4(other),
    }
}

/// [`network_layer`] for everything but IPv4, out of the fast path.
#[cold]
fn not_ipv4(ethertype: u16) -> Result<AddressFamily, DropReason> {
    match ethertype {
        ethertype::IPV6 => Ok(AddressFamily::Ipv6),
        ethertype::VLAN | ethertype::QINQ => Err(DropReason::VlanTagged),
        _ => Err(DropReason::NotIp),
    }
}

/// Whether a MAC address is a group (multicast or broadcast) address: the I/G bit of its first octet.
#[inline]
pub fn is_group_address(mac: &[u8]) -> bool {
    mac.first().is_some_and(|octet| octet & 1 != 0)
}
