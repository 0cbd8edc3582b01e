//! What an `l7` rule requires beyond the name: of every HTTP request, its method, path and headers; of every TLS
//! ClientHello, a minimum protocol version. They follow Istio's AuthorizationPolicy `to.operation`
//! (methods, paths) and Cilium's HTTP rules (method, path regex, headers).
//!
//! Paths are written as an exact path (`/get`), a prefix (`/status/*`: everything under `/status/`), or an
//! anchored regular expression (`regex:/api/v1/.*`, matched against the whole path by the `regex` crate, whose
//! matching is linear in the path's length whatever the pattern: no catastrophic backtracking on hostile paths).
//! The query string is not part of the path. A path a server could read as another one is refused under a rule
//! with paths, whatever the patterns say: dot segments (`/status/../admin`), percent-encoded dots, slashes and
//! backslashes, and backslashes (a prefix check would otherwise be bypassed by the server's normalisation).
//! Headers are `name` (present) or `name: value` (exact value).
//! Methods are compared exactly (HTTP methods are case-sensitive).
//!
//! An HTTP condition can only be checked on plaintext: a TLS connection under a rule with methods, paths or
//! headers is refused (egressd does not decrypt), which the validator also says when the rule covers port 443.

use std::fmt;

/// One allowed path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathPattern {
    Exact(String),
    /// Matches paths starting with this (written with a trailing `*`).
    Prefix(String),
    /// The regular expression's source, matched against the whole path.
    Regex(String),
}

/// Largest compiled size of one path regex (the `regex` crate's limit; bounds memory per rule).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl PathPattern {
    /// `/exact`, `/prefix/*` or `regex:PATTERN`; a reason when it is neither.
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        if let Some(source) = text.strip_prefix("regex:") {
            // The crate's message draws the pattern over several lines; its last line says what is wrong.
            compile(source).map_err(|e| {
                let text = e.to_string();
                let what = text.lines().last().unwrap_or("invalid").trim_start_matches("error: ").to_string();
                format!("path regex {source:?}: {what}")
            })?;
            return Ok(PathPattern::Regex(source.to_string()));
        }
        if !text.starts_with('/') {
            return Err(format!("path {text:?} must start with \"/\" (or be \"regex:...\")"));
        }
        if text.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?') {
            return Err(format!("path {text:?} must not contain spaces, control characters or a query"));
        }
        match text.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err(format!("path {text:?}: `*` only at the end")),
            Some(prefix) => Ok(PathPattern::Prefix(prefix.to_string())),
            None if text.contains('*') => Err(format!("path {text:?}: `*` only at the end")),
            None => Ok(PathPattern::Exact(text.to_string())),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}*"),
            PathPattern::Regex(r) => write!(f, "regex:{r}"),
        }
    }
}

fn compile(source: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{source})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

/// A required request header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderCondition {
    /// Lowercase.
    pub name: String,
    /// `None`: present with any value.
    pub value: Option<String>,
}

impl HeaderCondition {
    /// `name` or `name: value`.
    pub fn parse(text: &str) -> Result<HeaderCondition, String> {
        let (name, value) = match text.split_once(':') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
            None => (text.trim(), None),
        };
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            return Err(format!("header {text:?}: {name:?} is not a header name"));
        }
        Ok(HeaderCondition { name: name.to_ascii_lowercase(), value })
    }
}

impl fmt::Display for HeaderCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}: {v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// An `l7` rule's conditions as written (empty: the name alone decides).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct L7Conditions {
    pub methods: Vec<String>,
    pub paths: Vec<PathPattern>,
    pub headers: Vec<HeaderCondition>,
    /// Lowest TLS version the client must offer (wire value: 0x0303 for 1.2, 0x0304 for 1.3).
    pub min_tls_version: Option<u16>,
    /// Requests (HTTP requests; TLS connections) each client address may make under this rule.
    pub rate_limit: Option<RateLimit>,
    /// Plain HTTP from the client leaves as HTTPS: TLS originated to the destination (Istio's TLS origination).
    pub upstream_tls: Option<UpstreamTls>,
    /// Upstream connections this rule's clients may hold at once; beyond, a new one is refused (`503`).
    pub max_upstream_connections: Option<u32>,
}

/// TLS egressd originates towards the destination for plain HTTP clients.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// Present a client certificate (mutual TLS).
    pub mutual: bool,
    /// The destination port the TLS connection goes to (the client dialled the rule's plain port).
    pub port: u16,
    /// The server name sent and verified; by default each connection's HTTP Host.
    pub sni: Option<String>,
    /// PEM file of the CA certificates that verify the server; the system's roots when absent.
    pub ca_file: Option<String>,
    /// PEM files of the client certificate chain and its key (mutual).
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// At most `requests` per `per_secs` seconds from one client address, in a burst or spread out (a token bucket
/// holding `requests` tokens, refilled at `requests / per_secs` a second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub requests: u32,
    pub per_secs: u32,
}

impl RateLimit {
    /// `REQUESTS/PERIOD`: `10/s`, `100/1m`, `1000/h`, `5/30s`.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let bad = |why: &str| format!("rate_limit {text:?}: {why} (expected REQUESTS/PERIOD, as \"100/1m\")");
        let (requests, period) = text.split_once('/').ok_or_else(|| bad("no `/`"))?;
        let requests: u32 = requests
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("requests must be 1 or more"))?;
        let period = period.trim();
        let unit_at =
            period.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| bad("the period needs a unit"))?;
        let (count, unit) = period.split_at(unit_at);
        let count: u32 = if count.is_empty() { 1 } else { count.parse().map_err(|_| bad("bad period"))? };
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad("the period's unit must be s, m, h or d")),
        };
        let per_secs = count.checked_mul(unit_secs).filter(|s| (1..=86400).contains(s));
        let per_secs = per_secs.ok_or_else(|| bad("the period must be 1 s to 1 day"))?;
        Ok(RateLimit { requests, per_secs })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.requests, self.per_secs)
    }
}

impl L7Conditions {
    pub fn is_empty(&self) -> bool {
        *self == L7Conditions::default()
    }

    /// Whether a condition needs the plaintext request (so TLS under this rule is refused).
    pub fn needs_plaintext(&self) -> bool {
        !self.methods.is_empty()
            || !self.paths.is_empty()
            || !self.headers.is_empty()
            || self.upstream_tls.is_some()
    }
}

/// Why a request does not meet its rule's conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestDenial {
    Method,
    Path,
    Header,
}

impl RequestDenial {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestDenial::Method => "method_not_allowed",
            RequestDenial::Path => "path_not_allowed",
            RequestDenial::Header => "header_missing",
        }
    }
}

/// [`L7Conditions`] ready to match (regexes compiled once per policy generation).
#[derive(Debug)]
pub struct CompiledL7 {
    conditions: L7Conditions,
    regexes: Vec<Option<regex::Regex>>,
}

impl CompiledL7 {
    pub fn new(conditions: &L7Conditions) -> Result<CompiledL7, String> {
        let regexes = conditions
            .paths
            .iter()
            .map(|p| match p {
                PathPattern::Regex(source) => compile(source).map(Some).map_err(|e| e.to_string()),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(CompiledL7 { conditions: conditions.clone(), regexes })
    }

    pub fn conditions(&self) -> &L7Conditions {
        &self.conditions
    }

    /// Checks a request's method, path (the target's path and query; the query is ignored) and headers.
    pub fn check_request<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h [u8]>,
    ) -> Result<(), RequestDenial> {
        let c = &self.conditions;
        if !c.methods.is_empty() && !c.methods.iter().any(|m| m == method) {
            return Err(RequestDenial::Method);
        }
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if !c.paths.is_empty() && !is_plain_path(path) {
            return Err(RequestDenial::Path);
        }
        if !c.paths.is_empty()
            && !c.paths.iter().zip(&self.regexes).any(|(p, re)| match (p, re) {
                (PathPattern::Exact(e), _) => path == e,
                (PathPattern::Prefix(prefix), _) => path.starts_with(prefix.as_str()),
                (PathPattern::Regex(_), Some(re)) => re.is_match(path),
                (PathPattern::Regex(_), None) => false,
            })
        {
            return Err(RequestDenial::Path);
        }
        for h in &c.headers {
            let present = header(&h.name);
            let ok = match (&h.value, present) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(want), Some(got)) => got.trim_ascii() == want.as_bytes(),
            };
            if !ok {
                return Err(RequestDenial::Header);
            }
        }
        Ok(())
    }
}

/// Whether `path` means the same to every server: no `.` or `..` segment, no backslash, no percent-encoded dot,
/// slash or backslash.
fn is_plain_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    !path.contains('\\')
        && !["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
        && !path.split('/').any(|segment| segment == "." || segment == "..")
}

/// `"1.2"` → 0x0303, `"1.3"` → 0x0304.
pub fn parse_tls_version(text: &str) -> Result<u16, String> {
    match text {
        "1.0" => Ok(0x0301),
        "1.1" => Ok(0x0302),
        "1.2" => Ok(0x0303),
        "1.3" => Ok(0x0304),
        _ => Err(format!("TLS version {text:?} must be \"1.2\" or \"1.3\" (or \"1.0\", \"1.1\")")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(methods: &[&str], paths: &[&str], headers: &[&str]) -> CompiledL7 {
        CompiledL7::new(&L7Conditions {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            paths: paths.iter().map(|p| PathPattern::parse(p).unwrap()).collect(),
            headers: headers.iter().map(|h| HeaderCondition::parse(h).unwrap()).collect(),
            min_tls_version: None,
            rate_limit: None,
            upstream_tls: None,
            max_upstream_connections: None,
        })
        .unwrap()
    }

    #[test]
    fn methods_paths_and_headers() {
        let none = |_: &str| None;
        let c = compiled(&["GET", "HEAD"], &["/status/*", "/get", "regex:/api/v1/[a-z]+"], &[]);
        assert_eq!(c.check_request("GET", "/status/200", none), Ok(()));
        assert_eq!(c.check_request("GET", "/get?x=1", none), Ok(()), "the query is not the path");
        assert_eq!(c.check_request("GET", "/api/v1/users", none), Ok(()));
        assert_eq!(c.check_request("GET", "/api/v1/users/1", none), Err(RequestDenial::Path), "anchored");
        assert_eq!(c.check_request("GET", "/getx", none), Err(RequestDenial::Path), "exact");
        assert_eq!(c.check_request("GET", "/admin", none), Err(RequestDenial::Path));
        for sneaky in
            ["/status/../admin", "/status/./x/..", "/status/%2e%2e/admin", "/status%2Fx", "/status/..\\admin"]
        {
            assert_eq!(c.check_request("GET", sneaky, none), Err(RequestDenial::Path), "{sneaky}");
        }
        assert_eq!(c.check_request("POST", "/get", none), Err(RequestDenial::Method));
        assert_eq!(
            c.check_request("get", "/get", none),
            Err(RequestDenial::Method),
            "methods are case-sensitive"
        );
        let h = compiled(&[], &[], &["x-team", "x-env: prod"]);
        let headers = |n: &str| match n {
            "x-team" => Some(&b"payments"[..]),
            "x-env" => Some(&b" prod "[..]),
            _ => None,
        };
        assert_eq!(h.check_request("PUT", "/anything", headers), Ok(()));
        let wrong = |n: &str| if n == "x-team" { Some(&b"a"[..]) } else { Some(&b"staging"[..]) };
        assert_eq!(h.check_request("PUT", "/", wrong), Err(RequestDenial::Header));
        assert_eq!(h.check_request("PUT", "/", none), Err(RequestDenial::Header));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        assert!(PathPattern::parse("status").unwrap_err().contains("must start with"));
        assert!(PathPattern::parse("/a*b").unwrap_err().contains("only at the end"));
        assert!(PathPattern::parse("/a?b=1").unwrap_err().contains("query"));
        assert!(PathPattern::parse("regex:/a(").unwrap_err().contains("path regex"));
        assert!(PathPattern::parse("regex:(a{1000}){1000}").is_err(), "over the size limit");
        assert!(HeaderCondition::parse("bad name: x").is_err());
        assert_eq!(HeaderCondition::parse("X-Team").unwrap().name, "x-team");
        assert_eq!(parse_tls_version("1.2"), Ok(0x0303));
        assert_eq!(RateLimit::parse("10/s"), Ok(RateLimit { requests: 10, per_secs: 1 }));
        assert_eq!(RateLimit::parse("100/1m"), Ok(RateLimit { requests: 100, per_secs: 60 }));
        assert_eq!(RateLimit::parse("5 / 30s"), Ok(RateLimit { requests: 5, per_secs: 30 }));
        assert_eq!(RateLimit::parse("1000/h"), Ok(RateLimit { requests: 1000, per_secs: 3600 }));
        for bad in ["0/s", "10", "10/", "10/5", "10/5x", "-1/s", "10/0s", "10/2d", "x/s", "10/99999999999h"] {
            assert!(RateLimit::parse(bad).is_err(), "{bad}");
        }
        assert!(parse_tls_version("1.4").is_err());
    }
}
