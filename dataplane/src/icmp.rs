//! ICMP errors the gateway itself originates, both "destination unreachable" (type 3):
//! - code 13, communication administratively prohibited: to an inside client whose new flow found no free NAT
//!   port (optional, `[nat] icmp_on_out_of_ports`), so the client fails fast instead of retrying into a timeout.
//!   Linux reports 3/13 to a connecting TCP socket as `EHOSTUNREACH`.
//! - code 4, fragmentation needed, with the next-hop MTU (RFC 1191): to the sender of a packet larger than the MTU
//!   of the interface it would leave by, so path-MTU discovery works through the gateway (always on).
//!
//! Sans-IO and allocation-free: [`write_unreachable`] writes the reply frame into a caller-owned buffer
//! (the pipeline's, allocated once); the pipeline rate-limits replies with a [`crate::time::TokenBucket`].
//!
//! Which packets never get an error (RFC 1122 3.2.2, RFC 1812 4.3.2.7): ICMP errors (and ICMP types unknown to
//! us, as Linux treats them), non-first fragments, packets to an IP or link-layer broadcast or multicast
//! destination, and packets whose source does not name one host (0.0.0.0/8, 127/8, multicast, class E,
//! 255.255.255.255) or whose source MAC is a group address.
//!
//! The reply (RFC 792, RFC 1812 4.3.2.3 – 4.3.2.5):
//! - Ethernet: back to the frame's source MAC, from the MAC the frame was sent to (the inside interface's), with
//!   the frame's 802.1Q/802.1ad tag if it had one.
//! - IPv4: source = the inside interface's address when the gateway knows it (RFC 1812 4.3.2.4: an address of
//!   the interface the error leaves by), else the quoted packet's destination (an interface-less gateway stands
//!   in the path to it; the client routes it and it names the unreachable peer). Destination = the quoted
//!   packet's source. TTL 64, DF clear, TOS precedence "internetwork control" (RFC 1812 4.3.2.5).
//! - ICMP: as much of the original datagram as fits in 576 bytes of IP (RFC 1812 4.3.2.3; at least the
//!   header and 8 bytes of payload, which RFC 792 requires), checksums computed in full.

use std::net::Ipv4Addr;

use crate::wire::ethernet::{self, HEADER_LEN as ETH_HEADER_LEN, VLAN_TAG_LEN};
use crate::wire::{checksum, icmp, ip_proto, ipv4};

/// Settings for the errors the gateway originates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpErrors {
    /// Answer a new flow that found no free NAT port with ICMP 3/13.
    pub on_out_of_ports: bool,
    /// Replies per second per worker (token bucket refill rate).
    pub per_sec: u32,
    /// Replies a worker may send at once after an idle spell (token bucket size).
    pub burst: u32,
}

/// Linux's `net.ipv4.icmp_ratelimit` is one error per ms with a burst of 50 (`icmp_msgs_burst`).
pub const DEFAULT_PER_SEC: u32 = 1000;
pub const DEFAULT_BURST: u32 = 50;

impl Default for IcmpErrors {
    fn default() -> Self {
        IcmpErrors { on_out_of_ports: false, per_sec: DEFAULT_PER_SEC, burst: DEFAULT_BURST }
    }
}

const IPV4_HEADER_LEN: usize = ipv4::MIN_HEADER_LEN;
const ICMP_HEADER_LEN: usize = icmp::HEADER_LEN;
/// RFC 1812 4.3.2.3: an ICMP error's IP datagram is at most 576 bytes.
const MAX_ERROR_IP_LEN: usize = 576;
/// Bytes of the frame a reply occupies at most (Ethernet + one tag + 576 bytes of IP).
pub const MAX_REPLY_FRAME: usize = ETH_HEADER_LEN + VLAN_TAG_LEN + MAX_ERROR_IP_LEN;

/// Which destination-unreachable error to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// 3/13.
    AdminProhibited,
    /// 3/4 with the MTU of the next hop.
    FragmentationNeeded { next_hop_mtu: u16 },
}

/// Whether `a` can be the source of a packet we answer (RFC 1812 4.3.2.7: it must define a single host).
fn is_single_host(a: Ipv4Addr) -> bool {
    !(a.octets()[0] == 0 || a.is_loopback() || a.is_multicast() || a.is_broadcast() || a.octets()[0] >= 240)
}

/// Writes an ICMP destination unreachable of `kind` about the IPv4 packet at `frame[ip_start..ip_end]` (already
/// validated: IHL, lengths and header checksum) into `out`; returns the reply frame's length, or `None` when the
/// packet must not get an error or `out` is too small. `inside_addr`: the gateway's address on the interface the
/// reply leaves by. `ip_id`: the reply's IP identification.
pub fn write_unreachable(
    kind: Unreachable,
    frame: &[u8],
    ip_start: usize,
    ip_end: usize,
    inside_addr: Option<Ipv4Addr>,
    ip_id: u16,
    out: &mut [u8],
) -> Option<usize> {
    let eth = frame.get(..ip_start)?;
    let ip = frame.get(ip_start..ip_end)?;
    if !(ip_start == ETH_HEADER_LEN || ip_start == ETH_HEADER_LEN + VLAN_TAG_LEN)
        || ip.len() < IPV4_HEADER_LEN
    {
        return None;
    }
    let h = ipv4::fixed(ip)?;
    let header_len = ipv4::header_len(h);
    if header_len < IPV4_HEADER_LEN || header_len > ip.len() {
        return None;
    }
    // Link layer: a group-addressed frame (broadcast, multicast) or a group source MAC gets nothing.
    if ethernet::is_group_address(eth) || ethernet::is_group_address(&eth[ethernet::SRC..]) {
        return None;
    }
    // RFC 1812 4.3.2.7: only the first fragment.
    if ipv4::flags_fragment(h) & ipv4::FRAGMENT_OFFSET_MASK != 0 {
        return None;
    }
    let src = Ipv4Addr::from(ipv4::src(h));
    let dst = Ipv4Addr::from(ipv4::dst(h));
    if !is_single_host(src) || dst.is_multicast() || dst.is_broadcast() {
        return None;
    }
    // Never an error about an ICMP error (or about an ICMP message too short to tell).
    if ipv4::protocol(h) == ip_proto::ICMP && !ip.get(header_len).is_some_and(|&t| icmp::is_query(t)) {
        return None;
    }

    let quote_len = ip.len().min(MAX_ERROR_IP_LEN - IPV4_HEADER_LEN - ICMP_HEADER_LEN);
    let ip_len = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quote_len;
    let len = ip_start + ip_len;
    let out = out.get_mut(..len)?;

    // Ethernet: swap the MACs, keep the tag (if any) and the IPv4 ethertype.
    out[0..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[0..6]);
    out[12..ip_start].copy_from_slice(&eth[12..ip_start]);

    let (ip_out, icmp_out) = out[ip_start..].split_at_mut(IPV4_HEADER_LEN);
    let reply_src = inside_addr.unwrap_or(dst);
    ip_out[0] = 0x45;
    ip_out[1] = 0xc0; // RFC 1812 4.3.2.5: precedence 6, internetwork control.
    ip_out[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip_out[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip_out[6..8].copy_from_slice(&[0, 0]); // DF clear, not a fragment.
    ip_out[8] = 64;
    ip_out[9] = ip_proto::ICMP;
    ip_out[10..12].copy_from_slice(&[0, 0]);
    ip_out[12..16].copy_from_slice(&reply_src.octets());
    ip_out[16..20].copy_from_slice(&src.octets());
    let ip_check = checksum::compute(ip_out);
    ip_out[10..12].copy_from_slice(&ip_check.to_be_bytes());

    icmp_out[icmp::TYPE] = icmp::DEST_UNREACHABLE;
    icmp_out[2..8].copy_from_slice(&[0; 6]);
    match kind {
        Unreachable::AdminProhibited => icmp_out[icmp::CODE] = icmp::code::ADMIN_PROHIBITED,
        Unreachable::FragmentationNeeded { next_hop_mtu } => {
            icmp_out[icmp::CODE] = icmp::code::FRAGMENTATION_NEEDED;
            icmp_out[icmp::NEXT_HOP_MTU..icmp::NEXT_HOP_MTU + 2].copy_from_slice(&next_hop_mtu.to_be_bytes());
        }
    }
    icmp_out[ICMP_HEADER_LEN..].copy_from_slice(&ip[..quote_len]);
    let icmp_check = checksum::compute(icmp_out);
    icmp_out[icmp::CHECKSUM..icmp::CHECKSUM + 2].copy_from_slice(&icmp_check.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4(src, dst, 64)
            .udp(4000, 53)
            .write(&mut f, payload)
            .unwrap();
        f
    }

    fn reply(f: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; MAX_REPLY_FRAME];
        write_unreachable(Unreachable::AdminProhibited, f, 14, f.len(), None, 1, &mut out)
            .map(|n| out[..n].to_vec())
    }

    #[test]
    fn the_quote_is_capped_at_576_bytes_of_ip() {
        let f = frame([10, 10, 0, 2], [203, 0, 113, 10], &[7; 1400]);
        let r = reply(&f).unwrap();
        assert_eq!(r.len(), 14 + 576);
        assert!(checksum::verify(&r[14..34]));
        assert!(checksum::verify(&r[34..]));
        assert_eq!(&r[42..], &f[14..14 + 548]);
    }

    #[test]
    fn packets_that_must_not_get_an_error() {
        let good = frame([10, 10, 0, 2], [203, 0, 113, 10], b"x");
        assert!(reply(&good).is_some());
        type Mutation = fn(&mut Vec<u8>);
        let cases: [(&str, Mutation); 10] = [
            ("non-first fragment", |f| f[21] = 1),
            ("source 0.0.0.0", |f| f[26..30].copy_from_slice(&[0, 0, 0, 0])),
            ("multicast source", |f| f[26..30].copy_from_slice(&[224, 0, 0, 5])),
            ("broadcast source", |f| f[26..30].copy_from_slice(&[255; 4])),
            ("loopback source", |f| f[26..30].copy_from_slice(&[127, 0, 0, 1])),
            ("class E source", |f| f[26..30].copy_from_slice(&[240, 0, 0, 1])),
            ("multicast destination", |f| f[30..34].copy_from_slice(&[239, 1, 2, 3])),
            ("broadcast destination", |f| f[30..34].copy_from_slice(&[255; 4])),
            ("link-layer broadcast", |f| f[0..6].copy_from_slice(&[0xff; 6])),
            ("group source MAC", |f| f[6] = 1),
        ];
        for (name, mutate) in cases {
            let mut f = good.clone();
            mutate(&mut f);
            assert_eq!(reply(&f), None, "{name}");
        }
        // ICMP: queries get an error, errors and unknown types do not.
        let mut icmp = good.clone();
        icmp[23] = ip_proto::ICMP;
        for (t, answered) in [(8, true), (0, true), (3, false), (11, false), (5, false), (42, false)] {
            icmp[34] = t;
            assert_eq!(reply(&icmp).is_some(), answered, "ICMP type {t}");
        }
        // An ICMP message with no type byte gets nothing.
        let mut bare = good[..34].to_vec();
        bare[23] = ip_proto::ICMP;
        assert_eq!(reply(&bare), None);
    }

    #[test]
    fn a_small_buffer_or_a_bad_layout_is_refused_not_a_panic() {
        let f = frame([10, 10, 0, 2], [203, 0, 113, 10], b"x");
        let mut small = [0u8; 40];
        assert_eq!(
            write_unreachable(Unreachable::AdminProhibited, &f, 14, f.len(), None, 1, &mut small),
            None
        );
        let mut out = [0u8; MAX_REPLY_FRAME];
        assert_eq!(
            write_unreachable(Unreachable::AdminProhibited, &f, 14, f.len() + 1, None, 1, &mut out),
            None
        );
        assert_eq!(write_unreachable(Unreachable::AdminProhibited, &f, 16, f.len(), None, 1, &mut out), None);
        assert_eq!(
            write_unreachable(Unreachable::AdminProhibited, &f[..20], 14, 20, None, 1, &mut out),
            None
        );
    }
}
