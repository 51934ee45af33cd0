//! The Kubernetes source through kube-rs's real client against a local HTTP server that
//! speaks the list/watch protocol (no API server can run on these machines): initial
//! snapshot, Sidecar added/changed/deleted, pod deleted, API server down and back, 410 Gone
//! relist, 5xx retries, Istio version fallback, netns from processes, kubeconfig.

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
    wait_for(&mut src, LIMIT, "the relisted Sidecars", |c| {
        sidecar_hosts(c) == [("shop/new".into(), vec!["istio-system/*".into()])]
    });
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
