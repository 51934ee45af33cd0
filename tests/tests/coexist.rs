//! Living with other programs and with pods that vanish (issue 11, points 1 and 2).
//!
//! A socket load balancer of our own (tests/src/socklb.rs: connect4 rewriting one Service
//! VIP to one backend, as Cilium's kube-proxy replacement does) shares the cgroup with
//! sidecap: sidecap must run first, so the proxy gets the VIP as SO_ORIGINAL_DST; when
//! something gets ahead of it anyway, the agent says so (log, metric, /readyz). And a pod
//! whose netns died while no agent ran never stops the next agent.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use sidecap_tests::{
    fixture::{SVC, WAIT},
    socklb::{self, BPF_F_BEFORE, BPF_F_PREORDER, SockLb},
    *,
};

/// The Service VIP: no interface has it, only the load balancer makes it reachable.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 251, 96, 10), 8080);
/// The load balancer's one backend, on the services netns.
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 20);

fn backend() -> SocketAddr {
    SocketAddr::new(BACKEND.into(), VIP.port())
}

/// A sandbox with pod `a` (its cgroup under `pods_under` when given), the backend address,
/// and a mesh config holding pod `a` and the VIP's Service.
fn sandbox(pods_under: Option<&str>) -> (Topology, MeshDir) {
    let mut b = Topology::builder().pod("a").service_addr(BACKEND);
    if let Some(n) = pods_under {
        b = b.pods_under(n);
    }
    let topo = b.build().expect("topology");
    let mesh = MeshDir::new();
    mesh.pod(topo.pod("a"), "default", &[("app", "a")], &[]);
    mesh.service("default", "lb", IpAddr::V4(*VIP.ip()), &[("tcp-lb", VIP.port())]);
    (topo, mesh)
}

fn start_agent(cgroup: &Path, pins: &BpfPinDir, mesh: &MeshDir, pod: &Pod, extra: &[&str]) -> Agent {
    let mut args = vec!["--order-check-secs", "1"];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(cgroup, pins.path(), mesh.path(), &args);
    agent.wait_pods(&[pod.cookie().expect("cookie")], 1, WAIT);
    agent.wait_ready(WAIT);
    agent
}

/// The pod's connect to the VIP: the app's socket talks to the proxy, and the proxy learned
/// the VIP (not the backend) as the original destination; its own connect then goes through
/// the load balancer to the backend.
fn assert_proxy_sees_vip(pod: &Pod, agent: &Agent) {
    let hp = Haproxy::start(pod, HaproxyConfig::default()).expect("haproxy");
    let r = Probe::at(probe_bin!()).connect(pod, Creds::APP, &VIP.to_string(), &ConnectOpts::send("hi"));
    assert!(r.ok, "connect to the VIP failed: {r:?}\nagent log:\n{}", agent.log());
    assert_eq!(r.peer_addr(), Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 15001))), "not captured: {r:?}");
    assert_eq!(r.reply, format!("upstream {}\nhi", backend()), "{r:?}");
    let log = hp.wait_log_lines(1, Duration::from_secs(5));
    assert_eq!(log[0].frontend, Some(SocketAddr::V4(VIP)), "SO_ORIGINAL_DST the proxy got: {log:?}");
}

/// The value of `sidecap_programs_ahead{hook="connect4"}`.
fn programs_ahead(agent: &Agent) -> Option<i64> {
    let (_, metrics) = agent.admin_get("/metrics");
    metrics
        .lines()
        .find(|l| l.starts_with("sidecap_programs_ahead{hook=\"connect4\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

/// Waits (bounded) until `/readyz` answers `code`; returns its body.
fn wait_readyz(agent: &mut Agent, code: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        agent.assert_running();
        let (c, body) = agent.admin_get("/readyz");
        if c == code {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {c} ({body}), want {code}; log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_socket_lb_attached_first_still_leaves_the_vip_to_sidecap() {
    require_root!();
    let (topo, mesh) = sandbox(None);
    let a = topo.pod("a");
    let _up = Upstream::start(topo.services(), backend()).expect("backend");
    // The load balancer was there before sidecap, appended as every tool did before 6.17.
    let mut lb = SockLb::load(VIP, BACKEND).expect("load the socket LB");
    lb.attach(topo.cgroup().path(), 0).expect("attach the socket LB");

    let pins = BpfPinDir::new("cx-first").expect("pins");
    let agent = start_agent(topo.cgroup().path(), &pins, &mesh, a, &[]);
    assert!(agent.log().contains("mprog=true"), "this kernel (6.18) places links: {}", agent.log());
    assert_proxy_sees_vip(a, &agent);
    assert_eq!(programs_ahead(&agent), Some(0), "{}", agent.log());
    assert!(!agent.log().contains(socklb::NAME), "an LB behind sidecap is not reported: {}", agent.log());
}

#[test]
fn a_socket_lb_in_the_pods_own_cgroup_runs_after_sidecap_with_preorder() {
    require_root!();
    let (topo, mesh) = sandbox(None);
    let a = topo.pod("a");
    let _up = Upstream::start(topo.services(), backend()).expect("backend");
    // A plain program in the pod's cgroup, below sidecap's: without BPF_F_PREORDER on
    // sidecap's link it would run first (a child cgroup's programs run before its parent's).
    let mut lb = SockLb::load(VIP, BACKEND).expect("load the socket LB");
    lb.attach(a.cgroup().path(), 0).expect("attach the socket LB to the pod's cgroup");

    let pins = BpfPinDir::new("cx-preorder").expect("pins");
    let agent = start_agent(topo.cgroup().path(), &pins, &mesh, a, &[]);
    assert!(agent.log().contains("preorder=true"), "{}", agent.log());
    assert_proxy_sees_vip(a, &agent);
    assert_eq!(programs_ahead(&agent), Some(0), "{}", agent.log());
}

#[test]
fn a_program_put_ahead_later_is_reported_and_the_next_agent_goes_first_again() {
    require_root!();
    let (topo, mesh) = sandbox(None);
    let a = topo.pod("a");
    let _up = Upstream::start(topo.services(), backend()).expect("backend");
    let pins = BpfPinDir::new("cx-ahead").expect("pins");
    let mut agent = start_agent(topo.cgroup().path(), &pins, &mesh, a, &[]);
    assert_eq!(programs_ahead(&agent), Some(0), "{}", agent.log());

    // After sidecap, placed first: BPF_F_BEFORE, and BPF_F_PREORDER as sidecap's is.
    let mut lb = SockLb::load(VIP, BACKEND).expect("load the socket LB");
    lb.attach(topo.cgroup().path(), BPF_F_BEFORE | BPF_F_PREORDER).expect("attach the socket LB first");
    let id = lb.id().expect("LB program id");

    let body = wait_readyz(&mut agent, 503);
    assert!(body.contains("program order"), "{body}");
    assert!(body.contains(&format!("program {} (id {id})", socklb::NAME)), "readyz names the program: {body}");
    assert!(body.contains("connect4"), "{body}");
    assert_eq!(programs_ahead(&agent), Some(1), "{}", agent.log());
    let log = agent.log();
    let warning = log.lines().find(|l| l.contains("runs before sidecap")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains(socklb::NAME) && warning.contains(&format!("id={id}")), "{warning}");
    // What is reported is real: sidecap now decides on the backend address, which no
    // listener matches, so the connect bypasses the proxy.
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, &VIP.to_string(), &ConnectOpts::send("hi"));
    assert!(r.ok, "{r:?}");
    assert_eq!(r.peer_addr(), Some(backend()), "the LB ran first: {r:?}");

    // A new agent (upgrade, restart) puts sidecap first again, guarded by the list revision.
    assert_eq!(agent.stop(), Some(0));
    agent.restart();
    agent.wait_ready(WAIT);
    assert!(agent.log().contains("reordered=[\"connect4\"]"), "{}", agent.log());
    assert_eq!(programs_ahead(&agent), Some(0), "{}", agent.log());
    assert_proxy_sees_vip(a, &agent);
}

#[test]
fn without_mprog_sidecap_attached_below_the_lb_cgroup_sees_the_vip() {
    require_root!();
    // The node layout: pods under `kubepods`, the socket LB at the cgroup above it (the root
    // on a real node; here the sandbox's own cgroup).
    let (topo, mesh) = sandbox(Some("kubepods"));
    let a = topo.pod("a");
    assert!(a.cgroup().path().starts_with(topo.pods_cgroup().path()));
    let _up = Upstream::start(topo.services(), backend()).expect("backend");
    let mut lb = SockLb::load(VIP, BACKEND).expect("load the socket LB");
    lb.attach(topo.cgroup().path(), 0).expect("attach the socket LB");

    let pins = BpfPinDir::new("cx-nomprog").expect("pins");
    let agent = start_agent(topo.pods_cgroup().path(), &pins, &mesh, a, &["--no-mprog"]);
    assert!(agent.log().contains("mprog=false"), "{}", agent.log());
    assert_proxy_sees_vip(a, &agent);
    // A child cgroup's programs run before its parent's: nothing is ahead.
    assert_eq!(programs_ahead(&agent), Some(0), "{}", agent.log());
    assert_eq!(agent.admin_get("/readyz").0, 200);
}

/// The netns inode bpftool reports for a pinned netns link (0 once the netns is gone).
fn link_netns_ino(pin: &Path) -> Option<u64> {
    let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(pin).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["netns_ino"].as_u64()
}

#[test]
fn a_pod_whose_netns_died_while_the_agent_was_down_does_not_stop_the_next_one() {
    require_root!();
    let mut m = Mesh::start(MeshSpec::default());
    let cookie = m.pod("a").cookie().expect("cookie");
    let pin = m.pins.path().join(format!("links/netns/{cookie}"));
    assert!(pin.exists(), "pod a's sk_lookup link is pinned");
    assert_eq!(m.agent.stop(), Some(0));

    // The pod goes while no agent runs: its object and its netns.
    m.mesh.remove("pod-a.yaml");
    m.topo.remove_pod("a");
    let deadline = Instant::now() + WAIT;
    while link_netns_ino(&pin) != Some(0) {
        assert!(Instant::now() < deadline, "pod a's link was never severed: {:?}", link_netns_ino(&pin));
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = m.topo.add_pod("b").expect("pod b");
    m.mesh.pod(b, "default", &[("app", "b")], &[]);
    let b_cookie = b.cookie().expect("cookie");

    m.agent.restart();
    m.agent.wait_ready(WAIT);
    m.agent.wait_pods(&[b_cookie], 1, WAIT);
    let log = m.agent.log();
    assert!(log.contains("netns is gone"), "{log}");
    assert!(log.contains("default/a"), "the log names the pod: {log}");
    assert!(!pin.exists(), "the severed link's pin is removed");
    let v = inspect(m.pins.path());
    assert!(v.as_array().into_iter().flatten().all(|p| p["netns_cookie"].as_u64() != Some(cookie)), "{v:#}");

    // The new pod is captured.
    let b = m.pod("b");
    let _up = Upstream::start(m.topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(b, HaproxyConfig::default()).expect("haproxy");
    let r = Probe::at(probe_bin!()).connect(b, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("b"));
    assert!(r.ok, "{r:?}\n{}", m.agent.log());
    assert_eq!(r.peer_addr(), Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 15001))), "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some(SocketAddr::from((SVC, 80))));
}

/// Programs attached directly to `cgroup`, from bpftool (names).
fn attached_here(cgroup: &Path) -> Vec<String> {
    let out = Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup).output().expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(str::to_string)).collect()
}

#[test]
fn an_agent_given_another_cgroup_moves_its_pinned_links_there() {
    require_root!();
    let (topo, mesh) = sandbox(Some("kubepods"));
    let a = topo.pod("a");
    let _up = Upstream::start(topo.services(), backend()).expect("backend");
    let pins = BpfPinDir::new("cx-move").expect("pins");
    let mut first = start_agent(topo.cgroup().path(), &pins, &mesh, a, &[]);
    assert!(attached_here(topo.cgroup().path()).iter().any(|n| n == "sidecap_connect4"));
    assert_eq!(first.stop(), Some(0));
    drop(first);

    // The next agent attaches below (as the no-mprog default does): the pinned links follow.
    let agent = start_agent(topo.pods_cgroup().path(), &pins, &mesh, a, &["--no-mprog"]);
    assert!(agent.log().contains("reordered=[\"connect4\", \"connect6\", \"sockops\""), "{}", agent.log());
    let left: Vec<String> = attached_here(topo.cgroup().path()).into_iter().filter(|n| n.starts_with("sidecap")).collect();
    assert!(left.is_empty(), "nothing of sidecap's stays at the old cgroup: {left:?}");
    assert!(attached_here(topo.pods_cgroup().path()).iter().any(|n| n == "sidecap_connect4"));
    let mut lb = SockLb::load(VIP, BACKEND).expect("load the socket LB");
    lb.attach(topo.cgroup().path(), 0).expect("attach the socket LB");
    assert_proxy_sees_vip(a, &agent);
}

/// Issue 14: sockops, getsockopt and recvmsg serve pods' sockets only, so they may sit on the
/// cgroup that holds the pods (`--pods-cgroup`) while connect and sendmsg stay on the
/// node's: a host process then runs connect alone. A meshed pod's process outside the pods
/// cgroup would be captured with no sockops to hand its original destination to the proxy
/// (and no recvmsg to restore a DNS reply): its captured connect and DNS query fail with
/// EPERM and are logged, never sent direct. A socket load balancer at the node's cgroup
/// still comes after sidecap.
#[test]
fn observers_on_the_pods_cgroup_serve_the_pods_and_refuse_a_captured_caller_outside_it() {
    require_root!();
    let topo = Topology::builder().pod("a").service_addr(BACKEND).pods_under("kubepods").build().expect("topology");
    let a = topo.pod("a");
    let mesh = MeshDir::new();
    let proxy = ProxyContainer { env: vec![("ISTIO_META_DNS_CAPTURE".into(), "true".into())], ..Default::default() };
    mesh.pod_with_proxy(a, "default", &[("app", "a")], &[], &proxy);
    mesh.service("default", "lb", IpAddr::V4(*VIP.ip()), &[("tcp-lb", VIP.port())]);
    let _up = Upstream::start(topo.services(), backend()).expect("backend");
    let mut lb = SockLb::load(VIP, BACKEND).expect("load the socket LB");
    lb.attach(topo.cgroup().path(), 0).expect("attach the socket LB");

    let pins = BpfPinDir::new("cx-observers").expect("pins");
    let pods = topo.pods_cgroup().path().display().to_string();
    let agent = start_agent(topo.cgroup().path(), &pins, &mesh, a, &["--pods-cgroup", &pods]);
    let node: Vec<String> = attached_here(topo.cgroup().path()).into_iter().filter(|n| n.starts_with("sidecap")).collect();
    let below: Vec<String> = attached_here(topo.pods_cgroup().path()).into_iter().filter(|n| n.starts_with("sidecap")).collect();
    for hook in ["sidecap_connect4", "sidecap_connect6", "sidecap_sendmsg4", "sidecap_sendmsg6"] {
        assert!(node.iter().any(|n| n == hook) && !below.iter().any(|n| n == hook), "{hook}: node {node:?}, pods {below:?}");
    }
    for hook in ["sidecap_sockops", "sidecap_getsockopt", "sidecap_recvmsg4", "sidecap_recvmsg6"] {
        assert!(below.iter().any(|n| n == hook) && !node.iter().any(|n| n == hook), "{hook}: node {node:?}, pods {below:?}");
    }

    // The pod's own processes: captured, and the proxy learns the VIP.
    assert_proxy_sees_vip(a, &agent);

    // A process in the pod's netns but outside the pods cgroup.
    let host = topo.cgroup().child("host").expect("host cgroup");
    let r = Probe::at(probe_bin!()).connect_in(a, &host, Creds::APP, &VIP.to_string(), &ConnectOpts::send("hi"));
    assert_eq!((r.stage.as_str(), r.errno), ("connect", Some(libc::EPERM)), "captured outside the pods cgroup: {r:?}");
    let q = ConnectOpts { sendto: true, send: Some("query".into()), timeout_ms: Some(500), ..Default::default() };
    let d = Probe::at(probe_bin!()).connect_in(a, &host, Creds::APP, "10.251.100.20:53", &q);
    assert_eq!(d.errno, Some(libc::EPERM), "DNS query outside the pods cgroup: {d:?}");
    wait_until("both refusals in the agent log", Duration::from_secs(5), || {
        let log = agent.log();
        log.contains(&format!("connect denied pod=default/a destination={VIP} proto=\"tcp\""))
            && log.contains("destination=10.251.100.20:53 proto=\"udp\"")
            && log.matches("the caller is outside --pods-cgroup").count() >= 2
    });
    let v = inspect(pins.path());
    assert_eq!(v[0]["counters"]["dropped"], 2, "{v:#}");
    drop(host);
}
