//! Lab fixtures for integration tests: a [`Lab`] (three namespaces from `scripts/lab`, torn down on drop, even
//! when the test panics) and a running [`Gateway`] (egressd in the lab's gw namespace, stopped on drop).
//!
//! Lab tests need root, iproute2, nginx, socat and curl. When one is missing they fail with a message naming
//! it: a lab test that silently passes would prove nothing. Labs are serialised within a test binary (the
//! gateway pins its worker to the same core in every lab).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static LAB_LOCK: Mutex<()> = Mutex::new(());
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn egressd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_egressd"))
}

/// Fails the test (does not skip it) when the lab cannot run here.
pub fn require_lab_preconditions() {
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "lab tests must run as root (they create network namespaces and attach XDP programs); run scripts/test as root"
    );
    for tool in ["ip", "ethtool", "nginx", "socat", "curl", "ping"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().expect("run sh");
        assert!(found.status.success(), "lab tests need `{tool}`: run scripts/setup first");
    }
}

/// Three namespaces joined by veth pairs, with servers in ext. Removed on drop.
pub struct Lab {
    pub id: String,
    _serialised: MutexGuard<'static, ()>,
}

impl Lab {
    /// Brings up a lab with one queue per worker of [`lab_workers`]. `route_back`: ext routes the client subnets
    /// back to gw (forwarding without NAT).
    pub fn up(route_back: bool) -> Lab {
        Lab::up_with(route_back, lab_workers())
    }

    /// As [`Lab::up`], with `queues` active queues on every veth (2: one per worker of a 2-worker gateway).
    pub fn up_with(route_back: bool, queues: u32) -> Lab {
        Lab::up_opts(route_back, queues, 1500)
    }

    /// As [`Lab::up`], with MTU `mtu` on every veth.
    pub fn up_with_mtu(mtu: u32) -> Lab {
        Lab::up_opts(false, lab_workers(), mtu)
    }

    fn up_opts(route_back: bool, queues: u32, mtu: u32) -> Lab {
        require_lab_preconditions();
        let serialised = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // scripts/lab takes ids of at most 8 characters.
        let id =
            format!("t{}x{}", std::process::id() % 10_000, LAB_COUNTER.fetch_add(1, Ordering::Relaxed) % 100);
        let mut cmd = Command::new(repo_root().join("scripts/lab"));
        cmd.args(["up", &id]);
        if route_back {
            cmd.arg("--route-back");
        }
        cmd.args(["--queues", &queues.to_string(), "--mtu", &mtu.to_string()]);
        let lab = Lab { id, _serialised: serialised };
        let out = cmd.output().expect("run scripts/lab up");
        assert!(
            out.status.success(),
            "scripts/lab up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    pub fn ns(&self, role: &str) -> String {
        format!("egd-{}-{}", self.id, role)
    }

    /// What the lab's nginx in ext logged so far (its access log: one line per request it answered).
    pub fn nginx_access_log(&self) -> String {
        let path = format!("/tmp/egressd-lab-{}/nginx-access.log", self.id);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    /// Runs `program args…` in the namespace of `role` and returns its output (never panics on failure).
    pub fn exec(&self, role: &str, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {role}: {e}"))
    }

    /// Runs a shell snippet in the namespace of `role`.
    pub fn sh(&self, role: &str, script: &str) -> Output {
        self.exec(role, "sh", &["-c", script])
    }

    /// Runs a Python script in the namespace of `role` and returns what it printed; the test fails if it fails.
    pub fn python(&self, role: &str, script: &str) -> String {
        let out = self.exec(role, "python3", &["-c", script]);
        assert!(out.status.success(), "python in {role} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a Python script in the namespace of `role` with its stdout piped (read it with [`stdout_of`]).
    pub fn spawn_python(&self, role: &str, script: &str) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "python3", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python in {role}: {e}"))
    }

    /// Starts a Python server in the namespace of `role` and waits until it listens on every TCP address of
    /// `listening` ("203.0.113.23:8080"); it is killed when the returned guard drops.
    pub fn start_python_server(&self, role: &str, script: &str, listening: &[&str]) -> KillOnDrop {
        let server = KillOnDrop(self.spawn_python_server(role, script));
        wait_for(
            || {
                let ss = String::from_utf8_lossy(&self.sh(role, "ss -lnt").stdout).into_owned();
                listening.iter().all(|address| ss.contains(address))
            },
            &format!("a Python server in {role} listening on {}", listening.join(", ")),
        );
        server
    }

    /// Starts a Python server in the namespace of `role`, its output discarded.
    pub fn spawn_python_server(&self, role: &str, script: &str) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "python3", "-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python in {role}: {e}"))
    }

    /// GETs `url` from the client namespace; `Some(body)` on HTTP 200 within `timeout_s` seconds.
    pub fn curl(&self, url: &str, timeout_s: u32) -> Option<String> {
        let out = self.exec("client", "curl", &["-sf", "-m", &timeout_s.to_string(), url]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Opens `count` new UDP flows one after another from `src` (client ports `first`..), each sending one
    /// datagram to the echo at 203.0.113.10:7 and waiting at most 1 s for it to come back; returns how many did.
    pub fn udp_flows(&self, src: &str, first: u16, count: u16) -> u32 {
        let out =
            self.exec("client", "python3", &["-c", UDP_FLOWS, src, &first.to_string(), &count.to_string()]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    /// Sends `payload` to `addr:port` over UDP from the client; returns what came back within 2 s.
    pub fn udp_echo(&self, target: &str, payload: &str) -> String {
        let out = self.sh("client", &format!("printf '%s' '{payload}' | socat -T2 - UDP4:{target}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The MAC address of `iface` in the namespace of `role`.
    pub fn mac(&self, role: &str, iface: &str) -> [u8; 6] {
        let out = self.exec(role, "cat", &[&format!("/sys/class/net/{iface}/address")]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.trim().split(':')) {
            *byte =
                u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("MAC of {role}/{iface}: {text:?}"));
        }
        mac
    }

    /// Sends crafted Ethernet frames out of `iface` in the namespace of `role`, in order.
    pub fn inject(&self, role: &str, iface: &str, frames: &[Vec<u8>]) {
        let script = repo_root().join("tests/support/frames.py");
        let mut args = vec![script.to_str().unwrap().to_string(), "send".into(), iface.into()];
        args.extend(frames.iter().map(|f| f.iter().map(|b| format!("{b:02x}")).collect::<String>()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.exec(role, "python3", &args);
        assert!(out.status.success(), "injecting frames: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts capturing every frame `iface` (in the namespace of `role`) receives for `seconds`; returns once the
    /// capture listens. [`Capture::frames`] waits for the end and returns them.
    pub fn capture(&self, role: &str, iface: &str, seconds: f64) -> Capture {
        use std::io::BufRead;
        let script = repo_root().join("tests/support/frames.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "python3"])
            .arg(script)
            .args(["capture", iface, &seconds.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a capture");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("capture stdout")).lines();
        let first = lines.next().and_then(Result::ok);
        assert_eq!(first.as_deref(), Some("ready"), "the capture did not start");
        Capture { child, lines }
    }

    /// `ip link` of the gw namespace: shows any XDP program attached.
    pub fn gw_links(&self) -> String {
        String::from_utf8_lossy(&self.exec("gw", "ip", &["-d", "link", "show"]).stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/lab"))
            .args(["down", &self.id])
            .stdout(Stdio::null())
            .status();
    }
}

/// How many workers lab gateways run with: `EGRESSD_LAB_WORKERS` (1, the default, or 2). `scripts/test` runs the
/// lab tests once with each, so every behaviour is shown with one worker and with two (one per veth queue, replies
/// and packets of inside endpoints handed between them).
pub fn lab_workers() -> u32 {
    match std::env::var("EGRESSD_LAB_WORKERS").as_deref() {
        Err(_) | Ok("1") => 1,
        Ok("2") => 2,
        Ok(other) => panic!("EGRESSD_LAB_WORKERS={other}: must be 1 or 2"),
    }
}

/// `config` as the gateway should run it: with two lab workers, a copy whose single worker core (`cores = [1]`)
/// becomes `cores = [0, 1]`. Configurations that set their own cores are used as they are.
fn config_for_lab_workers(config: &Path) -> (Option<tempfile::TempDir>, PathBuf) {
    let text = std::fs::read_to_string(config).expect("read the gateway's config");
    if lab_workers() == 1 || !text.contains("cores = [1]") {
        return (None, config.to_path_buf());
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(config.file_name().expect("config file name"));
    std::fs::write(&path, text.replace("cores = [1]", "cores = [0, 1]")).expect("write config");
    (Some(dir), path)
}

/// A running capture of the frames one interface receives ([`Lab::capture`]).
pub struct Capture {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Capture {
    /// Waits for the capture to end; every frame it saw, in order.
    pub fn frames(mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        for line in self.lines.by_ref().map_while(Result::ok) {
            if line == "done" {
                break;
            }
            let bytes =
                (0..line.len() / 2).map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).unwrap_or(0));
            frames.push(bytes.collect());
        }
        let _ = self.child.wait();
        frames
    }
}

/// egressd running in the lab's gw namespace. Stopped (SIGTERM) on drop.
pub struct Gateway<'a> {
    lab: &'a Lab,
    child: Option<Child>,
    pub log: PathBuf,
    _config: Option<tempfile::TempDir>,
}

impl<'a> Gateway<'a> {
    /// Starts `egressd run config` in gw (on [`lab_workers`] workers) and waits until `/readyz` answers 200 (at
    /// most 20 s).
    pub fn start(lab: &'a Lab, config: &Path) -> Gateway<'a> {
        let (config_dir, config) = config_for_lab_workers(config);
        Gateway::start_as_is(lab, &config, config_dir)
    }

    /// As [`Gateway::start`], with `config` exactly as it is, whatever [`lab_workers`] says (`keep` lives as long as
    /// the gateway).
    pub fn start_as_is(lab: &'a Lab, config: &Path, keep: Option<tempfile::TempDir>) -> Gateway<'a> {
        Gateway::start_with_env(lab, config, keep, &[])
    }

    /// As [`Gateway::start_as_is`], with extra environment variables for egressd.
    pub fn start_with_env(
        lab: &'a Lab,
        config: &Path,
        keep: Option<tempfile::TempDir>,
        env: &[(&str, &str)],
    ) -> Gateway<'a> {
        let config_dir = keep;
        let log = std::env::temp_dir().join(format!("egressd-lab-{}.log", lab.id));
        let log_file = std::fs::File::create(&log).expect("create gateway log");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("gw")])
            .arg(egressd_bin())
            .arg("run")
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn egressd");
        let mut gw = Gateway { lab, child: Some(child), log, _config: config_dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = gw.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("egressd exited during start-up ({status}):\n{}", gw.log_text());
            }
            let ready = lab.exec("gw", "curl", &["-sf", "-m", "1", "http://127.0.0.1:9900/readyz"]);
            if ready.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "egressd not ready after 20 s:\n{}", gw.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        // Keep the veth receive work off the worker's core: on a 2-core machine, NAPI on the worker's core collapses
        // throughput (measured: 0.2-0.3 Mpps against about 1 Mpps).
        let _ = Command::new(repo_root().join("scripts/lab")).args(["pin-napi", &lab.id, "0"]).output();
        gw
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The running gateway's metrics as (name{labels}, value) pairs.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let out = self.lab.exec("gw", "curl", &["-sf", "-m", "2", "http://127.0.0.1:9900/metrics"]);
        assert!(out.status.success(), "GET /metrics failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// One metric sample by its exact name and labels, e.g. `egressd_drops_total{reason="policy_deny"}`.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics().into_iter().find(|(n, _)| n == series).map_or(0.0, |(_, v)| v)
    }

    /// Every drop counter (egressd's and the kernel's at its sockets) that is not zero, and the frames received,
    /// sent and handed over, for failure messages: they tell whether a lost packet died in egressd or beyond it.
    pub fn packet_counters(&self) -> String {
        let shown: Vec<String> = self
            .metrics()
            .into_iter()
            .filter(|(name, value)| {
                (name.contains("drops_total") && *value != 0.0)
                    || name.starts_with("egressd_rx_packets_total")
                    || name.starts_with("egressd_tx_packets_total")
                    || name.starts_with("egressd_handoffs_total")
            })
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        format!("counters: [{}]", shown.join(", "))
    }

    /// Sends `signal` (e.g. "HUP") to egressd (`ip netns exec` execs it, so the child is egressd itself).
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("egressd is running");
        let status = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} egressd failed");
    }

    /// The egressd process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("egressd is running").id()
    }

    /// `kill -9`: no clean-up of any kind; waits for the process to be gone.
    pub fn crash(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits (at most 10 s); returns whether egressd exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for a child started with a piped stdout and returns that output, trimmed.
pub fn stdout_of(child: Child) -> String {
    String::from_utf8_lossy(&child.wait_with_output().expect("wait for the child").stdout).trim().to_string()
}

/// Resident memory of process `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A child process killed (and reaped) when this drops, also when the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for(condition: impl FnMut() -> bool, what: &str) {
    wait_for_within(Duration::from_secs(10), condition, what);
}

/// [`wait_for`], and on timeout the panic also says what `explain` returns then (metrics, logs).
pub fn wait_for_explained(condition: impl FnMut() -> bool, what: &str, explain: impl FnOnce() -> String) {
    wait_until(Duration::from_secs(10), condition, || {
        format!("timed out waiting for: {what}\n{}", explain())
    });
}

/// [`wait_for`] with another time limit.
pub fn wait_for_within(limit: Duration, condition: impl FnMut() -> bool, what: &str) {
    wait_until(limit, condition, || format!("timed out waiting for: {what}"));
}

/// Polls `condition` every 100 ms; past `limit`, panics with what `message` says.
fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool, message: impl FnOnce() -> String) {
    let deadline = Instant::now() + limit;
    while !condition() {
        if Instant::now() >= deadline {
            panic!("{}", message());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A copy of `conf/lab.toml` in a temporary directory (kept alive by the returned guard), edited by `edit`: for
/// tests that reload a changed file or run another worker layout. The text `edit` gets, and the "original" returned
/// for later rewrites, already run on [`lab_workers`] workers.
pub fn lab_config(edit: impl FnOnce(&str) -> String) -> (tempfile::TempDir, PathBuf, String) {
    let text = std::fs::read_to_string(repo_root().join("conf/lab.toml")).expect("read conf/lab.toml");
    let original = if lab_workers() == 2 { text.replace("cores = [1]", "cores = [0, 1]") } else { text };
    let (dir, path) = write_config(&edit(&original));
    (dir, path, original)
}

/// As [`lab_config`], whatever [`lab_workers`] says: for tests that choose their worker layout themselves.
pub fn lab_config_as_is(edit: impl FnOnce(&str) -> String) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo_root().join("conf/lab.toml")).expect("read conf/lab.toml");
    write_config(&edit(&text))
}

fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lab.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// dnsmasq in ext on 203.0.113.25:53, answering from `extra_args` (`--address=/NAME/IP`) and from a hosts file
/// the test rewrites with [`Dnsmasq::set_hosts`]. Killed on drop.
pub struct Dnsmasq {
    child: Child,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    pub fn start(lab: &Lab, extra_args: &[&str]) -> Dnsmasq {
        let found = Command::new("sh").args(["-c", "command -v dnsmasq"]).output().expect("run sh");
        assert!(found.status.success(), "this test needs dnsmasq: run scripts/setup first");
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "").expect("hosts file");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns("ext"),
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--listen-address=203.0.113.25", "--bind-interfaces", "--port=53", "--pid-file="])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        wait_for(
            || lab.sh("ext", "ss -lun | grep -q '203.0.113.25:53'").status.success(),
            "dnsmasq listening",
        );
        Dnsmasq { child, hosts, _dir: dir }
    }

    /// Replaces the hosts file (`IP NAME` lines) and has dnsmasq read it again.
    pub fn set_hosts(&self, text: &str) {
        std::fs::write(&self.hosts, text).expect("hosts file");
        let hup = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().expect("kill");
        assert!(hup.success(), "SIGHUP to dnsmasq");
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// [`Lab::udp_flows`]: argv is the source address, the first port and the number of flows.
const UDP_FLOWS: &str = r#"
import socket, sys
src, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for port in range(first, first + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((src, port)); s.settimeout(1)
    s.sendto(b"x", ("203.0.113.10", 7))
    try:
        ok += s.recv(10) == b"x"
    except socket.timeout:
        pass
    s.close()
print(ok)
"#;
