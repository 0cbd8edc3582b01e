//! Lab tests of what must hold whatever queue a packet arrives on: hairpinning between two inside hosts (RFC 4787
//! REQ-9, RFC 5382 REQ-8) and one mapping per inside endpoint (RFC 4787 REQ-1, RFC 5382 REQ-1), each with one
//! worker and with two (one per veth queue, the sender's flow hash picking the queue, as RSS does on a NIC).
//! What the client sockets and the servers see is asserted, not what the pipeline decided.

mod support;

use std::collections::{HashMap, HashSet};

use support::{lab_config_as_is, wait_for, Gateway, Lab};

/// A lab with `workers` queues and egressd on `workers` workers (cores 1, or 0 and 1).
fn lab_with_workers(workers: u32) -> (Lab, tempfile::TempDir, std::path::PathBuf) {
    let lab = Lab::up_with(false, workers);
    let cores = if workers == 2 { "cores = [0, 1]" } else { "cores = [1]" };
    let (dir, config) = lab_config_as_is(|text| text.replace("cores = [1]", cores));
    (lab, dir, config)
}

/// Runs a Python script with `args` in the client namespace; returns its stdout lines (fails the test, with the
/// gateway's log, on a non-zero exit).
fn client_python(lab: &Lab, gw: &Gateway, script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["-c", script];
    argv.extend_from_slice(args);
    let out = lab.exec("client", "python3", &argv);
    assert!(
        out.status.success(),
        "client script {args:?} failed: {}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// UDP hairpin: A (10.10.0.2:a_port) learns its mapping from a server; B (10.10.0.3:b_port) sends to that mapping
/// and A answers to whatever address the datagram came from. Prints, one per line: A's mapping, what A received
/// and from where, B's own mapping as a server sees it, what B received and from where.
const UDP_HAIRPIN: &str = r#"
import socket, sys
a_port, b_port = int(sys.argv[1]), int(sys.argv[2])
def sock(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port)); s.settimeout(3)
    return s
def mapping(s):
    s.sendto(b"x", ("203.0.113.10", 9000))
    return s.recv(100).decode().strip()
a, b = sock("10.10.0.2", a_port), sock("10.10.0.3", b_port)
a_mapped = mapping(a)
host, port = a_mapped.split(":")
b.sendto(b"hello from B", (host, int(port)))
data, frm = a.recvfrom(100)
print(a_mapped); print(data.decode(), "%s:%d" % frm)
print(mapping(b))
a.sendto(b"hello from A", frm)
data, frm = b.recvfrom(100)
print(data.decode(), "%s:%d" % frm)
"#;

/// TCP hairpin: A listens on 10.10.0.2:a_port and, from the same port (SO_REUSEPORT), fetches /ip from a server,
/// which creates A's mapping and tells it; B (10.10.0.3:b_port) connects to that mapping, and the two exchange a
/// line each way. Prints A's mapping, whom A accepted, what A read, B's mapping (from a server), what B read.
const TCP_HAIRPIN: &str = r#"
import socket, sys
a_port, b_port = int(sys.argv[1]), int(sys.argv[2])
def bound(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((addr, port)); s.settimeout(5)
    return s
def mapping(addr, port):
    s = bound(addr, port)
    s.connect(("203.0.113.10", 80))
    s.sendall(b"GET /ip HTTP/1.0\r\nHost: x\r\n\r\n")
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    s.close()
    return reply.split(b"\r\n\r\n", 1)[1].decode().strip()
listener = bound("10.10.0.2", a_port); listener.listen(4)
a_mapped = mapping("10.10.0.2", a_port)
host, port = a_mapped.split(":")
b = bound("10.10.0.3", b_port)
b.connect((host, int(port)))
conn, peer = listener.accept(); conn.settimeout(5)
b.sendall(b"hello from B\n")
got_a = conn.recv(100).decode().strip()
conn.sendall(b"hello from A\n")
got_b = b.recv(100).decode().strip()
print(a_mapped); print("%s:%d" % peer); print(got_a)
b.close(); conn.close()
print(mapping("10.10.0.3", b_port)); print(got_b)
"#;

fn hairpin(workers: u32) {
    let (lab, _dir, config) = lab_with_workers(workers);
    let gw = Gateway::start_as_is(&lab, &config, None);
    // A uses port 40000 and B port 20000: with two workers A's port lies in worker 1's slice and B's in worker
    // 0's, so the hairpinned packets cross.

    let udp = client_python(&lab, &gw, UDP_HAIRPIN, &["40000", "20000"]);
    let a_mapped = &udp[0];
    assert_eq!(a_mapped, "192.0.2.10:40000", "A's mapping keeps its port");
    let b_mapped = &udp[2];
    assert!(b_mapped.starts_with("192.0.2.10:"), "{b_mapped}");
    assert_eq!(udp[1], format!("hello from B {b_mapped}"), "A gets B's datagram from B's egress endpoint");
    assert_eq!(udp[3], format!("hello from A {a_mapped}"), "B gets A's answer from A's egress endpoint");

    let tcp = client_python(&lab, &gw, TCP_HAIRPIN, &["40000", "20000"]);
    assert_eq!(tcp[0], "192.0.2.10:40000", "A's TCP mapping keeps its port");
    assert_eq!(tcp[2], "hello from B");
    assert_eq!(tcp[3], tcp[1], "A accepted B from B's egress endpoint (the one a server sees)");
    assert!(tcp[1].starts_with("192.0.2.10:"), "{}", tcp[1]);
    assert_eq!(tcp[4], "hello from A");
    if workers == 2 {
        assert!(gw.metric("egressd_handoffs_total") > 0.0, "hairpinned packets crossed workers");
    }
}

/// RFC 4787 REQ-9 / RFC 5382 REQ-8 through the whole gateway, one worker.
#[test]
fn rfc4787_req9_udp_and_tcp_hairpin_between_two_inside_hosts_one_worker() {
    hairpin(1);
}

/// The same with two workers: A's port belongs to worker 1, B's to worker 0.
#[test]
fn rfc4787_req9_udp_and_tcp_hairpin_between_two_inside_hosts_two_workers() {
    hairpin(2);
}

/// One UDP socket asks the 16 whoami servers 203.0.113.10-25 who it is; prints each answer.
const UDP_MANY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(3)
for i in range(10, 26):
    s.sendto(b"x", ("203.0.113.%d" % i, 9000))
    print(s.recv(100).decode().strip())
"#;

/// One TCP endpoint (the same local port each time, SO_REUSEADDR) fetches /ip from the 16 servers; prints each.
const TCP_MANY: &str = r#"
import socket, sys
for i in range(10, 26):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(5)
    s.connect(("203.0.113.%d" % i, 80))
    s.sendall(b"GET /ip HTTP/1.0\r\nHost: x\r\n\r\n")
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    s.close()
    print(reply.split(b"\r\n\r\n", 1)[1].decode().strip())
"#;

/// RFC 4787 REQ-1 / RFC 5382 REQ-1 with two workers: one endpoint talking to 16 servers arrives on both queues
/// (the per-worker counters show it) and still has one mapping; the original port is kept whether it lies in
/// worker 0's slice (20000) or worker 1's (50000), for UDP and TCP; a second host using the same source ports gets
/// one other port per endpoint, and no external port is held by two endpoints.
#[test]
fn rfc4787_req1_one_mapping_per_endpoint_across_two_workers() {
    let (lab, _dir, config) = lab_with_workers(2);
    let gw = Gateway::start_as_is(&lab, &config, None);
    let mut holders: HashMap<String, (String, u16, &str)> = HashMap::new();
    for (proto, script) in [("udp", UDP_MANY), ("tcp", TCP_MANY)] {
        for port in [20000u16, 50000] {
            for addr in ["10.10.0.2", "10.10.0.3"] {
                let seen = client_python(&lab, &gw, script, &[addr, &port.to_string()]);
                assert_eq!(seen.len(), 16, "{proto} {addr}:{port}: {seen:?}");
                let distinct: HashSet<&String> = seen.iter().collect();
                assert_eq!(
                    distinct.len(),
                    1,
                    "{proto} {addr}:{port} must have one mapping, servers saw {seen:?}"
                );
                let mapped = seen[0].clone();
                assert!(mapped.starts_with("192.0.2.10:"), "{mapped}");
                if addr == "10.10.0.2" {
                    assert_eq!(mapped, format!("192.0.2.10:{port}"), "{proto}: the original port is kept");
                } else {
                    assert_ne!(mapped, format!("192.0.2.10:{port}"), "{proto}: the port is 10.10.0.2's");
                }
                let key = format!("{proto} {mapped}");
                if let Some(other) = holders.insert(key.clone(), (addr.to_string(), port, proto)) {
                    panic!("{key} held by {other:?} and {addr}:{port}");
                }
            }
        }
    }
    for worker in ["0", "1"] {
        let series = format!(r#"egressd_worker_rx_packets_total{{worker="{worker}",side="inside"}}"#);
        wait_for(|| gw.metric(&series) > 0.0, &format!("worker {worker} received packets from inside"));
    }
    assert!(
        gw.metric("egressd_handoffs_total") > 0.0,
        "packets that arrived at the non-owner were handed over"
    );
    assert_eq!(gw.metric(r#"egressd_drops_total{reason="handoff_queue_full"}"#), 0.0);
}
