//! `egressd run` refuses bad configurations and missing interfaces before touching the network.

use std::process::Command;

fn run(config_text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_egressd")).arg("run").arg(&path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_unknown_key_is_refused_with_file_line_and_column() {
    let (code, stderr) = run("[dataplane]\ninside = \"a\"\noutside = \"b\"\n  batchsize = 32\n");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("bad.toml:4:3: "), "{stderr}");
    assert!(stderr.contains("unknown field `batchsize`"), "{stderr}");
}

#[test]
fn a_missing_interface_is_named_and_nothing_is_attached() {
    let (code, stderr) = run("[dataplane]\ninside = \"egd-none0\"\noutside = \"egd-none1\"\n");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("interface \"egd-none0\" does not exist"), "{stderr}");
}

/// The systemd unit verifies (`systemd-analyze verify`, with the binary path pointed at this build) and is a
/// `Type=notify` service with a watchdog whose reload fails when the file is refused (`egressd reload`).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/egressd.service")).unwrap();
    for line in
        ["Type=notify", "WatchdogSec=", "ExecReload=/usr/local/bin/egressd reload", "NoNewPrivileges=yes"]
    {
        assert!(unit.lines().any(|l| l.starts_with(line)), "the unit lacks {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("egressd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/egressd", env!("CARGO_BIN_EXE_egressd"))).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
