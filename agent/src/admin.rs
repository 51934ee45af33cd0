//! The agent's admin endpoint: `/metrics`, `/healthz` (the loop is alive), `/readyz`
//! (programs attached, source synced, its first snapshot applied). Plain HTTP/1.1 on a
//! thread of its own: a scrape never blocks the reconciliation loop.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::registry::Registry;

/// What health and readiness are computed from; the loop updates it.
#[derive(Default, Debug)]
pub struct Health {
    pub attached: AtomicBool,
    pub synced: AtomicBool,
    pub applied: AtomicBool,
    /// Unix millis of the loop's last turn.
    pub heartbeat_ms: AtomicU64,
    /// Standing reasons not to be ready, by the part that reports them ("map capacity",
    /// "program order", "kubernetes source", ...). Each part sets or clears only its own.
    problems: Mutex<BTreeMap<&'static str, String>>,
}

/// The loop is considered stuck after this long without a turn.
const STUCK_AFTER: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Health {
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn alive(&self) -> bool {
        now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)) < STUCK_AFTER.as_millis() as u64
    }

    /// None when ready, else why not.
    fn not_ready(&self) -> Option<String> {
        if !self.attached.load(Ordering::Relaxed) {
            Some("programs not attached yet".into())
        } else if !self.synced.load(Ordering::Relaxed) {
            Some("configuration source not synced yet".into())
        } else if !self.applied.load(Ordering::Relaxed) {
            Some("first snapshot not applied yet".into())
        } else {
            let problems = self.problems.lock().ok()?;
            (!problems.is_empty()).then(|| problems.iter().map(|(part, why)| format!("{part}: {why}")).collect::<Vec<_>>().join("; "))
        }
    }

    /// Sets (Some) or clears (None) the readiness problem reported by `part`.
    pub fn set_problem(&self, part: &'static str, why: Option<String>) {
        if let Ok(mut problems) = self.problems.lock() {
            match why {
                Some(why) => problems.insert(part, why),
                None => problems.remove(part),
            };
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin endpoint on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// `sidecap trace` sessions: the hub they join and the names of the agent's pods.
#[derive(Clone)]
pub struct Trace {
    pub hub: Arc<crate::trace::TraceHub>,
    pub names: crate::metrics::PodNames,
}

/// Serves until the process exits.
pub fn serve(addr: SocketAddr, registry: Arc<Mutex<Registry>>, health: Arc<Health>, trace: Option<Trace>) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, &registry, &health, trace.as_ref());
            }
        })
        .map_err(|source| Error::Bind { addr, source })?;
    Ok(local)
}

fn handle(mut stream: TcpStream, registry: &Mutex<Registry>, health: &Health, trace: Option<&Trace>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.try_clone()?);
    reader.read_line(&mut line)?;
    // Drain the headers (bounded by the read timeout), noting whether the scraper takes
    // OpenMetrics (Prometheus asks for it first); anything else gets the classic text format.
    let mut h = String::new();
    let mut openmetrics = false;
    while reader.read_line(&mut h)? > 2 {
        let lower = h.to_ascii_lowercase();
        if lower.starts_with("accept:") && lower.contains("application/openmetrics-text") {
            openmetrics = true;
        }
        h.clear();
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    // A trace is a long-lived stream: it gets a thread of its own.
    if let (crate::trace::PATH, Some(t)) = (path, trace) {
        crate::trace::session::start(stream, query, t.hub.clone(), t.names.clone());
        return Ok(());
    }
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut out = String::new();
            let reg = registry.lock().map_err(|_| std::io::Error::other("registry poisoned"))?;
            prometheus_client::encoding::text::encode(&mut out, &reg).map_err(std::io::Error::other)?;
            if openmetrics {
                ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", out)
            } else {
                ("200 OK", "text/plain; version=0.0.4; charset=utf-8", crate::metrics::to_text_format(&out))
            }
        }
        "/healthz" if health.alive() => ("200 OK", "text/plain", "ok\n".to_string()),
        "/healthz" => ("503 Service Unavailable", "text/plain", "reconciliation loop stuck\n".to_string()),
        "/readyz" => match health.not_ready() {
            None => ("200 OK", "text/plain", "ready\n".to_string()),
            Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        _ => ("404 Not Found", "text/plain", "try /metrics, /healthz, /readyz, /trace?pod=NS/NAME\n".to_string()),
    };
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}
