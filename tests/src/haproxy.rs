//! HAProxy as a stand-in sidecar proxy, run inside a pod as uid/gid 1337.
//!
//! Outbound: frontend on 127.0.0.1:15001 and [::1]:15001. In `Transparent` mode the backend
//! uses `option transparent`: HAProxy connects to the accepted socket's "destination",
//! which it learns from getsockopt(SOL_IP, SO_ORIGINAL_DST) on **IPv4 sockets only**
//! (src/sock_inet.c: only proto_fam_inet4 uses sock_inet_get_dst; inet6 uses plain
//! getsockname). On [::1]:15001 it therefore forwards to [::1]:15001 — itself — so
//! transparent mode is only meaningful for IPv4 (incl. v4 reached through the v4 listener).
//! Note too that without an answer to SO_ORIGINAL_DST it falls back to getsockname
//! (127.0.0.1:15001), i.e. also loops to itself. Measured with HAProxy 2.6.12: one such
//! connection became ~1000 self-connections per second. So transparent frontends reject
//! connections whose destination (as HAProxy sees it) is the frontend's own port: they are
//! logged with `term=PR` and no server ([`HaproxyLogEntry::is_unresolved_reject`]) and the
//! client sees an immediate EOF. With sidecap answering, `dst` is the original destination
//! and the rule does not fire.
//!
//! Inbound (optional): frontend on 0.0.0.0:15006 forwarding to the original destination
//! from source 127.0.0.6 (Envoy's inbound passthrough source).

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::{Creds, Spawned, is_listening, spawn_with};
use crate::topology::Pod;
use crate::util::{TempDir, assert_allowed_addr, run, wait_for};

/// Where the outbound frontend sends connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundBackend {
    /// `option transparent`: to the original destination (needs sidecap's getsockopt).
    Transparent,
    /// A fixed server (proves the harness without any redirection).
    Server(SocketAddr),
}

#[derive(Clone, Debug)]
pub struct HaproxyConfig {
    pub outbound_port: u16,
    pub outbound: OutboundBackend,
    pub inbound_port: Option<u16>,
    /// Also listen on [::]:inbound_port (v6only).
    pub inbound_v6: bool,
    pub uid: u32,
    pub gid: u32,
    pub maxconn: u32,
    /// Connect/client/server timeouts.
    pub timeout_ms: u64,
    /// Outbound routing by original destination, as Envoy routes a service VIP to one of
    /// its endpoints: (original destination, endpoint).
    pub routes: Vec<(SocketAddr, SocketAddr)>,
}

impl Default for HaproxyConfig {
    fn default() -> Self {
        HaproxyConfig {
            outbound_port: 15001,
            outbound: OutboundBackend::Transparent,
            inbound_port: Some(15006),
            inbound_v6: false,
            uid: Creds::PROXY.uid,
            gid: Creds::PROXY.gid,
            maxconn: 64,
            timeout_ms: 5000,
            routes: Vec::new(),
        }
    }
}

/// Marker that starts every traffic log line (other lines are HAProxy's own messages).
const LOG_TAG: &str = "sidecap-log";

impl HaproxyConfig {
    /// The haproxy.cfg text.
    pub fn render(&self) -> String {
        let t = self.timeout_ms;
        let mut c = String::new();
        let _ = write!(
            c,
            "global
    log stdout format raw local0 info
    nbthread 1
    maxconn {maxconn}

defaults
    mode tcp
    log global
    timeout connect {t}ms
    timeout client {t}ms
    timeout server {t}ms
    log-format \"{LOG_TAG} fe=%f client=%ci:%cp frontend=%fi:%fp backend=%b server=%si:%sp bytes_in=%U bytes_out=%B term=%ts tt=%Tt\"

frontend outbound
    bind 127.0.0.1:{op}
    bind [::1]:{op}
{guard}{routes}    default_backend outbound_dst

backend outbound_dst
",
            routes = self
                .routes
                .iter()
                .enumerate()
                .map(|(i, (dst, _))| format!("    use_backend route_{i} if {{ dst {} }} {{ dst_port {} }}\n", dst.ip(), dst.port()))
                .collect::<String>(),
            maxconn = self.maxconn,
            op = self.outbound_port,
            guard = match self.outbound {
                OutboundBackend::Transparent => loop_guard(self.outbound_port),
                OutboundBackend::Server(_) => String::new(),
            },
        );
        match &self.outbound {
            OutboundBackend::Transparent => c.push_str("    option transparent\n"),
            OutboundBackend::Server(a) => {
                let _ = writeln!(c, "    server upstream {a}");
            }
        }
        for (i, (_, endpoint)) in self.routes.iter().enumerate() {
            let _ = write!(c, "\nbackend route_{i}\n    server endpoint {endpoint}\n");
        }
        if let Some(ip) = self.inbound_port {
            let _ = write!(c, "\nfrontend inbound\n    bind 0.0.0.0:{ip}\n");
            c.push_str(&loop_guard(ip));
            c.push_str("    default_backend inbound_dst\n\nbackend inbound_dst\n    option transparent\n    source 127.0.0.6\n");
            if self.inbound_v6 {
                // Envoy's IPv6 inbound passthrough source is ::6 (on lo, as istio-iptables
                // and sidecap set it up).
                let _ = write!(c, "\nfrontend inbound6\n    bind [::]:{ip} v6only\n");
                c.push_str(&loop_guard(ip));
                c.push_str("    default_backend inbound6_dst\n\nbackend inbound6_dst\n    option transparent\n    source [::6]\n");
            }
        }
        c
    }
}

// See the module doc: without an original destination HAProxy would connect to itself.
fn loop_guard(port: u16) -> String {
    format!("    tcp-request content reject if {{ dst_port {port} }}\n")
}

/// One traffic log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaproxyLogEntry {
    /// Frontend name ("outbound" / "inbound").
    pub frontend_name: String,
    pub client: Option<SocketAddr>,
    /// Destination as HAProxy sees it (`%fi:%fp`): for a transparent v4 frontend this is
    /// the SO_ORIGINAL_DST answer when there is one, else the listener address.
    pub frontend: Option<SocketAddr>,
    pub backend: String,
    /// None when no server connection was attempted ("-").
    pub server: Option<SocketAddr>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Termination state (`--` = normal).
    pub term: String,
    pub raw: String,
}

impl HaproxyLogEntry {
    /// The loop guard fired: HAProxy had no original destination for this connection
    /// (no SO_ORIGINAL_DST answer, or any IPv6 connection).
    pub fn is_unresolved_reject(&self) -> bool {
        self.term == "PR" && self.server.is_none()
    }
}

/// Parse one log line written by [`HaproxyConfig::render`]'s log-format.
pub fn parse_log_line(line: &str) -> Option<HaproxyLogEntry> {
    let rest = line.trim().strip_prefix(LOG_TAG)?;
    let field = |k: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
            .to_owned()
    };
    // HAProxy prints v6 addresses unbracketed: the port follows the last colon.
    let addr = |s: String| -> Option<SocketAddr> {
        let (ip, port) = s.rsplit_once(':')?;
        Some(SocketAddr::new(ip.parse::<IpAddr>().ok()?, port.parse().ok()?))
    };
    Some(HaproxyLogEntry {
        frontend_name: field("fe"),
        client: addr(field("client")),
        frontend: addr(field("frontend")),
        backend: field("backend"),
        server: addr(field("server")),
        bytes_in: field("bytes_in").parse().unwrap_or(0),
        bytes_out: field("bytes_out").parse().unwrap_or(0),
        term: field("term"),
        raw: line.to_owned(),
    })
}

pub struct Haproxy {
    proc: Spawned,
    config: HaproxyConfig,
    config_path: PathBuf,
    _dir: TempDir,
}

impl Haproxy {
    /// Write the config, check it with `haproxy -c`, start `haproxy -db -f CFG` in `pod`
    /// as cfg.uid/cfg.gid, and wait (≤ 5 s) until its listeners are up.
    pub fn start(pod: &Pod, config: HaproxyConfig) -> io::Result<Haproxy> {
        Haproxy::start_in(pod, pod.cgroup(), config)
    }

    /// Like [`Haproxy::start`], in `cgroup` (e.g. the pod's proxy container cgroup, a
    /// child of the pod's) instead of the pod's own cgroup.
    pub fn start_in(pod: &Pod, cgroup: &crate::TestCgroup, config: HaproxyConfig) -> io::Result<Haproxy> {
        if let OutboundBackend::Server(a) = &config.outbound {
            assert_allowed_addr(a.ip());
        }
        let dir = TempDir::new("haproxy")?;
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, config.render())?;
        let cfg = config_path.to_string_lossy().into_owned();
        run("haproxy", &["-c", "-q", "-f", &cfg])
            .map_err(|e| io::Error::other(format!("haproxy -c rejected {cfg}: {e}\n{}", config.render())))?;
        let mut cmd = Command::new("haproxy");
        cmd.args(["-db", "-f", &cfg]);
        let creds = Creds { uid: config.uid, gid: config.gid };
        let mut proc = spawn_with(pod.netns(), cgroup, creds, cmd)?;
        let mut ports = vec![config.outbound_port];
        ports.extend(config.inbound_port);
        let pid = proc.pid();
        let ready = wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
            if ports.iter().all(|p| is_listening(pid, *p)) {
                return Some(Ok(()));
            }
            match proc.try_wait() {
                Ok(Some(st)) => Some(Err(format!("haproxy exited early ({st})"))),
                Err(e) => Some(Err(e.to_string())),
                Ok(None) => None,
            }
        });
        match ready {
            Some(Ok(())) => Ok(Haproxy { proc, config, config_path, _dir: dir }),
            other => Err(io::Error::other(format!(
                "haproxy in pod {} not listening on {ports:?}: {other:?}; stdout {:?} stderr {:?}",
                pod.name(),
                proc.stdout(),
                proc.stderr()
            ))),
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn config(&self) -> &HaproxyConfig {
        &self.config
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    pub fn process(&mut self) -> &mut Spawned {
        &mut self.proc
    }

    /// Raw stdout (HAProxy's log) and stderr.
    pub fn output(&self) -> (String, String) {
        (self.proc.stdout(), self.proc.stderr())
    }

    /// Traffic log entries so far (one per finished connection).
    pub fn log_lines(&self) -> Vec<HaproxyLogEntry> {
        self.proc.stdout().lines().filter_map(parse_log_line).collect()
    }

    /// Wait (bounded) until at least `n` entries were logged.
    pub fn wait_log_lines(&self, n: usize, timeout: Duration) -> Vec<HaproxyLogEntry> {
        wait_for(timeout, Duration::from_millis(10), || {
            let l = self.log_lines();
            (l.len() >= n).then_some(l)
        })
        .unwrap_or_else(|| self.log_lines())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_log_lines() {
        let v4 = "sidecap-log fe=outbound client=127.0.0.1:40000 frontend=127.0.0.1:15001 backend=outbound_dst server=10.251.100.10:80 bytes_in=5 bytes_out=31 term=-- tt=3";
        let e = parse_log_line(v4).expect("v4 line");
        assert_eq!(e.server, Some("10.251.100.10:80".parse().unwrap()));
        assert_eq!(e.client, Some("127.0.0.1:40000".parse().unwrap()));
        assert_eq!((e.bytes_in, e.bytes_out, e.term.as_str()), (5, 31, "--"));
        let v6 = "sidecap-log fe=outbound client=::1:40000 frontend=::1:15001 backend=outbound_dst server=fd00:5ca9::100:10:80 bytes_in=0 bytes_out=0 term=SC tt=1";
        let e = parse_log_line(v6).expect("v6 line");
        assert_eq!(e.server, Some("[fd00:5ca9::100:10]:80".parse().unwrap()));
        assert_eq!(e.frontend, Some("[::1]:15001".parse().unwrap()));
        let none = "sidecap-log fe=outbound client=127.0.0.1:1 frontend=127.0.0.1:15001 backend=outbound_dst server=-:- bytes_in=0 bytes_out=0 term=CC tt=0";
        assert_eq!(parse_log_line(none).expect("line").server, None);
        assert!(parse_log_line("Proxy outbound started.").is_none());
    }

    #[test]
    fn config_has_transparent_and_inbound_source() {
        let c = HaproxyConfig::default().render();
        assert!(c.contains("option transparent"), "{c}");
        assert!(c.contains("bind [::1]:15001"), "{c}");
        assert!(c.contains("source 127.0.0.6"), "{c}");
        assert!(c.contains("reject if { dst_port 15001 }") && c.contains("reject if { dst_port 15006 }"), "{c}");
        let plain = HaproxyConfig {
            outbound: OutboundBackend::Server("10.251.100.10:80".parse().unwrap()),
            inbound_port: None,
            ..Default::default()
        };
        assert!(!plain.render().contains("reject"), "no guard needed for a fixed server");
    }
}
