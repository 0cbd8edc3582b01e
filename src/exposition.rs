//! The two metrics exposition formats `/metrics` speaks, and picking one from a scraper's `Accept` header.
//!
//! The metrics are encoded once, as OpenMetrics text (what `prometheus-client` writes). A scraper that asks for
//! OpenMetrics (Prometheus 2.x and later does) gets that body as is; anything else (curl, older scrapers,
//! `promtool check metrics`) gets the classic Prometheus text format 0.0.4, which differs in three ways this
//! module translates: a counter's `# HELP`/`# TYPE` lines name the sample (`x_total`, not `x`), there is no
//! `# UNIT` or `# EOF` line, and `# HELP` text escapes only `\\` and `\n`.

use std::collections::HashSet;

/// A metrics exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    PrometheusText,
}

impl Exposition {
    /// The `Content-Type` a body in this format is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// Picks the format for an `Accept` header: OpenMetrics when the client lists it with a quality above zero
    /// and at least as high as plain text's; the classic text format otherwise (no header, `*/*`, `text/plain`).
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        let Some(accept) = accept else {
            return Exposition::PrometheusText;
        };
        let mut openmetrics_quality: f32 = 0.0;
        let mut text_quality: f32 = 0.0;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media_type = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut quality: f32 = 1.0;
            for parameter in parts {
                if let Some((key, value)) = parameter.split_once('=') {
                    if key.trim().eq_ignore_ascii_case("q") {
                        // A malformed quality counts as zero: the client did not clearly ask for it.
                        quality = value
                            .trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|q| (0.0..=1.0).contains(q))
                            .unwrap_or(0.0);
                    }
                }
            }
            match media_type.as_str() {
                "application/openmetrics-text" => openmetrics_quality = openmetrics_quality.max(quality),
                "text/plain" => text_quality = text_quality.max(quality),
                _ => {}
            }
        }
        if openmetrics_quality > 0.0 && openmetrics_quality >= text_quality {
            Exposition::OpenMetrics
        } else {
            Exposition::PrometheusText
        }
    }

    /// The OpenMetrics body `openmetrics` in this format.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Exposition::OpenMetrics => openmetrics,
            Exposition::PrometheusText => to_prometheus_text(&openmetrics),
        }
    }
}

/// Translates OpenMetrics text, as `prometheus-client` writes it for counters and gauges, into the Prometheus
/// text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| kind.trim() == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = line
            .strip_prefix("# HELP ")
            .map(|rest| ("HELP", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest)));
        match descriptor {
            Some((keyword, rest)) => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                let text = if keyword == "HELP" { unescape_quotes(text) } else { text.to_string() };
                out.push_str(&format!("# {keyword} {name}{suffix} {text}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// OpenMetrics escapes `"` in help text as `\"`; the 0.0.4 format knows only `\\` and `\n` there.
fn unescape_quotes(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.x sends when it scrapes.
    const PROMETHEUS_ACCEPT: &str =
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
        version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn negotiation_follows_the_clients_preference() {
        use Exposition::*;
        assert_eq!(Exposition::negotiate(Some(PROMETHEUS_ACCEPT)), OpenMetrics);
        assert_eq!(Exposition::negotiate(None), PrometheusText);
        assert_eq!(Exposition::negotiate(Some("*/*")), PrometheusText);
        assert_eq!(Exposition::negotiate(Some("text/plain;version=0.0.4")), PrometheusText);
        assert_eq!(Exposition::negotiate(Some("application/openmetrics-text; q=0")), PrometheusText);
        assert_eq!(
            Exposition::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            PrometheusText
        );
        assert_eq!(Exposition::negotiate(Some("Application/OpenMetrics-Text")), OpenMetrics);
        assert_eq!(Exposition::negotiate(Some("application/openmetrics-text;q=banana")), PrometheusText);
    }

    #[test]
    fn counters_are_described_by_their_sample_name_in_the_text_format() {
        let openmetrics = "# HELP egressd_reloads Reloads \\\"by\\\" result \\\\ here.\n\
            # TYPE egressd_reloads counter\n\
            egressd_reloads_total{result=\"ok\"} 2\n\
            # HELP egressd_flows Live flows.\n\
            # TYPE egressd_flows gauge\n\
            # UNIT egressd_flows flows\n\
            egressd_flows 7\n\
            # EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP egressd_reloads_total Reloads \"by\" result \\\\ here.\n\
             # TYPE egressd_reloads_total counter\n\
             egressd_reloads_total{result=\"ok\"} 2\n\
             # HELP egressd_flows Live flows.\n\
             # TYPE egressd_flows gauge\n\
             egressd_flows 7\n"
        );
    }

    #[test]
    fn the_openmetrics_body_is_served_unchanged() {
        let body = "# TYPE x counter\nx_total 1\n# EOF\n".to_string();
        assert_eq!(Exposition::OpenMetrics.render(body.clone()), body);
    }
}
