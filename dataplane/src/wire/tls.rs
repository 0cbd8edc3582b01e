//! TLS ClientHello (RFC 8446 4.1.2, RFC 5246 7.4.1.2) as the L7 path reads it before it lets a connection through:
//! the server name (RFC 6066 3), the ALPN protocols (RFC 7301), the newest version offered (RFC 8446 4.2.1) and
//! whether Encrypted Client Hello is offered. egressd never decrypts: it judges the hello and replays it upstream.
//!
//! [`parse_client_hello`] is called on everything the client has sent so far, as often as bytes arrive:
//! [`HelloError::Incomplete`] until the whole handshake message is there, then a verdict. A hello usually sits in
//! one record and is read in place; post-quantum key shares make 1.5–2 KiB hellos routine, and clients may split
//! the message over several records (even a byte per record), so the record payloads are then gathered into a
//! caller-owned scratch buffer (allocated once per connection) and read there. Nothing allocates.
//!
//! What is refused, and why it matters at an egress gateway:
//! - anything that is not a TLS handshake, or not a ClientHello, or malformed at any layer (a name the gateway
//!   read differently from the server would be a bypass);
//! - no server name, two host names, an IP literal (RFC 6066 forbids it), a name that is not a DNS name: the
//!   policy is by name, so a hello without exactly one is refused;
//! - duplicate extensions (RFC 8446 4.2: at most one of each), trailing bytes, records over 2^14 bytes, zero-length
//!   handshake fragments (RFC 8446 5.1), and hellos larger than the scratch buffer.

/// Record content type of handshake messages.
pub const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
pub const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Bytes of a record header: type, legacy version, length.
pub const RECORD_HEADER_LEN: usize = 5;
/// Bytes of a handshake message header: type and 24-bit length.
pub const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest record payload a peer may send (RFC 8446 5.1: 2^14).
pub const MAX_RECORD_LEN: usize = 1 << 14;

/// Extension types read here (IANA "TLS ExtensionType Values").
pub mod extension {
    pub const SERVER_NAME: u16 = 0;
    pub const ALPN: u16 = 16;
    pub const SUPPORTED_VERSIONS: u16 = 43;
    pub const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
}

/// Protocol versions as they appear on the wire.
pub mod version {
    pub const TLS1_0: u16 = 0x0301;
    pub const TLS1_1: u16 = 0x0302;
    pub const TLS1_2: u16 = 0x0303;
    pub const TLS1_3: u16 = 0x0304;
}

/// Why a ClientHello was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloError {
    /// The message is not complete yet: wait for more bytes (the caller enforces its deadline and byte cap).
    Incomplete,
    /// The first record is not a handshake record: not TLS.
    NotHandshake,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// A length or field is inconsistent; the string names which.
    Malformed(&'static str),
    /// The hello does not fit the scratch buffer (or a record exceeds 2^14 bytes).
    TooLarge,
    /// No server_name extension, or no host name in it.
    NoServerName,
    /// Two host names in the server_name extension.
    MultipleServerNames,
    /// The host name is an IPv4 or IPv6 literal (RFC 6066 3).
    IpLiteralServerName,
    /// The host name is not a DNS name (empty label, bad character, too long).
    InvalidServerName,
}

impl HelloError {
    /// Stable snake_case name, for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HelloError::Incomplete => "incomplete",
            HelloError::NotHandshake => "not_tls",
            HelloError::NotClientHello => "not_client_hello",
            HelloError::Malformed(_) => "malformed_client_hello",
            HelloError::TooLarge => "client_hello_too_large",
            HelloError::NoServerName => "no_sni",
            HelloError::MultipleServerNames => "multiple_sni",
            HelloError::IpLiteralServerName => "ip_literal_sni",
            HelloError::InvalidServerName => "invalid_sni",
        }
    }
}

/// What the L7 path reads of a ClientHello. Borrows the bytes it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The one host name, as sent (ASCII; compare case-insensitively).
    pub server_name: &'a str,
    /// The ALPN extension's protocol name list (see [`ClientHello::alpn`]); empty when absent.
    alpn: &'a [u8],
    /// The newest version offered: the highest of supported_versions (GREASE values skipped), else the legacy
    /// version field.
    pub max_version: u16,
    /// An encrypted_client_hello extension is present: the name above is then the public (outer) name.
    pub ech_offered: bool,
    /// Bytes of the records that carried the hello (what the caller replays upstream, and where anything the
    /// client sent after it starts).
    pub records_len: usize,
}

impl<'a> ClientHello<'a> {
    /// The ALPN protocol names offered, in the client's order.
    pub fn alpn(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.alpn;
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (name, tail) = tail.split_at_checked(usize::from(len))?;
            rest = tail;
            Some(name)
        })
    }
}

/// Reads the ClientHello at the start of `input` (everything the client has sent so far). A hello split over
/// several records is gathered into `scratch` and read there, so `scratch` bounds the hello's size (16 KiB is
/// plenty; [`HelloError::TooLarge`] beyond it).
pub fn parse_client_hello<'a>(input: &'a [u8], scratch: &'a mut [u8]) -> Result<ClientHello<'a>, HelloError> {
    let first = record(input, 0)?;
    let payload = first.payload;
    let (&msg_type, after_type) =
        payload.split_first().ok_or(HelloError::Malformed("empty handshake record"))?;
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::NotClientHello);
    }
    // The handshake length may itself be split over records: read it once enough payload is gathered.
    if after_type.len() >= 3 {
        let body_len =
            usize::from(after_type[0]) << 16 | usize::from(after_type[1]) << 8 | usize::from(after_type[2]);
        let message_len = HANDSHAKE_HEADER_LEN + body_len;
        if message_len <= payload.len() {
            if message_len < payload.len() {
                // Anything after the hello in its record must wait for the server's reply: a client never sends it.
                return Err(HelloError::Malformed("data after the ClientHello in its record"));
            }
            let hello = client_hello_body(&payload[HANDSHAKE_HEADER_LEN..])?;
            return Ok(ClientHello { records_len: first.end, ..hello });
        }
        if message_len > scratch.len() {
            return Err(HelloError::TooLarge);
        }
    }
    gather(input, first, scratch)
}

/// One record at `at` of `input`.
#[derive(Clone, Copy)]
struct Record<'a> {
    payload: &'a [u8],
    /// Offset just past the record.
    end: usize,
}

fn record(input: &[u8], at: usize) -> Result<Record<'_>, HelloError> {
    let Some(header) = input.get(at..).and_then(|r| r.first_chunk::<RECORD_HEADER_LEN>()) else {
        // Enough of a first header to tell TLS from anything else: say so at once, not at the deadline.
        if let Some(&content) = input.get(at) {
            if content != CONTENT_HANDSHAKE {
                return Err(if at == 0 {
                    HelloError::NotHandshake
                } else {
                    HelloError::Malformed("record type")
                });
            }
        }
        if let Some(&major) = input.get(at + 1) {
            if major != 3 {
                return Err(if at == 0 {
                    HelloError::NotHandshake
                } else {
                    HelloError::Malformed("record version")
                });
            }
        }
        return Err(HelloError::Incomplete);
    };
    if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
        return Err(if at == 0 { HelloError::NotHandshake } else { HelloError::Malformed("record type") });
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_RECORD_LEN {
        return Err(HelloError::TooLarge);
    }
    if len == 0 {
        return Err(HelloError::Malformed("zero-length handshake record"));
    }
    let start = at + RECORD_HEADER_LEN;
    let payload = input.get(start..start + len).ok_or(HelloError::Incomplete)?;
    Ok(Record { payload, end: start + len })
}

/// Copies the payloads of the records starting with `first` into `scratch` until the handshake message is whole,
/// then reads it there.
#[cold]
fn gather<'a>(
    input: &'a [u8],
    first: Record<'a>,
    scratch: &'a mut [u8],
) -> Result<ClientHello<'a>, HelloError> {
    let mut filled = 0;
    let mut next = Some(first);
    let mut at = 0;
    loop {
        let rec = match next.take() {
            Some(rec) => rec,
            None => record(input, at)?,
        };
        let room = scratch.get_mut(filled..filled + rec.payload.len()).ok_or(HelloError::TooLarge)?;
        room.copy_from_slice(rec.payload);
        filled += rec.payload.len();
        at = rec.end;
        if filled >= HANDSHAKE_HEADER_LEN {
            let body_len =
                usize::from(scratch[1]) << 16 | usize::from(scratch[2]) << 8 | usize::from(scratch[3]);
            let message_len = HANDSHAKE_HEADER_LEN + body_len;
            if message_len > scratch.len() {
                return Err(HelloError::TooLarge);
            }
            if filled > message_len {
                return Err(HelloError::Malformed("data after the ClientHello in its record"));
            }
            if filled == message_len {
                let hello = client_hello_body(&scratch[HANDSHAKE_HEADER_LEN..message_len])?;
                return Ok(ClientHello { records_len: at, ..hello });
            }
        }
    }
}

/// A cursor over a length-prefixed structure; every read checks its bounds.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(HelloError::Malformed(what))?;
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

/// GREASE values (RFC 8701) are 0x?a?a with both bytes equal; they mean nothing and are skipped.
fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && value >> 8 == value & 0xff
}

/// Reads a ClientHello body (after the 4-byte handshake header).
fn client_hello_body(body: &[u8]) -> Result<ClientHello<'_>, HelloError> {
    let mut r = Reader { rest: body };
    let legacy_version = r.u16("legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.vec8("session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("session_id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    if r.vec8("compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("compression_methods"));
    }
    if r.rest.is_empty() {
        // A hello without extensions (allowed before TLS 1.3) has no server name.
        return Err(HelloError::NoServerName);
    }
    let mut extensions = Reader { rest: r.vec16("extensions")? };
    if !r.rest.is_empty() {
        return Err(HelloError::Malformed("data after the extensions"));
    }
    let mut server_name = None;
    let mut alpn: &[u8] = &[];
    let mut max_version = legacy_version;
    let mut ech_offered = false;
    // Extension types seen (one bit each, 8 KiB): duplicates are found in linear time whatever the hello holds.
    let mut seen = [0u64; 1024];
    while !extensions.rest.is_empty() {
        let ty = usize::from(extensions.u16("extension type")?);
        let data = extensions.vec16("extension data")?;
        let (word, bit) = (ty / 64, 1u64 << (ty % 64));
        if seen[word] & bit != 0 {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        seen[word] |= bit;
        let ty = ty as u16;
        match ty {
            extension::SERVER_NAME => server_name = Some(host_name(data)?),
            extension::ALPN => {
                let mut list = Reader { rest: data };
                let names = list.vec16("alpn list")?;
                if !list.rest.is_empty() || names.is_empty() {
                    return Err(HelloError::Malformed("alpn list"));
                }
                let mut each = Reader { rest: names };
                while !each.rest.is_empty() {
                    if each.vec8("alpn protocol")?.is_empty() {
                        return Err(HelloError::Malformed("empty alpn protocol"));
                    }
                }
                alpn = names;
            }
            extension::SUPPORTED_VERSIONS => {
                let mut list = Reader { rest: data };
                let versions = list.vec8("supported_versions")?;
                if !list.rest.is_empty() || versions.is_empty() || versions.len() % 2 != 0 {
                    return Err(HelloError::Malformed("supported_versions"));
                }
                max_version = versions
                    .chunks_exact(2)
                    .map(|v| u16::from_be_bytes([v[0], v[1]]))
                    .filter(|&v| !is_grease(v))
                    .max()
                    .unwrap_or(legacy_version);
            }
            extension::ENCRYPTED_CLIENT_HELLO => ech_offered = true,
            _ => {}
        }
    }
    let server_name = server_name.ok_or(HelloError::NoServerName)?;
    Ok(ClientHello { server_name, alpn, max_version, ech_offered, records_len: 0 })
}

/// The one host name of a server_name extension (RFC 6066 3).
fn host_name(data: &[u8]) -> Result<&str, HelloError> {
    const HOST_NAME: u8 = 0;
    let mut ext = Reader { rest: data };
    let mut list = Reader { rest: ext.vec16("server_name list")? };
    if !ext.rest.is_empty() || list.rest.is_empty() {
        return Err(HelloError::Malformed("server_name list"));
    }
    let mut found = None;
    while !list.rest.is_empty() {
        let name_type = list.u8("server_name type")?;
        let name = list.vec16("server_name")?;
        if name_type != HOST_NAME {
            continue;
        }
        if found.is_some() {
            return Err(HelloError::MultipleServerNames);
        }
        found = Some(name);
    }
    let name = found.ok_or(HelloError::NoServerName)?;
    let name = std::str::from_utf8(name).map_err(|_| HelloError::InvalidServerName)?;
    check_dns_name(name)?;
    Ok(name)
}

/// A DNS host name: 1–253 ASCII characters, labels of 1–63 letters, digits, hyphens and underscores (seen in
/// real names), not starting or ending with a hyphen; no trailing dot (RFC 6066 3). An IPv4 or IPv6 literal is
/// refused as such.
pub fn check_dns_name(name: &str) -> Result<(), HelloError> {
    if name.parse::<std::net::IpAddr>().is_ok() || name.contains(':') {
        return Err(HelloError::IpLiteralServerName);
    }
    if name.is_empty() || name.len() > 253 {
        return Err(HelloError::InvalidServerName);
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !valid {
            return Err(HelloError::InvalidServerName);
        }
    }
    // All-numeric last label: an IPv4 literal in some other notation (e.g. "1.2.3").
    if name.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(HelloError::IpLiteralServerName);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    /// The first flight of a rustls client for `name` offering `alpn`: one record holding the ClientHello.
    fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        // ring's provider (deprecated only for lacking post-quantum key exchange, which these tests do not need:
        // `a_post_quantum_sized_hello_is_read_whole` covers hellos of that size).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("a server name");
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
        let mut out = Vec::new();
        client.write_tls(&mut out).expect("the first flight");
        out
    }

    /// What rustls's server side reads of `bytes`: the server name and ALPN list, or `None` if it refuses them.
    fn rustls_reads(bytes: &[u8]) -> Option<(Option<String>, Vec<Vec<u8>>)> {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rest = bytes;
        while !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        let accepted = acceptor.accept().ok()??;
        let hello = accepted.client_hello();
        let alpn = hello.alpn().map(|names| names.map(<[u8]>::to_vec).collect()).unwrap_or_default();
        Some((hello.server_name().map(str::to_owned), alpn))
    }

    /// The handshake message of a one-record flight, cut into records of at most `size` bytes.
    fn refragment(flight: &[u8], size: usize) -> Vec<u8> {
        let message = &flight[RECORD_HEADER_LEN..];
        let mut out = Vec::new();
        for chunk in message.chunks(size.max(1)) {
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn ours(bytes: &[u8]) -> Result<(String, Vec<Vec<u8>>, usize), HelloError> {
        let mut scratch = vec![0u8; 16 * 1024];
        let hello = parse_client_hello(bytes, &mut scratch)?;
        Ok((hello.server_name.to_string(), hello.alpn().map(<[u8]>::to_vec).collect(), hello.records_len))
    }

    #[test]
    fn reads_a_rustls_hello_in_one_record_as_rustls_does() {
        let flight = rustls_hello("api.stripe.com", &[b"h2", b"http/1.1"]);
        let (name, alpn, len) = ours(&flight).expect("accepted");
        assert_eq!((name.as_str(), len), ("api.stripe.com", flight.len()));
        assert_eq!(alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(rustls_reads(&flight), Some((Some(name), alpn)));
        let mut scratch = [0u8; 16384];
        let hello = parse_client_hello(&flight, &mut scratch).unwrap();
        assert_eq!(hello.max_version, version::TLS1_3);
        assert!(!hello.ech_offered);
    }

    #[test]
    fn a_hello_split_into_records_of_every_size_and_at_every_byte_is_read_the_same() {
        let flight = rustls_hello("a.b.x.test", &[b"http/1.1"]);
        let message_len = flight.len() - RECORD_HEADER_LEN;
        let expected = ours(&flight).unwrap();
        for size in [1, 2, 3, 4, 5, 7, 64, 100, message_len - 1, message_len] {
            let records = refragment(&flight, size);
            let (name, alpn, len) = ours(&records).unwrap_or_else(|e| panic!("records of {size}: {e:?}"));
            assert_eq!((&name, &alpn), (&expected.0, &expected.1), "records of {size}");
            assert_eq!(len, records.len());
            assert_eq!(rustls_reads(&records), Some((Some(name), alpn)), "rustls, records of {size}");
            // Every shorter prefix (the bytes so far, as TCP segments deliver them) is incomplete, never wrong.
            for cut in 0..records.len() {
                assert_eq!(
                    ours(&records[..cut]),
                    Err(HelloError::Incomplete),
                    "records of {size}, {cut} bytes"
                );
            }
        }
    }

    #[test]
    fn an_ip_literal_name_sends_no_sni_and_is_refused() {
        let flight = rustls_hello("192.0.2.7", &[]);
        assert_eq!(ours(&flight), Err(HelloError::NoServerName));
    }

    #[test]
    fn what_is_not_a_hello_is_refused_at_once() {
        assert_eq!(ours(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotHandshake));
        assert_eq!(ours(b"G"), Err(HelloError::NotHandshake));
        assert_eq!(ours(&[CONTENT_HANDSHAKE, 2]), Err(HelloError::NotHandshake), "SSLv2-ish version");
        assert_eq!(ours(&[23, 3, 3, 0, 1, 0]), Err(HelloError::NotHandshake), "application data");
        assert_eq!(ours(&[CONTENT_HANDSHAKE, 3, 1, 0, 4, 2, 0, 0, 0]), Err(HelloError::NotClientHello));
        assert_eq!(
            ours(&[CONTENT_HANDSHAKE, 3, 1, 0, 0]),
            Err(HelloError::Malformed("zero-length handshake record"))
        );
        assert_eq!(ours(&[CONTENT_HANDSHAKE, 3, 1, 0x40, 1]), Err(HelloError::TooLarge), "record over 2^14");
        assert_eq!(ours(&[]), Err(HelloError::Incomplete));
    }

    /// A hand-built ClientHello: legacy version 1.2, the given extensions (type, data) in order.
    fn hello_with(extensions: &[(u16, Vec<u8>)], trailing: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        for (ty, data) in extensions {
            ext.extend_from_slice(&ty.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        body.extend_from_slice(trailing);
        let mut message = vec![HANDSHAKE_CLIENT_HELLO, 0, (body.len() >> 8) as u8, body.len() as u8];
        message.extend_from_slice(&body);
        let mut record = vec![CONTENT_HANDSHAKE, 3, 1, (message.len() >> 8) as u8, message.len() as u8];
        record.extend_from_slice(&message);
        record
    }

    fn sni(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (ty, name) in names {
            list.push(*ty);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (extension::SERVER_NAME, data)
    }

    #[test]
    fn server_names_are_exactly_one_dns_name() {
        let name = |names: &[(u8, &[u8])]| ours(&hello_with(&[sni(names)], &[])).map(|h| h.0);
        assert_eq!(name(&[(0, b"Example.COM")]), Ok("Example.COM".to_string()));
        assert_eq!(name(&[(0, b"a.example"), (0, b"b.example")]), Err(HelloError::MultipleServerNames));
        assert_eq!(name(&[(0, b"203.0.113.9")]), Err(HelloError::IpLiteralServerName));
        assert_eq!(name(&[(0, b"[2001:db8::1]")]), Err(HelloError::IpLiteralServerName));
        assert_eq!(name(&[(0, b"1.2.3")]), Err(HelloError::IpLiteralServerName));
        for bad in [
            &b"a..example"[..],
            b"example.",
            b"-a.example",
            b"a b.example",
            b"a\0.example",
            &[b'a'; 64],
            b"\xc3\xa9.example",
        ] {
            assert_eq!(
                name(&[(0, bad)]),
                Err(HelloError::InvalidServerName),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            name(&[(9, b"ignored"), (0, b"api.x.test")]),
            Ok("api.x.test".to_string()),
            "unknown name type"
        );
        assert_eq!(name(&[(9, b"only-unknown")]), Err(HelloError::NoServerName));
        assert_eq!(ours(&hello_with(&[], &[])), Err(HelloError::NoServerName));
    }

    #[test]
    fn malformed_and_ambiguous_hellos_are_refused() {
        let good = sni(&[(0, b"api.x.test")]);
        assert!(ours(&hello_with(std::slice::from_ref(&good), &[])).is_ok());
        assert_eq!(
            ours(&hello_with(&[good.clone(), good.clone()], &[])),
            Err(HelloError::Malformed("duplicate extension"))
        );
        assert_eq!(
            ours(&hello_with(&[good.clone(), (99, vec![]), (99, vec![1])], &[])),
            Err(HelloError::Malformed("duplicate extension"))
        );
        assert_eq!(
            ours(&hello_with(std::slice::from_ref(&good), &[0])),
            Err(HelloError::Malformed("data after the extensions"))
        );
        assert_eq!(
            ours(&hello_with(&[(extension::ALPN, vec![0, 1, 0])], &[])),
            Err(HelloError::Malformed("empty alpn protocol"))
        );
        let mut two_messages = hello_with(std::slice::from_ref(&good), &[]);
        let extra = [1u8, 0, 0, 0];
        two_messages[4] += 4;
        two_messages.extend_from_slice(&extra);
        assert_eq!(
            ours(&two_messages),
            Err(HelloError::Malformed("data after the ClientHello in its record"))
        );
        // The handshake length claims more than the scratch buffer holds.
        let mut huge = hello_with(&[good], &[]);
        huge[6] = 0x7f;
        assert_eq!(ours(&huge), Err(HelloError::TooLarge));
    }

    #[test]
    fn versions_and_ech_are_read() {
        let good = sni(&[(0, b"api.x.test")]);
        let versions = (extension::SUPPORTED_VERSIONS, vec![6, 0x7a, 0x7a, 3, 4, 3, 3]);
        let mut scratch = [0u8; 1024];
        let bytes =
            hello_with(&[good.clone(), versions, (extension::ENCRYPTED_CLIENT_HELLO, vec![0; 8])], &[]);
        let hello = parse_client_hello(&bytes, &mut scratch).unwrap();
        assert_eq!((hello.max_version, hello.ech_offered), (version::TLS1_3, true), "GREASE 0x7a7a skipped");
        let mut scratch = [0u8; 1024];
        let bytes = hello_with(&[good], &[]);
        let hello = parse_client_hello(&bytes, &mut scratch).unwrap();
        assert_eq!((hello.max_version, hello.ech_offered), (version::TLS1_2, false), "legacy version");
    }

    #[test]
    fn a_post_quantum_sized_hello_is_read_whole_from_any_split() {
        // A 1.2 KiB key share (X25519MLKEM768's size) makes the hello span TCP segments, and often records.
        let key_share = (51u16, vec![0x11; 1216]);
        let hello = hello_with(&[sni(&[(0, b"pq.example.test")]), key_share], &[]);
        assert!(hello.len() > 1200);
        for size in [1, 100, 512, 1000, hello.len()] {
            let records = refragment(&hello, size);
            assert_eq!(ours(&records).map(|h| h.0), Ok("pq.example.test".to_string()), "records of {size}");
            for cut in (0..records.len()).step_by(97) {
                assert_eq!(ours(&records[..cut]), Err(HelloError::Incomplete));
            }
        }
        // A scratch buffer smaller than the gathered hello refuses it rather than reading part of it.
        let mut small = [0u8; 1024];
        assert_eq!(parse_client_hello(&refragment(&hello, 100), &mut small), Err(HelloError::TooLarge));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Arbitrary bytes, and arbitrary bytes after a valid record header: no panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), scratch_len in 0usize..700) {
            let mut scratch = vec![0u8; scratch_len];
            let _ = parse_client_hello(&bytes, &mut scratch);
            let mut framed = vec![CONTENT_HANDSHAKE, 3, 1, (bytes.len() >> 8) as u8, bytes.len() as u8];
            framed.extend_from_slice(&bytes);
            let _ = parse_client_hello(&framed, &mut scratch);
        }

        /// Records of any size 1..=16384 carry the same hello.
        #[test]
        fn any_record_size_reads_the_same(size in 1usize..=16384, label in "[a-z][a-z0-9-]{0,20}[a-z0-9]") {
            let name = format!("{label}.example.test");
            let flight = rustls_hello(&name, &[b"h2"]);
            let records = refragment(&flight, size);
            let (got, alpn, len) = ours(&records).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(&got, &name);
            prop_assert_eq!(alpn, vec![b"h2".to_vec()]);
            prop_assert_eq!(len, records.len());
        }

        /// Mutated rustls hellos: whenever both accept, both read the same name and protocols.
        #[test]
        fn mutated_hellos_agree_with_rustls(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), size in 1usize..400) {
            let flight = rustls_hello("mutant.example.test", &[b"h2", b"http/1.1"]);
            let mut records = refragment(&flight, size);
            for (at, byte) in edits {
                let at = at.index(records.len());
                records[at] = byte;
            }
            if let (Ok((name, alpn, _)), Some((theirs, their_alpn))) = (ours(&records), rustls_reads(&records)) {
                // rustls lowercases the name; egressd keeps it as sent and matches case-insensitively.
                prop_assert_eq!(Some(name.to_ascii_lowercase()), theirs);
                prop_assert_eq!(alpn, their_alpn);
            }
        }
    }
}
