//! `egressd stats [--watch SECONDS]`: fetch a running gateway's `/metrics` and print the counters that moved;
//! with `--watch`, refresh every SECONDS and print each counter's rate over the interval beside its total.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub admin: super::AdminArgs,
    /// Refresh every SECONDS, with rates per second over the interval.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<f64>,
    /// With --watch: stop after this many refreshes (default: until interrupted).
    #[arg(long, requires = "watch")]
    pub count: Option<u32>,
}

pub fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    let Some(every) = args.watch else {
        print!("{}", summarize(&fetch(&args.admin)?));
        return Ok(ExitCode::SUCCESS);
    };
    anyhow::ensure!(every > 0.0, "--watch: the interval must be above 0 s");
    let mut before = fetch(&args.admin)?;
    let mut at = Instant::now();
    for _ in 0..args.count.unwrap_or(u32::MAX) {
        std::thread::sleep(Duration::from_secs_f64(every));
        let now = fetch(&args.admin)?;
        let elapsed = at.elapsed().as_secs_f64();
        at = Instant::now();
        // Clear the screen only on a terminal, so that the output can be piped or logged.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", with_rates(&before, &now, elapsed));
        before = now;
    }
    Ok(ExitCode::SUCCESS)
}

fn fetch(admin: &super::AdminArgs) -> anyhow::Result<String> {
    let (status, body) = crate::admin::http_request(admin.admin, "GET", "/metrics")?;
    if status != 200 {
        anyhow::bail!("admin endpoint answered {status}: {}", body.trim());
    }
    Ok(body)
}

fn samples(metrics: &str) -> Vec<(&str, &str)> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .collect()
}

/// One line per non-zero sample of the Prometheus text, aligned; zero samples are left out so drops stand out.
pub fn summarize(metrics: &str) -> String {
    let samples: Vec<(&str, &str)> = samples(metrics)
        .into_iter()
        .filter(|(_, v)| v.parse::<f64>().map(|v| v != 0.0).unwrap_or(true))
        .collect();
    let width = samples.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    samples.iter().map(|(name, value)| format!("{name:<width$}  {value}\n")).collect()
}

/// The non-zero samples of `now`, counters (`_total`) with their rate per second since `before`.
pub fn with_rates(before: &str, now: &str, seconds: f64) -> String {
    let old: HashMap<&str, f64> =
        samples(before).into_iter().filter_map(|(n, v)| Some((n, v.parse().ok()?))).collect();
    let rows: Vec<(&str, f64, Option<f64>)> = samples(now)
        .into_iter()
        .filter_map(|(name, v)| {
            let v: f64 = v.parse().ok()?;
            let counter = name.split('{').next().is_some_and(|n| n.ends_with("_total"));
            let rate =
                counter.then(|| (v - old.get(name).copied().unwrap_or(v)).max(0.0) / seconds.max(1e-9));
            (v != 0.0).then_some((name, v, rate))
        })
        .collect();
    let width = rows.iter().map(|(n, _, _)| n.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(name, v, rate)| match rate {
            Some(r) => format!("{name:<width$}  {v:>14}  {r:>12.1}/s\n"),
            None => format!("{name:<width$}  {v:>14}\n"),
        })
        .collect()
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

    #[test]
    fn watch_shows_counter_rates_over_the_interval() {
        let before = "x_total{a=\"c\"} 100\negressd_workers 2\n";
        let now = "x_total{a=\"c\"} 350\negressd_workers 2\ny_total 0\n";
        let out = super::with_rates(before, now, 2.5);
        let counter = out.lines().find(|l| l.starts_with("x_total")).unwrap();
        assert!(counter.trim_end().ends_with("100.0/s"), "{out}");
        let gauge = out.lines().find(|l| l.starts_with("egressd_workers")).unwrap();
        assert!(!gauge.contains("/s"), "gauges have no rate: {out}");
        assert!(!out.contains("y_total"), "zero samples are left out: {out}");
    }
}
