//! The HTTP/1.1 request head parser and chunked body framing on arbitrary bytes: never a panic; an accepted head
//! lies inside the input and names a host; chunked framing reads the same however the bytes are split.
#![no_main]

use dataplane::wire::http::{parse_request, BodyFraming, ChunkedBody};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (split, data) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s), rest),
        None => return,
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let body = match parse_request(data, &mut headers) {
        Ok(head) => {
            assert!(head.head_len <= data.len());
            assert!(!head.host.is_empty(), "an accepted request names its host");
            assert!(head.path.len() <= head.target.len());
            match head.body {
                BodyFraming::Chunked => Some(&data[head.head_len..]),
                _ => None,
            }
        }
        Err(_) => None,
    };
    // Chunked framing: whole, split once, and byte by byte must agree.
    let body = body.unwrap_or(data);
    let whole = {
        let mut c = ChunkedBody::new();
        c.advance(body).map(|n| (n, c.is_done()))
    };
    if let Ok((n, _)) = whole {
        assert!(n <= body.len());
    }
    let split = split.min(body.len());
    let in_two = {
        let mut c = ChunkedBody::new();
        c.advance(&body[..split]).and_then(|a| {
            if a < split {
                Ok((a, c.is_done()))
            } else {
                c.advance(&body[split..]).map(|b| (a + b, c.is_done()))
            }
        })
    };
    let bytewise = {
        let mut c = ChunkedBody::new();
        let mut total = 0;
        let mut result = Ok((0, false));
        for i in 0..body.len() {
            match c.advance(&body[i..=i]) {
                Ok(1) => total += 1,
                Ok(_) => {
                    result = Ok((total, c.is_done()));
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            result = Ok((total, c.is_done()));
        }
        result
    };
    assert_eq!(whole, in_two, "split at {split}");
    assert_eq!(whole, bytewise, "byte by byte");
});
