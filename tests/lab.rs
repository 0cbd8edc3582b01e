//! Lab tests: real traffic from the client namespace to servers in ext, through egressd in gw (issue 3).
//! They need root and the lab tools (scripts/setup installs them); without them they fail, loudly.

mod support;

use support::{repo_root, wait_for, Gateway, Lab};

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
    assert!(lab.gw_links().contains("xdp"), "no XDP program attached while running:\n{}", lab.gw_links());

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
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("lab.toml");
    let original = std::fs::read_to_string(repo_root().join("conf/lab.toml")).expect("read conf/lab.toml");
    std::fs::write(&config, &original).expect("write config");
    let gw = Gateway::start(&lab, &config);
    let payments_get = |url: &str| {
        let out = lab.exec("client", "curl", &["-sf", "-m", "2", "--interface", "10.10.1.2", url]);
        out.status.success()
    };

    assert!(payments_get("http://198.51.100.10/"), "payments → partner allowed; log:\n{}", gw.log_text());
    let denied_before = gw.metric(r#"egressd_drops_total{reason="default_deny"}"#);
    assert!(!payments_get("http://203.0.113.10/"), "payments → 203.0.113.10 must be denied");
    assert!(gw.metric(r#"egressd_drops_total{reason="default_deny"}"#) > denied_before);
    assert!(lab.curl("http://203.0.113.10/", 3).is_some(), "the web group is still allowed there");

    // A broken file: refused, counted, old policy kept.
    std::fs::write(&config, original.replace("action = \"allow\"", "action = \"alow\"")).unwrap();
    let gw_pids =
        || std::process::Command::new("ip").args(["netns", "pids", &lab.ns("gw")]).output().unwrap();
    let signal_egressd = |sig: &str| {
        let pids = String::from_utf8_lossy(&gw_pids().stdout).into_owned();
        for pid in pids.split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "egressd" {
                std::process::Command::new("kill").args([sig, pid]).status().unwrap();
            }
        }
    };
    signal_egressd("-HUP");
    wait_for(|| gw.metric(r#"egressd_reloads_total{result="failed"}"#) >= 1.0, "failed reload counted");
    assert!(gw.log_text().contains("lab.toml:"), "the refused reload is logged with file:line:col");
    assert!(payments_get("http://198.51.100.10/"), "the running policy stays after a bad reload");

    // A good file that lets payments reach 203.0.113.0/24 too.
    std::fs::write(
        &config,
        original.replace("to = [\"198.51.100.0/24\"]", "to = [\"198.51.100.0/24\", \"203.0.113.0/24\"]"),
    )
    .unwrap();
    signal_egressd("-HUP");
    wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= 1.0, "good reload counted");
    assert!(payments_get("http://203.0.113.10/"), "reloaded policy allows payments → 203.0.113.10");
}
