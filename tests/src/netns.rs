//! Network namespaces made with `ip netns add` (so they show in /run/netns and tools like
//! `ip -n` and the agent's directory source can name them); deleted on Drop.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::util::{run, unique_name};

/// `SO_NETNS_COOKIE` (Linux 5.14+); not in every libc crate version.
pub const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Made by this test (deleted on drop), not by someone else (a container runtime).
    owned: bool,
}

impl Netns {
    /// `ip netns add sidecap-test-<prefix>-<pid>-<n>` and bring `lo` up.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace someone else made under /run/netns (e.g. podman's `netns-…`); it is
    /// theirs to delete, so dropping this leaves it alone.
    pub fn existing(path: &Path) -> io::Result<Netns> {
        let bad = || io::Error::other(format!("{} is not a named netns under /run/netns", path.display()));
        if path.parent() != Some(Path::new("/run/netns")) {
            return Err(bad());
        }
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?.to_string();
        Ok(Netns { name, owned: false })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Open the namespace file (for setns).
    pub fn open(&self) -> io::Result<File> {
        File::open(self.path())
    }

    /// `ip -n <name> ARGS…`, checked.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        let mut argv = vec!["-n", self.name.as_str()];
        argv.extend_from_slice(args);
        run("ip", &argv)
    }

    /// `ip netns exec <name> PROGRAM ARGS…` as root, checked; returns the output.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let mut argv = vec!["netns", "exec", self.name.as_str(), program];
        argv.extend_from_slice(args);
        run("ip", &argv)
    }

    /// Like [`Netns::exec`], returning stdout as a String.
    pub fn exec_stdout(&self, program: &str, args: &[&str]) -> io::Result<String> {
        Ok(String::from_utf8_lossy(&self.exec(program, args)?.stdout).into_owned())
    }

    /// `sysctl -w KEY=VALUE` inside the namespace (net.* sysctls are per netns).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]).map(|_| ())
    }

    /// Run `f` on a fresh scoped thread that has joined this netns (only that thread does:
    /// the rest of the test process stays where it is). Sockets created inside stay in the
    /// netns and can be used from any thread afterwards.
    pub fn run<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on the current thread with a valid netns fd.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The netns cookie (`SO_NETNS_COOKIE` of a socket opened inside), the key sidecap uses
    /// for per-pod state. Stable for the namespace's lifetime.
    pub fn cookie(&self) -> io::Result<u64> {
        self.run(current_netns_cookie)?
    }

    /// The interface's index inside this netns.
    pub fn ifindex(&self, ifname: &str) -> io::Result<u32> {
        // `ip netns exec` remounts /sys for the namespace, so this reads the right one.
        let out = self.exec_stdout("cat", &[&format!("/sys/class/net/{ifname}/ifindex")])?;
        out.trim().parse().map_err(|e| io::Error::other(format!("ifindex of {ifname}: {e}")))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Interfaces inside (veth ends) are destroyed with the namespace.
        if let Err(e) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("sidecap-tests: {e}");
        }
    }
}

/// Netns cookie of the calling thread's current network namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: socket/getsockopt/close with valid arguments and a u64 out-buffer.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}
