//! The Kubernetes source: kube-rs watchers (on a thread of their own running a small tokio
//! runtime) keep a reflector store per kind: this node's Pods (`spec.nodeName`), Services,
//! EndpointSlices, Namespaces, the `istio` mesh ConfigMap, and Istio's Sidecars and
//! ServiceEntries at the newest version the API server serves. `next` turns the stores into a
//! complete `Cluster` through the policy crate's own object typing (the same as for files),
//! after every watcher has listed once. API errors are logged per kind and retried with
//! backoff; the stores, and so the last snapshot, stay as they were.
//!
//! A pod's netns is found from its processes (`netns::netns_of_pod`), unless the object
//! already carries the `sidecap.io/netns` annotation.

pub mod netns;
mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use kube::api::{ApiResource, DynamicObject};
use sidecap_policy::{
    Cluster,
    cluster::{Loaded, Object, Source as ObjectSource, load_json},
};

pub use watch::{ISTIO_GROUP, ISTIO_VERSIONS, Kind};
use watch::{Shared, WatchOptions};

use super::Source;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node name is empty (pass --node-name or set NODE_NAME)")]
    NoNodeName,
    #[error("starting the Kubernetes client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {0}")]
    Infer(kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(kube::Error),
}

/// How to reach the API server and what to watch.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// A kubeconfig file; None: `KUBECONFIG`/`~/.kube/config`, else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Only pods scheduled here are read (`spec.nodeName`).
    pub node_name: String,
    /// Where the `istio` mesh ConfigMap lives.
    pub istio_namespace: String,
    /// procfs, scanned for pods' processes to find their netns.
    pub proc_root: PathBuf,
    /// Longest retry delay; None: kube's default backoff (0.8 s doubling to 30 s, jittered).
    pub retry_max: Option<Duration>,
    /// How often to look again for Istio's CRDs when the API server serves none.
    pub rediscover_interval: Duration,
    /// Changes closer together than this make one snapshot.
    pub debounce: Duration,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>) -> KubeOptions {
        KubeOptions {
            kubeconfig: None,
            node_name: node_name.into(),
            istio_namespace: "istio-system".into(),
            proc_root: PathBuf::from("/proc"),
            retry_max: None,
            rediscover_interval: Duration::from_secs(60),
            debounce: Duration::from_millis(50),
        }
    }
}

/// Pods waiting for their netns are looked for this often; known ones are re-checked less often
/// (a recreated sandbox has a new netns).
const PENDING_RESCAN: Duration = Duration::from_secs(1);
const RESCAN: Duration = Duration::from_secs(10);
/// A burst of changes is waited out for at most this long.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

/// An object's resourceVersion and what the policy crate made of it.
type Typed = (String, Vec<Loaded<Object>>);

pub struct KubeSource {
    shared: Arc<Shared>,
    opts: KubeOptions,
    server: String,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Change counter of the last delivered snapshot (None: nothing delivered yet).
    delivered: Option<u64>,
    delivered_netns: BTreeMap<String, PathBuf>,
    last_scan: Option<Instant>,
    /// Some meshed pod has no netns yet (looked for every `PENDING_RESCAN`).
    pending_netns: bool,
    /// Some pod's netns came from /proc (re-checked every `RESCAN`).
    netns_lookups: bool,
    /// The change counter as last seen (waited past by `next`).
    observed: u64,
    cache: HashMap<(Kind, String), Typed>,
    object_errors: BTreeMap<String, String>,
    waiting_logged: Option<Instant>,
}

impl KubeSource {
    /// Connects with `opts.kubeconfig`, or the inferred configuration (kubeconfig from the
    /// environment, else in-cluster). Only configuration errors fail here: an unreachable API
    /// server is retried in the background.
    pub fn connect(opts: KubeOptions) -> Result<KubeSource, Error> {
        let rt = runtime()?;
        let config = rt.block_on(async {
            match &opts.kubeconfig {
                Some(path) => {
                    let kc = kube::config::Kubeconfig::read_from(path)
                        .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
                    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                        .await
                        .map_err(|source| Error::Kubeconfig { path: path.clone(), source })
                }
                None => kube::Config::infer().await.map_err(Error::Infer),
            }
        })?;
        KubeSource::start(rt, config, opts)
    }

    /// With an explicit client configuration (tests point it at a local server).
    pub fn with_config(config: kube::Config, opts: KubeOptions) -> Result<KubeSource, Error> {
        KubeSource::start(runtime()?, config, opts)
    }

    fn start(rt: tokio::runtime::Runtime, config: kube::Config, opts: KubeOptions) -> Result<KubeSource, Error> {
        if opts.node_name.is_empty() {
            return Err(Error::NoNodeName);
        }
        let server = config.cluster_url.to_string();
        let client = {
            let _guard = rt.enter();
            kube::Client::try_from(config).map_err(Error::Client)?
        };
        let shared = Shared::new();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let wopts = WatchOptions {
            node_name: opts.node_name.clone(),
            istio_namespace: opts.istio_namespace.clone(),
            retry_max: opts.retry_max,
            rediscover_interval: opts.rediscover_interval,
        };
        let task_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sidecap-kube".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = watch::run(client, task_shared, wopts) => {}
                        _ = stop_rx.changed() => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(Error::Runtime)?;
        Ok(KubeSource {
            shared,
            opts,
            server,
            stop: Some(stop_tx),
            thread: Some(thread),
            delivered: None,
            delivered_netns: BTreeMap::new(),
            last_scan: None,
            pending_netns: false,
            netns_lookups: false,
            observed: 0,
            cache: HashMap::new(),
            object_errors: BTreeMap::new(),
            waiting_logged: None,
        })
    }

    /// Waits for a burst of changes to end (bounded); returns the counter after it.
    fn debounce(&self, mut count: u64) -> u64 {
        let start = Instant::now();
        while start.elapsed() < DEBOUNCE_MAX {
            let next = self.shared.wait_past(count, self.opts.debounce);
            if next == count {
                break;
            }
            count = next;
        }
        count
    }

    /// Every object of every store, typed by the policy crate (cached per resourceVersion).
    fn objects(&mut self) -> Vec<(Kind, Option<String>, Loaded<Object>)> {
        let mut out = Vec::new();
        let mut live = std::collections::HashSet::new();
        let shared = self.shared.clone();
        for slot in &shared.slots {
            let Some((ar, store)) = slot.store() else { continue };
            // Stores are hash maps: sort, so that snapshots (and load order) are deterministic.
            let mut objs: Vec<(String, Arc<DynamicObject>)> = store
                .state()
                .into_iter()
                .map(|o| {
                    let ns = o.metadata.namespace.as_deref().unwrap_or("");
                    (format!("{ns}/{}", o.metadata.name.as_deref().unwrap_or("")), o)
                })
                .collect();
            objs.sort_by(|a, b| a.0.cmp(&b.0));
            for (key, obj) in objs {
                let rv = obj.metadata.resource_version.clone().unwrap_or_default();
                let uid = obj.metadata.uid.clone();
                let pod_extra = (slot.kind == Kind::Pod).then(|| pod_facts(&obj));
                if matches!(pod_extra, Some(PodFacts { host_network: true, .. })) {
                    // Its processes live in the node's netns: never capture it.
                    continue;
                }
                let ck = (slot.kind, key.clone());
                live.insert(ck.clone());
                let cached = self.cache.get(&ck).filter(|(v, _)| !rv.is_empty() && *v == rv).map(|(_, o)| o.clone());
                let loaded = match cached {
                    Some(o) => o,
                    None => {
                        let (objs, errs) = type_object(&ar, slot.kind, &obj);
                        self.note_object_errors(slot.kind, &key, errs);
                        self.cache.insert(ck, (rv, objs.clone()));
                        objs
                    }
                };
                let uid = uid.filter(|_| matches!(pod_extra, Some(PodFacts { running: true, .. })));
                out.extend(loaded.into_iter().map(|o| (slot.kind, uid.clone(), o)));
            }
        }
        self.cache.retain(|k, _| live.contains(k));
        let live_keys: std::collections::HashSet<String> = live.iter().map(|(k, n)| format!("{} {n}", k.name())).collect();
        self.object_errors.retain(|k, _| live_keys.contains(k));
        out
    }

    /// An object the policy crate cannot type is left out (as istiod skips it); logged once.
    fn note_object_errors(&mut self, kind: Kind, key: &str, errs: Vec<sidecap_policy::LoadError>) {
        let id = format!("{} {key}", kind.name());
        match errs.first() {
            Some(e) => {
                let msg = e.to_string();
                if self.object_errors.get(&id) != Some(&msg) {
                    tracing::error!(kind = kind.name(), object = key, error = %msg, "object ignored");
                    self.object_errors.insert(id, msg);
                }
            }
            None => {
                self.object_errors.remove(&id);
            }
        }
    }

    /// Builds the snapshot; pods without a netns annotation get one from their processes.
    fn build(&mut self) -> (Result<Cluster, String>, BTreeMap<String, PathBuf>) {
        let objects = self.objects();
        let mut pids: Option<HashMap<String, u32>> = None;
        let mut netns_map = BTreeMap::new();
        let mut pending = false;
        let mut loaded = Vec::with_capacity(objects.len());
        for (_, uid, mut o) in objects {
            if let (Object::Pod(pod), Some(uid)) = (&mut o.obj, uid) {
                let ann = sidecap_policy::knobs::ANN_NETNS;
                if !pod.metadata.annotations.contains_key(ann) && sidecap_policy::knobs::is_meshed(pod) {
                    // One scan of /proc per snapshot, and only when some pod needs it.
                    let pids = pids.get_or_insert_with(|| netns::pod_pids(&self.opts.proc_root));
                    let found = pids
                        .get(&uid.to_ascii_lowercase())
                        .map(|pid| netns::netns_path(&self.opts.proc_root, *pid));
                    match found {
                        Some(path) => {
                            netns_map.insert(pod.metadata.key(), path.clone());
                            pod.metadata.annotations.insert(ann.to_string(), path.to_string_lossy().into_owned());
                        }
                        None => pending = true,
                    }
                }
            }
            loaded.push(o);
        }
        self.last_scan = Some(Instant::now());
        self.pending_netns = pending;
        self.netns_lookups = pending || !netns_map.is_empty();
        (Cluster::from_objects(loaded).map_err(|e| e.to_string()), netns_map)
    }
}

struct PodFacts {
    host_network: bool,
    /// Not finished: Succeeded/Failed pods have no processes and no netns to find.
    running: bool,
}

fn pod_facts(obj: &DynamicObject) -> PodFacts {
    let host_network = obj.data.pointer("/spec/hostNetwork").and_then(|v| v.as_bool()).unwrap_or(false);
    let phase = obj.data.pointer("/status/phase").and_then(|v| v.as_str()).unwrap_or("");
    PodFacts { host_network, running: !matches!(phase, "Succeeded" | "Failed") }
}

/// A stored object as JSON (with the apiVersion/kind that list items omit) → typed objects.
fn type_object(ar: &ApiResource, kind: Kind, obj: &DynamicObject) -> (Vec<Loaded<Object>>, Vec<sidecap_policy::LoadError>) {
    let ns = obj.metadata.namespace.as_deref().unwrap_or("");
    let name = obj.metadata.name.as_deref().unwrap_or("");
    let src = ObjectSource {
        file: PathBuf::from(format!("kubernetes:{}/{}{}{name}", kind.name(), ns, if ns.is_empty() { "" } else { "/" })),
        document: 1,
        line: 1,
    };
    let mut value = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => {
            let err = sidecap_policy::LoadError::Shape { file: src.file, document: 1, line: 1, message: e.to_string() };
            return (Vec::new(), vec![err]);
        }
    };
    if let Some(m) = value.as_object_mut() {
        m.insert("apiVersion".into(), ar.api_version.clone().into());
        m.insert("kind".into(), ar.kind.clone().into());
    }
    load_json(&value, &src)
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)
}

impl Source for KubeSource {
    fn next(&mut self, timeout: Duration) -> Option<Result<Cluster, String>> {
        let count = self.shared.wait_past(self.observed, timeout);
        if count != self.observed {
            self.observed = self.debounce(count);
        }
        if !self.shared.all_synced() {
            let log_due = self.waiting_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
            if log_due {
                self.waiting_logged = Some(Instant::now());
                tracing::info!(waiting_for = ?self.shared.unsynced(), "Kubernetes: waiting for the initial lists");
            }
            return None;
        }
        let changed = self.delivered != Some(self.observed);
        let rescan_every = if self.pending_netns { PENDING_RESCAN } else { RESCAN };
        let rescan_due = (self.pending_netns || self.netns_lookups)
            && self.last_scan.is_none_or(|t| t.elapsed() >= rescan_every);
        if !changed && !rescan_due {
            return None;
        }
        let (snapshot, netns_map) = self.build();
        if !changed && netns_map == self.delivered_netns {
            return None;
        }
        self.delivered = Some(self.observed);
        self.delivered_netns = netns_map;
        Some(snapshot)
    }

    fn synced(&self) -> bool {
        self.shared.all_synced()
    }

    fn describe(&self) -> String {
        format!("Kubernetes API {} (node {})", self.server, self.opts.node_name)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_stack_builds_with_rustls() {
        // Building an https client installs rustls' crypto provider: fails loudly if none is
        // compiled in. No connection is made.
        let config = kube::Config::new("https://127.0.0.1:1".parse().expect("uri"));
        let src = KubeSource::with_config(config, KubeOptions::new("node-a")).expect("client");
        assert!(!src.synced());
        assert!(src.describe().contains("https://127.0.0.1:1"), "{}", src.describe());
    }

    #[test]
    fn empty_node_name_is_refused() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("uri"));
        assert!(matches!(KubeSource::with_config(config, KubeOptions::new("")), Err(Error::NoNodeName)));
    }

    #[test]
    fn pod_objects_type_through_the_policy_crate() {
        let ar = ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&());
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "3"},
            "spec": {"nodeName": "n", "hostNetwork": true, "containers": [{"name": "istio-proxy"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .expect("object");
        let (objs, errs) = type_object(&ar, Kind::Pod, &obj);
        assert!(errs.is_empty(), "{errs:?}");
        let [Loaded { obj: Object::Pod(p), source }] = objs.as_slice() else { panic!("{objs:?}") };
        assert_eq!(p.metadata.key(), "ns/p");
        assert_eq!(p.status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(source.file, PathBuf::from("kubernetes:Pod/ns/p"));
        let facts = pod_facts(&obj);
        assert!(facts.host_network && facts.running);
    }
}
