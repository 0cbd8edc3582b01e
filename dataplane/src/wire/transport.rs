//! The transport fields of an IPv4 packet that connection tracking and NAT key on, read in one pass.

use super::{icmp, ip_proto, ipv4, read_u16, tcp, udp};
use crate::drop::DropReason;

/// What [`parse`] reads of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub proto: u8,
    /// IPv4 header length; the transport header starts here.
    pub ihl: usize,
    pub src: u32,
    pub dst: u32,
    /// TCP/UDP source port, ICMP echo identifier, 0 for other ICMP.
    pub sport: u16,
    /// TCP/UDP destination port; 0 for ICMP.
    pub dport: u16,
    /// The ICMP type; 0 for TCP and UDP.
    pub icmp_type: u8,
    /// TCP only; [`tcp::Segment::NONE`] otherwise.
    pub seg: tcp::Segment,
}

/// Reads the IPv4 header and the TCP, UDP or ICMP header after it. `packet` is the IP packet through its total
/// length. The transport header must be whole (TCP: its data offset within the packet); its checksum is not
/// verified here. Always inlined: its callers run it once per packet and keep the result in registers.
#[inline(always)]
pub fn parse(packet: &[u8]) -> Result<Transport, DropReason> {
    let Some(h) = ipv4::fixed(packet) else { return Err(DropReason::BadIpHeader) };
    if ipv4::version(h) != 4 {
        return Err(DropReason::BadIpHeader);
    }
    let ihl = ipv4::header_len(h);
    let l4 = match packet.get(ihl..) {
        Some(l4) if ihl >= ipv4::MIN_HEADER_LEN => l4,
        _ => return Err(DropReason::BadIpHeader),
    };
    let proto = ipv4::protocol(h);
    let (sport, dport, icmp_type, seg) = match proto {
        ip_proto::TCP => {
            if l4.len() < tcp::MIN_HEADER_LEN {
                return Err(DropReason::Truncated);
            }
            let Some(data_offset) = tcp::data_offset(l4) else { return Err(DropReason::BadL4Header) };
            let seg = tcp::Segment::read(l4, data_offset);
            (read_u16(l4, tcp::SRC_PORT), read_u16(l4, tcp::DST_PORT), 0, seg)
        }
        ip_proto::UDP => {
            if l4.len() < udp::HEADER_LEN {
                return Err(DropReason::Truncated);
            }
            (read_u16(l4, udp::SRC_PORT), read_u16(l4, udp::DST_PORT), 0, tcp::Segment::NONE)
        }
        ip_proto::ICMP => {
            let Some(header) = l4.first_chunk::<{ icmp::HEADER_LEN }>() else {
                return Err(DropReason::Truncated);
            };
            let icmp_type = header[icmp::TYPE];
            let id = if icmp::is_echo(icmp_type) {
                u16::from_be_bytes([header[icmp::IDENTIFIER], header[icmp::IDENTIFIER + 1]])
            } else {
                0
            };
            (id, 0, icmp_type, tcp::Segment::NONE)
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok(Transport { proto, ihl, src: ipv4::src(h), dst: ipv4::dst(h), sport, dport, icmp_type, seg })
}
