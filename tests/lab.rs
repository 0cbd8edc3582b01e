//! Lab tests: real traffic from the client namespace to servers in ext, through egressd in gw (issue 3).
//! They need root and the lab tools (scripts/setup installs them); without them they fail, loudly.

mod support;

use std::time::Duration;

use support::{lab_config, repo_root, wait_for, wait_for_within, Dnsmasq, Gateway, Lab};

/// HTTP (curl → nginx) and UDP echo cross the gateway only while egressd runs: gw has ip_forward=0, so what
/// crosses was forwarded by egressd, and its counters move. After SIGTERM it exits 0 with no XDP program left.
#[test]
fn http_and_udp_cross_only_through_egressd() {
    let lab = Lab::up(false);
    assert!(lab.curl("http://203.0.113.10/", 2).is_none(), "HTTP crossed gw without egressd");
    assert_eq!(lab.udp_echo("203.0.113.10:7", "before"), "", "UDP crossed gw without egressd");

    let mut gw = Gateway::start(&lab, &repo_root().join("conf/lab.toml"));
    let body = lab.curl("http://203.0.113.10/", 5);
    assert_eq!(body.as_deref(), Some("hello from ext\n"), "HTTP through egressd; log:\n{}", gw.log_text());
    assert_eq!(lab.udp_echo("203.0.113.10:7", "ping-through-egressd"), "ping-through-egressd");
    let big = lab.exec(
        "client",
        "curl",
        &["-sf", "-m", "10", "-o", "/dev/null", "-w", "%{size_download}", "http://198.51.100.10/1m.bin"],
    );
    assert_eq!(String::from_utf8_lossy(&big.stdout), "1048576", "1 MiB download through egressd");

    for series in [
        r#"egressd_rx_packets_total{side="inside"}"#,
        r#"egressd_rx_packets_total{side="outside"}"#,
        r#"egressd_tx_packets_total{side="inside"}"#,
        r#"egressd_tx_packets_total{side="outside"}"#,
    ] {
        // The 1 MiB download alone is > 700 frames from outside.
        assert!(gw.metric(series) >= 10.0, "{series} = {}", gw.metric(series));
    }
    assert!(gw.metric(r#"egressd_rx_packets_total{side="outside"}"#) >= 700.0);
    // The kernel's socket drop counters are exported (read with getsockopt(XDP_STATISTICS) by the worker).
    // The NAT gauges are published about once a second.
    wait_for(
        || gw.metrics().iter().any(|(n, _)| n.starts_with("egressd_nat_ports_in_use{")),
        "NAT port gauges published",
    );
    let names: Vec<String> = gw.metrics().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.starts_with("egressd_kernel_drops_total{side=\"outside\"")), "{names:?}");
    assert!(lab.gw_links().contains("xdp"), "no XDP program attached while running:\n{}", lab.gw_links());
    // What the alert rules in conf/monitoring/ use besides the counters above.
    assert_eq!(gw.metric("egressd_ready"), 1.0);
    assert!(gw.metric("egressd_nat_flows_max") >= 1024.0, "{names:?}");
    assert!(gw.metric(r#"egressd_worker_loops_total{worker="0"}"#) > 0.0, "{names:?}");
    // Every series the alert rules use is exported.
    let exported: std::collections::HashSet<&str> =
        names.iter().map(|n| n.split('{').next().unwrap()).collect();
    let rules =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/monitoring/egressd-alerts.yml"))
            .expect("alert rules");
    // (The L7 path's series exist only with an `l7` rule: `lab_l7` checks those.)
    let used = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("egressd_") && !w.starts_with("egressd_l7_"));
    for series in used {
        assert!(exported.contains(series), "the alert rules use {series}, which egressd does not export");
    }
    // So is every series the Grafana dashboard uses (the L7 ones are checked where the L7 path runs).
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/monitoring/egressd-dashboard.json"
    ))
    .expect("dashboard");
    let used = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("egressd_") && !w.starts_with("egressd_l7_"));
    for series in used {
        assert!(exported.contains(series), "the dashboard uses {series}, which egressd does not export");
    }
    // `egressd stats --watch` prints the counters with their rates over the interval.
    let watch = lab.exec(
        "gw",
        support::egressd_bin().to_str().unwrap(),
        &["stats", "--watch", "0.3", "--count", "1"],
    );
    let watch = String::from_utf8_lossy(&watch.stdout);
    let line = watch.lines().find(|l| l.starts_with(r#"egressd_rx_packets_total{side="outside"}"#));
    assert!(line.is_some_and(|l| l.trim_end().ends_with("/s")), "{watch}");

    // `/metrics` serves the format the scraper asks for: OpenMetrics to Prometheus (which asks for it first),
    // the classic text format to everything else, and `promtool check metrics` accepts the latter.
    let prometheus_accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let openmetrics = lab.exec(
        "gw",
        "curl",
        &["-sf", "-m", "2", "-D", "-", "-H", prometheus_accept, "http://127.0.0.1:9900/metrics"],
    );
    let openmetrics = String::from_utf8_lossy(&openmetrics.stdout);
    assert!(
        openmetrics.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{openmetrics}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    let text = lab.sh(
        "gw",
        "curl -sf -m 2 -D /dev/stderr http://127.0.0.1:9900/metrics > /tmp/egressd-lab-metrics.txt \
         && promtool check metrics < /tmp/egressd-lab-metrics.txt",
    );
    let headers = String::from_utf8_lossy(&text.stderr);
    assert!(
        text.status.success(),
        "promtool check metrics failed:\n{headers}{}",
        String::from_utf8_lossy(&text.stdout)
    );
    assert!(headers.contains("Content-Type: text/plain; version=0.0.4"), "{headers}");

    assert!(gw.stop(), "egressd did not exit 0 on SIGTERM; log:\n{}", gw.log_text());
    assert!(!lab.gw_links().contains("xdp"), "XDP program left attached after shutdown:\n{}", lab.gw_links());
    assert!(lab.curl("http://203.0.113.10/", 2).is_none(), "HTTP crossed gw after egressd stopped");
}

/// The node keeps its own traffic while egressd runs: the XDP program passes ARP and frames addressed to gw's
/// own addresses to the kernel (ping to gw's inside address is answered by the kernel, not forwarded).
#[test]
fn node_keeps_its_own_traffic_while_egressd_runs() {
    let lab = Lab::up(false);
    let gw = Gateway::start(&lab, &repo_root().join("conf/lab.toml"));
    let ping = lab.exec("client", "ping", &["-c", "2", "-i", "0.2", "-W", "1", "10.10.0.1"]);
    assert!(
        ping.status.success(),
        "gw's own address stopped answering:\n{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let ping = lab.exec("ext", "ping", &["-c", "2", "-i", "0.2", "-W", "1", "192.0.2.1"]);
    assert!(ping.status.success(), "gw's outside address stopped answering");
    // The kernel's neighbour table is alive (ARP reached the kernel) for both sides.
    let neigh = String::from_utf8_lossy(&lab.exec("gw", "ip", &["neigh", "show"]).stdout).into_owned();
    assert!(neigh.contains("10.10.0.2") && neigh.contains("192.0.2.2"), "neighbours:\n{neigh}");
    drop(gw);
}

/// The policy decides in the lab: the payments group (10.10.1.0/24) may reach 198.51.100.10:80 but not
/// 203.0.113.10 (default deny, counted). SIGHUP swaps in a file that allows it; a broken file is refused, counted,
/// and the running policy stays.
#[test]
fn policy_decides_in_the_lab_and_sighup_reloads_it() {
    let lab = Lab::up(false);
    let (_dir, config, original) = lab_config(str::to_string);
    let gw = Gateway::start(&lab, &config);
    let payments_get = |url: &str| {
        let out = lab.exec("client", "curl", &["-sf", "-m", "2", "--interface", "10.10.1.2", url]);
        out.status.success()
    };

    assert!(payments_get("http://198.51.100.10/"), "payments → partner allowed; log:\n{}", gw.log_text());
    let denied_before = gw.metric(r#"egressd_drops_total{reason="default_deny"}"#);
    assert!(!payments_get("http://203.0.113.10/"), "payments → 203.0.113.10 must be denied");
    assert!(gw.metric(r#"egressd_drops_total{reason="default_deny"}"#) > denied_before);
    // Which rule decided: the payments allow rule, by its name ("partner-http"; unnamed rules go by position).
    assert!(
        gw.metric(r#"egressd_policy_decisions_total{group="payments",rule="partner-http",action="allow"}"#)
            >= 1.0
    );
    assert!(gw.metric(r#"egressd_policy_decisions_total{group="web",rule="1",action="allow"}"#) >= 0.0);
    assert!(gw
        .metrics()
        .iter()
        .any(|(n, _)| n == r#"egressd_policy_decisions_total{group="web",rule="1",action="allow"}"#));
    // The denial is in the audit log with its flow and reason.
    wait_for(
        || {
            gw.log_text().lines().any(|l| {
                l.contains("flow denied") && l.contains("dst=203.0.113.10") && l.contains("default_deny")
            })
        },
        "an audit line for the denied flow",
    );
    assert!(lab.curl("http://203.0.113.10/", 3).is_some(), "the web group is still allowed there");

    // A broken file: refused, counted, old policy kept.
    std::fs::write(&config, original.replace("action = \"allow\"", "action = \"alow\"")).unwrap();
    gw.signal("HUP");
    wait_for(|| gw.metric(r#"egressd_reloads_total{result="failed"}"#) >= 1.0, "failed reload counted");
    wait_for(|| gw.log_text().contains("lab.toml:"), "the refused reload is logged with file:line:col");
    assert!(payments_get("http://198.51.100.10/"), "the running policy stays after a bad reload");

    // A good file that lets payments reach 203.0.113.0/24 too (and changes a setting only a restart applies).
    std::fs::write(
        &config,
        original
            .replace("to = [\"198.51.100.0/24\"]", "to = [\"198.51.100.0/24\", \"203.0.113.0/24\"]")
            .replace("batch_size = 64", "batch_size = 32"),
    )
    .unwrap();
    gw.signal("HUP");
    wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= 1.0, "good reload counted");
    assert!(payments_get("http://203.0.113.10/"), "reloaded policy allows payments → 203.0.113.10");
    // What the reload could not apply is said, key by key.
    wait_for(
        || {
            gw.log_text()
                .contains("[dataplane] batch_size changed (64 -> 32): takes effect after a restart; 64 stays")
        },
        "the setting a reload cannot apply is named",
    );
    // The refused file did not count as a generation; the good one did, and the last reload shows as applied.
    assert_eq!(gw.metric("egressd_policy_generation"), 2.0);
    assert_eq!(gw.metric("egressd_last_reload_success"), 1.0);
}

/// Reload keeps established flows: a kept-alive HTTP connection opened before a reload that leaves its rule alone
/// carries its next request after it. A flow whose rule a reload removes is judged again on its next packet and
/// dropped.
#[test]
fn reload_keeps_established_flows_and_rechecks_those_whose_rule_went_away() {
    let lab = Lab::up(false);
    let (_dir, config, original) = lab_config(str::to_string);
    let gw = Gateway::start(&lab, &config);
    // Two requests on one connection, `pause` seconds apart; prints "ok ok", or where it failed.
    let keepalive = |pause: u32| {
        let script = format!(
            r#"
import http.client, time
c = http.client.HTTPConnection("203.0.113.10", 80, timeout=3)
c.request("GET", "/ip"); first = c.getresponse().read().decode().strip()
time.sleep({pause})
try:
    c.request("GET", "/ip"); second = c.getresponse().read().decode().strip()
    print("ok" if first == second else "other-connection")
except Exception as e:
    print("failed", type(e).__name__)
"#
        );
        lab.spawn_python("client", &script)
    };
    let reloads = |n: f64| {
        wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= n, "the reload");
    };

    // 1. A reload that leaves the web rules alone (payments loses its rule).
    let survivor = keepalive(3);
    std::thread::sleep(std::time::Duration::from_secs(1));
    std::fs::write(&config, original.replace("to = [\"198.51.100.0/24\"]", "to = [\"198.51.100.128/25\"]"))
        .unwrap();
    gw.signal("HUP");
    reloads(1.0);
    let out = survivor.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "established flow across a reload");

    // 2. A reload that removes the web group's TCP rule: the open connection's next packet is judged again.
    let doomed = keepalive(3);
    std::thread::sleep(std::time::Duration::from_secs(1));
    std::fs::write(&config, original.replace("ports = [80, 443]", "ports = [443]")).unwrap();
    gw.signal("HUP");
    reloads(2.0);
    let out = doomed.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("failed"),
        "a flow whose rule was removed must stop: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(gw.metric(r#"egressd_drops_total{reason="default_deny"}"#) >= 1.0);
}

/// Sends one UDP datagram over IPv6 from the client to ext's echo at [2001:db8:113::10]:7007; true if it came back.
fn udp6_echo(lab: &Lab) -> bool {
    let out = lab.sh("client", "printf v6 | socat -T2 - 'UDP6:[2001:db8:113::10]:7007'");
    String::from_utf8_lossy(&out.stdout) == "v6"
}

/// IPv6 fails closed: gw forwards IPv6 in the kernel (forwarding=1), so without egressd ping and UDP over IPv6
/// cross; while egressd runs, its XDP program drops that transit IPv6 and counts it (`ipv6_unsupported`), and the
/// node's own IPv6 (ping to gw's inside address, neighbour discovery) keeps working.
#[test]
fn transit_ipv6_is_dropped_and_counted_while_the_nodes_own_ipv6_keeps_working() {
    let lab = Lab::up(false);
    let fwd = lab.exec("gw", "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    assert!(fwd.status.success(), "cannot turn IPv6 forwarding on in gw");
    let echo = lab.sh(
        "ext",
        "setsid socat 'UDP6-RECVFROM:7007,bind=[2001:db8:113::10],fork' EXEC:cat >/dev/null 2>&1 &",
    );
    assert!(echo.status.success());
    let ping6 = |target: &str| lab.exec("client", "ping", &["-6", "-c", "2", "-i", "0.2", "-W", "2", target]);
    wait_for(
        || ping6("2001:db8:113::10").status.success(),
        "IPv6 crossing gw without egressd (the kernel forwards it)",
    );
    wait_for(|| udp6_echo(&lab), "UDP over IPv6 crossing gw without egressd");

    let gw = Gateway::start(&lab, &repo_root().join("conf/lab.toml"));
    assert!(!ping6("2001:db8:113::10").status.success(), "transit IPv6 crossed while egressd runs");
    assert!(!udp6_echo(&lab), "UDP over IPv6 crossed while egressd runs");
    wait_for(
        || gw.metric(r#"egressd_drops_total{reason="ipv6_unsupported"}"#) >= 3.0,
        "the 2 pings and the datagram counted as ipv6_unsupported",
    );
    let own = ping6("fd00:10::1");
    assert!(
        own.status.success(),
        "gw's own IPv6 address stopped answering:\n{}",
        String::from_utf8_lossy(&own.stdout)
    );
    let neigh = String::from_utf8_lossy(&lab.exec("gw", "ip", &["-6", "neigh", "show"]).stdout).into_owned();
    assert!(neigh.contains("fd00:10::2"), "neighbour discovery reached the kernel:\n{neigh}");
    drop(gw);
}

/// Next-hop resolution sends nothing but ARP: at start-up egressd has the kernel resolve the outside router
/// (192.0.2.2) over netlink; ext sees gw's ARP request and no IP packet from gw itself (the first version sent a
/// UDP datagram to the next hop's port 9 to make the kernel resolve it). Traffic then flows.
#[test]
fn next_hop_resolution_sends_nothing_but_arp() {
    let lab = Lab::up(false);
    let capture = lab.capture("ext", "ext0", 3.0);
    let gw = Gateway::start(&lab, &repo_root().join("conf/lab.toml"));
    let frames = capture.frames();
    let gw_addr = [192, 0, 2, 1];
    let from_gw: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[26..30] == gw_addr)
        .collect();
    assert!(from_gw.is_empty(), "gw sent IP packets of its own to ext: {from_gw:02x?}");
    let arp_for_router = frames.iter().any(|f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == [192, 0, 2, 2]
    });
    assert!(arp_for_router, "no ARP request for the router 192.0.2.2 in {} frames", frames.len());
    assert!(lab.curl("http://203.0.113.10/", 5).is_some(), "traffic flows once resolved:\n{}", gw.log_text());
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): egressd says READY=1 once it forwards, feeds the watchdog while
/// its workers make progress, and says STOPPING=1 on SIGTERM. The test stands in for systemd's notify socket.
#[test]
fn systemd_readiness_watchdog_and_stop_are_notified() {
    let lab = Lab::up(false);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let (_conf_dir, config, _) = lab_config(str::to_string);
    let notify = socket_path.to_str().unwrap();
    let mut gw = Gateway::start_with_env(
        &lab,
        &config,
        None,
        &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "400000")],
    );
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification within 5 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1\n");
    // The watchdog interval is 400 ms: it is fed every 200 ms or so.
    let started = std::time::Instant::now();
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1\n");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(gw.stop(), "egressd exits 0 on SIGTERM");
    let mut rest = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if rest.last().map(String::as_str) == Some("STOPPING=1\n") {
            break;
        }
    }
    assert_eq!(rest.last().map(String::as_str), Some("STOPPING=1\n"), "{rest:?}");
}

/// A real Prometheus server scrapes the gateway (it asks for OpenMetrics) and answers a query for a counter the
/// test moved by a known amount: three reloads.
#[test]
fn prometheus_scrapes_the_gateway() {
    let lab = Lab::up(false);
    let (dir, config, _) = lab_config(str::to_string);
    let gw = Gateway::start(&lab, &config);
    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n\
         scrape_configs:\n  - job_name: egressd\n    static_configs: [{targets: ['127.0.0.1:9900']}]\n",
    )
    .unwrap();
    let storage = dir.path().join("tsdb");
    let prometheus = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw"), "prometheus"])
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!("--storage.tsdb.path={}", storage.display()))
        .args(["--web.listen-address=127.0.0.1:19090", "--log.level=warn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (scripts/setup installs the prometheus package)");
    let _prometheus = support::KillOnDrop(prometheus);

    // The value Prometheus holds for `query`, if it has one.
    let query = |query: &str| -> Option<f64> {
        let out = lab.exec(
            "gw",
            "curl",
            &[
                "-sf",
                "-m",
                "2",
                "http://127.0.0.1:19090/api/v1/query",
                "--data-urlencode",
                &format!("query={query}"),
            ],
        );
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        answer["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let wait_until = |what: &str, expected: f64| {
        support::wait_for_within(
            std::time::Duration::from_secs(30),
            || query(what) == Some(expected),
            &format!("Prometheus to answer {expected} for {what}"),
        );
    };

    wait_until(r#"up{job="egressd"}"#, 1.0);
    wait_until(r#"egressd_reloads_total{result="ok"}"#, 0.0);
    for n in 1..=3 {
        gw.signal("HUP");
        wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= f64::from(n), "the reload");
    }
    wait_until(r#"egressd_reloads_total{result="ok"}"#, 3.0);
    wait_until(r#"egressd_ready"#, 1.0);
}

/// `egressd doctor` on the node: what is wrong, and fine once egressd runs on a well-set-up node.
#[test]
fn doctor_says_what_is_wrong_with_the_node() {
    let lab = Lab::up(false);
    let bin = support::egressd_bin();
    let config = repo_root().join("conf/lab.toml");
    let doctor = |lab: &Lab| {
        let out = lab.exec("gw", bin.to_str().unwrap(), &["doctor", config.to_str().unwrap()]);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Not running yet: the admin endpoint does not answer.
    let (code, text) = doctor(&lab);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL  admin endpoint")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("ok    egress IPs: 2 on gw-out")), "{text}");
    let gw = Gateway::start(&lab, &config);
    assert!(lab.curl("http://203.0.113.10/ip", 5).is_some(), "traffic through the gateway");
    let (code, text) = doctor(&lab);
    assert_eq!(code, Some(0), "a healthy node:\n{text}\n{}", gw.log_text());
    for check in ["inside XDP: attached", "outside XDP: attached", "admin endpoint", "policy: generation 1"] {
        assert!(text.lines().any(|l| l.starts_with("ok") && l.contains(check)), "{check}:\n{text}");
    }
    // Forwarding turned on and an egress IP gone: both named, with the fix.
    lab.sh("gw", "sysctl -qw net.ipv4.ip_forward=1; ip addr del 192.0.2.11/32 dev gw-out");
    let (code, text) = doctor(&lab);
    lab.sh("gw", "sysctl -qw net.ipv4.ip_forward=0; ip addr add 192.0.2.11/32 dev gw-out");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL  ip_forward: on") && text.contains("sysctl -w net.ipv4.ip_forward=0"),
        "{text}"
    );
    assert!(text.contains("FAIL  egress IPs: 192.0.2.11 not on gw-out"), "{text}");
}

/// `to_hosts`: a rule's destinations follow DNS without a reload. The web group may reach `www.test` on TCP 80;
/// while it resolves to .10, .10 answers and .11 is refused; when the name moves to .11, so does the rule (a new
/// policy generation, no reload); when the resolver goes silent the last answer holds until its TTL runs out,
/// then nothing is allowed.
#[test]
fn to_hosts_follow_dns_without_a_reload() {
    let lab = Lab::up(false);
    let mut dns = Dnsmasq::start(&lab, &["--local-ttl=6"]);
    dns.set_hosts("203.0.113.10 www.test\n");
    let (_dir, config, _) = lab_config(|text| {
        let rule = "to = [\"203.0.113.0/24\", \"198.51.100.0/24\"]\nproto = \"tcp\"\nports = [80, 443]";
        assert!(text.contains(rule), "conf/lab.toml changed: update this test");
        format!(
            "{}\n[l7]\nresolver = \"203.0.113.25\"\ndns_min_ttl = \"1s\"\n",
            text.replacen(rule, "to_hosts = [\"www.test\"]\nproto = \"tcp\"\nports = [80]", 1)
        )
    });
    let gw = Gateway::start(&lab, &config);
    let get = |ip: &str| {
        lab.exec("client", "curl", &["-sf", "-m", "1", "-o", "/dev/null", &format!("http://{ip}/")])
            .status
            .success()
    };
    assert!(get("203.0.113.10"), "www.test's address at start\ngateway log:\n{}", gw.log_text());
    assert!(!get("203.0.113.11"), "another address");
    let generation = gw.metric("egressd_policy_generation");

    dns.set_hosts("203.0.113.11 www.test\n");
    wait_for_within(Duration::from_secs(20), || get("203.0.113.11"), "the rule follows the name to .11");
    assert!(!get("203.0.113.10"), "the old address is no longer allowed");
    assert!(gw.metric("egressd_policy_generation") > generation, "a new policy generation");
    assert_eq!(gw.metric(r#"egressd_reloads_total{result="ok"}"#), 0.0, "without a reload");
    wait_for(
        || gw.log_text().contains("policy recompiled: to_hosts addresses changed"),
        "the recompile is logged",
    );
    assert!(gw.metric("egressd_to_hosts_updates_total") >= 2.0, "the first answer and the move");
    // explain asks the same resolver and judges with what the name has now.
    let bin = support::egressd_bin();
    let config_arg = config.to_str().expect("utf-8 path");
    let args = ["explain", config_arg, "--src", "10.10.0.2", "--dst", "203.0.113.11:80", "--json"];
    let out = lab.exec("gw", bin.to_str().expect("utf-8 path"), &args);
    let explained = String::from_utf8_lossy(&out.stdout);
    assert!(explained.contains(r#""verdict":"allow""#), "{explained}");
    assert!(explained.contains(r#""to_hosts":{"www.test":["203.0.113.11"]}"#), "{explained}");

    // The resolver goes silent: the last answer (TTL 6 s, asked again every 4.5 s) still counts at first...
    dns.stop();
    assert!(get("203.0.113.11"), "the last answer holds until its TTL runs out");
    // ...and then the name has no address: nothing is allowed.
    wait_for_within(Duration::from_secs(20), || !get("203.0.113.11"), "the answer expires");
    assert!(gw.metric("egressd_to_hosts_lookup_failures_total") >= 1.0, "the silent resolver counted");
}

/// `idle = "adaptive"` (the default): after traffic the workers and the L7 thread keep polling for
/// `idle_spin_us` (here a second), so the next packet of a conversation finds them awake; then they block, and an
/// idle gateway costs no CPU.
#[test]
fn adaptive_workers_and_the_l7_thread_poll_on_after_traffic_then_block() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(|text| {
        let web_rule = "ports = [80, 443]\naction = \"allow\"\n";
        assert!(text.contains(web_rule), "conf/lab.toml changed: update this test");
        polling_for_a_second(text).replacen(
            web_rule,
            "ports = [80]\naction = \"l7\"\nhosts = [\"web.test\"]\n",
            1,
        )
    });
    let gw = Gateway::start(&lab, &config);
    let threads = ["egressd-w", "egressd-l7"];
    // Let the start-up traffic (ARP, the first neighbour lookups) pass and the threads block.
    std::thread::sleep(Duration::from_millis(1500));
    let before_traffic = cpu_shares(gw.pid(), &threads, Duration::from_millis(500));
    let out = lab.exec("client", "curl", &["-sf", "-m", "5", "-H", "Host: web.test", "http://203.0.113.10/"]);
    assert!(out.status.success(), "curl through the L7 path failed:\n{}", gw.log_text());
    let after_traffic = cpu_shares(gw.pid(), &threads, Duration::from_millis(500));
    std::thread::sleep(Duration::from_millis(1000));
    let idle = cpu_shares(gw.pid(), &threads, Duration::from_secs(2));
    eprintln!("CPU of {threads:?}: {before_traffic:.2?} idle, {after_traffic:.2?} just after traffic, {idle:.2?} later");
    for (i, thread) in threads.iter().enumerate() {
        assert!(before_traffic[i] < 0.05, "idle {thread}* used {:.2} of a core", before_traffic[i]);
        assert!(
            after_traffic[i] > 0.2,
            "{thread}* blocked at once after traffic ({:.2} of a core)",
            after_traffic[i]
        );
        assert!(idle[i] < 0.05, "{thread}* still used {:.2} of a core after idle_spin_us", idle[i]);
    }
}

/// Workers polling on after traffic (and yielding between polls) lose nothing: 130 new UDP flows one after
/// another are all echoed. The first flow finds the workers blocked, the rest find them polling. On failure the
/// message says where the echoes went missing: the gateway's packet counters, and what the kernel of the echo
/// server's namespace received and sent (this test once failed because the echo server, then socat forking per
/// peer, answered 5 of 130 datagrams its kernel had received).
#[test]
fn polling_workers_lose_no_new_udp_flows() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(polling_for_a_second);
    let gw = Gateway::start(&lab, &config);
    let echoed = lab.udp_flows("10.10.0.2", 30000, 130);
    let server = lab.sh("ext", "nstat -asz UdpInDatagrams UdpOutDatagrams");
    assert_eq!(
        echoed,
        130,
        "echoes of 130 new UDP flows; gateway: {}\necho server's kernel:\n{}\n{}",
        gw.packet_counters(),
        String::from_utf8_lossy(&server.stdout),
        gw.log_text()
    );
}

/// The lab's configuration with the workers and the L7 thread polling on for a second after their last work.
fn polling_for_a_second(text: &str) -> String {
    assert!(text.contains("\nbatch_size = 64\n"), "conf/lab.toml changed: update this test");
    text.replacen("\nbatch_size = 64\n", "\nbatch_size = 64\nidle_spin_us = 1000000\n", 1)
}

/// The CPU time the gateway's threads whose names start with each of `prefixes` use over `window`, as shares of
/// one core.
fn cpu_shares(pid: u32, prefixes: &[&str], window: Duration) -> Vec<f64> {
    let ticks = |prefix: &str| -> u64 {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the gateway's threads");
        tasks
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .map(|stat| {
                // After the command (which may hold spaces) come the state, then fields 4..; utime and stime
                // are fields 14 and 15.
                let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
                field(14) + field(15)
            })
            .sum()
    };
    let clock_ticks: f64 = String::from_utf8_lossy(
        &std::process::Command::new("getconf").arg("CLK_TCK").output().expect("getconf").stdout,
    )
    .trim()
    .parse()
    .expect("CLK_TCK");
    let start: Vec<u64> = prefixes.iter().map(|p| ticks(p)).collect();
    std::thread::sleep(window);
    prefixes
        .iter()
        .zip(start)
        .map(|(p, start)| (ticks(p) - start) as f64 / clock_ticks / window.as_secs_f64())
        .collect()
}
