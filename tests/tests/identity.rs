//! Cgroup-bound proxy identity on the real kernel (issue 15): the proxy is uid/gid 1337
//! *and* a task of the proxy container's cgroup. Each pod has two container cgroups below
//! its own, as kubelet makes them: the proxy's (HAProxy as 1337) and the app's, where an
//! "app" process runs as 1337 too, borrowing the proxy's uid.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use sidecap_tests::fixture::{SVC, SVC2, WAIT};
use sidecap_tests::*;

const EPERM: i32 = 1;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn probe() -> Probe {
    Probe::at(probe_bin!())
}

fn dns_proxy_env() -> ProxyContainer {
    ProxyContainer { env: vec![("ISTIO_META_DNS_CAPTURE".into(), "true".into())], ..Default::default() }
}

/// Pod `name` (service `web` = SVC:80 is registered, SVC2 is not; REGISTRY_ONLY) with these
/// extra annotations.
fn write_pod(mesh: &MeshDir, pod: &Pod, annotations: &[(&str, &str)]) {
    mesh.pod_with_proxy(pod, "default", &[("app", pod.name())], annotations, &dns_proxy_env());
}

fn identity_of(pins: &BpfPinDir, pod: &Pod) -> String {
    let cookie = pod.cookie().expect("cookie");
    let v = inspect(pins.path());
    let p = v.as_array().into_iter().flatten().find(|p| p["netns_cookie"].as_u64() == Some(cookie)).cloned();
    p.and_then(|p| p["proxy_identity"].as_str().map(str::to_string)).unwrap_or_default()
}

fn wait_identity(agent: &Agent, pins: &BpfPinDir, pod: &Pod, want: &str) {
    let done = wait_for_identity(pins, pod, want);
    assert!(done, "{}: proxy identity is {:?}, want {want:?}\nagent log:\n{}", pod.name(), identity_of(pins, pod), agent.log());
}

fn wait_for_identity(pins: &BpfPinDir, pod: &Pod, want: &str) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if identity_of(pins, pod) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn path_of(cg: &TestCgroup) -> String {
    cg.path().to_str().expect("utf-8 cgroup path").to_string()
}

#[test]
fn an_app_with_the_proxy_uid_is_captured_and_the_proxy_is_not_and_a_restarted_proxy_is_followed() {
    require_root!();
    let topo = Topology::builder().pod("a").service_addr(SVC).service_addr(SVC2).build().expect("topology");
    let a = topo.pod("a");
    let proxy_cg = a.container_cgroup("scid-proxy-1").expect("proxy cgroup");
    let app_cg = a.container_cgroup("scid-app").expect("app cgroup");
    let mesh = MeshDir::new();
    mesh.mesh_mode("REGISTRY_ONLY");
    mesh.service("default", "web", IpAddr::from(SVC), &[("tcp-web", 80)]);
    // Relative to the cgroup2 mount, as the directory source allows.
    let rel = proxy_cg.path().strip_prefix(cgroup2_mount()).expect("under the mount").to_str().expect("utf-8").to_string();
    write_pod(&mesh, a, &[("sidecap.io/proxy-identity", "cgroup"), ("sidecap.io/proxy-cgroup", &rel)]);
    let pins = BpfPinDir::new("scid-e2e").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    agent.wait_pods(&[a.cookie().expect("cookie")], 1, WAIT);
    wait_identity(&agent, &pins, a, &format!("cgroup {}", proxy_cg.id().expect("id")));

    let web = Upstream::start(topo.services(), sa(SVC, 80)).expect("upstream web");
    let unregistered = Upstream::start(topo.services(), sa(SVC2, 80)).expect("upstream unregistered");
    let mut hp = Haproxy::start_in(a, &proxy_cg, HaproxyConfig::default()).expect("haproxy in the proxy cgroup");

    // The borrower: uid/gid 1337 in the app's cgroup. Captured to the proxy like an app...
    let r = probe().connect_in(a, &app_cg, Creds::PROXY, "10.251.100.10:80", &ConnectOpts::send("borrowed"));
    assert!(r.ok, "{r:?}\nagent log:\n{}", agent.log());
    assert_eq!(r.peer_addr(), Some(sa(Ipv4Addr::LOCALHOST, 15001)), "captured: {r:?}");
    assert_eq!(r.reply, "upstream 10.251.100.10:80\nborrowed", "{r:?}");
    // ...and the real proxy's own upstream connection (1337 in the proxy cgroup) is not
    // captured again: one log line, one upstream connection, from the pod.
    let log = hp.wait_log_lines(1, Duration::from_secs(5));
    assert_eq!((log[0].frontend, log[0].server), (Some(sa(SVC, 80)), Some(sa(SVC, 80))), "{log:?}");
    let conns = web.wait_connections(1, Duration::from_secs(5));
    assert_eq!(conns[0].peer.ip(), IpAddr::from(a.ipv4()), "{conns:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hp.log_lines().len(), 1, "a loop would log more: {:?}", hp.log_lines());
    assert_eq!(web.connections().len(), 1);

    // REGISTRY_ONLY: the borrower cannot escape to an unregistered destination...
    let r = probe().connect_in(a, &app_cg, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("escape"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
    // ...by gid alone neither...
    let gid_only = Creds { uid: 1000, gid: 1337 };
    let r = probe().connect_in(a, &app_cg, gid_only, "10.251.100.20:80", &ConnectOpts::send("escape"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
    // ...nor by the proxy's cgroup without its ids. The proxy itself goes directly.
    let r = probe().connect_in(a, &proxy_cg, Creds::APP, "10.251.100.20:80", &ConnectOpts::send("escape"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
    let r = probe().connect_in(a, &proxy_cg, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("proxy"));
    assert!(r.ok && r.peer_addr() == Some(sa(SVC2, 80)), "the proxy's own connection is untouched: {r:?}");
    assert_eq!(unregistered.wait_connections(1, Duration::from_secs(5))[0].received, b"proxy");
    assert_eq!(unregistered.connections().len(), 1, "only the proxy's connection arrived");

    // Inbound: the proxy calling its own pod goes through its inbound listener (Istio's
    // owner rule); the borrower's call is an app's (straight to the app, no detour).
    let app = probe().listen_in(a, &app_cg, Creds::APP, "0.0.0.0:8080", &[]);
    let r = probe().connect_in(a, &proxy_cg, Creds::PROXY, &format!("{}:8080", a.ipv4()), &ConnectOpts::send("self"));
    assert!(r.ok, "{r:?}");
    let r = probe().connect_in(a, &app_cg, Creds::PROXY, &format!("{}:8080", a.ipv4()), &ConnectOpts::send("borrowed self"));
    assert!(r.ok, "{r:?}");
    let conns = app.wait_connections(2, Duration::from_secs(5));
    let peer_ip = |c: &ListenConn| c.peer.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or_default();
    assert_eq!((peer_ip(&conns[0]), conns[0].received.as_str()), ("127.0.0.6".into(), "self"), "through inbound: {conns:?}");
    assert_eq!((peer_ip(&conns[1]), conns[1].received.as_str()), (a.ipv4().to_string(), "borrowed self"), "direct: {conns:?}");

    // DNS: the borrower's query goes to the DNS proxy; the proxy's own reaches the resolver.
    let resolver = Upstream::start_udp(topo.services(), sa(SVC, 53)).expect("resolver");
    let dns = probe().listen_in(a, &proxy_cg, Creds::PROXY, "127.0.0.1:15053", &["--udp"]);
    let q = |text: &str| ConnectOpts { sendto: true, send: Some(text.into()), ..Default::default() };
    let r = probe().connect_in(a, &app_cg, Creds::PROXY, "10.251.100.10:53", &q("borrowed query"));
    assert!(r.ok && r.reply.starts_with("listen 127.0.0.1:15053"), "answered by the DNS proxy: {r:?}");
    assert_eq!(r.peer_addr(), Some(sa(SVC, 53)), "reply source restored: {r:?}");
    let r = probe().connect_in(a, &proxy_cg, Creds::PROXY, "10.251.100.10:53", &q("upstream query"));
    assert!(r.ok && r.reply.starts_with("upstream 10.251.100.10:53"), "the proxy reaches the resolver: {r:?}");
    assert_eq!(resolver.wait_connections(1, Duration::from_secs(5))[0].received, b"upstream query");
    assert_eq!(dns.datagrams().len(), 1, "{:?}", dns.datagrams());

    // The proxy container restarts: a new cgroup (new path, as kubelet names it by the new
    // container id). The agent follows it; the old cgroup's 1337 is an app's now.
    hp.process().kill();
    let proxy_cg2 = a.container_cgroup("scid-proxy-2").expect("proxy cgroup 2");
    write_pod(&mesh, a, &[("sidecap.io/proxy-identity", "cgroup"), ("sidecap.io/proxy-cgroup", &path_of(&proxy_cg2))]);
    wait_identity(&agent, &pins, a, &format!("cgroup {}", proxy_cg2.id().expect("id")));
    let hp2 = Haproxy::start_in(a, &proxy_cg2, HaproxyConfig::default()).expect("haproxy in the new cgroup");
    let r = probe().connect_in(a, &proxy_cg, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("old"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "the old proxy cgroup is no longer the proxy: {r:?}");
    let r = probe().connect_in(a, &app_cg, Creds::PROXY, "10.251.100.10:80", &ConnectOpts::send("again"));
    assert!(r.ok && r.peer_addr() == Some(sa(Ipv4Addr::LOCALHOST, 15001)), "{r:?}");
    assert_eq!(r.reply, "upstream 10.251.100.10:80\nagain", "the new proxy forwarded it: {r:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hp2.log_lines().len(), 1, "the new proxy is not captured again: {:?}", hp2.log_lines());
    assert_eq!(web.connections().len(), 2);

    // Same path, new directory (a runtime reusing a name): followed by the periodic
    // re-resolution, with no change to any file.
    drop(hp2);
    let p2 = proxy_cg2.path().to_path_buf();
    drop(proxy_cg2);
    assert!(!p2.exists(), "old cgroup removed");
    std::fs::create_dir(&p2).expect("recreate the proxy cgroup");
    let recreated = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p2).expect("stat"));
    let followed = wait_for_identity(&pins, a, &format!("cgroup {recreated}"));
    let _ = std::fs::remove_dir(&p2);
    assert!(followed, "recreated cgroup not followed: {:?}\nagent log:\n{}", identity_of(&pins, a), agent.log());

    let v = inspect(pins.path());
    assert!(v[0]["flags"].as_array().expect("flags").contains(&"proxy-cgroup".into()), "{v:#}");
    assert!(v[0]["counters"]["dropped"].as_u64().unwrap_or(0) >= 4, "{v:#}");
    agent.assert_running();
}

#[test]
fn unknown_proxy_cgroup_fails_closed_and_uid_mode_stays_istio_exact() {
    require_root!();
    let topo = Topology::builder().pod("a").pod("b").service_addr(SVC2).build().expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let mesh = MeshDir::new();
    mesh.mesh_mode("REGISTRY_ONLY");
    // The node runs cgroup-bound identity; `a` has no proxy cgroup (not found yet), `b`
    // overrides the node's mode with Istio's.
    write_pod(&mesh, a, &[]);
    write_pod(&mesh, b, &[("sidecap.io/proxy-identity", "uid")]);
    let pins = BpfPinDir::new("scid-unknown").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--proxy-identity", "cgroup"]);
    agent.wait_pods(&[a.cookie().expect("cookie"), b.cookie().expect("cookie")], 1, WAIT);
    wait_identity(&agent, &pins, a, "cgroup unknown");
    wait_identity(&agent, &pins, b, "uid");
    let up = Upstream::start(topo.services(), sa(SVC2, 80)).expect("upstream");
    let a_proxy = a.container_cgroup("scid-proxy").expect("cgroup");

    // While a's proxy cgroup is unknown nothing in a is the proxy: not even the process
    // that will turn out to be it. REGISTRY_ONLY holds.
    let r = probe().connect_in(a, &a_proxy, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("early"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
    // In uid mode any 1337 process is the proxy, as with istio-init.
    let r = probe().connect(b, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("uid mode"));
    assert!(r.ok && r.peer_addr() == Some(sa(SVC2, 80)), "{r:?}");
    assert_eq!(up.wait_connections(1, Duration::from_secs(5))[0].received, b"uid mode");

    // The cgroup appears (absolute path): the proxy is recognised, nothing else changes.
    write_pod(&mesh, a, &[("sidecap.io/proxy-cgroup", &path_of(&a_proxy))]);
    wait_identity(&agent, &pins, a, &format!("cgroup {}", a_proxy.id().expect("id")));
    let r = probe().connect_in(a, &a_proxy, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("known"));
    assert!(r.ok && r.peer_addr() == Some(sa(SVC2, 80)), "{r:?}");
    let r = probe().connect(a, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("pod cgroup"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "the pod's own cgroup is not the proxy's: {r:?}");

    // A path that does not exist is unknown again (logged), never an error for the pod.
    write_pod(&mesh, a, &[("sidecap.io/proxy-cgroup", "scid-no-such-cgroup")]);
    wait_identity(&agent, &pins, a, "cgroup unknown");
    let r = probe().connect_in(a, &a_proxy, Creds::PROXY, "10.251.100.20:80", &ConnectOpts::send("gone"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
    assert!(agent.log().contains("proxy cgroup"), "logged: {}", agent.log());
    assert_eq!(up.connections().len(), 2, "only the known proxy's and uid-mode connections arrived");

    // `sidecap explain` shows the decision for the proxy's ids outside its cgroup.
    let (code, out, err) =
        sidecap(&["explain", "--bpffs", &pins.path().to_string_lossy(), "--pod", "default/a", "--to", "10.251.100.20:80"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["proxyIdentity"], "cgroup unknown", "{v:#}");
    let d = &v["decisions"][0];
    assert_eq!(d["proxy_ids_outside_its_cgroup"]["action"], "drop", "{v:#}");
    assert_eq!(d["proxy"]["verdict"], "drop", "unknown cgroup: even the proxy is an app: {v:#}");
}
