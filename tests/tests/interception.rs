//! Capture modes sidecap does not implement (TPROXY, virtual interfaces, owner-group
//! filters) are refused loudly: the pod's CNI ADD fails naming the setting and its value,
//! the agent logs it and counts it, and nothing of the pod is in the kernel. The unit tests
//! are policy/tests/fidelity.rs; the differential test skips these golden cases for this.

use std::{io::Write, time::Duration};

use sidecap_tests::{fixture::SVC, *};

/// A meshed pod as the API server has it before its sandbox exists.
fn pod_yaml(name: &str, annotations: &str, env: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'\n{annotations}spec:\n  containers:\n  - name: app\n  - name: istio-proxy\n{env}"
    )
}

#[test]
fn unimplemented_capture_modes_fail_the_pods_cni_add_naming_the_setting() {
    require_root!();
    let topo = Topology::builder().pod("t").pod("v").pod("g").service_addr(SVC).build().expect("topology");
    let mesh = MeshDir::new();
    mesh.write("pod-t.yaml", &pod_yaml("t", "    sidecar.istio.io/interceptionMode: TPROXY\n", ""));
    mesh.write("pod-v.yaml", &pod_yaml("v", "    traffic.sidecar.istio.io/kubevirtInterfaces: net1\n", ""));
    mesh.write("pod-g.yaml", &pod_yaml("g", "", "    env:\n    - name: ISTIO_OUTBOUND_OWNER_GROUPS\n      value: \"1001\"\n"));
    let pins = BpfPinDir::new("fidelity-refuse").expect("pins");
    let dir = TempDir::new("fidelity-cni").expect("tmp");
    let socket = dir.path().join("cni.sock");
    let sock_arg = socket.display().to_string();
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--cni-socket", &sock_arg, "--cni-wait-secs", "5"]);
    agent.wait_pods(&[], 0, Duration::from_secs(20));
    agent.wait_cni_socket(&socket, Duration::from_secs(20));

    let cases = [
        ("t", "annotation sidecar.istio.io/interceptionMode: \"TPROXY\" is not supported by sidecap"),
        ("v", "annotation traffic.sidecar.istio.io/kubevirtInterfaces: \"net1\" is not supported by sidecap"),
        ("g", "container istio-proxy env ISTIO_OUTBOUND_OWNER_GROUPS: \"1001\" is not supported by sidecap"),
    ];
    for (name, why) in cases {
        let pod = topo.pod(name);
        let ip = format!("{}/24", pod.ipv4());
        let (code, out) = cni::kube("ADD", "default", name, &format!("fidelity-{name}"), &pod.netns().path(), &socket, &[&ip]);
        assert_eq!(code, 1, "{name}: {out}\nagent log:\n{}", agent.log());
        let msg = out["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("default/{name}")) && msg.contains(why), "{name}: {out}");
        // Logged with the pod's name.
        let log = agent.log();
        assert!(log.lines().any(|l| l.contains(&format!("pod=default/{name}")) && l.contains(why)), "{name}: agent log:\n{log}");
    }
    // Nothing of these pods is in the kernel: no half capture.
    assert_eq!(inspect(pins.path()).as_array().map(Vec::len), Some(0), "{:#}", inspect(pins.path()));
    // And the refusals are counted.
    let metrics = http_get_metrics(agent.admin_addr());
    let errors: u64 = metrics
        .lines()
        .find(|l| l.starts_with("sidecap_sync_errors_total{kind=\"pod\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(errors >= 3, "sync errors {errors}:\n{metrics}");
}

fn http_get_metrics(addr: std::net::SocketAddr) -> String {
    use std::io::Read;
    assert!(addr.ip().is_loopback(), "{addr}");
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}
