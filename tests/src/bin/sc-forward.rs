//! sc-forward: a small, fast transparent forwarder standing in for Envoy in benchmarks.
//!
//!   sc-forward [--outbound PORT] [--inbound PORT] [--v6] [--threads N] [--max-secs S]
//!              [--max-conns N] [--blackhole ADDR:PORT]... [--inbound-source IP]
//!
//! Listens on 127.0.0.1:OUTBOUND (and [::1]:OUTBOUND with --v6) and 0.0.0.0:INBOUND. For
//! each accepted connection it asks the original destination exactly as Envoy does
//! (`getsockopt(SOL_IP, SO_ORIGINAL_DST)` on v4 sockets, `SOL_IPV6, IP6T_SO_ORIGINAL_DST`
//! on v6 ones), connects there (inbound: from 127.0.0.6, Envoy's inbound passthrough
//! source) and copies bytes both ways. Connections whose original destination is a
//! `--blackhole` address are accepted and reset at once, like Envoy's BlackHoleCluster
//! under REGISTRY_ONLY. A connection without an original destination (or whose original
//! destination is the listener itself) is closed: it would loop.
//!
//! One epoll loop per thread (listeners shared with EPOLLEXCLUSIVE), non-blocking sockets,
//! one 64 KiB buffer per direction. A reset on either side aborts both (SO_LINGER 0), so
//! benchmarks leave no TIME_WAIT behind. Bounded: exits after --max-secs (default 900) or
//! --max-conns accepted connections (default 50,000,000); at most 8,192 connections at once
//! per thread (more are refused).
//!
//! Prints `{"event":"listening",...}` once every listener is up.

use sidecap_tests::sockaddr::{from_raw, to_raw};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SO_ORIGINAL_DST: libc::c_int = 80;
const BUF: usize = 64 * 1024;
const MAX_CONNS_PER_THREAD: usize = 8192;

struct Opts {
    outbound: Option<u16>,
    inbound: Option<u16>,
    v6: bool,
    threads: usize,
    max_secs: u64,
    max_conns: u64,
    blackhole: Vec<SocketAddr>,
    inbound_source: IpAddr,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        outbound: Some(15001),
        inbound: Some(15006),
        v6: false,
        threads: 1,
        max_secs: 900,
        max_conns: 50_000_000,
        blackhole: Vec::new(),
        inbound_source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--outbound" => o.outbound = Some(num(val()?)? as u16).filter(|p| *p != 0),
            "--inbound" => o.inbound = Some(num(val()?)? as u16).filter(|p| *p != 0),
            "--v6" => o.v6 = true,
            "--threads" => o.threads = num(val()?)?.clamp(1, 16) as usize,
            "--max-secs" => o.max_secs = num(val()?)?,
            "--max-conns" => o.max_conns = num(val()?)?,
            "--blackhole" => o.blackhole.push(val()?.parse().map_err(|e| format!("--blackhole: {e}"))?),
            "--inbound-source" => o.inbound_source = val()?.parse().map_err(|e| format!("--inbound-source: {e}"))?,
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sc-forward: {e}");
            return ExitCode::from(2);
        }
    };
    match run(o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sc-forward: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Outbound,
    Inbound,
}

struct Listener {
    fd: RawFd,
    addr: SocketAddr,
    kind: Kind,
}

fn run(o: Opts) -> Result<(), String> {
    let mut listeners = Vec::new();
    if let Some(p) = o.outbound {
        listeners.push((SocketAddr::from((Ipv4Addr::LOCALHOST, p)), Kind::Outbound));
        if o.v6 {
            listeners.push((SocketAddr::from((Ipv6Addr::LOCALHOST, p)), Kind::Outbound));
        }
    }
    if let Some(p) = o.inbound {
        listeners.push((SocketAddr::from((Ipv4Addr::UNSPECIFIED, p)), Kind::Inbound));
    }
    let listeners: Vec<Listener> = listeners
        .into_iter()
        .map(|(addr, kind)| listen(addr).map(|fd| Listener { fd, addr, kind }).map_err(|e| format!("listen {addr}: {e}")))
        .collect::<Result<_, _>>()?;
    let shown: Vec<String> = listeners.iter().map(|l| l.addr.to_string()).collect();
    println!("{{\"event\":\"listening\",\"local\":{shown:?}}}");
    let listeners = Arc::new(listeners);
    let opts = Arc::new(o);
    let accepted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(opts.max_secs);
    let handles: Vec<_> = (0..opts.threads)
        .map(|_| {
            let (l, o, a) = (listeners.clone(), opts.clone(), accepted.clone());
            std::thread::spawn(move || worker(&l, &o, &a, deadline))
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "worker panicked".to_string())??;
    }
    Ok(())
}

fn listen(addr: SocketAddr) -> io::Result<RawFd> {
    let fd = new_socket(addr)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    if addr.is_ipv6() {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
    }
    let (ss, len) = to_raw(addr);
    // SAFETY: valid fd and sockaddr.
    if unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: valid fd.
    if unsafe { libc::listen(fd, 4096) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// One direction's pending bytes.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new() -> Buf {
        Buf { data: vec![0; BUF].into_boxed_slice(), start: 0, end: 0 }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Side 0: the accepted (downstream) socket; side 1: the upstream socket.
/// `buf[s]` holds bytes read from side s, to be written to the other side.
struct Conn {
    fd: [RawFd; 2],
    buf: [Buf; 2],
    eof: [bool; 2],
    shut: [bool; 2],
    connected: bool,
    mask: [u32; 2],
}

const LISTENER_TAG: u64 = 1 << 63;

fn worker(listeners: &[Listener], o: &Opts, accepted: &AtomicU64, deadline: Instant) -> Result<(), String> {
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
    }
    for (i, l) in listeners.iter().enumerate() {
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, u64: LISTENER_TAG | i as u64 };
        // SAFETY: valid epoll fd, listener fd and event.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, l.fd, &mut ev) } != 0 {
            return Err(format!("epoll_ctl listener: {}", io::Error::last_os_error()));
        }
    }
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut live = 0usize;
    // SAFETY: epoll_event is plain data.
    let mut events: Vec<libc::epoll_event> = vec![unsafe { zeroed() }; 256];
    while Instant::now() < deadline && accepted.load(Ordering::Relaxed) < o.max_conns {
        // SAFETY: events buffer of the given length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let (bits, data) = (ev.events, ev.u64);
            if data & LISTENER_TAG != 0 {
                let l = &listeners[(data & !LISTENER_TAG) as usize];
                accept_all(ep, l, o, &mut conns, &mut free, &mut live, accepted);
                continue;
            }
            let (idx, side) = ((data >> 1) as usize, (data & 1) as usize);
            let done = match conns.get_mut(idx).and_then(Option::as_mut) {
                Some(c) => handle(ep, c, idx, side, bits),
                None => false,
            };
            if done {
                if let Some(c) = conns[idx].take() {
                    close_conn(&c, false);
                    free.push(idx);
                    live -= 1;
                }
            }
        }
    }
    Ok(())
}

fn accept_all(
    ep: RawFd,
    l: &Listener,
    o: &Opts,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
    live: &mut usize,
    accepted: &AtomicU64,
) {
    for _ in 0..256 {
        // SAFETY: accept4 on a listening socket, no address wanted.
        let fd = unsafe { libc::accept4(l.fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) };
        if fd < 0 {
            return; // EAGAIN (another thread took it) or a transient error.
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        if *live >= MAX_CONNS_PER_THREAD {
            abort(fd);
            continue;
        }
        let dst = match original_dst(fd, l.addr.is_ipv6()) {
            Some(d) if d.port() != l.addr.port() => d,
            _ => {
                abort(fd);
                continue;
            }
        };
        if l.kind == Kind::Outbound && o.blackhole.contains(&dst) {
            abort(fd); // Envoy's BlackHoleCluster: accepted, then closed.
            continue;
        }
        let up = match new_socket(dst) {
            Ok(u) => u,
            Err(_) => {
                abort(fd);
                continue;
            }
        };
        set_int(up, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        if l.kind == Kind::Inbound && dst.is_ipv4() {
            let (ss, len) = to_raw(SocketAddr::new(o.inbound_source, 0));
            // SAFETY: valid fd and sockaddr.
            if unsafe { libc::bind(up, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
                abort(fd);
                abort(up);
                continue;
            }
        }
        let (ss, len) = to_raw(dst);
        // SAFETY: valid fd and sockaddr.
        let rc = unsafe { libc::connect(up, (&ss as *const libc::sockaddr_storage).cast(), len) };
        let connected = rc == 0;
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            abort(fd);
            abort(up);
            continue;
        }
        let idx = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        let mut c = Conn { fd: [fd, up], buf: [Buf::new(), Buf::new()], eof: [false; 2], shut: [false; 2], connected, mask: [0; 2] };
        for s in 0..2 {
            let mut ev = libc::epoll_event { events: 0, u64: (idx as u64) << 1 | s as u64 };
            // SAFETY: valid fds.
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.fd[s], &mut ev) };
        }
        update(ep, &mut c, idx);
        conns[idx] = Some(c);
        *live += 1;
    }
}

/// Handles readiness on `side`; returns true when the connection is finished.
fn handle(ep: RawFd, c: &mut Conn, idx: usize, side: usize, bits: u32) -> bool {
    if side == 1 && !c.connected {
        if bits & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
            return false;
        }
        if so_error(c.fd[1]) != 0 {
            return true; // Upstream refused: the client sees a reset.
        }
        c.connected = true;
    }
    // Read what is readable, then flush both directions.
    for s in 0..2 {
        if s == 1 && !c.connected {
            continue;
        }
        if !c.eof[s] && c.buf[s].is_empty() {
            let b = &mut c.buf[s];
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(c.fd[s], b.data.as_mut_ptr().cast(), BUF) };
            if n > 0 {
                b.start = 0;
                b.end = n as usize;
            } else if n == 0 {
                c.eof[s] = true;
            } else {
                let e = io::Error::last_os_error().raw_os_error();
                if e != Some(libc::EAGAIN) && e != Some(libc::EINTR) {
                    return true;
                }
            }
        }
    }
    for s in 0..2 {
        let to = 1 - s;
        if to == 1 && !c.connected {
            continue;
        }
        let b = &mut c.buf[s];
        while !b.is_empty() {
            // SAFETY: writing from our buffer.
            let n = unsafe { libc::send(c.fd[to], b.data[b.start..].as_ptr().cast(), b.end - b.start, libc::MSG_NOSIGNAL) };
            if n > 0 {
                b.start += n as usize;
            } else {
                let e = io::Error::last_os_error().raw_os_error();
                if e == Some(libc::EAGAIN) || e == Some(libc::EINTR) {
                    break;
                }
                return true;
            }
        }
        if b.is_empty() {
            b.start = 0;
            b.end = 0;
            if c.eof[s] && !c.shut[to] {
                c.shut[to] = true;
                // SAFETY: valid fd.
                unsafe { libc::shutdown(c.fd[to], libc::SHUT_WR) };
            }
        }
    }
    if c.eof[0] && c.eof[1] && c.buf[0].is_empty() && c.buf[1].is_empty() {
        return true;
    }
    if bits & libc::EPOLLERR as u32 != 0 {
        return true;
    }
    update(ep, c, idx);
    false
}

fn update(ep: RawFd, c: &mut Conn, idx: usize) {
    for s in 0..2 {
        let other = 1 - s;
        let mut m = 0u32;
        let usable = s == 0 || c.connected;
        if usable && !c.eof[s] && c.buf[s].is_empty() {
            m |= libc::EPOLLIN as u32;
        }
        if (s == 1 && !c.connected) || (usable && !c.buf[other].is_empty()) {
            m |= libc::EPOLLOUT as u32;
        }
        if m != c.mask[s] {
            c.mask[s] = m;
            let mut ev = libc::epoll_event { events: m, u64: (idx as u64) << 1 | s as u64 };
            // SAFETY: valid fds registered with ep.
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, c.fd[s], &mut ev) };
        }
    }
}

fn close_conn(c: &Conn, _graceful: bool) {
    // Whatever ended it (EOF both ways, or a reset), abort: no TIME_WAIT from the proxy.
    for fd in c.fd {
        abort(fd);
    }
}

fn abort(fd: RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd; closing it.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), size_of::<libc::linger>() as _);
        libc::close(fd);
    }
}

fn so_error(fd: RawFd) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd and int buffer.
    unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut v as *mut libc::c_int).cast(), &mut len) };
    v
}

fn original_dst(fd: RawFd, v6: bool) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: valid fd and buffer.
    let rc = unsafe { libc::getsockopt(fd, level, SO_ORIGINAL_DST, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    from_raw(&ss)
}

fn new_socket(addr: SocketAddr) -> io::Result<RawFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(fd) }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: valid fd and an int option value.
    unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), size_of::<libc::c_int>() as _) };
}
