//! Helpers for the differential test against istio-init (tests/tests/differential.rs):
//! loading Istio's golden `iptables-save` rule sets into a pod netns with the real
//! `iptables-restore`, a cheap multi-port listener that records which socket got which
//! connection, and connecting from a netns that is not a pod (the services netns).
//!
//! Safety: rules are only ever loaded with `ip netns exec <test netns>`; deleting the netns
//! removes them. Connect targets are checked with [`assert_allowed_addr`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::util::{TempDir, assert_allowed_addr, run};

/// The `iptables-restore` inputs of one golden file: the IPv4 tables, and the IPv6 ones when
/// the golden has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoldenRules {
    pub v4: String,
    pub v6: Option<String>,
}

/// Parses a golden file. Two layouts exist: cni-plugin/*.golden are plain `iptables-restore`
/// input (IPv4 only); capture/*.golden interleave the dry-run's `iptables-save` /
/// `ip6tables-save` probe commands with the restore input, IPv4 tables first, then (with
/// EnableIPv6) the IPv6 ones — a table name seen a second time starts the IPv6 part.
pub fn parse_golden(text: &str) -> GoldenRules {
    let mut v4 = String::new();
    let mut v6 = String::new();
    let mut seen: Vec<String> = Vec::new();
    let mut in_v6 = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t == "iptables-save" || t == "ip6tables-save" || t.starts_with('#') {
            continue;
        }
        if let Some(table) = t.strip_prefix('*') {
            let table = table.trim().to_owned();
            if seen.contains(&table) {
                in_v6 = true;
                seen.clear();
            }
            seen.push(table.clone());
            current = Some(table);
        }
        assert!(current.is_some(), "golden line outside a table: {t:?}");
        let out = if in_v6 { &mut v6 } else { &mut v4 };
        out.push_str(t);
        out.push('\n');
        if t == "COMMIT" {
            current = None;
        }
    }
    GoldenRules { v4, v6: (!v6.is_empty()).then_some(v6) }
}

/// Loads `rules` into `netns` with the real `iptables-restore` / `ip6tables-restore`
/// (`ip netns exec`, never in the root netns).
pub fn load_golden(netns: &Netns, rules: &GoldenRules) -> io::Result<()> {
    let dir = TempDir::new("golden")?;
    let load = |tool: &str, text: &str| -> io::Result<()> {
        let path = dir.path().join(format!("{tool}.rules"));
        std::fs::write(&path, text)?;
        let p = path.display().to_string();
        run("ip", &["netns", "exec", netns.name(), tool, p.as_str()]).map(|_| ())
    };
    load("iptables-restore", &rules.v4)?;
    if let Some(v6) = &rules.v6 {
        load("ip6tables-restore", v6)?;
    }
    Ok(())
}

/// One socket of a [`Listeners`] set.
#[derive(Clone, Debug)]
pub struct ListenSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub udp: bool,
}

impl ListenSpec {
    pub fn tcp(name: &str, addr: SocketAddr) -> ListenSpec {
        ListenSpec { name: name.to_owned(), addr, udp: false }
    }
    pub fn udp(name: &str, addr: SocketAddr) -> ListenSpec {
        ListenSpec { name: name.to_owned(), addr, udp: true }
    }
}

/// A connection (or datagram) one of the sockets got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub name: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub received: String,
    pub udp: bool,
}

const HIT_IO_TIMEOUT: Duration = Duration::from_secs(2);
const LISTENERS_MAX_LIFETIME: Duration = Duration::from_secs(300);

enum Sock {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(l) => l.as_raw_fd(),
            Sock::Udp(u) => u.as_raw_fd(),
        }
    }
}

/// Many listening sockets in one netns (bound from the test process, as root), served by one
/// `poll` thread: per TCP connection it reads until the client's EOF (bounded), records a
/// [`Hit`], replies `hit <name>\n` + the bytes, and closes; per datagram it records and
/// replies likewise. Wildcard binds are fine here (they are not traffic); to hold both
/// `0.0.0.0:p` and `[::]:p`, set `net.ipv6.bindv6only=1` in the netns first.
pub struct Listeners {
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listeners {
    pub fn start(netns: &Netns, specs: &[ListenSpec]) -> io::Result<Listeners> {
        let socks = netns.run(|| -> io::Result<Vec<(ListenSpec, Sock)>> {
            let mut out = Vec::new();
            for s in specs {
                let sock = if s.udp {
                    Sock::Udp(UdpSocket::bind(s.addr).map_err(|e| io::Error::new(e.kind(), format!("bind udp {}: {e}", s.addr)))?)
                } else {
                    Sock::Tcp(TcpListener::bind(s.addr).map_err(|e| io::Error::new(e.kind(), format!("bind tcp {}: {e}", s.addr)))?)
                };
                match &sock {
                    Sock::Tcp(l) => l.set_nonblocking(true)?,
                    Sock::Udp(u) => u.set_nonblocking(true)?,
                }
                out.push((s.clone(), sock));
            }
            Ok(out)
        })??;
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (hits.clone(), stop.clone());
        let thread = std::thread::Builder::new().name(format!("listeners-{}", netns.name())).spawn(move || serve(socks, h, st))?;
        Ok(Listeners { hits, stop, thread: Some(thread) })
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn record(hits: &Arc<Mutex<Vec<Hit>>>, hit: Hit) {
    hits.lock().unwrap_or_else(|p| p.into_inner()).push(hit);
}

fn serve(socks: Vec<(ListenSpec, Sock)>, hits: Arc<Mutex<Vec<Hit>>>, stop: Arc<AtomicBool>) {
    let started = Instant::now();
    let mut pfds: Vec<libc::pollfd> = socks.iter().map(|(_, s)| libc::pollfd { fd: s.fd(), events: libc::POLLIN, revents: 0 }).collect();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LISTENERS_MAX_LIFETIME {
        for p in pfds.iter_mut() {
            p.revents = 0;
        }
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for (i, (spec, sock)) in socks.iter().enumerate() {
            if pfds[i].revents == 0 {
                continue;
            }
            match sock {
                Sock::Tcp(l) => {
                    while let Ok((stream, peer)) = l.accept() {
                        let (h, name) = (hits.clone(), spec.name.clone());
                        std::thread::spawn(move || handle_tcp(stream, peer, name, h));
                    }
                }
                Sock::Udp(u) => {
                    while let Ok((n, peer)) = u.recv_from(&mut buf) {
                        let received = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let local = u.local_addr().unwrap_or(spec.addr);
                        record(&hits, Hit { name: spec.name.clone(), local, peer, received: received.clone(), udp: true });
                        let _ = u.send_to(format!("hit {}\n{received}", spec.name).as_bytes(), peer);
                    }
                }
            }
        }
    }
}

fn handle_tcp(mut stream: TcpStream, peer: SocketAddr, name: String, hits: Arc<Mutex<Vec<Hit>>>) {
    let Ok(local) = stream.local_addr() else { return };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(HIT_IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HIT_IO_TIMEOUT));
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while received.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    let received = String::from_utf8_lossy(&received).into_owned();
    record(&hits, Hit { name: name.clone(), local, peer, received: received.clone(), udp: false });
    let _ = stream.write_all(format!("hit {name}\n{received}").as_bytes());
    let _ = stream.shutdown(Shutdown::Both);
}

/// Result of [`connect_from`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsConnect {
    pub ok: bool,
    pub error: Option<String>,
    pub reply: String,
}

/// Connects (TCP, or connected UDP) from `netns` — which need not be a pod — to `target` on
/// a new thread, sends `payload`, half-closes (TCP), and reads the reply until EOF (TCP) or
/// one datagram (UDP), all within `timeout`. Join the handle for the result.
pub fn connect_from(
    netns: &Netns,
    target: SocketAddr,
    payload: &str,
    udp: bool,
    timeout: Duration,
) -> io::Result<JoinHandle<NetnsConnect>> {
    assert_allowed_addr(target.ip());
    let file: File = netns.open()?;
    let payload = payload.to_owned();
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this (new, private) thread with a valid netns fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return NetnsConnect { ok: false, error: Some(format!("setns: {}", io::Error::last_os_error())), reply: String::new() };
        }
        drop(file);
        let r = if udp { udp_exchange(target, &payload, timeout) } else { tcp_exchange(target, &payload, timeout) };
        match r {
            Ok(reply) => NetnsConnect { ok: true, error: None, reply },
            Err(e) => NetnsConnect { ok: false, error: Some(e.to_string()), reply: String::new() },
        }
    }))
}

fn tcp_exchange(target: SocketAddr, payload: &str, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    s.set_write_timeout(Some(left()))?;
    s.write_all(payload.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()))?;
        match s.read(&mut buf)? {
            0 => break,
            n if reply.len() < 65536 => reply.extend_from_slice(&buf[..n]),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn udp_exchange(target: SocketAddr, payload: &str, timeout: Duration) -> io::Result<String> {
    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind)?;
    s.connect(target)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(payload.as_bytes())?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_golden_splits_v4_and_v6() {
        let text = "iptables-save\nip6tables-save\n* nat\n-N A\nCOMMIT\n* raw\n-N B\nCOMMIT\n* nat\n-N C\nCOMMIT\niptables-save\n";
        let g = parse_golden(text);
        assert_eq!(g.v4, "* nat\n-N A\nCOMMIT\n* raw\n-N B\nCOMMIT\n");
        assert_eq!(g.v6.as_deref(), Some("* nat\n-N C\nCOMMIT\n"));
        let g = parse_golden("* mangle\n-N X\nCOMMIT\n* nat\n-N Y\nCOMMIT\n");
        assert_eq!(g.v6, None);
    }
}
