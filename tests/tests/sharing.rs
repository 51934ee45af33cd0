//! Istio's default mesh on a node: pods whose compiled rules are equal share one rule set in
//! the kernel (one policy id, written once, removed with its last pod), and a rule set that
//! does not fit the maps is refused whole: the new pod's CNI ADD fails naming the map and the
//! numbers, `/readyz` fails, and the pods already running keep their capture.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use sidecap_tests::{fixture::SVC, *};

/// `bpftool map dump` of a pinned map, as JSON.
fn dump(pins: &std::path::Path, map: &str) -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.join("maps").join(map))
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("bpftool json")
}

/// netns cookie → policy id, from `bpftool map dump` of PODS (its BTF names the fields).
fn policies(pins: &std::path::Path) -> BTreeMap<u64, u64> {
    dump(pins, "PODS")
        .iter()
        .map(|e| {
            let f = &e["formatted"];
            (f["key"].as_u64().expect("key"), f["value"]["policy"].as_u64().expect("policy"))
        })
        .collect()
}

/// Listener entries per policy id, from `bpftool map dump` of OUT_LISTENERS.
fn listeners_per_policy(pins: &std::path::Path) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for e in dump(pins, "OUT_LISTENERS") {
        let policy = &e["formatted"]["key"]["data"]["policy"];
        let bytes: Vec<u8> = policy.as_array().expect("policy bytes").iter().map(|b| b.as_u64().unwrap_or(0) as u8).collect();
        let id = u32::from_be_bytes(bytes.try_into().expect("4 bytes"));
        *out.entry(u64::from(id)).or_default() += 1;
    }
    out
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + fixture::WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn default_mesh_pods_share_one_rule_set_until_the_last_one_leaves() {
    require_root!();
    let topo = Topology::builder().pod("a").pod("b").pod("c").pod("d").service_addr(SVC).build().expect("topology");
    let mesh = MeshDir::new();
    for svc in 0..20u16 {
        mesh.service("default", &format!("s{svc}"), std::net::Ipv4Addr::new(10, 251, 101, svc as u8 + 1).into(), &[("tcp", 7000 + svc)]);
    }
    mesh.service("default", "web", SVC.into(), &[("tcp", 80)]);
    // No Sidecar for a, b, c: Istio's default mesh. d has one of its own.
    for name in ["a", "b", "c"] {
        mesh.pod(topo.pod(name), "default", &[("app", "web")], &[]);
    }
    mesh.pod(topo.pod("d"), "default", &[("app", "locked")], &[]);
    mesh.write(
        "sidecar-d.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: locked\n  namespace: default\nspec:\n  workloadSelector:\n    labels:\n      app: locked\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n  egress:\n  - port:\n      number: 80\n      protocol: TCP\n    hosts:\n    - \"./*\"\n",
    );
    let pins = BpfPinDir::new("share").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    let cookie = |n: &str| topo.pod(n).cookie().expect("cookie");
    agent.wait_pods(&["a", "b", "c", "d"].map(cookie), 1, fixture::WAIT);

    let p = policies(pins.path());
    let shared = p[&cookie("a")];
    assert_eq!(p[&cookie("b")], shared, "{p:?}");
    assert_eq!(p[&cookie("c")], shared, "{p:?}");
    assert_ne!(p[&cookie("d")], shared, "a pod with its own Sidecar has its own set: {p:?}");
    let l = listeners_per_policy(pins.path());
    assert_eq!(l.len(), 2, "two rule sets in OUT_LISTENERS, not one per pod: {l:?}");
    assert_eq!(l[&shared], 21, "the default mesh imports every service port: {l:?}");
    assert_eq!(l[&p[&cookie("d")]], 1, "d imports port 80 only: {l:?}");

    // The shared set captures for every pod that holds it.
    let _up = Upstream::start(topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(topo.pod("b"), HaproxyConfig::default()).expect("haproxy");
    let r = Probe::at(probe_bin!()).connect(topo.pod("b"), Creds::APP, "10.251.100.10:80", &ConnectOpts::send("hi"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some((SVC, 80).into()));

    // One Service more: the shared set is updated in place (same id), for every pod.
    mesh.service("default", "added", std::net::Ipv4Addr::new(10, 251, 102, 1).into(), &[("tcp", 7100)]);
    wait_for("the added Service in the shared set", || (listeners_per_policy(pins.path()).get(&shared) == Some(&22)).then_some(()));
    assert_eq!(policies(pins.path())[&cookie("a")], shared, "updated in place, not moved");

    // Pods leave; the set stays while one holds it, and goes with the last.
    mesh.remove("pod-a.yaml");
    mesh.remove("pod-b.yaml");
    wait_for("a and b gone", || (policies(pins.path()).len() == 2).then_some(()));
    assert_eq!(listeners_per_policy(pins.path()).get(&shared), Some(&22), "c still holds the shared set");
    mesh.remove("pod-c.yaml");
    wait_for("c gone", || (policies(pins.path()).len() == 1).then_some(()));
    let l = listeners_per_policy(pins.path());
    assert!(!l.contains_key(&shared), "the last pod leaving removes the set: {l:?}");
    assert_eq!(l.len(), 1, "d's set stays: {l:?}");

    // A restart adopts the sets by content and rewrites nothing.
    let before = inspect(pins.path());
    agent.kill9();
    agent.restart();
    agent.wait_pods(&[cookie("d")], 1, fixture::WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(inspect(pins.path())[0]["generation"], before[0]["generation"], "the restarted agent found d's set as it was");
    assert_eq!(policies(pins.path())[&cookie("d")], p[&cookie("d")]);
}

#[test]
fn a_rule_set_that_does_not_fit_is_refused_and_fails_the_new_pods_cni_add() {
    require_root!();
    let topo = Topology::builder().pod("a").pod("b").service_addr(SVC).build().expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let mesh = MeshDir::new();
    mesh.service("default", "web", SVC.into(), &[("tcp", 80)]);
    mesh.service("default", "db", std::net::Ipv4Addr::new(10, 251, 101, 1).into(), &[("tcp", 5432)]);
    mesh.service("default", "cache", std::net::Ipv4Addr::new(10, 251, 101, 2).into(), &[("tcp", 6379)]);
    mesh.pod(a, "default", &[], &[]);
    let pins = BpfPinDir::new("fit").expect("pins");
    let dir = TempDir::new("fit").expect("tmp");
    let socket = dir.path().join("cni.sock");
    let sock = socket.display().to_string();
    // Room for one set of 3 listeners and not a second.
    let mut agent = Agent::start(
        topo.cgroup().path(),
        pins.path(),
        mesh.path(),
        &["--max-listeners", "4", "--cni-socket", &sock, "--cni-wait-secs", "5"],
    );
    agent.wait_pods(&[a.cookie().unwrap()], 1, fixture::WAIT);
    assert_eq!(agent.admin_get("/readyz"), (200, "ready\n".into()));

    // b's knobs differ (an excluded port), so it needs a set of its own: 3 more listeners.
    mesh.write(
        "pod-b.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  namespace: default\n  annotations:\n    sidecar.istio.io/status: '{\"containers\":[\"istio-proxy\"]}'\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"9999\"\nspec:\n  containers:\n  - name: app\n  - name: istio-proxy\n",
    );
    let (code, out) = cni::kube("ADD", "default", "b", "ctr-b", &b.netns().path(), &socket, &[]);
    assert_ne!(code, 0, "the pod must not start uncaptured: {out}\n{}", agent.log());
    let msg = out["msg"].as_str().unwrap_or_default().to_string() + out["details"].as_str().unwrap_or_default();
    for part in ["default/b", "OUT_LISTENERS", "3 entries", "1 of 4 free", "--max-listeners"] {
        assert!(msg.contains(part), "CNI error names {part:?}: {out}");
    }
    let (status, body) = agent.admin_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("map capacity") && body.contains("default/b") && body.contains("OUT_LISTENERS"), "{body}");
    let metrics = agent.admin_get("/metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sidecap_capacity_refusals") && l.contains("rules") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(msg.contains("every outbound connection of the pod goes to its proxy"), "CNI error says b is captured whole meanwhile: {out}");
    assert_eq!(listeners_per_policy(pins.path()).values().sum::<usize>(), 3, "no half-written set");
    // Fail closed: b, had it started, is not left open. It holds a set without listener
    // entries whose default is capture, so its connections go to its own proxy.
    let b_policy = policies(pins.path())[&b.cookie().unwrap()];
    assert_ne!(b_policy, policies(pins.path())[&a.cookie().unwrap()]);
    assert!(!listeners_per_policy(pins.path()).contains_key(&b_policy), "b's set has no listener entries");
    let views = inspect(pins.path());
    let b_view = views.as_array().and_then(|v| v.iter().find(|p| p["pod"] == "default/b")).cloned().unwrap_or_default();
    assert_eq!(b_view["no_listener"], "capture", "{views}");

    // a keeps its capture.
    let _up = Upstream::start(topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("still"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some((SVC, 80).into()));
    // Port 9090 is no Service's: a's set passes it through directly, b (captured whole)
    // sends it to its proxy.
    let _up9090 = Upstream::start(topo.services(), (SVC, 9090).into()).expect("upstream 9090");
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:9090", &ConnectOpts::send("direct"));
    assert!(r.ok && r.peer_addr() == Some((SVC, 9090).into()), "{r:?}");
    let hp_b = Haproxy::start(b, HaproxyConfig::default()).expect("haproxy in b");
    let r = Probe::at(probe_bin!()).connect(b, Creds::APP, "10.251.100.10:9090", &ConnectOpts::send("captured whole"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp_b.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some((SVC, 9090).into()));

    // Once b is gone from the source, the node is ready again.
    mesh.remove("pod-b.yaml");
    wait_for("/readyz back to 200", || (agent.admin_get("/readyz").0 == 200).then_some(()));
}
