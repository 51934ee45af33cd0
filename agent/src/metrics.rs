//! Prometheus metrics: the agent's own (pods, generations, errors, convergence) and, read
//! from the kernel's per-CPU counters at scrape time, each pod's connection counts.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use sidecap_common::PodCounters;

use crate::datapath;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `config` (a snapshot rejected), `pod` (one pod's policy not applied), `kernel`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    /// The kernel map (`OUT_LISTENERS`, `PODS`, ...), or `rules` when a whole set was refused.
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    /// The cgroup hook (`connect4`, `connect6`, `sendmsg4`, `sendmsg6`).
    pub hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeKindLabels {
    /// The object kind (`Pod`, `Sidecar`, ...; `ConfigMap` is the mesh config).
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeErrorLabels {
    pub kind: String,
    /// The HTTP status or watch ERROR code; `none` when no response came (connection, timeout).
    pub code: String,
}

/// The agent's own metrics.
#[derive(Clone)]
pub struct Metrics {
    pub pods_managed: Gauge,
    pub generations_written: Counter,
    pub pods_removed: Counter,
    pub sync_errors: Family<ErrorLabels, Counter>,
    /// Seconds from a source change being seen to the maps holding it.
    pub convergence_seconds: Histogram,
    pub drop_events: Counter,
    /// Distinct rule sets in the kernel (pods with equal rules share one).
    pub rule_sets: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    /// Pods refused because their rule set did not fit (counted once per pod and reason).
    pub capacity_refusals: Family<MapLabels, Counter>,
    /// Other programs that run before sidecap's on a hook that rewrites destinations.
    pub programs_ahead: Family<HookLabels, Gauge>,
    /// Kubernetes source: failed requests and watch errors, by kind and HTTP code.
    pub kube_api_errors: Family<KubeErrorLabels, Counter>,
    /// Kubernetes source: seconds since the last successful list, event, bookmark or server-ended watch.
    pub kube_last_event_age_seconds: Family<KubeKindLabels, Gauge<f64, AtomicU64>>,
    /// Kubernetes source: object versions that do not type (counted once per object and reason).
    pub kube_objects_untyped: Family<KubeKindLabels, Counter>,
    /// Kubernetes source: objects Istio's validation rejects (counted once per object and reason).
    pub kube_objects_invalid: Family<KubeKindLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            pods_managed: Gauge::default(),
            generations_written: Counter::default(),
            pods_removed: Counter::default(),
            sync_errors: Family::default(),
            convergence_seconds: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            drop_events: Counter::default(),
            rule_sets: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            capacity_refusals: Family::default(),
            programs_ahead: Family::default(),
            kube_api_errors: Family::default(),
            kube_last_event_age_seconds: Family::default(),
            kube_objects_untyped: Family::default(),
            kube_objects_invalid: Family::default(),
        };
        registry.register("sidecap_pods_managed", "Meshed pods whose policy is in the kernel", m.pods_managed.clone());
        registry.register(
            "sidecap_policy_generations_written",
            "Pod policy generations written to the maps",
            m.generations_written.clone(),
        );
        registry.register("sidecap_pods_removed", "Pods whose state was removed", m.pods_removed.clone());
        registry.register("sidecap_sync_errors", "Problems that left the previous policy in force", m.sync_errors.clone());
        registry.register(
            "sidecap_convergence_seconds",
            "Time from a configuration change to the maps updated",
            m.convergence_seconds.clone(),
        );
        registry.register("sidecap_drop_events", "Denied connects reported by the kernel", m.drop_events.clone());
        registry.register(
            "sidecap_rule_sets",
            "Distinct rule sets in the kernel; pods whose compiled rules are equal share one",
            m.rule_sets.clone(),
        );
        registry.register("sidecap_map_entries", "Entries the agent holds in each policy map", m.map_entries.clone());
        registry.register("sidecap_map_capacity", "Maximum entries of each policy map", m.map_capacity.clone());
        registry.register(
            "sidecap_capacity_refusals",
            "Pods refused because their rule set did not fit the maps (their previous policy stays)",
            m.capacity_refusals.clone(),
        );
        registry.register(
            "sidecap_programs_ahead",
            "Other BPF programs that run before sidecap's on a hook that rewrites destinations (they see the Service VIP first)",
            m.programs_ahead.clone(),
        );
        registry.register(
            "sidecap_kube_api_errors",
            "Kubernetes API errors by kind and HTTP code (the last policy stays in force)",
            m.kube_api_errors.clone(),
        );
        registry.register(
            "sidecap_kube_last_event_age_seconds",
            "Seconds since each kind's last successful list, event, bookmark or server-ended watch",
            m.kube_last_event_age_seconds.clone(),
        );
        registry.register(
            "sidecap_kube_objects_untyped",
            "Kubernetes objects that do not type (their last typed version stays in force)",
            m.kube_objects_untyped.clone(),
        );
        registry.register(
            "sidecap_kube_objects_invalid",
            "Kubernetes objects that Istio's validation rejects (applied as istiod applies them)",
            m.kube_objects_invalid.clone(),
        );
        m
    }
}

/// netns cookie → "namespace/name", kept by the agent for labels.
pub type PodNames = Arc<Mutex<BTreeMap<u64, String>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodOnly {
    namespace: String,
    pod: String,
}

fn sockmap_msgs(c: &PodCounters) -> u64 {
    c.sockmap_msgs
}
fn sockmap_bytes(c: &PodCounters) -> u64 {
    c.sockmap_bytes
}
fn sockmap_fallbacks(c: &PodCounters) -> u64 {
    c.sockmap_fallbacks
}

/// Reads `COUNTERS` from the pinned maps on every scrape.
#[derive(Debug)]
pub struct KernelCounters {
    pub bpffs: PathBuf,
    pub names: PodNames,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(states) = datapath::Maps::open(&self.bpffs).and_then(|m| m.states()) else {
            return Ok(());
        };
        let names = self.names.lock().map(|n| n.clone()).unwrap_or_default();
        let mut family = encoder.encode_descriptor(
            "sidecap_pod_connections",
            "Connections per pod and decision, counted in the kernel",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let split = |netns: u64| {
            let who = names.get(&netns).cloned().unwrap_or_else(|| format!("unknown/netns-{netns}"));
            who.split_once('/').map(|(a, b)| (a.to_string(), b.to_string())).unwrap_or_default()
        };
        for st in &states {
            let (namespace, pod) = split(st.netns);
            let c = st.counters;
            for (action, v) in [
                ("captured", c.captured),
                ("passthrough", c.passthrough),
                ("dropped", c.dropped),
                ("inbound_captured", c.inbound_captured),
                ("dns", c.dns),
            ] {
                let labels = PodLabels { namespace: namespace.clone(), pod: pod.clone(), action };
                ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
        // Sockmap (`--sockmap`): only pods that have used it, so a node without it exports nothing.
        let used: Vec<_> = states.iter().filter(|s| s.counters.sockmap_msgs != 0 || s.counters.sockmap_fallbacks != 0).collect();
        for (name, help, get) in [
            (
                "sidecap_pod_sockmap_messages",
                "Messages the sockmap program handed straight to the peer socket",
                sockmap_msgs as fn(&PodCounters) -> u64,
            ),
            ("sidecap_pod_sockmap_bytes", "Bytes the sockmap program handed straight to the peer socket", sockmap_bytes),
            ("sidecap_pod_sockmap_fallbacks", "Accelerated sockets whose messages fell back to the TCP path", sockmap_fallbacks),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for st in &used {
                let (namespace, pod) = split(st.netns);
                ConstCounter::new(get(&st.counters)).encode(family.encode_family(&PodOnly { namespace, pod })?)?;
            }
        }
        Ok(())
    }
}

/// The classic Prometheus text format (0.0.4) of what prometheus-client encodes as
/// OpenMetrics, for scrapers and tools that do not take OpenMetrics (`promtool check
/// metrics`): a counter family is named after its `_total` samples, and there is no `# EOF`.
/// The registry has no units, exemplars or `_created` samples, which that format lacks.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{prefix}{name}{total} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counter_families_after_their_samples() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.drop_events.inc();
        m.pods_managed.set(2);
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &registry).unwrap();
        let text = to_text_format(&om);
        assert!(om.contains("# TYPE sidecap_drop_events counter\n"), "{om}");
        assert!(text.contains("# HELP sidecap_drop_events_total Denied connects reported by the kernel.\n"), "{text}");
        assert!(text.contains("# TYPE sidecap_drop_events_total counter\nsidecap_drop_events_total 1\n"), "{text}");
        assert!(text.contains("# TYPE sidecap_pods_managed gauge\nsidecap_pods_managed 2\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
