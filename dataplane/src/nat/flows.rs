//! Live flows for operators: `egressd flows` lists them and `egressd flows --delete` removes them (what
//! `conntrack -L` / `conntrack -D` do for the kernel's NAT).
//!
//! A worker owns its flows and never locks them, so the admin thread cannot read them directly. It sends a
//! [`FlowQuery`] to each worker through [`FlowQueries`]; the worker answers it between bursts, a bounded slice of
//! its session table at a time ([`SCAN_SLOTS_PER_STEP`]), into pages the admin thread lent it (the worker
//! allocates nothing). A query of a million flows therefore costs a worker many short steps, never one long
//! stall. The answer is a snapshot per step, not of the whole table at one instant: a flow created behind the
//! cursor while the scan runs is not listed, as with `conntrack -L`.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

use crate::conntrack::*;
use crate::policy::{GroupId, Prefix};
use crate::wire::ip_proto;

/// Session slots a worker looks at per step of a query (about 230 KiB of table: tens of microseconds).
pub const SCAN_SLOTS_PER_STEP: u32 = 4096;
/// Flows per page.
pub const FLOWS_PER_PAGE: usize = 512;
/// Pages lent to each worker per query: the worker can run this many pages ahead of the admin thread.
pub const PAGES_IN_FLIGHT: usize = 4;

/// Where a flow is in its life, as an operator reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// TCP: handshake not complete.
    SynSent,
    /// TCP: both sides acknowledged.
    Established,
    /// TCP: FIN both ways or RST; the transitory timer runs.
    Closing,
    /// UDP or ICMP echo, judged by the policy.
    Active,
    /// UDP created by an inbound datagram (address-dependent filtering), not yet judged: the inside host has
    /// not answered on it.
    Unsolicited,
}

impl FlowState {
    pub const ALL: [FlowState; 5] = [
        FlowState::SynSent,
        FlowState::Established,
        FlowState::Closing,
        FlowState::Active,
        FlowState::Unsolicited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowState::SynSent => "syn_sent",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::Active => "active",
            FlowState::Unsolicited => "unsolicited",
        }
    }

    pub fn parse(text: &str) -> Option<FlowState> {
        FlowState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    fn of(s: &Session) -> FlowState {
        if s.flags & SESSION_UNJUDGED != 0 {
            return FlowState::Unsolicited;
        }
        match s.class {
            CLASS_TCP_SYN => FlowState::SynSent,
            CLASS_TCP_ESTABLISHED => FlowState::Established,
            CLASS_TCP_TRANSITORY => FlowState::Closing,
            _ => FlowState::Active,
        }
    }
}

/// Packets and bytes of a flow each way (only while the NAT translation log is on: the figures are kept for it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub packets_out: u32,
    pub packets_in: u32,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// One live flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub proto: u8,
    /// ICMP echo: the ports are the identifiers.
    pub inside: SocketAddrV4,
    pub egress: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub state: FlowState,
    /// Seconds since the flow last moved, and until it expires if nothing moves.
    pub idle_secs: u32,
    pub expires_in_secs: u32,
    /// Low 32 bits of the policy generation that last judged it.
    pub generation: u32,
    /// A hairpinned flow (both ends are ours).
    pub hairpin: bool,
    pub worker: u16,
    pub counts: Option<FlowCounts>,
}

/// Which flows a query selects; every field given must match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    pub inside: Option<Prefix>,
    pub inside_port: Option<u16>,
    pub egress_ip: Option<Ipv4Addr>,
    pub egress_port: Option<u16>,
    pub remote: Option<Prefix>,
    pub remote_port: Option<u16>,
    pub proto: Option<u8>,
    pub state: Option<FlowState>,
    /// The source group of the inside address, in the policy the worker runs.
    pub group: Option<GroupId>,
}

impl FlowFilter {
    /// Whether nothing is asked (every flow matches).
    pub fn is_empty(&self) -> bool {
        *self == FlowFilter::default()
    }

    /// Whether `flow` matches; `group_of` answers the inside address's source group (asked only when needed).
    pub fn matches(&self, flow: &FlowInfo, group_of: impl FnOnce(Ipv4Addr) -> Option<GroupId>) -> bool {
        let port = |want: Option<u16>, have: u16| want.is_none_or(|p| p == have);
        self.inside.is_none_or(|n| n.contains(IpAddr::V4(*flow.inside.ip())))
            && port(self.inside_port, flow.inside.port())
            && self.egress_ip.is_none_or(|ip| ip == *flow.egress.ip())
            && port(self.egress_port, flow.egress.port())
            && self.remote.is_none_or(|n| n.contains(IpAddr::V4(*flow.remote.ip())))
            && port(self.remote_port, flow.remote.port())
            && self.proto.is_none_or(|p| p == flow.proto)
            && self.state.is_none_or(|s| s == flow.state)
            && self.group.is_none_or(|g| group_of(*flow.inside.ip()) == Some(g))
    }
}

/// What a query asks of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowQuery {
    /// Tells this query's pages from those of one the admin thread gave up on.
    pub id: u64,
    pub filter: FlowFilter,
    /// Remove the matching flows instead of listing them.
    pub delete: bool,
    /// Most flows to list (deletion has no limit).
    pub limit: u32,
}

/// A page of a worker's answer. The admin thread lends empty pages; the worker fills and returns them.
#[derive(Debug)]
pub struct FlowPage {
    pub query: u64,
    pub flows: Vec<FlowInfo>,
    /// Flows this page's step removed (deletion).
    pub deleted: u32,
    /// The worker's last page for the query.
    pub done: bool,
}

impl FlowPage {
    pub fn empty() -> FlowPage {
        FlowPage { query: 0, flows: Vec::with_capacity(FLOWS_PER_PAGE), deleted: 0, done: false }
    }
}

/// One worker's mailbox.
#[derive(Debug)]
struct Mailbox {
    query: ArrayQueue<FlowQuery>,
    empty: ArrayQueue<FlowPage>,
    full: ArrayQueue<FlowPage>,
}

/// The mailboxes between the admin thread and the workers.
#[derive(Debug)]
pub struct FlowQueries {
    mailboxes: Box<[Mailbox]>,
    next_id: AtomicU64,
}

impl FlowQueries {
    pub fn new(workers: usize) -> FlowQueries {
        let mailboxes = (0..workers.max(1))
            .map(|_| Mailbox {
                query: ArrayQueue::new(1),
                empty: ArrayQueue::new(PAGES_IN_FLIGHT),
                full: ArrayQueue::new(PAGES_IN_FLIGHT),
            })
            .collect();
        FlowQueries { mailboxes, next_id: AtomicU64::new(1) }
    }

    pub fn workers(&self) -> usize {
        self.mailboxes.len()
    }

    /// A fresh query id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Admin side: sends `query` to `worker` (replacing one not yet taken) and lends it pages.
    pub fn ask(&self, worker: usize, query: FlowQuery, mut pages: Vec<FlowPage>) {
        let Some(m) = self.mailboxes.get(worker) else { return };
        // Pages of an abandoned query go back into circulation.
        while let Some(page) = m.full.pop() {
            pages.push(page);
        }
        while let Some(page) = m.empty.pop() {
            pages.push(page);
        }
        for mut page in pages.into_iter().take(PAGES_IN_FLIGHT) {
            page.flows.clear();
            let _ = m.empty.push(page);
        }
        m.query.force_push(query);
    }

    /// Admin side: the next page `worker` filled, if any.
    pub fn take_page(&self, worker: usize) -> Option<FlowPage> {
        self.mailboxes.get(worker)?.full.pop()
    }

    /// Admin side: lends a read page back to `worker`.
    pub fn lend(&self, worker: usize, mut page: FlowPage) {
        page.flows.clear();
        page.deleted = 0;
        page.done = false;
        if let Some(m) = self.mailboxes.get(worker) {
            let _ = m.empty.push(page);
        }
    }

    /// Worker side: a new query for `worker`, if one came.
    #[inline]
    pub fn poll_query(&self, worker: u16) -> Option<FlowQuery> {
        let m = self.mailboxes.get(usize::from(worker))?;
        if m.query.is_empty() {
            return None;
        }
        m.query.pop()
    }

    /// Worker side: an empty page to fill.
    pub fn borrow_page(&self, worker: u16) -> Option<FlowPage> {
        self.mailboxes.get(usize::from(worker))?.empty.pop()
    }

    /// Worker side: hands a filled page back.
    pub fn give_page(&self, worker: u16, page: FlowPage) {
        if let Some(m) = self.mailboxes.get(usize::from(worker)) {
            let _ = m.full.push(page);
        }
    }
}

/// A query a worker is answering: where its scan is and the page it is filling.
#[derive(Debug)]
pub struct ActiveQuery {
    pub query: FlowQuery,
    pub cursor: u32,
    pub listed: u32,
    pub page: Option<FlowPage>,
}

impl ActiveQuery {
    pub fn new(query: FlowQuery) -> ActiveQuery {
        ActiveQuery { query, cursor: 0, listed: 0, page: None }
    }
}

/// What a scan does with the flow it shows its visitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visit {
    Next,
    Delete,
    /// Stop before this flow; the next scan starts with it.
    Stop,
}

/// The protocol name operators use.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        ip_proto::TCP => "tcp",
        ip_proto::UDP => "udp",
        ip_proto::ICMP => "icmp",
        _ => "other",
    }
}

/// The protocol number of an operator's name.
pub fn proto_by_name(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(ip_proto::TCP),
        "udp" => Some(ip_proto::UDP),
        "icmp" => Some(ip_proto::ICMP),
        _ => None,
    }
}

impl super::Nat {
    /// Shows `visit` the live flows in session slots `from..from + slots` and applies its answers. Returns the
    /// slot to continue from, `None` when the table is done.
    pub fn scan_flows(
        &mut self,
        now: crate::time::Instant,
        from: u32,
        slots: u32,
        mut visit: impl FnMut(&FlowInfo) -> Visit,
    ) -> Option<u32> {
        let now_s = super::secs(now);
        let end = from.saturating_add(slots).min(self.sessions.len() as u32);
        for sid in from..end {
            let Some(s) = self.sessions.get(sid as usize) else { break };
            if s.class == CLASS_FREE {
                continue;
            }
            let info = self.flow_info(s, now_s, sid);
            match visit(&info) {
                Visit::Next => {}
                Visit::Delete => self.remove_session(sid, now_s, super::log::FlowEnd::Deleted),
                Visit::Stop => return Some(sid),
            }
        }
        (end < self.sessions.len() as u32).then_some(end)
    }

    fn flow_info(&self, s: &Session, now_s: u32, sid: u32) -> FlowInfo {
        let timeout = self.timeouts.get(usize::from(s.class)).copied().unwrap_or(0);
        let idle = now_s.saturating_sub(s.last_seen);
        FlowInfo {
            proto: s.proto,
            inside: super::log::endpoint(s.in_addr, s.in_port),
            egress: super::log::endpoint(
                self.egress.get(usize::from(s.ip_idx)).copied().unwrap_or(0),
                s.ext_port,
            ),
            remote: super::log::endpoint(s.remote_addr, s.remote_port),
            state: FlowState::of(s),
            idle_secs: idle,
            expires_in_secs: timeout.saturating_sub(idle),
            generation: s.generation,
            hairpin: s.flags & (SESSION_HAIRPIN | SESSION_HAIRPIN_PEER) != 0,
            worker: self.worker,
            counts: self.flow_log.as_ref().and_then(|log| log.counts(sid)),
        }
    }

    /// Answers one step of `active` (a worker calls it between bursts): scans at most [`SCAN_SLOTS_PER_STEP`]
    /// slots into a lent page. Returns whether the query is finished, or `None` when no page is lent (the admin
    /// thread has not read the last ones yet, or gave up on the query).
    pub fn answer_flow_query(
        &mut self,
        now: crate::time::Instant,
        active: &mut ActiveQuery,
        queries: &FlowQueries,
        group_of: impl Fn(Ipv4Addr) -> Option<GroupId>,
    ) -> Option<bool> {
        let worker = self.worker;
        if active.page.is_none() {
            active.page = queries.borrow_page(worker).map(|mut page| {
                page.query = active.query.id;
                page
            });
        }
        let page = active.page.as_mut()?;
        let query = active.query;
        let limit = query.limit;
        let mut listed = active.listed;
        let next = self.scan_flows(now, active.cursor, SCAN_SLOTS_PER_STEP, |flow| {
            if !query.filter.matches(flow, &group_of) {
                return Visit::Next;
            }
            if query.delete {
                page.deleted += 1;
                return Visit::Delete;
            }
            if listed >= limit {
                return Visit::Stop;
            }
            if page.flows.len() >= FLOWS_PER_PAGE {
                return Visit::Stop;
            }
            page.flows.push(*flow);
            listed += 1;
            Visit::Next
        });
        active.listed = listed;
        let done = next.is_none() || (!query.delete && listed >= limit);
        active.cursor = next.unwrap_or(u32::MAX);
        let page_full = page.flows.len() >= FLOWS_PER_PAGE || page.deleted > 0;
        if done || page_full {
            if let Some(mut page) = active.page.take() {
                page.done = done;
                queries.give_page(worker, page);
            }
        }
        Some(done)
    }
}
