//! Every `conf/*.toml` loads, validates and compiles (so no example can rot), and each example written for issue 4
//! still decides its scenario the way its comment block says.

use std::path::{Path, PathBuf};

use egressd::cli::explain::{explain_flow, Explanation, Flow};
use egressd::config::Loaded;

fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf")
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir())
        .expect("conf/ exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn load(name: &str) -> Loaded {
    let path = conf_dir().join(name);
    egressd::config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Explains one flow of example `name`, as `egressd explain` does.
fn explain(name: &str, src: &str, dst: &str, proto: &str, host: Option<&str>) -> Explanation {
    let loaded = load(name);
    let snapshot = egressd::policy::compile(&loaded.config, 1).expect("compiles");
    let flow = Flow::parse(src, dst, proto, host).expect("valid flow");
    explain_flow(&loaded, &snapshot, &flow)
}

#[test]
fn every_example_loads_and_compiles() {
    let files = examples();
    assert!(files.len() >= 4, "expected at least 4 examples in conf/, found {files:?}");
    for path in &files {
        let loaded = egressd::config::load(path).unwrap_or_else(|e| panic!("{e}"));
        let snapshot =
            egressd::policy::compile(&loaded.config, 1).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(snapshot.group_count(), loaded.config.group.len(), "{}", path.display());
        assert_eq!(snapshot.rule_count(), loaded.config.rule.len(), "{}", path.display());
    }
}

#[test]
fn issue_examples_are_present_and_warning_free() {
    for name in [
        "istio-egress.toml",
        "cilium-egress-gateway.toml",
        "default-deny-dns.toml",
        "payments-allowlist.toml",
    ] {
        let loaded = load(name);
        assert!(loaded.warnings.is_empty(), "{name}: {:?}", loaded.warnings);
        assert!(loaded.source.text.starts_with('#'), "{name} starts with its comment block");
    }
}

#[test]
fn istio_service_entries_go_to_the_l7_path() {
    let baidu = explain("istio-egress.toml", "10.10.0.5", "110.242.68.66:443", "tcp", Some("www.baidu.com"));
    assert_eq!((baidu.verdict, baidu.layer, baidu.host_allowed), ("l7", "L7", Some(true)));
    assert_eq!(baidu.egress_ip.as_deref(), Some("192.0.2.10"));
    let httpbin = explain("istio-egress.toml", "10.10.0.5", "54.208.105.16:80", "tcp", Some("httpbin.org"));
    assert_eq!((httpbin.verdict, httpbin.host_allowed), ("l7", Some(true)));
    assert_ne!(httpbin.rule, baidu.rule);
    // The baidu name on the HTTP port is not what the gateway allows.
    let swapped = explain("istio-egress.toml", "10.10.0.5", "110.242.68.66:80", "tcp", Some("www.baidu.com"));
    assert_eq!(swapped.host_allowed, Some(false));
    let ssh = explain("istio-egress.toml", "10.10.0.5", "110.242.68.66:22", "tcp", None);
    assert_eq!(ssh.verdict, "default-deny");
}

#[test]
fn cilium_egress_gateway_uses_its_egress_ip_and_excluded_cidrs() {
    let allowed = explain("cilium-egress-gateway.toml", "10.10.0.40", "198.51.100.7:8080", "tcp", None);
    assert_eq!((allowed.verdict, allowed.egress_ip.as_deref()), ("allow", Some("192.0.2.20")));
    let excluded = explain("cilium-egress-gateway.toml", "10.10.0.40", "203.0.113.200:443", "tcp", None);
    assert_eq!(excluded.verdict, "default-deny");
    assert!(
        excluded.reason.contains("except 203.0.113.128/25 contains 203.0.113.200"),
        "{}",
        excluded.reason
    );
    let other_pod = explain("cilium-egress-gateway.toml", "10.10.0.5", "198.51.100.7:8080", "tcp", None);
    assert_eq!(other_pod.verdict, "no-group");
}

#[test]
fn default_deny_allows_only_dns_to_the_cluster_dns() {
    for proto in ["udp", "tcp"] {
        let dns = explain("default-deny-dns.toml", "10.10.0.9", "10.96.0.10:53", proto, None);
        assert_eq!(dns.verdict, "allow", "{proto}");
    }
    let web = explain("default-deny-dns.toml", "10.10.0.9", "198.51.100.1:443", "tcp", None);
    assert_eq!((web.verdict, web.dry_run), ("default-deny", false));
    let ping = explain("default-deny-dns.toml", "10.10.0.9", "10.96.0.10", "icmp", None);
    assert_eq!(ping.verdict, "default-deny");
}

#[test]
fn payments_reach_only_stripe_and_paypal() {
    let check =
        |host: &str| explain("payments-allowlist.toml", "10.10.1.7", "198.51.100.9:443", "tcp", Some(host));
    assert_eq!(check("api.stripe.com").host_allowed, Some(true));
    assert_eq!(check("api-m.sandbox.paypal.com").host_allowed, Some(true));
    assert_eq!(check("paypal.com").host_allowed, Some(false));
    assert_eq!(check("api.stripe.com.evil.net").host_allowed, Some(false));
    let plain_http = explain("payments-allowlist.toml", "10.10.1.7", "198.51.100.9:80", "tcp", None);
    assert_eq!(plain_http.verdict, "default-deny");
}

/// The systemd unit's egressd command lines are ones this egressd accepts (so a renamed flag cannot leave it broken).
#[test]
fn systemd_unit_commands_parse() {
    use clap::Parser;
    let unit = std::fs::read_to_string(conf_dir().join("egressd.service")).expect("conf/egressd.service");
    let commands: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart=").or_else(|| l.strip_prefix("ExecStartPre=")))
        .collect();
    assert_eq!(commands.len(), 2, "ExecStartPre (check) and ExecStart (run)");
    for command in commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        assert!(words[0].ends_with("/egressd"), "{command}");
        if let Err(e) = egressd::cli::Cli::try_parse_from(&words) {
            panic!("{command}: {e}");
        }
    }
    assert!(unit.contains("Environment=GLIBC_TUNABLES=glibc.malloc.hugetlb=1"));
}

#[test]
fn istio_routing_sends_each_want_header_to_its_subset() {
    let loaded = load("istio-routing.toml");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let snapshot = egressd::policy::compile(&loaded.config, 1).expect("compiles");
    let host = Some("nginx.external.svc.cluster.local");
    let route = |headers: &[(&str, &str)]| {
        let flow = Flow::parse("10.10.0.5", "198.51.100.80:80", "tcp", host).expect("valid flow");
        let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let e = explain_flow(&loaded, &snapshot, &Flow { headers, ..flow });
        assert_eq!(e.verdict, "l7", "{e:?}");
        e.service.expect("routed to the service")
    };
    let v2 = route(&[("want", "v2")]);
    assert_eq!((v2.service.as_str(), v2.route.as_deref()), ("nginx-ext", Some("want-v2")));
    assert_eq!(v2.subsets.len(), 1);
    assert_eq!(v2.subsets[0].endpoints, ["203.0.113.21:443"]);
    let split = route(&[]);
    assert_eq!(split.route.as_deref(), Some("split"));
    let shares: Vec<(&str, &str)> =
        split.subsets.iter().map(|s| (s.subset.as_str(), s.percent.as_str())).collect();
    assert_eq!(shares, [("v1", "80"), ("v2", "20")]);
}
