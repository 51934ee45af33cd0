//! `cargo xtask demo`: the seed article's scenario, live, in a throwaway sandbox.
//!
//! Two "pods" (network namespaces with their own cgroup) and a services namespace, the
//! real `sidecap agent` attached to the sandbox's cgroup (never the machine's root), and
//! HAProxy as each pod's sidecar (uid 1337, `option transparent`).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use sidecap_tests::{Agent, BpfPinDir, ConnectOpts, Creds, Haproxy, HaproxyConfig, MeshDir, Probe, Topology, Upstream, sidecap};

const DEMOAPP: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 20);

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn sidecar(mode: &str) -> String {
    // The seed article's Sidecar for `run: client`: only port 8080 (HTTP) is declared.
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata:\n  name: client\n  namespace: default\nspec:\n  workloadSelector:\n    labels:\n      run: client\n  outboundTrafficPolicy:\n    mode: {mode}\n  egress:\n  - port:\n      number: 8080\n      protocol: HTTP\n      name: demoapp\n    hosts:\n    - \"./*\"\n"
    )
}

pub fn run() -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the demo creates network namespaces and attaches eBPF programs: run it as root");
    }
    let root = crate::workspace_root();
    // SAFETY: set before any thread is spawned.
    unsafe { std::env::set_var("SIDECAP_BIN", root.join("target/debug/sidecap")) };
    let probe = Probe::at(root.join("target/debug/sc-probe"));

    step(1, "sandbox: pods `client` and `server` (netns + cgroup), services in their own netns");
    let topo = Topology::builder()
        .pod("client")
        .pod("server")
        .service_addr(DEMOAPP)
        .service_addr(OTHER)
        .build()
        .context("building the sandbox (needs root, iproute2)")?;
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let mesh = MeshDir::new();
    mesh.pod(client, "default", &[("run", "client")], &[]);
    mesh.pod(server, "default", &[("app", "server")], &[]);
    mesh.service("default", "demoapp", DEMOAPP.into(), &[("http", 8080)]);
    mesh.service("default", "other", OTHER.into(), &[("tcp", 80)]);
    mesh.service("default", "server", server.ipv4().into(), &[("tcp", 9080)]);
    mesh.write("sidecar-client.yaml", &sidecar("ALLOW_ANY"));
    println!("   client {} · server {} · demoapp {DEMOAPP}:8080 · other {OTHER}:80", client.ipv4(), server.ipv4());
    let _demoapp = Upstream::start(topo.services(), (DEMOAPP, 8080).into())?;
    let _other = Upstream::start(topo.services(), (OTHER, 80).into())?;

    step(2, "sidecap agent: programs attached once to the sandbox cgroup, maps pinned");
    let pins = BpfPinDir::new("demo")?;
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    let cookies = [client.cookie()?, server.cookie()?];
    agent.wait_pods(&cookies, 1, Duration::from_secs(20));
    println!("   agent pid {} · pins under {}", agent.pid(), pins.path().display());
    let hp_client = Haproxy::start(client, HaproxyConfig::default())?;
    let hp_server = Haproxy::start(server, HaproxyConfig::default())?;
    let app = probe.listen(server, Creds::APP, "0.0.0.0:9080", &[]);

    step(3, "client → demoapp:8080 (declared in the Sidecar): captured to the sidecar");
    let r = probe.connect(client, Creds::APP, "10.251.100.10:8080", &ConnectOpts::send("GET /"));
    println!(
        "   client socket: {} → {}  ok={} reply {:?}",
        r.local.as_deref().unwrap_or("-"),
        r.peer.as_deref().unwrap_or("-"),
        r.ok,
        r.banner()
    );
    for e in hp_client.wait_log_lines(1, Duration::from_secs(5)) {
        println!(
            "   HAProxy (client's sidecar): client {} asked for {} (SO_ORIGINAL_DST) → forwarded to {}",
            opt(e.client),
            opt(e.frontend),
            opt(e.server)
        );
    }

    step(4, "client → other:80 (not declared; ALLOW_ANY): passthrough, the proxy never sees it (透传)");
    let r = probe.connect(client, Creds::APP, "10.251.100.20:80", &ConnectOpts::send("hi"));
    println!(
        "   client socket: {} → {}  ok={} reply {:?}",
        r.local.as_deref().unwrap_or("-"),
        r.peer.as_deref().unwrap_or("-"),
        r.ok,
        r.banner()
    );
    println!("   HAProxy log lines: {} (unchanged)", hp_client.log_lines().len());

    step(5, "client → server:9080: server's sk_lookup hands it to the server's sidecar (15006), which forwards to the app from 127.0.0.6");
    let r = probe.connect(client, Creds::APP, &format!("{}:9080", server.ipv4()), &ConnectOpts::send("inbound"));
    println!("   client ok={} reply {:?}", r.ok, r.banner());
    for e in hp_server.wait_log_lines(2, Duration::from_secs(5)).iter().filter(|e| e.frontend_name == "inbound") {
        println!("   HAProxy (server's sidecar, inbound): from {} for {} → {}", opt(e.client), opt(e.frontend), opt(e.server));
    }
    for c in app.wait_connections(1, Duration::from_secs(5)) {
        println!("   app saw a connection from {}", c.peer);
    }

    step(6, "edit the Sidecar live: ALLOW_ANY → REGISTRY_ONLY (no pod restart)");
    mesh.write("sidecar-client.yaml", &sidecar("REGISTRY_ONLY"));
    agent.wait_pods(&cookies[..1], 2, Duration::from_secs(20));
    let r = probe.connect(client, Creds::APP, "10.251.100.20:80", &ConnectOpts::send("hi"));
    println!(
        "   client → other:80: ok={} stage={} error={}  (connect fails at once, no handshake)",
        r.ok,
        r.stage,
        r.error.as_deref().unwrap_or("-")
    );
    let r = probe.connect(client, Creds::APP, "10.251.100.10:8080", &ConnectOpts::send("GET /"));
    println!("   client → demoapp:8080: ok={} (still captured: {})", r.ok, r.banner());
    std::thread::sleep(Duration::from_millis(300));
    for line in agent.log().lines().filter(|l| l.contains("connect denied")) {
        println!("   agent: {}", line.trim());
    }

    step(7, "what the kernel holds: `sidecap inspect` (reads the pinned maps)");
    let (_, out, err) = sidecap(&["inspect", "--bpffs", &pins.path().display().to_string()]);
    print!("{out}{err}");
    println!("\nEverything above ran on this machine's kernel; the sandbox and pins are removed now.");
    agent.kill9();
    Ok(())
}

fn opt(a: Option<std::net::SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
}
