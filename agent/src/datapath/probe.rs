//! Kernel support, checked before anything is loaded so that an unsupported node gets
//! one clear line instead of a verifier dump.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("kernel BTF is missing (/sys/kernel/btf/vmlinux): sidecap needs CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error(
        "kernel {found} is too old: sidecap needs Linux >= 5.15 (bpf_get_netns_cookie in sockops programs; sk_lookup, bpf_link for cgroups)"
    )]
    TooOld { found: String },
    #[error("{0}")]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("cgroup {path} does not exist or is not a cgroup v2 directory")]
    NotCgroup { path: std::path::PathBuf },
    #[error("this kernel lacks {what}, which sidecap needs")]
    Missing { what: String },
    #[error("cannot probe {what}: {error} (sidecap needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN, or root)")]
    Denied { what: String, error: String },
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
    if (major, minor) < (5, 15) {
        return Err(ProbeError::TooOld { found: release.trim().to_string() });
    }
    let root = crate::cgroup::v2_root()?;
    if !cgroup.starts_with(&root) || !cgroup.join("cgroup.procs").exists() {
        return Err(ProbeError::NotCgroup { path: cgroup.into() });
    }
    features()
}

/// Every program type, map type and helper the object uses, asked of the kernel itself
/// (small test loads), so that a kernel built without one is named, not discovered by a
/// verifier dump.
fn features() -> Result<(), ProbeError> {
    use aya::{
        maps::MapType,
        programs::ProgramType as P,
        sys::{BpfHelper as H, is_helper_supported, is_map_supported, is_program_supported},
    };
    for (p, name) in [
        (P::CgroupSockAddr, "cgroup/connect and sendmsg programs (CGROUP_SOCK_ADDR)"),
        (P::SockOps, "sockops programs"),
        (P::CgroupSockopt, "cgroup/getsockopt programs"),
        (P::SkLookup, "sk_lookup programs"),
    ] {
        check(is_program_supported(p).map_err(|e| e.to_string()), name)?;
    }
    for (m, name) in [
        (MapType::LpmTrie, "LPM trie maps"),
        (MapType::LruHash, "LRU hash maps"),
        (MapType::RingBuf, "ring buffer maps"),
        (MapType::SockHash, "sockhash maps"),
        (MapType::PerCpuHash, "per-CPU hash maps"),
    ] {
        check(is_map_supported(m).map_err(|e| e.to_string()), name)?;
    }
    for (p, h, name) in [
        (P::CgroupSockAddr, H::BPF_FUNC_get_netns_cookie, "bpf_get_netns_cookie in connect programs"),
        (P::CgroupSockAddr, H::BPF_FUNC_get_socket_cookie, "bpf_get_socket_cookie in connect programs"),
        (P::CgroupSockAddr, H::BPF_FUNC_get_current_uid_gid, "bpf_get_current_uid_gid in connect programs"),
        (P::SockOps, H::BPF_FUNC_get_netns_cookie, "bpf_get_netns_cookie in sockops programs"),
        (P::CgroupSockopt, H::BPF_FUNC_get_netns_cookie, "bpf_get_netns_cookie in getsockopt programs"),
        (P::SkLookup, H::BPF_FUNC_sk_assign, "bpf_sk_assign in sk_lookup programs"),
    ] {
        check(is_helper_supported(p, h).map_err(|e| e.to_string()), name)?;
    }
    Ok(())
}

/// One probe's answer: a probe that errors (rather than answering no) is nearly always a
/// missing privilege.
fn check(r: Result<bool, String>, what: &str) -> Result<(), ProbeError> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(ProbeError::Missing { what: what.into() }),
        Err(error) => Err(ProbeError::Denied { what: what.into(), error }),
    }
}

/// `--sockmap`: what the accelerated hop needs beyond [`probe`] (sk_msg programs, socket
/// storage, the redirect helper; the sk_msg link itself, Linux 6.10+, is refused at attach
/// with its own error).
pub fn probe_sockmap() -> Result<(), ProbeError> {
    use aya::{
        maps::MapType,
        programs::ProgramType as P,
        sys::{BpfHelper as H, is_helper_supported, is_map_supported, is_program_supported},
    };
    let check = |r, what: &str| check(r, &format!("{what} (needed by --sockmap; run without it)"));
    check(is_program_supported(P::SkMsg).map_err(|e| e.to_string()), "sk_msg programs")?;
    check(is_map_supported(MapType::SkStorage).map_err(|e| e.to_string()), "socket storage maps")?;
    for (p, h, name) in [
        (P::SkMsg, H::BPF_FUNC_msg_redirect_hash, "bpf_msg_redirect_hash in sk_msg programs"),
        (P::SkMsg, H::BPF_FUNC_sk_storage_get, "bpf_sk_storage_get in sk_msg programs"),
        (P::SockOps, H::BPF_FUNC_sock_hash_update, "bpf_sock_hash_update in sockops programs"),
        (P::SockOps, H::BPF_FUNC_sk_storage_get, "bpf_sk_storage_get in sockops programs"),
    ] {
        check(is_helper_supported(p, h).map_err(|e| e.to_string()), name)?;
    }
    Ok(())
}
