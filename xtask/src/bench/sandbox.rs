//! The bench's sandbox: one topology with identical pods per capture mode, an upstream in
//! the services netns, proxies and apps in the pods, the iptables rules and the agent.
//! Everything is owned here and removed on Drop (also when a scenario fails or panics).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;
use sidecap_tests::{
    Agent, BpfPinDir, Creds, MeshDir, Pod, Spawned, TempDir, TestCgroup, Topology, process::is_listening, spawn_in, spawn_with,
};

use super::{Bins, Params};

/// The captured service (a ClusterIP Service in the mesh config).
pub const SVC: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 10);
/// An excluded destination: the last of the pod's excludeOutboundIPRanges.
pub const SVC_EXCLUDED: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 20);
/// A destination no Service declares (REGISTRY_ONLY drops it).
pub const SVC_UNKNOWN: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 30);
pub const SVC_PORT: u16 = 8080;
/// The app port inside each pod (inbound scenario).
pub const APP_PORT: u16 = 9080;
/// First excluded outbound port; N ports are FIRST_PORT..FIRST_PORT+N.
const FIRST_PORT: u16 = 20000;

/// istio-init's rules: Istio's golden rule set for a pod with default settings, kept with
/// its provenance note in the repository's testdata (the note's `#` lines are comments to
/// `iptables-restore`).
const GOLDEN: &str = "testdata/istio/iptables/cni-plugin/basic.txt.golden";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Iptables,
    Sidecap,
    /// sidecap with `--sockmap` (its own pod and agent): the keepalive scenario only.
    SidecapSockmap,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Direct, Mode::Iptables, Mode::Sidecap];
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Sidecap => "sidecap",
            Mode::SidecapSockmap => "sidecap+sockmap",
        }
    }
    fn pod(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "ipt",
            Mode::Sidecap => "sc",
            Mode::SidecapSockmap => "scm",
        }
    }
}

/// Pods that run a proxy, in `Sandbox::proxies` order.
const PROXY_PODS: [&str; 3] = ["ipt", "sc", "scm"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    Forward,
    Haproxy,
    /// HAProxy in HTTP mode, keeping server connections alive (keepalive scenario).
    HaproxyHttp,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Forward => "sc-forward",
            Proxy::Haproxy => "haproxy",
            Proxy::HaproxyHttp => "haproxy-http",
        }
    }
}

/// One load run's parameters.
#[derive(Clone, Debug)]
pub struct Load {
    pub target: SocketAddr,
    pub concurrency: usize,
    pub expect_fail: bool,
}

// Field order is drop order: processes, agent, config, namespaces and cgroups, pins last.
pub struct Sandbox {
    proxies: Vec<Spawned>,
    apps: Vec<Spawned>,
    upstream: Spawned,
    pub agent: Agent,
    /// The second agent, `--sockmap`, attached to the `scm` pod's cgroup only, with its own
    /// config (that pod alone) and pins; only when the keepalive scenario runs.
    agent_sockmap: Option<Agent>,
    pub mesh: MeshDir,
    _mesh_sockmap: Option<MeshDir>,
    topo: Topology,
    _svc_cgroup: TestCgroup,
    scratch: TempDir,
    pub pins: BpfPinDir,
    pins_sockmap: Option<BpfPinDir>,
    pub bins: Bins,
    pub proxy: Proxy,
    pub rules: usize,
    pub registry_only: bool,
    /// Annotations of the sidecap pod beside the exclusions (`set_annotations`).
    annotations: Vec<(String, String)>,
    duration_ms: u64,
    warmup_ms: u64,
}

impl Sandbox {
    /// `sockmap`: also the `scm` pod's agent with `--sockmap` (the keepalive scenario's
    /// sidecap+sockmap mode).
    pub fn start(bins: &Bins, params: &Params, sockmap: bool) -> anyhow::Result<Sandbox> {
        // SAFETY: set before the harness starts any agent or thread that reads the environment.
        unsafe { std::env::set_var("SIDECAP_BIN", &bins.sidecap) };
        let topo = Topology::builder()
            .pod("direct")
            .pod("ipt")
            .pod("sc")
            .pod("scm")
            .pod("client")
            .service_addr(SVC)
            .service_addr(SVC_EXCLUDED)
            .build()
            .context("topology (needs root, iproute2)")?;
        let svc_cgroup = TestCgroup::new("bench-svc")?;
        let mut upstream = spawn_with(
            topo.services(),
            &svc_cgroup,
            Creds::APP,
            command(&bins.sc_load, &["serve", &format!("0.0.0.0:{SVC_PORT}"), "--threads", "2", "--max-secs", "3600"]),
        )?;
        wait_listening(&mut upstream, "upstream")?;
        let mut apps = Vec::new();
        for name in ["direct", "ipt", "sc"] {
            let pod = topo.pod(name);
            let mut app = spawn_in(
                pod,
                Creds::APP.uid,
                Creds::APP.gid,
                command(&bins.sc_load, &["serve", &format!("0.0.0.0:{APP_PORT}"), "--threads", "1", "--max-secs", "3600"]),
            )?;
            wait_listening(&mut app, "app")?;
            apps.push(app);
        }
        let mesh = MeshDir::new();
        mesh.service("default", "web", SVC.into(), &[("tcp-web", SVC_PORT)]);
        let sc = topo.pod("sc");
        write_pod(&mesh, sc, 1, &[]);
        let pins = BpfPinDir::new("bench")?;
        // Attached to the sidecap pod's own cgroup: the other pods run no program at all.
        let mut agent = Agent::start(sc.cgroup().path(), pins.path(), mesh.path(), &["--allow-any", "capture"]);
        agent.wait_pods(&[sc.cookie()?], 1, Duration::from_secs(30));
        let (mut agent_sockmap, mut mesh_sockmap, mut pins_sockmap) = (None, None, None);
        if sockmap {
            let mesh = MeshDir::new();
            mesh.service("default", "web", SVC.into(), &[("tcp-web", SVC_PORT)]);
            let scm = topo.pod("scm");
            write_pod(&mesh, scm, 1, &[]);
            let pins = BpfPinDir::new("bench-sockmap")?;
            let mut agent = Agent::start(scm.cgroup().path(), pins.path(), mesh.path(), &["--allow-any", "capture", "--sockmap"]);
            agent.wait_pods(&[scm.cookie()?], 1, Duration::from_secs(30));
            (agent_sockmap, mesh_sockmap, pins_sockmap) = (Some(agent), Some(mesh), Some(pins));
        }
        let scratch = TempDir::new("bench")?;
        let mut sb = Sandbox {
            proxies: Vec::new(),
            apps,
            upstream,
            agent,
            agent_sockmap,
            _mesh_sockmap: mesh_sockmap,
            pins_sockmap,
            mesh,
            topo,
            _svc_cgroup: svc_cgroup,
            scratch,
            pins,
            bins: bins.clone(),
            proxy: Proxy::Forward,
            rules: 1,
            registry_only: false,
            annotations: Vec::new(),
            duration_ms: params.duration_ms,
            warmup_ms: params.warmup_ms,
        };
        sb.load_iptables(1)?;
        sb.start_proxies(Proxy::Forward)?;
        Ok(sb)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    /// N excluded CIDRs and N excluded ports ahead of the capture rule, in both the
    /// iptables pod (as istio-iptables writes them) and the sidecap pod (annotations).
    pub fn set_rules(&mut self, n: usize) -> anyhow::Result<()> {
        let n = n.max(1);
        self.load_iptables(n)?;
        if n != self.rules {
            let before = self.generation()?;
            write_pod(&self.mesh, self.topo.pod("sc"), n, &self.annotations);
            self.wait_generation(before)?;
            self.rules = n;
        }
        Ok(())
    }

    /// Sets the sidecap pod's other annotations (the trace switch, the proxy identity) and
    /// waits (≤ 60 s) until its kernel config satisfies `applied` (its `sidecap inspect` view).
    pub fn set_annotations(&mut self, annotations: &[(&str, &str)], applied: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
        let annotations: Vec<(String, String)> = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if annotations == self.annotations {
            return Ok(());
        }
        write_pod(&self.mesh, self.topo.pod("sc"), self.rules, &annotations);
        self.annotations = annotations;
        let cookie = self.topo.pod("sc").cookie()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let pod = pod_view(self.pins.path(), cookie);
            if pod.as_ref().is_some_and(&applied) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the sidecap pod's annotations {:?} were not applied within 60 s: {pod:?}", self.annotations);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn load_iptables(&mut self, n: usize) -> anyhow::Result<()> {
        let file = self.scratch.path().join(format!("rules-{n}.txt"));
        std::fs::write(&file, istio_rules(&golden(), &excluded_cidrs(n), &excluded_ports(n)))?;
        let ipt = self.topo.pod("ipt");
        ipt.netns()
            .exec("iptables-restore", &[&file.display().to_string()])
            .context("iptables-restore in the iptables pod")?;
        Ok(())
    }

    /// Mesh-wide outbound traffic policy for the sidecap pod (REGISTRY_ONLY drops unknown
    /// destinations; iptables cannot, the proxy resets them).
    pub fn set_registry_only(&mut self, on: bool) -> anyhow::Result<()> {
        if on == self.registry_only {
            return Ok(());
        }
        let before = self.generation()?;
        self.mesh.mesh_mode(if on { "REGISTRY_ONLY" } else { "ALLOW_ANY" });
        self.wait_generation(before)?;
        self.registry_only = on;
        Ok(())
    }

    /// The sidecap pod's generation in the maps now.
    pub fn generation(&self) -> anyhow::Result<u64> {
        let cookie = self.topo.pod("sc").cookie()?;
        pod_view(self.pins.path(), cookie)
            .and_then(|p| p["generation"].as_u64())
            .ok_or_else(|| anyhow!("the sidecap pod (netns {cookie}) is not in the maps"))
    }

    /// The sidecap pod's kernel counters (cumulative), from `sidecap inspect`.
    pub fn counters(&self) -> Value {
        let Ok(cookie) = self.topo.pod("sc").cookie() else { return Value::Null };
        pod_view(self.pins.path(), cookie).map(|p| p["counters"].clone()).unwrap_or(Value::Null)
    }

    /// Whether the `scm` pod has its `--sockmap` agent (see [`Sandbox::start`]).
    pub fn has_sockmap(&self) -> bool {
        self.agent_sockmap.is_some()
    }

    /// The `--sockmap` pod's kernel counters (cumulative: sockmap messages, bytes, fallbacks).
    pub fn counters_sockmap(&self) -> Value {
        let Ok(cookie) = self.topo.pod("scm").cookie() else { return Value::Null };
        let Some(pins) = &self.pins_sockmap else { return Value::Null };
        pod_view(pins.path(), cookie).map(|p| p["counters"].clone()).unwrap_or(Value::Null)
    }

    /// The pid of the proxy serving `mode`'s pod (None: direct has none).
    pub fn proxy_pid(&self, mode: Mode) -> Option<i32> {
        let i = PROXY_PODS.iter().position(|p| *p == mode.pod())?;
        self.proxies.get(i).map(Spawned::pid)
    }

    /// Waits (≤ 60 s) until the agent wrote a generation after `before`.
    pub fn wait_generation(&mut self, before: u64) -> anyhow::Result<()> {
        let cookie = self.topo.pod("sc").cookie()?;
        self.agent.wait_pods(&[cookie], before + 1, Duration::from_secs(60));
        Ok(())
    }

    /// (Re)starts the proxy of the iptables and sidecap pods (both sidecap pods).
    pub fn start_proxies(&mut self, proxy: Proxy) -> anyhow::Result<()> {
        self.proxies.clear(); // kills the previous ones
        for name in PROXY_PODS {
            let pod = self.topo.pod(name);
            let p = match proxy {
                Proxy::Forward => {
                    let blackhole = format!("{SVC_UNKNOWN}:{SVC_PORT}");
                    let mut p = spawn_in(
                        pod,
                        Creds::PROXY.uid,
                        Creds::PROXY.gid,
                        command(&self.bins.sc_forward, &["--blackhole", &blackhole, "--max-secs", "3600"]),
                    )?;
                    wait_listening(&mut p, "sc-forward")?;
                    p
                }
                Proxy::Haproxy | Proxy::HaproxyHttp => {
                    let cfg = self.scratch.path().join("haproxy.cfg");
                    std::fs::write(&cfg, if proxy == Proxy::Haproxy { haproxy_config() } else { haproxy_http_config() })?;
                    let cfg = cfg.display().to_string();
                    sidecap_tests::util::run("haproxy", &["-c", "-q", "-f", &cfg]).context("haproxy -c")?;
                    let mut p = spawn_in(pod, Creds::PROXY.uid, Creds::PROXY.gid, command(Path::new("haproxy"), &["-db", "-f", &cfg]))?;
                    let pid = p.pid();
                    let up = sidecap_tests::util::wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
                        if is_listening(pid, 15001) && is_listening(pid, 15006) {
                            return Some(true);
                        }
                        matches!(p.try_wait(), Ok(Some(_)) | Err(_)).then_some(false)
                    });
                    if up != Some(true) {
                        bail!("haproxy did not start: {} {}", p.stdout(), p.stderr());
                    }
                    p
                }
            };
            self.proxies.push(p);
        }
        self.proxy = proxy;
        Ok(())
    }

    /// One `sc-load run` in the pod of `mode` (inbound: from the client pod, see
    /// [`Sandbox::load_from`]); returns its JSON.
    pub fn load(&mut self, mode: Mode, l: &Load) -> anyhow::Result<Value> {
        self.load_from(mode.pod(), l)
    }

    pub fn load_from(&mut self, pod: &str, l: &Load) -> anyhow::Result<Value> {
        self.check_alive()?;
        let pod = self.topo.pod(pod);
        let args = [
            "run".to_string(),
            l.target.to_string(),
            "--concurrency".into(),
            l.concurrency.to_string(),
            "--duration-ms".into(),
            self.duration_ms.to_string(),
            "--warmup-ms".into(),
            self.warmup_ms.to_string(),
            "--timeout-ms".into(),
            "2000".into(),
            "--expect".into(),
            if l.expect_fail { "fail" } else { "ok" }.into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = spawn_in(pod, Creds::APP.uid, Creds::APP.gid, command(&self.bins.sc_load, &args))?;
        let limit = Duration::from_millis(self.duration_ms + self.warmup_ms + 15_000);
        let status = p.wait_timeout(limit)?;
        if status.is_none() {
            p.kill();
            bail!("sc-load in {} did not finish within {limit:?}", pod.name());
        }
        let out = p.stdout();
        serde_json::from_str(out.lines().last().unwrap_or("")).map_err(|e| anyhow!("sc-load output {out:?} ({e}); stderr {}", p.stderr()))
    }

    /// Exactly `count` connections, one at a time, from an `sc-load` in `netns_pod`'s netns
    /// and `cgroup_pod`'s cgroup (the same pod, or an unmeshed process in a meshed pod's
    /// cgroup); returns its JSON.
    pub fn load_count(&mut self, netns_pod: &str, cgroup_pod: &str, target: SocketAddr, count: u64) -> anyhow::Result<Value> {
        self.check_alive()?;
        count_connections(&self.bins, self.topo.pod(netns_pod), self.topo.pod(cgroup_pod).cgroup(), target, count)
    }

    /// Like [`Sandbox::load_count`], in a cgroup of the caller's.
    pub fn load_count_in(&mut self, netns_pod: &str, cgroup: &TestCgroup, target: SocketAddr, count: u64) -> anyhow::Result<Value> {
        self.check_alive()?;
        count_connections(&self.bins, self.topo.pod(netns_pod), cgroup, target, count)
    }

    /// Runs `program args` in the pod of `mode` as the app user, for at most `limit`;
    /// returns its stdout.
    pub fn run_in(&mut self, mode: Mode, program: &str, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        self.check_alive()?;
        let pod = self.topo.pod(mode.pod());
        let mut p = spawn_in(pod, Creds::APP.uid, Creds::APP.gid, command(Path::new(program), args))?;
        if p.wait_timeout(limit)?.is_none() {
            p.kill();
            bail!("{program} in {} did not finish within {limit:?}", pod.name());
        }
        Ok(p.stdout())
    }

    /// Starts `program args` in the services netns as root (an upstream server); it is
    /// killed when the returned handle drops.
    pub fn spawn_upstream(&self, program: &str, args: &[&str]) -> anyhow::Result<Spawned> {
        Ok(spawn_with(self.topo.services(), &self._svc_cgroup, Creds::ROOT, command(Path::new(program), args))?)
    }

    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// Fails when a long-running process of the sandbox has died.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        self.agent.assert_running();
        if let Some(a) = &mut self.agent_sockmap {
            a.assert_running();
        }
        for (what, p) in self.proxies.iter_mut().map(|p| ("proxy", p)).chain(self.apps.iter_mut().map(|p| ("app", p))) {
            if let Ok(Some(st)) = p.try_wait() {
                bail!("{what} exited ({st}): {} {}", p.stdout(), p.stderr());
            }
        }
        if let Ok(Some(st)) = self.upstream.try_wait() {
            bail!("upstream exited ({st}): {}", self.upstream.stderr());
        }
        Ok(())
    }
}

/// A pod's `sidecap inspect` view in the maps pinned under `pins` (None: not there).
fn pod_view(pins: &Path, cookie: u64) -> Option<Value> {
    let v = sidecap_tests::inspect(pins);
    v.as_array()?.iter().find(|p| p["netns_cookie"].as_u64() == Some(cookie)).cloned()
}

fn command(program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn wait_listening(p: &mut Spawned, what: &str) -> anyhow::Result<()> {
    if !p.wait_stdout("\"listening\"", Duration::from_secs(5)) {
        bail!("{what} did not start: stdout {:?} stderr {:?}", p.stdout(), p.stderr());
    }
    Ok(())
}

/// The sidecap pod with `n` excluded CIDRs and ports (annotations as istio-cni reads them),
/// and `other` annotations.
fn write_pod(mesh: &MeshDir, pod: &Pod, n: usize, other: &[(String, String)]) {
    let cidrs = excluded_cidrs(n).join(",");
    let ports: Vec<String> = excluded_ports(n).iter().map(u16::to_string).collect();
    let ports = ports.join(",");
    let mut annotations = vec![
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", cidrs.as_str()),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", ports.as_str()),
    ];
    annotations.extend(other.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    mesh.pod(pod, "default", &[("app", "sc")], &annotations);
}

/// `n` /32s: n-1 fillers in 10.251.200.0–10.251.239.255 (never contacted), then the
/// excluded service, so a passthrough connection matches the last rule.
pub fn excluded_cidrs(n: usize) -> Vec<String> {
    assert!((1..=10_241).contains(&n), "1..=10241 excluded CIDRs");
    let mut v: Vec<String> = (0..n - 1).map(|i| format!("10.251.{}.{}/32", 200 + i / 256, i % 256)).collect();
    v.push(format!("{SVC_EXCLUDED}/32"));
    v
}

pub fn excluded_ports(n: usize) -> Vec<u16> {
    (0..n as u16).map(|i| FIRST_PORT + i).collect()
}

pub fn golden() -> String {
    let path = crate::workspace_root().join(GOLDEN);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("istio-init's golden rules at {}: {e} (part of the repository: is the checkout complete?)", path.display())
    })
}

/// istio-iptables' rules for `excludeOutboundIPRanges` = cidrs and `excludeOutboundPorts` =
/// ports, placed as the goldens place them: excluded ports (tcp and udp) right after the
/// status port's, at the top of ISTIO_OUTPUT; excluded ranges right after
/// `-d 127.0.0.1/32 -j RETURN`, just before the capture rule.
pub fn istio_rules(golden: &str, cidrs: &[String], ports: &[u16]) -> String {
    let mut out = String::new();
    for line in golden.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim() == "-A ISTIO_OUTPUT -p udp --dport 15020 -j RETURN" {
            for p in ports {
                let _ = writeln!(out, "-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN");
                let _ = writeln!(out, "-A ISTIO_OUTPUT -p udp --dport {p} -j RETURN");
            }
        }
        if line.trim() == "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN" {
            for c in cidrs {
                let _ = writeln!(out, "-A ISTIO_OUTPUT -d {c} -j RETURN");
            }
        }
    }
    out
}

/// HAProxy as a transparent sidecar, without per-connection logging (it would dominate);
/// `nolinger` so that closed connections leave no TIME_WAIT.
/// `load_count`'s run: `sc-load` in `pod`'s netns and `cgroup`, exactly `count` connections.
fn count_connections(bins: &Bins, pod: &Pod, cgroup: &TestCgroup, target: SocketAddr, count: u64) -> anyhow::Result<Value> {
    let args = [
        "run".to_string(),
        target.to_string(),
        "--max-count".into(),
        count.to_string(),
        "--warmup-ms".into(),
        "0".into(),
        "--duration-ms".into(),
        "120000".into(),
        "--timeout-ms".into(),
        "2000".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = spawn_with(pod.netns(), cgroup, Creds::APP, command(&bins.sc_load, &args))?;
    let limit = Duration::from_secs(135);
    if p.wait_timeout(limit)?.is_none() {
        p.kill();
        bail!("sc-load in {} did not finish within {limit:?}", pod.name());
    }
    let out = p.stdout();
    serde_json::from_str(out.lines().last().unwrap_or("")).map_err(|e| anyhow!("sc-load output {out:?} ({e}); stderr {}", p.stderr()))
}

fn haproxy_config() -> String {
    "global
    nbthread 1
    maxconn 1000

defaults
    mode tcp
    option nolinger
    timeout connect 5s
    timeout client 10s
    timeout server 10s

frontend outbound
    bind 127.0.0.1:15001
    tcp-request content reject if { dst_port 15001 }
    default_backend outbound_dst

backend outbound_dst
    option transparent

frontend inbound
    bind 0.0.0.0:15006
    tcp-request content reject if { dst_port 15006 }
    default_backend inbound_dst

backend inbound_dst
    option transparent
    source 127.0.0.6
"
    .to_string()
}

/// HAProxy as an HTTP sidecar (as Envoy is one): persistent client connections, server
/// connections kept and reused, no per-request logging.
fn haproxy_http_config() -> String {
    "global
    nbthread 1
    maxconn 1000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend outbound
    bind 127.0.0.1:15001
    http-request reject if { dst_port 15001 }
    default_backend outbound_dst

backend outbound_dst
    option transparent

frontend inbound
    bind 0.0.0.0:15006
    http-request reject if { dst_port 15006 }
    default_backend inbound_dst

backend inbound_dst
    option transparent
    source 127.0.0.6
"
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_sit_where_istio_iptables_puts_them() {
        let g = golden();
        let r = istio_rules(&g, &excluded_cidrs(3), &excluded_ports(2));
        let lines: Vec<&str> = r.lines().collect();
        let at = |s: &str| lines.iter().position(|l| *l == s).unwrap_or_else(|| panic!("no {s:?} in\n{r}"));
        assert_eq!(at("-A ISTIO_OUTPUT -p tcp --dport 20000 -j RETURN"), at("-A ISTIO_OUTPUT -p udp --dport 15020 -j RETURN") + 1);
        assert_eq!(at("-A ISTIO_OUTPUT -p udp --dport 20001 -j RETURN"), at("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN") - 1);
        assert_eq!(at("-A ISTIO_OUTPUT -d 10.251.200.0/32 -j RETURN"), at("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN") + 1);
        assert_eq!(at("-A ISTIO_OUTPUT -d 10.251.100.20/32 -j RETURN"), at("-A ISTIO_OUTPUT -j ISTIO_REDIRECT") - 1);
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(r.lines().count(), g.lines().count() + 3 + 4);
    }

    #[test]
    fn exclusions_stay_in_the_sandbox_range() {
        let c = excluded_cidrs(10_000);
        assert_eq!(c.len(), 10_000);
        assert_eq!(c.last().map(String::as_str), Some("10.251.100.20/32"));
        for s in &c {
            let ip: std::net::IpAddr = s.trim_end_matches("/32").parse().unwrap();
            assert!(sidecap_tests::is_allowed_addr(ip), "{s}");
        }
        let mut dedup = c.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), c.len());
        assert_eq!(excluded_ports(10_000).last(), Some(&29_999));
    }
}
