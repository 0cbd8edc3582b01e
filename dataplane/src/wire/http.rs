//! HTTP/1.1 request heads (RFC 9112) as the L7 path judges them, and the body framing that says where the next
//! request on a keep-alive connection starts.
//!
//! The head is tokenised by `httparse` (SIMD, no allocation); the rules that make a request unambiguous are
//! checked here, because at a gateway an ambiguity is a hole: if egressd and the server disagree on where a
//! request ends or which host it is for, a second request rides past the policy (request smuggling). Refused:
//! - no Host, two Host headers, or an absolute-form target whose authority differs from Host (RFC 9112 3.2);
//! - Transfer-Encoding together with Content-Length, two Content-Length headers, a Content-Length that is not
//!   digits, a Transfer-Encoding other than exactly `chunked` (RFC 9112 6.1–6.3);
//! - obsolete line folding and control characters (httparse refuses them), bare LF line ends (httparse accepts
//!   them; checked here), over-long heads ([`MAX_HEAD_LEN`]);
//! - in chunked bodies: sizes that are not hex or overflow, chunk lines without CRLF, over-long size or trailer
//!   lines ([`ChunkedBody`]).
//!
//! Nothing allocates: the caller owns the header array and the buffer the bytes sit in.

use super::tls::check_dns_name;

/// Bytes a request head may take, request line to blank line.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Headers a request may carry.
pub const MAX_HEADERS: usize = 64;
/// Bytes a chunk-size line or a trailer line may take.
pub const MAX_CHUNK_LINE_LEN: usize = 4096;

/// Why a request head was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The head is not complete yet.
    Incomplete,
    /// The head exceeds [`MAX_HEAD_LEN`] or [`MAX_HEADERS`].
    TooLarge,
    /// Not a well-formed HTTP/1.x request head; the string says what.
    Malformed(&'static str),
    /// No Host header (HTTP/1.1 requires one, RFC 9112 3.2).
    MissingHost,
    /// Two Host headers, or an absolute-form target naming another authority.
    AmbiguousHost,
    /// Content-Length and Transfer-Encoding, two Content-Lengths, or an unusable framing header.
    AmbiguousLength,
}

impl HttpError {
    /// Stable snake_case name, for metrics, logs and the `403`/`400` body.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpError::Incomplete => "incomplete",
            HttpError::TooLarge => "request_head_too_large",
            HttpError::Malformed(_) => "malformed_request",
            HttpError::MissingHost => "missing_host",
            HttpError::AmbiguousHost => "ambiguous_host",
            HttpError::AmbiguousLength => "ambiguous_length",
        }
    }
}

/// How the body of a request is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no Content-Length, no Transfer-Encoding).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked: feed the bytes after the head to a [`ChunkedBody`].
    Chunked,
}

/// A parsed, unambiguous request head.
#[derive(Debug)]
pub struct RequestHead<'b, 'h> {
    pub method: &'b str,
    /// The request target as sent (origin-form `/path?q`, absolute-form `http://host/path`, authority-form for
    /// CONNECT, `*`).
    pub target: &'b str,
    /// The path and query: the target without scheme and authority (`*` and authority-form: the target).
    pub path: &'b str,
    /// The host the request is for, without port (from an absolute-form target, else the Host header).
    pub host: &'b str,
    pub port: Option<u16>,
    /// HTTP minor version (0 or 1).
    pub minor_version: u8,
    /// Bytes of the head, blank line included: the body (or the next request) starts here.
    pub head_len: usize,
    pub body: BodyFraming,
    /// `Connection: close` was sent (or HTTP/1.0 without keep-alive): no request follows this one.
    pub close: bool,
    pub headers: &'h [httparse::Header<'b>],
}

impl RequestHead<'_, '_> {
    /// The first header named `name` (case-insensitive), as bytes.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }
}

/// Parses the request head at the start of `buf` into `headers` (at most [`MAX_HEADERS`] are used).
pub fn parse_request<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
) -> Result<RequestHead<'b, 'h>, HttpError> {
    let limit = headers.len().min(MAX_HEADERS);
    let mut request = httparse::Request::new(&mut headers[..limit]);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_LEN => n,
        Ok(httparse::Status::Complete(_)) => return Err(HttpError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => return Err(HttpError::TooLarge),
        Ok(httparse::Status::Partial) => return Err(HttpError::Incomplete),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooLarge),
        Err(_) => return Err(HttpError::Malformed("request head")),
    };
    // httparse takes a bare LF as a line end (RFC 9112 2.2 allows it); a server that does not would see other
    // lines than egressd judged.
    let head = &buf[..head_len];
    if head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r')) {
        return Err(HttpError::Malformed("bare LF"));
    }
    let method = request.method.ok_or(HttpError::Malformed("method"))?;
    let target = request.path.ok_or(HttpError::Malformed("target"))?;
    let minor_version = request.version.ok_or(HttpError::Malformed("version"))?;
    let headers: &'h [httparse::Header<'b>] = request.headers;

    let mut host_header = None;
    let mut content_length = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = minor_version == 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("host") {
            if host_header.replace(h.value).is_some() {
                return Err(HttpError::AmbiguousHost);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let digits = std::str::from_utf8(h.value).map_err(|_| HttpError::AmbiguousLength)?.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || content_length.is_some() {
                return Err(HttpError::AmbiguousLength);
            }
            content_length = Some(digits.parse::<u64>().map_err(|_| HttpError::AmbiguousLength)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Exactly one Transfer-Encoding, exactly "chunked": anything else the server might read differently.
            let value = std::str::from_utf8(h.value).map_err(|_| HttpError::AmbiguousLength)?.trim();
            if transfer_encoding || !value.eq_ignore_ascii_case("chunked") {
                return Err(HttpError::AmbiguousLength);
            }
            transfer_encoding = true;
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            let value = std::str::from_utf8(h.value).unwrap_or("");
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && minor_version == 0 {
                    close = false;
                }
            }
        }
    }
    if chunked && content_length.is_some() {
        return Err(HttpError::AmbiguousLength);
    }
    if chunked && minor_version == 0 {
        return Err(HttpError::AmbiguousLength);
    }
    let body = match (chunked, content_length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(0) | None) => BodyFraming::None,
        (false, Some(n)) => BodyFraming::Length(n),
    };

    let (authority, path) = split_target(method, target)?;
    let host_value = host_header.map(|v| std::str::from_utf8(v).map_err(|_| HttpError::Malformed("host")));
    let host_value = host_value.transpose()?;
    let authority = match (authority, host_value) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h.trim()) => return Err(HttpError::AmbiguousHost),
        (Some(a), _) => a,
        (None, Some(h)) => h.trim(),
        (None, None) => return Err(HttpError::MissingHost),
    };
    let (host, port) = split_authority(authority)?;
    Ok(RequestHead { method, target, path, host, port, minor_version, head_len, body, close, headers })
}

/// The authority of an absolute-form (or CONNECT's authority-form) target, and the path of any form.
fn split_target<'b>(method: &str, target: &'b str) -> Result<(Option<&'b str>, &'b str), HttpError> {
    if target.starts_with('/') || target == "*" {
        return Ok((None, target));
    }
    if method == "CONNECT" {
        return Ok((Some(target), target));
    }
    let lower_scheme = target.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://"));
    let rest = if lower_scheme {
        &target[7..]
    } else if target.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
        &target[8..]
    } else {
        return Err(HttpError::Malformed("request target"));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        // userinfo in a target is deprecated (RFC 9110 4.2.4) and a classic way to confuse host checks.
        return Err(HttpError::AmbiguousHost);
    }
    Ok((Some(authority), if path.is_empty() { "/" } else { path }))
}

/// `host[:port]` → the host (a DNS name or an IPv4 literal; `[v6]` literals keep their brackets) and the port.
fn split_authority(authority: &str) -> Result<(&str, Option<u16>), HttpError> {
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority.ends_with(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().map_err(|_| HttpError::Malformed("port"))?),
        None => None,
    };
    let literal = host.parse::<std::net::Ipv4Addr>().is_ok()
        || (host.starts_with('[')
            && host.ends_with(']')
            && host[1..host.len() - 1].parse::<std::net::Ipv6Addr>().is_ok());
    if !literal && check_dns_name(host).is_err() {
        return Err(HttpError::Malformed("host"));
    }
    Ok((host, port))
}

/// Where a chunked body ends (RFC 9112 7.1), fed the bytes after the head as they arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkedBody {
    state: ChunkState,
    /// Bytes of the current size or trailer line so far.
    line_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size (value so far, digits so far).
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size: a chunk extension up to CR.
    Extension {
        value: u64,
    },
    /// CR seen after the size line: LF must follow.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// Trailer section: at the start of a line (`at_start`) or inside one.
    Trailer {
        at_start: bool,
    },
    TrailerLf {
        empty_line: bool,
    },
    Done,
}

impl Default for ChunkedBody {
    fn default() -> Self {
        ChunkedBody::new()
    }
}

impl ChunkedBody {
    pub fn new() -> ChunkedBody {
        ChunkedBody { state: ChunkState::Size { value: 0, digits: 0 }, line_len: 0 }
    }

    /// Whether the body has ended (the last chunk and the trailer section are in).
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes body bytes from the start of `bytes`; returns how many belong to the body (fewer than
    /// `bytes.len()` only once it is done: the rest is the next request).
    pub fn advance(&mut self, bytes: &[u8]) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data { left } => {
                    let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { ChunkState::DataCr } else { ChunkState::Data { left } };
                    continue;
                }
                ChunkState::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(HttpError::AmbiguousLength);
                        }
                        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                        ChunkState::Size { value: value << 4 | digit, digits: digits + 1 }
                    }
                    b';' if digits > 0 => ChunkState::Extension { value },
                    b'\r' if digits > 0 => ChunkState::SizeLf { value },
                    _ => return Err(HttpError::Malformed("chunk size")),
                },
                ChunkState::Extension { value } => match b {
                    b'\r' => ChunkState::SizeLf { value },
                    b'\n' => return Err(HttpError::Malformed("bare LF in chunk line")),
                    _ => ChunkState::Extension { value },
                },
                ChunkState::SizeLf { value } => match b {
                    b'\n' if value == 0 => ChunkState::Trailer { at_start: true },
                    b'\n' => ChunkState::Data { left: value },
                    _ => return Err(HttpError::Malformed("chunk line end")),
                },
                ChunkState::DataCr => match b {
                    b'\r' => ChunkState::DataLf,
                    _ => return Err(HttpError::Malformed("chunk data end")),
                },
                ChunkState::DataLf => match b {
                    b'\n' => ChunkState::Size { value: 0, digits: 0 },
                    _ => return Err(HttpError::Malformed("chunk data end")),
                },
                ChunkState::Trailer { at_start } => match b {
                    b'\r' => ChunkState::TrailerLf { empty_line: at_start },
                    b'\n' => return Err(HttpError::Malformed("bare LF in trailer")),
                    _ => ChunkState::Trailer { at_start: false },
                },
                ChunkState::TrailerLf { empty_line } => match b {
                    b'\n' if empty_line => ChunkState::Done,
                    b'\n' => ChunkState::Trailer { at_start: true },
                    _ => return Err(HttpError::Malformed("trailer line end")),
                },
            };
            // Line length bound for size, extension and trailer lines (chunk data is not a line).
            self.line_len = match self.state {
                ChunkState::Data { .. }
                | ChunkState::Size { digits: 0, .. }
                | ChunkState::Trailer { at_start: true } => 0,
                _ => self.line_len + 1,
            };
            if self.line_len > MAX_CHUNK_LINE_LEN {
                return Err(HttpError::TooLarge);
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Method, path, host, port, framing, close, head length.
    type Head = (String, String, String, Option<u16>, BodyFraming, bool, usize);

    fn parse(text: &str) -> Result<Head, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let h = parse_request(text.as_bytes(), &mut headers)?;
        Ok((h.method.into(), h.path.into(), h.host.into(), h.port, h.body, h.close, h.head_len))
    }

    #[test]
    fn origin_and_absolute_form_requests_name_their_host() {
        let text = "GET /status/200?x=1 HTTP/1.1\r\nHost: HTTPBin.test:8080\r\nAccept: */*\r\n\r\nNEXT";
        let (method, path, host, port, body, close, len) = parse(text).unwrap();
        assert_eq!(
            (method.as_str(), path.as_str(), host.as_str(), port),
            ("GET", "/status/200?x=1", "HTTPBin.test", Some(8080))
        );
        assert_eq!((body, close, &text[len..]), (BodyFraming::None, false, "NEXT"));
        let abs = parse("GET http://httpbin.test/get HTTP/1.1\r\nHost: httpbin.test\r\n\r\n").unwrap();
        assert_eq!((abs.1.as_str(), abs.2.as_str()), ("/get", "httpbin.test"));
        let no_host_header = parse("GET http://httpbin.test HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((no_host_header.1.as_str(), no_host_header.2.as_str()), ("/", "httpbin.test"));
        let v10 = parse("GET / HTTP/1.0\r\nHost: a.test\r\n\r\n").unwrap();
        assert!(v10.5, "HTTP/1.0 closes unless it asks for keep-alive");
        let closing =
            parse("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Close\r\n\r\n").unwrap();
        assert!(closing.5);
        let literal = parse("GET / HTTP/1.1\r\nHost: 198.51.100.7\r\n\r\n").unwrap();
        assert_eq!(literal.2, "198.51.100.7");
    }

    #[test]
    fn framing_is_read_and_ambiguity_refused() {
        let post = parse("POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(post.4, BodyFraming::Length(12));
        let chunked =
            parse("POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(chunked.4, BodyFraming::Chunked);
        for (text, why) in [
            ("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "CL + TE"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "two CL"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\n", "signed CL"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 3\r\n\r\n", "CL list"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999999\r\n\r\n", "CL overflow"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "TE list"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: xchunked\r\n\r\n", "TE lookalike"),
            ("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "two TE"),
            ("POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n", "TE in 1.0"),
        ] {
            assert_eq!(parse(text), Err(HttpError::AmbiguousLength), "{why}");
        }
    }

    #[test]
    fn host_must_be_one_and_agree_with_the_target() {
        assert_eq!(parse("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), Err(HttpError::MissingHost));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Err(HttpError::AmbiguousHost)
        );
        assert_eq!(
            parse("GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n"),
            Err(HttpError::AmbiguousHost)
        );
        assert_eq!(
            parse("GET http://a.test@b.test/ HTTP/1.1\r\nHost: a.test@b.test\r\n\r\n"),
            Err(HttpError::AmbiguousHost)
        );
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a..test\r\n\r\n"), Err(HttpError::Malformed("host")));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n"), Err(HttpError::Malformed("port")));
        assert_eq!(
            parse("GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            Err(HttpError::Malformed("request target"))
        );
    }

    #[test]
    fn malformed_and_oversized_heads_are_refused() {
        assert!(
            matches!(
                parse("GET / HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n"),
                Err(HttpError::Malformed(_))
            ),
            "obs-fold"
        );
        assert_eq!(parse("GET / HTTP/1.1\nHost: a.test\n\n"), Err(HttpError::Malformed("bare LF")));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a.test\nX: y\r\n\r\n"),
            Err(HttpError::Malformed("bare LF"))
        );
        assert!(matches!(parse("GET / HTTP/1.1\r\nHo st: a.test\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse("GET / HTTP/2.0\r\nHost: a.test\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(
            matches!(parse("\x16\x03\x01\x00\x05hello"), Err(HttpError::Malformed(_))),
            "TLS is not HTTP"
        );
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a.test\r\n"), Err(HttpError::Incomplete));
        let long = format!("GET /{} HTTP/1.1\r\nHost: a.test\r\n", "a".repeat(MAX_HEAD_LEN));
        assert_eq!(parse(&long), Err(HttpError::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(parse(&format!("GET / HTTP/1.1\r\nHost: a.test\r\n{many}\r\n")), Err(HttpError::TooLarge));
    }

    #[test]
    fn chunked_bodies_end_where_the_server_ends_them() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1\r\n";
        let end = body.len() - b"GET / HTTP/1.1\r\n".len();
        let mut whole = ChunkedBody::new();
        assert_eq!(whole.advance(body), Ok(end));
        assert!(whole.is_done());
        // Byte by byte, the same.
        let mut split = ChunkedBody::new();
        let mut consumed = 0;
        for b in body.chunks(1) {
            consumed += split.advance(b).unwrap();
        }
        assert_eq!(consumed, end);
        for (bad, why) in [
            (&b"4\nWiki\r\n0\r\n\r\n"[..], "bare LF after size"),
            (b"4\r\nWikiX\r\n", "data longer than its size"),
            (b"x\r\n", "not hex"),
            (b"-1\r\n", "negative"),
            (b"\r\n", "empty size"),
            (b"10000000000000000\r\n", "overflow"),
            (b"0\r\nTrailer: x\n\r\n", "bare LF in trailer"),
        ] {
            assert!(ChunkedBody::new().advance(bad).is_err(), "{why}");
        }
        let long_extension = [b"1;".as_slice(), &[b'e'; MAX_CHUNK_LINE_LEN], b"\r\n"].concat();
        assert_eq!(ChunkedBody::new().advance(&long_extension), Err(HttpError::TooLarge));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let _ = parse_request(&bytes, &mut headers);
            let mut body = ChunkedBody::new();
            if let Ok(n) = body.advance(&bytes) {
                prop_assert!(n <= bytes.len());
            }
        }

        /// A chunked body cut anywhere into two reads is consumed the same as in one.
        #[test]
        fn chunked_split_anywhere_is_the_same(sizes in proptest::collection::vec(1usize..300, 0..5), cut in any::<prop::sample::Index>()) {
            let mut body = Vec::new();
            for size in &sizes {
                body.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                body.extend(std::iter::repeat_n(b'z', *size));
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n\r\nNEXT");
            let end = body.len() - 4;
            let mut one = ChunkedBody::new();
            prop_assert_eq!(one.advance(&body), Ok(end));
            let at = cut.index(body.len());
            let mut two = ChunkedBody::new();
            let first = two.advance(&body[..at]).unwrap();
            let second = two.advance(&body[first..]).unwrap();
            prop_assert_eq!(first + second, end);
            prop_assert!(two.is_done());
        }
    }
}
