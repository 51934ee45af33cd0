//! Running first: sidecap must see the address the application asked for, before any other
//! program on the same hook (a socket load balancer such as Cilium's kube-proxy replacement)
//! rewrites a Service VIP to a backend.
//!
//! Kernel rules (kernel/bpf/cgroup.c): the programs of one cgroup run in list order, and a
//! child cgroup's run before its parent's. Linux 6.17 adds mprog placement for cgroup links
//! (`BPF_F_BEFORE` with no relative program: first in the list, guarded by the list's
//! revision) and `BPF_F_PREORDER` for links (run before the programs of descendant cgroups).
//! Older kernels only append: there, attaching at the cgroup that holds all pods (below the
//! root, where socket load balancers attach) keeps sidecap first.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use super::link::{self, flags};

/// Hooks whose programs rewrite destinations (pin names): sidecap's must run before any
/// other's. The rest (sockops, getsockopt, recvmsg) only observe, answer
/// SO_ORIGINAL_DST, or rewrite a reply's source from the proxy's loopback address, which a
/// load balancer never matches; they keep the plain (append) attach.
pub const ORDERED_HOOKS: &[&str] = &["connect4", "connect6", "sendmsg4", "sendmsg6"];

/// How many times a placement is retried when another attach changed the list meanwhile.
const STALE_RETRIES: usize = 8;

/// At most this many cgroups are checked per pass (a node has a few per pod).
const MAX_CGROUPS: usize = 20_000;

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening cgroup {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("loading the mprog probe program: {0}")]
    ProbeLoad(#[source] io::Error),
    #[error("querying the {hook} programs of cgroup {path}: {source}")]
    Query { hook: &'static str, path: PathBuf, source: io::Error },
    #[error("attaching {hook} first on cgroup {path}: {source}")]
    Attach { hook: &'static str, path: PathBuf, source: io::Error },
}

/// Whether this kernel places cgroup links (mprog: `BPF_F_BEFORE`, `expected_revision`,
/// `BPF_F_PREORDER` for links). Asked of the kernel: a link placed before a link id that
/// does not exist fails with ENOENT where mprog exists and EINVAL (unknown flags) where
/// not, and in neither case attaches anything.
pub fn probe_mprog(cgroup: &Path) -> Result<bool, Error> {
    // r0 = 1; exit
    let insns = [0x0000_0001_0000_00b7u64, 0x0000_0000_0000_0095];
    let prog = link::load_raw(PROG_TYPE_CGROUP_SOCK_ADDR, link::attach_type::CGROUP_INET4_CONNECT, "sidecap_probe", &insns)
        .map_err(Error::ProbeLoad)?;
    let cg = open(cgroup)?;
    let r = link::create_with(
        prog.as_fd(),
        cg.as_fd(),
        link::attach_type::CGROUP_INET4_CONNECT,
        flags::BEFORE | flags::ID | flags::LINK,
        u32::MAX,
        0,
    );
    Ok(match r {
        // Cannot happen (no such link); detach at once if a kernel ever disagrees.
        Ok(fd) => {
            drop(fd);
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "cgroup mprog probe");
            e.raw_os_error() == Some(libc::ENOENT)
        }
    })
}

pub fn open(cgroup: &Path) -> Result<File, Error> {
    File::open(cgroup).map_err(|source| Error::Open { path: cgroup.into(), source })
}

/// The cgroup's id as BPF reports it (the cgroup2 directory's inode number).
pub fn cgroup_id(cgroup: &Path) -> Result<u64, Error> {
    std::fs::metadata(cgroup)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .map_err(|source| Error::Open { path: cgroup.into(), source })
}

/// True when the cgroup has child cgroups (their programs would run before a plain one).
pub fn has_children(cgroup: &Path) -> bool {
    std::fs::read_dir(cgroup)
        .map(|rd| rd.flatten().any(|e| e.file_type().is_ok_and(|t| t.is_dir())))
        .unwrap_or(false)
}

/// Attaches `prog` first on the cgroup's `attach_type` list (`BPF_F_BEFORE`, plus
/// `BPF_F_PREORDER` when `preorder`), decided on the list's current revision: when another
/// program is attached in between (ESTALE), the list is read again and the placement redone,
/// so that program is not silently put ahead.
pub fn attach_first(
    prog: BorrowedFd<'_>,
    cgroup: &File,
    path: &Path,
    hook: &'static str,
    attach_type: u32,
    preorder: bool,
) -> Result<OwnedFd, Error> {
    let fl = flags::BEFORE | if preorder { flags::PREORDER } else { 0 };
    let mut last = None;
    for _ in 0..STALE_RETRIES {
        let rev = link::query(cgroup.as_fd(), attach_type, false)
            .map_err(|source| Error::Query { hook, path: path.into(), source })?
            .revision;
        match link::create_with(prog, cgroup.as_fd(), attach_type, fl, 0, rev) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => last = Some(e),
            Err(source) => {
                return Err(Error::Attach { hook, path: path.into(), source });
            }
        }
    }
    Err(Error::Attach { hook, path: path.into(), source: last.unwrap_or_else(|| io::Error::other("the program list kept changing")) })
}

/// Whether `prog_id` is first in the cgroup's own list for `attach_type`.
pub fn is_first(cgroup: &File, path: &Path, hook: &'static str, attach_type: u32, prog_id: u32) -> Result<bool, Error> {
    let own = link::query(cgroup.as_fd(), attach_type, false).map_err(|source| Error::Query { hook, path: path.into(), source })?;
    Ok(own.prog_ids.first() == Some(&prog_id))
}

/// A program that runs before sidecap's on a hook.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ahead {
    pub hook: &'static str,
    pub prog_id: u32,
    pub name: String,
    /// The first cgroup (attach cgroup or below) where it was seen ahead.
    pub cgroup: PathBuf,
}

/// What one pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderReport {
    pub ahead: Vec<Ahead>,
    /// Cgroups checked.
    pub cgroups: usize,
}

/// Every program that runs before sidecap's on an ordered hook, in the attach cgroup or any
/// cgroup below it (pods' cgroups included): the kernel's effective list for each cgroup,
/// in run order, read with BPF_PROG_QUERY + BPF_F_QUERY_EFFECTIVE. `ours` maps hook → the
/// program id sidecap's link runs now. A cgroup that vanishes during the walk is skipped.
pub fn programs_ahead(cgroup: &Path, ours: &[(&'static str, u32, u32)]) -> OrderReport {
    let mut found: BTreeMap<(&'static str, u32), PathBuf> = BTreeMap::new();
    let mut report = OrderReport::default();
    let mut queue = std::collections::VecDeque::from([cgroup.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if report.cgroups >= MAX_CGROUPS {
            tracing::warn!(cgroup = %cgroup.display(), max = MAX_CGROUPS, "program order: too many cgroups, the rest is not checked");
            break;
        }
        let Ok(f) = File::open(&dir) else { continue };
        report.cgroups += 1;
        for (hook, attach_type, our_id) in ours {
            let Ok(eff) = link::query(f.as_fd(), *attach_type, true) else {
                continue;
            };
            let Some(pos) = eff.prog_ids.iter().position(|id| id == our_id) else {
                continue;
            };
            for id in &eff.prog_ids[..pos] {
                found.entry((hook, *id)).or_insert_with(|| dir.clone());
            }
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            queue.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    report.ahead = found
        .into_iter()
        .map(|((hook, prog_id), cgroup)| Ahead { hook, prog_id, name: link::prog_name(prog_id).unwrap_or_else(|_| "?".into()), cgroup })
        .collect();
    report
}

/// The cgroup that holds every pod on a node: `kubepods` (kubelet's cgroupfs driver),
/// `kubepods.slice` (systemd driver), or `<root>-kubepods.slice` under a kubelet
/// `--cgroup-root`; the shallowest match under the cgroup2 root, breadth first.
pub fn find_pods_cgroup(root: &Path) -> Option<PathBuf> {
    const MAX_DEPTH: usize = 4;
    let mut level = vec![root.to_path_buf()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut children: Vec<PathBuf> = rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect();
            children.sort();
            if let Some(hit) = children.iter().find(|p| is_pods_cgroup_name(p)) {
                return Some(hit.clone());
            }
            next.extend(children);
        }
        level = next;
    }
    None
}

fn is_pods_cgroup_name(p: &Path) -> bool {
    let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pods_cgroup_of_either_driver() {
        let base = std::env::temp_dir().join(format!("sidecap-kubepods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        for (i, (tree, want)) in [
            (vec!["system.slice/kubelet.service", "kubepods.slice/kubepods-besteffort.slice"], Some("kubepods.slice")),
            (vec!["user.slice", "kubepods/burstable/pod1"], Some("kubepods")),
            (vec!["kubelet.slice/kubelet-kubepods.slice/x"], Some("kubelet.slice/kubelet-kubepods.slice")),
            (vec!["system.slice/docker.service", "user.slice/kubepodsx"], None),
        ]
        .into_iter()
        .enumerate()
        {
            let root = base.join(i.to_string());
            for d in &tree {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            assert_eq!(find_pods_cgroup(&root), want.map(|w| root.join(w)), "{tree:?}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
