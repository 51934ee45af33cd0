//! Every map the programs share with the agent (pinned by it under `--bpffs`).
//! BTF-defined, so `bpftool map dump` prints field names. Names, types and capacities are
//! `sidecap_common::abi`'s; the agent's tests check this object against it.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, RingBuf, SkStorage, SockHash},
    macros::btf_map,
};
use sidecap_common::{
    AccelPeer, CidrKey, CidrRule, ConnectingSlot, EstablishedSlot, InPortKey, InPortRule, ListenerKey, ListenerRule, OrigDst, PodConfig,
    PodCounters, PodName, PortKey, PortRule, TupleKey, abi,
};

const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

/// netns cookie → the pod's configuration. Absent: not a meshed pod, hands off.
#[btf_map]
pub static PODS: HashMap<u64, PodConfig, { abi::PODS.max_entries as usize }> = HashMap::new();

/// (policy, port, proto) → exclude/include flags.
#[btf_map]
pub static OUT_PORTS: HashMap<PortKey, PortRule, { abi::OUT_PORTS.max_entries as usize }, NO_PREALLOC> = HashMap::new();

/// (policy, address prefix) → exclude/include flags.
#[btf_map]
pub static OUT_CIDRS: LpmTrie<CidrKey, CidrRule, { abi::OUT_CIDRS.max_entries as usize }> = LpmTrie::new();

/// (policy, port, proto, address prefix) → listener action.
#[btf_map]
pub static OUT_LISTENERS: LpmTrie<ListenerKey, ListenerRule, { abi::OUT_LISTENERS.max_entries as usize }> = LpmTrie::new();

/// (policy, port) → inbound action.
#[btf_map]
pub static IN_PORTS: HashMap<InPortKey, InPortRule, { abi::IN_PORTS.max_entries as usize }, NO_PREALLOC> = HashMap::new();

/// Socket cookie's low bits → original destination, from connect until the connection is
/// established: the lock-free fast path (a plain array slot claimed by compare-and-swap).
#[btf_map]
pub static CONNECTING: Array<ConnectingSlot, { abi::CONNECTING.max_entries as usize }> = Array::new();

/// Socket cookie → original destination, from connect until the connection is established,
/// for a connect whose `CONNECTING` slot another connect holds.
#[btf_map]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst, { abi::ORIG_DST_BY_COOKIE.max_entries as usize }> = LruHashMap::new();

/// `established::slot` of the app's tuple → the connection's original destination, from
/// the app's handshake until the proxy's accepted socket closes: the lock-free fast path
/// (a plain array slot claimed by compare-and-swap).
#[btf_map]
pub static ESTABLISHED: Array<EstablishedSlot, { abi::ESTABLISHED.max_entries as usize }> = Array::new();

/// (netns, client tuple) → original destination, while the proxy's connection lives, for a
/// connection whose `ESTABLISHED` slot another holds.
#[btf_map]
pub static ORIG_DST: LruHashMap<TupleKey, OrigDst, { abi::ORIG_DST.max_entries as usize }> = LruHashMap::new();

/// netns cookie → per-CPU counters (the agent creates the entry with the pod).
#[btf_map]
pub static COUNTERS: PerCpuHashMap<u64, PodCounters, { abi::COUNTERS.max_entries as usize }> = PerCpuHashMap::new();

/// Denied connects, for the agent's logs.
#[btf_map]
pub static DROP_EVENTS: RingBuf<sidecap_common::DropEvent, { abi::DROP_EVENTS.max_entries as usize }> = RingBuf::new();

/// netns cookie → the proxy's inbound listener in that netns (registered at LISTEN).
#[btf_map]
pub static INBOUND_LISTENERS: SockHash<u64, { abi::INBOUND_LISTENERS.max_entries as usize }> = SockHash::new();

/// A pod address (IPv4-mapped or IPv6) → the pod's netns cookie, so that sk_lookup, which
/// runs before any socket exists, can tell whose address a connection is for.
#[btf_map]
pub static POD_ADDRS: HashMap<[u8; 16], u64, { abi::POD_ADDRS.max_entries as usize }> = HashMap::new();

/// UDP socket cookie → the DNS server the app asked, to restore it on replies.
#[btf_map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst, { abi::DNS_ORIG.max_entries as usize }> = LruHashMap::new();

/// netns cookie → "namespace/name": for inspection only (the programs never read it).
#[btf_map]
pub static POD_NAMES: HashMap<u64, PodName, { abi::POD_NAMES.max_entries as usize }, NO_PREALLOC> = HashMap::new();

/// (netns, a socket's own tuple) → the socket: both ends of a captured connection of a
/// `pod_flags::SOCKMAP` pod (sockops adds them; the kernel removes each at its close).
#[btf_map]
pub static ACCEL_SOCKS: SockHash<TupleKey, { abi::ACCEL_SOCKS.max_entries as usize }> = SockHash::new();

/// Per socket of `ACCEL_SOCKS`: its peer's key, and whether it fell back to TCP for good.
#[btf_map]
pub static ACCEL_PEERS: SkStorage<AccelPeer> = SkStorage::new();

/// `[0]`: the pinned layout's `abi::VERSION`, written by the agent (the programs never read
/// it): an agent of another layout refuses these pins instead of misreading them.
#[btf_map]
pub static ABI_VERSION: Array<u32, { abi::ABI_VERSION.max_entries as usize }> = Array::new();
