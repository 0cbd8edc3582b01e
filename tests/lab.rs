//! Lab tests: real traffic from the client namespace to servers in ext, through egressd in gw (issue 3).
//! They need root and the lab tools (scripts/setup installs them); without them they fail, loudly.

mod support;

use support::{repo_root, Gateway, Lab};

/// HTTP (curl → nginx) and UDP echo cross the gateway only while egressd runs: gw has ip_forward=0, so what
/// crosses was forwarded by egressd, and its counters move. After SIGTERM it exits 0 with no XDP program left.
#[test]
fn http_and_udp_cross_only_through_egressd() {
    let lab = Lab::up(true);
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
    let lab = Lab::up(true);
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
