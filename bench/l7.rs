//! The L7 path's client side (smoltcp, `dataplane::l7::stack`): the cost of one data segment from a client — find
//! its connection, let smoltcp take it, read the bytes out — with 1, 1 000 and 10 000 connections open. smoltcp
//! scans its socket set linearly on every packet; the stack gives each connection its own set and finds it by
//! 4-tuple, so the cost per packet must stay flat as connections grow (the 10 000 / 1 ratio is printed).
//!
//! The same-run baseline is smoltcp's own shape: one interface and one socket set holding every connection
//! (`one_socket_set`), which it scans on every packet.
//!
//! `cargo bench --bench l7 -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant as WallInstant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::l7::stack::{ClientStack, FourTuple, StackLimits};
use dataplane::time::Instant;

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// Segments timed per batch, spread round-robin over the open connections.
const BATCH: usize = 1024;

/// A client's TCP segment to the server.
fn segment(client: SocketAddrV4, seq: u32, ack: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut b = etherparse::PacketBuilder::ipv4(client.ip().octets(), SERVER.octets(), 64).tcp(
        client.port(),
        443,
        seq,
        64240,
    );
    b = if syn { b.syn() } else { b.ack(ack).psh() };
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("a segment");
    out
}

/// Connection `i`'s client address: 10.x.y.z spread so that no two share an endpoint.
fn client(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8), 40000 + (i % 1000) as u16)
}

/// A stack with `n` established connections; per connection its key, next client seq and the server's next seq.
fn open(n: usize) -> (ClientStack, Vec<(FourTuple, u32, u32)>) {
    let mut stack = ClientStack::new(
        StackLimits { max_connections: n, max_per_source: n, socket_buffer: 4096, mtu: 1500 },
        9,
    );
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let c = client(i);
        let mut server_isn = 0;
        let key = stack
            .on_packet(Instant::ZERO, &segment(c, 1000, 0, true, b""), &mut |p| {
                server_isn = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            })
            .expect("opened");
        stack
            .on_packet(Instant::ZERO, &segment(c, 1001, server_isn + 1, false, b""), &mut |_| {})
            .expect("acked");
        conns.push((key, 1001, server_isn + 1));
    }
    (stack, conns)
}

/// Times BATCH data segments (64 bytes each) over the connections round-robin, reading each one out.
fn batch(stack: &mut ClientStack, conns: &mut [(FourTuple, u32, u32)], turn: &mut usize) -> Duration {
    let payload = [0x42u8; 64];
    let segments: Vec<(FourTuple, Vec<u8>)> = (0..BATCH)
        .map(|k| {
            let i = (*turn + k) % conns.len();
            let (key, seq, ack) = &mut conns[i];
            let s = segment(key.client, *seq, *ack, false, &payload);
            *seq = seq.wrapping_add(payload.len() as u32);
            (*key, s)
        })
        .collect();
    *turn += BATCH;
    let mut buf = [0u8; 256];
    let start = WallInstant::now();
    for (key, s) in &segments {
        let _ = stack.on_packet(Instant::ZERO, s, &mut |p| {
            black_box(p.len());
        });
        black_box(stack.recv(key, &mut buf));
    }
    start.elapsed()
}

/// smoltcp as it comes: one interface, one socket set, `n` sockets listening on the server's address and port
/// (each SYN takes the next listening one). A device over a queue of packets.
mod one_socket_set {
    use std::collections::VecDeque;

    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant;
    use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};

    #[derive(Default)]
    pub struct Queue {
        pub rx: VecDeque<Vec<u8>>,
        pub tx: Vec<Vec<u8>>,
    }

    pub struct Rx(Vec<u8>);
    pub struct Tx<'a>(&'a mut Vec<Vec<u8>>);

    impl RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    impl TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut buf = vec![0; len];
            let r = f(&mut buf);
            self.0.push(buf);
            r
        }
    }

    impl Device for Queue {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;
        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            let p = self.rx.pop_front()?;
            Some((Rx(p), Tx(&mut self.tx)))
        }
        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.tx))
        }
        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ip;
            caps.max_transmission_unit = 1500;
            caps
        }
    }

    pub struct Shared {
        pub iface: Interface,
        pub sockets: SocketSet<'static>,
        pub handles: Vec<smoltcp::iface::SocketHandle>,
        pub device: Queue,
    }

    pub fn new(n: usize, server: std::net::Ipv4Addr) -> Shared {
        let mut device = Queue::default();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut device, Instant::ZERO);
        iface.set_any_ip(true);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(server.into(), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(server);
        let mut sockets = SocketSet::new(Vec::new());
        let handles = (0..n)
            .map(|_| {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 4096]),
                    tcp::SocketBuffer::new(vec![0; 4096]),
                );
                s.listen(IpListenEndpoint { addr: Some(server.into()), port: 443 }).expect("listen");
                sockets.add(s)
            })
            .collect();
        Shared { iface, sockets, handles, device }
    }
}

/// The baseline: `n` connections established in one socket set; returns it with each connection's client
/// address, next client seq and the server's next seq.
fn open_shared(n: usize) -> (one_socket_set::Shared, Vec<(SocketAddrV4, u32, u32)>) {
    let mut shared = one_socket_set::new(n, SERVER);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let c = client(i);
        shared.device.rx.push_back(segment(c, 1000, 0, true, b""));
        shared.iface.poll(smoltcp::time::Instant::ZERO, &mut shared.device, &mut shared.sockets);
        let synack = shared.device.tx.pop().expect("a SYN-ACK");
        let server_isn = u32::from_be_bytes([synack[24], synack[25], synack[26], synack[27]]);
        shared.device.rx.push_back(segment(c, 1001, server_isn + 1, false, b""));
        shared.iface.poll(smoltcp::time::Instant::ZERO, &mut shared.device, &mut shared.sockets);
        shared.device.tx.clear();
        conns.push((c, 1001, server_isn + 1));
    }
    (shared, conns)
}

/// [`batch`] against the shared socket set: the packet, then every socket read (as a driver without a map must).
fn batch_shared(
    shared: &mut one_socket_set::Shared,
    conns: &mut [(SocketAddrV4, u32, u32)],
    turn: &mut usize,
) -> Duration {
    let payload = [0x42u8; 64];
    let segments: Vec<(usize, Vec<u8>)> = (0..BATCH)
        .map(|k| {
            let i = (*turn + k) % conns.len();
            let (c, seq, ack) = &mut conns[i];
            let s = segment(*c, *seq, *ack, false, &payload);
            *seq = seq.wrapping_add(payload.len() as u32);
            (i, s)
        })
        .collect();
    *turn += BATCH;
    let mut buf = [0u8; 256];
    let start = WallInstant::now();
    for (i, s) in segments {
        shared.device.rx.push_back(s);
        shared.iface.poll(smoltcp::time::Instant::ZERO, &mut shared.device, &mut shared.sockets);
        shared.device.tx.clear();
        let socket = shared.sockets.get_mut::<smoltcp::socket::tcp::Socket>(shared.handles[i]);
        black_box(socket.recv_slice(&mut buf).unwrap_or(0));
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("l7_client_stack");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut per_packet = Vec::new();
    for n in [1usize, 1_000, 10_000] {
        let (mut stack, mut conns) = open(n);
        let mut turn = 0;
        group.bench_function(format!("data_segment/{n}_connections"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| batch(&mut stack, &mut conns, &mut turn)).sum())
        });
        // The same measured once more, outside criterion, for the printed ratio.
        let spent: Duration = (0..50).map(|_| batch(&mut stack, &mut conns, &mut turn)).sum();
        per_packet.push(spent.as_nanos() as f64 / (50 * BATCH) as f64);
    }
    let mut shared_per_packet = Vec::new();
    for n in [1usize, 1_000, 10_000] {
        let (mut shared, mut conns) = open_shared(n);
        let mut turn = 0;
        group.bench_function(format!("data_segment_one_socket_set/{n}_connections"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| batch_shared(&mut shared, &mut conns, &mut turn)).sum())
        });
        let rounds = if n >= 10_000 { 2 } else { 10 };
        let spent: Duration = (0..rounds).map(|_| batch_shared(&mut shared, &mut conns, &mut turn)).sum();
        shared_per_packet.push(spent.as_nanos() as f64 / (rounds * BATCH) as f64);
    }
    group.finish();
    println!(
        "one smoltcp socket set (baseline): {:.0} ns per data segment with 1 connection, {:.0} with 1 000, {:.0} with \
         10 000 ({:.0}x); the stack's map is {:.0}x faster at 10 000",
        shared_per_packet[0],
        shared_per_packet[1],
        shared_per_packet[2],
        shared_per_packet[2] / shared_per_packet[0],
        shared_per_packet[2] / per_packet[2]
    );
    println!(
        "l7 client stack: {:.0} ns per data segment with 1 connection, {:.0} with 1 000, {:.0} with 10 000 ({:.2}x)",
        per_packet[0],
        per_packet[1],
        per_packet[2],
        per_packet[2] / per_packet[0]
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
