//! The L7 path's per-connection engine, sans-IO: what egressd decides about a TCP connection of an `l7` flow from
//! the bytes its client sends, and what it sends back.
//!
//! Where it sits: the worker punts every frame of an `l7` flow to the L7 threads, which terminate the client's
//! TCP connection (a smoltcp socket listening on exactly the address the client dialled) and open their own
//! connection upstream from the group's egress IP. Between the two sockets sits one [`Connection`] per client
//! connection. It never touches a socket, a thread or a clock: the driver passes time in, feeds it bytes, and
//! does what it asks (connect upstream, send these bytes there, send this refusal to the client, close). So every
//! decision is tested here without a network, as quinn-proto tests QUIC.
//!
//! What it decides, in order:
//! 1. **Classify** the first bytes: a TLS handshake record → TLS; an HTTP method token → HTTP/1.1; anything else
//!    is refused. Within [`L7Limits::classify_timeout_nanos`] and [`L7Limits::max_head_bytes`]: a client that sends
//!    nothing, or a head that never ends, is closed at the deadline or the cap.
//! 2. **TLS**: read the ClientHello ([`crate::wire::tls`]), check its server name against the rule's host
//!    patterns and its newest version against the rule's minimum. Allowed → connect upstream, replay the
//!    buffered bytes, then splice both ways untouched (egressd never decrypts). Refused → a fatal alert, close.
//! 3. **HTTP/1.1**: read every request head ([`crate::wire::http`]) on the connection, judge its Host, then
//!    forward exactly its head and body (Content-Length or chunked framing) before reading the next head. A
//!    request for a host the rule does not allow is answered `403` with a one-line reason and `Connection:
//!    close`, and nothing of it reaches upstream, even after allowed requests on the same keep-alive connection.
//!    An ambiguous request (smuggling shapes) is answered `400`.
//!
//! A request refused after allowed ones on the same connection: its bytes are dropped at once, but its refusal
//! must reach the client after the upstream's responses to the earlier requests. [`Connection::refusal_waits`]
//! says so; the driver then half-closes the upstream after the judged bytes, relays the upstream's responses
//! until it closes, and only then sends [`Connection::to_client`] and closes.
//!
//! Memory per connection is bounded from the start (the head buffer, and for TLS the scratch buffer made when
//! the first byte says TLS), so the L7 threads' memory is bounded by their connection limit.

use std::fmt;

use crate::policy::l7::{RateLimit, RequestDenial};
use crate::policy::service::ServiceId;
use crate::policy::{PolicySnapshot, RuleId};
use crate::time::Instant;
use crate::wire::http::{self, BodyFraming, ChunkedBody, HttpError};
use crate::wire::response::{ResponseEvent, ResponseFramer};
use crate::wire::tls::{self, HelloError};

/// Bounds of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L7Limits {
    /// Time from the connection's start to a decision on its first bytes.
    pub classify_timeout_nanos: u64,
    /// Bytes buffered before a decision (a ClientHello, or one request head); the TLS scratch buffer has the same
    /// size.
    pub max_head_bytes: usize,
    /// Check that the address the client dialled is among the DNS answers for the name it presents (the SNI, or
    /// each request's Host): an allowed name sent to any other address (domain fronting by IP) is refused.
    pub verify_destination: bool,
}

impl Default for L7Limits {
    fn default() -> Self {
        L7Limits {
            classify_timeout_nanos: 10_000_000_000,
            max_head_bytes: 16 * 1024,
            verify_destination: false,
        }
    }
}

/// Why a connection (or one of its requests) was refused. `as_str` is the metric label and audit reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The first bytes are neither a TLS handshake nor an HTTP request.
    NotTlsOrHttp,
    /// The ClientHello was unusable (malformed, no or several server names, an IP literal, too large).
    BadClientHello(HelloError),
    /// The request head was unusable or ambiguous.
    BadRequest(HttpError),
    /// The name (SNI or Host) matches none of the rule's host patterns.
    HostNotAllowed,
    /// The request's method, path or headers do not meet the rule's conditions.
    RequestNotAllowed(RequestDenial),
    /// The ClientHello offers nothing as new as the rule's `min_tls_version`.
    TlsVersionTooOld,
    /// TLS under a rule with HTTP conditions, which only plaintext requests can meet.
    TlsNeedsPlaintext,
    /// Nothing decidable arrived before the deadline.
    Timeout,
    /// The dialled address is not among the DNS answers for the name (or the name did not resolve).
    DestinationMismatch,
    /// The head did not end within the byte cap.
    TooLarge,
    /// The client address made more requests under the rule than its `rate_limit` allows.
    RateLimited,
    /// Under TLS origination, a later request on the connection named another host than the first (the upstream
    /// TLS session was made for that one).
    HostChanged,
    /// The TLS egressd originated towards the destination failed (handshake, certificate, or the connection).
    UpstreamTlsFailed,
    /// The rule's clients already hold `max_upstream_connections` upstream connections.
    UpstreamConnectionLimit,
    /// The request names a service, but none of its routes matches it.
    NoRoute,
    /// No endpoint of the service's subset could be connected to.
    NoHealthyEndpoint,
    /// The service's upstream connections and its queue of requests waiting for one are full.
    ServiceOverloaded,
    /// The upstream did not start answering within the request timeout.
    UpstreamTimeout,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotTlsOrHttp => "not_tls_or_http",
            Refusal::BadClientHello(e) => e.as_str(),
            Refusal::BadRequest(e) => e.as_str(),
            Refusal::HostNotAllowed => "host_not_allowed",
            Refusal::RequestNotAllowed(d) => d.as_str(),
            Refusal::TlsVersionTooOld => "tls_version_too_old",
            Refusal::TlsNeedsPlaintext => "http_rules_need_plaintext",
            Refusal::Timeout => "classify_timeout",
            Refusal::DestinationMismatch => "destination_not_in_dns",
            Refusal::TooLarge => "head_too_large",
            Refusal::RateLimited => "rate_limited",
            Refusal::HostChanged => "host_changed",
            Refusal::UpstreamTlsFailed => "upstream_tls_failed",
            Refusal::UpstreamConnectionLimit => "upstream_connection_limit",
            Refusal::NoRoute => "no_route",
            Refusal::NoHealthyEndpoint => "no_healthy_endpoint",
            Refusal::ServiceOverloaded => "service_overloaded",
            Refusal::UpstreamTimeout => "upstream_timeout",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the connection carries, once classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http,
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for enough bytes to classify.
    Classifying,
    /// TLS, waiting for the whole ClientHello.
    ClientHello,
    /// TLS allowed: bytes go through untouched, both ways.
    Splicing,
    /// HTTP, waiting for a whole request head.
    RequestHead,
    /// HTTP, forwarding `left` more body bytes of an allowed request.
    Body { left: u64 },
    /// HTTP, forwarding a chunked body of an allowed request.
    Chunked(ChunkedBody),
    /// Refused: the refusal response (if any) goes to the client, then the connection closes.
    Refused(Refusal),
    /// Allowed by name, waiting for the DNS answer that says whether the dialled address is the name's.
    VerifyingTls,
    /// The same for a request head of `head_len` bytes framed by `body`.
    VerifyingRequest { head_len: usize, body: BodyFraming },
    /// Allowed by the rule, waiting for its rate limit to admit the request (or the TLS connection).
    Admitting(Admitted),
    /// An allowed request of `head_len` bytes framed by `body` goes elsewhere than the earlier ones: waiting for the
    /// upstream to finish answering them (see [`Connection::wants_reroute`]).
    Rerouting { head_len: usize, body: BodyFraming },
    /// An allowed request for a service's route, waiting for the driver to pick its subset (see
    /// [`Connection::take_subset_pick`]).
    Picking { head_len: usize, body: BodyFraming },
    /// An allowed ClientHello naming a service, waiting for the driver to pick its subset; then it splices.
    PickingTls,
}

/// Where a connection's upstream goes under a service: the service, the route its requests matched, and the subset
/// picked for them (`None`: every endpoint of the service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamRoute {
    pub service: ServiceId,
    pub route: usize,
    pub subset: Option<usize>,
}

/// What an admitted request goes on to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admitted {
    Tls,
    Request { head_len: usize, body: BodyFraming },
}

/// What is known of the connection, for its access log line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub protocol: Option<Protocol>,
    /// The SNI or the Host of the last request judged.
    pub name: String,
    pub method: String,
    pub path: String,
    /// HTTP requests allowed on this connection.
    pub requests_allowed: u32,
    pub refusal: Option<Refusal>,
    /// Bytes from the client forwarded upstream.
    pub bytes_up: u64,
    /// Refusals a dry run let through (the last one), for the logs.
    pub dry_run_refusal: Option<Refusal>,
    /// With a [`Refusal::RateLimited`]: seconds until the client may try again.
    pub retry_after_secs: u64,
    /// With a [`Refusal::UpstreamTlsFailed`]: what failed.
    pub upstream_error: String,
}

/// One client connection of an `l7` flow. See the module docs.
pub struct Connection {
    rule: RuleId,
    limits: L7Limits,
    deadline: Instant,
    /// HTTP: the head being read is held to `deadline` (slowloris). The first head keeps the connection's
    /// deadline; a later one on a keep-alive connection gets its own from its first byte, armed at the next
    /// [`Connection::on_timeout`] (`head_arm_pending`), since client bytes come in without the time. A connection
    /// idle between requests has no head deadline (a slow upstream answer is not the client's fault).
    head_armed: bool,
    head_arm_pending: bool,
    state: State,
    /// Client bytes not yet forwarded (the buffered head); never longer than `limits.max_head_bytes`.
    pending: Vec<u8>,
    /// `pending[..ready]` is judged and may go upstream.
    ready: usize,
    /// Where a ClientHello split over records is gathered (empty until the connection turns out to be TLS).
    scratch: Box<[u8]>,
    upstream_wanted: bool,
    upstream_connected: bool,
    /// The name the driver must resolve to verify the destination (see [`L7Limits::verify_destination`]).
    to_resolve: Option<String>,
    /// The last name whose answers included the dialled address.
    verified_name: Option<String>,
    /// The rate limit the driver must check before the judged request goes on (see [`Connection::take_admission`]).
    to_admit: Option<RateLimit>,
    /// Under TLS origination: the Host of the first request, which the upstream TLS session is for.
    pinned_host: Option<String>,
    /// The port the client dialled (services are found by Host and this port).
    dialled_port: u16,
    /// The service, route and subset the upstream connection is for (`None`: the dialled address).
    route: Option<UpstreamRoute>,
    /// The service and route of the request being judged.
    judged_route: Option<(ServiceId, usize)>,
    /// The subset picked for the request being judged (`None`: not picked yet; `Some(None)`: every endpoint).
    judged_subset: Option<Option<usize>>,
    /// The route whose subset the driver must pick (see [`Connection::take_subset_pick`]).
    to_pick: Option<(ServiceId, usize)>,
    /// The responses on the upstream connection, as they go by.
    responses: ResponseFramer,
    /// The last request sent, if it may be sent again (see [`Connection::can_retry`]); whether it is a `HEAD`.
    retry_copy: Vec<u8>,
    retry_head: bool,
    /// The client asked to close after its last request (`Connection: close`), which did not go upstream.
    client_asked_close: bool,
    /// The refusal response still to be sent to the client, and how much of it was sent.
    to_client: Vec<u8>,
    to_client_sent: usize,
    summary: Summary,
}

impl Connection {
    /// A connection of the flow the policy sent to the L7 path under `rule`, starting at `now`.
    pub fn new(now: Instant, rule: RuleId, limits: L7Limits) -> Connection {
        Connection {
            rule,
            limits,
            deadline: now.saturating_add(std::time::Duration::from_nanos(limits.classify_timeout_nanos)),
            head_armed: false,
            head_arm_pending: false,
            state: State::Classifying,
            pending: Vec::with_capacity(limits.max_head_bytes),
            ready: 0,
            scratch: Box::default(),
            upstream_wanted: false,
            upstream_connected: false,
            to_resolve: None,
            verified_name: None,
            to_admit: None,
            pinned_host: None,
            dialled_port: 0,
            route: None,
            judged_route: None,
            judged_subset: None,
            to_pick: None,
            responses: ResponseFramer::new(),
            retry_copy: Vec::new(),
            retry_head: false,
            client_asked_close: false,
            to_client: Vec::new(),
            to_client_sent: 0,
            summary: Summary::default(),
        }
    }

    /// A judged request goes to another service, route or the dialled address than the upstream connection is
    /// for: once the upstream has answered every earlier request ([`Connection::upstream_idle`]) or closed, the
    /// driver drops that connection and calls [`Connection::on_rerouted`].
    pub fn wants_reroute(&self) -> bool {
        matches!(self.state, State::Rerouting { .. })
    }

    /// The upstream connection is gone: the waiting request goes on, to a new upstream connection for its route.
    pub fn on_rerouted(&mut self, policy: &PolicySnapshot) {
        let State::Rerouting { head_len, body } = self.state else { return };
        // Judged for the old upstream but never sent (it closed first): gone with it.
        self.pending.drain(..self.ready);
        self.ready = 0;
        self.upstream_connected = false;
        self.responses = ResponseFramer::new();
        self.route = self.judged_upstream();
        self.forward_request(head_len, body);
        self.advance(policy);
    }

    /// Bytes the upstream sent (relayed to the client as they are): `event` hears each final response's status and
    /// end.
    pub fn on_upstream_data(&mut self, data: &[u8], event: &mut impl FnMut(ResponseEvent)) {
        if self.summary.protocol == Some(Protocol::Http) {
            self.responses.feed(data, event);
        }
    }

    /// Whether the request upstream may be sent again now: it is safe to repeat, the only one outstanding, and
    /// nothing of its answer has come (so nothing of it reached the client).
    pub fn can_retry(&self) -> bool {
        !self.retry_copy.is_empty()
            && self.ready == 0
            && self.responses.outstanding() == 1
            && self.responses.at_response_start()
    }

    /// The upstream failed the request (a gateway error, a reset before any answer): it goes again, first thing,
    /// on a new upstream connection the driver opens. Answer bytes of the failed attempt must not reach the client.
    pub fn on_retry(&mut self) {
        if self.retry_copy.is_empty() {
            return;
        }
        let copy = std::mem::take(&mut self.retry_copy);
        self.pending.splice(0..0, copy.iter().copied());
        self.ready += copy.len();
        self.retry_copy = copy;
        self.responses = ResponseFramer::new();
        self.responses.on_request(if self.retry_head { "HEAD" } else { "GET" });
        self.upstream_connected = false;
        self.upstream_wanted = true;
    }

    /// A request to a service asked to close the connection (the header stayed on the client's side): once its
    /// answers are through, the driver closes the client's connection and may keep the upstream one.
    pub fn client_asked_close(&self) -> bool {
        self.client_asked_close
    }

    /// Every request sent upstream was answered in full.
    pub fn upstream_idle(&self) -> bool {
        self.responses.is_idle()
    }

    /// The upstream connection may be kept for another client: HTTP, idle, framing known all along.
    pub fn upstream_reusable(&self) -> bool {
        self.summary.protocol == Some(Protocol::Http)
            && self.responses.is_idle()
            && !self.responses.is_opaque()
    }

    /// The port the client dialled, which finds services by (Host, port); without it no service matches.
    pub fn with_dialled_port(mut self, port: u16) -> Connection {
        self.dialled_port = port;
        self
    }

    /// The service, route and subset the upstream connection is for (set by the request it was opened for), if
    /// any.
    pub fn upstream_route(&self) -> Option<UpstreamRoute> {
        self.route
    }

    /// Where the request being judged goes, once its subset is picked.
    fn judged_upstream(&self) -> Option<UpstreamRoute> {
        self.judged_route.map(|(service, route)| UpstreamRoute {
            service,
            route,
            subset: self.judged_subset.flatten(),
        })
    }

    /// A request for a service's route was allowed: the driver picks the subset it goes to (taken: asked once),
    /// per request as Envoy's weighted clusters do, and answers with [`Connection::on_subset_picked`].
    pub fn take_subset_pick(&mut self) -> Option<(ServiceId, usize)> {
        self.to_pick.take()
    }

    /// The subset the request goes to (`None`: any endpoint of the service). When it differs from the upstream
    /// connection's, the request waits for a connection of its own (see [`Connection::wants_reroute`]).
    pub fn on_subset_picked(&mut self, subset: Option<usize>, policy: &PolicySnapshot) {
        match self.state {
            State::Picking { head_len, body } => {
                self.judged_subset = Some(subset);
                self.forward_request(head_len, body);
                self.advance(policy);
            }
            State::PickingTls => {
                self.judged_subset = Some(subset);
                self.splice();
            }
            _ => {}
        }
    }

    /// Whether a request routed to `routed` (a service's route and subset, or `None`: the dialled address) would go
    /// elsewhere than the connection's earlier requests.
    fn route_changes(&self, routed: Option<UpstreamRoute>) -> bool {
        match self.route {
            Some(pinned) => routed != Some(pinned),
            None => routed.is_some() && self.summary.requests_allowed > 0,
        }
    }

    /// Takes bytes the client sent; returns how many it took. Fewer than `data.len()` means "not now": the driver
    /// keeps the rest in the client socket (TCP flow control pushes back) and offers them again after draining
    /// [`Connection::to_upstream`].
    pub fn on_client_data(&mut self, data: &[u8], policy: &PolicySnapshot) -> usize {
        if matches!(self.state, State::Refused(_)) {
            // Nothing more of the client's reaches anywhere; the driver is closing.
            return data.len();
        }
        // The buffer never grows past its cap: what does not fit waits in the client socket.
        let room = self.limits.max_head_bytes.saturating_sub(self.pending.len());
        let take = room.min(data.len());
        self.pending.extend_from_slice(&data[..take]);
        if self.state == State::Splicing {
            self.ready = self.pending.len();
        } else {
            self.advance(policy);
        }
        take
    }

    /// Runs the state machine over the buffered bytes until it needs more.
    fn advance(&mut self, policy: &PolicySnapshot) {
        loop {
            let unjudged = &self.pending[self.ready..];
            match self.state {
                State::Classifying => match unjudged.first() {
                    None => return,
                    Some(&tls::CONTENT_HANDSHAKE) => {
                        self.summary.protocol = Some(Protocol::Tls);
                        self.state = State::ClientHello;
                        // Only TLS connections need it: plain HTTP ones never pay for zeroing it.
                        self.scratch = vec![0; self.limits.max_head_bytes].into_boxed_slice();
                    }
                    Some(b) if b.is_ascii_uppercase() => {
                        self.summary.protocol = Some(Protocol::Http);
                        self.head_armed = true;
                        self.state = State::RequestHead;
                    }
                    Some(_) => return self.refuse(Refusal::NotTlsOrHttp),
                },
                State::ClientHello => {
                    let hello = match tls::parse_client_hello(unjudged, &mut self.scratch) {
                        Err(HelloError::Incomplete) => return self.refuse_if_full(),
                        Err(e) => return self.refuse(Refusal::BadClientHello(e)),
                        Ok(hello) => hello,
                    };
                    self.summary.name = hello.server_name.to_ascii_lowercase();
                    let max_version = hello.max_version;
                    let conditions = policy.l7_conditions(self.rule).map(|c| c.conditions());
                    // A service named by the SNI and the dialled port: the route a TLS client can take (one
                    // without conditions on the request, which stays encrypted).
                    let services = policy.services();
                    let routed = services
                        .lookup(&self.summary.name, self.dialled_port)
                        .and_then(|id| services.get(id).map(|s| (id, s.tls_route())));
                    let why = if !policy.host_allowed(self.rule, &self.summary.name) {
                        Some(Refusal::HostNotAllowed)
                    } else if let Some((_, None)) = routed {
                        // Nowhere to send it, even in a dry run.
                        return self.refuse(Refusal::NoRoute);
                    } else if conditions.is_some_and(|c| c.needs_plaintext()) {
                        Some(Refusal::TlsNeedsPlaintext)
                    } else if conditions.and_then(|c| c.min_tls_version).is_some_and(|min| max_version < min)
                    {
                        Some(Refusal::TlsVersionTooOld)
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        if self.refused(why, policy) {
                            return;
                        }
                    }
                    self.judged_route = routed.and_then(|(id, r)| r.map(|r| (id, r)));
                    if let Some(limit) = conditions.and_then(|c| c.rate_limit) {
                        self.to_admit = Some(limit);
                        self.state = State::Admitting(Admitted::Tls);
                        return;
                    }
                    return self.tls_allowed();
                }
                State::Splicing
                | State::VerifyingTls
                | State::VerifyingRequest { .. }
                | State::Admitting(_)
                | State::Rerouting { .. }
                | State::Picking { .. }
                | State::PickingTls => return,
                State::RequestHead => {
                    if unjudged.is_empty() {
                        return;
                    }
                    if !self.head_armed {
                        self.head_arm_pending = true;
                    }
                    let mut headers = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
                    let head = match http::parse_request(unjudged, &mut headers) {
                        Err(HttpError::Incomplete) => return self.refuse_if_full(),
                        Err(e) => return self.refuse(Refusal::BadRequest(e)),
                        Ok(head) => head,
                    };
                    self.summary.name.clear();
                    self.summary.name.push_str(&head.host.to_ascii_lowercase());
                    self.summary.method.clear();
                    self.summary.method.push_str(head.method);
                    self.summary.path.clear();
                    self.summary.path.push_str(head.path);
                    let (mut head_len, body, asks_close) = (head.head_len, head.body, head.close);
                    // A service named by the Host and the dialled port: its route for this request.
                    let services = policy.services();
                    let routed = services.lookup(&self.summary.name, self.dialled_port).and_then(|id| {
                        services.get(id).map(|s| (id, s.route(head.method, head.path, |n| head.header(n))))
                    });
                    // To a service, `Connection: close` / `keep-alive` concern the client's hop only: they stay
                    // here (the upstream connection may serve the next client; egressd closes the client's after
                    // its answers). The header lines' places in the head, to cut before forwarding.
                    let mut hop_lines = [(0usize, 0usize); 4];
                    let mut hops = 0;
                    if routed.is_some() && head.minor_version == 1 {
                        let base = unjudged.as_ptr() as usize;
                        for h in head.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")) {
                            let only_close_or_keep_alive = std::str::from_utf8(h.value).is_ok_and(|v| {
                                v.split(',').map(str::trim).all(|t| {
                                    t.eq_ignore_ascii_case("close") || t.eq_ignore_ascii_case("keep-alive")
                                })
                            });
                            let start = (h.name.as_ptr() as usize).checked_sub(base);
                            let value_end = (h.value.as_ptr() as usize)
                                .checked_sub(base)
                                .map(|v| v + h.value.len())
                                .filter(|v| *v <= head_len);
                            let end = value_end.and_then(|v| {
                                unjudged[v..head_len].windows(2).position(|w| w == b"\r\n").map(|p| v + p + 2)
                            });
                            match (only_close_or_keep_alive, start, end, hop_lines.get_mut(hops)) {
                                (true, Some(start), Some(end), Some(slot)) if start < end => {
                                    *slot = (start, end);
                                    hops += 1;
                                }
                                _ => {
                                    hops = 0;
                                    break;
                                }
                            }
                        }
                    }
                    let originating = routed.is_none()
                        && policy
                            .l7_conditions(self.rule)
                            .is_some_and(|c| c.conditions().upstream_tls.is_some());
                    let why = if !policy.host_allowed(self.rule, &self.summary.name) {
                        Some(Refusal::HostNotAllowed)
                    } else if let Some((_, None)) = routed {
                        Some(Refusal::NoRoute)
                    } else if originating
                        && self.pinned_host.as_ref().is_some_and(|h| *h != self.summary.name)
                    {
                        Some(Refusal::HostChanged)
                    } else {
                        policy.l7_conditions(self.rule).and_then(|c| {
                            c.check_request(head.method, head.path, |n| head.header(n))
                                .err()
                                .map(Refusal::RequestNotAllowed)
                        })
                    };
                    if let Some(why) = why {
                        // Without a route there is nowhere to send the request, even in a dry run.
                        let routing = why == Refusal::NoRoute;
                        if routing {
                            return self.refuse(why);
                        }
                        if self.refused(why, policy) {
                            return;
                        }
                    }
                    self.judged_route = routed.map(|(id, r)| (id, r.unwrap_or(0)));
                    self.judged_subset = None;
                    for &(start, end) in hop_lines[..hops].iter().rev() {
                        self.pending.drain(self.ready + start..self.ready + end);
                        head_len -= end - start;
                    }
                    if routed.is_some() {
                        self.client_asked_close = asks_close;
                    }
                    if originating && self.pinned_host.is_none() {
                        self.pinned_host = Some(self.summary.name.clone());
                    }
                    if let Some(limit) =
                        policy.l7_conditions(self.rule).and_then(|c| c.conditions().rate_limit)
                    {
                        self.to_admit = Some(limit);
                        self.state = State::Admitting(Admitted::Request { head_len, body });
                        return;
                    }
                    if !self.request_allowed(head_len, body) {
                        return;
                    }
                }
                State::Body { left } => {
                    let take = unjudged.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if take == 0 {
                        return;
                    }
                    self.ready += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { State::RequestHead } else { State::Body { left } };
                }
                State::Chunked(mut body) => {
                    if unjudged.is_empty() {
                        return;
                    }
                    match body.advance(unjudged) {
                        Ok(n) => self.ready += n,
                        Err(e) => return self.refuse(Refusal::BadRequest(e)),
                    }
                    if !body.is_done() {
                        self.state = State::Chunked(body);
                        return;
                    }
                    self.state = State::RequestHead;
                }
                State::Refused(_) => return,
            }
        }
    }

    /// An allowed ClientHello: on to destination verification, or straight to splicing.
    fn tls_allowed(&mut self) {
        if self.limits.verify_destination {
            self.to_resolve = Some(self.summary.name.clone());
            self.state = State::VerifyingTls;
            return;
        }
        self.splice();
    }

    /// A TLS connection allowed in full: its bytes go through untouched from now on, to the dialled address, or
    /// (its SNI naming a service) once the driver picked the subset, to one of the service's endpoints.
    fn splice(&mut self) {
        if let (Some(route), None) = (self.judged_route, self.judged_subset) {
            self.to_pick = Some(route);
            self.state = State::PickingTls;
            return;
        }
        self.route = self.judged_upstream();
        self.upstream_wanted = true;
        self.ready = self.pending.len();
        self.state = State::Splicing;
    }

    /// An allowed request head: forwarded, unless its name must be verified first (then `false`: wait).
    fn request_allowed(&mut self, head_len: usize, body: BodyFraming) -> bool {
        if self.limits.verify_destination && self.verified_name.as_deref() != Some(&self.summary.name) {
            self.to_resolve = Some(self.summary.name.clone());
            self.state = State::VerifyingRequest { head_len, body };
            return false;
        }
        self.forward_request(head_len, body);
        true
    }

    /// Under TLS origination: the host the upstream TLS session is for (the first request's Host).
    pub fn upstream_host(&self) -> Option<&str> {
        self.pinned_host.as_deref()
    }

    /// The TLS egressd originated failed (`detail`: why, for the client and the audit line): what was judged and
    /// not sent is dropped, the client gets `502` and the connection closes.
    pub fn on_upstream_tls_failed(&mut self, detail: &str) {
        if matches!(self.state, State::Refused(_)) {
            return;
        }
        self.summary.upstream_error = detail.to_string();
        self.pending.clear();
        self.ready = 0;
        self.refuse(Refusal::UpstreamTlsFailed);
    }

    /// The rule's upstream connection limit is reached: nothing judged goes anywhere; the client gets `503`
    /// (TLS: an `access_denied` alert) and the connection closes.
    pub fn on_upstream_busy(&mut self) {
        if matches!(self.state, State::Refused(_)) {
            return;
        }
        self.pending.clear();
        self.ready = 0;
        self.upstream_wanted = false;
        self.refuse(Refusal::UpstreamConnectionLimit);
    }

    /// No endpoint of the route's subset took the connection (`detail`: what was tried): nothing judged goes
    /// anywhere; the client gets `503` and the connection closes.
    pub fn on_no_endpoint(&mut self, detail: &str) {
        self.on_upstream_refused(Refusal::NoHealthyEndpoint, detail);
    }

    /// The upstream side refuses the connection's requests: no endpoint ([`Refusal::NoHealthyEndpoint`], `503`),
    /// a full service ([`Refusal::ServiceOverloaded`], `503`), or no answer in time ([`Refusal::UpstreamTimeout`],
    /// `504`). What was judged and not sent is dropped; the client gets the status (after what the upstream already
    /// answered) and the connection closes.
    pub fn on_upstream_refused(&mut self, why: Refusal, detail: &str) {
        if matches!(self.state, State::Refused(_)) {
            return;
        }
        self.summary.upstream_error = detail.to_string();
        self.pending.clear();
        self.ready = 0;
        self.upstream_wanted = false;
        self.refuse(why);
    }

    /// Part of an answer already reached the client when the upstream ran out of time: no status can follow it, so
    /// the driver resets the client. Recorded as [`Refusal::UpstreamTimeout`] with `detail`; nothing more is sent
    /// either way.
    pub fn on_answer_cut(&mut self, detail: &str) {
        if matches!(self.state, State::Refused(_)) {
            return;
        }
        self.on_upstream_refused(Refusal::UpstreamTimeout, detail);
        // The 504 written for it cannot follow part of an answer.
        self.to_client.clear();
    }

    /// Something of the next answer has come from upstream (and gone to the client): a refusal can no longer be
    /// said in its place.
    pub fn answer_started(&self) -> bool {
        !self.responses.at_response_start()
    }

    /// Where the upstream's answers end is no longer known (an upgraded or malformed exchange): a deadline for
    /// "the whole answer" cannot be kept.
    pub fn answer_end_unknown(&self) -> bool {
        self.responses.is_framing_lost()
    }

    /// The rate limit the driver must ask about the request just judged (taken: asked once); answer with
    /// [`Connection::on_admitted`].
    pub fn take_admission(&mut self) -> Option<RateLimit> {
        self.to_admit.take()
    }

    /// The rate limit's answer: admitted, or refused with the seconds until the client may retry (`429` with
    /// `Retry-After` for HTTP, an `access_denied` alert for TLS).
    pub fn on_admitted(&mut self, admitted: Result<(), u64>, policy: &PolicySnapshot) {
        let State::Admitting(next) = self.state else { return };
        if let Err(secs) = admitted {
            self.summary.retry_after_secs = secs;
            if self.refused(Refusal::RateLimited, policy) {
                return;
            }
        }
        match next {
            Admitted::Tls => self.tls_allowed(),
            Admitted::Request { head_len, body } => {
                if self.request_allowed(head_len, body) {
                    self.advance(policy);
                }
            }
        }
    }

    /// Lets an allowed request head through and follows its body.
    fn forward_request(&mut self, head_len: usize, body: BodyFraming) {
        if let (Some(route), None) = (self.judged_route, self.judged_subset) {
            self.to_pick = Some(route);
            self.state = State::Picking { head_len, body };
            return;
        }
        let judged = self.judged_upstream();
        if self.route_changes(judged) {
            self.state = State::Rerouting { head_len, body };
            return;
        }
        self.route = judged;
        if self.summary.protocol == Some(Protocol::Http) {
            // A request safe to repeat (an idempotent method without a body) that is the only one upstream: kept,
            // so that a gateway error or a reset before its answer can send it again elsewhere.
            let safe =
                matches!(self.summary.method.as_str(), "GET" | "HEAD" | "OPTIONS" | "TRACE" | "DELETE")
                    && body == BodyFraming::None;
            self.retry_copy.clear();
            self.retry_head = false;
            if safe && self.responses.outstanding() == 0 {
                self.retry_copy.extend_from_slice(&self.pending[self.ready..self.ready + head_len]);
                self.retry_head = self.summary.method == "HEAD";
            }
            self.responses.on_request(&self.summary.method);
        }
        self.summary.requests_allowed += 1;
        self.head_armed = false;
        self.head_arm_pending = false;
        self.upstream_wanted = true;
        self.ready += head_len;
        self.state = match body {
            BodyFraming::None => State::RequestHead,
            BodyFraming::Length(left) => State::Body { left },
            BodyFraming::Chunked => State::Chunked(ChunkedBody::new()),
        };
    }

    /// The name the driver must resolve before the connection can go on (taken: asked once).
    pub fn take_resolution(&mut self) -> Option<String> {
        self.to_resolve.take()
    }

    /// The DNS answers for the name being verified: the dialled address `dialled` must be among them (an empty
    /// list: the name did not resolve). Then the connection goes on as if the name alone had been checked.
    pub fn on_resolved(
        &mut self,
        answers: &[std::net::Ipv4Addr],
        dialled: std::net::Ipv4Addr,
        policy: &PolicySnapshot,
    ) {
        let verified = answers.contains(&dialled);
        match self.state {
            State::VerifyingTls if verified => {
                self.verified_name = Some(self.summary.name.clone());
                self.splice();
            }
            State::VerifyingRequest { head_len, body } if verified => {
                self.verified_name = Some(self.summary.name.clone());
                self.forward_request(head_len, body);
                self.advance(policy);
            }
            state @ (State::VerifyingTls | State::VerifyingRequest { .. }) => {
                if self.refused(Refusal::DestinationMismatch, policy) {
                    return;
                }
                // Dry run: recorded, and the connection goes on as if verified.
                self.verified_name = Some(self.summary.name.clone());
                if let State::VerifyingRequest { head_len, body } = state {
                    self.forward_request(head_len, body);
                    self.advance(policy);
                } else {
                    self.splice();
                }
            }
            _ => {}
        }
    }

    /// A policy refusal: refuses, unless the rule (or the policy) is in dry run, which lets it through and
    /// records it. Returns whether the connection was refused.
    fn refused(&mut self, why: Refusal, policy: &PolicySnapshot) -> bool {
        if policy.l7_dry_run(self.rule) {
            self.summary.dry_run_refusal = Some(why);
            return false;
        }
        self.refuse(why);
        true
    }

    /// A head still incomplete when the buffer is full will never fit.
    fn refuse_if_full(&mut self) {
        if self.pending.len() >= self.limits.max_head_bytes {
            self.refuse(Refusal::TooLarge);
        }
    }

    fn refuse(&mut self, why: Refusal) {
        self.summary.refusal = Some(why);
        // What was judged before (earlier allowed requests) still goes; the refused request's bytes never do.
        self.pending.truncate(self.ready);
        self.to_client.clear();
        match self.summary.protocol {
            Some(Protocol::Tls) => self.to_client.extend_from_slice(&tls_alert(why)),
            Some(Protocol::Http) => self.write_http_refusal(why),
            None => {}
        }
        self.state = State::Refused(why);
    }

    fn write_http_refusal(&mut self, why: Refusal) {
        use std::io::Write;
        let (status, body) = match why {
            Refusal::HostNotAllowed => (
                "403 Forbidden",
                format!("egressd: host {} is not allowed by this rule\n", self.summary.name),
            ),
            Refusal::RequestNotAllowed(d) => (
                "403 Forbidden",
                format!(
                    "egressd: {} {} on {} is not allowed by this rule ({})\n",
                    self.summary.method,
                    self.summary.path,
                    self.summary.name,
                    d.as_str()
                ),
            ),
            Refusal::DestinationMismatch => (
                "403 Forbidden",
                format!(
                    "egressd: {} does not resolve to the address this connection dialled\n",
                    self.summary.name
                ),
            ),
            Refusal::TooLarge => {
                ("431 Request Header Fields Too Large", "egressd: request head too large\n".into())
            }
            Refusal::HostChanged => (
                "421 Misdirected Request",
                format!(
                    "egressd: this connection's TLS to the server is for {}; send requests for {} on a new \
                     connection\n",
                    self.pinned_host.as_deref().unwrap_or(""),
                    self.summary.name
                ),
            ),
            Refusal::UpstreamConnectionLimit => (
                "503 Service Unavailable",
                "egressd: this rule's upstream connections are all in use; try again\n".to_string(),
            ),
            Refusal::NoRoute => (
                "404 Not Found",
                format!(
                    "egressd: no route of the service for {} matches {} {}\n",
                    self.summary.name, self.summary.method, self.summary.path
                ),
            ),
            Refusal::ServiceOverloaded => (
                "503 Service Unavailable",
                format!(
                    "egressd: the service's connections and waiting requests are at their limits: {}\n",
                    self.summary.upstream_error
                ),
            ),
            Refusal::UpstreamTimeout => (
                "504 Gateway Timeout",
                format!("egressd: the server did not answer in time: {}\n", self.summary.upstream_error),
            ),
            Refusal::NoHealthyEndpoint => (
                "503 Service Unavailable",
                format!("egressd: no endpoint of the service answered: {}\n", self.summary.upstream_error),
            ),
            Refusal::UpstreamTlsFailed => (
                "502 Bad Gateway",
                format!("egressd: TLS to the server failed: {}\n", self.summary.upstream_error),
            ),
            Refusal::RateLimited => (
                "429 Too Many Requests",
                format!(
                    "egressd: too many requests from this address under this rule; retry in {} s\n",
                    self.summary.retry_after_secs
                ),
            ),
            other => ("400 Bad Request", format!("egressd: refused ({other})\n")),
        };
        let _ = write!(self.to_client, "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n");
        if why == Refusal::RateLimited {
            let _ = write!(self.to_client, "Retry-After: {}\r\n", self.summary.retry_after_secs);
        }
        let _ = write!(self.to_client, "Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    }

    /// Client bytes [`Connection::on_client_data`] would take now.
    pub fn room(&self) -> usize {
        if matches!(self.state, State::Refused(_)) {
            return usize::MAX;
        }
        self.limits.max_head_bytes.saturating_sub(self.pending.len())
    }

    /// The rule the flow matched.
    pub fn rule(&self) -> RuleId {
        self.rule
    }

    /// Whether the driver should open the upstream connection now (and has not said it did).
    pub fn wants_upstream(&self) -> bool {
        self.upstream_wanted && !self.upstream_connected
    }

    /// The upstream connection is established: judged bytes may flow.
    pub fn on_upstream_connected(&mut self) {
        self.upstream_connected = true;
    }

    /// Judged client bytes to send upstream (empty until the upstream is connected).
    pub fn to_upstream(&self) -> &[u8] {
        if self.upstream_connected {
            &self.pending[..self.ready]
        } else {
            &[]
        }
    }

    /// `n` bytes of [`Connection::to_upstream`] were sent.
    pub fn upstream_sent(&mut self, n: usize, policy: &PolicySnapshot) {
        let n = n.min(self.ready);
        self.pending.drain(..n);
        self.ready -= n;
        self.summary.bytes_up += n as u64;
        // Room in the buffer: the next request's bytes may already be there.
        if !matches!(self.state, State::Splicing | State::Refused(_)) {
            self.advance(policy);
        }
    }

    /// The refusal response still to send to the client.
    pub fn to_client(&self) -> &[u8] {
        &self.to_client[self.to_client_sent..]
    }

    pub fn client_sent(&mut self, n: usize) {
        self.to_client_sent = (self.to_client_sent + n).min(self.to_client.len());
    }

    /// Refused, its response sent and judged bytes flushed: close the client (FIN after the response).
    pub fn should_close(&self) -> bool {
        matches!(self.state, State::Refused(_)) && self.to_client().is_empty() && self.ready == 0
    }

    /// Refused after allowed HTTP requests: the refusal goes to the client only once the upstream has answered
    /// them and closed (see the module docs).
    pub fn refusal_waits(&self) -> bool {
        matches!(self.state, State::Refused(_)) && self.summary.requests_allowed > 0
    }

    /// Allowed TLS: after [`Connection::to_upstream`] is drained, the driver copies both ways untouched.
    pub fn is_splicing(&self) -> bool {
        self.state == State::Splicing
    }

    /// When [`Connection::on_timeout`] must next be called, if a deadline is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Classifying | State::ClientHello | State::VerifyingTls => Some(self.deadline),
            State::RequestHead if self.head_arm_pending => Some(Instant::ZERO),
            State::RequestHead if self.head_armed => Some(self.deadline),
            _ => None,
        }
    }

    /// Time passed: a connection still undecided at its deadline is refused, and so is a request head still
    /// incomplete at its own.
    pub fn on_timeout(&mut self, now: Instant) {
        if std::mem::take(&mut self.head_arm_pending) {
            self.head_armed = true;
            self.deadline =
                now.saturating_add(std::time::Duration::from_nanos(self.limits.classify_timeout_nanos));
            return;
        }
        if self.poll_timeout().is_some_and(|deadline| now >= deadline) {
            self.refuse(Refusal::Timeout);
        }
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }
}

/// A fatal TLS alert record (RFC 8446 6): `access_denied` for a policy refusal, `unrecognized_name` for a hello
/// without a usable name (RFC 6066 3), `decode_error` for a malformed one.
fn tls_alert(why: Refusal) -> [u8; 7] {
    const ALERT: u8 = 21;
    const FATAL: u8 = 2;
    const ACCESS_DENIED: u8 = 49;
    const DECODE_ERROR: u8 = 50;
    const UNRECOGNIZED_NAME: u8 = 112;
    const PROTOCOL_VERSION: u8 = 70;
    const INTERNAL_ERROR: u8 = 80;
    let description = match why {
        Refusal::BadClientHello(
            HelloError::NoServerName
            | HelloError::MultipleServerNames
            | HelloError::IpLiteralServerName
            | HelloError::InvalidServerName,
        ) => UNRECOGNIZED_NAME,
        Refusal::BadClientHello(_) => DECODE_ERROR,
        Refusal::TlsVersionTooOld => PROTOCOL_VERSION,
        // Not the client's doing: the upstream side failed it.
        Refusal::NoHealthyEndpoint | Refusal::ServiceOverloaded | Refusal::UpstreamTimeout => INTERNAL_ERROR,
        _ => ACCESS_DENIED,
    };
    [ALERT, 3, 3, 0, 2, FATAL, description]
}

pub mod balance;
pub mod punt;
pub mod ratelimit;
pub mod stack;

#[cfg(test)]
mod tests;
