//! Scenario 6, policy engine micro-benchmarks: criterion (`policy/benches/policy.rs`) on a cluster of
//! 10,000 services; the medians are read back from criterion's estimates.json files.

use std::{path::Path, time::SystemTime};

use serde_json::{Value, json};

use super::Params;

pub fn build() -> anyhow::Result<()> {
    let mut c = crate::cargo();
    c.args(["bench", "-p", "sidecap-policy", "--bench", "policy", "--no-run"]);
    crate::status(c, "cargo bench --no-run")
}

pub fn run(p: &Params, target: &Path) -> anyhow::Result<Value> {
    eprintln!("== scenario 6: policy engine micro-benchmarks (criterion)");
    let started = SystemTime::now();
    let (warm, measure, samples) = if p.profile == "full" { ("1", "3", "30") } else { ("0.3", "0.7", "10") };
    let mut c = crate::cargo();
    c.args(["bench", "-p", "sidecap-policy", "--bench", "policy", "--", "--warm-up-time", warm, "--measurement-time", measure]);
    c.args(["--sample-size", samples, "--noplot"]);
    crate::status(c, "cargo bench (criterion)")?;
    let mut benches = Vec::new();
    collect(&target.join("criterion"), started, &mut benches, 0);
    benches.sort_by(|a: &Value, b: &Value| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(json!({"benches": benches, "warm_up_s": warm, "measurement_s": measure, "samples": samples}))
}

fn collect(dir: &Path, since: SystemTime, out: &mut Vec<Value>, depth: usize) {
    if depth > 6 {
        return;
    }
    let est = dir.join("new/estimates.json");
    let meta = dir.join("new/benchmark.json");
    if est.is_file() && meta.is_file() {
        let fresh = std::fs::metadata(&est).and_then(|m| m.modified()).map(|t| t >= since).unwrap_or(false);
        let read = |p: &Path| -> Value { std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null) };
        let (e, m) = (read(&est), read(&meta));
        if fresh && m["full_id"].is_string() {
            out.push(json!({
                "id": m["full_id"],
                "median_ns": e["median"]["point_estimate"],
                "low_ns": e["median"]["confidence_interval"]["lower_bound"],
                "high_ns": e["median"]["confidence_interval"]["upper_bound"],
            }));
        }
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) && entry.file_name() != "report" {
            collect(&entry.path(), since, out, depth + 1);
        }
    }
}
