//! Load, attach, pin; adopt what is already pinned; remove it all.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use aya::{
    EbpfLoader,
    programs::{Program, links::PinnedLink},
};

use sidecap_common::abi::{self, pin};

use super::{CGROUP_PROGRAMS, EBPF_OBJECT, Error, observers, order};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Where the cgroup programs go (see [`observers`]).
#[derive(Debug, Clone)]
pub struct Placement {
    /// connect4/6 and sendmsg4/6: `--cgroup`.
    pub cgroup: PathBuf,
    /// sockops, getsockopt and recvmsg4/6: `--pods-cgroup`, `cgroup` or a cgroup below it.
    pub pods_cgroup: PathBuf,
}

/// What `install` found or did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Links that were already pinned: their program was swapped for this version's in
    /// place (BPF_LINK_UPDATE), so traffic never sees a moment without one.
    pub updated: Vec<&'static str>,
    /// Links this call attached and pinned.
    pub attached: Vec<&'static str>,
    /// Per-pod sk_lookup links swapped to this version's program.
    pub pod_links_updated: usize,
    /// The kernel places cgroup links (mprog, Linux 6.17+) and the agent used it.
    pub mprog: bool,
    /// Ordered hooks were also attached with BPF_F_PREORDER (the cgroup has children).
    pub preorder: bool,
    /// Pinned links attached again (first in the list, or at the requested cgroup) and
    /// their pins replaced: another program had been put ahead of them, or they were
    /// attached elsewhere.
    pub reordered: Vec<&'static str>,
    /// Pods whose pinned sk_lookup link was severed (their netns is gone): pin removed.
    pub pod_links_removed: Vec<u64>,
    /// Pods whose pinned sk_lookup link could not be updated for another reason (logged,
    /// left as they are).
    pub pod_links_failed: Vec<u64>,
    /// The sk_msg link (`--sockmap`): Some(true) attached now, Some(false) updated in place
    /// (with the flag) or removed (without it), None none before or after.
    pub sockmap: Option<bool>,
}

fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(pin::MAPS_DIR)
}

fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(pin::LINKS_DIR)
}

fn progs_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(pin::PROGS_DIR)
}

/// Per-pod sk_lookup links: `links/netns/<cookie>`.
fn netns_links_dir(bpffs: &Path) -> PathBuf {
    links_dir(bpffs).join(pin::NETNS_LINKS_DIR)
}

pub fn map_pin(bpffs: &Path, name: &str) -> PathBuf {
    maps_dir(bpffs).join(name)
}

fn link_pin(bpffs: &Path, name: &str) -> PathBuf {
    links_dir(bpffs).join(name)
}

fn sk_lookup_pin(bpffs: &Path) -> PathBuf {
    progs_dir(bpffs).join(pin::SK_LOOKUP_PROG)
}

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path and st a valid, writable statfs.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// `/sys/fs/bpf` is where every BPF tool expects a bpffs; mount one there when the node
/// has none (as Cilium's agent does), never anywhere else.
fn mount_default_bpffs() -> Result<(), Error> {
    let at = Path::new("/sys/fs/bpf");
    if is_bpffs(at) {
        return Ok(());
    }
    // SAFETY: every argument is a NUL-terminated string literal; no data pointer.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(Error::Io { path: at.into(), source: std::io::Error::last_os_error() });
    }
    tracing::info!("mounted a bpf filesystem at /sys/fs/bpf");
    Ok(())
}

fn ensure_bpffs_dir(dir: &Path) -> Result<(), Error> {
    if dir.starts_with("/sys/fs/bpf") {
        mount_default_bpffs()?;
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    if !is_bpffs(dir) {
        return Err(Error::NotBpffs { path: dir.into() });
    }
    Ok(())
}

/// Makes sure this version's programs are attached to `cgroup` and everything is pinned
/// under `bpffs`.
///
/// Idempotent and gap-free: maps already pinned are reused with their contents; links
/// already pinned (by a previous agent, or a previous version) keep existing and get this
/// version's program atomically (BPF_LINK_UPDATE); missing links are created.
///
/// With `mprog` (see [`super::probe_mprog`]) the hooks that rewrite destinations
/// ([`super::order::ORDERED_HOOKS`]) are attached first in the cgroup's list, and before
/// descendant cgroups' programs when it has children; a pinned one that another program
/// got ahead of is attached again in first place. Per-pod state of pods whose netns is gone
/// is removed, and no single pod's failure stops the install.
///
/// Also returns the loaded object: its `AYA_LOGS` ring buffer (not pinned: each load has
/// its own, written only by the programs of that load) carries the trace records.
pub fn install(bpffs: &Path, at: &Placement, sizes: &super::MapSizes, mprog: bool, sockmap: bool) -> Result<(Installed, aya::Ebpf), Error> {
    let cgroup = at.cgroup.as_path();
    ensure_bpffs_dir(bpffs)?;
    std::fs::create_dir_all(maps_dir(bpffs)).map_err(Error::io(maps_dir(bpffs)))?;
    std::fs::create_dir_all(netns_links_dir(bpffs)).map_err(Error::io(netns_links_dir(bpffs)))?;
    std::fs::create_dir_all(progs_dir(bpffs)).map_err(Error::io(progs_dir(bpffs)))?;

    super::abi::check(bpffs)?;
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = abi::MAPS.iter().map(|m| (m.name, map_pin(bpffs, m.name))).collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, n) in sizes.per_map() {
        loader.map_max_entries(name, n);
        if let Ok(info) = aya::maps::MapInfo::from_pin(map_pin(bpffs, name)) {
            if info.max_entries() != n {
                tracing::warn!(
                    map = name,
                    pinned = info.max_entries(),
                    requested = n,
                    "map already pinned with another size; it keeps it until `sidecap uninstall`"
                );
            }
        }
    }
    // Without `--sockmap` the programs' sockmap paths end at this constant (no lookups).
    let node_sockmap = u8::from(sockmap);
    loader.override_global("SIDECAP_SOCKMAP_NODE", &node_sockmap, true);
    // The redirecting programs refuse callers the observers do not cover (level 0: no check).
    let check = observers::check(cgroup, &at.pods_cgroup)?;
    loader.override_global("SIDECAP_PODS_CGROUP_LEVEL", &check.level, true);
    loader.override_global("SIDECAP_PODS_CGROUP_ID", &check.id, true);
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(Error::Load)?;
    super::abi::stamp(&mut ebpf)?;

    let mut out = Installed { mprog, preorder: mprog && order::has_children(cgroup), ..Installed::default() };
    // (path, open directory, id) of the two targets; they may be the same cgroup.
    let target =
        |p: &Path| -> Result<(PathBuf, File, u64), Error> { Ok((p.into(), File::open(p).map_err(Error::io(p))?, order::cgroup_id(p)?)) };
    let rewriting = target(cgroup)?;
    let observing = target(&at.pods_cgroup)?;
    let preorder = out.preorder;
    for (prog, link, attach_type) in CGROUP_PROGRAMS {
        let (cgroup, cgroup_file, cgroup_id) = if observers::observes(link) { &observing } else { &rewriting };
        let (cgroup, cgroup_id) = (cgroup.as_path(), *cgroup_id);
        let program = ebpf.program_mut(prog).ok_or(Error::MissingProgram { name: prog })?;
        let perr = |source| Error::Program { name: prog, source };
        match program {
            Program::CgroupSockAddr(p) => p.load().map_err(perr)?,
            Program::SockOps(p) => p.load().map_err(perr)?,
            Program::CgroupSockopt(p) => p.load().map_err(perr)?,
            _ => return Err(Error::MissingProgram { name: prog }),
        }
        let prog_fd = program.fd().map_err(perr)?;
        let first = mprog && order::ORDERED_HOOKS.contains(link);
        let attach = || -> Result<OwnedFd, Error> {
            if first {
                Ok(order::attach_first(prog_fd.as_fd(), cgroup_file, cgroup, link, *attach_type, preorder)?)
            } else {
                super::link::create(prog_fd.as_fd(), cgroup_file.as_fd(), *attach_type).map_err(|source| Error::Attach {
                    name: prog,
                    cgroup: cgroup.into(),
                    source,
                })
            }
        };
        let path = link_pin(bpffs, link);
        if path.exists() {
            let link_fd = super::link::get(&path).map_err(Error::io(&path))?;
            super::link::update(link_fd.as_fd(), prog_fd.as_fd()).map_err(|source| Error::Attach {
                name: prog,
                cgroup: cgroup.into(),
                source,
            })?;
            out.updated.push(*link);
            let info = super::link::link_info(link_fd.as_fd()).map_err(Error::io(&path))?;
            let elsewhere = info.target != cgroup_id;
            let behind = first && !elsewhere && !order::is_first(cgroup_file, cgroup, link, *attach_type, info.prog_id)?;
            if elsewhere || behind {
                let fd = attach()?;
                replace_pin(fd.as_fd(), &path)?;
                // The old link's last reference: it detaches now.
                drop(link_fd);
                tracing::info!(
                    hook = *link,
                    cgroup = %cgroup.display(),
                    first,
                    reason = if elsewhere { "pinned link was attached to another cgroup" } else { "another program was ahead of it" },
                    "pinned link attached again and its pin replaced"
                );
                out.reordered.push(*link);
            }
        } else {
            let fd = attach()?;
            super::link::pin(fd.as_fd(), &path).map_err(Error::io(&path))?;
            out.attached.push(*link);
        }
    }

    // sk_lookup: the program is pinned (new pods get linked to it later); existing pods'
    // links are swapped to this version's program. A pod whose netns died while no agent
    // ran has a severed link: its pin goes; any other pod's failure is logged and skipped,
    // never fatal for the node.
    let name = super::SK_LOOKUP_PROGRAM;
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
    let Program::SkLookup(p) = program else { return Err(Error::MissingProgram { name }) };
    p.load().map_err(|source| Error::Program { name, source })?;
    let prog_fd = p.fd().map_err(|source| Error::Program { name, source })?;
    for cookie in pod_links(bpffs) {
        let path = netns_links_dir(bpffs).join(cookie.to_string());
        match update_pod_link(&path, prog_fd.as_fd()) {
            Ok(()) => out.pod_links_updated += 1,
            Err(PodLink::Severed) => match std::fs::remove_file(&path) {
                Ok(()) => out.pod_links_removed.push(cookie),
                Err(e) => {
                    tracing::warn!(netns = cookie, pin = %path.display(), error = %e, "removing a severed pod link");
                    out.pod_links_failed.push(cookie);
                }
            },
            Err(PodLink::Other(e)) => {
                tracing::warn!(netns = cookie, pin = %path.display(), error = %e, "pod's sk_lookup link not updated; skipped");
                out.pod_links_failed.push(cookie);
            }
        }
    }
    let skl = sk_lookup_pin(bpffs);
    let _ = std::fs::remove_file(&skl);
    super::link::pin(prog_fd.as_fd(), &skl).map_err(Error::io(&skl))?;
    out.sockmap = if sockmap { Some(attach_sk_msg(bpffs, &mut ebpf)?) } else { detach_sk_msg(bpffs)? };
    Ok((out, ebpf))
}

/// `--sockmap`: the sk_msg program linked to `ACCEL_SOCKS` (`links/sk_msg`), swapped in
/// place when already pinned. True when this call attached it.
fn attach_sk_msg(bpffs: &Path, ebpf: &mut aya::Ebpf) -> Result<bool, Error> {
    let name = super::SK_MSG_PROGRAM;
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
    let Program::SkMsg(p) = program else { return Err(Error::MissingProgram { name }) };
    p.load().map_err(|source| Error::Program { name, source })?;
    let prog_fd = p
        .fd()
        .map_err(|source| Error::Program { name, source })?
        .as_fd()
        .try_clone_to_owned()
        .map_err(Error::io(bpffs))?;
    let map_name = abi::ACCEL_SOCKS.name;
    let Some(aya::maps::Map::SockHash(map)) = ebpf.map(map_name) else { return Err(Error::MissingMap { name: map_name }) };
    let path = link_pin(bpffs, pin::SK_MSG_LINK);
    let attach_err = |source| Error::SkMsgLink { source };
    if path.exists() {
        let link = super::link::get(&path).map_err(Error::io(&path))?;
        super::link::update(link.as_fd(), prog_fd.as_fd()).map_err(attach_err)?;
        return Ok(false);
    }
    let fd = super::link::create(prog_fd.as_fd(), map.fd().as_fd(), super::link::attach_type::SK_MSG_VERDICT).map_err(attach_err)?;
    super::link::pin(fd.as_fd(), &path).map_err(Error::io(&path))?;
    Ok(true)
}

/// Without `--sockmap`: an sk_msg link an earlier agent pinned is removed, so no new socket
/// gets the program (pods lose `pod_flags::SOCKMAP` at the first sync, so none is added to
/// `ACCEL_SOCKS`); sockets already in it keep theirs until they close. Some(false) when
/// one was removed, None when there was none.
fn detach_sk_msg(bpffs: &Path) -> Result<Option<bool>, Error> {
    let path = link_pin(bpffs, pin::SK_MSG_LINK);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { path, source: e }),
    }
}

enum PodLink {
    /// The netns is gone (link severed: ENOLINK on update, or no netns inode).
    Severed,
    Other(std::io::Error),
}

fn update_pod_link(path: &Path, prog: BorrowedFd<'_>) -> Result<(), PodLink> {
    let link = super::link::get(path).map_err(PodLink::Other)?;
    if super::link::link_info(link.as_fd()).is_ok_and(|i| i.target == 0) {
        return Err(PodLink::Severed);
    }
    super::link::update(link.as_fd(), prog).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOLINK) => PodLink::Severed,
        _ => PodLink::Other(e),
    })
}

/// Puts `fd` at `path` in place of what is pinned there, in one rename where bpffs allows.
fn replace_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), Error> {
    // bpffs refuses names with a dot.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    super::link::pin(fd, &tmp).map_err(Error::io(&tmp))?;
    if std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(path);
        std::fs::rename(&tmp, path).map_err(Error::io(path))?;
    }
    Ok(())
}

/// Links the sk_lookup program into a pod's netns (idempotent) and pins the link under
/// `links/netns/<cookie>`, so it outlives the agent and goes away with `detach_pod_netns`.
pub fn attach_pod_netns(bpffs: &Path, netns_cookie: u64, netns_path: &Path) -> Result<bool, Error> {
    let pin = netns_links_dir(bpffs).join(netns_cookie.to_string());
    if pin.exists() {
        return Ok(false);
    }
    let prog = super::link::get(&sk_lookup_pin(bpffs)).map_err(Error::io(sk_lookup_pin(bpffs)))?;
    let ns = File::open(netns_path).map_err(Error::io(netns_path))?;
    let fd = super::link::create(prog.as_fd(), ns.as_fd(), super::link::attach_type::SK_LOOKUP).map_err(|source| Error::Attach {
        name: super::SK_LOOKUP_PROGRAM,
        cgroup: netns_path.into(),
        source,
    })?;
    super::link::pin(fd.as_fd(), &pin).map_err(Error::io(&pin))?;
    Ok(true)
}

/// Removes a pod's sk_lookup link (unpinning the last reference detaches it).
pub fn detach_pod_netns(bpffs: &Path, netns_cookie: u64) -> Result<bool, Error> {
    let pin = netns_links_dir(bpffs).join(netns_cookie.to_string());
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Io { path: pin, source: e }),
    }
}

/// Netns cookies that have a pinned sk_lookup link.
pub fn pod_links(bpffs: &Path) -> Vec<u64> {
    std::fs::read_dir(netns_links_dir(bpffs))
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Detaches every link and removes every pin under `bpffs` that sidecap made.
/// Returns the pins removed.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut removed = Vec::new();
    if !bpffs.exists() {
        return Ok(removed);
    }
    // Links first: once unpinned (and no one else holds them) they detach.
    for dir in [links_dir(bpffs), progs_dir(bpffs), maps_dir(bpffs)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let e = e.map_err(Error::io(&dir))?;
            let path = e.path();
            if path.is_dir() {
                remove_tree(&path, &mut removed)?;
                continue;
            }
            if dir.ends_with(pin::LINKS_DIR) {
                if let Ok(link) = PinnedLink::from_pin(&path) {
                    // unpin() removes the file; dropping the FdLink detaches.
                    let _ = link.unpin().map_err(Error::io(&path))?;
                    removed.push(path);
                    continue;
                }
            }
            std::fs::remove_file(&path).map_err(Error::io(&path))?;
            removed.push(path);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    std::fs::remove_dir(bpffs).map_err(Error::io(bpffs))?;
    Ok(removed)
}

fn remove_tree(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<(), Error> {
    for e in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = e.map_err(Error::io(dir))?.path();
        if path.is_dir() {
            remove_tree(&path, removed)?;
        } else {
            std::fs::remove_file(&path).map_err(Error::io(&path))?;
            removed.push(path);
        }
    }
    std::fs::remove_dir(dir).map_err(Error::io(dir))
}
