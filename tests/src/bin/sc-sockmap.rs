//! sc-sockmap: both ends of the app↔proxy hop for the sockmap tests (tests/tests/sockmap.rs).
//!
//!   sc-sockmap serve [--port 15001] [--host IP]... [--max-secs S]
//!   sc-sockmap run ADDR:PORT --mode sink|source|echo|rst-proxy|rst-app [--bytes N]
//!                  [--bind IP]
//!                  [--conns C] [--via write|sendfile|splice] [--server-splice]
//!                  [--timeout-ms T] [--pace-ms P] [--strict-blocking]
//!                  [--server-delay-ms D]
//!
//! serve: runs as the proxy (uid 1337) on 127.0.0.1:PORT and [::1]:PORT (`--host`: on those
//! addresses instead; the inbound hop's app on its pod's own). Each connection starts with a
//! 16-byte header from the client (mode, flags, byte count), then:
//! sink: reads until EOF checking every byte against the pattern (with `--server-splice`
//! through splice(2) into a pipe, as a splicing proxy reads), replies `ok N` or
//! `bad AT N`; source: writes N pattern bytes, shuts its write side, reads until EOF;
//! echo: copies everything back until EOF, then shuts its write side; rst-proxy: reads N
//! bytes and resets (SO_LINGER 0). One JSON line per connection:
//! {"event":"conn","mode","received","ok","end"}.
//!
//! run: the app. sink: sends N pattern bytes (`--via`: write, sendfile from a file, or
//! splice from a pipe), shuts its write side, wants `ok N`. source: wants exactly N pattern
//! bytes then EOF. echo: a writer thread sends N bytes while the reader checks them.
//! `--bind IP`: connects from IP (the inbound hop's proxy, from 127.0.0.6 / ::6).
//! rst-proxy: sends N bytes, wants the reset. rst-app: sends a header promising more than it
//! sends, then resets. `--conns C` runs C connections at once. Every socket has send and
//! receive timeouts (default 10 s), so a stall is an error, never a hang. Prints one JSON
//! line: {"ok","conns","bytes","errors":[...]}. `--pace-ms P` sleeps P ms between 64 KiB
//! writes (sink, echo), so that a transfer outlasts what a test does meanwhile.
//!
//! Both ends read blocking sockets. A read that fails with EAGAIN well before its timeout
//! is spurious (counted as "eagain" in both outputs) and retried, as an event loop would
//! retry it; `--strict-blocking` makes it the app's error, as a blocking application sees it.
//! `--server-delay-ms D`: the proxy reads nothing for D ms after the header (a slow
//! reader); sink's output has "write_ms", how long the slowest connection took to write.
//!
//! The pattern is position-dependent (splitmix64 of the 8-byte word index), so a lost,
//! repeated or reordered byte shows at its offset.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

const HEADER: usize = 16;

/// Reads that returned EAGAIN on a blocking socket before its receive timeout: spurious.
static SPURIOUS_EAGAIN: AtomicU64 = AtomicU64::new(0);
/// `--strict-blocking`: a spurious EAGAIN is an error, as a blocking application takes it.
static STRICT: AtomicBool = AtomicBool::new(false);
/// `--server-delay-ms`: the proxy reads nothing for this long after the header.
static SERVER_DELAY_MS: AtomicU16 = AtomicU16::new(0);
/// sink: the longest time any connection took to write its bytes (ms).
static WRITE_MS: AtomicU64 = AtomicU64::new(0);

/// read(2) on a blocking socket with SO_RCVTIMEO. An EAGAIN well before the timeout is
/// spurious (a blocking read must wait): counted, then the read is retried, as an event
/// loop would, unless `--strict-blocking`.
fn rd(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let timeout = s.read_timeout()?.unwrap_or(Duration::from_secs(10));
    let deadline = Instant::now() + timeout;
    loop {
        let t = Instant::now();
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && t.elapsed() < timeout / 2 => {
                SPURIOUS_EAGAIN.fetch_add(1, Ordering::Relaxed);
                if STRICT.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "spurious EAGAIN on a blocking read"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            r => return r,
        }
    }
}
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sink = 1,
    Source = 2,
    Echo = 3,
    RstProxy = 4,
    RstApp = 5,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "sink" => Mode::Sink,
            "source" => Mode::Source,
            "echo" => Mode::Echo,
            "rst-proxy" => Mode::RstProxy,
            "rst-app" => Mode::RstApp,
            _ => return None,
        })
    }
    fn from_u8(b: u8) -> Option<Mode> {
        [Mode::Sink, Mode::Source, Mode::Echo, Mode::RstProxy, Mode::RstApp].into_iter().find(|m| *m as u8 == b)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pattern bytes for absolute offsets `at..at + buf.len()`.
fn fill(buf: &mut [u8], at: u64) {
    let mut p = at;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(p >> 3).to_le_bytes();
        let k = (p & 7) as usize;
        let n = (8 - k).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[k..k + n]);
        i += n;
        p += n as u64;
    }
}

/// Checks received bytes at `at`: the offset of the first wrong byte.
fn check(buf: &[u8], at: u64, scratch: &mut Vec<u8>) -> Result<(), u64> {
    scratch.resize(buf.len(), 0);
    fill(scratch, at);
    match buf.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(at + i as u64),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("run") => run(&args[1..]),
        _ => Err("usage: sc-sockmap serve|run ...".into()),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sc-sockmap: {e}");
            ExitCode::from(2)
        }
    }
}

fn value<'a>(it: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a String, String> {
    it.next().ok_or_else(|| format!("{flag} needs a value"))
}

fn num<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{flag}: bad number {s:?}"))
}

fn timeouts(s: &TcpStream, t: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

/// SO_LINGER 0 then close: the peer gets a reset.
fn reset(s: TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(s);
}

fn end_of(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
        _ => format!("error: {e}"),
    }
}

// ---- serve ----

fn serve(args: &[String]) -> Result<ExitCode, String> {
    let (mut port, mut max_secs) = (15001u16, 300u64);
    let mut hosts: Vec<std::net::IpAddr> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => port = num(value(&mut it, a)?, a)?,
            "--host" => hosts.push(num(value(&mut it, a)?, a)?),
            "--max-secs" => max_secs = num(value(&mut it, a)?, a)?,
            _ => return Err(format!("unknown flag {a}")),
        }
    }
    // Both loopbacks: a v6 app's captured connect goes to [::1]:PORT.
    if hosts.is_empty() {
        hosts = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    }
    let mut ls = Vec::new();
    for host in hosts {
        let l = TcpListener::bind((host, port)).map_err(|e| format!("bind {host}:{port}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        ls.push(l);
    }
    println!("{}", json!({"event": "listening", "port": port}));
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    while Instant::now() < deadline {
        let mut idle = true;
        for l in &ls {
            match l.accept() {
                Ok((s, _)) => {
                    idle = false;
                    std::thread::spawn(move || {
                        let line = serve_one(s);
                        println!("{line}");
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_one(s: TcpStream) -> serde_json::Value {
    let before = SPURIOUS_EAGAIN.load(Ordering::Relaxed);
    let mut v = serve_conn(s);
    // Process-wide: exact when connections do not overlap.
    v["eagain"] = (SPURIOUS_EAGAIN.load(Ordering::Relaxed) - before).into();
    v
}

fn serve_conn(mut s: TcpStream) -> serde_json::Value {
    let _ = s.set_nonblocking(false);
    let _ = timeouts(&s, Duration::from_secs(30));
    let mut h = [0u8; HEADER];
    if let Err(e) = s.read_exact(&mut h) {
        return json!({"event": "conn", "mode": null, "received": 0, "ok": false, "end": end_of(&e)});
    }
    let Some(mode) = Mode::from_u8(h[0]) else {
        return json!({"event": "conn", "mode": h[0], "received": 0, "ok": false, "end": "bad header"});
    };
    let splice = h[1] & 1 != 0;
    let delay = Duration::from_millis(u16::from_le_bytes([h[2], h[3]]).into());
    let n = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    // A slow reader: nothing is read for this long.
    std::thread::sleep(delay);
    let mut received = 0u64;
    let (ok, end) = match mode {
        Mode::Sink | Mode::RstApp => {
            let r = if splice { sink_splice(&s, &mut received) } else { sink_read(&mut s, &mut received) };
            match r {
                Ok(Ok(())) => {
                    let _ = s.write_all(format!("ok {received}\n").as_bytes());
                    (true, "eof".to_string())
                }
                Ok(Err(at)) => {
                    let _ = s.write_all(format!("bad {at} {received}\n").as_bytes());
                    (false, format!("bad byte at {at}"))
                }
                Err(e) => (false, end_of(&e)),
            }
        }
        Mode::Source => {
            let r = send_pattern(&mut s, n).and_then(|()| s.shutdown(Shutdown::Write)).and_then(|()| drain(&mut s));
            match r {
                Ok(_) => (true, "eof".into()),
                Err(e) => (false, end_of(&e)),
            }
        }
        Mode::Echo => {
            let mut buf = vec![0u8; CHUNK];
            let r = (|| -> io::Result<()> {
                loop {
                    let k = rd(&mut s, &mut buf)?;
                    if k == 0 {
                        return s.shutdown(Shutdown::Write);
                    }
                    received += k as u64;
                    s.write_all(&buf[..k])?;
                }
            })();
            match r {
                Ok(()) => (true, "eof".into()),
                Err(e) => (false, end_of(&e)),
            }
        }
        Mode::RstProxy => {
            let mut buf = vec![0u8; CHUNK];
            let r = (|| -> io::Result<()> {
                while received < n {
                    let k = rd(&mut s, &mut buf[..CHUNK.min((n - received) as usize)])?;
                    if k == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                    received += k as u64;
                }
                Ok(())
            })();
            match r {
                Ok(()) => {
                    reset(s);
                    (true, "reset sent".into())
                }
                Err(e) => (false, end_of(&e)),
            }
        }
    };
    json!({"event": "conn", "mode": format!("{mode:?}"), "received": received, "ok": ok, "end": end})
}

/// Reads to EOF checking the pattern; Ok(Err(at)) on a wrong byte.
fn sink_read(s: &mut TcpStream, received: &mut u64) -> io::Result<Result<(), u64>> {
    let mut buf = vec![0u8; CHUNK];
    let mut scratch = Vec::new();
    loop {
        let k = rd(s, &mut buf)?;
        if k == 0 {
            return Ok(Ok(()));
        }
        if let Err(at) = check(&buf[..k], *received, &mut scratch) {
            *received += k as u64;
            return Ok(Err(at));
        }
        *received += k as u64;
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a writable array of two ints, as pipe2 wants.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fds, owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// As `sink_read`, through splice(socket → pipe) and read(pipe), as a splicing proxy does.
/// splice(2) ignores SO_RCVTIMEO: poll bounds each wait instead.
fn sink_splice(s: &TcpStream, received: &mut u64) -> io::Result<Result<(), u64>> {
    let (r, w) = pipe()?;
    let mut buf = vec![0u8; CHUNK];
    let mut scratch = Vec::new();
    loop {
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
        if ready == 0 {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        // SAFETY: valid fds; null offsets (sockets and pipes have none).
        let k = unsafe {
            libc::splice(s.as_raw_fd(), std::ptr::null_mut(), w.as_raw_fd(), std::ptr::null_mut(), CHUNK, libc::SPLICE_F_NONBLOCK)
        };
        if k < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                // Readable by poll, yet splice finds nothing: wait a little, bounded by poll above.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err(e);
        }
        if k == 0 {
            return Ok(Ok(()));
        }
        let mut left = k as usize;
        while left > 0 {
            // SAFETY: buf is writable for its length.
            let m = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), left.min(buf.len())) };
            if m <= 0 {
                return Err(io::Error::last_os_error());
            }
            let m = m as usize;
            if let Err(at) = check(&buf[..m], *received, &mut scratch) {
                *received += m as u64;
                return Ok(Err(at));
            }
            *received += m as u64;
            left -= m;
        }
    }
}

fn send_pattern(s: &mut TcpStream, n: u64) -> io::Result<()> {
    send_paced(s, n, Duration::ZERO)
}

fn send_paced(s: &mut TcpStream, n: u64, pace: Duration) -> io::Result<()> {
    write_pattern(s, n, pace)
}

/// The first `n` bytes of the pattern, CHUNK by CHUNK, `pace` between chunks.
fn write_pattern(w: &mut impl Write, n: u64, pace: Duration) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < n {
        let k = CHUNK.min((n - at) as usize);
        fill(&mut buf[..k], at);
        w.write_all(&buf[..k])?;
        at += k as u64;
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    Ok(())
}

fn drain(s: &mut TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let k = rd(s, &mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

// ---- run ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Write,
    Sendfile,
    Splice,
}

#[derive(Clone, Copy)]
struct RunOpts {
    to: SocketAddr,
    bind: Option<std::net::IpAddr>,
    mode: Mode,
    bytes: u64,
    via: Via,
    server_splice: bool,
    timeout: Duration,
    pace: Duration,
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let mut it = args.iter();
    let to: SocketAddr = num(it.next().ok_or("run needs ADDR:PORT")?, "ADDR:PORT")?;
    let mut o = RunOpts {
        to,
        bind: None,
        mode: Mode::Sink,
        bytes: 1 << 20,
        via: Via::Write,
        server_splice: false,
        timeout: Duration::from_secs(10),
        pace: Duration::ZERO,
    };
    let mut conns = 1usize;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mode" => o.mode = Mode::parse(value(&mut it, a)?).ok_or("--mode: sink|source|echo|rst-proxy|rst-app")?,
            "--bytes" => o.bytes = num(value(&mut it, a)?, a)?,
            "--conns" => conns = num::<usize>(value(&mut it, a)?, a)?.clamp(1, 2048),
            "--via" => {
                o.via = match value(&mut it, a)?.as_str() {
                    "write" => Via::Write,
                    "sendfile" => Via::Sendfile,
                    "splice" => Via::Splice,
                    v => return Err(format!("--via {v}: write|sendfile|splice")),
                }
            }
            "--server-splice" => o.server_splice = true,
            "--strict-blocking" => STRICT.store(true, Ordering::Relaxed),
            "--server-delay-ms" => SERVER_DELAY_MS.store(num(value(&mut it, a)?, a)?, Ordering::Relaxed),
            "--timeout-ms" => o.timeout = Duration::from_millis(num(value(&mut it, a)?, a)?),
            "--pace-ms" => o.pace = Duration::from_millis(num(value(&mut it, a)?, a)?),
            "--bind" => o.bind = Some(num(value(&mut it, a)?, a)?),
            _ => return Err(format!("unknown flag {a}")),
        }
    }
    let handles: Vec<_> = (0..conns).map(|_| std::thread::spawn(move || one(&o))).collect();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("thread panicked".to_string()),
        }
    }
    let eagain = SPURIOUS_EAGAIN.load(Ordering::Relaxed);
    let write_ms = WRITE_MS.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({"ok": errors.is_empty(), "conns": conns, "bytes": o.bytes, "eagain": eagain, "write_ms": write_ms, "errors": errors})
    );
    Ok(ExitCode::SUCCESS)
}

/// A blocking connect from `ip` (any port); SO_SNDTIMEO bounds it.
fn connect_from(ip: std::net::IpAddr, to: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let (fam, from, to) = match (ip, to) {
        (std::net::IpAddr::V4(a), SocketAddr::V4(t)) => (libc::AF_INET, sockaddr_in(a, 0), sockaddr_in(*t.ip(), t.port())),
        (std::net::IpAddr::V6(a), SocketAddr::V6(t)) => (libc::AF_INET6, sockaddr_in6(a, 0), sockaddr_in6(*t.ip(), t.port())),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "--bind and ADDR differ in family")),
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    s.set_write_timeout(Some(timeout))?;
    // SAFETY: fd is a valid socket; each address is a byte buffer of the length passed.
    if unsafe { libc::bind(fd, from.as_ptr().cast(), from.len() as libc::socklen_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::connect(fd, to.as_ptr().cast(), to.len() as libc::socklen_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

fn sockaddr_in(a: std::net::Ipv4Addr, port: u16) -> Vec<u8> {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
    // SAFETY: a plain C struct viewed as its bytes.
    unsafe { std::slice::from_raw_parts((&raw const sa).cast::<u8>(), size_of::<libc::sockaddr_in>()) }.to_vec()
}

fn sockaddr_in6(a: std::net::Ipv6Addr, port: u16) -> Vec<u8> {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    sa.sin6_addr.s6_addr = a.octets();
    // SAFETY: a plain C struct viewed as its bytes.
    unsafe { std::slice::from_raw_parts((&raw const sa).cast::<u8>(), size_of::<libc::sockaddr_in6>()) }.to_vec()
}

fn header(mode: Mode, splice: bool, n: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = mode as u8;
    h[1] = u8::from(splice);
    h[2..4].copy_from_slice(&SERVER_DELAY_MS.load(Ordering::Relaxed).to_le_bytes());
    h[8..16].copy_from_slice(&n.to_le_bytes());
    h
}

fn one(o: &RunOpts) -> Result<(), String> {
    let mut s = match o.bind {
        None => TcpStream::connect_timeout(&o.to, o.timeout),
        Some(ip) => connect_from(ip, &o.to, o.timeout),
    }
    .map_err(|e| format!("connect: {e}"))?;
    timeouts(&s, o.timeout).map_err(|e| e.to_string())?;
    let n = o.bytes;
    let ctx = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    match o.mode {
        Mode::Sink => {
            s.write_all(&header(Mode::Sink, o.server_splice, n)).map_err(ctx("header"))?;
            let t = Instant::now();
            match o.via {
                Via::Write => send_paced(&mut s, n, o.pace).map_err(ctx("write"))?,
                Via::Sendfile => send_file(&s, n, o.timeout).map_err(ctx("sendfile"))?,
                Via::Splice => send_splice(&s, n, o.timeout).map_err(ctx("splice"))?,
            }
            s.shutdown(Shutdown::Write).map_err(ctx("shutdown"))?;
            WRITE_MS.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            let mut reply = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                match rd(&mut s, &mut buf).map_err(ctx("reply"))? {
                    0 => break,
                    k => reply.extend_from_slice(&buf[..k]),
                }
            }
            let reply = String::from_utf8_lossy(&reply);
            if reply != format!("ok {n}\n") {
                return Err(format!("proxy replied {reply:?}, want \"ok {n}\""));
            }
        }
        Mode::Source => {
            s.write_all(&header(Mode::Source, false, n)).map_err(ctx("header"))?;
            let mut got = 0u64;
            match sink_read(&mut s, &mut got).map_err(|e| format!("read after {got} bytes: {e}"))? {
                Ok(()) if got == n => {}
                Ok(()) => return Err(format!("EOF after {got} bytes, want {n}")),
                Err(at) => return Err(format!("wrong byte at {at} (of {n})")),
            }
        }
        Mode::Echo => {
            s.write_all(&header(Mode::Echo, false, n)).map_err(ctx("header"))?;
            let mut w = s.try_clone().map_err(ctx("clone"))?;
            let pace = o.pace;
            let writer = std::thread::spawn(move || send_paced(&mut w, n, pace).and_then(|()| w.shutdown(Shutdown::Write)));
            let mut got = 0u64;
            let r = sink_read(&mut s, &mut got);
            writer.join().map_err(|_| "writer panicked".to_string())?.map_err(ctx("write"))?;
            match r.map_err(|e| format!("read after {got} bytes: {e}"))? {
                Ok(()) if got == n => {}
                Ok(()) => return Err(format!("EOF after {got} bytes, want {n}")),
                Err(at) => return Err(format!("wrong byte at {at} (of {n})")),
            }
        }
        Mode::RstProxy => {
            s.write_all(&header(Mode::RstProxy, false, n)).map_err(ctx("header"))?;
            send_pattern(&mut s, n).map_err(ctx("write"))?;
            let mut buf = [0u8; 1024];
            match rd(&mut s, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                Ok(0) => return Err("EOF where a reset was due".into()),
                Ok(k) => return Err(format!("{k} bytes where a reset was due")),
                Err(e) => return Err(format!("want a reset, got {e}")),
            }
        }
        Mode::RstApp => {
            s.write_all(&header(Mode::RstApp, false, n.saturating_mul(2))).map_err(ctx("header"))?;
            send_pattern(&mut s, n).map_err(ctx("write"))?;
            reset(s);
        }
    }
    Ok(())
}

/// sendfile(2) from a temporary file holding the pattern.
fn send_file(s: &TcpStream, n: u64, timeout: Duration) -> io::Result<()> {
    let path = std::env::temp_dir().join(format!("sc-sockmap-{}-{:?}", std::process::id(), std::thread::current().id()));
    write_pattern(&mut std::fs::File::create(&path)?, n, Duration::ZERO)?;
    let f = std::fs::File::open(&path)?;
    let _ = std::fs::remove_file(&path);
    let deadline = Instant::now() + timeout;
    let mut off: libc::off_t = 0;
    while (off as u64) < n {
        let left = (n - off as u64) as usize;
        // SAFETY: valid fds and a writable offset.
        let k = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &mut off, left) };
        if k < 0 {
            return Err(io::Error::last_os_error());
        }
        if k == 0 || Instant::now() > deadline {
            return Err(io::Error::other(format!("sendfile stalled at {off} of {n}")));
        }
    }
    Ok(())
}

/// write(pipe) then splice(pipe → socket), chunk by chunk.
fn send_splice(s: &TcpStream, n: u64, timeout: Duration) -> io::Result<()> {
    let (r, w) = pipe()?;
    let mut buf = vec![0u8; CHUNK];
    let deadline = Instant::now() + timeout;
    let mut at = 0u64;
    while at < n {
        let k = CHUNK.min((n - at) as usize);
        fill(&mut buf[..k], at);
        let mut put = 0;
        while put < k {
            // SAFETY: buf holds k valid bytes.
            let m = unsafe { libc::write(w.as_raw_fd(), buf[put..k].as_ptr().cast(), k - put) };
            if m <= 0 {
                return Err(io::Error::last_os_error());
            }
            let m = m as usize;
            let mut left = m;
            while left > 0 {
                // SAFETY: valid fds; null offsets (pipes and sockets have none).
                let z = unsafe { libc::splice(r.as_raw_fd(), std::ptr::null_mut(), s.as_raw_fd(), std::ptr::null_mut(), left, 0) };
                if z < 0 {
                    return Err(io::Error::last_os_error());
                }
                if z == 0 || Instant::now() > deadline {
                    return Err(io::Error::other(format!("splice stalled at {} of {n}", at + (put + m - left) as u64)));
                }
                left -= z as usize;
            }
            put += m;
        }
        at += k as u64;
    }
    Ok(())
}
