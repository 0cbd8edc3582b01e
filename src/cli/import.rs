//! `egressd import istio|cilium FILE...`: reads the YAML a user already has and prints the egressd policy that
//! does what it can of it: `[[group]]` and `[[rule]]` tables to put under a configuration's `[dataplane]`, with a
//! comment for everything not translated and why.
//!
//! Istio: `ServiceEntry` ports become rules (HTTP and HTTPS/TLS ports: `l7` rules by host name, TLS passed through
//! by SNI; other protocols: `allow` rules to the hosts by DNS, `to_hosts`, or to static endpoint addresses), and so
//! do a `Gateway`'s servers; all `l7` hosts of one port share one rule (in a group the first matching rule decides,
//! so two rules for the same port would hide each other's names). A `VirtualService` on a gateway whose HTTP
//! routes go to a `ServiceEntry` with endpoints becomes a `[[service]]`: routes by header, uri and method to the
//! `DestinationRule`'s subsets with weights, its TLS (files looked for in `--tls-dir`), load balancer and outlier
//! detection. What is left (other routing, pools, retries, timeouts, `AuthorizationPolicy`) is named in comments.
//!
//! Cilium: a `CiliumEgressGatewayPolicy` becomes a group leaving from its `egressIP` with an `allow` rule for its
//! `destinationCIDRs` (minus `excludedCIDRs` inside them); a `CiliumNetworkPolicy`'s egress rules become `allow`
//! rules (`toCIDR`, `toCIDRSet`, `toFQDNs` names as `to_hosts`) or `l7` rules where they carry HTTP rules.
//! Kubernetes selectors have no addresses: the sources come from `--sources`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_yaml_ng::Value;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// What the files are: `istio` (ServiceEntry, Gateway, VirtualService, DestinationRule, …) or `cilium`
    /// (CiliumEgressGatewayPolicy, CiliumNetworkPolicy).
    #[arg(value_enum)]
    pub from: ImportFrom,
    /// YAML files, each with one or more documents (`---`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The source prefixes of the group the rules are for (Kubernetes selectors have no addresses).
    #[arg(long, value_delimiter = ',', default_value = "10.0.0.0/8")]
    pub sources: Vec<String>,
    /// The egress IPs the group leaves from (a CiliumEgressGatewayPolicy's `egressIP` is used where it has one).
    #[arg(long = "egress-ip", value_delimiter = ',', default_value = "192.0.2.10")]
    pub egress_ips: Vec<String>,
    /// The group's name (Istio; Cilium policies are named after themselves).
    #[arg(long, default_value = "mesh")]
    pub group: String,
    /// Print only the rules (for a group the configuration already has), not the `[[group]]` tables.
    #[arg(long)]
    pub rules_only: bool,
    /// Where the certificates of DestinationRules' TLS are on this machine: each file is looked for here by its
    /// name (Istio's paths are inside the gateway's pod). Without it the paths are kept as written.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFrom {
    Istio,
    Cilium,
}

/// One YAML document and where it came from.
pub struct Document {
    pub origin: String,
    pub value: Value,
}

/// Reads every document of `files`.
pub fn read_documents(files: &[PathBuf]) -> anyhow::Result<Vec<Document>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .map_err(|e| anyhow::anyhow!("{}: document {}: {e}", file.display(), i + 1))?;
            if value.is_null() {
                continue;
            }
            docs.push(Document { origin: format!("{} (document {})", file.display(), i + 1), value });
        }
    }
    Ok(docs)
}

pub fn run(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let docs = match read_documents(&args.files) {
        Ok(docs) => docs,
        Err(e) => {
            eprintln!("egressd import: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let group = GroupSpec {
        name: args.group.clone(),
        sources: args.sources.clone(),
        egress_ips: args.egress_ips.clone(),
    };
    let policy = match args.from {
        ImportFrom::Istio => import_istio(&docs, &group, args.tls_dir.as_deref()),
        ImportFrom::Cilium => import_cilium(&docs, &group),
    };
    let mut policy = policy;
    if args.rules_only {
        policy.groups.clear();
    }
    print!("{}", policy.to_toml());
    Ok(ExitCode::SUCCESS)
}

/// The group the translated rules belong to.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub name: String,
    pub sources: Vec<String>,
    pub egress_ips: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rule {
    name: String,
    group: String,
    to: Vec<String>,
    except: Vec<String>,
    to_hosts: Vec<String>,
    proto: &'static str,
    ports: Vec<u16>,
    action: &'static str,
    hosts: Vec<String>,
    methods: Vec<String>,
    paths: Vec<String>,
    headers: Vec<String>,
    /// Why the rule exists: the objects it came from.
    from: Vec<String>,
}

/// TLS towards a service's endpoints (a DestinationRule's `tls`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TlsOut {
    mode: &'static str,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    sni: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RouteOut {
    name: String,
    methods: Vec<String>,
    paths: Vec<String>,
    headers: BTreeMap<String, String>,
    /// (subset, weight); empty subset: every endpoint.
    to: Vec<(String, u32)>,
    timeout_secs: Option<u32>,
}

/// A `[[service]]`: a VirtualService's routes on a gateway port to a ServiceEntry's endpoints, with the
/// DestinationRule's subsets, TLS, load balancer and outlier detection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Service {
    name: String,
    hosts: Vec<String>,
    port: u16,
    /// (address, port, labels).
    endpoints: Vec<(String, u16, BTreeMap<String, String>)>,
    /// (name, labels, TLS override).
    subsets: Vec<(String, BTreeMap<String, String>, Option<TlsOut>)>,
    tls: Option<TlsOut>,
    routes: Vec<RouteOut>,
    load_balancer: Option<&'static str>,
    /// (consecutive failures, base ejection seconds, max ejection percent).
    outlier: (Option<u32>, Option<u32>, Option<u32>),
    /// (max connections, max pending requests, idle timeout seconds, max requests per connection): the
    /// DestinationRule's connection pool.
    pool: (Option<u32>, Option<u32>, Option<u32>, Option<u32>),
    /// The DestinationRule's `connectionPool.tcp.connectTimeout`, in seconds.
    connect_timeout: Option<u32>,
    /// A VirtualService route's `retries`: attempts, and what they are for (egressd's names).
    retries: Option<u32>,
    retry_on: Vec<&'static str>,
    from: Vec<String>,
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    groups: Vec<GroupSpec>,
    rules: Vec<Rule>,
    services: Vec<Service>,
    /// Everything not translated, one line each.
    notes: Vec<String>,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "))
}

impl Imported {
    pub fn to_toml(&self) -> String {
        let mut notes: Vec<&String> = Vec::new();
        for note in &self.notes {
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Imported by `egressd import`: put these tables under your configuration's [dataplane]."
        );
        if !self.notes.is_empty() {
            let _ = writeln!(out, "#\n# Not translated:");
            for note in notes {
                let _ = writeln!(out, "# - {note}");
            }
        }
        for g in &self.groups {
            let _ = writeln!(
                out,
                "\n[[group]]\nname = {}\nsources = {}\negress_ips = {}",
                q(&g.name),
                list(&g.sources),
                list(&g.egress_ips)
            );
        }
        for r in &self.rules {
            let _ = writeln!(out, "\n# from {}", r.from.join(", "));
            let _ = writeln!(out, "[[rule]]\nname = {}\ngroup = {}", q(&r.name), q(&r.group));
            if !r.to.is_empty() {
                let _ = writeln!(out, "to = {}", list(&r.to));
            }
            if !r.except.is_empty() {
                let _ = writeln!(out, "except = {}", list(&r.except));
            }
            if !r.to_hosts.is_empty() {
                let _ = writeln!(out, "to_hosts = {}", list(&r.to_hosts));
            }
            let _ = writeln!(out, "proto = {}", q(r.proto));
            if !r.ports.is_empty() {
                let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                let _ = writeln!(out, "ports = [{}]", ports.join(", "));
            }
            let _ = writeln!(out, "action = {}", q(r.action));
            for (key, values) in
                [("hosts", &r.hosts), ("methods", &r.methods), ("paths", &r.paths), ("headers", &r.headers)]
            {
                if !values.is_empty() {
                    let _ = writeln!(out, "{key} = {}", list(values));
                }
            }
        }
        for s in &self.services {
            s.write_toml(&mut out);
        }
        out
    }
}

fn write_tls(out: &mut String, tls: &TlsOut) {
    let _ = writeln!(out, "upstream_tls = {}", q(tls.mode));
    for (key, value) in [
        ("upstream_sni", &tls.sni),
        ("upstream_ca", &tls.ca),
        ("upstream_cert", &tls.cert),
        ("upstream_key", &tls.key),
    ] {
        if let Some(v) = value {
            let _ = writeln!(out, "{key} = {}", q(v));
        }
    }
}

fn inline_table(map: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = map.iter().map(|(k, v)| format!("{} = {}", q(k), q(v))).collect();
    format!("{{ {} }}", items.join(", "))
}

impl Service {
    fn write_toml(&self, out: &mut String) {
        let _ = writeln!(out, "\n# from {}", self.from.join(", "));
        let _ = writeln!(
            out,
            "[[service]]\nname = {}\nhosts = {}\nport = {}",
            q(&self.name),
            list(&self.hosts),
            self.port
        );
        if let Some(tls) = &self.tls {
            write_tls(out, tls);
        }
        if let Some(lb) = self.load_balancer {
            let _ = writeln!(out, "load_balancer = {}", q(lb));
        }
        let (failures, base, percent) = self.outlier;
        for (key, value) in [
            ("outlier_consecutive_failures", failures),
            ("outlier_base_ejection_secs", base),
            ("outlier_max_ejection_percent", percent),
        ] {
            if let Some(v) = value {
                let _ = writeln!(out, "{key} = {v}");
            }
        }
        for (key, value) in [
            ("connect_timeout_secs", self.connect_timeout),
            ("max_connections", self.pool.0),
            ("max_pending_requests", self.pool.1),
            ("pool_idle_timeout_secs", self.pool.2),
            ("max_requests_per_connection", self.pool.3),
        ] {
            if let Some(v) = value {
                let _ = writeln!(out, "{key} = {v}");
            }
        }
        if let Some(n) = self.retries {
            let _ = writeln!(out, "retries = {n}");
            if !self.retry_on.is_empty() {
                let on: Vec<String> = self.retry_on.iter().map(|s| s.to_string()).collect();
                let _ = writeln!(out, "retry_on = {}", list(&on));
            }
        }
        for (address, port, labels) in &self.endpoints {
            let _ = writeln!(out, "\n[[service.endpoint]]\naddress = {}\nport = {port}", q(address));
            if !labels.is_empty() {
                let _ = writeln!(out, "labels = {}", inline_table(labels));
            }
        }
        for (name, labels, tls) in &self.subsets {
            let _ =
                writeln!(out, "\n[[service.subset]]\nname = {}\nlabels = {}", q(name), inline_table(labels));
            if let Some(tls) = tls {
                write_tls(out, tls);
            }
        }
        for r in &self.routes {
            let _ = writeln!(out, "\n[[service.route]]\nname = {}", q(&r.name));
            if !r.methods.is_empty() {
                let _ = writeln!(out, "methods = {}", list(&r.methods));
            }
            if !r.paths.is_empty() {
                let _ = writeln!(out, "paths = {}", list(&r.paths));
            }
            if !r.headers.is_empty() {
                let _ = writeln!(out, "headers = {}", inline_table(&r.headers));
            }
            if let Some(t) = r.timeout_secs {
                let _ = writeln!(out, "request_timeout_secs = {t}");
            }
            match r.to.as_slice() {
                [(subset, _)] if subset.is_empty() => {}
                [(subset, _)] => {
                    let _ = writeln!(out, "to = {}", q(subset));
                }
                many => {
                    let items: Vec<String> = many
                        .iter()
                        .map(|(subset, weight)| format!("{{ subset = {}, weight = {weight} }}", q(subset)))
                        .collect();
                    let _ = writeln!(out, "to = [{}]", items.join(", "));
                }
            }
        }
    }
}

// --- YAML access --------------------------------------------------------------------------------------------------

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(*key))
}

fn text(v: &Value, path: &[&str]) -> Option<String> {
    get(v, path).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path).and_then(Value::as_sequence).map_or(&[], Vec::as_slice)
}

fn texts(v: &Value, path: &[&str]) -> Vec<String> {
    seq(v, path).iter().filter_map(|x| text(x, &[])).collect()
}

fn port_number(v: &Value) -> Option<u16> {
    text(v, &["number"]).or_else(|| text(v, &["port"])).and_then(|n| n.parse().ok()).filter(|n| *n > 0)
}

fn describe(doc: &Value) -> String {
    format!(
        "{} {}",
        text(doc, &["kind"]).unwrap_or_else(|| "?".into()),
        text(doc, &["metadata", "name"]).unwrap_or_else(|| "?".into())
    )
}

/// Rule names: letters, digits, `-`, `_`, `.`; at most 64.
fn rule_name(parts: &[&str]) -> String {
    let joined = parts.join("-");
    let clean: String = joined
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .collect();
    clean.chars().take(64).collect()
}

fn is_wildcard(host: &str) -> bool {
    host.starts_with('*')
}

fn is_address(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok() || s.parse::<dataplane::policy::Prefix>().is_ok()
}

// --- Istio --------------------------------------------------------------------------------------------------------

/// Names an `l7` rule lets through on one port, and the objects they came from.
#[derive(Default)]
struct L7Names {
    hosts: BTreeSet<String>,
    from: BTreeSet<String>,
}

/// Destinations an `allow` rule lets through on one port, and the objects they came from.
#[derive(Default)]
struct L4Destinations {
    to: BTreeSet<String>,
    to_hosts: BTreeSet<String>,
    from: BTreeSet<String>,
}

/// Everything allowed, per port.
#[derive(Default)]
struct Allowances {
    l7: BTreeMap<u16, L7Names>,
    l4: BTreeMap<u16, L4Destinations>,
}

pub fn import_istio(docs: &[Document], group: &GroupSpec, tls_dir: Option<&std::path::Path>) -> Imported {
    let mut out = Imported { groups: vec![group.clone()], ..Imported::default() };
    let mut allow = Allowances::default();
    let (mut services, routed_hosts) = routing_services(docs, &mut out.notes);
    for service in &mut services {
        relocate_tls_files(service, tls_dir, &mut out.notes);
    }
    out.services = services;
    for doc in docs {
        let v = &doc.value;
        let what = describe(v);
        match text(v, &["kind"]).as_deref() {
            Some("ServiceEntry") => service_entry(v, &what, &mut allow, &mut out.notes, &routed_hosts),
            Some("Gateway") => gateway(v, &what, &mut allow, &mut out.notes),
            Some("VirtualService") => virtual_service(v, &what, &mut out.notes, &routed_hosts),
            Some("DestinationRule") => destination_rule(v, &what, &mut out.notes, &routed_hosts),
            Some("AuthorizationPolicy") => out.notes.push(format!(
                "{what}: authorization policies are not translated; write their conditions as the l7 rules' methods, \
                 paths and headers"
            )),
            Some(_) | None => out.notes.push(format!("{what} ({}): not an Istio egress object, skipped", doc.origin)),
        }
    }
    for (port, L7Names { hosts, from }) in allow.l7 {
        out.rules.push(Rule {
            name: rule_name(&["l7", &port.to_string()]),
            group: group.name.clone(),
            to: vec!["0.0.0.0/0".into()],
            proto: "tcp",
            ports: vec![port],
            action: "l7",
            hosts: hosts.into_iter().collect(),
            from: from.into_iter().collect(),
            ..Rule::default()
        });
    }
    for (port, L4Destinations { to, to_hosts, from }) in allow.l4 {
        out.rules.push(Rule {
            name: rule_name(&["tcp", &port.to_string()]),
            group: group.name.clone(),
            to: to.into_iter().collect(),
            to_hosts: to_hosts.into_iter().collect(),
            proto: "tcp",
            ports: vec![port],
            action: "allow",
            from: from.into_iter().collect(),
            ..Rule::default()
        });
    }
    if !out.rules.is_empty() && out.rules.iter().any(|r| r.action == "l7") {
        out.notes.push(
            "l7 rules allow their names towards any address (Istio trusts the SNI and Host too); set [l7] \
             verify_destination = \"dns\" to allow a name only towards the addresses it resolves to"
                .into(),
        );
    }
    out
}

/// HTTP-like protocols are checked by Host; TLS-like by SNI; the rest at L4.
fn l7_protocol(protocol: &str) -> bool {
    matches!(protocol.to_ascii_uppercase().as_str(), "HTTP" | "HTTP2" | "GRPC" | "HTTPS" | "TLS")
}

fn service_entry(
    v: &Value,
    what: &str,
    allow: &mut Allowances,
    notes: &mut Vec<String>,
    routed_hosts: &BTreeSet<String>,
) {
    if text(v, &["spec", "location"]).as_deref() == Some("MESH_INTERNAL") {
        notes.push(format!(
            "{what}: location MESH_INTERNAL (in-mesh endpoints), translated as external destinations"
        ));
    }
    let hosts = texts(v, &["spec", "hosts"]);
    let resolution = text(v, &["spec", "resolution"]).unwrap_or_else(|| "NONE".into());
    let endpoints: Vec<String> =
        seq(v, &["spec", "endpoints"]).iter().filter_map(|e| text(e, &["address"])).collect();
    let addresses = texts(v, &["spec", "addresses"]);
    for port in seq(v, &["spec", "ports"]) {
        let Some(number) = port_number(port) else { continue };
        let protocol = text(port, &["protocol"]).unwrap_or_else(|| "TCP".into());
        if l7_protocol(&protocol) {
            let entry = allow.l7.entry(number).or_default();
            entry.hosts.extend(hosts.iter().cloned());
            entry.from.insert(what.to_string());
            if !endpoints.is_empty() && !hosts.iter().any(|h| routed_hosts.contains(h)) {
                notes.push(format!(
                    "{what}: port {number}: endpoints {} (egressd forwards to the address the client dialled; \
                     routing to endpoints is not translated yet)",
                    endpoints.join(", ")
                ));
            }
            continue;
        }
        // L4: the endpoints when there are any, else the hosts by DNS, else the VIPs / CIDRs.
        let (mut to, mut to_hosts) = (Vec::new(), Vec::new());
        let named: Vec<&String> =
            if endpoints.is_empty() { hosts.iter().collect() } else { endpoints.iter().collect() };
        for name in named {
            if is_address(name) {
                to.push(name.clone());
            } else if is_wildcard(name) {
                notes.push(format!(
                    "{what}: port {number} ({protocol}): wildcard host {name} cannot be resolved at L4"
                ));
            } else if resolution == "DNS" || resolution == "DNS_ROUND_ROBIN" || !endpoints.is_empty() {
                to_hosts.push(name.clone());
            }
        }
        if resolution == "NONE" || resolution == "STATIC" {
            to.extend(addresses.iter().filter(|a| is_address(a)).cloned());
        }
        if to.is_empty() && to_hosts.is_empty() {
            notes.push(format!("{what}: port {number} ({protocol}): no address or resolvable name, skipped"));
            continue;
        }
        let entry = allow.l4.entry(number).or_default();
        entry.to.extend(to);
        entry.to_hosts.extend(to_hosts);
        entry.from.insert(what.to_string());
    }
}

fn gateway(v: &Value, what: &str, allow: &mut Allowances, notes: &mut Vec<String>) {
    for server in seq(v, &["spec", "servers"]) {
        let Some(number) = get(server, &["port"]).and_then(port_number) else { continue };
        let protocol = text(server, &["port", "protocol"]).unwrap_or_else(|| "HTTP".into());
        let hosts: Vec<String> = texts(server, &["hosts"])
            .into_iter()
            // `namespace/host` selects where the host is declared.
            .map(|h| h.rsplit('/').next().unwrap_or(&h).to_string())
            .collect();
        let mode = text(server, &["tls", "mode"]);
        if let Some(mode) = mode.as_deref().filter(|m| *m != "PASSTHROUGH") {
            notes.push(format!(
                "{what}: port {number}: tls mode {mode} (TLS terminated at the gateway) is not translated; the l7 \
                 rule passes TLS through by SNI"
            ));
        }
        if hosts.iter().any(|h| h == "*") {
            notes.push(format!(
                "{what}: port {number}: host \"*\" (any name) is not translated: list the names"
            ));
        }
        let hosts: Vec<String> = hosts.into_iter().filter(|h| h != "*").collect();
        if l7_protocol(&protocol) {
            let entry = allow.l7.entry(number).or_default();
            entry.hosts.extend(hosts);
            entry.from.insert(what.to_string());
        } else {
            let names: Vec<String> = hosts.into_iter().filter(|h| !is_wildcard(h)).collect();
            if names.is_empty() {
                continue;
            }
            let entry = allow.l4.entry(number).or_default();
            entry.to_hosts.extend(names);
            entry.from.insert(what.to_string());
        }
    }
}

fn virtual_service(v: &Value, what: &str, notes: &mut Vec<String>, routed_hosts: &BTreeSet<String>) {
    // Routes to a service were translated (see `routing_services`): only what services lack is named.
    let routed = texts(v, &["spec", "hosts"]).iter().any(|h| routed_hosts.contains(h));
    let mut untranslated = BTreeSet::new();
    for kind in ["http", "tls", "tcp"] {
        for route in seq(v, &["spec", kind]) {
            for m in seq(route, &["match"]) {
                for key in ["headers", "uri", "method", "queryParams", "sniHosts", "authority"] {
                    let done = routed
                        && ((kind == "http" && matches!(key, "headers" | "uri" | "method"))
                            || (kind == "tls" && key == "sniHosts"));
                    if get(m, &[key]).is_some() && !done {
                        untranslated.insert(format!("match on {key}"));
                    }
                }
            }
            for d in seq(route, &["route"]) {
                if get(d, &["destination", "subset"]).is_some() && !routed {
                    untranslated.insert("routes to subsets".to_string());
                }
                if text(d, &["weight"]).is_some_and(|w| w != "100") && !routed {
                    untranslated.insert("weighted routes".to_string());
                }
            }
            for key in
                ["retries", "timeout", "fault", "mirror", "rewrite", "redirect", "headers", "corsPolicy"]
            {
                let done = routed && kind == "http" && matches!(key, "timeout" | "retries");
                if get(route, &[key]).is_some() && !done {
                    untranslated.insert(key.to_string());
                }
            }
        }
    }
    if !untranslated.is_empty() {
        notes.push(format!(
            "{what}: {} not translated yet{}",
            untranslated.into_iter().collect::<Vec<_>>().join(", "),
            if routed { "" } else { " (egressd forwards each request to the address the client dialled)" }
        ));
    }
}

fn destination_rule(v: &Value, what: &str, notes: &mut Vec<String>, routed_hosts: &BTreeSet<String>) {
    // A DestinationRule of a service: its subsets, TLS, load balancer and outlier detection were translated.
    let routed = text(v, &["spec", "host"]).is_some_and(|h| routed_hosts.contains(&h));
    let mut untranslated = BTreeSet::new();
    let mut policies: Vec<&Value> = get(v, &["spec", "trafficPolicy"]).into_iter().collect();
    policies.extend(seq(v, &["spec", "trafficPolicy", "portLevelSettings"]));
    policies.extend(seq(v, &["spec", "subsets"]).iter().filter_map(|s| get(s, &["trafficPolicy"])));
    for p in policies {
        match text(p, &["tls", "mode"]).filter(|m| m != "DISABLE") {
            Some(mode) if routed && mode == "ISTIO_MUTUAL" => {
                untranslated.insert("tls mode ISTIO_MUTUAL (the mesh's own certificates)".to_string());
            }
            Some(_) if routed => {}
            Some(mode) => {
                // Without a service, egressd originates TLS per l7 rule (upstream_tls), not per host.
                untranslated
                    .insert(format!("TLS origination (mode {mode}; egressd's is per rule: upstream_tls)"));
            }
            None => {}
        }
        for key in ["connectionPool", "outlierDetection", "loadBalancer"] {
            let done = routed;
            if get(p, &[key]).is_some() && !done {
                untranslated.insert(key.to_string());
            }
        }
    }
    if !seq(v, &["spec", "subsets"]).is_empty() && !routed {
        untranslated.insert("subsets".to_string());
    }
    if !untranslated.is_empty() {
        notes.push(format!(
            "{what}: {} not translated yet",
            untranslated.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
}

/// With `--tls-dir`: the service's certificate files are taken from there by name; without: a note says the paths
/// are the gateway pod's.
fn relocate_tls_files(service: &mut Service, tls_dir: Option<&std::path::Path>, notes: &mut Vec<String>) {
    let name = service.name.clone();
    let tls = service.tls.iter_mut().chain(service.subsets.iter_mut().filter_map(|s| s.2.as_mut()));
    for t in tls {
        for file in [&mut t.ca, &mut t.cert, &mut t.key].into_iter().flatten() {
            match tls_dir {
                Some(dir) => {
                    let base = std::path::Path::new(file.as_str()).file_name().map(|n| dir.join(n));
                    if let Some(path) = base {
                        *file = path.display().to_string();
                    }
                }
                None => notes.push(format!(
                    "service {name}: {file} is a path in Istio's gateway pod: copy the file here or run the import \
                     with --tls-dir (check loads every certificate)"
                )),
            }
        }
    }
}

/// An Istio duration ("30s", "1m", "500ms") in whole seconds, at least 1.
fn duration_secs(text: &str) -> Option<u32> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let n: f64 = number.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some((secs.ceil() as u32).max(1))
}

/// A DestinationRule's TLS settings for `port` (its port-level settings first) as upstream TLS.
fn tls_of(policy: &Value, port: Option<u16>) -> Option<TlsOut> {
    let port_level = seq(policy, &["portLevelSettings"])
        .iter()
        .find(|p| get(p, &["port"]).and_then(port_number) == port && port.is_some())
        .and_then(|p| get(p, &["tls"]));
    let tls = port_level.or_else(|| get(policy, &["tls"]))?;
    let mode = match text(tls, &["mode"]).as_deref() {
        Some("SIMPLE") => "simple",
        Some("MUTUAL") => "mutual",
        _ => return None,
    };
    Some(TlsOut {
        mode,
        ca: text(tls, &["caCertificates"]),
        cert: text(tls, &["clientCertificate"]).filter(|_| mode == "mutual"),
        key: text(tls, &["privateKey"]).filter(|_| mode == "mutual"),
        sni: text(tls, &["sni"]),
    })
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    get(v, &["labels"])
        .and_then(Value::as_mapping)
        .map(|m| m.iter().filter_map(|(k, v)| Some((text(k, &[])?, text(v, &[])?))).collect())
        .unwrap_or_default()
}

/// The services the objects describe: a VirtualService bound to a gateway whose HTTP routes go to a
/// ServiceEntry with endpoints (addresses, labels) becomes a `[[service]]` for its hosts on the route's port, with
/// the routes (headers, uri, method → subsets with weights) and the DestinationRule of the destination (subsets,
/// TLS, load balancer, outlier detection). Returns them and the hosts they cover (whose other notes are spared).
fn routing_services(docs: &[Document], notes: &mut Vec<String>) -> (Vec<Service>, BTreeSet<String>) {
    let kind = |d: &&Document, k: &str| text(&d.value, &["kind"]).as_deref() == Some(k);
    let entries: Vec<&Value> = docs.iter().filter(|d| kind(d, "ServiceEntry")).map(|d| &d.value).collect();
    let rules: Vec<&Value> = docs.iter().filter(|d| kind(d, "DestinationRule")).map(|d| &d.value).collect();
    let mut services: Vec<Service> = Vec::new();
    let mut covered = BTreeSet::new();
    for vs in docs.iter().filter(|d| kind(d, "VirtualService")).map(|d| &d.value) {
        let what = describe(vs);
        let vs_gateways = texts(vs, &["spec", "gateways"]);
        let hosts = texts(vs, &["spec", "hosts"]);
        // HTTP routes, and TLS routes (by SNI, for clients that speak TLS themselves: no request conditions).
        let routes = ["http", "tls"].into_iter().flat_map(|kind| {
            seq(vs, &["spec", kind]).iter().enumerate().map(move |(index, route)| (kind, index, route))
        });
        for (kind, index, route) in routes {
            let destinations = seq(route, &["route"]);
            let Some(dest_host) = destinations.first().and_then(|d| text(d, &["destination", "host"])) else {
                continue;
            };
            let Some(entry) = entries.iter().find(|e| texts(e, &["spec", "hosts"]).contains(&dest_host))
            else {
                continue;
            };
            if seq(entry, &["spec", "endpoints"]).is_empty() {
                continue;
            }
            if destinations.iter().any(|d| text(d, &["destination", "host"]).as_deref() != Some(&dest_host)) {
                notes.push(format!(
                    "{what}: {kind} route {}: destinations on several hosts, not translated",
                    index + 1
                ));
                continue;
            }
            let dest_port =
                destinations.first().and_then(|d| get(d, &["destination", "port"])).and_then(port_number);
            // The ServiceEntry port the destination names, for the endpoints' own port numbers.
            let entry_port = seq(entry, &["spec", "ports"])
                .iter()
                .find(|p| dest_port.is_none() || port_number(p) == dest_port)
                .cloned();
            let port_name = entry_port.as_ref().and_then(|p| text(p, &["name"]));
            let target_port = dest_port.or_else(|| entry_port.as_ref().and_then(port_number)).unwrap_or(80);
            let rule = rules.iter().find(|r| text(r, &["spec", "host"]).as_deref() == Some(&dest_host));
            let matches: Vec<&Value> = seq(route, &["match"]).iter().collect();
            let on_gateway = |m: Option<&Value>| {
                let gateways = m
                    .map(|m| texts(m, &["gateways"]))
                    .filter(|g| !g.is_empty())
                    .unwrap_or(vs_gateways.clone());
                gateways.is_empty() || gateways.iter().any(|g| g != "mesh")
            };
            let match_list: Vec<Option<&Value>> =
                if matches.is_empty() { vec![None] } else { matches.into_iter().map(Some).collect() };
            for m in match_list.into_iter().filter(|m| on_gateway(*m)) {
                let default_port = if kind == "tls" { 443 } else { 80 };
                let port =
                    m.and_then(|m| text(m, &["port"])).and_then(|p| p.parse().ok()).unwrap_or(default_port);
                let unnamed = if kind == "tls" { "tls-route" } else { "route" };
                let mut r = RouteOut {
                    name: rule_name(&[
                        &text(route, &["name"]).unwrap_or_else(|| format!("{unnamed}-{}", index + 1))
                    ]),
                    ..RouteOut::default()
                };
                if let Some(m) = m {
                    if let Some(headers) = get(m, &["headers"]).and_then(Value::as_mapping) {
                        for (name, how) in headers {
                            let Some(name) = text(name, &[]) else { continue };
                            let value = if let Some(v) = text(how, &["exact"]) {
                                v
                            } else if let Some(v) = text(how, &["prefix"]) {
                                format!("prefix:{v}")
                            } else if let Some(v) = text(how, &["regex"]) {
                                format!("regex:{v}")
                            } else {
                                continue;
                            };
                            r.headers.insert(name.to_ascii_lowercase(), value);
                        }
                    }
                    if let Some(v) = text(m, &["uri", "exact"]) {
                        r.paths.push(v);
                    } else if let Some(v) = text(m, &["uri", "prefix"]) {
                        r.paths.push(format!("{v}*"));
                    } else if let Some(v) = text(m, &["uri", "regex"]) {
                        r.paths.push(format!("regex:{v}"));
                    }
                    if let Some(v) = text(m, &["method", "exact"]) {
                        r.methods.push(v);
                    }
                }
                r.timeout_secs =
                    text(route, &["timeout"]).and_then(|t| duration_secs(&t)).map(|t| t.min(3600));
                r.to = destinations
                    .iter()
                    .map(|d| {
                        let subset = text(d, &["destination", "subset"]).unwrap_or_default();
                        let weight = text(d, &["weight"]).and_then(|w| w.parse().ok()).unwrap_or(100);
                        (subset, weight)
                    })
                    .collect();
                // A TLS route's sniHosts narrow the VirtualService's hosts.
                let sni_hosts = m.map(|m| texts(m, &["sniHosts"])).unwrap_or_default();
                let names = if sni_hosts.is_empty() { &hosts } else { &sni_hosts };
                let hosts_here: Vec<String> =
                    names.iter().filter(|h| !is_wildcard(h) && *h != "*").cloned().collect();
                if hosts_here.is_empty() {
                    continue;
                }
                let existing = services.iter_mut().find(|s| s.port == port && s.hosts == hosts_here);
                let service = match existing {
                    Some(s) => s,
                    None => {
                        services.push(new_service(
                            &hosts_here,
                            port,
                            entry,
                            port_name.as_deref(),
                            target_port,
                            rule.copied(),
                        ));
                        services.last_mut().unwrap_or_else(|| unreachable!("pushed above"))
                    }
                };
                if let Some(attempts) = get(route, &["retries", "attempts"]).and_then(|v| text(v, &[])) {
                    service.retries = attempts.parse::<u32>().ok().map(|n| n.min(10)).max(service.retries);
                    let on = text(route, &["retries", "retryOn"]).unwrap_or_default();
                    for what in on.split(',').map(str::trim) {
                        let ours = match what {
                            "5xx" => "5xx",
                            "gateway-error" | "unavailable" | "retriable-status-codes" => "gateway-error",
                            "reset" | "connect-failure" | "refused-stream" => "reset",
                            _ => continue,
                        };
                        if !service.retry_on.contains(&ours) {
                            service.retry_on.push(ours);
                        }
                    }
                    if r.timeout_secs.is_none() {
                        r.timeout_secs = text(route, &["retries", "perTryTimeout"])
                            .and_then(|t| duration_secs(&t))
                            .map(|t| t.min(3600));
                    }
                }
                if service.routes.iter().any(|x| x.name == r.name) {
                    r.name = format!("{}-{}", r.name, service.routes.len() + 1);
                }
                if !service.from.contains(&what) {
                    service.from.push(what.clone());
                }
                service.routes.push(r);
                covered.extend(hosts_here);
                covered.insert(dest_host.clone());
            }
        }
    }
    (services, covered)
}

fn new_service(
    hosts: &[String],
    port: u16,
    entry: &Value,
    port_name: Option<&str>,
    target_port: u16,
    rule: Option<&Value>,
) -> Service {
    let endpoints = seq(entry, &["spec", "endpoints"])
        .iter()
        .filter_map(|e| {
            let address = text(e, &["address"])?;
            let own = port_name.and_then(|n| text(e, &["ports", n])).and_then(|p| p.parse().ok());
            Some((address, own.unwrap_or(target_port), labels_of(e)))
        })
        .collect();
    let mut service = Service {
        name: rule_name(&[hosts[0].split('.').next().unwrap_or("service"), &port.to_string()]),
        hosts: hosts.to_vec(),
        port,
        endpoints,
        from: vec![describe(entry)],
        ..Service::default()
    };
    if let Some(rule) = rule {
        service.from.push(describe(rule));
        let policy = get(rule, &["spec", "trafficPolicy"]);
        service.tls = policy.and_then(|p| tls_of(p, Some(target_port)));
        service.subsets = seq(rule, &["spec", "subsets"])
            .iter()
            .filter_map(|s| {
                let tls = get(s, &["trafficPolicy"]).and_then(|p| tls_of(p, Some(target_port)));
                Some((text(s, &["name"])?, labels_of(s), tls))
            })
            .collect();
        if let Some(p) = policy {
            service.load_balancer = match text(p, &["loadBalancer", "simple"]).as_deref() {
                Some("LEAST_REQUEST" | "LEAST_CONN") => Some("least_request"),
                Some(_) => Some("round_robin"),
                None => None,
            };
            let outlier = get(p, &["outlierDetection"]);
            let count = |key: &str| outlier.and_then(|o| text(o, &[key])).and_then(|n| n.parse().ok());
            service.connect_timeout = get(p, &["connectionPool", "tcp", "connectTimeout"])
                .and_then(|v| text(v, &[]))
                .and_then(|t| duration_secs(&t))
                .map(|t| t.min(300));
            let pool = |path: &[&str]| get(p, path).and_then(|v| text(v, &[])).and_then(|n| n.parse().ok());
            service.pool = (
                pool(&["connectionPool", "tcp", "maxConnections"]).map(|n: u32| n.clamp(1, 1_000_000)),
                pool(&["connectionPool", "http", "http1MaxPendingRequests"]).map(|n: u32| n.min(1_000_000)),
                get(p, &["connectionPool", "http", "idleTimeout"])
                    .and_then(|v| text(v, &[]))
                    .and_then(|t| duration_secs(&t))
                    .map(|t| t.min(3600)),
                pool(&["connectionPool", "http", "maxRequestsPerConnection"])
                    .filter(|n: &u32| *n > 0)
                    .map(|n: u32| n.min(1_000_000)),
            );
            service.outlier = (
                count("consecutive5xxErrors")
                    .or_else(|| count("consecutiveErrors"))
                    .or_else(|| count("consecutiveGatewayErrors")),
                outlier
                    .and_then(|o| text(o, &["baseEjectionTime"]))
                    .and_then(|t| duration_secs(&t))
                    .map(|s| s.min(300)),
                count("maxEjectionPercent").map(|p: u32| p.min(100)),
            );
        }
    }
    service
}

// --- Cilium -------------------------------------------------------------------------------------------------------

pub fn import_cilium(docs: &[Document], defaults: &GroupSpec) -> Imported {
    let mut out = Imported::default();
    for doc in docs {
        let v = &doc.value;
        let what = describe(v);
        let name = rule_name(&[&text(v, &["metadata", "name"]).unwrap_or_else(|| "cilium".into())]);
        match text(v, &["kind"]).as_deref() {
            Some("CiliumEgressGatewayPolicy") => egress_gateway_policy(v, &what, &name, defaults, &mut out),
            Some("CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy") => {
                network_policy(v, &what, &name, defaults, &mut out)
            }
            Some(_) | None => {
                out.notes.push(format!("{what} ({}): not a Cilium egress object, skipped", doc.origin))
            }
        }
    }
    // A source prefix belongs to one group: --sources goes to the first; the others wait for their pods' CIDRs.
    for g in out.groups.iter_mut().skip(1) {
        g.sources.clear();
        out.notes.push(format!(
            "group {}: no sources yet (--sources went to the first group): give it its pods' CIDRs",
            g.name
        ));
    }
    out
}

fn selector_note(what: &str, out: &mut Imported) {
    out.notes.push(format!(
        "{what}: its pod selectors have no addresses; its group's sources are --sources (edit them to the pods' \
         CIDRs)"
    ));
}

fn egress_gateway_policy(v: &Value, what: &str, name: &str, defaults: &GroupSpec, out: &mut Imported) {
    let egress_ips = match text(v, &["spec", "egressGateway", "egressIP"]) {
        Some(ip) => vec![ip],
        None => {
            out.notes.push(format!("{what}: no egressGateway.egressIP: the group leaves from --egress-ip"));
            defaults.egress_ips.clone()
        }
    };
    selector_note(what, out);
    out.groups.push(GroupSpec { name: name.to_string(), sources: defaults.sources.clone(), egress_ips });
    let to = texts(v, &["spec", "destinationCIDRs"]);
    let (except, outside) = split_excepts(&to, &texts(v, &["spec", "excludedCIDRs"]));
    if !outside.is_empty() {
        out.notes.push(format!(
            "{what}: excludedCIDRs {} are outside every destinationCIDR: already not allowed",
            outside.join(", ")
        ));
    }
    // An egress gateway policy chooses the egress IP; egressd also denies by default, so its destinations are
    // what the group may reach.
    out.rules.push(Rule {
        name: rule_name(&[name, "destinations"]),
        group: name.to_string(),
        to,
        except,
        proto: "any",
        action: "allow",
        from: vec![what.to_string()],
        ..Rule::default()
    });
}

/// Excepts strictly inside one of `to` (what egressd's `except` means); the others.
fn split_excepts(to: &[String], excepts: &[String]) -> (Vec<String>, Vec<String>) {
    use dataplane::policy::Prefix;
    let to: Vec<Prefix> = to.iter().filter_map(|t| t.parse().ok()).collect();
    let mut inside = Vec::new();
    let mut outside = Vec::new();
    for e in excepts {
        match e.parse::<Prefix>() {
            Ok(p) if to.iter().any(|t| t.covers(&p) && *t != p) => inside.push(e.clone()),
            _ => outside.push(e.clone()),
        }
    }
    (inside, outside)
}

fn network_policy(v: &Value, what: &str, name: &str, defaults: &GroupSpec, out: &mut Imported) {
    selector_note(what, out);
    out.groups.push(GroupSpec { name: name.to_string(), ..defaults.clone() });
    for (i, rule) in seq(v, &["spec", "egress"]).iter().enumerate() {
        let label = format!("{what} egress[{i}]");
        for key in ["toEndpoints", "toServices", "toEntities", "toGroups", "toRequires"] {
            if get(rule, &[key]).is_some() {
                out.notes.push(format!("{label}: {key} (in-cluster selectors) is not translated"));
            }
        }
        let mut to = texts(rule, &["toCIDR"]);
        let mut except = Vec::new();
        for set in seq(rule, &["toCIDRSet"]) {
            if let Some(cidr) = text(set, &["cidr"]) {
                to.push(cidr);
            }
            except.extend(texts(set, &["except"]));
        }
        let (except, outside) = split_excepts(&to, &except);
        if !outside.is_empty() {
            out.notes.push(format!("{label}: except {} outside its CIDRs, dropped", outside.join(", ")));
        }
        let fqdns = seq(rule, &["toFQDNs"]);
        let names: Vec<String> = fqdns.iter().filter_map(|f| text(f, &["matchName"])).collect();
        let patterns: Vec<String> = fqdns.iter().filter_map(|f| text(f, &["matchPattern"])).collect();
        let ports_of = |p: &Value| -> Vec<(u16, String)> {
            seq(p, &["ports"])
                .iter()
                .filter_map(|x| {
                    let port = text(x, &["port"])?.parse().ok()?;
                    Some((port, text(x, &["protocol"]).unwrap_or_else(|| "TCP".into()).to_ascii_lowercase()))
                })
                .collect()
        };
        let to_ports = seq(rule, &["toPorts"]);
        // Each toPorts entry: its (port, protocol) pairs and its L7 rules.
        type PortsAndRules<'v> = (Vec<(u16, String)>, Option<&'v Value>);
        let mut pieces: Vec<PortsAndRules> =
            to_ports.iter().map(|p| (ports_of(p), get(p, &["rules"]))).collect();
        if pieces.is_empty() {
            pieces.push((Vec::new(), None));
        }
        for (j, (ports, rules)) in pieces.into_iter().enumerate() {
            let http = rules.map(|r| seq(r, &["http"])).unwrap_or(&[]);
            if rules.is_some_and(|r| get(r, &["dns"]).is_some()) {
                out.notes.push(format!("{label}: dns rules (DNS proxy) are not translated"));
                continue;
            }
            let proto = match ports.first().map(|(_, p)| p.as_str()) {
                Some("udp") => "udp",
                Some("tcp") => "tcp",
                _ => "any",
            };
            let port_numbers: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
            let base = Rule {
                group: name.to_string(),
                proto,
                ports: port_numbers.clone(),
                from: vec![label.clone()],
                ..Rule::default()
            };
            if !http.is_empty() {
                // Methods, paths and headers of all HTTP rules together: egressd has one list of each per rule.
                let hosts: Vec<String> = names.iter().chain(&patterns).cloned().collect();
                if hosts.is_empty() {
                    out.notes.push(format!(
                        "{label}: HTTP rules without toFQDNs (no host names to check) skipped"
                    ));
                    continue;
                }
                let mut methods = BTreeSet::new();
                let mut paths = BTreeSet::new();
                let mut headers = BTreeSet::new();
                for h in http {
                    methods.extend(text(h, &["method"]));
                    paths.extend(text(h, &["path"]).map(|p| format!("regex:{p}")));
                    headers.extend(texts(h, &["headers"]));
                }
                if http.len() > 1 {
                    out.notes.push(format!(
                        "{label}: {} HTTP rules merged into one list of methods, paths and headers (wider: any method \
                         with any path)",
                        http.len()
                    ));
                }
                if port_numbers.contains(&443) {
                    out.notes.push(format!(
                        "{label}: HTTP rules on port 443 need plaintext; egressd refuses TLS under them"
                    ));
                }
                out.rules.push(Rule {
                    name: rule_name(&[name, &format!("egress{i}-{j}")]),
                    to: vec!["0.0.0.0/0".into()],
                    proto: "tcp",
                    action: "l7",
                    hosts,
                    methods: methods.into_iter().collect(),
                    paths: paths.into_iter().collect(),
                    headers: headers.into_iter().collect(),
                    ..base
                });
                continue;
            }
            if !patterns.is_empty() {
                out.notes.push(format!(
                    "{label}: matchPattern {} cannot be resolved at L4 (egressd does not snoop DNS)",
                    patterns.join(", ")
                ));
            }
            if to.is_empty() && names.is_empty() {
                continue;
            }
            out.rules.push(Rule {
                name: rule_name(&[name, &format!("egress{i}-{j}")]),
                to: to.clone(),
                except: except.clone(),
                to_hosts: names.clone(),
                action: "allow",
                ..base
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_durations_become_whole_seconds() {
        assert_eq!(duration_secs("30s"), Some(30));
        assert_eq!(duration_secs("1m"), Some(60));
        assert_eq!(duration_secs("1.5s"), Some(2));
        assert_eq!(duration_secs("500ms"), Some(1), "at least a second");
        assert_eq!(duration_secs("30"), None, "a unit is required");
        assert_eq!(duration_secs("3x"), None);
    }

    #[test]
    fn a_destination_rule_gives_the_service_its_balancer_and_outlier_detection() {
        let docs: Vec<Document> = [
            "kind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: [api.test]\n  ports: [{number: 443, name: https, \
             protocol: HTTPS}]\n  endpoints: [{address: 203.0.113.5}, {address: 203.0.113.6}]",
            "kind: DestinationRule\nmetadata: {name: dr}\nspec:\n  host: api.test\n  trafficPolicy:\n    loadBalancer: \
             {simple: LEAST_REQUEST}\n    outlierDetection: {consecutive5xxErrors: 7, baseEjectionTime: 1m, \
             maxEjectionPercent: 50}\n    tls: {mode: SIMPLE, sni: api.test}\n    connectionPool: {tcp: \
             {maxConnections: 10, connectTimeout: 3s}, http: {http1MaxPendingRequests: 5, idleTimeout: 90s, maxRequestsPerConnection: 100}}",
            "kind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [api.test]\n  gateways: [egress]\n  http:\n  \
             - match: [{port: 80, uri: {prefix: /v2}, method: {exact: GET}}]\n    timeout: 5s\n    retries: \
             {attempts: 3, retryOn: \"connect-failure,5xx\"}\n    route: \
             [{destination: {host: api.test, port: {number: 443}}}]",
        ]
        .iter()
        .map(|text| Document { origin: "t".into(), value: serde_yaml_ng::from_str(text).unwrap() })
        .collect();
        let mut notes = Vec::new();
        let (services, covered) = routing_services(&docs, &mut notes);
        assert!(covered.contains("api.test"));
        let s = &services[0];
        assert_eq!((s.port, s.load_balancer), (80, Some("least_request")));
        assert_eq!(s.outlier, (Some(7), Some(60), Some(50)));
        assert_eq!(s.pool, (Some(10), Some(5), Some(90), Some(100)));
        assert_eq!(s.connect_timeout, Some(3));
        assert_eq!(s.routes[0].timeout_secs, Some(5));
        assert_eq!((s.retries, s.retry_on.as_slice()), (Some(3), &["reset", "5xx"][..]));
        assert_eq!(s.endpoints[1], ("203.0.113.6".to_string(), 443, BTreeMap::new()));
        assert_eq!(s.tls.as_ref().map(|t| (t.mode, t.sni.as_deref())), Some(("simple", Some("api.test"))));
        assert_eq!(s.routes[0].paths, ["/v2*"]);
        assert_eq!(s.routes[0].methods, ["GET"]);
        assert_eq!(s.routes[0].to, [(String::new(), 100)]);
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// A VirtualService's `tls` route (by SNI) becomes a route without conditions on a service of the matched port,
    /// for the sniHosts; its subset split carries over, and sniHosts is not reported as untranslated.
    #[test]
    fn a_tls_route_by_sni_becomes_a_route_without_conditions() {
        let docs: Vec<Document> = [
            "kind: ServiceEntry\nmetadata: {name: se}\nspec:\n  hosts: [api.test, www.api.test]\n  ports: [{number: 443, \
             name: tls, protocol: TLS}]\n  endpoints: [{address: 203.0.113.5, labels: {v: a}}, {address: 203.0.113.6, \
             labels: {v: b}}]",
            "kind: DestinationRule\nmetadata: {name: dr}\nspec:\n  host: api.test\n  subsets: [{name: a, labels: {v: a}}, \
             {name: b, labels: {v: b}}]",
            "kind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [api.test, www.api.test]\n  gateways: [egress]\n  \
             tls:\n  - match: [{port: 443, sniHosts: [api.test]}]\n    route: [{destination: {host: api.test, subset: a}, \
             weight: 90}, {destination: {host: api.test, subset: b}, weight: 10}]",
        ]
        .iter()
        .map(|text| Document { origin: "t".into(), value: serde_yaml_ng::from_str(text).unwrap() })
        .collect();
        let mut notes = Vec::new();
        let (services, covered) = routing_services(&docs, &mut notes);
        assert_eq!(services.len(), 1, "{notes:?}");
        let s = &services[0];
        assert_eq!((s.port, s.hosts.as_slice()), (443, &["api.test".to_string()][..]));
        let r = &s.routes[0];
        assert_eq!(r.name, "tls-route-1");
        assert!(r.headers.is_empty() && r.paths.is_empty() && r.methods.is_empty());
        assert_eq!(r.to, [("a".to_string(), 90), ("b".to_string(), 10)]);
        assert_eq!(s.endpoints[0].1, 443);
        virtual_service(&docs[2].value, "vs", &mut notes, &covered);
        assert!(notes.is_empty(), "{notes:?}");
    }
}
