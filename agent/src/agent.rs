//! The daemon: install the programs, then keep every local meshed pod's maps in step with
//! the configuration source. The previous good policy stays in force on bad input.

mod sync;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

pub use sync::{Syncer, SyncReport};

use crate::{
    admin::{self, Health},
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
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
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
    datapath::probe(&cfg.cgroup)?;
    let installed = datapath::install(&cfg.bpffs, &cfg.cgroup)?;
    tracing::info!(
        cgroup = %cfg.cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        adopted = ?installed.adopted,
        attached = ?installed.attached,
        "programs in place"
    );
    health.attached.store(true, Ordering::Relaxed);
    let mut syncer = Syncer::new(cfg, datapath::Maps::open(&cfg.bpffs)?, metrics.clone(), names)?;
    let mut source: Box<dyn Source> = match &cfg.source {
        SourceConfig::Dir(dir) => Box::new(DirSource::new(dir)),
        SourceConfig::Kubernetes(opts) => Box::new(KubeSource::connect(opts.clone())?),
    };
    tracing::info!(source = %source.describe(), "watching");
    let mut last_good = None;
    let mut last_error: Option<String> = None;
    let mut last_apply = std::time::Instant::now();
    let mut collected = false;
    while !STOP.load(Ordering::SeqCst) {
        let update = source.next(cfg.poll_interval);
        health.beat();
        let seen_at = Instant::now();
        let fresh = match update {
            Some(Ok(cluster)) => {
                last_error = None;
                last_good = Some(cluster);
                true
            }
            Some(Err(msg)) => {
                metrics.sync_errors.get_or_create(&ErrorLabels { kind: "config".into() }).inc();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "configuration rejected; previous policy stays in force");
                    last_error = Some(msg);
                }
                false
            }
            None => false,
        };
        let due = last_apply.elapsed() >= cfg.resync_interval;
        if let Some(cluster) = last_good.as_ref().filter(|_| fresh || due) {
            let report = syncer.apply(cluster);
            last_apply = Instant::now();
            if fresh && report.written + report.removed > 0 {
                metrics.convergence_seconds.observe(seen_at.elapsed().as_secs_f64());
            }
            health.applied.store(true, Ordering::Relaxed);
            if fresh || report.changed() {
                tracing::info!(
                    pods = report.pods,
                    written = report.written,
                    removed = report.removed,
                    errors = report.errors,
                    "synced"
                );
            }
            // Once the first complete view is applied, whatever a previous agent left
            // and no pod uses any more can go.
            if !collected {
                collected = true;
                match syncer.collect_garbage() {
                    Ok(n) if n > 0 => tracing::info!(entries = n, "removed state left by a previous run"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
        }
        health.synced.store(source.synced(), Ordering::Relaxed);
        syncer.drain_drop_events();
    }
    tracing::info!("stopping; capture stays in place (pinned)");
    Ok(())
}

