//! One reconciliation pass: source → policy → compiled generations → maps.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};
use sidecap_common::{DropEvent, drop_reason};
use sidecap_policy::{Cluster, Generation, PodRef};

use super::{Config, Error};
use crate::{
    datapath,
    metrics::{ErrorLabels, Metrics, PodNames},
    netns,
};

/// What the agent knows about one pod it manages.
struct Managed {
    pod: PodRef,
    generation: Generation,
    /// `Inputs::for_pod` when this generation was computed.
    inputs: u64,
}

pub struct Syncer {
    cfg: Config,
    maps: datapath::Maps,
    drops: Option<RingBuf<MapData>>,
    managed: BTreeMap<u64, Managed>,
    next_policy: u32,
    /// Last message logged per pod, so a persistent problem is logged once, not every pass.
    pod_errors: BTreeMap<String, String>,
    drop_log: RateLimit,
    metrics: Metrics,
    names: PodNames,
    cookies: netns::CookieCache,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Meshed pods with a netns in the source.
    pub pods: usize,
    /// Pods whose maps were (re)written.
    pub written: usize,
    /// Pods removed from the maps.
    pub removed: usize,
    /// Problems reported (the previous state stayed in force for those).
    pub errors: usize,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.written + self.removed + self.errors > 0
    }
}

impl Syncer {
    pub fn new(cfg: &Config, maps: datapath::Maps, metrics: Metrics, names: PodNames) -> Result<Self, Error> {
        let next_policy = maps.live_policies()?.into_iter().max().unwrap_or(0).wrapping_add(1).max(1);
        let drops = Map::from_map_data(
            MapData::from_pin(cfg.bpffs.join("maps/DROP_EVENTS"))
                .map_err(|source| datapath::Error::Map { name: "DROP_EVENTS", source })?,
        )
        .and_then(RingBuf::try_from)
        .map_err(|e| tracing::warn!(error = %e, "drop events unavailable"))
        .ok();
        Ok(Self {
            cfg: cfg.clone(),
            maps,
            drops,
            managed: BTreeMap::new(),
            next_policy,
            pod_errors: BTreeMap::new(),
            drop_log: RateLimit::new(20, Duration::from_secs(10)),
            metrics,
            names,
            cookies: netns::CookieCache::default(),
        })
    }

    fn fresh_policy_id(&mut self) -> u32 {
        let id = self.next_policy;
        self.next_policy = self.next_policy.wrapping_add(1).max(1);
        id
    }

    /// Brings the maps in line with `cluster`. Never leaves a pod half-written: a pod whose
    /// new policy cannot be built keeps its previous one.
    /// `full`: re-evaluate every pod; otherwise only those whose inputs changed.
    pub fn apply(&mut self, cluster: &Cluster, full: bool) -> SyncReport {
        let mut report = SyncReport::default();
        // One service registry per pass, shared by every pod that needs evaluating.
        let registry = std::cell::OnceCell::new();
        let inputs = super::inputs::Inputs::of(cluster);
        let mut seen = HashSet::new();
        for pod_ref in cluster.meshed_pods() {
            let Some(netns_path) = cluster
                .pod(&pod_ref)
                .and_then(|p| p.metadata.annotations.get(sidecap_policy::knobs::ANN_NETNS).cloned())
            else {
                continue;
            };
            report.pods += 1;
            let cookie = match self.cookies.cookie(std::path::Path::new(&netns_path)) {
                Ok(c) => c,
                Err(e) => {
                    if self.note_pod_error(&pod_ref, &e.to_string()) {
                        tracing::warn!(pod = %pod_ref, error = %e, "pod netns not usable yet");
                    }
                    report.errors += 1;
                    continue;
                }
            };
            seen.insert(cookie);
            let key = cluster.pod(&pod_ref).map(|p| inputs.for_pod(p)).unwrap_or_default();
            if !full && self.managed.get(&cookie).is_some_and(|m| m.inputs == key && m.pod == pod_ref) {
                continue;
            }
            let registry = registry.get_or_init(|| sidecap_policy::registry::build(cluster));
            match self.sync_pod(cluster, registry, &pod_ref, cookie, std::path::Path::new(&netns_path), key) {
                Ok(changed) => {
                    self.pod_errors.remove(&pod_ref.to_string());
                    report.written += usize::from(changed);
                }
                Err(e) => {
                    if self.note_pod_error(&pod_ref, &e) {
                        tracing::error!(pod = %pod_ref, error = %e, "policy not applied; previous stays in force");
                    }
                    report.errors += 1;
                }
            }
        }

        // Pods that left the source: stop capturing them. Also those a previous agent wrote.
        let known: Vec<u64> = match self.maps.pods() {
            Ok(p) => p.into_iter().map(|(n, _)| n).collect(),
            Err(e) => {
                tracing::error!(error = %e, "reading PODS");
                report.errors += 1;
                Vec::new()
            }
        };
        for netns in known {
            if seen.contains(&netns) {
                continue;
            }
            let gone = self.managed.remove(&netns);
            if let Err(e) = datapath::detach_pod_netns(&self.cfg.bpffs, netns) {
                tracing::error!(netns, error = %e, "removing the pod's sk_lookup link");
                report.errors += 1;
            }
            match self.maps.remove_pod(netns, gone.as_ref().map(|m| &m.generation)) {
                Ok(()) => {
                    report.removed += 1;
                    let who = gone.map(|m| m.pod.to_string()).unwrap_or_else(|| format!("netns {netns}"));
                    tracing::info!(pod = %who, "pod gone; capture removed");
                }
                Err(e) => {
                    tracing::error!(netns, error = %e, "removing pod");
                    report.errors += 1;
                }
            }
        }
        self.cookies.retain(&seen);
        self.metrics.pods_managed.set(self.managed.len() as i64);
        self.metrics.generations_written.inc_by(report.written as u64);
        self.metrics.pods_removed.inc_by(report.removed as u64);
        if report.errors > 0 {
            self.metrics.sync_errors.get_or_create(&ErrorLabels { kind: "pod".into() }).inc_by(report.errors as u64);
        }
        if let Ok(mut n) = self.names.lock() {
            *n = self.managed.iter().map(|(k, m)| (*k, m.pod.to_string())).collect();
        }
        report
    }

    /// True when `pod` (`namespace/name`) has its policy in the kernel.
    pub fn is_managed(&self, pod: &str) -> bool {
        self.managed.values().any(|m| m.pod.to_string() == pod)
    }

    /// The pod's current problem, if any (the reason its policy is not in the kernel).
    pub fn pod_error(&self, pod: &str) -> Option<&str> {
        self.pod_errors.get(pod).map(String::as_str)
    }

    /// Records a pod's problem; true when it is new (worth logging).
    fn note_pod_error(&mut self, pod: &PodRef, msg: &str) -> bool {
        self.pod_errors.insert(pod.to_string(), msg.to_string()).as_deref() != Some(msg)
    }

    /// Returns whether the maps changed.
    fn sync_pod(
        &mut self,
        cluster: &Cluster,
        registry: &[sidecap_policy::registry::ServiceView],
        pod_ref: &PodRef,
        netns: u64,
        netns_path: &std::path::Path,
        inputs: u64,
    ) -> Result<bool, String> {
        let policy =
            sidecap_policy::evaluate_in(cluster, registry, pod_ref, &self.cfg.engine).map_err(|e| e.to_string())?;
        if let Some(m) = self.managed.get(&netns) {
            let same = sidecap_policy::compile(&policy, m.generation.pod.policy, m.generation.pod.generation);
            if same == m.generation {
                if let Some(m) = self.managed.get_mut(&netns) {
                    m.inputs = inputs;
                }
                return Ok(false);
            }
        }
        // Generations continue across agent restarts: the kernel remembers the last one.
        let last = match self.managed.get(&netns) {
            Some(m) => Some(m.generation.pod.generation),
            None => self.maps.pod(netns).map(|c| c.generation),
        };
        let gen_no = last.map(|g| g.wrapping_add(1)).unwrap_or(1);
        let id = self.fresh_policy_id();
        let new = sidecap_policy::compile(&policy, id, gen_no);
        let old = self.managed.get(&netns).map(|m| m.generation.clone());
        self.maps.set_name(netns, &pod_ref.to_string()).map_err(|e| e.to_string())?;
        self.maps.write(netns, &new, old.as_ref()).map_err(|e| e.to_string())?;
        // Inbound capture needs the sk_lookup program linked into the pod's own netns, and an
        // IPv6 pod needs Envoy's inbound passthrough source ::6 on lo, as istio-iptables adds.
        if datapath::attach_pod_netns(&self.cfg.bpffs, netns, netns_path).map_err(|e| e.to_string())?
            && policy.ips.iter().any(|ip| ip.is_ipv6() && !ip.to_canonical().is_ipv4())
        {
            netns::add_inbound_passthrough_v6(netns_path).map_err(|e| e.to_string())?;
        }
        tracing::info!(
            pod = %pod_ref,
            netns,
            sidecar = policy.sidecar.as_deref().unwrap_or("(default)"),
            policy = id,
            generation = gen_no,
            listeners = new.listener_names.len(),
            "policy applied"
        );
        self.managed.insert(netns, Managed { pod: pod_ref.clone(), generation: new, inputs });
        Ok(true)
    }

    /// Deletes rules no pod references (left by a previous agent process).
    pub fn collect_garbage(&mut self) -> Result<usize, datapath::Error> {
        let live: HashSet<u64> = self.maps.pods()?.into_iter().map(|(n, _)| n).collect();
        let mut n = 0;
        for netns in datapath::pod_links(&self.cfg.bpffs) {
            if !live.contains(&netns) && datapath::detach_pod_netns(&self.cfg.bpffs, netns)? {
                n += 1;
            }
        }
        Ok(n + self.maps.collect_garbage()?)
    }

    /// Logs denied connects, naming the pod and destination, rate-limited.
    pub fn drain_drop_events(&mut self) {
        let Some(rb) = self.drops.as_mut() else { return };
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<DropEvent>() {
                continue;
            }
            let ev: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            self.metrics.drop_events.inc();
            if !self.drop_log.allow() {
                continue;
            }
            let pod = self
                .managed
                .get(&ev.netns)
                .map(|m| m.pod.to_string())
                .unwrap_or_else(|| format!("netns {}", ev.netns));
            let ip = Ipv6Addr::from(ev.addr);
            let ip: IpAddr = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            let why = match ev.reason {
                drop_reason::REGISTRY_ONLY => "REGISTRY_ONLY: no listener",
                drop_reason::LISTENER => "listener rule",
                _ => "unknown",
            };
            let proto = if ev.proto == 17 { "udp" } else { "tcp" };
            tracing::warn!(pod = %pod, destination = %std::net::SocketAddr::new(ip, ev.port), proto, uid = ev.uid, reason = why, "connect denied");
        }
    }
}

/// At most `n` events per window; the rest are counted and reported once.
struct RateLimit {
    n: u32,
    window: Duration,
    start: Instant,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    fn new(n: u32, window: Duration) -> Self {
        Self { n, window, start: Instant::now(), used: 0, suppressed: 0 }
    }

    fn allow(&mut self) -> bool {
        if self.start.elapsed() >= self.window {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "drop events not logged (rate limit)");
            }
            self.start = Instant::now();
            self.used = 0;
            self.suppressed = 0;
        }
        if self.used < self.n {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}
