//! `[admin]`: the admin HTTP endpoint (metrics, health, reload).
//!
//! ```toml
//! [admin]
//! listen = "127.0.0.1:9900"            # loopback by default
//! remote_control = false               # POST /reload from a non-loopback listen address
//! token_file = "/etc/egressd/admin.token"  # with remote_control: the bearer token control requests must carry
//! ```
//!
//! Metrics and health can be read by whoever reaches `listen`. Control (`POST /reload`) changes what the gateway
//! does, so on a non-loopback address it needs `remote_control = true` and a `token_file`, and each request
//! `Authorization: Bearer <token>`; `check` warns about a non-loopback `listen`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{Diagnostics, Source};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz`, `/readyz` and `POST /reload` listen. Loopback by default.
    pub listen: Option<Spanned<SocketAddr>>,
    /// Allow control requests when `listen` is not a loopback address (they must carry the token).
    #[serde(default)]
    pub remote_control: Option<Spanned<bool>>,
    /// File holding the bearer token control requests must carry (required by `remote_control`).
    pub token_file: Option<Spanned<PathBuf>>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9900))
}

impl AdminConfig {
    pub fn listen(&self) -> SocketAddr {
        self.listen.as_ref().map_or_else(default_listen, |l| *l.get_ref())
    }

    pub fn remote_control(&self) -> bool {
        self.remote_control.as_ref().is_some_and(|r| *r.get_ref())
    }

    pub fn validate(&self, src: &Source, diags: &mut Diagnostics) {
        if let Some(listen) = &self.listen {
            if !listen.get_ref().ip().is_loopback() {
                diags.warn(
                    src,
                    listen.span(),
                    format!(
                        "admin listen {} is not a loopback address: anyone who reaches it reads the metrics; POST \
                         /reload then needs remote_control = true and a token_file",
                        listen.get_ref()
                    ),
                );
            }
        }
        if let Some(remote) = &self.remote_control {
            if *remote.get_ref() && self.token_file.is_none() {
                diags.error(
                    src,
                    remote.span(),
                    "remote_control needs a token_file (the token requests must carry)",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Source};

    fn load(admin: &str) -> Result<(Vec<String>, crate::config::Loaded), Vec<String>> {
        let text = format!("[dataplane]\ninside = \"a\"\noutside = \"b\"\n[admin]\n{admin}");
        parse(Source::new("t.toml", text))
            .map(|l| (l.warnings.iter().map(|w| w.to_string()).collect(), l))
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn a_non_loopback_listen_is_a_warning_and_remote_control_needs_a_token_file() {
        let (warnings, l) = load("").unwrap();
        assert!(warnings.is_empty());
        assert_eq!(l.config.admin.listen().to_string(), "127.0.0.1:9900");
        let (warnings, _) = load("listen = \"0.0.0.0:9900\"\n").unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("t.toml:5:10: admin listen 0.0.0.0:9900 is not a loopback address"));
        let e = load("listen = \"0.0.0.0:9900\"\nremote_control = true\n").unwrap_err();
        assert_eq!(e, ["t.toml:6:18: remote_control needs a token_file (the token requests must carry)"]);
        let (_, l) = load("remote_control = true\ntoken_file = \"/etc/egressd/token\"\n").unwrap();
        assert!(l.config.admin.remote_control());
    }
}
