//! aya-log's reader: the programs' records (the `AYA_LOGS` ring buffer of the object this
//! agent loaded) go to a `log::Log` of ours, which names the pod, forwards the record into
//! `tracing` (target `sidecap::trace`, rate-limited) and to the sessions watching the pod.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{TraceHub, hub::TokenBucket, record::Record};
use crate::metrics::PodNames;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the eBPF object's trace records (aya-log map AYA_LOGS): {0}")]
    Init(#[from] aya_log::Error),
    #[error("starting the trace reader thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Receives aya-log's records.
struct Forward {
    hub: Arc<TraceHub>,
    names: PodNames,
    log_rate: Mutex<TokenBucket>,
    /// Records not written to the agent's log (rate limit), reported with the next one.
    unlogged: AtomicU64,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl log::Log for Forward {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.target().starts_with("sidecap")
    }

    fn log(&self, rec: &log::Record<'_>) {
        let text = rec.args().to_string();
        let parsed = match Record::parse(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(target: "sidecap::trace", error = %e, "unreadable kernel trace record");
                return;
            }
        };
        let pod = self
            .names
            .lock()
            .ok()
            .and_then(|n| n.get(&parsed.netns).cloned())
            .unwrap_or_else(|| format!("netns {}", parsed.netns));
        let mut json = parsed.to_json(&pod, unix_ms());
        if let Some(name) = parsed.get("listener").and_then(|v| v.as_u64()).and_then(|id| self.hub.listener_name(parsed.netns, id as u32)) {
            json["listener_name"] = serde_json::Value::from(name);
        }
        self.hub.dispatch(&pod, &json);
        let allowed = self.log_rate.lock().map(|mut b| b.take()).unwrap_or(false);
        if allowed {
            let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::info!(target: "sidecap::trace", pod = %pod, hook = %parsed.hook, unlogged, record = %super::record::render_text(&json), "trace record");
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// Takes the object's `AYA_LOGS` and reads it on a thread of its own until the process
/// exits (the programs this agent loaded are the only writers).
pub fn spawn(ebpf: &mut aya::Ebpf, hub: Arc<TraceHub>, names: PodNames) -> Result<(), Error> {
    let forward = Forward { log_rate: Mutex::new(TokenBucket::new(hub.rate())), hub, names, unlogged: AtomicU64::new(0) };
    let mut logger = aya_log::EbpfLogger::init_with_logger(ebpf, forward)?;
    std::thread::Builder::new()
        .name("trace".into())
        .spawn(move || {
            let fd = logger.as_raw_fd();
            loop {
                let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                // SAFETY: p is one valid pollfd for the duration of the call; fd stays open (owned by logger).
                let n = unsafe { libc::poll(&mut p, 1, Duration::from_millis(500).as_millis() as i32) };
                if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %std::io::Error::last_os_error(), "polling the kernel's trace records; trace stops");
                    return;
                }
                // aya-log panics on a record it cannot decode: keep the reader alive.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
                    tracing::error!("an undecodable kernel trace record was skipped");
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok(())
}
