//! Scenario 8, keepalive: request/response over persistent connections through HAProxy in
//! TCP mode, in HTTP mode (a sidecar as Envoy is one), then through sc-forward, to Debian's nginx, load
//! from wrk, 1 and 64 connections, 100 B, 4 KiB and 64 KiB responses; direct is wrk to nginx
//! itself. With iptables every packet of the app↔proxy leg and of the proxy's upstream leg
//! goes through conntrack; with sidecap only the connects run a program; sidecap+sockmap
//! (issue 16) also hands the app↔proxy leg's messages from socket to socket (sk_msg).
//! Also CPU per request: the machine's busy time and the proxy's, over each wrk run.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sidecap_tests::process::is_listening;

use super::Params;
use super::cpu::{Machine, jiffy_us, process_jiffies};
use super::kernel;
use super::sandbox::{Mode, Proxy, SVC, Sandbox};

/// nginx's port on the Service address (captured like any other under `--allow-any capture`).
const NGINX_PORT: u16 = 8090;
const SIZES: [(&str, usize); 3] = [("100 B", 100), ("4 KiB", 4096), ("64 KiB", 65536)];

fn nginx_config(dir: &std::path::Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
    default_type text/plain;
    server {{
        listen {SVC}:{NGINX_PORT};
        root {d}/www;
    }}
}}
"
    )
}

/// A wrk duration in µs ("123.45us", "1.20ms", "1.01s").
fn micros(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * scale)
}

/// Requests/s and the latency percentiles from `wrk --latency` output.
fn parse_wrk(out: &str) -> Value {
    let mut m = json!({});
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => m["rps"] = json!(v.parse::<f64>().ok()),
            ["50%", v] => m["p50_us"] = json!(micros(v)),
            ["99%", v] => m["p99_us"] = json!(micros(v)),
            [n, "requests", "in", ..] => m["requests"] = json!(n.parse::<u64>().ok()),
            ["Non-2xx", "or", "3xx", "responses:", n] => m["non_2xx"] = json!(n.parse::<u64>().ok()),
            ["Socket", "errors:", ..] => m["socket_errors"] = json!(line.trim()),
            _ => {}
        }
    }
    m
}

/// Modes of this scenario: the usual three and sidecap with `--sockmap` (issue 16).
const MODES: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Sidecap, Mode::SidecapSockmap];
/// HAProxy in TCP mode (each client connection forwarded on its own upstream connection:
/// issue 14's reference setup), in HTTP mode (as Envoy is one), then the project's
/// forwarder (bytes only).
const PROXIES: [Proxy; 3] = [Proxy::Haproxy, Proxy::HaproxyHttp, Proxy::Forward];

fn delta(after: &Value, before: &Value, k: &str) -> u64 {
    after[k].as_u64().unwrap_or(0).saturating_sub(before[k].as_u64().unwrap_or(0))
}

pub fn keepalive(sb: &mut Sandbox, p: &Params) -> anyhow::Result<Vec<Value>> {
    eprintln!("== scenario 8: keepalive through HAProxy (TCP and HTTP mode) and sc-forward to nginx, wrk");
    if !sb.has_sockmap() {
        bail!("the sandbox was started without the sidecap+sockmap pod's agent");
    }
    let dir = sb.scratch().join("nginx");
    std::fs::create_dir_all(&dir)?;
    // Static files: nginx's config strings cannot hold 4 KiB.
    std::fs::create_dir_all(dir.join("www"))?;
    for (_, bytes) in SIZES {
        std::fs::write(dir.join("www").join(bytes.to_string()), "x".repeat(bytes))?;
    }
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, nginx_config(&dir))?;
    let cfg = cfg.display().to_string();
    let mut nginx = sb.spawn_upstream("nginx", &["-c", &cfg, "-p", &dir.display().to_string(), "-e", "stderr"])?;
    let pid = nginx.pid();
    let up = sidecap_tests::util::wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
        if is_listening(pid, NGINX_PORT) {
            return Some(true);
        }
        matches!(nginx.try_wait(), Ok(Some(_)) | Err(_)).then_some(false)
    });
    if up != Some(true) {
        bail!("nginx did not start: {} {}", nginx.stdout(), nginx.stderr());
    }
    let secs = if p.profile == "full" { 3 } else { 1 };
    let jiffy = jiffy_us();
    // The sidecap pod's programs, counted over its runs (bpf_stats on for those only): how
    // often they run per request once the connections are up.
    let progs = kernel::programs(sb.pins.path()).context("the sidecap pod's programs")?;
    let mut runs = Vec::new();
    let result = (|| {
        for proxy in PROXIES {
            sb.start_proxies(proxy)?;
            for round in 0..p.rounds {
                for (size, bytes) in SIZES {
                    for &c in &p.concurrency {
                        let case = format!("{} {size} c={c}", proxy.name());
                        for mode in MODES {
                            let url = format!("http://{SVC}:{NGINX_PORT}/{bytes}");
                            let args = ["-t1", &format!("-c{c}"), &format!("-d{secs}s"), "--latency", "--timeout", "2s", &url];
                            let proxy_pid = sb.proxy_pid(mode);
                            let counted = if mode == Mode::Sidecap {
                                let stats = kernel::BpfStats::enable()?;
                                Some((stats, kernel::snapshot(&progs)?))
                            } else {
                                None
                            };
                            let (m0, p0, k0) = (Machine::now(), proxy_pid.and_then(process_jiffies), sb.counters_sockmap());
                            let out = sb.run_in(mode, "wrk", &args, Duration::from_secs(secs + 20)).context("wrk")?;
                            let (m1, p1, k1) = (Machine::now(), proxy_pid.and_then(process_jiffies), sb.counters_sockmap());
                            let program_runs = match counted {
                                Some((stats, before)) => {
                                    let after = kernel::snapshot(&progs)?;
                                    drop(stats);
                                    Some(before.iter().zip(&after).map(|((_, r0), (_, r1))| r1.saturating_sub(*r0)).sum::<u64>())
                                }
                                None => None,
                            };
                            let mut m = parse_wrk(&out);
                            if m["rps"].as_f64().is_none() || m["non_2xx"].as_u64().unwrap_or(0) > 0 || m["socket_errors"].is_string() {
                                bail!("{case} {}: wrk failed or saw errors: {out}", mode.name());
                            }
                            // CPU per request: the whole machine's busy time (everything the
                            // request touches: wrk, proxy, nginx, softirqs; and anything else
                            // running, so noisy on a shared machine) and the proxy's alone.
                            let reqs = m["requests"].as_u64().unwrap_or(0).max(1) as f64;
                            if let (Some(m0), Some(m1)) = (m0, m1) {
                                m["cpu_us_per_req"] = json!(m1.busy_since(&m0) as f64 * jiffy / reqs);
                            }
                            if let (Some(a), Some(b)) = (p0, p1) {
                                m["proxy_cpu_us_per_req"] = json!((b - a) as f64 * jiffy / reqs);
                            }
                            // All of them together, per 1,000 requests (wrk's connections included).
                            if let Some(n) = program_runs {
                                m["program_runs_per_1k_req"] = json!(n as f64 * 1000.0 / reqs);
                            }
                            let sockmap = json!({
                                "msgs": delta(&k1, &k0, "sockmap_msgs"),
                                "bytes": delta(&k1, &k0, "sockmap_bytes"),
                                "fallbacks": delta(&k1, &k0, "sockmap_fallbacks"),
                            });
                            eprintln!(
                                "  {case:<24} {:<15} round {round}: {:>9.0} req/s  p50 {:>7.1} µs  p99 {:>7.1} µs  cpu {:>6.1} µs/req (proxy {:>5.1}){}",
                                mode.name(),
                                m["rps"].as_f64().unwrap_or(0.0),
                                m["p50_us"].as_f64().unwrap_or(f64::NAN),
                                m["p99_us"].as_f64().unwrap_or(f64::NAN),
                                m["cpu_us_per_req"].as_f64().unwrap_or(f64::NAN),
                                m["proxy_cpu_us_per_req"].as_f64().unwrap_or(f64::NAN),
                                if mode == Mode::SidecapSockmap { format!("  sockmap {sockmap}") } else { String::new() }
                            );
                            if mode == Mode::SidecapSockmap && sockmap["msgs"].as_u64() == Some(0) {
                                bail!("{case}: the sockmap pod redirected nothing: {sockmap}");
                            }
                            runs.push(json!({
                                "case": case, "mode": mode.name(), "round": round, "metrics": m,
                                "raw": {"wrk": out, "sockmap": sockmap},
                            }));
                        }
                    }
                }
            }
        }
        anyhow::Ok(())
    })();
    sb.start_proxies(Proxy::Forward)?;
    drop(nginx);
    result?;
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let out = "Running 1s test @ http://10.251.100.10:8090/100
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  200.00us   5.00ms   90.00%
  Latency Distribution
     50%  850.00us
     75%    1.00ms
     90%    1.50ms
     99%    2.10ms
  51234 requests in 1.00s, 10.00MB read
Requests/sec:  51234.56
Transfer/sec:     10.00MB
";
        let m = parse_wrk(out);
        assert_eq!(m["rps"], 51234.56);
        assert_eq!(m["p50_us"], 850.0);
        assert_eq!(m["p99_us"], 2100.0);
        assert_eq!(m["requests"], 51234);
        assert!(m["socket_errors"].is_null());
        assert_eq!(micros("1.01s"), Some(1_010_000.0));
    }
}
