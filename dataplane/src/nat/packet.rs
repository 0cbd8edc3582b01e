//! Reading and rewriting the headers the NAT translates: the IPv4 + transport fields it needs (`parse`), and
//! in-place rewrites of an address and a port with incremental checksum updates (RFC 1624).

use super::*;

/// Layer-4 fields of a parsed packet.
#[derive(Clone, Copy, Debug)]
pub(super) struct L4 {
    pub(super) proto: u8,
    pub(super) ihl: usize,
    pub(super) src: u32,
    pub(super) dst: u32,
    /// TCP/UDP source port or ICMP echo identifier.
    pub(super) sport: u16,
    /// TCP/UDP destination port; 0 for ICMP.
    pub(super) dport: u16,
    pub(super) seg: Segment,
}

/// Packet kinds `parse` recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Flow,
    IcmpError,
}

#[inline]
pub(super) fn rd16(p: &[u8], o: usize) -> u16 {
    match p.get(o..o + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

#[inline]
pub(super) fn rd32(p: &[u8], o: usize) -> u32 {
    match p.get(o..o + 4) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

#[inline]
pub(super) fn wr16(p: &mut [u8], o: usize, v: u16) {
    if let Some(b) = p.get_mut(o..o + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

#[inline]
pub(super) fn wr32(p: &mut [u8], o: usize, v: u32) {
    if let Some(b) = p.get_mut(o..o + 4) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

pub(super) const ICMP_ECHO_REPLY: u8 = 0;
pub(super) const ICMP_DEST_UNREACH: u8 = 3;
pub(super) const ICMP_ECHO_REQUEST: u8 = 8;
pub(super) const ICMP_TIME_EXCEEDED: u8 = 11;
pub(super) const ICMP_PARAM_PROBLEM: u8 = 12;

/// Parses the IPv4 + L4 headers the NAT needs. `outbound` selects which ICMP echo type is a flow packet.
/// Inlined into its two callers: as a call, moving the `(L4, Kind)` result through memory cost more than the
/// parsing.
#[inline(always)]
pub(super) fn parse(pkt: &[u8], outbound: bool) -> Result<(L4, Kind), DropReason> {
    // The fixed header as an array: its fields are read without bounds checks.
    let Some(h) = pkt.first_chunk::<20>() else { return Err(DropReason::BadIpHeader) };
    if h[0] >> 4 != 4 {
        return Err(DropReason::BadIpHeader);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let l4 = match pkt.get(ihl..) {
        Some(l4) if ihl >= 20 => l4,
        _ => return Err(DropReason::BadIpHeader),
    };
    let proto = h[9];
    let src = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let dst = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    let mut seg = Segment { seq: 0, ack: 0, flags: 0, window: 0, payload: 0, wscale: NO_WSCALE };
    let (sport, dport, kind) = match proto {
        ip_proto::TCP => {
            if l4.len() < 20 {
                return Err(DropReason::Truncated);
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return Err(DropReason::BadL4Header);
            }
            seg.seq = rd32(l4, 4);
            seg.ack = rd32(l4, 8);
            seg.flags = l4[13];
            seg.window = rd16(l4, 14);
            seg.payload = (l4.len() - doff) as u32;
            if seg.flags & F_SYN != 0 {
                seg.wscale = wscale_option(&l4[20..doff]);
            }
            (rd16(l4, 0), rd16(l4, 2), Kind::Flow)
        }
        ip_proto::UDP => {
            if l4.len() < 8 {
                return Err(DropReason::Truncated);
            }
            (rd16(l4, 0), rd16(l4, 2), Kind::Flow)
        }
        ip_proto::ICMP => {
            if l4.len() < 8 {
                return Err(DropReason::Truncated);
            }
            let echo = if outbound { ICMP_ECHO_REQUEST } else { ICMP_ECHO_REPLY };
            match l4[0] {
                t if t == echo => (rd16(l4, 4), 0, Kind::Flow),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAM_PROBLEM => (0, 0, Kind::IcmpError),
                ICMP_ECHO_REQUEST => return Err(DropReason::NoMapping),
                _ => return Err(DropReason::UnsupportedIcmp),
            }
        }
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    Ok((L4 { proto, ihl, src, dst, sport, dport, seg }, kind))
}

/// The window scale option of a SYN (RFC 7323), or `NO_WSCALE`.
pub(super) fn wscale_option(mut opts: &[u8]) -> u8 {
    while let Some(&kind) = opts.first() {
        match kind {
            0 => break,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(opts.get(1).copied().unwrap_or(0));
                if len < 2 || len > opts.len() {
                    break;
                }
                if kind == 3 && len == 3 {
                    return opts[2].min(14);
                }
                opts = &opts[len..];
            }
        }
    }
    NO_WSCALE
}

/// Offset of the L4 checksum and of the port/identifier rewritten for each protocol; whether the checksum covers
/// the IP pseudo header.
#[inline]
pub(super) fn l4_layout(proto: u8) -> (usize, bool) {
    match proto {
        ip_proto::TCP => (16, true),
        ip_proto::UDP => (6, true),
        _ => (2, false),
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
    let Some(ip) = ip.first_chunk_mut::<20>() else { return };
    let ip = &mut ip[..];
    let old_addr = rd32(ip, addr_off);
    // RFC 1624 eqn. 3's Σ~m + Σm' for the address, shared by the IP header and the pseudo header.
    let addr_delta = u32::from(!((old_addr >> 16) as u16))
        + u32::from(!(old_addr as u16))
        + (new_addr >> 16)
        + (new_addr & 0xffff);
    if old_addr != new_addr {
        wr32(ip, addr_off, new_addr);
        wr16(ip, 10, checksum::finish_small(u32::from(!rd16(ip, 10)) + addr_delta));
    }
    let (ck_off, pseudo) = l4_layout(proto);
    let Some(l4) = l4.get_mut(..(port_off + 2).max(ck_off + 2)) else {
        // Too short for both fields (parse rules it out for flow packets): each one that fits.
        let old_port = rd16(l4, port_off);
        wr16(l4, port_off, new_port);
        if ck_off + 2 <= l4.len() {
            update_l4_checksum(l4, ck_off, proto, pseudo, addr_delta, old_port, new_port);
        }
        return;
    };
    let old_port = rd16(l4, port_off);
    wr16(l4, port_off, new_port);
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
    let c = rd16(l4, ck_off);
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
    wr16(l4, ck_off, new);
}

/// Writes a 16-bit word of an ICMP message and keeps the ICMP checksum (at `icmp + 2`) valid.
#[inline]
pub(super) fn icmp_wr16(pkt: &mut [u8], icmp: usize, off: usize, new: u16) {
    let old = rd16(pkt, off);
    if old == new || off + 2 > pkt.len() {
        return;
    }
    wr16(pkt, off, new);
    let c = rd16(pkt, icmp + 2);
    wr16(pkt, icmp + 2, checksum::update16(c, old, new));
}
