//! Load, attach, pin; adopt what is already pinned; remove it all.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use std::os::fd::AsFd;

use aya::{
    EbpfLoader,
    programs::{Program, links::PinnedLink},
};

use super::{CGROUP_PROGRAMS, EBPF_OBJECT, Error, MAP_NAMES};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

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
}

fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

fn progs_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("progs")
}

/// Per-pod sk_lookup links: `links/netns/<cookie>`.
fn netns_links_dir(bpffs: &Path) -> PathBuf {
    links_dir(bpffs).join("netns")
}

pub fn map_pin(bpffs: &Path, name: &str) -> PathBuf {
    maps_dir(bpffs).join(name)
}

fn link_pin(bpffs: &Path, name: &str) -> PathBuf {
    links_dir(bpffs).join(name)
}

fn sk_lookup_pin(bpffs: &Path) -> PathBuf {
    progs_dir(bpffs).join("sk_lookup")
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
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
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
pub fn install(bpffs: &Path, cgroup: &Path, sizes: &super::MapSizes) -> Result<Installed, Error> {
    ensure_bpffs_dir(bpffs)?;
    std::fs::create_dir_all(maps_dir(bpffs)).map_err(Error::io(maps_dir(bpffs)))?;
    std::fs::create_dir_all(netns_links_dir(bpffs)).map_err(Error::io(netns_links_dir(bpffs)))?;
    std::fs::create_dir_all(progs_dir(bpffs)).map_err(Error::io(progs_dir(bpffs)))?;

    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|m| (*m, map_pin(bpffs, m))).collect();
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
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(Error::Load)?;

    let mut out = Installed::default();
    let cgroup_file = File::open(cgroup).map_err(Error::io(cgroup))?;
    for (prog, link, attach_type) in CGROUP_PROGRAMS {
        let program = ebpf.program_mut(prog).ok_or(Error::MissingProgram { name: prog })?;
        let perr = |source| Error::Program { name: prog, source };
        match program {
            Program::CgroupSockAddr(p) => p.load().map_err(perr)?,
            Program::SockOps(p) => p.load().map_err(perr)?,
            Program::CgroupSockopt(p) => p.load().map_err(perr)?,
            _ => return Err(Error::MissingProgram { name: prog }),
        }
        let prog_fd = program.fd().map_err(perr)?;
        let path = link_pin(bpffs, link);
        if path.exists() {
            let link_fd = super::link::get(&path).map_err(Error::io(&path))?;
            super::link::update(link_fd.as_fd(), prog_fd.as_fd())
                .map_err(|source| Error::Attach { name: prog, cgroup: cgroup.into(), source })?;
            out.updated.push(*link);
        } else {
            let fd = super::link::create(prog_fd.as_fd(), cgroup_file.as_fd(), *attach_type)
                .map_err(|source| Error::Attach { name: prog, cgroup: cgroup.into(), source })?;
            super::link::pin(fd.as_fd(), &path).map_err(Error::io(&path))?;
            out.attached.push(*link);
        }
    }

    // sk_lookup: the program is pinned (new pods get linked to it later); existing pods'
    // links are swapped to this version's program.
    let name = super::SK_LOOKUP_PROGRAM;
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
    let Program::SkLookup(p) = program else { return Err(Error::MissingProgram { name }) };
    p.load().map_err(|source| Error::Program { name, source })?;
    let prog_fd = p.fd().map_err(|source| Error::Program { name, source })?;
    for cookie in pod_links(bpffs) {
        let path = netns_links_dir(bpffs).join(cookie.to_string());
        let link_fd = super::link::get(&path).map_err(Error::io(&path))?;
        super::link::update(link_fd.as_fd(), prog_fd.as_fd())
            .map_err(|source| Error::Attach { name, cgroup: path.clone(), source })?;
        out.pod_links_updated += 1;
    }
    let skl = sk_lookup_pin(bpffs);
    let _ = std::fs::remove_file(&skl);
    super::link::pin(prog_fd.as_fd(), &skl).map_err(Error::io(&skl))?;
    Ok(out)
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
    let fd = super::link::create(prog.as_fd(), ns.as_fd(), super::link::attach_type::SK_LOOKUP)
        .map_err(|source| Error::Attach { name: super::SK_LOOKUP_PROGRAM, cgroup: netns_path.into(), source })?;
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
            if dir.ends_with("links") {
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
