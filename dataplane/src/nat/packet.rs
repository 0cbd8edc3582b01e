//! What the NAT reads and rewrites in a packet: which kind of packet it is (`parse`, over [`transport::parse`]),
//! and in-place rewrites of an address and a port with incremental checksum updates (RFC 1624). Field offsets
//! and views are `wire`'s.

use super::*;

/// Packet kinds `parse` recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Flow,
    IcmpError,
}

/// Reads the headers the NAT needs ([`transport::parse`]) and says whether the packet is a flow's (TCP, UDP, an
/// ICMP echo in the direction `outbound` selects) or an ICMP error to translate. Inlined into its two callers: as
/// a call, moving the result through memory cost more than the parsing.
#[inline(always)]
pub(super) fn parse(pkt: &[u8], outbound: bool) -> Result<(Transport, Kind), DropReason> {
    let t = transport::parse(pkt)?;
    if t.proto != ip_proto::ICMP {
        return Ok((t, Kind::Flow));
    }
    let echo = if outbound { icmp::ECHO_REQUEST } else { icmp::ECHO_REPLY };
    match t.icmp_type {
        ty if ty == echo => Ok((t, Kind::Flow)),
        ty if icmp::is_translated_error(ty) => Ok((t, Kind::IcmpError)),
        icmp::ECHO_REQUEST => Err(DropReason::NoMapping),
        _ => Err(DropReason::UnsupportedIcmp),
    }
}

/// Offset of the L4 checksum and of the port/identifier rewritten for each protocol; whether the checksum covers
/// the IP pseudo header.
#[inline]
pub(super) fn l4_layout(proto: u8) -> (usize, bool) {
    match proto {
        ip_proto::TCP => (tcp::CHECKSUM, true),
        ip_proto::UDP => (udp::CHECKSUM, true),
        _ => (icmp::CHECKSUM, false),
    }
}

/// Rewrites an address (at `addr_off`: 12 source, 16 destination) and a port/identifier (at `ihl + port_off`)
/// with incremental updates of the IPv4 header checksum and the L4 checksum (RFC 1624). UDP checksum 0 stays 0
/// (RFC 768). A port or checksum beyond the end of `pkt` is left alone. Always inlined (two callers, once per
/// packet): with `addr_off` a constant, the header fields are read and written without bounds checks.
#[inline(always)]
pub(super) fn rewrite(
    pkt: &mut [u8],
    ihl: usize,
    proto: u8,
    addr_off: usize,
    new_addr: u32,
    port_off: usize,
    new_port: u16,
) {
    let Some((ip, l4)) = pkt.split_at_mut_checked(ihl) else { return };
    let Some(ip) = ipv4::fixed_mut(ip) else { return };
    let ip = &mut ip[..];
    let old_addr = read_u32(ip, addr_off);
    // RFC 1624 eqn. 3's Σ~m + Σm' for the address, shared by the IP header and the pseudo header.
    let addr_delta = u32::from(!((old_addr >> 16) as u16))
        + u32::from(!(old_addr as u16))
        + (new_addr >> 16)
        + (new_addr & 0xffff);
    if old_addr != new_addr {
        write_u32(ip, addr_off, new_addr);
        write_u16(
            ip,
            ipv4::CHECKSUM,
            checksum::finish_small(u32::from(!read_u16(ip, ipv4::CHECKSUM)) + addr_delta),
        );
    }
    let (ck_off, pseudo) = l4_layout(proto);
    let Some(l4) = l4.get_mut(..(port_off + 2).max(ck_off + 2)) else {
        // Too short for both fields (parse rules it out for flow packets): each one that fits.
        let old_port = read_u16(l4, port_off);
        write_u16(l4, port_off, new_port);
        if ck_off + 2 <= l4.len() {
            update_l4_checksum(l4, ck_off, proto, pseudo, addr_delta, old_port, new_port);
        }
        return;
    };
    let old_port = read_u16(l4, port_off);
    write_u16(l4, port_off, new_port);
    update_l4_checksum(l4, ck_off, proto, pseudo, addr_delta, old_port, new_port);
}

/// The L4 checksum update of [`rewrite`] (`l4` holds the checksum at `ck_off`; `addr_delta` is the address's
/// share of the update, added when the checksum covers the pseudo header).
#[inline(always)]
pub(super) fn update_l4_checksum(
    l4: &mut [u8],
    ck_off: usize,
    proto: u8,
    pseudo: bool,
    addr_delta: u32,
    old_port: u16,
    new_port: u16,
) {
    let c = read_u16(l4, ck_off);
    if proto == ip_proto::UDP && c == 0 {
        // RFC 768: no checksum stays no checksum.
        return;
    }
    // RFC 1624 eqn. 3 with every changed word summed before one fold: HC' = ~(~HC + Σ~m + Σm').
    let mut acc = u32::from(!c) + u32::from(!old_port) + u32::from(new_port);
    if pseudo {
        acc += addr_delta;
    }
    let mut new = checksum::finish_small(acc);
    if proto == ip_proto::UDP && new == 0 {
        new = 0xffff;
    }
    write_u16(l4, ck_off, new);
}

/// Writes a 16-bit word of an ICMP message and keeps the ICMP checksum (at `icmp + 2`) valid.
#[inline]
pub(super) fn icmp_wr16(pkt: &mut [u8], icmp_at: usize, off: usize, new: u16) {
    let old = read_u16(pkt, off);
    if old == new || off + 2 > pkt.len() {
        return;
    }
    write_u16(pkt, off, new);
    let c = read_u16(pkt, icmp_at + icmp::CHECKSUM);
    write_u16(pkt, icmp_at + icmp::CHECKSUM, checksum::update16(c, old, new));
}
