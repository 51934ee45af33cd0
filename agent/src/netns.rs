//! Pod identity: the netns cookie, as `bpf_get_netns_cookie` reports it in the kernel.

use std::{
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening netns {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("entering netns {path}: {source}")]
    Enter { path: PathBuf, source: std::io::Error },
    #[error("reading the netns cookie of {path}: {source}")]
    Cookie { path: PathBuf, source: std::io::Error },
    #[error("netns helper thread failed for {path}")]
    Thread { path: PathBuf },
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookie of the network namespace at `path` (e.g. `/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn cookie_of_path(path: &Path) -> Result<u64, Error> {
    let file = File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    let p = path.to_path_buf();
    // setns affects only the calling thread: do it on a throwaway one.
    std::thread::spawn(move || -> Result<u64, Error> {
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(Error::Enter { path: p, source: std::io::Error::last_os_error() });
        }
        socket_cookie().map_err(|source| Error::Cookie { path: p, source })
    })
    .join()
    .map_err(|_| Error::Thread { path: path.into() })?
}

/// Cookie of the calling thread's current netns.
pub fn current_cookie() -> std::io::Result<u64> {
    socket_cookie()
}

fn socket_cookie() -> std::io::Result<u64> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Cookies by path and nsfs inode: `stat` is cheap, entering a netns is not. The inode
/// catches a path (e.g. `/run/netns/NAME`) that names another netns later; the path
/// catches an inode number the kernel reused for a new netns.
#[derive(Debug, Default)]
pub struct CookieCache {
    by_inode: std::collections::HashMap<(PathBuf, u64, u64), u64>,
}

impl CookieCache {
    pub fn cookie(&mut self, path: &Path) -> Result<u64, Error> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).map_err(|source| Error::Open { path: path.into(), source })?;
        let key = (path.to_path_buf(), md.dev(), md.ino());
        if let Some(c) = self.by_inode.get(&key) {
            return Ok(*c);
        }
        let c = cookie_of_path(path)?;
        self.by_inode.insert(key, c);
        Ok(c)
    }

    /// Drops entries whose netns no longer exists (call now and then).
    pub fn retain(&mut self, live: &std::collections::HashSet<u64>) {
        self.by_inode.retain(|_, c| live.contains(c));
    }
}
