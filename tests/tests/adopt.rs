//! Pods already running when the agent first writes them (sidecap installed on a node with
//! meshed pods): the proxy's inbound listener, opened before any sidecap program existed, is
//! adopted at once (issue 11, point 4), not only after the proxy listens again.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use sidecap_tests::{
    fixture::{SVC, WAIT},
    *,
};

#[test]
fn a_proxy_listening_before_the_agent_started_captures_inbound_at_once() {
    require_root!();
    let topo = Topology::builder().pod("a").pod("client").service_addr(SVC).build().expect("topology");
    let (a, client) = (topo.pod("a"), topo.pod("client"));
    // The pod runs, its proxy and app listening, before sidecap exists on the node.
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let probe = Probe::at(probe_bin!());
    let app = probe.listen(a, Creds::APP, "0.0.0.0:9080", &[]);
    let a_app = SocketAddr::new(IpAddr::from(a.ipv4()), 9080);
    // Before: nothing captures, the client reaches the app directly.
    let r = probe.connect(client, Creds::APP, &a_app.to_string(), &ConnectOpts::send("before"));
    assert!(r.ok, "{r:?}");
    assert_eq!(app.wait_connections(1, Duration::from_secs(5))[0].peer.split(':').next(), Some(client.ipv4().to_string().as_str()));

    let mesh = MeshDir::new();
    mesh.pod(a, "default", &[("app", "a")], &[]);
    let pins = BpfPinDir::new("cn-adopt").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    agent.wait_pods(&[a.cookie().expect("cookie")], 1, WAIT);
    // Written right after the pod's PODS entry.
    wait_until("the running listener adopted", WAIT, || {
        agent.log().contains("adopted the proxy's running inbound listener pod=default/a port=15006 listeners=1")
    });

    // The proxy never listened again, yet the very first inbound connection is its.
    let r = probe.connect(client, Creds::APP, &a_app.to_string(), &ConnectOpts::send("after"));
    assert!(r.ok, "{r:?}\nagent log:\n{}", agent.log());
    let lines = hp.wait_log_lines(1, Duration::from_secs(5));
    let inbound = lines.iter().find(|e| e.frontend_name == "inbound").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(inbound.frontend, Some(a_app), "the proxy got the original destination: {inbound:?}");
    assert_eq!(inbound.client.map(|c| c.ip()), Some(IpAddr::from(client.ipv4())), "and the real client: {inbound:?}");
    let conns = app.wait_connections(2, Duration::from_secs(5));
    assert_eq!(conns[1].peer.split(':').next(), Some("127.0.0.6"), "the app now sees Envoy's inbound passthrough source: {conns:?}");
    assert_eq!(conns[1].received, "after");
    let v = inspect(pins.path());
    assert_eq!(v[0]["counters"]["inbound_captured"], 1, "{v:#}");
}
