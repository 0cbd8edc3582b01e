//! The client side of the L7 path: TCP terminated on smoltcp, one connection at a time.
//!
//! The worker punts the packets of an `l7` flow here as IPv4 packets (Ethernet stripped). A bare SYN for a new
//! 4-tuple creates an endpoint whose socket listens on exactly the address and port the client dialled
//! (smoltcp's any-IP mode), so the SYN-ACK and everything after come from the server's address, as if the
//! client talked to the server itself. What the endpoint sends goes to the caller's `emit` as IPv4 packets, for
//! the worker to put back on the inside ring.
//!
//! Why one smoltcp `Interface` and `SocketSet` per connection: smoltcp scans its socket set linearly on every
//! packet, so one set for all connections would cost O(connections) per packet. Here a packet finds its
//! connection in a hash map by 4-tuple and smoltcp sees a set of one: the cost per packet stays flat as
//! connections grow. Memory per connection is the two socket buffers plus smoltcp's small per-interface state,
//! fixed at creation; [`StackLimits::max_connections`] bounds the total. A few closed endpoints are kept and
//! reused (see [`SPARE_ENDPOINTS`]).

use std::net::{Ipv4Addr, SocketAddrV4};

// Keys come from clients (addresses, ports): seeded foldhash, much faster than SipHash.
use foldhash::HashMap;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};

use crate::time::Instant;
use crate::wire::{ip_proto, tcp as tcp_wire, transport};

/// A client connection's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FourTuple {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

/// Bounds of the client side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackLimits {
    pub max_connections: usize,
    /// Connections one client address may hold (one source cannot take every slot).
    pub max_per_source: usize,
    /// Receive and send buffer of each socket, bytes.
    pub socket_buffer: usize,
    /// Largest IPv4 packet sent to clients (the inside MTU).
    pub mtu: usize,
}

impl Default for StackLimits {
    fn default() -> Self {
        StackLimits { max_connections: 4096, max_per_source: 256, socket_buffer: 64 * 1024, mtu: 1500 }
    }
}

/// Why a punted packet was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackDrop {
    /// Not a TCP/IPv4 packet the stack can read.
    Malformed,
    /// Not a SYN, and no connection has this 4-tuple (late packet of a closed connection, or forged).
    NoConnection,
    /// A new connection when [`StackLimits::max_connections`] are open.
    TooManyConnections,
    /// A new connection from a client address that holds [`StackLimits::max_per_source`].
    TooManyFromSource,
}

struct Endpoint {
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
}

/// The client-side TCP endpoints of the L7 path.
pub struct ClientStack {
    limits: StackLimits,
    endpoints: HashMap<FourTuple, Endpoint>,
    /// Open connections per client address.
    per_source: HashMap<Ipv4Addr, usize>,
    /// Where smoltcp writes a packet before `emit` sees it (reused: no allocation per packet).
    tx_buffer: Vec<u8>,
    /// Endpoints of closed connections, kept for the next ones (see [`SPARE_ENDPOINTS`]).
    spare: Vec<Endpoint>,
    seed: u64,
}

/// Closed endpoints kept for reuse. A new connection then costs no allocation and no zeroing of its two socket
/// buffers (128 KiB at the default size, the largest cost of accepting a connection); the bound keeps what a
/// burst of connections leaves behind small.
const SPARE_ENDPOINTS: usize = 64;

impl ClientStack {
    pub fn new(limits: StackLimits, seed: u64) -> ClientStack {
        ClientStack {
            limits,
            endpoints: HashMap::with_capacity_and_hasher(
                limits.max_connections.min(1 << 16),
                Default::default(),
            ),
            per_source: HashMap::default(),
            tx_buffer: Vec::with_capacity(limits.mtu),
            spare: Vec::new(),
            seed,
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// An IPv4 packet from a client. Creates the endpoint on a bare SYN; what the endpoint answers goes to
    /// `emit`. Returns the connection the packet belongs to.
    pub fn on_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        emit: &mut dyn FnMut(&[u8]),
    ) -> Result<FourTuple, StackDrop> {
        let t = transport::parse(packet).map_err(|_| StackDrop::Malformed)?;
        if t.proto != ip_proto::TCP {
            return Err(StackDrop::Malformed);
        }
        let key = FourTuple {
            client: SocketAddrV4::new(Ipv4Addr::from(t.src), t.sport),
            server: SocketAddrV4::new(Ipv4Addr::from(t.dst), t.dport),
        };
        let bare_syn = t.seg.flags & (tcp_wire::SYN | tcp_wire::ACK | tcp_wire::RST) == tcp_wire::SYN;
        if !self.endpoints.contains_key(&key) {
            if !bare_syn {
                return Err(StackDrop::NoConnection);
            }
            if self.endpoints.len() >= self.limits.max_connections {
                return Err(StackDrop::TooManyConnections);
            }
            let held = self.per_source.entry(*key.client.ip()).or_default();
            if *held >= self.limits.max_per_source {
                return Err(StackDrop::TooManyFromSource);
            }
            *held += 1;
            let endpoint = self.new_endpoint(now, key.server);
            self.endpoints.insert(key, endpoint);
        }
        let Some(endpoint) = self.endpoints.get_mut(&key) else { return Err(StackDrop::NoConnection) };
        let mut device =
            PacketDevice { rx: Some(packet), tx: &mut self.tx_buffer, emit, mtu: self.limits.mtu };
        endpoint.iface.poll(smol_now(now), &mut device, &mut endpoint.sockets);
        Ok(key)
    }

    fn new_endpoint(&mut self, now: Instant, server: SocketAddrV4) -> Endpoint {
        let listen = IpListenEndpoint { addr: Some((*server.ip()).into()), port: server.port() };
        if let Some(mut endpoint) = self.spare.pop() {
            endpoint.iface.update_ip_addrs(|addrs| {
                addrs.clear();
                let _ = addrs.push(IpCidr::new((*server.ip()).into(), 32));
            });
            let _ = endpoint.iface.routes_mut().add_default_ipv4_route(*server.ip());
            // Closed when it was spared; listening resets everything of the connection before (sequence numbers,
            // timers, both buffers emptied).
            let _ = endpoint.sockets.get_mut::<tcp::Socket>(endpoint.handle).listen(listen);
            return endpoint;
        }
        let mut config = Config::new(HardwareAddress::Ip);
        self.seed = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
        config.random_seed = self.seed;
        let mut no_packets = |_: &[u8]| {};
        let mut device =
            PacketDevice { rx: None, tx: &mut self.tx_buffer, emit: &mut no_packets, mtu: self.limits.mtu };
        let mut iface = Interface::new(config, &mut device, smol_now(now));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new((*server.ip()).into(), 32));
        });
        // Replies go back the way the SYN came; the route only has to exist (there is no link layer here).
        let _ = iface.routes_mut().add_default_ipv4_route(*server.ip());
        let buffer = || tcp::SocketBuffer::new(vec![0; self.limits.socket_buffer]);
        let mut socket = tcp::Socket::new(buffer(), buffer());
        // Cannot fail: the port of a packet that parsed as TCP is nonzero or smoltcp refuses the SYN itself.
        let _ = socket.listen(listen);
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        Endpoint { iface, sockets, handle }
    }

    /// Lets the connection's endpoint send what it has (data written, ACKs, retransmissions, FIN).
    pub fn poll(&mut self, now: Instant, key: &FourTuple, emit: &mut dyn FnMut(&[u8])) {
        if let Some(endpoint) = self.endpoints.get_mut(key) {
            let mut device = PacketDevice { rx: None, tx: &mut self.tx_buffer, emit, mtu: self.limits.mtu };
            endpoint.iface.poll(smol_now(now), &mut device, &mut endpoint.sockets);
        }
    }

    /// When the connection's endpoint next needs [`ClientStack::poll`] (retransmission, delayed ACK, timeouts).
    pub fn poll_at(&mut self, now: Instant, key: &FourTuple) -> Option<Instant> {
        let endpoint = self.endpoints.get_mut(key)?;
        endpoint
            .iface
            .poll_at(smol_now(now), &endpoint.sockets)
            .map(|at| Instant(at.total_micros() as u64 * 1000))
    }

    fn socket(&mut self, key: &FourTuple) -> Option<&mut tcp::Socket<'static>> {
        let endpoint = self.endpoints.get_mut(key)?;
        Some(endpoint.sockets.get_mut::<tcp::Socket>(endpoint.handle))
    }

    /// Bytes the client sent, into `buf`; returns how many.
    pub fn recv(&mut self, key: &FourTuple, buf: &mut [u8]) -> usize {
        self.socket(key).and_then(|s| s.recv_slice(buf).ok()).unwrap_or(0)
    }

    /// Queues bytes for the client; returns how many fit in the send buffer.
    pub fn send(&mut self, key: &FourTuple, data: &[u8]) -> usize {
        self.socket(key).and_then(|s| s.send_slice(data).ok()).unwrap_or(0)
    }

    /// Bytes [`ClientStack::send`] would take now.
    pub fn send_room(&mut self, key: &FourTuple) -> usize {
        self.socket(key).map_or(0, |s| if s.may_send() { s.send_capacity() - s.send_queue() } else { 0 })
    }

    /// Bytes queued for the client and not yet acknowledged.
    pub fn unsent(&mut self, key: &FourTuple) -> usize {
        self.socket(key).map_or(0, |s| s.send_queue())
    }

    /// Whether the connection is over (closed, or in TIME-WAIT) or unknown.
    pub fn is_finished(&mut self, key: &FourTuple) -> bool {
        self.socket(key).is_none_or(|s| matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait))
    }

    /// Forgets a connection (whatever its state).
    pub fn remove(&mut self, key: &FourTuple) {
        if let Some(mut endpoint) = self.endpoints.remove(key) {
            self.forget_source(key);
            if self.spare.len() < SPARE_ENDPOINTS {
                // Closed without a word: whatever the client must hear was sent before it was removed.
                endpoint.sockets.get_mut::<tcp::Socket>(endpoint.handle).abort();
                self.spare.push(endpoint);
            }
        }
    }

    fn forget_source(&mut self, key: &FourTuple) {
        if let Some(held) = self.per_source.get_mut(key.client.ip()) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.per_source.remove(key.client.ip());
            }
        }
    }

    /// The TCP state of the connection's endpoint, for logs.
    pub fn state_name(&mut self, key: &FourTuple) -> String {
        self.socket(key).map_or_else(|| "unknown".to_string(), |s| s.state().to_string())
    }

    /// Whether the client's TCP connection is established (the handshake done).
    pub fn is_established(&mut self, key: &FourTuple) -> bool {
        self.socket(key).is_some_and(|s| s.state() == tcp::State::Established)
    }

    /// Whether the client can still send (it has not closed its side).
    pub fn client_may_send(&mut self, key: &FourTuple) -> bool {
        self.socket(key).is_some_and(|s| s.may_recv())
    }

    /// Sends FIN after the queued bytes.
    pub fn close(&mut self, key: &FourTuple) {
        if let Some(s) = self.socket(key) {
            s.close();
        }
    }

    /// Resets the connection (RST on the next poll).
    pub fn abort(&mut self, key: &FourTuple) {
        if let Some(s) = self.socket(key) {
            s.abort();
        }
    }

    /// Forgets connections whose socket has closed; returns how many went.
    pub fn reap(&mut self) -> usize {
        let closed: Vec<FourTuple> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.sockets.get::<tcp::Socket>(e.handle).state() == tcp::State::Closed)
            .map(|(k, _)| *k)
            .collect();
        for key in &closed {
            self.remove(key);
        }
        closed.len()
    }
}

fn smol_now(now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros((now.as_nanos() / 1000) as i64)
}

/// A smoltcp device over one received packet (or none) and a packet sink.
struct PacketDevice<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut Vec<u8>,
    emit: &'a mut dyn FnMut(&[u8]),
    mtu: usize,
}

struct Rx<'a>(&'a [u8]);

struct Tx<'a> {
    buffer: &'a mut Vec<u8>,
    emit: &'a mut dyn FnMut(&[u8]),
}

impl smoltcp::phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buffer.clear();
        self.buffer.resize(len, 0);
        let result = f(self.buffer);
        (self.emit)(self.buffer);
        result
    }
}

impl Device for PacketDevice<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let packet = self.rx.take()?;
        Some((Rx(packet), Tx { buffer: &mut *self.tx, emit: &mut *self.emit }))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx { buffer: &mut *self.tx, emit: &mut *self.emit })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 4] = [10, 10, 1, 2];
    const SERVER: [u8; 4] = [198, 51, 100, 7];

    /// A TCP/IPv4 packet from the client (flags: "S", "A", "PA", "FA", "R").
    fn segment(sport: u16, seq: u32, ack: u32, flags: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = etherparse::PacketBuilder::ipv4(CLIENT, SERVER, 64).tcp(sport, 443, seq, 64240);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('A') {
            b = b.ack(ack);
        }
        if flags.contains('P') {
            b = b.psh();
        }
        if flags.contains('F') {
            b = b.fin();
        }
        if flags.contains('R') {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// The TCP/IPv4 packets `emit` saw: (source, destination, seq, ack, syn, ack flag, fin, rst, payload).
    type Seen = (SocketAddrV4, SocketAddrV4, u32, u32, bool, bool, bool, bool, Vec<u8>);

    fn read(packet: &[u8]) -> Seen {
        let p = etherparse::SlicedPacket::from_ip(packet).expect("an IPv4 packet");
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!("IPv4") };
        let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else { panic!("TCP") };
        let h = ip.header();
        (
            SocketAddrV4::new(h.source_addr(), tcp.source_port()),
            SocketAddrV4::new(h.destination_addr(), tcp.destination_port()),
            tcp.sequence_number(),
            tcp.acknowledgment_number(),
            tcp.syn(),
            tcp.ack(),
            tcp.fin(),
            tcp.rst(),
            tcp.payload().to_vec(),
        )
    }

    fn run(
        stack: &mut ClientStack,
        now: Instant,
        packet: &[u8],
    ) -> (Result<FourTuple, StackDrop>, Vec<Seen>) {
        let mut seen = Vec::new();
        let result = stack.on_packet(now, packet, &mut |p| seen.push(read(p)));
        (result, seen)
    }

    #[test]
    fn the_client_talks_to_the_address_it_dialled() {
        let mut stack = ClientStack::new(StackLimits::default(), 1);
        let (key, seen) = run(&mut stack, Instant::ZERO, &segment(40000, 1000, 0, "S", b""));
        let key = key.expect("a new connection");
        assert_eq!(key.server, SocketAddrV4::new(SERVER.into(), 443));
        assert_eq!(seen.len(), 1, "one SYN-ACK");
        let synack = &seen[0];
        assert_eq!((synack.0, synack.1), (key.server, key.client), "from the dialled address, to the client");
        assert!(synack.4 && synack.5 && synack.3 == 1001, "SYN+ACK acknowledging the SYN");
        let server_isn = synack.2;

        assert_eq!(
            run(&mut stack, Instant::from_secs(1), &segment(40000, 1001, server_isn + 1, "A", b"")).0,
            Ok(key)
        );
        assert!(stack.is_established(&key));
        let hello = segment(40000, 1001, server_isn + 1, "PA", b"hello");
        assert_eq!(run(&mut stack, Instant::from_secs(1), &hello).0, Ok(key));
        let mut buf = [0u8; 64];
        let n = stack.recv(&key, &mut buf);
        assert_eq!(&buf[..n], b"hello");

        assert!(stack.send_room(&key) > 0, "room to send: {}", stack.send_room(&key));
        assert_eq!(stack.send(&key, b"world"), 5);
        let mut sent = Vec::new();
        stack.poll(Instant::from_secs(1), &key, &mut |p| sent.push(read(p)));
        let data = sent.iter().find(|s| !s.8.is_empty()).expect("a data segment");
        assert_eq!((data.0, data.1, data.8.as_slice()), (key.server, key.client, &b"world"[..]));
        assert_eq!(data.2, server_isn + 1);

        // The client closes; the endpoint closes too and is reaped once both FINs are acknowledged.
        assert_eq!(
            run(&mut stack, Instant::from_secs(2), &segment(40000, 1006, server_isn + 6, "FA", b"")).0,
            Ok(key)
        );
        assert!(!stack.client_may_send(&key));
        stack.close(&key);
        let mut fin = Vec::new();
        stack.poll(Instant::from_secs(2), &key, &mut |p| fin.push(read(p)));
        let fin = fin.iter().find(|s| s.6).expect("our FIN");
        assert_eq!(
            run(&mut stack, Instant::from_secs(2), &segment(40000, 1007, fin.2 + 1, "A", b"")).0,
            Ok(key)
        );
        assert_eq!(stack.reap(), 1);
        assert!(stack.is_empty());
    }

    #[test]
    fn only_a_bare_syn_opens_a_connection_and_the_limit_holds() {
        let mut stack = ClientStack::new(
            StackLimits { max_connections: 3, max_per_source: 2, ..StackLimits::default() },
            7,
        );
        for flags in ["A", "PA", "SA", "R", "FA"] {
            let (result, seen) = run(&mut stack, Instant::ZERO, &segment(40001, 5, 9, flags, b"x"));
            assert_eq!(result, Err(StackDrop::NoConnection), "{flags}");
            assert!(seen.is_empty());
        }
        assert!(run(&mut stack, Instant::ZERO, &segment(40001, 5, 0, "S", b"")).0.is_ok());
        assert!(run(&mut stack, Instant::ZERO, &segment(40002, 5, 0, "S", b"")).0.is_ok());
        let (full, seen) = run(&mut stack, Instant::ZERO, &segment(40003, 5, 0, "S", b""));
        assert_eq!(full, Err(StackDrop::TooManyFromSource), "two per source");
        assert!(seen.is_empty());
        // Another source gets the third slot; a fourth connection finds the stack full.
        let other = |port: u16| {
            let mut p = segment(port, 5, 0, "S", b"");
            p[12..16].copy_from_slice(&[10, 10, 1, 3]);
            p[10..12].copy_from_slice(&[0, 0]);
            let sum = crate::wire::checksum::compute(&p[..20]);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
            // The TCP checksum covers the source address too: recompute it over the pseudo header.
            let tcp_len = (p.len() - 20) as u16;
            p[36..38].copy_from_slice(&[0, 0]);
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&p[12..20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&tcp_len.to_be_bytes());
            pseudo.extend_from_slice(&p[20..]);
            let sum = crate::wire::checksum::compute(&pseudo);
            p[36..38].copy_from_slice(&sum.to_be_bytes());
            p
        };
        assert!(run(&mut stack, Instant::ZERO, &other(41000)).0.is_ok());
        assert_eq!(run(&mut stack, Instant::ZERO, &other(41001)).0, Err(StackDrop::TooManyConnections));
        // A retransmitted SYN of an open connection is that connection's, not a new one.
        assert!(run(&mut stack, Instant::ZERO, &segment(40001, 5, 0, "S", b"")).0.is_ok());
        assert_eq!(stack.len(), 3);
        assert_eq!(run(&mut stack, Instant::ZERO, b"\x45garbage").0, Err(StackDrop::Malformed));
    }

    #[test]
    fn a_reused_endpoint_forgets_its_last_connection() {
        let mut stack = ClientStack::new(StackLimits::default(), 5);
        let (key, seen) = run(&mut stack, Instant::ZERO, &segment(40000, 1000, 0, "S", b""));
        let key = key.unwrap();
        let isn = seen[0].2;
        assert_eq!(run(&mut stack, Instant::ZERO, &segment(40000, 1001, isn + 1, "A", b"")).0, Ok(key));
        // Left unread in the receive buffer, and queued unsent in the send buffer, when the connection goes.
        assert_eq!(
            run(&mut stack, Instant::ZERO, &segment(40000, 1001, isn + 1, "PA", b"stale request")).0,
            Ok(key)
        );
        assert_eq!(stack.send(&key, b"stale answer"), 12);
        stack.remove(&key);
        assert_eq!(stack.spare.len(), 1);

        // The next connection (another client port, another server) takes the spare endpoint.
        let mut syn = Vec::new();
        etherparse::PacketBuilder::ipv4(CLIENT, [198, 51, 100, 8], 64)
            .tcp(40001, 8443, 7000, 64240)
            .syn()
            .write(&mut syn, b"")
            .unwrap();
        let (key2, seen) = run(&mut stack, Instant::from_secs(1), &syn);
        let key2 = key2.expect("a new connection on the spare endpoint");
        assert!(stack.spare.is_empty());
        assert_eq!(key2.server, SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 8), 8443));
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].0, seen[0].1), (key2.server, key2.client), "from the new server's address");
        assert!(seen[0].4 && seen[0].3 == 7001, "a SYN-ACK for the new SYN");
        assert_eq!(stack.unsent(&key2), 0, "nothing of the last connection's answer");
        let mut buf = [0u8; 64];
        assert_eq!(stack.recv(&key2, &mut buf), 0, "nor of its request");
    }

    #[test]
    fn abort_resets_the_client() {
        let mut stack = ClientStack::new(StackLimits::default(), 3);
        let (key, seen) = run(&mut stack, Instant::ZERO, &segment(40000, 1000, 0, "S", b""));
        let key = key.unwrap();
        assert_eq!(run(&mut stack, Instant::ZERO, &segment(40000, 1001, seen[0].2 + 1, "A", b"")).0, Ok(key));
        stack.abort(&key);
        let mut sent = Vec::new();
        stack.poll(Instant::ZERO, &key, &mut |p| sent.push(read(p)));
        assert!(sent.iter().any(|s| s.7), "an RST");
        assert_eq!(stack.reap(), 1);
    }
}
