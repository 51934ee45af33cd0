//! The asynchronous side: one task per kind runs a kube-rs watcher (list, then watch from the
//! list's resourceVersion; relist on 410 Gone; retry with backoff on any error) into a
//! reflector store. The synchronous side reads the stores; a counter tells it when to.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        utils::Backoff,
        watcher::{self, DefaultBackoff},
    },
};

/// The kinds sidecap reads from the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Service,
    EndpointSlice,
    Namespace,
    /// ConfigMap `istio` in the Istio namespace.
    MeshConfig,
    Sidecar,
    ServiceEntry,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Namespace,
        Kind::MeshConfig,
        Kind::Sidecar,
        Kind::ServiceEntry,
    ];

    /// The object's `kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Namespace => "Namespace",
            Kind::MeshConfig => "ConfigMap",
            Kind::Sidecar => "Sidecar",
            Kind::ServiceEntry => "ServiceEntry",
        }
    }

    /// Built-in kinds have one resource; Istio's are discovered (v1, else v1beta1, else v1alpha3).
    fn builtin(self) -> Option<ApiResource> {
        use k8s_openapi::api::{core::v1, discovery::v1 as discovery};
        Some(match self {
            Kind::Pod => ApiResource::erase::<v1::Pod>(&()),
            Kind::Service => ApiResource::erase::<v1::Service>(&()),
            Kind::EndpointSlice => ApiResource::erase::<discovery::EndpointSlice>(&()),
            Kind::Namespace => ApiResource::erase::<v1::Namespace>(&()),
            Kind::MeshConfig => ApiResource::erase::<v1::ConfigMap>(&()),
            Kind::Sidecar | Kind::ServiceEntry => return None,
        })
    }
}

pub const ISTIO_GROUP: &str = "networking.istio.io";
/// Newest first: the first one the API server serves is watched.
pub const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// One kind's store as the watcher keeps it.
pub struct Slot {
    pub kind: Kind,
    /// None until the resource is known (and while Istio's CRDs are not served).
    store: Mutex<Option<(ApiResource, Store<DynamicObject>)>>,
    synced: AtomicBool,
}

impl Slot {
    pub fn store(&self) -> Option<(ApiResource, Store<DynamicObject>)> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_store(&self, s: Option<(ApiResource, Store<DynamicObject>)>) {
        *self.store.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

/// What both sides share: the stores and a change counter with a condition variable.
pub struct Shared {
    pub slots: Vec<Slot>,
    changes: Mutex<u64>,
    cv: Condvar,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            slots: Kind::ALL
                .iter()
                .map(|&kind| Slot { kind, store: Mutex::new(None), synced: AtomicBool::new(false) })
                .collect(),
            changes: Mutex::new(0),
            cv: Condvar::new(),
        })
    }

    fn bump(&self) {
        *self.changes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for the counter to move past `seen`; returns its value.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |g| *g == seen)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Every kind has delivered its initial list.
    pub fn all_synced(&self) -> bool {
        self.slots.iter().all(Slot::synced)
    }

    /// Kinds still waiting for their initial list (for logs).
    pub fn unsynced(&self) -> Vec<&'static str> {
        self.slots.iter().filter(|s| !s.synced()).map(|s| s.kind.name()).collect()
    }
}

/// How the watch tasks behave; see `KubeOptions`.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub node_name: String,
    pub istio_namespace: String,
    pub retry_max: Option<Duration>,
    pub rediscover_interval: Duration,
}

/// Runs every kind's watcher until the future is dropped.
pub async fn run(client: Client, shared: Arc<Shared>, opts: WatchOptions) {
    let tasks: Vec<_> = (0..shared.slots.len())
        .map(|i| tokio::spawn(run_kind(client.clone(), shared.clone(), i, opts.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Exponential backoff from 50 ms up to `max`, for tests and impatient operators.
struct Quick {
    next: Duration,
    max: Duration,
}

impl Iterator for Quick {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

impl Backoff for Quick {
    fn reset(&mut self) {
        self.next = Duration::from_millis(50).min(self.max);
    }
}

fn backoff(opts: &WatchOptions) -> Box<dyn Backoff> {
    match opts.retry_max {
        // client-go's: 0.8 s doubling to 30 s, with jitter.
        None => Box::new(DefaultBackoff::default()),
        Some(max) => {
            let mut b = Quick { next: Duration::ZERO, max };
            b.reset();
            Box::new(b)
        }
    }
}

/// Logs a kind's error once per distinct message, and its recovery.
struct ErrorLog {
    kind: &'static str,
    last: Option<String>,
    since: Option<Instant>,
}

impl ErrorLog {
    fn error(&mut self, msg: String) {
        if self.last.as_deref() != Some(msg.as_str()) {
            tracing::warn!(kind = self.kind, error = %msg, "Kubernetes API error; retrying with backoff, last policy stays");
            self.last = Some(msg);
        }
        self.since.get_or_insert_with(Instant::now);
    }

    fn ok(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(kind = self.kind, after = ?since.elapsed(), "Kubernetes API reachable again");
        }
        self.last = None;
    }
}

async fn run_kind(client: Client, shared: Arc<Shared>, index: usize, opts: WatchOptions) {
    let slot = &shared.slots[index];
    let kind = slot.kind;
    let mut log = ErrorLog { kind: kind.name(), last: None, since: None };
    let mut retry = backoff(&opts);
    loop {
        let ar = match kind.builtin() {
            Some(ar) => ar,
            None => match discover(&client, kind).await {
                Ok(Some(ar)) => {
                    tracing::info!(kind = kind.name(), api_version = %ar.api_version, "watching");
                    ar
                }
                Ok(None) => {
                    // No Istio CRDs: there are none of this kind, which is a complete view.
                    log.ok();
                    if slot.store().is_some() || !slot.synced() {
                        tracing::info!(kind = kind.name(), group = ISTIO_GROUP, "not served; treating as none");
                        slot.set_store(None);
                        slot.synced.store(true, Ordering::SeqCst);
                        shared.bump();
                    }
                    tokio::time::sleep(opts.rediscover_interval).await;
                    continue;
                }
                Err(e) => {
                    log.error(format!("discovering {ISTIO_GROUP}: {e}"));
                    tokio::time::sleep(retry.next().unwrap_or(Duration::from_secs(30))).await;
                    continue;
                }
            },
        };
        retry.reset();
        let api: Api<DynamicObject> = match kind {
            Kind::MeshConfig => Api::namespaced_with(client.clone(), &opts.istio_namespace, &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        let mut cfg = watcher::Config::default();
        match kind {
            Kind::Pod => cfg = cfg.fields(&format!("spec.nodeName={}", opts.node_name)),
            Kind::MeshConfig => cfg = cfg.fields("metadata.name=istio"),
            _ => {}
        }
        let writer = reflector::store::Writer::new(ar.clone());
        // Installed at the first complete list: until then the previous store (another
        // version's, before a rediscovery) stays readable, so there is never a gap.
        let mut pending = Some((ar.clone(), writer.as_reader()));
        let stream = watcher::watcher(api, cfg)
            .modify(|o: &mut DynamicObject| o.metadata.managed_fields = None)
            .backoff(backoff(&opts))
            .reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    log.ok();
                    if let Some(store) = pending.take() {
                        slot.set_store(Some(store));
                    }
                    slot.synced.store(true, Ordering::SeqCst);
                    shared.bump();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    log.ok();
                    shared.bump();
                }
                Err(e) => {
                    let gone = not_found(&e);
                    log.error(e.to_string());
                    if gone && kind.builtin().is_none() {
                        // That version stopped being served (an Istio upgrade): discover again.
                        break;
                    }
                }
            }
        }
    }
}

fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(r))
        | watcher::Error::WatchStartFailed(kube::Error::Api(r)) => r.code == 404,
        _ => false,
    }
}

/// The newest served version of an Istio kind; None when the API server serves none.
pub async fn discover(client: &Client, kind: Kind) -> Result<Option<ApiResource>, kube::Error> {
    for version in ISTIO_VERSIONS {
        let gvk = GroupVersionKind::gvk(ISTIO_GROUP, version, kind.name());
        match kube::discovery::pinned_kind(client, &gvk).await {
            Ok((ar, _caps)) => return Ok(Some(ar)),
            Err(kube::Error::Api(r)) if r.code == 404 => continue,
            Err(kube::Error::Discovery(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
