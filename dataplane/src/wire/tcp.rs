//! TCP (RFC 9293): header offsets, flags, the options walk, and the one option rewrite the gateway makes (MSS
//! clamping).

use super::checksum;
use super::{read_u16, read_u32};

/// Bytes of the header without options.
pub const MIN_HEADER_LEN: usize = 20;
pub const SRC_PORT: usize = 0;
pub const DST_PORT: usize = 2;
pub const SEQ: usize = 4;
pub const ACK_NUMBER: usize = 8;
/// Offset of the data offset (high nibble, in 32-bit words).
pub const DATA_OFFSET: usize = 12;
pub const FLAGS: usize = 13;
pub const WINDOW: usize = 14;
pub const CHECKSUM: usize = 16;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

/// Option kinds (IANA "TCP Option Kind Numbers").
pub mod option {
    pub const END_OF_LIST: u8 = 0;
    pub const NO_OPERATION: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
}

/// A window scale of 15 or more is invalid (RFC 7323 caps it at 14): this value says "no option".
pub const NO_WINDOW_SCALE: u8 = 0x0f;

/// A segment's fields the connection tracker needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Bytes of payload after the header.
    pub payload: u32,
    /// Window scale option carried by a SYN (capped at 14), or [`NO_WINDOW_SCALE`].
    pub wscale: u8,
}

impl Segment {
    /// What a packet that is not TCP carries.
    pub const NONE: Segment =
        Segment { seq: 0, ack: 0, flags: 0, window: 0, payload: 0, wscale: NO_WINDOW_SCALE };

    /// Reads the segment whose header (`data_offset` bytes, already checked to be within `tcp`) starts `tcp`.
    #[inline(always)]
    pub fn read(tcp: &[u8], data_offset: usize) -> Segment {
        let flags = tcp.get(FLAGS).copied().unwrap_or(0);
        let wscale = if flags & SYN != 0 {
            window_scale(tcp.get(MIN_HEADER_LEN..data_offset).unwrap_or(&[]))
        } else {
            NO_WINDOW_SCALE
        };
        Segment {
            seq: read_u32(tcp, SEQ),
            ack: read_u32(tcp, ACK_NUMBER),
            flags,
            window: read_u16(tcp, WINDOW),
            payload: tcp.len().saturating_sub(data_offset) as u32,
            wscale,
        }
    }
}

/// The header length the data offset field gives, if the header is at least 20 bytes and fits in `tcp`.
#[inline(always)]
pub fn data_offset(tcp: &[u8]) -> Option<usize> {
    let offset = usize::from(*tcp.get(DATA_OFFSET)? >> 4) * 4;
    (offset >= MIN_HEADER_LEN && offset <= tcp.len()).then_some(offset)
}

/// Finds the first option of `kind` in `options` (the bytes after the fixed header) and returns the offset of its
/// kind byte and its length. Stops at the end-of-list option or at the first malformed length.
fn find_option(options: &[u8], kind: u8) -> Option<(usize, usize)> {
    let mut at = 0;
    while let Some(&this) = options.get(at) {
        match this {
            option::END_OF_LIST => return None,
            option::NO_OPERATION => at += 1,
            _ => {
                let len = usize::from(*options.get(at + 1)?);
                if len < 2 || at + len > options.len() {
                    return None;
                }
                if this == kind {
                    return Some((at, len));
                }
                at += len;
            }
        }
    }
    None
}

/// The window scale option (RFC 7323) in `options`, capped at 14, or [`NO_WINDOW_SCALE`].
pub fn window_scale(options: &[u8]) -> u8 {
    match find_option(options, option::WINDOW_SCALE) {
        Some((at, 3)) => options[at + 2].min(14),
        _ => NO_WINDOW_SCALE,
    }
}

/// Lowers the MSS option of a SYN whose TCP header starts `tcp` to `max_mss`, keeping the TCP checksum valid
/// (RFC 1624). Anything else, and a malformed header, is left alone.
pub fn clamp_syn_mss(tcp: &mut [u8], max_mss: u16) {
    if tcp.get(FLAGS).is_none_or(|flags| flags & SYN == 0) {
        return;
    }
    let Some(header_len) = data_offset(tcp) else { return };
    let Some((at, 4)) = find_option(&tcp[MIN_HEADER_LEN..header_len], option::MSS) else { return };
    let mss_at = MIN_HEADER_LEN + at + 2;
    let mss = read_u16(tcp, mss_at);
    if mss > max_mss {
        super::write_u16(tcp, mss_at, max_mss);
        let check = read_u16(tcp, CHECKSUM);
        super::write_u16(tcp, CHECKSUM, checksum::update16(check, mss, max_mss));
    }
}
