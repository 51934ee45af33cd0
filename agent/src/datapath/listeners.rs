//! Adopting a proxy that was listening before its pod was written. sockops registers the
//! inbound listener in `INBOUND_LISTENERS` only when it starts listening (and only for a netns
//! already in `PODS`), so a pod running before sidecap arrived would never be captured
//! inbound. Here the listener is found through /proc: the processes in the pod's netns
//! (`/proc/<pid>/ns/net`), the LISTEN socket on the inbound port in that netns's TCP table
//! (`/proc/<pid>/net/tcp{,6}`, its inode). The process's fds are then duplicated into the
//! agent with pidfd_getfd(2), one number at a time up to its fd table size (listing
//! `/proc/<pid>/fd` of another user would need CAP_DAC_READ_SEARCH as well), until one is
//! that socket, which is inserted under the key sockops would have used. A duplicate refers
//! to the same socket, so closing ours changes nothing for the proxy.
//!
//! Needs CAP_SYS_PTRACE over the proxy's processes (`ns/net` and pidfd_getfd are ptrace
//! access checks) and the host's /proc (hostPID).

use std::{
    collections::{BTreeMap, HashMap},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, SockHash};

use super::install::map_pin;

/// Key bit of a netns's IPv6 listener; the same as `V6_LISTENER` in
/// ebpf/sidecap-ebpf/src/inbound.rs, which sockops uses.
const V6_LISTENER: u64 = 1 << 63;

/// `st` of a listening socket in /proc/net/tcp{,6}.
const TCP_LISTEN: &str = "0A";

/// fds probed in a process whose fd table size cannot be read.
const DEFAULT_FD_TABLE: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netns {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("the agent lacks CAP_SYS_PTRACE: a proxy already listening on port {port} cannot be adopted")]
    NoPtrace { port: u16 },
    #[error("pidfd_getfd of pid {pid} (the proxy's listener on port {port}; needs CAP_SYS_PTRACE): {source}")]
    GetFd { pid: u32, port: u16, source: std::io::Error },
    #[error("map INBOUND_LISTENERS: {0}")]
    Map(#[source] aya::maps::MapError),
}

/// The pod's listening sockets on a port, and the processes that may hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub pids: Vec<u32>,
    /// Socket inode → IPv6 (one per family, as sockops keeps one per key).
    pub sockets: BTreeMap<u64, bool>,
}

/// The host's processes by network namespace (device and inode of `/proc/<pid>/ns/net`),
/// from one scan of /proc: a pass that writes many new pods looks each one up here instead
/// of scanning /proc once per pod.
#[derive(Debug, Default)]
pub struct ProcNetns {
    by_netns: HashMap<(u64, u64), Vec<u32>>,
}

impl ProcNetns {
    /// Without CAP_SYS_PTRACE every process of another user is invisible: say so once,
    /// rather than find nothing. With it, a process that cannot be looked at is one in
    /// transition (exec, exit), which holds no listener of ours.
    pub fn scan(proc_root: &Path, port: u16) -> Result<ProcNetns, Error> {
        if !has_cap_sys_ptrace() {
            return Err(Error::NoPtrace { port });
        }
        let mut by_netns: HashMap<(u64, u64), Vec<u32>> = HashMap::new();
        for e in std::fs::read_dir(proc_root).into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Ok(m) = std::fs::metadata(proc_root.join(format!("{pid}/ns/net"))) {
                by_netns.entry((m.dev(), m.ino())).or_default().push(pid);
            }
        }
        Ok(ProcNetns { by_netns })
    }

    fn pids(&self, netns: &Path) -> Result<&[u32], Error> {
        let md = std::fs::metadata(netns).map_err(|source| Error::Netns { path: netns.into(), source })?;
        Ok(self.by_netns.get(&(md.dev(), md.ino())).map(Vec::as_slice).unwrap_or_default())
    }
}

/// Registers the pod's listeners on `port` that already exist; returns how many (0: the
/// proxy is not listening yet, and sockops will register it when it does).
pub fn register_listeners(bpffs: &Path, procs: &ProcNetns, proc_root: &Path, cookie: u64, netns: &Path, port: u16) -> Result<usize, Error> {
    let found = find_listeners(procs, proc_root, netns, port)?;
    if found.sockets.is_empty() {
        return Ok(0);
    }
    let data = MapData::from_pin(map_pin(bpffs, sidecap_common::abi::INBOUND_LISTENERS.name)).map_err(Error::Map)?;
    let mut map: SockHash<MapData, u64> = Map::SockHash(data).try_into().map_err(Error::Map)?;
    let mut n = 0;
    for (inode, v6) in &found.sockets {
        let Some(fd) = take_socket(proc_root, &found.pids, *inode, port)? else { continue };
        let key = if *v6 { cookie | V6_LISTENER } else { cookie };
        map.insert(key, fd, 0).map_err(Error::Map)?;
        n += 1;
    }
    Ok(n)
}

pub fn find_listeners(procs: &ProcNetns, proc_root: &Path, netns: &Path, port: u16) -> Result<Found, Error> {
    let pids = procs.pids(netns)?.to_vec();
    let Some(first) = pids.first() else { return Ok(Found::default()) };
    // The TCP tables of /proc/<pid>/net are those of the pid's netns.
    let mut sockets: BTreeMap<u64, bool> = BTreeMap::new();
    for (table, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(proc_root.join(format!("{first}/net/{table}"))).unwrap_or_default();
        if let Some(ino) = listening_inodes(&text, port).first() {
            sockets.insert(*ino, v6);
        }
    }
    Ok(Found { pids, sockets })
}

/// Inodes of the LISTEN sockets on `port` in a /proc/net/tcp{,6} table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            let ok = u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == TCP_LISTEN;
            ok.then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect()
}

/// CAP_SYS_PTRACE in this process's effective set.
fn has_cap_sys_ptrace() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| u64::from_str_radix(l.strip_prefix("CapEff:")?.trim(), 16).ok())
        .is_some_and(|eff| eff & (1 << CAP_SYS_PTRACE) != 0)
}

/// `FDSize:` of /proc/<pid>/status (readable by anyone).
fn fd_table_size(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("FDSize:")?.trim().parse().ok())
}

/// A duplicate of the socket with this inode, from whichever of `pids` holds it.
fn take_socket(proc_root: &Path, pids: &[u32], inode: u64, port: u16) -> Result<Option<OwnedFd>, Error> {
    for &pid in pids {
        // SAFETY: pidfd_open takes a pid and flags; the result is checked before use.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if raw < 0 {
            continue; // exited meanwhile
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let status = std::fs::read_to_string(proc_root.join(format!("{pid}/status"))).unwrap_or_default();
        for fd in 0..fd_table_size(&status).unwrap_or(DEFAULT_FD_TABLE) {
            // SAFETY: pidfd_getfd takes a live pidfd, an fd number and flags; the result is checked before use.
            let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd as libc::c_int, 0) };
            if raw < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // No such fd, or the process exited: try the next.
                    Some(libc::EBADF) => continue,
                    Some(libc::ESRCH) => break,
                    _ => return Err(Error::GetFd { pid, port, source: e }),
                }
            }
            // SAFETY: the kernel just returned this fd to us; nothing else owns it.
            let dup = unsafe { OwnedFd::from_raw_fd(raw as i32) };
            // SAFETY: libc::stat is plain data, for which all zeros is a valid value.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: dup is an open fd and st a valid, writable libc::stat.
            if unsafe { libc::fstat(dup.as_raw_fd(), &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK && st.st_ino == inode {
                return Ok(Some(dup));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listeners_from_a_tcp_table() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:3AAE 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:3AAE 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1337        0 4343 1 0000000000000000 20 4 30 10 -1\n\
   2: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4444 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(listening_inodes(t, 15022), vec![4242]);
        assert_eq!(listening_inodes(t, 15001), vec![4444]);
        assert!(listening_inodes(t, 15006).is_empty());
        let status = "Name:\thaproxy\nUmask:\t0022\nFDSize:\t128\nGroups:\t\n";
        assert_eq!(fd_table_size(status), Some(128));
    }
}
