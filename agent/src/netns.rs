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
        // SAFETY: setns on a descriptor we own; it changes only this throwaway thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(Error::Enter { path: p, source: std::io::Error::last_os_error() });
        }
        socket_cookie().map_err(|source| Error::Cookie { path: p, source })
    })
    .join()
    .map_err(|_| Error::Thread { path: path.into() })?
}

fn socket_cookie() -> std::io::Result<u64> {
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket() returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid, writable and sized as SO_NETNS_COOKIE expects.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
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

/// Envoy's IPv6 inbound passthrough source: istio-iptables adds it to `lo` when the pod
/// has IPv6 (`ip -6 addr add ::6/128 dev lo`); sidecap does the same, over netlink.
pub fn add_inbound_passthrough_v6(path: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    let p = path.to_path_buf();
    std::thread::spawn(move || -> Result<(), Error> {
        // SAFETY: setns on a descriptor we own; it changes only this throwaway thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(Error::Enter { path: p, source: std::io::Error::last_os_error() });
        }
        add_lo_v6(&std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)).map_err(|source| Error::Cookie { path: p, source })
    })
    .join()
    .map_err(|_| Error::Thread { path: path.into() })?
}

/// RTM_NEWADDR for `addr`/128 on `lo` in the calling thread's netns; already there is fine.
fn add_lo_v6(addr: &std::net::Ipv6Addr) -> std::io::Result<()> {
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket() returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated string literal.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // nlmsghdr (16) + ifaddrmsg (8) + two rtattr of 4 + 16 bytes.
    let mut msg = Vec::with_capacity(64);
    let len: u32 = 16 + 8 + 2 * 20;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 128, 0, libc::RT_SCOPE_HOST]);
    msg.extend_from_slice(&lo.to_ne_bytes());
    for ty in [IFA_LOCAL, IFA_ADDRESS] {
        msg.extend_from_slice(&20u16.to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&addr.octets());
    }
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and sa are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: buf is valid and writable for buf.len() bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // NLMSG_ERROR carries the result: 0 ok, -EEXIST already there.
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if err != 0 && err != -libc::EEXIST {
            return Err(std::io::Error::from_raw_os_error(-err));
        }
    }
    Ok(())
}
