//! The asynchronous side: one task per kind lists (paged, or from the watch cache), then
//! watches from the list's resourceVersion, and keeps a `Store` of typed objects. It follows
//! the API server: a 404 on an Istio kind rediscovers the served version, a 410 relists, a
//! watch that stays silent past its timeout is renewed. The synchronous side reads the
//! stores; a counter tells it when to, and each kind's `Status` tells readiness and metrics
//! how the kind is doing.

use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api, Client, Resource as _,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, VersionMatch, WatchEvent, WatchParams},
    runtime::{utils::Backoff, watcher::DefaultBackoff},
};

use super::store::{self, Store};
use crate::metrics::{KubeErrorLabels, KubeKindLabels, Metrics};

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
    pub const ALL: [Kind; 7] =
        [Kind::Pod, Kind::Service, Kind::EndpointSlice, Kind::Namespace, Kind::MeshConfig, Kind::Sidecar, Kind::ServiceEntry];

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

impl Kind {
    /// Lists may come from the API server's watch cache (resourceVersion "0", or "not older
    /// than" the last one seen): Pods, Services, EndpointSlices, Namespaces. They are the
    /// bulk, every agent of a cluster reads them, and the watch started from the list's
    /// version brings them up to date. Sidecars, ServiceEntries and the mesh ConfigMap are
    /// few and decide what is captured or dropped: they are read from etcd (quorum), so that
    /// a lagging cache can never bring back an older, wider Sidecar.
    pub fn cached_lists(self) -> bool {
        matches!(self, Kind::Pod | Kind::Service | Kind::EndpointSlice | Kind::Namespace)
    }
}

/// How the kind is doing, for readiness and metrics.
#[derive(Clone, Debug)]
pub struct Status {
    /// The last successful list, event, bookmark or watch ended by the server (or the start).
    pub last_ok: Instant,
    /// The last error since then, as logged.
    pub error: Option<String>,
}

/// One kind's store as the watcher keeps it.
pub struct Slot {
    pub kind: Kind,
    /// None until the resource is known (and while Istio's CRDs are not served).
    store: Mutex<Option<Store>>,
    synced: AtomicBool,
    status: Mutex<Status>,
}

impl Slot {
    /// Runs `f` on the store (None: nothing of this kind is served).
    pub fn with_store<T>(&self, f: impl FnOnce(Option<&Store>) -> T) -> T {
        f(self.store.lock().unwrap_or_else(|p| p.into_inner()).as_ref())
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, Option<Store>> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn ok(&self) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.last_ok = Instant::now();
        s.error = None;
    }

    fn failed(&self, msg: &str) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).error = Some(msg.to_string());
    }
}

/// What both sides share: the stores and a change counter with a condition variable.
pub struct Shared {
    pub slots: Vec<Slot>,
    changes: Mutex<u64>,
    cv: Condvar,
    /// Set once the agent registers its metrics.
    pub metrics: OnceLock<Metrics>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        let now = Instant::now();
        Arc::new(Shared {
            slots: Kind::ALL
                .iter()
                .map(|&kind| Slot {
                    kind,
                    store: Mutex::new(None),
                    synced: AtomicBool::new(false),
                    status: Mutex::new(Status { last_ok: now, error: None }),
                })
                .collect(),
            changes: Mutex::new(0),
            cv: Condvar::new(),
            metrics: OnceLock::new(),
        })
    }

    fn bump(&self) {
        *self.changes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` for the counter to move past `seen`; returns its value.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self.cv.wait_timeout_while(guard, timeout, |g| *g == seen).unwrap_or_else(|p| p.into_inner());
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
    /// The server ends each watch after this long (`timeoutSeconds`); one silent for this
    /// long and a half is given up and renewed.
    pub watch_timeout: Duration,
    /// Objects per page of a quorum list.
    pub page_size: u32,
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

fn backoff(opts: &WatchOptions) -> Box<dyn Backoff + Send> {
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

/// One failed request or watch, as the kind's task sees it.
struct ApiError {
    /// What was being done: "list", "watch", "discovery".
    during: &'static str,
    /// The HTTP status (or a watch ERROR event's code); None: no response (connection).
    code: Option<u16>,
    message: String,
}

impl ApiError {
    fn of(during: &'static str, e: &kube::Error) -> ApiError {
        let code = match e {
            kube::Error::Api(r) => Some(r.code),
            _ => None,
        };
        ApiError { during, code, message: e.to_string() }
    }

    fn text(&self) -> String {
        match self.code {
            Some(c) => format!("{} failed: HTTP {c}: {}", self.during, self.message),
            None => format!("{} failed: {}", self.during, self.message),
        }
    }
}

/// Logs a kind's errors (once per distinct message), counts every one, and logs recovery.
struct Reporter<'a> {
    shared: &'a Shared,
    slot: &'a Slot,
    last: Option<String>,
    since: Option<Instant>,
}

impl Reporter<'_> {
    fn error(&mut self, e: &ApiError) {
        let text = e.text();
        if let Some(m) = self.shared.metrics.get() {
            let code = e.code.map_or_else(|| "none".to_string(), |c| c.to_string());
            m.kube_api_errors.get_or_create(&KubeErrorLabels { kind: self.slot.kind.name().into(), code }).inc();
        }
        if self.last.as_deref() != Some(text.as_str()) {
            let code = e.code.map_or_else(|| "none".to_string(), |c| c.to_string());
            tracing::warn!(kind = self.slot.kind.name(), http_code = %code, error = %e.message, during = e.during,
                "Kubernetes API error; retrying, last policy stays");
            self.last = Some(text.clone());
        }
        self.since.get_or_insert_with(Instant::now);
        self.slot.failed(&text);
    }

    fn ok(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(kind = self.slot.kind.name(), after = ?since.elapsed(), "Kubernetes API reachable again");
        }
        self.last = None;
        self.slot.ok();
    }

    /// One object version typed (or not): logged once per object and reason, counted.
    fn outcome(&self, key: &str, out: &store::Outcome) {
        let kind = self.slot.kind.name();
        if let Some(why) = &out.newly_untyped {
            let field = out.field.as_deref().unwrap_or("-");
            tracing::error!(kind, object = key, field, reason = %why,
                "object does not type; its last typed version stays in force (none: left out, and a Sidecar holds its pods)");
            if let Some(m) = self.shared.metrics.get() {
                m.kube_objects_untyped.get_or_create(&KubeKindLabels { kind: kind.into() }).inc();
            }
        }
        if let Some(why) = &out.newly_invalid {
            tracing::warn!(kind, object = key, validation = %why,
                "object is invalid by Istio's rules (its admission webhook would reject it); applied as istiod applies it");
            if let Some(m) = self.shared.metrics.get() {
                m.kube_objects_invalid.get_or_create(&KubeKindLabels { kind: kind.into() }).inc();
            }
        }
    }
}

/// Where the next list reads from.
#[derive(Clone, Debug, PartialEq)]
enum ListFrom {
    /// The watch cache, any version ("0").
    Any,
    /// The watch cache, not older than this version.
    NotOlderThan(String),
    /// etcd (quorum), paged.
    MostRecent,
}

/// Why a watch loop ended.
enum Next {
    /// Relist (from this).
    Relist(ListFrom),
    /// The version is not served any more: discover again.
    Rediscover,
}

async fn run_kind(client: Client, shared: Arc<Shared>, index: usize, opts: WatchOptions) {
    let slot = &shared.slots[index];
    let kind = slot.kind;
    let mut rep = Reporter { shared: &shared, slot, last: None, since: None };
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
                    rep.ok();
                    if slot.lock_store().is_some() || !slot.synced() {
                        tracing::info!(kind = kind.name(), group = ISTIO_GROUP, "not served; treating as none");
                        *slot.lock_store() = None;
                        slot.synced.store(true, Ordering::SeqCst);
                        shared.bump();
                    }
                    tokio::time::sleep(opts.rediscover_interval).await;
                    continue;
                }
                Err(e) => {
                    rep.error(&ApiError::of("discovery", &e));
                    tokio::time::sleep(retry.next().unwrap_or(Duration::from_secs(30))).await;
                    continue;
                }
            },
        };
        let api: Api<DynamicObject> = match kind {
            Kind::MeshConfig => Api::namespaced_with(client.clone(), &opts.istio_namespace, &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        let url = match kind {
            Kind::MeshConfig => DynamicObject::url_path(&ar, Some(&opts.istio_namespace)),
            _ => DynamicObject::url_path(&ar, None),
        };
        let fields = match kind {
            Kind::Pod => Some(format!("spec.nodeName={}", opts.node_name)),
            Kind::MeshConfig => Some("metadata.name=istio".to_string()),
            _ => None,
        };
        let mut from = if kind.cached_lists() { ListFrom::Any } else { ListFrom::MostRecent };
        // List and watch this version until it stops being served.
        loop {
            let rv = match list(&client, &url, &ar, kind, fields.as_deref(), &from, opts.page_size, slot, &rep).await {
                Ok(rv) => rv,
                Err(e) => {
                    rep.error(&e);
                    if e.code == Some(404) && kind.builtin().is_none() {
                        break;
                    }
                    if e.code == Some(410) {
                        // The cache cannot serve that version any more: read from etcd.
                        from = ListFrom::MostRecent;
                    }
                    tokio::time::sleep(retry.next().unwrap_or(Duration::from_secs(30))).await;
                    continue;
                }
            };
            rep.ok();
            retry.reset();
            // The list's transient JSON is freed between the objects kept: give those pages back.
            // SAFETY: malloc_trim only returns free heap pages to the kernel; no pointer is invalidated.
            unsafe { libc::malloc_trim(0) };
            slot.synced.store(true, Ordering::SeqCst);
            shared.bump();
            match watch(&client, &api, &ar, kind, fields.as_deref(), rv, slot, &mut rep, &mut *retry, &opts, &shared).await {
                Next::Relist(f) => from = if kind.cached_lists() { f } else { ListFrom::MostRecent },
                Next::Rediscover => break,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// Lists every object (paged when from etcd) into a new store that replaces the kind's at the
/// end, so that readers never see a partial list. Returns the list's resourceVersion.
async fn list(
    client: &Client,
    url: &str,
    ar: &ApiResource,
    kind: Kind,
    fields: Option<&str>,
    from: &ListFrom,
    page_size: u32,
    slot: &Slot,
    rep: &Reporter<'_>,
) -> Result<String, ApiError> {
    let mut lp = ListParams { field_selector: fields.map(str::to_string), ..ListParams::default() };
    match from {
        ListFrom::Any => {
            lp.resource_version = Some("0".into());
            lp.version_match = Some(VersionMatch::NotOlderThan);
        }
        ListFrom::NotOlderThan(rv) => {
            lp.resource_version = Some(rv.clone());
            lp.version_match = Some(VersionMatch::NotOlderThan);
        }
        ListFrom::MostRecent => lp.limit = Some(page_size),
    }
    // The previous store (another version's, before a rediscovery) stays readable until this
    // list is complete, and lends each object's last typed version.
    let prev = |key: &str| slot.lock_store().as_ref().and_then(|s| s.objects.get(key).cloned());
    let mut objects = HashMap::new();
    let mut rv;
    loop {
        let req = kube::core::Request::new(url)
            .list(&lp)
            .map_err(|e| ApiError { during: "list", code: None, message: e.to_string() })?;
        let body = client.request_text(req).await.map_err(|e| ApiError::of("list", &e))?;
        let page = super::list::parse(&body, &mut |obj| {
            let key = store::key_of(&obj);
            let (entry, out) = store::entry_of(kind, &ar.api_version, &ar.kind, obj, &prev);
            rep.outcome(&key, &out);
            objects.insert(key, entry);
        })
        .map_err(|e| ApiError { during: "list", code: None, message: format!("decoding the list: {e}") })?;
        drop(body);
        rv = page.resource_version;
        match page.next {
            Some(c) => lp.continue_token = Some(c),
            None => break,
        }
    }
    if rv.is_empty() {
        return Err(ApiError { during: "list", code: None, message: "no metadata.resourceVersion in the list".into() });
    }
    *slot.lock_store() = Some(Store { objects });
    Ok(rv)
}

/// Watches from `rv` until a relist or a rediscovery is needed; renews ended watches.
#[allow(clippy::too_many_arguments)]
async fn watch(
    client: &Client,
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    kind: Kind,
    fields: Option<&str>,
    mut rv: String,
    slot: &Slot,
    rep: &mut Reporter<'_>,
    retry: &mut (dyn Backoff + Send),
    opts: &WatchOptions,
    shared: &Shared,
) -> Next {
    let secs = opts.watch_timeout.as_secs().clamp(1, 290) as u32;
    let wp = WatchParams { field_selector: fields.map(str::to_string), timeout: Some(secs), bookmarks: true, ..WatchParams::default() };
    // A watch with neither event nor bookmark for this long is stuck (the server ends each
    // one at `secs`): given up and renewed.
    let silent = Duration::from_secs(u64::from(secs)) * 3 / 2;
    loop {
        let stream = match api.watch(&wp, &rv).await {
            Ok(s) => s,
            Err(e) => {
                let e = ApiError::of("watch", &e);
                rep.error(&e);
                match e.code {
                    Some(410) => return Next::Relist(ListFrom::NotOlderThan(rv)),
                    Some(404) if kind.builtin().is_none() => return Next::Rediscover,
                    _ => {}
                }
                tokio::time::sleep(retry.next().unwrap_or(Duration::from_secs(30))).await;
                continue;
            }
        };
        // An open watch is not yet a success: a stuck one opens fine and then says nothing.
        retry.reset();
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = match tokio::time::timeout(silent, stream.next()).await {
                Ok(Some(item)) => item,
                // Ended by the server (its timeout): healthy; watch again from where we are.
                Ok(None) => {
                    rep.ok();
                    break;
                }
                Err(_) => {
                    rep.error(&ApiError {
                        during: "watch",
                        code: None,
                        message: format!("no event or bookmark for {silent:?}; watching again"),
                    });
                    break;
                }
            };
            match item {
                Ok(WatchEvent::Added(obj) | WatchEvent::Modified(obj)) => {
                    rep.ok();
                    rv = obj.metadata.resource_version.clone().unwrap_or(rv);
                    let Ok(obj) = serde_json::to_value(obj) else { continue };
                    let key = store::key_of(&obj);
                    let prev = |key: &str| slot.lock_store().as_ref().and_then(|s| s.objects.get(key).cloned());
                    let (entry, out) = store::entry_of(kind, &ar.api_version, &ar.kind, obj, &prev);
                    rep.outcome(&key, &out);
                    if let Some(s) = slot.lock_store().as_mut() {
                        s.objects.insert(key, entry);
                    }
                    shared.bump();
                }
                Ok(WatchEvent::Deleted(obj)) => {
                    rep.ok();
                    rv = obj.metadata.resource_version.clone().unwrap_or(rv);
                    let key = format!("{}/{}", obj.metadata.namespace.as_deref().unwrap_or(""), obj.metadata.name.as_deref().unwrap_or(""));
                    if let Some(s) = slot.lock_store().as_mut() {
                        s.objects.remove(&key);
                    }
                    shared.bump();
                }
                Ok(WatchEvent::Bookmark(bm)) => {
                    rep.ok();
                    rv = bm.metadata.resource_version;
                }
                Ok(WatchEvent::Error(r)) => {
                    rep.error(&ApiError { during: "watch", code: Some(r.code), message: r.message.clone() });
                    match r.code {
                        // Events were compacted away: relist, from the cache if it has them.
                        410 => return Next::Relist(ListFrom::NotOlderThan(rv)),
                        404 if kind.builtin().is_none() => return Next::Rediscover,
                        _ => break,
                    }
                }
                Err(e) => {
                    // kube reports a watch's HTTP error as the stream's first item: a JSON
                    // Status as an API error, anything else (the mux's plain "404 page not
                    // found") as a parse error. For Istio's kinds, ask whether the version is
                    // still served.
                    let mut e = ApiError::of("watch", &e);
                    if e.code.is_none() && kind.builtin().is_none() && !served(client, ar).await {
                        e.code = Some(404);
                    }
                    rep.error(&e);
                    match e.code {
                        Some(410) => return Next::Relist(ListFrom::NotOlderThan(rv)),
                        Some(404) if kind.builtin().is_none() => return Next::Rediscover,
                        _ => {}
                    }
                    tokio::time::sleep(retry.next().unwrap_or(Duration::from_secs(30))).await;
                    break;
                }
            }
        }
    }
}

/// Whether the API server still serves this resource's version (a transport failure says
/// nothing, so it counts as served).
async fn served(client: &Client, ar: &ApiResource) -> bool {
    let gvk = GroupVersionKind::gvk(&ar.group, &ar.version, &ar.kind);
    match kube::discovery::pinned_kind(client, &gvk).await {
        Ok(_) => true,
        Err(kube::Error::Api(r)) => r.code != 404,
        Err(kube::Error::Discovery(_)) => false,
        Err(_) => true,
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
