//! Running the real `sidecap` binary against a sandbox: the agent as its own process (so a
//! test can SIGKILL it), attached to the topology's cgroup, pinning under a test bpffs dir.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::TempDir;

/// The `sidecap` binary: `$SIDECAP_BIN` (set by `cargo xtask test`), else the one built next
/// to this test executable (`target/<profile>/sidecap`).
pub fn sidecap_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SIDECAP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/sidecap
    let p = exe.parent().and_then(Path::parent).expect("target dir").join("sidecap");
    assert!(p.exists(), "{} not built: run `cargo xtask test` (or `cargo build -p sidecap`)", p.display());
    p
}

/// Runs `sidecap ARGS` to completion (bounded) and returns (exit code, stdout, stderr).
pub fn sidecap(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(sidecap_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running sidecap {args:?}: {e}"));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `sidecap inspect --output json` parsed.
pub fn inspect(bpffs: &Path) -> serde_json::Value {
    try_inspect(bpffs).unwrap_or_else(|e| panic!("sidecap inspect failed: {e}"))
}

/// Like [`inspect`], but an error (e.g. the agent is still pinning) is returned.
pub fn try_inspect(bpffs: &Path) -> Result<serde_json::Value, String> {
    let (code, out, err) = sidecap(&["inspect", "--bpffs", &bpffs.display().to_string(), "--output", "json"]);
    if code != 0 {
        return Err(err);
    }
    serde_json::from_str(&out).map_err(|e| format!("inspect output is not JSON ({e}): {out}"))
}

/// A running `sidecap agent`; killed (SIGKILL) on Drop. Its pins stay: the test's
/// `BpfPinDir` removes them.
pub struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    _dir: TempDir,
    pub bpffs: PathBuf,
}

impl Agent {
    pub fn start(cgroup: &Path, bpffs: &Path, config_dir: &Path, extra: &[&str]) -> Agent {
        let config = config_dir.display().to_string();
        Agent::start_with_source(cgroup, bpffs, &["--config", &config], extra)
    }

    /// Like [`Agent::start`], with other source flags (`--kubernetes --kubeconfig FILE ...`).
    pub fn start_with_source(cgroup: &Path, bpffs: &Path, source: &[&str], extra: &[&str]) -> Agent {
        let dir = TempDir::new("agent").expect("agent temp dir");
        let mut args: Vec<String> = vec!["agent".into()];
        args.extend(source.iter().map(|s| s.to_string()));
        args.extend([
            "--cgroup".into(),
            cgroup.display().to_string(),
            "--bpffs".into(),
            bpffs.display().to_string(),
            "--poll-interval-ms".into(),
            "100".into(),
        ]);
        // Tests run agents side by side: an ephemeral admin port unless one is asked for.
        if !extra.contains(&"--admin-addr") {
            args.extend(["--admin-addr".into(), "127.0.0.1:0".into()]);
        }
        // No shared CNI socket between side-by-side agents unless a test asks for one.
        if !extra.contains(&"--cni-socket") {
            args.extend(["--cni-socket".into(), "off".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.path().join("agent.log");
        let mut a = Agent { child: None, args, log, _dir: dir, bpffs: bpffs.into() };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("agent log");
        let child = Command::new(sidecap_bin())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sidecap agent: {e}"));
        self.child = Some(child);
    }

    /// Starts the agent again with the same arguments (after `kill9` or `stop`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin endpoint's address, from the agent's log (bounded wait).
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(a) = log
                .lines()
                .rev() // the newest agent's, after a restart
                .filter(|l| l.contains("serving /metrics"))
                .find_map(|l| l.split("addr=").nth(1)?.split_whitespace().next()?.parse().ok())
            {
                return a;
            }
            assert!(Instant::now() < deadline, "no admin endpoint in the agent log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A plain HTTP/1.1 GET to the admin endpoint (on loopback): (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.try_admin_get(path).expect("admin endpoint")
    }

    fn try_admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let addr = self.admin_addr();
        assert!(addr.ip().is_loopback(), "admin endpoint must be on loopback in tests: {addr}");
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    }

    /// Waits until `/readyz` answers 200 (programs in place, first snapshot applied).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if self.try_admin_get("/readyz").is_ok_and(|(code, _)| code == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "agent not ready after {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the agent's CNI socket accepts connections: the maps are pinned before it is served, so a plugin
    /// call right after `wait_pods` could find nothing to connect to.
    pub fn wait_cni_socket(&mut self, socket: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // Connectable, not only present: a killed agent leaves its socket file behind.
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            self.assert_running();
            assert!(Instant::now() < deadline, "no CNI socket at {} after {timeout:?}; log:\n{}", socket.display(), self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL, as a crash or OOM kill would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Waits (bounded) for the agent to exit on its own; its exit code, or None if it is
    /// still running at `timeout` (then it is killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Panics with the agent's log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("sidecap agent exited ({st}); log:\n{}", self.log());
            }
        }
    }

    /// Waits until `inspect` shows every netns cookie in `cookies` with at least
    /// `min_generation`; returns the inspect output.
    pub fn wait_pods(&mut self, cookies: &[u64], min_generation: u64, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if let Ok(v) = try_inspect(&self.bpffs) {
                let ready = cookies.iter().all(|c| {
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["netns_cookie"].as_u64() == Some(*c) && p["generation"].as_u64().unwrap_or(0) >= min_generation)
                });
                if ready {
                    return v;
                }
                if Instant::now() >= deadline {
                    panic!("pods {cookies:?} not in the maps after {timeout:?}; inspect: {v:#}\nagent log:\n{}", self.log());
                }
            } else if Instant::now() >= deadline {
                panic!("agent did not install within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}
