//! Services: where plain HTTP requests (and TLS clients, by SNI) for a name go instead of the address the client
//! dialled. One `[[service]]` holds what Istio spreads over a ServiceEntry (hosts, port, endpoints with labels), a
//! DestinationRule (subsets by label, upstream TLS, load balancing, outlier ejection) and a VirtualService (routes
//! by header, path and method to subsets, with weights).
//!
//! A TLS client shows only its SNI: it takes the first route without conditions on the request
//! ([`CompiledService::tls_route`]) and its own TLS passes through to the endpoint.
//!
//! The policy still decides first: a request reaches a service only under an `l7` rule that allows its Host. Then,
//! when the Host and the port the client dialled name a service, its first matching route picks the subset (by
//! weight) and the L7 path connects to one of the subset's endpoints instead of the dialled address. Each request
//! is routed: one for another route than the upstream connection's waits until that connection has answered every
//! earlier request (their responses are framed as they go by), then goes on a new upstream connection for its own
//! route. Weights split upstream connections: a client connection keeps its subset while its requests keep their
//! route.
//!
//! This module is the immutable, compiled half (matching, subsets resolved to endpoint lists); the mutable half
//! (weighted choice, round robin, outlier ejection) is `crate::l7::balance`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddrV4;

use super::l7::{PathPattern, UpstreamTls};

/// How a header's value must look for a route to match.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    /// Anchored regular expression over the whole value (linear time, as for paths).
    Regex(String),
}

impl ValueMatch {
    /// `value` (exact), `prefix:VALUE` or `regex:PATTERN`.
    pub fn parse(text: &str) -> Result<ValueMatch, String> {
        if let Some(p) = text.strip_prefix("prefix:") {
            return Ok(ValueMatch::Prefix(p.to_string()));
        }
        if let Some(source) = text.strip_prefix("regex:") {
            compile(source).map_err(|e| {
                let text = e.to_string();
                let what = text.lines().last().unwrap_or("invalid").trim_start_matches("error: ").to_string();
                format!("header regex {source:?}: {what}")
            })?;
            return Ok(ValueMatch::Regex(source.to_string()));
        }
        Ok(ValueMatch::Exact(text.to_string()))
    }
}

impl fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueMatch::Exact(v) => f.write_str(v),
            ValueMatch::Prefix(v) => write!(f, "prefix:{v}"),
            ValueMatch::Regex(v) => write!(f, "regex:{v}"),
        }
    }
}

fn compile(source: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{source})$")).size_limit(1 << 20).build()
}

/// One header a route requires.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderMatch {
    /// Lowercase.
    pub name: String,
    pub value: ValueMatch,
}

/// Where a route sends its share: a subset (an index into [`ServiceSpec::subsets`]) or, `None`, every endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightedSubset {
    pub subset: Option<usize>,
    pub weight: u32,
}

/// One route: every condition given must hold (none: the route matches every request).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteSpec {
    pub name: String,
    pub methods: Vec<String>,
    pub paths: Vec<PathPattern>,
    pub headers: Vec<HeaderMatch>,
    /// At least one; weights need not add up to 100.
    pub to: Vec<WeightedSubset>,
    /// Overrides the service's request timeout for this route.
    pub timeout_secs: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointSpec {
    pub address: SocketAddrV4,
    /// Sorted by name.
    pub labels: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubsetSpec {
    pub name: String,
    /// The labels an endpoint must carry (all of them, with these values).
    pub labels: Vec<(String, String)>,
    /// Overrides the service's upstream TLS for this subset.
    pub tls: Option<UpstreamTls>,
}

/// How an endpoint is picked inside a subset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Balancing {
    #[default]
    RoundRobin,
    /// The endpoint with the fewest connections in flight (round robin among equals).
    LeastRequest,
}

/// Outlier ejection (Envoy's `outlierDetection`, with its defaults): an endpoint that fails `consecutive_failures`
/// times in a row (connect failure or a `5xx` first response) is left out for `base_ejection_secs` × the times it
/// was ejected (at most 300 s). At most `max_ejection_percent` of a subset's endpoints are out at once, but at least
/// one may be, and never the subset's last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutlierSpec {
    pub consecutive_failures: u32,
    pub base_ejection_secs: u32,
    pub max_ejection_percent: u32,
}

impl Default for OutlierSpec {
    fn default() -> Self {
        OutlierSpec { consecutive_failures: 5, base_ejection_secs: 30, max_ejection_percent: 10 }
    }
}

/// A service as the configuration gives it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceSpec {
    pub name: String,
    /// The names clients use (lowercase, exact).
    pub hosts: Vec<String>,
    /// The port clients dial.
    pub port: u16,
    pub endpoints: Vec<EndpointSpec>,
    pub subsets: Vec<SubsetSpec>,
    /// Empty: every request goes to every endpoint.
    pub routes: Vec<RouteSpec>,
    /// TLS towards the endpoints (per subset overridable); `None`: plain HTTP.
    pub tls: Option<UpstreamTls>,
    pub balancing: Balancing,
    pub outlier: OutlierSpec,
    /// Endpoints tried for one connection when connecting fails (nothing was sent yet, so trying the next is safe).
    pub connect_attempts: u32,
    /// How long connecting to an endpoint may take (`None`: `[l7] connect_timeout`).
    pub connect_timeout_secs: Option<u32>,
    /// Upstream connections to the service at once; beyond, a connection waits for one (see below).
    pub max_connections: Option<u32>,
    /// Client connections that may wait for an upstream connection when `max_connections` are in use; beyond,
    /// `503` at once (`None`: no limit on waiting; waiting ends at the connect timeout).
    pub max_pending_requests: Option<u32>,
    /// Time from a request sent to the first byte of its answer; beyond, `504` (`None`: no limit).
    pub request_timeout_secs: Option<u32>,
    /// How long an idle upstream connection is kept for the next client (0: never kept).
    pub pool_idle_timeout_secs: u32,
    /// Requests one upstream connection carries before it is closed (`None`: no limit).
    pub max_requests_per_connection: Option<u32>,
    /// Times a request safe to repeat is sent again (to another endpoint when there is one) after a failure of
    /// `retry_on`.
    pub retries: u32,
    pub retry_on: RetryOn,
}

impl ServiceSpec {
    /// A service with no subsets or routes, plain HTTP, and every other setting at its documented default.
    pub fn new(name: &str, hosts: Vec<String>, port: u16, endpoints: Vec<EndpointSpec>) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            hosts,
            port,
            endpoints,
            subsets: Vec::new(),
            routes: Vec::new(),
            tls: None,
            balancing: Balancing::default(),
            outlier: OutlierSpec::default(),
            connect_attempts: 2,
            connect_timeout_secs: None,
            max_connections: None,
            max_pending_requests: None,
            request_timeout_secs: None,
            pool_idle_timeout_secs: 60,
            max_requests_per_connection: None,
            retries: 2,
            retry_on: RetryOn::default(),
        }
    }
}

/// What a request is retried on (Envoy's `retry_on` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`: the connection closed or failed before any answer (also: the request timed out).
    pub reset: bool,
}

impl Default for RetryOn {
    fn default() -> Self {
        RetryOn { server_error: false, gateway_error: true, reset: true }
    }
}

impl RetryOn {
    /// Whether an answer with `status` is retried.
    pub fn status(&self, status: u16) -> bool {
        (self.server_error && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
    }
}

/// Identifies a service within one policy snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId(pub u32);

/// A service ready to match: routes' regexes compiled, subsets resolved to endpoint indices.
#[derive(Debug)]
pub struct CompiledService {
    spec: ServiceSpec,
    /// Per subset, the endpoints carrying its labels; the last entry is every endpoint (the `None` subset).
    members: Vec<Vec<usize>>,
    /// Per route: per path pattern, its compiled regex; per header, its compiled regex.
    path_regexes: Vec<Vec<Option<regex::Regex>>>,
    header_regexes: Vec<Vec<Option<regex::Regex>>>,
}

impl CompiledService {
    pub fn new(spec: ServiceSpec) -> Result<CompiledService, String> {
        let mut members: Vec<Vec<usize>> = spec
            .subsets
            .iter()
            .map(|s| {
                (0..spec.endpoints.len())
                    .filter(|&i| s.labels.iter().all(|l| spec.endpoints[i].labels.contains(l)))
                    .collect()
            })
            .collect();
        members.push((0..spec.endpoints.len()).collect());
        let regex_of = |source: &str| compile(source).map(Some).map_err(|e| e.to_string());
        let mut path_regexes = Vec::new();
        let mut header_regexes = Vec::new();
        for route in &spec.routes {
            path_regexes.push(
                route
                    .paths
                    .iter()
                    .map(|p| match p {
                        PathPattern::Regex(s) => regex_of(s),
                        _ => Ok(None),
                    })
                    .collect::<Result<_, _>>()?,
            );
            header_regexes.push(
                route
                    .headers
                    .iter()
                    .map(|h| match &h.value {
                        ValueMatch::Regex(s) => regex_of(s),
                        _ => Ok(None),
                    })
                    .collect::<Result<_, _>>()?,
            );
        }
        Ok(CompiledService { spec, members, path_regexes, header_regexes })
    }

    pub fn spec(&self) -> &ServiceSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The endpoints (indices into the spec's list) of `subset` (`None`: all of them).
    pub fn members(&self, subset: Option<usize>) -> &[usize] {
        let index = subset.unwrap_or(self.spec.subsets.len()).min(self.members.len() - 1);
        &self.members[index]
    }

    /// The upstream TLS of `subset`: its own, else the service's.
    pub fn tls(&self, subset: Option<usize>) -> Option<&UpstreamTls> {
        subset.and_then(|s| self.spec.subsets.get(s)).and_then(|s| s.tls.as_ref()).or(self.spec.tls.as_ref())
    }

    pub fn subset_name(&self, subset: Option<usize>) -> &str {
        subset.and_then(|s| self.spec.subsets.get(s)).map_or("", |s| s.name.as_str())
    }

    /// The first route a request matches (`method`, `path` with its query, headers by lowercase name); with no
    /// routes at all, route 0 is the implicit one to every endpoint. `None`: no route matches.
    pub fn route<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Option<usize> {
        if self.spec.routes.is_empty() {
            return Some(0);
        }
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.spec.routes.iter().enumerate().position(|(i, r)| {
            let method_ok = r.methods.is_empty() || r.methods.iter().any(|m| m == method);
            let path_ok = r.paths.is_empty()
                || r.paths.iter().zip(&self.path_regexes[i]).any(|(p, re)| match (p, re) {
                    (PathPattern::Exact(e), _) => path == e,
                    (PathPattern::Prefix(prefix), _) => path.starts_with(prefix.as_str()),
                    (PathPattern::Regex(_), Some(re)) => re.is_match(path),
                    (PathPattern::Regex(_), None) => false,
                });
            let headers_ok = r.headers.iter().zip(&self.header_regexes[i]).all(|(h, re)| {
                let Some(value) = header(&h.name).and_then(|v| std::str::from_utf8(v.trim_ascii()).ok())
                else {
                    return false;
                };
                match (&h.value, re) {
                    (ValueMatch::Exact(want), _) => value == want,
                    (ValueMatch::Prefix(p), _) => value.starts_with(p.as_str()),
                    (ValueMatch::Regex(_), Some(re)) => re.is_match(value),
                    (ValueMatch::Regex(_), None) => false,
                }
            });
            method_ok && path_ok && headers_ok
        })
    }

    /// The route a TLS client takes: its ClientHello shows the name and nothing of the request, so the first route
    /// without conditions on method, path or headers (with no routes at all, the implicit route 0). `None`: every
    /// route needs to see the request.
    pub fn tls_route(&self) -> Option<usize> {
        if self.spec.routes.is_empty() {
            return Some(0);
        }
        self.spec
            .routes
            .iter()
            .position(|r| r.methods.is_empty() && r.paths.is_empty() && r.headers.is_empty())
    }

    /// Route `route`'s destinations (the implicit route: every endpoint).
    pub fn destinations(&self, route: usize) -> &[WeightedSubset] {
        const EVERY_ENDPOINT: &[WeightedSubset] = &[WeightedSubset { subset: None, weight: 1 }];
        self.spec.routes.get(route).map_or(EVERY_ENDPOINT, |r| r.to.as_slice())
    }

    /// The request timeout of `route`: its own, else the service's.
    pub fn request_timeout_secs(&self, route: usize) -> Option<u32> {
        self.spec.routes.get(route).and_then(|r| r.timeout_secs).or(self.spec.request_timeout_secs)
    }

    pub fn route_name(&self, route: usize) -> &str {
        self.spec.routes.get(route).map_or("default", |r| r.name.as_str())
    }
}

/// The services of a snapshot, found by (Host, dialled port).
#[derive(Debug, Default)]
pub struct ServiceTable {
    services: Vec<CompiledService>,
    by_host: HashMap<String, Vec<(u16, ServiceId)>>,
}

impl ServiceTable {
    pub fn new(specs: Vec<ServiceSpec>) -> Result<ServiceTable, String> {
        let mut table = ServiceTable::default();
        for spec in specs {
            let id = ServiceId(table.services.len() as u32);
            for host in &spec.hosts {
                let ports = table.by_host.entry(host.to_ascii_lowercase()).or_default();
                if ports.iter().any(|(p, _)| *p == spec.port) {
                    return Err(format!("{host}:{} is claimed by two services", spec.port));
                }
                ports.push((spec.port, id));
            }
            let name = spec.name.clone();
            table.services.push(CompiledService::new(spec).map_err(|e| format!("service {name}: {e}"))?);
        }
        Ok(table)
    }

    /// The service clients reach as `host` (any case, optional trailing dot) on `port`.
    pub fn lookup(&self, host: &str, port: u16) -> Option<ServiceId> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let ports = match self.by_host.get(host) {
            Some(p) => p,
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.by_host.get(host.to_ascii_lowercase().as_str())?
            }
            None => return None,
        };
        ports.iter().find(|(p, _)| *p == port).map(|(_, id)| *id)
    }

    pub fn get(&self, id: ServiceId) -> Option<&CompiledService> {
        self.services.get(id.0 as usize)
    }

    pub fn iter(&self) -> impl Iterator<Item = &CompiledService> {
        self.services.iter()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(last: u8, version: &str) -> EndpointSpec {
        EndpointSpec {
            address: SocketAddrV4::new([203, 0, 113, last].into(), 443),
            labels: vec![("version".into(), version.into())],
        }
    }

    fn service() -> ServiceSpec {
        let subset = |name: &str| SubsetSpec {
            name: name.into(),
            labels: vec![("version".into(), name.into())],
            tls: None,
        };
        let route = |name: &str, headers: Vec<HeaderMatch>, to: Vec<WeightedSubset>| RouteSpec {
            name: name.into(),
            methods: vec![],
            paths: vec![],
            headers,
            to,
            timeout_secs: None,
        };
        let want = |v: &str| vec![HeaderMatch { name: "want".into(), value: ValueMatch::parse(v).unwrap() }];
        let endpoints = vec![endpoint(20, "v1"), endpoint(21, "v2"), endpoint(22, "v1")];
        ServiceSpec {
            subsets: vec![subset("v1"), subset("v2")],
            routes: vec![
                route("v1", want("v1"), vec![WeightedSubset { subset: Some(0), weight: 100 }]),
                route("v2", want("prefix:v2"), vec![WeightedSubset { subset: Some(1), weight: 100 }]),
                route("regex", want("regex:v[0-9]+"), vec![WeightedSubset { subset: None, weight: 1 }]),
                RouteSpec {
                    methods: vec!["POST".into()],
                    paths: vec![PathPattern::parse("/upload/*").unwrap()],
                    ..route("uploads", vec![], vec![WeightedSubset { subset: Some(1), weight: 1 }])
                },
            ],
            ..ServiceSpec::new("nginx", vec!["nginx.example.test".into()], 80, endpoints)
        }
    }

    #[test]
    fn routes_match_headers_paths_and_methods_in_order() {
        let s = CompiledService::new(service()).unwrap();
        let with = |value: &'static str| move |n: &str| (n == "want").then_some(value.as_bytes());
        let none = |_: &str| None;
        assert_eq!(s.route("GET", "/", with("v1")), Some(0));
        assert_eq!(s.route("GET", "/", with(" v1 ")), Some(0), "values are trimmed");
        assert_eq!(
            s.route("GET", "/", with("v1x")),
            None,
            "not exactly v1, no prefix v2, not all of the regex"
        );
        assert_eq!(s.route("GET", "/", with("v2-beta")), Some(1), "prefix");
        assert_eq!(s.route("GET", "/", with("v7")), Some(2), "regex");
        assert_eq!(s.route("GET", "/", with("V1")), None, "values are case-sensitive");
        assert_eq!(s.route("POST", "/upload/a?x=1", none), Some(3));
        assert_eq!(s.route("GET", "/upload/a", none), None, "method");
        assert_eq!(s.route("POST", "/uploads", none), None, "path");
        assert_eq!(s.route("GET", "/", |n: &str| (n == "want").then_some(&[0xff][..])), None, "not UTF-8");
    }

    #[test]
    fn subsets_resolve_to_their_endpoints_and_tls_falls_back_to_the_service() {
        let mut spec = service();
        spec.tls = Some(UpstreamTls {
            mutual: false,
            port: 443,
            sni: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        });
        spec.subsets[1].tls = Some(UpstreamTls { mutual: true, ..spec.tls.clone().unwrap() });
        let s = CompiledService::new(spec).unwrap();
        assert_eq!(s.members(Some(0)), &[0, 2]);
        assert_eq!(s.members(Some(1)), &[1]);
        assert_eq!(s.members(None), &[0, 1, 2]);
        assert!(!s.tls(Some(0)).unwrap().mutual);
        assert!(s.tls(Some(1)).unwrap().mutual);
        assert!(!s.tls(None).unwrap().mutual);
        assert_eq!(s.subset_name(Some(1)), "v2");
    }

    #[test]
    fn no_routes_means_every_endpoint_and_lookup_is_by_host_and_port() {
        let mut spec = service();
        spec.routes.clear();
        let table = ServiceTable::new(vec![spec.clone()]).unwrap();
        let id = table.lookup("NGINX.example.test.", 80).unwrap();
        let s = table.get(id).unwrap();
        assert_eq!(s.route("GET", "/", |_| None), Some(0));
        assert_eq!(s.destinations(0), &[WeightedSubset { subset: None, weight: 1 }]);
        assert_eq!(table.lookup("nginx.example.test", 8080), None);
        assert_eq!(table.lookup("other.test", 80), None);
        assert!(ServiceTable::new(vec![spec.clone(), spec]).unwrap_err().contains("two services"));
    }
}
