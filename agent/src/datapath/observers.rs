//! Where the observing programs go. connect4/6 and sendmsg4/6 rewrite destinations and sit
//! on the attach cgroup (`--cgroup`, the node's root by default) so that nothing escapes
//! them. sockops, getsockopt and recvmsg4/6 only ever serve pods' sockets: they sit on the
//! cgroup that holds the pods (`--pods-cgroup`), so that host processes never run them. The
//! redirecting programs then refuse a redirect for a caller outside that cgroup, which the
//! proxy could not serve (the kernel side: `observers.rs` in sidecap-ebpf).

use std::path::{Path, PathBuf};

use super::order::ORDERED_HOOKS;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--pods-cgroup {}: not {} nor a cgroup below it (sockops and getsockopt must run for every pod that connect captures)",
        pods.display(),
        cgroup.display()
    )]
    NotBelow { pods: PathBuf, cgroup: PathBuf },
    #[error(
        "--pods-cgroup {}: its level below the cgroup2 root cannot be told: the mount does not reach the root (a cgroup namespace?); mount the host's cgroup2 hierarchy",
        pods.display()
    )]
    NoRoot { pods: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Whether a cgroup link `hook` goes to the pods cgroup (else to the attach cgroup).
pub fn observes(hook: &str) -> bool {
    !ORDERED_HOOKS.contains(&hook)
}

/// What the redirecting programs compare the caller's cgroup with
/// (`SIDECAP_PODS_CGROUP_LEVEL` / `_ID`): the pods cgroup's level below the cgroup2 root
/// and its id. Level 0: the observers sit with the rest, every caller is covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Check {
    pub level: u32,
    pub id: u64,
}

/// The check for observers on `pods` while the rest is on `cgroup`. `pods` must be
/// `cgroup` or below it.
pub fn check(cgroup: &Path, pods: &Path) -> Result<Check, Error> {
    use std::os::unix::fs::MetadataExt;
    let (c, p) = (canonical(cgroup)?, canonical(pods)?);
    if c == p {
        return Ok(Check::default());
    }
    if !p.starts_with(&c) {
        return Err(Error::NotBelow { pods: pods.into(), cgroup: cgroup.into() });
    }
    let level = level(&p).ok_or_else(|| Error::NoRoot { pods: pods.into() })?;
    let id = std::fs::metadata(&p).map_err(|source| Error::Io { path: p.clone(), source })?.ino();
    Ok(Check { level, id })
}

/// Where the observers go when no `--pods-cgroup` is given: below the cgroup2 root, the
/// cgroup that holds all pods when there is one; anywhere else (an attach already narrowed
/// to the pods, a test's cgroup) None, for `cgroup` itself.
pub fn default_pods_cgroup(cgroup: &Path) -> Option<PathBuf> {
    if !is_root(cgroup) {
        return None;
    }
    super::order::find_pods_cgroup(cgroup)
}

fn canonical(p: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(p).map_err(|source| Error::Io { path: p.into(), source })
}

/// The cgroup2 root is the one cgroup without a `cgroup.type` file (a cgroup namespace's
/// root, as its mount shows it, has one).
fn is_root(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists() && !dir.join("cgroup.type").exists()
}

/// How many cgroups below the root `dir` is (the kernel's `ancestor_level`: the root is 0),
/// counted up its parents. None when the walk leaves the cgroup2 tree without meeting the
/// root (a mount that shows only part of the hierarchy).
pub fn level(dir: &Path) -> Option<u32> {
    let mut n = 0;
    let mut cur = dir;
    loop {
        if !cur.join("cgroup.procs").exists() {
            return None;
        }
        if is_root(cur) {
            return Some(n);
        }
        cur = cur.parent()?;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_rewriting_hooks_stay_on_the_attach_cgroup() {
        let observed: Vec<&str> = super::super::CGROUP_PROGRAMS.iter().map(|(_, hook, _)| *hook).filter(|h| observes(h)).collect();
        assert_eq!(observed, ["sockops", "getsockopt", "recvmsg4", "recvmsg6"]);
    }

    /// A fake cgroup2 tree under a temp dir: every directory has `cgroup.procs`, all but
    /// `root` have `cgroup.type` (as the kernel shows them).
    fn tree(name: &str, dirs: &[&str]) -> PathBuf {
        let base = std::env::temp_dir().join(format!("sidecap-observers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        for d in dirs {
            let mut p = root.clone();
            for part in d.split('/') {
                p = p.join(part);
                std::fs::create_dir_all(&p).unwrap();
                std::fs::write(p.join("cgroup.procs"), "").unwrap();
                std::fs::write(p.join("cgroup.type"), "domain\n").unwrap();
            }
        }
        root
    }

    #[test]
    fn levels_count_up_to_the_root() {
        let root = tree("levels", &["kubepods.slice/kubepods-burstable.slice", "kubelet.slice/kubelet-kubepods.slice"]);
        assert_eq!(level(&root), Some(0));
        assert_eq!(level(&root.join("kubepods.slice")), Some(1));
        assert_eq!(level(&root.join("kubepods.slice/kubepods-burstable.slice")), Some(2));
        assert_eq!(level(&root.join("kubelet.slice/kubelet-kubepods.slice")), Some(2));
        // A cgroup namespace's view: the mount's top is a cgroup with `cgroup.type`, and
        // above it is no cgroup: the level cannot be told.
        std::fs::write(root.join("cgroup.type"), "domain\n").unwrap();
        assert_eq!(level(&root.join("kubepods.slice")), None, "no root in sight");
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
    }

    #[test]
    fn pods_cgroup_must_be_below_the_attach_cgroup() {
        let root = tree("below", &["node/kubepods/pod1", "other"]);
        let (node, pods) = (root.join("node"), root.join("node/kubepods"));
        assert_eq!(check(&node, &node).unwrap(), Check::default(), "same cgroup: no check");
        let c = check(&node, &pods).unwrap();
        assert_eq!(c.level, 2);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(c.id, std::fs::metadata(&pods).unwrap().ino());
        assert!(matches!(check(&node, &root.join("other")), Err(Error::NotBelow { .. })));
        std::fs::write(root.join("cgroup.type"), "domain\n").unwrap();
        assert!(matches!(check(&node, &pods), Err(Error::NoRoot { .. })));
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
    }

    #[test]
    fn by_default_only_a_root_attach_puts_the_observers_on_the_pods_cgroup() {
        let root = tree("default", &["kubepods.slice/kubepods-besteffort.slice", "system.slice"]);
        assert_eq!(default_pods_cgroup(&root), Some(root.join("kubepods.slice")));
        assert_eq!(default_pods_cgroup(&root.join("kubepods.slice")), None, "already narrowed");
        assert_eq!(default_pods_cgroup(&root.join("system.slice")), None);
        let bare = tree("bare", &["system.slice"]);
        assert_eq!(default_pods_cgroup(&bare), None, "no kubepods: everything on the root");
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
        let _ = std::fs::remove_dir_all(bare.parent().unwrap());
    }
}
