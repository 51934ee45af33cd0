//! The daemon: install the programs, then keep every local meshed pod's maps in step with
//! the configuration source. The previous good policy stays in force on bad input.

mod sync;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

pub use sync::{Syncer, SyncReport};

use crate::{
    datapath,
    source::{Source, dir::DirSource},
};

/// The agent's configuration, parsed from flags into a pure struct.
#[derive(Debug, Clone)]
pub struct Config {
    pub config_dir: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub engine: sidecap_policy::EngineOptions,
    pub poll_interval: Duration,
    /// Re-apply the last good snapshot this often even without a change (pods whose
    /// netns appeared late, maps edited behind the agent's back).
    pub resync_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Probe(#[from] datapath::ProbeError),
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
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
    datapath::probe(&cfg.cgroup)?;
    let installed = datapath::install(&cfg.bpffs, &cfg.cgroup)?;
    tracing::info!(
        cgroup = %cfg.cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        adopted = ?installed.adopted,
        attached = ?installed.attached,
        "programs in place"
    );
    let mut syncer = Syncer::new(cfg, datapath::Maps::open(&cfg.bpffs)?)?;
    let mut source: Box<dyn Source> = Box::new(DirSource::new(&cfg.config_dir));
    tracing::info!(source = %source.describe(), "watching");
    let mut last_good = None;
    let mut last_error: Option<String> = None;
    let mut last_apply = std::time::Instant::now();
    let mut collected = false;
    while !STOP.load(Ordering::SeqCst) {
        let update = source.next(cfg.poll_interval);
        let fresh = match update {
            Some(Ok(cluster)) => {
                last_error = None;
                last_good = Some(cluster);
                true
            }
            Some(Err(msg)) => {
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
            last_apply = std::time::Instant::now();
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
        syncer.drain_drop_events();
    }
    tracing::info!("stopping; capture stays in place (pinned)");
    Ok(())
}

