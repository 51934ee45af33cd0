//! What an operator sees: `/metrics`, `/healthz`, `/readyz`, `sidecap inspect --pod`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use sidecap_tests::{fixture::SVC, *};

/// A plain HTTP/1.1 GET to the agent's admin endpoint on 127.0.0.1.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    assert!(addr.ip().is_loopback(), "admin endpoint must be on loopback in tests: {addr}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn metrics_health_and_readiness_reflect_the_kernel() {
    require_root!();
    let m = Mesh::start(MeshSpec::default());
    let a = m.pod("a");
    let _up = Upstream::start(m.topo.services(), (SVC, 80).into()).expect("upstream");
    let _hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("m"));
    assert!(r.ok, "{r:?}");

    let admin = m.agent.admin_addr();
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz"), (200, "ready\n".into()));
    let (code, body) = get(admin, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "sidecap_pod_connections_total{namespace=\"default\",pod=\"a\",action=\"captured\"} 1",
        "sidecap_pods_managed 1",
        "sidecap_policy_generations_written_total 1",
        "sidecap_convergence_seconds_count 1",
    ] {
        assert!(body.lines().any(|l| l == line), "no `{line}` in /metrics:\n{body}");
    }
    assert_eq!(get(admin, "/nope").0, 404);
}

#[test]
fn inspect_names_pods_and_filters_by_pod_with_the_agent_down() {
    require_root!();
    let mut m = Mesh::start(MeshSpec { pods: &["a", "b"], ..Default::default() });
    m.agent.kill9();
    let bpffs = m.pins.path().display().to_string();
    let (code, out, err) = sidecap(&["inspect", "--bpffs", &bpffs, "--pod", "default/b"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("pod default/b (netns "), "{out}");
    assert!(!out.contains("default/a"), "{out}");
    assert!(out.contains("10.251.100.10_80::10.251.100.10:80"), "listeners in the seed's form:\n{out}");
    let (code, _, err) = sidecap(&["inspect", "--bpffs", &bpffs, "--pod", "default/nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("pod default/nope is not in the maps"), "{err}");
}

#[test]
fn explain_reads_the_live_kernel_state_and_agrees_with_what_connects_do() {
    require_root!();
    let sc = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: a\n  namespace: default\nspec:\n  workloadSelector:\n    labels:\n      app: a\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n  egress:\n  - hosts:\n    - \"./*\"\n";
    let m = Mesh::start(MeshSpec {
        files: &[("sidecar.yaml", sc)],
        annotations: &[("traffic.sidecar.istio.io/excludeOutboundPorts", "9999")],
        ..Default::default()
    });
    let bpffs = m.pins.path().display().to_string();
    let (code, out, err) = sidecap(&[
        "explain",
        "--bpffs",
        &bpffs,
        "--pod",
        "default/a",
        "--to",
        "10.251.100.10:80",
        "--to",
        "10.251.100.10:81",
        "--to",
        "10.251.100.10:9999",
        "--inbound",
        "8080",
        "--inbound",
        "15021",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["source"], "kernel");
    let d = v["decisions"].as_array().expect("decisions");
    let got: Vec<(&str, &str)> = d.iter().map(|x| (x["action"].as_str().unwrap(), x["reason"].as_str().unwrap())).collect();
    assert_eq!(got[0], ("capture", "listener 10.251.100.10_80"), "{v:#}");
    assert_eq!(got[1], ("drop", "no listener: REGISTRY_ONLY"), "{v:#}");
    assert_eq!(got[2], ("passthrough", "excluded outbound port 9999"), "{v:#}");
    assert_eq!(got[3].0, "capture", "{v:#}");
    assert_eq!(got[4].0, "passthrough", "15021 is the proxy's own port: {v:#}");
    // The same destination from the proxy's own socket: istio-iptables' owner rules, which
    // the kernel code (and so explain) applies.
    assert_eq!(d[0]["proxy"]["verdict"], "untouched", "{v:#}");
    assert_eq!(d[0]["proxy"]["reason"], "the proxy's own traffic (uid 1337)", "{v:#}");

    // And the kernel does what explain says.
    let a = m.pod("a");
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("x"));
    assert_eq!(r.errno, Some(1), "{r:?}");
    // The same question from the configuration directory gives the same answers.
    let cfg = m.mesh.path().display().to_string();
    let (code, out, err) =
        sidecap(&["explain", "--config", &cfg, "--pod", "default/a", "--to", "10.251.100.10:80", "--to", "10.251.100.10:81"]);
    assert_eq!(code, 0, "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let actions: Vec<&str> = c["decisions"].as_array().unwrap().iter().map(|x| x["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["capture", "drop"], "{c:#}");
}

#[test]
fn unusable_setup_is_refused_in_one_clear_line() {
    require_root!();
    let dir = TempDir::new("bad").expect("tmp");
    let cfg = dir.path().display().to_string();
    // Not a cgroup v2 directory.
    let (code, out, err) = sidecap(&[
        "agent",
        "--config",
        &cfg,
        "--cgroup",
        &cfg,
        "--bpffs",
        "/sys/fs/bpf/sidecap-never",
        "--admin-addr",
        "off",
        "--cni-socket",
        "off",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("cgroup {cfg} does not exist or is not a cgroup v2 directory")), "{err}");
    assert!(!std::path::Path::new("/sys/fs/bpf/sidecap-never").exists());
    // A bpffs path that is not on a bpf filesystem.
    let cg = TestCgroup::new("bad").expect("cgroup");
    let not_bpffs = dir.path().join("pins").display().to_string();
    let (code, _, err) = sidecap(&[
        "agent",
        "--config",
        &cfg,
        "--cgroup",
        &cg.path().display().to_string(),
        "--bpffs",
        &not_bpffs,
        "--admin-addr",
        "off",
        "--cni-socket",
        "off",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not on a bpf filesystem"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

/// The real `promtool check metrics` (Debian's prometheus package, installed by `cargo xtask
/// setup`) on a live agent's /metrics (classic text format, as promtool reads it), with a
/// captured connection so that the per-pod kernel counters are there too.
#[test]
fn metrics_pass_promtool_check() {
    require_root!();
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("promtool not found: `cargo xtask setup` installs Debian's prometheus package");
    let m = Mesh::start(MeshSpec::default());
    let a = m.pod("a");
    let _up = Upstream::start(m.topo.services(), (SVC, 80).into()).expect("upstream");
    let _hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("m"));
    assert!(r.ok, "{r:?}");
    let (code, body) = get(m.agent.admin_addr(), "/metrics");
    assert_eq!(code, 200);
    for family in ["sidecap_pod_connections_total", "sidecap_map_entries", "sidecap_convergence_seconds"] {
        assert!(body.contains(&format!("# HELP {family} ")), "no HELP for {family} in:\n{body}");
    }

    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write metrics to promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {}\n{report}\n/metrics:\n{body}", out.status);

    // A scraper that asks for OpenMetrics (as Prometheus does) gets it.
    let mut s = TcpStream::connect_timeout(&m.agent.admin_addr(), Duration::from_secs(2)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n").unwrap();
    let mut om = String::new();
    s.read_to_string(&mut om).expect("read response");
    assert!(om.contains("Content-Type: application/openmetrics-text") && om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE sidecap_pod_connections counter\n"), "{om}");
}
