//! `[admin]`: the admin HTTP endpoint (metrics, health, reload).

use std::net::SocketAddr;

use serde::Deserialize;

use super::{Diagnostics, Source};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz`, `/readyz` and `POST /reload` listen. Loopback by default.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9900))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: default_listen() }
    }
}

impl AdminConfig {
    pub fn validate(&self, _src: &Source, _diags: &mut Diagnostics) {}
}
