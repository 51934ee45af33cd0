//! The daemon: install the programs, then keep every local meshed pod's maps in step with
//! the configuration source. The previous good policy stays in force on bad input.

mod inputs;
mod order;
mod pod_error;
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

pub use sync::{SyncReport, Syncer};

/// How often every pod is re-evaluated regardless of what changed.
const FULL_RESYNC: Duration = Duration::from_secs(60);

/// What wakes the loop.
enum Event {
    Snapshot(Result<sidecap_policy::Cluster, String>),
    Synced(bool),
    Cni(cni::server::Pending),
}

#[derive(Default)]
struct LoopState {
    last_good: Option<sidecap_policy::Cluster>,
    last_error: Option<String>,
    last_apply: Option<Instant>,
    last_full: Option<Instant>,
    collected: bool,
    /// What the plugin reported, by container id; saved to `cni_state_path` on change.
    cni_pods: cni::state::CniState,
    cni_state_path: Option<PathBuf>,
    cni_waiting: Vec<(cni::Request, mpsc::Sender<cni::Reply>, Instant)>,
}

/// Runs the source on a thread of its own, forwarding snapshots and sync status.
fn spawn_source(mut source: Box<dyn Source>, poll: Duration, tx: mpsc::Sender<Event>) {
    std::thread::Builder::new()
        .name("source".into())
        .spawn(move || {
            let mut synced = false;
            while !STOP.load(Ordering::SeqCst) {
                let snap = source.next(poll);
                // Sync status first: once a snapshot is applied, readiness must not wait for
                // a later event.
                if source.synced() != synced {
                    synced = source.synced();
                    if tx.send(Event::Synced(synced)).is_err() {
                        return;
                    }
                }
                if let Some(snap) = snap {
                    if tx.send(Event::Snapshot(snap)).is_err() {
                        return;
                    }
                }
            }
        })
        .expect("spawning the source thread");
}

/// The snapshot's pods with what the CNI plugin told us: the pod's netns (as the
/// `sidecap.io/netns` annotation) and, when the object has none yet, its IPs; None when the
/// plugin told us nothing. A pod recreated under the same name is the newer container's.
fn with_cni_pods(
    pods: &[sidecap_policy::cluster::Shared<sidecap_policy::model::Pod>],
    cni: &cni::state::CniState,
) -> Option<Vec<sidecap_policy::cluster::Shared<sidecap_policy::model::Pod>>> {
    if cni.is_empty() {
        return None;
    }
    let by_pod = cni.by_pod();
    let mut pods = pods.to_vec();
    for p in &mut pods {
        let key = format!("{}/{}", p.obj.metadata.ns(), p.obj.metadata.name);
        let Some(cni::state::Attachment { netns, ips, .. }) = by_pod.get(key.as_str()) else { continue };
        p.modify(|pod| {
            let pod = std::sync::Arc::make_mut(pod);
            pod.metadata.annotations.insert(sidecap_policy::knobs::ANN_NETNS.to_string(), netns.display().to_string());
            if pod.status.pod_ip.is_none() && pod.status.pod_ips.is_empty() {
                pod.status.pod_ip = ips.first().map(ToString::to_string);
                pod.status.pod_ips = ips.iter().map(|ip| sidecap_policy::model::pod::PodIp { ip: ip.to_string() }).collect();
            }
        });
    }
    Some(pods)
}

/// Replies to plugin calls whose pod is now set up (or can't be).
fn answer_cni(state: &mut LoopState, cluster: &sidecap_policy::Cluster, syncer: &Syncer, wait: Duration) {
    let meshed: std::collections::HashSet<sidecap_policy::PodRef> = cluster.meshed_pods().into_iter().collect();
    state.cni_waiting.retain(|(req, reply, since)| {
        let pod = req.pod();
        // The plugin sends `namespace/name`; a pod the source does not have is not known.
        let known = pod.parse::<sidecap_policy::PodRef>().ok().filter(|r| cluster.pod(r).is_some());
        let answer = if known.as_ref().is_some_and(|r| !meshed.contains(r)) {
            Some(cni::Reply { ok: true, message: format!("{pod} is not meshed; nothing to capture") })
        } else if let Some(e) = known.as_ref().and_then(|r| syncer.capacity_error(r)) {
            // Refused even when captured whole meanwhile: the pod must not start without its rules.
            Some(cni::Reply { ok: false, message: format!("{pod}: {e}") })
        } else if known.as_ref().is_some_and(|r| syncer.is_managed(r)) {
            Some(cni::Reply { ok: true, message: format!("{pod} captured") })
        } else if let Some(e) = known.as_ref().and_then(|r| syncer.pod_error(r)) {
            Some(cni::Reply { ok: false, message: format!("{pod}: {e}") })
        } else if since.elapsed() >= wait {
            Some(cni::Reply { ok: false, message: format!("{pod} not known to the agent's source after {}s", wait.as_secs()) })
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

/// CHECK: the container is the pod's current one, and its capture is in the kernel.
fn check_cni(state: &LoopState, syncer: &mut Syncer, req: &cni::Request) -> Result<String, String> {
    let id = &req.container_id;
    let a = state
        .cni_pods
        .get(id)
        .ok_or_else(|| format!("container {id} ({}) is unknown to the agent: never added, or deleted", req.pod()))?;
    let pod = &a.pod;
    if !req.netns.as_os_str().is_empty() && req.netns != a.netns {
        return Err(format!("{pod}: container {id} was added with netns {}, not {}", a.netns.display(), req.netns.display()));
    }
    if let Some((current, _)) = state.cni_pods.current(pod).filter(|(c, _)| c != id) {
        return Err(format!("{pod} is now container {current}, not {id}"));
    }
    let cluster = state.last_good.as_ref().ok_or_else(|| format!("{pod}: the agent has no configuration yet"))?;
    if !cluster.pods.iter().any(|p| format!("{}/{}", p.obj.metadata.ns(), p.obj.metadata.name) == *pod) {
        return Err(format!("{pod} is not in the agent's source; not captured"));
    }
    if !cluster.meshed_pods().iter().any(|p| p.to_string() == *pod) {
        return Ok(format!("{pod} is not meshed; nothing to capture"));
    }
    let pod_ref: sidecap_policy::PodRef = pod.parse().map_err(|e| format!("{pod}: {e}"))?;
    syncer.check_capture(&pod_ref, &a.netns)?;
    Ok(format!("{pod} captured"))
}

fn send(reply: &mpsc::Sender<cni::Reply>, id: &str, ok: bool, message: String) {
    tracing::info!(container = %id, ok, message = %message, "sidecap-cni answered");
    let _ = reply.send(cni::Reply { ok, message });
}

/// Applies a plugin call to the CNI state; true when the state changed.
fn on_cni_call(state: &mut LoopState, syncer: &mut Syncer, req: cni::Request, reply: mpsc::Sender<cni::Reply>) -> bool {
    use cni::protocol::Command;
    let id = req.container_id.clone();
    let changed = match req.command {
        Command::Add => {
            let before = state.cni_pods.get(&id).cloned();
            state.cni_pods.add(&req);
            // Answered once the pod is set up (answer_cni).
            state.cni_waiting.push((req, reply, Instant::now()));
            state.cni_pods.get(&id) != before.as_ref()
        }
        Command::Del => {
            let removed = state.cni_pods.remove(&id);
            let message = match &removed {
                Some(a) => match state.cni_pods.current(&a.pod) {
                    Some((other, _)) => format!("forgot container {id}; {} stays with container {other}", a.pod),
                    None => format!("forgot container {id} ({})", a.pod),
                },
                // A DEL for a container never added (or deleted already) must succeed too.
                None => format!("container {id} unknown; nothing to forget"),
            };
            send(&reply, &id, true, message);
            removed.is_some()
        }
        Command::Check => {
            match check_cni(state, syncer, &req) {
                Ok(m) => send(&reply, &id, true, m),
                Err(m) => send(&reply, &id, false, m),
            }
            false
        }
        Command::Status => {
            send(&reply, &id, true, "ready".into());
            false
        }
        Command::Gc => {
            let gone = state.cni_pods.collect(&req.network, &req.valid);
            send(&reply, &id, true, format!("forgot {} containers of network {:?}: {gone:?}", gone.len(), req.network));
            !gone.is_empty()
        }
    };
    save_if(state, changed);
    changed
}

fn save_if(state: &LoopState, changed: bool) {
    if let Some(path) = state.cni_state_path.as_ref().filter(|_| changed) {
        if let Err(e) = state.cni_pods.save(path) {
            tracing::error!(error = %e, "saving CNI state; a restarted agent will not know these pods");
        }
    }
}

use crate::{
    admin::{self, Health},
    cni, datapath,
    metrics::{ErrorLabels, KernelCounters, Metrics, PodNames},
    source::{
        Source,
        dir::DirSource,
        kube::{self, KubeOptions, KubeSource},
    },
    trace,
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
    /// Where connect4/6 and sendmsg4/6 are attached.
    pub cgroup: PathBuf,
    /// Where sockops, getsockopt and recvmsg4/6 are attached: `cgroup` or below it.
    pub pods_cgroup: PathBuf,
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
    /// Place the destination-rewriting programs first with mprog where the kernel has it
    /// (false: `--no-mprog`, attach as on kernels without it).
    pub mprog: bool,
    /// How often the programs ahead of sidecap's are looked for.
    pub order_check: Duration,
    /// The host's cgroup2 mount as the agent sees it: where proxy containers' cgroups are
    /// looked for, and what relative `sidecap.io/proxy-cgroup` paths start from.
    pub cgroup_root: Option<PathBuf>,
    /// Trace records per second each `sidecap trace` session, and the agent's log, pass.
    pub trace_rate: u32,
    /// `--sockmap`: accelerate the app↔proxy hop of pods whose `sidecap.io/sockmap` is not
    /// false (docs/kernel-contract.md, "Sockmap").
    pub sockmap: bool,
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
    #[error(transparent)]
    Trace(#[from] trace::logger::Error),
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
    // First, so that a bad kubeconfig fails before anything is attached.
    let source: Box<dyn Source> = match &cfg.source {
        SourceConfig::Dir(dir) => Box::new(DirSource::new(dir)),
        SourceConfig::Kubernetes(opts) => {
            let mut k = KubeSource::connect(opts.clone())?;
            k.observe(metrics.clone(), health.clone());
            Box::new(k)
        }
    };
    let hub = Arc::new(trace::TraceHub::new(cfg.trace_rate));
    if let Some(addr) = cfg.admin_addr {
        let sessions = admin::Trace { hub: hub.clone(), names: names.clone() };
        let local = admin::serve(addr, Arc::new(Mutex::new(registry)), health.clone(), Some(sessions))?;
        tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz, /trace");
    }
    datapath::probe(&cfg.cgroup)?;
    let mprog = cfg.mprog && datapath::probe_mprog(&cfg.cgroup).map_err(datapath::Error::from)?;
    if cfg.sockmap {
        datapath::probe_sockmap()?;
    }
    let at = datapath::Placement { cgroup: cfg.cgroup.clone(), pods_cgroup: cfg.pods_cgroup.clone() };
    let (installed, mut ebpf) = datapath::install(&cfg.bpffs, &at, &cfg.map_sizes, mprog, cfg.sockmap)?;
    // The programs just loaded write their trace records here (pods with the switch on).
    trace::logger::spawn(&mut ebpf, hub.clone(), names.clone())?;
    tracing::info!(
        cgroup = %cfg.cgroup.display(),
        pods_cgroup = %cfg.pods_cgroup.display(),
        bpffs = %cfg.bpffs.display(),
        updated = ?installed.updated,
        attached = ?installed.attached,
        reordered = ?installed.reordered,
        pod_links_updated = installed.pod_links_updated,
        mprog = installed.mprog,
        preorder = installed.preorder,
        sockmap = cfg.sockmap,
        "programs in place"
    );
    if installed.sockmap == Some(false) && !cfg.sockmap {
        tracing::info!("sockmap acceleration off: the sk_msg link was removed; accelerated connections open now keep it until they close");
    }
    if !installed.mprog {
        tracing::info!(
            cgroup = %cfg.cgroup.display(),
            why = if cfg.mprog { "this kernel has no cgroup mprog (Linux < 6.17)" } else { "--no-mprog" },
            "programs appended to the cgroup's lists: sidecap runs before programs of the cgroups above this one only"
        );
    }
    let maps = datapath::Maps::open(&cfg.bpffs)?;
    for netns in &installed.pod_links_removed {
        let pod = maps.name(*netns).unwrap_or_else(|| format!("netns {netns}"));
        tracing::info!(pod = %pod, netns, "pod's netns is gone (pod removed while no agent ran): its pinned sk_lookup link was removed");
    }
    for netns in &installed.pod_links_failed {
        let pod = maps.name(*netns).unwrap_or_else(|| format!("netns {netns}"));
        tracing::warn!(pod = %pod, netns, "pod's sk_lookup link could not be updated; skipped (see above)");
    }
    health.attached.store(true, Ordering::Relaxed);
    // First checked at the loop's first turn, before the first snapshot is applied (so
    // /readyz never answers ready before it), and after the CNI socket is up.
    let mut order = order::OrderWatch::new(&cfg.cgroup, &cfg.bpffs, cfg.order_check);
    let mut syncer = Syncer::new(cfg, maps, metrics.clone(), names)?;
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
    let mut trace_generation = 0;
    if let Some(socket) = &cfg.cni_socket {
        let path = cni::state::CniState::path_for(socket);
        match cni::state::CniState::load(&path) {
            Ok(mut s) => {
                let pruned = s.prune_gone();
                for (id, a) in &pruned {
                    let netns = a.netns.display();
                    tracing::info!(container = %id, pod = %a.pod, %netns, "netns gone while the agent was down; forgotten");
                }
                if !s.is_empty() {
                    tracing::info!(containers = s.len(), path = %path.display(), "CNI state of a previous agent");
                }
                state.cni_pods = s;
                state.cni_state_path = Some(path);
                save_if(&state, !pruned.is_empty());
            }
            Err(e) => {
                tracing::error!(error = %e, "CNI state unreadable; starting without it");
                state.cni_state_path = Some(path);
            }
        }
    }
    while !STOP.load(Ordering::SeqCst) {
        order.tick(&metrics, &health);
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
                tracing::info!(
                    pod = %req.pod(),
                    container = %req.container_id,
                    netns = %req.netns.display(),
                    command = ?req.command,
                    "sidecap-cni call"
                );
                let add = req.command == cni::protocol::Command::Add;
                // An ADD is answered once applied, even when it changed nothing (idempotent).
                fresh = on_cni_call(&mut state, &mut syncer, req, reply) || add;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let due = state.last_apply.is_none_or(|t| t.elapsed() >= cfg.resync_interval);
        if let Some(mut cluster) = if fresh || due { state.last_good.take() } else { None } {
            // The CNI overlay replaces the pods only, for this pass: the rest of the snapshot
            // (tens of thousands of Services and slices on a large cluster) is not copied.
            let source_pods = with_cni_pods(&cluster.pods, &state.cni_pods).map(|p| std::mem::replace(&mut cluster.pods, p));
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
            hub.set_rule_sets(syncer.rule_sets_by_netns());
            if let Some(p) = source_pods {
                cluster.pods = p;
            }
            state.last_good = Some(cluster);
            if fresh || report.changed() {
                crate::memory::release_free();
            }
        } else if !state.cni_waiting.is_empty() {
            // No snapshot yet: time out waiters that waited too long.
            let empty = sidecap_policy::Cluster::default();
            answer_cni(&mut state, &empty, &syncer, cfg.cni_wait);
        }
        syncer.drain_drop_events();
        // `sidecap trace` sessions that came or went: their pods' switches, at once.
        let (generation, traced) = hub.traced();
        if generation != trace_generation {
            syncer.set_traced(traced);
            trace_generation = generation;
            hub.mark_applied(generation);
        }
    }
    tracing::info!("stopping; capture stays in place (pinned)");
    Ok(())
}
