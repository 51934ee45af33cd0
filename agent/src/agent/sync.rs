//! One reconciliation pass: source → policy → compiled generations → maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};
use sidecap_common::{DropEvent, PodConfig, abi, drop_reason, pod_flags};
use sidecap_policy::{Cluster, EntryCounts, Generation, PodRef, ScopeKey, Scopes};

use super::{
    Config, Error,
    pod_error::{Meanwhile, PodError, Shortfall},
    rulesets::RuleSets,
};
use crate::{
    datapath,
    metrics::{ErrorLabels, MapLabels, Metrics, PodNames},
    netns,
};

/// Sockmap for a pod: the node's `--sockmap`, which the pod's annotation can turn off but not
/// on (without the node flag the sk_msg program is not attached).
fn sockmap_wanted(node: bool, annotation: Option<bool>) -> bool {
    node && annotation.unwrap_or(true)
}

/// What the agent knows about one pod it manages.
struct Managed {
    pod: PodRef,
    /// Exactly the pod's `PODS` entry (`config.policy` names its rule set).
    config: PodConfig,
    /// `Inputs::for_pod` when this config was computed (0: adopted, not evaluated yet).
    inputs: u64,
    /// The pod's `sidecap.io/trace` annotation asks for its trace switch.
    trace_annotated: bool,
}

/// One pod's evaluated policy, before it is written.
struct Want {
    netns: u64,
    pod: PodRef,
    path: PathBuf,
    inputs: u64,
    /// The pod's rule set (shared with every pod of the same scope).
    rules: Arc<Generation>,
    hash: u64,
    /// The pod's `PODS` entry, policy id and generation still to be set.
    config: PodConfig,
    sidecar: Option<String>,
    trace_annotated: bool,
}

/// One scope's evaluation, shared by its pods within a pass.
type Evaluated = Result<(Arc<Generation>, u64, Option<String>), PodError>;

pub struct Syncer {
    cfg: Config,
    maps: datapath::Maps,
    drops: Option<RingBuf<MapData>>,
    managed: BTreeMap<u64, Managed>,
    sets: RuleSets,
    /// Last message logged per pod, so a persistent problem is logged once, not every pass.
    pod_errors: BTreeMap<PodRef, PodError>,
    /// Pods refused because their rule set does not fit (also in `pod_errors`).
    capacity_errors: BTreeMap<PodRef, PodError>,
    drop_log: RateLimit,
    metrics: Metrics,
    names: PodNames,
    cookies: netns::CookieCache,
    /// Processes by netns, scanned from /proc once per pass when a new pod needs them.
    procs: Option<datapath::listeners::ProcNetns>,
    /// The cgroup2 mount, for relative `sidecap.io/proxy-cgroup` paths (None: not found).
    cgroup_root: Option<PathBuf>,
    /// Last proxy-cgroup state logged per pod (so that it is logged once per change).
    proxy_cgroups: BTreeMap<PodRef, Result<u64, String>>,
    /// Pods (`namespace/name`) a `sidecap trace` session watches: their switch is on.
    traced: BTreeSet<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Meshed pods with a netns in the source.
    pub pods: usize,
    /// Pods whose `PODS` entry was (re)written.
    pub written: usize,
    /// Rule sets updated in place (listener entries only).
    pub updated_in_place: usize,
    /// Rule sets written anew.
    pub sets_written: usize,
    /// Pods removed from the maps.
    pub removed: usize,
    /// Problems reported (the previous state stayed in force for those).
    pub errors: usize,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.written + self.updated_in_place + self.removed + self.errors > 0
    }
}

/// Equal apart from the generation number (which only counts switches).
fn same_config(a: &PodConfig, b: &PodConfig) -> bool {
    PodConfig { generation: 0, ..*a } == PodConfig { generation: 0, ..*b }
}

/// The first map `need` does not fit in, given what is `used` of its capacity.
fn does_not_fit(need: EntryCounts, used: EntryCounts, cap: &datapath::Capacity) -> Option<Shortfall> {
    let maps = [
        (abi::OUT_LISTENERS.name, "--max-listeners", need.listeners, used.listeners, cap.listeners),
        (abi::OUT_PORTS.name, "--max-rules", need.out_ports, used.out_ports, cap.out_ports),
        (abi::OUT_CIDRS.name, "--max-rules", need.out_cidrs, used.out_cidrs, cap.out_cidrs),
        (abi::IN_PORTS.name, "--max-rules", need.in_ports, used.in_ports, cap.in_ports),
    ];
    maps.into_iter()
        .find(|(_, _, need, used, max)| used + need > *max)
        .map(|(map, flag, need, used, max)| Shortfall { map, flag, need, free: max.saturating_sub(used), max })
}

impl Syncer {
    pub fn new(cfg: &Config, maps: datapath::Maps, metrics: Metrics, names: PodNames) -> Result<Self, Error> {
        let drops = Map::from_map_data(
            MapData::from_pin(datapath::map_pin(&cfg.bpffs, abi::DROP_EVENTS.name))
                .map_err(|source| datapath::Error::Map { name: abi::DROP_EVENTS.name, source })?,
        )
        .and_then(RingBuf::try_from)
        .map_err(|e| tracing::warn!(error = %e, "drop events unavailable"))
        .ok();
        // Adopt what a previous agent wrote: its pods (named in POD_NAMES) and its rule sets,
        // recognised by content, so that a restart rewrites nothing that is still right.
        let mut managed = BTreeMap::new();
        let mut holders: BTreeMap<u32, usize> = BTreeMap::new();
        for (netns, config) in maps.pods()? {
            let Some(pod) = maps.name(netns).and_then(|n| n.parse::<PodRef>().ok()) else { continue };
            *holders.entry(config.policy).or_default() += 1;
            // A switch a previous agent left on goes off at the pod's first evaluation
            // unless its annotation asks for it (no session survives the agent).
            managed.insert(netns, Managed { pod, config, inputs: 0, trace_annotated: false });
        }
        let sets = RuleSets::adopt(maps.sets()?, &holders);
        let capacity = *maps.capacity();
        tracing::info!(
            pods = managed.len(),
            rule_sets = sets.len(),
            max_pods = capacity.pods,
            max_listeners = capacity.listeners,
            max_rules = capacity.out_ports,
            "adopted kernel state"
        );
        Ok(Self {
            cfg: cfg.clone(),
            maps,
            drops,
            managed,
            sets,
            pod_errors: BTreeMap::new(),
            capacity_errors: BTreeMap::new(),
            drop_log: RateLimit::new(20, Duration::from_secs(10)),
            metrics,
            names,
            cookies: netns::CookieCache::default(),
            procs: None,
            cgroup_root: cfg.cgroup_root.clone(),
            proxy_cgroups: BTreeMap::new(),
            traced: BTreeSet::new(),
        })
    }

    /// Brings the maps in line with `cluster`. Never leaves a pod half-written: a pod whose
    /// new policy cannot be built or does not fit keeps its previous one.
    /// `full`: re-evaluate every pod; otherwise only those whose inputs changed.
    pub fn apply(&mut self, cluster: &Cluster, full: bool) -> SyncReport {
        let mut report = SyncReport::default();
        self.procs = None;
        // One service registry per pass, shared by every pod that needs evaluating, and one
        // evaluation per distinct scope.
        let registry = std::cell::OnceCell::new();
        let scopes = std::cell::OnceCell::new();
        let mut memo: HashMap<ScopeKey, Evaluated> = HashMap::new();
        let inputs = super::inputs::Inputs::of(cluster);
        let mut seen = HashSet::new();
        let mut wants = Vec::new();
        for loaded in cluster.pods.iter().filter(|p| sidecap_policy::knobs::is_meshed(&p.obj)) {
            let pod = &*loaded.obj;
            let pod_ref = PodRef::new(pod.metadata.ns(), &pod.metadata.name);
            let Some(netns_path) = pod.metadata.annotations.get(sidecap_policy::knobs::ANN_NETNS) else {
                continue;
            };
            let path = PathBuf::from(netns_path);
            report.pods += 1;
            let cookie = match self.cookies.cookie(&path) {
                Ok(c) => c,
                Err(e) => {
                    let e = PodError::from(e);
                    if self.note_pod_error(&pod_ref, &e) {
                        tracing::warn!(pod = %pod_ref, error = %e, "pod netns not usable yet");
                    }
                    report.errors += 1;
                    continue;
                }
            };
            seen.insert(cookie);
            let key = inputs.for_pod(pod, loaded.fingerprint());
            // Resolved every pass, not only when the pod changes: a restarted proxy container
            // has a new cgroup (same path or not), and the kernel must follow it.
            let proxy_cgroup = self.proxy_cgroup(&pod_ref, pod);
            if !full
                && self
                    .managed
                    .get(&cookie)
                    .is_some_and(|m| m.inputs == key && m.pod == pod_ref && m.config.proxy_cgroup == proxy_cgroup)
            {
                continue;
            }
            let registry = registry.get_or_init(|| sidecap_policy::registry::build(cluster));
            let scopes = scopes.get_or_init(|| Scopes::new(registry));
            let evaluate = || -> Evaluated {
                let policy = sidecap_policy::evaluate_in(cluster, registry, &pod_ref, &self.cfg.engine)?;
                let rules = sidecap_policy::compile(&policy, 0, 0);
                let hash = rules.rules_hash();
                Ok((Arc::new(rules), hash, policy.sidecar))
            };
            let evaluated = match scopes.key(cluster, &pod_ref) {
                Some(k) => memo.entry(k).or_insert_with(evaluate).clone(),
                None => evaluate(),
            };
            match evaluated {
                Ok((rules, hash, sidecar)) => {
                    let mut config = sidecap_policy::with_ips(&rules.pod, &sidecap_policy::knobs::pod_ips(pod));
                    config.proxy_cgroup = proxy_cgroup;
                    // (A named path that does not resolve was logged with its error above.)
                    let named = pod.metadata.annotations.contains_key(sidecap_policy::knobs::ANN_PROXY_CGROUP);
                    if config.flags & sidecap_common::pod_flags::PROXY_CGROUP != 0 && proxy_cgroup == 0 && !named {
                        self.note_proxy_cgroup(&pod_ref, Err("not known yet".into()));
                    }
                    // Trace: per pod, not per rule set: pods sharing a scope share the set, not the switch.
                    let trace_annotated = match sidecap_policy::knobs::trace(pod) {
                        Ok(on) => on,
                        Err(e) => {
                            tracing::warn!(pod = %pod_ref, error = %e, "trace annotation ignored");
                            false
                        }
                    };
                    if trace_annotated || self.traced.contains(&pod_ref.to_string()) {
                        config.flags |= pod_flags::TRACE;
                    }
                    if self.sockmap_for(&pod_ref, pod) {
                        config.flags |= pod_flags::SOCKMAP;
                    }
                    wants.push(Want { netns: cookie, pod: pod_ref, path, inputs: key, rules, hash, config, sidecar, trace_annotated });
                }
                Err(e) => {
                    if self.note_pod_error(&pod_ref, &e) {
                        tracing::error!(pod = %pod_ref, error = %e, "policy not applied; previous stays in force");
                    }
                    report.errors += 1;
                }
            }
        }

        let wants = self.update_in_place(wants, &mut report);
        for w in wants {
            let pod = w.pod.clone();
            match self.switch_pod(w, &mut report) {
                Ok(()) => {
                    self.pod_errors.remove(&pod);
                    self.capacity_errors.remove(&pod);
                }
                Err(e) => {
                    if self.note_pod_error(&pod, &e) {
                        tracing::error!(pod = %pod, error = %e, "policy not applied; previous stays in force");
                    }
                    report.errors += 1;
                }
            }
        }
        self.remove_gone(&seen, &mut report);
        self.cookies.retain(&seen);
        let live: HashSet<PodRef> = cluster.meshed_pods().into_iter().collect();
        self.capacity_errors.retain(|p, _| live.contains(p));
        self.pod_errors.retain(|p, _| live.contains(p));
        self.proxy_cgroups.retain(|p, _| live.contains(p));
        self.publish(&report);
        report
    }

    /// Sockmap acceleration for this pod: the node's `--sockmap`, unless the pod's
    /// `sidecap.io/sockmap` says otherwise. Without the node flag the sk_msg program is not
    /// attached, so a pod's "true" cannot turn it on (logged).
    fn sockmap_for(&self, pod_ref: &PodRef, pod: &sidecap_policy::model::Pod) -> bool {
        let annotation = sidecap_policy::knobs::sockmap(pod).unwrap_or_else(|e| {
            tracing::warn!(pod = %pod_ref, error = %e, "sockmap annotation ignored");
            None
        });
        if annotation == Some(true) && !self.cfg.sockmap {
            tracing::warn!(pod = %pod_ref, "sidecap.io/sockmap is true but the agent runs without --sockmap: not accelerated");
        }
        sockmap_wanted(self.cfg.sockmap, annotation)
    }

    /// The proxy container's cgroup id from `sidecap.io/proxy-cgroup` (0: none, or not
    /// found: under cgroup-bound identity nothing is then the proxy, fail closed).
    fn proxy_cgroup(&mut self, pod_ref: &PodRef, pod: &sidecap_policy::model::Pod) -> u64 {
        let Some(path) = pod.metadata.annotations.get(sidecap_policy::knobs::ANN_PROXY_CGROUP) else { return 0 };
        let found = crate::cgroup::id_of(self.cgroup_root.as_deref(), path).map_err(|e| e.to_string());
        self.note_proxy_cgroup(pod_ref, found.clone());
        found.unwrap_or(0)
    }

    /// Logs a pod's proxy-cgroup state when it changes.
    fn note_proxy_cgroup(&mut self, pod_ref: &PodRef, state: Result<u64, String>) {
        if self.proxy_cgroups.get(pod_ref) == Some(&state) {
            return;
        }
        match &state {
            Ok(id) => tracing::info!(pod = %pod_ref, cgroup_id = id, "proxy cgroup found"),
            Err(e) => tracing::warn!(
                pod = %pod_ref,
                "proxy cgroup {e}: under cgroup-bound identity the pod's proxy uid/gid is treated as an app's until it is found"
            ),
        }
        self.proxy_cgroups.insert(pod_ref.clone(), state);
    }

    /// Rule sets whose every pod wants the same new content that differs only in listener
    /// entries (a Service added or removed) are updated in place: the entries that changed,
    /// not every pod's rules. Returns the wants still to be switched.
    fn update_in_place(&mut self, wants: Vec<Want>, report: &mut SyncReport) -> Vec<Want> {
        let mut by_set: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, w) in wants.iter().enumerate() {
            if let Some(m) = self.managed.get(&w.netns).filter(|m| m.pod == w.pod) {
                by_set.entry(m.config.policy).or_default().push(i);
            }
        }
        let mut done = vec![false; wants.len()];
        for (id, idx) in by_set {
            let Some(set) = self.sets.get(id) else { continue };
            let first = &wants[idx[0]];
            let eligible = idx.len() == set.holders
                && set.hash != first.hash
                && self.sets.find(first.hash).is_none()
                && idx.iter().all(|i| wants[*i].hash == first.hash)
                && set.rules.differs_in_listeners_only(&first.rules)
                && idx.iter().all(|i| {
                    let w = &wants[*i];
                    self.managed.get(&w.netns).is_some_and(|m| same_config(&m.config, &PodConfig { policy: id, ..w.config }))
                });
            if !eligible {
                continue;
            }
            let old = set.rules.clone();
            let new = first.rules.clone();
            let added = new.listeners.keys().filter(|k| !old.listeners.contains_key(k)).count();
            let need = EntryCounts { listeners: added, ..EntryCounts::default() };
            if let Some(shortfall) = does_not_fit(need, self.sets.used(), self.maps.capacity()) {
                for i in &idx {
                    let e = PodError::Capacity { shortfall: shortfall.clone(), meanwhile: Meanwhile::PreviousPolicy };
                    self.refuse_for_capacity(&wants[*i].pod, &e, abi::OUT_LISTENERS.name);
                    done[*i] = true;
                    report.errors += 1;
                }
                continue;
            }
            match self.maps.update_set_listeners(id, &old, &new) {
                Ok(changed) => {
                    self.sets.replace(id, first.hash, new);
                    for i in &idx {
                        done[*i] = true;
                        if let Some(m) = self.managed.get_mut(&wants[*i].netns) {
                            m.inputs = wants[*i].inputs;
                            m.trace_annotated = wants[*i].trace_annotated;
                        }
                        self.pod_errors.remove(&wants[*i].pod);
                        self.capacity_errors.remove(&wants[*i].pod);
                    }
                    report.updated_in_place += 1;
                    tracing::info!(policy = id, pods = idx.len(), entries = changed, "rule set updated in place");
                }
                Err(e) => {
                    // Put the set back as it was; the pods keep it.
                    let _ = self.maps.update_set_listeners(id, &new, &old);
                    tracing::error!(policy = id, error = %e, "updating a shared rule set; previous stays in force");
                    report.errors += 1;
                    for i in &idx {
                        done[*i] = true;
                    }
                }
            }
        }
        wants.into_iter().zip(done).filter(|(_, d)| !d).map(|(w, _)| w).collect()
    }

    /// Points the pod at the rule set with its content, writing the set first when the kernel
    /// has none like it. The pod's previous set stays in force on any error.
    fn switch_pod(&mut self, w: Want, report: &mut SyncReport) -> Result<(), PodError> {
        let current = self.managed.get(&w.netns).filter(|m| m.pod == w.pod).map(|m| m.config);
        let (target, written) = match self.sets.find(w.hash) {
            Some(id) => (id, false),
            None => {
                if let Some(shortfall) = does_not_fit(w.rules.entry_counts(), self.sets.used(), self.maps.capacity()) {
                    let pod = w.pod.clone();
                    let meanwhile = if current.is_none() { self.capture_whole(w, report) } else { Meanwhile::PreviousPolicy };
                    let e = PodError::Capacity { shortfall, meanwhile };
                    self.refuse_for_capacity(&pod, &e, "rules");
                    return Err(e);
                }
                let id = self.sets.fresh_id();
                if let Err(e) = self.maps.write_set(id, &w.rules) {
                    self.maps.remove_set(id, &w.rules);
                    return Err(e.into());
                }
                self.sets.insert(id, w.hash, w.rules.clone());
                report.sets_written += 1;
                (id, true)
            }
        };
        let mut config = PodConfig { policy: target, ..w.config };
        if let Some(cur) = current {
            if same_config(&cur, &config) {
                if let Some(m) = self.managed.get_mut(&w.netns) {
                    m.inputs = w.inputs;
                    m.trace_annotated = w.trace_annotated;
                }
                return Ok(());
            }
        }
        if current.is_none() && !self.managed.contains_key(&w.netns) && self.managed.len() >= self.maps.capacity().pods {
            let e = PodError::PodsFull { managed: self.managed.len() };
            self.refuse_for_capacity(&w.pod, &e, abi::PODS.name);
            self.drop_if_unheld(target);
            return Err(e);
        }
        // Generations continue across agent restarts: the kernel remembers the last one.
        let last = current.map(|c| c.generation).or_else(|| self.maps.pod(w.netns).map(|c| c.generation));
        config.generation = last.map(|g| g.wrapping_add(1)).unwrap_or(1);
        let result = self
            .maps
            .set_name(w.netns, &w.pod.to_string())
            .and_then(|()| self.maps.write_pod(w.netns, &config))
            .map_err(PodError::from);
        if let Err(e) = result {
            self.drop_if_unheld(target);
            return Err(e);
        }
        self.sets.hold(target);
        let managed = Managed { pod: w.pod.clone(), config, inputs: w.inputs, trace_annotated: w.trace_annotated };
        if let Some(old) = self.managed.insert(w.netns, managed) {
            self.release(old.config.policy);
        }
        report.written += 1;
        // Inbound capture needs the sk_lookup program linked into the pod's own netns, and an
        // IPv6 pod needs Envoy's inbound passthrough source ::6 on lo, as istio-iptables adds.
        let linked = datapath::attach_pod_netns(&self.cfg.bpffs, w.netns, &w.path)?;
        let v6 = config.ips[..usize::from(config.n_ips)].iter().any(|ip| !sidecap_common::addr::is_v4_mapped(ip));
        if linked && v6 {
            netns::add_inbound_passthrough_v6(&w.path)?;
        }
        // A proxy that listened before this pod was written was never seen by sockops.
        if current.is_none() && config.inbound_port != 0 {
            let proc_root = std::path::Path::new("/proc");
            let procs = match self.procs.take() {
                Some(p) => Ok(p),
                None => datapath::listeners::ProcNetns::scan(proc_root, config.inbound_port),
            };
            let registered = match procs {
                Ok(procs) => {
                    let r =
                        datapath::listeners::register_listeners(&self.cfg.bpffs, &procs, proc_root, w.netns, &w.path, config.inbound_port);
                    self.procs = Some(procs);
                    r
                }
                Err(e) => Err(e),
            };
            match registered {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(pod = %w.pod, port = config.inbound_port, listeners = n, "adopted the proxy's running inbound listener")
                }
                Err(e) => tracing::warn!(pod = %w.pod, error = %e, "inbound capture waits until the proxy listens again"),
            }
        }
        tracing::info!(
            pod = %w.pod,
            netns = w.netns,
            sidecar = w.sidecar.as_deref().unwrap_or("(default)"),
            policy = target,
            shared_by = self.sets.get(target).map(|s| s.holders).unwrap_or(0),
            new_set = written,
            generation = config.generation,
            listeners = w.rules.listener_names.len(),
            "policy applied"
        );
        Ok(())
    }

    /// A pod with no policy yet whose rule set does not fit: rather than leave it open, give
    /// it the set without listener entries and capture every other outbound connection
    /// (`Generation::capture_all`). The pod is still reported (its CNI ADD fails) and is
    /// re-evaluated every pass, so it gets its own rules as soon as they fit.
    fn capture_whole(&mut self, w: Want, report: &mut SyncReport) -> Meanwhile {
        let rules = w.rules.capture_all();
        if does_not_fit(rules.entry_counts(), self.sets.used(), self.maps.capacity()).is_some() {
            return Meanwhile::NotCaptured(None);
        }
        let hash = rules.rules_hash();
        let config = PodConfig { default_action: sidecap_common::action::CAPTURE, ..w.config };
        let pod = w.pod.clone();
        let degraded = Want { rules: Arc::new(rules), hash, config, inputs: 0, ..w };
        match self.switch_pod(degraded, report) {
            Ok(()) => {
                tracing::warn!(pod = %pod, "rule set does not fit: every outbound connection of the pod goes to its proxy until it does");
                Meanwhile::CapturedWhole
            }
            Err(e) => Meanwhile::NotCaptured(Some(Box::new(e))),
        }
    }

    /// A set written for a pod that could not use it after all.
    fn drop_if_unheld(&mut self, id: u32) {
        if self.sets.get(id).is_some_and(|s| s.holders == 0) {
            if let Some(s) = self.sets.take(id) {
                self.maps.remove_set(id, &s.rules);
            }
        }
    }

    fn release(&mut self, id: u32) {
        if let Some(s) = self.sets.release(id) {
            self.maps.remove_set(id, &s.rules);
        }
    }

    fn refuse_for_capacity(&mut self, pod: &PodRef, e: &PodError, map: &str) {
        let new = self.capacity_errors.get(pod).is_none_or(|old| old.to_string() != e.to_string());
        if new {
            self.metrics.capacity_refusals.get_or_create(&MapLabels { map: map.to_string() }).inc();
        }
        self.capacity_errors.insert(pod.clone(), e.clone());
    }

    /// Pods that left the source: stop capturing them. Also those a previous agent wrote.
    fn remove_gone(&mut self, seen: &HashSet<u64>, report: &mut SyncReport) {
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
            match self.maps.remove_pod(netns) {
                Ok(()) => {
                    report.removed += 1;
                    let who = gone.as_ref().map(|m| m.pod.to_string()).unwrap_or_else(|| format!("netns {netns}"));
                    tracing::info!(pod = %who, "pod gone; capture removed");
                }
                Err(e) => {
                    tracing::error!(netns, error = %e, "removing pod");
                    report.errors += 1;
                }
            }
            if let Some(m) = gone {
                self.release(m.config.policy);
            }
        }
    }

    fn publish(&mut self, report: &SyncReport) {
        self.metrics.pods_managed.set(self.managed.len() as i64);
        self.metrics.generations_written.inc_by(report.written as u64);
        self.metrics.pods_removed.inc_by(report.removed as u64);
        self.metrics.rule_sets.set(self.sets.len() as i64);
        let used = self.sets.used();
        let cap = *self.maps.capacity();
        for (map, used, max) in [
            (abi::PODS.name, self.managed.len(), cap.pods),
            (abi::OUT_LISTENERS.name, used.listeners, cap.listeners),
            (abi::OUT_PORTS.name, used.out_ports, cap.out_ports),
            (abi::OUT_CIDRS.name, used.out_cidrs, cap.out_cidrs),
            (abi::IN_PORTS.name, used.in_ports, cap.in_ports),
        ] {
            let l = MapLabels { map: map.to_string() };
            self.metrics.map_entries.get_or_create(&l).set(used as i64);
            self.metrics.map_capacity.get_or_create(&l).set(max as i64);
        }
        if report.errors > 0 {
            self.metrics.sync_errors.get_or_create(&ErrorLabels { kind: "pod".into() }).inc_by(report.errors as u64);
        }
        if let Ok(mut n) = self.names.lock() {
            *n = self.managed.iter().map(|(k, m)| (*k, m.pod.to_string())).collect();
        }
    }

    /// Sets the pods `sidecap trace` watches and turns each managed pod's switch on or off
    /// to match (its annotation keeps it on): one `PODS` update per pod that changes, the
    /// rest of its entry as it is (its generation too: no policy changed).
    pub fn set_traced(&mut self, traced: BTreeSet<String>) {
        self.traced = traced;
        for (netns, m) in self.managed.iter_mut() {
            let on = m.trace_annotated || self.traced.contains(&m.pod.to_string());
            if on == (m.config.flags & pod_flags::TRACE != 0) {
                continue;
            }
            let config = PodConfig { flags: m.config.flags ^ pod_flags::TRACE, ..m.config };
            match self.maps.write_pod(*netns, &config) {
                Ok(()) => {
                    m.config = config;
                    tracing::info!(pod = %m.pod, on, "trace switch");
                }
                Err(e) => tracing::error!(pod = %m.pod, error = %e, "writing the pod's trace switch"),
            }
        }
    }

    /// Each managed pod's rule set (by netns), for naming the listeners of trace records.
    pub fn rule_sets_by_netns(&self) -> BTreeMap<u64, Arc<sidecap_policy::Generation>> {
        self.managed.iter().filter_map(|(n, m)| Some((*n, self.sets.get(m.config.policy)?.rules.clone()))).collect()
    }

    /// True when `pod` (`namespace/name`) has its policy in the kernel.
    pub fn is_managed(&self, pod: &PodRef) -> bool {
        self.managed.values().any(|m| m.pod == *pod)
    }

    /// Whether `pod`'s capture at `netns` is what the agent wrote, read back from the kernel
    /// (not from memory: an entry deleted behind the agent's back is reported).
    pub fn check_capture(&mut self, pod: &PodRef, netns: &std::path::Path) -> Result<(), String> {
        if let Some(e) = self.pod_errors.get(pod) {
            return Err(format!("{pod} not captured: {e}"));
        }
        let cookie = self.cookies.cookie(netns).map_err(|e| format!("{pod}: {e}"))?;
        let managed = self
            .managed
            .get(&cookie)
            .filter(|m| m.pod == *pod)
            .ok_or_else(|| format!("{pod}: the agent has no capture for netns {}", netns.display()))?;
        match self.maps.pod(cookie) {
            Some(c) if same_config(&c, &managed.config) => Ok(()),
            Some(_) => Err(format!("{pod}: map PODS holds another configuration for netns {cookie} than the agent wrote")),
            None => Err(format!("{pod}: map PODS has no entry for netns {cookie}: capture missing")),
        }
    }

    /// The pod's current problem, if any (the reason its policy is not in the kernel).
    pub fn pod_error(&self, pod: &PodRef) -> Option<&PodError> {
        self.pod_errors.get(pod)
    }

    /// Why the pod's own rule set is not in force for lack of map capacity, if it is not.
    pub fn capacity_error(&self, pod: &PodRef) -> Option<&PodError> {
        self.capacity_errors.get(pod).and(self.pod_errors.get(pod))
    }

    /// Why the node is not ready for capture: pods refused because their rules do not fit.
    pub fn capacity_problem(&self) -> Option<String> {
        let (pod, why) = self.capacity_errors.iter().next()?;
        let more = self.capacity_errors.len() - 1;
        Some(if more == 0 { format!("pod {pod}: {why}") } else { format!("pod {pod}: {why} (and {more} more pods)") })
    }

    /// Records a pod's problem; true when it is new (worth logging).
    fn note_pod_error(&mut self, pod: &PodRef, e: &PodError) -> bool {
        self.pod_errors.insert(pod.clone(), e.clone()).is_none_or(|old| old.to_string() != e.to_string())
    }

    /// Deletes rules no pod references (left by a previous agent process).
    pub fn collect_garbage(&mut self) -> Result<usize, datapath::Error> {
        for id in self.sets.unheld() {
            if let Some(s) = self.sets.take(id) {
                self.maps.remove_set(id, &s.rules);
            }
        }
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
            // SAFETY: the ring buffer item is at least size_of::<DropEvent>() (checked above); DropEvent is plain data, read unaligned.
            let ev: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            self.metrics.drop_events.inc();
            if !self.drop_log.allow() {
                continue;
            }
            let pod = self.managed.get(&ev.netns).map(|m| m.pod.to_string()).unwrap_or_else(|| format!("netns {}", ev.netns));
            let ip = Ipv6Addr::from(ev.addr);
            let ip: IpAddr = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            let destination = std::net::SocketAddr::new(ip, ev.port);
            if ev.reason == drop_reason::INBOUND_NO_PROXY {
                tracing::warn!(pod = %pod, destination = %destination, reason = "the proxy has no inbound listener (not up yet, or restarting)", "inbound connection refused");
                continue;
            }
            let why = match ev.reason {
                drop_reason::REGISTRY_ONLY => "REGISTRY_ONLY: no listener",
                drop_reason::LISTENER => "listener rule",
                drop_reason::NO_ROOM => "no room to keep the original destination",
                drop_reason::OUTSIDE_PODS_CGROUP => {
                    "the caller is outside --pods-cgroup: no sockops or getsockopt there to hand the original destination to the proxy"
                }
                _ => "unknown",
            };
            let proto = if ev.proto == 17 { "udp" } else { "tcp" };
            tracing::warn!(pod = %pod, destination = %destination, proto, uid = ev.uid, reason = why, "connect denied");
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

#[cfg(test)]
mod tests {
    use super::sockmap_wanted;

    #[test]
    fn the_annotation_turns_sockmap_off_never_on() {
        assert!(sockmap_wanted(true, None));
        assert!(sockmap_wanted(true, Some(true)));
        assert!(!sockmap_wanted(true, Some(false)));
        assert!(!sockmap_wanted(false, None));
        assert!(!sockmap_wanted(false, Some(true)));
    }
}
