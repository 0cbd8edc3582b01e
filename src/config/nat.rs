//! `[nat]`: conntrack limits and timers. Every key is optional; the defaults are the RFC recommendations.
//!
//! ```toml
//! [nat]
//! max_flows = 1048576             # sessions, all workers together (each worker gets its share)
//! max_flows_per_source = 16384    # sessions one inside address may hold (RFC 6888 REQ-4/5)
//! udp_timeout = "5m"              # RFC 4787 REQ-5: at least 2 min
//! tcp_established_timeout = "2h4m"  # RFC 5382 REQ-5: at least 2 h 4 min
//! tcp_transitory_timeout = "4m"   # RFC 5382 REQ-5: at least 4 min
//! icmp_timeout = "60s"            # RFC 5508 REQ-2: at least 60 s
//! port_quarantine = "2m"          # RFC 6888 REQ-8: a freed port is not reused before this
//! icmp_on_out_of_ports = false    # answer a new flow that finds no free port with ICMP 3/13
//! icmp_rate = 1000                # ICMP errors per second per worker (token bucket refill)
//! icmp_burst = 50                 # ICMP errors a worker may send at once
//! log = "off"                     # translation log: "off", "all", or "sampled"
//! log_sample = 100                # with "sampled": one flow in this many
//! log_rate = 10000                # records per second per worker; beyond it they are counted, not written
//! ```
//!
//! The translation log writes a line (target `egressd::nat`, JSON with `--log-format json`) when a flow's
//! translation is created and when the flow ends: inside, egress and remote ip:port, protocol, group, rule,
//! start and end time, packets and bytes each way, and why it ended. It is what an abuse report about an egress
//! IP and port needs. Lines beyond `log_rate` are counted in `egressd_nat_log_suppressed_total`.
//!
//! Durations are integers (seconds) or strings of `<number><unit>` parts, units `d`, `h`, `m`, `s`
//! (`"2h4m"`, `"300s"`, `"90"`). Timers below the RFC minimums are accepted with a warning naming the requirement
//! they break (`check --strict` refuses them): the RFCs say MUST NOT, and a NAT that drops idle-but-alive flows
//! breaks applications in ways that are hard to trace, but operators moving from Cloud NAT (TCP established 20 min)
//! or nftables choose shorter timers on purpose. A quarantine under 120 s is a warning too (RFC 6888 says SHOULD).
//!
//! `icmp_on_out_of_ports` is off by default: RFC 6888 makes the error optional, the kernel's
//! NAT and VPP's NAT44 drop silently, and a silent drop sends no traffic of the gateway's own. Turned on, a
//! client whose new flow finds no port fails at once ("no route to host") instead of waiting out its timeout.
//! The rate defaults are Linux's `icmp_ratelimit` (1 per ms) and `icmp_msgs_burst` (50).

use serde::Deserialize;
use toml::Spanned;

use super::{Diagnostics, Source};

/// A duration as written: seconds, or text like `"2h4m"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Secs(i64),
    Text(String),
}

impl DurationValue {
    /// Seconds, or why the value is not a duration.
    pub fn seconds(&self) -> Result<u64, String> {
        match self {
            DurationValue::Secs(s) => u64::try_from(*s).map_err(|_| format!("{s} is negative")),
            DurationValue::Text(t) => parse_duration(t),
        }
    }
}

/// `"2h4m"`, `"300s"`, `"1d"`, `"90"` → seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("\"{text}\" is not a duration (e.g. 300, \"5m\", \"2h4m\", \"60s\")");
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in t.chars() {
        if let Some(d) = c.to_digit(10) {
            num = Some(
                num.unwrap_or(0).checked_mul(10).and_then(|n| n.checked_add(u64::from(d))).ok_or_else(bad)?,
            );
            continue;
        }
        let unit = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n = num.take().ok_or_else(bad)?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
    }
    if let Some(n) = num {
        total = total.checked_add(n).ok_or_else(bad)?;
    }
    Ok(total)
}

/// The `[nat]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// Sessions, all workers together. Default 1 048 576.
    pub max_flows: Option<Spanned<i64>>,
    /// Sessions per inside address, all workers together. Default 16 384.
    pub max_flows_per_source: Option<Spanned<i64>>,
    pub udp_timeout: Option<Spanned<DurationValue>>,
    pub tcp_established_timeout: Option<Spanned<DurationValue>>,
    pub tcp_transitory_timeout: Option<Spanned<DurationValue>>,
    pub icmp_timeout: Option<Spanned<DurationValue>>,
    pub port_quarantine: Option<Spanned<DurationValue>>,
    /// Answer a new flow refused for want of a NAT port with ICMP 3/13. Default false.
    pub icmp_on_out_of_ports: Option<bool>,
    /// ICMP errors per second per worker. Default 1000.
    pub icmp_rate: Option<Spanned<i64>>,
    /// ICMP errors a worker may send at once. Default 50.
    pub icmp_burst: Option<Spanned<i64>>,
    /// Translation log: "off" (default), "all", "sampled".
    pub log: Option<Spanned<String>>,
    /// With `log = "sampled"`: one flow in this many. Default 100.
    pub log_sample: Option<Spanned<i64>>,
    /// Translation log records per second per worker. Default 10 000.
    pub log_rate: Option<Spanned<i64>>,
}

/// The name `config::Config` uses for this section.
pub type NatConfig = NatSection;

pub const DEFAULT_MAX_FLOWS: u32 = 1 << 20;
pub const DEFAULT_MAX_FLOWS_PER_SOURCE: u32 = 16384;
/// Largest `icmp_rate` / `icmp_burst` accepted.
const MAX_ICMP_RATE: i64 = 1_000_000;
/// Largest `log_rate` / `log_sample` accepted.
const MAX_LOG_RATE: i64 = 1_000_000;

/// Longest timer accepted (the engine keeps times in 31-bit seconds; a week is plenty).
const MAX_TIMER_SECS: u64 = 7 * 86400;
/// Largest table a worker can address (slot indexes are 31-bit).
const MAX_FLOWS: i64 = 1 << 30;

/// (key, RFC minimum seconds, RFC reference, default seconds)
const TIMERS: [(&str, u64, &str, u64); 4] = [
    ("udp_timeout", 120, "RFC 4787 REQ-5", 300),
    ("tcp_established_timeout", 7440, "RFC 5382 REQ-5", 7440),
    ("tcp_transitory_timeout", 240, "RFC 5382 REQ-5", 240),
    ("icmp_timeout", 60, "RFC 5508 REQ-2", 60),
];

impl NatSection {
    fn timer(&self, i: usize) -> Option<&Spanned<DurationValue>> {
        match i {
            0 => self.udp_timeout.as_ref(),
            1 => self.tcp_established_timeout.as_ref(),
            2 => self.tcp_transitory_timeout.as_ref(),
            3 => self.icmp_timeout.as_ref(),
            _ => self.port_quarantine.as_ref(),
        }
    }

    fn secs(&self, i: usize, default: u64) -> u32 {
        self.timer(i).and_then(|v| v.get_ref().seconds().ok()).unwrap_or(default).min(MAX_TIMER_SECS) as u32
    }

    pub fn max_flows(&self) -> u32 {
        self.max_flows.as_ref().map_or(DEFAULT_MAX_FLOWS, |v| (*v.get_ref()).clamp(1, MAX_FLOWS) as u32)
    }

    pub fn max_flows_per_source(&self) -> u32 {
        self.max_flows_per_source
            .as_ref()
            .map_or(DEFAULT_MAX_FLOWS_PER_SOURCE, |v| (*v.get_ref()).clamp(1, MAX_FLOWS) as u32)
    }

    pub fn timeouts(&self) -> dataplane::nat::Timeouts {
        dataplane::nat::Timeouts {
            udp_secs: self.secs(0, TIMERS[0].3),
            tcp_established_secs: self.secs(1, TIMERS[1].3),
            tcp_transitory_secs: self.secs(2, TIMERS[2].3),
            icmp_secs: self.secs(3, TIMERS[3].3),
        }
    }

    pub fn port_quarantine_secs(&self) -> u32 {
        self.secs(4, 120)
    }

    /// The ICMP errors the gateway originates (per worker: each worker has its own token bucket).
    pub fn icmp_errors(&self) -> dataplane::icmp::IcmpErrors {
        let value = |v: &Option<Spanned<i64>>, default: u32| {
            v.as_ref().map_or(default, |v| (*v.get_ref()).clamp(1, MAX_ICMP_RATE) as u32)
        };
        dataplane::icmp::IcmpErrors {
            on_out_of_ports: self.icmp_on_out_of_ports.unwrap_or(false),
            per_sec: value(&self.icmp_rate, dataplane::icmp::DEFAULT_PER_SEC),
            burst: value(&self.icmp_burst, dataplane::icmp::DEFAULT_BURST),
        }
    }

    /// The translation log's mode.
    pub fn log_mode(&self) -> dataplane::nat::NatLogMode {
        use dataplane::nat::NatLogMode;
        match self.log.as_ref().map(|v| v.get_ref().as_str()) {
            Some("all") => NatLogMode::All,
            Some("sampled") => NatLogMode::Sampled {
                one_in: self
                    .log_sample
                    .as_ref()
                    .map_or(100, |v| (*v.get_ref()).clamp(1, MAX_LOG_RATE) as u32),
            },
            _ => NatLogMode::Off,
        }
    }

    /// Translation log records per second per worker.
    pub fn log_rate(&self) -> u32 {
        self.log_rate
            .as_ref()
            .map_or(dataplane::nat::DEFAULT_RECORDS_PER_SEC, |v| (*v.get_ref()).clamp(1, MAX_LOG_RATE) as u32)
    }

    /// One worker's engine settings. The flow limits are totals: each worker gets `ceil(total / workers)` (RSS
    /// spreads a source's flows over the workers, so its per-source share is divided the same way).
    pub fn to_engine(&self, workers: u16) -> dataplane::nat::NatConfig {
        let w = u32::from(workers.max(1));
        dataplane::nat::NatConfig {
            max_flows: self.max_flows().div_ceil(w),
            max_flows_per_source: self.max_flows_per_source().div_ceil(w),
            timeouts: self.timeouts(),
            port_quarantine_secs: self.port_quarantine_secs(),
            workers: workers.max(1),
            icmp_errors: self.icmp_errors(),
            reserved_tcp_ports: None,
        }
    }

    pub fn validate(&self, src: &Source, diags: &mut Diagnostics) {
        let counts = [
            ("icmp_rate", &self.icmp_rate, MAX_ICMP_RATE),
            ("icmp_burst", &self.icmp_burst, MAX_ICMP_RATE),
            ("max_flows", &self.max_flows, MAX_FLOWS),
            ("max_flows_per_source", &self.max_flows_per_source, MAX_FLOWS),
            ("log_sample", &self.log_sample, MAX_LOG_RATE),
            ("log_rate", &self.log_rate, MAX_LOG_RATE),
        ];
        if let Some(v) = &self.log {
            if !["off", "all", "sampled"].contains(&v.get_ref().as_str()) {
                diags.error(
                    src,
                    v.span(),
                    format!("log: \"{}\" must be \"off\", \"all\" or \"sampled\"", v.get_ref()),
                );
            }
        }
        if let (Some(sample), false) =
            (&self.log_sample, self.log.as_ref().is_some_and(|v| v.get_ref() == "sampled"))
        {
            diags.warn(src, sample.span(), "log_sample: has no effect unless log = \"sampled\"".to_string());
        }
        for (key, value, max) in counts {
            if let Some(v) = value {
                let n = *v.get_ref();
                if !(1..=max).contains(&n) {
                    diags.error(src, v.span(), format!("{key}: {n} must be 1..={max}"));
                }
            }
        }
        if let (Some(per), Some(total)) = (&self.max_flows_per_source, &self.max_flows) {
            if per.get_ref() > total.get_ref() {
                diags.warn(
                    src,
                    per.span(),
                    format!(
                        "max_flows_per_source: {} is above max_flows ({}): no effect",
                        per.get_ref(),
                        total.get_ref()
                    ),
                );
            }
        }
        for (i, (key, min, rfc, _)) in TIMERS.iter().enumerate() {
            let Some(v) = self.timer(i) else { continue };
            match v.get_ref().seconds() {
                Err(e) => diags.error(src, v.span(), format!("{key}: {e}")),
                Ok(0) => diags.error(src, v.span(), format!("{key}: 0 s would end every flow at once")),
                // Operators moving from Cloud NAT or nftables choose shorter timers on purpose: allowed, but said
                // (and refused by `check --strict`).
                Ok(s) if s < *min => diags.warn(
                    src,
                    v.span(),
                    format!(
                        "{key}: {s} s is below the {min} s minimum of {rfc}: idle flows that are still alive will \
                         be cut"
                    ),
                ),
                Ok(s) if s > MAX_TIMER_SECS => diags.error(
                    src,
                    v.span(),
                    format!("{key}: {s} s is above the {MAX_TIMER_SECS} s maximum"),
                ),
                Ok(_) => {}
            }
        }
        if let Some(v) = &self.port_quarantine {
            match v.get_ref().seconds() {
                Err(e) => diags.error(src, v.span(), format!("port_quarantine: {e}")),
                Ok(s) if s > MAX_TIMER_SECS => diags.error(
                    src,
                    v.span(),
                    format!("port_quarantine: {s} s is above the {MAX_TIMER_SECS} s maximum"),
                ),
                Ok(s) if s < 120 => diags.warn(
                    src,
                    v.span(),
                    format!("port_quarantine: {s} s is below the 120 s RFC 6888 REQ-8 recommends"),
                ),
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Source};

    const HEAD: &str = "[dataplane]\ninside = \"a\"\noutside = \"b\"\n[nat]\n";

    fn load(nat: &str) -> Result<crate::config::Loaded, Vec<String>> {
        parse(Source::new("t.toml", format!("{HEAD}{nat}")))
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn defaults_are_the_rfc_defaults() {
        let l = parse(Source::new("t.toml", "[dataplane]\ninside = \"a\"\noutside = \"b\"\n")).unwrap();
        let e = l.config.nat.to_engine(1);
        assert_eq!(e.timeouts, dataplane::nat::Timeouts::default());
        assert_eq!(e.timeouts.udp_secs, 300);
        assert_eq!(e.timeouts.tcp_established_secs, 7440);
        assert_eq!(e.timeouts.tcp_transitory_secs, 240);
        assert_eq!(e.timeouts.icmp_secs, 60);
        assert_eq!((e.max_flows, e.max_flows_per_source, e.port_quarantine_secs), (1 << 20, 16384, 120));
        assert_eq!(
            e.icmp_errors,
            dataplane::icmp::IcmpErrors { on_out_of_ports: false, per_sec: 1000, burst: 50 }
        );
    }

    #[test]
    fn icmp_on_out_of_ports_and_its_rate() {
        let l = load(
            "icmp_on_out_of_ports = true
icmp_rate = 20
icmp_burst = 5
",
        )
        .unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(
            l.config.nat.to_engine(2).icmp_errors,
            dataplane::icmp::IcmpErrors { on_out_of_ports: true, per_sec: 20, burst: 5 }
        );
        let e = load(
            "icmp_rate = 0
icmp_burst = 2000000
",
        )
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(e[0].starts_with("t.toml:5:13: icmp_rate: 0 must be 1..="), "{}", e[0]);
        assert!(e[1].starts_with("t.toml:6:14: icmp_burst: 2000000 must be 1..="), "{}", e[1]);
        let e = load("icmp_on_out_of_ports = \"yes\"\n").unwrap_err();
        assert!(e[0].starts_with("t.toml:5:"), "{e:?}");
    }

    #[test]
    fn values_in_seconds_and_text_and_per_worker_shares() {
        let l = load(
            "max_flows = 1000\nmax_flows_per_source = 100\nudp_timeout = \"2m\"\ntcp_established_timeout = \"2h4m\"\n\
             tcp_transitory_timeout = 300\nicmp_timeout = \"1m30s\"\nport_quarantine = \"1d\"\n",
        )
        .unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let e = l.config.nat.to_engine(3);
        assert_eq!((e.max_flows, e.max_flows_per_source, e.workers), (334, 34, 3));
        assert_eq!(
            e.timeouts,
            dataplane::nat::Timeouts {
                udp_secs: 120,
                tcp_established_secs: 7440,
                tcp_transitory_secs: 300,
                icmp_secs: 90
            }
        );
        assert_eq!(e.port_quarantine_secs, 86400);
    }

    #[test]
    fn timers_below_the_rfc_minimums_are_warnings_naming_the_requirement() {
        let l = load(
            "udp_timeout = 119\ntcp_established_timeout = \"20m\"\ntcp_transitory_timeout = \"3m\"\n\
             icmp_timeout = 59\n",
        )
        .unwrap();
        let warnings: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
        let want = [
            "t.toml:5:15: udp_timeout: 119 s is below the 120 s minimum of RFC 4787 REQ-5: idle flows that are still alive will be cut",
            "t.toml:6:27: tcp_established_timeout: 1200 s is below the 7440 s minimum of RFC 5382 REQ-5: idle flows that are still alive will be cut",
            "t.toml:7:26: tcp_transitory_timeout: 180 s is below the 240 s minimum of RFC 5382 REQ-5: idle flows that are still alive will be cut",
            "t.toml:8:16: icmp_timeout: 59 s is below the 60 s minimum of RFC 5508 REQ-2: idle flows that are still alive will be cut",
        ];
        assert_eq!(warnings, want);
        assert_eq!(l.config.nat.to_engine(1).timeouts.tcp_established_secs, 1200, "and the timer is used");
        assert_eq!(
            load("udp_timeout = 0\n").unwrap_err(),
            ["t.toml:5:15: udp_timeout: 0 s would end every flow at once"]
        );
    }

    #[test]
    fn bad_values_are_errors_with_positions() {
        let e = load(
            "max_flows = 0\nmax_flows_per_source = -1\nudp_timeout = \"5 minutes\"\nicmp_timeout = -5\n",
        )
        .unwrap_err();
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(e[0].starts_with("t.toml:5:13: max_flows: 0 must be"), "{}", e[0]);
        assert!(e[1].starts_with("t.toml:6:24: max_flows_per_source: -1 must be"), "{}", e[1]);
        assert!(e[2].starts_with("t.toml:7:15: udp_timeout: \"5 minutes\" is not a duration"), "{}", e[2]);
        assert!(e[3].starts_with("t.toml:8:16: icmp_timeout: -5 is negative"), "{}", e[3]);
        let e = load("udp_timeout = \"8d\"\n").unwrap_err();
        assert!(e[0].starts_with("t.toml:5:15: udp_timeout: 691200 s is above"), "{}", e[0]);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = load("udp_timout = 300\n").unwrap_err();
        assert!(e[0].starts_with("t.toml:5:1: ") && e[0].contains("unknown field `udp_timout`"), "{e:?}");
    }

    #[test]
    fn short_quarantine_is_a_warning() {
        let l = load("port_quarantine = 30\n").unwrap();
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].to_string().starts_with("t.toml:5:19: port_quarantine: 30 s is below"));
        assert_eq!(l.config.nat.to_engine(1).port_quarantine_secs, 30);
    }

    #[test]
    fn duration_syntax() {
        assert_eq!(parse_duration("2h4m"), Ok(7440));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("1d1s"), Ok(86401));
        for bad in ["", "m", "5x", "1.5m", "-3s", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_translation_log_is_configured_and_checked() {
        use dataplane::nat::NatLogMode;
        let l = load("log = \"sampled\"\nlog_sample = 10\nlog_rate = 500\n").unwrap();
        assert_eq!(l.config.nat.log_mode(), NatLogMode::Sampled { one_in: 10 });
        assert_eq!(l.config.nat.log_rate(), 500);
        assert_eq!(load("log = \"all\"\n").unwrap().config.nat.log_mode(), NatLogMode::All);
        let defaults = load("").unwrap();
        assert_eq!(
            (defaults.config.nat.log_mode(), defaults.config.nat.log_rate()),
            (NatLogMode::Off, 10_000)
        );
        let e = load("log = \"everything\"\n").unwrap_err();
        assert!(
            e[0].contains("t.toml:5:7") && e[0].contains("must be \"off\", \"all\" or \"sampled\""),
            "{e:?}"
        );
        let e = load("log = \"all\"\nlog_rate = 0\n").unwrap_err();
        assert!(e[0].contains("log_rate: 0 must be 1..=1000000"), "{e:?}");
    }
}
