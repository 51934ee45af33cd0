//! Every map the programs share with the agent (pinned by it under `--bpffs`).
//! BTF-defined, so `bpftool map dump` prints field names.

use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuHashMap, RingBuf, SockHash},
    macros::btf_map,
};
use sidecap_common::{
    CidrKey, CidrRule, InPortKey, InPortRule, ListenerKey, ListenerRule, OrigDst, PodConfig,
    PodCounters, PodName, PortKey, PortRule, TupleKey,
};

const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

/// netns cookie → the pod's configuration. Absent: not a meshed pod, hands off.
#[btf_map]
pub static PODS: HashMap<u64, PodConfig, 4096> = HashMap::new();

/// (policy, port, proto) → exclude/include flags.
#[btf_map]
pub static OUT_PORTS: HashMap<PortKey, PortRule, 262144, NO_PREALLOC> = HashMap::new();

/// (policy, address prefix) → exclude/include flags.
#[btf_map]
pub static OUT_CIDRS: LpmTrie<CidrKey, CidrRule, 262144> = LpmTrie::new();

/// (policy, port, proto, address prefix) → listener action.
#[btf_map]
pub static OUT_LISTENERS: LpmTrie<ListenerKey, ListenerRule, 1048576> = LpmTrie::new();

/// (policy, port) → inbound action.
#[btf_map]
pub static IN_PORTS: HashMap<InPortKey, InPortRule, 262144, NO_PREALLOC> = HashMap::new();

/// Socket cookie → original destination, from connect until the connection is established.
#[btf_map]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst, 65536> = LruHashMap::new();

/// (netns, client tuple) → original destination, while the proxy's connection lives.
#[btf_map]
pub static ORIG_DST: LruHashMap<TupleKey, OrigDst, 65536> = LruHashMap::new();

/// netns cookie → per-CPU counters (the agent creates the entry with the pod).
#[btf_map]
pub static COUNTERS: PerCpuHashMap<u64, PodCounters, 4096> = PerCpuHashMap::new();

/// Denied connects, for the agent's logs.
#[btf_map]
pub static DROP_EVENTS: RingBuf<sidecap_common::DropEvent, { 256 * 1024 }> = RingBuf::new();

/// netns cookie → the proxy's inbound listener in that netns (registered at LISTEN).
#[btf_map]
pub static INBOUND_LISTENERS: SockHash<u64, 4096> = SockHash::new();

/// A pod address (IPv4-mapped or IPv6) → the pod's netns cookie, so that sk_lookup, which
/// runs before any socket exists, can tell whose address a connection is for.
#[btf_map]
pub static POD_ADDRS: HashMap<[u8; 16], u64, 16384> = HashMap::new();

/// UDP socket cookie → the DNS server the app asked, to restore it on replies.
#[btf_map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst, 65536> = LruHashMap::new();

/// netns cookie → "namespace/name": for inspection only (the programs never read it).
#[btf_map]
pub static POD_NAMES: HashMap<u64, PodName, 4096, NO_PREALLOC> = HashMap::new();
