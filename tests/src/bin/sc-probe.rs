//! sc-probe: a tiny client/server the sandbox runs inside pods (in the pod's netns and
//! cgroup, so sidecap's cgroup programs see it). Output is JSON, one object per line.
//!
//!   sc-probe connect ADDR:PORT [--bind ADDR[:PORT]] [--send TEXT] [--timeout-ms N] [--udp]
//!   sc-probe loop ADDR:PORT --count N --interval-ms M [--summary-only] [connect options]
//!   sc-probe listen ADDR:PORT [--once] [--udp] [--max-conns N] [--max-secs S] [--timeout-ms N]
//!
//! connect: {"ok","errno","error","stage","local","peer","reply","connect_us"} — after
//! connecting it sends TEXT, shuts down its write side and reads until EOF or timeout.
//! listen: first {"event":"listening","local"}, then per connection
//! {"event":"conn","local","peer","orig_dst","orig_dst_errno",…,"received"}; replies
//! `listen <local>\n` then echoes.

use sidecap_tests::sockaddr::{from_raw, to_raw};
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SO_ORIGINAL_DST: libc::c_int = 80; // SOL_IP
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80; // SOL_IPV6
const MAX_REPLY: usize = 1 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("sc-probe: {msg}");
            ExitCode::from(2)
        }
    }
}

#[derive(Default)]
struct Opts {
    target: Option<SocketAddr>,
    bind: Option<SocketAddr>,
    send: String,
    timeout: Duration,
    udp: bool,
    count: u64,
    interval: Duration,
    summary_only: bool,
    once: bool,
    max_conns: u64,
    max_secs: u64,
    /// Keep the connection open this long after connecting, before sending.
    hold: Duration,
    /// UDP without connect(): sendto/recvfrom; `peer` is the reply's source address.
    sendto: bool,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("bad address {s:?} (want IP:PORT or [IPv6]:PORT): {e}"))
}

// --bind takes ADDR or ADDR:PORT.
fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = s.trim_matches(|c| c == '[' || c == ']').parse().map_err(|e| format!("bad --bind {s:?}: {e}"))?;
    Ok(SocketAddr::new(ip, 0))
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        timeout: Duration::from_millis(3000),
        count: 1,
        interval: Duration::from_millis(100),
        max_conns: 10_000,
        max_secs: 600,
        ..Default::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        let num = |v: String, name: &str| v.parse::<u64>().map_err(|e| format!("{name}: {e}"));
        match a.as_str() {
            "--bind" => o.bind = Some(parse_bind(&val("--bind")?)?),
            "--send" => o.send = val("--send")?,
            "--timeout-ms" => o.timeout = Duration::from_millis(num(val(a)?, a)?.clamp(1, 600_000)),
            "--udp" => o.udp = true,
            "--count" => o.count = num(val(a)?, a)?.clamp(1, 100_000),
            "--interval-ms" => o.interval = Duration::from_millis(num(val(a)?, a)?.min(60_000)),
            "--summary-only" => o.summary_only = true,
            "--once" => o.once = true,
            "--sendto" => {
                o.sendto = true;
                o.udp = true;
            }
            "--hold-ms" => o.hold = Duration::from_millis(num(val(a)?, a)?.min(60_000)),
            "--max-conns" => o.max_conns = num(val(a)?, a)?.clamp(1, 100_000),
            "--max-secs" => o.max_secs = num(val(a)?, a)?.clamp(1, 3600),
            s if !s.starts_with("--") && o.target.is_none() => o.target = Some(parse_addr(s)?),
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    Ok(o)
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let (cmd, rest) = args.split_first().ok_or("usage: sc-probe connect|loop|listen ADDR:PORT [options]")?;
    let o = parse_opts(rest)?;
    let target = o.target.ok_or("missing ADDR:PORT")?;
    match cmd.as_str() {
        "connect" => {
            let r = connect_once(target, &o);
            let ok = r["ok"] == json!(true);
            println!("{r}");
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        "loop" => Ok(run_loop(target, &o)),
        "listen" => listen(target, &o).map(|_| ExitCode::SUCCESS).map_err(|e| format!("listen {target}: {e}")),
        other => Err(format!("unknown command {other:?}")),
    }
}

fn run_loop(target: SocketAddr, o: &Opts) -> ExitCode {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errnos = serde_json::Map::new();
    let mut peers = serde_json::Map::new();
    for seq in 0..o.count {
        let mut r = connect_once(target, o);
        if r["ok"] == json!(true) {
            ok += 1;
        } else {
            failed += 1;
        }
        let key = r["errno"].to_string();
        let n = errnos.get(&key).and_then(Value::as_u64).unwrap_or(0) + 1;
        errnos.insert(key, json!(n));
        if let Some(first) = r["reply"].as_str().and_then(|s| s.lines().next()) {
            let n = peers.get(first).and_then(Value::as_u64).unwrap_or(0) + 1;
            peers.insert(first.to_owned(), json!(n));
        }
        if !o.summary_only {
            r["seq"] = json!(seq);
            println!("{r}");
        }
        if seq + 1 < o.count {
            std::thread::sleep(o.interval);
        }
    }
    println!("{}", json!({"summary": true, "count": o.count, "ok": ok, "failed": failed, "errnos": errnos, "banners": peers}));
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn errno_of(e: &io::Error) -> Value {
    e.raw_os_error().map(Value::from).unwrap_or(Value::Null)
}

fn result(
    stage: &str,
    err: Option<&io::Error>,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    reply: &[u8],
    connect_us: Option<u128>,
) -> Value {
    json!({
        "ok": err.is_none(),
        "errno": err.map(errno_of).unwrap_or(Value::Null),
        "error": err.map(|e| Value::from(e.to_string())).unwrap_or(Value::Null),
        "stage": stage,
        "local": local.map(|a| a.to_string()),
        "peer": peer.map(|a| a.to_string()),
        "reply": String::from_utf8_lossy(reply),
        "connect_us": connect_us.map(|v| v as u64),
        // SAFETY: getuid has no preconditions.
        "uid": unsafe { libc::getuid() },
    })
}

// A v4 --bind for a v6 (e.g. v4-mapped) target becomes ::ffff:a.b.c.d.
fn bind_for(target: SocketAddr, bind: SocketAddr) -> SocketAddr {
    match (target, bind) {
        (SocketAddr::V6(_), SocketAddr::V4(b)) => SocketAddr::new(IpAddr::V6(b.ip().to_ipv6_mapped()), b.port()),
        _ => bind,
    }
}

/// Unconnected UDP: what cgroup sendmsg/recvmsg programs see.
fn sendto_once(target: SocketAddr, o: &Opts) -> Value {
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let sock = match UdpSocket::bind(o.bind.unwrap_or(any)) {
        Ok(s) => s,
        Err(e) => return result("bind", Some(&e), None, None, b"", None),
    };
    let _ = sock.set_read_timeout(Some(o.timeout));
    let local = sock.local_addr().ok();
    if let Err(e) = sock.send_to(o.send.as_bytes(), target) {
        return result("send", Some(&e), local, None, b"", None);
    }
    let mut buf = vec![0u8; 65536];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => result("done", None, local, Some(from), &buf[..n], None),
        Err(e) => result("recv", Some(&e), local, None, b"", None),
    }
}

fn connect_once(target: SocketAddr, o: &Opts) -> Value {
    if o.sendto {
        return sendto_once(target, o);
    }
    let deadline = Instant::now() + o.timeout;
    let ty = if o.udp { libc::SOCK_DGRAM } else { libc::SOCK_STREAM };
    let fd = match new_socket(target, ty) {
        Ok(fd) => fd,
        Err(e) => return result("socket", Some(&e), None, None, b"", None),
    };
    // SAFETY: fd is a fresh socket we own; the wrapper closes it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    if let Some(b) = o.bind {
        let b = bind_for(target, b);
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        if let Err(e) = sys_bind(fd, b) {
            return result("bind", Some(&e), None, None, b"", None);
        }
    }
    let t0 = Instant::now();
    let connected = nonblocking_connect(fd, target, deadline);
    let connect_us = t0.elapsed().as_micros();
    let local = sockname(fd, false);
    if let Err(e) = connected {
        return result("connect", Some(&e), local, None, b"", Some(connect_us));
    }
    let peer = sockname(fd, true);
    if !o.hold.is_zero() {
        std::thread::sleep(o.hold);
    }
    if o.udp {
        let sock = UdpSocket::from(owned);
        let _ = sock.set_nonblocking(false);
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let _ = sock.set_read_timeout(Some(remaining));
        if let Err(e) = sock.send(o.send.as_bytes()) {
            return result("send", Some(&e), local, peer, b"", Some(connect_us));
        }
        let mut buf = vec![0u8; 65536];
        return match sock.recv(&mut buf) {
            Ok(n) => result("done", None, local, peer, &buf[..n], Some(connect_us)),
            Err(e) => result("recv", Some(&e), local, peer, b"", Some(connect_us)),
        };
    }
    let mut stream = TcpStream::from(owned);
    let _ = stream.set_nonblocking(false);
    let remaining = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let _ = stream.set_write_timeout(Some(remaining()));
    if !o.send.is_empty() {
        if let Err(e) = stream.write_all(o.send.as_bytes()) {
            return result("send", Some(&e), local, peer, b"", Some(connect_us));
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            let e = io::Error::from_raw_os_error(libc::ETIMEDOUT);
            return result("recv", Some(&e), local, peer, &reply, Some(connect_us));
        }
        let _ = stream.set_read_timeout(Some(remaining()));
        match stream.read(&mut buf) {
            Ok(0) => return result("done", None, local, peer, &reply, Some(connect_us)),
            Ok(n) if reply.len() < MAX_REPLY => reply.extend_from_slice(&buf[..n]),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                let e = io::Error::from_raw_os_error(libc::ETIMEDOUT);
                return result("recv", Some(&e), local, peer, &reply, Some(connect_us));
            }
            Err(e) => return result("recv", Some(&e), local, peer, &reply, Some(connect_us)),
        }
    }
}

fn new_socket(target: SocketAddr, ty: libc::c_int) -> io::Result<RawFd> {
    let domain = if target.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(fd) }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: valid fd and an int option value.
    unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), size_of::<libc::c_int>() as _) };
}

fn sys_bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let (ss, len) = to_raw(addr);
    // SAFETY: valid sockaddr of the given length.
    if unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockname(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    // SAFETY: out-buffer is a sockaddr_storage with its size.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: p and len describe a writable sockaddr_storage.
    let rc = unsafe { if peer { libc::getpeername(fd, p, &mut len) } else { libc::getsockname(fd, p, &mut len) } };
    if rc == 0 { from_raw(&ss) } else { None }
}

// Non-blocking connect + poll, so the whole attempt honours the deadline.
fn nonblocking_connect(fd: RawFd, target: SocketAddr, deadline: Instant) -> io::Result<()> {
    let (ss, len) = to_raw(target);
    // SAFETY: valid sockaddr of the given length.
    if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINPROGRESS) {
        return Err(err);
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut soerr: libc::c_int = 0;
        let mut l = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: int out-buffer with its size.
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut soerr as *mut libc::c_int).cast(), &mut l) };
        return if soerr == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(soerr)) };
    }
}

/// `getsockopt(level, 80)` into a sockaddr of the level's family.
fn original_dst(fd: RawFd, level: libc::c_int) -> Result<Option<SocketAddr>, i32> {
    // SAFETY: sockaddr_storage out-buffer; the kernel writes at most `len` bytes.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let (name, mut len) = if level == libc::SOL_IP {
        (SO_ORIGINAL_DST, size_of::<libc::sockaddr_in>() as libc::socklen_t)
    } else {
        (IP6T_SO_ORIGINAL_DST, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
    };
    // SAFETY: ss and len describe a writable sockaddr_storage, large enough for either answer.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    Ok(from_raw(&ss))
}

fn orig_json(r: Result<Option<SocketAddr>, i32>) -> (Value, Value) {
    match r {
        Ok(a) => (json!(a.map(|a| a.to_string())), Value::Null),
        Err(e) => (Value::Null, json!(e)),
    }
}

fn listen(addr: SocketAddr, o: &Opts) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(o.max_secs);
    let max = if o.once { 1 } else { o.max_conns };
    if o.udp {
        let sock = UdpSocket::bind(addr)?;
        let local = sock.local_addr()?;
        println!("{}", json!({"event": "listening", "local": local.to_string(), "udp": true}));
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; 65536];
        let mut handled = 0;
        while handled < max && Instant::now() < deadline {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                handled += 1;
                let mut reply = format!("listen {local}\n").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer);
                println!(
                    "{}",
                    json!({"event": "datagram", "local": local.to_string(), "peer": peer.to_string(), "received": String::from_utf8_lossy(&buf[..n])})
                );
            }
        }
        return Ok(());
    }
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    println!("{}", json!({"event": "listening", "local": local.to_string()}));
    let _ = io::stdout().flush();
    let mut handled = 0;
    let mut workers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while handled < max && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, peer)) => {
                handled += 1;
                let timeout = o.timeout;
                if o.once {
                    handle_conn(stream, peer, timeout);
                } else {
                    workers.push(std::thread::spawn(move || handle_conn(stream, peer, timeout)));
                    workers.retain(|w| !w.is_finished());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e),
        }
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

fn handle_conn(mut stream: TcpStream, peer: SocketAddr, timeout: Duration) {
    let fd = stream.as_raw_fd();
    let local = stream.local_addr().ok();
    // The family-appropriate query first (what Envoy does), then SOL_IP on v6 sockets too,
    // since a dual-stack socket may carry a v4(-mapped) connection.
    let (orig, orig_errno, alt, alt_errno);
    if local.is_some_and(|l| l.is_ipv4()) {
        (orig, orig_errno) = orig_json(original_dst(fd, libc::SOL_IP));
        (alt, alt_errno) = (Value::Null, Value::Null);
    } else {
        (orig, orig_errno) = orig_json(original_dst(fd, libc::SOL_IPV6));
        (alt, alt_errno) = orig_json(original_dst(fd, libc::SOL_IP));
    }
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let banner = format!("listen {}\n", local.map(|l| l.to_string()).unwrap_or_default());
    let _ = stream.write_all(banner.as_bytes());
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut error = Value::Null;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if received.len() < MAX_REPLY {
                    received.extend_from_slice(&buf[..n]);
                }
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = json!(e.to_string());
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    println!(
        "{}",
        json!({
            "event": "conn",
            "local": local.map(|l| l.to_string()),
            "peer": peer.to_string(),
            "orig_dst": orig, "orig_dst_errno": orig_errno,
            "orig_dst_sol_ip": alt, "orig_dst_sol_ip_errno": alt_errno,
            "received": String::from_utf8_lossy(&received),
            "error": error,
            // SAFETY: getuid has no preconditions.
            "uid": unsafe { libc::getuid() },
        })
    );
    let _ = io::stdout().flush();
}
