//! IPv4 (RFC 791): the fixed header's fields, the validation every forwarded frame passes, and its options.
//!
//! [`parse_frame`] runs once per frame and says where the layers are ([`Frame`]); later steps read the fixed
//! header through [`fixed`] as a `[u8; 20]`, so its fields need no bounds checks.

use super::ethernet;
use super::{checksum, AddressFamily};
use crate::drop::DropReason;

/// Bytes of the header without options (IHL 5).
pub const MIN_HEADER_LEN: usize = 20;
/// Offset of version (high nibble) and IHL (low nibble, in 32-bit words).
pub const VERSION_IHL: usize = 0;
/// Offset of the total length.
pub const TOTAL_LEN: usize = 2;
/// Offset of the identification.
pub const IDENTIFICATION: usize = 4;
/// Offset of the flags (3 bits) and fragment offset (13 bits).
pub const FLAGS_FRAGMENT: usize = 6;
/// Offset of the time to live.
pub const TTL: usize = 8;
/// Offset of the protocol.
pub const PROTOCOL: usize = 9;
/// Offset of the header checksum.
pub const CHECKSUM: usize = 10;
/// Offset of the source address.
pub const SRC: usize = 12;
/// Offset of the destination address.
pub const DST: usize = 16;

/// Don't-fragment flag in the flags/fragment-offset word.
pub const DONT_FRAGMENT: u16 = 0x4000;
/// More-fragments flag in the flags/fragment-offset word.
pub const MORE_FRAGMENTS: u16 = 0x2000;
/// Fragment offset (in 8-byte units) in the flags/fragment-offset word.
pub const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;

/// The fixed part of a header.
pub type Fixed = [u8; MIN_HEADER_LEN];

/// The fixed header at the start of `packet`, or `None` if it is shorter.
#[inline(always)]
pub fn fixed(packet: &[u8]) -> Option<&Fixed> {
    packet.first_chunk::<MIN_HEADER_LEN>()
}

/// [`fixed`], writable.
#[inline(always)]
pub fn fixed_mut(packet: &mut [u8]) -> Option<&mut Fixed> {
    packet.first_chunk_mut::<MIN_HEADER_LEN>()
}

/// Version nibble.
#[inline(always)]
pub fn version(h: &Fixed) -> u8 {
    h[VERSION_IHL] >> 4
}

/// Header length in bytes (IHL × 4), as the header says; not checked against anything.
#[inline(always)]
pub fn header_len(h: &Fixed) -> usize {
    usize::from(h[VERSION_IHL] & 0x0f) * 4
}

/// Total length, as the header says.
#[inline(always)]
pub fn total_len(h: &Fixed) -> usize {
    usize::from(u16::from_be_bytes([h[TOTAL_LEN], h[TOTAL_LEN + 1]]))
}

#[inline(always)]
pub fn identification(h: &Fixed) -> u16 {
    u16::from_be_bytes([h[IDENTIFICATION], h[IDENTIFICATION + 1]])
}

/// The flags/fragment-offset word.
#[inline(always)]
pub fn flags_fragment(h: &Fixed) -> u16 {
    u16::from_be_bytes([h[FLAGS_FRAGMENT], h[FLAGS_FRAGMENT + 1]])
}

#[inline(always)]
pub fn protocol(h: &Fixed) -> u8 {
    h[PROTOCOL]
}

/// Source address as a host-order integer.
#[inline(always)]
pub fn src(h: &Fixed) -> u32 {
    u32::from_be_bytes([h[SRC], h[SRC + 1], h[SRC + 2], h[SRC + 3]])
}

/// Destination address as a host-order integer.
#[inline(always)]
pub fn dst(h: &Fixed) -> u32 {
    u32::from_be_bytes([h[DST], h[DST + 1], h[DST + 2], h[DST + 3]])
}

/// Where the layers of a validated IPv4 frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Offset of the IPv4 header in the frame.
    pub ip_start: usize,
    /// Offset just past the IPv4 total length (any Ethernet padding starts here).
    pub ip_end: usize,
    /// IPv4 header length in bytes (IHL × 4); the transport header starts at `ip_start + header_len`.
    pub header_len: usize,
    /// The header's more-fragments flag and fragment offset (0: not a fragment).
    pub fragment: u16,
}

impl Frame {
    /// A fragment other than the first: it carries no transport header.
    #[inline]
    pub fn is_later_fragment(&self) -> bool {
        self.fragment & FRAGMENT_OFFSET_MASK != 0
    }

    /// The first fragment of a fragmented datagram: it carries the transport header.
    #[inline]
    pub fn is_first_fragment(&self) -> bool {
        self.fragment == MORE_FRAGMENTS
    }
}

/// Ethernet (untagged) and IPv4 validation: version, IHL ≥ 5 and within the frame, total length within the frame
/// (padding past it is allowed), header checksum, options well formed and no source route. Does not look at the
/// TTL. Always inlined: it runs once per packet, and as a call it cost 30 instructions more per packet.
#[inline(always)]
pub fn parse_frame(frame: &[u8]) -> Result<Frame, DropReason> {
    match ethernet::network_layer(frame)? {
        AddressFamily::Ipv4 => {}
        AddressFamily::Ipv6 => return Err(DropReason::Ipv6Unsupported),
    }
    let ip_start = ethernet::HEADER_LEN;
    let ip = frame.get(ip_start..).unwrap_or(&[]);
    let Some(h) = fixed(ip) else { return Err(DropReason::Truncated) };
    if version(h) != 4 {
        return Err(DropReason::IpVersionMismatch);
    }
    let header_len = header_len(h);
    if header_len < MIN_HEADER_LEN || header_len > ip.len() {
        return Err(DropReason::BadIpHeader);
    }
    let total_len = total_len(h);
    if total_len < header_len || total_len > ip.len() {
        return Err(DropReason::BadIpLength);
    }
    if !checksum::verify(&ip[..header_len]) {
        return Err(DropReason::BadIpChecksum);
    }
    if header_len > MIN_HEADER_LEN {
        check_options(&ip[MIN_HEADER_LEN..header_len])?;
    }
    let fragment = flags_fragment(h) & (MORE_FRAGMENTS | FRAGMENT_OFFSET_MASK);
    Ok(Frame { ip_start, ip_end: ip_start + total_len, header_len, fragment })
}

/// Option kinds (RFC 791, IANA "IP Option Numbers").
pub mod option {
    pub const END_OF_LIST: u8 = 0;
    pub const NO_OPERATION: u8 = 1;
    pub const LOOSE_SOURCE_ROUTE: u8 = 0x83;
    pub const STRICT_SOURCE_ROUTE: u8 = 0x89;
}

/// IPv4 options (rare, so walked only when present): well formed, and no loose or strict source route (RFC 7126
/// 4.3/4.4: a router must not forward source-routed packets; they steer traffic past filters).
#[cold]
pub fn check_options(mut options: &[u8]) -> Result<(), DropReason> {
    while let Some(&kind) = options.first() {
        match kind {
            option::END_OF_LIST => break,
            option::NO_OPERATION => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1).ok_or(DropReason::BadIpHeader)?);
                if len < 2 || len > options.len() {
                    return Err(DropReason::BadIpHeader);
                }
                if kind == option::LOOSE_SOURCE_ROUTE || kind == option::STRICT_SOURCE_ROUTE {
                    return Err(DropReason::SourceRoute);
                }
                options = &options[len..];
            }
        }
    }
    Ok(())
}
