//! `[nat]`: conntrack limits and timers. (Issue 5 fills this in.)

use serde::Deserialize;

use super::{Diagnostics, Source};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatConfig {}

impl NatConfig {
    pub fn validate(&self, _src: &Source, _diags: &mut Diagnostics) {}
}
