//! What a pod's policy depends on, fingerprinted, so that a change re-evaluates only the
//! pods it can affect: a pod's own object; Sidecars of its namespace and of the root
//! namespace (selection looks nowhere else), held ones included; and the registry (Services, ServiceEntries,
//! EndpointSlices, Namespaces, mesh config), which any pod may import from.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hasher},
};

use sidecap_policy::{
    Cluster,
    cluster::{Shared, fingerprint},
    model::Pod,
};

/// The objects' fingerprints (computed once, when each was read), in order.
fn combine<'a, T: 'a>(h: &mut DefaultHasher, objs: impl IntoIterator<Item = &'a Shared<T>>) {
    let mut n = 0u64;
    for o in objs {
        h.write_u64(o.fingerprint());
        n += 1;
    }
    h.write_u64(n);
}

/// Fingerprints of one snapshot, computed once per pass from the objects' own fingerprints
/// (thousands of u64s, not thousands of objects formatted).
pub struct Inputs {
    registry: u64,
    sidecars: HashMap<String, u64>,
    root: String,
}

impl Inputs {
    pub fn of(c: &Cluster) -> Inputs {
        let mut h = DefaultHasher::new();
        combine(&mut h, &c.services);
        combine(&mut h, &c.service_entries);
        combine(&mut h, &c.endpoint_slices);
        combine(&mut h, &c.namespaces);
        h.write_u64(fingerprint::of(&c.mesh));
        let registry = h.finish();
        let mut by_ns: HashMap<&str, DefaultHasher> = HashMap::new();
        for s in &c.sidecars {
            by_ns.entry(s.obj.metadata.ns()).or_default().write_u64(s.fingerprint());
        }
        // Held Sidecars count too, also in a namespace that has no other.
        for h in &c.held_sidecars {
            by_ns.entry(h.namespace.as_str()).or_default().write_u64(fingerprint::of(h));
        }
        let sidecars = by_ns.into_iter().map(|(ns, h)| (ns.to_string(), h.finish())).collect();
        Inputs { registry, sidecars, root: c.mesh.root_namespace.clone() }
    }

    /// Everything the policy of `pod` (with this fingerprint) is computed from.
    pub fn for_pod(&self, pod: &Pod, pod_fingerprint: u64) -> u64 {
        let ns = pod.metadata.ns();
        let side = |n: &str| self.sidecars.get(n).copied().unwrap_or(0);
        let mut h = DefaultHasher::new();
        h.write_u64(self.registry);
        h.write_u64(side(ns));
        h.write_u64(side(&self.root));
        h.write_u64(pod_fingerprint);
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(docs: &str) -> Cluster {
        let (objs, errs) = sidecap_policy::cluster::load_text(std::path::Path::new("t.yaml"), docs);
        assert!(errs.is_empty(), "{errs:?}");
        Cluster::from_objects(objs).expect("cluster")
    }

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: ns1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  namespace: ns2\n";

    fn sidecar(ns: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: s\n  namespace: {ns}\nspec:\n  egress:\n  - hosts: [\"./*\"]\n"
        )
    }

    fn keys(c: &Cluster) -> (u64, u64) {
        let i = Inputs::of(c);
        (i.for_pod(&c.pods[0].obj, c.pods[0].fingerprint()), i.for_pod(&c.pods[1].obj, c.pods[1].fingerprint()))
    }

    #[test]
    fn a_sidecar_affects_its_namespace_or_everyone_from_the_root() {
        let base = keys(&cluster(PODS));
        assert_eq!(base, keys(&cluster(PODS)), "stable");
        let ns1 = keys(&cluster(&format!("{PODS}{}", sidecar("ns1"))));
        assert_ne!(ns1.0, base.0, "ns1's Sidecar affects a");
        assert_eq!(ns1.1, base.1, "but not b in ns2");
        let root = keys(&cluster(&format!("{PODS}{}", sidecar("istio-system"))));
        assert!(root.0 != base.0 && root.1 != base.1, "a root-namespace Sidecar affects everyone");
        let svc = keys(&cluster(&format!(
            "{PODS}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: ns9\nspec:\n  clusterIP: 10.0.0.9\n  ports:\n  - port: 80\n"
        )));
        assert!(svc.0 != base.0 && svc.1 != base.1, "any Service may be imported by anyone");
    }
}
