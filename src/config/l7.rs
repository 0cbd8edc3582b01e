//! `[l7]`: the L7 path (connections of `l7` rules, terminated on the node). Every key is optional.
//!
//! ```toml
//! [l7]
//! upstream_ports = [61000, 65535]  # TCP ports of every egress IP the L7 path connects upstream from
//! max_connections = 4096           # client connections at once; beyond, new ones are dropped (counted)
//! max_connections_per_source = 256 # client connections one client address may hold
//! socket_buffer = 65536            # bytes of each client socket's receive and send buffer
//! classify_timeout = "10s"         # a client must send its ClientHello or request head within this
//! connect_timeout = "5s"           # upstream connection attempt; past it the client is reset
//! idle_timeout = "5m"              # a connection with no bytes either way for this long is closed
//! verify_destination = "off"       # "dns": the dialled address must be among the name's DNS answers
//! resolver = "192.0.2.53:53"       # the DNS server for "dns" (default: /etc/resolv.conf's first nameserver)
//! dns_min_ttl = "5s"               # answers are cached for their TTL, at least this
//! dns_max_ttl = "5m"               # and at most this
//! ```
//!
//! `verify_destination = "dns"` closes a hole Istio leaves open: a client can present an allowed SNI or Host to
//! any address (domain fronting by IP). With it, a name is allowed only towards the addresses it resolves to.
//!
//! The NAT never allocates `upstream_ports` on any egress IP while the policy has an `l7` rule: the kernel's TCP
//! sockets of the L7 path own them, and the XDP program passes their replies to the kernel. All of `[l7]` takes
//! effect at start (a reload names a change as needing a restart).

use serde::Deserialize;
use toml::Spanned;

use super::nat::DurationValue;
use super::{Diagnostics, Source};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Section {
    pub upstream_ports: Option<Spanned<[i64; 2]>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_source: Option<Spanned<i64>>,
    pub socket_buffer: Option<Spanned<i64>>,
    pub classify_timeout: Option<Spanned<DurationValue>>,
    pub connect_timeout: Option<Spanned<DurationValue>>,
    pub idle_timeout: Option<Spanned<DurationValue>>,
    pub verify_destination: Option<Spanned<String>>,
    pub resolver: Option<Spanned<String>>,
    pub dns_min_ttl: Option<Spanned<DurationValue>>,
    pub dns_max_ttl: Option<Spanned<DurationValue>>,
}

pub const DEFAULT_UPSTREAM_PORTS: (u16, u16) = (61000, 65535);

/// The L7 path's settings, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L7Settings {
    pub upstream_ports: (u16, u16),
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub socket_buffer: usize,
    pub classify_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub verify_destination: bool,
    /// Set with `verify_destination`: from `resolver`, else the system's.
    pub resolver: Option<std::net::SocketAddr>,
    pub dns_min_ttl_secs: u64,
    pub dns_max_ttl_secs: u64,
}

impl L7Section {
    pub fn settings(&self) -> L7Settings {
        let secs = |v: &Option<Spanned<DurationValue>>, default: u64| {
            v.as_ref().and_then(|v| v.get_ref().seconds().ok()).filter(|&s| s > 0).unwrap_or(default)
        };
        let count = |v: &Option<Spanned<i64>>, default: usize, max: i64| {
            v.as_ref().map_or(default, |v| (*v.get_ref()).clamp(1, max) as usize)
        };
        L7Settings {
            upstream_ports: self
                .upstream_ports
                .as_ref()
                .map(|v| *v.get_ref())
                .filter(|[a, b]| (1024..=65535).contains(a) && (*a..=65535).contains(b))
                .map_or(DEFAULT_UPSTREAM_PORTS, |[a, b]| (a as u16, b as u16)),
            max_connections: count(&self.max_connections, 4096, 1_000_000),
            max_connections_per_source: count(&self.max_connections_per_source, 256, 1_000_000),
            socket_buffer: count(&self.socket_buffer, 65536, 16 << 20),
            classify_timeout_secs: secs(&self.classify_timeout, 10),
            connect_timeout_secs: secs(&self.connect_timeout, 5),
            idle_timeout_secs: secs(&self.idle_timeout, 300),
            verify_destination: self.verify_destination.as_ref().is_some_and(|v| v.get_ref() == "dns"),
            resolver: self.resolver.as_ref().and_then(|r| parse_resolver(r.get_ref()).ok()),
            dns_min_ttl_secs: secs(&self.dns_min_ttl, 5),
            dns_max_ttl_secs: secs(&self.dns_max_ttl, 300),
        }
    }

    pub fn validate(&self, src: &Source, diags: &mut Diagnostics) {
        if let Some(v) = &self.upstream_ports {
            let [first, last] = *v.get_ref();
            if !(1024..=65535).contains(&first) || !(first..=65535).contains(&last) {
                diags.error(
                    src,
                    v.span(),
                    format!("upstream_ports: [{first}, {last}] must be first..=last within 1024..=65535"),
                );
            } else if last - first < 15 {
                diags.error(
                    src,
                    v.span(),
                    format!("upstream_ports: [{first}, {last}] is fewer than 16 ports"),
                );
            }
        }
        for (key, value, max) in [
            ("max_connections", &self.max_connections, 1_000_000),
            ("max_connections_per_source", &self.max_connections_per_source, 1_000_000),
            ("socket_buffer", &self.socket_buffer, 16 << 20),
        ] {
            if let Some(v) = value {
                let n = *v.get_ref();
                if !(1..=max).contains(&n) {
                    diags.error(src, v.span(), format!("{key}: {n} must be 1..={max}"));
                }
            }
        }
        if let Some(v) = &self.verify_destination {
            if !["off", "dns"].contains(&v.get_ref().as_str()) {
                diags.error(
                    src,
                    v.span(),
                    format!("verify_destination: \"{}\" must be \"off\" or \"dns\"", v.get_ref()),
                );
            }
        }
        if let Some(v) = &self.resolver {
            if let Err(e) = parse_resolver(v.get_ref()) {
                diags.error(src, v.span(), format!("resolver: {e}"));
            }
        }
        for (key, value) in [
            ("classify_timeout", &self.classify_timeout),
            ("connect_timeout", &self.connect_timeout),
            ("idle_timeout", &self.idle_timeout),
            ("dns_min_ttl", &self.dns_min_ttl),
            ("dns_max_ttl", &self.dns_max_ttl),
        ] {
            if let Some(v) = value {
                match v.get_ref().seconds() {
                    Err(e) => diags.error(src, v.span(), format!("{key}: {e}")),
                    Ok(0) => diags.error(src, v.span(), format!("{key}: must be more than 0 s")),
                    Ok(_) => {}
                }
            }
        }
    }
}

/// `IP` or `IP:PORT` (port 53 by default).
fn parse_resolver(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|_| format!("\"{text}\" is not IP or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Source};

    fn load(l7: &str) -> Result<crate::config::Loaded, Vec<String>> {
        parse(Source::new("t.toml", format!("[dataplane]\ninside = \"a\"\noutside = \"b\"\n[l7]\n{l7}")))
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn settings_and_their_checks() {
        let l = load("upstream_ports = [50000, 50999]\nmax_connections = 10\nclassify_timeout = \"3s\"\n")
            .unwrap();
        let s = l.config.l7.settings();
        assert_eq!((s.upstream_ports, s.max_connections, s.classify_timeout_secs), ((50000, 50999), 10, 3));
        let d = load("").unwrap().config.l7.settings();
        assert_eq!((d.upstream_ports, d.max_connections, d.connect_timeout_secs), ((61000, 65535), 4096, 5));
        let e = load("upstream_ports = [100, 200]\n").unwrap_err();
        assert!(e[0].starts_with("t.toml:5:18: upstream_ports: [100, 200]"), "{e:?}");
        let e = load("upstream_ports = [60000, 60003]\n").unwrap_err();
        assert!(e[0].contains("fewer than 16 ports"), "{e:?}");
        let l = load("verify_destination = \"dns\"\nresolver = \"192.0.2.53\"\n").unwrap();
        let s = l.config.l7.settings();
        assert_eq!((s.verify_destination, s.resolver), (true, Some("192.0.2.53:53".parse().unwrap())));
        let e = load("verify_destination = \"yes\"\nresolver = \"dns.example\"\n").unwrap_err();
        assert_eq!(
            e,
            [
                "t.toml:5:22: verify_destination: \"yes\" must be \"off\" or \"dns\"",
                "t.toml:6:12: resolver: \"dns.example\" is not IP or IP:PORT",
            ]
        );
        let e = load("idle_timeout = 0\n").unwrap_err();
        assert!(e[0].contains("idle_timeout: must be more than 0 s"), "{e:?}");
    }
}
