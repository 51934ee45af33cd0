//! `sidecap trace` on the real kernel: the programs' records (aya-log) for a traced pod,
//! through the agent, to the CLI; none for an untraced pod; the switch going off when the
//! CLI stops, dies, or stops renewing its lease. Sandbox names start with `sctr`.

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sidecap_tests::{fixture::SVC, *};

fn probe() -> Probe {
    Probe::at(probe_bin!())
}

/// A running `sidecap trace --output json`, its stdout and stderr in files; killed on Drop.
struct TraceCli {
    child: Option<Child>,
    dir: TempDir,
}

impl TraceCli {
    fn start(admin: std::net::SocketAddr, pod: &str, extra: &[&str]) -> TraceCli {
        TraceCli::start_as(admin, pod, "json", extra)
    }

    fn start_as(admin: std::net::SocketAddr, pod: &str, output: &str, extra: &[&str]) -> TraceCli {
        let dir = TempDir::new("sctr-cli").expect("temp dir");
        let out = std::fs::File::create(dir.path().join("out")).expect("stdout file");
        let err = std::fs::File::create(dir.path().join("err")).expect("stderr file");
        let child = Command::new(sidecap_bin())
            .args(["trace", "--pod", pod, "--output", output, "--admin-addr", &admin.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start sidecap trace");
        let cli = TraceCli { child: Some(child), dir };
        wait_until("the trace to start", Duration::from_secs(15), || cli.stderr().contains("tracing ") || cli.exited());
        assert!(cli.stderr().contains(&format!("tracing {pod} ")), "trace did not start: {}", cli.stderr());
        cli
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("err")).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.path("out")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        self.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Kernel records (not the `{"dropped": N}` reports).
    fn records(&self) -> Vec<serde_json::Value> {
        self.lines().into_iter().filter(|r| r.get("hook").is_some()).collect()
    }

    /// Waits until a record matches; returns it.
    fn wait_record(&self, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = self.records().into_iter().find(&f) {
                return r;
            }
            assert!(Instant::now() < deadline, "no record for {what}; records: {:#?}\nstderr: {}", self.records(), self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exited(&self) -> bool {
        // SAFETY: kill with signal 0 only checks that our own child exists.
        self.child.as_ref().is_none_or(|c| unsafe { libc::kill(c.id() as i32, 0) } != 0)
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill takes no pointers; pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits (bounded) for the CLI to exit; its exit code.
    fn wait(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for TraceCli {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped CLI must be continued to die.
            // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn flags(m: &Mesh, pod: &Pod) -> Vec<String> {
    m.inspect_pod(pod)["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(|f| f.as_str().map(String::from))
        .collect()
}

fn traced(m: &Mesh, pod: &Pod) -> bool {
    flags(m, pod).iter().any(|f| f == "trace")
}

/// Lines of the agent's log that are kernel trace records of `pod`.
fn logged_records(agent: &Agent, pod: &str) -> usize {
    agent.log().lines().filter(|l| l.contains("trace record") && l.contains(&format!("pod={pod} "))).count()
}

const REGISTRY_ONLY_A: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: a\n  namespace: default\nspec:\n  workloadSelector:\n    labels:\n      app: a\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n  egress:\n  - hosts:\n    - \"./*\"\n";

#[test]
fn a_traced_pod_gives_one_record_per_decision_naming_its_step() {
    require_root!();
    set_name_prefix("sctr");
    let topo = Topology::builder().pod("a").pod("b").service_addr(SVC).build().expect("topology");
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let mesh = MeshDir::new();
    let dns = ProxyContainer { env: vec![("ISTIO_META_DNS_CAPTURE".into(), "true".into())], ..Default::default() };
    mesh.pod_with_proxy(a, "default", &[("app", "a")], &[("traffic.sidecar.istio.io/excludeOutboundPorts", "9999")], &dns);
    mesh.pod(b, "default", &[("app", "b")], &[]);
    mesh.service("default", "web", IpAddr::from(SVC), &[("tcp-web", 80)]);
    mesh.write("sidecar.yaml", REGISTRY_ONLY_A);
    let pins = BpfPinDir::new("sctr").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    agent.wait_pods(&[a.cookie().expect("cookie"), b.cookie().expect("cookie")], 1, fixture::WAIT);
    let _up = Upstream::start(topo.services(), (SVC, 80).into()).expect("upstream");
    let _hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let _app = probe().listen(a, Creds::APP, "0.0.0.0:8080", &[]);

    assert!(
        !inspect(pins.path())
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["flags"].as_array().unwrap().contains(&"trace".into()))
    );
    let cli = TraceCli::start(agent.admin_addr(), "default/a", &[]);
    let a_flags = |v: serde_json::Value| {
        v.as_array().unwrap().iter().find(|p| p["pod"] == "default/a").map(|p| p["flags"].clone()).unwrap_or_default()
    };
    assert!(a_flags(inspect(pins.path())).as_array().unwrap().contains(&"trace".into()), "the switch is on while the CLI runs");

    // Captured (step 6, a listener), excluded port (step 1), REGISTRY_ONLY drop (step 7),
    // DNS over TCP (step 3), DNS over unconnected UDP (sendmsg).
    assert!(probe().connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("in")).ok);
    let _ = probe().connect(a, Creds::APP, "10.251.100.10:9999", &ConnectOpts { timeout_ms: Some(300), ..Default::default() });
    let r = probe().connect(a, Creds::APP, "10.251.100.10:81", &ConnectOpts::send("x"));
    assert_eq!(r.errno, Some(1), "{r:?}");
    let _ = probe().connect(a, Creds::APP, "10.251.100.10:53", &ConnectOpts { timeout_ms: Some(300), ..Default::default() });
    let q = ConnectOpts { sendto: true, send: Some("q".into()), timeout_ms: Some(300), ..Default::default() };
    let _ = probe().connect(a, Creds::APP, "10.251.100.10:53", &q);
    // Inbound: b calls a's app port; a's proxy takes it through sk_lookup.
    let inbound_to = format!("{}:8080", a.ipv4());
    assert!(probe().connect(b, Creds::APP, &inbound_to, &ConnectOpts::send("hi a")).ok);
    // The untraced pod's own decisions.
    let _ = probe().connect(b, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("b"));

    let app = Creds::APP.uid;
    let cap = cli.wait_record("the captured connect", |r| r["hook"] == "connect4" && r["dst"] == "10.251.100.10:80");
    assert_eq!((&cap["verdict"], &cap["step"], &cap["rule"]), (&"capture".into(), &6.into(), &"outbound listener".into()), "{cap:#}");
    assert_eq!(cap["to"], "127.0.0.1:15001", "{cap:#}");
    assert_eq!((cap["uid"].as_u64(), cap["gid"].as_u64()), (Some(u64::from(app)), Some(u64::from(Creds::APP.gid))), "{cap:#}");
    assert_eq!((&cap["pod"], &cap["proto"]), (&"default/a".into(), &"tcp".into()), "{cap:#}");
    assert!(cap["listener"].as_u64().is_some_and(|id| id > 0), "{cap:#}");
    let pass = cli.wait_record("the excluded port", |r| r["hook"] == "connect4" && r["dst"] == "10.251.100.10:9999");
    assert_eq!((&pass["verdict"], &pass["step"], &pass["rule"]), (&"passthrough".into(), &1.into(), &"excluded outbound port".into()));
    assert!(pass.get("to").is_none(), "not rewritten: {pass:#}");
    let denied = cli.wait_record("the dropped connect", |r| r["hook"] == "connect4" && r["dst"] == "10.251.100.10:81");
    assert_eq!((&denied["verdict"], &denied["step"]), (&"drop".into(), &7.into()), "{denied:#}");
    let dns_tcp = cli.wait_record("DNS over TCP", |r| r["hook"] == "connect4" && r["dst"] == "10.251.100.10:53");
    assert_eq!((&dns_tcp["verdict"], &dns_tcp["step"], &dns_tcp["to"]), (&"dns".into(), &3.into(), &"127.0.0.1:15053".into()));
    let dns_udp = cli.wait_record("DNS over UDP", |r| r["hook"] == "sendmsg4");
    assert!(dns_udp["src"].as_str().is_some_and(|s| s.starts_with("0.0.0.0:") || s.starts_with(&a.ipv4().to_string())), "{dns_udp:#}");
    assert_eq!(
        (&dns_udp["dst"], &dns_udp["verdict"], &dns_udp["to"]),
        (&"10.251.100.10:53".into(), &"dns".into(), &"127.0.0.1:15053".into())
    );
    // The proxy's SO_ORIGINAL_DST for the captured connection, and for the inbound one.
    let orig = cli.wait_record("the proxy's original destination", |r| r["hook"] == "getsockopt" && r["result"] == "captured");
    assert_eq!(orig["orig"], "10.251.100.10:80", "{orig:#}");
    let lookup = cli.wait_record("the inbound connection", |r| r["hook"] == "sk_lookup");
    assert_eq!((&lookup["port"], &lookup["result"]), (&8080.into(), &"assigned".into()), "{lookup:#}");
    assert!(lookup["remote"].as_str().is_some_and(|r| r.starts_with(&format!("{}:", b.ipv4()))), "{lookup:#}");
    cli.wait_record("the inbound original destination", |r| {
        r["hook"] == "getsockopt" && r["result"] == "inbound" && r["orig"] == inbound_to
    });

    // One record per decision: the app's connect to each destination was seen exactly once
    // (the proxy's own upstream connect is a decision of its own: step 2, untouched).
    std::thread::sleep(Duration::from_millis(300));
    let records = cli.records();
    for dst in ["10.251.100.10:80", "10.251.100.10:9999", "10.251.100.10:81", "10.251.100.10:53"] {
        let n = records.iter().filter(|r| r["hook"] == "connect4" && r["dst"] == dst && r["uid"] == app).count();
        assert_eq!(n, 1, "{dst}: {records:#?}");
    }
    let upstream = cli.wait_record("the proxy's upstream connect", |r| r["hook"] == "connect4" && r["uid"] == Creds::PROXY.uid);
    assert_eq!(
        (&upstream["verdict"], &upstream["step"], &upstream["rule"]),
        (&"untouched".into(), &2.into(), &"the proxy's own traffic (uid)".into())
    );
    assert!(records.iter().all(|r| r["pod"] == "default/a"), "{records:#?}");
    // The agent forwards every record into its log, named; the untraced pod has none.
    assert!(logged_records(&agent, "default/a") >= records.len(), "agent log:\n{}", agent.log());
    assert_eq!(logged_records(&agent, "default/b"), 0, "agent log:\n{}", agent.log());
    drop(cli);
    drop(agent);
}

#[test]
fn stopping_killing_or_pausing_the_cli_turns_the_trace_off() {
    require_root!();
    set_name_prefix("sctr");
    let m = Mesh::start(MeshSpec::default());
    let a = m.pod("a");
    let admin = m.agent.admin_addr();

    // Ctrl-C: the CLI ends the session and reports; the switch goes off; no more records.
    let mut cli = TraceCli::start(admin, "default/a", &[]);
    assert!(traced(&m, a));
    let _ = probe().connect(a, Creds::APP, "10.251.100.10:7", &ConnectOpts { timeout_ms: Some(300), ..Default::default() });
    cli.wait_record("a connect while traced", |r| r["hook"] == "connect4");
    // IPv6: web6's listener captures it to the proxy's [::1]:15001 (no proxy runs here).
    let _ = probe().connect(a, Creds::APP, "[fd00:5ca9::100:10]:80", &ConnectOpts { timeout_ms: Some(300), ..Default::default() });
    let v6 = cli.wait_record("the IPv6 connect", |r| r["hook"] == "connect6");
    assert_eq!(
        (&v6["dst"], &v6["verdict"], &v6["step"], &v6["to"]),
        (&"[fd00:5ca9::100:10]:80".into(), &"capture".into(), &6.into(), &"[::1]:15001".into()),
        "{v6:#}"
    );
    cli.signal(libc::SIGINT);
    assert_eq!(cli.wait(), Some(0), "{}", cli.stderr());
    assert!(cli.stderr().contains(" records, 0 dropped"), "{}", cli.stderr());
    wait_until("the switch off after Ctrl-C", Duration::from_secs(2), || !traced(&m, a));
    let before = logged_records(&m.agent, "default/a");
    assert!(before >= 1, "{}", m.agent.log());
    let _ = probe().connect(a, Creds::APP, "10.251.100.10:7", &ConnectOpts { timeout_ms: Some(300), ..Default::default() });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(logged_records(&m.agent, "default/a"), before, "records after the trace was turned off:\n{}", m.agent.log());

    // --for: the CLI ends by itself.
    let mut cli = TraceCli::start(admin, "default/a", &["--for", "1s"]);
    assert_eq!(cli.wait(), Some(0), "{}", cli.stderr());
    wait_until("the switch off after --for", Duration::from_secs(2), || !traced(&m, a));

    // SIGKILL: the agent sees the stream close.
    let mut cli = TraceCli::start(admin, "default/a", &[]);
    assert!(traced(&m, a));
    cli.signal(libc::SIGKILL);
    let _ = cli.wait();
    wait_until("the switch off after the CLI was killed", Duration::from_secs(3), || !traced(&m, a));

    // SIGSTOP: the stream stays open but the heartbeats stop; the lease (5 s) runs out.
    let cli = TraceCli::start(admin, "default/a", &[]);
    let stopped = Instant::now();
    cli.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(2));
    assert!(traced(&m, a), "switched off before the lease ran out");
    wait_until("the switch off after the lease", Duration::from_secs(8), || !traced(&m, a));
    let took = stopped.elapsed();
    assert!(took >= Duration::from_secs(4), "lease ended after {took:?}");
    assert!(m.agent.log().contains("lease expired"), "{}", m.agent.log());
    drop(cli);
}

#[test]
fn the_annotation_traces_without_a_cli_and_a_burst_is_rate_limited() {
    require_root!();
    set_name_prefix("sctr");
    let m = Mesh::start(MeshSpec { pods: &["a", "b"], annotations: &[], files: &[], agent_args: &["--trace-rate", "3"] });
    let (a, b) = (m.pod("a"), m.pod("b"));
    m.mesh.pod(a, "default", &[("app", "a")], &[("sidecap.io/trace", "true")]);
    wait_until("the annotation's switch", Duration::from_secs(10), || traced(&m, a));
    assert!(!traced(&m, b));
    let _ = probe().connect(a, Creds::APP, "10.251.100.10:7", &ConnectOpts { timeout_ms: Some(300), ..Default::default() });
    wait_until("the agent's log of a's record", Duration::from_secs(5), || logged_records(&m.agent, "default/a") >= 1);

    // A burst of 12 connects through a CLI session at 3 records/s: most are left out, and
    // the CLI says how many.
    let mut cli = TraceCli::start(m.agent.admin_addr(), "default/a", &[]);
    let unreachable = Ipv4Addr::new(10, 251, 100, 10);
    for port in 1..=12u16 {
        let to = format!("{unreachable}:{}", 2000 + port);
        let _ = probe().connect(a, Creds::APP, &to, &ConnectOpts { timeout_ms: Some(200), ..Default::default() });
    }
    std::thread::sleep(Duration::from_millis(1500));
    cli.signal(libc::SIGINT);
    assert_eq!(cli.wait(), Some(0), "{}", cli.stderr());
    let got = cli.records().into_iter().filter(|r| r["dst"].as_str().is_some_and(|d| d.contains(":20"))).count() as u64;
    let err = cli.stderr();
    let dropped: u64 = err
        .lines()
        .find_map(|l| l.split(" records, ").nth(1)?.split(" dropped").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary: {err}"));
    assert!(dropped > 0 && got < 12, "records {got}, dropped {dropped}: {err}");
    assert_eq!(got + dropped, 12, "every record is either shown or counted: {err}");
    // The annotation keeps the switch on after the session.
    assert!(traced(&m, a));
}

/// The README's example session: the seed's REGISTRY_ONLY client (Sidecar
/// `policy/testdata/seed-sidecars/05-registry-only-8080.yaml`: port 8080 of its own
/// namespace only), its 8080 connect captured at step 6 and another port dropped at step 7.
#[test]
fn the_seed_registry_only_client_traced_as_in_the_readme() {
    require_root!();
    set_name_prefix("sctr");
    let demoapp = Ipv4Addr::new(10, 251, 100, 10);
    let other = Ipv4Addr::new(10, 251, 100, 20);
    let topo = Topology::builder().pod("client").service_addr(demoapp).service_addr(other).build().expect("topology");
    let client = topo.pod("client");
    let mesh = MeshDir::new();
    mesh.pod(client, "default", &[("run", "client")], &[]);
    mesh.service("default", "demoapp", demoapp.into(), &[("http", 8080)]);
    mesh.service("default", "other", other.into(), &[("tcp", 80)]);
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy/testdata/seed-sidecars/05-registry-only-8080.yaml");
    mesh.write("sidecar-client.yaml", &std::fs::read_to_string(seed).expect("the seed's REGISTRY_ONLY Sidecar"));
    let pins = BpfPinDir::new("sctr").expect("pins");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &[]);
    agent.wait_pods(&[client.cookie().expect("cookie")], 1, fixture::WAIT);
    let _up = Upstream::start(topo.services(), (demoapp, 8080).into()).expect("upstream");
    let _hp = Haproxy::start(client, HaproxyConfig::default()).expect("haproxy");

    let mut cli = TraceCli::start_as(agent.admin_addr(), "default/client", "text", &[]);
    assert!(probe().connect(client, Creds::APP, "10.251.100.10:8080", &ConnectOpts::send("GET /")).ok);
    let r = probe().connect(client, Creds::APP, "10.251.100.20:80", &ConnectOpts::send("hi"));
    assert_eq!(r.errno, Some(1), "{r:?}");
    wait_until("the drop's record", Duration::from_secs(5), || cli.stdout().contains("dst=10.251.100.20:80"));
    cli.signal(libc::SIGINT);
    assert_eq!(cli.wait(), Some(0), "{}", cli.stderr());
    let out = cli.stdout();
    println!("$ sidecap trace --pod default/client\n{}{out}", cli.stderr());
    let line = |dst: &str| {
        out.lines()
            .find(|l| l.contains(" connect4 ") && l.contains(&format!(" dst={dst} ")) && l.contains(" uid=1000 "))
            .unwrap_or_else(|| panic!("no connect to {dst}:\n{out}"))
    };
    let captured = line("10.251.100.10:8080");
    assert!(captured.contains(" verdict=capture step=6 rule=\"outbound listener\" listener="), "{captured}");
    assert!(captured.contains(" listener_name=0.0.0.0_8080 to=127.0.0.1:15001"), "{captured}");
    let dropped = line("10.251.100.20:80");
    assert!(dropped.contains(" verdict=drop step=7 rule=\"no listener: the pod's default\""), "{dropped}");
    assert!(out.lines().any(|l| l.contains(" getsockopt ") && l.contains("result=captured orig=10.251.100.10:8080")), "{out}");
}
