//! The ClientHello parser on arbitrary bytes: never a panic, and wherever it and rustls's server side both
//! accept the bytes, both read the same server name and ALPN protocols (rustls lowercases the name).
#![no_main]

use dataplane::wire::tls::parse_client_hello;
use libfuzzer_sys::fuzz_target;

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

fuzz_target!(|data: &[u8]| {
    let mut scratch = vec![0u8; 16 * 1024];
    let ours = parse_client_hello(data, &mut scratch).map(|h| {
        (h.server_name.to_ascii_lowercase(), h.alpn().map(<[u8]>::to_vec).collect::<Vec<_>>(), h.records_len)
    });
    if let Ok((_, _, records_len)) = &ours {
        assert!(*records_len <= data.len(), "records_len {records_len} beyond the input");
    }
    if let (Ok((name, alpn, _)), Some((theirs, their_alpn))) = (ours, rustls_reads(data)) {
        assert_eq!(Some(name), theirs, "server name differs from rustls");
        assert_eq!(alpn, their_alpn, "ALPN differs from rustls");
    }
});
