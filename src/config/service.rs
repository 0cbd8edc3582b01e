//! `[[service]]`: where plain HTTP requests for a name go (endpoints with labels, subsets, routes by header, path
//! and method with weights, upstream TLS, load balancing, outlier ejection); validated here with positions and
//! compiled into `dataplane::policy::service::ServiceSpec`.
//!
//! ```toml
//! [[service]]
//! name = "nginx"
//! hosts = ["nginx.example.com"]
//! port = 80                        # the port clients dial
//! upstream_tls = "mutual"          # as on l7 rules; per subset overridable
//! upstream_ca = "/etc/egressd/ca.pem"
//! upstream_cert = "/etc/egressd/client.pem"
//! upstream_key = "/etc/egressd/client.key"
//!
//! [[service.endpoint]]
//! address = "203.0.113.20"
//! port = 443                       # default: 443 with upstream_tls, else the service's port
//! labels = { version = "v1" }
//!
//! [[service.subset]]
//! name = "v1"
//! labels = { version = "v1" }
//!
//! [[service.route]]
//! name = "v1"
//! headers = { want = "v1" }        # exact, "prefix:...", "regex:..."
//! to = "v1"                        # or [{ subset = "v1", weight = 80 }, { subset = "v2", weight = 20 }]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use dataplane::policy::l7::PathPattern;
use dataplane::policy::service::{
    Balancing, EndpointSpec, HeaderMatch, OutlierSpec, RetryOn, RouteSpec, ServiceSpec, SubsetSpec,
    ValueMatch, WeightedSubset,
};
use dataplane::policy::HostPattern;
use serde::Deserialize;
use toml::Spanned;

use super::policy::{check_dns_name, check_upstream_tls, parse_port_spec, ActionConfig, TlsKeys};
use super::{Config, Diagnostics, Source};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: Spanned<String>,
    /// The names clients use for it (exact DNS names).
    pub hosts: Vec<Spanned<String>>,
    /// The port clients dial.
    pub port: Spanned<i64>,
    #[serde(default)]
    pub endpoint: Vec<Spanned<EndpointConfig>>,
    #[serde(default)]
    pub subset: Vec<Spanned<SubsetConfig>>,
    #[serde(default)]
    pub route: Vec<Spanned<RouteConfig>>,
    /// "round_robin" (default) or "least_request".
    #[serde(default)]
    pub load_balancer: Option<Spanned<String>>,
    /// Endpoints tried for one connection when connecting fails (default 2).
    #[serde(default)]
    pub connect_attempts: Option<Spanned<i64>>,
    /// Seconds connecting to an endpoint may take (default: `[l7] connect_timeout`).
    #[serde(default)]
    pub connect_timeout_secs: Option<Spanned<i64>>,
    /// Failures in a row that eject an endpoint (default 5; 0 turns ejection off).
    #[serde(default)]
    pub outlier_consecutive_failures: Option<Spanned<i64>>,
    /// First ejection time; the n-th lasts n times as long, at most 300 s (default 30).
    #[serde(default)]
    pub outlier_base_ejection_secs: Option<Spanned<i64>>,
    /// Most of a subset's endpoints ejected at once, in percent (default 10; at least one, never the last).
    #[serde(default)]
    pub outlier_max_ejection_percent: Option<Spanned<i64>>,
    /// Upstream connections to the service at once (default: no limit); beyond, new ones wait.
    #[serde(default)]
    pub max_connections: Option<Spanned<i64>>,
    /// Connections that may wait for one of `max_connections`; beyond, `503` (default: no limit).
    #[serde(default)]
    pub max_pending_requests: Option<Spanned<i64>>,
    /// Seconds from a request sent to the last byte of its answer; beyond, `504` before any of the answer, a reset
    /// of the client after part of it (default: no limit).
    #[serde(default)]
    pub request_timeout_secs: Option<Spanned<i64>>,
    /// Seconds an idle upstream connection is kept for the next client (default 60; 0: never kept).
    #[serde(default)]
    pub pool_idle_timeout_secs: Option<Spanned<i64>>,
    /// Requests one upstream connection carries before it is closed (default: no limit).
    #[serde(default)]
    pub max_requests_per_connection: Option<Spanned<i64>>,
    /// Times a request safe to repeat (GET, HEAD, OPTIONS, TRACE, DELETE without a body) is sent again after a
    /// failure of `retry_on` (default 2).
    #[serde(default)]
    pub retries: Option<Spanned<i64>>,
    /// "gateway-error" (502, 503, 504), "5xx", "reset" (closed before any answer, or timed out); default
    /// ["gateway-error", "reset"].
    #[serde(default)]
    pub retry_on: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub upstream_tls: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_sni: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_ca: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_cert: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_key: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: Spanned<String>,
    #[serde(default)]
    pub port: Option<Spanned<i64>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetConfig {
    pub name: Spanned<String>,
    pub labels: Spanned<BTreeMap<String, String>>,
    #[serde(default)]
    pub upstream_tls: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_sni: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_ca: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_cert: Option<Spanned<String>>,
    #[serde(default)]
    pub upstream_key: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    /// Header name → value: exact, `prefix:VALUE` or `regex:PATTERN`.
    #[serde(default)]
    pub headers: Option<Spanned<BTreeMap<String, String>>>,
    /// A subset's name, or weighted subsets; absent: every endpoint.
    #[serde(default)]
    pub to: Option<Spanned<RouteTo>>,
    /// Overrides the service's `request_timeout_secs`.
    #[serde(default)]
    pub request_timeout_secs: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RouteTo {
    Subset(String),
    Weighted(Vec<WeightedConfig>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedConfig {
    pub subset: String,
    pub weight: i64,
}

impl ServiceConfig {
    fn tls_keys(&self) -> TlsKeys<'_> {
        TlsKeys {
            mode: self.upstream_tls.as_ref(),
            port: None,
            sni: self.upstream_sni.as_ref(),
            ca: self.upstream_ca.as_ref(),
            cert: self.upstream_cert.as_ref(),
            key: self.upstream_key.as_ref(),
        }
    }

    fn balancing(&self) -> Balancing {
        match self.load_balancer.as_ref().map(|v| v.get_ref().as_str()) {
            Some("least_request") => Balancing::LeastRequest,
            _ => Balancing::RoundRobin,
        }
    }
}

impl SubsetConfig {
    fn tls_keys(&self) -> TlsKeys<'_> {
        TlsKeys {
            mode: self.upstream_tls.as_ref(),
            port: None,
            sni: self.upstream_sni.as_ref(),
            ca: self.upstream_ca.as_ref(),
            cert: self.upstream_cert.as_ref(),
            key: self.upstream_key.as_ref(),
        }
    }
}

fn label_name_ok(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn header_name_ok(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

/// Validates every service; `config`'s rules are read to warn about a service no `l7` rule lets requests reach.
pub fn validate(config: &Config, src: &Source, diags: &mut Diagnostics) {
    let mut names = HashSet::new();
    let mut claimed: HashSet<(String, i64)> = HashSet::new();
    for service in &config.service {
        let s = service.get_ref();
        let name = s.name.get_ref();
        if !label_name_ok(name) {
            diags.error(
                src,
                s.name.span(),
                format!("service name \"{name}\": 1-64 letters, digits, '-', '_' or '.'"),
            );
        } else if !names.insert(name.as_str()) {
            diags.error(src, s.name.span(), format!("service name \"{name}\" is used twice"));
        }
        let port = *s.port.get_ref();
        if !(1..=65535).contains(&port) {
            diags.error(src, s.port.span(), format!("port: {port} must be 1..=65535"));
        }
        if s.hosts.is_empty() {
            diags.error(src, s.name.span(), "a service needs `hosts` (the names clients use for it)");
        }
        for h in &s.hosts {
            if h.get_ref().contains('*') {
                diags.error(
                    src,
                    h.span(),
                    format!("hosts: \"{}\": a service's hosts are exact names", h.get_ref()),
                );
            } else if let Err(e) = check_dns_name(h.get_ref()) {
                diags.error(src, h.span(), format!("hosts: {e}"));
            } else if !claimed.insert((h.get_ref().clone(), port)) {
                diags.error(src, h.span(), format!("hosts: {}:{port} is claimed twice", h.get_ref()));
            }
        }
        check_upstream_tls(src, &s.tls_keys(), diags);
        if let Some(v) = &s.load_balancer {
            if !matches!(v.get_ref().as_str(), "round_robin" | "least_request") {
                diags.error(
                    src,
                    v.span(),
                    format!(
                        "load_balancer: \"{}\" must be \"round_robin\" or \"least_request\"",
                        v.get_ref()
                    ),
                );
            }
        }
        for (key, value, range) in [
            ("connect_attempts", &s.connect_attempts, 1..=10),
            ("connect_timeout_secs", &s.connect_timeout_secs, 1..=300),
            ("outlier_consecutive_failures", &s.outlier_consecutive_failures, 0..=1000),
            ("outlier_base_ejection_secs", &s.outlier_base_ejection_secs, 1..=300),
            ("outlier_max_ejection_percent", &s.outlier_max_ejection_percent, 0..=100),
            ("max_connections", &s.max_connections, 1..=1_000_000),
            ("max_pending_requests", &s.max_pending_requests, 0..=1_000_000),
            ("request_timeout_secs", &s.request_timeout_secs, 1..=3600),
            ("pool_idle_timeout_secs", &s.pool_idle_timeout_secs, 0..=3600),
            ("max_requests_per_connection", &s.max_requests_per_connection, 1..=1_000_000),
            ("retries", &s.retries, 0..=10),
        ] {
            if let Some(v) = value {
                if !range.contains(v.get_ref()) {
                    diags.error(
                        src,
                        v.span(),
                        format!("{key}: {} must be {}..={}", v.get_ref(), range.start(), range.end()),
                    );
                }
            }
        }
        if let Some(on) = &s.retry_on {
            for what in on.get_ref() {
                if !matches!(what.as_str(), "gateway-error" | "5xx" | "reset") {
                    diags.error(
                        src,
                        on.span(),
                        format!("retry_on: \"{what}\" must be \"gateway-error\", \"5xx\" or \"reset\""),
                    );
                }
            }
        }
        if s.endpoint.is_empty() {
            diags.error(src, service.span(), format!("service \"{name}\" has no [[service.endpoint]]"));
        }
        for e in &s.endpoint {
            let e = e.get_ref();
            if e.address.get_ref().parse::<Ipv4Addr>().is_err() {
                diags.error(
                    src,
                    e.address.span(),
                    format!("address: \"{}\" is not an IPv4 address", e.address.get_ref()),
                );
            }
            if let Some(p) = &e.port {
                if !(1..=65535).contains(p.get_ref()) {
                    diags.error(src, p.span(), format!("port: {} must be 1..=65535", p.get_ref()));
                }
            }
        }
        let mut subsets = HashSet::new();
        for sub in &s.subset {
            let sub = sub.get_ref();
            let sname = sub.name.get_ref();
            if !label_name_ok(sname) {
                diags.error(
                    src,
                    sub.name.span(),
                    format!("subset name \"{sname}\": 1-64 letters, digits, '-', '_' or '.'"),
                );
            } else if !subsets.insert(sname.as_str()) {
                diags.error(src, sub.name.span(), format!("subset \"{sname}\" is defined twice"));
            }
            if sub.labels.get_ref().is_empty() {
                diags.error(src, sub.labels.span(), "a subset needs labels (which endpoints it holds)");
            } else if !s
                .endpoint
                .iter()
                .any(|e| sub.labels.get_ref().iter().all(|(k, v)| e.get_ref().labels.get(k) == Some(v)))
            {
                diags.error(
                    src,
                    sub.labels.span(),
                    format!("subset \"{sname}\": no endpoint carries all of its labels"),
                );
            }
            check_upstream_tls(src, &sub.tls_keys(), diags);
        }
        for route in &s.route {
            check_route(route, &subsets, src, diags);
        }
        if !config.rule.iter().any(|r| rule_reaches(r.get_ref(), s)) {
            diags.warn(
                src,
                s.name.span(),
                format!(
                    "service \"{name}\": no l7 rule allows its hosts on port {port}, so no request reaches it"
                ),
            );
        }
    }
}

fn check_route(route: &Spanned<RouteConfig>, subsets: &HashSet<&str>, src: &Source, diags: &mut Diagnostics) {
    let r = route.get_ref();
    if let Some(t) = &r.request_timeout_secs {
        if !(1..=3600).contains(t.get_ref()) {
            diags.error(src, t.span(), format!("request_timeout_secs: {} must be 1..=3600", t.get_ref()));
        }
    }
    if let Some(n) = &r.name {
        if !label_name_ok(n.get_ref()) {
            diags.error(
                src,
                n.span(),
                format!("route name \"{}\": 1-64 letters, digits, '-', '_' or '.'", n.get_ref()),
            );
        }
    }
    for m in &r.methods {
        if !header_name_ok(m.get_ref()) {
            diags.error(src, m.span(), format!("methods: \"{}\" is not an HTTP method", m.get_ref()));
        }
    }
    for p in &r.paths {
        if let Err(e) = PathPattern::parse(p.get_ref()) {
            diags.error(src, p.span(), e);
        }
    }
    if let Some(headers) = &r.headers {
        for (name, value) in headers.get_ref() {
            if !header_name_ok(name) {
                diags.error(src, headers.span(), format!("headers: \"{name}\" is not a header name"));
            } else if let Err(e) = ValueMatch::parse(value) {
                diags.error(src, headers.span(), format!("headers: {name}: {e}"));
            }
        }
    }
    let Some(to) = &r.to else { return };
    let unknown = |subset: &str| !subsets.contains(subset);
    match to.get_ref() {
        RouteTo::Subset(subset) if unknown(subset) => {
            diags.error(src, to.span(), format!("to: no subset \"{subset}\" in this service"))
        }
        RouteTo::Subset(_) => {}
        RouteTo::Weighted(list) => {
            if list.is_empty() {
                diags.error(src, to.span(), "to: an empty list sends nowhere");
            }
            for w in list {
                if unknown(&w.subset) {
                    diags.error(src, to.span(), format!("to: no subset \"{}\" in this service", w.subset));
                }
                if !(0..=10_000).contains(&w.weight) {
                    diags.error(src, to.span(), format!("to: weight {} must be 0..=10000", w.weight));
                }
            }
            if !list.is_empty() && list.iter().all(|w| w.weight <= 0) {
                diags.error(src, to.span(), "to: the weights add up to 0");
            }
        }
    }
}

/// Whether an `l7` rule lets a request for one of the service's hosts on its port through.
fn rule_reaches(r: &super::policy::RuleConfig, s: &ServiceConfig) -> bool {
    let port = *s.port.get_ref();
    let port_ok = r.ports.is_empty()
        || r.ports
            .iter()
            .filter_map(|p| parse_port_spec(p.get_ref()).ok())
            .any(|p| (i64::from(p.first)..=i64::from(p.last)).contains(&port));
    *r.action.get_ref() == ActionConfig::L7
        && port_ok
        && s.hosts.iter().any(|h| {
            r.hosts
                .iter()
                .filter_map(|p| HostPattern::parse(p.get_ref()).ok())
                .any(|p| p.matches(h.get_ref()))
        })
}

/// The compiled form of a validated service.
pub fn compile(s: &ServiceConfig) -> Result<ServiceSpec, String> {
    let tls = s.tls_keys().upstream_tls();
    let default_port = if tls.is_some() { 443 } else { *s.port.get_ref() as u16 };
    let endpoints = s
        .endpoint
        .iter()
        .map(|e| {
            let e = e.get_ref();
            let address: Ipv4Addr = e.address.get_ref().parse().map_err(|_| "bad address".to_string())?;
            let port = e.port.as_ref().map_or(default_port, |p| *p.get_ref() as u16);
            Ok(EndpointSpec {
                address: SocketAddrV4::new(address, port),
                labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
        })
        .collect::<Result<_, String>>()?;
    let subsets: Vec<SubsetSpec> = s
        .subset
        .iter()
        .map(|sub| {
            let sub = sub.get_ref();
            SubsetSpec {
                name: sub.name.get_ref().clone(),
                labels: sub.labels.get_ref().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                tls: sub.tls_keys().upstream_tls(),
            }
        })
        .collect();
    let subset_index =
        |name: &str| subsets.iter().position(|x| x.name == name).ok_or_else(|| format!("no subset {name}"));
    let routes = s
        .route
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r.get_ref();
            let to = match r.to.as_ref().map(Spanned::get_ref) {
                None => vec![WeightedSubset { subset: None, weight: 1 }],
                Some(RouteTo::Subset(name)) => {
                    vec![WeightedSubset { subset: Some(subset_index(name)?), weight: 1 }]
                }
                Some(RouteTo::Weighted(list)) => list
                    .iter()
                    .map(|w| {
                        Ok(WeightedSubset { subset: Some(subset_index(&w.subset)?), weight: w.weight as u32 })
                    })
                    .collect::<Result<_, String>>()?,
            };
            Ok(RouteSpec {
                name: r.name.as_ref().map_or_else(|| (i + 1).to_string(), |n| n.get_ref().clone()),
                methods: r.methods.iter().map(|m| m.get_ref().clone()).collect(),
                paths: r.paths.iter().map(|p| PathPattern::parse(p.get_ref())).collect::<Result<_, _>>()?,
                headers: r
                    .headers
                    .iter()
                    .flat_map(|h| h.get_ref().iter())
                    .map(|(n, v)| {
                        Ok(HeaderMatch { name: n.to_ascii_lowercase(), value: ValueMatch::parse(v)? })
                    })
                    .collect::<Result<_, String>>()?,
                to,
                timeout_secs: r.request_timeout_secs.as_ref().map(|t| *t.get_ref() as u32),
            })
        })
        .collect::<Result<_, String>>()?;
    let number = |v: &Option<Spanned<i64>>, default: u32| v.as_ref().map_or(default, |v| *v.get_ref() as u32);
    let defaults = ServiceSpec::new(
        s.name.get_ref(),
        s.hosts.iter().map(|h| h.get_ref().to_ascii_lowercase()).collect(),
        *s.port.get_ref() as u16,
        endpoints,
    );
    let outlier = defaults.outlier;
    let optional = |v: &Option<Spanned<i64>>| v.as_ref().map(|v| *v.get_ref() as u32);
    Ok(ServiceSpec {
        subsets,
        routes,
        tls,
        balancing: s.balancing(),
        outlier: OutlierSpec {
            consecutive_failures: number(&s.outlier_consecutive_failures, outlier.consecutive_failures),
            base_ejection_secs: number(&s.outlier_base_ejection_secs, outlier.base_ejection_secs),
            max_ejection_percent: number(&s.outlier_max_ejection_percent, outlier.max_ejection_percent),
        },
        connect_attempts: number(&s.connect_attempts, defaults.connect_attempts),
        connect_timeout_secs: optional(&s.connect_timeout_secs),
        max_connections: optional(&s.max_connections),
        max_pending_requests: optional(&s.max_pending_requests),
        request_timeout_secs: optional(&s.request_timeout_secs),
        pool_idle_timeout_secs: number(&s.pool_idle_timeout_secs, defaults.pool_idle_timeout_secs),
        max_requests_per_connection: optional(&s.max_requests_per_connection),
        retries: number(&s.retries, defaults.retries),
        retry_on: s.retry_on.as_ref().map_or_else(RetryOn::default, |on| {
            let has = |what: &str| on.get_ref().iter().any(|w| w == what);
            RetryOn { server_error: has("5xx"), gateway_error: has("gateway-error"), reset: has("reset") }
        }),
        ..defaults
    })
}
