//! The Kubernetes source through kube-rs's real client against a local HTTP server that
//! speaks the list/watch protocol (no API server can run on these machines): initial
//! snapshot, Sidecar added/changed/deleted, pod deleted, API server down and back, 410 Gone
//! relist (ERROR event and HTTP status), 5xx retries, Istio version fallback and a version
//! disappearing at run time, netns from processes, kubeconfig, objects that stop typing or
//! never type, Istio-invalid objects, a stuck watch failing readiness, User-Agent, list
//! semantics (watch cache vs quorum, paging).

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use sidecap::source::{
    Source,
    kube::{KubeOptions, KubeSource},
};
use sidecap_policy::Cluster;

const NODE: &str = "node-a";

fn options() -> KubeOptions {
    let mut o = KubeOptions::new(NODE);
    o.retry_max = Some(Duration::from_millis(300));
    o.rediscover_interval = Duration::from_millis(500);
    // No real pods' processes are looked at.
    o.proc_root = PathBuf::from("/nonexistent-proc");
    o
}

fn source(server: &FakeApiServer, opts: KubeOptions) -> KubeSource {
    let config = kube::Config::new(server.url().parse().expect("url"));
    KubeSource::with_config(config, opts).expect("source")
}

fn meshed_pod(ns: &str, name: &str, node: &str, netns: Option<&str>) -> Value {
    let mut annotations = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    if let Some(n) = netns {
        annotations["sidecap.io/netns"] = json!(n);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [
            {"name": "app", "image": "app"},
            {"name": "istio-proxy", "image": "proxyv2", "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
        ]},
        "status": {"phase": "Running", "podIP": "10.251.0.10", "podIPs": [{"ip": "10.251.0.10"}]}
    })
}

fn sidecar(ns: &str, name: &str, hosts: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"egress": [{"hosts": hosts}]}
    })
}

fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn base(server: &FakeApiServer) {
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio-injection": "enabled"}}}));
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}));
    server.apply(meshed_pod("shop", "web", NODE, Some("/run/netns/web")));
    server.apply(meshed_pod("shop", "elsewhere", "node-b", Some("/run/netns/elsewhere")));
    server.apply(service("shop", "api", "10.96.0.10"));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "api-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.251.0.20"]}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }));
    server.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "ext", "namespace": "shop"},
        "spec": {"hosts": ["ext.example.com"], "addresses": ["192.0.2.1"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "STATIC", "location": "MESH_EXTERNAL"}
    }));
    server.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"}
    }));
    // Not the mesh config: another name, and the right name in another namespace.
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other", "namespace": "istio-system"}, "data": {"mesh": "bad: [yaml"}}));
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "shop"}, "data": {"mesh": "rootNamespace: [not, a, string]"}}));
}

/// Calls `next` until a snapshot satisfies `want` (panics after `limit`, showing the last).
fn wait_for(src: &mut KubeSource, limit: Duration, what: &str, want: impl Fn(&Cluster) -> bool) -> Cluster {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        match src.next(Duration::from_millis(200)) {
            Some(Ok(c)) if want(&c) => return c,
            Some(Ok(c)) => last = Some(summary(&c)),
            Some(Err(e)) => last = Some(format!("error: {e}")),
            None => {}
        }
    }
    panic!("no snapshot with {what} within {limit:?}; last: {last:?}");
}

/// No snapshot at all (and no error) for `d`.
fn quiet_for(src: &mut KubeSource, d: Duration) {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if let Some(u) = src.next(Duration::from_millis(100)) {
            panic!("unexpected update: {:?}", u.map(|c| summary(&c)));
        }
    }
}

fn summary(c: &Cluster) -> String {
    format!(
        "pods={:?} sidecars={:?} services={} slices={} entries={} namespaces={} mesh={:?}",
        pods(c),
        sidecar_hosts(c),
        c.services.len(),
        c.endpoint_slices.len(),
        c.service_entries.len(),
        c.namespaces.len(),
        c.mesh.outbound_mode()
    )
}

fn pods(c: &Cluster) -> Vec<String> {
    c.pods.iter().map(|p| p.obj.metadata.key()).collect()
}

fn sidecar_hosts(c: &Cluster) -> Vec<(String, Vec<String>)> {
    c.sidecars
        .iter()
        .map(|s| (s.obj.metadata.key(), s.obj.spec.egress.iter().flatten().flat_map(|e| e.hosts.clone()).collect()))
        .collect()
}

const LIMIT: Duration = Duration::from_secs(15);

#[test]
fn initial_snapshot_has_every_kind() {
    let server = FakeApiServer::start();
    base(&server);
    server.apply(sidecar("shop", "default", &["./*", "istio-system/*"]));
    let mut src = source(&server, options());
    assert!(src.describe().contains(&server.url()), "{}", src.describe());
    let c = wait_for(&mut src, LIMIT, "everything", |_| true);
    assert!(src.synced());
    assert_eq!(pods(&c), ["shop/web"], "only this node's pods");
    assert_eq!(sidecar_hosts(&c), [("shop/default".to_string(), vec!["./*".to_string(), "istio-system/*".to_string()])]);
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.endpoint_slices.len(), 1);
    assert_eq!(c.service_entries.len(), 1);
    assert_eq!(c.namespaces.len(), 2);
    assert_eq!(c.mesh.outbound_mode(), sidecap_policy::model::OutboundMode::RegistryOnly);
    assert_eq!(c.meshed_pods().len(), 1);
    let web = c.pod(&sidecap_policy::PodRef::new("shop", "web")).expect("web");
    assert_eq!(web.metadata.annotations.get("sidecap.io/netns").map(String::as_str), Some("/run/netns/web"));
    // The policy engine takes it as it takes files.
    let policy = sidecap_policy::evaluate(&c, &sidecap_policy::PodRef::new("shop", "web"), &Default::default());
    assert!(policy.is_ok(), "{policy:?}");

    // The watches asked for this node's pods and the istio ConfigMap only.
    let reqs = server.requests();
    assert!(reqs.iter().any(|r| r.starts_with("LIST /api/v1/pods")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with("LIST /api/v1/namespaces/istio-system/configmaps")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with("LIST /apis/networking.istio.io/v1/sidecars")), "{reqs:?}");
    // Nothing changes: nothing is delivered.
    quiet_for(&mut src, Duration::from_millis(800));
}

#[test]
fn sidecar_added_changed_deleted() {
    let server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    let c = wait_for(&mut src, LIMIT, "the initial view", |_| true);
    assert!(c.sidecars.is_empty());

    server.apply(sidecar("shop", "default", &["./*"]));
    wait_for(&mut src, LIMIT, "the Sidecar added", |c| sidecar_hosts(c) == [("shop/default".into(), vec!["./*".into()])]);

    server.apply(sidecar("shop", "default", &["./*", "istio-system/*"]));
    wait_for(&mut src, LIMIT, "the Sidecar changed", |c| {
        sidecar_hosts(c) == [("shop/default".into(), vec!["./*".into(), "istio-system/*".into()])]
    });

    assert!(server.delete("Sidecar", "shop", "default"));
    wait_for(&mut src, LIMIT, "the Sidecar deleted", |c| c.sidecars.is_empty());
    // Watches were opened from the list's resourceVersion, and kept.
    assert_eq!(server.count("LIST /apis/networking.istio.io/v1/sidecars"), 1, "{:?}", server.requests());
}

#[test]
fn pod_deleted_leaves_the_snapshot() {
    let server = FakeApiServer::start();
    base(&server);
    server.apply(meshed_pod("shop", "web2", NODE, Some("/run/netns/web2")));
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "both pods", |c| pods(c) == ["shop/web", "shop/web2"]);
    assert!(server.delete("Pod", "shop", "web2"));
    let c = wait_for(&mut src, LIMIT, "web2 gone", |c| pods(c) == ["shop/web"]);
    assert_eq!(c.meshed_pods().len(), 1);
    // A pod on another node changes nothing.
    server.apply(meshed_pod("shop", "far", "node-b", None));
    quiet_for(&mut src, Duration::from_millis(600));
}

#[test]
fn api_server_down_keeps_last_and_resyncs() {
    let mut server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the initial view", |_| true);

    server.stop();
    // Down: no snapshot (so the agent keeps the last policy), no error, no panic.
    quiet_for(&mut src, Duration::from_millis(1500));
    assert!(src.synced());

    // Changes made while the agent could not see them arrive after the restart.
    server.apply(sidecar("shop", "default", &["./*"]));
    assert!(server.delete("Pod", "shop", "web"));
    server.restart();
    let c = wait_for(&mut src, LIMIT, "the changes made while down", |c| c.sidecars.len() == 1 && c.pods.is_empty());
    assert_eq!(c.services.len(), 1);

    // And it keeps watching.
    server.apply(meshed_pod("shop", "web", NODE, Some("/run/netns/web")));
    wait_for(&mut src, LIMIT, "the pod back", |c| pods(c) == ["shop/web"]);
}

#[test]
fn gone_410_forces_a_relist() {
    let server = FakeApiServer::start();
    base(&server);
    server.apply(sidecar("shop", "old", &["./*"]));
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the old Sidecar", |c| sidecar_hosts(c).len() == 1);
    let lists = server.count("LIST /apis/networking.istio.io/v1/sidecars");

    // Events lost to compaction: only a relist can tell the old one is gone.
    server.expire_with(vec![sidecar("shop", "new", &["istio-system/*"])], vec![("Sidecar", "shop", "old")]);
    wait_for(&mut src, LIMIT, "the relisted Sidecars", |c| sidecar_hosts(c) == [("shop/new".into(), vec!["istio-system/*".into()])]);
    assert!(server.count("LIST /apis/networking.istio.io/v1/sidecars") > lists, "{:?}", server.requests());

    // Watching resumes after the relist.
    server.apply(sidecar("shop", "new", &["./*"]));
    wait_for(&mut src, LIMIT, "a change after the relist", |c| sidecar_hosts(c) == [("shop/new".into(), vec!["./*".into()])]);
}

#[test]
fn bookmarks_move_the_resume_point() {
    let server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the initial view", |_| true);
    // Changes to other kinds move the server's resourceVersion; the Sidecar watch hears of
    // it only through BOOKMARK events.
    let mut rv = 0;
    for i in 0..3 {
        rv = server.apply(service("shop", &format!("s{i}"), &format!("10.96.1.{i}")));
    }
    wait_for(&mut src, LIMIT, "the new Services", |c| c.services.len() == 4);
    std::thread::sleep(Duration::from_millis(600)); // a few bookmark periods
    server.end_watches();
    let resumed = |r: &String| {
        r.strip_prefix("WATCH /apis/networking.istio.io/v1/sidecars rv=")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v >= rv)
    };
    let deadline = Instant::now() + LIMIT;
    while !server.requests().iter().any(resumed) {
        assert!(Instant::now() < deadline, "no watch resumed from a bookmark: {:?}", server.requests());
        let _ = src.next(Duration::from_millis(100));
    }
    // Resumed, not relisted.
    assert_eq!(server.count("LIST /apis/networking.istio.io/v1/sidecars"), 1, "{:?}", server.requests());
    server.apply(sidecar("shop", "default", &["./*"]));
    wait_for(&mut src, LIMIT, "a Sidecar after the resume", |c| c.sidecars.len() == 1);
}

#[test]
fn server_errors_are_retried() {
    let server = FakeApiServer::start();
    base(&server);
    server.set_unavailable(true);
    let mut src = source(&server, options());
    quiet_for(&mut src, Duration::from_millis(1200));
    assert!(!src.synced(), "nothing listed yet");
    server.set_unavailable(false);
    server.fail_next(5);
    wait_for(&mut src, LIMIT, "the view once the server answers", |c| pods(c) == ["shop/web"]);
    assert!(src.synced());

    // 503 on a running watch: the last view stays, then the change arrives.
    server.set_unavailable(true);
    quiet_for(&mut src, Duration::from_millis(800));
    server.apply(sidecar("shop", "default", &["./*"]));
    server.set_unavailable(false);
    wait_for(&mut src, LIMIT, "the Sidecar after the outage", |c| c.sidecars.len() == 1);
}

#[test]
fn older_istio_versions_are_used_when_v1_is_not_served() {
    let server = FakeApiServer::start();
    base(&server);
    server.set_istio_versions(&["v1alpha3"]);
    let mut s = sidecar("shop", "default", &["./*"]);
    s["apiVersion"] = json!("networking.istio.io/v1alpha3");
    server.apply(s);
    let mut src = source(&server, options());
    let c = wait_for(&mut src, LIMIT, "the v1alpha3 Sidecar", |c| c.sidecars.len() == 1);
    assert_eq!(c.service_entries.len(), 1);
    let reqs = server.requests();
    assert!(reqs.iter().any(|r| r.starts_with("LIST /apis/networking.istio.io/v1alpha3/sidecars")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with("GET /apis/networking.istio.io/v1 ")), "{reqs:?}");
}

#[test]
fn no_istio_crds_is_a_complete_view_without_sidecars() {
    let server = FakeApiServer::start();
    base(&server);
    server.set_istio_versions(&[]);
    let mut src = source(&server, options());
    let c = wait_for(&mut src, LIMIT, "a view without Istio kinds", |_| true);
    assert!(c.sidecars.is_empty() && c.service_entries.is_empty());
    assert_eq!(pods(&c), ["shop/web"]);
    // Istio installed later: found on rediscovery.
    server.set_istio_versions(&["v1beta1"]);
    server.apply(sidecar("shop", "default", &["./*"]));
    wait_for(&mut src, LIMIT, "the Sidecar once Istio is served", |c| c.sidecars.len() == 1);
}

#[test]
fn bad_mesh_config_is_rejected_and_recovers() {
    let server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the initial view", |_| true);
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
                        "data": {"mesh": "rootNamespace: [x]"}}));
    let deadline = Instant::now() + LIMIT;
    let err = loop {
        assert!(Instant::now() < deadline, "no rejection");
        if let Some(Err(e)) = src.next(Duration::from_millis(200)) {
            break e;
        }
    };
    assert!(err.contains("data.mesh.rootNamespace"), "{err}");
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
                        "data": {"mesh": "outboundTrafficPolicy: {mode: ALLOW_ANY}"}}));
    wait_for(&mut src, LIMIT, "ALLOW_ANY", |c| c.mesh.outbound_mode() == sidecap_policy::model::OutboundMode::AllowAny);
}

#[test]
fn malformed_object_is_left_out() {
    let server = FakeApiServer::start();
    base(&server);
    server.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "bad", "namespace": "shop"},
                        "spec": {"egress": [{"hosts": ["./*"], "port": {"number": "many"}}]}}));
    server.apply(sidecar("shop", "good", &["./*"]));
    let mut src = source(&server, options());
    let c = wait_for(&mut src, LIMIT, "the good Sidecar", |_| true);
    assert_eq!(sidecar_hosts(&c), [("shop/good".into(), vec!["./*".into()])]);
}

#[test]
fn host_network_pods_are_never_captured() {
    let server = FakeApiServer::start();
    base(&server);
    let mut p = meshed_pod("shop", "hostnet", NODE, None);
    p["spec"]["hostNetwork"] = json!(true);
    server.apply(p);
    let mut src = source(&server, options());
    let c = wait_for(&mut src, LIMIT, "the view", |_| true);
    assert_eq!(pods(&c), ["shop/web"]);
}

/// A fake procfs with one process in the pod's cgroup (systemd driver spelling).
fn fake_proc(dir: &std::path::Path, pid: u32, uid: &str) {
    let p = dir.join(pid.to_string());
    std::fs::create_dir_all(&p).expect("mkdir");
    let slice = uid.replace('-', "_");
    std::fs::write(
        p.join("cgroup"),
        format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice}.slice/cri-containerd-abc.scope\n"),
    )
    .expect("write");
}

#[test]
fn netns_found_from_the_pods_processes() {
    let server = FakeApiServer::start();
    base(&server);
    let uid_a = "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f";
    let uid_b = "7f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f";
    let mut a = meshed_pod("shop", "a", NODE, None);
    a["metadata"]["uid"] = json!(uid_a);
    let mut b = meshed_pod("shop", "b", NODE, None);
    b["metadata"]["uid"] = json!(uid_b);
    server.apply(a);
    server.apply(b);
    let proc_root = std::env::temp_dir().join(format!("sidecap-kube-proc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&proc_root);
    std::fs::create_dir_all(&proc_root).expect("mkdir");
    fake_proc(&proc_root, 4242, uid_a);
    let mut opts = options();
    opts.proc_root = proc_root.clone();
    let mut src = source(&server, opts);

    let netns = |c: &Cluster, name: &str| {
        c.pod(&sidecap_policy::PodRef::new("shop", name))
            .and_then(|p| p.metadata.annotations.get("sidecap.io/netns").cloned())
    };
    let c = wait_for(&mut src, LIMIT, "pod a's netns", |c| netns(c, "a").is_some());
    assert_eq!(netns(&c, "a"), Some(proc_root.join("4242/ns/net").display().to_string()));
    assert_eq!(netns(&c, "b"), None, "no process yet");
    assert_eq!(netns(&c, "web").as_deref(), Some("/run/netns/web"), "an annotation wins");

    // b's sandbox starts later: found by the periodic rescan, without any API change.
    fake_proc(&proc_root, 5151, uid_b);
    let c = wait_for(&mut src, Duration::from_secs(5), "pod b's netns", |c| netns(c, "b").is_some());
    assert_eq!(netns(&c, "b"), Some(proc_root.join("5151/ns/net").display().to_string()));
    let _ = std::fs::remove_dir_all(&proc_root);
}

#[test]
fn proxy_cgroup_found_from_the_istio_proxy_container_and_followed_on_restart() {
    let server = FakeApiServer::start();
    base(&server);
    let uid = "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f";
    let (id1, id2) = ("1111aaaa", "2222bbbb");
    // The native sidecar reports in initContainerStatuses.
    let pod = |id: &str| {
        let mut p = meshed_pod("shop", "a", NODE, Some("/run/netns/a"));
        p["metadata"]["uid"] = json!(uid);
        p["status"]["initContainerStatuses"] = json!([{"name": "istio-proxy", "containerID": format!("containerd://{id}")}]);
        p["status"]["containerStatuses"] = json!([{"name": "app", "containerID": "containerd://3333cccc"}]);
        p
    };
    server.apply(pod(id1));
    let root = std::env::temp_dir().join(format!("sidecap-kube-cgroup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pod_dir = root.join(format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", uid.replace('-', "_")));
    for id in [id1, "3333cccc"] {
        std::fs::create_dir_all(pod_dir.join(format!("cri-containerd-{id}.scope"))).expect("mkdir");
    }
    let mut opts = options();
    opts.cgroup_root = Some(root.clone());
    let mut src = source(&server, opts);
    let cgroup = |c: &Cluster| {
        c.pod(&sidecap_policy::PodRef::new("shop", "a"))
            .and_then(|p| p.metadata.annotations.get("sidecap.io/proxy-cgroup").cloned())
    };
    let want = |id: &str| Some(pod_dir.join(format!("cri-containerd-{id}.scope")).display().to_string());
    let c = wait_for(&mut src, LIMIT, "pod a's proxy cgroup", |c| cgroup(c).is_some());
    assert_eq!(cgroup(&c), want(id1));

    // The proxy container restarts: a new id in the status, whose cgroup appears a moment
    // later; found by the rescan, without another API change.
    server.apply(pod(id2));
    let c = wait_for(&mut src, LIMIT, "the new status", |c| cgroup(c).is_none());
    assert_eq!(cgroup(&c), None, "the new container's cgroup does not exist yet");
    std::fs::create_dir_all(pod_dir.join(format!("cri-containerd-{id2}.scope"))).expect("mkdir");
    let c = wait_for(&mut src, Duration::from_secs(5), "the restarted proxy's cgroup", |c| cgroup(c) == want(id2));
    assert_eq!(cgroup(&c), want(id2));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn kubeconfig_file_is_used() {
    let server = FakeApiServer::start();
    base(&server);
    let dir = std::env::temp_dir().join(format!("sidecap-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("config");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\nusers:\n- name: agent\n  user:\n    token: not-checked\n",
            server.url()
        ),
    )
    .expect("write");
    let mut opts = options();
    opts.kubeconfig = Some(path.clone());
    let mut src = KubeSource::connect(opts).expect("connect");
    wait_for(&mut src, LIMIT, "the view through the kubeconfig", |c| pods(c) == ["shop/web"]);

    let mut bad = options();
    bad.kubeconfig = Some(dir.join("missing"));
    let err = KubeSource::connect(bad).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("missing"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `deploy/base/rbac.yaml` grants list/watch on exactly the resources the source asks for.
#[test]
fn rbac_grants_exactly_what_is_requested() {
    let server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the initial view", |_| true);
    let mut requested: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("LIST ") || r.starts_with("WATCH "))
        .filter_map(|r| r.split(' ').nth(1).and_then(|p| p.rsplit('/').next()).map(str::to_string))
        .collect();
    requested.sort();
    requested.dedup();

    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/rbac.yaml")).expect("deploy/base/rbac.yaml");
    let list = |line: &str, key: &str| -> Option<Vec<String>> {
        let rest = line.trim().strip_prefix(key)?.trim();
        let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
        Some(inner.split(',').map(|s| s.trim().trim_matches('"').to_string()).collect())
    };
    let mut granted: Vec<String> = rbac.lines().filter_map(|l| list(l, "resources:")).flatten().collect();
    granted.sort();
    granted.dedup();
    assert_eq!(granted, requested, "rbac.yaml resources vs what the watchers request");
    let verbs: Vec<Vec<String>> = rbac.lines().filter_map(|l| list(l, "verbs:")).collect();
    assert!(!verbs.is_empty());
    for v in verbs {
        assert_eq!(v, ["list", "watch"], "list/watch only");
    }
    assert!(rbac.contains("resourceNames: [\"istio\"]"), "the ConfigMap grant names the mesh ConfigMap only");
}

// ---------------------------------------------------------------------------------------------
// Observability: the source registered with a Prometheus registry and the agent's Health, as
// the agent does; readiness read through the real admin endpoint.

struct Observed {
    src: KubeSource,
    registry: std::sync::Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    admin: std::net::SocketAddr,
}

fn observed(server: &FakeApiServer, opts: KubeOptions) -> Observed {
    let mut src = source(server, opts);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = sidecap::metrics::Metrics::new(&mut registry);
    let health = std::sync::Arc::new(sidecap::admin::Health::default());
    // Everything else ready: only the source's own problems are left to report.
    health.attached.store(true, std::sync::atomic::Ordering::Relaxed);
    health.synced.store(true, std::sync::atomic::Ordering::Relaxed);
    health.applied.store(true, std::sync::atomic::Ordering::Relaxed);
    health.beat();
    src.observe(metrics, health.clone());
    let registry = std::sync::Arc::new(std::sync::Mutex::new(registry));
    let admin = sidecap::admin::serve("127.0.0.1:0".parse().expect("addr"), registry.clone(), health, None).expect("admin");
    Observed { src, registry, admin }
}

impl Observed {
    /// The metric's value for this label set (`name{labels}` as the text format prints it).
    fn metric(&self, series: &str) -> f64 {
        metric(&self.registry, series)
    }

    fn readyz(&self) -> (u16, String) {
        http_get(self.admin, "/readyz")
    }
}

fn metric(registry: &std::sync::Mutex<prometheus_client::registry::Registry>, series: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry.lock().expect("registry")).expect("encode");
    text.lines().filter_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).sum()
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// Calls `next` (keeping the last snapshot) until `cond` holds; panics after LIMIT.
fn until(src: &mut KubeSource, last: &mut Option<Cluster>, what: &str, mut cond: impl FnMut(&Option<Cluster>) -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond(last) {
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        if let Some(Ok(c)) = src.next(Duration::from_millis(100)) {
            *last = Some(c);
        }
    }
}

fn lockdown_sidecar(port: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": "shop"},
        "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
                 "egress": [{"port": {"number": port, "protocol": "HTTP", "name": "http"}, "hosts": ["./*"]}]}
    })
}

fn outbound(c: &Cluster, pod: &str, to: &str) -> sidecap_policy::Action {
    let p = sidecap_policy::evaluate(c, &sidecap_policy::PodRef::new("shop", pod), &Default::default()).expect("policy");
    p.decide_outbound(to.parse().expect("addr")).action
}

/// Must have 1: an edit that does not type (egress port "abc") leaves the last typed Sidecar
/// in force: the REGISTRY_ONLY lockdown stays, nothing becomes passthrough or captured.
#[test]
fn typod_sidecar_keeps_the_lockdown() {
    let server = FakeApiServer::start();
    base(&server);
    server.apply(lockdown_sidecar(json!(80)));
    let mut o = observed(&server, options());
    let mut last = None;
    until(&mut o.src, &mut last, "the lockdown", |c| c.as_ref().is_some_and(|c| c.sidecars.len() == 1));
    let c = last.clone().expect("snapshot");
    assert_eq!(outbound(&c, "web", "192.0.2.77:443"), sidecap_policy::Action::Drop, "not in the registry: dropped");
    assert_eq!(outbound(&c, "web", "10.96.0.10:80"), sidecap_policy::Action::Capture);

    // The typo: the object no longer types. Counted once, the last typed version stays.
    server.apply(lockdown_sidecar(json!("abc")));
    let untyped = r#"sidecap_kube_objects_untyped_total{kind="Sidecar"}"#;
    let reg = o.registry.clone();
    until(&mut o.src, &mut last, "the untyped edit counted", |_| metric(&reg, untyped) == 1.0);
    // Let the source deliver whatever it makes of the edit.
    let _ = o.src.next(Duration::from_millis(300));
    let c = match o.src.next(Duration::from_millis(100)) {
        Some(Ok(c)) => c,
        _ => last.clone().expect("snapshot"),
    };
    assert_eq!(sidecar_hosts(&c), [("shop/default".into(), vec!["./*".into()])]);
    assert!(c.held_sidecars.is_empty(), "it typed before: its last version governs, nothing is held");
    assert_eq!(outbound(&c, "web", "192.0.2.77:443"), sidecap_policy::Action::Drop, "still locked down");
    assert_eq!(outbound(&c, "web", "10.96.0.10:80"), sidecap_policy::Action::Capture);

    // The same bad version seen again (a relist) is not counted again.
    server.expire_with(vec![], vec![]);
    let lists = server.count("LIST /apis/networking.istio.io/v1/sidecars");
    until(&mut o.src, &mut last, "a relist", |_| server.count("LIST /apis/networking.istio.io/v1/sidecars") > lists);
    let _ = o.src.next(Duration::from_millis(300));
    assert_eq!(o.metric(untyped), 1.0);

    // Fixed: the new version applies.
    let mut fixed = lockdown_sidecar(json!(80));
    fixed["spec"]["egress"][0]["hosts"] = json!(["./*", "istio-system/*"]);
    server.apply(fixed);
    until(&mut o.src, &mut last, "the fixed Sidecar", |c| {
        c.as_ref()
            .is_some_and(|c| sidecar_hosts(c) == [("shop/default".into(), vec!["./*".into(), "istio-system/*".into()])])
    });
}

/// Must have 1: a Sidecar that never typed holds the pods it could govern (its namespace,
/// its selector when readable): their evaluation fails, so the agent keeps their previous
/// policy and refuses new ones (`sidecap-cni` answers with the reason). Other pods are free.
#[test]
fn sidecar_first_arriving_untyped_holds_its_pods() {
    let server = FakeApiServer::start();
    base(&server);
    let mut other = meshed_pod("shop", "other", NODE, Some("/run/netns/other"));
    other["metadata"]["labels"] = json!({"app": "other"});
    server.apply(other);
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "blog", "labels": {"istio-injection": "enabled"}}}));
    server.apply(meshed_pod("blog", "web", NODE, Some("/run/netns/blog-web")));
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the pods", |c| c.pods.len() == 3);

    server.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": "typo", "namespace": "shop"},
        "spec": {"workloadSelector": {"labels": {"app": "web"}}, "egress": [{"port": {"number": "abc"}, "hosts": ["./*"]}]}}));
    let c = wait_for(&mut src, LIMIT, "the held Sidecar", |c| !c.held_sidecars.is_empty());
    assert!(c.sidecars.is_empty(), "nothing of it is applied");
    assert_eq!(c.held_sidecars[0].key(), "shop/typo");
    assert!(c.held_sidecars[0].reason.contains("spec.egress[0].port.number"), "{:?}", c.held_sidecars[0]);
    let web = sidecap_policy::evaluate(&c, &sidecap_policy::PodRef::new("shop", "web"), &Default::default());
    let err = web.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("shop/typo") && err.contains("previous policy stays"), "{err}");
    // Not selected by it, or in another namespace: evaluated as usual.
    assert!(sidecap_policy::evaluate(&c, &sidecap_policy::PodRef::new("shop", "other"), &Default::default()).is_ok());
    assert!(sidecap_policy::evaluate(&c, &sidecap_policy::PodRef::new("blog", "web"), &Default::default()).is_ok());

    // Typed at last: it governs, nothing is held.
    server.apply(sidecar("shop", "typo", &["./*"]));
    let c = wait_for(&mut src, LIMIT, "the Sidecar typed", |c| c.held_sidecars.is_empty() && c.sidecars.len() == 1);
    assert!(sidecap_policy::evaluate(&c, &sidecap_policy::PodRef::new("shop", "web"), &Default::default()).is_ok());
}

/// Must have 4: istiod does not validate what its informers read
/// (pilot/pkg/config/kube/crdclient/client.go `addCRD`: informer → `translateFunc`, no
/// `ValidateConfig`; validation happens in the admission webhook, and for files in
/// pilot/pkg/config/memory/store.go), and it skips a host without a namespace with an error
/// log (pilot/pkg/model/sidecar.go `convertIstioListenerToWrapper`: "Illegal host in sidecar
/// resource"). So does sidecap: the Sidecar is applied, reported with Istio's message, counted.
#[test]
fn istio_invalid_sidecar_is_applied_and_reported() {
    let server = FakeApiServer::start();
    base(&server);
    let mut o = observed(&server, options());
    wait_for(&mut o.src, LIMIT, "the initial view", |_| true);
    server.apply(sidecar("shop", "default", &["frontend.shop.svc.cluster.local"]));
    let c = wait_for(&mut o.src, LIMIT, "the invalid Sidecar", |c| c.sidecars.len() == 1);
    assert_eq!(sidecar_hosts(&c), [("shop/default".into(), vec!["frontend.shop.svc.cluster.local".into()])]);
    assert_eq!(o.metric(r#"sidecap_kube_objects_invalid_total{kind="Sidecar"}"#), 1.0);
    // What `sidecap validate` says of it is what was reported.
    let v = sidecap_policy::validate::validate_sidecar(&c.sidecars[0].obj);
    assert!(v.errors.iter().any(|e| e == "host must be of form namespace/dnsName"), "{v:?}");
}

/// Must have 2: v1 stops being served at run time (JSON 404, then the API server mux's plain
/// "404 page not found"): the watcher rediscovers, lists v1beta1, and edits apply again; the
/// Sidecar stays in every snapshot meanwhile.
#[test]
fn v1_disappearing_at_run_time() {
    let server = FakeApiServer::start();
    base(&server);
    server.apply(sidecar("shop", "default", &["./*"]));
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the v1 Sidecar", |c| c.sidecars.len() == 1);

    for (plain, to) in [(false, "v1beta1"), (true, "v1alpha3")] {
        server.set_plain_404(plain);
        server.set_istio_versions(&[to]);
        let want = format!("LIST /apis/networking.istio.io/{to}/sidecars");
        let deadline = Instant::now() + LIMIT;
        while server.count(&want) == 0 {
            assert!(Instant::now() < deadline, "no {want}: {:?}", server.requests());
            if let Some(Ok(c)) = src.next(Duration::from_millis(100)) {
                assert_eq!(c.sidecars.len(), 1, "the policy stays in force");
            }
        }
        let mut s = sidecar("shop", "default", &["./*", &format!("{to}/*")]);
        s["apiVersion"] = json!(format!("networking.istio.io/{to}"));
        server.apply(s);
        wait_for(&mut src, LIMIT, "an edit after the move", |c| {
            sidecar_hosts(c) == [("shop/default".into(), vec!["./*".into(), format!("{to}/*")])]
        });
    }
}

/// Must have 2: HTTP 410 on watch start (not an ERROR event) relists.
#[test]
fn http_410_on_watch_start_relists() {
    let server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the initial view", |_| true);
    let lists = server.count("LIST ");
    // Every kind's next watch gets 410.
    server.gone_next_watches(7);
    server.end_watches();
    let deadline = Instant::now() + LIMIT;
    while server.count("LIST ") < lists + 7 {
        assert!(Instant::now() < deadline, "not every kind relisted: {:?}", server.requests());
        let _ = src.next(Duration::from_millis(100));
    }
    server.apply(sidecar("shop", "default", &["./*"]));
    wait_for(&mut src, LIMIT, "a Sidecar after the relist", |c| c.sidecars.len() == 1);
}

/// Must have 3: a watch that stops saying anything (no event, no bookmark) makes /readyz fail
/// naming the kind; the age metric and the error counter show it; it recovers.
#[test]
fn stuck_watch_fails_readiness() {
    let server = FakeApiServer::start();
    base(&server);
    let mut opts = options();
    opts.watch_timeout = Duration::from_secs(2);
    opts.stale_after = Duration::from_millis(1500);
    let mut o = observed(&server, opts);
    wait_for(&mut o.src, LIMIT, "the initial view", |_| true);
    let deadline = Instant::now() + LIMIT;
    while o.readyz().0 != 200 {
        assert!(Instant::now() < deadline, "never ready: {:?}", o.readyz());
        let _ = o.src.next(Duration::from_millis(100));
    }

    server.stall("sidecars", true);
    let deadline = Instant::now() + LIMIT;
    let body = loop {
        let _ = o.src.next(Duration::from_millis(100));
        let (code, body) = o.readyz();
        if code == 503 && body.contains("Sidecar") {
            break body;
        }
        assert!(Instant::now() < deadline, "readiness never failed: {code} {body}");
    };
    assert!(body.contains("kubernetes source: Sidecar: no successful list or watch"), "{body}");
    assert!(o.metric(r#"sidecap_kube_last_event_age_seconds{kind="Sidecar"}"#) >= 1.5);
    // The silent watch is given up (after 1.5 × its timeout) and counted, without an HTTP code.
    let deadline = Instant::now() + LIMIT;
    while o.metric(r#"sidecap_kube_api_errors_total{kind="Sidecar",code="none"}"#) < 1.0 {
        assert!(Instant::now() < deadline, "the stuck watch was never given up");
        let _ = o.src.next(Duration::from_millis(100));
    }

    server.stall("sidecars", false);
    let deadline = Instant::now() + LIMIT;
    while o.readyz().0 != 200 {
        assert!(Instant::now() < deadline, "never ready again: {:?}", o.readyz());
        let _ = o.src.next(Duration::from_millis(100));
    }
}

/// Must have 3: API errors are counted per kind and HTTP code.
#[test]
fn api_errors_are_counted_by_kind_and_code() {
    let server = FakeApiServer::start();
    base(&server);
    server.set_istio_versions(&["v1"]);
    let mut o = observed(&server, options());
    wait_for(&mut o.src, LIMIT, "the initial view", |_| true);
    server.set_unavailable(true);
    let deadline = Instant::now() + LIMIT;
    while o.metric(r#"sidecap_kube_api_errors_total{kind="Pod",code="503"}"#) < 1.0 {
        assert!(Instant::now() < deadline, "no 503 counted for Pods");
        let _ = o.src.next(Duration::from_millis(100));
    }
    server.set_unavailable(false);
}

/// Must have 5: every request says who we are.
#[test]
fn requests_carry_the_user_agent() {
    let server = FakeApiServer::start();
    base(&server);
    let mut src = source(&server, options());
    wait_for(&mut src, LIMIT, "the initial view", |_| true);
    let agents = server.user_agents();
    assert!(!agents.is_empty());
    let want = format!("sidecap/{}", env!("CARGO_PKG_VERSION"));
    assert!(agents.iter().all(|a| *a == want), "{agents:?}");
}

/// Must have 5: the bulk kinds list from the watch cache (resourceVersion 0, then "not older
/// than" the last version seen after a watch expires); Istio's kinds and the mesh ConfigMap
/// read from etcd in pages.
#[test]
fn list_semantics() {
    let server = FakeApiServer::start();
    base(&server);
    for i in 0..5 {
        server.apply(sidecar("shop", &format!("s{i}"), &["./*"]));
    }
    let mut opts = options();
    opts.page_size = 2;
    let mut src = source(&server, opts);
    wait_for(&mut src, LIMIT, "every Sidecar, across pages", |c| c.sidecars.len() == 5);
    let lists = server.lists();
    let first = |path: &str| lists.iter().find(|l| l.starts_with(&format!("{path} "))).cloned().unwrap_or_default();
    for p in ["/api/v1/pods", "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/namespaces"] {
        assert_eq!(first(p), format!("{p} rv=0 match=NotOlderThan limit= continue="), "{lists:?}");
    }
    for p in [
        "/apis/networking.istio.io/v1/sidecars",
        "/apis/networking.istio.io/v1/serviceentries",
        "/api/v1/namespaces/istio-system/configmaps",
    ] {
        assert_eq!(first(p), format!("{p} rv= match= limit=2 continue="), "{lists:?}");
    }
    let sidecar_pages = lists.iter().filter(|l| l.starts_with("/apis/networking.istio.io/v1/sidecars ")).count();
    assert_eq!(sidecar_pages, 3, "5 Sidecars in pages of 2: {lists:?}");

    // Watches expire (ERROR 410): the bulk kinds relist from the cache, not older than what
    // they had; Istio's from etcd again.
    let before = lists.len();
    server.expire_with(vec![], vec![]);
    let deadline = Instant::now() + LIMIT;
    let relisted = |p: &str| server.lists()[before..].iter().any(|l| l.starts_with(&format!("{p} ")));
    while !(relisted("/api/v1/pods") && relisted("/apis/networking.istio.io/v1/sidecars")) {
        assert!(Instant::now() < deadline, "no relists: {:?}", server.lists());
        let _ = src.next(Duration::from_millis(100));
    }
    let lists = server.lists()[before..].to_vec();
    let pods = lists.iter().find(|l| l.starts_with("/api/v1/pods ")).cloned().unwrap_or_default();
    let rv: u64 = pods.split("rv=").nth(1).and_then(|r| r.split(' ').next()).and_then(|r| r.parse().ok()).unwrap_or(0);
    assert!(rv > 0 && pods.contains("match=NotOlderThan limit= "), "{pods}");
    let sc = lists.iter().find(|l| l.starts_with("/apis/networking.istio.io/v1/sidecars ")).cloned().unwrap_or_default();
    assert!(sc.contains("rv= match= limit=2"), "{sc}");
}
