//! Live flows through the admin endpoint: `GET /flows` lists them, `POST /flows/delete` removes them (the admin
//! side of [`dataplane::nat::flows`]).
//!
//! Both take the same filter in the query string — `inside`, `egress` and `remote` as `ADDR[/LEN][:PORT]`,
//! `proto` (`tcp`, `udp`, `icmp`), `state`, `group` (a source group's name) — plus `limit` for a listing
//! (default [`DEFAULT_LIMIT`]). A deletion with no filter needs `all=yes`: removing every flow of a gateway is
//! never what a typo should do. The admin thread asks every worker, collects their pages until all are done or
//! [`ANSWER_DEADLINE`] passes, and answers in JSON.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::nat::flows::{
    proto_by_name, proto_name, FlowFilter, FlowInfo, FlowPage, FlowQueries, FlowQuery, FlowState,
    PAGES_IN_FLIGHT,
};
use dataplane::policy::{PolicySnapshot, Prefix};
use serde::Serialize;

/// Flows a listing returns unless it asks for another limit.
pub const DEFAULT_LIMIT: u32 = 10_000;
/// How long the admin thread waits for the workers' answers.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// A filter as an operator writes it, before the policy gives group names their ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowSelector {
    pub filter: FlowFilter,
    pub group: Option<String>,
    /// Deletion only: the operator means every flow.
    pub all: bool,
    pub limit: u32,
}

/// Parses `ADDR[/LEN][:PORT]` (IPv4: the NAT's flows are).
pub fn parse_endpoint(text: &str) -> Result<(Prefix, Option<u16>), String> {
    let (net, port) = match text.rsplit_once(':') {
        Some((net, port)) => {
            let port = port.parse::<u16>().map_err(|_| format!("`{text}`: `{port}` is not a port"))?;
            (net, Some(port))
        }
        None => (text, None),
    };
    let prefix = net.parse::<Prefix>().map_err(|e| format!("`{text}`: {e}"))?;
    if !prefix.is_ipv4() {
        return Err(format!("`{text}`: flows are IPv4; `{net}` is not an IPv4 address"));
    }
    Ok((prefix, port))
}

impl FlowSelector {
    /// Reads the query string of `/flows` or `/flows/delete`.
    pub fn from_query(query: &str) -> Result<FlowSelector, String> {
        let mut selector = FlowSelector { limit: DEFAULT_LIMIT, ..FlowSelector::default() };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let f = &mut selector.filter;
            match key.as_ref() {
                "inside" => (f.inside, f.inside_port) = parse_endpoint(&value).map(|(n, p)| (Some(n), p))?,
                "remote" => (f.remote, f.remote_port) = parse_endpoint(&value).map(|(n, p)| (Some(n), p))?,
                "egress" => {
                    let (net, port) = parse_endpoint(&value)?;
                    let (IpAddr::V4(ip), 32) = (net.addr(), net.prefix_len()) else {
                        return Err(format!("egress `{value}`: an egress IP is one address, not a prefix"));
                    };
                    (f.egress_ip, f.egress_port) = (Some(ip), port);
                }
                "proto" => {
                    f.proto = Some(
                        proto_by_name(&value)
                            .ok_or_else(|| format!("proto `{value}`: expected tcp, udp or icmp"))?,
                    )
                }
                "state" => {
                    let names: Vec<&str> = FlowState::ALL.iter().map(|s| s.as_str()).collect();
                    f.state =
                        Some(FlowState::parse(&value).ok_or_else(|| {
                            format!("state `{value}`: expected one of {}", names.join(", "))
                        })?)
                }
                "group" => selector.group = Some(value.into_owned()),
                "limit" => {
                    selector.limit =
                        value.parse().map_err(|_| format!("limit `{value}`: expected a number of flows"))?
                }
                "all" => selector.all = matches!(value.as_ref(), "yes" | "true" | "1"),
                other => {
                    return Err(format!(
                    "unknown filter `{other}`: use inside, egress, remote, proto, state, group, limit, all"
                ))
                }
            }
        }
        Ok(selector)
    }

    /// The filter with the group resolved in `policy`.
    fn resolve(&self, policy: &PolicySnapshot) -> Result<FlowFilter, String> {
        let mut filter = self.filter;
        if let Some(name) = &self.group {
            filter.group = Some(policy.group_by_name(name).ok_or_else(|| {
                let names: Vec<&str> = (0..policy.group_count() as u32)
                    .map(|g| policy.group_name(dataplane::policy::GroupId(g)))
                    .collect();
                format!("no source group `{name}` in the running policy (groups: {})", names.join(", "))
            })?);
        }
        Ok(filter)
    }
}

/// One flow as the JSON answer shows it.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FlowRow {
    pub proto: String,
    pub inside: String,
    pub egress: String,
    pub remote: String,
    pub state: String,
    /// The inside address's source group in the running policy (empty when it has none).
    pub group: String,
    pub idle_secs: u32,
    pub expires_in_secs: u32,
    pub hairpin: bool,
    pub worker: u16,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub packets_out: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub packets_in: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_in: Option<u64>,
}

impl FlowRow {
    fn new(flow: &FlowInfo, policy: &PolicySnapshot) -> FlowRow {
        let group = policy.group_of((*flow.inside.ip()).into()).map(|g| policy.group_name(g).to_string());
        FlowRow {
            proto: proto_name(flow.proto).into(),
            inside: flow.inside.to_string(),
            egress: flow.egress.to_string(),
            remote: flow.remote.to_string(),
            state: flow.state.as_str().into(),
            group: group.unwrap_or_default(),
            idle_secs: flow.idle_secs,
            expires_in_secs: flow.expires_in_secs,
            hairpin: flow.hairpin,
            worker: flow.worker,
            packets_out: flow.counts.map(|c| c.packets_out),
            packets_in: flow.counts.map(|c| c.packets_in),
            bytes_out: flow.counts.map(|c| c.bytes_out),
            bytes_in: flow.counts.map(|c| c.bytes_in),
        }
    }
}

/// The answer of `GET /flows`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FlowListing {
    pub flows: Vec<FlowRow>,
    /// More flows matched than `limit`.
    pub truncated: bool,
}

/// The answer of `POST /flows/delete`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FlowDeletion {
    pub deleted: u64,
}

/// Why a flow request failed, and the HTTP status that says so.
#[derive(Debug)]
pub struct FlowError {
    pub status: u16,
    pub message: String,
}

fn bad_request(message: String) -> FlowError {
    FlowError { status: 400, message }
}

/// Runs one query on every worker; returns the flows listed and the number deleted.
fn gather(queries: &FlowQueries, query: FlowQuery) -> Result<(Vec<FlowInfo>, u64), FlowError> {
    let workers = queries.workers();
    for worker in 0..workers {
        queries.ask(worker, query, (0..PAGES_IN_FLIGHT).map(|_| FlowPage::empty()).collect());
    }
    let mut done = vec![false; workers];
    let (mut flows, mut deleted) = (Vec::new(), 0u64);
    let deadline = Instant::now() + ANSWER_DEADLINE;
    while done.iter().any(|d| !d) {
        let mut progress = false;
        for (worker, finished) in done.iter_mut().enumerate() {
            while let Some(page) = queries.take_page(worker) {
                progress = true;
                if page.query != query.id {
                    queries.lend(worker, page);
                    continue;
                }
                flows.extend_from_slice(&page.flows);
                deleted += u64::from(page.deleted);
                *finished |= page.done;
                queries.lend(worker, page);
            }
        }
        if !progress {
            if Instant::now() >= deadline {
                let late: Vec<String> =
                    done.iter().enumerate().filter(|(_, d)| !**d).map(|(w, _)| w.to_string()).collect();
                return Err(FlowError {
                    status: 504,
                    message: format!(
                        "worker(s) {} did not answer within {} s{}",
                        late.join(", "),
                        ANSWER_DEADLINE.as_secs(),
                        if query.delete { " (some flows may have been deleted)" } else { "" }
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok((flows, deleted))
}

/// `GET /flows`.
pub fn list(
    queries: &FlowQueries,
    policy: &Arc<PolicySnapshot>,
    query: &str,
) -> Result<FlowListing, FlowError> {
    let selector = FlowSelector::from_query(query).map_err(bad_request)?;
    let filter = selector.resolve(policy).map_err(bad_request)?;
    let limit = selector.limit;
    // One more than asked per worker, so that "more matched" is known exactly.
    let query = FlowQuery { id: queries.next_id(), filter, delete: false, limit: limit.saturating_add(1) };
    let (mut flows, _) = gather(queries, query)?;
    flows.sort_by_key(|f| (f.inside, f.remote, f.proto));
    let truncated = flows.len() > limit as usize;
    flows.truncate(limit as usize);
    Ok(FlowListing { flows: flows.iter().map(|f| FlowRow::new(f, policy)).collect(), truncated })
}

/// `POST /flows/delete`.
pub fn delete(
    queries: &FlowQueries,
    policy: &Arc<PolicySnapshot>,
    query: &str,
) -> Result<FlowDeletion, FlowError> {
    let selector = FlowSelector::from_query(query).map_err(bad_request)?;
    if selector.filter.is_empty() && selector.group.is_none() && !selector.all {
        return Err(bad_request(
            "a deletion without a filter would remove every flow: give a filter, or all=yes to mean it"
                .into(),
        ));
    }
    let filter = selector.resolve(policy).map_err(bad_request)?;
    let query = FlowQuery { id: queries.next_id(), filter, delete: true, limit: u32::MAX };
    let (_, deleted) = gather(queries, query)?;
    tracing::info!(deleted, filter = ?query.filter, "flows deleted on request");
    Ok(FlowDeletion { deleted })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_prefixes_and_ports() {
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        assert_eq!(parse_endpoint("10.0.0.1").unwrap(), (p("10.0.0.1/32"), None));
        assert_eq!(parse_endpoint("10.0.0.0/8").unwrap(), (p("10.0.0.0/8"), None));
        assert_eq!(parse_endpoint("192.0.2.10:40123").unwrap(), (p("192.0.2.10/32"), Some(40123)));
        assert_eq!(parse_endpoint("10.0.0.0/24:53").unwrap(), (p("10.0.0.0/24"), Some(53)));
        let host_bits = parse_endpoint("10.0.0.5/24").unwrap_err();
        assert!(host_bits.contains("did you mean 10.0.0.0/24"), "{host_bits}");
        for bad in ["10.0.0.1:99999", "10.0.0.0/33", "host", "10.0.0.1:", "::1", "2001:db8::/32", ""] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_strings_become_filters_and_refuse_what_they_cannot_mean() {
        let s = FlowSelector::from_query(
            "inside=10.0.0.0/24&egress=192.0.2.10:40123&proto=tcp&state=established&group=apps&limit=5",
        )
        .unwrap();
        assert_eq!(s.filter.inside.map(|n| n.prefix_len()), Some(24));
        assert_eq!(
            (s.filter.egress_ip, s.filter.egress_port),
            (Some("192.0.2.10".parse().unwrap()), Some(40123))
        );
        assert_eq!(s.filter.proto, Some(6));
        assert_eq!(s.filter.state, Some(FlowState::Established));
        assert_eq!((s.group.as_deref(), s.limit), (Some("apps"), 5));
        assert_eq!(FlowSelector::from_query("").unwrap().limit, DEFAULT_LIMIT);
        assert!(
            FlowSelector::from_query("remote=203.0.113.0%2F24%3A443").unwrap().filter.remote_port
                == Some(443)
        );
        for bad in ["proto=sctp", "state=open", "egress=192.0.2.0/24", "limit=many", "color=red"] {
            assert!(FlowSelector::from_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_deletion_without_a_filter_is_refused() {
        let queries = FlowQueries::new(1);
        let policy = Arc::new(PolicySnapshot::empty(1));
        let e = delete(&queries, &policy, "").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("all=yes"));
        let e = list(&queries, &policy, "group=nope").unwrap_err();
        assert!(e.message.contains("no source group `nope`"), "{}", e.message);
    }
}
