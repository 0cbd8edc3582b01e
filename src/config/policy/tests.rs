//! One test per validation error of the policy model: the exact message and line:column. The first nine lines of
//! every test file are [`BASE`], so the snippets under test start on line 10.

use crate::config::{parse, Source};

/// A valid dataplane section and one group; 9 lines.
const BASE: &str = "[dataplane]
inside = \"gw-in\"
outside = \"gw-out\"

[[group]]
name = \"web\"
sources = [\"10.0.0.0/24\"]
egress_ips = [\"192.0.2.10\"]

";

fn diagnostics(text: &str) -> (Vec<String>, Vec<String>) {
    match parse(Source::new("t.toml", text)) {
        Ok(loaded) => (vec![], loaded.warnings.iter().map(ToString::to_string).collect()),
        Err(e) => (e.0.iter().map(ToString::to_string).collect(), vec![]),
    }
}

/// The errors of `BASE` + `snippet`.
fn errors(snippet: &str) -> Vec<String> {
    diagnostics(&format!("{BASE}{snippet}")).0
}

/// The warnings of `BASE` + `snippet`, which must have no errors.
fn warnings(snippet: &str) -> Vec<String> {
    let (errors, warnings) = diagnostics(&format!("{BASE}{snippet}"));
    assert!(errors.is_empty(), "{errors:#?}");
    warnings
}

#[test]
fn base_is_valid_and_quiet() {
    assert_eq!(diagnostics(BASE), (vec![], vec![]));
    assert!(warnings("[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\naction = \"allow\"\n").is_empty());
}

#[test]
fn prefix_with_host_bits_set() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.1/24\"]\naction = \"allow\"\n"),
        ["t.toml:12:7: host bits are set after the prefix length (did you mean 203.0.113.0/24?)"]
    );
}

#[test]
fn prefix_too_long() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\", \"10.0.0.0/33\"]\naction = \"allow\"\n"),
        ["t.toml:12:20: prefix length /33 is longer than /32"]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"2001:db8::/129\"]\naction = \"allow\"\n"),
        ["t.toml:12:7: prefix length /129 is longer than /128"]
    );
}

#[test]
fn prefix_that_does_not_parse() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"10.0.0/8\"]\naction = \"allow\"\n"),
        ["t.toml:12:7: \"10.0.0/8\" is not an IP prefix (expected ADDRESS/LENGTH or ADDRESS)"]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"10.0.0.0/+8\"]\naction = \"allow\"\n"),
        ["t.toml:12:7: \"10.0.0.0/+8\" is not an IP prefix (expected ADDRESS/LENGTH or ADDRESS)"]
    );
}

#[test]
fn bad_source_prefix() {
    let text = BASE.replace("sources = [\"10.0.0.0/24\"]", "sources = [\"10.0.0.1/24\"]");
    assert_eq!(
        diagnostics(&text).0,
        ["t.toml:7:12: host bits are set after the prefix length (did you mean 10.0.0.0/24?)"]
    );
}

#[test]
fn source_in_two_groups_or_twice_in_one() {
    let e =
        errors("[[group]]\nname = \"db\"\nsources = [\"10.0.0.0/24\", \"10.1.0.0/16\", \"10.1.0.0/16\"]\n");
    assert_eq!(
        e,
        [
            "t.toml:12:12: source 10.0.0.0/24 is already in group \"web\"",
            "t.toml:12:42: source 10.1.0.0/16 is listed twice",
        ]
    );
}

#[test]
fn reversed_port_range() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\nports = [\"9000-8000\"]\naction = \"allow\"\n"),
        ["t.toml:14:10: port range 9000-8000 is reversed (write 8000-9000)"]
    );
}

#[test]
fn out_of_range_ports() {
    let e = errors(
        "[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\nports = [\"70000\", 0, 65536, \"1-65536\", \"99999999999999999999\"]\naction = \"allow\"\n",
    );
    assert_eq!(
        e,
        [
            "t.toml:14:10: port 70000 is out of range (1-65535)",
            "t.toml:14:19: port 0 is out of range (1-65535)",
            "t.toml:14:22: port 65536 is out of range (1-65535)",
            "t.toml:14:29: port 65536 is out of range (1-65535)",
            "t.toml:14:40: port 9223372036854775807 is out of range (1-65535)",
        ]
    );
}

#[test]
fn port_that_does_not_parse() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\nports = [\"https\", \"80-\"]\naction = \"allow\"\n"),
        [
            "t.toml:14:10: \"https\" is not a port or port range (e.g. \"443\" or \"8000-8100\")",
            "t.toml:14:19: \"80-\" is not a port or port range (e.g. \"443\" or \"8000-8100\")",
        ]
    );
}

#[test]
fn ports_on_an_icmp_rule() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"icmp\"\nports = [443]\naction = \"allow\"\n"),
        ["t.toml:14:10: ports need proto \"tcp\", \"udp\" or \"any\" (ICMP has no ports)"]
    );
}

#[test]
fn unknown_group_in_a_rule() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"wbe\"\nto = [\"0.0.0.0/0\"]\naction = \"deny\"\n"),
        ["t.toml:11:9: unknown group \"wbe\""]
    );
}

#[test]
fn duplicate_group_names() {
    assert_eq!(
        errors("[[group]]\nname = \"web\"\nsources = [\"10.9.0.0/16\"]\n"),
        ["t.toml:11:8: duplicate group name \"web\""]
    );
    assert_eq!(errors("[[group]]\nname = \"\"\n"), ["t.toml:11:8: group name is empty"]);
}

#[test]
fn egress_ip_that_is_not_ipv4() {
    let e = errors("[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\negress_ips = [\"192.0.2.300\", \"2001:db8::1\", \"224.0.0.1\"]\n");
    assert_eq!(
        e,
        [
            "t.toml:13:15: \"192.0.2.300\" is not an IP address",
            "t.toml:13:30: egress IPs must be IPv4 (the NAT is NAT44)",
            "t.toml:13:45: 224.0.0.1 cannot be an egress IP",
        ]
    );
}

#[test]
fn egress_ip_twice_in_one_group_is_an_error_in_two_groups_a_warning_without_caps() {
    let e = errors("[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\negress_ips = [\"192.0.2.10\", \"192.0.2.11\", \"192.0.2.11\"]\n");
    assert_eq!(e, ["t.toml:13:43: egress IP 192.0.2.11 is listed twice"]);
    let shared = "[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\negress_ips = [\"192.0.2.10\"]\n";
    assert_eq!(
        warnings(shared),
        ["t.toml:13:15: egress IP 192.0.2.10 is shared with group \"web\": without max_ports_per_egress_ip on both groups, one can take all its ports"]
    );
}

#[test]
fn dataplane_egress_ip_in_no_group() {
    let text = BASE.replace(
        "outside = \"gw-out\"",
        "outside = \"gw-out\"\negress_ips = [\"192.0.2.10\", \"192.0.2.99\"]",
    );
    assert_eq!(
        diagnostics(&text).0,
        ["t.toml:4:29: egress IP 192.0.2.99 is in no group (add it to a [[group]]'s egress_ips, or remove it)"]
    );
}

#[test]
fn group_egress_ip_not_owned_by_the_dataplane() {
    let text = BASE.replace("outside = \"gw-out\"", "outside = \"gw-out\"\negress_ips = [\"192.0.2.10\"]");
    assert_eq!(diagnostics(&text), (vec![], vec![]));
    let text = format!("{text}[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\negress_ips = [\"192.0.2.10\", \"192.0.2.77\"]\n");
    assert_eq!(
        diagnostics(&text).0,
        ["t.toml:14:29: egress IP 192.0.2.77 is not in [dataplane] egress_ips",]
    );
}

#[test]
fn allowing_group_without_egress_ips() {
    let e = errors("[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\n\n[[rule]]\ngroup = \"db\"\nto = [\"0.0.0.0/0\"]\naction = \"allow\"\n");
    assert_eq!(e, ["t.toml:11:8: group \"db\" has allow or l7 rules but no egress_ips"]);
    // Deny-only groups need none.
    let e = errors("[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\n\n[[rule]]\ngroup = \"db\"\nto = [\"0.0.0.0/0\"]\naction = \"deny\"\n");
    assert!(e.is_empty(), "{e:?}");
}

#[test]
fn same_prefix_with_conflicting_actions() {
    let e = errors(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"tcp\"\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"198.51.100.0/24\", \"203.0.113.0/24\"]\nproto = \"any\"\nports = [\"443\"]\naction = \"deny\"\n",
    );
    assert_eq!(
        e,
        ["t.toml:18:26: 203.0.113.0/24 is also a destination of the rule at line 10 with action allow for some of \
          the same traffic (one prefix cannot have two actions in group \"web\")"]
    );
}

#[test]
fn same_prefix_with_different_actions_for_disjoint_traffic_is_fine() {
    // tcp/443 vs udp; ports (TCP and UDP only) vs icmp; port ranges that do not meet.
    let w = warnings(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"tcp\"\nports = [\"443\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"udp\"\naction = \"deny\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"icmp\"\naction = \"deny\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"tcp\"\nports = [\"444-500\"]\naction = \"deny\"\n",
    );
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn hosts_on_a_non_l7_rule() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\naction = \"allow\"\nhosts = [\"api.stripe.com\"]\n"),
        ["t.toml:15:10: hosts are only allowed on rules with action = \"l7\""]
    );
}

#[test]
fn l7_rule_without_hosts_or_tcp() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\naction = \"l7\"\n"),
        ["t.toml:14:10: an l7 rule needs `hosts` (the SNI / Host names it allows)"]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"udp\"\naction = \"l7\"\nhosts = [\"a.com\"]\n"),
        ["t.toml:13:9: an l7 rule needs proto = \"tcp\" (SNI and Host travel over TCP)"]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\naction = \"l7\"\nhosts = [\"a.com\"]\n"),
        ["t.toml:13:10: an l7 rule needs proto = \"tcp\" (SNI and Host travel over TCP)"]
    );
}

#[test]
fn malformed_host_patterns() {
    let e = errors(
        "[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\naction = \"l7\"\n\
         hosts = [\"api.*.com\", \"*\", \"a..com\", \"10.0.0.1\", \"a_b.com\"]\n",
    );
    assert_eq!(
        e,
        [
            "t.toml:15:10: a wildcard must be the whole leftmost label, as in \"*.example.com\"",
            "t.toml:15:23: \"*\" alone matches every name; name a domain, as in \"*.example.com\"",
            "t.toml:15:28: host name has an empty label (\"..\" or a leading dot)",
            "t.toml:15:38: an IP address is not a host name; put it in `to`",
            "t.toml:15:50: character '_' is not allowed in a host name (letters, digits, '-' and '.')",
        ]
    );
}

#[test]
fn unknown_keys_anywhere() {
    let e = errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\naction = \"allow\"\nport = [443]\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("t.toml:14:1: unknown field `port`, expected one of"), "{e:?}");
    let e = errors("[[group]]\nname = \"db\"\nsource = [\"10.9.0.0/16\"]\n");
    assert!(e[0].starts_with("t.toml:12:1: unknown field `source`, expected one of"), "{e:?}");
    let e = errors("[policy]\ndryrun = true\n");
    assert!(e[0].starts_with("t.toml:11:1: unknown field `dryrun`, expected `dry_run`"), "{e:?}");
    let e = errors("[rules]\n");
    assert!(e[0].starts_with("t.toml:10:2: unknown field `rules`, expected one of"), "{e:?}");
    let e = errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\naction = \"permit\"\n");
    assert!(e[0].starts_with("t.toml:13:10: unknown variant `permit`, expected one of"), "{e:?}");
}

#[test]
fn rule_without_destinations() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\naction = \"deny\"\n"),
        ["t.toml:10:1: rule has no `to` destinations (write \"0.0.0.0/0\" for everywhere) and no `to_hosts`"]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"10.1.0.0/16\", \"10.1.0.0/16\"]\naction = \"deny\"\n"),
        ["t.toml:12:22: 10.1.0.0/16 is listed twice"]
    );
}

#[test]
fn except_outside_its_rule() {
    let e = errors(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nexcept = [\"203.0.113.0/24\", \"198.51.100.0/25\", \"203.0.113.0/33\"]\naction = \"deny\"\n",
    );
    assert_eq!(
        e,
        [
            "t.toml:13:11: except 203.0.113.0/24 removes a whole `to` prefix",
            "t.toml:13:29: except 198.51.100.0/25 is inside none of the rule's `to` prefixes",
            "t.toml:13:48: prefix length /33 is longer than /32",
        ]
    );
}

#[test]
fn except_inside_a_malformed_to_is_not_a_second_error() {
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.1/24\"]\nexcept = [\"203.0.113.128/25\"]\naction = \"allow\"\n"),
        ["t.toml:12:7: host bits are set after the prefix length (did you mean 203.0.113.0/24?)"]
    );
}

#[test]
fn every_error_of_a_file_is_reported_in_order() {
    let e = errors(
        "[[rule]]\ngroup = \"nope\"\nto = [\"10.0.0.1/8\"]\nproto = \"tcp\"\nports = [\"2-1\"]\naction = \"allow\"\nhosts = [\"a.com\"]\n",
    );
    let positions: Vec<&str> = e.iter().map(|e| e.split(": ").next().unwrap_or("")).collect();
    assert_eq!(positions, ["t.toml:11:9", "t.toml:12:7", "t.toml:14:10", "t.toml:16:10"]);
}

#[test]
fn identical_rule_written_later_is_a_shadow_warning() {
    let w = warnings(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"tcp\"\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"tcp\"\nports = [443]\naction = \"allow\"\n",
    );
    assert_eq!(
        w,
        ["t.toml:16:1: rule never decides: every destination and port it matches is taken first by the rule(s) at \
          line 10 (more specific prefix, or same prefix written earlier)"]
    );
}

#[test]
fn rule_tiled_by_more_specific_prefixes_is_a_shadow_warning() {
    // Two /25s (in two rules, one written later) cover the /24 for every protocol.
    let w = warnings(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/25\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\nproto = \"udp\"\nports = [\"53\"]\naction = \"deny\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.128/25\"]\nproto = \"udp\"\naction = \"allow\"\n",
    );
    assert_eq!(
        w,
        ["t.toml:15:1: rule never decides: every destination and port it matches is taken first by the rule(s) at \
          line 10, 22 (more specific prefix, or same prefix written earlier)"]
    );
}

#[test]
fn partly_covered_rules_are_not_shadowed() {
    // A gap in the tiling; an earlier rule with fewer ports; an earlier rule with an except; a later identical rule
    // (the later one is the shadowed one, so only one warning, for it).
    let w = warnings(
        "[[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/25\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"203.0.113.0/24\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"198.51.100.0/24\"]\nproto = \"tcp\"\nports = [\"443\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"198.51.100.0/24\"]\nproto = \"tcp\"\nports = [\"443\", \"8443\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"192.0.2.0/24\"]\nexcept = [\"192.0.2.0/28\"]\naction = \"allow\"\n\n\
         [[rule]]\ngroup = \"web\"\nto = [\"192.0.2.0/24\"]\naction = \"allow\"\n",
    );
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn group_without_sources_is_a_warning() {
    assert_eq!(
        warnings("[[group]]\nname = \"idle\"\n"),
        ["t.toml:11:8: group \"idle\" has no sources and never matches"]
    );
}

#[test]
fn a_group_port_cap_must_be_a_port_count() {
    let e = errors("[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\nmax_ports_per_egress_ip = 0\n");
    assert_eq!(e, ["t.toml:13:27: max_ports_per_egress_ip: 0 must be 1..=65535"]);
    let e =
        errors("[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\nmax_ports_per_egress_ip = 70000\n");
    assert_eq!(e, ["t.toml:13:27: max_ports_per_egress_ip: 70000 must be 1..=65535"]);
    assert!(warnings(
        "[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\nmax_ports_per_egress_ip = 1000\n"
    )
    .is_empty());
}

#[test]
fn rule_names_are_label_safe_and_unique_within_their_group() {
    let rule = |name: &str, group: &str| {
        format!("[[rule]]\nname = \"{name}\"\ngroup = \"{group}\"\nto = [\"203.0.113.0/24\"]\naction = \"deny\"\n")
    };
    let db = "[[group]]\nname = \"db\"\nsources = [\"10.9.0.0/16\"]\n";
    assert!(
        errors(&format!("{db}{}{}", rule("a", "web"), rule("a", "db"))).is_empty(),
        "one name in two groups"
    );
    let e = errors(&format!("{}{}", rule("a", "web"), rule("a", "web")));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].ends_with("rule name \"a\" is used twice in group \"web\""), "{e:?}");
    let e = errors(&rule("has space", "web"));
    assert!(e[0].ends_with("rule name \"has space\": 1-64 letters, digits, '-', '_' or '.'"), "{e:?}");
    assert_eq!(errors(&rule("", "web")).len(), 1);
}

#[test]
fn l7_request_conditions_are_checked() {
    let rule = "[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\nports = [80]\naction = \"l7\"\nhosts = [\"httpbin.test\"]\n";
    assert!(warnings(&format!(
        "{rule}methods = [\"GET\"]\npaths = [\"/status/*\", \"/get\", \"regex:/api/v1/.*\"]\nheaders = [\"x-team: pay\"]\nmin_tls_version = \"1.2\"\n"
    ))
    .is_empty());
    assert_eq!(
        errors(&format!("{rule}paths = [\"status\", \"regex:(\"]\n")),
        [
            "t.toml:17:10: path \"status\" must start with \"/\" (or be \"regex:...\")",
            "t.toml:17:20: path regex \"(\": unclosed group",
        ]
    );
    assert_eq!(
        errors(&format!("{rule}methods = [\"G T\"]\nheaders = [\"a b\"]\nmin_tls_version = \"1.4\"\n")),
        [
            "t.toml:17:12: methods: \"G T\" is not an HTTP method",
            "t.toml:18:12: header \"a b\": \"a b\" is not a header name",
            "t.toml:19:19: min_tls_version: TLS version \"1.4\" must be \"1.2\" or \"1.3\" (or \"1.0\", \"1.1\")",
        ]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\naction = \"allow\"\nmethods = [\"GET\"]\n"),
        ["t.toml:15:12: methods are only checked on rules with action = \"l7\""]
    );
    assert!(warnings(&format!("{rule}rate_limit = \"100/1m\"\n")).is_empty());
    assert_eq!(
        errors(&format!("{rule}rate_limit = \"100/1y\"\n")),
        ["t.toml:17:14: rate_limit \"100/1y\": the period's unit must be s, m, h or d (expected REQUESTS/PERIOD, as \"100/1m\")"]
    );
    assert_eq!(
        errors("[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\naction = \"allow\"\nrate_limit = \"5/s\"\n"),
        ["t.toml:15:14: rate_limit is only checked on rules with action = \"l7\""]
    );
    let on_443 = rule.replace("ports = [80]", "ports = [80, 443]");
    assert_eq!(
        warnings(&format!("{on_443}methods = [\"GET\"]\n")),
        ["t.toml:17:12: methods, paths and headers can only be checked on plaintext HTTP: TLS connections under this \
          rule (port 443) will be refused"]
    );
    assert_eq!(
        warnings(&format!("{rule}methods = [\"get\"]\n")),
        ["t.toml:17:12: methods: \"get\" has lowercase letters; methods are case-sensitive (GET, not get)"]
    );
}

#[test]
fn to_hosts_must_be_dns_names_and_can_stand_alone() {
    let rule = |hosts: &str| {
        format!(
            "[[rule]]\ngroup = \"web\"\nproto = \"tcp\"\nports = [5432]\naction = \"allow\"\nto_hosts = [{hosts}]\n"
        )
    };
    assert!(errors(&rule("\"db.external.com\"")).is_empty(), "to_hosts without to");
    let e = errors(&rule(
        "\"*.external.com\", \"192.0.2.1\", \"Bad_Name.com\", \"db.external.com\", \"db.external.com\"",
    ));
    assert_eq!(e.len(), 4, "{e:#?}");
    assert_eq!(
        e[0],
        "t.toml:15:13: to_hosts: \"*.external.com\": wildcards cannot be resolved (egressd does not snoop DNS): \
         list each name"
    );
    assert!(e[1].ends_with("\"192.0.2.1\" is an address: put it in `to`"), "{e:?}");
    assert!(e[2].contains("\"Bad_Name.com\" is not a DNS name"), "{e:?}");
    assert!(e[3].ends_with("to_hosts: \"db.external.com\" is listed twice"), "{e:?}");
    let none = errors("[[rule]]\ngroup = \"web\"\nproto = \"tcp\"\naction = \"allow\"\n");
    assert!(none[0].ends_with("and no `to_hosts`"), "{none:?}");
}

#[test]
fn upstream_tls_needs_its_files_and_only_on_l7_rules() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem").display().to_string();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let not_pem = not_pem.display().to_string();
    let rule = "[[rule]]\ngroup = \"web\"\nto = [\"0.0.0.0/0\"]\nproto = \"tcp\"\nports = [80]\naction = \"l7\"\nhosts = [\"secure.test\"]\n";
    // Simple TLS with the system's roots: nothing else needed.
    assert!(errors(&format!("{rule}upstream_tls = \"simple\"\n")).is_empty());
    let e = errors(&format!("{rule}upstream_tls = \"mutual\"\n"));
    assert_eq!(e, ["t.toml:17:16: upstream_tls = \"mutual\" needs upstream_cert and upstream_key"]);
    let e = errors(&format!(
        "{rule}upstream_tls = \"tls\"\nupstream_port = 70000\nupstream_sni = \"*.x\"\nupstream_ca = \"{missing}\"\n"
    ));
    assert_eq!(e.len(), 1, "an unknown mode stops there: {e:?}");
    assert!(e[0].ends_with("upstream_tls: \"tls\" must be \"simple\" or \"mutual\""), "{e:?}");
    let e = errors(&format!(
        "{rule}upstream_tls = \"simple\"\nupstream_port = 70000\nupstream_sni = \"*.x\"\nupstream_ca = \"{missing}\"\n\
         upstream_cert = \"{not_pem}\"\n"
    ));
    assert_eq!(e.len(), 5, "{e:#?}");
    assert!(e[0].ends_with("upstream_port: 70000 must be 1..=65535"), "{e:?}");
    assert!(e[1].ends_with("upstream_sni: \"*.x\": a server name cannot be a wildcard"), "{e:?}");
    assert!(e[2].contains(&format!("upstream_ca: {missing}:")), "{e:?}");
    assert!(e[3].ends_with("upstream_cert and upstream_key are for upstream_tls = \"mutual\""), "{e:?}");
    assert!(e[4].contains("no PEM certificate"), "{e:?}");
    // Not a regular file: refused without reading (a device would never end).
    let e = errors(&format!("{rule}upstream_tls = \"simple\"\nupstream_ca = \"/dev/zero\"\n"));
    assert!(e[0].ends_with("upstream_ca: /dev/zero: not a regular file"), "{e:?}");
    let e = errors(&rule.replace(
        "action = \"l7\"\nhosts = [\"secure.test\"]\n",
        "action = \"allow\"\nupstream_port = 443\n",
    ));
    assert_eq!(e, ["t.toml:16:17: upstream_port needs upstream_tls"]);
    assert!(errors(&format!("{rule}max_upstream_connections = 100\n")).is_empty());
    let e = errors(&format!("{rule}max_upstream_connections = 0\n"));
    assert_eq!(e, ["t.toml:17:28: max_upstream_connections: 0 must be 1..=1000000"]);
    let e = errors(&rule.replace(
        "action = \"l7\"\nhosts = [\"secure.test\"]\n",
        "action = \"allow\"\nmax_upstream_connections = 5\n",
    ));
    assert!(
        e[0].ends_with("max_upstream_connections is only checked on rules with action = \"l7\""),
        "{e:?}"
    );
}

/// An l7 rule for svc.test on port 80 (lines 10-16), then a service starting on line 17.
const SERVICE_RULE: &str = "[[rule]]
group = \"web\"
to = [\"203.0.113.0/24\"]
proto = \"tcp\"
ports = [80]
action = \"l7\"
hosts = [\"svc.test\"]
";

const SERVICE: &str = "[[service]]
name = \"svc\"
hosts = [\"svc.test\"]
port = 80

[[service.endpoint]]
address = \"203.0.113.20\"
labels = { version = \"v1\" }

[[service.subset]]
name = \"v1\"
labels = { version = \"v1\" }

[[service.route]]
headers = { want = \"v1\" }
to = [{ subset = \"v1\", weight = 80 }]
";

#[test]
fn a_service_compiles_with_its_routes_subsets_and_defaults() {
    let text = format!("{BASE}{SERVICE_RULE}{SERVICE}");
    let loaded = parse(Source::new("t.toml", text)).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let spec = super::super::service::compile(loaded.config.service[0].get_ref()).unwrap();
    assert_eq!(spec.endpoints[0].address, "203.0.113.20:80".parse().unwrap(), "plain: the service's port");
    assert_eq!(spec.routes[0].name, "1", "unnamed routes are numbered");
    assert_eq!(spec.routes[0].to[0].subset, Some(0));
    assert_eq!(spec.outlier, dataplane::policy::service::OutlierSpec::default());
    assert_eq!(spec.connect_attempts, 2);
    let tls = format!(
        "{BASE}{SERVICE_RULE}{}",
        SERVICE.replace("port = 80\n", "port = 80\nupstream_tls = \"simple\"\n")
    );
    let loaded = parse(Source::new("t.toml", tls)).unwrap_or_else(|e| panic!("{e}"));
    let spec = super::super::service::compile(loaded.config.service[0].get_ref()).unwrap();
    assert_eq!(spec.endpoints[0].address.port(), 443, "with upstream_tls: 443");
}

#[test]
fn service_errors_name_their_place() {
    let bad = SERVICE
        .replace(
            "name = \"svc\"",
            "name = \"svc\"\nload_balancer = \"random\"\noutlier_max_ejection_percent = 120",
        )
        .replace("address = \"203.0.113.20\"", "address = \"svc.test\"")
        .replace(
            "labels = { version = \"v1\" }\n\n[[service.route]]",
            "labels = { version = \"v3\" }\n\n[[service.route]]",
        )
        .replace("headers = { want = \"v1\" }", "headers = { \"bad header\" = \"v1\", ok = \"regex:(\" }")
        .replace("subset = \"v1\", weight = 80", "subset = \"v9\", weight = 80");
    let e = errors(&format!("{SERVICE_RULE}{bad}"));
    assert_eq!(
        e,
        [
            "t.toml:19:17: load_balancer: \"random\" must be \"round_robin\" or \"least_request\"",
            "t.toml:20:32: outlier_max_ejection_percent: 120 must be 0..=100",
            "t.toml:25:11: address: \"svc.test\" is not an IPv4 address",
            "t.toml:30:10: subset \"v1\": no endpoint carries all of its labels",
            "t.toml:33:11: headers: \"bad header\" is not a header name",
            "t.toml:33:11: headers: ok: header regex \"(\": unclosed group",
            "t.toml:34:6: to: no subset \"v9\" in this service",
        ],
        "{e:#?}"
    );
    // Two services claiming one name and port; a service no rule reaches is a warning.
    let twice = format!("{SERVICE_RULE}{SERVICE}{}", SERVICE.replace("name = \"svc\"", "name = \"svc2\""));
    assert!(
        errors(&twice).iter().any(|e| e.contains("hosts: svc.test:80 is claimed twice")),
        "{:?}",
        errors(&twice)
    );
    let w = warnings(SERVICE);
    assert_eq!(
        w,
        ["t.toml:11:8: service \"svc\": no l7 rule allows its hosts on port 80, so no request reaches it"]
    );
    let e = errors("[[service]]\nname = \"s\"\nhosts = [\"*.x.test\"]\nport = 0\n");
    assert!(e.iter().any(|e| e.contains("port: 0 must be 1..=65535")), "{e:?}");
    assert!(e.iter().any(|e| e.contains("a service's hosts are exact names")), "{e:?}");
    assert!(e.iter().any(|e| e.contains("has no [[service.endpoint]]")), "{e:?}");
    let limits = SERVICE
        .replace("port = 80\n", "port = 80\nmax_connections = 0\nrequest_timeout_secs = 7200\n")
        .replace("to = [{ subset", "request_timeout_secs = 0\nto = [{ subset");
    let e = errors(&format!("{SERVICE_RULE}{limits}"));
    assert_eq!(
        e,
        [
            "t.toml:21:19: max_connections: 0 must be 1..=1000000",
            "t.toml:22:24: request_timeout_secs: 7200 must be 1..=3600",
            "t.toml:34:24: request_timeout_secs: 0 must be 1..=3600",
        ],
        "{e:#?}"
    );
}
