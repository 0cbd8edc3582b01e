//! `[policy]`, `[[group]]`, `[[rule]]`: the L3/L4 policy model. (Issue 4 fills this in.)

use serde::Deserialize;

use super::{Config, Diagnostics, Source};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {}

/// Cross-section checks of the policy model.
pub fn validate(_config: &Config, _src: &Source, _diags: &mut Diagnostics) {}
