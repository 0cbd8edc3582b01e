//! The Debian package (scripts/package-deb): built from this tree, installed with dpkg on this machine, its man
//! pages, completions and unit checked, the unit's own command lines started in the lab with the lab's
//! configuration in place of /etc/egressd/egressd.toml, and the package purged again.
//!
//! CI machines do not run systemd as PID 1, so the test does what the unit tells systemd to do: it runs the
//! installed unit's `ExecStartPre=` and `ExecStart=` lines, with `NOTIFY_SOCKET` pointing at a socket the test
//! reads (`Type=notify`), and stops the gateway with the unit's `KillSignal=`.

mod support;

use std::process::{Command, Stdio};

use support::{lab_config, repo_root, Lab};

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Removes the package even when the test fails half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "egressd"]).output();
    }
}

/// The value of `key=` in the unit's `[Service]` section.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}=:\n{unit}"))
        .to_string()
}

#[test]
fn the_debian_package_installs_documents_and_starts_the_gateway() {
    let out = tempfile::tempdir().unwrap();
    let binary = support::egressd_bin();
    let build = Command::new(repo_root().join("scripts/package-deb"))
        .args(["--binary", binary.to_str().unwrap(), "--out", out.path().to_str().unwrap()])
        .output()
        .expect("scripts/package-deb");
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let deb = String::from_utf8_lossy(&build.stdout).trim().to_string();

    let (ok, contents) = run("dpkg-deb", &["--contents", &deb]);
    assert!(ok, "{contents}");
    for file in [
        "./usr/bin/egressd",
        "./lib/systemd/system/egressd.service",
        "./etc/egressd/egressd.toml",
        "./usr/share/man/man8/egressd.8.gz",
        "./usr/share/man/man8/egressd-flows.8.gz",
        "./usr/share/man/man8/egressd-import.8.gz",
        "./usr/share/bash-completion/completions/egressd",
        "./usr/share/zsh/vendor-completions/_egressd",
        "./usr/share/fish/vendor_completions.d/egressd.fish",
        "./usr/share/doc/egressd/examples/istio-egress.toml",
        "./usr/share/doc/egressd/monitoring/egressd-alerts.yml",
    ] {
        assert!(contents.contains(file), "{file} missing from the package:\n{contents}");
    }
    let (_, info) = run("dpkg-deb", &["--info", &deb]);
    assert!(info.contains("Depends: ") && info.contains("libc6"), "{info}");

    // Docs and completions are read from the package itself: minimal images exclude /usr/share/man from
    // installs (dpkg path-exclude).
    let extracted = tempfile::tempdir().unwrap();
    let (ok, text) = run("dpkg-deb", &["-x", &deb, extracted.path().to_str().unwrap()]);
    assert!(ok, "{text}");
    let file = |path: &str| extracted.path().join(path).to_str().unwrap().to_string();

    let _installed = Installed;
    let (ok, text) = run("dpkg", &["-i", &deb]);
    assert!(ok, "dpkg -i: {text}");
    let (ok, version) = run("/usr/bin/egressd", &["--version"]);
    assert!(ok && version.starts_with("egressd "), "{version}");
    // The packaged configuration is a valid default-deny policy.
    let (ok, text) = run("/usr/bin/egressd", &["check", "/etc/egressd/egressd.toml"]);
    assert!(ok, "{text}");
    let (_, conffiles) = run("dpkg-query", &["--showformat=${Conffiles}", "--show", "egressd"]);
    assert!(conffiles.contains("/etc/egressd/egressd.toml"), "{conffiles}");

    // Man pages render and say what the CLI says.
    let (ok, page) = run("man", &["-P", "cat", "-l", &file("usr/share/man/man8/egressd.8.gz")]);
    assert!(ok, "{page}");
    for part in ["default-deny", "flows", "doctor", "/etc/egressd/egressd.toml", "SIGHUP"] {
        assert!(page.contains(part), "{part} missing from egressd(8):\n{page}");
    }
    let (ok, page) = run("man", &["-P", "cat", "-l", &file("usr/share/man/man8/egressd-flows.8.gz")]);
    assert!(ok && page.contains("--egress") && page.contains("--delete"), "{page}");

    // Bash completes subcommands and their options.
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let script = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; \
             COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; _egressd egressd '{}' '{}'; echo \"${{COMPREPLY[@]}}\"",
            file("usr/share/bash-completion/completions/egressd"),
            words.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2],
        );
        run("bash", &["-c", &script]).1
    };
    assert!(complete("egressd fl").contains("flows"), "{}", complete("egressd fl"));
    assert!(complete("egressd flows --del").contains("--delete"), "{}", complete("egressd flows --del"));

    // The installed unit verifies against the installed binary.
    let (ok, text) = run("systemd-analyze", &["verify", "/lib/systemd/system/egressd.service"]);
    assert!(ok, "systemd-analyze verify: {text}");

    // The unit's command lines, in the lab, with the lab's configuration where the unit expects its own.
    let unit = std::fs::read_to_string("/lib/systemd/system/egressd.service").unwrap();
    let (pre, start, signal) =
        (unit_value(&unit, "ExecStartPre"), unit_value(&unit, "ExecStart"), unit_value(&unit, "KillSignal"));
    assert!(start.starts_with("/usr/bin/egressd run /etc/egressd/egressd.toml"), "{start}");
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(str::to_string);
    let sockets = tempfile::tempdir().unwrap();
    let notify_path = sockets.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let log = sockets.path().join("egressd.log");
    let script =
        format!("mount --bind {} /etc/egressd/egressd.toml && {pre} && exec {start}", config.display());
    let mut gateway = Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw"), "unshare", "-m", "sh", "-c", &script])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the unit's command");
    let mut buf = [0u8; 128];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        let _ = gateway.kill();
        panic!("no READY=1 ({e}):\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    });
    assert_eq!(&buf[..n], b"READY=1\n");
    let body = lab.curl("http://203.0.113.10/ip", 5);
    assert!(
        body.as_deref().is_some_and(|b| b.starts_with("192.0.2.10:")),
        "traffic through the packaged gateway: {body:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(signal, "SIGTERM");
    let (ok, _) = run("kill", &["-TERM", &gateway.id().to_string()]);
    assert!(ok);
    let status = gateway.wait().unwrap();
    assert!(
        status.success(),
        "exit on SIGTERM: {status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.lines().any(|l| l.starts_with('{')), "--log-format json from the unit: {log}");

    drop(_installed);
    assert!(!std::path::Path::new("/usr/bin/egressd").exists(), "purged");
}
