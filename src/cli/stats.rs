//! `egressd stats`: fetch a running gateway's `/metrics` and print the counters that moved.

use std::process::ExitCode;

pub fn stats(args: super::AdminArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = crate::admin::http_request(args.admin, "GET", "/metrics")?;
    if status != 200 {
        anyhow::bail!("admin endpoint answered {status}: {}", body.trim());
    }
    print!("{}", summarize(&body));
    Ok(ExitCode::SUCCESS)
}

/// One line per non-zero sample of the Prometheus text, aligned; zero samples are left out so drops stand out.
pub fn summarize(metrics: &str) -> String {
    let samples: Vec<(&str, &str)> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(_, v)| v.parse::<f64>().map(|v| v != 0.0).unwrap_or(true))
        .collect();
    let width = samples.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    samples.iter().map(|(name, value)| format!("{name:<width$}  {value}\n")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn summary_keeps_non_zero_samples_only() {
        let text =
            "# HELP x y\n# TYPE x counter\nx_total{a=\"b\"} 0\nx_total{a=\"c\"} 12\negressd_workers 1\n";
        let out = super::summarize(text);
        assert!(!out.contains("a=\"b\""));
        let line = out.lines().find(|l| l.starts_with("x_total{a=\"c\"}")).expect("non-zero sample kept");
        assert_eq!(line.split_whitespace().last(), Some("12"), "{out}");
        assert!(out.contains("egressd_workers"), "{out}");
    }
}
