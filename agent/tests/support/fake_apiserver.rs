//! A local stand-in for the Kubernetes API server, enough for kube-rs clients: list and
//! `?watch=true` over plain HTTP/1.1 on 127.0.0.1 with real resourceVersion semantics
//! (watch from a version replays later events; a version older than the compacted history
//! gets an `ERROR` event with code 410, forcing a relist), paging (`limit`/`continue`),
//! `BOOKMARK` events, discovery of `networking.istio.io` versions (a version that stops being
//! served ends its watches and answers 404, as JSON or as plain text), HTTP 410 on watch
//! start, watches that stall, injected 5xx errors, and stop/restart on the same port. Every
//! request's User-Agent and list parameters are recorded.
//!
//! Everything is bounded: reads time out, watches end at `timeoutSeconds` (capped), and the
//! server's runtime is dropped on stop, closing every connection.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Where a kind lives in the API.
#[derive(Clone, Copy, Debug)]
struct Resource {
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: [Resource; 7] = [
    Resource { group: "", plural: "pods", kind: "Pod", namespaced: true },
    Resource { group: "", plural: "services", kind: "Service", namespaced: true },
    Resource { group: "", plural: "namespaces", kind: "Namespace", namespaced: false },
    Resource { group: "", plural: "configmaps", kind: "ConfigMap", namespaced: true },
    Resource { group: "discovery.k8s.io", plural: "endpointslices", kind: "EndpointSlice", namespaced: true },
    Resource { group: "networking.istio.io", plural: "sidecars", kind: "Sidecar", namespaced: true },
    Resource { group: "networking.istio.io", plural: "serviceentries", kind: "ServiceEntry", namespaced: true },
];

fn resource_of_kind(kind: &str) -> Resource {
    *RESOURCES.iter().find(|r| r.kind == kind).unwrap_or_else(|| panic!("fake API server: unknown kind {kind}"))
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    plural: &'static str,
    kind: &'static str, // ADDED / MODIFIED / DELETED
    object: Value,
}

struct State {
    rv: u64,
    /// plural → (namespace, name) → object
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    /// Served versions of networking.istio.io, newest first.
    istio_versions: Vec<String>,
    /// Answer every request with 503 and end open watches.
    unavailable: bool,
    /// The next N requests get 500.
    fail_next: u32,
    /// Bumped to end every open watch with an ERROR 410 event.
    expire_epoch: u64,
    /// Bumped to end every open watch cleanly (as the API server does at its timeout).
    end_epoch: u64,
    /// "LIST /api/v1/pods", "WATCH /api/v1/pods rv=12", "GET /apis/..."
    requests: Vec<String>,
    bookmark_every: Duration,
    /// User-Agent of every request, in order.
    user_agents: Vec<String>,
    /// Every list: "PATH rv=X match=Y limit=Z continue=C".
    lists: Vec<String>,
    /// The next N watch requests get HTTP 410.
    gone_next: u32,
    /// A 404 for an unserved version is the plain text "404 page not found".
    plain_404: bool,
    /// Watches of these plurals send nothing (no events, no bookmarks) and never end.
    stalled: Vec<String>,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    running: Option<Running>,
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl FakeApiServer {
    pub fn start() -> FakeApiServer {
        let state = State {
            rv: 100,
            objects: BTreeMap::new(),
            history: Vec::new(),
            oldest: 0,
            istio_versions: vec!["v1".into(), "v1beta1".into(), "v1alpha3".into()],
            unavailable: false,
            fail_next: 0,
            expire_epoch: 0,
            end_epoch: 0,
            requests: Vec::new(),
            bookmark_every: Duration::from_millis(200),
            user_agents: Vec::new(),
            lists: Vec::new(),
            gone_next: 0,
            plain_404: false,
            stalled: Vec::new(),
        };
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let mut s = FakeApiServer {
            addr: "127.0.0.1:0".parse().expect("addr"),
            state: Arc::new(Mutex::new(state)),
            changed: Arc::new(tx),
            running: None,
        };
        s.run();
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn run(&mut self) {
        let std_listener = std::net::TcpListener::bind(self.addr).expect("bind 127.0.0.1");
        std_listener.set_nonblocking(true).expect("nonblocking");
        self.addr = std_listener.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let state = self.state.clone();
        let changed = self.changed.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                let accept = async {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else { continue };
                        tokio::spawn(serve(conn, state.clone(), changed.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime cancels every connection task: sockets close.
            rt.shutdown_timeout(Duration::from_millis(500));
        });
        self.running = Some(Running { stop: stop_tx, thread });
    }

    /// Closes the listener and every connection (the API server is gone).
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = r.thread.join();
        }
    }

    /// Listens again on the same port, with the same objects and history.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => {
                    drop(l);
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        }
        self.run();
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.send_modify(|v| *v += 1);
        out
    }

    /// Creates or replaces an object (by kind, namespace, name); returns its resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        self.with(|s| {
            let r = resource_of_kind(object["kind"].as_str().unwrap_or(""));
            s.rv += 1;
            let rv = s.rv;
            let ns = if r.namespaced { object["metadata"]["namespace"].as_str().unwrap_or("default").to_string() } else { String::new() };
            let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
            let meta = &mut object["metadata"];
            meta["resourceVersion"] = json!(rv.to_string());
            if r.namespaced {
                meta["namespace"] = json!(ns);
            }
            if meta.get("uid").is_none() {
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
            }
            if meta.get("creationTimestamp").is_none() {
                meta["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
            }
            let prev = s.objects.entry(r.plural).or_default().insert((ns, name), object.clone());
            let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
            s.history.push(Event { rv, plural: r.plural, kind, object });
            rv
        })
    }

    /// Deletes an object; true if it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.with(|s| {
            let r = resource_of_kind(kind);
            let ns = if r.namespaced { namespace.to_string() } else { String::new() };
            let Some(mut object) = s.objects.entry(r.plural).or_default().remove(&(ns, name.to_string())) else {
                return false;
            };
            s.rv += 1;
            object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let rv = s.rv;
            s.history.push(Event { rv, plural: r.plural, kind: "DELETED", object });
            true
        })
    }

    /// Changes objects without any watch event (as if the events fell out of etcd's window),
    /// then compacts the history and ends every open watch with `ERROR` code 410: only a
    /// relist can see the change.
    pub fn expire_with(&self, apply: Vec<Value>, delete: Vec<(&str, &str, &str)>) {
        self.with(|s| {
            for mut object in apply {
                let r = resource_of_kind(object["kind"].as_str().unwrap_or(""));
                s.rv += 1;
                object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                let ns =
                    if r.namespaced { object["metadata"]["namespace"].as_str().unwrap_or("default").to_string() } else { String::new() };
                let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
                s.objects.entry(r.plural).or_default().insert((ns, name), object);
            }
            for (kind, ns, name) in delete {
                let r = resource_of_kind(kind);
                s.objects.entry(r.plural).or_default().remove(&(ns.to_string(), name.to_string()));
                s.rv += 1;
            }
            s.oldest = s.rv + 1;
            s.history.clear();
            s.expire_epoch += 1;
        });
    }

    /// Ends every open watch without an error; watchers resume from their last version.
    pub fn end_watches(&self) {
        self.with(|s| s.end_epoch += 1);
    }

    pub fn set_unavailable(&self, on: bool) {
        self.with(|s| s.unavailable = on);
    }

    pub fn fail_next(&self, n: u32) {
        self.with(|s| s.fail_next = n);
    }

    pub fn set_istio_versions(&self, versions: &[&str]) {
        self.with(|s| s.istio_versions = versions.iter().map(|v| v.to_string()).collect());
    }

    /// The next `n` watch requests get HTTP 410 Gone (not an ERROR event: the status line).
    pub fn gone_next_watches(&self, n: u32) {
        self.with(|s| s.gone_next = n);
    }

    /// Unserved versions answer 404 with the plain text body a real API server's mux gives.
    pub fn set_plain_404(&self, on: bool) {
        self.with(|s| s.plain_404 = on);
    }

    /// Watches of `plural` send nothing at all until `on` is false again (then they end).
    pub fn stall(&self, plural: &str, on: bool) {
        self.with(|s| {
            s.stalled.retain(|p| p != plural);
            if on {
                s.stalled.push(plural.to_string());
            }
        });
    }

    pub fn user_agents(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).user_agents.clone()
    }

    /// Every list request with its parameters, "PATH rv=X match=Y limit=Z continue=C".
    pub fn lists(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).lists.clone()
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).requests.clone()
    }

    /// How many requests started with `prefix` ("LIST /api/v1/pods").
    pub fn count(&self, prefix: &str) -> usize {
        self.requests().iter().filter(|r| r.starts_with(prefix)).count()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------

struct Request {
    path: String,
    query: BTreeMap<String, String>,
    user_agent: String,
}

async fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let _method = parts.next()?;
    let target = parts.next()?;
    let user_agent = text
        .lines()
        .skip(1)
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("user-agent")).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_default();
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    Some(Request { path: path.to_string(), query, user_agent })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match (b[i], hex) {
            (_, Some(v)) => {
                out.push(v);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (c, None) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond(conn: &mut TcpStream, code: u16, body: &Value) {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

async fn respond_text(conn: &mut TcpStream, code: u16, body: &str) {
    let head = format!(
        "HTTP/1.1 {code} Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// `/api/v1/...` or `/apis/GROUP/VERSION/...` → (group, version, namespace, plural).
fn route(path: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let (group, version, rest) = if let Some(rest) = path.strip_prefix("/api/v1") {
        (String::new(), "v1".to_string(), rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut it = rest.splitn(3, '/');
        let g = it.next()?.to_string();
        let v = it.next()?.to_string();
        let r = it.next().unwrap_or("");
        return route_rest(g, v, r);
    };
    route_rest(group, version, rest.trim_start_matches('/'))
}

fn route_rest(group: String, version: String, rest: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        [] => Some((group, version, None, None)),
        [plural] => Some((group, version, None, Some(plural.to_string()))),
        ["namespaces", ns, plural] => Some((group, version, Some(ns.to_string()), Some(plural.to_string()))),
        _ => None,
    }
}

fn field_matches(object: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once("==").or_else(|| term.split_once('=')).unwrap_or((term, ""));
        let ptr = format!("/{}", k.replace('.', "/"));
        object.pointer(&ptr).and_then(Value::as_str).unwrap_or("") == v
    })
}

fn matches(object: &Value, ns: Option<&String>, selector: Option<&String>) -> bool {
    ns.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns)) && field_matches(object, selector)
}

fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() { version.to_string() } else { format!("{group}/{version}") }
}

async fn serve(mut conn: TcpStream, state: Arc<Mutex<State>>, changed: Arc<tokio::sync::watch::Sender<u64>>) {
    let Some(req) = read_request(&mut conn).await else { return };
    let watch = req.query.get("watch").is_some_and(|v| v == "true" || v == "1");
    let Some((group, version, ns, plural)) = route(&req.path) else {
        return respond(&mut conn, 404, &status(404, "NotFound", "no such path")).await;
    };
    // Bookkeeping and injected failures.
    let early = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let verb = if plural.is_none() {
            "GET"
        } else if watch {
            "WATCH"
        } else {
            "LIST"
        };
        let rv = req.query.get("resourceVersion").cloned().unwrap_or_default();
        s.requests.push(format!("{verb} {} rv={rv}", req.path));
        s.user_agents.push(req.user_agent.clone());
        if verb == "LIST" {
            let q = |k: &str| req.query.get(k).cloned().unwrap_or_default();
            let line = format!("{} rv={rv} match={} limit={} continue={}", req.path, q("resourceVersionMatch"), q("limit"), q("continue"));
            s.lists.push(line);
        }
        if s.unavailable {
            Some((503, status(503, "ServiceUnavailable", "apiserver is shutting down")))
        } else if s.fail_next > 0 {
            s.fail_next -= 1;
            Some((500, status(500, "InternalError", "injected failure")))
        } else if group == "networking.istio.io" && !s.istio_versions.contains(&version) {
            if s.plain_404 {
                Some((404, Value::Null))
            } else {
                Some((404, status(404, "NotFound", "the server could not find the requested resource")))
            }
        } else if watch && s.gone_next > 0 {
            s.gone_next -= 1;
            Some((410, status(410, "Gone", "too old resource version")))
        } else {
            None
        }
    };
    if let Some((code, body)) = early {
        if body.is_null() {
            return respond_text(&mut conn, code, "404 page not found\n").await;
        }
        return respond(&mut conn, code, &body).await;
    }
    let gv = api_version(&group, &version);
    let Some(plural) = plural else {
        // Discovery of one group version.
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group)
            .map(|r| {
                json!({"name": r.plural, "singularName": r.kind.to_ascii_lowercase(), "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "list", "watch"]})
            })
            .collect();
        return respond(
            &mut conn,
            200,
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        )
        .await;
    };
    let Some(res) = RESOURCES.iter().find(|r| r.group == group && r.plural == plural).copied() else {
        return respond(&mut conn, 404, &status(404, "NotFound", "no such resource")).await;
    };
    let selector = req.query.get("fieldSelector");
    if !watch {
        let body = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            // Paging: `continue` is "RV:OFFSET"; every page reports the first page's version.
            let limit: usize = req.query.get("limit").and_then(|v| v.parse().ok()).filter(|&l| l > 0).unwrap_or(usize::MAX);
            let (list_rv, offset) = req
                .query
                .get("continue")
                .and_then(|c| c.split_once(':'))
                .and_then(|(r, o)| Some((r.parse::<u64>().ok()?, o.parse::<usize>().ok()?)))
                .unwrap_or((s.rv, 0));
            let all: Vec<&Value> = s
                .objects
                .get(res.plural)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| matches(o, ns.as_ref(), selector))
                .collect();
            let next = (offset.saturating_add(limit) < all.len()).then(|| format!("{list_rv}:{}", offset + limit));
            let items: Vec<Value> = all
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(|o| {
                    let mut o = o.clone();
                    // A real API server leaves kind/apiVersion out of built-in list items.
                    if let Some(m) = o.as_object_mut().filter(|_| res.group.is_empty() || res.group == "discovery.k8s.io") {
                        m.remove("kind");
                        m.remove("apiVersion");
                    } else {
                        o["apiVersion"] = json!(gv);
                    }
                    o
                })
                .collect();
            let mut meta = json!({"resourceVersion": list_rv.to_string()});
            if let Some(c) = next {
                meta["continue"] = json!(c);
            }
            json!({"kind": format!("{}List", res.kind), "apiVersion": gv, "metadata": meta, "items": items})
        };
        return respond(&mut conn, 200, &body).await;
    }
    // Watch.
    let from: u64 = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(req.query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(60).min(60));
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut rx = changed.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let (epoch, end_epoch, too_old) = {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        (s.expire_epoch, s.end_epoch, from < s.oldest)
    };
    if too_old {
        let ev = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from}"))});
        let _ = send_chunk(&mut conn, &ev).await;
        let _ = conn.write_all(b"0\r\n\r\n").await;
        return;
    }
    let mut at = from;
    loop {
        let stalled = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.stalled.iter().any(|p| p == res.plural)
        };
        if stalled {
            // Headers sent, then nothing, whatever timeoutSeconds said, until released.
            let mut stuck = true;
            while stuck {
                let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
                let s = state.lock().unwrap_or_else(|p| p.into_inner());
                stuck = s.stalled.iter().any(|p| p == res.plural);
            }
            break;
        }
        let (events, end, rv, bookmark_every) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            let events: Vec<Event> = s
                .history
                .iter()
                .filter(|e| e.rv > at && e.plural == res.plural && matches(&e.object, ns.as_ref(), selector))
                .cloned()
                .collect();
            let unserved = res.group == "networking.istio.io" && !s.istio_versions.contains(&version);
            let end = if s.unavailable || s.end_epoch != end_epoch || unserved {
                Some(None)
            } else if s.expire_epoch != epoch {
                Some(Some(status(410, "Expired", "The resourceVersion for the provided watch is too old.")))
            } else {
                None
            };
            (events, end, s.rv, s.bookmark_every)
        };
        for e in events {
            at = e.rv;
            let mut object = e.object;
            object["apiVersion"] = json!(gv);
            object["kind"] = json!(res.kind);
            if send_chunk(&mut conn, &json!({"type": e.kind, "object": object})).await.is_err() {
                return;
            }
        }
        if let Some(end) = end {
            if let Some(st) = end {
                let _ = send_chunk(&mut conn, &json!({"type": "ERROR", "object": st})).await;
            }
            break;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(bookmark_every) => {
                // Sent periodically, as the API server does, also when nothing moved.
                if bookmarks {
                    at = at.max(rv);
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": gv,
                                    "metadata": {"resourceVersion": at.to_string()}}});
                    if send_chunk(&mut conn, &bm).await.is_err() {
                        return;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let _ = conn.shutdown().await;
}

async fn send_chunk(conn: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    conn.write_all(format!("{:x}\r\n", line.len()).as_bytes()).await?;
    conn.write_all(line.as_bytes()).await?;
    conn.write_all(b"\r\n").await?;
    conn.flush().await
}
