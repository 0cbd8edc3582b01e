//! The `wire` contract: no input panics, and what the views read agrees with etherparse, an independent parser,
//! on frames it builds and on those frames mutated.

use proptest::prelude::*;

use super::*;
use crate::drop::DropReason;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// The transport a generated frame carries.
#[derive(Clone, Debug)]
enum Layer4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: Option<u32>,
        syn: bool,
        window: u16,
        wscale: Option<u8>,
        mss: Option<u16>,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        request: bool,
        id: u16,
        seq: u16,
    },
}

fn layer4() -> impl Strategy<Value = Layer4> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            any::<u16>(),
            proptest::option::of(0u8..=255),
            proptest::option::of(any::<u16>())
        )
            .prop_map(|(sport, dport, seq, ack, syn, window, wscale, mss)| Layer4::Tcp {
                sport,
                dport,
                seq,
                ack,
                syn,
                window,
                wscale,
                mss
            }),
        (any::<u16>(), any::<u16>()).prop_map(|(sport, dport)| Layer4::Udp { sport, dport }),
        (any::<bool>(), any::<u16>(), any::<u16>()).prop_map(|(request, id, seq)| Layer4::Echo {
            request,
            id,
            seq
        }),
    ]
}

/// An Ethernet + IPv4 frame built by etherparse.
fn build(src: [u8; 4], dst: [u8; 4], ttl: u8, l4: &Layer4, payload: &[u8]) -> Vec<u8> {
    let ip = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC).ipv4(src, dst, ttl);
    let mut frame = Vec::new();
    match *l4 {
        Layer4::Tcp { sport, dport, seq, ack, syn, window, wscale, mss } => {
            let mut b = ip.tcp(sport, dport, seq, window);
            if let Some(ack) = ack {
                b = b.ack(ack);
            }
            if syn {
                b = b.syn();
            }
            let mut options = Vec::new();
            if let Some(mss) = mss {
                options.push(etherparse::TcpOptionElement::MaximumSegmentSize(mss));
            }
            if let Some(shift) = wscale {
                options.push(etherparse::TcpOptionElement::Noop);
                options.push(etherparse::TcpOptionElement::WindowScale(shift));
            }
            b.options(&options).expect("options fit").write(&mut frame, payload).expect("tcp frame")
        }
        Layer4::Udp { sport, dport } => ip.udp(sport, dport).write(&mut frame, payload).expect("udp frame"),
        Layer4::Echo { request: true, id, seq } => {
            ip.icmpv4_echo_request(id, seq).write(&mut frame, payload).expect("echo frame")
        }
        Layer4::Echo { request: false, id, seq } => {
            ip.icmpv4_echo_reply(id, seq).write(&mut frame, payload).expect("echo frame")
        }
    }
    frame
}

/// Checks every field `wire` reads of an accepted frame against etherparse's reading of the same bytes.
fn agrees_with_etherparse(frame: &[u8]) -> Result<(), TestCaseError> {
    let Ok(l3) = ipv4::parse_frame(frame) else { return Ok(()) };
    let headers = etherparse::PacketHeaders::from_ethernet_slice(frame);
    let headers = match headers {
        Ok(h) => h,
        // etherparse refuses what `wire` accepted: only what follows the IPv4 header may differ — a transport
        // header etherparse judges broken, or an IPsec AH (protocol 51), which etherparse reads as an IPv4
        // extension and `wire` as a payload it does not translate (`transport::parse` refuses it).
        Err(etherparse::err::packet::SliceError::Len(_))
        | Err(etherparse::err::packet::SliceError::Tcp(_)) => return Ok(()),
        Err(etherparse::err::packet::SliceError::Ipv4Exts(_)) => {
            prop_assert!(transport::parse(&frame[l3.ip_start..l3.ip_end]).is_err());
            return Ok(());
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!("wire accepted a frame etherparse refuses: {e:?}")))
        }
    };
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return Err(TestCaseError::fail("wire accepted a frame etherparse does not read as IPv4"));
    };
    prop_assert_eq!(l3.ip_start, ethernet::HEADER_LEN);
    prop_assert_eq!(l3.header_len, ip.header_len());
    prop_assert_eq!(l3.ip_end - l3.ip_start, usize::from(ip.total_len));
    prop_assert_eq!(l3.is_later_fragment(), ip.fragment_offset.value() != 0);
    if l3.fragment != 0 {
        // etherparse does not read the transport of a fragment; the pipeline reads it only in a first fragment.
        return Ok(());
    }
    let packet = &frame[l3.ip_start..l3.ip_end];
    let Ok(t) = transport::parse(packet) else { return Ok(()) };
    prop_assert_eq!(t.src, u32::from_be_bytes(ip.source));
    prop_assert_eq!(t.dst, u32::from_be_bytes(ip.destination));
    prop_assert_eq!(t.proto, ip.protocol.0);
    prop_assert_eq!(t.ihl, ip.header_len());
    match &headers.transport {
        Some(etherparse::TransportHeader::Tcp(tcp)) => {
            prop_assert_eq!((t.sport, t.dport), (tcp.source_port, tcp.destination_port));
            prop_assert_eq!(
                (t.seg.seq, t.seg.ack, t.seg.window),
                (tcp.sequence_number, tcp.acknowledgment_number, tcp.window_size)
            );
            prop_assert_eq!(t.seg.flags & tcp::SYN != 0, tcp.syn);
            prop_assert_eq!(t.seg.flags & tcp::ACK != 0, tcp.ack);
            prop_assert_eq!(t.seg.payload as usize, packet.len() - t.ihl - tcp.header_len());
            let wscale = tcp.options_iterator().find_map(|o| match o {
                Ok(etherparse::TcpOptionElement::WindowScale(s)) => Some(s.min(14)),
                _ => None,
            });
            // Only a SYN's window scale counts (RFC 7323), and a malformed option list ends the walk in both.
            if tcp.syn && tcp.options_iterator().all(|o| o.is_ok()) {
                prop_assert_eq!(t.seg.wscale, wscale.unwrap_or(tcp::NO_WINDOW_SCALE));
            }
        }
        Some(etherparse::TransportHeader::Udp(udp)) => {
            prop_assert_eq!((t.sport, t.dport), (udp.source_port, udp.destination_port));
        }
        Some(etherparse::TransportHeader::Icmpv4(icmp)) => {
            prop_assert_eq!(t.icmp_type, icmp.to_bytes()[0]);
            // etherparse calls an echo with a code other than 0 "unknown"; `wire` goes by the type, as Linux does.
            let raw = icmp.to_bytes();
            let id = if icmp::is_echo(raw[0]) { u16::from_be_bytes([raw[4], raw[5]]) } else { 0 };
            prop_assert_eq!(t.sport, id);
            if let etherparse::Icmpv4Type::EchoRequest(e) | etherparse::Icmpv4Type::EchoReply(e) =
                icmp.icmp_type
            {
                prop_assert_eq!(t.sport, e.id);
            }
        }
        other => {
            return Err(TestCaseError::fail(format!("wire read a transport etherparse reads as {other:?}")))
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Every parser and writer, on arbitrary bytes and offsets: no panic.
    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..160), at in 0usize..200, value: u32) {
        let _ = ethernet::network_layer(&bytes);
        let _ = ethernet::is_group_address(&bytes);
        let _ = ipv4::parse_frame(&bytes);
        let _ = ipv4::check_options(&bytes);
        let _ = transport::parse(&bytes);
        let _ = tcp::data_offset(&bytes);
        let _ = tcp::window_scale(&bytes);
        let _ = tcp::Segment::read(&bytes, at);
        let _ = (get_u16(&bytes, at), read_u16(&bytes, at), read_u32(&bytes, at), get_u16(&bytes, usize::MAX));
        tcp::clamp_syn_mss(&mut bytes, value as u16);
        write_u16(&mut bytes, at, value as u16);
        write_u32(&mut bytes, at, value);
        write_u32(&mut bytes, usize::MAX - 1, value);
    }

    /// Frames etherparse builds read back field for field.
    #[test]
    fn built_frames_read_back(src: [u8; 4], dst: [u8; 4], ttl in 2u8.., l4 in layer4(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        let frame = build(src, dst, ttl, &l4, &payload);
        let l3 = ipv4::parse_frame(&frame).expect("a frame etherparse built is valid");
        prop_assert_eq!(l3.fragment, 0);
        let t = transport::parse(&frame[l3.ip_start..l3.ip_end]).expect("its transport header is whole");
        match l4 {
            Layer4::Tcp { sport, dport, syn, wscale, .. } => {
                prop_assert_eq!((t.proto, t.sport, t.dport), (ip_proto::TCP, sport, dport));
                let expected = match wscale { Some(s) if syn => s.min(14), _ => tcp::NO_WINDOW_SCALE };
                prop_assert_eq!(t.seg.wscale, expected);
                prop_assert_eq!(t.seg.payload as usize, payload.len());
            }
            Layer4::Udp { sport, dport } => prop_assert_eq!((t.proto, t.sport, t.dport), (ip_proto::UDP, sport, dport)),
            Layer4::Echo { request, id, .. } => {
                prop_assert_eq!((t.proto, t.sport), (ip_proto::ICMP, id));
                prop_assert_eq!(t.icmp_type, if request { icmp::ECHO_REQUEST } else { icmp::ECHO_REPLY });
            }
        }
        agrees_with_etherparse(&frame)?;
    }

    /// The same frames with one to four bytes changed (and the IPv4 checksum sometimes repaired, so the mutation
    /// reaches the transport): whatever `wire` accepts, etherparse reads the same way.
    #[test]
    fn mutated_frames_agree_with_etherparse(
        l4 in layer4(),
        payload in proptest::collection::vec(any::<u8>(), 0..32),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        repair: bool,
    ) {
        let mut frame = build([10, 0, 0, 2], [198, 51, 100, 7], 64, &l4, &payload);
        for (at, byte) in edits {
            let at = at.index(frame.len());
            frame[at] = byte;
        }
        if repair {
            let ip = &mut frame[ethernet::HEADER_LEN..];
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            if (ipv4::MIN_HEADER_LEN..=ip.len()).contains(&header_len) {
                ip[ipv4::CHECKSUM..ipv4::CHECKSUM + 2].copy_from_slice(&[0, 0]);
                let sum = checksum::compute(&ip[..header_len]);
                ip[ipv4::CHECKSUM..ipv4::CHECKSUM + 2].copy_from_slice(&sum.to_be_bytes());
            }
        }
        agrees_with_etherparse(&frame)?;
    }
}

fn udp_frame() -> Vec<u8> {
    build([10, 0, 0, 2], [198, 51, 100, 7], 64, &Layer4::Udp { sport: 4000, dport: 53 }, b"query")
}

#[test]
fn tagged_and_non_ip_frames_are_refused_by_the_ethernet_layer() {
    let mut frame = udp_frame();
    assert_eq!(ethernet::network_layer(&frame), Ok(AddressFamily::Ipv4));
    for (ethertype, expected) in [
        (ethernet::ethertype::VLAN, Err(DropReason::VlanTagged)),
        (ethernet::ethertype::QINQ, Err(DropReason::VlanTagged)),
        (ethernet::ethertype::ARP, Err(DropReason::NotIp)),
        (ethernet::ethertype::IPV6, Ok(AddressFamily::Ipv6)),
    ] {
        frame[ethernet::ETHERTYPE..ethernet::ETHERTYPE + 2].copy_from_slice(&ethertype.to_be_bytes());
        assert_eq!(ethernet::network_layer(&frame), expected, "ethertype {ethertype:#06x}");
    }
    assert_eq!(ipv4::parse_frame(&frame), Err(DropReason::Ipv6Unsupported));
    assert_eq!(ethernet::network_layer(&frame[..13]), Err(DropReason::Truncated));
}

#[test]
fn ipv4_validation_names_what_is_wrong() {
    let good = udp_frame();
    let ip = ethernet::HEADER_LEN;
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = good.clone();
        edit(&mut f);
        ipv4::parse_frame(&f)
    };
    assert!(with(&|_| {}).is_ok());
    assert_eq!(with(&|f| f.truncate(ip + 19)), Err(DropReason::Truncated));
    assert_eq!(with(&|f| f[ip] = 0x65), Err(DropReason::IpVersionMismatch));
    assert_eq!(with(&|f| f[ip] = 0x44), Err(DropReason::BadIpHeader));
    assert_eq!(with(&|f| f[ip + ipv4::TOTAL_LEN + 1] = 0xff), Err(DropReason::BadIpLength));
    assert_eq!(with(&|f| f[ip + ipv4::TTL] ^= 1), Err(DropReason::BadIpChecksum));
    // Ethernet padding past the total length is fine, and not part of the packet.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 10]);
    assert_eq!(ipv4::parse_frame(&padded).map(|l3| l3.ip_end), Ok(good.len()));
}

#[test]
fn ipv4_options_refuse_source_routes_and_malformed_lists() {
    use ipv4::option::*;
    assert_eq!(ipv4::check_options(&[NO_OPERATION, NO_OPERATION, END_OF_LIST, 0xff]), Ok(()));
    // Router alert (RFC 2113) is well formed and harmless.
    assert_eq!(ipv4::check_options(&[0x94, 4, 0, 0]), Ok(()));
    assert_eq!(
        ipv4::check_options(&[LOOSE_SOURCE_ROUTE, 7, 4, 10, 0, 0, 1, 0]),
        Err(DropReason::SourceRoute)
    );
    assert_eq!(
        ipv4::check_options(&[STRICT_SOURCE_ROUTE, 7, 4, 10, 0, 0, 1, 0]),
        Err(DropReason::SourceRoute)
    );
    assert_eq!(ipv4::check_options(&[0x94, 1, 0, 0]), Err(DropReason::BadIpHeader));
    assert_eq!(ipv4::check_options(&[0x94, 9, 0, 0]), Err(DropReason::BadIpHeader));
    assert_eq!(ipv4::check_options(&[0x94]), Err(DropReason::BadIpHeader));
}

#[test]
fn tcp_options_walk_stops_at_malformed_lengths() {
    use tcp::option::*;
    assert_eq!(tcp::window_scale(&[NO_OPERATION, WINDOW_SCALE, 3, 7]), 7);
    assert_eq!(tcp::window_scale(&[WINDOW_SCALE, 3, 15]), 14, "capped at 14 (RFC 7323)");
    assert_eq!(tcp::window_scale(&[END_OF_LIST, WINDOW_SCALE, 3, 7]), tcp::NO_WINDOW_SCALE);
    assert_eq!(tcp::window_scale(&[MSS, 0, WINDOW_SCALE, 3, 7]), tcp::NO_WINDOW_SCALE, "zero length");
    assert_eq!(tcp::window_scale(&[MSS, 9, WINDOW_SCALE, 3, 7]), tcp::NO_WINDOW_SCALE, "past the end");
    assert_eq!(tcp::window_scale(&[WINDOW_SCALE, 4, 7, 0]), tcp::NO_WINDOW_SCALE, "wrong length");
}

#[test]
fn mss_clamping_lowers_only_a_syn_and_keeps_the_checksum() {
    let syn = Layer4::Tcp {
        sport: 40000,
        dport: 443,
        seq: 1,
        ack: None,
        syn: true,
        window: 64240,
        wscale: Some(7),
        mss: Some(1460),
    };
    let frame = build([10, 0, 0, 2], [198, 51, 100, 7], 64, &syn, &[]);
    let tcp_at = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN;
    let mss_of = |f: &[u8]| {
        let h = etherparse::PacketHeaders::from_ethernet_slice(f).unwrap();
        let Some(etherparse::TransportHeader::Tcp(tcp)) = h.transport else { panic!("tcp") };
        let Some(etherparse::NetHeaders::Ipv4(ip, _)) = h.net else { panic!("ipv4") };
        let valid = tcp.calc_checksum_ipv4(&ip, &[]).unwrap() == tcp.checksum;
        let mss = tcp.options_iterator().find_map(|o| match o {
            Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
            _ => None,
        });
        (mss, valid)
    };
    let mut clamped = frame.clone();
    tcp::clamp_syn_mss(&mut clamped[tcp_at..], 1400);
    assert_eq!(mss_of(&clamped), (Some(1400), true));
    let mut untouched = frame.clone();
    tcp::clamp_syn_mss(&mut untouched[tcp_at..], 1500);
    assert_eq!(untouched, frame, "an MSS already below the limit stays");
    let ack = Layer4::Tcp {
        sport: 40000,
        dport: 443,
        seq: 1,
        ack: Some(2),
        syn: false,
        window: 64240,
        wscale: Some(7),
        mss: Some(1460),
    };
    let frame = build([10, 0, 0, 2], [198, 51, 100, 7], 64, &ack, &[]);
    let mut not_syn = frame.clone();
    tcp::clamp_syn_mss(&mut not_syn[tcp_at..], 536);
    assert_eq!(not_syn, frame, "only SYNs carry the option that matters");
}

#[test]
fn transport_parse_refuses_short_and_unknown_headers() {
    let frame = udp_frame();
    let packet = &frame[ethernet::HEADER_LEN..];
    assert!(transport::parse(packet).is_ok());
    assert_eq!(transport::parse(&packet[..ipv4::MIN_HEADER_LEN + 7]), Err(DropReason::Truncated));
    let mut gre = packet.to_vec();
    gre[ipv4::PROTOCOL] = 47;
    assert_eq!(transport::parse(&gre), Err(DropReason::UnsupportedProtocol));
    let mut tcp_frame = build(
        [10, 0, 0, 2],
        [198, 51, 100, 7],
        64,
        &Layer4::Tcp { sport: 1, dport: 2, seq: 3, ack: None, syn: true, window: 4, wscale: None, mss: None },
        &[],
    );
    tcp_frame[ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + tcp::DATA_OFFSET] = 0x40;
    assert_eq!(transport::parse(&tcp_frame[ethernet::HEADER_LEN..]), Err(DropReason::BadL4Header));
}
