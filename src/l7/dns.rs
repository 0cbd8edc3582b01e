//! The L7 path's resolver for `[l7] verify_destination = "dns"`: asks one DNS server for a name's IPv4
//! addresses over UDP (non-blocking, on the L7 thread's poll), caches the answers for their TTL (clamped to
//! `[l7] dns_min_ttl`..`dns_max_ttl`), and keeps the connections that wait for a name until it answers or fails.
//!
//! An answer is taken only from the configured server, with the query's id and for the query's name; a name that
//! does not resolve (NXDOMAIN, no A records, two unanswered tries) verifies nothing, so its connections are
//! refused. Messages are encoded and decoded by `hickory-proto`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use dataplane::l7::stack::FourTuple;
use dataplane::time::Instant;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use mio::net::UdpSocket;

/// How long one try waits for its answer.
const TRY_NANOS: u64 = 1_500_000_000;
/// Tries per lookup.
const TRIES: u8 = 2;
/// Names cached at most (oldest answers go first when full).
const MAX_CACHED: usize = 65536;

struct Lookup {
    name: String,
    id: u16,
    sent_at: Instant,
    tries: u8,
    waiting: Vec<FourTuple>,
}

pub struct Resolver {
    pub socket: UdpSocket,
    server: SocketAddr,
    min_ttl_secs: u64,
    max_ttl_secs: u64,
    next_id: u16,
    /// By name.
    lookups: HashMap<String, Lookup>,
    cache: HashMap<String, (Vec<Ipv4Addr>, Instant)>,
}

impl Resolver {
    pub fn new(server: SocketAddr, min_ttl_secs: u64, max_ttl_secs: u64) -> std::io::Result<Resolver> {
        let socket = UdpSocket::bind("0.0.0.0:0".parse().map_err(std::io::Error::other)?)?;
        Ok(Resolver {
            socket,
            server,
            min_ttl_secs,
            max_ttl_secs,
            next_id: std::process::id() as u16,
            lookups: HashMap::new(),
            cache: HashMap::new(),
        })
    }

    /// The cached answer for `name`, or `None` after queueing `key` to be told (see [`Resolver::on_readable`]).
    pub fn lookup(&mut self, now: Instant, name: &str, key: FourTuple) -> Option<Vec<Ipv4Addr>> {
        let name = name.to_ascii_lowercase();
        if let Some((answers, expires)) = self.cache.get(&name) {
            if now < *expires {
                return Some(answers.clone());
            }
        }
        if let Some(lookup) = self.lookups.get_mut(&name) {
            lookup.waiting.push(key);
            return None;
        }
        self.next_id = self.next_id.wrapping_mul(25173).wrapping_add(13849);
        let mut lookup =
            Lookup { name: name.clone(), id: self.next_id, sent_at: now, tries: 0, waiting: vec![key] };
        if self.send(&mut lookup, now).is_err() {
            // Cannot even ask: the name verifies nothing.
            return Some(Vec::new());
        }
        self.lookups.insert(name, lookup);
        None
    }

    fn send(&self, lookup: &mut Lookup, now: Instant) -> Result<(), ()> {
        let bytes = encode_query(&lookup.name, lookup.id).ok_or(())?;
        self.socket.send_to(&bytes, self.server).map_err(|_| ())?;
        lookup.sent_at = now;
        lookup.tries += 1;
        Ok(())
    }

    /// Reads the answers that arrived; returns each waiting connection with its name's addresses.
    pub fn on_readable(&mut self, now: Instant, done: &mut Vec<(FourTuple, Vec<Ipv4Addr>)>) {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            if from != self.server {
                continue;
            }
            let Some(answer) = decode_answer(&buf[..n]) else { continue };
            let name = answer.name;
            let Some(lookup) = self.lookups.get(&name) else { continue };
            if lookup.id != answer.id {
                continue;
            }
            let answers = answer.addresses;
            let ttl = answer.ttl_secs.unwrap_or(self.max_ttl_secs);
            let ttl = ttl.clamp(self.min_ttl_secs, self.max_ttl_secs.max(self.min_ttl_secs));
            if let Some(lookup) = self.lookups.remove(&name) {
                if self.cache.len() >= MAX_CACHED {
                    self.cache.retain(|_, (_, expires)| now < *expires);
                }
                if self.cache.len() < MAX_CACHED {
                    let expires = Instant(now.as_nanos().saturating_add(ttl * 1_000_000_000));
                    self.cache.insert(name, (answers.clone(), expires));
                }
                done.extend(lookup.waiting.into_iter().map(|key| (key, answers.clone())));
            }
        }
    }

    /// Retries lookups whose answer is late; gives up on those out of tries (their connections get no addresses).
    pub fn on_tick(&mut self, now: Instant, done: &mut Vec<(FourTuple, Vec<Ipv4Addr>)>) {
        let late: Vec<String> = self
            .lookups
            .values()
            .filter(|l| now.as_nanos().saturating_sub(l.sent_at.as_nanos()) >= TRY_NANOS)
            .map(|l| l.name.clone())
            .collect();
        for name in late {
            let Some(mut lookup) = self.lookups.remove(&name) else { continue };
            if lookup.tries < TRIES && self.send(&mut lookup, now).is_ok() {
                self.lookups.insert(name, lookup);
            } else {
                done.extend(lookup.waiting.into_iter().map(|key| (key, Vec::new())));
            }
        }
    }
}

/// An `A` query for `name` (recursion desired), encoded; `None` if `name` is not a DNS name.
pub fn encode_query(name: &str, id: u16) -> Option<Vec<u8>> {
    let name = Name::from_ascii(format!("{name}.")).ok()?;
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, RecordType::A));
    message.to_vec().ok()
}

/// A DNS response, as far as an `A` lookup cares.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    /// The question's name, lowercase, without the final dot.
    pub name: String,
    /// Its `A` records (none: the name does not resolve, whatever the response code).
    pub addresses: Vec<Ipv4Addr>,
    /// The smallest TTL of those records.
    pub ttl_secs: Option<u64>,
}

/// Reads a DNS response; `None` for anything else (a query, garbage, no question).
pub fn decode_answer(bytes: &[u8]) -> Option<Answer> {
    let message = Message::from_vec(bytes).ok()?;
    if message.metadata.message_type != MessageType::Response {
        return None;
    }
    let question = message.queries.first()?;
    let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let mut addresses = Vec::new();
    let mut ttl_secs: Option<u64> = None;
    for record in &message.answers {
        if let RData::A(a) = &record.data {
            addresses.push(a.0);
            ttl_secs = Some(ttl_secs.map_or(u64::from(record.ttl), |t| t.min(u64::from(record.ttl))));
        }
    }
    Some(Answer { id: message.metadata.id, name, addresses, ttl_secs })
}

/// The first `nameserver` of /etc/resolv.conf, port 53.
pub fn system_resolver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|addr| addr.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}
