//! Control-plane measurements for `cargo xtask bench` (scenario 5). Not a user tool.
//!
//!   bench_controlplane sync --config DIR --bpffs PINS --cgroup CG --toggle FILE --rounds N
//!       Loads the cluster in DIR, installs the datapath (attached to the test cgroup CG,
//!       pinned under PINS), writes every meshed pod's generation under a fake netns
//!       cookie (1,000 pods need no 1,000 namespaces), then N times: replaces FILE (inside
//!       DIR) by FILE.a / FILE.b (alternately; those are not YAML, so not loaded), gets the
//!       new snapshot from the agent's own directory source (inotify, per-file cache) and
//!       does what the agent's sync pass does — evaluate every pod, compile, compare, write
//!       the changed ones. Prints one JSON object with the times.
//!   bench_controlplane watch --bpffs PINS --netns COOKIE --toggle FILE --rounds N
//!       For a running agent: N times, swaps FILE like `sync` and measures until the pod's
//!       `PODS` entry shows a new generation (polled every 100 µs, 10 s at most per round).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sidecap::datapath::{self, Maps};
use sidecap::source::{Source, dir::DirSource};
use sidecap_policy::{Cluster, EngineOptions, Generation, PodRef};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| -> Option<String> {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
    };
    let need = |name: &str| get(name).unwrap_or_else(|| panic!("missing {name}"));
    let rounds: usize = get("--rounds").map(|v| v.parse().expect("--rounds")).unwrap_or(5).min(1000);
    let toggle = PathBuf::from(need("--toggle"));
    match args.first().map(String::as_str) {
        Some("sync") => sync(Path::new(&need("--config")), Path::new(&need("--bpffs")), Path::new(&need("--cgroup")), &toggle, rounds),
        Some("watch") => watch(Path::new(&need("--bpffs")), need("--netns").parse().expect("--netns"), &toggle, rounds),
        _ => panic!("usage: bench_controlplane sync|watch ..."),
    }
}

fn swap(toggle: &Path, round: usize) {
    let variant = toggle.with_extension(if round.is_multiple_of(2) { "b" } else { "a" });
    let text = std::fs::read_to_string(&variant).unwrap_or_else(|e| panic!("{}: {e}", variant.display()));
    let tmp = toggle.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write variant");
    std::fs::rename(&tmp, toggle).expect("rename variant");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Managed {
    generation: Generation,
}

fn sync(config: &Path, bpffs: &Path, cgroup: &Path, toggle: &Path, rounds: usize) {
    let opts = EngineOptions::default();
    let t = Instant::now();
    let mut source = DirSource::new(config);
    let cluster = next_snapshot(&mut source);
    let load_ms = ms(t.elapsed());
    let pods: Vec<PodRef> = cluster.meshed_pods();
    let services = cluster.services.len();
    datapath::install(bpffs, cgroup).expect("install datapath");
    let mut maps = Maps::open(bpffs).expect("open maps");
    let cookie_of: BTreeMap<String, u64> =
        pods.iter().enumerate().map(|(i, p)| (p.to_string(), 1_000_000 + i as u64)).collect();
    let mut managed: BTreeMap<u64, Managed> = BTreeMap::new();
    let mut next_policy = 1u32;
    let mut entries = 0usize;
    let t = Instant::now();
    // As the agent's sync pass: one service registry per pass, shared by every pod.
    let registry = sidecap_policy::registry::build(&cluster);
    for p in &pods {
        let policy = sidecap_policy::evaluate_in(&cluster, &registry, p, &opts).expect("evaluate");
        let g = sidecap_policy::compile(&policy, next_policy, 1);
        next_policy += 1;
        entries += g.listeners.len() + g.out_cidrs.len() + g.out_ports.len() + g.in_ports.len();
        let cookie = cookie_of[&p.to_string()];
        maps.write(cookie, &g, None).expect("write");
        managed.insert(cookie, Managed { generation: g });
    }
    let initial_ms = ms(t.elapsed());

    let mut samples = Vec::new();
    for round in 0..rounds {
        swap(toggle, round);
        let t0 = Instant::now();
        let cluster = next_snapshot(&mut source);
        let t1 = Instant::now();
        let mut changed = 0;
        let mut eval = Duration::ZERO;
        let registry = sidecap_policy::registry::build(&cluster);
        for p in cluster.meshed_pods() {
            let cookie = cookie_of[&p.to_string()];
            let te = Instant::now();
            let policy = sidecap_policy::evaluate_in(&cluster, &registry, &p, &opts).expect("evaluate");
            let m = managed.get(&cookie).expect("managed pod");
            let same = sidecap_policy::compile(&policy, m.generation.pod.policy, m.generation.pod.generation);
            eval += te.elapsed();
            if same == m.generation {
                continue;
            }
            let g = sidecap_policy::compile(&policy, next_policy, m.generation.pod.generation + 1);
            next_policy += 1;
            maps.write(cookie, &g, Some(&m.generation)).expect("write");
            managed.insert(cookie, Managed { generation: g });
            changed += 1;
        }
        let t2 = Instant::now();
        samples.push(format!(
            "{{\"reload_ms\":{:.3},\"sync_ms\":{:.3},\"evaluate_ms\":{:.3},\"total_ms\":{:.3},\"pods_changed\":{changed}}}",
            ms(t1 - t0),
            ms(t2 - t1),
            ms(eval),
            ms(t2 - t0)
        ));
    }
    println!(
        "{{\"pods\":{},\"services\":{services},\"load_ms\":{load_ms:.3},\"initial_sync_ms\":{initial_ms:.3},\"map_entries\":{entries},\"rss_kib\":{},\"rounds\":[{}]}}",
        pods.len(),
        rss_kib(),
        samples.join(",")
    );
}

/// The directory source's next snapshot (bounded: 30 s).
fn next_snapshot(source: &mut DirSource) -> Cluster {
    let limit = Instant::now() + Duration::from_secs(30);
    while Instant::now() < limit {
        match source.next(Duration::from_millis(500)) {
            Some(Ok(c)) => return c,
            Some(Err(e)) => panic!("configuration rejected: {e}"),
            None => {}
        }
    }
    panic!("no snapshot from the directory source within 30 s");
}

fn watch(bpffs: &Path, netns: u64, toggle: &Path, rounds: usize) {
    let maps = Maps::open(bpffs).expect("open maps");
    let generation = |m: &Maps| m.pod(netns).map(|c| c.generation).unwrap_or(0);
    let mut samples = Vec::new();
    for round in 0..rounds {
        let before = generation(&maps);
        // Let the agent settle between rounds (it may resync on its own timer).
        std::thread::sleep(Duration::from_millis(50));
        swap(toggle, round);
        let t0 = Instant::now();
        let limit = t0 + Duration::from_secs(10);
        loop {
            if generation(&maps) > before {
                samples.push(format!("{:.3}", ms(t0.elapsed())));
                break;
            }
            if Instant::now() > limit {
                samples.push("null".into());
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    println!("{{\"converge_ms\":[{}]}}", samples.join(","));
}
