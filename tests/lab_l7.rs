//! Lab tests of the L7 path through the real gateway: TLS passed through by SNI (the client verifies the
//! server's own certificate: egressd never decrypts), HTTP/1.1 judged by Host on every request of a keep-alive
//! connection, refusals that are explicit and immediate, and the upstream leaving from the group's egress IP.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use support::{lab_config, rss_kib, wait_for, wait_for_explained, Dnsmasq, Gateway, KillOnDrop, Lab};

/// The lab's first rule (web → the servers on TCP 80 and 443) made an `l7` rule for these names.
fn l7_config(text: &str) -> String {
    replace_web_rule(
        text,
        "ports = [80, 443]\naction = \"l7\"\nhosts = [\"httpbin.test\", \"api.stripe.com\", \"*.x.test\"]",
    )
}

/// The lab's first rule (web → the servers on TCP 80 and 443, allowed) with its ports and action replaced by
/// `with`.
fn replace_web_rule(text: &str, with: &str) -> String {
    let own = "ports = [80, 443]\naction = \"allow\"";
    assert!(text.contains(own), "conf/lab.toml changed: update this test");
    text.replacen(own, with, 1)
}

/// A TLS server in ext on 203.0.113.10:443 (python's ssl module) with a certificate for api.stripe.com and
/// *.x.test, answering every request with the address it saw the client at. Killed on drop.
struct TlsServer {
    _process: KillOnDrop,
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
}

impl TlsServer {
    fn start(lab: &Lab) -> TlsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=api.stripe.com",
            ])
            .args(["-addext", "subjectAltName=DNS:api.stripe.com,DNS:*.x.test"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(made.status.success(), "openssl req: {}", String::from_utf8_lossy(&made.stderr));
        let script = format!(
            r#"
import socket, ssl, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{cert}", "{key}")
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.10", 443)); s.listen(64)
import hashlib
def serve(c, peer):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        head = t.recv(65536)
        if head.startswith(b"PUT "):
            # Upload then download: hash what arrives (Content-Length bytes after the head), answer the hash, then
            # send as many bytes of a fixed stream.
            h, rest = head.split(b"\r\n\r\n", 1)
            n = int([l for l in h.split(b"\r\n") if l.lower().startswith(b"content-length:")][0].split(b":")[1])
            sha = hashlib.sha256(rest); got = len(rest)
            while got < n:
                chunk = t.recv(min(1 << 16, n - got))
                if not chunk: break
                sha.update(chunk); got += len(chunk)
            t.sendall(sha.hexdigest().encode() + b"\n")
            block = bytes(range(256)) * 256
            sent = 0
            while sent < n:
                part = block[: min(len(block), n - sent)]
                t.sendall(part); sent += len(part)
            t.close()
            return
        body = "%s:%d\n" % peer
        t.sendall(("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)).encode())
        t.close()
    except Exception:
        c.close()
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#,
            cert = cert.display(),
            key = key.display()
        );
        let process = lab.start_python_server("ext", &script, &["203.0.113.10:443"]);
        TlsServer { _process: process, _dir: dir, cert }
    }

    fn cert(&self) -> &Path {
        &self.cert
    }
}

/// `curl` in the client namespace; (exit code, stdout, stderr, seconds it took).
fn curl(lab: &Lab, args: &[&str]) -> (i32, String, String, f64) {
    let start = Instant::now();
    let out = lab.exec("client", "curl", &[&["-sS", "-m", "5"], args].concat());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed().as_secs_f64(),
    )
}

/// The upstream's source as the server saw it: from the group's egress IP, on a port of the L7 range.
fn assert_from_l7_range(seen: &str) {
    let (ip, port) = seen.trim().rsplit_once(':').unwrap_or_else(|| panic!("server answered {seen:?}"));
    assert_eq!(ip, "192.0.2.10", "the upstream leaves from the web group's egress IP");
    let port: u16 = port.parse().expect("a port");
    assert!((61000..=65535).contains(&port), "upstream port {port} is outside [l7] upstream_ports");
}

/// A request for `url` with `Host: host` through the gateway to a server that answers with the address and port
/// it saw: that upstream connection's source, checked to be in the L7 range.
fn upstream_connection_seen(lab: &Lab, gw: &Gateway, host: &str, url: &str) -> String {
    let header = format!("Host: {host}");
    let (code, body, err, _) = curl(lab, &["-H", &header, url]);
    assert_eq!(code, 0, "{err}\n{}", gw.log_text());
    assert_from_l7_range(&body);
    body.trim().to_string()
}

#[test]
fn tls_passes_through_by_sni_and_other_names_get_an_alert() {
    let lab = Lab::up(false);
    let tls = TlsServer::start(&lab);
    let (_dir, config, _) = lab_config(l7_config);
    let gw = Gateway::start(&lab, &config);
    let cacert = tls.cert().to_str().expect("utf-8 path");

    // Allowed: the handshake completes end to end with the server's own certificate, verified by the client.
    let (code, body, err, _) = curl(
        &lab,
        &["--cacert", cacert, "--resolve", "api.stripe.com:443:203.0.113.10", "https://api.stripe.com/"],
    );
    assert_eq!(code, 0, "curl: {err}\ngateway log:\n{}", gw.log_text());
    assert_from_l7_range(&body);
    // A wildcard matches a name two labels deep (verification off: the certificate's *.x.test covers one).
    let (code, body, err, _) =
        curl(&lab, &["-k", "--resolve", "a.b.x.test:443:203.0.113.10", "https://a.b.x.test/"]);
    assert_eq!(code, 0, "a.b.x.test: {err}");
    assert_from_l7_range(&body);

    // Refused at once with a TLS alert, not a hang; nothing reaches the server.
    for name in ["evil.example", "x.test"] {
        let (code, _, err, took) = curl(
            &lab,
            &["-k", "--resolve", &format!("{name}:443:203.0.113.10"), &format!("https://{name}/")],
        );
        assert_ne!(code, 0, "{name} must be refused");
        assert!(err.to_lowercase().contains("alert") || err.contains("access denied"), "{name}: {err}");
        assert!(took < 2.0, "{name}: refused after {took:.1} s: must be immediate");
    }
    wait_for(
        || gw.log_text().lines().any(|l| l.contains("l7 refused") && l.contains("evil.example")),
        "the audit line for evil.example",
    );
    // Counted when each connection ends (the refused ones close right after their alert).
    wait_for(
        || {
            gw.metric(r#"egressd_l7_refused_total{reason="host_not_allowed"}"#) >= 2.0
                && gw.metric("egressd_l7_allowed_total") >= 2.0
        },
        "two refusals and two allowed connections counted",
    );
}

#[test]
fn http_requests_are_judged_by_host_one_by_one() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(l7_config);
    let gw = Gateway::start(&lab, &config);

    let (code, body, err, _) = curl(&lab, &["-H", "Host: httpbin.test", "http://203.0.113.10/ip"]);
    assert_eq!(code, 0, "allowed host: {err}\ngateway log:\n{}", gw.log_text());
    assert_from_l7_range(&body);

    let (_, body, _, took) = curl(&lab, &["-i", "-H", "Host: evil.test", "http://203.0.113.10/ip"]);
    assert!(body.starts_with("HTTP/1.1 403 Forbidden"), "denied host: {body}");
    assert!(body.contains("egressd: host evil.test is not allowed"), "{body}");
    assert!(took < 2.0, "the 403 must be immediate ({took:.1} s)");

    // One keep-alive connection: an allowed request, then one for a denied host. The first is answered by the
    // server, the second by egressd, and it never reaches the server.
    let out = lab.sh(
        "client",
        "printf 'GET /ip HTTP/1.1\\r\\nHost: httpbin.test\\r\\n\\r\\nGET /secret HTTP/1.1\\r\\nHost: evil.test\\r\\n\\r\\n' \
         | timeout 5 socat -t3 - TCP4:203.0.113.10:80",
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "one answer from the server:\n{answer}");
    let (first, second) = answer.split_once("HTTP/1.1 403").unwrap_or_else(|| panic!("no 403:\n{answer}"));
    assert!(first.contains("192.0.2.10:"), "the server's answer first:\n{answer}");
    assert!(second.contains("evil.test"), "{answer}");
    let nginx_log = lab.nginx_access_log();
    assert!(nginx_log.contains("GET /ip "), "the allowed request reached the server:\n{nginx_log}");
    assert!(!nginx_log.contains("/secret"), "the denied request reached the server:\n{nginx_log}");
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="host_not_allowed"}"#) >= 2.0,
        "both refusals counted",
    );
    // Every L7 series the Grafana dashboard and the alert rules use is exported.
    let exported: std::collections::HashSet<String> =
        gw.metrics().into_iter().map(|(n, _)| n.split('{').next().unwrap_or("").to_string()).collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/monitoring/egressd-dashboard.json"
    ))
    .expect("dashboard")
        + &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/conf/monitoring/egressd-alerts.yml"
        ))
        .expect("alert rules");
    for series in dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("egressd_l7_"))
    {
        assert!(
            exported.contains(series),
            "the dashboard or alerts use {series}, which egressd does not export"
        );
    }
    // Every connection's decision is in the histogram; the L7 series pass promtool's lint.
    assert!(gw.metric("egressd_l7_decision_seconds_count") >= 3.0);
    assert!(gw.metric("egressd_l7_punted_packets_total") > 0.0);
    let metrics = gw.metrics();
    assert!(
        metrics.iter().any(|(n, _)| n == r#"egressd_l7_connections_in_phase{phase="relaying"}"#),
        "phase gauges"
    );
    let lint = lab.sh("gw", "curl -sf http://127.0.0.1:9900/metrics | promtool check metrics");
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}

#[test]
fn http_methods_and_paths_are_checked_through_the_gateway() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(|text| {
        replace_web_rule(
            text,
            "ports = [80]\naction = \"l7\"\nhosts = [\"httpbin.test\"]\nmethods = [\"GET\", \"HEAD\"]\npaths = [\"/ip\"]",
        )
    });
    let gw = Gateway::start(&lab, &config);
    let (code, body, err, _) = curl(&lab, &["-H", "Host: httpbin.test", "http://203.0.113.10/ip"]);
    assert_eq!(code, 0, "GET /ip: {err}\ngateway log:\n{}", gw.log_text());
    assert_from_l7_range(&body);
    let (_, body, _, _) =
        curl(&lab, &["-i", "-X", "POST", "-d", "x=1", "-H", "Host: httpbin.test", "http://203.0.113.10/ip"]);
    assert!(body.starts_with("HTTP/1.1 403 Forbidden"), "POST: {body}");
    assert!(
        body.contains("POST /ip on httpbin.test is not allowed by this rule (method_not_allowed)"),
        "{body}"
    );
    let (_, body, _, _) = curl(&lab, &["-i", "-H", "Host: httpbin.test", "http://203.0.113.10/index.html"]);
    assert!(body.contains("(path_not_allowed)"), "GET /index.html: {body}");
    wait_for(
        || {
            gw.metric(r#"egressd_l7_refused_total{reason="method_not_allowed"}"#) == 1.0
                && gw.metric(r#"egressd_l7_refused_total{reason="path_not_allowed"}"#) == 1.0
        },
        "both refusals counted by reason",
    );
}

/// A rule's `rate_limit` through the gateway: each client address gets its burst, then `429` with `Retry-After`
/// (the refused requests never reach the server); another address has its own bucket; refusals are counted and
/// audited.
#[test]
fn a_rate_limit_answers_429_per_client_address_and_keeps_refused_requests_from_the_server() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(|text| {
        replace_web_rule(
            text,
            "ports = [80]\naction = \"l7\"\nname = \"httpbin-limited\"\nhosts = [\"httpbin.test\"]\nrate_limit = \"3/30s\"",
        )
    });
    let gw = Gateway::start(&lab, &config);
    let request = |from: &str, n: u32| {
        let url = format!("http://203.0.113.10/ip?ratelimit={n}");
        let (_, out, err, _) =
            curl(&lab, &["-i", "--interface", from, "-H", "Host: httpbin.test", url.as_str()]);
        assert!(!out.is_empty(), "request {n} from {from}: {err}\ngateway log:\n{}", gw.log_text());
        out
    };
    for n in 1..=3 {
        let answer = request("10.10.0.2", n);
        assert!(answer.starts_with("HTTP/1.1 200"), "request {n} is within the burst: {answer}");
    }
    for n in 4..=5 {
        let answer = request("10.10.0.2", n);
        assert!(answer.starts_with("HTTP/1.1 429 Too Many Requests"), "request {n}: {answer}");
        // One token every 10 s: the next is at most 10 s away.
        let retry: u64 = answer
            .lines()
            .find_map(|l| l.strip_prefix("Retry-After: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Retry-After: {answer}"));
        assert!((1..=10).contains(&retry), "Retry-After {retry}");
    }
    let other = request("10.10.0.3", 6);
    assert!(other.starts_with("HTTP/1.1 200"), "another address has its own bucket: {other}");
    let nginx_log = lab.nginx_access_log();
    for n in [1, 2, 3, 6] {
        assert!(
            nginx_log.contains(&format!("ratelimit={n} ")),
            "request {n} reached the server:\n{nginx_log}"
        );
    }
    for n in [4, 5] {
        assert!(!nginx_log.contains(&format!("ratelimit={n} ")), "refused request {n} reached the server");
    }
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="rate_limited"}"#) == 2.0,
        "both refusals counted under rate_limited",
    );
    wait_for(
        || {
            gw.log_text()
                .lines()
                .filter(|l| {
                    l.contains("l7 refused") && l.contains("rate_limited") && l.contains("httpbin-limited")
                })
                .count()
                == 2
        },
        "an audit line per refusal, naming the rule",
    );
}

/// `egressd import istio` output runs in the gateway: a ServiceEntry and Gateway for httpbin.test on HTTP/80
/// become the web group's l7 rule; the name passes, another gets 403.
#[test]
fn an_imported_istio_service_entry_is_enforced_by_the_gateway() {
    let lab = Lab::up(false);
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/import/istio-httpbin.yaml");
    let out = Command::new(support::egressd_bin())
        .args(["import", "istio", fixture, "--group", "web", "--rules-only"])
        .output()
        .expect("egressd import");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imported = String::from_utf8_lossy(&out.stdout).into_owned();
    let (_dir, config, _) = lab_config(|text| {
        // The lab's own rule for the web group's TCP 80/443 steps aside (to a port nothing uses).
        format!("{}\n{imported}", replace_web_rule(text, "ports = [8443]\naction = \"allow\""))
    });
    let gw = Gateway::start(&lab, &config);
    let (code, body, err, _) = curl(&lab, &["-H", "Host: httpbin.test", "http://203.0.113.10/ip"]);
    assert_eq!(code, 0, "{err}\nimported:\n{imported}\ngateway log:\n{}", gw.log_text());
    assert_from_l7_range(&body);
    let (_, body, _, _) = curl(&lab, &["-i", "-H", "Host: evil.test", "http://203.0.113.10/ip"]);
    assert!(body.starts_with("HTTP/1.1 403 Forbidden"), "{body}");
}

/// Certificates for TLS origination: a CA, a server certificate for secure.test and other.test, a client
/// certificate (CN egressd-client); all signed by the CA. Returns the directory.
fn origination_certificates() -> tempfile::TempDir {
    certificates_for("DNS:secure.test,DNS:other.test")
}

/// [`origination_certificates`] with the server certificate's subjectAltName `san`.
fn certificates_for(san: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = r#"
set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=lab-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=secure.test -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\n' "$1" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile server.ext -out server.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=egressd-client -keyout client.key -out client.csr 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile client.ext -out client.pem 2>/dev/null
"#;
    let out =
        Command::new("sh").args(["-c", script, "sh", san]).current_dir(dir.path()).output().expect("openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// TLS origination (`upstream_tls`): plain HTTP from the client leaves as mutual TLS to the destination's port
/// 8443, where a server that requires a client certificate from the lab CA answers with the certificate's name
/// and the address it saw. A second Host on the same connection gets 421; a new connection resumes the TLS
/// session. After a reload to `simple` (no client
/// certificate) the server refuses the handshake, and with a server name the certificate does not carry
/// verification fails: both answered 502 with the reason, audited.
#[test]
fn tls_origination_sends_plain_http_clients_over_mutual_tls_and_answers_502_when_tls_fails() {
    let lab = Lab::up(false);
    let certs = origination_certificates();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let server = format!(
        r#"
import socket, ssl, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{cert}", "{key}")
ctx.load_verify_locations("{ca}")
ctx.verify_mode = ssl.CERT_REQUIRED
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.10", 8443)); s.listen(64)
def serve(c, addr):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        peer = dict(x[0] for x in t.getpeercert()["subject"])["commonName"]
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                d = t.recv(4096)
                if not d: return
                buf += d
            head, buf = buf.split(b"\r\n\r\n", 1)
            body = ("client=%s from=%s reused=%s\n" % (peer, addr[0], t.session_reused)).encode()
            t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except Exception:
        pass
    finally:
        c.close()
while True:
    c, addr = s.accept(); threading.Thread(target=serve, args=(c, addr), daemon=True).start()
"#,
        cert = file("server.pem"),
        key = file("server.key"),
        ca = file("ca.pem"),
    );
    let _server = lab.start_python_server("ext", &server, &["203.0.113.10:8443"]);
    let rule = |tls: &str| {
        format!(
            "ports = [80]\naction = \"l7\"\nhosts = [\"secure.test\", \"other.test\"]\n{tls}upstream_port = 8443\n\
             upstream_ca = \"{}\"\n",
            file("ca.pem")
        )
    };
    let mutual = format!(
        "upstream_tls = \"mutual\"\nupstream_cert = \"{}\"\nupstream_key = \"{}\"\n",
        file("client.pem"),
        file("client.key")
    );
    let (_dir, config, original) = lab_config(|text| replace_web_rule(text, &rule(&mutual)));
    let gw = Gateway::start(&lab, &config);

    let (code, body, err, _) = curl(&lab, &["-H", "Host: secure.test", "http://203.0.113.10/"]);
    assert_eq!(code, 0, "{err}\ngateway log:\n{}", gw.log_text());
    assert_eq!(
        body.trim(),
        "client=egressd-client from=192.0.2.10 reused=False",
        "the server saw the client certificate"
    );
    wait_for(
        || {
            gw.log_text().lines().any(|l| {
                l.contains("l7 connection") && l.contains("upstream_tls") && l.contains("established")
            })
        },
        "the access line says the TLS egressd originated was established",
    );
    // Another Host on the same connection: its TLS session is for secure.test.
    let out = lab.sh(
        "client",
        "printf 'GET / HTTP/1.1\\r\\nHost: secure.test\\r\\n\\r\\nGET / HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n' \
         | timeout 5 socat -t3 - TCP4:203.0.113.10:80",
    );
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("client=egressd-client"), "{answer}");
    assert!(answer.contains("HTTP/1.1 421 Misdirected Request"), "{answer}");
    // A new connection resumes the TLS session of an earlier one (no second full handshake, no second signature).
    let (code, body, err, _) = curl(&lab, &["-H", "Host: secure.test", "http://203.0.113.10/"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body.trim(), "client=egressd-client from=192.0.2.10 reused=True", "the session was resumed");

    // No client certificate: the server ends the handshake; the client gets 502 and why.
    let reload = |tls: &str, n: f64| {
        std::fs::write(&config, replace_web_rule(&original, &rule(tls))).unwrap();
        gw.signal("HUP");
        wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= n, "the reload");
    };
    reload("upstream_tls = \"simple\"\n", 1.0);
    let (_, body, _, _) = curl(&lab, &["-i", "-H", "Host: secure.test", "http://203.0.113.10/"]);
    assert!(body.starts_with("HTTP/1.1 502 Bad Gateway"), "{body}");
    assert!(body.contains("egressd: TLS to the server failed:"), "{body}");
    // A server name the certificate does not carry: verification fails before anything is sent.
    reload(&format!("{mutual}upstream_sni = \"wrong.test\"\n"), 2.0);
    let (_, body, _, _) = curl(&lab, &["-i", "-H", "Host: secure.test", "http://203.0.113.10/"]);
    assert!(body.starts_with("HTTP/1.1 502 Bad Gateway"), "{body}");
    assert!(body.contains("certificate not valid for name \"wrong.test\""), "{body}");
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="upstream_tls_failed"}"#) == 2.0,
        "both failures counted",
    );
    wait_for(
        || {
            gw.log_text().lines().any(|l| {
                l.contains("l7 refused")
                    && l.contains("upstream_tls_failed")
                    && l.contains("not valid for name")
            })
        },
        "an audit line with the reason",
    );
}

/// `max_upstream_connections`: two kept-alive connections hold the rule's two upstream connections; a third
/// client gets 503 at once (nothing reaches the server), counted and audited; once one closes, a new one passes.
#[test]
fn an_upstream_connection_limit_answers_503_beyond_it() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(|text| {
        replace_web_rule(
            text,
            "ports = [80]\naction = \"l7\"\nhosts = [\"httpbin.test\"]\nmax_upstream_connections = 2",
        )
    });
    let gw = Gateway::start(&lab, &config);
    let out = lab.python(
        "client",
        r#"
import socket, time
def ask(s, n):
    s.sendall(b"GET /ip?limit=%d HTTP/1.1\r\nHost: httpbin.test\r\n\r\n" % n)
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(4096)
        if not d: break
        data += d
    return data.split(b"\r\n")[0].decode()
held = [socket.create_connection(("203.0.113.10", 80), timeout=5) for _ in range(2)]
print(ask(held[0], 1)); print(ask(held[1], 2))
third = socket.create_connection(("203.0.113.10", 80), timeout=5)
print(ask(third, 3))
held[0].close()
time.sleep(1.5)
fourth = socket.create_connection(("203.0.113.10", 80), timeout=5)
print(ask(fourth, 4))
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable", "HTTP/1.1 200 OK"],
        "gateway log:\n{}",
        gw.log_text()
    );
    assert!(!lab.nginx_access_log().contains("limit=3 "), "the refused request reached the server");
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="upstream_connection_limit"}"#) == 1.0,
        "the refusal counted",
    );
}

#[test]
fn tls_hellos_in_one_byte_segments_and_50_mb_each_way_pass_intact() {
    let lab = Lab::up(false);
    let tls = TlsServer::start(&lab);
    let (_dir, config, _) = lab_config(l7_config);
    let gw = Gateway::start(&lab, &config);
    let cafile = tls.cert().display().to_string();

    // The ClientHello goes out one byte per TCP segment (TCP_NODELAY, a pause between bytes); the handshake then
    // completes against the server's own certificate.
    let out = lab.python(
        "client",
        &format!(
            r#"
import socket, ssl, time
ctx = ssl.create_default_context(cafile="{cafile}")
raw = socket.create_connection(("203.0.113.10", 443), timeout=10)
raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="api.stripe.com")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
for b in hello:
    raw.sendall(bytes([b])); time.sleep(0.002)
while True:
    try:
        tls.do_handshake(); break
    except ssl.SSLWantReadError:
        data = raw.recv(65536)
        if not data: raise SystemExit("closed during the handshake")
        inc.write(data)
    raw.sendall(out.read())
raw.sendall(out.read())
tls.write(b"GET / HTTP/1.1\r\nHost: api.stripe.com\r\n\r\n"); raw.sendall(out.read())
answer = b""
while True:
    try:
        answer += tls.read(65536)
    except ssl.SSLWantReadError:
        data = raw.recv(65536)
        if not data: break
        inc.write(data)
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
print(len(hello), answer.decode().split("\r\n\r\n", 1)[1].strip())
"#
        ),
    );
    let (hello_len, seen) = out.trim().split_once(' ').unwrap_or_else(|| panic!("{out}\n{}", gw.log_text()));
    assert!(hello_len.parse::<usize>().unwrap_or(0) > 200, "a real hello: {hello_len} bytes");
    assert_from_l7_range(seen);

    // 50 MB up and 50 MB down through one passed-through TLS connection, compared by SHA-256 both ways.
    let out = lab.python("client", &format!(
            r#"
import hashlib, os, socket, ssl
n = 50 * 1024 * 1024
ctx = ssl.create_default_context(cafile="{cafile}")
s = ctx.wrap_socket(socket.create_connection(("203.0.113.10", 443), timeout=60), server_hostname="api.stripe.com")
data = os.urandom(n)
s.sendall(b"PUT /upload HTTP/1.1\r\nHost: api.stripe.com\r\nContent-Length: %d\r\n\r\n" % n)
s.sendall(data)
f = s.makefile("rb")
server_sha = f.readline().strip().decode()
block = bytes(range(256)) * 256
expect, got, sha = hashlib.sha256(), 0, hashlib.sha256()
while got < n:
    chunk = f.read(min(1 << 16, n - got))
    if not chunk: break
    sha.update(chunk); got += len(chunk)
sent = 0
while sent < n:
    part = block[: min(len(block), n - sent)]; expect.update(part); sent += len(part)
print(server_sha == hashlib.sha256(data).hexdigest(), got == n and sha.hexdigest() == expect.hexdigest())
"#
        ),
    );
    assert_eq!(out.trim(), "True True", "upload hash match, download hash match\n{}", gw.log_text());
}

#[test]
fn refusals_are_prompt_an_absent_upstream_resets_and_silence_is_closed_at_the_deadline() {
    let lab = Lab::up(false);
    let (_dir, config, _) =
        lab_config(|text| format!("{}\n[l7]\nclassify_timeout = \"2s\"\n", l7_config(text)));
    let gw = Gateway::start(&lab, &config);

    // Nothing listens on 203.0.113.10:443 here: the allowed connection's upstream is refused, and the client is
    // reset at once instead of waiting for a handshake that cannot come.
    let (code, _, err, took) =
        curl(&lab, &["-k", "--resolve", "api.stripe.com:443:203.0.113.10", "https://api.stripe.com/"]);
    assert_ne!(code, 0);
    assert!(took < 2.0, "reset after {took:.1} s: {err}");
    wait_for(|| gw.metric("egressd_l7_upstream_failures_total") >= 1.0, "the upstream failure counted");

    // A client that connects and says nothing (and does not close) is closed at classify_timeout (2 s).
    let out = lab.python(
        "client",
        r#"
import socket, time
s = socket.create_connection(("203.0.113.10", 80), timeout=20)
start = time.time()
data = s.recv(100)
print(round(time.time() - start, 1), len(data))
"#,
    );
    let (took, bytes) = out.trim().split_once(' ').unwrap_or_else(|| panic!("{out}"));
    let took: f64 = took.parse().unwrap_or(0.0);
    assert!((1.5..6.0).contains(&took) && bytes == "0", "closed after {took} s with {bytes} bytes");
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="classify_timeout"}"#) >= 1.0,
        "the silent client counted",
    );

    // 200 connections at once, each judged and answered.
    let out = lab.sh(
        "client",
        "seq 200 | xargs -P 200 -I{} curl -s -m 10 -o /dev/null -w '%{http_code}\\n' -H 'Host: httpbin.test' \
         http://203.0.113.10/ip | sort | uniq -c",
    );
    let counts = String::from_utf8_lossy(&out.stdout);
    assert!(counts.contains("200 200"), "every one of 200 concurrent requests answered 200: {counts}");
}

/// dnsmasq in ext on 203.0.113.25:53, answering api.stripe.com and httpbin.test with 203.0.113.10. Killed on drop.
#[test]
fn with_dns_verification_an_allowed_name_at_another_address_is_refused() {
    let lab = Lab::up(false);
    let _dns = Dnsmasq::start(
        &lab,
        &["--address=/api.stripe.com/203.0.113.10", "--address=/httpbin.test/203.0.113.10"],
    );
    let tls = TlsServer::start(&lab);
    let (_dir, config, _) = lab_config(|text| {
        format!("{}\n[l7]\nverify_destination = \"dns\"\nresolver = \"203.0.113.25\"\n", l7_config(text))
    });
    let gw = Gateway::start(&lab, &config);
    let cacert = tls.cert().to_str().expect("utf-8 path");

    // The name at its own address: allowed.
    let (code, body, err, _) = curl(
        &lab,
        &["--cacert", cacert, "--resolve", "api.stripe.com:443:203.0.113.10", "https://api.stripe.com/"],
    );
    assert_eq!(code, 0, "{err}\ngateway log:\n{}", gw.log_text());
    assert_from_l7_range(&body);
    // The same allowed name sent to another address (domain fronting by IP): refused with an alert.
    let (code, _, err, took) =
        curl(&lab, &["-k", "--resolve", "api.stripe.com:443:203.0.113.11", "https://api.stripe.com/"]);
    assert_ne!(code, 0, "fronted TLS must be refused");
    assert!(err.to_lowercase().contains("alert") || err.contains("access denied"), "{err}");
    assert!(took < 3.0, "refused after {took:.1} s");
    // HTTP: the Host at its address passes, at another address gets 403.
    let (code, body, err, _) = curl(&lab, &["-H", "Host: httpbin.test", "http://203.0.113.10/ip"]);
    assert_eq!(code, 0, "{err}");
    assert_from_l7_range(&body);
    let (_, body, _, _) = curl(&lab, &["-i", "-H", "Host: httpbin.test", "http://203.0.113.12/ip"]);
    assert!(body.starts_with("HTTP/1.1 403") && body.contains("does not resolve to the address"), "{body}");
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="destination_not_in_dns"}"#) >= 2.0,
        "both fronted connections counted",
    );
}

/// Hostile clients of the L7 path: a slowloris head and a ClientHello that never ends are closed at the
/// classify deadline; a SYN flood from one address is held to `max_connections_per_source`; thousands of idle
/// connections from many addresses hit `max_connections`, are closed at the deadline, and cost bounded memory —
/// and a well-behaved client is served throughout.
#[test]
fn slowloris_endless_hellos_syn_floods_and_idle_crowds_are_bounded() {
    let lab = Lab::up(false);
    let (_dir, config, _) = lab_config(|text| {
        format!(
            "{}\n[l7]\nclassify_timeout = \"2s\"\nmax_connections = 1000\nmax_connections_per_source = 200\n",
            l7_config(text)
        )
    });
    let gw = Gateway::start(&lab, &config);
    let rss_before = rss_kib(gw.pid());
    let good = |lab: &Lab| {
        let out = lab.exec(
            "client",
            "curl",
            &[
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--interface",
                "10.10.0.3",
                "-H",
                "Host: httpbin.test",
                "http://203.0.113.10/ip",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(good(&lab), "200");

    // Slowloris and an endless ClientHello: a byte every 300 ms, closed at the 2 s deadline.
    let out = lab.python("client", r#"
import socket, time
for first in (b"GET / HTTP/1.1\r\nHost: httpbin.test\r\nX-a: ", bytes([22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc, 3, 3])):
    s = socket.create_connection(("203.0.113.10", 80 if first[0] == 71 else 443), timeout=10)
    s.sendall(first); start = time.time(); closed = None
    try:
        while time.time() - start < 10:
            s.sendall(b"a"); time.sleep(0.3)
            s.setblocking(False)
            try:
                if s.recv(100) == b"": closed = time.time() - start; break
            except BlockingIOError:
                pass
            s.setblocking(True)
    except OSError:
        closed = time.time() - start
    print(round(closed, 1) if closed else "open", end=" ")
"#,
    );
    for took in out.split_whitespace() {
        let took: f64 = took.parse().unwrap_or_else(|_| panic!("still open after 10 s: {out}"));
        assert!((1.5..6.0).contains(&took), "closed after {took} s: {out}");
    }
    let l7_state = || {
        let metrics = gw.metrics();
        let l7: Vec<_> = metrics.iter().filter(|(k, _)| k.starts_with("egressd_l7_")).collect();
        format!("{l7:?}\n{}", gw.log_text())
    };
    wait_for_explained(
        || gw.metric(r#"egressd_l7_refused_total{reason="classify_timeout"}"#) >= 2.0,
        "both counted as classify_timeout",
        l7_state,
    );

    // A SYN flood from 10.10.0.2 at the l7 port: one address holds at most 200 connections.
    let flood = r#"
import socket, struct, time
src, dst = socket.inet_aton("10.10.0.2"), socket.inet_aton("203.0.113.10")
def csum(b):
    n = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while n >> 16: n = (n & 0xffff) + (n >> 16)
    return ~n & 0xffff
t = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP); t.bind(("10.10.0.2", 0))
for p in range(20000, 22000):
    syn = struct.pack("!HHIIBBHHH", p, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(src + dst + struct.pack("!BBH", 0, 6, len(syn)) + syn)
    t.sendto(syn[:16] + struct.pack("!H", c) + syn[18:], ("203.0.113.10", 0))
    # Bursts of 100 (still ~10 000 SYNs/s): what is measured is the per-source limit, not the receive ring's depth
    # while a parked worker wakes up.
    if p % 100 == 99: time.sleep(0.01)
"#;
    assert!(lab.exec("client", "python3", &["-c", flood]).status.success());
    wait_for_explained(
        || gw.metric(r#"egressd_l7_dropped_packets_total{reason="over_source_limit"}"#) >= 1000.0,
        "the flood held to the per-source limit",
        l7_state,
    );
    assert_eq!(good(&lab), "200", "served during the SYN flood");

    // 2000 idle connections from ten addresses: over max_connections (1000), the rest are dropped; after the
    // deadline they are gone and memory is bounded.
    let addrs: Vec<String> = (10..20).map(|i| format!("10.10.0.{i}")).collect();
    for a in &addrs {
        lab.sh("client", &format!("ip addr add {a}/24 dev cl0"));
    }
    let crowd = format!(
        r#"
import socket, time
socks = []
for a in {addrs:?}:
    for i in range(200):
        s = socket.socket(); s.setblocking(False); s.bind((a, 0))
        try: s.connect(("203.0.113.10", 80))
        except BlockingIOError: pass
        socks.append(s)
time.sleep(1.5)
print(len(socks), flush=True)
time.sleep(3)
"#
    );
    let crowd = lab.spawn_python("client", &crowd);
    wait_for(
        || gw.metric(r#"egressd_l7_dropped_packets_total{reason="over_limit"}"#) >= 1.0,
        "the crowd reaches max_connections",
    );
    let rss_peak = rss_kib(gw.pid());
    let _ = crowd.wait_with_output();
    // Once the crowd is closed at the deadline, the well-behaved client is served again.
    support::wait_for_within(
        std::time::Duration::from_secs(10),
        || good(&lab) == "200",
        "served after the crowd",
    );
    let grown_mib = rss_peak.saturating_sub(rss_before) / 1024;
    // Each connection holds two 64 KiB socket buffers at most: 1000 connections, 128 MiB at worst.
    assert!(grown_mib < 160, "RSS grew {grown_mib} MiB under 1000 idle connections");
    eprintln!("L7 RSS: {rss_before} KiB before, {rss_peak} KiB with 1000 connections held");
}

/// nginx in ext serving HTTPS on `servers` (address, body prefix), each requiring a client certificate from the
/// lab CA in `certs` (`ssl_verify_client on`) and answering `PREFIX client=<certificate subject> from=<address>`.
/// Its access log holds each request's key exchange group and whether the TLS session was resumed. Stopped on
/// drop.
struct TlsNginx {
    dir: tempfile::TempDir,
}

impl TlsNginx {
    fn start(lab: &Lab, certs: &Path, servers: &[(&str, &str)]) -> TlsNginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().display();
        let c = certs.display();
        let mut conf = format!(
            "daemon on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n  \
             log_format tls \"$remote_addr group=$ssl_curve reused=$ssl_session_reused\";\n  \
             access_log {d}/access.log tls;\n  \
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; \
             scgi_temp_path {d};\n"
        );
        for (address, prefix) in servers {
            conf.push_str(&format!(
                "  server {{\n    listen {address}:443 ssl;\n    ssl_certificate {c}/server.pem;\n    \
                 ssl_certificate_key {c}/server.key;\n    ssl_client_certificate {c}/ca.pem;\n    \
                 ssl_verify_client on;\n    default_type text/plain;\n    \
                 location / {{ return 200 \"{prefix} client=$ssl_client_s_dn from=$remote_addr\\n\"; }}\n  }}\n"
            ));
        }
        conf.push_str("}\n");
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let out =
            lab.exec("ext", "nginx", &["-c", &path.display().to_string(), "-e", &format!("{d}/error.log")]);
        assert!(out.status.success(), "nginx: {}", String::from_utf8_lossy(&out.stderr));
        for (address, _) in servers {
            wait_for(
                || {
                    String::from_utf8_lossy(&lab.sh("ext", "ss -lnt").stdout)
                        .contains(&format!("{address}:443"))
                },
                "nginx listening with TLS",
            );
        }
        TlsNginx { dir }
    }

    /// The access log: a line per request, `ADDRESS group=GROUP reused=r|.`.
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for TlsNginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("nginx.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// The client namespace's /etc/hosts (what `ip netns exec` mounts over /etc/hosts), removed on drop.
struct ClientHosts(std::path::PathBuf);

impl ClientHosts {
    fn set(lab: &Lab, text: &str) -> ClientHosts {
        let dir = Path::new("/etc/netns").join(lab.ns("client"));
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{text}\n")).expect("hosts");
        ClientHosts(dir)
    }
}

impl Drop for ClientHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The seed scenario's endpoints: v1 at 203.0.113.20, v2 at 203.0.113.21, and a subset of each.
const SEED_ENDPOINTS: &str = r#"[[service.endpoint]]
address = "203.0.113.20"
labels = { version = "v1" }

[[service.endpoint]]
address = "203.0.113.21"
labels = { version = "v2" }

[[service.subset]]
name = "v1"
labels = { version = "v1" }

[[service.subset]]
name = "v2"
labels = { version = "v2" }
"#;

/// The service of the seeds' egress scenario: plain HTTP to nginx.external.svc.cluster.local:80, routed by the
/// `want` header to subset v1 (203.0.113.20) or v2 (203.0.113.21), the rest split 80/20, over mutual TLS with the
/// lab CA. `extra` is appended to the `[[service]]` table.
fn seed_service(certs: &Path, extra: &str, tls: &str) -> String {
    let f = |name: &str| certs.join(name).display().to_string();
    format!(
        r#"
[[service]]
name = "nginx"
hosts = ["nginx.external.svc.cluster.local"]
port = 80
{tls}upstream_ca = "{ca}"
{extra}
{SEED_ENDPOINTS}
[[service.route]]
name = "want-v1"
headers = {{ want = "v1" }}
to = "v1"

[[service.route]]
name = "want-v2"
headers = {{ want = "v2" }}
to = "v2"

[[service.route]]
name = "split"
to = [{{ subset = "v1", weight = 80 }}, {{ subset = "v2", weight = 20 }}]
"#,
        ca = f("ca.pem"),
    )
}

fn mutual_tls(certs: &Path) -> String {
    format!(
        "upstream_tls = \"mutual\"\nupstream_cert = \"{}\"\nupstream_key = \"{}\"\n",
        certs.join("client.pem").display(),
        certs.join("client.key").display()
    )
}

const SEED_RULE: &str = "ports = [80]\naction = \"l7\"\nhosts = [\"nginx.external.svc.cluster.local\"]";

/// `n` requests without a `want` header, each on its own connection, from the client namespace: how many bodies
/// started with each first word.
fn split_counts(lab: &Lab, n: u32) -> std::collections::BTreeMap<String, u32> {
    let out = lab.python(
        "client",
        &format!(
            r#"
import socket, collections
counts = collections.Counter()
for i in range({n}):
    s = socket.create_connection(("nginx.external.svc.cluster.local", 80), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: nginx.external.svc.cluster.local\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        d = s.recv(4096)
        if not d: break
        data += d
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    counts[body.split(b" ")[0].decode() if head.startswith(b"HTTP/1.1 200") else head[:40].decode()] += 1
for k, v in counts.items(): print(k, v)
"#
        ),
    );
    out.lines()
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0))))
        .collect()
}

/// The seeds' central scenario through the gateway: workloads speak plain HTTP to nginx.external.svc.cluster.local
/// (resolved by the client's /etc/hosts to an address the policy sends to the L7 path); `want: v1` reaches the v1
/// server and `want: v2` the v2 server, over mutual TLS with the client certificate the servers verify
/// (`ssl_verify_client on`), from the group's egress IP; requests without the header split 80/20 over 1 000
/// connections (within ±5 %); the access line names service, route, subset and endpoint; `explain --header` says
/// the same; the handshakes use X25519. Without a client certificate nginx answers its own 400, which egressd
/// relays.
#[test]
fn services_route_by_header_to_subsets_over_mutual_tls_and_split_by_weight() {
    let lab = Lab::up(false);
    let certs = certificates_for("DNS:nginx.external.svc.cluster.local");
    let nginx = TlsNginx::start(&lab, certs.path(), &[("203.0.113.20", "v1"), ("203.0.113.21", "v2")]);
    let _hosts = ClientHosts::set(&lab, "203.0.113.10 nginx.external.svc.cluster.local");
    let service = seed_service(certs.path(), "", &mutual_tls(certs.path()));
    let (_dir, config, original) =
        lab_config(|text| format!("{}\n{service}", replace_web_rule(text, SEED_RULE)));
    let gw = Gateway::start(&lab, &config);

    for want in ["v1", "v2"] {
        let header = format!("want: {want}");
        let (code, body, err, _) = curl(&lab, &["-H", &header, "http://nginx.external.svc.cluster.local/"]);
        assert_eq!(code, 0, "{err}\ngateway log:\n{}", gw.log_text());
        assert_eq!(
            body.trim(),
            format!("{want} client=CN=egressd-client from=192.0.2.10"),
            "the {want} server saw egressd's client certificate and the egress IP"
        );
    }
    // Key exchange over X25519 (rustls's ring provider would start with P-384, several times dearer).
    let handshakes = nginx.access_log();
    assert!(
        handshakes.lines().count() == 2 && handshakes.lines().all(|l| l.contains("group=X25519")),
        "{handshakes}"
    );
    wait_for(
        || {
            gw.log_text().lines().any(|l| {
                l.contains("l7 connection")
                    && l.contains(r#"service="nginx""#)
                    && l.contains(r#"route="want-v2""#)
                    && l.contains(r#"subset="v2""#)
                    && l.contains("upstream=203.0.113.21:443")
                    && l.contains(r#"upstream_tls="established""#)
            })
        },
        &format!(
            "the access line names service, route, subset and endpoint: {:?}",
            gw.log_text().lines().rfind(|l| l.contains("l7 connection")).map(str::to_string)
        ),
    );

    // One keep-alive connection, requests one after another for v2, v1, v2: each answered by its subset.
    let out = lab.python(
        "client",
        r#"
import http.client
c = http.client.HTTPConnection("nginx.external.svc.cluster.local", 80, timeout=5)
for want in ["v2", "v1", "v2"]:
    c.request("GET", "/", headers={"want": want})
    print(c.getresponse().read().decode().split(" ")[0])
"#,
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["v2", "v1", "v2"], "{}", gw.log_text());

    let counts = split_counts(&lab, 1000);
    let v1 = counts.get("v1").copied().unwrap_or(0);
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 1000, "every request answered by v1 or v2: {counts:?}");
    assert!((750..=850).contains(&v1), "80/20 within ±5 %: {counts:?}");

    // Weights split requests, not connections (as Envoy's weighted clusters do): 100 requests on one keep-alive
    // connection split 80/20 too; a request for the other subset takes an idle upstream connection of that subset
    // from the pool once the first exist.
    let reused_before = gw.metric("egressd_l7_pool_reused_total");
    let out = lab.python(
        "client",
        r#"
import http.client, collections
c = http.client.HTTPConnection("nginx.external.svc.cluster.local", 80, timeout=5)
counts = collections.Counter()
for i in range(100):
    c.request("GET", "/")
    counts[c.getresponse().read().decode().split(" ")[0]] += 1
for k, v in counts.items(): print(k, v)
"#,
    );
    let keep_alive: std::collections::BTreeMap<&str, u32> = out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, v.trim().parse().unwrap_or(0)))
        .collect();
    assert_eq!(keep_alive.values().sum::<u32>(), 100, "{out}\n{}", gw.log_text());
    let v1 = keep_alive.get("v1").copied().unwrap_or(0);
    assert!((75..=85).contains(&v1), "80/20 within ±5 % on one connection: {out}");
    assert!(
        gw.metric("egressd_l7_pool_reused_total") - reused_before >= 10.0,
        "subset changes reuse pooled upstream connections: {} reused",
        gw.metric("egressd_l7_pool_reused_total") - reused_before
    );

    // explain, in the client's view: the route a `want: v2` request takes.
    let out = Command::new(support::egressd_bin())
        .args(["explain", &config.display().to_string(), "--src", "10.10.0.2", "--dst"])
        .args(["203.0.113.10:80", "--host", "nginx.external.svc.cluster.local", "--header", "want: v2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("route:     want-v2"), "{text}");
    assert!(text.contains("subset:    v2 100% -> 203.0.113.21:443 over mutual TLS"), "{text}");

    // Without a client certificate nginx refuses the request itself (a 400 of its own), relayed as it is.
    std::fs::write(
        &config,
        format!(
            "{}\n{}",
            replace_web_rule(&original, SEED_RULE),
            seed_service(certs.path(), "", "upstream_tls = \"simple\"\n")
        ),
    )
    .unwrap();
    gw.signal("HUP");
    wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= 1.0, "the reload");
    let (_, body, _, _) = curl(&lab, &["-i", "-H", "want: v1", "http://nginx.external.svc.cluster.local/"]);
    assert!(body.starts_with("HTTP/1.1 400"), "{body}");
    assert!(body.contains("No required SSL certificate was sent"), "{body}");
}

/// The seed service for TLS clients: nginx.external.svc.cluster.local:443, endpoints v1 (203.0.113.20) and v2
/// (.21), a route by the `want` header to v1, then `more_routes`.
fn tls_client_service(more_routes: &str) -> String {
    format!(
        r#"
[[service]]
name = "nginx-tls"
hosts = ["nginx.external.svc.cluster.local"]
port = 443

{SEED_ENDPOINTS}
[[service.route]]
name = "want-v1"
headers = {{ want = "v1" }}
to = "v1"
{more_routes}"#
    )
}

/// TLS clients routed by their SNI (Istio's VirtualService `tls` routes): a client that speaks TLS itself to
/// nginx.external.svc.cluster.local:443, dialling an address no server has, reaches an endpoint of the service's
/// route without conditions (v2), with its own TLS session passed through: it verifies the server's certificate,
/// and the server sees the client's certificate and the egress IP (without one, nginx's own 400 comes back). A
/// `want: v1` header changes nothing (egressd cannot see it). With only the header route left after a reload, the
/// same client gets an alert at once, counted as `no_route`, and no server hears of it.
#[test]
fn tls_clients_naming_a_service_reach_its_endpoints_with_their_own_tls() {
    let lab = Lab::up(false);
    let certs = certificates_for("DNS:nginx.external.svc.cluster.local");
    let nginx = TlsNginx::start(&lab, certs.path(), &[("203.0.113.20", "v1"), ("203.0.113.21", "v2")]);
    let rule = "ports = [443]\naction = \"l7\"\nhosts = [\"nginx.external.svc.cluster.local\"]";
    let tls_route = "\n[[service.route]]\nname = \"tls\"\nto = \"v2\"\n";
    let (_dir, config, original) =
        lab_config(|text| format!("{}\n{}", replace_web_rule(text, rule), tls_client_service(tls_route)));
    let gw = Gateway::start(&lab, &config);
    let file = |name: &str| certs.path().join(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let to_the_service = [
        "--cacert",
        &ca,
        "--resolve",
        "nginx.external.svc.cluster.local:443:203.0.113.10",
        "https://nginx.external.svc.cluster.local/",
    ];
    let with_cert = |extra: &[&str]| {
        let mut args = vec!["--cert", cert.as_str(), "--key", key.as_str()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&to_the_service);
        curl(&lab, &args)
    };

    let (code, body, err, _) = with_cert(&[]);
    assert_eq!(code, 0, "{err}\ngateway log:\n{}", gw.log_text());
    assert_eq!(
        body.trim(),
        "v2 client=CN=egressd-client from=192.0.2.10",
        "the client's own certificate at v2"
    );
    let (code, body, err, _) = with_cert(&["-H", "want: v1"]);
    assert_eq!((code, body.trim()), (0, "v2 client=CN=egressd-client from=192.0.2.10"), "{err}");
    // No client certificate: egressd has none to add (its TLS is the client's), so nginx refuses on its own.
    let (code, body, err, _) = curl(&lab, &[&["-i"][..], &to_the_service].concat());
    assert_eq!(code, 0, "{err}");
    assert!(body.starts_with("HTTP/1.1 400") && body.contains("No required SSL certificate"), "{body}");
    wait_for(
        || {
            gw.log_text().lines().any(|l| {
                l.contains("l7 connection")
                    && l.contains(r#"service="nginx-tls""#)
                    && l.contains(r#"route="tls""#)
                    && l.contains(r#"subset="v2""#)
                    && l.contains("upstream=203.0.113.21:443")
            })
        },
        "the access line names service, route, subset and endpoint",
    );
    let out = Command::new(support::egressd_bin())
        .args(["explain", &config.display().to_string(), "--src", "10.10.0.2", "--dst", "203.0.113.10:443"])
        .args(["--sni", "nginx.external.svc.cluster.local"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TLS clients naming it take route tls"), "{text}");

    // Hostile to the routing: every route left needs the request. Refused at once, nothing reaches a server.
    std::fs::write(&config, format!("{}\n{}", replace_web_rule(&original, rule), tls_client_service("")))
        .unwrap();
    gw.signal("HUP");
    wait_for(|| gw.metric(r#"egressd_reloads_total{result="ok"}"#) >= 1.0, "the reload");
    let handshakes = nginx.access_log().lines().count();
    let (code, _, err, took) = with_cert(&[]);
    assert_ne!(code, 0, "refused");
    assert!(err.to_lowercase().contains("alert") || err.contains("access denied"), "{err}");
    assert!(took < 2.0, "refused after {took:.1} s: must be immediate");
    wait_for(
        || gw.metric(r#"egressd_l7_refused_total{reason="no_route"}"#) >= 1.0,
        "the refusal counted as no_route",
    );
    assert_eq!(nginx.access_log().lines().count(), handshakes, "no server heard of it");
}

/// Routing and endpoint health: a request whose `want` header matches no route (with the split route gone) gets
/// 404; requests for two routes on one client connection each reach their subset. In subset v1, an endpoint that
/// refuses connections (203.0.113.22, nothing listening) costs no request (the next endpoint is tried), is ejected
/// after 3 failures in a row and skipped while ejected; once something listens there and the ejection time is over,
/// it gets requests again.
#[test]
fn a_failing_endpoint_is_retried_ejected_and_back_after_its_time_and_unrouted_requests_get_404() {
    let lab = Lab::up(false);
    let certs = certificates_for("DNS:nginx.external.svc.cluster.local");
    let _nginx = TlsNginx::start(&lab, certs.path(), &[("203.0.113.20", "v1"), ("203.0.113.21", "v2")]);
    let _hosts = ClientHosts::set(&lab, "203.0.113.10 nginx.external.svc.cluster.local");
    let extra = "outlier_consecutive_failures = 3\noutlier_base_ejection_secs = 3\nconnect_attempts = 2\n";
    let service = seed_service(certs.path(), extra, &mutual_tls(certs.path()))
        .replace(
            "[[service.endpoint]]\naddress = \"203.0.113.21\"",
            "[[service.endpoint]]\naddress = \"203.0.113.22\"\nlabels = { version = \"v1\" }\n\n\
             [[service.endpoint]]\naddress = \"203.0.113.21\"",
        )
        .replace(
            "\n[[service.route]]\nname = \"split\"\nto = [{ subset = \"v1\", weight = 80 }, { subset = \"v2\", weight = 20 }]\n",
            "",
        );
    assert!(!service.contains("split"), "the split route was removed");
    let (_dir, config, _) = lab_config(|text| format!("{}\n{service}", replace_web_rule(text, SEED_RULE)));
    let gw = Gateway::start(&lab, &config);

    let (_, body, _, _) = curl(&lab, &["-i", "-H", "want: v9", "http://nginx.external.svc.cluster.local/"]);
    assert!(body.starts_with("HTTP/1.1 404"), "{body}\n{}", gw.log_text());
    let out = lab.sh(
        "client",
        "printf 'GET / HTTP/1.1\\r\\nHost: nginx.external.svc.cluster.local\\r\\nwant: v1\\r\\n\\r\\n\
         GET / HTTP/1.1\\r\\nHost: nginx.external.svc.cluster.local\\r\\nwant: v2\\r\\n\\r\\n' \
         | timeout 5 socat -t3 - TCP4:203.0.113.10:80",
    );
    // Two routes on one client connection: each request reaches its own subset (the second on a new upstream
    // connection once the first was answered).
    let answer = String::from_utf8_lossy(&out.stdout);
    let v1 = answer.find("v1 client=").unwrap_or_else(|| panic!("{answer}\n{}", gw.log_text()));
    let v2 = answer.find("v2 client=").unwrap_or_else(|| panic!("{answer}\n{}", gw.log_text()));
    assert!(v1 < v2, "answers in order: {answer}");

    // 20 requests to v1: every one answered by .20, .22's failures retried on it; .22 ejected after its third.
    for i in 0..20 {
        let (code, body, err, _) =
            curl(&lab, &["-H", "want: v1", "http://nginx.external.svc.cluster.local/"]);
        assert_eq!(code, 0, "request {i}: {err}");
        assert!(body.starts_with("v1 client="), "request {i}: {body}");
    }
    assert_eq!(gw.metric("egressd_l7_outlier_ejections_total"), 1.0, "{}", gw.log_text());
    assert_eq!(gw.metric("egressd_l7_endpoint_failures_total"), 3.0, "no failure once ejected");
    assert_eq!(gw.metric("egressd_l7_ejected_endpoints"), 1.0);
    wait_for(
        || gw.log_text().contains("endpoint ejected after consecutive failures"),
        "the ejection is logged",
    );

    // Something listens on .22 now; after the 3 s ejection it gets its share again.
    let _back = TlsNginx::start(&lab, certs.path(), &[("203.0.113.22", "v1b")]);
    std::thread::sleep(std::time::Duration::from_millis(3200));
    let mut answered_by_22 = 0;
    for _ in 0..6 {
        let (_, body, _, _) = curl(&lab, &["-H", "want: v1", "http://nginx.external.svc.cluster.local/"]);
        answered_by_22 += u32::from(body.starts_with("v1b client="));
    }
    assert!(answered_by_22 >= 2, "the endpoint is back in the rotation ({answered_by_22} of 6)");
    assert_eq!(gw.metric("egressd_l7_endpoint_failures_total"), 3.0);
}

/// The seeds' Istio objects for the scenario (Gateway, VirtualServices, ServiceEntry, DestinationRule), imported
/// with `--tls-dir` pointing at the lab's certificates under Istio's file names, with the ServiceEntry's public
/// endpoint addresses mapped to the lab's servers: the imported policy routes `want: v1` and `want: v2` to their
/// servers over mutual TLS, as the YAML says.
#[test]
fn the_seed_istio_objects_imported_route_by_header_over_mutual_tls() {
    let lab = Lab::up(false);
    let certs = certificates_for("DNS:nginx.external.svc.cluster.local");
    for (ours, istio) in [("client.pem", "tls.crt"), ("client.key", "tls.key"), ("ca.pem", "ca.crt")] {
        std::fs::copy(certs.path().join(ours), certs.path().join(istio)).unwrap();
    }
    let _nginx = TlsNginx::start(&lab, certs.path(), &[("203.0.113.20", "v1"), ("203.0.113.21", "v2")]);
    let _hosts = ClientHosts::set(&lab, "203.0.113.10 nginx.external.svc.cluster.local");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/import");
    let files: Vec<String> =
        ["00-gateway", "01-virtualservice", "03-serviceentry", "04-destinationrule", "05-virtualservice"]
            .iter()
            .map(|f| format!("{dir}/istio-003-{f}.yaml"))
            .collect();
    let tls_dir = certs.path().display().to_string();
    let out = Command::new(support::egressd_bin())
        .args(["import", "istio"])
        .args(&files)
        .args(["--group", "web", "--rules-only", "--tls-dir", &tls_dir])
        .output()
        .expect("egressd import");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let imported = String::from_utf8_lossy(&out.stdout)
        .replace("40.76.65.115", "203.0.113.20")
        .replace("23.96.117.176", "203.0.113.21");
    let (_dir, config, _) = lab_config(|text| {
        format!("{}\n{imported}", replace_web_rule(text, "ports = [8443]\naction = \"allow\""))
    });
    let gw = Gateway::start(&lab, &config);
    for want in ["v1", "v2"] {
        let header = format!("want: {want}");
        let (code, body, err, _) = curl(&lab, &["-H", &header, "http://nginx.external.svc.cluster.local/"]);
        assert_eq!(code, 0, "{err}\nimported:\n{imported}\ngateway log:\n{}", gw.log_text());
        assert_eq!(body.trim(), format!("{want} client=CN=egressd-client from=192.0.2.10"), "{imported}");
    }
    // The VirtualService has no route without the header: 404, as Istio answers.
    let (_, body, _, _) = curl(&lab, &["-i", "http://nginx.external.svc.cluster.local/"]);
    assert!(body.starts_with("HTTP/1.1 404"), "{body}");
}

/// A service's limits through the gateway, against a plain HTTP endpoint in ext (203.0.113.23:8080) that answers
/// `/slow` after 1.2 s, never answers `/hang`, and trickles `/drip` a byte every 0.3 s: the route for both times
/// out after 1 s (counted, and the endpoint's failure counted), `/hang` with 504 and `/drip`, whose answer had
/// begun, with a reset after the bytes that came (the deadline is for the whole answer, not its first byte); with `max_connections = 1` and `max_pending_requests = 1`, of three clients
/// arriving together the first is served, the second waits for the first's connection and is served after it,
/// and the third gets 503 at once.
#[test]
fn a_service_times_out_silent_requests_with_504_and_queues_beyond_max_connections() {
    let lab = Lab::up(false);
    let server = r#"
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.23", 8080)); s.listen(64)
def serve(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d: c.close(); return
        buf += d
    if buf.startswith(b"GET /hang"):
        time.sleep(30)
    elif buf.startswith(b"GET /drip"):
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nd")
        for _ in range(30):
            time.sleep(0.3)
            c.sendall(b"r")
    else:
        time.sleep(1.2)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nslow\n")
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let _server = lab.start_python_server("ext", server, &["203.0.113.23:8080"]);
    let service = r#"
[[service]]
name = "slow"
hosts = ["slow.test"]
port = 80
retries = 0
max_connections = 1
max_pending_requests = 1

[[service.endpoint]]
address = "203.0.113.23"
port = 8080

[[service.route]]
name = "hang"
paths = ["/hang", "/drip"]
request_timeout_secs = 1

[[service.route]]
name = "rest"
"#;
    let rule = "ports = [80]\naction = \"l7\"\nhosts = [\"slow.test\"]";
    let (_dir, config, _) = lab_config(|text| format!("{}\n{service}", replace_web_rule(text, rule)));
    let gw = Gateway::start(&lab, &config);

    let (_, body, _, took) = curl(&lab, &["-i", "-H", "Host: slow.test", "http://203.0.113.10/hang"]);
    assert!(body.starts_with("HTTP/1.1 504 Gateway Timeout"), "{body}\n{}", gw.log_text());
    assert!(body.contains("no answer within 1 s"), "{body}");
    assert!((0.9..3.0).contains(&took), "the timeout is 1 s: answered after {took:.2} s");
    // Refusals are counted when the connection ends, which may be just after curl read the whole answer.
    wait_for(|| gw.metric("egressd_l7_connections_open") == 0.0, "the timed-out connection closed");
    assert_eq!(gw.metric(r#"egressd_l7_refused_total{reason="upstream_timeout"}"#), 1.0);
    assert_eq!(gw.metric("egressd_l7_endpoint_failures_total"), 1.0);

    let (code, body, err, took) = curl(&lab, &["-i", "-H", "Host: slow.test", "http://203.0.113.10/drip"]);
    assert!(
        body.starts_with("HTTP/1.1 200 OK") && body.contains("\r\n\r\ndr"),
        "{body:?}\n{}",
        gw.log_text()
    );
    assert!(!body.contains("504"), "no status after part of an answer: {body:?}");
    // 56: the connection was reset; 18: closed with the body short. Not 28 (curl's own 5 s limit).
    assert!(code == 56 || code == 18, "curl exit {code}: {err}");
    assert!((0.9..3.0).contains(&took), "the whole answer had 1 s: cut after {took:.2} s");
    wait_for(|| gw.metric("egressd_l7_connections_open") == 0.0, "the cut connection closed");
    assert_eq!(gw.metric(r#"egressd_l7_refused_total{reason="upstream_timeout"}"#), 2.0);
    assert_eq!(gw.metric("egressd_l7_endpoint_failures_total"), 2.0);

    let out = lab.python(
        "client",
        r#"
import socket, threading, time
results = {}
def get(name, delay):
    time.sleep(delay)
    start = time.time()
    s = socket.create_connection(("203.0.113.10", 80), timeout=10)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: slow.test\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        d = s.recv(4096)
        if not d: break
        data += d
    results[name] = (data.split(b" ")[1].decode(), time.time() - start)
threads = [threading.Thread(target=get, args=(n, d)) for n, d in [("a", 0), ("b", 0.2), ("c", 0.4)]]
for t in threads: t.start()
for t in threads: t.join()
for n in "abc": print(n, results[n][0], "%.2f" % results[n][1])
"#,
    );
    let row = |name: &str| -> (String, f64) {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{out}"));
        let parts: Vec<&str> = line.split_whitespace().collect();
        (parts[1].to_string(), parts[2].parse().unwrap())
    };
    let (a, b, c) = (row("a"), row("b"), row("c"));
    assert_eq!(a.0, "200", "{out}");
    assert_eq!(b.0, "200", "the second waits for a connection: {out}");
    assert!(b.1 > 1.5, "the second was served after the first: {out}");
    assert_eq!(c.0, "503", "the third is beyond max_pending_requests: {out}");
    assert!(c.1 < 0.5, "and is told at once: {out}");
    assert_eq!(gw.metric(r#"egressd_l7_refused_total{reason="service_overloaded"}"#), 1.0);
}

/// Upstream keep-alive pools: clients that each open their own connection to a service (nginx in ext, which says
/// the address and port it saw) share one upstream connection, up to `max_requests_per_connection` (3); a
/// connection idle longer than `pool_idle_timeout_secs` (2 s) is closed and the next client gets a new one.
#[test]
fn idle_upstream_connections_are_reused_up_to_their_request_limit_and_idle_time() {
    let lab = Lab::up(false);
    let service = r#"
[[service]]
name = "pooled"
hosts = ["pool.test"]
port = 80
max_requests_per_connection = 3
pool_idle_timeout_secs = 2

[[service.endpoint]]
address = "203.0.113.12"
"#;
    let rule = "ports = [80]\naction = \"l7\"\nhosts = [\"pool.test\"]";
    let (_dir, config, _) = lab_config(|text| format!("{}\n{service}", replace_web_rule(text, rule)));
    let gw = Gateway::start(&lab, &config);
    // The endpoint is fixed: the answer's port says which upstream connection carried the request.
    let seen = || upstream_connection_seen(&lab, &gw, "pool.test", "http://203.0.113.10/ip");
    let first: Vec<String> = (0..4).map(|_| seen()).collect();
    assert_eq!(first[0], first[1], "the second client reused the first's upstream connection");
    assert_eq!(first[1], first[2], "and the third");
    assert_ne!(first[2], first[3], "the fourth request needs a new connection (3 per connection)");
    assert_eq!(gw.metric("egressd_l7_pool_reused_total"), 2.0);
    wait_for(|| gw.metric("egressd_l7_pool_idle") == 1.0, "the fourth's connection waits in the pool");
    // Idle for longer than 2 s: closed; the next client gets a new connection.
    wait_for(|| gw.metric("egressd_l7_pool_closed_total") == 1.0, "the idle connection closed after 2 s");
    let last = seen();
    assert_ne!(last, first[3], "a new connection after the idle timeout");
    assert_eq!(gw.metric("egressd_l7_pool_reused_total"), 2.0);
    // Clients that ask to close and read to the end: each gets its answer and egressd's FIN, in the answer's
    // segment (seen on the client's interface); the upstream connection stays for the next.
    let out = lab.python(
        "client",
        r#"
import socket, struct
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0800))
sniff.bind(("cl0", 0))
for _ in range(2):
    s = socket.create_connection(("203.0.113.10", 80), timeout=5)
    s.sendall(b"GET /ip HTTP/1.1\r\nHost: pool.test\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        d = s.recv(4096)
        if not d: break
        data += d
    print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
sniff.setblocking(False)
data_segments = fin_with_data = 0
while True:
    try: frame = sniff.recv(65535)
    except BlockingIOError: break
    ip = frame[14:]
    if ip[9] != 6 or ip[12:16] != socket.inet_aton("203.0.113.10"): continue
    ihl = (ip[0] & 15) * 4
    tcp = ip[ihl:]
    if struct.unpack("!H", tcp[0:2])[0] != 80: continue
    if struct.unpack("!H", ip[2:4])[0] - ihl - (tcp[12] >> 4) * 4 > 0:
        data_segments += 1
        fin_with_data += tcp[13] & 1
print("segments", data_segments, fin_with_data)
"#,
    );
    let (ports, segments): (Vec<&str>, Vec<&str>) = out.lines().partition(|l| !l.starts_with("segments"));
    assert_eq!(ports.len(), 2, "{out}");
    assert_eq!(segments, ["segments 2 2"], "one segment per answer, each with the FIN: {out}");
    assert_eq!(ports[0], last, "the idle connection served the first");
    assert_eq!(ports[1], last, "and the second");
    assert_eq!(gw.metric("egressd_l7_pool_reused_total"), 4.0);
}

/// A pooled upstream connection the server closes while it is idle is never handed to a client: the next client
/// gets a new connection and its answer, even with retries off (a closed connection taken from the pool would fail
/// its request). The server here keeps connections open until the test tells it to close them all, and says when
/// it has; the next request follows at once, before or after egressd's periodic pool sweep has seen the close.
#[test]
fn a_pooled_connection_the_server_closed_is_not_given_to_the_next_client() {
    let lab = Lab::up(false);
    let server = r#"
import socket, threading
conns, lock = [], threading.Lock()
def serve(c):
    with lock: conns.append(c)
    buf = b""
    while True:
        try: d = c.recv(4096)
        except OSError: return
        if not d: return
        buf += d
        while b"\r\n\r\n" in buf:
            _, buf = buf.split(b"\r\n\r\n", 1)
            body = ("%s:%d\n" % c.getpeername()).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
def close_all():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("203.0.113.24", 9000)); s.listen(8)
    while True:
        c, _ = s.accept()
        with lock:
            for k in conns:
                try: k.shutdown(socket.SHUT_RDWR)
                except OSError: pass
                k.close()
            conns.clear()
        c.sendall(b"closed\n"); c.close()
threading.Thread(target=close_all, daemon=True).start()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.24", 8082)); s.listen(64)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let _server = lab.start_python_server("ext", server, &["203.0.113.24:8082", "203.0.113.24:9000"]);
    let service = r#"
[[service]]
name = "closing"
hosts = ["closing.test"]
port = 80
retries = 0
pool_idle_timeout_secs = 60

[[service.endpoint]]
address = "203.0.113.24"
port = 8082
"#;
    let rule = "ports = [80]\naction = \"l7\"\nhosts = [\"closing.test\"]";
    let (_dir, config, _) = lab_config(|text| format!("{}\n{service}", replace_web_rule(text, rule)));
    let gw = Gateway::start(&lab, &config);
    let seen = || upstream_connection_seen(&lab, &gw, "closing.test", "http://203.0.113.10/");
    let mut last = seen();
    assert_eq!(last, seen(), "an idle connection is reused while the server keeps it");
    for round in 1..=3 {
        let said = lab.python(
            "ext",
            "import socket\ns = socket.create_connection(('203.0.113.24', 9000))\nprint(s.recv(64).decode().strip())",
        );
        assert_eq!(said.trim(), "closed");
        let now = seen();
        assert_ne!(
            now, last,
            "round {round}: a new upstream connection after the server closed the idle one"
        );
        assert_eq!(gw.metric("egressd_l7_pool_closed_total"), f64::from(round), "round {round}");
        last = now;
    }
}

/// Retries: a service whose endpoints are a failing server (203.0.113.24:8080: `/503` answers 503, `/close` closes
/// without answering) and a healthy one (203.0.113.24:8081). A GET that meets the failing one is sent again to the
/// healthy one: the client sees only the good answer. A POST is not safe to repeat: the client gets the 503. With
/// only the failing endpoint, a GET is tried 1 + 2 times, then its 503 goes to the client.
#[test]
fn safe_requests_are_retried_on_gateway_errors_and_resets_and_unsafe_ones_are_not() {
    let lab = Lab::up(false);
    let server = r#"
import socket, threading
def serve(c, port):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(4096)
        if not d: c.close(); return
        buf += d
    if port == 8081:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\ngood\n")
    elif b" /close " in buf.split(b"\r\n")[0]:
        pass
    else:
        c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbad\n")
    c.close()
def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("203.0.113.24", port)); s.listen(64)
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c, port), daemon=True).start()
threading.Thread(target=listen, args=(8081,), daemon=True).start()
listen(8080)
"#;
    let _server = lab.start_python_server("ext", server, &["203.0.113.24:8080", "203.0.113.24:8081"]);
    let service = |name: &str, host: &str, endpoints: &[u16]| {
        let mut text = format!(
            "\n[[service]]\nname = \"{name}\"\nhosts = [\"{host}\"]\nport = 80\noutlier_consecutive_failures = 0\n"
        );
        for port in endpoints {
            text.push_str(&format!("\n[[service.endpoint]]\naddress = \"203.0.113.24\"\nport = {port}\n"));
        }
        text
    };
    let services =
        format!("{}{}", service("mixed", "mixed.test", &[8080, 8081]), service("bad", "bad.test", &[8080]));
    let rule = "ports = [80]\naction = \"l7\"\nhosts = [\"mixed.test\", \"bad.test\"]";
    let (_dir, config, _) = lab_config(|text| format!("{}\n{services}", replace_web_rule(text, rule)));
    let gw = Gateway::start(&lab, &config);
    let request = |method: &str, host: &str, path: &str| {
        let header = format!("Host: {host}");
        let url = format!("http://203.0.113.10{path}");
        let (_, body, _, _) = curl(&lab, &["-i", "-X", method, "-H", &header, &url]);
        body
    };
    // Round robin: each GET meets the failing endpoint first (the retry's pick of the healthy one moves the
    // rotation back to it), and each gets the good answer.
    for path in ["/503", "/close", "/503", "/close"] {
        let body = request("GET", "mixed.test", path);
        assert!(
            body.starts_with("HTTP/1.1 200") && body.ends_with("good\n"),
            "GET {path}: {body}\n{}",
            gw.log_text()
        );
    }
    assert_eq!(gw.metric("egressd_l7_retries_total"), 4.0);
    // POSTs are not repeated: one of two meets the failing endpoint and its 503 reaches the client.
    let posts: Vec<String> = (0..2).map(|_| request("POST", "mixed.test", "/503")).collect();
    assert_eq!(posts.iter().filter(|b| b.starts_with("HTTP/1.1 503")).count(), 1, "{posts:?}");
    assert_eq!(gw.metric("egressd_l7_retries_total"), 4.0);
    // Only the failing endpoint: tried three times, then the last 503 goes through.
    let body = request("GET", "bad.test", "/503");
    assert!(body.starts_with("HTTP/1.1 503") && body.ends_with("bad\n"), "{body}");
    assert_eq!(gw.metric("egressd_l7_retries_total"), 6.0);
}

/// A service's own connect timeout: its first endpoint (203.0.113.99, an address nobody in ext answers for) eats
/// the SYN; after `connect_timeout_secs = 1` the next endpoint (nginx) takes the request, and the silent one's
/// failure is counted.
#[test]
fn a_silent_endpoint_costs_the_services_connect_timeout_then_the_next_one_answers() {
    let lab = Lab::up(false);
    let service = r#"
[[service]]
name = "silent"
hosts = ["silent.test"]
port = 80
connect_timeout_secs = 1

[[service.endpoint]]
address = "203.0.113.99"
port = 80

[[service.endpoint]]
address = "203.0.113.12"
port = 80
"#;
    let rule = "ports = [80]\naction = \"l7\"\nhosts = [\"silent.test\"]";
    let (_dir, config, _) = lab_config(|text| format!("{}\n{service}", replace_web_rule(text, rule)));
    let gw = Gateway::start(&lab, &config);
    let (code, body, err, took) = curl(&lab, &["-H", "Host: silent.test", "http://203.0.113.10/ip"]);
    assert_eq!(code, 0, "{err}\n{}", gw.log_text());
    assert_from_l7_range(&body);
    assert!((0.9..3.0).contains(&took), "one connect timeout of 1 s, then the answer: {took:.2} s");
    assert_eq!(gw.metric("egressd_l7_endpoint_failures_total"), 1.0);
}
