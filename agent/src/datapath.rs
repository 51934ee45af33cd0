//! The kernel side, kept thin: load the embedded object, pin its maps and links under one
//! bpffs directory, attach once to a cgroup, and read/write the pinned maps.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/sidecap`), names from
//! `sidecap_common::abi`: `maps/<NAME>` for every map (`maps/ABI_VERSION` holds the
//! layout's version), `links/<program>` for the cgroup links, `links/netns/<cookie>` for
//! the pods' sk_lookup links, `progs/sk_lookup`.

mod abi;
mod install;
pub mod link;
pub mod listeners;
mod maps;
pub mod observers;
pub mod order;
mod probe;
mod sizes;

use std::path::PathBuf;

/// One pod's compiled policy: exactly the map entries the kernel reads.
pub use sidecap_policy::Generation;

pub use install::map_pin;
pub use install::{Installed, Placement, attach_pod_netns, detach_pod_netns, install, pod_links, uninstall};
pub use maps::{Capacity, ListenerEntries, Maps, PodState, listeners_by_policy};
pub use order::{find_pods_cgroup, probe_mprog};
pub use probe::{ProbeError, probe, probe_sockmap};
pub use sizes::MapSizes;

/// The eBPF object built by agent/build.rs from `ebpf/sidecap-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sidecap"));

/// Cgroup programs: (function name in the object, link pin name, attach type).
pub const CGROUP_PROGRAMS: &[(&str, &str, u32)] = &[
    ("sidecap_connect4", "connect4", link::attach_type::CGROUP_INET4_CONNECT),
    ("sidecap_connect6", "connect6", link::attach_type::CGROUP_INET6_CONNECT),
    ("sidecap_sockops", "sockops", link::attach_type::CGROUP_SOCK_OPS),
    ("sidecap_getsockopt", "getsockopt", link::attach_type::CGROUP_GETSOCKOPT),
    ("sidecap_sendmsg4", "sendmsg4", link::attach_type::CGROUP_UDP4_SENDMSG),
    ("sidecap_sendmsg6", "sendmsg6", link::attach_type::CGROUP_UDP6_SENDMSG),
    ("sidecap_recvmsg4", "recvmsg4", link::attach_type::CGROUP_UDP4_RECVMSG),
    ("sidecap_recvmsg6", "recvmsg6", link::attach_type::CGROUP_UDP6_RECVMSG),
];

/// aya-log's ring buffer in the object: the programs' trace records. Not part of the pinned
/// ABI: every load makes its own, read by the agent that loaded it.
pub const TRACE_LOGS_MAP: &str = "AYA_LOGS";

/// Maps of the object that are per load, never pinned: aya-log's ring and the per-CPU
/// room connect4/6 write their trace record in.
pub const UNPINNED_MAPS: &[&str] = &[TRACE_LOGS_MAP, "TRACE_CONNECT"];

/// The sk_lookup program: loaded with the others, pinned as a program (`progs/sk_lookup`)
/// so that any later agent can link it into new pods' netns.
pub const SK_LOOKUP_PROGRAM: &str = "sidecap_sk_lookup";

/// The sk_msg program (`--sockmap`): linked to `ACCEL_SOCKS`, pinned as `links/sk_msg`.
pub const SK_MSG_PROGRAM: &str = "sidecap_sk_msg";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("attaching {name} to cgroup {cgroup}: {source}")]
    Attach { name: &'static str, cgroup: PathBuf, source: std::io::Error },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("nothing is installed under {path} (run `sidecap agent` first)")]
    NotInstalled { path: PathBuf },
    #[error(transparent)]
    Order(#[from] order::Error),
    #[error(transparent)]
    Observers(#[from] observers::Error),
    #[error(
        "the maps pinned under {path} have layout version {pinned}, this sidecap uses version {ours}: \
         refusing to read or reuse them. Run the sidecap that made them, or remove them with \
         `sidecap uninstall --bpffs {path}` (capture stops until an agent installs again)",
        path = path.display()
    )]
    AbiVersion { path: PathBuf, pinned: u32, ours: u32 },
    #[error("pinned map {name} has {field} {pinned}, this sidecap's layout says {ours}: refusing to use it")]
    AbiLayout { name: &'static str, field: &'static str, pinned: u32, ours: u32 },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error(
        "--sockmap: linking the sk_msg program to ACCEL_SOCKS failed: {source} (it needs bpf_link for sockmap \
         programs, Linux 6.10+); run without --sockmap"
    )]
    SkMsgLink { source: std::io::Error },
}

impl Error {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
