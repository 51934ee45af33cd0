//! The pinned ABI between the kernel programs and every agent that will ever open their
//! pins: map names, types, key/value sizes, the compiled capacities, and the pin layout
//! under `--bpffs`. The eBPF crate declares its maps from these; the agent opens and pins
//! by them; a unit test in the agent checks the built object against them.
//!
//! [`VERSION`] is pinned with the maps (`maps/ABI_VERSION`). It changes whenever a pinned
//! map's layout or meaning does (a `PodConfig` field, a key type, a flag's meaning), so
//! that an agent never reads maps written by another layout: it refuses, naming both.

use core::mem::size_of;

use crate::{
    AccelPeer, CONNECTING_SLOTS, CidrKey, CidrRule, ConnectingSlot, EstablishedSlot, InPortKey, InPortRule, ListenerKey, ListenerRule,
    OrigDst, PodConfig, PodCounters, PodName, PortKey, PortRule, TupleKey,
};

/// Version of the pinned layout. 1: the first versioned layout (pins made before it
/// carry no version and read as 0). 2: `PodConfig::proxy_cgroup` and
/// `pod_flags::PROXY_CGROUP` (cgroup-bound proxy identity). 3: `pod_flags::TRACE`, and
/// `OrigDst::flags` (was padding) with `trace::orig_flags::TRACED`, and the `CONNECTING`
/// map (a captured connect's original destination until its handshake completes).
/// 4: `pod_flags::SOCKMAP`, `trace::orig_flags::SOCKMAP`, the sockmap counters of
/// `PodCounters` (its value grew), and the `ACCEL_SOCKS` and `ACCEL_PEERS` maps.
/// 5: the `ESTABLISHED` map (a captured connection's original destination while the
/// proxy's socket lives; `ORIG_DST` only takes a connection whose slot is held).
pub const VERSION: u32 = 5;

/// Directories and pins under `--bpffs`.
pub mod pin {
    /// `maps/<NAME>` for every map.
    pub const MAPS_DIR: &str = "maps";
    /// `links/<program>` for the cgroup links.
    pub const LINKS_DIR: &str = "links";
    /// `links/netns/<netns cookie>`: per-pod sk_lookup links.
    pub const NETNS_LINKS_DIR: &str = "netns";
    /// `progs/sk_lookup`: the sk_lookup program, for linking into new pods' netns.
    pub const PROGS_DIR: &str = "progs";
    /// `links/sk_msg`: the sockmap program's link to `ACCEL_SOCKS` (only under `--sockmap`).
    pub const SK_MSG_LINK: &str = "sk_msg";
    pub const SK_LOOKUP_PROG: &str = "sk_lookup";
}

/// `bpf_map_type` values of the maps sidecap uses.
pub mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERCPU_HASH: u32 = 5;
    pub const LRU_HASH: u32 = 9;
    pub const LPM_TRIE: u32 = 11;
    pub const SOCKHASH: u32 = 18;
    pub const SK_STORAGE: u32 = 24;
    pub const RINGBUF: u32 = 27;
}

/// One map of the object, as it is compiled (`max_entries` is the compiled default; the
/// agent may size the growing ones otherwise at creation, see `MapSizes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// The static's name in the object, and its pin name under `maps/`.
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn def<K, V>(name: &'static str, map_type: u32, max_entries: u32) -> MapDef {
    MapDef { name, map_type, key_size: size_of::<K>() as u32, value_size: size_of::<V>() as u32, max_entries }
}

/// An LPM trie's key is its data behind a 4-byte prefix length.
const fn lpm_def<K, V>(name: &'static str, max_entries: u32) -> MapDef {
    let d = def::<K, V>(name, map_type::LPM_TRIE, max_entries);
    MapDef { key_size: 4 + d.key_size, ..d }
}

/// netns cookie → the pod's configuration.
pub const PODS: MapDef = def::<u64, PodConfig>("PODS", map_type::HASH, 4096);
pub const OUT_PORTS: MapDef = def::<PortKey, PortRule>("OUT_PORTS", map_type::HASH, 262144);
pub const OUT_CIDRS: MapDef = lpm_def::<CidrKey, CidrRule>("OUT_CIDRS", 262144);
pub const OUT_LISTENERS: MapDef = lpm_def::<ListenerKey, ListenerRule>("OUT_LISTENERS", 1048576);
pub const IN_PORTS: MapDef = def::<InPortKey, InPortRule>("IN_PORTS", map_type::HASH, 262144);
pub const ORIG_DST_BY_COOKIE: MapDef = def::<u64, OrigDst>("ORIG_DST_BY_COOKIE", map_type::LRU_HASH, 65536);
/// Slot (socket cookie's low bits) → a captured connect's original destination (the fast
/// path; `ORIG_DST_BY_COOKIE` takes a connect whose slot is held by another).
pub const CONNECTING: MapDef = def::<u32, ConnectingSlot>("CONNECTING", map_type::ARRAY, CONNECTING_SLOTS);
pub const ORIG_DST: MapDef = def::<TupleKey, OrigDst>("ORIG_DST", map_type::LRU_HASH, 65536);
/// Slot (`established::slot` of the app's tuple) → a captured connection's original
/// destination (the fast path; `ORIG_DST` takes a connection whose slot is held).
pub const ESTABLISHED: MapDef = def::<u32, EstablishedSlot>("ESTABLISHED", map_type::ARRAY, crate::established::SLOTS);
pub const COUNTERS: MapDef = def::<u64, PodCounters>("COUNTERS", map_type::PERCPU_HASH, 4096);
/// A ring buffer: no key or value; `max_entries` is its size in bytes.
pub const DROP_EVENTS: MapDef =
    MapDef { name: "DROP_EVENTS", map_type: map_type::RINGBUF, key_size: 0, value_size: 0, max_entries: 256 * 1024 };
/// netns cookie (| `V6_LISTENER`) → socket.
pub const INBOUND_LISTENERS: MapDef = def::<u64, u32>("INBOUND_LISTENERS", map_type::SOCKHASH, 4096);
pub const POD_ADDRS: MapDef = def::<[u8; 16], u64>("POD_ADDRS", map_type::HASH, 16384);
pub const DNS_ORIG: MapDef = def::<u64, OrigDst>("DNS_ORIG", map_type::LRU_HASH, 65536);
pub const POD_NAMES: MapDef = def::<u64, PodName>("POD_NAMES", map_type::HASH, 4096);
/// (netns, a socket's own tuple) → that socket: both ends of a captured connection of a
/// `pod_flags::SOCKMAP` pod, so that each end's messages go straight to the other.
pub const ACCEL_SOCKS: MapDef = def::<TupleKey, u32>("ACCEL_SOCKS", map_type::SOCKHASH, 65536);
/// Socket storage on each socket of `ACCEL_SOCKS`: its peer's key, and whether its messages
/// take the TCP path for good (a redirect failed once: later ones must not overtake what
/// TCP carries).
pub const ACCEL_PEERS: MapDef = def::<i32, AccelPeer>("ACCEL_PEERS", map_type::SK_STORAGE, 0);
/// `[0]` = [`VERSION`] of the layout the pinned maps were made with (written by the agent).
pub const ABI_VERSION: MapDef = def::<u32, u32>("ABI_VERSION", map_type::ARRAY, 1);

/// Every map of the object; all are pinned so that state survives agent restarts.
pub const MAPS: &[MapDef] = &[
    PODS,
    OUT_PORTS,
    OUT_CIDRS,
    OUT_LISTENERS,
    IN_PORTS,
    ORIG_DST_BY_COOKIE,
    CONNECTING,
    ORIG_DST,
    ESTABLISHED,
    COUNTERS,
    DROP_EVENTS,
    INBOUND_LISTENERS,
    POD_ADDRS,
    DNS_ORIG,
    POD_NAMES,
    ACCEL_SOCKS,
    ACCEL_PEERS,
    ABI_VERSION,
];
