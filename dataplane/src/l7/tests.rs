//! The L7 engine on a virtual clock, against a policy with an `l7` rule: what reaches upstream, what the client
//! gets back, and when it closes.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::l7::balance::Balancer;
use crate::policy::l7::RequestDenial;
use crate::policy::{Action, HostPattern, PolicyBuilder, Prefix, ProtoMatch, RuleSpec};

/// One group; rule 0 is `l7` for api.stripe.com, *.paypal.com and httpbin.test.
fn policy() -> (PolicySnapshot, RuleId) {
    policy_with_hosts(Default::default(), false, &["api.stripe.com", "*.paypal.com", "httpbin.test"])
}

fn connection() -> (Connection, PolicySnapshot) {
    let (policy, rule) = policy();
    (Connection::new(Instant::ZERO, rule, L7Limits::default()), policy)
}

/// A minimal ClientHello record for `name` (legacy version TLS 1.2, one suite, SNI only).
fn client_hello(name: &str) -> Vec<u8> {
    let mut sni = vec![0u8];
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut sni_ext = (sni.len() as u16).to_be_bytes().to_vec();
    sni_ext.extend_from_slice(&sni);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni_ext);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[9; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut msg = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    msg.extend_from_slice(&body);
    let mut record = vec![22, 3, 1, (msg.len() >> 8) as u8, msg.len() as u8];
    record.extend_from_slice(&msg);
    record
}

/// Drains everything judged to "upstream" (connecting it first if asked); returns the bytes.
fn flush_upstream(c: &mut Connection, policy: &PolicySnapshot) -> Vec<u8> {
    answer_picks(c, policy, &mut Balancer::new());
    if c.wants_upstream() {
        c.on_upstream_connected();
    }
    let mut out = Vec::new();
    loop {
        answer_picks(c, policy, &mut Balancer::new());
        let chunk = c.to_upstream().to_vec();
        if chunk.is_empty() {
            return out;
        }
        c.upstream_sent(chunk.len(), policy);
        out.extend_from_slice(&chunk);
    }
}

/// Plays the driver's part when a request for a service's route needs its subset: `balancer` picks it.
fn answer_picks(c: &mut Connection, policy: &PolicySnapshot, balancer: &mut Balancer) {
    while let Some((id, route)) = c.take_subset_pick() {
        let subset =
            policy.services().get(id).and_then(|s| balancer.pick_subset(s, policy.generation(), route));
        c.on_subset_picked(subset, policy);
    }
}

/// Client bytes, with the subsets of their requests picked as the driver would.
fn client_data(c: &mut Connection, data: &[u8], policy: &PolicySnapshot) {
    c.on_client_data(data, policy);
    answer_picks(c, policy, &mut Balancer::new());
}

#[test]
fn an_allowed_sni_is_replayed_upstream_then_spliced() {
    let (mut c, policy) = connection();
    let hello = client_hello("API.Stripe.com");
    // The hello arrives in three pieces: nothing goes upstream until it is whole.
    assert_eq!(c.on_client_data(&hello[..3], &policy), 3);
    assert!(!c.wants_upstream() && c.to_upstream().is_empty());
    assert_eq!(c.on_client_data(&hello[3..40], &policy), 37);
    assert!(!c.wants_upstream());
    c.on_client_data(&hello[40..], &policy);
    assert!(c.wants_upstream(), "whole hello, allowed name: connect");
    assert!(c.to_upstream().is_empty(), "nothing before the upstream is connected");
    assert_eq!(flush_upstream(&mut c, &policy), hello, "the hello goes upstream byte for byte");
    assert!(c.is_splicing() && c.poll_timeout().is_none());
    c.on_client_data(b"\x17\x03\x03\x00\x01z", &policy);
    assert_eq!(flush_upstream(&mut c, &policy), b"\x17\x03\x03\x00\x01z");
    assert_eq!(c.summary().name, "api.stripe.com");
    assert_eq!(c.summary().refusal, None);
}

#[test]
fn wildcards_match_subdomains_but_not_the_bare_suffix() {
    for (name, allowed) in
        [("www.paypal.com", true), ("a.b.paypal.com", true), ("paypal.com", false), ("evilpaypal.com", false)]
    {
        let (mut c, policy) = connection();
        c.on_client_data(&client_hello(name), &policy);
        assert_eq!(c.wants_upstream(), allowed, "{name}");
    }
}

#[test]
fn a_denied_sni_gets_an_access_denied_alert_and_nothing_reaches_upstream() {
    let (mut c, policy) = connection();
    c.on_client_data(&client_hello("evil.example"), &policy);
    assert!(!c.wants_upstream());
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 49], "fatal access_denied");
    assert_eq!(c.summary().refusal, Some(Refusal::HostNotAllowed));
    assert!(!c.should_close(), "the alert first");
    c.client_sent(7);
    assert!(c.should_close());
    assert_eq!(flush_upstream(&mut c, &policy), b"");
}

#[test]
fn a_hello_without_a_usable_name_gets_unrecognized_name() {
    let (mut c, policy) = connection();
    c.on_client_data(&client_hello("198.51.100.7"), &policy);
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 112]);
    assert_eq!(c.summary().refusal, Some(Refusal::BadClientHello(HelloError::IpLiteralServerName)));
}

#[test]
fn garbage_is_refused_at_once_and_silence_at_the_deadline() {
    let (mut c, policy) = connection();
    c.on_client_data(b"\x00\x01 hello", &policy);
    assert_eq!(c.summary().refusal, Some(Refusal::NotTlsOrHttp));
    assert!(c.to_client().is_empty() && c.should_close(), "unknown protocol: just close");

    let (mut c, _) = connection();
    let deadline = c.poll_timeout().expect("a deadline while classifying");
    assert_eq!(deadline, Instant::from_secs(10));
    c.on_timeout(Instant::from_secs(9));
    assert_eq!(c.summary().refusal, None);
    c.on_timeout(deadline);
    assert_eq!(c.summary().refusal, Some(Refusal::Timeout));
    assert!(c.should_close());

    // A hello that never ends: refused at the byte cap, never buffered past it.
    let (mut c, policy) = connection();
    let mut endless = vec![22, 3, 1, 0x40, 0x00, 1, 0, 0xff, 0xff];
    endless.resize(20_000, 0);
    let taken = c.on_client_data(&endless, &policy);
    assert!(taken <= L7Limits::default().max_head_bytes);
    assert!(matches!(c.summary().refusal, Some(Refusal::TooLarge | Refusal::BadClientHello(_))));
}

/// Slowloris: a request head trickled byte by byte is refused at the deadline — the first head at the
/// connection's, a later one on a keep-alive connection at its own, counted from its first byte (armed at the next
/// timer visit). An idle keep-alive connection between requests has no head deadline.
#[test]
fn trickled_request_heads_are_refused_at_their_deadline_but_idle_keep_alive_is_not() {
    let (mut c, policy) = connection();
    for (i, b) in b"GET / HTTP/1.1\r\nHost: httpbin.test\r\nX-a: ".iter().enumerate() {
        c.on_client_data(&[*b], &policy);
        c.on_timeout(Instant::ZERO.saturating_add(std::time::Duration::from_millis(200 * i as u64)));
        if c.summary().refusal.is_some() {
            break;
        }
    }
    c.on_timeout(Instant::from_secs(10));
    assert_eq!(c.summary().refusal, Some(Refusal::Timeout), "the first head, at the connection's deadline");

    let (mut c, policy) = connection();
    c.on_client_data(b"GET /a HTTP/1.1\r\nHost: httpbin.test\r\n\r\n", &policy);
    assert_eq!(flush_upstream(&mut c, &policy).len(), 39);
    // Idle past every deadline: not refused.
    c.on_timeout(Instant::from_secs(60));
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(c.summary().refusal, None);
    // The next head starts at 100 s and trickles: armed at the next visit, refused 10 s later.
    c.on_client_data(b"GET /b HTTP/1.1\r\nHo", &policy);
    c.on_timeout(Instant::from_secs(100));
    assert_eq!(c.poll_timeout(), Some(Instant::from_secs(110)));
    c.on_client_data(b"st: ht", &policy);
    c.on_timeout(Instant::from_secs(109));
    assert_eq!(c.summary().refusal, None);
    c.on_timeout(Instant::from_secs(110));
    assert_eq!(c.summary().refusal, Some(Refusal::Timeout));
    // A head that completes in time disarms it.
    let (mut c, policy) = connection();
    c.on_client_data(b"GET /a HTTP/1.1\r\nHost: httpbin.test\r\n\r\nGET /b HTTP/1.1\r\n", &policy);
    c.on_timeout(Instant::from_secs(1));
    c.on_client_data(b"Host: httpbin.test\r\n\r\n", &policy);
    c.on_timeout(Instant::from_secs(30));
    assert_eq!(c.summary().refusal, None);
    assert_eq!(c.summary().requests_allowed, 2);
}

#[test]
fn http_requests_are_judged_one_by_one_on_a_keep_alive_connection() {
    let (mut c, policy) = connection();
    let first = b"GET /status/200 HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    let post = b"POST /post HTTP/1.1\r\nHost: httpbin.test\r\nContent-Length: 5\r\n\r\nhello";
    let denied = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\n\r\n";
    let after = b"GET /get HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    let mut stream = Vec::new();
    for part in [&first[..], post, denied, after] {
        stream.extend_from_slice(part);
    }
    // Fed a byte at a time: the same outcome as at once.
    for chunking in [1, stream.len()] {
        let (mut c2, _) = connection();
        let mut upstream = Vec::new();
        for piece in stream.chunks(chunking) {
            let mut piece = piece;
            while !piece.is_empty() {
                let n = c2.on_client_data(piece, &policy);
                piece = &piece[n..];
                upstream.extend(flush_upstream(&mut c2, &policy));
            }
        }
        let allowed = [&first[..], post].concat();
        assert_eq!(upstream, allowed, "only the two allowed requests, whole (chunks of {chunking})");
        assert_eq!(c2.summary().requests_allowed, 2);
        assert_eq!(c2.summary().refusal, Some(Refusal::HostNotAllowed));
        assert!(c2.refusal_waits(), "the 403 follows the upstream's two responses");
        let response = String::from_utf8(c2.to_client().to_vec()).unwrap();
        assert!(response.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{response}");
        assert!(response.contains("Connection: close\r\n"));
        assert!(response.ends_with("egressd: host evil.example is not allowed by this rule\n"));
    }
    // The first request alone.
    c.on_client_data(first, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), first);
    assert_eq!((c.summary().method.as_str(), c.summary().path.as_str()), ("GET", "/status/200"));
}

#[test]
fn chunked_bodies_are_forwarded_whole_and_the_next_head_judged() {
    let (mut c, policy) = connection();
    let req =
        b"POST /p HTTP/1.1\r\nHost: httpbin.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let smuggled = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\n\r\n";
    c.on_client_data(&[&req[..], smuggled].concat(), &policy);
    assert_eq!(flush_upstream(&mut c, &policy), req, "the body ends where its last chunk does");
    assert_eq!(c.summary().refusal, Some(Refusal::HostNotAllowed), "the request hidden after it is judged");
}

#[test]
fn ambiguous_requests_get_400_and_reach_nothing() {
    let (mut c, policy) = connection();
    c.on_client_data(
        b"POST / HTTP/1.1\r\nHost: httpbin.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        &policy,
    );
    assert_eq!(c.summary().refusal, Some(Refusal::BadRequest(HttpError::AmbiguousLength)));
    assert!(String::from_utf8_lossy(c.to_client()).starts_with("HTTP/1.1 400 Bad Request\r\n"));
    assert!(!c.refusal_waits());
    assert_eq!(flush_upstream(&mut c, &policy), b"");
}

#[test]
fn arbitrary_client_bytes_never_panic_and_never_pass_unjudged() {
    use proptest::prelude::*;
    let (policy, rule) = policy();
    proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..3000), step in 1usize..700)| {
        let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
        let mut upstream = Vec::new();
        for piece in bytes.chunks(step) {
            c.on_client_data(piece, &policy);
            upstream.extend(flush_upstream(&mut c, &policy));
        }
        c.on_timeout(Instant::from_secs(60));
        // Whatever went upstream was judged: a hello or request for an allowed name comes first.
        if !upstream.is_empty() {
            prop_assert!(c.summary().requests_allowed > 0 || c.summary().protocol == Some(Protocol::Tls));
            prop_assert!(["api.stripe.com", "httpbin.test"].contains(&c.summary().name.as_str())
                || c.summary().name.ends_with(".paypal.com"));
        }
    });
}

/// One group; rule 0 is `l7` for httpbin.test with `conditions`, dry run as given.
fn policy_with(conditions: crate::policy::l7::L7Conditions, dry_run: bool) -> (PolicySnapshot, RuleId) {
    policy_with_hosts(conditions, dry_run, &["httpbin.test"])
}

/// [`policy_with`] for these host patterns.
fn policy_with_hosts(
    conditions: crate::policy::l7::L7Conditions,
    dry_run: bool,
    hosts: &[&str],
) -> (PolicySnapshot, RuleId) {
    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", vec![Ipv4Addr::new(192, 0, 2, 30)]);
    b.add_source(g, Prefix::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 0)), 24).unwrap());
    let mut rule = RuleSpec::new(
        g,
        vec![Prefix::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap()],
        ProtoMatch::Any,
        vec![],
        Action::L7,
    );
    rule.hosts = hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect();
    rule.l7 = conditions;
    rule.dry_run = dry_run;
    let id = b.add_rule(rule);
    (b.build(1).unwrap(), id)
}

fn get_status_only() -> crate::policy::l7::L7Conditions {
    use crate::policy::l7::{L7Conditions, PathPattern};
    L7Conditions {
        methods: vec!["GET".into(), "HEAD".into()],
        paths: vec![PathPattern::parse("/status/*").unwrap(), PathPattern::parse("regex:/get|/ip").unwrap()],
        headers: vec![],
        min_tls_version: None,
        rate_limit: None,
        upstream_tls: None,
        max_upstream_connections: None,
    }
}

#[test]
fn methods_and_paths_are_checked_on_every_request() {
    let (policy, rule) = policy_with(get_status_only(), false);
    let run = |request: &[u8]| {
        let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
        c.on_client_data(request, &policy);
        let up = flush_upstream(&mut c, &policy);
        (up, c.summary().refusal, String::from_utf8_lossy(c.to_client()).into_owned())
    };
    let allowed = b"GET /status/200 HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    assert_eq!(run(allowed), (allowed.to_vec(), None, String::new()));
    let (up, why, answer) =
        run(b"POST /status/200 HTTP/1.1\r\nHost: httpbin.test\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((up.len(), why), (0, Some(Refusal::RequestNotAllowed(RequestDenial::Method))));
    assert!(answer.contains("403") && answer.contains("POST /status/200 on httpbin.test"), "{answer}");
    let (up, why, _) = run(b"GET /admin HTTP/1.1\r\nHost: httpbin.test\r\n\r\n");
    assert_eq!((up.len(), why), (0, Some(Refusal::RequestNotAllowed(RequestDenial::Path))));
    // An allowed request followed by a forbidden path on the same connection: only the first goes.
    let both = [&allowed[..], b"GET /ip/../admin HTTP/1.1\r\nHost: httpbin.test\r\n\r\n"].concat();
    let (up, why, _) = run(&both);
    assert_eq!((up, why), (allowed.to_vec(), Some(Refusal::RequestNotAllowed(RequestDenial::Path))));
    // TLS cannot be checked for methods and paths: refused, not waved through.
    let (up, why, _) = run(&client_hello("httpbin.test"));
    assert_eq!((up.len(), why), (0, Some(Refusal::TlsNeedsPlaintext)));
}

#[test]
fn a_minimum_tls_version_refuses_older_hellos_with_protocol_version() {
    let conditions = crate::policy::l7::L7Conditions { min_tls_version: Some(0x0304), ..Default::default() };
    let (policy, rule) = policy_with(conditions, false);
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    // The test hello offers TLS 1.2 only (legacy version, no supported_versions).
    c.on_client_data(&client_hello("httpbin.test"), &policy);
    assert_eq!(c.summary().refusal, Some(Refusal::TlsVersionTooOld));
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 70]);
    let conditions = crate::policy::l7::L7Conditions { min_tls_version: Some(0x0303), ..Default::default() };
    let (policy, rule) = policy_with(conditions, false);
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(&client_hello("httpbin.test"), &policy);
    assert!(c.wants_upstream(), "1.2 meets a 1.2 minimum");
}

#[test]
fn a_dry_run_rule_lets_refusals_through_and_records_them() {
    let (policy, rule) = policy_with(get_status_only(), true);
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    let request = b"DELETE /admin HTTP/1.1\r\nHost: evil.example\r\n\r\n";
    c.on_client_data(request, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), request, "forwarded");
    assert_eq!(c.summary().refusal, None);
    assert_eq!(c.summary().dry_run_refusal, Some(Refusal::HostNotAllowed));
}

#[test]
fn with_destination_verification_a_name_must_resolve_to_the_dialled_address() {
    let (policy, rule) = policy();
    let limits = L7Limits { verify_destination: true, ..L7Limits::default() };
    let dialled = Ipv4Addr::new(198, 51, 100, 7);
    // TLS: nothing goes upstream until the answer; the right address lets it through.
    let mut c = Connection::new(Instant::ZERO, rule, limits);
    let hello = client_hello("api.stripe.com");
    c.on_client_data(&hello, &policy);
    assert!(!c.wants_upstream());
    assert_eq!(c.take_resolution().as_deref(), Some("api.stripe.com"));
    assert_eq!(c.take_resolution(), None, "asked once");
    c.on_resolved(&[Ipv4Addr::new(203, 0, 113, 1), dialled], dialled, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), hello);
    // An allowed name sent to an address that is not its own (domain fronting by IP): refused.
    let mut c = Connection::new(Instant::ZERO, rule, limits);
    c.on_client_data(&client_hello("api.stripe.com"), &policy);
    c.on_resolved(&[Ipv4Addr::new(203, 0, 113, 1)], dialled, &policy);
    assert_eq!(c.summary().refusal, Some(Refusal::DestinationMismatch));
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 49]);
    // HTTP: each new Host is verified once; the same Host again goes straight through.
    let mut c = Connection::new(Instant::ZERO, rule, limits);
    let first = b"GET /a HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    let second = b"GET /b HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    c.on_client_data(&[&first[..], second].concat(), &policy);
    assert_eq!(c.take_resolution().as_deref(), Some("httpbin.test"));
    assert_eq!(flush_upstream(&mut c, &policy), b"");
    c.on_resolved(&[dialled], dialled, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), [&first[..], second].concat());
    assert_eq!(c.take_resolution(), None);
    // No answer at all counts as not verified.
    let mut c = Connection::new(Instant::ZERO, rule, limits);
    c.on_client_data(first, &policy);
    c.on_resolved(&[], dialled, &policy);
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("does not resolve to the address"),
        "{answer}"
    );
    assert_eq!(c.summary().refusal, Some(Refusal::DestinationMismatch));
}

/// Answers every admission the connection asks for from `limiter`, for client 10.10.1.5 at `now`.
fn admit_all(
    c: &mut Connection,
    limiter: &mut ratelimit::RateLimiter,
    now: Instant,
    policy: &PolicySnapshot,
) {
    while let Some(limit) = c.take_admission() {
        let admitted = limiter.admit(now, c.rule(), Ipv4Addr::new(10, 10, 1, 5), limit);
        c.on_admitted(admitted, policy);
    }
}

#[test]
fn a_rate_limit_admits_its_burst_then_answers_429_with_retry_after_even_on_a_kept_alive_connection() {
    use crate::policy::l7::{L7Conditions, RateLimit};
    let limited =
        L7Conditions { rate_limit: Some(RateLimit { requests: 2, per_secs: 60 }), ..Default::default() };
    let (policy, rule) = policy_with(limited, false);
    let mut limiter = ratelimit::RateLimiter::new();
    let get = b"GET /get HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    // Three pipelined requests on one connection: nothing moves before the limiter answers.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(&[&get[..], get, get].concat(), &policy);
    assert!(!c.wants_upstream(), "the first request waits for its admission");
    admit_all(&mut c, &mut limiter, Instant::ZERO, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), [&get[..], get].concat(), "two admitted, the third not sent");
    assert_eq!(c.summary().refusal, Some(Refusal::RateLimited));
    assert!(c.refusal_waits(), "the 429 follows the answers to the two admitted requests");
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{answer}");
    assert!(answer.contains("\r\nRetry-After: 30\r\n"), "one token every 30 s: {answer}");
    // A new connection from the same client is refused too; after 30 s one more request passes.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(get, &policy);
    admit_all(&mut c, &mut limiter, Instant::from_secs(10), &policy);
    assert_eq!((flush_upstream(&mut c, &policy).len(), c.summary().refusal), (0, Some(Refusal::RateLimited)));
    assert!(String::from_utf8_lossy(c.to_client()).contains("Retry-After: 20\r\n"));
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(get, &policy);
    admit_all(&mut c, &mut limiter, Instant::from_secs(30), &policy);
    assert_eq!(flush_upstream(&mut c, &policy), get);
    // TLS connections count as requests: over the limit, an access_denied alert.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(&client_hello("httpbin.test"), &policy);
    admit_all(&mut c, &mut limiter, Instant::from_secs(30), &policy);
    assert_eq!(c.summary().refusal, Some(Refusal::RateLimited));
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 49]);
}

#[test]
fn a_rate_limit_in_dry_run_records_and_lets_through() {
    use crate::policy::l7::{L7Conditions, RateLimit};
    let limited =
        L7Conditions { rate_limit: Some(RateLimit { requests: 1, per_secs: 60 }), ..Default::default() };
    let (policy, rule) = policy_with(limited, true);
    let mut limiter = ratelimit::RateLimiter::new();
    let get = b"GET /get HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(&[&get[..], get].concat(), &policy);
    admit_all(&mut c, &mut limiter, Instant::ZERO, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), [&get[..], get].concat());
    assert_eq!((c.summary().refusal, c.summary().dry_run_refusal), (None, Some(Refusal::RateLimited)));
}

#[test]
fn under_tls_origination_a_connection_keeps_its_first_host_and_a_failed_tls_answers_502() {
    use crate::policy::l7::{L7Conditions, UpstreamTls};
    let tls =
        UpstreamTls { mutual: false, port: 443, sni: None, ca_file: None, cert_file: None, key_file: None };
    let conditions = L7Conditions { upstream_tls: Some(tls), ..Default::default() };
    let (policy, rule) = policy_with_hosts(conditions, false, &["httpbin.test", "api.stripe.com"]);
    let first = b"GET /a HTTP/1.1\r\nHost: httpbin.test\r\n\r\n";
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(&[&first[..], b"GET /b HTTP/1.1\r\nHost: api.stripe.com\r\n\r\n"].concat(), &policy);
    assert_eq!(c.upstream_host(), Some("httpbin.test"), "the TLS session is for the first Host");
    assert_eq!(flush_upstream(&mut c, &policy), first, "only the first request goes");
    assert_eq!(c.summary().refusal, Some(Refusal::HostChanged));
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 421 Misdirected Request"), "{answer}");
    // TLS from the client cannot be originated again: refused.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(&client_hello("httpbin.test"), &policy);
    assert_eq!(c.summary().refusal, Some(Refusal::TlsNeedsPlaintext));
    // The originated TLS fails: nothing judged goes anywhere, the client is told why.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default());
    c.on_client_data(first, &policy);
    assert!(c.wants_upstream());
    c.on_upstream_tls_failed("invalid peer certificate: UnknownIssuer");
    assert!(c.to_upstream().is_empty());
    assert_eq!(c.summary().refusal, Some(Refusal::UpstreamTlsFailed));
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway"), "{answer}");
    assert!(answer.contains("TLS to the server failed: invalid peer certificate: UnknownIssuer"), "{answer}");
    let n = c.to_client().len();
    c.client_sent(n);
    assert!(c.should_close(), "the 502 sent: close");
}

/// A policy whose `l7` rule allows svc.test and httpbin.test, with a service for svc.test:80 routing `want: v1`
/// to subset v1 and `want: v2` to v2 (no default route).
fn service_policy() -> (PolicySnapshot, RuleId) {
    service_policy_with(false)
}

/// [`service_policy`]; `default_route`: its last route (`split`, half to each subset) has no conditions.
fn service_policy_with(default_route: bool) -> (PolicySnapshot, RuleId) {
    use crate::policy::service::{
        EndpointSpec, HeaderMatch, RouteSpec, ServiceSpec, SubsetSpec, ValueMatch, WeightedSubset,
    };
    let mut b = PolicyBuilder::new();
    let g = b.add_group("apps", vec![Ipv4Addr::new(192, 0, 2, 30)]);
    b.add_source(g, Prefix::new(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 0)), 24).unwrap());
    let mut rule = RuleSpec::new(
        g,
        vec![Prefix::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap()],
        ProtoMatch::Any,
        vec![],
        Action::L7,
    );
    rule.hosts = ["svc.test", "httpbin.test"].iter().map(|h| HostPattern::parse(h).unwrap()).collect();
    let id = b.add_rule(rule);
    let label = |v: &str| vec![("version".to_string(), v.to_string())];
    let route = |v: &str, subset: usize| RouteSpec {
        name: v.into(),
        methods: vec![],
        paths: vec![],
        headers: vec![HeaderMatch { name: "want".into(), value: ValueMatch::Exact(v.into()) }],
        to: vec![WeightedSubset { subset: Some(subset), weight: 1 }],
        timeout_secs: None,
    };
    let endpoints = vec![
        EndpointSpec { address: "203.0.113.20:443".parse().unwrap(), labels: label("v1") },
        EndpointSpec { address: "203.0.113.21:443".parse().unwrap(), labels: label("v2") },
    ];
    b.add_service(ServiceSpec {
        subsets: vec![
            SubsetSpec { name: "v1".into(), labels: label("v1"), tls: None },
            SubsetSpec { name: "v2".into(), labels: label("v2"), tls: None },
        ],
        routes: vec![
            route("v1", 0),
            route("v2", 1),
            RouteSpec {
                to: vec![
                    WeightedSubset { subset: Some(0), weight: 1 },
                    WeightedSubset { subset: Some(1), weight: 1 },
                ],
                headers: if default_route { vec![] } else { route("split", 0).headers },
                ..route("split", 0)
            },
        ],
        ..ServiceSpec::new("svc", vec!["svc.test".into()], 80, endpoints)
    });
    (b.build(1).unwrap(), id)
}

const OK_5: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

#[test]
fn a_request_for_another_route_waits_for_the_answers_then_goes_to_a_new_upstream() {
    let (policy, rule) = service_policy();
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    let v1 = b"GET / HTTP/1.1\r\nHost: svc.test\r\nWant: v1\r\n\r\n";
    let v2 = b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v2\r\n\r\n";
    // Two requests for v1, then one for v2, all in one segment.
    client_data(&mut c, &[&v1[..], v1, v2].concat(), &policy);
    let id = policy.services().lookup("svc.test", 80).unwrap();
    assert_eq!(c.upstream_route(), Some(UpstreamRoute { service: id, route: 0, subset: Some(0) }));
    assert_eq!(flush_upstream(&mut c, &policy), [&v1[..], v1].concat(), "v2 waits");
    assert!(c.wants_reroute() && !c.upstream_idle());
    // The answers come; only after the second is the upstream idle.
    let mut events = Vec::new();
    c.on_upstream_data(OK_5, &mut |e| events.push(e));
    assert!(!c.upstream_idle());
    c.on_upstream_data(&OK_5[..20], &mut |e| events.push(e));
    c.on_upstream_data(&OK_5[20..], &mut |e| events.push(e));
    assert!(c.upstream_idle() && c.upstream_reusable());
    use crate::wire::response::ResponseEvent::{Complete, Status};
    assert_eq!(events, [Status(200), Complete, Status(200), Complete]);
    // The driver drops that upstream: v2 goes to a new one, for its route.
    c.on_rerouted(&policy);
    answer_picks(&mut c, &policy, &mut Balancer::new());
    assert!(!c.wants_reroute() && c.wants_upstream());
    assert_eq!(c.upstream_route(), Some(UpstreamRoute { service: id, route: 1, subset: Some(1) }));
    assert_eq!(flush_upstream(&mut c, &policy), v2);
    assert_eq!(c.summary().requests_allowed, 3);
    assert_eq!(c.summary().refusal, None);
}

/// The request timeout's two outcomes depend on whether the answer has begun: before, a `504` can still be said;
/// after part of it went to the client, the answer is cut and nothing is added to it.
#[test]
fn a_timeout_before_the_answer_gets_504_and_one_during_it_is_a_cut_with_nothing_added() {
    let (policy, rule) = service_policy();
    let request = b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\n\r\n";
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, request, &policy);
    flush_upstream(&mut c, &policy);
    assert!(!c.answer_started());
    c.on_upstream_data(&OK_5[..OK_5.len() - 2], &mut |_| {});
    assert!(c.answer_started() && !c.upstream_idle() && !c.answer_end_unknown());
    c.on_answer_cut("answer not complete within 1 s");
    assert_eq!(c.summary().refusal, Some(Refusal::UpstreamTimeout));
    assert_eq!(c.summary().upstream_error, "answer not complete within 1 s");
    assert!(c.to_client().is_empty(), "no status after part of an answer");
    assert!(!c.wants_upstream());

    // A whole answer, then a second request with nothing back yet: a 504 may follow the first answer.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, request, &policy);
    flush_upstream(&mut c, &policy);
    c.on_upstream_data(OK_5, &mut |_| {});
    client_data(&mut c, request, &policy);
    flush_upstream(&mut c, &policy);
    assert!(!c.answer_started() && !c.upstream_idle());
    c.on_upstream_refused(Refusal::UpstreamTimeout, "no answer within 1 s");
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 504 Gateway Timeout"), "{answer}");

    // An answer whose end cannot be told (a malformed head): no deadline can be kept for it.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, request, &policy);
    flush_upstream(&mut c, &policy);
    c.on_upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", &mut |_| {});
    assert!(c.answer_end_unknown());
}

#[test]
fn a_weighted_route_picks_the_subset_of_every_request_on_a_keep_alive_connection() {
    let (policy, rule) = service_policy();
    let mut balancer = Balancer::new();
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    let split = b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: split\r\n\r\n";
    let mut subsets = Vec::new();
    for i in 0..4 {
        c.on_client_data(split, &policy);
        answer_picks(&mut c, &policy, &mut balancer);
        if i > 0 {
            // Half and half: each request goes to the other subset than the one before, so it needs another
            // upstream connection once the earlier answer is in.
            assert!(c.wants_reroute(), "request {i}");
            c.on_rerouted(&policy);
        }
        subsets.push(c.upstream_route().map(|r| r.subset));
        assert_eq!(flush_upstream(&mut c, &policy), split);
        c.on_upstream_data(OK_5, &mut |_| {});
        assert!(c.upstream_idle());
    }
    assert_eq!(subsets, [Some(Some(0)), Some(Some(1)), Some(Some(0)), Some(Some(1))]);
    assert_eq!(c.summary().requests_allowed, 4);
}

#[test]
fn unrouted_requests_get_404_and_moves_between_a_service_and_the_dialled_address_reroute() {
    let (policy, rule) = service_policy();
    // No route matches: 404 at once, never upstream.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, b"GET /x HTTP/1.1\r\nHost: svc.test\r\nwant: v3\r\n\r\n", &policy);
    assert!(!c.wants_upstream());
    assert_eq!(c.summary().refusal, Some(Refusal::NoRoute));
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 404 Not Found"), "{answer}");
    assert!(answer.contains("no route of the service for svc.test matches GET /x"), "{answer}");

    // Routed first, then a host that is not the service's: it goes to the dialled address, on a new upstream.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v2\r\n\r\n", &policy);
    flush_upstream(&mut c, &policy);
    client_data(&mut c, b"GET / HTTP/1.1\r\nHost: httpbin.test\r\n\r\n", &policy);
    assert!(flush_upstream(&mut c, &policy).is_empty() && c.wants_reroute());
    c.on_upstream_data(OK_5, &mut |_| {});
    c.on_rerouted(&policy);
    answer_picks(&mut c, &policy, &mut Balancer::new());
    assert_eq!(c.upstream_route(), None);
    assert_eq!(flush_upstream(&mut c, &policy), b"GET / HTTP/1.1\r\nHost: httpbin.test\r\n\r\n");

    // The other way round: the dialled address first, then the service.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, b"GET / HTTP/1.1\r\nHost: httpbin.test\r\n\r\n", &policy);
    assert_eq!(c.upstream_route(), None);
    flush_upstream(&mut c, &policy);
    client_data(&mut c, b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\n\r\n", &policy);
    assert!(c.wants_reroute());
    // The upstream closed before answering: what was judged for it is dropped, the request goes on.
    c.on_rerouted(&policy);
    answer_picks(&mut c, &policy, &mut Balancer::new());
    assert!(c.upstream_route().is_some() && c.wants_upstream());

    // Another dialled port: the service is not there; the request goes to the dialled address.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(8080);
    client_data(&mut c, b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v3\r\n\r\n", &policy);
    assert!(c.wants_upstream() && c.upstream_route().is_none());
}

#[test]
fn no_endpoint_answers_503_with_what_was_tried() {
    let (policy, rule) = service_policy();
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\n\r\n", &policy);
    assert!(c.wants_upstream());
    c.on_no_endpoint("203.0.113.20:443 (connection refused)");
    assert!(!c.wants_upstream());
    assert_eq!(c.summary().refusal, Some(Refusal::NoHealthyEndpoint));
    let answer = String::from_utf8_lossy(c.to_client()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable"), "{answer}");
    assert!(answer.contains("203.0.113.20:443 (connection refused)"), "{answer}");
}

#[test]
fn a_safe_request_alone_upstream_can_go_again_and_others_cannot() {
    let (policy, rule) = service_policy();
    let get = b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\n\r\n";
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, get, &policy);
    assert!(!c.can_retry(), "not sent yet");
    assert_eq!(flush_upstream(&mut c, &policy), get);
    assert!(c.can_retry());
    // The attempt failed: the same bytes go again on a new upstream connection.
    c.on_retry();
    assert!(c.wants_upstream());
    assert_eq!(flush_upstream(&mut c, &policy), get);
    // Once its answer starts, it is the client's.
    c.on_upstream_data(b"HTTP/1.1 2", &mut |_| {});
    assert!(!c.can_retry());

    // A POST is not safe to repeat; nor is a GET behind another one.
    let post = b"POST / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\nContent-Length: 2\r\n\r\nhi";
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, post, &policy);
    flush_upstream(&mut c, &policy);
    assert!(!c.can_retry());
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, &[&get[..], get].concat(), &policy);
    flush_upstream(&mut c, &policy);
    assert!(!c.can_retry(), "two outstanding");
}

#[test]
fn connection_close_stays_on_the_clients_hop_for_services_only() {
    let (policy, rule) = service_policy();
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(
        &mut c,
        b"GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\nwant: v1\r\nconnection: Keep-Alive\r\n\r\n",
        &policy,
    );
    assert_eq!(flush_upstream(&mut c, &policy), b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\n\r\n");
    assert!(c.client_asked_close());
    // An Upgrade stays whole (and the connection's framing opaque).
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    let upgrade =
        b"GET / HTTP/1.1\r\nHost: svc.test\r\nwant: v1\r\nConnection: close, Upgrade\r\nUpgrade: x\r\n\r\n";
    client_data(&mut c, upgrade, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), upgrade);
    // Not a service: forwarded untouched.
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    let plain = b"GET / HTTP/1.1\r\nHost: httpbin.test\r\nConnection: close\r\n\r\n";
    client_data(&mut c, plain, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), plain);
    assert!(!c.client_asked_close());
}

/// A TLS client shows only its SNI: when that name and the dialled port are a service's, the connection takes the
/// service's first route without conditions on the request, and its bytes (the ClientHello first) go untouched to
/// an endpoint of the subset picked. A service whose every route needs to see the request refuses it with an
/// alert; another port or a name that is no service's goes to the dialled address.
#[test]
fn a_client_hello_naming_a_service_splices_to_its_route_without_conditions() {
    let (policy, rule) = service_policy_with(true);
    let id = policy.services().lookup("svc.test", 80).unwrap();
    let hello = client_hello("svc.test");
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    c.on_client_data(&hello, &policy);
    assert!(!c.wants_upstream(), "no upstream before the subset is picked");
    let mut balancer = Balancer::new();
    answer_picks(&mut c, &policy, &mut balancer);
    let route = c.upstream_route().expect("routed to the service");
    assert_eq!((route.service, route.route), (id, 2), "the split route, the only one without conditions");
    assert!(route.subset.is_some());
    assert!(c.wants_upstream() && c.is_splicing());
    assert_eq!(flush_upstream(&mut c, &policy), hello, "the ClientHello goes upstream untouched");
    // What follows is TLS too: spliced, never read as HTTP, never answered by egressd.
    let records = b"\x17\x03\x03\x00\x03abcGET / HTTP/1.1\r\n\r\n";
    c.on_client_data(records, &policy);
    assert_eq!(flush_upstream(&mut c, &policy), records);
    assert_eq!((c.summary().refusal, c.summary().requests_allowed), (None, 0));
    // The subset is picked per connection by the route's weights: both subsets get connections.
    let mut subsets = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
        c.on_client_data(&hello, &policy);
        answer_picks(&mut c, &policy, &mut balancer);
        subsets.insert(c.upstream_route().and_then(|r| r.subset));
    }
    assert_eq!(subsets.len(), 2, "{subsets:?}");

    // Hostile: every route of the service matches on headers, which TLS hides. Refused with an alert at once,
    // nothing upstream, even though the rule allows the name.
    let (policy, rule) = service_policy();
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, &hello, &policy);
    assert!(!c.wants_upstream() && c.to_upstream().is_empty());
    assert_eq!(c.summary().refusal, Some(Refusal::NoRoute));
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 49], "a fatal access_denied alert");

    // Another dialled port, or a name that is no service's: the dialled address.
    for (name, port) in [("svc.test", 443), ("httpbin.test", 80)] {
        let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(port);
        client_data(&mut c, &client_hello(name), &policy);
        assert!(c.is_splicing() && c.upstream_route().is_none(), "{name}:{port}");
    }

    // No endpoint left for it: an internal_error alert (not the client's fault), not an HTTP status.
    let (policy, rule) = service_policy_with(true);
    let mut c = Connection::new(Instant::ZERO, rule, L7Limits::default()).with_dialled_port(80);
    client_data(&mut c, &hello, &policy);
    c.on_no_endpoint("203.0.113.21:443 (connection refused)");
    assert_eq!(c.to_client(), [21, 3, 3, 0, 2, 2, 80]);
    assert_eq!(c.summary().refusal, Some(Refusal::NoHealthyEndpoint));
    assert!(!c.wants_upstream());
}
