//! `sidecap agent --kubernetes` end to end on the real kernel: the agent's API server is the
//! local list/watch stand-in (`agent/tests/support/fake_apiserver.rs`, on 127.0.0.1), the
//! pod is a sandbox netns named by the `sidecap.io/netns` annotation. A Sidecar changed in
//! the "API server" changes capture; the server going away keeps the policy; a pod deleted
//! while it was away loses its state and its sk_lookup link once it is back.

#[path = "../../agent/tests/support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use sidecap_tests::{
    fixture::{SVC, WAIT},
    *,
};

const NODE: &str = "sandbox-node";
const EPERM: i32 = 1;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn pod_object(pod: &Pod) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name(), "namespace": "default", "labels": {"app": pod.name()},
                     "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
                                     "sidecap.io/netns": pod.netns().path().display().to_string()}},
        "spec": {"nodeName": NODE, "containers": [{"name": "app"}, {"name": "istio-proxy"}]},
        "status": {"phase": "Running", "podIP": pod.ipv4().to_string(),
                   "podIPs": [{"ip": pod.ipv4().to_string()}, {"ip": pod.ipv6().to_string()}]}
    })
}

fn sidecar_for_a(mode: &str) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": "a", "namespace": "default", "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"workloadSelector": {"labels": {"app": "a"}}, "outboundTrafficPolicy": {"mode": mode},
                 "egress": [{"hosts": ["./*"]}]}
    })
}

#[test]
fn sidecar_changes_in_the_api_server_change_capture() {
    require_root!();
    let topo = Topology::builder().pod("a").service_addr(SVC).build().expect("topology");
    let a = topo.pod("a");
    let cookie = a.cookie().expect("cookie");

    let mut server = FakeApiServer::start();
    server.apply(pod_object(a));
    server.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                        "spec": {"clusterIP": SVC.to_string(), "ports": [{"name": "tcp-web", "port": 80, "protocol": "TCP"}]}}));
    server.apply(sidecar_for_a("ALLOW_ANY"));

    let dir = TempDir::new("kubeconfig").expect("temp dir");
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\ncurrent-context: fake\n", server.url()),
    )
    .expect("kubeconfig");

    let pins = BpfPinDir::new("kube").expect("bpffs pin dir");
    let kc = kubeconfig.display().to_string();
    let mut agent =
        Agent::start_with_source(topo.cgroup().path(), pins.path(), &["--kubernetes", "--kubeconfig", &kc, "--node-name", NODE], &[]);
    agent.wait_pods(&[cookie], 1, WAIT);
    let link = pins.path().join("links/netns").join(cookie.to_string());
    assert!(link.exists(), "the pod's sk_lookup link is pinned: {}", link.display());

    let _up = Upstream::start(topo.services(), sa(SVC, 81)).expect("upstream 81");
    let probe = Probe::at(probe_bin!());
    let r = probe.connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("before"));
    assert!(r.ok && r.peer_addr() == Some(sa(SVC, 81)), "ALLOW_ANY passes an unlisted port: {r:?}\n{}", agent.log());

    // The Sidecar changes in the API server: REGISTRY_ONLY, live.
    server.apply(sidecar_for_a("REGISTRY_ONLY"));
    agent.wait_pods(&[cookie], 2, WAIT);
    let r = probe.connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("after"));
    assert_eq!(r.errno, Some(EPERM), "REGISTRY_ONLY from the API server: {r:?}");

    // The API server goes away: the policy stays, the agent keeps running and retrying.
    server.stop();
    std::thread::sleep(Duration::from_secs(2));
    let r = probe.connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("down"));
    assert_eq!(r.errno, Some(EPERM), "last policy kept while the API server is down: {r:?}");
    let v = agent.wait_pods(&[cookie], 2, WAIT);
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v:#}");
    assert!(agent.log().contains("Kubernetes API error"), "{}", agent.log());

    // Deleted while the agent could not see it; back: state and sk_lookup link removed.
    assert!(server.delete("Pod", "default", "a"));
    server.restart();
    wait_until("the pod removed from the maps", WAIT, || {
        !inspect(pins.path()).as_array().into_iter().flatten().any(|p| p["netns_cookie"].as_u64() == Some(cookie))
    });
    wait_until("the sk_lookup link removed", Duration::from_secs(5), || !link.exists());
    let r = probe.connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("gone"));
    assert!(r.ok && r.peer_addr() == Some(sa(SVC, 81)), "no capture once the pod is gone: {r:?}");
    drop(agent);
}
