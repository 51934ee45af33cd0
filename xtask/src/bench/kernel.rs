//! Scenario 7, kernel cost: the run time of each of sidecap's programs per connection, from
//! the kernel's own accounting (`kernel.bpf_stats_enabled=1`, bpftool's `run_time_ns` and
//! `run_cnt` of the programs behind the agent's pinned links), for a captured connection, a
//! passthrough one, and a socket of an unmeshed process in the sidecap pod's cgroup; the
//! captured one again with the pod traced, and under the cgroup-bound proxy identity.
//!
//! Each measurement is exactly N connections one after the other (sc-load `--max-count`);
//! the counters are read before and after, so the numbers are per-run averages that other
//! load on the machine stretches far less than it stretches wall-clock rates. A last pass
//! repeats the captured case with empty programs beside sidecap's (`floor`): what merely
//! running a program there costs.

mod empty;
mod node;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::Params;
use super::sandbox::{SVC, SVC_EXCLUDED, SVC_PORT, Sandbox};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// How the sidecap pod is configured for a case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PodMode {
    /// Istio's default identity (uid/gid 1337), no trace.
    Plain,
    /// `sidecap.io/trace: "true"`: every decision becomes a record.
    Traced,
    /// `sidecap.io/proxy-identity: cgroup`, bound to the pod's cgroup (where the proxy runs):
    /// the proxy's connects pay the cgroup check.
    CgroupIdentity,
}

/// A measured case: the client's netns, its target, the pod's configuration; its cgroup is
/// the sidecap pod's, where the sandbox's agent attached everything, except for the host
/// process (see `node`).
struct Case {
    name: &'static str,
    netns: &'static str,
    target: SocketAddr,
    mode: PodMode,
}

/// The case run from the node-like attach's root cgroup, with that agent's programs counted.
const HOST: &str = "host process";

fn cases() -> [Case; 7] {
    let svc = SocketAddr::from((SVC, SVC_PORT));
    let case = |name, netns, target, mode| Case { name, netns, target, mode };
    [
        // App → 10.251.100.10 → sc-forward → upstream: the app's socket, the proxy's
        // accepted and upstream sockets are in the cgroup (the upstream's is not).
        case("captured", "sc", svc, PodMode::Plain),
        // An excluded destination: only the app's socket, which the programs let go.
        case("passthrough", "sc", SocketAddr::from((SVC_EXCLUDED, SVC_PORT)), PodMode::Plain),
        // A process of no meshed pod (its netns is not in PODS) under every program: an
        // unmeshed pod's, or any host process's when all programs sit on the root.
        case("unmeshed", "client", svc, PodMode::Plain),
        // The same process under the default placement, above the pods' cgroup: connect only.
        case(HOST, "client", svc, PodMode::Plain),
        // The captured case while the pod is traced: what its records cost.
        case("captured, traced", "sc", svc, PodMode::Traced),
        // The captured case under the cgroup-bound proxy identity.
        case("captured, cgroup identity", "sc", svc, PodMode::CgroupIdentity),
        // The captured case with empty programs beside sidecap's, only theirs counted.
        case("floor", "sc", svc, PodMode::Plain),
    ]
}

/// Configures the sidecap pod for `mode` and waits until its kernel config shows it.
fn set_mode(sb: &mut Sandbox, mode: PodMode) -> anyhow::Result<()> {
    let has_flag = |pod: &Value, flag: &str| pod["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == flag));
    match mode {
        PodMode::Plain => sb.set_annotations(&[], |pod| !has_flag(pod, "trace") && pod["proxy_identity"] == "uid"),
        PodMode::Traced => sb.set_annotations(&[("sidecap.io/trace", "true")], |pod| has_flag(pod, "trace")),
        PodMode::CgroupIdentity => {
            let cgroup = sb.pod("sc").cgroup().path().display().to_string();
            sb.set_annotations(&[("sidecap.io/proxy-identity", "cgroup"), ("sidecap.io/proxy-cgroup", &cgroup)], |pod| {
                pod["proxy_identity"].as_str().is_some_and(|id| id.starts_with("cgroup ") && id != "cgroup unknown")
            })
        }
    }
}

/// Turns `kernel.bpf_stats_enabled` on and puts the previous value back on drop.
pub(super) struct BpfStats {
    previous: String,
}

impl BpfStats {
    pub(super) fn enable() -> anyhow::Result<BpfStats> {
        let previous = std::fs::read_to_string(STATS_SYSCTL).with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing 1 to {STATS_SYSCTL}"))?;
        Ok(BpfStats { previous: previous.trim().to_string() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!("xtask bench: could not restore {STATS_SYSCTL} to {}: {e}", self.previous);
        }
    }
}

fn bpftool_json(args: &[&str], path: Option<&Path>) -> anyhow::Result<Value> {
    let mut c = Command::new("bpftool");
    c.arg("-j").args(args);
    if let Some(p) = path {
        c.arg(p);
    }
    let out = c.output().context("running bpftool (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("bpftool {args:?} {path:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?} output"))
}

/// (hook name, program id) of every program the agent attached: its pinned cgroup links
/// and its pinned sk_lookup program.
pub(super) fn programs(pins: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let links = pins.join("links");
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&links)
        .with_context(|| format!("reading {}", links.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for path in entries {
        let v = bpftool_json(&["link", "show", "pinned"], Some(&path))?;
        let id = v["prog_id"].as_u64().with_context(|| format!("no prog_id for the link {}: {v}", path.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push((name, id));
    }
    let skl = pins.join("progs/sk_lookup");
    let v = bpftool_json(&["prog", "show", "pinned"], Some(&skl))?;
    out.push(("sk_lookup".into(), v["id"].as_u64().with_context(|| format!("no id for {}: {v}", skl.display()))?));
    Ok(out)
}

/// (run_time_ns, run_cnt) of one program (bpftool leaves both out while they are 0).
fn stats(id: u64) -> anyhow::Result<(u64, u64)> {
    let v = bpftool_json(&["prog", "show", "id", &id.to_string()], None)?;
    Ok((v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0)))
}

pub(super) fn snapshot(progs: &[(String, u64)]) -> anyhow::Result<Vec<(u64, u64)>> {
    progs.iter().map(|(_, id)| stats(*id)).collect()
}

/// Per-program rows of one measurement of `conns` connections: runs per connection, the
/// average run, the time per connection; and a `total` row.
fn rows(progs: &[(String, u64)], before: &[(u64, u64)], after: &[(u64, u64)], conns: u64) -> Vec<(String, Value, Value)> {
    let n = conns.max(1) as f64;
    let mut out = Vec::new();
    let (mut total_ns, mut total_runs) = (0u64, 0u64);
    for (i, (name, id)) in progs.iter().enumerate() {
        let ns = after[i].0.saturating_sub(before[i].0);
        let runs = after[i].1.saturating_sub(before[i].1);
        if runs == 0 {
            continue;
        }
        total_ns += ns;
        total_runs += runs;
        out.push((
            name.clone(),
            json!({"runs_per_conn": runs as f64 / n, "ns_per_run": ns as f64 / runs as f64, "ns_per_conn": ns as f64 / n}),
            json!({"prog_id": id, "run_cnt": runs, "run_time_ns": ns, "connections": conns}),
        ));
    }
    let per_run = if total_runs == 0 { Value::Null } else { json!(total_ns as f64 / total_runs as f64) };
    out.push((
        "total".into(),
        json!({"runs_per_conn": total_runs as f64 / n, "ns_per_run": per_run, "ns_per_conn": total_ns as f64 / n}),
        json!({"run_cnt": total_runs, "run_time_ns": total_ns, "connections": conns}),
    ));
    out
}

/// Connections per measurement.
fn connections(p: &Params) -> u64 {
    match p.profile {
        "full" => 3000,
        "quick" => 1000,
        _ => 50,
    }
}

pub fn kernel(sb: &mut Sandbox, p: &Params) -> anyhow::Result<Vec<Value>> {
    eprintln!("== scenario 7: kernel time per connection (bpf_stats)");
    let progs = programs(sb.pins.path())?;
    let mut node = node::NodeAttach::start().context("the node-like attach (host process case)")?;
    let node_progs = programs(node.pins.path())?;
    let n = connections(p);
    let _stats = BpfStats::enable()?;
    let mut runs = Vec::new();
    for round in 0..p.rounds {
        for Case { name: case, netns, target, mode } in cases() {
            set_mode(sb, mode).with_context(|| format!("configuring the sidecap pod for {mode:?}"))?;
            let empty = if case == "floor" {
                Some(empty::EmptyPrograms::attach(sb.pod("sc").cgroup().path()).context("attaching empty programs")?)
            } else {
                None
            };
            let progs = match (&empty, case == HOST) {
                (Some(e), _) => e.ids(),
                (None, true) => node_progs.clone(),
                (None, false) => progs.clone(),
            };
            let before = snapshot(&progs)?;
            let raw = if case == HOST {
                node.assert_running();
                sb.load_count_in(netns, &node.node, target, n)?
            } else {
                sb.load_count(netns, "sc", target, n)?
            };
            // The proxy closes its two sockets after the client's reset: let it finish.
            std::thread::sleep(Duration::from_millis(300));
            let after = snapshot(&progs)?;
            drop(empty);
            let done = raw["ok"].as_u64().unwrap_or(0) + raw["failed"].as_u64().unwrap_or(0);
            if raw["failed"].as_u64().unwrap_or(0) > 0 {
                bail!("{case}: {} of {done} connections failed: {}", raw["failed"], raw["errors"]);
            }
            for (prog, metrics, detail) in rows(&progs, &before, &after, done) {
                if prog == "total" {
                    eprintln!(
                        "  {case:<26} round {round}: {:>7.0} ns per connection in {:.1} runs ({done} connections)",
                        metrics["ns_per_conn"].as_f64().unwrap_or(f64::NAN),
                        metrics["runs_per_conn"].as_f64().unwrap_or(f64::NAN)
                    );
                }
                runs.push(json!({"case": case, "mode": prog, "round": round, "metrics": metrics, "raw": detail}));
            }
        }
    }
    set_mode(sb, PodMode::Plain).context("putting the sidecap pod back to its plain configuration")?;
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_per_connection_and_skip_idle_programs() {
        let progs = vec![("connect4".to_string(), 1), ("sockops".to_string(), 2), ("recvmsg4".to_string(), 3)];
        let before = [(1000, 10), (500, 5), (7, 1)];
        let after = [(3000, 20), (2500, 105), (7, 1)];
        let r = rows(&progs, &before, &after, 10);
        let names: Vec<&str> = r.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["connect4", "sockops", "total"]);
        assert_eq!(r[0].1["runs_per_conn"], 1.0);
        assert_eq!(r[0].1["ns_per_run"], 200.0);
        assert_eq!(r[1].1["ns_per_run"], 20.0);
        assert_eq!(r[2].1["ns_per_conn"], 400.0);
        assert_eq!(r[2].1["runs_per_conn"], 11.0);
    }
}
