//! The agent's first sync and memory through `--kubernetes` at scale: 10,000 Services (two
//! ports each) and 20,000 EndpointSlices in 100 namespaces, one namespace-wide Sidecar per
//! namespace, and 110 meshed pods on this node, each in a real network namespace, served by
//! the project's list/watch server. The real `sidecap agent` runs as a child process (its own
//! RSS, not the server's), attached to a child cgroup and a private bpffs directory.
//!
//! Needs root; takes about a minute; not run by default:
//!   cargo test --release -p sidecap --test kube_scale -- --ignored --nocapture
//! `SIDECAP_AGENT_BIN=PATH` measures another build of the agent (an older one, to compare).

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use serde_json::json;

const NODE: &str = "node-a";
const NAMESPACES: usize = 100;
const SERVICES: usize = 10_000;
const PODS: usize = 110;

/// Everything the run made, removed on drop (also when the test fails).
struct Sandbox {
    cgroup: std::path::PathBuf,
    bpffs: std::path::PathBuf,
    netns: Vec<String>,
    agent: Option<Child>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_sidecap"))
            .args(["uninstall", "--bpffs"])
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn populate(server: &FakeApiServer) {
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}));
    server.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
                        "data": {"mesh": "outboundTrafficPolicy:\n  mode: ALLOW_ANY\n"}}));
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        server.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"istio-injection": "enabled"}}}));
        server.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default", "namespace": ns},
                            "spec": {"egress": [{"hosts": ["./*", "istio-system/*"]}]}}));
    }
    for i in 0..SERVICES {
        let ns = format!("ns-{}", i % NAMESPACES);
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        // As `kubectl apply` leaves it: the object's own JSON in an annotation.
        let applied = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"annotations\":{{}},\"labels\":{{\"app\":\"{name}\"}},\"name\":\"{name}\",\"namespace\":\"{ns}\"}},\"spec\":{{\"ports\":[{{\"name\":\"http\",\"port\":80,\"protocol\":\"TCP\",\"targetPort\":8080}},{{\"name\":\"tcp\",\"port\":9000,\"protocol\":\"TCP\",\"targetPort\":9000}}],\"selector\":{{\"app\":\"{name}\"}}}}}}\n"
        );
        server.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns,
                                "labels": {"app": name}, "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied}},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                               {"name": "tcp", "port": 9000 + (i % 1000) as u16, "protocol": "TCP", "targetPort": 9000}]}}));
        for s in 0..2 {
            server.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-{s}"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [format!("10.{}.{}.{}", 100 + s, i / 250, i % 250 + 1)],
                               "conditions": {"ready": true}, "nodeName": "node-b"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "tcp", "port": 9000, "protocol": "TCP"}]}));
        }
    }
}

#[test]
#[ignore = "scale measurement: needs root, about a minute"]
fn first_sync_and_rss_at_10k_services() {
    let tag = format!("kb-scale-{}", std::process::id());
    let mut sb = Sandbox {
        cgroup: std::path::PathBuf::from("/sys/fs/cgroup/unified").join(&tag),
        bpffs: std::path::PathBuf::from("/sys/fs/bpf").join(&tag),
        netns: Vec::new(),
        agent: None,
    };
    std::fs::create_dir_all(&sb.cgroup).expect("child cgroup");
    let server = FakeApiServer::start();
    populate(&server);
    for p in 0..PODS {
        let netns = format!("{tag}-{p}");
        assert!(Command::new("ip").args(["netns", "add", &netns]).status().expect("ip").success(), "ip netns add {netns}");
        sb.netns.push(netns.clone());
        let ns = format!("ns-{}", p % NAMESPACES);
        let ip = format!("10.251.{}.{}", p / 250, p % 250 + 1);
        server.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{p}"), "namespace": ns, "labels": {"app": format!("pod-{p}")},
                         "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
                                         "sidecap.io/netns": format!("/run/netns/{netns}")}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"},
                     {"name": "istio-proxy", "image": "proxyv2", "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}));
    }
    let kubeconfig = std::env::temp_dir().join(format!("{tag}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\nusers:\n- name: agent\n  user:\n    token: not-checked\n",
            server.url()
        ),
    )
    .expect("kubeconfig");
    let admin = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").to_string()
    };

    let start = Instant::now();
    let bin = std::env::var("SIDECAP_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sidecap").to_string());
    println!("kube_scale: agent {bin}");
    let agent = Command::new(&bin)
        .args(["agent", "--kubernetes", "--node-name", NODE, "--cni-socket", "off", "--admin-addr", &admin])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cgroup")
        .arg(&sb.cgroup)
        .arg("--bpffs")
        .arg(&sb.bpffs)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn agent");
    let pid = agent.id();
    sb.agent = Some(agent);

    // First sync: every pod's policy in the maps and /readyz answering 200.
    let deadline = Instant::now() + Duration::from_secs(120);
    let managed =
        |body: &str| body.lines().find_map(|l| l.strip_prefix("sidecap_pods_managed ")?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    let synced = loop {
        let m = http_get(&admin, "/metrics").map(|(_, b)| managed(&b)).unwrap_or(0.0);
        let ready = http_get(&admin, "/readyz").is_some_and(|(c, _)| c == 200);
        if m as usize == PODS && ready {
            break start.elapsed();
        }
        assert!(Instant::now() < deadline, "not synced within 120 s: {m} pods managed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    // And after a moment of steady state.
    std::thread::sleep(Duration::from_secs(3));
    let rss_later = status_kib(pid, "VmRSS:");
    println!(
        "kube_scale: {SERVICES} services, {} endpoint slices, {PODS} pods: first sync {:.2} s; agent VmRSS {:.1} MiB, VmHWM {:.1} MiB; VmRSS 3 s later {:.1} MiB",
        SERVICES * 2,
        synced.as_secs_f64(),
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_later as f64 / 1024.0
    );
    let _ = std::fs::remove_file(&kubeconfig);
    // The agent goes before the server does (no reconnection noise).
    drop(sb);
    drop(server);
    assert!(rss > 0 && hwm >= rss);
}
