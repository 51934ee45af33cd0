//! Which pods share one evaluation. In Istio's default mesh (no `Sidecar`) every pod of a
//! namespace imports the same services, so evaluating and compiling each pod separately
//! repeats the same ~10,000 listeners per pod. A [`ScopeKey`] fingerprints everything of a
//! pod that [`super::evaluate_in`] reads besides the cluster-wide inputs (registry, mesh
//! config), so pods with equal keys get equal listeners, ingress and capture knobs: only
//! their addresses differ (see `compile::with_ips`).

use std::{
    collections::HashSet,
    fmt::{self, Write as _},
    hash::{DefaultHasher, Hasher},
    net::IpAddr,
};

use crate::cluster::{Cluster, PodRef};
use crate::registry::ServiceView;
use crate::{knobs, select};

/// Fingerprint of a pod's scope; equal keys (within one snapshot) mean equal policies up to
/// the pod's own addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey(pub u64);

/// Built once per snapshot: what makes a pod's own address matter.
pub struct Scopes {
    /// Endpoint addresses of the registry. Listeners depend on the pod's first address only
    /// when it is one of them (a headless service gets no listener for the pod itself).
    endpoint_ips: HashSet<IpAddr>,
}

struct HashWriter(DefaultHasher);

impl fmt::Write for HashWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

impl Scopes {
    pub fn new(registry: &[ServiceView]) -> Scopes {
        let endpoint_ips = registry.iter().flat_map(|s| s.endpoints.iter().map(|(ip, _)| ip.to_canonical())).collect();
        Scopes { endpoint_ips }
    }

    /// The pod's scope key; None when the pod is unknown, its knobs do not parse or an
    /// unreadable Sidecar holds it (it is then evaluated on its own, which reports the error).
    pub fn key(&self, cluster: &Cluster, pod_ref: &PodRef) -> Option<ScopeKey> {
        let pod = cluster.pod(pod_ref)?;
        let knobs = knobs::from_pod(pod, &cluster.mesh).ok()?;
        // A held pod is evaluated on its own, which reports why.
        if select::held(cluster, &pod_ref.namespace, &pod.metadata.labels).is_some() {
            return None;
        }
        let selected = select::select(cluster, &pod_ref.namespace, &pod.metadata.labels);
        let ips = knobs::pod_ips(pod);
        let own = ips.first().map(|ip| ip.to_canonical()).filter(|ip| self.endpoint_ips.contains(ip));
        let families = (ips.iter().any(|ip| ip.to_canonical().is_ipv4()), ips.iter().any(|ip| !ip.to_canonical().is_ipv4()));
        let mut w = HashWriter(DefaultHasher::new());
        // Debug output covers every field, so a field added later is part of the key too.
        let _ = write!(
            w,
            "{}|{}|{:?}|{:?}|{:?}|{:?}|{}",
            pod_ref.namespace,
            selected.config_namespace,
            selected.sidecar.map(|s| &s.obj),
            knobs,
            own,
            families,
            knobs::is_meshed(pod),
        );
        Some(ScopeKey(w.0.finish()))
    }
}
