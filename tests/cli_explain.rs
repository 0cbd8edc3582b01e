//! `egressd explain` end to end: the built binary on temporary configurations, text and JSON output, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Rules, by the line of their `[[rule]]` header (see `rule_line`):
/// 1. 203.0.113.0/24 except 203.0.113.128/25, any protocol: allow
/// 2. 203.0.113.7/32 tcp/22: deny (more specific than rule 1)
/// 3. 198.51.100.0/24 tcp/443: l7, hosts api.example.com, *.example.org
/// 4. 198.51.100.0/24 udp: deny in dry run
/// 5. 192.0.2.128/25 tcp/80-90: allow
/// 6. 192.0.2.128/25 any: allow (ties with rule 5 on tcp/80-90; rule 5, written first, wins)
/// 7. 2001:db8:ff::/48 tcp: allow
const POLICY: &str = r#"[dataplane]
inside = "gw-in"
outside = "gw-out"

[[group]]
name = "web"
sources = ["10.0.0.0/24", "2001:db8:1::/64"]
egress_ips = ["192.0.2.10", "192.0.2.11"]

[[group]]
name = "batch"
sources = ["10.0.1.0/24"]

[[rule]]
group = "web"
to = ["203.0.113.0/24"]
except = ["203.0.113.128/25"]
action = "allow"

[[rule]]
group = "web"
to = ["203.0.113.7/32"]
proto = "tcp"
ports = [22]
action = "deny"

[[rule]]
group = "web"
to = ["198.51.100.0/24"]
proto = "tcp"
ports = ["443"]
action = "l7"
hosts = ["api.example.com", "*.example.org"]

[[rule]]
group = "web"
to = ["198.51.100.0/24"]
proto = "udp"
action = "deny"
dry_run = true

[[rule]]
group = "web"
to = ["192.0.2.128/25"]
proto = "tcp"
ports = ["80-90"]
action = "allow"

[[rule]]
group = "web"
to = ["192.0.2.128/25"]
action = "allow"

[[rule]]
group = "web"
to = ["2001:db8:ff::/48"]
proto = "tcp"
action = "allow"
"#;

struct Config {
    _dir: tempfile::TempDir,
    path: PathBuf,
    text: String,
}

fn write_config(text: &str) -> Config {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, text).expect("write config");
    Config { _dir: dir, path, text: text.to_string() }
}

impl Config {
    /// `path:line` of the `n`th (1-based) `[[rule]]` header, found in the text independently of egressd.
    fn rule_at(&self, n: usize) -> String {
        let line = self
            .text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim() == "[[rule]]")
            .nth(n - 1)
            .map(|(i, _)| i + 1)
            .expect("rule exists");
        format!("{}:{line}", self.path.display())
    }

    /// `path:line` of the line `name = "<group>"`.
    fn group_at(&self, group: &str) -> String {
        let needle = format!("name = \"{group}\"");
        let line = self.text.lines().position(|l| l.trim() == needle).expect("group exists") + 1;
        format!("{}:{line}", self.path.display())
    }
}

fn explain(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egressd"))
        .arg("explain")
        .arg(config)
        .args(args)
        .output()
        .expect("run egressd")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs with `--json`; checks exit 0 and that stdout is exactly one JSON object.
fn explain_json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = explain(config, &all);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    let value: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON value");
    assert!(value.is_object(), "{value}");
    value
}

/// The `key:` line of the text output.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
}

#[test]
fn text_output_names_group_rule_verdict_egress_ip_and_why() {
    let c = write_config(POLICY);
    let out = explain(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.9:443"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(field(&text, "flow"), "tcp 10.0.0.5 -> 203.0.113.9:443");
    assert_eq!(field(&text, "group"), format!("web ({})", c.group_at("web")));
    assert_eq!(field(&text, "rule"), c.rule_at(1));
    assert_eq!(field(&text, "verdict"), "allow");
    assert_eq!(field(&text, "dry_run"), "false");
    assert!(["192.0.2.10", "192.0.2.11"].contains(&field(&text, "egress IP")), "{text}");
    assert_eq!(field(&text, "layer"), "L4");
    assert_eq!(
        field(&text, "why"),
        format!(
            "longest matching destination 203.0.113.0/24 in rule at {}; except 203.0.113.128/25 did not match",
            c.rule_at(1)
        )
    );
}

#[test]
fn json_output_has_the_documented_fields() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.9:443"]);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["group"], "web");
    assert_eq!(v["rule"], c.rule_at(1));
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["layer"], "L4");
    assert!(v["reason"]
        .as_str()
        .is_some_and(|r| r.starts_with("longest matching destination 203.0.113.0/24")));
    let ip = v["egress_ip"].as_str().expect("egress IP");
    assert!(ip == "192.0.2.10" || ip == "192.0.2.11", "{ip}");
    // Paired pooling: the same source always gets the same egress IP.
    let again = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "198.51.100.1:443"]);
    assert_eq!(again["egress_ip"].as_str(), Some(ip));
}

#[test]
fn more_specific_destination_beats_an_earlier_rule() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.7:22"]);
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["rule"], c.rule_at(2));
    assert_eq!(v["egress_ip"], serde_json::Value::Null);
    assert_eq!(v["dry_run"], false);
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("longest matching destination 203.0.113.7/32"), "{reason}");
    assert!(reason.contains(&format!("beats rule at {} (203.0.113.0/24)", c.rule_at(1))), "{reason}");
    assert!(reason.ends_with("dropped and counted"), "{reason}");
    // The same host on another port is rule 1's.
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.7:23"]);
    assert_eq!((v["verdict"].as_str(), v["rule"].as_str()), (Some("allow"), Some(c.rule_at(1).as_str())));
}

#[test]
fn ties_go_to_the_rule_written_first() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "192.0.2.200:85"]);
    assert_eq!(v["rule"], c.rule_at(5));
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "192.0.2.200:85", "--proto", "udp"]);
    assert_eq!(v["rule"], c.rule_at(6));
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "192.0.2.200", "--proto", "icmp"]);
    assert_eq!((v["verdict"].as_str(), v["rule"].as_str()), (Some("allow"), Some(c.rule_at(6).as_str())));
}

#[test]
fn except_and_default_deny_are_explained() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.200:443"]);
    assert_eq!(v["verdict"], "default-deny");
    assert_eq!(v["group"], "web");
    assert_eq!(v["rule"], serde_json::Value::Null);
    assert_eq!(v["egress_ip"], serde_json::Value::Null);
    assert_eq!(
        v["reason"],
        format!(
            "no rule of group \"web\" matches tcp 10.0.0.5 -> 203.0.113.200:443 (rule at {}: except \
             203.0.113.128/25 contains 203.0.113.200); dropped and counted",
            c.rule_at(1)
        )
    );
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "198.51.100.4:80"]);
    assert_eq!(v["verdict"], "default-deny");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("rule at {} covers 198.51.100.4 but not tcp/80", c.rule_at(3))),
        "{reason}"
    );
}

#[test]
fn source_in_no_group_and_group_without_rules() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.9.9.9", "--dst", "203.0.113.9:443"]);
    assert_eq!(v["verdict"], "no-group");
    assert_eq!(v["group"], serde_json::Value::Null);
    assert_eq!(v["reason"], "source 10.9.9.9 is in no group's sources; dropped and counted");
    let v = explain_json(&c.path, &["--src", "10.0.1.1", "--dst", "203.0.113.9:443"]);
    assert_eq!((v["verdict"].as_str(), v["group"].as_str()), (Some("default-deny"), Some("batch")));
}

#[test]
fn per_rule_and_global_dry_run() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "198.51.100.4:53", "--proto", "udp"]);
    assert_eq!((v["verdict"].as_str(), v["dry_run"].as_bool()), (Some("deny"), Some(true)));
    assert_eq!(v["rule"], c.rule_at(4));
    assert!(v["egress_ip"].is_string(), "a dry-run denial is forwarded: {v}");
    assert!(v["reason"].as_str().unwrap_or_default().ends_with("dry run: forwarded and counted"), "{v}");
    // Rule 2 has no dry_run of its own; the global switch turns it on.
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.7:22"]);
    assert_eq!(v["dry_run"], false);
    let global = write_config(
        &POLICY.replace("[[group]]\nname = \"web\"", "[policy]\ndry_run = true\n\n[[group]]\nname = \"web\""),
    );
    let v = explain_json(&global.path, &["--src", "10.0.0.5", "--dst", "203.0.113.7:22"]);
    assert_eq!((v["verdict"].as_str(), v["dry_run"].as_bool()), (Some("deny"), Some(true)));
    assert_eq!(v["rule"], global.rule_at(2));
    // An allow never carries dry_run.
    let v = explain_json(&global.path, &["--src", "10.0.0.5", "--dst", "203.0.113.9:443"]);
    assert_eq!((v["verdict"].as_str(), v["dry_run"].as_bool()), (Some("allow"), Some(false)));
}

#[test]
fn l7_rule_with_and_without_a_host() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "198.51.100.4:443"]);
    assert_eq!((v["verdict"].as_str(), v["layer"].as_str()), (Some("l7"), Some("L7")));
    assert_eq!(v["rule"], c.rule_at(3));
    assert_eq!(v["host_allowed"], serde_json::Value::Null);
    assert!(v["reason"]
        .as_str()
        .unwrap_or_default()
        .ends_with("checks SNI/Host against api.example.com, *.example.org"));
    let v = explain_json(
        &c.path,
        &["--src", "10.0.0.5", "--dst", "198.51.100.4:443", "--host", "WWW.Example.ORG."],
    );
    assert_eq!(v["host_allowed"], true);
    assert!(
        v["reason"].as_str().unwrap_or_default().ends_with("host WWW.Example.ORG. matches *.example.org"),
        "{v}"
    );
    let v =
        explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "198.51.100.4:443", "--sni", "example.org"]);
    assert_eq!(v["host_allowed"], false);
    let out = explain(&c.path, &["--src", "10.0.0.5", "--dst", "198.51.100.4:443", "--host", "evil.com"]);
    let text = stdout(&out);
    assert_eq!(field(&text, "host"), "refused");
    assert!(
        field(&text, "why").ends_with(
            "host evil.com matches none of api.example.com, *.example.org: the L7 path refuses it"
        ),
        "{text}"
    );
    // --host on an L4 verdict plays no part.
    let out = explain(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.9:443", "--host", "evil.com"]);
    assert_eq!(field(&stdout(&out), "verdict"), "allow");
    assert!(stdout(&out).contains("--host plays no part"), "{}", stdout(&out));
}

#[test]
fn ipv6_flows() {
    let c = write_config(POLICY);
    let v = explain_json(&c.path, &["--src", "2001:db8:1::5", "--dst", "[2001:db8:ff::1]:443"]);
    // The dataplane drops transit IPv6 whatever the policy says: explain says so, and what the rule would do.
    assert_eq!(
        (v["verdict"].as_str(), v["rule"].as_str()),
        (Some("ipv6-unsupported"), Some(c.rule_at(7).as_str()))
    );
    assert_eq!(v["forwarded"], serde_json::Value::Bool(false));
    assert_eq!(v["egress_ip"], serde_json::Value::Null);
    let why = v["reason"].as_str().unwrap();
    assert!(why.starts_with("dropped and counted as ipv6_unsupported"), "{why}");
    assert!(why.contains("the policy would say allow"), "{why}");
}

/// `check` accepts IPv6 sources and rules but warns, at each, that this version does not enforce them.
#[test]
fn check_warns_that_ipv6_sources_and_rules_are_not_enforced() {
    let c = write_config(POLICY);
    let out = Command::new(env!("CARGO_BIN_EXE_egressd"))
        .arg("check")
        .arg(&c.path)
        .output()
        .expect("run egressd check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("IPv6 is not enforced")).collect();
    assert_eq!(warnings.len(), 2, "one for the IPv6 source, one for the IPv6 rule:\n{text}");
    assert!(warnings.iter().any(|w| w.contains("source 2001:db8:1::/64")), "{text}");
    assert!(warnings.iter().any(|w| w.contains("2001:db8:ff::/48")), "{text}");
}

#[test]
fn bad_configuration_exits_1_with_file_line_column() {
    let c = write_config(
        &POLICY.replace("to = [\"203.0.113.0/24\"]\nexcept", "to = [\"203.0.113.1/24\"]\nexcept"),
    );
    let out = explain(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.9:443"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let line = c.rule_at(1).rsplit(':').next().and_then(|l| l.parse::<usize>().ok()).expect("line") + 2;
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}:{line}:7: host bits are set after the prefix length (did you mean 203.0.113.0/24?)",
            c.path.display()
        )
    );
    let out =
        explain(Path::new("/nonexistent/egressd.toml"), &["--src", "10.0.0.5", "--dst", "203.0.113.9:443"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bad_flow_exits_1_with_a_reason() {
    let c = write_config(POLICY);
    for (args, want) in [
        (
            ["--src", "10.0.0.300", "--dst", "203.0.113.9:443", "--proto", "tcp"],
            "--src: \"10.0.0.300\" is not an IP address",
        ),
        (
            ["--src", "10.0.0.5", "--dst", "203.0.113.9:http", "--proto", "tcp"],
            "--dst: \"203.0.113.9:http\" is not IP",
        ),
        (
            ["--src", "10.0.0.5", "--dst", "203.0.113.9", "--proto", "udp"],
            "--dst: give the destination port for tcp and udp",
        ),
        (
            ["--src", "10.0.0.5", "--dst", "203.0.113.9:443", "--proto", "sctp"],
            "--proto: \"sctp\" is not tcp, udp or icmp",
        ),
        (["--src", "10.0.0.5", "--dst", "[2001:db8::1]:443", "--proto", "tcp"], "same address family"),
    ] {
        let out = explain(&c.path, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }
}

/// `check` refuses what is not a regular file, at once and with the reason: a FIFO used to make it wait forever,
/// `/dev/zero` to run it out of memory.
#[test]
fn check_refuses_fifos_devices_and_directories_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for path in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_egressd")).arg("check").arg(path).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", path.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a regular file"), "{}: {err}", path.display());
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{} took too long", path.display());
    }
    // A regular file beyond the size cap (sparse: it takes no disk) is refused before it is read.
    let huge = dir.path().join("huge.toml");
    std::fs::File::create(&huge).unwrap().set_len((64 << 20) + 1).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_egressd")).arg("check").arg(&huge).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is 67108865 bytes; a configuration is at most 67108864 bytes"), "{err}");
}

/// `check --strict` turns warnings into errors (exit 1); without it the same file passes with its warnings.
#[test]
fn check_strict_fails_on_warnings() {
    let c = write_config(POLICY);
    let check = |strict: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_egressd"));
        cmd.arg("check").arg(&c.path);
        if strict {
            cmd.arg("--strict");
        }
        cmd.output().unwrap()
    };
    let lenient = check(false);
    assert!(lenient.status.success(), "{}", String::from_utf8_lossy(&lenient.stderr));
    assert!(String::from_utf8_lossy(&lenient.stderr).contains("warning: "));
    let strict = check(true);
    assert_eq!(strict.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&strict.stderr).contains("error (--strict): "));
}

/// A named rule is named in `explain` (text and JSON); unnamed rules keep their `file:line`.
#[test]
fn explain_names_a_named_rule() {
    let c = write_config(&POLICY.replacen(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.7/32\"]",
        "[[rule]]\nname = \"no-ssh\"\ngroup = \"web\"\nto = [\"203.0.113.7/32\"]",
        1,
    ));
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.7:22"]);
    assert_eq!((v["verdict"].as_str(), v["rule_name"].as_str()), (Some("deny"), Some("no-ssh")));
    let text = stdout(&explain(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.7:22"]));
    assert_eq!(field(&text, "rule"), format!("no-ssh ({})", c.rule_at(2)));
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "203.0.113.9:443"]);
    assert_eq!(v["rule_name"], serde_json::Value::Null);
}

#[test]
fn l7_request_conditions_with_method_and_path() {
    let text = "[dataplane]\ninside = \"a\"\noutside = \"b\"\n\n[[group]]\nname = \"web\"\nsources = [\"10.0.0.0/24\"]\n\
                egress_ips = [\"192.0.2.10\"]\n\n[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\n\
                ports = [80]\naction = \"l7\"\nhosts = [\"httpbin.test\"]\nmethods = [\"GET\"]\npaths = [\"/status/*\"]\n";
    let c = write_config(text);
    let base = ["--src", "10.0.0.5", "--dst", "203.0.113.10:80", "--host", "httpbin.test"];
    let ask = |extra: &[&str]| explain_json(&c.path, &[&base[..], extra].concat());
    let v = ask(&["--path", "/status/200"]);
    assert_eq!(v["request_allowed"], true, "{v}");
    let v = ask(&["--method", "POST", "--path", "/status/200"]);
    assert_eq!(v["request_allowed"], false);
    assert!(v["reason"]
        .as_str()
        .unwrap_or_default()
        .ends_with("POST /status/200 is refused with 403 (method_not_allowed)"));
    let v = ask(&["--path", "/admin"]);
    assert!(v["reason"]
        .as_str()
        .unwrap_or_default()
        .ends_with("GET /admin is refused with 403 (path_not_allowed)"));
    // Without --method/--path: the conditions are named, no answer.
    let v = ask(&[]);
    assert_eq!(v["request_allowed"], serde_json::Value::Null);
    assert!(v["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("requests must also meet: methods GET; paths /status/*"));
    // TLS origination is named too.
    let c = write_config(&format!("{text}upstream_tls = \"simple\"\nupstream_port = 8443\n"));
    let v = explain_json(&c.path, &base);
    assert!(
        v["reason"].as_str().unwrap_or_default().ends_with(
            "requests leave over simple TLS to port 8443 (server name the Host), plain HTTP clients only"
        ),
        "{v}"
    );
    // A rate limit is named with the rest.
    let c = write_config(&format!("{text}rate_limit = \"100/1m\"\n"));
    let v = explain_json(&c.path, &base);
    assert!(
        v["reason"].as_str().unwrap_or_default().ends_with(
            "paths /status/*; at most 100 per 60 s from each client address (then 429, or an alert for TLS)"
        ),
        "{v}"
    );
}

#[test]
fn to_hosts_names_are_resolved_and_shown() {
    // A resolver that does not answer: the name has no address, so the rule matches nothing.
    let text = "[dataplane]\ninside = \"a\"\noutside = \"b\"\n\n[[group]]\nname = \"web\"\nsources = [\"10.0.0.0/24\"]\n\
                egress_ips = [\"192.0.2.10\"]\n\n[[rule]]\ngroup = \"web\"\nto_hosts = [\"db.example\"]\nproto = \"tcp\"\n\
                ports = [5432]\naction = \"allow\"\n\n[l7]\nresolver = \"127.0.0.1:9\"\n";
    let c = write_config(text);
    let v = explain_json(&c.path, &["--src", "10.0.0.5", "--dst", "192.0.2.7:5432"]);
    assert_eq!(v["verdict"], "default-deny", "{v}");
    assert_eq!(v["to_hosts"]["db.example"], serde_json::json!([]), "{v}");
}
