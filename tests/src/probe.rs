//! Driving `sc-probe` inside pods and parsing its JSON lines.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::cgroup::TestCgroup;
use crate::process::{Creds, Spawned, spawn_in, spawn_with};
use crate::topology::Pod;
use crate::util::assert_allowed_addr;

/// Path of the sc-probe binary as Cargo built it; usable from integration tests only
/// (Cargo sets `CARGO_BIN_EXE_*` for those): `Probe::at(probe_bin!())`.
#[macro_export]
macro_rules! probe_bin {
    () => {
        env!("CARGO_BIN_EXE_sc-probe")
    };
}

/// One `sc-probe connect` result.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ConnectResult {
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// socket | bind | connect | send | recv | done
    pub stage: String,
    pub local: Option<String>,
    pub peer: Option<String>,
    pub reply: String,
    pub connect_us: Option<u64>,
    pub uid: u32,
}

impl ConnectResult {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local.as_deref().and_then(|s| s.parse().ok())
    }
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_deref().and_then(|s| s.parse().ok())
    }
    /// First line of the reply: `upstream <addr>` / `listen <addr>` banners.
    pub fn banner(&self) -> &str {
        self.reply.lines().next().unwrap_or("")
    }
}

/// One connection seen by `sc-probe listen`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ListenConn {
    pub local: Option<String>,
    pub peer: String,
    /// SO_ORIGINAL_DST (v4 socket) or IP6T_SO_ORIGINAL_DST (v6 socket).
    pub orig_dst: Option<String>,
    pub orig_dst_errno: Option<i32>,
    /// SOL_IP/SO_ORIGINAL_DST asked on a v6 socket too (null fields on v4 sockets).
    pub orig_dst_sol_ip: Option<String>,
    pub orig_dst_sol_ip_errno: Option<i32>,
    pub received: String,
    pub error: Option<String>,
    pub uid: u32,
}

/// Options of `sc-probe connect`.
#[derive(Clone, Debug, Default)]
pub struct ConnectOpts {
    pub bind: Option<String>,
    pub send: Option<String>,
    /// Default 3000 ms.
    pub timeout_ms: Option<u64>,
    pub udp: bool,
    /// Keep the connection open this long after connecting, before sending.
    pub hold_ms: Option<u64>,
    /// Unconnected UDP (sendto/recvfrom); the result's `peer` is the reply's source.
    pub sendto: bool,
}

impl ConnectOpts {
    pub fn send(text: &str) -> ConnectOpts {
        ConnectOpts { send: Some(text.to_owned()), ..Default::default() }
    }

    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(b) = &self.bind {
            a.extend(["--bind".to_owned(), b.clone()]);
        }
        if let Some(s) = &self.send {
            a.extend(["--send".to_owned(), s.clone()]);
        }
        if let Some(t) = self.timeout_ms {
            a.extend(["--timeout-ms".to_owned(), t.to_string()]);
        }
        if self.udp {
            a.push("--udp".to_owned());
        }
        if self.sendto {
            a.push("--sendto".to_owned());
        }
        if let Some(h) = self.hold_ms {
            a.extend(["--hold-ms".to_owned(), h.to_string()]);
        }
        a
    }
}

/// Handle on the sc-probe binary.
#[derive(Clone, Debug)]
pub struct Probe {
    bin: PathBuf,
}

impl Probe {
    pub fn at(bin: impl AsRef<Path>) -> Probe {
        Probe { bin: bin.as_ref().to_owned() }
    }

    /// `$SC_PROBE` if set, else `sc-probe` next to the test binary's parent dir
    /// (target/<profile>/sc-probe when running from target/<profile>/deps/).
    pub fn locate() -> io::Result<Probe> {
        if let Some(p) = std::env::var_os("SC_PROBE") {
            return Ok(Probe::at(p));
        }
        let exe = std::env::current_exe()?;
        let dirs = exe.ancestors().skip(1).take(2);
        for d in dirs {
            let cand = d.join("sc-probe");
            if cand.is_file() {
                return Ok(Probe::at(cand));
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, "sc-probe not found (set SC_PROBE)"))
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// A Command running sc-probe with `args` (spawn it with [`spawn_in`]).
    pub fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args.iter().map(|s| s.as_ref()));
        c
    }

    /// Run `sc-probe connect TARGET …` in `pod` as `creds` and parse its line. Panics with
    /// the probe's output if it does not print a result (a result with ok=false is returned).
    pub fn connect(&self, pod: &Pod, creds: Creds, target: &str, opts: &ConnectOpts) -> ConnectResult {
        let mut p = self.start_connect(pod, creds, target, opts);
        self.finish_connect(&mut p, target, opts)
    }

    /// Starts `sc-probe connect` without waiting (e.g. to hold connections open at once);
    /// collect it with [`Probe::finish_connect`].
    pub fn start_connect(&self, pod: &Pod, creds: Creds, target: &str, opts: &ConnectOpts) -> Spawned {
        self.start_connect_in(pod, pod.cgroup(), creds, target, opts)
    }

    /// `sc-probe connect` in `pod`'s netns but in `cgroup` (a container's cgroup).
    pub fn connect_in(&self, pod: &Pod, cgroup: &TestCgroup, creds: Creds, target: &str, opts: &ConnectOpts) -> ConnectResult {
        let mut p = self.start_connect_in(pod, cgroup, creds, target, opts);
        self.finish_connect(&mut p, target, opts)
    }

    fn start_connect_in(&self, pod: &Pod, cgroup: &TestCgroup, creds: Creds, target: &str, opts: &ConnectOpts) -> Spawned {
        check_target(target);
        let mut args = vec!["connect".to_owned(), target.to_owned()];
        args.extend(opts.args());
        spawn_with(pod.netns(), cgroup, creds, self.command(&args))
            .unwrap_or_else(|e| panic!("spawn sc-probe connect {target} in pod {}: {e}", pod.name()))
    }

    pub fn finish_connect(&self, p: &mut Spawned, target: &str, opts: &ConnectOpts) -> ConnectResult {
        let limit = Duration::from_millis(opts.timeout_ms.unwrap_or(3000) + opts.hold_ms.unwrap_or(0) + 5000);
        let (_, out) = p.finish(limit);
        let line = out.lines().last().unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("sc-probe connect {target}: bad output {out:?} ({e}); stderr: {}", p.stderr()))
    }

    /// `sc-probe loop TARGET --count N --interval-ms M --summary-only`; returns the summary.
    pub fn loop_summary(&self, pod: &Pod, creds: Creds, target: &str, count: u64, interval_ms: u64) -> serde_json::Value {
        check_target(target);
        let args = [
            "loop".to_owned(),
            target.to_owned(),
            "--count".into(),
            count.to_string(),
            "--interval-ms".into(),
            interval_ms.to_string(),
            "--summary-only".into(),
        ];
        let mut p = spawn_in(pod, creds.uid, creds.gid, self.command(&args)).expect("spawn sc-probe loop");
        let limit = Duration::from_millis(count * (interval_ms + 3000) + 5000);
        let (_, out) = p.finish(limit);
        serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("sc-probe loop: bad output {out:?}: {e}"))
    }

    /// Start `sc-probe listen ADDR [extra]` in `pod` as `creds`; returns once it printed
    /// its `listening` line (bounded: 5 s).
    pub fn listen(&self, pod: &Pod, creds: Creds, addr: &str, extra: &[&str]) -> ProbeListener {
        self.listen_in(pod, pod.cgroup(), creds, addr, extra)
    }

    /// [`Probe::listen`] in `cgroup` (a container's cgroup) instead of the pod's own.
    pub fn listen_in(&self, pod: &Pod, cgroup: &TestCgroup, creds: Creds, addr: &str, extra: &[&str]) -> ProbeListener {
        let mut args = vec!["listen".to_owned(), addr.to_owned()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = spawn_with(pod.netns(), cgroup, creds, self.command(&args))
            .unwrap_or_else(|e| panic!("spawn sc-probe listen {addr} in pod {}: {e}", pod.name()));
        assert!(
            p.wait_stdout("\"listening\"", Duration::from_secs(5)),
            "sc-probe listen {addr} did not start: stdout {:?} stderr {:?}",
            p.stdout(),
            p.stderr()
        );
        ProbeListener { proc: p }
    }
}

fn check_target(target: &str) {
    if let Ok(a) = target.parse::<SocketAddr>() {
        assert_allowed_addr(a.ip());
    }
}

/// A running `sc-probe listen`; killed on Drop.
pub struct ProbeListener {
    proc: Spawned,
}

impl ProbeListener {
    pub fn process(&mut self) -> &mut Spawned {
        &mut self.proc
    }

    /// Connections reported so far (each is printed when the connection ends).
    pub fn connections(&self) -> Vec<ListenConn> {
        self.proc
            .stdout()
            .lines()
            .filter(|l| l.contains("\"event\":\"conn\""))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad listen line {l:?}: {e}")))
            .collect()
    }

    /// Datagrams a `listen --udp` answered: `{local, peer, received}` each.
    pub fn datagrams(&self) -> Vec<serde_json::Value> {
        self.proc
            .stdout()
            .lines()
            .filter(|l| l.contains("\"event\":\"datagram\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait (bounded) for at least `n` reported connections.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> Vec<ListenConn> {
        crate::util::wait_for(timeout, Duration::from_millis(10), || {
            let c = self.connections();
            (c.len() >= n).then_some(c)
        })
        .unwrap_or_else(|| self.connections())
    }
}
