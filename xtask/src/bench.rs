//! `cargo xtask bench [--quick]`: sidecap against istio-init's iptables and against no
//! capture at all, measured on this machine's kernel inside throwaway sandboxes.
//!
//! Every measurement runs as processes inside sandbox pods (tests/README.md): the load generator
//! (`sc-load`) in a pod's netns and cgroup as the app user, the proxy (`sc-forward`, or
//! HAProxy) as uid 1337, the upstream in the services netns. Three capture modes run side
//! by side in three identical pods of one topology, so a round measures A B C back to back
//! and rounds repeat (interleaved); the report gives medians and min–max over rounds.
//!
//!   direct    pod `direct`: nothing installed (the physical limit)
//!   iptables  pod `ipt`: istio-init's rules (cni-plugin/basic.txt.golden) + the
//!             exclusions, loaded with `ip netns exec <pod> iptables-restore`
//!   sidecap   pod `sc`: the real `sidecap agent` attached to the pod's own cgroup
//!             (`--allow-any capture`, i.e. everything in range is captured like istio-init)
//!
//! Scenarios: connect (outbound capture through a proxy), rules (exclusion scaling),
//! inbound, passthrough/drop, control plane, policy micro-benchmarks, kernel time per connection
//! (bpf_stats), keepalive (HAProxy HTTP mode to nginx, wrk). See docs/benchmarks.md.

mod cluster;
mod controlplane;
mod cpu;
mod keepalive;
mod kernel;
mod micro;
mod report;
mod sandbox;
mod scenarios;
mod stats;
mod svg;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Fewer rounds, shorter runs (under 2 minutes once built); writes only target/bench/.
    #[arg(long)]
    pub quick: bool,
    /// Tiny counts, no build, no criterion: proves the machinery (used by the smoke test).
    #[arg(long, hide = true)]
    pub smoke: bool,
    /// Use binaries from this directory instead of building (release) ones.
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where results.json, the report and plots go (default: <target>/bench).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also (re)write docs/benchmarks.md and docs/bench/*.svg (default for a full run).
    #[arg(long)]
    pub docs: bool,
    /// Run only these scenarios (connect, rules, inbound, passdrop, controlplane, micro, kernel, keepalive).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Measure nothing: render the report (and with --docs, docs/) from this results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub render: Option<PathBuf>,
}

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Params {
    pub profile: &'static str,
    pub rounds: usize,
    pub duration_ms: u64,
    pub warmup_ms: u64,
    pub concurrency: Vec<usize>,
    pub rule_sizes: Vec<usize>,
    pub haproxy: bool,
    /// Control plane: (pods, services) of each default-mesh run (no Sidecar); (pods, services)
    /// of the scoped run (namespace Sidecars). All through the real agent.
    pub cp_default: Vec<(usize, usize)>,
    pub cp_agent: (usize, usize),
    pub cp_rounds: usize,
    pub criterion: bool,
}

impl Params {
    fn full() -> Params {
        Params {
            profile: "full",
            rounds: 7,
            duration_ms: 800,
            warmup_ms: 100,
            concurrency: vec![1, 64],
            rule_sizes: vec![1, 100, 1000, 10_000],
            haproxy: true,
            cp_default: vec![(110, 10_000), (1000, 10_000)],
            cp_agent: (110, 10_000),
            cp_rounds: 5,
            criterion: true,
        }
    }
    fn quick() -> Params {
        Params {
            profile: "quick",
            rounds: 2,
            duration_ms: 200,
            warmup_ms: 40,
            cp_default: vec![(110, 2000)],
            cp_rounds: 1,
            ..Params::full()
        }
    }
    fn smoke() -> Params {
        Params {
            profile: "smoke",
            rounds: 1,
            duration_ms: 200,
            warmup_ms: 20,
            rule_sizes: vec![1, 100],
            cp_default: vec![(4, 200)],
            cp_agent: (4, 200),
            cp_rounds: 2,
            criterion: false,
            ..Params::full()
        }
    }
    fn json(&self) -> Value {
        json!({
            "profile": self.profile, "rounds": self.rounds, "duration_ms": self.duration_ms,
            "warmup_ms": self.warmup_ms, "concurrency": self.concurrency, "rule_sizes": self.rule_sizes,
            "cp_default": self.cp_default.iter().map(|(p, s)| json!({"pods": p, "services": s})).collect::<Vec<_>>(),
            "cp_agent": {"pods": self.cp_agent.0, "services": self.cp_agent.1},
        })
    }
}

/// The binaries a bench runs.
#[derive(Clone, Debug)]
pub struct Bins {
    pub sidecap: PathBuf,
    pub sc_load: PathBuf,
    pub sc_forward: PathBuf,
    pub controlplane: PathBuf,
}

impl Bins {
    fn in_dir(dir: &Path) -> Bins {
        Bins {
            sidecap: dir.join("sidecap"),
            sc_load: dir.join("sc-load"),
            sc_forward: dir.join("sc-forward"),
            controlplane: dir.join("examples/bench_controlplane"),
        }
    }
}

/// Cargo's target directory (respects CARGO_TARGET_DIR and config files).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let out = crate::cargo().args(["metadata", "--format-version", "1", "--no-deps"]).output().context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    Ok(PathBuf::from(v["target_directory"].as_str().context("no target_directory")?))
}

fn build_release(controlplane: bool) -> anyhow::Result<()> {
    let mut c = crate::cargo();
    c.args(["build", "--release", "-p", "sidecap", "-p", "sidecap-tests", "--bins"]);
    crate::status(c, "cargo build --release")?;
    if !controlplane {
        return Ok(());
    }
    let mut c = crate::cargo();
    c.args(["build", "--release", "-p", "sidecap", "--example", "bench_controlplane"]);
    crate::status(c, "cargo build --release --example bench_controlplane")?;
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.render {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let results: Value = serde_json::from_str(&text).context("results.json")?;
        let dir = path.parent().unwrap_or(Path::new("."));
        report::write_report(&results, dir, dir)?;
        if args.docs {
            let root = crate::workspace_root();
            report::write_report(&results, &root.join("docs"), &root.join("docs/bench"))?;
        }
        return Ok(());
    }
    if !crate::setup::is_root() {
        bail!("the bench creates network namespaces, loads iptables rules into them and attaches eBPF programs: run it as root");
    }
    let params = if args.smoke {
        Params::smoke()
    } else if args.quick {
        Params::quick()
    } else {
        Params::full()
    };
    let target = target_dir()?;
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let bins = match &args.bin_dir {
        Some(d) => Bins::in_dir(d),
        None => {
            let t = Instant::now();
            build_release(wanted("controlplane"))?;
            if params.criterion && wanted("micro") {
                micro::build()?;
            }
            eprintln!("xtask bench: built in {:.0} s", t.elapsed().as_secs_f64());
            Bins::in_dir(&target.join("release"))
        }
    };
    for b in [&bins.sidecap, &bins.sc_load, &bins.sc_forward, &bins.controlplane] {
        if *b == bins.controlplane && !wanted("controlplane") {
            continue;
        }
        if !b.is_file() {
            bail!("{} is missing (build it, or pass --bin-dir)", b.display());
        }
    }
    let out = args.out.clone().unwrap_or_else(|| target.join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let started = Instant::now();
    let mut results = json!({
        "command": command_line(&args),
        "params": params.json(),
        "machine": machine_info(),
        "scenarios": {},
    });
    let save = |results: &Value| -> anyhow::Result<()> {
        let path = out.join("results.json");
        std::fs::write(&path, serde_json::to_string_pretty(results)?).with_context(|| format!("writing {}", path.display()))
    };

    let network = ["connect", "rules", "inbound", "passdrop", "controlplane", "kernel", "keepalive"].iter().any(|s| wanted(s));
    if network {
        let t = Instant::now();
        let sockmap = wanted("keepalive") && params.profile != "smoke";
        let sb = sandbox::Sandbox::start(&bins, &params, sockmap).context("building the bench sandbox")?;
        eprintln!("xtask bench: sandbox up in {:.1} s", t.elapsed().as_secs_f64());
        let mut sb = sb;
        for (name, f) in [
            ("connect", scenarios::connect as scenarios::Scenario),
            ("inbound", scenarios::inbound),
            ("passdrop", scenarios::passdrop),
            ("rules", scenarios::rules),
            ("kernel", kernel::kernel),
            ("keepalive", keepalive::keepalive),
        ] {
            if !wanted(name) {
                continue;
            }
            // nginx and wrk are not part of the smoke test's machinery.
            if name == "keepalive" && params.profile == "smoke" {
                continue;
            }
            let t = Instant::now();
            let runs = f(&mut sb, &params)?;
            let s = stats::summarize(&runs);
            let value = json!({
                "seconds": t.elapsed().as_secs_f64(), "runs": runs, "summary": s,
                "sidecap_counters": sb.counters(),
            });
            println!("{}", report::table_for(name, &value));
            results["scenarios"][name] = value;
            save(&results)?;
        }
        if wanted("controlplane") {
            let t = Instant::now();
            let mut cp = controlplane::run(&mut sb, &bins, &params)?;
            cp["seconds"] = json!(t.elapsed().as_secs_f64());
            println!("{}", report::table_for("controlplane", &cp));
            results["scenarios"]["controlplane"] = cp;
            save(&results)?;
        }
        drop(sb);
    }
    if wanted("micro") && params.criterion {
        let t = Instant::now();
        let mut m = micro::run(&params, &target)?;
        m["seconds"] = json!(t.elapsed().as_secs_f64());
        println!("{}", report::table_for("micro", &m));
        results["scenarios"]["micro"] = m;
    }
    results["seconds"] = json!(started.elapsed().as_secs_f64());
    results["machine"]["load_after"] = json!(loadavg());
    save(&results)?;
    report::write_report(&results, &out, &out).context("writing the report")?;
    eprintln!("xtask bench: {} s; results in {}", started.elapsed().as_secs(), out.join("results.json").display());
    if args.docs || !(args.quick || args.smoke) {
        let root = crate::workspace_root();
        report::write_report(&results, &root.join("docs"), &root.join("docs/bench")).context("writing docs")?;
        std::fs::write(root.join("docs/bench/results.json"), serde_json::to_string_pretty(&results)?)?;
        eprintln!("xtask bench: wrote docs/benchmarks.md and docs/bench/*.svg");
    }
    Ok(())
}

fn command_line(args: &BenchArgs) -> String {
    let mut c = "cargo xtask bench".to_string();
    if args.quick {
        c.push_str(" --quick");
    }
    if args.smoke {
        c.push_str(" --smoke");
    }
    if !args.only.is_empty() {
        c.push_str(&format!(" --only {}", args.only.join(",")));
    }
    c
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory": mem,
        "kernel": first_line("uname", &["-r"]),
        "iptables": first_line("iptables", &["-V"]),
        "haproxy": first_line("haproxy", &["-v"]),
        "rustc": first_line("rustc", &["-V"]),
        "commit": std::env::var("SIDECAP_BENCH_COMMIT").unwrap_or_else(|_| {
            let root = crate::workspace_root();
            first_line("git", &["-C", &root.display().to_string(), "describe", "--always", "--dirty"])
        }),
        "load_before": loadavg(),
    })
}
