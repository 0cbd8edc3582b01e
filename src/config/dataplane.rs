//! `[dataplane]`: which interfaces egressd owns, on which cores it polls them, and how. (Issue 3 fills this in.)

use serde::Deserialize;

use super::{Diagnostics, Source};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Interface towards the workloads.
    pub inside: String,
    /// Interface towards the internet; the egress IPs are configured on it.
    pub outside: String,
    /// CPU cores to pin one worker each to.
    #[serde(default = "default_cores")]
    pub cores: Vec<usize>,
    /// Frames per rx/tx burst.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_cores() -> Vec<usize> {
    vec![0]
}

fn default_batch_size() -> usize {
    64
}

impl DataplaneConfig {
    pub fn validate(&self, _src: &Source, _diags: &mut Diagnostics) {}
}
