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
    #[error("--pods-cgroup {}: not under the cgroup2 mount {} (--cgroup-root)", pods.display(), root.display())]
    NotUnderRoot { pods: PathBuf, root: PathBuf },
    #[error("--pods-cgroup {} is below --cgroup {}, but the cgroup2 mount is unknown (pass --cgroup-root)", pods.display(), cgroup.display())]
    NoRoot { pods: PathBuf, cgroup: PathBuf },
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

/// The check for observers on `pods` while the rest is on `cgroup` (`root`: the cgroup2
/// mount). `pods` must be `cgroup` or below it.
pub fn check(root: Option<&Path>, cgroup: &Path, pods: &Path) -> Result<Check, Error> {
    use std::os::unix::fs::MetadataExt;
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(|source| Error::Io { path: p.into(), source });
    let (c, p) = (canon(cgroup)?, canon(pods)?);
    if c == p {
        return Ok(Check::default());
    }
    if !p.starts_with(&c) {
        return Err(Error::NotBelow { pods: pods.into(), cgroup: cgroup.into() });
    }
    let root = root.ok_or_else(|| Error::NoRoot { pods: pods.into(), cgroup: cgroup.into() })?;
    let level = level(&canon(root)?, &p).ok_or_else(|| Error::NotUnderRoot { pods: pods.into(), root: root.into() })?;
    let id = std::fs::metadata(&p).map_err(|source| Error::Io { path: p.clone(), source })?.ino();
    Ok(Check { level, id })
}

/// How many cgroups below the cgroup2 mount `root` the directory `path` is (the kernel's
/// `ancestor_level`: the root is 0). None when it is not under it.
pub fn level(root: &Path, path: &Path) -> Option<u32> {
    let rel = path.strip_prefix(root).ok()?;
    u32::try_from(rel.components().count()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_rewriting_hooks_stay_on_the_attach_cgroup() {
        let observed: Vec<&str> = super::super::CGROUP_PROGRAMS.iter().map(|(_, hook, _)| *hook).filter(|h| observes(h)).collect();
        assert_eq!(observed, ["sockops", "getsockopt", "recvmsg4", "recvmsg6"]);
    }

    #[test]
    fn levels_count_from_the_mount() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(level(root, Path::new("/sys/fs/cgroup")), Some(0));
        assert_eq!(level(root, Path::new("/sys/fs/cgroup/kubepods.slice")), Some(1));
        assert_eq!(level(root, Path::new("/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice")), Some(2));
        assert_eq!(level(root, Path::new("/sys/fs/other")), None);
    }

    #[test]
    fn pods_cgroup_must_be_below_the_attach_cgroup() {
        let base = std::env::temp_dir().join(format!("sidecap-observers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("node/kubepods/pod1")).unwrap();
        std::fs::create_dir_all(base.join("other")).unwrap();
        let (node, pods) = (base.join("node"), base.join("node/kubepods"));
        assert_eq!(check(Some(&base), &node, &node).unwrap(), Check::default(), "same cgroup: no check");
        let c = check(Some(&base), &node, &pods).unwrap();
        assert_eq!(c.level, 2);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(c.id, std::fs::metadata(&pods).unwrap().ino());
        assert!(matches!(check(Some(&base), &node, &base.join("other")), Err(Error::NotBelow { .. })));
        assert!(matches!(check(None, &node, &pods), Err(Error::NoRoot { .. })));
        assert!(matches!(check(Some(&base.join("other")), &node, &pods), Err(Error::NotUnderRoot { .. })));
        let _ = std::fs::remove_dir_all(&base);
    }
}
