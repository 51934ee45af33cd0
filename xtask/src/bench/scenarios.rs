//! Scenarios 1–4: data-path measurements, each a list of runs
//! `{case, mode, round, metrics, raw}` taken in interleaved rounds (A B C A B C …).

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::Params;
use super::cpu::{Machine, process_jiffies};
use super::sandbox::{APP_PORT, Load, Mode, Proxy, SVC, SVC_EXCLUDED, SVC_PORT, SVC_UNKNOWN, Sandbox};

pub type Scenario = fn(&mut Sandbox, &Params) -> anyhow::Result<Vec<Value>>;

fn sa(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// The numbers kept from one sc-load result. CPU per connection: the machine's busy CPUs
/// over the load's life (warm-up included) divided by its rate, everything a connection
/// touches (client, proxy, upstream, softirqs) and anything else running; then the proxy
/// process's own (its threads, and the kernel work done in its context).
fn metrics(raw: &Value) -> Value {
    let f = |k: &str, q: &str| raw[k][q].as_f64();
    let rate = raw["rate"].as_f64().filter(|r| *r > 0.0);
    let per_conn = |k: &str| raw[k].as_f64().zip(rate).map(|(cpus, r)| cpus * 1e6 / r);
    json!({
        "busy_cpus": raw["busy_cpus"].as_f64(),
        "cpu_us_per_conn": per_conn("busy_cpus"),
        "proxy_cpus": raw["proxy_cpus"].as_f64(),
        "proxy_cpu_us_per_conn": per_conn("proxy_cpus"),
        "rate": raw["rate"].as_f64(),
        "connect_p50_us": f("connect_us", "p50"),
        "connect_p99_us": f("connect_us", "p99"),
        "ttfb_p50_us": f("ttfb_us", "p50"),
        "ttfb_p99_us": f("ttfb_us", "p99"),
        "ttfb_p999_us": f("ttfb_us", "p999"),
        "ok": raw["ok"].as_f64(),
        "failed": raw["failed"].as_f64(),
    })
}

/// A load (`run`'s sc-load result), with the machine's busy CPUs over it added
/// (`busy_cpus`), and the proxy's (`proxy_cpus`, when `proxy` is its pid).
fn with_cpu(proxy: Option<i32>, run: impl FnOnce() -> anyhow::Result<Value>) -> anyhow::Result<Value> {
    let before = (Machine::now(), proxy.and_then(process_jiffies));
    let mut raw = run()?;
    let after = (Machine::now(), proxy.and_then(process_jiffies));
    if let (Some(a), Some(b)) = (before.0, after.0) {
        raw["busy_cpus"] = json!(b.busy_cpus_since(&a));
        if let (Some(p0), Some(p1)) = (before.1, after.1) {
            raw["proxy_cpus"] = json!(b.cpus_since(&a, p1.saturating_sub(p0)));
        }
    }
    Ok(raw)
}

fn record(runs: &mut Vec<Value>, case: &str, mode: Mode, round: usize, raw: Value) {
    eprintln!(
        "  {case:<28} {:<9} round {round}: {:>8.0} conn/s  connect p50 {:>7.1} µs  ttfb p50 {:>7.1} µs  failed {}",
        mode.name(),
        raw["rate"].as_f64().unwrap_or(0.0),
        raw["connect_us"]["p50"].as_f64().unwrap_or(f64::NAN),
        raw["ttfb_us"]["p50"].as_f64().unwrap_or(f64::NAN),
        raw["failed"]
    );
    runs.push(json!({"case": case, "mode": mode.name(), "round": round, "metrics": metrics(&raw), "raw": raw}));
}

/// Scenario 1: the outbound capture path to a proxy that forwards to the original destination:
/// sc-forward and HAProxy, concurrency 1 and 64.
pub fn connect(sb: &mut Sandbox, p: &Params) -> anyhow::Result<Vec<Value>> {
    eprintln!("== scenario 1: connect rate and latency through the outbound capture path");
    let mut runs = Vec::new();
    let proxies: Vec<Proxy> = if p.haproxy { vec![Proxy::Forward, Proxy::Haproxy] } else { vec![Proxy::Forward] };
    for proxy in proxies {
        sb.start_proxies(proxy)?;
        for round in 0..p.rounds {
            for &c in &p.concurrency {
                let case = format!("{} c={c}", proxy.name());
                for mode in Mode::ALL {
                    let raw = with_cpu(sb.proxy_pid(mode), || {
                        sb.load(mode, &Load { target: sa(SVC, SVC_PORT), concurrency: c, expect_fail: false })
                    })?;
                    record(&mut runs, &case, mode, round, raw);
                }
            }
        }
    }
    sb.start_proxies(Proxy::Forward)?;
    Ok(runs)
}

/// Scenario 3, inbound: from the client pod to each pod's app port (captured to 15006 by iptables
/// REDIRECT or by sk_lookup; direct: the app answers itself).
pub fn inbound(sb: &mut Sandbox, p: &Params) -> anyhow::Result<Vec<Value>> {
    eprintln!("== scenario 3: inbound capture to 15006");
    if sb.proxy != Proxy::Forward {
        sb.start_proxies(Proxy::Forward)?;
    }
    let mut runs = Vec::new();
    for round in 0..p.rounds {
        for &c in &p.concurrency {
            let case = format!("inbound c={c}");
            for mode in Mode::ALL {
                let pod = match mode {
                    Mode::Direct => "direct",
                    Mode::Iptables => "ipt",
                    Mode::Sidecap => "sc",
                    Mode::SidecapSockmap => "scm",
                };
                let target = SocketAddr::from((sb.pod(pod).ipv4(), APP_PORT));
                let raw = with_cpu(sb.proxy_pid(mode), || sb.load_from("client", &Load { target, concurrency: c, expect_fail: false }))?;
                record(&mut runs, &case, mode, round, raw);
            }
        }
    }
    Ok(runs)
}

/// Scenario 4, passthrough (an excluded destination: sidecap's programs run and let it go; iptables
/// walks its rules to the RETURN; direct runs nothing) and drop (REGISTRY_ONLY: sidecap
/// fails the connect; iptables sends it to the proxy, which accepts and resets it as
/// Envoy's BlackHoleCluster does).
pub fn passdrop(sb: &mut Sandbox, p: &Params) -> anyhow::Result<Vec<Value>> {
    eprintln!("== scenario 4: passthrough and drop");
    if sb.proxy != Proxy::Forward {
        sb.start_proxies(Proxy::Forward)?;
    }
    let mut runs = Vec::new();
    for round in 0..p.rounds {
        for mode in Mode::ALL {
            let raw = sb.load(mode, &Load { target: sa(SVC_EXCLUDED, SVC_PORT), concurrency: 1, expect_fail: false })?;
            record(&mut runs, "passthrough", mode, round, raw);
        }
    }
    sb.set_registry_only(true)?;
    let result = (|| {
        for round in 0..p.rounds {
            for mode in [Mode::Iptables, Mode::Sidecap] {
                let raw = sb.load(mode, &Load { target: sa(SVC_UNKNOWN, SVC_PORT), concurrency: 1, expect_fail: true })?;
                record(&mut runs, "drop", mode, round, raw);
            }
        }
        anyhow::Ok(())
    })();
    sb.set_registry_only(false)?;
    result?;
    Ok(runs)
}

/// Scenario 2, rule scaling: N excluded CIDRs and N excluded ports ahead of the capture rule; the
/// cost of a captured and of a passthrough (the last excluded CIDR) connect.
pub fn rules(sb: &mut Sandbox, p: &Params) -> anyhow::Result<Vec<Value>> {
    eprintln!("== scenario 2: rule scaling");
    if sb.proxy != Proxy::Forward {
        sb.start_proxies(Proxy::Forward)?;
    }
    let mut runs = Vec::new();
    for &n in &p.rule_sizes {
        let t = std::time::Instant::now();
        sb.set_rules(n)?;
        eprintln!("  {n} exclusions installed in {:.1} s", t.elapsed().as_secs_f64());
        for round in 0..p.rounds {
            for mode in Mode::ALL {
                for (kind, ip) in [("captured", SVC), ("passthrough", SVC_EXCLUDED)] {
                    let case = format!("N={n} {kind}");
                    let raw = sb.load(mode, &Load { target: sa(ip, SVC_PORT), concurrency: 1, expect_fail: false })?;
                    record(&mut runs, &case, mode, round, raw);
                }
            }
        }
    }
    sb.set_rules(1)?;
    Ok(runs)
}
