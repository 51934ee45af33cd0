//! Sockmap acceleration of the app↔proxy hop (issue 16) on the real kernel: the agent
//! with `--sockmap`, `sc-sockmap serve` as the proxy (uid 1337, 127.0.0.1:15001) and
//! `sc-sockmap run` as the app, connecting to a captured service address. Every transfer
//! is checked byte by byte against a position-dependent pattern; every socket has
//! timeouts, so a stalled byte fails the test instead of hanging it. The inbound hop: `run
//! --bind 127.0.0.6` (or ::6) as the proxy, `serve --host` on the pod's addresses as the app.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use sidecap_tests::*;

use sidecap_tests::fixture::{SVC, SVC6, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_sc-sockmap");
const MIB: u64 = 1 << 20;

fn mesh(agent_args: &[&str], annotations: &[(&str, &str)]) -> Mesh {
    Mesh::start(MeshSpec { agent_args, annotations, ..Default::default() })
}

fn accelerated() -> Mesh {
    mesh(&["--sockmap"], &[])
}

/// The proxy stand-in, listening before this returns.
fn serve(pod: &Pod) -> Spawned {
    let mut c = Command::new(BIN);
    c.args(["serve", "--port", "15001", "--max-secs", "120"]);
    let mut p = spawn_in(pod, Creds::PROXY.uid, Creds::PROXY.gid, c).expect("sc-sockmap serve");
    assert!(p.wait_stdout("\"listening\"", Duration::from_secs(10)), "serve did not start: {}", p.stderr());
    p
}

fn start_run(pod: &Pod, args: &[&str]) -> Spawned {
    start_run_to(pod, &format!("{SVC}:80"), args)
}

fn start_run_to(pod: &Pod, to: &str, args: &[&str]) -> Spawned {
    let mut c = Command::new(BIN);
    c.args(["run", to]).args(args);
    spawn_in(pod, Creds::APP.uid, Creds::APP.gid, c).expect("sc-sockmap run")
}

/// Runs the app side to completion: its JSON summary.
fn run(pod: &Pod, args: &[&str]) -> Value {
    let mut p = start_run(pod, args);
    let (st, out) = p.finish(Duration::from_secs(60));
    assert!(st.success(), "sc-sockmap run {args:?}: {st:?}\nstdout: {out}\nstderr: {}", p.stderr());
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn assert_ok(v: &Value, what: &str, m: &Mesh) {
    assert_eq!(v["ok"], true, "{what}: {v}\ncounters: {}\nagent log:\n{}", counters(m), m.agent.log());
}

fn counters(m: &Mesh) -> Value {
    m.inspect_pod(m.pod("a"))["counters"].clone()
}

fn counter(m: &Mesh, name: &str) -> u64 {
    counters(m)[name].as_u64().unwrap_or_else(|| panic!("no counter {name}: {}", counters(m)))
}

/// The server's per-connection lines.
fn conns(server: &Spawned) -> Vec<Value> {
    server
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "conn")
        .collect()
}

fn wait_conns(server: &Spawned, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = conns(server);
        if c.len() >= n || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn off_by_default_the_hop_is_plain_tcp() {
    require_root!();
    let m = mesh(&[], &[]);
    let a = m.pod("a");
    let _srv = serve(a);
    let v = run(a, &["--mode", "sink", "--bytes", &(4 * MIB).to_string()]);
    assert_ok(&v, "sink", &m);
    let flags = m.inspect_pod(a)["flags"].clone();
    assert!(!flags.as_array().unwrap().contains(&"sockmap".into()), "{flags}");
    assert_eq!(counter(&m, "captured"), 1);
    assert_eq!(counter(&m, "sockmap_msgs"), 0);
    assert_eq!(counter(&m, "sockmap_fallbacks"), 0);
    assert!(!m.agent.log().contains("sk_msg"), "no sk_msg link without --sockmap:\n{}", m.agent.log());
}

#[test]
fn large_transfers_both_ways_arrive_exact_and_redirected() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let srv = serve(a);
    assert!(m.inspect_pod(a)["flags"].as_array().unwrap().contains(&"sockmap".into()), "{}", m.inspect_pod(a));
    let n = 32 * MIB;
    // app → proxy, then a half-close: the proxy's reply comes back after the app's FIN.
    assert_ok(&run(a, &["--mode", "sink", "--bytes", &n.to_string()]), "app → proxy", &m);
    let after_sink = counter(&m, "sockmap_bytes");
    // proxy → app, then the proxy's FIN.
    assert_ok(&run(a, &["--mode", "source", "--bytes", &n.to_string()]), "proxy → app", &m);
    let after_source = counter(&m, "sockmap_bytes");
    // Both at once.
    assert_ok(&run(a, &["--mode", "echo", "--bytes", &(16 * MIB).to_string()]), "echo", &m);
    let c = counters(&m);
    assert_eq!(c["captured"], 3, "{c}");
    // The proxy's socket joins the map before it can send: its bytes are all redirected.
    assert!(after_source - after_sink >= n, "proxy → app not redirected: {c}");
    assert!(c["sockmap_msgs"].as_u64().unwrap() > 0, "{c}");
    let fallbacks = c["sockmap_fallbacks"].as_u64().unwrap();
    // A fallback (at most one per socket) is allowed; every byte must arrive regardless.
    assert!(fallbacks <= 6, "{c}");
    for conn in wait_conns(&srv, 3) {
        assert_eq!(conn["ok"], true, "{conn}");
    }
    // /metrics carries the same counters.
    let (status, body) = m.agent.admin_get("/metrics");
    assert_eq!(status, 200);
    let line = body.lines().find(|l| l.starts_with("sidecap_pod_sockmap_bytes_total{")).unwrap_or_else(|| panic!("{body}"));
    let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(v, c["sockmap_bytes"].as_u64().unwrap(), "{line} vs {c}");
}

/// IPv6: the app connects to a v6 service, capture sends it to [::1]:15001; the keys are
/// v6 tuples.
#[test]
fn ipv6_transfers_both_ways_arrive_exact_and_redirected() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let _srv = serve(a);
    let to = format!("[{SVC6}]:80");
    for mode in ["sink", "source", "echo"] {
        let mut p = start_run_to(a, &to, &["--mode", mode, "--bytes", &(8 * MIB).to_string()]);
        let (st, out) = p.finish(Duration::from_secs(60));
        assert!(st.success(), "{out} {}", p.stderr());
        assert_ok(&serde_json::from_str(out.trim()).unwrap(), mode, &m);
    }
    let c = counters(&m);
    assert_eq!(c["captured"], 3, "{c}");
    assert!(c["sockmap_bytes"].as_u64().unwrap() >= 8 * MIB * 4, "{c}");
}

#[test]
fn the_annotation_turns_it_off_per_pod() {
    require_root!();
    let m = mesh(&["--sockmap"], &[("sidecap.io/sockmap", "false")]);
    let a = m.pod("a");
    let _srv = serve(a);
    assert_ok(&run(a, &["--mode", "echo", "--bytes", &MIB.to_string()]), "echo", &m);
    assert!(!m.inspect_pod(a)["flags"].as_array().unwrap().contains(&"sockmap".into()));
    assert_eq!(counter(&m, "sockmap_msgs"), 0);
}

#[test]
fn resets_from_either_side_end_the_connection() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let srv = serve(a);
    // The proxy resets after reading 1 MiB: the app sees ECONNRESET, not a stall.
    assert_ok(&run(a, &["--mode", "rst-proxy", "--bytes", &MIB.to_string()]), "reset by the proxy", &m);
    // The app resets mid-stream: the proxy's read ends (reset or EOF), not a stall.
    assert_ok(&run(a, &["--mode", "rst-app", "--bytes", &MIB.to_string()]), "reset by the app", &m);
    let c = wait_conns(&srv, 2);
    assert_eq!(c.len(), 2, "{c:?}");
    let app_reset = c.iter().find(|v| v["mode"] == "RstApp").unwrap_or_else(|| panic!("{c:?}"));
    assert_ne!(app_reset["end"], "timeout", "the proxy stalled after the app's reset: {app_reset}");
    assert!(counter(&m, "sockmap_msgs") > 0, "{}", counters(&m));
}

#[test]
fn sendfile_and_splice_from_the_app_arrive_exact() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let _srv = serve(a);
    let n = (8 * MIB).to_string();
    assert_ok(&run(a, &["--mode", "sink", "--bytes", &n, "--via", "sendfile"]), "sendfile", &m);
    assert_ok(&run(a, &["--mode", "sink", "--bytes", &n, "--via", "splice"]), "splice", &m);
    assert!(counter(&m, "sockmap_bytes") > 0, "{}", counters(&m));
}

/// Kernel finding (docs/sockmap.md): a proxy that reads with splice(2)
/// (HAProxy can) gets EOF at once, before any byte: redirected bytes sit in the socket's
/// sk_msg queue, which splice does not read, and nothing falls back. This pins what the
/// kernel does today; when it fails, the kernel changed: measure again.
#[test]
fn kernel_finding_a_splicing_proxy_reads_eof_instead_of_redirected_bytes() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let srv = serve(a);
    let n = 4 * MIB;
    let v = run(a, &["--mode", "sink", "--bytes", &n.to_string(), "--server-splice", "--timeout-ms", "5000"]);
    let c = wait_conns(&srv, 1);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(v["ok"], false, "the splicing proxy read every byte: the kernel no longer loses them; {v} {c:?}");
    assert_eq!(c[0]["received"], 0, "{c:?}");
    assert_eq!(c[0]["end"], "eof", "{c:?}");
    assert!(counter(&m, "sockmap_bytes") >= n, "the bytes were redirected (and lost): {}", counters(&m));
    // Without acceleration the same proxy reads them all.
    drop(srv);
    let plain = mesh(&[], &[]);
    let _srv = serve(plain.pod("a"));
    let v = run(plain.pod("a"), &["--mode", "sink", "--bytes", &n.to_string(), "--server-splice"]);
    assert_ok(&v, "a splicing proxy without sockmap", &plain);
}

#[test]
fn many_concurrent_connections() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let _srv = serve(a);
    let v = run(a, &["--mode", "echo", "--bytes", &(256 * 1024).to_string(), "--conns", "200", "--timeout-ms", "20000"]);
    assert_ok(&v, "200 connections", &m);
    let c = counters(&m);
    assert_eq!(c["captured"], 200, "{c}");
    assert!(c["sockmap_bytes"].as_u64().unwrap() >= 200 * 256 * 1024, "at least the proxy's direction is redirected: {c}");
}

#[test]
fn the_proxy_restarting_mid_stream_fails_the_connection_cleanly_and_the_next_is_accelerated() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let mut srv = serve(a);
    let fallbacks = counter(&m, "sockmap_fallbacks");
    // 64 MiB at 64 KiB per 10 ms: about 10 s, killed after 0.5 s.
    let mut app = start_run(a, &["--mode", "sink", "--bytes", &(64 * MIB).to_string(), "--pace-ms", "10", "--timeout-ms", "5000"]);
    std::thread::sleep(Duration::from_millis(500));
    srv.kill();
    let t = Instant::now();
    let (st, out) = app.finish(Duration::from_secs(30));
    assert!(st.success(), "{out} {}", app.stderr());
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], false, "the transfer cannot have completed: {v}");
    let err = v["errors"][0].as_str().unwrap().to_string();
    assert!(!err.contains("timed out") && !err.contains("Resource temporarily unavailable"), "the app stalled: {err}");
    assert!(t.elapsed() < Duration::from_secs(5), "the app took {:?} to notice", t.elapsed());
    // The app's next message found no peer: it went to TCP (which reset it), counted once.
    assert_eq!(counter(&m, "sockmap_fallbacks"), fallbacks + 1, "{}", counters(&m));
    let before = counter(&m, "sockmap_bytes");
    let _srv2 = serve(a);
    assert_ok(&run(a, &["--mode", "source", "--bytes", &(8 * MIB).to_string()]), "after the restart", &m);
    assert!(counter(&m, "sockmap_bytes") >= before + 8 * MIB, "{}", counters(&m));
}

#[test]
fn a_pod_removed_while_connections_are_open_loses_nothing() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let cookie = a.cookie().unwrap();
    let _srv = serve(a);
    // 16 MiB at 64 KiB per 10 ms each way: about 2.5 s, the pod removed after 0.5 s.
    let mut app = start_run(a, &["--mode", "echo", "--bytes", &(16 * MIB).to_string(), "--conns", "4", "--pace-ms", "10"]);
    std::thread::sleep(Duration::from_millis(500));
    m.mesh.remove("pod-a.yaml");
    let deadline = Instant::now() + WAIT;
    while inspect(m.pins.path()).as_array().unwrap().iter().any(|p| p["netns_cookie"].as_u64() == Some(cookie)) {
        assert!(Instant::now() < deadline, "the agent did not remove the pod");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(app.try_wait().unwrap().is_none(), "the transfer ended before the pod was removed: the test proves nothing");
    let (st, out) = app.finish(Duration::from_secs(60));
    assert!(st.success(), "{out} {}", app.stderr());
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_ok(&v, "transfers across the pod's removal", &m);
}

/// Kernel finding: redirected bytes are charged to the receiver outside its TCP receive
/// buffer, so a writer is not held back by a reader that does not read. Plain TCP stops the
/// writer after a few MiB (receive window + send buffer); through sockmap all of it is
/// queued at the reader at once. Pinned as the kernel does it today.
#[test]
fn kernel_finding_a_slow_proxy_does_not_hold_the_app_back() {
    require_root!();
    let n = (64 * MIB).to_string();
    let args = ["--mode", "sink", "--bytes", n.as_str(), "--server-delay-ms", "2000", "--timeout-ms", "10000"];
    let plain = mesh(&[], &[]);
    let srv = serve(plain.pod("a"));
    let v = run(plain.pod("a"), &args);
    assert_ok(&v, "plain", &plain);
    eprintln!("plain TCP, reader idle for 2 s: {v}");
    assert!(v["write_ms"].as_u64().unwrap() >= 1500, "plain TCP held the writer until the reader read: {v}");
    drop(srv);
    drop(plain);
    let m = accelerated();
    let _srv = serve(m.pod("a"));
    let v = run(m.pod("a"), &args);
    assert_ok(&v, "sockmap", &m);
    eprintln!("sockmap, reader idle for 2 s: {v}");
    assert!(v["write_ms"].as_u64().unwrap() < 1500, "the writer waited for the reader, as with TCP: the kernel changed; {v}");
    assert!(counter(&m, "sockmap_bytes") >= 64 * MIB, "{}", counters(&m));
}

/// The agent restarted with `--sockmap` swaps its pinned sk_msg link in place: a transfer
/// open across the restart completes, and the next connection is accelerated. Restarted
/// without the flag, it removes the link and the pod's flag: the open transfer still
/// completes, new connections take plain TCP.
#[test]
fn agent_restarts_keep_open_transfers_and_without_the_flag_turn_it_off() {
    require_root!();
    let mut m = accelerated();
    let a = m.topo.pod("a");
    let _srv = serve(a);
    let transfer =
        |a: &Pod| start_run(a, &["--mode", "echo", "--bytes", &(8 * MIB).to_string(), "--pace-ms", "10", "--timeout-ms", "10000"]);
    let mut open = transfer(a);
    std::thread::sleep(Duration::from_millis(300));
    m.agent.kill9();
    m.agent.restart();
    m.agent.wait_ready(WAIT);
    let (st, out) = open.finish(Duration::from_secs(60));
    assert!(st.success(), "{out}");
    assert_ok(&serde_json::from_str(out.trim()).unwrap(), "echo across an agent restart", &m);
    assert!(m.agent.log().contains("sockmap=true"), "{}", m.agent.log());
    let before = counter(&m, "sockmap_bytes");
    assert_ok(&run(a, &["--mode", "source", "--bytes", &MIB.to_string()]), "after the restart", &m);
    assert!(counter(&m, "sockmap_bytes") >= before + MIB, "{}", counters(&m));

    // Without the flag: a new agent, the same pins and cgroup.
    let mut open = transfer(a);
    std::thread::sleep(Duration::from_millis(300));
    m.agent.stop();
    let config = m.mesh.path().display().to_string();
    let mut plain = Agent::start_with_source(m.topo.cgroup().path(), m.pins.path(), &["--config", &config], &[]);
    plain.wait_ready(WAIT);
    let deadline = Instant::now() + WAIT;
    while m.inspect_pod(a)["flags"].as_array().unwrap().contains(&"sockmap".into()) {
        assert!(Instant::now() < deadline, "the pod kept its sockmap flag: {}", plain.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(plain.log().contains("sk_msg link was removed"), "{}", plain.log());
    let (st, out) = open.finish(Duration::from_secs(60));
    assert!(st.success(), "{out}");
    assert_ok(&serde_json::from_str(out.trim()).unwrap(), "echo across the switch off", &m);
    let before = counter(&m, "sockmap_bytes");
    assert_ok(&run(a, &["--mode", "source", "--bytes", &MIB.to_string()]), "with sockmap off", &m);
    assert_eq!(counter(&m, "sockmap_bytes"), before, "a new connection was accelerated: {}", counters(&m));
}

// ---- The inbound hop: Envoy (from 127.0.0.6 / ::6) → the app on the pod's own address ----

const APP_PORT: u16 = 8080;

/// The app, on the pod's own addresses (where the inbound hop connects).
fn serve_app(pod: &Pod) -> Spawned {
    let mut c = Command::new(BIN);
    let (v4, v6) = (pod.ipv4().to_string(), pod.ipv6().to_string());
    c.args(["serve", "--port", &APP_PORT.to_string(), "--host", &v4, "--host", &v6, "--max-secs", "120"]);
    let mut p = spawn_in(pod, Creds::APP.uid, Creds::APP.gid, c).expect("sc-sockmap serve (app)");
    assert!(p.wait_stdout("\"listening\"", Duration::from_secs(10)), "serve did not start: {}", p.stderr());
    p
}

/// The proxy's inbound hop: from Envoy's passthrough source to the app at the pod's address.
fn run_inbound(pod: &Pod, v6: bool, args: &[&str]) -> Value {
    let (to, bind) = if v6 { (format!("[{}]:{APP_PORT}", pod.ipv6()), "::6") } else { (format!("{}:{APP_PORT}", pod.ipv4()), "127.0.0.6") };
    let mut c = Command::new(BIN);
    c.args(["run", &to, "--bind", bind]).args(args);
    let mut p = spawn_in(pod, Creds::PROXY.uid, Creds::PROXY.gid, c).expect("sc-sockmap run (proxy)");
    let (st, out) = p.finish(Duration::from_secs(60));
    assert!(st.success(), "sc-sockmap run {args:?}: {st:?}\nstdout: {out}\nstderr: {}", p.stderr());
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

fn inbound_hop_both_ways(v6: bool) {
    let m = accelerated();
    let a = m.pod("a");
    let srv = serve_app(a);
    let n = if v6 { 8 * MIB } else { 32 * MIB };
    // proxy → app (the request direction), then the proxy's half-close.
    assert_ok(&run_inbound(a, v6, &["--mode", "sink", "--bytes", &n.to_string()]), "proxy → app", &m);
    let after_sink = counter(&m, "sockmap_bytes");
    // app → proxy (the response direction).
    assert_ok(&run_inbound(a, v6, &["--mode", "source", "--bytes", &n.to_string()]), "app → proxy", &m);
    let after_source = counter(&m, "sockmap_bytes");
    assert_ok(&run_inbound(a, v6, &["--mode", "echo", "--bytes", &(16 * MIB).to_string()]), "echo", &m);
    let c = counters(&m);
    // Both ends join the map before they can send: every byte each way is redirected.
    assert!(after_sink >= n, "proxy → app not redirected: {c}");
    assert!(after_source - after_sink >= n, "app → proxy not redirected: {c}");
    assert!(c["sockmap_bytes"].as_u64().unwrap() - after_source >= 2 * 16 * MIB, "echo not redirected both ways: {c}");
    assert_eq!(c["sockmap_fallbacks"], 0, "{c}");
    // Nothing was captured: the hop is Envoy's own connection, left as it is.
    assert_eq!(c["captured"], 0, "{c}");
    for conn in wait_conns(&srv, 3) {
        assert_eq!(conn["ok"], true, "{conn}");
    }
}

#[test]
fn inbound_hop_large_transfers_both_ways_arrive_exact_and_redirected() {
    require_root!();
    inbound_hop_both_ways(false);
}

#[test]
fn ipv6_inbound_hop_transfers_both_ways_arrive_exact_and_redirected() {
    require_root!();
    inbound_hop_both_ways(true);
}

#[test]
fn inbound_hop_is_plain_tcp_without_the_flag_or_with_the_annotation() {
    require_root!();
    for m in [mesh(&[], &[]), mesh(&["--sockmap"], &[("sidecap.io/sockmap", "false")])] {
        let a = m.pod("a");
        let _srv = serve_app(a);
        assert_ok(&run_inbound(a, false, &["--mode", "echo", "--bytes", &(4 * MIB).to_string()]), "echo", &m);
        assert_ok(&run_inbound(a, true, &["--mode", "echo", "--bytes", &MIB.to_string()]), "echo v6", &m);
        let c = counters(&m);
        assert_eq!(c["sockmap_msgs"], 0, "{c}");
        assert_eq!(c["sockmap_fallbacks"], 0, "{c}");
    }
}

#[test]
fn inbound_hop_resets_from_either_side_end_the_connection() {
    require_root!();
    let m = accelerated();
    let a = m.pod("a");
    let srv = serve_app(a);
    // The app resets after reading 1 MiB: the proxy sees ECONNRESET, not a stall.
    assert_ok(&run_inbound(a, false, &["--mode", "rst-proxy", "--bytes", &MIB.to_string()]), "reset by the app", &m);
    // The proxy resets mid-stream: the app's read ends (reset or EOF), not a stall.
    assert_ok(&run_inbound(a, false, &["--mode", "rst-app", "--bytes", &MIB.to_string()]), "reset by the proxy", &m);
    let c = wait_conns(&srv, 2);
    assert_eq!(c.len(), 2, "{c:?}");
    let proxy_reset = c.iter().find(|v| v["mode"] == "RstApp").unwrap_or_else(|| panic!("{c:?}"));
    assert_ne!(proxy_reset["end"], "timeout", "the app stalled after the proxy's reset: {proxy_reset}");
    assert!(counter(&m, "sockmap_msgs") > 0, "{}", counters(&m));
}
