//! Smoke test of `cargo xtask bench`: the whole machinery (sandbox, iptables rules from the
//! golden, the real agent, sc-forward and HAProxy, every data-path scenario and the control
//! plane, kernel time per connection) with tiny counts, on the debug binaries `cargo xtask test` builds. About 15 s.
//! The numbers are meaningless here; that every path carries traffic is what is checked.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn bin_dir() -> Option<PathBuf> {
    // target/<profile>/deps/bench_smoke-… → target/<profile>
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.to_path_buf();
    let needed = ["sidecap", "sc-load", "sc-forward", "examples/bench_controlplane"];
    needed.iter().all(|b| dir.join(b).is_file()).then_some(dir)
}

#[test]
fn bench_smoke_runs_every_scenario() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP bench smoke: needs root (netns, iptables, eBPF)");
        return;
    }
    let Some(bins) = bin_dir() else {
        eprintln!("SKIP bench smoke: sidecap, sc-load, sc-forward or bench_controlplane not built (run `cargo xtask test`)");
        return;
    };
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").expect("bpf_stats_enabled");
    let out = std::env::temp_dir().join(format!("sidecap-bench-smoke-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--smoke", "--bin-dir"])
        .arg(&bins)
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("xtask");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xtask bench --smoke took longer than 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("stdout"), &mut stdout).expect("read stdout");
    assert!(status.success(), "xtask bench --smoke failed ({status}); stdout:\n{stdout}");

    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("results.json is JSON");
    let _ = std::fs::remove_dir_all(&out);
    let sc = &r["scenarios"];
    for name in ["connect", "inbound", "passdrop", "rules"] {
        let runs = sc[name]["runs"].as_array().unwrap_or_else(|| panic!("no {name} runs: {r:#}"));
        assert!(!runs.is_empty(), "{name}");
        for run in runs {
            let raw = &run["raw"];
            assert!(raw["ok"].as_u64().unwrap_or(0) > 0, "{name}: a run carried nothing: {run}");
            assert_eq!(raw["failed"], 0, "{name}: failures: {run}");
        }
    }
    // sidecap's REGISTRY_ONLY drop fails the connect itself (EPERM); iptables' is a reset.
    let drops: Vec<&serde_json::Value> = sc["passdrop"]["runs"].as_array().into_iter().flatten().filter(|r| r["case"] == "drop").collect();
    let errs = |mode: &str| drops.iter().find(|r| r["mode"] == mode).map(|r| r["raw"]["errors"].to_string()).unwrap_or_default();
    assert!(errs("sidecap").contains("connect:1"), "{}", errs("sidecap"));
    assert!(errs("iptables").contains("recv:104") || errs("iptables").contains("eof:0"), "{}", errs("iptables"));
    let cp = &sc["controlplane"];
    assert!(cp["one_pod"]["converge_ms"]["median"].as_f64().is_some(), "{cp:#}");
    assert!(cp["agent"]["rss_kib"].as_u64().unwrap_or(0) > 0, "{cp:#}");
    let dm = &cp["default_mesh"][0];
    assert!(dm["service_ms"]["median"].as_f64().is_some(), "an added Service reached every pod: {cp:#}");
    assert_eq!(dm["rule_sets"], 1, "default-mesh pods share one rule set: {cp:#}");
    assert!(stdout.contains("sidecap/iptables"), "tables on stdout: {stdout}");
    // Kernel cost: every case measured some program time; the sysctl is back as it was.
    let kernel = sc["kernel"]["summary"].as_array().unwrap_or_else(|| panic!("no kernel summary: {r:#}"));
    for case in ["captured", "passthrough", "unmeshed", "floor"] {
        let total = kernel
            .iter()
            .find(|s| s["case"] == case && s["mode"] == "total")
            .unwrap_or_else(|| panic!("no {case} total: {kernel:?}"));
        assert!(total["metrics"]["ns_per_conn"]["median"].as_f64().unwrap_or(0.0) > 0.0, "{case}: {total}");
    }
    assert!(kernel.iter().any(|s| s["case"] == "captured" && s["mode"] == "getsockopt"), "the proxy's SO_ORIGINAL_DST ran: {kernel:?}");
    assert!(kernel.iter().any(|s| s["case"] == "floor" && s["mode"] == "empty sockops"), "{kernel:?}");
    let stats_after = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").expect("bpf_stats_enabled");
    assert_eq!(stats_before, stats_after, "kernel.bpf_stats_enabled restored");
}
