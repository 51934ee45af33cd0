//! sc-load: the benchmarks' load generator and upstream server (JSON output).
//!
//!   sc-load run ADDR:PORT [--concurrency C] [--duration-ms D] [--warmup-ms W]
//!               [--max-count N] [--send TEXT] [--timeout-ms T] [--expect ok|fail]
//!   sc-load serve ADDR:PORT [--reply TEXT] [--threads N] [--max-secs S]
//!
//! run: C workers (threads), each repeating connect → send TEXT → first byte of the reply →
//! close with a reset (SO_LINGER 0: no TIME_WAIT, so the ephemeral ports never run out).
//! Only connections started after the warm-up and finished within the window count.
//! Bounded by D+W milliseconds and N connections. Prints one JSON object: counts, errors by
//! stage and errno, the rate, and percentiles of `connect_us` (the connect() call) and
//! `ttfb_us` (connect start → first reply byte). With `--expect fail` a connection counts as
//! ok when it fails (connect error, or reset/EOF before any reply byte) and `ttfb_us` is the
//! time until it did.
//!
//! serve: an epoll server that answers the first bytes of each connection with TEXT
//! (default `ok\n`) and closes when the client does. Bounded by --max-secs (default 900).

use sidecap_tests::sockaddr::to_raw;
use std::collections::BTreeMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Opts {
    target: SocketAddr,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    max_count: u64,
    send: String,
    reply: String,
    timeout: Duration,
    expect_fail: bool,
    threads: usize,
    max_secs: u64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut it = args.iter();
    let target = it.next().ok_or("missing ADDR:PORT")?;
    let target: SocketAddr = target.parse().map_err(|e| format!("bad address {target:?}: {e}"))?;
    let mut o = Opts {
        target,
        concurrency: 1,
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(100),
        max_count: 1_000_000,
        send: "GET\n".into(),
        reply: "ok\n".into(),
        timeout: Duration::from_millis(2000),
        expect_fail: false,
        threads: 2,
        max_secs: 900,
    };
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--concurrency" => o.concurrency = num(val()?)?.clamp(1, 512) as usize,
            "--duration-ms" => o.duration = Duration::from_millis(num(val()?)?.min(600_000)),
            "--warmup-ms" => o.warmup = Duration::from_millis(num(val()?)?.min(60_000)),
            "--max-count" => o.max_count = num(val()?)?.min(10_000_000),
            "--send" => o.send = val()?,
            "--reply" => o.reply = val()?,
            "--timeout-ms" => o.timeout = Duration::from_millis(num(val()?)?.clamp(1, 60_000)),
            "--expect" => {
                o.expect_fail = match val()?.as_str() {
                    "ok" => false,
                    "fail" => true,
                    v => return Err(format!("--expect ok|fail, not {v:?}")),
                }
            }
            "--threads" => o.threads = num(val()?)?.clamp(1, 16) as usize,
            "--max-secs" => o.max_secs = num(val()?)?,
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: sc-load run|serve ADDR:PORT [options]");
        return ExitCode::from(2);
    };
    let o = match parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sc-load: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match cmd.as_str() {
        "run" => run(&o),
        "serve" => serve(&o),
        c => Err(format!("unknown command {c:?}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sc-load: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Default)]
struct WorkerResult {
    connect_ns: Vec<u64>,
    ttfb_ns: Vec<u64>,
    failed: u64,
    errors: BTreeMap<String, u64>,
}

fn run(o: &Opts) -> Result<(), String> {
    let start = Instant::now();
    let warm_end = start + o.warmup;
    let end = warm_end + o.duration;
    let done = Arc::new(AtomicU64::new(0));
    let results: Vec<WorkerResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..o.concurrency)
            .map(|_| {
                let done = done.clone();
                s.spawn(move || worker(o, warm_end, end, &done))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut connect = Vec::new();
    let mut ttfb = Vec::new();
    let mut failed = 0;
    let mut errors = BTreeMap::new();
    for r in results {
        connect.extend(r.connect_ns);
        ttfb.extend(r.ttfb_ns);
        failed += r.failed;
        for (k, v) in r.errors {
            *errors.entry(k).or_insert(0) += v;
        }
    }
    let window = o.duration.as_secs_f64();
    let ok = ttfb.len() as u64;
    let errs: Vec<String> = errors.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
    println!(
        "{{\"ok\":{ok},\"failed\":{failed},\"errors\":{{{}}},\"secs\":{window},\"rate\":{:.1},\"concurrency\":{},\"connect_us\":{},\"ttfb_us\":{}}}",
        errs.join(","),
        ok as f64 / window,
        o.concurrency,
        summary(&mut connect),
        summary(&mut ttfb)
    );
    Ok(())
}

fn summary(ns: &mut [u64]) -> String {
    if ns.is_empty() {
        return "null".into();
    }
    ns.sort_unstable();
    let q = |p: f64| ns[((ns.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    let mean = ns.iter().map(|v| *v as f64).sum::<f64>() / ns.len() as f64 / 1000.0;
    format!(
        "{{\"n\":{},\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"p999\":{:.2},\"min\":{:.2},\"max\":{:.2},\"mean\":{:.2}}}",
        ns.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        ns[0] as f64 / 1000.0,
        ns[ns.len() - 1] as f64 / 1000.0,
        mean
    )
}

enum Outcome {
    /// connect() time, time to the first reply byte.
    Replied(u64, u64),
    /// Failed at (stage, errno) after this long; connect() time if it connected.
    Failed(&'static str, i32, u64, Option<u64>),
}

fn worker(o: &Opts, warm_end: Instant, end: Instant, done: &AtomicU64) -> WorkerResult {
    let mut r = WorkerResult::default();
    let cap = (o.max_count as usize / o.concurrency).min(1 << 20);
    r.connect_ns.reserve(cap);
    r.ttfb_ns.reserve(cap);
    loop {
        let t0 = Instant::now();
        if t0 >= end || done.load(Ordering::Relaxed) >= o.max_count {
            break;
        }
        let outcome = once(o);
        let finished = Instant::now();
        if t0 < warm_end || finished > end {
            continue;
        }
        done.fetch_add(1, Ordering::Relaxed);
        match (outcome, o.expect_fail) {
            (Outcome::Replied(c, t), false) => {
                r.connect_ns.push(c);
                r.ttfb_ns.push(t);
            }
            (Outcome::Failed(stage, errno, t, c), true) if stage != "timeout" => {
                if let Some(c) = c {
                    r.connect_ns.push(c);
                }
                r.ttfb_ns.push(t);
                *r.errors.entry(format!("{stage}:{errno}")).or_insert(0) += 1;
            }
            (Outcome::Failed(stage, errno, _, _), _) => {
                r.failed += 1;
                *r.errors.entry(format!("{stage}:{errno}")).or_insert(0) += 1;
            }
            (Outcome::Replied(..), true) => {
                r.failed += 1;
                *r.errors.entry("unexpected-reply".into()).or_insert(0) += 1;
            }
        }
    }
    r
}

fn once(o: &Opts) -> Outcome {
    let t0 = Instant::now();
    let el = || t0.elapsed().as_nanos() as u64;
    let fd = match new_socket(o.target, false) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Failed("socket", e.raw_os_error().unwrap_or(0), el(), None),
    };
    let tv = libc::timeval { tv_sec: o.timeout.as_secs() as _, tv_usec: o.timeout.subsec_micros() as _ };
    // SAFETY: valid fd, timeval option values.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as _);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), size_of::<libc::timeval>() as _);
    }
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    let (ss, len) = to_raw(o.target);
    // SAFETY: valid fd and sockaddr.
    let rc = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    let connect_ns = el();
    if rc != 0 {
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        abort(fd);
        let stage = if e == libc::EINPROGRESS || e == libc::EAGAIN { "timeout" } else { "connect" };
        return Outcome::Failed(stage, e, connect_ns, None);
    }
    // SAFETY: valid fd, our buffer.
    let n = unsafe { libc::send(fd, o.send.as_ptr().cast(), o.send.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        abort(fd);
        return Outcome::Failed("send", e, el(), Some(connect_ns));
    }
    let mut b = [0u8; 256];
    // SAFETY: valid fd, our buffer.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), 0) };
    let t = el();
    abort(fd);
    match n {
        n if n > 0 => Outcome::Replied(connect_ns, t),
        0 => Outcome::Failed("eof", 0, t, Some(connect_ns)),
        _ => {
            let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let stage = if e == libc::EAGAIN { "timeout" } else { "recv" };
            Outcome::Failed(stage, e, t, Some(connect_ns))
        }
    }
}

fn serve(o: &Opts) -> Result<(), String> {
    let lfd = new_socket(o.target, true).map_err(|e| format!("socket: {e}"))?;
    set_int(lfd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    let (ss, len) = to_raw(o.target);
    // SAFETY: valid fd and sockaddr.
    if unsafe { libc::bind(lfd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0
        // SAFETY: valid fd.
        || unsafe { libc::listen(lfd, 4096) } != 0
    {
        return Err(format!("listen {}: {}", o.target, io::Error::last_os_error()));
    }
    println!("{{\"event\":\"listening\",\"local\":\"{}\"}}", o.target);
    let deadline = Instant::now() + Duration::from_secs(o.max_secs);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..o.threads).map(|_| s.spawn(move || serve_loop(lfd, o, deadline))).collect();
        for h in hs {
            h.join().map_err(|_| "server thread panicked".to_string())??;
        }
        Ok(())
    })
}

fn serve_loop(lfd: RawFd, o: &Opts, deadline: Instant) -> Result<(), String> {
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, u64: u64::MAX };
    // SAFETY: valid fds.
    if ep < 0 || unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev) } != 0 {
        return Err(format!("epoll: {}", io::Error::last_os_error()));
    }
    // Per fd: has the reply been sent.
    let mut replied: Vec<bool> = Vec::new();
    // SAFETY: plain data.
    let mut events: Vec<libc::epoll_event> = vec![unsafe { zeroed() }; 256];
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        // SAFETY: events buffer of the given length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        for e in &events[..n.max(0) as usize] {
            if e.u64 == u64::MAX {
                for _ in 0..256 {
                    // SAFETY: accept on a listening socket.
                    let fd =
                        unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) };
                    if fd < 0 {
                        break;
                    }
                    set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
                    let i = fd as usize;
                    if replied.len() <= i {
                        replied.resize(i + 1, false);
                    }
                    replied[i] = false;
                    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
                    // SAFETY: valid fds.
                    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                }
                continue;
            }
            let fd = e.u64 as RawFd;
            // SAFETY: valid fd, our buffer.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                if !replied[fd as usize] {
                    replied[fd as usize] = true;
                    // SAFETY: valid fd, our buffer.
                    unsafe { libc::send(fd, o.reply.as_ptr().cast(), o.reply.len(), libc::MSG_NOSIGNAL) };
                }
                continue;
            }
            if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            // EOF or reset: done (closing removes it from the epoll set).
            abort(fd);
        }
    }
    Ok(())
}

fn abort(fd: RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd; closing it.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), size_of::<libc::linger>() as _);
        libc::close(fd);
    }
}

fn new_socket(addr: SocketAddr, nonblocking: bool) -> io::Result<RawFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let nb = if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | nb, 0) };
    if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(fd) }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: valid fd and an int option value.
    unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), size_of::<libc::c_int>() as _) };
}
