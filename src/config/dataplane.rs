//! `[dataplane]`: which interfaces egressd owns, on which cores it polls them, and how.
//!
//! ```toml
//! [dataplane]
//! inside = "gw-in"                  # towards the workloads
//! outside = "gw-out"                # towards the internet; egress IPs live here
//! cores = [1]                       # one worker per core; worker i owns queue i of both interfaces
//! batch_size = 64                   # frames per rx burst
//! ring_size = 2048                  # each AF_XDP ring; the UMEM has 2 × ring_size frames
//! frame_size = 2048                 # UMEM frame bytes (2048 or 4096)
//! idle = "adaptive"                 # "busy" | "adaptive": poll on for idle_spin_us after traffic, then block
//! idle_spin_us = 50000              # adaptive: how long to keep polling (yielding the core) after the last frame
//! xdp_mode = "auto"                 # "auto" (native, else skb) | "native" | "skb"
//! egress_ips = ["192.0.2.10"]       # addresses on `outside` that belong to egressd, not to the kernel
//! clamp_mss = false                 # lower the MSS of TCP SYNs to fit the smaller interface MTU (MTU - 40)
//! source_validation = true          # drop packets from inside whose source is not routed via `inside`
//! ```
//!
//! `egress_ips` lives here because the XDP program must not pass their traffic to the kernel even though the
//! kernel holds them as addresses (so that it answers ARP for them). Policy groups name the egress IPs they leave
//! from; validation (`config::policy`) makes the two agree: each address here must be some group's, and when this
//! list is not empty every group egress IP must be in it.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde::Deserialize;
use toml::Spanned;

use super::{Diagnostics, Source};

/// Longest `idle_spin_us`: past a second of polling an idle gateway is not spinning for the next packet.
const MAX_IDLE_SPIN_US: u64 = 1_000_000;

/// Longest Linux interface name (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleMode {
    Busy,
    #[default]
    Adaptive,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Auto,
    Native,
    Skb,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Interface towards the workloads.
    pub inside: Spanned<String>,
    /// Interface towards the internet; the egress IPs are configured on it.
    pub outside: Spanned<String>,
    /// CPU cores to pin one worker each to. Default: `[0]`.
    pub cores: Option<Spanned<Vec<usize>>>,
    /// Frames per rx burst. Default 64.
    pub batch_size: Option<Spanned<usize>>,
    /// Size of each AF_XDP ring (power of two, 64..=16384). Default 2048.
    pub ring_size: Option<Spanned<u32>>,
    /// Bytes per UMEM frame: 2048 or 4096. Default 2048.
    pub frame_size: Option<Spanned<u32>>,
    /// How workers wait when idle. Default adaptive.
    #[serde(default)]
    pub idle: IdleMode,
    /// Microseconds an adaptive worker (and the L7 thread) keeps polling after the last frame before it blocks
    /// (0..=1 000 000).
    /// Default [`dataplane::worker::DEFAULT_IDLE_SPIN_US`].
    pub idle_spin_us: Option<Spanned<u64>>,
    /// XDP attach mode. Default auto.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Addresses on the outside interface owned by egressd (NAT sources); their traffic is not the kernel's.
    #[serde(default)]
    pub egress_ips: Vec<Spanned<Ipv4Addr>>,
    /// Clamp the MSS option of TCP SYNs (both ways) to the smaller interface MTU less 40. Default false.
    #[serde(default)]
    pub clamp_mss: bool,
    /// Reverse-path check on the inside: drop packets whose source the inside interface has no route to.
    /// Default true.
    pub source_validation: Option<bool>,
}

impl DataplaneConfig {
    pub fn cores(&self) -> Vec<usize> {
        self.cores.as_ref().map_or_else(|| vec![0], |c| c.get_ref().clone())
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size.as_ref().map_or(64, |s| *s.get_ref())
    }

    pub fn ring_size(&self) -> u32 {
        self.ring_size.as_ref().map_or(2048, |s| *s.get_ref())
    }

    pub fn frame_size(&self) -> u32 {
        self.frame_size.as_ref().map_or(2048, |s| *s.get_ref())
    }

    pub fn idle_spin(&self) -> std::time::Duration {
        std::time::Duration::from_micros(
            self.idle_spin_us.as_ref().map_or(dataplane::worker::DEFAULT_IDLE_SPIN_US, |s| *s.get_ref()),
        )
    }

    pub fn egress_ips(&self) -> Vec<Ipv4Addr> {
        self.egress_ips.iter().map(|s| *s.get_ref()).collect()
    }

    pub fn validate(&self, src: &Source, diags: &mut Diagnostics) {
        for (what, name) in [("inside", &self.inside), ("outside", &self.outside)] {
            let n = name.get_ref();
            if n.is_empty()
                || n.len() > MAX_IFNAME_LEN
                || n.contains(['/', ' ', '\0'])
                || n == "."
                || n == ".."
            {
                diags.error(
                    src,
                    name.span(),
                    format!("{what}: {n:?} is not a valid interface name (1-{MAX_IFNAME_LEN} bytes, no '/' or spaces)"),
                );
            }
        }
        if self.inside.get_ref() == self.outside.get_ref() {
            diags.error(src, self.outside.span(), "outside: must be a different interface from inside");
        }
        if let Some(cores) = &self.cores {
            if cores.get_ref().is_empty() {
                diags.error(src, cores.span(), "cores: at least one core is needed");
            }
            let mut seen = HashSet::new();
            for c in cores.get_ref() {
                if !seen.insert(c) {
                    diags.error(src, cores.span(), format!("cores: core {c} is listed twice"));
                }
            }
        }
        let ring = self.ring_size();
        if let Some(r) = &self.ring_size {
            if !(64..=16384).contains(&ring) || !ring.is_power_of_two() {
                diags.error(
                    src,
                    r.span(),
                    format!("ring_size: {ring} must be a power of two from 64 to 16384"),
                );
            }
        }
        if let Some(b) = &self.batch_size {
            let batch = *b.get_ref();
            if batch == 0 || batch > ring as usize || batch > 1024 {
                diags.error(src, b.span(), format!("batch_size: {batch} must be 1..=min(1024, ring_size)"));
            }
        }
        if let Some(spin) = &self.idle_spin_us {
            if *spin.get_ref() > MAX_IDLE_SPIN_US {
                diags.error(
                    src,
                    spin.span(),
                    format!("idle_spin_us: {} is more than {MAX_IDLE_SPIN_US} (one second)", spin.get_ref()),
                );
            }
        }
        if let Some(f) = &self.frame_size {
            if !matches!(*f.get_ref(), 2048 | 4096) {
                diags.error(src, f.span(), format!("frame_size: {} must be 2048 or 4096", f.get_ref()));
            }
        }
        let mut seen = HashSet::new();
        for ip in &self.egress_ips {
            let addr = *ip.get_ref();
            if !seen.insert(addr) {
                diags.error(src, ip.span(), format!("egress_ips: {addr} is listed twice"));
            } else if addr.is_unspecified()
                || addr.is_multicast()
                || addr.is_broadcast()
                || addr.is_loopback()
            {
                diags.error(src, ip.span(), format!("egress_ips: {addr} cannot be an egress IP"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Source};

    fn errors(text: &str) -> Vec<String> {
        match parse(Source::new("t.toml", text)) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let loaded = parse(Source::new("t.toml", "[dataplane]\ninside = \"a\"\noutside = \"b\"\n")).unwrap();
        let d = &loaded.config.dataplane;
        assert_eq!(d.cores(), vec![0]);
        assert_eq!((d.batch_size(), d.ring_size(), d.frame_size()), (64, 2048, 2048));
        assert_eq!(d.idle, super::IdleMode::Adaptive);
        assert_eq!(d.idle_spin(), std::time::Duration::from_millis(50));
        assert_eq!(d.xdp_mode, super::XdpMode::Auto);
        assert!(d.egress_ips().is_empty());
    }

    #[test]
    fn unknown_key_is_rejected_at_its_line_and_column() {
        let e = errors("[dataplane]\ninside = \"a\"\noutside = \"b\"\n  batchsize = 32\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("t.toml:4:3: "), "{}", e[0]);
        assert!(e[0].contains("unknown field `batchsize`"), "{}", e[0]);
    }

    #[test]
    fn bad_values_are_reported_with_positions() {
        let text = "[dataplane]\ninside = \"same\"\noutside = \"same\"\nring_size = 1000\nbatch_size = 0\n\
                    frame_size = 3000\ncores = [1, 1]\negress_ips = [\"192.0.2.10\", \"192.0.2.10\"]\n\
                    idle_spin_us = 2000000\n\
                    [[group]]\nname = \"g\"\nsources = [\"10.0.0.0/8\"]\negress_ips = [\"192.0.2.10\"]\n";
        let e = errors(text);
        let expect = [
            "t.toml:3:11: outside: must be a different interface",
            "t.toml:4:13: ring_size: 1000 must be a power of two",
            "t.toml:5:14: batch_size: 0",
            "t.toml:6:14: frame_size: 3000",
            "t.toml:7:9: cores: core 1 is listed twice",
            "t.toml:8:29: egress_ips: 192.0.2.10 is listed twice",
            "t.toml:9:16: idle_spin_us: 2000000 is more than 1000000",
        ];
        assert_eq!(e.len(), expect.len(), "{e:#?}");
        for (got, want) in e.iter().zip(expect) {
            assert!(got.starts_with(want), "got {got:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn long_interface_names_and_unknown_modes_are_rejected() {
        let e = errors("[dataplane]\ninside = \"a-very-long-interface\"\noutside = \"b\"\n");
        assert!(e[0].starts_with("t.toml:2:10: inside:"), "{e:?}");
        let e = errors("[dataplane]\ninside = \"a\"\noutside = \"b\"\nidle = \"lazy\"\n");
        assert!(e[0].starts_with("t.toml:4:8: "), "{e:?}");
        let e = errors("[dataplane]\ninside = \"a\"\noutside = \"b\"\negress_ips = [\"300.1.1.1\"]\n");
        assert!(e[0].starts_with("t.toml:4:15: "), "{e:?}");
    }
}
