//! Watching that sidecap runs first: at start and then periodically, any program that runs
//! before sidecap's on a hook that rewrites destinations is named in a warning, counted in
//! `sidecap_programs_ahead{hook}`, and makes `/readyz` fail ("program order").

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    admin::Health,
    datapath::{self, order::Ahead},
    metrics::{HookLabels, Metrics},
};

/// Readiness part name.
const PART: &str = "program order";

pub struct OrderWatch {
    cgroup: PathBuf,
    bpffs: PathBuf,
    every: Duration,
    last_check: Option<Instant>,
    last: Vec<Ahead>,
}

impl OrderWatch {
    pub fn new(cgroup: &Path, bpffs: &Path, every: Duration) -> Self {
        Self { cgroup: cgroup.into(), bpffs: bpffs.into(), every, last_check: None, last: Vec::new() }
    }

    /// Checks when due (always on the first call).
    pub fn tick(&mut self, metrics: &Metrics, health: &Health) {
        if self.last_check.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last_check = Some(Instant::now());
        self.check(metrics, health);
    }

    fn check(&mut self, metrics: &Metrics, health: &Health) {
        // Our program ids are read from the pins each time: another agent may have swapped them.
        let ours: Vec<(&'static str, u32, u32)> = datapath::CGROUP_PROGRAMS
            .iter()
            .filter(|(_, pin, _)| datapath::order::ORDERED_HOOKS.contains(pin))
            .filter_map(|(_, pin, attach_type)| {
                let fd = datapath::link::get(&self.bpffs.join("links").join(pin)).ok()?;
                let info = datapath::link::link_info(std::os::fd::AsFd::as_fd(&fd)).ok()?;
                Some((*pin, *attach_type, info.prog_id))
            })
            .collect();
        let report = datapath::order::programs_ahead(&self.cgroup, &ours);
        for hook in datapath::order::ORDERED_HOOKS {
            let n = report.ahead.iter().filter(|a| a.hook == *hook).count();
            metrics.programs_ahead.get_or_create(&HookLabels { hook: hook.to_string() }).set(n as i64);
        }
        for a in report.ahead.iter().filter(|a| !self.last.contains(a)) {
            tracing::warn!(
                program = %a.name,
                id = a.prog_id,
                hook = a.hook,
                cgroup = %a.cgroup.display(),
                "another program runs before sidecap's on this hook: it sees (and may rewrite) \
                 destinations first, so a Service VIP can reach the proxy as a backend address or bypass it"
            );
        }
        if report.ahead.is_empty() && !self.last.is_empty() {
            tracing::info!(cgroups = report.cgroups, "sidecap's programs run first again");
        }
        let why = (!report.ahead.is_empty()).then(|| {
            report
                .ahead
                .iter()
                .map(|a| format!("program {} (id {}) runs before sidecap's {} in cgroup {}", a.name, a.prog_id, a.hook, a.cgroup.display()))
                .collect::<Vec<_>>()
                .join(", ")
        });
        health.set_problem(PART, why);
        self.last = report.ahead;
    }
}
