//! Typed access to the pinned maps: write a pod's generation (rules first, then the one
//! `PODS` update that switches to them, then the old rules go), read state for inspect.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{
    HashMap, Map, MapData, PerCpuHashMap,
    lpm_trie::{Key, LpmTrie},
};
use sidecap_common::{
    CidrKey, CidrRule, InPortKey, InPortRule, ListenerKey, ListenerRule, PodConfig, PodCounters, PodName, PortKey, PortRule, abi,
};

use super::{Error, Generation, install::map_pin};

const BPF_NOEXIST: u64 = 1;

pub struct Maps {
    pods: HashMap<MapData, u64, PodConfig>,
    out_ports: HashMap<MapData, PortKey, PortRule>,
    out_cidrs: LpmTrie<MapData, CidrKey, CidrRule>,
    listeners: LpmTrie<MapData, ListenerKey, ListenerRule>,
    in_ports: HashMap<MapData, InPortKey, InPortRule>,
    counters: PerCpuHashMap<MapData, u64, PodCounters>,
    pod_addrs: HashMap<MapData, [u8; 16], u64>,
    names: HashMap<MapData, u64, PodName>,
    capacity: Capacity,
}

/// How many entries each map that grows with pods and rules holds at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub pods: usize,
    pub out_ports: usize,
    pub out_cidrs: usize,
    pub listeners: usize,
    pub in_ports: usize,
}

fn max_entries(bpffs: &Path, name: &'static str) -> Result<usize, Error> {
    let info = aya::maps::MapInfo::from_pin(map_pin(bpffs, name)).map_err(|source| Error::Map { name, source })?;
    Ok(info.max_entries() as usize)
}

fn pod_ips(c: &PodConfig) -> &[[u8; 16]] {
    &c.ips[..(c.n_ips as usize).min(c.ips.len())]
}

/// One pod as the kernel sees it.
#[derive(Debug, Clone)]
pub struct PodState {
    pub netns: u64,
    /// `namespace/name` as the agent recorded it.
    pub name: Option<String>,
    pub config: PodConfig,
    pub counters: PodCounters,
}

fn open(bpffs: &Path, name: &'static str) -> Result<Map, Error> {
    let path = map_pin(bpffs, name);
    if !path.exists() {
        return Err(Error::NotInstalled { path: bpffs.into() });
    }
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| Error::Map { name, source })
}

macro_rules! typed {
    ($bpffs:expr, $name:expr) => {
        open($bpffs, $name)?.try_into().map_err(|source| Error::Map { name: $name, source })?
    };
}

impl Maps {
    /// Opens the pinned maps; works whether or not the agent is running.
    pub fn open(bpffs: &Path) -> Result<Self, Error> {
        super::abi::check(bpffs)?;
        Ok(Self {
            pods: typed!(bpffs, abi::PODS.name),
            out_ports: typed!(bpffs, abi::OUT_PORTS.name),
            out_cidrs: typed!(bpffs, abi::OUT_CIDRS.name),
            listeners: typed!(bpffs, abi::OUT_LISTENERS.name),
            in_ports: typed!(bpffs, abi::IN_PORTS.name),
            counters: typed!(bpffs, abi::COUNTERS.name),
            pod_addrs: typed!(bpffs, abi::POD_ADDRS.name),
            names: typed!(bpffs, abi::POD_NAMES.name),
            capacity: Capacity {
                pods: max_entries(bpffs, abi::PODS.name)?,
                out_ports: max_entries(bpffs, abi::OUT_PORTS.name)?,
                out_cidrs: max_entries(bpffs, abi::OUT_CIDRS.name)?,
                listeners: max_entries(bpffs, abi::OUT_LISTENERS.name)?,
                in_ports: max_entries(bpffs, abi::IN_PORTS.name)?,
            },
        })
    }

    /// Every pod in `PODS`.
    pub fn pods(&self) -> Result<Vec<(u64, PodConfig)>, Error> {
        self.pods.iter().collect::<Result<Vec<_>, _>>().map_err(|source| Error::Map { name: abi::PODS.name, source })
    }

    pub fn pod(&self, netns: u64) -> Option<PodConfig> {
        self.pods.get(&netns, 0).ok()
    }

    /// The pod's counters summed over CPUs (zero when it has none yet).
    pub fn counters(&self, netns: u64) -> PodCounters {
        let mut sum = PodCounters::default();
        if let Ok(per_cpu) = self.counters.get(&netns, 0) {
            for c in per_cpu.iter() {
                sum.captured += c.captured;
                sum.passthrough += c.passthrough;
                sum.dropped += c.dropped;
                sum.inbound_captured += c.inbound_captured;
                sum.dns += c.dns;
                sum.sockmap_msgs += c.sockmap_msgs;
                sum.sockmap_bytes += c.sockmap_bytes;
                sum.sockmap_fallbacks += c.sockmap_fallbacks;
            }
        }
        sum
    }

    /// The pod's `namespace/name`, when the agent recorded it.
    pub fn name(&self, netns: u64) -> Option<String> {
        let n = self.names.get(&netns, 0).ok()?;
        let end = n.name.iter().position(|b| *b == 0).unwrap_or(n.name.len());
        Some(String::from_utf8_lossy(&n.name[..end]).into_owned())
    }

    pub fn states(&self) -> Result<Vec<PodState>, Error> {
        Ok(self
            .pods()?
            .into_iter()
            .map(|(netns, config)| PodState { netns, name: self.name(netns), config, counters: self.counters(netns) })
            .collect())
    }

    /// Writes every entry of `rules` (a template compiled with policy id 0) under policy id
    /// `id`. Nothing reads `id` before a pod is switched to it, so the set is complete
    /// before any connect can see it.
    pub fn write_set(&mut self, id: u32, rules: &Generation) -> Result<(), Error> {
        let e = |name| move |source| Error::Map { name, source };
        let pol = id.to_be_bytes();
        for (k, v) in &rules.out_ports {
            self.out_ports.insert(PortKey { policy: id, ..*k }, v, 0).map_err(e(abi::OUT_PORTS.name))?;
        }
        for ((len, k), v) in &rules.out_cidrs {
            self.out_cidrs.insert(&Key::new(*len, CidrKey { policy: pol, ..*k }), v, 0).map_err(e(abi::OUT_CIDRS.name))?;
        }
        for ((len, k), v) in &rules.listeners {
            self.listeners
                .insert(&Key::new(*len, ListenerKey { policy: pol, ..*k }), v, 0)
                .map_err(e(abi::OUT_LISTENERS.name))?;
        }
        for (k, v) in &rules.in_ports {
            self.in_ports.insert(InPortKey { policy: id, ..*k }, v, 0).map_err(e(abi::IN_PORTS.name))?;
        }
        Ok(())
    }

    /// Turns set `id` from `old` into `new` in place, listener entry by listener entry:
    /// new and changed entries first, then the ones that went. Only for changes confined to
    /// listeners (`Generation::differs_in_listeners_only`): each entry decides its own
    /// destinations, so a connect sees each destination's old or new rule, never a mix.
    pub fn update_set_listeners(&mut self, id: u32, old: &Generation, new: &Generation) -> Result<usize, Error> {
        let e = |name| move |source| Error::Map { name, source };
        let pol = id.to_be_bytes();
        let mut n = 0;
        for ((len, k), v) in &new.listeners {
            if old.listeners.get(&(*len, *k)) != Some(v) {
                self.listeners
                    .insert(&Key::new(*len, ListenerKey { policy: pol, ..*k }), v, 0)
                    .map_err(e(abi::OUT_LISTENERS.name))?;
                n += 1;
            }
        }
        for (len, k) in old.listeners.keys().filter(|k| !new.listeners.contains_key(k)) {
            let _ = self.listeners.remove(&Key::new(*len, ListenerKey { policy: pol, ..*k }));
            n += 1;
        }
        Ok(n)
    }

    /// Deletes every entry of set `id` (no pod uses it any more). A missing key is fine:
    /// removal is idempotent.
    pub fn remove_set(&mut self, id: u32, rules: &Generation) {
        let pol = id.to_be_bytes();
        for k in rules.out_ports.keys() {
            let _ = self.out_ports.remove(&PortKey { policy: id, ..*k });
        }
        for (len, k) in rules.out_cidrs.keys() {
            let _ = self.out_cidrs.remove(&Key::new(*len, CidrKey { policy: pol, ..*k }));
        }
        for (len, k) in rules.listeners.keys() {
            let _ = self.listeners.remove(&Key::new(*len, ListenerKey { policy: pol, ..*k }));
        }
        for k in rules.in_ports.keys() {
            let _ = self.in_ports.remove(&InPortKey { policy: id, ..*k });
        }
    }

    /// Points the pod at `config` (its rule set must be written already): the one `PODS`
    /// update that switches it. Its counters and addresses are set up first.
    pub fn write_pod(&mut self, netns: u64, config: &PodConfig) -> Result<(), Error> {
        if self.counters.get(&netns, 0).is_err() {
            let cpus = aya::util::nr_cpus().map_err(|(path, source)| Error::Io { path: path.into(), source })?;
            let zero = aya::maps::PerCpuValues::try_from(vec![PodCounters::default(); cpus])
                .map_err(|source| Error::Io { path: abi::COUNTERS.name.into(), source })?;
            // Another writer may have created it meanwhile: that is fine.
            let _ = self.counters.insert(netns, zero, BPF_NOEXIST);
        }
        for ip in pod_ips(config) {
            self.pod_addrs.insert(ip, netns, 0).map_err(|source| Error::Map { name: abi::POD_ADDRS.name, source })?;
        }
        let previous = self.pod(netns);
        self.pods.insert(netns, config, 0).map_err(|source| Error::Map { name: abi::PODS.name, source })?;
        if let Some(prev) = previous {
            for ip in pod_ips(&prev).iter().filter(|ip| !pod_ips(config).contains(ip)) {
                self.forget_addr(ip, netns);
            }
        }
        Ok(())
    }

    /// Every rule set in the kernel, by policy id, as templates (keys with policy id 0, as
    /// `compile(.., 0, ..)` makes them), so that a new agent can recognise the sets a previous
    /// one wrote by their content. Listener names are derived from the keys.
    pub fn sets(&self) -> Result<BTreeMap<u32, Generation>, Error> {
        let e = |name| move |source| Error::Map { name, source };
        let mut out: BTreeMap<u32, Generation> = BTreeMap::new();
        for kv in self.out_ports.iter() {
            let (k, v) = kv.map_err(e(abi::OUT_PORTS.name))?;
            out.entry(k.policy).or_default().out_ports.insert(PortKey { policy: 0, ..k }, v);
        }
        for kv in self.in_ports.iter() {
            let (k, v) = kv.map_err(e(abi::IN_PORTS.name))?;
            out.entry(k.policy).or_default().in_ports.insert(InPortKey { policy: 0, ..k }, v);
        }
        for kv in self.out_cidrs.iter() {
            let (k, v) = kv.map_err(e(abi::OUT_CIDRS.name))?;
            let d = k.data();
            let g = out.entry(u32::from_be_bytes(d.policy)).or_default();
            g.out_cidrs.insert((k.prefix_len(), CidrKey { policy: [0; 4], ..d }), v);
        }
        for kv in self.listeners.iter() {
            let (k, v) = kv.map_err(e(abi::OUT_LISTENERS.name))?;
            let d = k.data();
            let g = out.entry(u32::from_be_bytes(d.policy)).or_default();
            g.listener_names
                .insert(v.listener_id, crate::inspect::listener_short_name(k.prefix_len(), u16::from_be_bytes(d.port), d.addr));
            g.listeners.insert((k.prefix_len(), ListenerKey { policy: [0; 4], ..d }), v);
        }
        Ok(out)
    }

    /// The listener rule set `policy` has for exactly `addr` (a /128 key: the longest match,
    /// so a wildcard or CIDR listener covering `addr` answers too).
    pub fn listener(&self, policy: u32, port: u16, addr: [u8; 16]) -> Option<ListenerRule> {
        let key = ListenerKey { policy: policy.to_be_bytes(), port: port.to_be_bytes(), proto: sidecap_common::proto::TCP, _pad: 0, addr };
        self.listeners.get(&Key::new(sidecap_common::LISTENER_FIXED_BITS + 128, key), 0).ok()
    }

    /// How many entries each rule map holds at most (read from the kernel: a map pinned by an
    /// earlier agent keeps the size it was created with).
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// Records the pod's `namespace/name` for inspection (truncated to 127 bytes).
    pub fn set_name(&mut self, netns: u64, name: &str) -> Result<(), Error> {
        let mut n = PodName::default();
        let len = name.len().min(n.name.len() - 1);
        n.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        self.names.insert(netns, n, 0).map_err(|source| Error::Map { name: abi::POD_NAMES.name, source })
    }

    /// Forgets a pod: its `PODS` entry first (capture stops), then its counters, name and
    /// addresses. Its rule set is the caller's (other pods may share it).
    pub fn remove_pod(&mut self, netns: u64) -> Result<(), Error> {
        let previous = self.pod(netns);
        match self.pods.remove(&netns) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(Error::Map { name: abi::PODS.name, source }),
        }
        let _ = self.counters.remove(&netns);
        let _ = self.names.remove(&netns);
        if let Some(prev) = previous {
            for ip in pod_ips(&prev) {
                self.forget_addr(ip, netns);
            }
        }
        Ok(())
    }

    /// Drops an address → pod mapping unless another pod took the address meanwhile.
    fn forget_addr(&mut self, ip: &[u8; 16], netns: u64) {
        if self.pod_addrs.get(ip, 0).ok() == Some(netns) {
            let _ = self.pod_addrs.remove(ip);
        }
    }

    /// Policy ids in use by some pod.
    pub fn live_policies(&self) -> Result<BTreeSet<u32>, Error> {
        Ok(self.pods()?.into_iter().map(|(_, c)| c.policy).collect())
    }

    /// Deletes every rule whose policy id no pod uses (after a restart, when the previous
    /// agent's generations are not in memory). Returns how many entries went.
    pub fn collect_garbage(&mut self) -> Result<usize, Error> {
        let live = self.live_policies()?;
        let mut n = 0;
        let dead_ports: Vec<_> = self.out_ports.keys().filter_map(Result::ok).filter(|k| !live.contains(&k.policy)).collect();
        for k in dead_ports {
            n += usize::from(self.out_ports.remove(&k).is_ok());
        }
        let dead_in: Vec<_> = self.in_ports.keys().filter_map(Result::ok).filter(|k| !live.contains(&k.policy)).collect();
        for k in dead_in {
            n += usize::from(self.in_ports.remove(&k).is_ok());
        }
        let dead_cidrs: Vec<_> = self
            .out_cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&u32::from_be_bytes(k.data().policy)))
            .collect();
        for k in dead_cidrs {
            n += usize::from(self.out_cidrs.remove(&k).is_ok());
        }
        let dead_listeners: Vec<_> = self
            .listeners
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&u32::from_be_bytes(k.data().policy)))
            .collect();
        for k in dead_listeners {
            n += usize::from(self.listeners.remove(&k).is_ok());
        }
        Ok(n)
    }
}

/// `(prefix len, port, address, action)` of every listener entry, grouped by policy id.
pub type ListenerEntries = BTreeMap<u32, Vec<(u32, u16, [u8; 16], u8)>>;

/// Reads `OUT_LISTENERS` whole (for inspection; the kernel never scans it).
pub fn listeners_by_policy(bpffs: &Path) -> Result<ListenerEntries, Error> {
    let trie: LpmTrie<MapData, ListenerKey, ListenerRule> = typed!(bpffs, abi::OUT_LISTENERS.name);
    let mut out: ListenerEntries = BTreeMap::new();
    for kv in trie.iter() {
        let (k, v) = kv.map_err(|source| Error::Map { name: abi::OUT_LISTENERS.name, source })?;
        let d = k.data();
        out.entry(u32::from_be_bytes(d.policy))
            .or_default()
            .push((k.prefix_len(), u16::from_be_bytes(d.port), d.addr, v.action));
    }
    Ok(out)
}

impl Maps {
    /// Rebuilds the generation the kernel holds for `netns` from the maps (for `explain`
    /// against the live state). Listener names are derived from their keys.
    pub fn generation_of(&self, netns: u64) -> Result<Option<Generation>, Error> {
        let Some(pod) = self.pod(netns) else { return Ok(None) };
        let id = pod.policy;
        let e = |name| move |source| Error::Map { name, source };
        let mut g = Generation { pod, ..Generation::default() };
        for kv in self.out_ports.iter() {
            let (k, v) = kv.map_err(e(abi::OUT_PORTS.name))?;
            if k.policy == id {
                g.out_ports.insert(k, v);
            }
        }
        for kv in self.in_ports.iter() {
            let (k, v) = kv.map_err(e(abi::IN_PORTS.name))?;
            if k.policy == id {
                g.in_ports.insert(k, v);
            }
        }
        for kv in self.out_cidrs.iter() {
            let (k, v) = kv.map_err(e(abi::OUT_CIDRS.name))?;
            if u32::from_be_bytes(k.data().policy) == id {
                g.out_cidrs.insert((k.prefix_len(), k.data()), v);
            }
        }
        for kv in self.listeners.iter() {
            let (k, v) = kv.map_err(e(abi::OUT_LISTENERS.name))?;
            let d = k.data();
            if u32::from_be_bytes(d.policy) != id {
                continue;
            }
            g.listener_names
                .insert(v.listener_id, crate::inspect::listener_short_name(k.prefix_len(), u16::from_be_bytes(d.port), d.addr));
            g.listeners.insert((k.prefix_len(), d), v);
        }
        Ok(Some(g))
    }

    /// The netns cookie of a pod by name (from `POD_NAMES`).
    pub fn netns_of(&self, name: &str) -> Result<Option<u64>, Error> {
        Ok(self.pods()?.into_iter().map(|(n, _)| n).find(|n| self.name(*n).as_deref() == Some(name)))
    }
}
