//! The TOML configuration: model, loading, and validation with file:line:column errors.
//!
//! Each section lives in its own module and validates itself; this module owns the top-level shape, turns byte
//! spans into line:column, and collects every error in a file (not just the first) so an operator fixes them in
//! one pass. Unknown keys anywhere are rejected (`deny_unknown_fields`).

pub mod admin;
pub mod dataplane;
pub mod l7;
pub mod nat;
pub mod policy;
pub mod service;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces, cores and batch sizes.
    pub dataplane: dataplane::DataplaneConfig,
    /// Admin HTTP endpoint (metrics, health, reload).
    #[serde(default)]
    pub admin: admin::AdminConfig,
    /// NAT and conntrack limits and timers.
    #[serde(default)]
    pub nat: nat::NatConfig,
    /// The L7 path's ports, limits and timeouts.
    #[serde(default)]
    pub l7: l7::L7Section,
    /// Policy-wide settings (default action, dry run).
    #[serde(default)]
    pub policy: policy::PolicySettings,
    /// Source groups: who.
    #[serde(default)]
    pub group: Vec<policy::GroupConfig>,
    /// Rules: what each group may reach, in precedence order for ties. Each keeps the span of its `[[rule]]`
    /// header, so a `RuleId` (the index here) maps back to a file:line.
    #[serde(default)]
    pub rule: Vec<toml::Spanned<policy::RuleConfig>>,
    /// Services: where plain HTTP requests for their names go (endpoints, subsets, routes, upstream TLS).
    #[serde(default)]
    pub service: Vec<toml::Spanned<service::ServiceConfig>>,
}

/// The text of a configuration file and where it came from; turns byte spans into positions.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    /// Byte offset where each line starts, so a position costs a binary search, not a scan of the text (every
    /// rule records its line: a 100 000-rule file would otherwise take minutes to check).
    line_starts: Vec<usize>,
}

/// The largest configuration file egressd reads (a 100 000-rule policy is about 10 MB).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Source {
        let text = text.into();
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Source { path: path.into(), text, line_starts }
    }

    /// Reads a configuration file: a regular file of at most [`MAX_CONFIG_BYTES`] (a FIFO would make `check`
    /// wait forever and `/dev/zero` would exhaust memory, so neither is read).
    pub fn read(path: &Path) -> Result<Source, ConfigError> {
        use std::io::Read;
        let fail = |message: String| ConfigError { path: path.to_path_buf(), line: 0, column: 0, message };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(fail(
                "not a regular file (a directory, FIFO, socket or device cannot be a configuration)".into(),
            ));
        }
        let too_big =
            |size: u64| fail(format!("is {size} bytes; a configuration is at most {MAX_CONFIG_BYTES} bytes"));
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(too_big(meta.len()));
        }
        let mut text = String::new();
        let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        // The file may have grown since: never read more than the cap.
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(too_big(text.len() as u64));
        }
        Ok(Source::new(path, text))
    }

    /// 1-based line and column (in characters) of byte `offset`.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(&self.text, offset.min(self.text.len()));
        // The last line starting at or before `offset` (line_starts[0] = 0, so there is one).
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let line_start = self.line_starts[line - 1];
        let column = self.text[line_start..offset].chars().count() + 1;
        (line, column)
    }

    /// An error at the start of `span`.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError { path: self.path.clone(), line, column, message: message.into() }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One problem in a configuration file, printed as `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is not at a place in the file (e.g. unreadable file).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.path.display(), self.line, self.column, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every error found in one file (at least one).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Errors and warnings gathered while validating one file.
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

impl Diagnostics {
    pub fn error(&mut self, src: &Source, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(src.error(span, message));
    }

    pub fn warn(&mut self, src: &Source, span: Range<usize>, message: impl Into<String>) {
        self.warnings.push(src.error(span, message));
    }
}

/// A configuration that parsed and validated, with the warnings it produced.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub source: Source,
    pub warnings: Vec<ConfigError>,
}

/// Parses and validates `source`. Every error in the file is reported, sorted by position.
pub fn parse(source: Source) -> Result<Loaded, ConfigErrors> {
    let config: Config = toml::from_str(&source.text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        source.error(span, e.message().trim().to_string())
    })?;
    let mut diags = Diagnostics::default();
    config.dataplane.validate(&source, &mut diags);
    config.admin.validate(&source, &mut diags);
    config.nat.validate(&source, &mut diags);
    config.l7.validate(&source, &mut diags);
    policy::validate(&config, &source, &mut diags);
    service::validate(&config, &source, &mut diags);
    if diags.errors.is_empty() {
        Ok(Loaded { config, source, warnings: diags.warnings })
    } else {
        diags.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(diags.errors))
    }
}

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    parse(Source::read(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_lines_and_characters() {
        let s = Source::new("x.toml", "a = 1\nbé = 2\n");
        assert_eq!(s.line_col(0), (1, 1));
        // The newline itself is the last column of its line.
        assert_eq!(s.line_col(5), (1, 6));
        assert_eq!(s.line_col(6), (2, 1));
        // Inside 'é' (byte 8 of it is its second byte): its column.
        assert_eq!(s.line_col(8), (2, 2));
        // 'é' is two bytes but one column.
        assert_eq!(s.line_col(9), (2, 3));
        assert_eq!(s.line_col(1000), (3, 1));
    }
}
