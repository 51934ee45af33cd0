//! Small shared helpers: unique names, temp dirs, checked commands, bounded waits.

use std::ffi::OsStr;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static NAME_PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names this test process's netns, cgroups and pin dirs start with, instead of
/// `sidecap-test` (e.g. a test file whose leftovers should be told apart). The first call
/// of the process wins; call it before making anything.
pub fn set_name_prefix(prefix: &str) {
    let _ = NAME_PREFIX.set(prefix.to_owned());
}

/// `sidecap-test-<prefix>-<pid>-<n>`: unique per process and per call, so parallel tests
/// (and parallel test binaries) never collide, and leftovers are easy to spot.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let first = NAME_PREFIX.get().map(String::as_str).unwrap_or("sidecap-test");
    format!("{first}-{prefix}-{}-{n}", std::process::id())
}

/// True when running as root (euid 0). Privileged tests skip otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skip (return early with a printed reason) when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("SKIP {}: needs root (netns, cgroups, setuid)", module_path!());
            return;
        }
    };
}

/// Addresses the sandbox may ever put on an interface or target: loopback, 10.251.0.0/16,
/// fd00:5ca9::/64 (and v4-mapped forms of those). Anything else is a bug in a test.
pub fn is_allowed_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || (v4.octets()[0] == 10 && v4.octets()[1] == 251),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_allowed_addr(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback() || (s[0] == 0xfd00 && s[1] == 0x5ca9 && s[2] == 0 && s[3] == 0)
        }
    }
}

/// Panics unless `ip` is allowed (see [`is_allowed_addr`]).
pub fn assert_allowed_addr(ip: IpAddr) {
    assert!(is_allowed_addr(ip), "address {ip} is outside the sandbox ranges (127/8, ::1, 10.251.0.0/16, fd00:5ca9::/64)");
}

/// Run a command to completion, capturing output; Err if it cannot start or exits non-zero.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> io::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        let argv: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        return Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(out)
}

/// Poll `f` every `step` until it returns Some or `timeout` passes (bounded by both).
pub fn wait_for<T>(timeout: Duration, step: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(step);
    }
}

/// A directory under the system temp dir, removed on Drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir(&path)?;
        // Readable by the unprivileged processes we spawn (configs are read as uid 1337).
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Waits (bounded, polling every 50 ms) until `f` holds; panics naming `what` on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    if wait_for(timeout, Duration::from_millis(50), || f().then_some(())).is_none() {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}
