//! Control-plane measurements for `cargo xtask bench` (scenario 5), against a running agent.
//! Not a user tool.
//!
//!   bench_controlplane watch --bpffs PINS --netns COOKIE --toggle FILE --rounds N
//!       N times, replaces FILE (inside the agent's config dir) by FILE.a / FILE.b
//!       (alternately; those are not YAML, so not loaded) and measures until the pod's `PODS`
//!       entry shows a new generation (polled every 100 µs, 10 s at most per round).
//!   bench_controlplane service --config DIR --bpffs PINS --netns C1,C2,... --rounds N
//!       N times, adds a Service file to DIR and measures until every listed pod's rule set
//!       holds its listener (shared sets are looked up once per poll, 20 s at most a round).
//!   bench_controlplane wait --bpffs PINS --netns C1,C2,... --timeout-secs N
//!       waits until every listed pod has a `PODS` entry (read from the map, not through
//!       `sidecap inspect`, whose rendering of every pod's listeners would be measured too).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sidecap::datapath::Maps;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| -> Option<String> { args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned() };
    let need = |name: &str| get(name).unwrap_or_else(|| panic!("missing {name}"));
    let rounds: usize = get("--rounds").map(|v| v.parse().expect("--rounds")).unwrap_or(5).min(1000);
    match args.first().map(String::as_str) {
        Some("watch") => {
            watch(Path::new(&need("--bpffs")), need("--netns").parse().expect("--netns"), &PathBuf::from(need("--toggle")), rounds)
        }
        Some("service") => {
            let cookies: Vec<u64> = need("--netns").split(',').map(|c| c.parse().expect("--netns")).collect();
            service(Path::new(&need("--config")), Path::new(&need("--bpffs")), &cookies, rounds)
        }
        Some("wait") => {
            let cookies: Vec<u64> = need("--netns").split(',').map(|c| c.parse().expect("--netns")).collect();
            let secs: u64 = get("--timeout-secs").map(|v| v.parse().expect("--timeout-secs")).unwrap_or(900);
            wait(Path::new(&need("--bpffs")), &cookies, Duration::from_secs(secs))
        }
        _ => panic!("usage: bench_controlplane watch|service|wait ..."),
    }
}

fn wait(bpffs: &Path, cookies: &[u64], limit: Duration) {
    let t0 = Instant::now();
    let wanted: BTreeSet<u64> = cookies.iter().copied().collect();
    loop {
        // The maps are pinned by the agent once its programs are in place.
        if let Ok(maps) = Maps::open(bpffs) {
            let n = maps.pods().map(|p| p.iter().filter(|(c, _)| wanted.contains(c)).count()).unwrap_or(0);
            if n == wanted.len() {
                return;
            }
        }
        if t0.elapsed() > limit {
            eprintln!("pods not all in PODS after {limit:?}");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn swap(toggle: &Path, round: usize) {
    let variant = toggle.with_extension(if round.is_multiple_of(2) { "b" } else { "a" });
    let text = std::fs::read_to_string(&variant).unwrap_or_else(|e| panic!("{}: {e}", variant.display()));
    let tmp = toggle.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write variant");
    std::fs::rename(&tmp, toggle).expect("rename variant");
}

/// Adds a Service (a VIP and a TCP port no other service uses, so no wildcard listener can
/// answer for it) and waits until every pod in `cookies` has its listener.
fn service(config: &Path, bpffs: &Path, cookies: &[u64], rounds: usize) {
    let maps = Maps::open(bpffs).expect("open maps");
    let wanted: BTreeSet<u64> = cookies.iter().copied().collect();
    let policies = |maps: &Maps| -> (usize, BTreeSet<u32>) {
        let pods: Vec<_> = maps.pods().expect("PODS").into_iter().filter(|(n, _)| wanted.contains(n)).collect();
        (pods.len(), pods.iter().map(|(_, c)| c.policy).collect())
    };
    let mut samples = Vec::new();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(200));
        let port = 6000 + round as u16;
        let vip = std::net::Ipv4Addr::new(10, 251, 127, 1 + (round % 250) as u8);
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: bench-added-{round}\n  namespace: ns-000\nspec:\n  clusterIP: {vip}\n  ports:\n  - name: tcp-added\n    port: {port}\n    protocol: TCP\n"
        );
        let tmp = config.join(format!(".bench-added-{round}.tmp"));
        std::fs::write(&tmp, yaml).expect("write service");
        std::fs::rename(&tmp, config.join(format!("bench-added-{round}.yaml"))).expect("rename service");
        let t0 = Instant::now();
        let limit = t0 + Duration::from_secs(20);
        let addr = sidecap_common::addr::v4_mapped(vip.octets());
        loop {
            let (n, ids) = policies(&maps);
            if n == wanted.len() && ids.iter().all(|p| maps.listener(*p, port, addr).is_some()) {
                samples.push(format!("{:.3}", ms(t0.elapsed())));
                break;
            }
            if Instant::now() > limit {
                samples.push("null".into());
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    println!("{{\"converge_ms\":[{}],\"rule_sets\":{}}}", samples.join(","), policies(&maps).1.len());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
