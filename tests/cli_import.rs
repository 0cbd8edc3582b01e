//! `egressd import istio|cilium`: the YAML users bring (the fixtures in tests/import/ are Istio and Cilium
//! objects of the kinds egress setups use) becomes rules that `check` accepts, with every untranslated part named.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures(prefix: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/import");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/import")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures {prefix}*");
    files
}

fn import(from: &str, files: &[PathBuf], extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_egressd"))
        .args(["import", from])
        .args(files)
        .args(extra)
        .output()
        .expect("run egressd import");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check` on the imported tables under a minimal `[dataplane]`: (ok, stdout + stderr).
fn check(imported: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("imported.toml");
    std::fs::write(&path, format!("[dataplane]\ninside = \"in0\"\noutside = \"out0\"\n{imported}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_egressd")).arg("check").arg(&path).output().expect("check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The rule table named `name`, as text (up to the next table).
fn rule<'a>(toml: &'a str, name: &str) -> &'a str {
    let start = toml.find(&format!("name = \"{name}\"")).unwrap_or_else(|| panic!("no rule {name}:\n{toml}"));
    let rest = &toml[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

/// The files the seeds' DestinationRule names (tls.crt, tls.key, ca.crt: a client certificate and its CA), made
/// with openssl in a temporary directory.
fn gateway_certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = "set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=ca -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=egress -keyout tls.key -out tls.csr 2>/dev/null
printf 'extendedKeyUsage=clientAuth\\n' > tls.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile tls.ext -out tls.crt 2>/dev/null";
    let out = Command::new("sh").args(["-c", script]).current_dir(dir.path()).output().expect("openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

#[test]
fn istio_egress_objects_become_l7_and_dns_rules_that_check_accepts() {
    let files = [fixtures("istio-0"), fixtures("istio-more-")].concat();
    let certs = gateway_certificates();
    let tls_dir = certs.path().display().to_string();
    let (ok, toml, err) = import(
        "istio",
        &files,
        &["--sources", "10.10.0.0/24", "--egress-ip", "192.0.2.10", "--tls-dir", &tls_dir],
    );
    assert!(ok, "{err}");
    let (checked, report) = check(&toml);
    assert!(checked, "{report}\n{toml}");
    // HTTP ports of ServiceEntries and Gateways: one l7 rule per port with every name.
    let http = rule(&toml, "l7-80");
    for host in
        ["nginx.external.svc.cluster.local", "httpbin.org", "api.external.com", "backup-api.external.com"]
    {
        assert!(http.contains(&format!("\"{host}\"")), "{host} on port 80:\n{http}");
    }
    assert!(http.contains("action = \"l7\"") && http.contains("ports = [80]"), "{http}");
    // TLS passthrough by SNI.
    let tls = rule(&toml, "l7-443");
    assert!(tls.contains("\"www.baidu.com\""), "{tls}");
    // A TCP ServiceEntry with named endpoints: those names, by DNS.
    let db = rule(&toml, "tcp-5432");
    assert!(db.contains("to_hosts = [\"db1.external.com\", \"db2.external.com\"]"), "{db}");
    assert!(db.contains("action = \"allow\""), "{db}");
    // The seeds' VirtualService, DestinationRule and ServiceEntry: one service routing by header to subsets over
    // mutual TLS with the files from --tls-dir.
    let service = &toml[toml.find("[[service]]").unwrap_or_else(|| panic!("no service:\n{toml}"))..];
    for line in [
        "hosts = [\"nginx.external.svc.cluster.local\"]\nport = 80\nupstream_tls = \"mutual\"",
        &format!("upstream_cert = \"{tls_dir}/tls.crt\""),
        "address = \"40.76.65.115\"\nport = 443\nlabels = { \"version\" = \"v1\" }",
        "[[service.subset]]\nname = \"v2\"\nlabels = { \"version\" = \"v2\" }",
        "headers = { \"want\" = \"v1\" }\nto = \"v1\"",
        "headers = { \"want\" = \"v2\" }\nto = \"v2\"",
    ] {
        assert!(service.contains(line), "{line:?} missing:\n{service}");
    }
    assert!(!toml.contains("dr-nginx-ext: "), "the DestinationRule was translated whole:\n{toml}");
    assert!(!toml.contains("vs-nginx-ext-egress: "), "the VirtualService was translated whole:\n{toml}");
    // What egressd does not do yet is named, with the object it comes from.
    for note in [
        "DestinationRule external-api-destination: connectionPool, loadBalancer, outlierDetection",
        "verify_destination = \"dns\"",
    ] {
        assert!(toml.contains(note), "note {note:?} missing:\n{toml}");
    }
    // Each note once, however many files repeat an object.
    let notes: Vec<&str> = toml.lines().filter(|l| l.starts_with("# - ")).collect();
    let mut unique = notes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(notes.len(), unique.len(), "{notes:#?}");
}

#[test]
fn cilium_policies_become_groups_with_their_egress_ip_and_rules_that_check_accepts() {
    let (ok, toml, err) = import("cilium", &fixtures("cilium-"), &["--sources", "10.10.0.0/24"]);
    assert!(ok, "{err}");
    let (checked, report) = check(&toml);
    assert!(checked, "{report}\n{toml}");
    // The egress gateway policy: its egress IP, its destinations, its exclusions inside them.
    assert!(
        toml.contains(
            "name = \"egress-external-api\"\nsources = [\"10.10.0.0/24\"]\negress_ips = [\"10.0.100.50\"]"
        ),
        "{toml}"
    );
    let ha = rule(&toml, "egress-ha-policy-destinations");
    assert!(ha.contains("to = [\"0.0.0.0/0\"]"), "{ha}");
    assert!(
        ha.contains("except = [\"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"100.64.0.0/10\"]"),
        "{ha}"
    );
    // toFQDNs with HTTP rules: an l7 rule with the names, the method and the path as an anchored regex.
    let l7 = rule(&toml, "l7-egress-policy-egress1-0");
    assert!(l7.contains("hosts = [\"api.stripe.com\", \"*.googleapis.com\"]"), "{l7}");
    assert!(l7.contains("methods = [\"POST\"]") && l7.contains("paths = [\"regex:/v1/charges\"]"), "{l7}");
    for note in
        ["toEndpoints (in-cluster selectors) is not translated", "dns rules (DNS proxy) are not translated"]
    {
        assert!(toml.contains(note), "note {note:?} missing:\n{toml}");
    }
    // One prefix belongs to one group: the later groups wait for their own sources, and say so.
    assert!(toml.contains("group egress-ha-policy: no sources yet"), "{toml}");
    assert!(report.contains("has no sources and never matches"), "{report}");
}

#[test]
fn bad_yaml_is_refused_with_its_file_and_rules_only_leaves_the_group_out() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: ServiceEntry\nspec: [unclosed\n").unwrap();
    let (ok, _, err) = import("istio", &[bad], &[]);
    assert!(!ok);
    assert!(err.contains("bad.yaml: document 1:"), "{err}");
    let (ok, toml, _) = import("istio", &fixtures("istio-httpbin"), &["--group", "web", "--rules-only"]);
    assert!(ok);
    assert!(!toml.contains("[[group]]") && toml.contains("group = \"web\""), "{toml}");
}
