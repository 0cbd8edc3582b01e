//! `to_hosts` of allow/deny rules: destinations named by DNS (Cilium's `toFQDNs`, an Istio `Gateway` for
//! `db.external.com:5432`). A background thread resolves every name the policy uses (`A` records, from the L7
//! path's resolver: `[l7] resolver`, else /etc/resolv.conf's first nameserver), keeps each answer for its TTL
//! (clamped to `[l7] dns_min_ttl`..`dns_max_ttl`), asks again when three quarters of it have passed, and when a
//! name's addresses change the control loop recompiles the policy with them (a new generation, no reload; flows
//! whose rule changed are judged again, as after a reload).
//!
//! A name that stops resolving (no answer, NXDOMAIN, no `A` record) keeps its last addresses until their TTL
//! runs out; then it has none, and its flows fall to the next rule. Answers are taken only from the resolver,
//! with the query's id and name. [`NameTable`] is the sans-IO part; [`FqdnWatcher`] its thread and socket.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::time::Instant;

use crate::l7::dns::{decode_answer, encode_query, Answer};

/// Every name's current addresses (sorted; empty: none now).
pub type ResolvedNames = HashMap<String, Vec<Ipv4Addr>>;

/// How long one query waits for its answer before it is sent again.
const TRY_NANOS: u64 = 1_500_000_000;
/// A failed name is asked again this often (its old answer stays until it expires).
const RETRY_NANOS: u64 = 1_000_000_000;
const NANOS: u64 = 1_000_000_000;

#[derive(Debug)]
struct NameState {
    addresses: Vec<Ipv4Addr>,
    /// When `addresses` stop counting (their TTL ran out).
    expires: Instant,
    next_query: Instant,
    /// The query in flight: its id and when it was sent.
    pending: Option<(u16, Instant)>,
}

/// The names, their answers and their timers, without a socket or a clock.
#[derive(Debug)]
pub struct NameTable {
    names: BTreeMap<String, NameState>,
    min_ttl_secs: u64,
    max_ttl_secs: u64,
    next_id: u16,
    /// Lookups that got no usable answer.
    pub failures: u64,
}

impl NameTable {
    pub fn new(min_ttl_secs: u64, max_ttl_secs: u64) -> NameTable {
        NameTable {
            names: BTreeMap::new(),
            min_ttl_secs: min_ttl_secs.max(1),
            max_ttl_secs: max_ttl_secs.max(min_ttl_secs.max(1)),
            next_id: 0x2f1d,
            failures: 0,
        }
    }

    /// The names the policy uses now: new ones are asked at once, gone ones forgotten. Returns whether the set of
    /// answers changed (a name with addresses went away).
    pub fn set_names(&mut self, names: &[String], now: Instant) -> bool {
        let before = self.names.len();
        self.names.retain(|n, _| names.contains(n));
        let mut changed = self.names.len() != before;
        for name in names {
            self.names.entry(name.clone()).or_insert_with(|| {
                changed = true;
                NameState { addresses: Vec::new(), expires: now, next_query: now, pending: None }
            });
        }
        changed
    }

    /// Queries to send now: `(name, id)`. Each is recorded as in flight.
    pub fn due(&mut self, now: Instant) -> Vec<(String, u16)> {
        let mut out = Vec::new();
        for (name, state) in &mut self.names {
            if state.pending.is_none() && state.next_query <= now {
                self.next_id = self.next_id.wrapping_mul(25173).wrapping_add(13849);
                state.pending = Some((self.next_id, now));
                out.push((name.clone(), self.next_id));
            }
        }
        out
    }

    /// A response arrived (from the resolver). Returns whether a name's addresses changed.
    pub fn on_answer(&mut self, now: Instant, answer: Answer) -> bool {
        let Some(state) = self.names.get_mut(&answer.name) else { return false };
        if state.pending.map(|(id, _)| id) != Some(answer.id) {
            return false;
        }
        state.pending = None;
        if answer.addresses.is_empty() {
            // Does not resolve: the old answer stays until it expires; ask again soon.
            self.failures += 1;
            state.next_query = Instant(now.0 + RETRY_NANOS);
            return false;
        }
        let ttl = answer.ttl_secs.unwrap_or(self.max_ttl_secs).clamp(self.min_ttl_secs, self.max_ttl_secs);
        let mut addresses = answer.addresses;
        addresses.sort_unstable();
        addresses.dedup();
        state.expires = Instant(now.0 + ttl * NANOS);
        state.next_query = Instant(now.0 + (ttl * NANOS * 3 / 4).max(NANOS));
        let changed = state.addresses != addresses;
        state.addresses = addresses;
        changed
    }

    /// Time passed: late queries count as failures (asked again in a second), answers past their TTL are
    /// dropped. Returns whether a name's addresses changed.
    pub fn on_tick(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for state in self.names.values_mut() {
            if let Some((_, sent)) = state.pending {
                if now.0.saturating_sub(sent.0) >= TRY_NANOS {
                    state.pending = None;
                    state.next_query = Instant(now.0 + RETRY_NANOS);
                    self.failures += 1;
                }
            }
            if !state.addresses.is_empty() && now >= state.expires {
                state.addresses.clear();
                changed = true;
            }
        }
        changed
    }

    pub fn answers(&self) -> ResolvedNames {
        self.names.iter().map(|(n, s)| (n.clone(), s.addresses.clone())).collect()
    }

    /// The earliest time something is due (a query, a timeout or an expiry).
    pub fn next_event(&self) -> Option<Instant> {
        self.names
            .values()
            .flat_map(|s| {
                let timeout = s.pending.map(|(_, sent)| Instant(sent.0 + TRY_NANOS));
                let query = if s.pending.is_none() { Some(s.next_query) } else { None };
                let expiry = if s.addresses.is_empty() { None } else { Some(s.expires) };
                [timeout, query, expiry]
            })
            .flatten()
            .min()
    }
}

/// What the watcher thread shares with the control loop.
#[derive(Debug, Default)]
pub struct FqdnShared {
    names: Mutex<Vec<String>>,
    names_changed: AtomicBool,
    answers: Mutex<ResolvedNames>,
    answers_changed: AtomicBool,
    stop: AtomicBool,
    /// Times the answers changed (each a policy recompile).
    pub updates: AtomicU64,
    /// Lookups that got no usable answer.
    pub failures: AtomicU64,
}

impl FqdnShared {
    /// The names to watch from now on (after a reload).
    pub fn set_names(&self, names: Vec<String>) {
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
        self.names_changed.store(true, Ordering::Release);
    }

    /// The answers, if they changed since the last call.
    pub fn take_changed(&self) -> Option<ResolvedNames> {
        self.answers_changed
            .swap(false, Ordering::AcqRel)
            .then(|| self.answers.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub fn answers(&self) -> ResolvedNames {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The resolving thread; stops when dropped.
pub struct FqdnWatcher {
    pub shared: Arc<FqdnShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FqdnWatcher {
    /// Starts watching `names` through `resolver`, and waits up to `first_answers` for each to be answered once
    /// (so that the first policy has them).
    pub fn start(
        names: Vec<String>,
        resolver: SocketAddr,
        min_ttl_secs: u64,
        max_ttl_secs: u64,
        first_answers: Duration,
    ) -> std::io::Result<FqdnWatcher> {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.connect(resolver)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let shared = Arc::new(FqdnShared::default());
        shared.set_names(names.clone());
        let mut table = NameTable::new(min_ttl_secs, max_ttl_secs);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("egressd-fqdn".into())
            .spawn(move || run(&socket, &mut table, &thread_shared))?;
        let started = std::time::Instant::now();
        while started.elapsed() < first_answers {
            let answered = shared.answers();
            if names.iter().all(|n| answered.get(n).is_some_and(|a| !a.is_empty())) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(FqdnWatcher { shared, thread: Some(thread) })
    }
}

impl Drop for FqdnWatcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(socket: &UdpSocket, table: &mut NameTable, shared: &FqdnShared) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::monotonic();
        let mut changed = false;
        if shared.names_changed.swap(false, Ordering::AcqRel) {
            let names = shared.names.lock().unwrap_or_else(|e| e.into_inner()).clone();
            changed |= table.set_names(&names, now);
        }
        for (name, id) in table.due(now) {
            if let Some(query) = encode_query(&name, id) {
                // A failed send is a lookup without an answer: the timeout retries it.
                let _ = socket.send(&query);
            }
        }
        // Answers until the next timer (at most 50 ms: names may change, or a stop may come).
        match socket.recv(&mut buf) {
            Ok(n) => {
                if let Some(answer) = decode_answer(&buf[..n]) {
                    changed |= table.on_answer(Instant::monotonic(), answer);
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
        changed |= table.on_tick(Instant::monotonic());
        shared.failures.store(table.failures, Ordering::Relaxed);
        if changed {
            *shared.answers.lock().unwrap_or_else(|e| e.into_inner()) = table.answers();
            shared.updates.fetch_add(1, Ordering::Relaxed);
            shared.answers_changed.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Instant {
        Instant::from_secs(secs)
    }

    fn answer(name: &str, id: u16, addresses: &[&str], ttl: u64) -> Answer {
        Answer {
            id,
            name: name.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ttl_secs: (!addresses.is_empty()).then_some(ttl),
        }
    }

    #[test]
    fn answers_are_kept_for_their_ttl_refreshed_early_and_dropped_when_the_name_stops_resolving() {
        let mut t = NameTable::new(5, 300);
        assert!(t.set_names(&["db.example".into()], at(0)));
        let due = t.due(at(0));
        assert_eq!(due.len(), 1);
        let id = due[0].1;
        assert!(t.due(at(0)).is_empty(), "one query in flight");
        // Another id, or a name not asked: ignored.
        assert!(!t.on_answer(at(0), answer("db.example", id.wrapping_add(1), &["192.0.2.7"], 60)));
        assert!(!t.on_answer(at(0), answer("other.example", id, &["192.0.2.7"], 60)));
        assert!(t.on_answer(at(0), answer("db.example", id, &["192.0.2.8", "192.0.2.7", "192.0.2.8"], 60)));
        assert_eq!(
            t.answers()["db.example"],
            ["192.0.2.7".parse::<Ipv4Addr>().unwrap(), "192.0.2.8".parse().unwrap()]
        );
        // Asked again at three quarters of the TTL; the same answer changes nothing.
        assert!(t.due(at(44)).is_empty());
        let id = t.due(at(45))[0].1;
        assert!(!t.on_answer(at(45), answer("db.example", id, &["192.0.2.8", "192.0.2.7"], 60)));
        // Then the name stops resolving (NXDOMAIN, then silence): the answer stays until it expires (45 + 60).
        let id = t.due(at(90))[0].1;
        assert!(!t.on_answer(at(90), answer("db.example", id, &[], 0)));
        assert!(t.due(at(90)).is_empty() && !t.due(at(91)).is_empty(), "asked again a second later");
        assert!(!t.on_tick(at(93)), "no answer: a failure, the old addresses stay");
        assert_eq!(t.answers()["db.example"].len(), 2);
        assert!(t.on_tick(at(105)), "expired");
        assert!(t.answers()["db.example"].is_empty());
        assert!(t.failures >= 2);
    }

    #[test]
    fn ttls_are_clamped_and_names_follow_the_policy() {
        let mut t = NameTable::new(5, 60);
        t.set_names(&["a.example".into(), "b.example".into()], at(0));
        let due = t.due(at(0));
        for (name, id) in &due {
            let ttl = if name == "a.example" { 0 } else { 86400 };
            t.on_answer(at(0), answer(name, *id, &["192.0.2.1"], ttl));
        }
        assert!(!t.on_tick(at(4)), "a TTL of 0 counts as the 5 s floor");
        assert!(t.on_tick(at(5)));
        assert_eq!(t.answers()["b.example"].len(), 1);
        assert!(!t.on_tick(at(59)) && t.on_tick(at(60)), "a day counts as the 60 s cap");
        assert!(t.set_names(&["a.example".into()], at(61)), "b.example left the policy");
        assert_eq!(t.answers().len(), 1);
        assert!(t.next_event().is_some());
    }
}
