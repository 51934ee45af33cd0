//! Which pods share one evaluation. In Istio's default mesh (no `Sidecar`) every pod of a
//! namespace imports the same services, so evaluating and compiling each pod separately
//! repeats the same ~10,000 listeners per pod. A [`ScopeKey`] fingerprints everything of a
//! pod that [`super::evaluate_in`] reads besides the cluster-wide inputs (registry, mesh
//! config), so pods with equal keys get equal listeners, ingress and capture knobs: only
//! their addresses differ (see `compile::with_ips`).

use std::{
    collections::{HashMap, HashSet},
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

/// Built once per snapshot: what makes a pod's own address, or its namespace, matter.
pub struct Scopes {
    /// Endpoint addresses of the registry. Listeners depend on the pod's first address only
    /// when it is one of them (a headless service gets no listener for the pod itself).
    endpoint_ips: HashSet<IpAddr>,
    /// Namespaces that see the registry differently from the rest: named by a service's
    /// `exportTo`, owning a service exported to `.` only, or owning a hostname that another
    /// namespace also has (the config namespace's copy wins, `UnifiedSidecarScoping`).
    special: HashSet<String>,
    /// Owners of services without `exportTo`, whose visibility is the mesh default's.
    defaulted_owners: HashSet<String>,
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
        let mut special = HashSet::new();
        let mut defaulted_owners = HashSet::new();
        let mut owners: HashMap<&str, HashSet<&str>> = HashMap::new();
        for s in registry {
            owners.entry(s.hostname.as_str()).or_default().insert(s.namespace.as_str());
            if s.export_to.is_empty() {
                defaulted_owners.insert(s.namespace.clone());
            } else {
                special.extend(export_audience(&s.export_to, &s.namespace));
            }
        }
        special.extend(owners.into_values().filter(|o| o.len() > 1).flatten().map(str::to_string));
        Scopes { endpoint_ips, special, defaulted_owners }
    }

    /// True when pods of `ns` that no Sidecar selects see exactly what those of any other such
    /// namespace see: the default scope imports `*/*`, so only visibility and hostname
    /// precedence could tell namespaces apart (`IsServiceVisible`, pilot/pkg/model/push_context.go).
    fn neutral(&self, ns: &str, mesh_default_export: &[String]) -> bool {
        if self.special.contains(ns) {
            return false;
        }
        if self.defaulted_owners.is_empty() {
            return true;
        }
        if export_audience(mesh_default_export, ns).is_empty() {
            return true;
        }
        let named = mesh_default_export.iter().any(|e| e == ns);
        let own = mesh_default_export.iter().any(|e| e == ".") && self.defaulted_owners.contains(ns);
        !(named || own)
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
        // In the default mesh, pods of ordinary namespaces share one evaluation; with a
        // Sidecar (whose `.` means the config namespace) the namespace stays in the key.
        let namespace_neutral =
            selected.sidecar.is_none() && self.neutral(&selected.config_namespace, &cluster.mesh.default_service_export_to);
        let (ns, config_ns) = if namespace_neutral { ("", "") } else { (pod_ref.namespace.as_str(), selected.config_namespace.as_str()) };
        let mut w = HashWriter(DefaultHasher::new());
        // Debug output covers every field, so a field added later is part of the key too.
        let _ = write!(
            w,
            "{}|{}|{:?}|{:?}|{:?}|{:?}|{}",
            ns,
            config_ns,
            selected.sidecar.map(|s| &s.obj),
            knobs,
            own,
            families,
            knobs::is_meshed(pod),
        );
        Some(ScopeKey(w.0.finish()))
    }
}

/// Namespaces that a service of `owner` exported to `export_to` is visible to, when it is not
/// visible to all (`*`): empty for public services.
fn export_audience(export_to: &[String], owner: &str) -> HashSet<String> {
    if export_to.iter().any(|e| e == "*") {
        return HashSet::new();
    }
    export_to.iter().filter(|e| *e != "~").map(|e| if e == "." { owner.to_string() } else { e.clone() }).collect()
}
