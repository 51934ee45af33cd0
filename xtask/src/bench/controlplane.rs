//! Scenario 5, control plane: how fast a Sidecar change reaches the maps, what the agent costs in
//! memory, and what the maps cost in the kernel.
//!
//! - 1 pod: the bench sandbox's real agent (inotify on its config dir); a Sidecar edit is
//!   timed until the pod's `PODS` entry carries a new generation.
//! - the real agent at `cp_agent` scale (110 pods × 10,000 services): 110 real (bare)
//!   network namespaces, one agent; initial convergence, RSS, map memory, edit convergence.
//! - the default mesh (no Sidecar: every pod imports every service) at each `cp_default`
//!   scale (110 and 1,000 pods × 10,000 services): real namespaces, one real agent; the first
//!   full pass, one added Service reaching every pod's maps, RSS, map memory, rule sets.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sidecap_tests::{Agent, BpfPinDir, Netns, TempDir, TestCgroup};

use super::{Bins, Params, cluster, sandbox::Sandbox, stats};

pub fn run(sb: &mut Sandbox, bins: &Bins, p: &Params) -> anyhow::Result<Value> {
    eprintln!("== scenario 5: control plane");
    let one = one_pod(sb, bins, p).context("1-pod convergence")?;
    eprintln!("  1 pod: converge ms {}", one["converge_ms"]);
    let agent = agent_at_scale(bins, p).context("agent at scale")?;
    eprintln!("  agent {}×{}: rss {} KiB, initial {} ms", p.cp_agent.0, p.cp_agent.1, agent["rss_kib"], agent["initial_ms"]);
    let mut default_mesh = Vec::new();
    for &(pods, services) in &p.cp_default {
        let v = default_mesh_at(bins, pods, services, p.cp_rounds.max(1) * 2).with_context(|| format!("default mesh {pods}×{services}"))?;
        eprintln!(
            "  default mesh {pods}×{services}: first pass {} ms, service add {} ms, rss {} KiB, rule sets {}",
            v["initial_ms"], v["service_ms"]["median"], v["rss_kib"], v["rule_sets"]
        );
        default_mesh.push(v);
    }
    Ok(json!({"one_pod": one, "agent": agent, "default_mesh": default_mesh}))
}

fn run_bounded(mut c: Command, limit: Duration) -> anyhow::Result<Value> {
    let what = format!("{c:?}");
    let dir = TempDir::new("cp-out")?;
    let out_path = dir.path().join("out");
    c.stdin(Stdio::null()).stdout(std::fs::File::create(&out_path)?).stderr(Stdio::inherit());
    let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            let out = std::fs::read_to_string(&out_path)?;
            if !st.success() {
                bail!("{what} failed ({st}): {out}");
            }
            return serde_json::from_str(out.lines().last().unwrap_or("")).with_context(|| format!("{what} printed {out:?}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} took longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn converge_samples(v: &Value) -> Vec<f64> {
    v["converge_ms"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect()
}

fn watch(bins: &Bins, bpffs: &Path, cookie: u64, toggle: &Path, rounds: usize) -> anyhow::Result<Value> {
    let mut c = Command::new(&bins.controlplane);
    c.arg("watch").arg("--bpffs").arg(bpffs).arg("--netns").arg(cookie.to_string()).arg("--toggle").arg(toggle);
    c.arg("--rounds").arg(rounds.to_string());
    let v = run_bounded(c, Duration::from_secs(30 + 12 * rounds as u64))?;
    let s = converge_samples(&v);
    if s.len() != rounds {
        bail!("a change did not converge within 10 s: {v}");
    }
    Ok(json!({"converge_ms": stats::spread(&s), "samples_ms": s}))
}

fn one_pod(sb: &mut Sandbox, bins: &Bins, p: &Params) -> anyhow::Result<Value> {
    let variant = |mode: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: sc\n  namespace: default\nspec:\n  workloadSelector:\n    labels:\n      app: sc\n  outboundTrafficPolicy:\n    mode: {mode}\n  egress:\n  - hosts:\n    - \"./*\"\n"
        )
    };
    let toggle = sb.mesh.path().join("sidecar-sc.yaml");
    std::fs::write(toggle.with_extension("a"), variant("ALLOW_ANY"))?;
    std::fs::write(toggle.with_extension("b"), variant("REGISTRY_ONLY"))?;
    sb.mesh.write("sidecar-sc.yaml", &variant("ALLOW_ANY"));
    let cookie = sb.pod("sc").cookie()?;
    // The ALLOW_ANY variant may compile to what the pod has already: just let it settle.
    std::thread::sleep(Duration::from_millis(500));
    let r = watch(bins, sb.pins.path(), cookie, &toggle, p.cp_rounds.max(2) * 4);
    sb.mesh.remove("sidecar-sc.yaml");
    std::thread::sleep(Duration::from_millis(300));
    r
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

/// `bytes_memlock` of every pinned map (bpftool), and their sum.
pub fn map_memory(pins: &Path) -> Value {
    let mut per = serde_json::Map::new();
    let mut total = 0u64;
    let mut names: Vec<_> = std::fs::read_dir(pins.join("maps")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    names.sort();
    for path in names {
        let out = Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&path).output();
        let Ok(out) = out else { continue };
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(b) = v["bytes_memlock"].as_u64() {
            total += b;
            per.insert(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), json!(b));
        }
    }
    json!({"total_bytes": total, "per_map": per})
}

fn agent_at_scale(bins: &Bins, p: &Params) -> anyhow::Result<Value> {
    let (pods, services) = p.cp_agent;
    let t = Instant::now();
    let nets: Vec<Netns> = (0..pods).map(|_| Netns::new("cp")).collect::<Result<_, _>>()?;
    let netns_secs = t.elapsed().as_secs_f64();
    let cookies: Vec<u64> = nets.iter().map(Netns::cookie).collect::<Result<_, _>>()?;
    let dir = TempDir::new("cp-agent")?;
    let toggle = cluster::write(dir.path(), &cluster::Spec { pods, services, sidecars: true }, &|i| nets[i].path().display().to_string())?;
    let cg = TestCgroup::new("bench-cp")?;
    let pins = BpfPinDir::new("bench-cp")?;
    // SAFETY: set before this process starts any thread that reads the environment.
    unsafe { std::env::set_var("SIDECAP_BIN", &bins.sidecap) };
    let t = Instant::now();
    let mut agent = Agent::start(cg.path(), pins.path(), dir.path(), &[]);
    agent.wait_pods(&cookies, 1, Duration::from_secs(600));
    let initial_ms = t.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(500));
    let pid = agent.pid();
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let maps = map_memory(pins.path());
    let conv = watch(bins, pins.path(), cookies[0], &toggle, p.cp_rounds.max(1) * 2)?;
    let rss_after = status_kib(pid, "VmRSS:");
    agent.kill9();
    drop(agent);
    Ok(json!({
        "pods": pods, "services": services, "netns_setup_s": netns_secs,
        "initial_ms": initial_ms, "rss_kib": rss, "hwm_kib": hwm, "rss_after_changes_kib": rss_after,
        "map_memory": maps, "converge_ms": conv["converge_ms"], "samples_ms": conv["samples_ms"],
    }))
}

/// Istio's default mesh through the real agent: `pods` namespaces, no Sidecar.
fn default_mesh_at(bins: &Bins, pods: usize, services: usize, rounds: usize) -> anyhow::Result<Value> {
    let t = Instant::now();
    let nets: Vec<Netns> = (0..pods).map(|_| Netns::new("cpd")).collect::<Result<_, _>>()?;
    let netns_secs = t.elapsed().as_secs_f64();
    let cookies: Vec<u64> = nets.iter().map(Netns::cookie).collect::<Result<_, _>>()?;
    let dir = TempDir::new("cp-default")?;
    cluster::write(dir.path(), &cluster::Spec { pods, services, sidecars: false }, &|i| nets[i].path().display().to_string())?;
    let cg = TestCgroup::new("bench-cpd")?;
    let pins = BpfPinDir::new("bench-cpd")?;
    // SAFETY: set before this process starts any thread that reads the environment.
    unsafe { std::env::set_var("SIDECAP_BIN", &bins.sidecap) };
    let t = Instant::now();
    let mut agent = Agent::start(cg.path(), pins.path(), dir.path(), &[]);
    let netns_list = cookies.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut w = Command::new(&bins.controlplane);
    w.arg("wait").arg("--bpffs").arg(pins.path()).arg("--netns").arg(&netns_list).args(["--timeout-secs", "900"]);
    if !w.status().is_ok_and(|s| s.success()) {
        bail!("default mesh {pods}×{services}: not every pod reached PODS; agent log:\n{}", agent.log());
    }
    let initial_ms = t.elapsed().as_secs_f64() * 1000.0;
    agent.wait_pods(&cookies, 1, Duration::from_secs(900));
    std::thread::sleep(Duration::from_millis(500));
    let pid = agent.pid();
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");
    let maps = map_memory(pins.path());
    let mut c = Command::new(&bins.controlplane);
    c.arg("service").arg("--config").arg(dir.path()).arg("--bpffs").arg(pins.path());
    c.arg("--netns").arg(cookies.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
    c.arg("--rounds").arg(rounds.to_string());
    let v = run_bounded(c, Duration::from_secs(60 + 25 * rounds as u64))?;
    let s = converge_samples(&v);
    if s.len() != rounds {
        let log = agent.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        bail!(
            "an added Service did not reach every pod within 20 s: {v}\nagent log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let rss_after = status_kib(pid, "VmRSS:");
    agent.kill9();
    drop(agent);
    Ok(json!({
        "pods": pods, "services": services, "netns_setup_s": netns_secs,
        "initial_ms": initial_ms, "rss_kib": rss, "hwm_kib": hwm, "rss_after_changes_kib": rss_after,
        "map_memory": maps, "rule_sets": v["rule_sets"], "service_ms": stats::spread(&s), "samples_ms": s,
    }))
}
