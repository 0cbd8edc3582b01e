//! ICMP errors through the NAT (RFC 5508 REQ-3/3a/4/6, RFC 5382 REQ-9/10): errors from outside quoting a packet
//! we translated are translated back, outer and quoted headers; errors from inside leave only from the quoted
//! flow's endpoint to its peer, cut to the quoted header + 8 bytes.

use super::*;

/// Where an ICMP error's quoted packet is and what it says.
#[derive(Clone, Copy, Debug)]
pub(super) struct Quote {
    /// Offset of the quoted IP header in the packet, and its length.
    pub(super) q: usize,
    pub(super) qihl: usize,
    pub(super) proto: u8,
    pub(super) src: u32,
    pub(super) dst: u32,
    /// Ports (identifier in `sport` for a quoted echo).
    pub(super) sport: u16,
    pub(super) dport: u16,
}

impl Nat {
    // -----------------------------------------------------------------------------------------------------------
    // ICMP errors (RFC 5508 REQ-3/3a/4/6, RFC 5382 REQ-9/10)
    // -----------------------------------------------------------------------------------------------------------

    /// Checks an ICMP error's checksum and quoted header. Returns the quote's offset, its IHL, protocol, and the
    /// quoted source/destination address and port (identifier for a quoted echo).
    pub(super) fn quoted(packet: &[u8], ihl: usize) -> Result<Quote, DropReason> {
        let icmp = packet.get(ihl..).ok_or(DropReason::Truncated)?;
        // RFC 5508 REQ-3: a bad ICMP checksum is dropped.
        if !checksum::verify(icmp) {
            return Err(DropReason::BadIcmpChecksum);
        }
        let q = ihl + icmp::HEADER_LEN;
        let inner = packet.get(q..).ok_or(DropReason::Truncated)?;
        let Some(qh) = ipv4::fixed(inner).filter(|h| ipv4::version(h) == 4) else {
            return Err(DropReason::Truncated);
        };
        let qihl = ipv4::header_len(qh);
        // An 8-byte L4 quote (RFC 792) is enough: ports, and the UDP checksum, are in it.
        if qihl < ipv4::MIN_HEADER_LEN || inner.len() < qihl + QUOTED_L4_LEN {
            return Err(DropReason::Truncated);
        }
        // RFC 5508 REQ-3a: a bad embedded IP header checksum is dropped.
        if !checksum::verify(&inner[..qihl]) {
            return Err(DropReason::BadIcmpChecksum);
        }
        let proto = ipv4::protocol(qh);
        // TCP and UDP have their ports at the same offsets.
        let (sport, dport) = match proto {
            ip_proto::TCP | ip_proto::UDP => {
                (read_u16(inner, qihl + udp::SRC_PORT), read_u16(inner, qihl + udp::DST_PORT))
            }
            ip_proto::ICMP if icmp::is_echo(inner[qihl + icmp::TYPE]) => {
                (read_u16(inner, qihl + icmp::IDENTIFIER), 0)
            }
            _ => return Err(DropReason::UnsupportedIcmp),
        };
        Ok(Quote { q, qihl, proto, src: ipv4::src(qh), dst: ipv4::dst(qh), sport, dport })
    }

    /// Rewrites the quoted header's address (`addr_off`: `ipv4::SRC` or `ipv4::DST`) and port/identifier, keeping the
    /// quoted IP checksum, the quoted L4 checksum (when it is inside the quote) and the ICMP checksum valid.
    pub(super) fn rewrite_quote(
        packet: &mut [u8],
        icmp: usize,
        qt: &Quote,
        addr_off: usize,
        addr: u32,
        port_off: usize,
        port: u16,
    ) {
        let Quote { q, qihl, proto, .. } = *qt;
        let old_addr = read_u32(packet, q + addr_off);
        let old_port = read_u16(packet, q + qihl + port_off);
        // Quoted IP header: the address and its checksum.
        icmp_wr16(packet, icmp, q + addr_off, (addr >> 16) as u16);
        icmp_wr16(packet, icmp, q + addr_off + 2, addr as u16);
        let c = read_u16(packet, q + ipv4::CHECKSUM);
        icmp_wr16(packet, icmp, q + ipv4::CHECKSUM, checksum::update32(c, old_addr, addr));
        // Quoted L4 checksum, when quoted: pseudo-header address (TCP/UDP) and the port.
        let (ck_off, pseudo) = l4_layout(proto);
        let ck = q + qihl + ck_off;
        if ck + 2 <= packet.len() {
            let mut c = read_u16(packet, ck);
            if proto == ip_proto::UDP {
                c = checksum::update16_udp(checksum::update32_udp(c, old_addr, addr), old_port, port);
            } else {
                if pseudo {
                    c = checksum::update32(c, old_addr, addr);
                }
                c = checksum::update16(c, old_port, port);
            }
            icmp_wr16(packet, icmp, ck, c);
        }
        icmp_wr16(packet, icmp, q + qihl + port_off, port);
    }

    /// An ICMP error from outside about a packet we translated: the quote's source is our egress endpoint.
    pub(super) fn inbound_icmp_error(
        &mut self,
        packet: &mut [u8],
        l4: &Transport,
        ip_idx: u8,
    ) -> Result<Inbound, DropReason> {
        let qt = Self::quoted(packet, l4.ihl)?;
        let Quote { proto, src: qsrc, dst: qdst, sport: qsport, dport: qdport, .. } = qt;
        if qsrc != l4.dst {
            return Err(DropReason::IcmpErrorNoMapping);
        }
        if let Some(owner) = self.other_owner(qsport) {
            return Ok(Inbound::OtherWorker(owner));
        }
        let (Some(sid), _, _) = self.find_in(ip_idx, qsport, qdst, qdport, proto) else {
            return Err(DropReason::IcmpErrorNoMapping);
        };
        // RFC 5508 REQ-6 / 5382 REQ-10: the flow is neither ended nor refreshed.
        let s = self.sessions[sid as usize];
        let port_off = if proto == ip_proto::ICMP { icmp::IDENTIFIER } else { udp::SRC_PORT };
        Self::rewrite_quote(packet, l4.ihl, &qt, ipv4::SRC, s.in_addr, port_off, s.in_port);
        set_address(packet, ipv4::DST, s.in_addr);
        Ok(Inbound::Forward)
    }

    /// An ICMP error from inside about a packet we translated inbound (e.g. port unreachable from a client): the
    /// quote's destination is the inside endpoint. Translated like the flow's packets; never refreshes.
    ///
    /// It is the one kind of packet from inside that the policy does not judge (it belongs to a flow the policy
    /// allowed), so it must not carry anything else out: its outer source must be the quoted packet's inside
    /// endpoint and its outer destination that packet's sender (the flow's peer), the source must be in a group,
    /// the flow must be live, and the quote is cut to the quoted IP header and 8 bytes (RFC 792): nothing of an
    /// arbitrary tail leaves. The packet is shortened in place (its total length says by how much).
    pub(super) fn outbound_icmp_error(
        &mut self,
        packet: &mut [u8],
        l4: &Transport,
        policy: &PolicySnapshot,
    ) -> Result<Outbound, DropReason> {
        let qt = Self::quoted(packet, l4.ihl)?;
        let Quote { proto, src: qsrc, dst: qdst, sport: qsport, dport: qdport, .. } = qt;
        // For a quoted echo the identifier is the inside one and sits where the source port would.
        let (in_port, remote_port) = if proto == ip_proto::ICMP { (qsport, 0) } else { (qdport, qsport) };
        if let Some(owner) = self.other_owner(in_port) {
            return Ok(Outbound::OtherWorker(owner));
        }
        if l4.src != qdst || l4.dst != qsrc {
            return Err(DropReason::IcmpErrorMismatch);
        }
        if policy.group_of(std::net::IpAddr::V4(Ipv4Addr::from(l4.src))).is_none() {
            return Err(DropReason::NoGroup);
        }
        let Some(sid) = self.find_out(qdst, in_port, qsrc, remote_port, proto) else {
            return Err(DropReason::IcmpErrorNoMapping);
        };
        Self::cut_quote(packet, l4.ihl, &qt);
        let s = self.sessions[sid as usize];
        let egress = self.egress[usize::from(s.ip_idx)];
        let port_off = if proto == ip_proto::ICMP { icmp::IDENTIFIER } else { udp::DST_PORT };
        Self::rewrite_quote(packet, l4.ihl, &qt, ipv4::DST, egress, port_off, s.ext_port);
        set_address(packet, ipv4::SRC, egress);
        Ok(Outbound::Forward)
    }

    /// Shortens an ICMP error to its header and the quoted IP header + 8 bytes (RFC 792): rewrites the outer total
    /// length (and the header checksum) and recomputes the ICMP checksum over what is left.
    pub(super) fn cut_quote(packet: &mut [u8], ihl: usize, qt: &Quote) {
        let keep = qt.q + qt.qihl + QUOTED_L4_LEN;
        if packet.len() <= keep {
            return;
        }
        let old_len = read_u16(packet, ipv4::TOTAL_LEN);
        write_u16(packet, ipv4::TOTAL_LEN, keep as u16);
        write_u16(
            packet,
            ipv4::CHECKSUM,
            checksum::update16(read_u16(packet, ipv4::CHECKSUM), old_len, keep as u16),
        );
        write_u16(packet, ihl + icmp::CHECKSUM, 0);
        let sum = checksum::compute(&packet[ihl..keep]);
        write_u16(packet, ihl + icmp::CHECKSUM, sum);
    }
}

/// Bytes of the quoted packet's transport header an ICMP error carries at least, and all that egressd lets an
/// inside error carry out (RFC 792).
const QUOTED_L4_LEN: usize = 8;

/// Sets the outer header's address at `at` (`ipv4::SRC` or `ipv4::DST`), keeping the header checksum valid.
fn set_address(packet: &mut [u8], at: usize, address: u32) {
    let old = read_u32(packet, at);
    write_u32(packet, at, address);
    write_u16(packet, ipv4::CHECKSUM, checksum::update32(read_u16(packet, ipv4::CHECKSUM), old, address));
}
