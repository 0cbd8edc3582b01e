//! UDP (RFC 768): header offsets.

/// Bytes of the header.
pub const HEADER_LEN: usize = 8;
pub const SRC_PORT: usize = 0;
pub const DST_PORT: usize = 2;
pub const LENGTH: usize = 4;
/// Offset of the checksum; 0 there means "no checksum" (IPv4 only).
pub const CHECKSUM: usize = 6;
