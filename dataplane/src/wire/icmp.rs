//! ICMP for IPv4 (RFC 792): header offsets, the message types the gateway tells apart, and which are errors.

/// Bytes of the header (type, code, checksum, and the 4-byte rest-of-header).
pub const HEADER_LEN: usize = 8;
pub const TYPE: usize = 0;
pub const CODE: usize = 1;
pub const CHECKSUM: usize = 2;
/// Offset of an echo's identifier (the "port" NAT translates).
pub const IDENTIFIER: usize = 4;
/// Offset of the next-hop MTU in a "fragmentation needed" error (RFC 1191).
pub const NEXT_HOP_MTU: usize = 6;

pub const ECHO_REPLY: u8 = 0;
pub const DEST_UNREACHABLE: u8 = 3;
pub const ECHO_REQUEST: u8 = 8;
pub const TIME_EXCEEDED: u8 = 11;
pub const PARAMETER_PROBLEM: u8 = 12;

/// Destination unreachable codes the gateway sends.
pub mod code {
    /// Fragmentation needed and DF set (RFC 792, RFC 1191).
    pub const FRAGMENTATION_NEEDED: u8 = 4;
    /// Communication administratively prohibited (RFC 1812 5.2.7.1).
    pub const ADMIN_PROHIBITED: u8 = 13;
}

/// Whether a message of this type is a query (echo, timestamp, information, address mask). Everything else,
/// errors and types we do not know, gets no error in return (RFC 1122 3.2.2).
#[inline]
pub fn is_query(icmp_type: u8) -> bool {
    matches!(icmp_type, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18)
}

/// Whether a message of this type is an error the NAT translates (it quotes the packet it is about, RFC 5508).
#[inline]
pub fn is_translated_error(icmp_type: u8) -> bool {
    matches!(icmp_type, DEST_UNREACHABLE | TIME_EXCEEDED | PARAMETER_PROBLEM)
}

/// Whether a message of this type is an echo request or reply (the query kind the NAT maps by identifier).
#[inline]
pub fn is_echo(icmp_type: u8) -> bool {
    icmp_type == ECHO_REQUEST || icmp_type == ECHO_REPLY
}
