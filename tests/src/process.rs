//! Processes started inside a pod: its netns AND its cgroup, as a given uid/gid, with
//! stdout/stderr captured to files. Killed on Drop.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::cgroup::TestCgroup;
use crate::netns::Netns;
use crate::topology::Pod;
use crate::util::{TempDir, wait_for};

/// uid/gid a spawned process runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
}

impl Creds {
    pub const ROOT: Creds = Creds { uid: 0, gid: 0 };
    /// Istio's proxy identity (istio-proxy runs as 1337:1337).
    pub const PROXY: Creds = Creds { uid: 1337, gid: 1337 };
    /// An ordinary application user.
    pub const APP: Creds = Creds { uid: 1000, gid: 1000 };
}

/// Start `cmd` in `pod`'s netns and cgroup as `uid`/`gid`.
pub fn spawn_in(pod: &Pod, uid: u32, gid: u32, cmd: Command) -> io::Result<Spawned> {
    spawn_with(pod.netns(), pod.cgroup(), Creds { uid, gid }, cmd)
}

/// Start `cmd` in `netns` and `cgroup` as `creds`. In the child, before exec: join the
/// cgroup (write 0 to cgroup.procs), setns(CLONE_NEWNET), drop supplementary groups,
/// setgid, setuid, and ask for SIGKILL if the spawning thread dies (so spawn from the
/// test's own thread, not a short-lived helper). stdout/stderr always go to files in a
/// temp dir (read them with [`Spawned::stdout`]/[`Spawned::stderr`]); stdin is /dev/null.
pub fn spawn_with(netns: &Netns, cgroup: &TestCgroup, creds: Creds, mut cmd: Command) -> io::Result<Spawned> {
    let dir = TempDir::new("proc")?;
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    cmd.stdin(Stdio::null()).stdout(File::create(&stdout_path)?).stderr(File::create(&stderr_path)?);

    let procs = CString::new(cgroup.path().join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|_| io::Error::other("cgroup path contains NUL"))?;
    let ns_file = netns.open()?;
    let ns_fd = ns_file.as_raw_fd();
    let Creds { uid, gid } = creds;
    let program = format!("{:?}", cmd.get_program());

    // SAFETY: the closure runs between fork and exec and only makes raw syscalls on data
    // prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Set after setuid: a credential change clears the parent-death signal.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("spawn {program} in {}: {e}", netns.name())))?;
    drop(ns_file);
    Ok(Spawned { child: Some(child), dir, stdout_path, stderr_path, program })
}

/// A running process; SIGKILLed and reaped on Drop. Its output files live until then.
#[derive(Debug)]
pub struct Spawned {
    child: Option<Child>,
    dir: TempDir,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    program: String,
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Private scratch dir of this process (holds the stdout/stderr files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Exit status if it has exited (non-blocking).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Err(io::Error::other("process already reaped")),
        }
    }

    /// Wait up to `timeout` for exit; None if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let mut err = None;
        let status = wait_for(timeout, Duration::from_millis(5), || match self.try_wait() {
            Ok(s) => s,
            Err(e) => {
                err = Some(e);
                Some(ExitStatus::default())
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(status),
        }
    }

    /// Wait up to `timeout` for exit, killing it if it overstays; panics with its output if
    /// it did not exit in time. Returns the status and stdout.
    pub fn finish(&mut self, timeout: Duration) -> (ExitStatus, String) {
        match self.wait_timeout(timeout) {
            Ok(Some(status)) => (status, self.stdout()),
            other => {
                self.kill();
                panic!(
                    "{} (pid {}) did not exit within {timeout:?} ({other:?}); stdout: {} stderr: {}",
                    self.program,
                    self.pid(),
                    self.stdout(),
                    self.stderr()
                );
            }
        }
    }

    /// Wait (bounded) until stdout contains `needle`; false on timeout or early exit.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> bool {
        wait_for(timeout, Duration::from_millis(10), || {
            if self.stdout().contains(needle) {
                return Some(true);
            }
            match self.try_wait() {
                Ok(Some(_)) | Err(_) => Some(self.stdout().contains(needle)),
                Ok(None) => None,
            }
        })
        .unwrap_or(false)
    }

    /// `/proc/PID/cgroup` line for cgroup v2 (`0::/path`), relative to the cgroup2 mount.
    pub fn cgroup_v2_path(&self) -> io::Result<String> {
        let text = fs::read_to_string(format!("/proc/{}/cgroup", self.pid()))?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .ok_or_else(|| io::Error::other("no cgroup v2 line"))
    }

    /// (real uid, real gid) from /proc/PID/status.
    pub fn uid_gid(&self) -> io::Result<(u32, u32)> {
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> Option<u32> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        match (field("Uid:"), field("Gid:")) {
            (Some(u), Some(g)) => Ok((u, g)),
            _ => Err(io::Error::other("no Uid/Gid in /proc/PID/status")),
        }
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True when `pid`'s netns has a TCP socket in LISTEN on `port` (v4 or v6), read from
/// /proc/PID/net/tcp{,6} — no traffic is needed to learn that a server is ready.
pub fn is_listening(pid: i32, port: u16) -> bool {
    let needle = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && cols[1].ends_with(&needle) && cols[3] == "0A"
                })
            })
            .unwrap_or(false)
    })
}
