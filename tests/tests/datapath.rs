//! The compiled policy enforced in the kernel (issue: datapath): drop, passthrough,
//! inbound capture through sk_lookup, DNS, two pods through two real proxies, live
//! policy changes from the directory source.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use sidecap_tests::{
    fixture::{SVC, SVC2, WAIT},
    *,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn probe() -> Probe {
    Probe::at(probe_bin!())
}

const EPERM: i32 = 1;

/// A Sidecar for the pods labelled `app: a`.
fn sidecar_for_a(mode: &str, egress: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: a\n  namespace: default\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec:\n  workloadSelector:\n    labels:\n      app: a\n  outboundTrafficPolicy:\n    mode: {mode}\n  egress:\n{egress}"
    )
}

const ALL_OF_DEFAULT: &str = "  - hosts:\n    - \"./*\"\n";
/// The seed article's egress: only port 8080 (HTTP) from the pod's namespace.
const SEED_EGRESS: &str = "  - port:\n      number: 8080\n      protocol: HTTP\n      name: demoapp\n    hosts:\n    - \"./*\"\n";
/// A Service `demoapp` on SVC2:8080, HTTP (so its listener is `0.0.0.0_8080`).
const DEMOAPP: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: demoapp\n  namespace: default\nspec:\n  clusterIP: 10.251.100.20\n  ports:\n  - name: http\n    port: 8080\n    protocol: TCP\n";

#[test]
fn registry_only_fails_unlisted_connects_at_once_and_reports_them() {
    require_root!();
    let sc = sidecar_for_a("REGISTRY_ONLY", ALL_OF_DEFAULT);
    let m = Mesh::start(MeshSpec { files: &[("sidecar.yaml", &sc)], ..Default::default() });
    let a = m.pod("a");
    let _up = Upstream::start(m.topo.services(), sa(SVC, 80)).expect("upstream");
    let _up81 = Upstream::start(m.topo.services(), sa(SVC, 81)).expect("upstream 81");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");

    // Listed: captured as usual.
    let r = probe().connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("ok"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some(sa(SVC, 80)));

    // Not listed (no listener on port 81, although something listens there): EPERM from
    // connect itself, no handshake, the proxy never involved.
    let r = probe().connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("no"));
    assert!(!r.ok, "{r:?}");
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
    assert!(r.connect_us.unwrap_or(u64::MAX) < 1_000_000, "a drop must not wait for a timeout: {r:?}");

    // Connected UDP is denied the same way.
    let u = probe().connect(a, Creds::APP, "10.251.100.10:5353", &ConnectOpts { udp: true, send: Some("q".into()), ..Default::default() });
    assert_eq!((u.stage.as_str(), u.errno), ("connect", Some(EPERM)), "{u:?}");

    // The proxy itself is never denied (it is exempt, as in istio-iptables).
    let p = probe().connect(a, Creds::PROXY, "10.251.100.10:81", &ConnectOpts::send("proxy"));
    assert!(p.ok, "the proxy's own connects are not policed: {p:?}");

    let v = m.inspect_pod(a);
    assert_eq!(v["counters"]["dropped"], 2, "{v:#}");
    assert_eq!(v["no_listener"], "drop", "{v:#}");
    // The agent logs each drop naming the pod and the destination.
    wait_until("drop events in the agent log", Duration::from_secs(5), || {
        let log = m.agent.log();
        log.contains("connect denied pod=default/a destination=10.251.100.10:81")
            && log.contains("destination=10.251.100.10:5353 proto=\"udp\"")
    });
    assert_eq!(hp.log_lines().len(), 1, "{:?}", hp.log_lines());
}

#[test]
fn allow_any_with_the_seed_sidecar_captures_8080_and_passes_the_rest_directly() {
    require_root!();
    let sc = sidecar_for_a("ALLOW_ANY", SEED_EGRESS);
    let m = Mesh::start(MeshSpec { files: &[("sidecar.yaml", &sc), ("demoapp.yaml", DEMOAPP)], ..Default::default() });
    let a = m.pod("a");
    let _demo = Upstream::start(m.topo.services(), sa(SVC2, 8080)).expect("upstream 8080");
    let web = Upstream::start(m.topo.services(), sa(SVC, 80)).expect("upstream 80");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");

    // The seed article's listener list after the Sidecar: just 0.0.0.0_8080.
    let v = m.inspect_pod(a);
    assert_eq!(v["listeners"], serde_json::json!(["0.0.0.0_8080::0.0.0.0:8080"]), "{v:#}");

    let r = probe().connect(a, Creds::APP, "10.251.100.20:8080", &ConnectOpts::send("GET /"));
    assert!(r.ok, "{r:?}");
    assert_eq!(r.peer_addr(), Some(sa(Ipv4Addr::LOCALHOST, 15001)), "captured: {r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some(sa(SVC2, 8080)));

    let r = probe().connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("direct"));
    assert!(r.ok, "{r:?}");
    assert_eq!(r.peer_addr(), Some(sa(SVC, 80)), "passthrough goes straight to the destination: {r:?}");
    assert_eq!(web.wait_connections(1, Duration::from_secs(5))[0].peer.ip(), IpAddr::from(a.ipv4()));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(hp.log_lines().len(), 1, "the proxy saw the passthrough: {:?}", hp.log_lines());
}

#[test]
fn pod_to_pod_through_both_proxies_with_original_destinations() {
    require_root!();
    // A Service VIP for pod b's port 9080; a's proxy routes that VIP to b's address, as
    // Envoy would route a service to one of its endpoints.
    let vip = sa(Ipv4Addr::new(10, 251, 100, 30), 9080);
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: b\n  namespace: default\nspec:\n  clusterIP: 10.251.100.30\n  ports:\n  - name: tcp\n    port: 9080\n";
    let m = Mesh::start(MeshSpec { pods: &["a", "b"], files: &[("svc-b.yaml", svc)], ..Default::default() });
    let (a, b) = (m.pod("a"), m.pod("b"));
    let b_app = sa(b.ipv4(), 9080);
    let hp_a = Haproxy::start(a, HaproxyConfig { routes: vec![(vip, b_app)], ..Default::default() }).expect("haproxy a");
    let hp_b = Haproxy::start(b, HaproxyConfig::default()).expect("haproxy b");
    let app = probe().listen(b, Creds::APP, "0.0.0.0:9080", &[]);

    let r = probe().connect(a, Creds::APP, "10.251.100.30:9080", &ConnectOpts::send("hello b"));
    assert!(r.ok, "{r:?}\nagent log:\n{}", m.agent.log());
    assert!(r.reply.starts_with(&format!("listen {b_app}")), "b's app answered: {r:?}");

    let la = hp_a.wait_log_lines(1, Duration::from_secs(5));
    assert_eq!((la[0].frontend, la[0].server), (Some(vip), Some(b_app)), "a's proxy: {la:?}");
    let lb = hp_b.wait_log_lines(1, Duration::from_secs(5));
    let inbound = lb.iter().find(|e| e.frontend_name == "inbound").unwrap_or_else(|| panic!("{lb:?}"));
    assert_eq!(inbound.frontend, Some(b_app), "b's proxy got the original destination: {inbound:?}");
    assert_eq!(inbound.client.map(|c| c.ip()), Some(IpAddr::from(a.ipv4())), "{inbound:?}");
    assert_eq!(inbound.server, Some(b_app), "{inbound:?}");
    let conns = app.wait_connections(1, Duration::from_secs(5));
    assert_eq!(conns[0].peer.split(':').next(), Some("127.0.0.6"), "b's app sees Envoy's inbound passthrough source: {conns:?}");
    assert_eq!(conns[0].received, "hello b");

    assert_eq!(m.inspect_pod(a)["counters"]["captured"], 1);
    assert_eq!(m.inspect_pod(b)["counters"]["inbound_captured"], 1);
}

#[test]
fn inbound_exemptions_reach_the_app_directly() {
    require_root!();
    let m = Mesh::start(MeshSpec {
        pods: &["a", "b", "c"],
        annotations: &[("traffic.sidecar.istio.io/excludeInboundPorts", "3333")],
        ..Default::default()
    });
    let (a, b, c) = (m.pod("a"), m.pod("b"), m.pod("c"));
    let hp_b = Haproxy::start(b, HaproxyConfig::default()).expect("haproxy b");
    let ports = [8080u16, 3333, 15008, 15020, 15021, 15090];
    let apps: Vec<_> = ports.iter().map(|p| probe().listen(b, Creds::APP, &format!("0.0.0.0:{p}"), &[])).collect();

    for (port, app) in ports.iter().zip(&apps) {
        let r = probe().connect(a, Creds::APP, &format!("{}:{port}", b.ipv4()), &ConnectOpts::send("in"));
        assert!(r.ok, "port {port}: {r:?}");
        let conn = app.wait_connections(1, Duration::from_secs(5)).remove(0);
        let peer_ip = conn.peer.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or_default();
        if *port == 8080 {
            assert_eq!(peer_ip, "127.0.0.6", "8080 is captured (via the proxy): {conn:?}");
        } else {
            assert_eq!(peer_ip, a.ipv4().to_string(), "port {port} is exempt, straight to the app: {conn:?}");
        }
    }
    let inbound: Vec<_> = hp_b.log_lines().into_iter().filter(|e| e.frontend_name == "inbound").collect();
    assert_eq!(inbound.len(), 1, "only 8080 went through the proxy: {inbound:?}");

    // The pod calling itself is decided at connect time, not captured inbound.
    let app8080 = &apps[0];
    let r = probe().connect(b, Creds::APP, &format!("{}:8080", b.ipv4()), &ConnectOpts::send("self"));
    assert!(r.ok, "{r:?}");
    let conns = app8080.wait_connections(2, Duration::from_secs(5));
    assert_eq!(conns[1].peer.rsplit_once(':').map(|(ip, _)| ip), Some(b.ipv4().to_string().as_str()), "{conns:?}");

    // A pod whose proxy is not listening: a captured port is refused, as istio-init's
    // REDIRECT to a closed 15006 is; the app never sees the connection uncaptured. An
    // exempt port still reaches the app. The agent says so, naming pod and destination.
    let app_c = probe().listen(c, Creds::APP, "0.0.0.0:8080", &[]);
    let app_c_exempt = probe().listen(c, Creds::APP, "0.0.0.0:15020", &[]);
    let r = probe().connect(a, Creds::APP, &format!("{}:8080", c.ipv4()), &ConnectOpts::send("early"));
    assert!(!r.ok, "reached a pod whose proxy is not up: {r:?}");
    assert!(r.error.as_deref().unwrap_or_default().contains("refused"), "{r:?}");
    let r = probe().connect(a, Creds::APP, &format!("{}:15020", c.ipv4()), &ConnectOpts::send("exempt"));
    assert!(r.ok, "{r:?}");
    assert_eq!(app_c_exempt.wait_connections(1, Duration::from_secs(5)).len(), 1);
    assert!(app_c.connections().is_empty(), "the app saw an uncaptured connection: {:?}", app_c.connections());
    assert_eq!(m.inspect_pod(c)["counters"]["inbound_captured"], 0);
    assert_eq!(m.inspect_pod(c)["counters"]["dropped"], 1, "{:#}", m.inspect_pod(c));
    let want = format!("inbound connection refused pod=default/c destination={}:8080", c.ipv4());
    wait_until("the refusal logged, naming pod and destination", Duration::from_secs(5), || m.agent.log().contains(&want));
}

#[test]
fn dns_capture_sends_port_53_to_the_dns_proxy_and_restores_the_resolver() {
    require_root!();
    let topo = Topology::builder().pod("a").service_addr(SVC).build().expect("topology");
    let a = topo.pod("a");
    let mesh = MeshDir::new();
    let proxy = ProxyContainer { env: vec![("ISTIO_META_DNS_CAPTURE".into(), "true".into())], ..Default::default() };
    mesh.pod_with_proxy(a, "default", &[("app", "a")], &[], &proxy);
    let pins = BpfPinDir::new("e2e").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    agent.wait_pods(&[a.cookie().expect("cookie")], 1, WAIT);
    assert!(inspect(pins.path())[0]["flags"].as_array().unwrap().contains(&"dns".into()));

    // istio-agent's DNS proxy: UDP and TCP on 127.0.0.1:15053, as the proxy user.
    let dns_udp = probe().listen(a, Creds::PROXY, "127.0.0.1:15053", &["--udp"]);
    let dns_tcp = probe().listen(a, Creds::PROXY, "127.0.0.1:15053", &[]);

    // Unconnected UDP (sendto/recvfrom): the reply appears to come from the resolver asked.
    let q = ConnectOpts { sendto: true, send: Some("query".into()), ..Default::default() };
    let r = probe().connect(a, Creds::APP, "10.251.100.10:53", &q);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.peer_addr(), Some(sa(SVC, 53)), "reply source restored: {r:?}");
    assert!(r.reply.starts_with("listen 127.0.0.1:15053"), "answered by the DNS proxy: {r:?}");
    // Connected UDP and TCP to port 53 are redirected at connect.
    let r = probe().connect(a, Creds::APP, "10.251.100.10:53", &ConnectOpts { udp: true, send: Some("q2".into()), ..Default::default() });
    assert!(r.ok && r.reply.starts_with("listen 127.0.0.1:15053"), "{r:?}");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:53", &ConnectOpts::send("tcp query"));
    assert!(r.ok, "{r:?}");
    assert_eq!(dns_tcp.wait_connections(1, Duration::from_secs(5))[0].received, "tcp query");
    wait_until("two datagrams at the DNS proxy", Duration::from_secs(5), || dns_udp.datagrams().len() == 2);
    assert!(
        dns_udp
            .datagrams()
            .iter()
            .all(|d| d["peer"].as_str().is_some_and(|p| p.starts_with(&a.ipv4().to_string()) || p.starts_with("127.0.0.1"))),
        "{:?}",
        dns_udp.datagrams()
    );
    // The DNS proxy's own queries reach the real resolver (not looped back to itself).
    let own = probe().connect(
        a,
        Creds::PROXY,
        "10.251.100.10:53",
        &ConnectOpts { sendto: true, send: Some("up".into()), timeout_ms: Some(300), ..Default::default() },
    );
    assert_ne!(own.peer_addr(), Some(sa(Ipv4Addr::LOCALHOST, 15053)), "{own:?}");
    assert_eq!(dns_udp.datagrams().len(), 2, "the proxy's query was captured");
    assert_eq!(inspect(pins.path())[0]["counters"]["dns"], 3);
    drop(agent);
}

#[test]
fn editing_a_sidecar_switches_policy_live_and_a_bad_file_keeps_the_last_good_one() {
    require_root!();
    let mut m = Mesh::start(MeshSpec { files: &[("sidecar.yaml", &sidecar_for_a("ALLOW_ANY", ALL_OF_DEFAULT))], ..Default::default() });
    let _up = Upstream::start(m.topo.services(), sa(SVC, 81)).expect("upstream 81");
    let a = m.topo.pod("a");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("before"));
    assert!(r.ok && r.peer_addr() == Some(sa(SVC, 81)), "ALLOW_ANY passes an unlisted port: {r:?}");

    m.mesh.write("sidecar.yaml", &sidecar_for_a("REGISTRY_ONLY", ALL_OF_DEFAULT));
    m.wait_generation("a", 2);
    let a = m.topo.pod("a");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("after"));
    assert_eq!(r.errno, Some(EPERM), "REGISTRY_ONLY now, with no pod restart: {r:?}");

    // A broken file: reported with its name, and the last good policy stays.
    m.mesh.write("broken.yaml", "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: x\n  namespace: default\nspec:\n  egress:\n  - port:\n      number: notaport\n");
    wait_until("the agent to reject broken.yaml", Duration::from_secs(10), || {
        m.agent.log().contains("configuration rejected") && m.agent.log().contains("broken.yaml")
    });
    let r = probe().connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("still"));
    assert_eq!(r.errno, Some(EPERM), "{r:?}");
    assert_eq!(m.inspect_pod(a)["generation"], 2);

    // Fixed again: applied again.
    m.mesh.remove("broken.yaml");
    m.mesh.write("sidecar.yaml", &sidecar_for_a("ALLOW_ANY", ALL_OF_DEFAULT));
    m.wait_generation("a", 3);
    let a = m.topo.pod("a");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("again"));
    assert!(r.ok, "{r:?}");
}

#[test]
fn a_pod_removed_from_the_config_loses_capture_and_its_netns_link() {
    require_root!();
    let m = Mesh::start(MeshSpec { pods: &["a", "b"], ..Default::default() });
    let (a, b) = (m.pod("a"), m.pod("b"));
    let cookie_a = a.cookie().expect("cookie");
    let link = m.pins.path().join(format!("links/netns/{cookie_a}"));
    assert!(link.exists(), "sk_lookup link pinned for the pod");
    let _up = Upstream::start(m.topo.services(), sa(SVC, 80)).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");

    m.mesh.remove("pod-a.yaml");
    wait_until("pod a to leave the maps", WAIT, || {
        inspect(m.pins.path())
            .as_array()
            .is_some_and(|v| v.iter().all(|p| p["netns_cookie"].as_u64() != Some(cookie_a)))
    });
    assert!(!link.exists(), "the pod's sk_lookup link is gone");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("x"));
    assert_eq!(r.peer_addr(), Some(sa(SVC, 80)), "no longer captured: {r:?}");
    assert!(hp.log_lines().is_empty());
    // The other pod is untouched.
    assert_eq!(m.inspect_pod(b)["generation"], 1);
}

#[test]
fn ipv6_inbound_goes_through_the_proxy_from_envoys_v6_passthrough_source() {
    require_root!();
    let m = Mesh::start(MeshSpec { pods: &["a", "b"], ..Default::default() });
    let (a, b) = (m.pod("a"), m.pod("b"));
    let hp_b = Haproxy::start(b, HaproxyConfig { inbound_v6: true, ..Default::default() }).expect("haproxy b");
    let app = probe().listen(b, Creds::APP, "[::]:9080", &[]);
    let target = format!("[{}]:9080", b.ipv6());
    let r = probe().connect(a, Creds::APP, &target, &ConnectOpts::send("six in"));
    assert!(r.ok, "{r:?}\n{}", m.agent.log());
    let log = hp_b.wait_log_lines(1, Duration::from_secs(5));
    let e = log.iter().find(|e| e.frontend_name == "inbound6").unwrap_or_else(|| panic!("{log:?}"));
    assert_eq!(e.frontend, Some(target.parse().unwrap()), "the accepted socket's own address is the original destination: {e:?}");
    let conns = app.wait_connections(1, Duration::from_secs(5));
    assert!(conns[0].peer.starts_with("[::6]:"), "b's app sees ::6 (added to lo by the agent): {conns:?}");
    assert_eq!(m.inspect_pod(b)["counters"]["inbound_captured"], 1);
}
