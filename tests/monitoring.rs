//! The Prometheus alert rules shipped in `conf/monitoring/` load (`promtool check rules`) and fire on series shaped
//! like egressd's, and only on those (`promtool test rules`). That every series they use is exported by a running
//! gateway is checked in the lab (`tests/lab.rs`).

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/monitoring");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool (scripts/setup installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_load() {
    promtool(&["check", "rules", "egressd-alerts.yml"]);
}

#[test]
fn alert_rules_fire_on_their_unit_test_series() {
    promtool(&["test", "rules", "egressd-alerts.test.yml"]);
}

/// The dashboard's queries, with Grafana's variables given values Prometheus accepts.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/monitoring/egressd-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("valid JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("every panel has a title").to_string();
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            queries.push((title.clone(), expr.replace("$__rate_interval", "5m").replace("$job", ".*")));
        }
    }
    queries
}

/// Every dashboard query is valid PromQL (`promtool check rules` on them as recording rules), and the panels
/// cover what an operator watches.
#[test]
fn the_grafana_dashboard_queries_are_valid_promql() {
    let queries = dashboard_queries();
    let titles: Vec<String> = queries.iter().map(|(t, _)| t.to_lowercase()).collect();
    for topic in ["throughput", "drops", "nat flows", "ports", "policy decisions", "l7 decisions", "reloads"]
    {
        assert!(titles.iter().any(|t| t.contains(topic)), "no panel about {topic}");
    }
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "  - record: dashboard:query_{i}\n    expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).expect("write rules");
    let out = Command::new("promtool").args(["check", "rules"]).arg(&file).output().expect("promtool");
    assert!(
        out.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
