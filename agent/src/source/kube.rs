//! The Kubernetes source: one watcher per kind (on a thread of its own running a small tokio
//! runtime) keeps the typed objects of this node's Pods (`spec.nodeName`), Services,
//! EndpointSlices, Namespaces, the `istio` mesh ConfigMap, and Istio's Sidecars and
//! ServiceEntries at the newest version the API server serves. `next` turns the stores into a
//! complete `Cluster` after every watcher has listed once. API errors are logged per kind and
//! HTTP code, counted and retried with backoff; the stores, and so the last snapshot, stay as
//! they were. A kind without a successful list, event, bookmark or server-ended watch for
//! `stale_after` makes the agent unready, naming the kind.
//!
//! An object version that does not type keeps the object's last typed version in force; a
//! Sidecar that never typed holds the pods it could govern at their previous policy.
//!
//! A pod's netns is found from its processes (`netns::netns_of_pod`), unless the object
//! already carries the `sidecap.io/netns` annotation; its proxy container's cgroup from the
//! `istio-proxy` container id in its status (`proxy_cgroup::container_cgroup`), unless it
//! carries `sidecap.io/proxy-cgroup`.

mod list;
pub mod netns;
pub mod proxy_cgroup;
mod store;
mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use sidecap_policy::{
    Cluster,
    cluster::{Loaded, Object},
};

pub use watch::{ISTIO_GROUP, ISTIO_VERSIONS, Kind};
use watch::{Shared, WatchOptions};

use super::Source;
use crate::{
    admin::Health,
    metrics::{KubeKindLabels, Metrics},
};

/// A kept object and, for a running pod, its UID (to find its netns).
type Kept = (Option<String>, Loaded<Object>);

/// What was found on the node for pods, by (pod key, annotation): netns and proxy cgroup
/// paths. A change makes a new snapshot even when no object changed.
type Found = BTreeMap<(String, &'static str), PathBuf>;

/// Sent with every request, so that audit logs name us.
pub const USER_AGENT: &str = concat!("sidecap/", env!("CARGO_PKG_VERSION"));

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
    /// The cgroup2 mount, searched for proxy containers' cgroups (None: not looked for).
    pub cgroup_root: Option<PathBuf>,
    /// Longest retry delay; None: kube's default backoff (0.8 s doubling to 30 s, jittered).
    pub retry_max: Option<Duration>,
    /// How often to look again for Istio's CRDs when the API server serves none.
    pub rediscover_interval: Duration,
    /// Changes closer together than this make one snapshot.
    pub debounce: Duration,
    /// Each watch asks the server to end it after this long (`timeoutSeconds`, at most 290 s),
    /// then it is renewed; one silent (no event, no bookmark) for 1.5 times this is given up.
    pub watch_timeout: Duration,
    /// A kind with no successful list, event, bookmark or watch ended by the server for this
    /// long makes `/readyz` fail, naming the kind. Longer than `watch_timeout`, so that a
    /// quiet but healthy kind never looks stale.
    pub stale_after: Duration,
    /// Lists read from etcd (quorum) come in pages of this many objects.
    pub page_size: u32,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>) -> KubeOptions {
        KubeOptions {
            kubeconfig: None,
            node_name: node_name.into(),
            istio_namespace: "istio-system".into(),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: None,
            retry_max: None,
            rediscover_interval: Duration::from_secs(60),
            debounce: Duration::from_millis(50),
            watch_timeout: Duration::from_secs(240),
            stale_after: Duration::from_secs(300),
            page_size: 500,
        }
    }
}

/// Pods waiting for their netns are looked for this often; known ones are re-checked less often
/// (a recreated sandbox has a new netns).
const PENDING_RESCAN: Duration = Duration::from_secs(1);
const RESCAN: Duration = Duration::from_secs(10);
/// A burst of changes is waited out for at most this long.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

pub struct KubeSource {
    shared: Arc<Shared>,
    opts: KubeOptions,
    server: String,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Change counter of the last delivered snapshot (None: nothing delivered yet).
    delivered: Option<u64>,
    delivered_netns: Found,
    last_scan: Option<Instant>,
    /// Some meshed pod has no netns yet (looked for every `PENDING_RESCAN`).
    pending_netns: bool,
    /// Some pod's netns came from /proc (re-checked every `RESCAN`).
    netns_lookups: bool,
    /// The change counter as last seen (waited past by `next`).
    observed: u64,
    waiting_logged: Option<Instant>,
    /// Where readiness problems go (None: not observed, as in tests of the source alone).
    health: Option<Arc<Health>>,
    /// The stale kinds as last reported (to log changes once).
    stale: Option<String>,
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
                    let kc =
                        kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
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
        let mut config = config;
        config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT)));
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
            watch_timeout: opts.watch_timeout,
            page_size: opts.page_size.max(1),
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
            waiting_logged: None,
            health: None,
            stale: None,
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

    /// Every kept object of every store, in a stable order, with the Sidecars that never typed.
    fn objects(&self) -> (Vec<Kept>, Vec<sidecap_policy::cluster::HeldSidecar>) {
        let mut out = Vec::new();
        let mut held = Vec::new();
        for slot in &self.shared.slots {
            slot.with_store(|store| {
                let Some(store) = store else { return };
                // Stores are hash maps: sort, so that snapshots (and load order) are deterministic.
                let mut keys: Vec<&String> = store.objects.keys().collect();
                keys.sort();
                for key in keys {
                    let e = &store.objects[key];
                    for o in e.typed.iter().flatten() {
                        out.push((e.uid.clone(), o.clone()));
                    }
                }
                if slot.kind == Kind::Sidecar {
                    held = store::held(store);
                }
            });
        }
        (out, held)
    }

    /// Registers for readiness (`health.set_problem("kubernetes source", ..)`) and metrics.
    pub fn observe(&mut self, metrics: Metrics, health: Arc<Health>) {
        let _ = self.shared.metrics.set(metrics);
        self.health = Some(health);
    }

    /// Kinds without a successful list/watch for `stale_after`, as a readiness reason; also
    /// updates each kind's age metric.
    pub fn stale_kinds(&self) -> Option<String> {
        let mut stale = Vec::new();
        for slot in &self.shared.slots {
            let st = slot.status();
            let age = st.last_ok.elapsed();
            if let Some(m) = self.shared.metrics.get() {
                m.kube_last_event_age_seconds
                    .get_or_create(&KubeKindLabels { kind: slot.kind.name().into() })
                    .set(age.as_secs_f64());
            }
            if age > self.opts.stale_after {
                let why = st.error.unwrap_or_else(|| "no response".into());
                stale.push(format!("{}: no successful list or watch for {}s ({why})", slot.kind.name(), age.as_secs()));
            }
        }
        (!stale.is_empty()).then(|| stale.join("; "))
    }

    fn report_stale(&mut self) {
        let stale = self.stale_kinds();
        if stale != self.stale {
            match &stale {
                Some(why) => tracing::error!(threshold = ?self.opts.stale_after, "Kubernetes source stale: {why}"),
                None => tracing::info!("Kubernetes source: every kind is being watched again"),
            }
            self.stale = stale.clone();
        }
        if let Some(h) = &self.health {
            h.set_problem("kubernetes source", stale);
        }
    }

    /// Builds the snapshot; pods without a netns annotation get one from their processes,
    /// and pods without a proxy-cgroup annotation one from their proxy container's id.
    fn build(&mut self) -> (Result<Cluster, String>, Found) {
        let (objects, held) = self.objects();
        let mut pids: Option<HashMap<String, u32>> = None;
        let mut netns_map = BTreeMap::new();
        let mut pending = false;
        let mut loaded = Vec::with_capacity(objects.len());
        for (uid, mut o) in objects {
            // Annotations found for this pod, added in one change (the object is shared).
            let mut found_anns: Vec<(&'static str, PathBuf)> = Vec::new();
            if let (Object::Pod(pod), Some(uid)) = (&o.obj, uid) {
                let ann = sidecap_policy::knobs::ANN_NETNS;
                if !pod.metadata.annotations.contains_key(ann) && sidecap_policy::knobs::is_meshed(pod) {
                    // One scan of /proc per snapshot, and only when some pod needs it.
                    let pids = pids.get_or_insert_with(|| netns::pod_pids(&self.opts.proc_root));
                    let found = pids.get(&uid.to_ascii_lowercase()).map(|pid| netns::netns_path(&self.opts.proc_root, *pid));
                    match found {
                        Some(path) => found_anns.push((ann, path)),
                        None => pending = true,
                    }
                }
                let ann = sidecap_policy::knobs::ANN_PROXY_CGROUP;
                let root = self.opts.cgroup_root.as_deref();
                let wanted = !pod.metadata.annotations.contains_key(ann) && sidecap_policy::knobs::is_meshed(pod);
                if let Some(root) = root.filter(|_| wanted) {
                    // A restarted proxy has a new id in the status, and a new cgroup.
                    match pod.proxy_container_id().and_then(|id| proxy_cgroup::container_cgroup(root, &uid, id)) {
                        Some(path) => found_anns.push((ann, path)),
                        None => pending |= pod.proxy_container_id().is_some(),
                    }
                }
                for (ann, path) in &found_anns {
                    netns_map.insert((pod.metadata.key(), *ann), path.clone());
                }
            }
            if !found_anns.is_empty() {
                o.modify(|obj| {
                    if let Object::Pod(pod) = obj {
                        let pod = Arc::make_mut(pod);
                        for (ann, path) in found_anns {
                            pod.metadata.annotations.insert(ann.to_string(), path.to_string_lossy().into_owned());
                        }
                    }
                });
            }
            loaded.push(o);
        }
        self.last_scan = Some(Instant::now());
        self.pending_netns = pending;
        self.netns_lookups = pending || !netns_map.is_empty();
        let cluster = Cluster::from_objects(loaded).map(|mut c| {
            c.held_sidecars = held;
            c
        });
        (cluster.map_err(|e| e.to_string()), netns_map)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)
}

impl Source for KubeSource {
    fn next(&mut self, timeout: Duration) -> Option<Result<Cluster, String>> {
        self.report_stale();
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
        let rescan_due = (self.pending_netns || self.netns_lookups) && self.last_scan.is_none_or(|t| t.elapsed() >= rescan_every);
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
        let obj: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "3"},
            "spec": {"nodeName": "n", "containers": [{"name": "istio-proxy"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .expect("object");
        let (e, out) = store::entry_of(Kind::Pod, "v1", "Pod", serde_json::to_value(obj).expect("json"), &|_| None);
        assert!(out.newly_untyped.is_none() && e.untyped.is_none(), "{e:?}");
        let Some([Loaded { obj: Object::Pod(p), source, .. }]) = e.typed.as_deref() else { panic!("{e:?}") };
        assert_eq!(p.metadata.key(), "ns/p");
        assert_eq!(p.status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(source.file, PathBuf::from("kubernetes:Pod/ns/p"));
        assert_eq!(e.uid.as_deref(), Some("u"));
    }

    #[test]
    fn an_object_that_stops_typing_keeps_its_last_typed_version() {
        let sidecar = |port: serde_json::Value, rv: &str| -> serde_json::Value {
            serde_json::json!({
                "metadata": {"name": "s", "namespace": "shop", "resourceVersion": rv},
                "spec": {"workloadSelector": {"labels": {"app": "web"}}, "egress": [{"port": {"number": port}, "hosts": ["./*"]}]},
            })
        };
        let (good, out) =
            store::entry_of(Kind::Sidecar, "networking.istio.io/v1", "Sidecar", sidecar(serde_json::json!(80), "1"), &|_| None);
        assert!(out.newly_untyped.is_none());
        let prev = good.clone();
        let lookup = move |_: &str| Some(prev.clone());
        let (bad, out) =
            store::entry_of(Kind::Sidecar, "networking.istio.io/v1", "Sidecar", sidecar(serde_json::json!("abc"), "2"), &lookup);
        let why = out.newly_untyped.expect("reported");
        assert!(why.contains("spec.egress[0].port.number"), "{why}");
        assert_eq!(format!("{:?}", bad.typed), format!("{:?}", good.typed), "the last typed version stays");
        // The same failure again is not reported again.
        let again = bad.clone();
        let (_, out) =
            store::entry_of(Kind::Sidecar, "networking.istio.io/v1", "Sidecar", sidecar(serde_json::json!("abc"), "3"), &move |_| {
                Some(again.clone())
            });
        assert!(out.newly_untyped.is_none());
        // Never typed: nothing kept, the selector is still read (to hold only its pods).
        let (first, _) =
            store::entry_of(Kind::Sidecar, "networking.istio.io/v1", "Sidecar", sidecar(serde_json::json!("abc"), "4"), &|_| None);
        assert!(first.typed.is_none());
        assert_eq!(first.selector.as_ref().and_then(|s| s.get("app")).map(String::as_str), Some("web"));
    }
}
