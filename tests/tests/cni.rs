//! The chained CNI plugin: `sidecap-cni` returns only when the new pod is captured, so the
//! app's first connect is already steered (the guarantee istio-init gives by running first).

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sidecap_tests::{fixture::SVC, *};

fn cni_bin() -> std::path::PathBuf {
    sidecap_bin().with_file_name("sidecap-cni")
}

/// Runs the plugin like a container runtime does; returns (exit code, stdout, elapsed).
fn cni(command: &str, pod: &str, netns: &str, socket: &std::path::Path, prev_ips: &[&str]) -> (i32, serde_json::Value, Duration) {
    let ips: Vec<serde_json::Value> = prev_ips.iter().map(|ip| serde_json::json!({"address": ip})).collect();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "sidecap-cni",
        "socketPath": socket,
        "prevResult": {"cniVersion": "1.0.0", "ips": ips},
    });
    let t0 = Instant::now();
    let mut child = Command::new(cni_bin())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=u-{pod}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sidecap-cni (built with the agent)");
    // The plugin may exit before reading everything (e.g. on an early error): ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(conf.to_string().as_bytes());
    let out = child.wait_with_output().expect("sidecap-cni output");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")) };
    (out.status.code().unwrap_or(-1), v, t0.elapsed())
}

/// A pod as the API server has it before its sandbox exists: no netns, no IP yet.
fn pod_yaml(name: &str, meshed: bool) -> String {
    let proxy = if meshed { "\n  - name: istio-proxy" } else { "" };
    let status = if meshed { "  annotations:\n    sidecar.istio.io/status: '{\"containers\":[\"istio-proxy\"]}'\n" } else { "" };
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n{status}spec:\n  containers:\n  - name: app{proxy}\n")
}

#[test]
fn cni_add_returns_once_the_pod_is_captured() {
    require_root!();
    let topo = Topology::builder().pod("a").pod("plain").service_addr(SVC).build().expect("topology");
    let (a, plain) = (topo.pod("a"), topo.pod("plain"));
    let mesh = MeshDir::new();
    mesh.write("pod-a.yaml", &pod_yaml("a", true));
    mesh.write("pod-plain.yaml", &pod_yaml("plain", false));
    mesh.service("default", "web", SVC.into(), &[("tcp", 80)]);
    let pins = BpfPinDir::new("cni").expect("pins");
    let dir = TempDir::new("cni").expect("tmp");
    let socket = dir.path().join("cni.sock");
    let sock_arg = socket.display().to_string();
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--cni-socket", &sock_arg, "--cni-wait-secs", "2"]);
    agent.wait_pods(&[], 0, Duration::from_secs(20));
    agent.wait_cni_socket(&socket, Duration::from_secs(20));
    let _up = Upstream::start(topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");

    // Nothing knows pod a's netns yet: not captured.
    assert!(inspect(pins.path()).as_array().unwrap().is_empty());

    let (code, out, took) = cni("ADD", "a", &a.netns().path().display().to_string(), &socket, &["10.251.1.2/24"]);
    assert_eq!(code, 0, "{out}\nagent log:\n{}", agent.log());
    assert_eq!(out["ips"][0]["address"], "10.251.1.2/24", "prevResult passed on unchanged: {out}");
    // The very next connect is captured: no wait, no retry.
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("first"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some((SVC, 80).into()), "first connect captured");
    let v = inspect(pins.path());
    assert_eq!(v[0]["pod"], "default/a");
    assert_eq!(v[0]["ips"], serde_json::json!(["10.251.1.2"]), "IPs from the CNI result: {v:#}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // A pod without a sidecar is not held up.
    let (code, out, took) = cni("ADD", "plain", &plain.netns().path().display().to_string(), &socket, &["10.251.2.2/24"]);
    assert_eq!(code, 0, "{out}");
    assert!(took < Duration::from_secs(1), "unmeshed pod waited {took:?}");
    assert_eq!(inspect(pins.path()).as_array().unwrap().len(), 1);

    // A pod the source does not know (yet) fails after the wait, with a clear message.
    let (code, out, took) = cni("ADD", "ghost", &plain.netns().path().display().to_string(), &socket, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("default/ghost not known to the agent's source after 2s"), "{out}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");

    // DEL succeeds; VERSION answers.
    assert_eq!(cni("DEL", "plain", "", &socket, &[]).0, 0);
    let (code, out, _) = cni("VERSION", "a", "", &socket, &[]);
    assert_eq!(code, 0);
    assert!(out["supportedVersions"].as_array().unwrap().contains(&"1.0.0".into()), "{out}");
}

#[test]
fn cni_add_fails_the_pod_when_the_agent_is_unreachable() {
    require_root!();
    let dir = TempDir::new("cni").expect("tmp");
    let socket = dir.path().join("nobody.sock");
    let (code, out, _) = cni("ADD", "a", "/run/netns/none", &socket, &["10.251.1.2/24"]);
    assert_eq!(code, 1, "{out}");
    let msg = out["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("sidecap agent unreachable at") && msg.contains("nobody.sock"), "{out}");
    assert_eq!(out["code"], 11);
    // Tear-down must not be blocked by a missing agent.
    assert_eq!(cni("DEL", "a", "/run/netns/none", &socket, &[]).0, 0);
}
