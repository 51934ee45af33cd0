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
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=u-{pod}");
    // One container per pod, as a runtime has it.
    let id = format!("ctr-{pod}");
    cni_call(command, &[("CNI_CONTAINERID", &id), ("CNI_NETNS", netns), ("CNI_ARGS", &args)], &cni::conf(socket, prev_ips))
}

/// One plugin call with exactly these CNI_* variables (besides CNI_COMMAND, CNI_IFNAME, CNI_PATH).
fn cni_call(command: &str, env: &[(&str, &str)], conf: &serde_json::Value) -> (i32, serde_json::Value, Duration) {
    let t0 = Instant::now();
    let mut cmd = Command::new(cni_bin());
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("sidecap-cni (built with the agent)");
    // The plugin may exit before reading everything (e.g. on an early error): ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(conf.to_string().as_bytes());
    let out = child.wait_with_output().expect("sidecap-cni output");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    (out.status.code().unwrap_or(-1), v, t0.elapsed())
}

/// A Kubernetes runtime's call for container `id` of pod `default/<pod>`.
fn kube_call(command: &str, pod: &str, id: &str, netns: &str, socket: &std::path::Path, prev_ips: &[&str]) -> (i32, serde_json::Value) {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={id}");
    let (code, out, _) =
        cni_call(command, &[("CNI_CONTAINERID", id), ("CNI_NETNS", netns), ("CNI_ARGS", &args)], &cni::conf(socket, prev_ips));
    (code, out)
}

/// A pod as the API server has it before its sandbox exists: no netns, no IP yet.
fn pod_yaml(name: &str, meshed: bool) -> String {
    let proxy = if meshed { "\n  - name: istio-proxy" } else { "" };
    let status = if meshed { "  annotations:\n    sidecar.istio.io/status: '{\"containers\":[\"istio-proxy\"]}'\n" } else { "" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n{status}spec:\n  containers:\n  - name: app{proxy}\n"
    )
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
    // CNI 1.1 STATUS: "plugin not available" while the agent is unreachable; CHECK fails.
    let (code, out, _) = cni_call("STATUS", &[], &cni::conf(&socket, &[]));
    assert_eq!((code, out["code"].as_u64()), (1, Some(50)), "{out}");
    let (code, out, _) = cni("CHECK", "a", "/run/netns/none", &socket, &[]);
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
    // A configuration version the plugin does not speak: code 1 ("incompatible CNI version").
    let mut old = cni::conf(&socket, &[]);
    old["cniVersion"] = "0.2.0".into();
    let (code, out, _) = cni_call("ADD", &[("CNI_CONTAINERID", "x"), ("CNI_ARGS", "K8S_POD_NAMESPACE=d;K8S_POD_NAME=a")], &old);
    assert_eq!((code, out["code"].as_u64()), (1, Some(1)), "{out}");
    // A runtime without K8S_POD_NAMESPACE and no podNamespace configured: refused, naming the flag.
    let (code, out, _) = cni_call("ADD", &[("CNI_CONTAINERID", "x"), ("CNI_ARGS", "K8S_POD_NAME=a")], &cni::conf(&socket, &[]));
    assert_eq!(code, 1, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("--pod-namespace"), "{out}");
}

fn pods_in(pins: &BpfPinDir) -> Vec<String> {
    inspect(pins.path())
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pod"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Deletes a pod's `PODS` entry behind the agent's back (as a crashed writer or an operator would).
fn delete_pods_entry(pins: &BpfPinDir, cookie: u64) {
    let map = pins.path().join("maps/PODS");
    let mut args = vec!["map".to_string(), "delete".into(), "pinned".into(), map.display().to_string(), "key".into(), "hex".into()];
    args.extend(cookie.to_le_bytes().iter().map(|b| format!("{b:02x}")));
    let out = sidecap_tests::util::run("bpftool", &args).expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cni_calls_are_keyed_by_container_id_as_the_spec_says() {
    require_root!();
    let topo = Topology::builder().pod("a").pod("b").service_addr(SVC).build().expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let (a_ns, b_ns) = (a.netns().path().display().to_string(), b.netns().path().display().to_string());
    let mesh = MeshDir::new();
    mesh.write("pod-a.yaml", &pod_yaml("a", true));
    mesh.write("pod-b.yaml", &pod_yaml("b", true));
    mesh.service("default", "web", SVC.into(), &[("tcp", 80)]);
    let pins = BpfPinDir::new("cn-spec").expect("pins");
    let dir = TempDir::new("cn-spec").expect("tmp");
    let socket = dir.path().join("cni.sock");
    let sock_arg = socket.display().to_string();
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--cni-socket", &sock_arg, "--cni-wait-secs", "5"]);
    agent.wait_pods(&[], 0, Duration::from_secs(20));
    agent.wait_cni_socket(&socket, Duration::from_secs(20));
    let _up = Upstream::start(topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let connect = |n: usize| {
        let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("x"));
        assert!(r.ok, "{r:?}");
        assert_eq!(hp.wait_log_lines(n, Duration::from_secs(5)).len(), n, "connect {n} captured");
    };

    // ADD, then the same ADD again (a runtime retry): both succeed, one capture, unchanged.
    let (code, out) = kube_call("ADD", "a", "ctr-a1", &a_ns, &socket, &["10.251.1.2/24"]);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    let first = inspect(pins.path());
    let (code, out) = kube_call("ADD", "a", "ctr-a1", &a_ns, &socket, &["10.251.1.2/24"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(inspect(pins.path()), first, "a repeated ADD rewrites nothing");
    connect(1);
    assert_eq!(kube_call("CHECK", "a", "ctr-a1", &a_ns, &socket, &["10.251.1.2/24"]).0, 0, "{}", agent.log());

    // A stale DEL: same pod name, another container (the pod's previous sandbox). Exit 0, and
    // the running pod keeps its capture.
    let (code, out) = kube_call("DEL", "a", "ctr-a0", &a_ns, &socket, &[]);
    assert_eq!((code, out), (0, serde_json::Value::Null));
    std::thread::sleep(Duration::from_millis(500)); // several agent passes (100 ms poll)
    assert_eq!(pods_in(&pins), vec!["default/a"], "{}", agent.log());
    connect(2);
    assert_eq!(kube_call("CHECK", "a", "ctr-a1", &a_ns, &socket, &[]).0, 0);

    // CHECK of a container the agent never saw: "unknown container".
    let (code, out) = kube_call("CHECK", "a", "ctr-a9", &a_ns, &socket, &[]);
    assert_eq!((code, out["code"].as_u64()), (1, Some(3)), "{out}");
    assert!(out["msg"].as_str().unwrap().contains("container ctr-a9 (default/a) is unknown to the agent"), "{out}");

    // CHECK reports a capture that went missing from the kernel.
    assert_eq!(kube_call("ADD", "b", "ctr-b1", &b_ns, &socket, &["10.251.2.2/24"]).0, 0);
    let cookie = b.netns().cookie().expect("cookie");
    delete_pods_entry(&pins, cookie);
    let (code, out) = kube_call("CHECK", "b", "ctr-b1", &b_ns, &socket, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("map PODS has no entry for netns"), "{out}");

    // STATUS: the agent is there.
    let (code, out, _) = cni_call("STATUS", &[], &cni::conf(&socket, &[]));
    assert_eq!(code, 0, "{out}");

    // A restarted agent still knows the containers the plugin reported (kept beside the
    // socket), so pod a stays captured and CHECK still passes.
    agent.stop();
    agent.restart();
    agent.wait_ready(Duration::from_secs(20));
    assert_eq!(kube_call("CHECK", "a", "ctr-a1", &a_ns, &socket, &[]).0, 0, "{}", agent.log());
    connect(3);

    // GC (CNI 1.1): only ctr-a1 is still attached to this network; b's container goes.
    let mut gc = cni::conf(&socket, &[]);
    gc["cniVersion"] = "1.1.0".into();
    gc["cni.dev/valid-attachments"] = serde_json::json!([{"containerID": "ctr-a1", "ifname": "eth0"}]);
    let (code, out, _) = cni_call("GC", &[], &gc);
    assert_eq!(code, 0, "{out}");
    let (code, out) = kube_call("CHECK", "b", "ctr-b1", &b_ns, &socket, &[]);
    assert_eq!(code, 1, "{out}");

    // DEL keyed by the container id alone: CNI_ARGS without the pod fields, exit 0, capture gone.
    let (code, out, _) =
        cni_call("DEL", &[("CNI_CONTAINERID", "ctr-a1"), ("CNI_NETNS", &a_ns), ("CNI_ARGS", "IgnoreUnknown=1")], &cni::conf(&socket, &[]));
    assert_eq!((code, out), (0, serde_json::Value::Null));
    wait_until("pod a's capture removed", Duration::from_secs(10), || pods_in(&pins).is_empty());
    // Nothing at all: no CNI_ARGS, no container id, no configuration. Still exit 0.
    assert_eq!(cni_call("DEL", &[], &serde_json::Value::Null).0, 0);
    assert_eq!(cni_call("DEL", &[("CNI_CONTAINERID", "ctr-x")], &cni::conf(&socket, &[])).0, 0);
    // A DEL's unknown container id is fine too; a second DEL of the same one as well.
    assert_eq!(kube_call("DEL", "a", "ctr-a1", "", &socket, &[]).0, 0);
    agent.assert_running();
}
