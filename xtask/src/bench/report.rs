//! Tables (stdout and markdown), plots and `benchmarks.md`, all from results.json.

use std::{fmt::Write as _, path::Path};

use serde_json::Value;

use super::stats::med;
use super::svg::{self, Series};

const MODES: [&str; 3] = ["direct", "iptables", "sidecap"];

/// `median (min–max)` with a precision that suits the magnitude.
pub fn cell(spread: &Value) -> String {
    let Some(m) = spread["median"].as_f64() else { return "–".into() };
    let (lo, hi) = (spread["min"].as_f64().unwrap_or(m), spread["max"].as_f64().unwrap_or(m));
    if spread["n"].as_u64().unwrap_or(1) <= 1 || (hi - lo).abs() < f64::EPSILON {
        return num(m);
    }
    format!("{} ({}–{})", num(m), num(lo), num(hi))
}

pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn cases(summary: &Value) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for s in summary.as_array().into_iter().flatten() {
        let c = s["case"].as_str().unwrap_or("").to_string();
        if !v.contains(&c) {
            v.push(c);
        }
    }
    v
}

fn table(summary: &Value, metrics: &[(&str, &str)]) -> String {
    let mut t = String::from("| case | mode |");
    for (_, label) in metrics {
        let _ = write!(t, " {label} |");
    }
    t.push_str("\n|---|---|");
    t.push_str(&"---:|".repeat(metrics.len()));
    t.push('\n');
    for s in summary.as_array().into_iter().flatten() {
        let _ = write!(t, "| {} | {} |", s["case"].as_str().unwrap_or(""), s["mode"].as_str().unwrap_or(""));
        for (k, _) in metrics {
            let _ = write!(t, " {} |", cell(&s["metrics"][*k]));
        }
        t.push('\n');
    }
    t
}

fn ratios(summary: &Value, metrics: &[(&str, &str)]) -> String {
    let mut t = String::from("| case |");
    for (_, label) in metrics {
        let _ = write!(t, " {label}: sidecap/iptables | {label}: sidecap/direct |");
    }
    t.push_str("\n|---|");
    t.push_str(&"---:|".repeat(2 * metrics.len()));
    t.push('\n');
    for c in cases(summary) {
        let _ = write!(t, "| {c} |");
        for (k, _) in metrics {
            let sc = med(summary, &c, "sidecap", k);
            let _ = write!(t, " {} | {} |", ratio(sc, med(summary, &c, "iptables", k)), ratio(sc, med(summary, &c, "direct", k)));
        }
        t.push('\n');
    }
    t
}

const CONNECT_METRICS: [(&str, &str); 7] = [
    ("rate", "conn/s"),
    ("ttfb_p50_us", "first byte p50 µs"),
    ("ttfb_p99_us", "p99 µs"),
    ("ttfb_p999_us", "p99.9 µs"),
    ("connect_p50_us", "connect() p50 µs"),
    ("busy_cpus", "busy CPUs"),
    ("cpu_us_per_conn", "CPU µs/conn (machine)"),
];
const CONNECT_RATIOS: [(&str, &str); 2] = [("rate", "conn/s"), ("ttfb_p50_us", "first byte p50")];
const RULE_METRICS: [(&str, &str); 4] = [
    ("connect_p50_us", "connect() p50 µs"),
    ("connect_p99_us", "connect() p99 µs"),
    ("ttfb_p50_us", "first byte p50 µs"),
    ("rate", "conn/s (c=1)"),
];
const PASSDROP_METRICS: [(&str, &str); 4] = [
    ("connect_p50_us", "connect() p50 µs"),
    ("connect_p99_us", "connect() p99 µs"),
    ("ttfb_p50_us", "first byte / failure p50 µs"),
    ("ttfb_p99_us", "first byte / failure p99 µs"),
];

/// The markdown table(s) of one scenario.
pub fn table_for(name: &str, v: &Value) -> String {
    let s = &v["summary"];
    match name {
        "connect" | "inbound" => format!("{}\n{}", table(s, &CONNECT_METRICS), ratios(s, &CONNECT_RATIOS)),
        "rules" => format!("{}\n{}", table(s, &RULE_METRICS), ratios(s, &[("connect_p50_us", "connect() p50")])),
        "passdrop" => format!(
            "{}\n{}",
            table(s, &PASSDROP_METRICS),
            ratios(s, &[("connect_p50_us", "connect() p50"), ("ttfb_p50_us", "first byte / failure p50")])
        ),
        "controlplane" => controlplane_table(v),
        "micro" => micro_table(v),
        "kernel" => format!("{}\n{}", kernel_table(s), kernel_breakdown(s)),
        "keepalive" => format!("{}\n{}\n{}", table(s, &KEEPALIVE_METRICS), ratios(s, &KEEPALIVE_RATIOS), sockmap_ratios(s)),
        _ => String::new(),
    }
}

const KEEPALIVE_METRICS: [(&str, &str); 6] = [
    ("rps", "req/s"),
    ("p50_us", "p50 µs"),
    ("p99_us", "p99 µs"),
    ("cpu_us_per_req", "CPU µs/req (machine)"),
    ("proxy_cpu_us_per_req", "CPU µs/req (proxy)"),
    ("program_runs_per_1k_req", "sidecap program runs per 1,000 req"),
];
const KEEPALIVE_RATIOS: [(&str, &str); 3] = [("rps", "req/s"), ("p50_us", "p50 µs"), ("p99_us", "p99 µs")];

/// Keepalive: sidecap with `--sockmap` against plain sidecap (issue 16's target: ≥ 1.3× req/s
/// at 4 KiB and 64 connections, p99 no worse).
fn sockmap_ratios(summary: &Value) -> String {
    let mut t = String::from(
        "| case | req/s: sockmap/sidecap | p99: sockmap/sidecap | CPU/req (machine): sockmap/sidecap |\n|---|---:|---:|---:|\n",
    );
    for c in cases(summary) {
        let r = |k: &str| ratio(med(summary, &c, "sidecap+sockmap", k), med(summary, &c, "sidecap", k));
        let _ = writeln!(t, "| {c} | {} | {} | {} |", r("rps"), r("p99_us"), r("cpu_us_per_req"));
    }
    t
}

const KERNEL_METRICS: [(&str, &str); 3] =
    [("runs_per_conn", "runs per connection"), ("ns_per_run", "ns per run"), ("ns_per_conn", "ns per connection")];

/// Kernel cost: one row per (case, program), programs that did not run left out.
fn kernel_table(summary: &Value) -> String {
    let mut t = String::from("| case | program |");
    for (_, label) in KERNEL_METRICS {
        let _ = write!(t, " {label} |");
    }
    t.push_str("\n|---|---|");
    t.push_str(&"---:|".repeat(KERNEL_METRICS.len()));
    t.push('\n');
    for s in summary.as_array().into_iter().flatten() {
        let prog = s["mode"].as_str().unwrap_or("");
        let bold = |x: String| if prog == "total" { format!("**{x}**") } else { x };
        let _ = write!(t, "| {} | {} |", s["case"].as_str().unwrap_or(""), bold(prog.to_string()));
        for (k, _) in KERNEL_METRICS {
            let _ = write!(t, " {} |", bold(cell(&s["metrics"][k])));
        }
        t.push('\n');
    }
    t
}

/// Where the captured connection's kernel time goes: per program, what merely running a
/// program on that hook costs (the floor's empty program, per run, times sidecap's runs)
/// and what is left for sidecap's own work.
fn kernel_breakdown(summary: &Value) -> String {
    let g = |case: &str, prog: &str, k: &str| med(summary, case, prog, k);
    let Some(total) = g("captured", "total", "ns_per_conn") else { return String::new() };
    let mut t = format!(
        "Where the captured connection's {} ns go (per connection; *floor* is the empty program's run time on that hook times sidecap's runs there, what any program costs before doing anything):\n\n| program | runs | sidecap | floor | sidecap's own work |\n|---|---:|---:|---:|---:|\n",
        num(total)
    );
    let (mut floor_sum, mut own_sum) = (0.0, 0.0);
    for s in summary.as_array().into_iter().flatten().filter(|s| s["case"] == "captured" && s["mode"] != "total") {
        let prog = s["mode"].as_str().unwrap_or("");
        let (Some(runs), Some(ns)) = (g("captured", prog, "runs_per_conn"), g("captured", prog, "ns_per_conn")) else { continue };
        match g("floor", &format!("empty {prog}"), "ns_per_run") {
            Some(per_run) => {
                let floor = per_run * runs;
                floor_sum += floor;
                own_sum += ns - floor;
                let _ = writeln!(t, "| {prog} | {} | {} | {} | {} |", num(runs), num(ns), num(floor), num(ns - floor));
            }
            None => {
                own_sum += ns;
                let _ = writeln!(t, "| {prog} | {} | {} | not measured | ≤ {} |", num(runs), num(ns), num(ns));
            }
        }
    }
    let _ = writeln!(
        t,
        "| **total** | | **{}** | **{}** ({:.0}%) | **{}** |",
        num(total),
        num(floor_sum),
        100.0 * floor_sum / total,
        num(own_sum)
    );
    t.push_str(
        "\nsidecap's own work is its map accesses on the captured path: the pod's `PODS` entry and the outbound decision in connect4 \
         (twice: the app's connect and the proxy's upstream one), the original destination's hand-over in sockops (the `CONNECTING` \
         slot, then the `ESTABLISHED` slot claimed at the app's handshake and released at the proxy's close) and getsockopt's read of it. \
         Each costs mostly its first touch of memory shared by the whole node, not its instructions; \
         [docs/kernel-contract.md](kernel-contract.md#original-destination) has the per-access measurements and the alternatives measured.\n",
    );
    t
}

/// Short connections, one scenario 1 case: CPU per connection in each mode, the machine's
/// and the proxy process's, against sidecap's programs' kernel time.
struct Budget {
    case: String,
    /// The machine's CPU µs per connection: direct, iptables, sidecap.
    machine: [Option<f64>; 3],
    /// The proxy process's CPU µs per connection: iptables, sidecap.
    proxy: [Option<f64>; 2],
    /// Busy CPUs on average: iptables, sidecap.
    busy: [Option<f64>; 2],
    /// Scenario 7's kernel time per captured connection, µs.
    programs: Option<f64>,
    /// conn/s, sidecap over iptables.
    ratio: Option<f64>,
}

fn budgets(r: &Value) -> Vec<Budget> {
    let sc = &r["scenarios"];
    let Some(s) = sc.get("connect").map(|v| &v["summary"]) else { return Vec::new() };
    let programs = sc.get("kernel").and_then(|k| med(&k["summary"], "captured", "total", "ns_per_conn")).map(|ns| ns / 1000.0);
    let mut out = Vec::new();
    for case in cases(s) {
        let g = |mode: &str, k: &str| med(s, &case, mode, k);
        if g("sidecap", "cpu_us_per_conn").is_none() {
            continue;
        }
        let ratio = g("sidecap", "rate").zip(g("iptables", "rate")).filter(|(_, i)| *i > 0.0).map(|(a, b)| a / b);
        out.push(Budget {
            machine: ["direct", "iptables", "sidecap"].map(|m| g(m, "cpu_us_per_conn")),
            proxy: ["iptables", "sidecap"].map(|m| g(m, "proxy_cpu_us_per_conn")),
            busy: ["iptables", "sidecap"].map(|m| g(m, "busy_cpus")),
            programs,
            ratio,
            case,
        });
    }
    out
}

/// Scenario 1's "where the difference goes" table.
fn short_connection_budget(r: &Value) -> Option<String> {
    let rows = budgets(r);
    if rows.is_empty() {
        return None;
    }
    let cores = r["machine"]["cores"].as_u64().map(|c| c.to_string()).unwrap_or_else(|| "all".into());
    let mut t = format!(
        "Where the time goes: CPU per connection, the whole machine's (busy CPUs over the run ÷ conn/s: client, proxy, upstream, softirqs) and the proxy process's own (its threads, and the kernel work done in its context), against *sidecap's programs*, scenario 7's kernel time per captured connection (sc-forward, one connection at a time). *busy CPUs* is of the machine's {cores}: where they are not all busy, the rate is bound by the proxy and the wake-ups between client, proxy and upstream rather than by CPU, and making sidecap's programs cheaper could move it by at most their share of the proxy's time.\n\n\
         | case | machine CPU µs/conn: direct | iptables | sidecap | iptables − sidecap | proxy CPU µs/conn: iptables | sidecap | sidecap's programs | busy CPUs: iptables | sidecap | conn/s: sidecap/iptables |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let f = |v: Option<f64>| v.map(num).unwrap_or_else(|| "–".into());
    let x = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
    for b in rows {
        let [direct, ipt, sdc] = b.machine;
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            b.case,
            f(direct),
            f(ipt),
            f(sdc),
            f(ipt.zip(sdc).map(|(i, s)| i - s)),
            f(b.proxy[0]),
            f(b.proxy[1]),
            f(b.programs),
            x(b.busy[0]),
            x(b.busy[1]),
            x(b.ratio)
        );
    }
    Some(t)
}

fn ms(v: &Value) -> String {
    format!("{} ms", cell(v))
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn controlplane_table(v: &Value) -> String {
    let mut t = String::from("| measurement | value (median, min–max) |\n|---|---:|\n");
    let one = &v["one_pod"];
    let a = &v["agent"];
    let row = |t: &mut String, k: &str, val: String| {
        let _ = writeln!(t, "| {k} | {val} |");
    };
    row(&mut t, "Sidecar change → maps, 1 pod (real agent, inotify)", ms(&one["converge_ms"]));
    let (ap, asv) = (a["pods"].as_u64().unwrap_or(0), a["services"].as_u64().unwrap_or(0));
    row(&mut t, &format!("Sidecar change → maps, {ap} pods × {asv} services (real agent)"), ms(&a["converge_ms"]));
    row(&mut t, &format!("agent start → all {ap} pods in the maps"), format!("{:.0} ms", a["initial_ms"].as_f64().unwrap_or(f64::NAN)));
    row(
        &mut t,
        &format!("agent RSS, {ap} pods × {asv} services (VmRSS / VmHWM)"),
        format!(
            "{:.1} MiB / {:.1} MiB",
            a["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            a["hwm_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
        ),
    );
    row(&mut t, &format!("kernel map memory (memlock), {ap} pods"), mib(a["map_memory"]["total_bytes"].as_f64().unwrap_or(f64::NAN)));
    for d in v["default_mesh"].as_array().into_iter().flatten() {
        let (dp, ds) = (d["pods"].as_u64().unwrap_or(0), d["services"].as_u64().unwrap_or(0));
        row(
            &mut t,
            &format!("default mesh {dp} pods × {ds} services: agent start → all pods in the maps"),
            format!("{:.0} ms", d["initial_ms"].as_f64().unwrap_or(f64::NAN)),
        );
        row(&mut t, &format!("default mesh {dp} × {ds}: one added Service → every pod's maps"), ms(&d["service_ms"]));
        row(
            &mut t,
            &format!("default mesh {dp} × {ds}: agent RSS (VmRSS / VmHWM)"),
            format!(
                "{:.1} MiB / {:.1} MiB",
                d["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                d["hwm_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0
            ),
        );
        row(
            &mut t,
            &format!("default mesh {dp} × {ds}: kernel map memory (memlock) / rule sets"),
            format!("{} / {}", mib(d["map_memory"]["total_bytes"].as_f64().unwrap_or(f64::NAN)), d["rule_sets"]),
        );
    }
    t
}

fn micro_table(v: &Value) -> String {
    let mut t = String::from("| benchmark | median | 95% CI of the median |\n|---|---:|---:|\n");
    let time = |ns: f64| {
        if ns >= 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{:.2} µs", ns / 1e3)
        } else {
            format!("{ns:.0} ns")
        }
    };
    for b in v["benches"].as_array().into_iter().flatten() {
        let _ = writeln!(
            t,
            "| {} | {} | {} – {} |",
            b["id"].as_str().unwrap_or(""),
            time(b["median_ns"].as_f64().unwrap_or(f64::NAN)),
            time(b["low_ns"].as_f64().unwrap_or(f64::NAN)),
            time(b["high_ns"].as_f64().unwrap_or(f64::NAN))
        );
    }
    t
}

fn point(summary: &Value, case: &str, mode: &str, metric: &str) -> svg::Point {
    let s = summary.as_array()?.iter().find(|s| s["case"] == case && s["mode"] == mode)?;
    let m = &s["metrics"][metric];
    Some((m["median"].as_f64()?, m["min"].as_f64()?, m["max"].as_f64()?))
}

fn mode_bars(summary: &Value, metric: &str, title: &str, y: &str) -> String {
    let groups = cases(summary);
    let series: Vec<Series> = MODES
        .iter()
        .enumerate()
        .map(|(i, m)| Series::new(*m, groups.iter().map(|c| point(summary, c, m, metric)).collect(), i))
        .collect();
    svg::bars(title, y, &groups, &series)
}

/// The plots, as (file name, SVG).
pub fn plots(results: &Value) -> Vec<(String, String)> {
    let sc = &results["scenarios"];
    let mut out = Vec::new();
    if let Some(s) = sc.get("connect").map(|v| &v["summary"]) {
        out.push((
            "connect-rate.svg".into(),
            mode_bars(s, "rate", "Outbound capture: connections per second (higher is better)", "connections/s"),
        ));
        out.push((
            "connect-latency.svg".into(),
            mode_bars(s, "ttfb_p50_us", "Outbound capture: connect → first byte, p50 (lower is better)", "µs"),
        ));
    }
    if let Some(s) = sc.get("inbound").map(|v| &v["summary"]) {
        out.push(("inbound-rate.svg".into(), mode_bars(s, "rate", "Inbound capture to 15006: connections per second", "connections/s")));
    }
    if let Some(s) = sc.get("passdrop").map(|v| &v["summary"]) {
        out.push(("passdrop.svg".into(), mode_bars(s, "ttfb_p50_us", "Passthrough (first byte) and drop (time to failure), p50", "µs")));
    }
    if let Some(s) = sc.get("rules").map(|v| &v["summary"]) {
        let sizes: Vec<f64> = results["params"]["rule_sizes"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
        let mut series = Vec::new();
        for kind in ["captured", "passthrough"] {
            for (i, m) in MODES.iter().enumerate() {
                let mut line = Series::new(
                    format!("{m} {kind}"),
                    sizes.iter().map(|n| point(s, &format!("N={n} {kind}"), m, "connect_p50_us")).collect(),
                    i,
                );
                line.dashed = kind == "passthrough";
                series.push(line);
            }
        }
        out.push(("rules.svg".into(), svg::lines("connect() p50 vs excluded CIDRs + ports (N each)", "µs", &sizes, &series)));
    }
    out
}

/// Writes `benchmarks.md` into `md_dir` and the plots into `svg_dir`.
pub fn write_report(results: &Value, md_dir: &Path, svg_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(md_dir)?;
    std::fs::create_dir_all(svg_dir)?;
    let rel = svg_dir.strip_prefix(md_dir).map(|p| p.to_path_buf()).unwrap_or_else(|_| svg_dir.to_path_buf());
    let img = |name: &str| {
        let p = rel.join(name);
        format!("![{name}]({})\n", p.display())
    };
    for (name, text) in plots(results) {
        std::fs::write(svg_dir.join(&name), text)?;
    }
    std::fs::write(md_dir.join("benchmarks.md"), markdown(results, &img))?;
    Ok(())
}

/// The headline numbers, as sentences over this run's medians.
pub fn headlines(r: &Value) -> String {
    let sc = &r["scenarios"];
    let mut h = String::from("## Headlines (medians of this run)\n\n");
    let f = |v: Option<f64>| v.map(num).unwrap_or_else(|| "–".into());
    let x = |a: Option<f64>, b: Option<f64>| ratio(a, b);
    if let Some(s) = sc.get("connect").map(|v| &v["summary"]) {
        for case in cases(s) {
            let g = |mode: &str, k: &str| med(s, &case, mode, k);
            let _ = writeln!(
                h,
                "- **Outbound, {case}**: sidecap {} conn/s vs iptables {} (×{}), first byte p50 {} vs {} µs (×{}); direct, without any proxy: {} conn/s, {} µs.",
                f(g("sidecap", "rate")),
                f(g("iptables", "rate")),
                x(g("sidecap", "rate"), g("iptables", "rate")),
                f(g("sidecap", "ttfb_p50_us")),
                f(g("iptables", "ttfb_p50_us")),
                x(g("sidecap", "ttfb_p50_us"), g("iptables", "ttfb_p50_us")),
                f(g("direct", "rate")),
                f(g("direct", "ttfb_p50_us"))
            );
        }
    }
    if let Some(s) = sc.get("rules").map(|v| &v["summary"]) {
        let sizes: Vec<u64> = r["params"]["rule_sizes"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
        if let (Some(lo), Some(hi)) = (sizes.first(), sizes.last()) {
            for kind in ["captured", "passthrough"] {
                let g = |n: u64, mode: &str| med(s, &format!("N={n} {kind}"), mode, "connect_p50_us");
                let _ = writeln!(
                    h,
                    "- **Rule scaling, {kind}**: connect() p50 with {lo} → {hi} exclusions: iptables {} → {} µs (×{}), sidecap {} → {} µs (×{}); at {hi}, sidecap/iptables = {}.",
                    f(g(*lo, "iptables")),
                    f(g(*hi, "iptables")),
                    x(g(*hi, "iptables"), g(*lo, "iptables")),
                    f(g(*lo, "sidecap")),
                    f(g(*hi, "sidecap")),
                    x(g(*hi, "sidecap"), g(*lo, "sidecap")),
                    x(g(*hi, "sidecap"), g(*hi, "iptables"))
                );
            }
        }
    }
    if let Some(s) = sc.get("inbound").map(|v| &v["summary"]) {
        for case in cases(s) {
            let g = |mode: &str, k: &str| med(s, &case, mode, k);
            let _ = writeln!(
                h,
                "- **Inbound, {}**: sidecap (sk_lookup) {} conn/s vs iptables (REDIRECT) {} (×{}), first byte p50 {} vs {} µs.",
                case.trim_start_matches("inbound "),
                f(g("sidecap", "rate")),
                f(g("iptables", "rate")),
                x(g("sidecap", "rate"), g("iptables", "rate")),
                f(g("sidecap", "ttfb_p50_us")),
                f(g("iptables", "ttfb_p50_us"))
            );
        }
    }
    if let Some(s) = sc.get("passdrop").map(|v| &v["summary"]) {
        let g = |case: &str, mode: &str, k: &str| med(s, case, mode, k);
        let _ = writeln!(
            h,
            "- **Passthrough**: connect() p50 {} µs under sidecap vs {} µs with no program at all (×{}); iptables {} µs.",
            f(g("passthrough", "sidecap", "connect_p50_us")),
            f(g("passthrough", "direct", "connect_p50_us")),
            x(g("passthrough", "sidecap", "connect_p50_us"), g("passthrough", "direct", "connect_p50_us")),
            f(g("passthrough", "iptables", "connect_p50_us"))
        );
        let _ = writeln!(
            h,
            "- **REGISTRY_ONLY drop**: the app sees the failure after {} µs with sidecap (EPERM from connect) vs {} µs with iptables + a proxy that accepts and resets (×{}).",
            f(g("drop", "sidecap", "ttfb_p50_us")),
            f(g("drop", "iptables", "ttfb_p50_us")),
            x(g("drop", "sidecap", "ttfb_p50_us"), g("drop", "iptables", "ttfb_p50_us"))
        );
    }
    if let Some(s) = sc.get("kernel").map(|v| &v["summary"]) {
        let g = |case: &str| med(s, case, "total", "ns_per_conn");
        let _ = writeln!(
            h,
            "- **Kernel time per connection** (bpf_stats, all programs): captured {} ns, passthrough {} ns, an unmeshed process's socket under every program (an unmeshed pod's) {} ns and above the pods' cgroup (a host process's, the default placement) {} ns; empty programs on sockops, connect4 and getsockopt cost {} ns per captured connection. Captured with the pod traced: {} ns; under the cgroup-bound proxy identity: {} ns.",
            f(g("captured")),
            f(g("passthrough")),
            f(g("unmeshed")),
            f(g("host process")),
            f(g("floor")),
            f(g("captured, traced")),
            f(g("captured, cgroup identity"))
        );
        // The same path with istio-init's rules: their netfilter cost shows only as latency.
        if let Some(c) = sc.get("connect").map(|v| &v["summary"]) {
            let case = "sc-forward c=1";
            let t = |mode: &str| med(c, case, mode, "ttfb_p50_us");
            if let (Some(i), Some(d), Some(sd)) = (t("iptables"), t("direct"), t("sidecap")) {
                let _ = writeln!(
                    h,
                    "- **Side by side ({case}, first byte p50)**: iptables {} µs, sidecap {} µs, direct {} µs: iptables minus sidecap: {} µs on the same proxied path, where sidecap's programs spend {} µs of kernel time per connection.",
                    num(i),
                    num(sd),
                    num(d),
                    num(i - sd),
                    g("captured").map(|ns| num(ns / 1000.0)).unwrap_or_else(|| "–".into())
                );
            }
        }
    }
    let cores = r["machine"]["cores"].as_u64().map(|c| format!(" of {c}")).unwrap_or_default();
    for b in budgets(r).into_iter().filter(|b| b.case.ends_with("c=64")) {
        let (Some(k), [Some(ipt), Some(sdc)], [Some(pi), Some(ps)], Some(busy)) =
            (b.programs, [b.machine[1], b.machine[2]], b.proxy, b.busy[1])
        else {
            continue;
        };
        let _ = writeln!(
            h,
            "- **Short connections, where the time goes ({})**: {} µs of machine CPU per connection with iptables, {} µs with sidecap; the proxy process alone {} vs {} µs; all of sidecap's programs' kernel time is {} µs per connection; {:.2}{cores} CPUs busy under sidecap.",
            b.case,
            num(ipt),
            num(sdc),
            num(pi),
            num(ps),
            num(k),
            busy
        );
    }
    if let Some(s) = sc.get("keepalive").map(|v| &v["summary"]) {
        for case in cases(s) {
            let g = |mode: &str, k: &str| med(s, &case, mode, k);
            let _ = writeln!(
                h,
                "- **Keepalive, {case}** ({} → nginx, wrk): sidecap {} req/s vs iptables {} (×{}), p99 {} vs {} µs; direct {} req/s.",
                if case.starts_with("haproxy-http") {
                    "HAProxy HTTP mode"
                } else if case.starts_with("haproxy") {
                    "HAProxy TCP mode"
                } else {
                    "sc-forward"
                },
                f(g("sidecap", "rps")),
                f(g("iptables", "rps")),
                x(g("sidecap", "rps"), g("iptables", "rps")),
                f(g("sidecap", "p99_us")),
                f(g("iptables", "p99_us")),
                f(g("direct", "rps"))
            );
        }
    }
    if let Some(v) = sc.get("controlplane") {
        let a = &v["agent"];
        let _ = writeln!(
            h,
            "- **Control plane**: a Sidecar edit reaches the maps in {} ms for 1 pod and {} ms with {} pods × {} services (real agent, namespace Sidecars); agent RSS {:.1} MiB, kernel maps {:.1} MiB at that size.",
            f(v["one_pod"]["converge_ms"]["median"].as_f64()),
            f(a["converge_ms"]["median"].as_f64()),
            a["pods"],
            a["services"],
            a["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            a["map_memory"]["total_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
        );
        for d in v["default_mesh"].as_array().into_iter().flatten() {
            let _ = writeln!(
                h,
                "- **Default mesh** (no Sidecar), {} pods × {} services: all pods in the maps {:.0} ms after the agent starts; one added Service reaches every pod's maps in {} ms; {} rule set(s) shared by all pods; agent RSS {:.1} MiB, kernel maps {:.1} MiB.",
                d["pods"],
                d["services"],
                d["initial_ms"].as_f64().unwrap_or(f64::NAN),
                f(d["service_ms"]["median"].as_f64()),
                d["rule_sets"],
                d["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                d["map_memory"]["total_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
            );
        }
    }
    h.push('\n');
    h
}

fn markdown(r: &Value, img: &dyn Fn(&str) -> String) -> String {
    let m = &r["machine"];
    let p = &r["params"];
    let sc = &r["scenarios"];
    let mut d = String::new();
    let _ = writeln!(
        d,
        "# Benchmarks\n\n<!-- Generated by `{}` from target/bench/results.json (a copy: docs/bench/results.json); do not edit by hand. -->\n",
        r["command"].as_str().unwrap_or("cargo xtask bench")
    );
    let _ = writeln!(
        d,
        "sidecap against istio-init's iptables rules and against no capture at all, on one machine's\nreal kernel. Reproduce with `{}` (as root; {} s for this run, build excluded;\n`cargo xtask bench --quick` takes about 3 minutes and writes only `target/bench/`).\n",
        r["command"].as_str().unwrap_or(""),
        r["seconds"].as_f64().map(|s| format!("{s:.0}")).unwrap_or_default()
    );
    d.push_str(&headlines(r));
    let _ = writeln!(
        d,
        "## Machine\n\n| | |\n|---|---|\n| CPU | {} × {} |\n| memory | {} |\n| kernel | {} |\n| iptables | {} |\n| HAProxy | {} |\n| rustc | {} |\n| sidecap commit | {} |\n| load average before / after | {} / {} |\n",
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["iptables"].as_str().unwrap_or(""),
        m["haproxy"].as_str().unwrap_or(""),
        m["rustc"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or("?"),
        m["load_before"].as_str().unwrap_or(""),
        m["load_after"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        d,
        "## How it is measured\n\nOne sandbox (as the end-to-end tests build it, tests/README.md): four pods (network namespace + cgroup each) joined through a\nservices namespace by veth pairs that never touch the root namespace. Three pods are\nidentical except for capture:\n\n\
- **direct** — nothing installed: the physical limit of the path.\n\
- **iptables** — istio-init's rules (`testdata/istio/iptables/cni-plugin/basic.txt.golden`)\n  loaded into the pod's netns with `iptables-restore`, plus one excluded CIDR and one excluded\n  port (as istio-iptables writes `excludeOutboundIPRanges`/`excludeOutboundPorts`).\n\
- **sidecap** — the real `sidecap agent` (release build) attached to that pod's cgroup with\n  `--allow-any capture` (everything in range goes to the proxy, as with istio-init), the pod\n  carrying the same two annotations.\n\n\
The load generator `sc-load` runs in the pod (its netns and cgroup, as uid 1000): per\nconnection connect → send 4 bytes → first reply byte → close with a reset (no TIME_WAIT);\n`connect()` is the time of the connect call, *first byte* from before connect to the first\nreply byte. A captured connect() completes against the local proxy (loopback), so it can be\nshorter than direct's, which crosses to the services namespace; *first byte* is the\nend-to-end number. The proxy (uid 1337) is `sc-forward` (the project's small epoll forwarder: accept,\n`SO_ORIGINAL_DST`, connect, copy) or HAProxy 2.6 (`option transparent`); the upstream is\n`sc-load serve` in the services namespace. Each measurement runs {} ms after {} ms of\nwarm-up; the modes run interleaved (direct, iptables, sidecap, direct, …) for {} rounds;\ntables give the median over rounds and (min–max).\n\nAt concurrency 1 much of the latency is the scheduler waking the client, the proxy and the\nupstream in turn; on an idle 2-vCPU VM those wake-ups are slow, and the same command gave\nabout half the first-byte latency for every mode while other builds kept both CPUs busy.\nCompare modes within one run (they share its conditions), not across runs.\n",
        p["duration_ms"], p["warmup_ms"], p["rounds"]
    );
    let section = |d: &mut String, key: &str, title: &str, text: &str, images: &[&str]| {
        if let Some(v) = sc.get(key) {
            let _ = writeln!(d, "## {title}\n\n{text}\n");
            d.push_str(&table_for(key, v));
            d.push('\n');
            if let Some(c) = v["sidecap_counters"].as_object() {
                let list: Vec<String> = c.iter().map(|(k, n)| format!("{k} {n}")).collect();
                let _ = writeln!(
                    d,
                    "Kernel counters of the sidecap pod after this scenario (cumulative since the agent started): {}.\n",
                    list.join(", ")
                );
            }
            for i in images {
                d.push_str(&img(i));
            }
            let _ = writeln!(d, "\n({:.0} s)\n", v["seconds"].as_f64().unwrap_or(0.0));
        }
    };
    section(
        &mut d,
        "connect",
        "1. Connection rate and latency through the outbound capture path",
        "The app connects to a Service address (10.251.100.10:8080); iptables REDIRECTs and sidecap's\n`connect4` rewrites it to the proxy on 127.0.0.1:15001, which asks `SO_ORIGINAL_DST` and\nforwards there. Direct connects to the upstream itself (no proxy).",
        &["connect-rate.svg", "connect-latency.svg"],
    );
    if let Some(t) = short_connection_budget(r) {
        let _ = writeln!(d, "{t}");
    }
    section(
        &mut d,
        "rules",
        "2. Rule scaling",
        "N excluded CIDRs (`/32`s; the passthrough destination is the last one) and N excluded\nports ahead of the capture rule: iptables gets 3N more rules where istio-iptables puts them\n(ports, tcp and udp, at the top of ISTIO_OUTPUT; ranges just before the REDIRECT); sidecap\ngets N LPM-trie and 2N hash entries. Concurrency 1. Direct does not change with N.",
        &["rules.svg"],
    );
    section(
        &mut d,
        "inbound",
        "3. Inbound",
        "From a fourth pod to each pod's app port 9080: iptables REDIRECTs it to 15006 in\nPREROUTING; sidecap's `sk_lookup` hands it to the 15006 listener without NAT. The proxy\nforwards to the app from 127.0.0.6. Direct reaches the app itself.",
        &["inbound-rate.svg"],
    );
    section(
        &mut d,
        "passdrop",
        "4. Passthrough and drop",
        "*passthrough*: a connect to an excluded destination — sidecap's program runs and lets it\ngo, iptables walks to the RETURN, direct has nothing installed. *drop*: a destination no\nService declares under REGISTRY_ONLY — sidecap fails the connect with EPERM; with iptables\nit is redirected to the proxy, which accepts and resets it (Envoy's BlackHoleCluster). The\nlast column is the time until the app saw the failure.",
        &["passdrop.svg"],
    );
    if let Some(v) = sc.get("controlplane") {
        let _ = writeln!(
            d,
            "## 5. Control plane\n\nClusters are synthetic: services with two ports (HTTP 80, one TCP port) in up to 100\nnamespaces, pods spread over the namespaces, every pod on a real network namespace of its\nown, one real `sidecap agent` watching its config directory. *Scoped*: one namespace-wide\nSidecar each (egress `./*`, `istio-system/*`); the change is an edit of one namespace's\nSidecar (import one more namespace, REGISTRY_ONLY), timed from the file's rename until the\npod's `PODS` entry carries a new generation (polled every 100 µs). *Default mesh*: no\nSidecar at all, so every pod imports every service; the change is one added Service (a new\nfile), timed until every pod's rule set holds its listener. Map memory is bpftool's\n`bytes_memlock` summed over the pinned maps. The {}-pod scoped agent runs on {} namespaces.\nThe Kubernetes source at scale (10,000 Services, 20,000 EndpointSlices) is measured\nseparately: [kubernetes-scale.md](kubernetes-scale.md).\n",
            v["agent"]["pods"], v["agent"]["pods"]
        );
        d.push_str(&table_for("controlplane", v));
        let _ = writeln!(d, "({:.0} s)\n", v["seconds"].as_f64().unwrap_or(0.0));
    }
    if let Some(v) = sc.get("micro") {
        let _ = writeln!(
            d,
            "## 6. Policy engine\n\ncriterion (`cargo bench -p sidecap-policy --bench policy`), cluster of 10,000 services in\n100 namespaces; warm-up {} s, measurement {} s, {} samples.\n",
            v["warm_up_s"].as_str().unwrap_or(""),
            v["measurement_s"].as_str().unwrap_or(""),
            v["samples"].as_str().unwrap_or("")
        );
        d.push_str(&table_for("micro", v));
        let _ = writeln!(d, "\n({:.0} s)\n", v["seconds"].as_f64().unwrap_or(0.0));
    }
    section(
        &mut d,
        "kernel",
        "7. Kernel time per connection",
        "What sidecap's programs cost the kernel, from its own accounting: `kernel.bpf_stats_enabled=1`\n(set for the scenario, then put back) and the `run_time_ns` / `run_cnt` of each program\nbehind the agent's pinned links, read before and after exactly N connections made one\nafter the other. *captured*: app → Service → `sc-forward` → upstream; the app's socket and\nthe proxy's two sockets are in the attached cgroup, the upstream's is not. *passthrough*:\nan excluded destination, only the app's socket. *unmeshed*: a process whose netns is no\nmeshed pod's, in the attached cgroup: under every program, as an unmeshed pod's process is.\n*host process*: the same process under a second agent placed as the DaemonSet's default\nplaces it (`--cgroup` standing for the root, `--pods-cgroup` on its `kubepods` child, the\nprocess in the first only): connect4 runs, sockops, getsockopt and recvmsg do not.\n*captured, traced*: the captured case with the pod's trace switch on (`sidecap.io/trace`), what\nits records cost; an untraced pod pays one branch per program run for the switch.\n*captured, cgroup identity*: the captured case under `sidecap.io/proxy-identity: cgroup`, the\nproxy's upstream connect checking its cgroup id.\n*floor*: the captured case again with `r0 = 1; exit` programs attached beside sidecap's on\nsockops, connect4 and getsockopt, and only theirs counted: what running any program on those\nhooks costs here (dispatch and the accounting's own two clock reads), against which the\nrest is what sidecap's programs do. Per-run averages are much less sensitive to other load\non the machine than rates are.",
        &[],
    );
    section(
        &mut d,
        "keepalive",
        "8. Keepalive",
        "Request/response over persistent connections: wrk (one thread, 1 or 64 connections) in the\npod to Debian's nginx in the services namespace (10.251.100.10:8090, bodies of 100 B, 4 KiB\nand 64 KiB), through HAProxy in TCP mode (each client connection on its own upstream\nconnection: issue 14's reference setup), in HTTP mode (`option http-keep-alive`,\n`http-reuse always`, `option transparent`), then through sc-forward, for iptables and sidecap; direct is wrk to\nnginx itself. Connections are set up once, so sidecap's programs hardly run (the last column\ncounts their runs, all programs of the sidecap pod's agent, with bpf_stats on for its runs only); with iptables\nevery packet of the app↔proxy leg and of the proxy's upstream leg goes through conntrack and\nNAT. *sidecap+sockmap* is a fifth pod with its own agent run with `--sockmap` (issue 16: the\napp↔proxy leg's messages handed from socket to socket by sk_msg; off by default, and why:\n[sockmap.md](sockmap.md)). CPU µs per request: the machine's busy time over a run divided by\nits requests, then the proxy process's own.",
        &[],
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One round's value as the summary holds it.
    fn spread(m: f64) -> Value {
        json!({"median": m, "min": m, "max": m, "n": 1})
    }

    /// The whole report for these scenarios on this machine.
    fn render(machine: Value, scenarios: Value) -> String {
        let r = json!({"command": "cargo xtask bench", "params": {"rule_sizes": [1]}, "machine": machine, "scenarios": scenarios});
        markdown(&r, &|n| format!("[{n}]\n"))
    }

    #[test]
    fn cells_and_ratios() {
        assert_eq!(cell(&json!({"median": 12.345, "min": 10.0, "max": 15.0, "n": 3})), "12.3 (10.0–15.0)");
        assert_eq!(cell(&json!({"median": 1234.4, "min": 1234.4, "max": 1234.4, "n": 1})), "1234");
        assert_eq!(cell(&Value::Null), "–");
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25");
        assert_eq!(ratio(Some(1.0), None), "–");
    }

    #[test]
    fn report_renders_from_results() {
        let summary = json!([
            {"case": "N=1 captured", "mode": "direct", "metrics": {"connect_p50_us": spread(10.0)}},
            {"case": "N=1 captured", "mode": "iptables", "metrics": {"connect_p50_us": spread(20.0)}},
            {"case": "N=1 captured", "mode": "sidecap", "metrics": {"connect_p50_us": spread(15.0)}},
        ]);
        let r = json!({"command": "cargo xtask bench", "params": {"rule_sizes": [1]}, "machine": {},
            "scenarios": {"rules": {"summary": summary, "seconds": 1.0}}});
        let md = markdown(&r, &|n| format!("[{n}]\n"));
        assert!(md.contains("| N=1 captured | 0.75 | 1.50 |"), "{md}");
        assert!(md.contains("[rules.svg]"));
        assert_eq!(plots(&r).len(), 1);
    }

    #[test]
    fn kernel_breakdown_takes_the_floor_out_of_each_program() {
        let row = |case: &str, prog: &str, runs: f64, per_run: f64| json!({"case": case, "mode": prog, "metrics": {"runs_per_conn": spread(runs), "ns_per_run": spread(per_run), "ns_per_conn": spread(runs * per_run)}});
        let summary = json!([
            row("captured", "sockops", 16.0, 70.0),
            row("captured", "sk_lookup", 1.0, 60.0),
            row("captured", "total", 17.0, 1180.0 / 17.0),
            row("floor", "empty sockops", 16.0, 30.0),
        ]);
        let t = kernel_breakdown(&summary);
        assert!(t.contains("| sockops | 16.0 | 1120 | 480 | 640 |"), "{t}");
        assert!(t.contains("| sk_lookup | 1.00 | 60.0 | not measured | ≤ 60.0 |"), "{t}");
        assert!(t.contains("| **total** | | **1180** | **480** (41%) | **700** |"), "{t}");
    }

    #[test]
    fn kernel_section_lists_programs_per_case() {
        let row = |case: &str, prog: &str, ns: f64| json!({"case": case, "mode": prog, "metrics": {"runs_per_conn": spread(1.0), "ns_per_run": spread(ns), "ns_per_conn": spread(ns)}});
        let summary = json!([
            row("captured", "connect4", 900.0),
            row("captured", "total", 1500.0),
            row("unmeshed", "total", 80.0),
            row("host process", "total", 75.0)
        ]);
        let md = render(json!({}), json!({"kernel": {"summary": summary, "seconds": 1.0}}));
        assert!(md.contains("## 7. Kernel time per connection"), "{md}");
        assert!(md.contains("| captured | connect4 | 1.00 | 900 | 900 |"), "{md}");
        assert!(md.contains("| unmeshed | **total** | **1.00** | **80.0** | **80.0** |"), "{md}");
        // No floor measured here: the program's whole time is counted as its own.
        assert!(md.contains("| connect4 | 1.00 | 900 | not measured | ≤ 900 |"), "{md}");
        assert!(
            md.contains("captured 1500 ns, passthrough – ns, an unmeshed process's socket under every program (an unmeshed pod's) 80.0 ns and above the pods' cgroup (a host process's, the default placement) 75.0 ns; empty"),
            "{md}"
        );
    }

    #[test]
    fn short_connection_budget_sets_cpu_per_connection_against_the_programs() {
        let row = |case: &str, mode: &str, rate: f64, busy: f64, proxy: f64| json!({"case": case, "mode": mode, "metrics": {"rate": spread(rate), "busy_cpus": spread(busy), "cpu_us_per_conn": spread(busy * 1e6 / rate), "proxy_cpu_us_per_conn": spread(proxy * 1e6 / rate)}});
        let connect = json!([
            row("p c=64", "direct", 40000.0, 2.0, 0.0),
            // 150 µs of machine CPU and 80 of the proxy's per connection with iptables; 120 and 64 with sidecap.
            row("p c=64", "iptables", 10000.0, 1.5, 0.8),
            row("p c=64", "sidecap", 12500.0, 1.5, 0.8),
            row("p c=1", "iptables", 5000.0, 1.0, 0.5),
            row("p c=1", "sidecap", 5000.0, 0.9, 0.5),
        ]);
        let kernel = json!([{"case": "captured", "mode": "total", "metrics": {"ns_per_conn": spread(3_000.0)}}]);
        let md = render(
            json!({"cores": 2}),
            json!({"connect": {"summary": connect, "seconds": 1.0}, "kernel": {"summary": kernel, "seconds": 1.0}}),
        );
        assert!(md.contains("| p c=64 | 50.0 | 150 | 120 | 30.0 | 80.0 | 64.0 | 3.00 | 1.50 | 1.50 | 1.25 |"), "{md}");
        assert!(md.contains("| p c=1 | – | 200 | 180 | 20.0 | 100 | 100 | 3.00 | 1.00 | 0.90 | 1.00 |"), "{md}");
        assert!(md.contains("busy CPUs* is of the machine's 2:"), "{md}");
        assert!(
            md.contains("(p c=64)**: 150 µs of machine CPU per connection with iptables, 120 µs with sidecap; the proxy process alone 80.0 vs 64.0 µs; all of sidecap's programs' kernel time is 3.00 µs per connection; 1.50 of 2 CPUs busy under sidecap."),
            "{md}"
        );
        assert!(!md.contains("where the time goes (p c=1)"), "{md}");
    }
}
