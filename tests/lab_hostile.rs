//! Lab tests with crafted frames: hostile traffic sent with raw sockets from the client (and ext) namespaces
//! through the whole gateway, asserting what comes out on the other side (captured on ext's interface) and which
//! drop counter moves. A strict policy: the web group (10.10.0.0/24) may reach only 203.0.113.10, UDP 7 and
//! 7000–7010, TCP 80 and 7100; everything else (198.51.100.10 included) is denied. `scripts/test` runs them with
//! one worker and with two.

mod support;

use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice};
use support::{lab_config, wait_for, Gateway, Lab};

const CLIENT: [u8; 4] = [10, 10, 0, 2];
const SERVER: [u8; 4] = [203, 0, 113, 10];
const DENIED_SERVER: [u8; 4] = [198, 51, 100, 10];
const EGRESS: [u8; 4] = [192, 0, 2, 10];

/// `conf/lab.toml`'s dataplane and admin sections with the strict policy above.
fn strict_config() -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, path, original) = lab_config(str::to_string);
    let head = &original[..original.find("[[group]]").expect("lab.toml has groups")];
    let policy = r#"
[[group]]
name = "web"
sources = ["10.10.0.0/24"]
egress_ips = ["192.0.2.10"]

[[group]]
name = "payments"
sources = ["10.10.1.0/24"]
egress_ips = ["192.0.2.11"]

[[rule]]
group = "web"
to = ["203.0.113.10/32"]
proto = "udp"
ports = [7, "7000-7010"]
action = "allow"

[[rule]]
group = "web"
to = ["203.0.113.10/32"]
proto = "tcp"
ports = [80, 7100]
action = "allow"
"#;
    std::fs::write(&path, format!("{head}{policy}")).expect("write the strict config");
    (dir, path)
}

/// The client's frames go from cl0 to gw-in.
struct Wire {
    client_mac: [u8; 6],
    gw_in_mac: [u8; 6],
}

impl Wire {
    fn new(lab: &Lab) -> Wire {
        Wire { client_mac: lab.mac("client", "cl0"), gw_in_mac: lab.mac("gw", "gw-in") }
    }

    fn eth(&self) -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
        PacketBuilder::ethernet2(self.client_mac, self.gw_in_mac)
    }
}

/// An IPv4/UDP packet (no Ethernet header) from `src:sport` to `dst:dport`.
fn udp_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut out, payload).unwrap();
    out
}

/// An ICMP error frame from the client's wire: `src` → `dst`, type/code, quoting `quoted` whole.
fn icmp_error_frame(wire: &Wire, src: [u8; 4], dst: [u8; 4], ty: Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire.eth().ipv4(src, dst, 64).icmpv4(ty).write(&mut out, quoted).unwrap();
    out
}

/// The payloads of the UDP datagrams to port 7 among captured `frames`, in order.
fn udp_payloads_to_echo(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter_map(|f| match SlicedPacket::from_ethernet(f).ok()?.transport {
            Some(TransportSlice::Udp(u)) if u.destination_port() == 7 => Some(u.payload().to_vec()),
            _ => None,
        })
        .collect()
}

fn counter(gw: &Gateway, reason: &str) -> f64 {
    gw.metric(&format!(r#"egressd_drops_total{{reason="{reason}"}}"#))
}

/// Opens a UDP flow 10.10.0.2:46000 → 203.0.113.10:7 (the echo answers, so the flow is live both ways).
fn open_live_flow(lab: &Lab, gw: &Gateway) {
    let out = lab.sh(
        "client",
        "printf live | socat -T2 - UDP4:203.0.113.10:7,bind=10.10.0.2,sourceport=46000,reuseaddr",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "live",
        "the allowed flow must work:\n{}",
        gw.log_text()
    );
}

/// Issue: ICMP errors from inside skipped the policy, a covert channel out of a default-deny network. Any inside
/// address could send an error to a denied destination quoting a live flow plus 1 KB of payload, and it left. Now
/// an inside error leaves only from the quoted flow's inside endpoint to its peer, cut to the quoted header + 8
/// bytes; every other one is dropped as `icmp_error_mismatch`.
#[test]
fn inside_icmp_errors_cannot_carry_data_out_past_the_policy() {
    let lab = Lab::up(false);
    let (_dir, config) = strict_config();
    let gw = Gateway::start(&lab, &config);
    let wire = Wire::new(&lab);
    open_live_flow(&lab, &gw);
    // What the client received from the server: 203.0.113.10:7 → 10.10.0.2:46000, and then 1 KB of "payload".
    let mut quoted = udp_packet(SERVER, 7, CLIENT, 46000, b"live");
    quoted.extend(std::iter::repeat_n(0x5a, 1024));
    let types = [
        Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
        Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        Icmpv4Type::ParameterProblem(etherparse::icmpv4::ParameterProblemHeader::PointerIndicatesError(0)),
    ];
    let hostile: Vec<Vec<u8>> = [
        (CLIENT, DENIED_SERVER),         // the allowed host, to a denied destination
        ([10, 10, 0, 3], SERVER),        // another host of the group, to the flow's peer
        ([10, 99, 9, 9], DENIED_SERVER), // a spoofed address in no group
    ]
    .iter()
    .flat_map(|&(src, dst)| types.iter().map(move |ty| (src, dst, ty.clone())))
    .map(|(src, dst, ty)| icmp_error_frame(&wire, src, dst, ty, &quoted))
    .collect();
    let before = counter(&gw, "icmp_error_mismatch");
    let capture = lab.capture("ext", "ext0", 2.0);
    lab.inject("client", "cl0", &hostile);
    // The legitimate one: from the flow's endpoint to its peer.
    lab.inject("client", "cl0", &[icmp_error_frame(&wire, CLIENT, SERVER, types[0].clone(), &quoted)]);
    let mut arrived = Vec::new();
    for frame in capture.frames() {
        let Ok(p) = SlicedPacket::from_ethernet(&frame) else { continue };
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { continue };
        if ip.header().protocol() == etherparse::IpNumber::ICMP {
            arrived.push((
                ip.header().source(),
                ip.header().destination(),
                ip.header().total_len(),
                frame.clone(),
            ));
        }
    }
    assert_eq!(
        arrived.len(),
        1,
        "only the legitimate error may leave, saw {:?}",
        arrived.iter().map(|a| (a.0, a.1)).collect::<Vec<_>>()
    );
    let (src, dst, total_len, frame) = &arrived[0];
    assert_eq!((*src, *dst), (EGRESS, SERVER), "translated to the egress IP, towards the flow's peer");
    assert_eq!(*total_len, 20 + 8 + 20 + 8, "cut to the quoted header and 8 bytes");
    assert_eq!(frame.len(), 14 + 56, "nothing of the payload leaves: the frame ends with the quote");
    wait_for(
        || counter(&gw, "icmp_error_mismatch") >= before + 9.0,
        "the 9 misdirected or spoofed errors counted as icmp_error_mismatch",
    );
}

/// Issue: an 802.1Q tag from inside was copied to the outside (VLAN hopping on a trunk). Tagged frames are now
/// dropped as `vlan_tagged`: nothing tagged, and nothing of the tagged frames, reaches ext.
#[test]
fn vlan_tagged_frames_from_inside_never_reach_the_outside() {
    let lab = Lab::up(false);
    let (_dir, config) = strict_config();
    let gw = Gateway::start(&lab, &config);
    let wire = Wire::new(&lab);
    let frame = |tag: Option<u16>, payload: &[u8]| {
        let mut out = Vec::new();
        let eth = wire.eth();
        match tag {
            Some(vid) => eth
                .single_vlan(vid.try_into().unwrap())
                .ipv4(CLIENT, SERVER, 64)
                .udp(47000, 7)
                .write(&mut out, payload)
                .unwrap(),
            None => eth.ipv4(CLIENT, SERVER, 64).udp(47000, 7).write(&mut out, payload).unwrap(),
        }
        out
    };
    let before = counter(&gw, "vlan_tagged");
    let capture = lab.capture("ext", "ext0", 1.5);
    lab.inject(
        "client",
        "cl0",
        &[frame(Some(7), b"tagged 7"), frame(Some(4094), b"tagged 4094"), frame(None, b"untagged")],
    );
    let frames = capture.frames();
    for f in &frames {
        assert_ne!(&f[12..14], &[0x81, 0x00], "a tagged frame reached ext: {f:02x?}");
    }
    assert_eq!(udp_payloads_to_echo(&frames), [b"untagged"], "only the untagged datagram crosses");
    wait_for(|| counter(&gw, "vlan_tagged") >= before + 2.0, "the tagged frames counted as vlan_tagged");
}

/// The client side of the TCP blind-attack test: connects 10.10.0.2:43100 → 203.0.113.10:7100, exchanges a line,
/// says "ready", and on each line from stdin: "go" exchanges another line ("alive" or the error), "check" waits
/// for the connection to be reset ("reset" or "open").
const TCP_VICTIM: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.10.0.2", 43100)); s.settimeout(3)
s.connect(("203.0.113.10", 7100))
s.sendall(b"1\n"); s.recv(10)
print("ready", flush=True)
for cmd in sys.stdin:
    try:
        if cmd.strip() == "go":
            s.sendall(b"2\n"); print("alive" if s.recv(10) == b"2\n" else "mangled", flush=True)
        else:
            s.settimeout(2); data = s.recv(10); print("open" if data else "closed", flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
    except Exception as e:
        print(type(e).__name__, flush=True)
"#;

/// Issue: a blind attacker could kill a TCP flow. From outside, spoofing the server, it injected an ACK half the
/// sequence space away (which moved the tracked state) and RSTs up to a window behind or ahead (which were
/// accepted: the flow went transitory and died 4 minutes later). Now those are dropped (`tcp_out_of_window`,
/// `tcp_rst_out_of_window`), the flow stays established and keeps working, and an RST at exactly the sequence the
/// client expects still resets it.
#[test]
fn a_blind_attacker_cannot_kill_a_tcp_flow() {
    use std::io::{BufRead, Write};
    let lab = Lab::up(false);
    let (_dir, config) = strict_config();
    let gw = Gateway::start(&lab, &config);
    let server = lab.sh(
        "ext",
        "setsid python3 -c '
import socket
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((\"203.0.113.10\", 7100)); l.listen(1)
c, _ = l.accept()
while True:
    d = c.recv(100)
    if not d: break
    c.sendall(d)
' >/dev/null 2>&1 &",
    );
    assert!(server.status.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let capture = lab.capture("ext", "ext0", 2.0);
    let mut victim = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("client"), "python3", "-c", TCP_VICTIM])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the client");
    let mut said = std::io::BufReader::new(victim.stdout.take().unwrap()).lines();
    let mut tell = victim.stdin.take().unwrap();
    let mut next = || said.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next(), "ready", "the connection must open through egressd:\n{}", gw.log_text());
    // The client's last ACK, as the server saw it: the sequence number the client expects next.
    let expected = capture
        .frames()
        .iter()
        .rev()
        .find_map(|f| {
            let p = SlicedPacket::from_ethernet(f).ok()?;
            match &p.transport {
                Some(TransportSlice::Tcp(t)) if t.source_port() == 43100 && t.ack() => {
                    Some(t.acknowledgment_number())
                }
                _ => None,
            }
        })
        .expect("the client's segments were captured");
    let ext_mac = lab.mac("ext", "ext0");
    let gw_out_mac = lab.mac("gw", "gw-out");
    let spoofed = |seq: u32, rst: bool| {
        let b =
            PacketBuilder::ethernet2(ext_mac, gw_out_mac).ipv4(SERVER, EGRESS, 64).tcp(7100, 43100, seq, 500);
        let b = if rst { b.rst() } else { b.ack(1) };
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    };
    let far = expected.wrapping_add(0x7fff_ffff);
    let (window_before, rst_before) =
        (counter(&gw, "tcp_out_of_window"), counter(&gw, "tcp_rst_out_of_window"));
    lab.inject(
        "ext",
        "ext0",
        &[
            spoofed(far, false),
            spoofed(far, true),
            spoofed(expected.wrapping_sub(1000), true),
            spoofed(expected.wrapping_add(1000), true),
        ],
    );
    wait_for(
        || {
            counter(&gw, "tcp_out_of_window") > window_before
                && counter(&gw, "tcp_rst_out_of_window") >= rst_before + 3.0
        },
        "the blind segments dropped under their reasons",
    );
    writeln!(tell, "go").unwrap();
    assert_eq!(next(), "alive", "the flow survives the blind attack");
    // The gauges are republished every second: the flow is still established, not transitory.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(gw.metric(r#"egressd_nat_flows{state="tcp_established"}"#), 1.0);
    assert_eq!(gw.metric(r#"egressd_nat_flows{state="tcp_transitory"}"#), 0.0);
    // The echo of "2\n" moved the expected sequence by 2: an RST exactly there is honoured.
    lab.inject("ext", "ext0", &[spoofed(expected.wrapping_add(2), true)]);
    writeln!(tell, "check").unwrap();
    assert_eq!(next(), "reset", "an exact RST still resets the connection");
    drop(tell);
    let _ = victim.wait();
}

/// A UDP frame from the client's wire whose IPv4 header carries `options` (a multiple of 4 bytes).
fn udp_frame_with_ip_options(
    wire: &Wire,
    dst: [u8; 4],
    dport: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut header = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, CLIENT, dst).unwrap();
    header.options = options.try_into().unwrap();
    let mut out = Vec::new();
    wire.eth()
        .ip(etherparse::IpHeaders::Ipv4(header, Default::default()))
        .udp(47001, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// RFC 7126: packets with a loose or strict source route option are never forwarded (`source_route`); the same
/// datagram without the option crosses.
#[test]
fn source_routed_packets_are_not_forwarded() {
    let lab = Lab::up(false);
    let (_dir, config) = strict_config();
    let gw = Gateway::start(&lab, &config);
    let wire = Wire::new(&lab);
    let lsrr = [1, 0x83, 7, 4, 192, 0, 2, 99];
    let ssrr = [0x89, 7, 4, 192, 0, 2, 99, 0];
    let capture = lab.capture("ext", "ext0", 1.5);
    lab.inject(
        "client",
        "cl0",
        &[
            udp_frame_with_ip_options(&wire, SERVER, 7, &lsrr, b"loose"),
            udp_frame_with_ip_options(&wire, SERVER, 7, &ssrr, b"strict"),
            udp_frame_with_ip_options(&wire, SERVER, 7, &[1, 1, 1, 0], b"plain"),
        ],
    );
    let payloads = udp_payloads_to_echo(&capture.frames());
    assert_eq!(payloads, [b"plain"], "only the datagram without a source route crosses");
    wait_for(|| counter(&gw, "source_route") >= 2.0, "both source-routed packets counted as source_route");
}

/// New flows to on-link destinations that never answer ARP: the first ones wait for their neighbour (at most 16
/// per worker, as the kernel's ARP queue), the rest are dropped as `no_neighbour` before the NAT, so a flood of
/// them takes no NAT sessions or ports beyond those, and none counts as an allowed flow until it leaves.
#[test]
fn flows_to_unresolvable_next_hops_take_no_nat_state_beyond_the_hold_queue() {
    let lab = Lab::up(false);
    let (dir, _) = strict_config();
    let path = dir.path().join("lab.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[[rule]]\ngroup = \"web\"\nto = [\"192.0.2.64/26\"]\nproto = \"udp\"\naction = \"allow\"\n"),
    )
    .unwrap();
    let gw = Gateway::start(&lab, &path);
    let wire = Wire::new(&lab);
    let frames: Vec<Vec<u8>> = (0..40u8)
        .map(|i| {
            let mut out = Vec::new();
            wire.eth()
                .ipv4(CLIENT, [192, 0, 2, 64 + i], 64)
                .udp(48000, 9)
                .write(&mut out, b"anyone?")
                .unwrap();
            out
        })
        .collect();
    lab.inject("client", "cl0", &frames);
    let workers = support::lab_workers() as f64;
    wait_for(
        || counter(&gw, "no_neighbour") >= 40.0 - 16.0 * workers,
        "the frames beyond the hold queue dropped",
    );
    // The gauges are republished every second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let udp_flows = gw.metric(r#"egressd_nat_flows{state="udp"}"#);
    assert!(udp_flows <= 16.0 * workers, "{udp_flows} UDP sessions for 40 flows that cannot leave");
    assert!(gw.metric("egressd_flows_allowed_total") <= 16.0 * workers);
    // The held ones time out unresolved after a second: every one of the 40 is counted as dropped.
    wait_for(|| counter(&gw, "no_neighbour") >= 40.0, "all 40 counted as no_neighbour");
    assert_eq!(gw.metric("egressd_flows_allowed_total"), 0.0, "none of them left");
}

/// Fragments (RFC 4787 REQ-14) under attack: a later fragment whose first never comes is held a second and
/// dropped as `fragment_unmatched`, and a first fragment too short for its UDP header is dropped as `truncated`;
/// neither reaches ext. (Whole fragmented datagrams crossing both ways: `lab_nat.rs`.)
#[test]
fn orphan_and_tiny_fragments_never_cross() {
    let lab = Lab::up(false);
    let (_dir, config) = strict_config();
    let gw = Gateway::start(&lab, &config);
    let wire = Wire::new(&lab);
    // Raw IPv4 headers: a later fragment (offset 64 bytes) and a first fragment carrying 4 bytes of UDP header.
    let fragment = |id: u16, flags_offset: u16, payload: &[u8]| {
        let mut header =
            etherparse::Ipv4Header::new(payload.len() as u16, 64, etherparse::IpNumber::UDP, CLIENT, SERVER)
                .unwrap();
        header.identification = id;
        header.more_fragments = flags_offset & 0x2000 != 0;
        header.fragment_offset = (flags_offset & 0x1fff).try_into().unwrap();
        header.header_checksum = header.calc_header_checksum();
        let mut out = Vec::new();
        etherparse::Ethernet2Header {
            source: wire.client_mac,
            destination: wire.gw_in_mac,
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut out)
        .unwrap();
        header.write(&mut out).unwrap();
        out.extend_from_slice(payload);
        out
    };
    let capture = lab.capture("ext", "ext0", 2.0);
    lab.inject(
        "client",
        "cl0",
        &[fragment(0x1111, 8, &[0x5a; 64]), fragment(0x2222, 0x2000, &[0x1b, 0x58, 0, 7])],
    );
    let udp_to_server =
        capture.frames().iter().filter(|f| f.len() > 34 && f[23] == 17 && f[30..34] == SERVER).count();
    assert_eq!(udp_to_server, 0, "an orphan or tiny fragment reached ext");
    wait_for(|| counter(&gw, "fragment_unmatched") >= 1.0, "the orphan fragment dropped after waiting");
    assert!(counter(&gw, "truncated") >= 1.0, "the tiny first fragment dropped as truncated");
}

/// Issue: with the inside at MTU 2500 and the outside at 1500, packets of 1600–1790 bytes with DF set were
/// counted as sent and vanished (a path-MTU black hole). Now egressd drops them as `mtu_exceeded` and answers
/// ICMP 3/4 with the outside MTU: the client's kernel learns the path MTU (1500) at once. With `clamp_mss`, a TCP
/// SYN leaves with its MSS lowered to 1460.
#[test]
fn packets_too_big_for_the_outside_get_fragmentation_needed_and_syns_are_clamped() {
    let lab = Lab::up(false);
    for (role, iface) in [("client", "cl0"), ("gw", "gw-in")] {
        assert!(lab.exec(role, "ip", &["link", "set", iface, "mtu", "2500"]).status.success());
    }
    let (dir, _) = strict_config();
    let path = dir.path().join("lab.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("batch_size = 64", "batch_size = 64\nframe_size = 4096\nclamp_mss = true");
    std::fs::write(&path, text).unwrap();
    let gw = Gateway::start(&lab, &path);
    let script = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF set, no local fragmentation
s.connect(("203.0.113.10", 7))
s.settimeout(1)
for size in (1700, 1790):
    try:
        s.send(b"x" * size)
        s.recv(4000)
        print("echoed", size)
    except OSError as e:
        print("lost", size, type(e).__name__)
print("path mtu", s.getsockopt(socket.IPPROTO_IP, 14))  # IP_MTU
"#;
    let out = lab.exec("client", "python3", &["-c", script]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("path mtu 1500"),
        "the client learned the outside MTU:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(counter(&gw, "mtu_exceeded") >= 1.0);
    assert!(gw.metric("egressd_icmp_errors_sent_total") >= 1.0);

    // MSS clamping: the client (MTU 2500) offers MSS 2460; the SYN reaches the server with 1460.
    let capture = lab.capture("ext", "ext0", 1.5);
    let _ = lab.exec("client", "curl", &["-s", "-m", "1", "http://203.0.113.10/"]);
    let mss: Vec<u16> = capture
        .frames()
        .iter()
        .filter_map(|f| match SlicedPacket::from_ethernet(f).ok()?.transport {
            Some(TransportSlice::Tcp(t)) if t.syn() && !t.ack() => {
                t.options_iterator().find_map(|o| match o {
                    Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                    _ => None,
                })
            }
            _ => None,
        })
        .collect();
    assert_eq!(mss, [1460], "the SYN's MSS as the server saw it");
}

/// Opens UDP flows 10.10.0.2:first..first+count → 203.0.113.10:7 and prints how many got their echo.
/// Issue: sessions that an outsider creates through address-dependent filtering (the server's other ports
/// reaching a mapping) counted against the inside host's `max_flows_per_source`: spoofing the server from many
/// ports locked the host out of its own new flows. Now they have their own bound (`unsolicited_flow_limit`) and
/// the host's quota is its own.
#[test]
fn outsiders_cannot_use_up_an_inside_hosts_flow_quota() {
    let lab = Lab::up(false);
    let (dir, _) = strict_config();
    let path = dir.path().join("lab.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n[nat]\nmax_flows_per_source = 400\n")).unwrap();
    let gw = Gateway::start(&lab, &path);
    let run = |first: u16, count: u16| lab.udp_flows("10.10.0.2", first, count);
    assert_eq!(run(30000, 130), 130, "the host's 130 flows; {}\n{}", gw.packet_counters(), gw.log_text());
    // From ext, spoofing the server: 40 source ports at each of the 130 mapped ports.
    let ext_mac = lab.mac("ext", "ext0");
    let gw_out_mac = lab.mac("gw", "gw-out");
    let spray: Vec<Vec<u8>> = (30000..30130u16)
        .flat_map(|mapped| (0..40u16).map(move |k| (mapped, 2000 + k)))
        .map(|(mapped, sport)| {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(ext_mac, gw_out_mac)
                .ipv4(SERVER, EGRESS, 64)
                .udp(sport, mapped)
                .write(&mut out, b"spray")
                .unwrap();
            out
        })
        .collect();
    for chunk in spray.chunks(1000) {
        lab.inject("ext", "ext0", chunk);
    }
    wait_for(
        || counter(&gw, "unsolicited_flow_limit") >= 130.0 * 8.0,
        "the spray beyond 32 sessions per mapping refused as unsolicited_flow_limit",
    );
    // The host's own quota is untouched: 50 more flows work (200 per worker of the 400 with two workers).
    assert_eq!(run(31000, 50), 50, "the host's own new flows after the spray; {}", gw.packet_counters());
    assert_eq!(counter(&gw, "source_flow_limit"), 0.0);
}

/// Issue: the per-source limit was keyed on an unverified address, and one host spoofing other addresses took a
/// whole egress IP's ports. Sources the inside interface has no route back to are now dropped before the NAT
/// (`source_not_inside`, rp_filter style, on by default): nothing of them reaches ext and they take no ports.
#[test]
fn spoofed_inside_sources_never_reach_the_outside() {
    let lab = Lab::up(false);
    let (_dir, config) = strict_config();
    let gw = Gateway::start(&lab, &config);
    let wire = Wire::new(&lab);
    let frames: Vec<Vec<u8>> = [[10, 99, 9, 9], [172, 16, 0, 1], [192, 0, 2, 10], [10, 10, 0, 2]]
        .iter()
        .map(|&src| {
            let mut out = Vec::new();
            wire.eth().ipv4(src, SERVER, 64).udp(47002, 7).write(&mut out, &src).unwrap();
            out
        })
        .collect();
    let capture = lab.capture("ext", "ext0", 1.5);
    lab.inject("client", "cl0", &frames);
    let sources = udp_payloads_to_echo(&capture.frames());
    assert_eq!(sources, [[10, 10, 0, 2]], "only the datagram from a real inside source crosses");
    wait_for(|| counter(&gw, "source_not_inside") >= 3.0, "the spoofed sources counted as source_not_inside");
    assert!(gw.metric(r#"egressd_nat_flows{state="udp"}"#) <= 1.0);
}

/// Two groups share the egress IP 192.0.2.10; "web" may hold at most 20 of its ports. Web opening 30 flows gets
/// 20 (the rest are `group_port_limit`), and "payments" still gets ports on the shared IP: one group cannot starve
/// another.
#[test]
fn a_group_cap_keeps_one_group_from_taking_a_shared_egress_ip() {
    let lab = Lab::up(false);
    let (dir, _) = strict_config();
    let path = dir.path().join("lab.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "egress_ips = [\"192.0.2.10\"]\n",
            "egress_ips = [\"192.0.2.10\"]\nmax_ports_per_egress_ip = 20\n",
        )
        .replace(
            "egress_ips = [\"192.0.2.11\"]\n",
            "egress_ips = [\"192.0.2.10\"]\nmax_ports_per_egress_ip = 1000\n",
        )
        .replace("egress_ips = [\"192.0.2.10\", \"192.0.2.11\"]", "egress_ips = [\"192.0.2.10\"]");
    let text = format!(
        "{text}\n[[rule]]\ngroup = \"payments\"\nto = [\"203.0.113.10/32\"]\nproto = \"udp\"\nports = [7]\naction = \"allow\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let gw = Gateway::start(&lab, &path);
    let flows = |src: &str, first: u16, count: u16| lab.udp_flows(src, first, count);
    // Ports in both workers' slices (with two workers each holds half of the cap).
    let web = flows("10.10.0.2", 20000, 15) + flows("10.10.0.2", 40000, 15);
    assert_eq!(web, 20, "web gets its 20 ports:\n{}", gw.log_text());
    assert_eq!(counter(&gw, "group_port_limit"), 10.0);
    assert_eq!(flows("10.10.1.2", 20000, 10), 10, "payments still gets ports on the shared egress IP");
}
