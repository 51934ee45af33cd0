//! Churn, bounded: pods are created and deleted through the CNI path, the namespace's
//! Sidecar changes, and the agent is SIGKILLed and restarted, interleaved. After every step,
//! every pod whose ADD returned 0 is captured exactly as `sidecap explain --config` predicts
//! from the source (compared with `sidecap explain` of the live kernel state, and with a real
//! connect for the REGISTRY_ONLY drop), and nothing remains of deleted pods.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use sidecap_tests::{fixture::SVC, *};

const SLOTS: usize = 5;
const STEPS: usize = 30;
/// Destinations asked of every live pod: a Service port in the Sidecar's scope, one that is
/// not (port 81 of another Service), and an address that is nobody's.
const TO: [&str; 3] = ["10.251.100.10:80", "10.251.100.11:81", "192.0.2.1:443"];

fn pod_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'\nspec:\n  containers:\n  - name: app\n  - name: istio-proxy\n"
    )
}

const LOCKDOWN: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\n  namespace: default\nspec:\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n  egress:\n  - hosts:\n    - \"./web.default.svc.cluster.local\"\n";

/// (action, deciding listener) per destination, from `sidecap explain` with these source arguments.
fn explain(source: &[&str], pod: &str) -> Result<Vec<(String, String)>, String> {
    let mut args = vec!["explain", "--pod", pod];
    args.extend_from_slice(source);
    for t in TO {
        args.extend_from_slice(&["--to", t]);
    }
    let (code, out, err) = sidecap(&args);
    if code != 0 {
        return Err(format!("explain {source:?} {pod}: exit {code}: {err}"));
    }
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    Ok(v["decisions"]
        .as_array()
        .ok_or_else(|| format!("no decisions: {v}"))?
        .iter()
        .map(|d| {
            // The two sources word their reasons differently; the listener that decided is what
            // must agree.
            let reason = d["reason"].as_str().unwrap_or_default();
            let listener = reason.strip_prefix("listener ").and_then(|r| r.split_whitespace().next()).unwrap_or_default();
            (d["action"].as_str().unwrap_or_default().to_string(), listener.to_string())
        })
        .collect())
}

/// Simple deterministic generator (the steps must be the same on every run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn check(step: usize, what: &str, topo: &Topology, pins: &Path, cfg: &Path, live: &BTreeMap<usize, String>, agent: &Agent) {
    let bpffs = ["--bpffs", &pins.display().to_string()].map(str::to_string);
    let config = ["--config", &cfg.display().to_string()].map(str::to_string);
    let deadline = Instant::now() + fixture::WAIT;
    loop {
        let mut problems = Vec::new();
        for slot in 0..SLOTS {
            let name = format!("p{slot}");
            let pod = format!("default/{name}");
            let link = pins.join("links/netns").join(topo.pod(&name).cookie().expect("cookie").to_string());
            if live.contains_key(&slot) {
                let kernel = explain(&bpffs.iter().map(String::as_str).collect::<Vec<_>>(), &pod);
                let source = explain(&config.iter().map(String::as_str).collect::<Vec<_>>(), &pod);
                match (kernel, source) {
                    (Ok(k), Ok(s)) if k == s => {}
                    (k, s) => problems.push(format!("{pod}: kernel {k:?} vs source {s:?}")),
                }
                if !link.exists() {
                    problems.push(format!("{pod}: no sk_lookup link pinned"));
                }
            } else {
                let (code, _, err) = sidecap(&["inspect", "--bpffs", &pins.display().to_string(), "--pod", &pod]);
                if code == 0 || !err.contains("not in the maps") {
                    problems.push(format!("{pod} was deleted but is still in the maps"));
                }
                if link.exists() {
                    problems.push(format!("{pod} was deleted but its link is pinned"));
                }
            }
        }
        if problems.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "step {step} ({what}): {problems:#?}\nagent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pods_sidecars_and_agent_restarts_interleaved_leave_every_pod_captured_as_explained() {
    require_root!();
    let mut b = Topology::builder().service_addr(SVC).service_addr(std::net::Ipv4Addr::new(10, 251, 100, 11));
    for slot in 0..SLOTS {
        b = b.pod(&format!("p{slot}"));
    }
    let topo = b.build().expect("topology");
    let mesh = MeshDir::new();
    mesh.service("default", "web", SVC.into(), &[("tcp-web", 80)]);
    mesh.service("default", "other", std::net::Ipv4Addr::new(10, 251, 100, 11).into(), &[("tcp-other", 81)]);
    let pins = BpfPinDir::new("churn").expect("pins");
    let dir = TempDir::new("churn").expect("tmp");
    let socket = dir.path().join("cni.sock");
    let sock = socket.display().to_string();
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--cni-socket", &sock, "--cni-wait-secs", "10"]);
    agent.wait_ready(fixture::WAIT);
    agent.wait_cni_socket(&socket, fixture::WAIT);

    let mut rng = Lcg(0x5eed_cafe);
    let mut live: BTreeMap<usize, String> = BTreeMap::new();
    let mut lockdown = false;
    let (mut adds, mut dels, mut edits, mut restarts) = (0, 0, 0, 0);
    for step in 0..STEPS {
        let r = rng.next();
        let what = if step > 0 && r.is_multiple_of(6) {
            agent.kill9();
            agent.restart();
            agent.wait_cni_socket(&socket, fixture::WAIT);
            restarts += 1;
            "agent SIGKILLed and restarted".to_string()
        } else if r % 6 == 1 {
            lockdown = !lockdown;
            if lockdown {
                mesh.write("sidecar.yaml", LOCKDOWN);
            } else {
                mesh.remove("sidecar.yaml");
            }
            edits += 1;
            format!("Sidecar {}", if lockdown { "REGISTRY_ONLY" } else { "removed" })
        } else {
            let slot = (r / 7) as usize % SLOTS;
            let name = format!("p{slot}");
            let pod = topo.pod(&name);
            if let Some(id) = live.remove(&slot) {
                let (code, out) = cni::kube("DEL", "default", &name, &id, &pod.netns().path(), &socket, &[]);
                assert_eq!(code, 0, "DEL always succeeds: {out}");
                mesh.remove(&format!("{name}.yaml"));
                dels += 1;
                format!("{name} deleted")
            } else {
                let id = format!("ctr-{name}-{step}");
                mesh.write(&format!("{name}.yaml"), &pod_yaml(&name));
                let ip = format!("{}/24", pod.ipv4());
                let (code, out) = cni::kube("ADD", "default", &name, &id, &pod.netns().path(), &socket, &[&ip]);
                assert_eq!(code, 0, "step {step}: ADD {name}: {out}\nagent log:\n{}", agent.log());
                live.insert(slot, id);
                adds += 1;
                format!("{name} added")
            }
        };
        check(step, &what, &topo, pins.path(), mesh.path(), &live, &agent);
        // The kernel itself, not only explain: under the lockdown an address outside the
        // Sidecar's hosts fails at connect with EPERM; otherwise it is not dropped.
        for slot in live.keys() {
            let pod = topo.pod(&format!("p{slot}"));
            let opts = ConnectOpts { timeout_ms: Some(300), ..Default::default() };
            let res = Probe::at(probe_bin!()).connect(pod, Creds::APP, "10.251.100.11:81", &opts);
            assert_eq!(res.errno == Some(1), lockdown, "step {step} ({what}): p{slot} → 10.251.100.11:81: {res:?}");
        }
    }
    assert!(
        adds >= 5 && dels >= 3 && edits >= 3 && restarts >= 2,
        "the sequence exercises everything: {adds} adds, {dels} dels, {edits} edits, {restarts} restarts"
    );
}
