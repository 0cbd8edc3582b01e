//! Views over frame bytes and the arithmetic to rewrite them in place.
//!
//! Contract (as smoltcp's `wire`): nothing here panics on any input. Parsing (with etherparse) returns offsets
//! and an error naming the layer; rewriting goes through small accessors on `&mut [u8]` that are only called on
//! ranges the parser has checked, and keep checksums valid with incremental updates (RFC 1624).

pub mod checksum;
