//! The daemon: install the programs, then keep every local meshed pod's maps in step with
//! the configuration source. The previous good policy stays in force on bad input.

mod inputs;
mod rulesets;
mod sync;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

pub use sync::{Syncer, SyncReport};

/// How often every pod is re-evaluated regardless of what changed.
const FULL_RESYNC: Duration = Duration::from_secs(60);

/// What wakes the loop.
enum Event {
    Snapshot(Result<sidecap_policy::Cluster, String>),
    Synced(bool),
    Cni(cni::server::Pending),
}

/// netns path and IPs the CNI plugin reported, per `namespace/name`.
type CniPods = std::collections::HashMap<String, (PathBuf, Vec<std::net::IpAddr>)>;

#[derive(Default)]
struct LoopState {
    last_good: Option<sidecap_policy::Cluster>,
    last_error: Option<String>,
    last_apply: Option<Instant>,
    last_full: Option<Instant>,
    collected: bool,
    cni_pods: CniPods,
    cni_waiting: Vec<(cni::Request, mpsc::Sender<cni::Reply>, Instant)>,
}

/// Runs the source on a thread of its own, forwarding snapshots and sync status.
fn spawn_source(mut source: Box<dyn Source>, poll: Duration, tx: mpsc::Sender<Event>) {
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut synced = false;
            while !STOP.load(Ordering::SeqCst) {
                if let Some(snap) = source.next(poll) {
                    if tx.send(Event::Snapshot(snap)).is_err() {
                        return;
                    }
                }
                if source.synced() != synced {
                    synced = source.synced();
                    if tx.send(Event::Synced(synced)).is_err() {
                        return;
                    }
                }
            }
        })
        .expect("spawning the source thread");
}

/// The snapshot with what the CNI plugin told us: the pod's netns (as the
/// `sidecap.io/netns` annotation) and, when the object has none yet, its IPs.
fn with_cni_pods(cluster: &sidecap_policy::Cluster, cni: &CniPods) -> sidecap_policy::Cluster {
    if cni.is_empty() {
        return cluster.clone();
    }
    let mut c = cluster.clone();
    for p in &mut c.pods {
        let key = format!("{}/{}", p.obj.metadata.ns(), p.obj.metadata.name);
        let Some((netns, ips)) = cni.get(&key) else { continue };
        p.obj
            .metadata
            .annotations
            .insert(sidecap_policy::knobs::ANN_NETNS.to_string(), netns.display().to_string());
        if p.obj.status.pod_ip.is_none() && p.obj.status.pod_ips.is_empty() {
            p.obj.status.pod_ip = ips.first().map(ToString::to_string);
            p.obj.status.pod_ips =
                ips.iter().map(|ip| sidecap_policy::model::pod::PodIp { ip: ip.to_string() }).collect();
        }
    }
    c
}

/// Replies to plugin calls whose pod is now set up (or can't be).
fn answer_cni(state: &mut LoopState, cluster: &sidecap_policy::Cluster, syncer: &Syncer, wait: Duration) {
    let meshed: std::collections::HashSet<String> = cluster.meshed_pods().iter().map(ToString::to_string).collect();
    state.cni_waiting.retain(|(req, reply, since)| {
        let pod = req.pod();
        let known = cluster.pods.iter().any(|p| format!("{}/{}", p.obj.metadata.ns(), p.obj.metadata.name) == pod);
        let answer = if known && !meshed.contains(&pod) {
            Some(cni::Reply { ok: true, message: format!("{pod} is not meshed; nothing to capture") })
        } else if known && syncer.is_managed(&pod) {
            Some(cni::Reply { ok: true, message: format!("{pod} captured") })
        } else if let Some(e) = syncer.pod_error(&pod).filter(|_| known) {
            Some(cni::Reply { ok: false, message: format!("{pod}: {e}") })
        } else if since.elapsed() >= wait {
            Some(cni::Reply {
                ok: false,
                message: format!("{pod} not known to the agent's source after {}s", wait.as_secs()),
            })
        } else {
            None
        };
        match answer {
            Some(a) => {
                tracing::info!(pod = %pod, ok = a.ok, message = %a.message, "sidecap-cni answered");
                let _ = reply.send(a);
                false
            }
            None => true,
        }
    });
}

use crate::{
    admin::{self, Health},
    cni,
    datapath,
    metrics::{ErrorLabels, KernelCounters, Metrics, PodNames},
    source::{
        Source,
        dir::DirSource,
        kube::{self, KubeOptions, KubeSource},
    },
};

/// Where the cluster's objects come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A directory of YAML, re-read on change.
    Dir(PathBuf),
    /// The Kubernetes API (watchers; this node's pods only).
    Kubernetes(KubeOptions),
}

/// The agent's configuration, parsed from flags into a pure struct.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub engine: sidecap_policy::EngineOptions,
    pub poll_interval: Duration,
    /// Re-apply the last good snapshot this often even without a change (pods whose
    /// netns appeared late, maps edited behind the agent's back).
    pub resync_interval: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: not at all).
    pub admin_addr: Option<SocketAddr>,
    /// The unix socket `sidecap-cni` calls (None: no CNI plugin in use).
    pub cni_socket: Option<PathBuf>,
    /// How long a plugin call waits for its pod to appear in the source.
    pub cni_wait: Duration,
    /// Sizes of the maps that grow with pods and rules.
    pub map_sizes: datapath::MapSizes,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Probe(#[from] datapath::ProbeError),
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error(transparent)]
    Cni(#[from] cni::server::Error),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Runs until SIGTERM/SIGINT. Capture stays in place after exit (everything is pinned).
pub fn run(cfg: &Config) -> Result<(), Error> {
    install_signal_handlers();
    let health = Arc::new(Health::default());
    health.beat();
    let names: PodNames = Arc::default();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    registry.register_collector(Box::new(KernelCounters { bpffs: cfg.bpffs.clone(), names: names.clone() }));
    if let Some(addr) = cfg.admin_addr {
        let local = admin::serve(addr, Arc::new(Mutex::new(registry)), health.clone())?;
        tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
    }
    // First, so that a bad kubeconfig fails before anything is attached.
    let source: Box<dyn Source> = match &cfg.source {
        SourceConfig::Dir(dir) => Box::new(DirSource::new(dir)),
        SourceConfig::Kubernetes(opts) => Box::new(KubeSource::connect(opts.clone())?),
    };
    datapath::probe(&cfg.cgroup)?;
    let installed = datapath::install(&cfg.bpffs, &cfg.cgroup, &cfg.map_sizes)?;
    tracing::info!(
        cgroup = %cfg.cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        updated = ?installed.updated,
        attached = ?installed.attached,
        pod_links_updated = installed.pod_links_updated,
        "programs in place"
    );
    health.attached.store(true, Ordering::Relaxed);
    let mut syncer = Syncer::new(cfg, datapath::Maps::open(&cfg.bpffs)?, metrics.clone(), names)?;
    tracing::info!(source = %source.describe(), "watching");

    // Everything the loop reacts to arrives on one channel: snapshots from the source's
    // thread, plugin calls from the CNI socket's.
    let (tx, rx) = mpsc::channel::<Event>();
    spawn_source(source, cfg.poll_interval, tx.clone());
    if let Some(path) = &cfg.cni_socket {
        let (cni_tx, cni_rx) = mpsc::channel::<cni::server::Pending>();
        cni::server::serve(path, cni_tx)?;
        let fwd = tx.clone();
        std::thread::spawn(move || {
            for p in cni_rx {
                if fwd.send(Event::Cni(p)).is_err() {
                    break;
                }
            }
        });
        tracing::info!(socket = %path.display(), "accepting sidecap-cni calls");
    }
    drop(tx);

    let mut state = LoopState::default();
    while !STOP.load(Ordering::SeqCst) {
        let event = rx.recv_timeout(cfg.poll_interval.min(Duration::from_millis(200)));
        health.beat();
        let seen_at = Instant::now();
        let mut fresh = false;
        match event {
            Ok(Event::Snapshot(Ok(cluster))) => {
                state.last_error = None;
                state.last_good = Some(cluster);
                fresh = true;
            }
            Ok(Event::Snapshot(Err(msg))) => {
                metrics.sync_errors.get_or_create(&ErrorLabels { kind: "config".into() }).inc();
                if state.last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "configuration rejected; previous policy stays in force");
                    state.last_error = Some(msg);
                }
            }
            Ok(Event::Synced(s)) => health.synced.store(s, Ordering::Relaxed),
            Ok(Event::Cni((req, reply))) => {
                tracing::info!(pod = %req.pod(), netns = %req.netns.display(), command = ?req.command, "sidecap-cni call");
                match req.command {
                    cni::protocol::Command::Add => {
                        state.cni_pods.insert(req.pod(), (req.netns.clone(), req.ips.clone()));
                        state.cni_waiting.push((req, reply, Instant::now()));
                    }
                    cni::protocol::Command::Del => {
                        state.cni_pods.remove(&req.pod());
                        let _ = reply.send(cni::Reply { ok: true, message: "forgotten".into() });
                    }
                }
                fresh = true;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let due = state.last_apply.is_none_or(|t| t.elapsed() >= cfg.resync_interval);
        if let Some(good) = state.last_good.as_ref().filter(|_| fresh || due) {
            let cluster = with_cni_pods(good, &state.cni_pods);
            // Now and then every pod is re-evaluated and re-compared with what is in memory,
            // whatever changed; otherwise only pods whose inputs changed.
            let full = state.last_full.is_none_or(|t| t.elapsed() >= FULL_RESYNC);
            let report = syncer.apply(&cluster, full);
            if full {
                state.last_full = Some(Instant::now());
            }
            state.last_apply = Some(Instant::now());
            if fresh && report.written + report.updated_in_place + report.removed > 0 {
                metrics.convergence_seconds.observe(seen_at.elapsed().as_secs_f64());
            }
            health.applied.store(true, Ordering::Relaxed);
            health.set_problem("map capacity", syncer.capacity_problem());
            if fresh || report.changed() {
                tracing::info!(
                    pods = report.pods,
                    written = report.written,
                    updated_in_place = report.updated_in_place,
                    sets_written = report.sets_written,
                    removed = report.removed,
                    errors = report.errors,
                    "synced"
                );
            }
            // Once the first complete view is applied, whatever a previous agent left
            // and no pod uses any more can go.
            if !state.collected {
                state.collected = true;
                match syncer.collect_garbage() {
                    Ok(n) if n > 0 => tracing::info!(entries = n, "removed state left by a previous run"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
            answer_cni(&mut state, &cluster, &syncer, cfg.cni_wait);
        } else if !state.cni_waiting.is_empty() {
            // No snapshot yet: time out waiters that waited too long.
            let empty = sidecap_policy::Cluster::default();
            answer_cni(&mut state, &empty, &syncer, cfg.cni_wait);
        }
        syncer.drain_drop_events();
    }
    tracing::info!("stopping; capture stays in place (pinned)");
    Ok(())
}

