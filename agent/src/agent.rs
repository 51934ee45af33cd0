//! The daemon: install the programs, then keep every local meshed pod's maps in step with
//! the configuration source. The previous good policy stays in force on bad input.

mod sync;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

pub use sync::{Syncer, SyncReport};

use crate::datapath;

/// The agent's configuration, parsed from flags into a pure struct.
#[derive(Debug, Clone)]
pub struct Config {
    pub config_dir: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub engine: sidecap_policy::EngineOptions,
    pub poll_interval: Duration,
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
    let mut first = true;
    while !STOP.load(Ordering::SeqCst) {
        let report = syncer.sync();
        if first || report.changed() {
            tracing::info!(
                pods = report.pods,
                written = report.written,
                removed = report.removed,
                errors = report.errors,
                "synced"
            );
        }
        if first {
            match syncer.collect_garbage() {
                Ok(n) if n > 0 => tracing::info!(entries = n, "removed rules left by a previous run"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
            }
            first = false;
        }
        syncer.drain_drop_events();
        sleep_unless_stopped(cfg.poll_interval);
    }
    tracing::info!("stopping; capture stays in place (pinned)");
    Ok(())
}

fn sleep_unless_stopped(d: Duration) {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !STOP.load(Ordering::SeqCst) && !left.is_zero() {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}
