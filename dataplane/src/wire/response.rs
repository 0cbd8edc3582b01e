//! Where HTTP/1.1 responses begin and end on an upstream connection (RFC 9112 6.3), watched as the bytes are
//! relayed: the L7 path learns each response's status and when the connection is idle again (every request sent has
//! its whole response), which it needs to route the next request elsewhere, to judge endpoints by every response,
//! and to keep idle connections for reuse. Watching never changes or holds the bytes.
//!
//! The length of a response depends on its request: a `HEAD` request's has no body whatever its headers say, and
//! so have `1xx` (an interim response: the final one follows), `204` and `304`. Then `Transfer-Encoding: chunked`,
//! then `Content-Length`; otherwise the body runs until the server closes. A response whose framing cannot be
//! known for sure (a malformed head, two different lengths, a length with chunked, `101 Switching Protocols`) makes
//! the connection opaque: its bytes still pass, but it is never reused and nothing is routed after it.

use std::collections::VecDeque;

use super::http::ChunkedBody;

/// Largest response head watched; a longer one makes the connection opaque.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// What a response did, as it went by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseEvent {
    /// A final response's head with this status (`1xx` interim responses are not reported).
    Status(u16),
    /// The final response to the oldest outstanding request ended.
    Complete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between responses, or reading a head.
    Head,
    Body {
        left: u64,
    },
    Chunked(ChunkedBody),
    /// The body ends when the server closes.
    UntilClose,
    /// Framing unknown from here on.
    Opaque,
}

/// Watches one upstream connection's responses. See the module docs.
#[derive(Debug)]
pub struct ResponseFramer {
    state: State,
    /// The head being read (it may come in several pieces).
    head: Vec<u8>,
    /// Per request sent and not yet answered in full: whether it was a `HEAD`.
    outstanding: VecDeque<bool>,
}

impl Default for ResponseFramer {
    fn default() -> Self {
        ResponseFramer::new()
    }
}

impl ResponseFramer {
    pub fn new() -> ResponseFramer {
        ResponseFramer { state: State::Head, head: Vec::new(), outstanding: VecDeque::new() }
    }

    /// A request went upstream (its head, at least): a response is due.
    pub fn on_request(&mut self, method: &str) {
        self.outstanding.push_back(method == "HEAD");
    }

    /// Requests sent whose responses have not ended.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Every request sent was answered in full, and the framing is known: the connection may carry a request to
    /// anywhere next, or be kept for reuse.
    pub fn is_idle(&self) -> bool {
        self.outstanding.is_empty() && self.state == State::Head && self.head.is_empty()
    }

    /// Nothing of the next response has come yet.
    pub fn at_response_start(&self) -> bool {
        self.state == State::Head && self.head.is_empty()
    }

    /// The framing is unknown (or runs to the close): never reuse the connection.
    pub fn is_opaque(&self) -> bool {
        matches!(self.state, State::Opaque | State::UntilClose)
    }

    /// The framing is unknown from here on (not merely running to the close).
    pub fn is_framing_lost(&self) -> bool {
        self.state == State::Opaque
    }

    /// Bytes from upstream, in order; `event` hears of each final status and each end of response.
    pub fn feed(&mut self, mut data: &[u8], event: &mut impl FnMut(ResponseEvent)) {
        while !data.is_empty() {
            match self.state {
                State::Opaque | State::UntilClose => return,
                State::Body { left } => {
                    let take = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    data = &data[take..];
                    let left = left - take as u64;
                    if left == 0 {
                        self.complete(event);
                    } else {
                        self.state = State::Body { left };
                    }
                }
                State::Chunked(mut body) => match body.advance(data) {
                    Ok(n) => {
                        data = &data[n..];
                        if body.is_done() {
                            self.complete(event);
                        } else {
                            self.state = State::Chunked(body);
                        }
                    }
                    Err(_) => self.state = State::Opaque,
                },
                State::Head => {
                    // Only what may belong to the head is copied; the rest is looked at again after it.
                    let room = MAX_RESPONSE_HEAD.saturating_sub(self.head.len());
                    let before = self.head.len();
                    let take = data.len().min(room);
                    self.head.extend_from_slice(&data[..take]);
                    match self.parse_head(event) {
                        HeadOutcome::Incomplete
                            if take < data.len() || self.head.len() >= MAX_RESPONSE_HEAD =>
                        {
                            self.state = State::Opaque;
                        }
                        HeadOutcome::Incomplete => return,
                        HeadOutcome::Done(len) => {
                            self.head.clear();
                            data = &data[len - before..];
                        }
                        HeadOutcome::Bad => self.state = State::Opaque,
                    }
                }
            }
        }
    }

    fn complete(&mut self, event: &mut impl FnMut(ResponseEvent)) {
        self.outstanding.pop_front();
        self.state = State::Head;
        event(ResponseEvent::Complete);
    }

    fn parse_head(&mut self, event: &mut impl FnMut(ResponseEvent)) -> HeadOutcome {
        let mut headers = [httparse::EMPTY_HEADER; super::http::MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(&self.head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return HeadOutcome::Incomplete,
            Err(_) => return HeadOutcome::Bad,
        };
        let Some(status) = response.code else { return HeadOutcome::Bad };
        let Some(&head_request) = self.outstanding.front() else {
            // A response nobody asked for.
            return HeadOutcome::Bad;
        };
        if status == 101 {
            return HeadOutcome::Bad;
        }
        if (100..200).contains(&status) {
            // Interim: the final response follows for the same request.
            return HeadOutcome::Done(len);
        }
        event(ResponseEvent::Status(status));
        let mut length: Option<u64> = None;
        let mut chunked = false;
        for h in response.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let value =
                    std::str::from_utf8(h.value).ok().map(str::trim).and_then(|v| v.parse::<u64>().ok());
                match (value, length) {
                    (None, _) => return HeadOutcome::Bad,
                    (Some(v), Some(l)) if v != l => return HeadOutcome::Bad,
                    (Some(v), _) => length = Some(v),
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let value = std::str::from_utf8(h.value).unwrap_or("");
                let last = value.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") {
                    // A transfer coding without chunked last: the body runs to the close.
                    self.state = State::UntilClose;
                    return HeadOutcome::Done(len);
                }
                chunked = true;
            }
        }
        if head_request || status == 204 || status == 304 {
            self.complete(event);
            return HeadOutcome::Done(len);
        }
        self.state = match (chunked, length) {
            (true, Some(_)) => return HeadOutcome::Bad,
            (true, None) => State::Chunked(ChunkedBody::new()),
            (false, Some(0)) => {
                self.complete(event);
                return HeadOutcome::Done(len);
            }
            (false, Some(n)) => State::Body { left: n },
            (false, None) => State::UntilClose,
        };
        HeadOutcome::Done(len)
    }
}

enum HeadOutcome {
    Incomplete,
    /// The head was this long (counted from the start of the buffered head).
    Done(usize),
    Bad,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` after `requests`; the events.
    fn run(requests: &[&str], chunks: &[&[u8]]) -> (ResponseFramer, Vec<ResponseEvent>) {
        let mut f = ResponseFramer::new();
        for r in requests {
            f.on_request(r);
        }
        let mut events = Vec::new();
        for c in chunks {
            f.feed(c, &mut |e| events.push(e));
        }
        (f, events)
    }

    use ResponseEvent::{Complete, Status};

    #[test]
    fn lengths_chunks_and_bodiless_responses_end_where_they_should() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (f, events) = run(&["GET", "POST"], &[two]);
        assert_eq!(events, [Status(200), Complete, Status(503), Complete]);
        assert!(f.is_idle());
        // Split at every byte: the same events.
        for cut in 1..two.len() {
            let (f, events) = run(&["GET", "POST"], &[&two[..cut], &two[cut..]]);
            assert_eq!(events, [Status(200), Complete, Status(503), Complete], "cut at {cut}");
            assert!(f.is_idle(), "cut at {cut}");
        }
        // HEAD, 204 and 304 have no body whatever they say; 100 Continue is interim.
        let (f, events) = run(
            &["HEAD", "GET", "GET"],
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"],
        );
        assert_eq!(events, [Status(200), Complete, Status(204), Complete, Status(304), Complete]);
        assert!(f.is_idle());
        // Partway: not idle.
        let (f, _) = run(&["GET"], &[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"]);
        assert!(!f.is_idle() && !f.is_opaque() && f.outstanding() == 1);
    }

    #[test]
    fn unknowable_framing_makes_the_connection_opaque() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (f, _) = run(&["GET"], &[bad]);
            assert!(f.is_opaque() && !f.is_idle(), "{}", String::from_utf8_lossy(bad));
        }
        // A response nobody asked for.
        let (f, events) = run(&[], &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]);
        assert!(f.is_opaque() && events.is_empty());
        // A head that never ends.
        let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
        endless.extend(std::iter::repeat_n(b'a', MAX_RESPONSE_HEAD));
        let (f, _) = run(&["GET"], &[&endless]);
        assert!(f.is_opaque());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut f = ResponseFramer::new();
            f.on_request("GET");
            let mut bytes: Vec<u8> = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..(next() % 64) {
                let alphabet = b"0123456789abcdef\r\n;x: ";
                bytes.push(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            let cut = (next() as usize) % (bytes.len() + 1);
            f.feed(&bytes[..cut], &mut |_| {});
            f.feed(&bytes[cut..], &mut |_| {});
        }
    }
}
