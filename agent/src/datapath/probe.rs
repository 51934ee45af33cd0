//! Kernel support, checked before anything is loaded so that an unsupported node gets
//! one clear line instead of a verifier dump.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("kernel BTF is missing (/sys/kernel/btf/vmlinux): sidecap needs CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("kernel {found} is too old: sidecap needs Linux >= 5.9 (bpf_link for cgroups, sk_lookup, netns cookies)")]
    TooOld { found: String },
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("cgroup {path} does not exist or is not a cgroup v2 directory")]
    NotCgroup { path: std::path::PathBuf },
}

/// Checks what every node needs; `cgroup` is where the programs will be attached.
pub fn probe(cgroup: &Path) -> Result<(), ProbeError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(ProbeError::NoBtf);
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if (major, minor) < (5, 9) {
        return Err(ProbeError::TooOld { found: release.trim().to_string() });
    }
    let root = crate::cgroup::v2_root()?;
    if !cgroup.starts_with(&root) || !cgroup.join("cgroup.procs").exists() {
        return Err(ProbeError::NotCgroup { path: cgroup.into() });
    }
    Ok(())
}
