//! The control thread's view of the kernel's forwarding state: it reads the rules, routes and neighbours over
//! rtnetlink (`netlink`), works out which routing tables the kernel would consult for the traffic egressd
//! forwards (`routing`: policy routing, sans-IO), publishes the result to the workers as a
//! `dataplane::nexthop::NextHopTable` snapshot, and asks the kernel to resolve next hops the workers could not
//! find.
//!
//! Why mirror the kernel's tables instead of resolving ARP ourselves: the XDP program passes ARP to the kernel, so
//! the kernel keeps its neighbour table fresh (and the node keeps working while egressd runs); egressd only
//! mirrors it. The control thread re-reads on the kernel's change notifications ([`netlink::RouteEvents`]), and
//! every few seconds besides in case one was lost.
//!
//! Resolution: when a worker meets a next hop with no neighbour entry, the control thread asks the kernel to
//! resolve it over netlink (`RTM_NEWNEIGH` with `NTF_USE`, what the kernel does itself before sending a packet):
//! the kernel sends its ARP request and the entry appears (or the hop is unreachable and stays INCOMPLETE/FAILED,
//! and the worker keeps counting `no_neighbour`). Nothing but ARP is sent: no probe traffic to the next hop or to
//! an on-link destination.

pub mod netlink;
pub mod routing;

use std::net::Ipv4Addr;
use std::path::Path;

use dataplane::nexthop::{Mac, NextHopTable};

#[derive(Debug, thiserror::Error)]
pub enum FibError {
    #[error("interface {0:?} does not exist in this network namespace")]
    NoSuchInterface(String),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("interface {interface:?} has no usable MAC address ({text:?})")]
    BadMac { interface: String, text: String },
    #[error("cannot read the routing tables over netlink: {0}")]
    Netlink(std::io::Error),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn read(path: &str) -> Result<String, FibError> {
    std::fs::read_to_string(path).map_err(|source| FibError::Read { path: path.to_string(), source })
}

/// Reads the kernel's routing state for the inside and outside interfaces.
#[derive(Debug, Clone)]
pub struct Fib {
    pub inside: String,
    pub outside: String,
}

impl Fib {
    pub fn new(inside: &str, outside: &str) -> Fib {
        Fib { inside: inside.to_string(), outside: outside.to_string() }
    }

    fn mac_of(interface: &str) -> Result<Mac, FibError> {
        let path = format!("/sys/class/net/{interface}/address");
        if !Path::new(&format!("/sys/class/net/{interface}")).exists() {
            return Err(FibError::NoSuchInterface(interface.to_string()));
        }
        let text = read(&path)?;
        parse_mac(&text).ok_or_else(|| FibError::BadMac { interface: interface.to_string(), text })
    }

    /// What the routing tables need to know of `interface`. Its first IPv4 address, if any, is the source of the
    /// ICMP errors egressd sends out of it (RFC 1812 4.3.2.4).
    fn link(interface: &str, addrs: &[if_addrs::Interface]) -> Result<routing::Link, FibError> {
        let mac = Self::mac_of(interface)?;
        let path = format!("/sys/class/net/{interface}/ifindex");
        let ifindex = read(&path)?.trim().parse().map_err(|_| FibError::Read {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not an interface index"),
        })?;
        let address = addrs.iter().find_map(|i| match i.ip() {
            std::net::IpAddr::V4(a) if i.name == interface => Some(a),
            _ => None,
        });
        Ok(routing::Link {
            name: interface.to_string(),
            ifindex,
            mac,
            mtu: interface_mtu(interface)?,
            address,
        })
    }

    /// One snapshot of both interfaces, for traffic from `egress_ips` (policy routing may give each its own
    /// tables); and the policy routing rules it had to skip (see [`routing`]).
    pub fn read(&self, egress_ips: &[Ipv4Addr]) -> Result<(NextHopTable, Vec<String>), FibError> {
        let state = netlink::read_state().map_err(FibError::Netlink)?;
        // Not knowing the addresses only changes the ICMP errors' source (see `dataplane::icmp`): not an error.
        let addrs = if_addrs::get_if_addrs().unwrap_or_default();
        let inside = Self::link(&self.inside, &addrs)?;
        let outside = Self::link(&self.outside, &addrs)?;
        let mut warnings = Vec::new();
        let table = state.next_hops(&inside, &outside, egress_ips, &mut warnings);
        Ok((table, warnings))
    }
}

/// `RTM_NEWNEIGH` with `NTF_USE` over netlink creates the neighbour entry if needed and starts ARP, sending
/// nothing to the next hop but the ARP request (no probe traffic to third parties).
pub fn request_resolution(interface: &str, next_hop: Ipv4Addr) {
    if let Err(e) = ask_kernel_to_resolve(interface, next_hop) {
        tracing::debug!(%next_hop, interface, error = %e, "resolution request refused");
    }
}

fn ask_kernel_to_resolve(interface: &str, next_hop: Ipv4Addr) -> std::io::Result<()> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
    };
    use netlink_packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    };
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex"))?
        .trim()
        .parse::<u32>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut neighbour = NeighbourMessage::default();
    neighbour.header.family = AddressFamily::Inet;
    neighbour.header.ifindex = ifindex;
    neighbour.header.state = NeighbourState::None;
    neighbour.header.flags = NeighbourFlags::Use;
    neighbour.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(next_hop)));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
    let mut request =
        NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::NewNeighbour(neighbour)));
    request.finalize();
    let mut buf = vec![0; request.header.length as usize];
    request.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    // The kernel answers at once; never wait long on the control thread.
    socket.set_non_blocking(true)?;
    let mut answer = vec![0; 4096];
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    let n = loop {
        match socket.recv(&mut &mut answer[..], 0) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

/// The MTU of `interface` (from sysfs, which `ip netns exec` mounts for the namespace).
pub fn interface_mtu(interface: &str) -> Result<u32, FibError> {
    let path = format!("/sys/class/net/{interface}/mtu");
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => FibError::NoSuchInterface(interface.to_string()),
        _ => FibError::Read { path: path.clone(), source },
    })?;
    text.trim().parse().map_err(|_| FibError::Read {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an MTU: {text:?}")),
    })
}

/// Whether frames of an interface with MTU `mtu` fit UMEM frames of `frame_size` bytes; if not, the error says
/// what happens and how to fix it.
pub fn check_mtu(interface: &str, mtu: u32, frame_size: u32) -> Result<(), String> {
    let largest = dataplane::xsk::largest_mtu(frame_size);
    if mtu <= largest {
        return Ok(());
    }
    let fix = if frame_size < 4096 {
        format!(
            "set `[dataplane] frame_size = 4096` (carries MTU up to {}) or lower {interface}'s MTU to {largest}",
            dataplane::xsk::largest_mtu(4096)
        )
    } else {
        format!("lower {interface}'s MTU to {largest} (frames beyond one page need AF_XDP multi-buffer)")
    };
    Err(format!(
        "interface {interface} has MTU {mtu}, but frame_size = {frame_size} carries at most MTU {largest} \
         ({} bytes per frame with an Ethernet header and a VLAN tag): the kernel would drop larger frames before \
         egressd sees them; {fix}",
        dataplane::xsk::largest_frame(frame_size)
    ))
}

/// The node's own addresses (IPv4 and IPv6) on every interface, except `egress_ips` (their traffic is egressd's). The XDP
/// program passes frames to these addresses to the kernel.
pub fn node_addresses(egress_ips: &[Ipv4Addr]) -> std::io::Result<Vec<std::net::IpAddr>> {
    let mut addrs: Vec<std::net::IpAddr> = if_addrs::get_if_addrs()?
        .into_iter()
        .map(|i| i.ip())
        .filter(|a| !matches!(a, std::net::IpAddr::V4(a) if egress_ips.contains(a)))
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mtu_larger_than_the_frame_carries_is_refused_with_the_fix() {
        assert_eq!(check_mtu("gw-in", 1500, 2048), Ok(()));
        assert_eq!(check_mtu("gw-in", 1774, 2048), Ok(()));
        let e = check_mtu("gw-in", 3000, 2048).unwrap_err();
        assert!(
            e.starts_with("interface gw-in has MTU 3000, but frame_size = 2048 carries at most MTU 1774"),
            "{e}"
        );
        assert!(e.contains("frame_size = 4096` (carries MTU up to 3822)"), "{e}");
        assert_eq!(check_mtu("gw-in", 3822, 4096), Ok(()));
        let e = check_mtu("gw-out", 9001, 4096).unwrap_err();
        assert!(e.contains("lower gw-out's MTU to 3822"), "{e}");
    }

    #[test]
    fn mac_parsing_rejects_malformed_text() {
        assert_eq!(parse_mac("0a:1b:2c:3d:4e:5f\n"), Some([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]));
        assert_eq!(parse_mac("0a:1b:2c:3d:4e"), None);
        assert_eq!(parse_mac("0a:1b:2c:3d:4e:5f:60"), None);
        assert_eq!(parse_mac("0a:1b:2c:3d:4e:xx"), None);
    }

    #[test]
    fn a_missing_interface_is_a_clear_error() {
        let err = Fib::new("no-such-if0", "no-such-if1").read(&[]).unwrap_err();
        assert!(matches!(err, FibError::NoSuchInterface(ref n) if n == "no-such-if0"), "{err}");
    }
}
