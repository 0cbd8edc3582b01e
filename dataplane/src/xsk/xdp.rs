//! egressd's XDP program (`dataplane/bpf/egressd_xdp.c`, compiled by `build.rs`), loaded and attached with aya,
//! one instance per interface.
//!
//! Why our own program and not libxdp's default: the default sends *every* frame to the socket, ARP included, so
//! neighbours never resolve and the node loses ssh and DNS. Ours passes to the kernel: ARP and other non-IP frames,
//! IPv4 multicast and broadcast, IPv4 addressed to the node's own addresses (`local_addrs`, which excludes the
//! egress IPs: their traffic is egressd's), and IPv6 that is the node's own (its addresses in `local_addrs6`,
//! link-local, multicast, neighbour discovery). Transit IPv6 is dropped and counted ([`XdpProgram::drops`]):
//! egressd forwards IPv4 only, and a node that forwards IPv6 must not let it leave unfiltered. Other IPv4 goes to
//! the AF_XDP socket of the frame's rx queue (`xsks`), or to the kernel when no socket is bound there.
//!
//! One program per interface and no bpffs: `ip netns exec` remounts /sys and no bpffs is mounted, so libxdp's
//! multi-program dispatcher is unavailable. aya attaches through a bpf_link, so the program goes away with the
//! process even if it dies; [`XdpProgram::detach`] (also run on drop) removes it on a clean shutdown.

use std::net::IpAddr;

use aya::maps::{HashMap as BpfHashMap, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;

use super::Port;

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egressd_xdp.o"));
const PROGRAM_NAME: &str = "egressd_xdp";

/// Which XDP attach mode to ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native (driver) mode if the driver supports it, generic (skb) mode otherwise.
    #[default]
    Auto,
    Native,
    Skb,
}

/// The mode the program actually runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Skb,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("cannot load the XDP program: {0}")]
    Load(String),
    #[error("cannot attach the XDP program to {interface}: {reason}")]
    Attach { interface: String, reason: String },
    #[error("cannot update XDP map {map} on {interface}: {reason}")]
    Map { interface: String, map: &'static str, reason: String },
}

/// What the XDP program dropped before any socket saw it (`xdp_drops` in the program).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpDrops {
    /// Transit IPv6 (egressd forwards IPv4 only): `egressd_drops_total{reason="ipv6_unsupported"}`.
    pub ipv6_unsupported: u64,
}

/// The XDP program attached to one interface, with its maps.
pub struct XdpProgram {
    interface: String,
    ebpf: Ebpf,
    link: Option<aya::programs::xdp::XdpLinkId>,
    mode: AttachedMode,
}

impl std::fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpProgram").field("interface", &self.interface).field("mode", &self.mode).finish()
    }
}

impl XdpProgram {
    /// Loads a fresh instance of the program, fills `local_addrs`/`local_addrs6` with `node_addrs` (frames to them
    /// stay with the kernel) and `l7_upstream` with `(egress IP, first port, last port)` (TCP to those ports stays
    /// with the kernel: the L7 path's upstream sockets), and attaches it to `interface`.
    pub fn attach(
        interface: &str,
        choice: XdpModeChoice,
        node_addrs: &[IpAddr],
        l7_upstream: &[(std::net::Ipv4Addr, u16, u16)],
    ) -> Result<XdpProgram, XdpError> {
        let map_err = |map: &'static str, e: &dyn std::fmt::Display| XdpError::Map {
            interface: interface.to_string(),
            map,
            reason: e.to_string(),
        };
        let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| XdpError::Load(e.to_string()))?;
        {
            let map = ebpf.map_mut("local_addrs").ok_or_else(|| map_err("local_addrs", &"missing"))?;
            let mut local: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(map).map_err(|e| map_err("local_addrs", &e))?;
            for addr in node_addrs.iter().filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            }) {
                // The program compares the header's bytes as they are: network byte order.
                local
                    .insert(u32::from_ne_bytes(addr.octets()), 1, 0)
                    .map_err(|e| map_err("local_addrs", &e))?;
            }
        }
        {
            let map = ebpf.map_mut("local_addrs6").ok_or_else(|| map_err("local_addrs6", &"missing"))?;
            let mut local: BpfHashMap<_, [u8; 16], u8> =
                BpfHashMap::try_from(map).map_err(|e| map_err("local_addrs6", &e))?;
            for addr in node_addrs.iter().filter_map(|a| match a {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            }) {
                local.insert(addr.octets(), 1, 0).map_err(|e| map_err("local_addrs6", &e))?;
            }
        }
        {
            let map = ebpf.map_mut("l7_upstream").ok_or_else(|| map_err("l7_upstream", &"missing"))?;
            let mut ranges: BpfHashMap<_, u32, u32> =
                BpfHashMap::try_from(map).map_err(|e| map_err("l7_upstream", &e))?;
            for (addr, first, last) in l7_upstream {
                // `struct port_range { __u16 first; __u16 last; }` in this machine's byte order.
                let range = u32::from(*first) | u32::from(*last) << 16;
                let range = if cfg!(target_endian = "little") { range } else { range.rotate_left(16) };
                ranges
                    .insert(u32::from_ne_bytes(addr.octets()), range, 0)
                    .map_err(|e| map_err("l7_upstream", &e))?;
            }
        }
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM_NAME} in the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        program.load().map_err(|e| XdpError::Load(format!("{e}: {}", error_chain(&e))))?;
        let attach_err = |e: aya::programs::ProgramError| XdpError::Attach {
            interface: interface.to_string(),
            reason: error_chain(&e),
        };
        let (link, mode) = match choice {
            XdpModeChoice::Native => {
                (program.attach(interface, XdpMode::Driver).map_err(attach_err)?, AttachedMode::Native)
            }
            XdpModeChoice::Skb => {
                (program.attach(interface, XdpMode::Skb).map_err(attach_err)?, AttachedMode::Skb)
            }
            XdpModeChoice::Auto => match program.attach(interface, XdpMode::Driver) {
                Ok(link) => (link, AttachedMode::Native),
                Err(native) => {
                    tracing::warn!(interface, error = %error_chain(&native), "native XDP refused; using skb mode");
                    (program.attach(interface, XdpMode::Skb).map_err(attach_err)?, AttachedMode::Skb)
                }
            },
        };
        Ok(XdpProgram { interface: interface.to_string(), ebpf, link: Some(link), mode })
    }

    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Steers frames of `port`'s queue to its socket.
    pub fn register(&mut self, port: &Port) -> Result<(), XdpError> {
        let interface = self.interface.clone();
        let map_err = |e: &dyn std::fmt::Display| XdpError::Map {
            interface: interface.clone(),
            map: "xsks",
            reason: e.to_string(),
        };
        let map = self.ebpf.map_mut("xsks").ok_or_else(|| map_err(&"missing"))?;
        let mut xsks = XskMap::try_from(map).map_err(|e| map_err(&e))?;
        xsks.set(port.queue(), port.fd(), 0).map_err(|e| map_err(&e))
    }

    /// Frames the program itself dropped since it was loaded, by reason (summed over CPUs).
    pub fn drops(&self) -> Result<XdpDrops, XdpError> {
        let map_err = |e: &dyn std::fmt::Display| XdpError::Map {
            interface: self.interface.clone(),
            map: "xdp_drops",
            reason: e.to_string(),
        };
        let map = self.ebpf.map("xdp_drops").ok_or_else(|| map_err(&"missing"))?;
        let counts = PerCpuArray::<_, u64>::try_from(map).map_err(|e| map_err(&e))?;
        let per_cpu = counts.get(&0, 0).map_err(|e| map_err(&e))?;
        Ok(XdpDrops { ipv6_unsupported: per_cpu.iter().sum() })
    }

    /// Detaches the program from the interface; frames go to the kernel again.
    pub fn detach(&mut self) -> Result<(), XdpError> {
        let Some(link) = self.link.take() else { return Ok(()) };
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| XdpError::Load("program vanished".into()))?;
        program
            .detach(link)
            .map_err(|e| XdpError::Attach { interface: self.interface.clone(), reason: error_chain(&e) })
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(interface = %self.interface, error = %e, "detaching XDP program failed");
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
