//! Adopting a proxy that was listening before its pod was written. sockops registers the
//! inbound listener in `INBOUND_LISTENERS` only when it starts listening (and only for a netns
//! already in `PODS`), so a pod running before sidecap arrived would never be captured
//! inbound. Here the listener is found through /proc (a process in the pod's netns, a
//! LISTEN socket on the inbound port in that netns's TCP table, the fd naming that socket
//! inode), duplicated into the agent with pidfd_getfd(2), and inserted under the key sockops
//! would have used. The duplicate refers to the same socket, so closing ours changes nothing.
//!
//! Needs CAP_SYS_PTRACE over the proxy's process (pidfd_getfd checks
//! PTRACE_MODE_ATTACH_REALCREDS; reading another user's /proc/<pid>/fd is the same check) and
//! the host's /proc (hostPID).

use std::{
    collections::BTreeMap,
    os::{
        fd::{FromRawFd, OwnedFd},
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netns {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("pidfd_open of pid {pid} (the proxy's listener on port {port}): {source}")]
    PidfdOpen { pid: u32, port: u16, source: std::io::Error },
    #[error(
        "pidfd_getfd of fd {fd} of pid {pid} (the proxy's listener on port {port}; needs CAP_SYS_PTRACE): {source}"
    )]
    GetFd { pid: u32, fd: u32, port: u16, source: std::io::Error },
    #[error("map INBOUND_LISTENERS: {0}")]
    Map(#[source] aya::maps::MapError),
}

/// A listening socket of the pod, and one process fd that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub pid: u32,
    pub fd: u32,
    pub v6: bool,
}

/// Registers the pod's listeners on `port` that already exist; returns how many (0: the
/// proxy is not listening yet, and sockops will register it when it does).
pub fn register_listeners(
    bpffs: &Path,
    proc_root: &Path,
    cookie: u64,
    netns: &Path,
    port: u16,
) -> Result<usize, Error> {
    let found = find_listeners(proc_root, netns, port)?;
    if found.is_empty() {
        return Ok(0);
    }
    let data = MapData::from_pin(map_pin(bpffs, "INBOUND_LISTENERS")).map_err(Error::Map)?;
    let mut map: SockHash<MapData, u64> = Map::SockHash(data).try_into().map_err(Error::Map)?;
    for l in &found {
        let fd = take_fd(l.pid, l.fd, port)?;
        let key = if l.v6 { cookie | V6_LISTENER } else { cookie };
        map.insert(key, fd, 0).map_err(Error::Map)?;
    }
    Ok(found.len())
}

/// One listener per family (sockops keeps one per key too): the first process found holding it.
pub fn find_listeners(proc_root: &Path, netns: &Path, port: u16) -> Result<Vec<Listener>, Error> {
    let md = std::fs::metadata(netns).map_err(|source| Error::Netns { path: netns.into(), source })?;
    let target = (md.dev(), md.ino());
    let pids: Vec<u32> = std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::metadata(proc_root.join(format!("{pid}/ns/net"))).is_ok_and(|m| (m.dev(), m.ino()) == target)
        })
        .collect();
    let Some(first) = pids.first() else { return Ok(Vec::new()) };
    // The TCP tables of /proc/<pid>/net are those of the pid's netns.
    let mut inodes: BTreeMap<u64, bool> = BTreeMap::new();
    for (table, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(proc_root.join(format!("{first}/net/{table}"))).unwrap_or_default();
        for ino in listening_inodes(&text, port) {
            inodes.insert(ino, v6);
        }
    }
    let mut out: Vec<Listener> = Vec::new();
    for pid in &pids {
        let Ok(fds) = std::fs::read_dir(proc_root.join(format!("{pid}/fd"))) else { continue };
        for e in fds.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else { continue };
            let Some(ino) = socket_inode(&target.to_string_lossy()) else { continue };
            let (Some(&v6), Some(fd)) = (inodes.get(&ino), e.file_name().to_str().and_then(|f| f.parse().ok())) else {
                continue;
            };
            if !out.iter().any(|l| l.v6 == v6) {
                out.push(Listener { pid: *pid, fd, v6 });
            }
        }
    }
    Ok(out)
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

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

fn take_fd(pid: u32, fd: u32, port: u16) -> Result<OwnedFd, Error> {
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return Err(Error::PidfdOpen { pid, port, source: std::io::Error::last_os_error() });
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let raw =
        unsafe { libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd as libc::c_int, 0) };
    if raw < 0 {
        return Err(Error::GetFd { pid, fd, port, source: std::io::Error::last_os_error() });
    }
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
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
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[1]"), None);
    }
}
