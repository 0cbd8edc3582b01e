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
