//! Istio fidelity on the real kernel: dual-stack Services seen from IPv4 and dual-stack pods
//! (pilot/pkg/model/service.go `GetAddressForProxy`, `GetExtraAddressesForProxy`), and a
//! Sidecar's `outboundTrafficPolicy: {}` meaning REGISTRY_ONLY (pilot/pkg/model/sidecar.go
//! `convertToSidecarScope`). The unit tests are policy/tests/fidelity.rs.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use sidecap_tests::{
    fixture::{SVC, SVC6},
    *,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn probe() -> Probe {
    Probe::at(probe_bin!())
}

const EPERM: i32 = 1;

/// A dual-stack Service on the fixture's two service addresses, IPv6 listed first (as
/// Kubernetes does for a v6-primary cluster): `spec.clusterIP` is the IPv6 one.
const REDIS: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: redis\n  namespace: default\nspec:\n  clusterIP: fd00:5ca9::100:10\n  clusterIPs:\n  - fd00:5ca9::100:10\n  - 10.251.100.10\n  ipFamilies: [IPv6, IPv4]\n  ports:\n  - name: tcp-redis\n    port: 6379\n    protocol: TCP\n";

const REGISTRY_ONLY: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n";

fn listeners(m: &Mesh, pod: &Pod) -> Vec<String> {
    let v = m.inspect_pod(pod);
    v["listeners"].as_array().into_iter().flatten().filter_map(|l| l.as_str().map(str::to_owned)).collect()
}

#[test]
fn ipv4_pod_reaches_the_ipv4_vip_of_a_v6_first_dual_stack_service_under_registry_only() {
    require_root!();
    let mut m = Mesh::start(MeshSpec { files: &[("mesh.yaml", REGISTRY_ONLY), ("redis.yaml", REDIS)], ..Default::default() });
    // Make pod a IPv4-only (the sandbox gives every pod both families; its Pod object
    // decides what istiod would see).
    let file = m.mesh.path().join("pod-a.yaml");
    let yaml = std::fs::read_to_string(&file).expect("pod-a.yaml");
    let v6 = format!("  - ip: {}\n", m.pod("a").ipv6());
    assert!(yaml.contains(&v6), "{yaml}");
    m.mesh.write("pod-a.yaml", &yaml.replace(&v6, ""));
    m.wait_generation("a", 2);
    let a = m.pod("a");
    assert!(listeners(&m, a).iter().any(|l| l.starts_with("10.251.100.10_6379::")), "{:?}", listeners(&m, a));

    let up = Upstream::start(m.topo.services(), sa(SVC, 6379)).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:6379", &ConnectOpts::send("ping"));
    assert!(r.ok, "{r:?}\nagent log:\n{}", m.agent.log());
    assert_eq!(r.peer_addr(), Some(sa(Ipv4Addr::LOCALHOST, 15001)), "through the proxy: {r:?}");
    assert_eq!(r.reply, "upstream 10.251.100.10:6379\nping", "{r:?}");
    let log = hp.wait_log_lines(1, Duration::from_secs(5));
    assert_eq!((log[0].frontend, log[0].server), (Some(sa(SVC, 6379)), Some(sa(SVC, 6379))), "{log:?}");
    assert_eq!(up.wait_connections(1, Duration::from_secs(5)).len(), 1);

    // REGISTRY_ONLY is in force: the same address on a port no listener has is denied.
    let r = probe().connect(a, Creds::APP, "10.251.100.10:6380", &ConnectOpts::send("no"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
}

#[test]
fn dual_stack_pod_reaches_both_vips_of_a_dual_stack_service_through_the_proxy() {
    require_root!();
    let m = Mesh::start(MeshSpec { files: &[("mesh.yaml", REGISTRY_ONLY), ("redis.yaml", REDIS)], ..Default::default() });
    let a = m.pod("a");
    // One listener named after the first clusterIP; the IPv4 VIP is its additional address.
    assert!(listeners(&m, a).iter().any(|l| l.starts_with("fd00:5ca9::100:10_6379::")), "{:?}", listeners(&m, a));

    // IPv4 VIP through HAProxy.
    let _up4 = Upstream::start(m.topo.services(), sa(SVC, 6379)).expect("upstream v4");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let r = probe().connect(a, Creds::APP, "10.251.100.10:6379", &ConnectOpts::send("four"));
    assert!(r.ok, "{r:?}\nagent log:\n{}", m.agent.log());
    assert_eq!(r.peer_addr(), Some(sa(Ipv4Addr::LOCALHOST, 15001)), "{r:?}");
    assert_eq!(r.reply, "upstream 10.251.100.10:6379\nfour", "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some(sa(SVC, 6379)));
    drop(hp);

    // IPv6 VIP: the proxy is sc-probe on [::1]:15001, asking IP6T_SO_ORIGINAL_DST as Envoy
    // does (HAProxy 2.6 does not on v6 sockets, tests/README.md).
    let listener = probe().listen(a, Creds::PROXY, "[::1]:15001", &[]);
    let r = probe().connect(a, Creds::APP, "[fd00:5ca9::100:10]:6379", &ConnectOpts::send("six"));
    assert!(r.ok, "{r:?}\nagent log:\n{}", m.agent.log());
    assert_eq!(r.peer_addr(), Some("[::1]:15001".parse().expect("addr")), "{r:?}");
    let conns = listener.wait_connections(1, Duration::from_secs(5));
    assert_eq!(conns[0].orig_dst.as_deref(), Some("[fd00:5ca9::100:10]:6379"), "{conns:?}");
    assert_eq!(conns[0].received, "six", "{conns:?}");

    // Neither family passes unlisted ports.
    for dst in ["10.251.100.10:6380", "[fd00:5ca9::100:10]:6380"] {
        let r = probe().connect(a, Creds::APP, dst, &ConnectOpts::send("no"));
        assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{dst}: {r:?}");
    }
}

#[test]
fn sidecar_with_empty_outbound_traffic_policy_denies_unlisted_destinations_under_an_allow_any_mesh() {
    require_root!();
    // The mesh is ALLOW_ANY (Istio's default, no ConfigMap); the Sidecar says `{}`.
    let sc = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: a\n  namespace: default\nspec:\n  workloadSelector:\n    labels:\n      app: a\n  outboundTrafficPolicy: {}\n  egress:\n  - hosts:\n    - \"./web.default.svc.cluster.local\"\n";
    let m = Mesh::start(MeshSpec { files: &[("sidecar.yaml", sc)], ..Default::default() });
    let a = m.pod("a");
    assert_eq!(m.inspect_pod(a)["no_listener"], "drop", "{:#}", m.inspect_pod(a));
    let _web = Upstream::start(m.topo.services(), sa(SVC, 80)).expect("upstream web");
    let _web6 = Upstream::start(m.topo.services(), sa(SVC6, 80)).expect("upstream web6");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");

    let r = probe().connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("listed"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some(sa(SVC, 80)));
    // web6 is not imported by the Sidecar: no listener, and `{}` is REGISTRY_ONLY.
    let r = probe().connect(a, Creds::APP, "[fd00:5ca9::100:10]:80", &ConnectOpts::send("unlisted"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(EPERM)), "{r:?}");
}
