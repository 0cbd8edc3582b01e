//! The response framer on arbitrary upstream bytes: never a panic; it reads the same whole, split once, and byte by
//! byte (events, idle, opaque, outstanding); it never reports more complete responses than requests sent.
#![no_main]

use dataplane::wire::response::{ResponseEvent, ResponseFramer};
use libfuzzer_sys::fuzz_target;

/// Four requests (bit i of `heads` set: the i-th is a HEAD), then `chunks` fed in order.
fn run(heads: u8, chunks: &[&[u8]]) -> (Vec<ResponseEvent>, bool, bool, usize) {
    let mut framer = ResponseFramer::new();
    for i in 0..4 {
        framer.on_request(if heads & (1 << i) != 0 { "HEAD" } else { "GET" });
    }
    let mut events = Vec::new();
    for chunk in chunks {
        framer.feed(chunk, &mut |e| events.push(e));
    }
    (events, framer.is_idle(), framer.is_opaque(), framer.outstanding())
}

fuzz_target!(|data: &[u8]| {
    let [split, heads, body @ ..] = data else { return };
    let whole = run(*heads, &[body]);
    let completes = whole.0.iter().filter(|e| **e == ResponseEvent::Complete).count();
    assert!(completes <= 4, "more responses ended than requests were sent");
    assert_eq!(whole.3, 4 - completes);
    let split = usize::from(*split).min(body.len());
    assert_eq!(whole, run(*heads, &[&body[..split], &body[split..]]), "split at {split}");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(whole, run(*heads, &bytes), "byte by byte");
});
