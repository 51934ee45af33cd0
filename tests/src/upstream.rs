//! Upstream servers owned by the test process: the listening socket is created inside a
//! netns (usually the services netns) and served from ordinary threads.
//!
//! TCP: per connection, reply `upstream <local addr>\n`, then echo until the client's EOF
//! (or a read timeout), recording the peer and the bytes received. UDP: per datagram,
//! reply `upstream <local addr>\n` + the payload.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::util::{assert_allowed_addr, wait_for};

/// Per-connection read timeout, and the cap on an Upstream's life and connection count.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LIFETIME: Duration = Duration::from_secs(600);
const MAX_CONNS: usize = 10_000;
const MAX_BYTES: usize = 1 << 20;

/// What an upstream saw on one connection (or one datagram, for UDP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub received: Vec<u8>,
    /// The client closed its side (TCP EOF) or the datagram was handled.
    pub closed: bool,
}

impl UpstreamConn {
    pub fn received_str(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

pub struct Upstream {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<UpstreamConn>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// A TCP server on `addr` inside `netns`; stops on Drop.
    pub fn start(netns: &Netns, addr: SocketAddr) -> io::Result<Upstream> {
        assert_allowed_addr(addr.ip());
        let listener = netns.run(|| TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        let thread = std::thread::Builder::new().name(format!("upstream-{addr}")).spawn(move || accept_loop(listener, c, s))?;
        Ok(Upstream { addr, conns, stop, thread: Some(thread) })
    }

    /// A UDP echo server on `addr` inside `netns`; stops on Drop.
    pub fn start_udp(netns: &Netns, addr: SocketAddr) -> io::Result<Upstream> {
        assert_allowed_addr(addr.ip());
        let sock = netns.run(|| UdpSocket::bind(addr))??;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        let thread = std::thread::Builder::new().name(format!("upstream-udp-{addr}")).spawn(move || udp_loop(sock, c, s))?;
        Ok(Upstream { addr, conns, stop, thread: Some(thread) })
    }

    /// The bound address (with the real port if 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Snapshot of what was received so far.
    pub fn connections(&self) -> Vec<UpstreamConn> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait (bounded) until at least `n` connections were closed by their clients.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> Vec<UpstreamConn> {
        wait_for(timeout, Duration::from_millis(10), || {
            let c = self.connections();
            (c.iter().filter(|c| c.closed).count() >= n).then_some(c)
        })
        .unwrap_or_else(|| self.connections())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, conns: Arc<Mutex<Vec<UpstreamConn>>>, stop: Arc<AtomicBool>) {
    let started = Instant::now();
    let mut handlers = Vec::new();
    let mut accepted = 0;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME && accepted < MAX_CONNS {
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted += 1;
                let c = conns.clone();
                handlers.push(std::thread::spawn(move || serve(stream, peer, c)));
                handlers.retain(|h: &JoinHandle<()>| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    // Handlers end within IO_TIMEOUT on their own.
    for h in handlers {
        let _ = h.join();
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr, conns: Arc<Mutex<Vec<UpstreamConn>>>) {
    let Ok(local) = stream.local_addr() else { return };
    let idx = {
        let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
        c.push(UpstreamConn { peer, local, received: Vec::new(), closed: false });
        c.len() - 1
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.write_all(format!("upstream {local}\n").as_bytes());
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                conns.lock().unwrap_or_else(|p| p.into_inner())[idx].received.extend_from_slice(&buf[..n]);
                if stream.write_all(&buf[..n]).is_err() || total > MAX_BYTES {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    // Record before closing: a client that saw our EOF finds the record complete.
    conns.lock().unwrap_or_else(|p| p.into_inner())[idx].closed = true;
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn udp_loop(sock: UdpSocket, conns: Arc<Mutex<Vec<UpstreamConn>>>, stop: Arc<AtomicBool>) {
    let started = Instant::now();
    let Ok(local) = sock.local_addr() else { return };
    let mut buf = [0u8; 65536];
    let mut handled = 0;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME && handled < MAX_CONNS {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            handled += 1;
            conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(UpstreamConn { peer, local, received: buf[..n].to_vec(), closed: true });
            let mut reply = format!("upstream {local}\n").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, peer);
        }
    }
}
