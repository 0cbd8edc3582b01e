//! `[l7]`: the L7 path (connections of `l7` rules, terminated on the node). Every key is optional.
//!
//! ```toml
//! [l7]
//! upstream_ports = [61000, 65535]  # TCP ports of every egress IP the L7 path connects upstream from
//! max_connections = 4096           # client connections at once; beyond, new ones are dropped (counted)
//! socket_buffer = 65536            # bytes of each client socket's receive and send buffer
//! classify_timeout = "10s"         # a client must send its ClientHello or request head within this
//! connect_timeout = "5s"           # upstream connection attempt; past it the client is reset
//! idle_timeout = "5m"              # a connection with no bytes either way for this long is closed
//! ```
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
    pub socket_buffer: Option<Spanned<i64>>,
    pub classify_timeout: Option<Spanned<DurationValue>>,
    pub connect_timeout: Option<Spanned<DurationValue>>,
    pub idle_timeout: Option<Spanned<DurationValue>>,
}

pub const DEFAULT_UPSTREAM_PORTS: (u16, u16) = (61000, 65535);

/// The L7 path's settings, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L7Settings {
    pub upstream_ports: (u16, u16),
    pub max_connections: usize,
    pub socket_buffer: usize,
    pub classify_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub idle_timeout_secs: u64,
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
            socket_buffer: count(&self.socket_buffer, 65536, 16 << 20),
            classify_timeout_secs: secs(&self.classify_timeout, 10),
            connect_timeout_secs: secs(&self.connect_timeout, 5),
            idle_timeout_secs: secs(&self.idle_timeout, 300),
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
            ("socket_buffer", &self.socket_buffer, 16 << 20),
        ] {
            if let Some(v) = value {
                let n = *v.get_ref();
                if !(1..=max).contains(&n) {
                    diags.error(src, v.span(), format!("{key}: {n} must be 1..={max}"));
                }
            }
        }
        for (key, value) in [
            ("classify_timeout", &self.classify_timeout),
            ("connect_timeout", &self.connect_timeout),
            ("idle_timeout", &self.idle_timeout),
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
        let e = load("idle_timeout = 0\n").unwrap_err();
        assert!(e[0].contains("idle_timeout: must be more than 0 s"), "{e:?}");
    }
}
