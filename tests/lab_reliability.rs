//! Reliability in the lab (issue 18): reloads while traffic runs, and a crash (`kill -9`) and restart.
//!
//! `EGRESSD_RELOAD_SOAK_SECONDS` sets how long the reload test runs (default 30; the issue's full form is 60).

mod support;

use std::process::Child;
use std::time::{Duration, Instant};

use support::{lab_config, rss_kib, stdout_of, wait_for, Gateway, KillOnDrop, Lab};

/// A TCP sink in ext on 203.0.113.21:443 (a port the web group may use): reads a connection to its end and
/// answers with the byte count and SHA-256 of what it read.
fn start_sink(lab: &Lab) -> KillOnDrop {
    let script = r#"
import hashlib, socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.21", 443)); s.listen(16)
def serve(c):
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(65536)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(f"{n} {h.hexdigest()}\n".encode()); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    lab.start_python_server("ext", script, &["203.0.113.21:443"])
}

/// From the client: sends `rate` bytes a second for `seconds` to the sink (a deterministic stream), then prints
/// "ok" if the sink's count and digest match what was sent, or what went wrong.
fn start_transfer(lab: &Lab, seconds: u64, rate: u64) -> Child {
    let script = format!(
        r#"
import hashlib, random, socket, time
rng = random.Random(18)
s = socket.create_connection(("203.0.113.21", 443), timeout=10)
h, n, start = hashlib.sha256(), 0, time.time()
try:
    while time.time() - start < {seconds}:
        b = rng.randbytes({rate} // 20)
        s.sendall(b); h.update(b); n += len(b)
        time.sleep(0.05)
    s.shutdown(socket.SHUT_WR)
    answer = s.makefile().readline().split()
    print("ok" if answer == [str(n), h.hexdigest()] else f"mismatch: sent {{n}}, sink says {{answer}}", flush=True)
except Exception as e:
    print(f"failed after {{n}} bytes, {{time.time() - start:.1f}} s: {{type(e).__name__}} {{e}}", flush=True)
"#
    );
    lab.spawn_python("client", &script)
}

/// From the client: one datagram every 20 ms to the UDP echo for `seconds`; prints "sent received".
fn start_udp_stream(lab: &Lab, seconds: u64) -> Child {
    let script = format!(
        r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.001)
s.connect(("203.0.113.10", 7))
sent = received = 0; start = time.time()
while time.time() - start < {seconds}:
    s.send(b"x%d" % sent); sent += 1
    end = time.time() + 0.02
    while time.time() < end:
        try:
            s.recv(100); received += 1
        except (socket.timeout, BlockingIOError):
            pass
end = time.time() + 1
while time.time() < end:
    try:
        s.recv(100); received += 1
    except (socket.timeout, BlockingIOError):
        pass
print(sent, received, flush=True)
"#
    );
    lab.spawn_python("client", &script)
}

/// The policy reloaded every second while a TCP transfer and a UDP stream run: every reload that changes the
/// policy (a rule for other destinations comes and goes) is applied, a broken file in the middle is refused and
/// the running policy stays, and the flows lose nothing: the transfer's bytes and digest match at the far end,
/// every datagram comes back, and no packet is dropped for a policy reason.
#[test]
fn reloads_every_second_while_traffic_runs_lose_nothing() {
    let seconds: u64 =
        std::env::var("EGRESSD_RELOAD_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let lab = Lab::up(false);
    let (_dir, config, original) = lab_config(str::to_string);
    let gw = Gateway::start(&lab, &config);
    let _sink = start_sink(&lab);
    let transfer = start_transfer(&lab, seconds, 2_000_000);
    let udp = start_udp_stream(&lab, seconds);

    let extra = "\n[[rule]]\ngroup = \"web\"\nto = [\"100.64.0.0/10\"]\nproto = \"tcp\"\nports = [8080]\naction = \"allow\"\n";
    let started = Instant::now();
    let mut attempted = 0u32;
    let mut refused = 0u32;
    while started.elapsed() < Duration::from_secs(seconds) {
        attempted += 1;
        let text = if attempted == seconds as u32 / 2 {
            refused += 1;
            format!("{original}\n[[rule]]\ngroup = \"nobody\"\nto = [\"10.0.0.0/8\"]\naction = \"allow\"\n")
        } else if attempted.is_multiple_of(2) {
            format!("{original}{extra}")
        } else {
            original.clone()
        };
        std::fs::write(&config, text).unwrap();
        gw.signal("HUP");
        std::thread::sleep(Duration::from_secs(1));
    }
    let transfer = stdout_of(transfer);
    let udp = stdout_of(udp);
    assert_eq!(transfer, "ok", "the TCP transfer across {attempted} reloads; log:\n{}", gw.log_text());
    let (sent, received) =
        udp.split_once(' ').map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())).unwrap();
    assert!(sent > seconds * 40, "the UDP stream ran: {udp}");
    assert_eq!(received, sent, "every datagram came back across the reloads");
    wait_for(
        || {
            gw.metric(r#"egressd_reloads_total{result="ok"}"#)
                + gw.metric(r#"egressd_reloads_total{result="failed"}"#)
                >= f64::from(attempted)
        },
        "every reload answered",
    );
    assert_eq!(gw.metric(r#"egressd_reloads_total{result="failed"}"#), f64::from(refused), "the broken file");
    assert_eq!(gw.metric(r#"egressd_reloads_total{result="ok"}"#), f64::from(attempted - refused));
    for reason in
        ["policy_deny", "default_deny", "no_group", "no_egress_ip", "tcp_not_syn", "tcp_out_of_window"]
    {
        let series = format!("egressd_drops_total{{reason=\"{reason}\"}}");
        assert_eq!(gw.metric(&series), 0.0, "{series}: allowed flows dropped across reloads");
    }
}

/// `kill -9` while a transfer runs, then a restart. Measured behaviour: the XDP programs go with the process
/// (they are attached through BPF links, which close with it), so nothing is left in the new process's way and
/// nothing crosses the node meanwhile (`ip_forward` is off); the new process attaches and forwards new flows at
/// once. Established TCP connections do not resume: the NAT state died with the process, so their next segments
/// (not SYNs) are refused (`tcp_not_syn`) and the client's connection fails when its own timeout runs out.
#[test]
fn a_crash_leaves_nothing_attached_and_a_restart_forwards_new_flows() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(str::to_string);
    let mut gw = Gateway::start(&lab, &config);
    let _sink = start_sink(&lab);
    let transfer = start_transfer(&lab, 8, 500_000);
    std::thread::sleep(Duration::from_secs(2));
    gw.crash();
    let crashed = Instant::now();
    wait_for(|| !lab.gw_links().contains("xdp"), "the XDP programs gone with the process");
    assert!(lab.curl("http://203.0.113.10/ip", 2).is_none(), "nothing crosses while egressd is down");

    let gw = Gateway::start(&lab, &config);
    let restarted = crashed.elapsed();
    assert!(
        lab.curl("http://203.0.113.10/ip", 5).is_some_and(|b| b.starts_with("192.0.2.10:")),
        "a new flow right after the restart; log:\n{}",
        gw.log_text()
    );
    let transfer = stdout_of(transfer);
    assert!(transfer.starts_with("failed after"), "the old connection cannot resume: {transfer}");
    assert!(gw.metric(r#"egressd_drops_total{reason="tcp_not_syn"}"#) >= 1.0, "its segments were refused");
    eprintln!("crash to ready again: {restarted:?}; the interrupted transfer: {transfer}");
}

/// Sends one UDP datagram from each of `ports` at `source` to 203.0.113.10:9999 (allowed, closed): a new flow each.
fn flood(lab: &Lab, source: &str, ports: std::ops::Range<u32>) {
    let script = format!(
        r#"
import socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
s.bind(("{source}", 0))
for p in range({}, {}):
    s.sendto(struct.pack("!HHHH", p, 9999, 9, 0) + b"x", ("203.0.113.10", 0))
    if p % 100 == 0:
        time.sleep(0.002)
"#,
        ports.start, ports.end
    );
    let out = lab.exec("client", "python3", &["-c", &script]);
    assert!(out.status.success(), "flood: {}", String::from_utf8_lossy(&out.stderr));
}

/// Flows an inside address holds, from `egressd flows`.
fn flows_of(lab: &Lab, inside: &str) -> usize {
    let out = lab.exec(
        "gw",
        support::egressd_bin().to_str().unwrap(),
        &["flows", "--json", "--limit", "100000", "--inside", inside],
    );
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flows JSON");
    listing["flows"].as_array().map_or(0, Vec::len)
}

/// Limits under load: one source flooding new flows is held to `max_flows_per_source` and cannot starve another
/// source; when many sources fill the table (`max_flows`), new flows are refused and counted while an
/// established transfer goes on untouched.
#[test]
fn a_flooding_source_is_capped_and_a_full_table_spares_established_flows() {
    let lab = Lab::up(false);
    let (_dir, config, _) =
        lab_config(|text| format!("{text}\n[nat]\nmax_flows = 2000\nmax_flows_per_source = 500\n"));
    let gw = Gateway::start(&lab, &config);
    let _sink = start_sink(&lab);
    // The established flow, from 10.10.0.3.
    let transfer = start_transfer(&lab, 10, 500_000);
    std::thread::sleep(Duration::from_secs(1));

    // One source floods 5000 new flows: it keeps at most its quota, the rest are refused under their reason.
    flood(&lab, "10.10.0.2", 1024..6024);
    wait_for(
        || gw.metric(r#"egressd_drops_total{reason="source_flow_limit"}"#) >= 4000.0,
        "the quota refusals",
    );
    let held = flows_of(&lab, "10.10.0.2");
    assert!((200..=500).contains(&held), "the flooding source holds {held} flows");
    // Another source is not starved.
    let other =
        lab.exec("client", "curl", &["-sf", "-m", "3", "--interface", "10.10.0.3", "http://203.0.113.10/ip"]);
    assert!(other.status.success(), "another source's new flow");

    // Many sources fill the table: new flows (from the flooded port range) are refused as conntrack_full.
    let sources: Vec<String> = (4..12).map(|i| format!("10.10.0.{i}")).collect();
    for s in &sources {
        lab.sh("client", &format!("ip addr add {s}/24 dev cl0"));
    }
    for s in &sources {
        flood(&lab, s, 1024..1524);
    }
    wait_for(
        || gw.metric(r#"egressd_drops_total{reason="conntrack_full"}"#) >= 100.0,
        "conntrack_full refusals",
    );
    let probe = lab.sh(
        "client",
        "python3 -c 'import socket; s = socket.socket(); s.bind((\"10.10.0.3\", 7000)); s.settimeout(2)\n\
         try:\n    s.connect((\"203.0.113.10\", 80)); print(\"connected\")\nexcept OSError as e:\n    print(\"refused\", e)'",
    );
    let probe = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.starts_with("refused"), "a new flow into a full table: {probe}");
    // The established transfer never noticed.
    assert_eq!(stdout_of(transfer), "ok", "log:\n{}", gw.log_text());
}

/// RSS of the process `pid`, in KiB.
/// Least-squares slope of `(x, y)` points.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The soak (`scripts/soak` runs it for 10 minutes; CI for 2): a long paced transfer, HTTP requests on new
/// connections and UDP queries from new ports all the time (flows open and close; short timers so the table
/// reaches its steady state within the run), a reload every 5 s. Sampled every 5 s: RSS, live flows, drops by
/// reason. At the end a report, and: no lost bytes or failed requests, RSS and flow count flat over the second
/// half (slopes within bounds).
#[test]
fn soak_mixed_traffic_and_reloads_keeps_memory_and_flows_flat() {
    let seconds: u64 = std::env::var("EGRESSD_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let lab = Lab::up(false);
    let timers = "\n[nat]\nudp_timeout = \"10s\"\ntcp_transitory_timeout = \"10s\"\ntcp_established_timeout = \"60s\"\n";
    let (_dir, config, _) = lab_config(|text| format!("{text}{timers}"));
    let gw = Gateway::start(&lab, &config);
    let pid = gw.pid();
    let _sink = start_sink(&lab);
    let transfer = start_transfer(&lab, seconds, 1_000_000);
    let churn = format!(
        r#"
import http.client, random, socket, time
start, ok, failed, udp_ok, udp_sent = time.time(), 0, 0, 0, 0
u = None
while time.time() - start < {seconds}:
    try:
        c = http.client.HTTPConnection("203.0.113.10", 80, timeout=3)
        c.request("GET", "/ip"); c.getresponse().read(); c.close(); ok += 1
    except Exception:
        failed += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
    s.bind(("10.10.0.2", random.randint(20000, 30000)))
    try:
        s.sendto(b"?", ("198.51.100.10", 9000)); udp_sent += 1; s.recv(100); udp_ok += 1
    except Exception:
        pass
    s.close()
    time.sleep(0.05)
print(ok, failed, udp_sent, udp_ok, flush=True)
"#
    );
    let churn = lab.spawn_python("client", &churn);

    let started = Instant::now();
    let mut samples: Vec<(f64, u64, f64)> = Vec::new();
    let mut reloads = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(5));
        gw.signal("HUP");
        reloads += 1;
        let flows: f64 =
            gw.metrics().iter().filter(|(n, _)| n.starts_with("egressd_nat_flows{")).map(|(_, v)| v).sum();
        samples.push((started.elapsed().as_secs_f64(), rss_kib(pid), flows));
    }
    let transfer = stdout_of(transfer);
    let churn = stdout_of(churn);
    let drops: Vec<(String, f64)> =
        gw.metrics().into_iter().filter(|(n, v)| n.starts_with("egressd_drops_total{") && *v > 0.0).collect();
    let second_half: Vec<&(f64, u64, f64)> = samples.iter().skip(samples.len() / 2).collect();
    let rss_slope = slope(&second_half.iter().map(|(t, r, _)| (*t / 60.0, *r as f64)).collect::<Vec<_>>());
    let flow_slope = slope(&second_half.iter().map(|(t, _, f)| (*t / 60.0, *f)).collect::<Vec<_>>());
    let (first, last) = (samples.first().unwrap(), samples.last().unwrap());
    eprintln!(
        "soak report ({seconds} s, {reloads} reloads):\n  RSS {} -> {} KiB, second-half slope {rss_slope:.0} KiB/min\n  \
         live flows {} -> {}, second-half slope {flow_slope:.1} flows/min\n  transfer: {transfer}\n  \
         churn (HTTP ok, HTTP failed, UDP sent, UDP answered): {churn}\n  drops: {drops:?}",
        first.1, last.1, first.2, last.2
    );
    assert_eq!(transfer, "ok", "lost bytes in the long transfer");
    let counts: Vec<u64> = churn.split_whitespace().map(|w| w.parse().unwrap()).collect();
    assert_eq!(counts[1], 0, "failed HTTP requests: {churn}");
    assert!(counts[0] > seconds * 5, "the churn ran: {churn}");
    assert!(counts[3] + counts[2] / 100 >= counts[2], "UDP answers: {churn}");
    // Flat: RSS grows by less than 1 MiB a minute, and the flow count by less than 10 % of its level a minute (a
    // leak grows; a count that falls is closed flows expiring, which a 2-minute soak still sees).
    assert!(rss_slope < 1024.0, "RSS grows {rss_slope:.0} KiB/min in the second half: {samples:?}");
    assert!(flow_slope < 0.1 * last.2.max(50.0), "flows grow {flow_slope:.1}/min: {samples:?}");
}

/// Hostile frames while good flows run: malformed, tagged, source-routed, TTL-expired and flag-abusing frames and
/// transit IPv6 with an extension-header chain
/// from inside, unsolicited datagrams and ICMP errors about unknown flows from outside, each sent 20 times in
/// the middle of a paced TCP transfer and a UDP stream. Each is dropped under its own reason, exactly 20 times;
/// the good flows lose nothing; egressd keeps running.
#[test]
fn hostile_frames_during_traffic_are_each_counted_and_cost_the_good_flows_nothing() {
    use etherparse::{Icmpv4Type, PacketBuilder};
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(str::to_string);
    let gw = Gateway::start(&lab, &config);
    let _sink = start_sink(&lab);
    let transfer = start_transfer(&lab, 12, 1_000_000);
    let udp = start_udp_stream(&lab, 12);
    std::thread::sleep(Duration::from_secs(2));

    let (client, gw_in) = (lab.mac("client", "cl0"), lab.mac("gw", "gw-in"));
    let (ext, gw_out) = (lab.mac("ext", "ext0"), lab.mac("gw", "gw-out"));
    let udp_frame = |ttl: u8| {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(client, gw_in)
            .ipv4([10, 10, 0, 2], [203, 0, 113, 10], ttl)
            .udp(47000, 7)
            .write(&mut f, b"hostile")
            .unwrap();
        f
    };
    let fix_ip_checksum = |f: &mut Vec<u8>| {
        f[24..26].copy_from_slice(&[0, 0]);
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let mut sum: u32 =
            f[14..14 + ihl].chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    };
    let mut cases: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    // From inside.
    let mut tagged = udp_frame(64);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    cases.push(("client", "vlan_tagged", tagged));
    cases.push(("client", "ttl_exceeded", udp_frame(1)));
    let mut bad_sum = udp_frame(64);
    bad_sum[24] ^= 0xff;
    cases.push(("client", "bad_ip_checksum", bad_sum));
    let mut short_ihl = udp_frame(64);
    short_ihl[14] = 0x44;
    fix_ip_checksum(&mut short_ihl);
    cases.push(("client", "bad_ip_header", short_ihl));
    let mut v6_in_v4 = udp_frame(64);
    v6_in_v4[14] = 0x65;
    cases.push(("client", "ip_version_mismatch", v6_in_v4));
    let mut long_len = udp_frame(64);
    long_len[16..18].copy_from_slice(&1400u16.to_be_bytes());
    fix_ip_checksum(&mut long_len);
    cases.push(("client", "bad_ip_length", long_len));
    let mut syn_fin = Vec::new();
    PacketBuilder::ethernet2(client, gw_in)
        .ipv4([10, 10, 0, 2], [203, 0, 113, 10], 64)
        .tcp(47001, 80, 1, 64240)
        .syn()
        .fin()
        .write(&mut syn_fin, &[])
        .unwrap();
    cases.push(("client", "invalid_tcp_flags", syn_fin));
    let mut lsrr = Vec::new();
    {
        // Loose source route option (type 131), padded to 8 bytes.
        let options = [131u8, 7, 4, 203, 0, 113, 10, 0];
        let payload = b"routed";
        let total = 20 + options.len() + 8 + payload.len();
        lsrr.extend_from_slice(&gw_in);
        lsrr.extend_from_slice(&client);
        lsrr.extend_from_slice(&[0x08, 0x00]);
        lsrr.extend_from_slice(&[0x47, 0, (total >> 8) as u8, total as u8, 0, 1, 0, 0, 64, 17, 0, 0]);
        lsrr.extend_from_slice(&[10, 10, 0, 2, 203, 0, 113, 10]);
        lsrr.extend_from_slice(&options);
        let udp_len = (8 + payload.len()) as u16;
        lsrr.extend_from_slice(&47002u16.to_be_bytes());
        lsrr.extend_from_slice(&7u16.to_be_bytes());
        lsrr.extend_from_slice(&udp_len.to_be_bytes());
        lsrr.extend_from_slice(&[0, 0]);
        lsrr.extend_from_slice(payload);
        fix_ip_checksum(&mut lsrr);
    }
    cases.push(("client", "source_route", lsrr));
    // Transit IPv6 with a chain of extension headers (hop-by-hop, routing type 0, destination options, fragment):
    // dropped by the XDP program before any worker sees it.
    let mut v6 = Vec::new();
    v6.extend_from_slice(&gw_in);
    v6.extend_from_slice(&client);
    v6.extend_from_slice(&[0x86, 0xdd]);
    let chain: Vec<u8> = [
        vec![43, 0, 1, 4, 0, 0, 0, 0],            // hop-by-hop → routing, PadN
        vec![60, 0, 0, 0, 0, 0, 0, 0],            // routing type 0 → destination options
        vec![44, 0, 1, 4, 0, 0, 0, 0],            // destination options → fragment
        vec![17, 0, 0, 0, 0, 0, 0, 1],            // fragment → UDP
        vec![0xb7, 0x98, 0, 7, 0, 9, 0, 0, b'x'], // UDP
    ]
    .concat();
    v6.extend_from_slice(&[0x60, 0, 0, 0]);
    v6.extend_from_slice(&(chain.len() as u16).to_be_bytes());
    v6.extend_from_slice(&[0, 64]); // next header: hop-by-hop
    v6.extend_from_slice(&[0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x01, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    v6.extend_from_slice(&chain);
    cases.push(("client", "ipv6_unsupported", v6));
    // From outside.
    let mut unsolicited = Vec::new();
    PacketBuilder::ethernet2(ext, gw_out)
        .ipv4([203, 0, 113, 10], [192, 0, 2, 10], 64)
        .udp(7, 5555)
        .write(&mut unsolicited, b"knock")
        .unwrap();
    cases.push(("ext", "no_mapping", unsolicited));
    let mut quoted = Vec::new();
    PacketBuilder::ipv4([192, 0, 2, 10], [203, 0, 113, 10], 64)
        .udp(5556, 7)
        .write(&mut quoted, b"q")
        .unwrap();
    let mut unknown_error = Vec::new();
    PacketBuilder::ethernet2(ext, gw_out)
        .ipv4([203, 0, 113, 10], [192, 0, 2, 10], 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
        .write(&mut unknown_error, &quoted[..28])
        .unwrap();
    cases.push(("ext", "icmp_error_no_mapping", unknown_error));

    let count = |reason: &str| gw.metric(&format!("egressd_drops_total{{reason=\"{reason}\"}}"));
    for (from, reason, frame) in &cases {
        let before = count(reason);
        let iface = if *from == "client" { "cl0" } else { "ext0" };
        lab.inject(from, iface, &vec![frame.clone(); 20]);
        wait_for(|| count(reason) - before >= 20.0, reason);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(count(reason) - before, 20.0, "{reason}: each hostile frame once, nothing else");
    }
    assert_eq!(stdout_of(transfer), "ok", "the transfer under fire; log:\n{}", gw.log_text());
    let udp = stdout_of(udp);
    let (sent, received) = udp.split_once(' ').unwrap();
    assert_eq!(sent, received, "the UDP stream under fire");
    assert!(lab.curl("http://203.0.113.10/ip", 3).is_some(), "egressd keeps running");
}

/// Ports of an egress IP exhausted: every UDP port of 192.0.2.10 held (no port held twice, checked on the live
/// flow list), a new flow is refused as `out_of_ports`, and once the flows expire and their ports leave
/// quarantine (shortened to 20 s and 5 s here) new flows get ports again. The timeout leaves room to fill and list
/// the table on a loaded machine (at 5 s, flows of the first round expired before the listing under CI load).
#[test]
fn exhausted_ports_are_never_shared_and_come_back_after_the_quarantine() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(|text| {
        format!(
            "{text}\n[nat]\nmax_flows_per_source = 200000\nudp_timeout = \"20s\"\nport_quarantine = \"5s\"\n"
        )
    });
    let gw = Gateway::start(&lab, &config);
    let in_use = r#"egressd_nat_ports_in_use{egress_ip="192.0.2.10",proto="udp"}"#;
    // The flows live 20 s: keep refreshing them until every port is held.
    let mut rounds = 0;
    while gw.metric(in_use) < 64512.0 {
        flood(&lab, "10.10.0.2", 1024..65536);
        std::thread::sleep(Duration::from_millis(1200));
        rounds += 1;
        assert!(rounds < 6, "ports in use: {}\n{}", gw.metric(in_use), gw.log_text());
    }
    let whoami = |port: u16| {
        let out = lab.sh(
            "client",
            &format!(
                "printf x | socat -T1 - UDP4:203.0.113.10:9000,bind=10.10.0.3,sourceport={port},reuseaddr"
            ),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let refused = gw.metric(r#"egressd_drops_total{reason="out_of_ports"}"#);
    assert_eq!(whoami(5000), "", "no port left for a new flow");
    assert!(gw.metric(r#"egressd_drops_total{reason="out_of_ports"}"#) > refused);
    // No egress port held twice.
    let out = lab.exec(
        "gw",
        support::egressd_bin().to_str().unwrap(),
        &["flows", "--json", "--proto", "udp", "--limit", "200000"],
    );
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flows JSON");
    let flows = listing["flows"].as_array().unwrap();
    let ports: std::collections::HashSet<&str> =
        flows.iter().map(|f| f["egress"].as_str().unwrap()).collect();
    assert!(flows.len() >= 64512, "{} flows listed", flows.len());
    assert_eq!(ports.len(), flows.len(), "an egress port held by two flows");
    // Expiry (20 s) and quarantine (5 s): new flows get ports again.
    support::wait_for_within(
        Duration::from_secs(60),
        || whoami(5001).starts_with("192.0.2.10:"),
        "ports back",
    );
}
