//! Which Sidecar governs a pod (pilot/pkg/model/push_context.go `initSidecarScopes`,
//! `getSidecarScope`).

use std::collections::BTreeMap;

use crate::cluster::{Cluster, HeldSidecar, Shared};
use crate::model::Sidecar;

/// The governing Sidecar and the namespace its `.` means (the pod's, also for a root default).
#[derive(Clone, Debug)]
pub struct Selected<'a> {
    pub sidecar: Option<&'a Shared<Sidecar>>,
    pub config_namespace: String,
    /// True when the Sidecar is the root namespace's mesh-wide default.
    pub from_root: bool,
}

/// Sidecars in Istio's order: oldest first (then name, then namespace), and every Sidecar with
/// a `workloadSelector` (even `{}`) before every Sidecar without one.
pub fn ordered(cluster: &Cluster) -> Vec<&Shared<Sidecar>> {
    let mut all: Vec<&Shared<Sidecar>> = cluster.sidecars.iter().collect();
    all.sort_by(|a, b| {
        let (a, b) = (&a.obj.metadata, &b.obj.metadata);
        (a.created(), &a.name, a.ns()).cmp(&(b.created(), &b.name, b.ns()))
    });
    let (mut with, without): (Vec<_>, Vec<_>) = all.into_iter().partition(|s| s.obj.spec.workload_selector.is_some());
    with.extend(without);
    with
}

/// First match in the pod's namespace wins (selector labels ⊆ pod labels, or no selector);
/// else the root namespace's first selector-less Sidecar, evaluated in the pod's namespace;
/// else none (the implicit default, `*/*`).
pub fn select<'a>(cluster: &'a Cluster, pod_ns: &str, pod_labels: &BTreeMap<String, String>) -> Selected<'a> {
    let order = ordered(cluster);
    for s in &order {
        if s.obj.metadata.ns() != pod_ns {
            continue;
        }
        let matches = match &s.obj.spec.workload_selector {
            Some(sel) => sel.labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            None => true,
        };
        if matches {
            return Selected { sidecar: Some(s), config_namespace: pod_ns.to_string(), from_root: false };
        }
    }
    let root = &cluster.mesh.root_namespace;
    let root_default = order.into_iter().find(|s| s.obj.metadata.ns() == root.as_str() && s.obj.spec.workload_selector.is_none());
    Selected { sidecar: root_default, config_namespace: pod_ns.to_string(), from_root: root_default.is_some() }
}

/// A Sidecar that could not be read and could govern this pod, had it been read: one of the
/// pod's namespace whose selector matches (or is unknown), or the root namespace's
/// selector-less one when no Sidecar of the pod's namespace governs it. Such a pod keeps the
/// policy it had: an unreadable Sidecar neither widens nor narrows anything.
pub fn held<'a>(cluster: &'a Cluster, pod_ns: &str, pod_labels: &BTreeMap<String, String>) -> Option<&'a HeldSidecar> {
    if cluster.held_sidecars.is_empty() {
        return None;
    }
    let matches = |h: &HeldSidecar| h.selector.as_ref().is_none_or(|sel| sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    if let Some(h) = cluster.held_sidecars.iter().find(|h| h.namespace == pod_ns && matches(h)) {
        return Some(h);
    }
    let root = cluster.mesh.root_namespace.as_str();
    let own = select(cluster, pod_ns, pod_labels);
    if own.sidecar.is_some() && !own.from_root {
        return None;
    }
    cluster.held_sidecars.iter().find(|h| h.namespace == root && h.selector.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(ns: &str, selector: Option<&[(&str, &str)]>) -> HeldSidecar {
        HeldSidecar {
            namespace: ns.into(),
            name: "typo".into(),
            selector: selector.map(|s| s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            reason: "field spec.egress[0].port.number: invalid".into(),
        }
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn an_unreadable_sidecar_holds_only_the_pods_it_could_govern() {
        let (objs, errs) = crate::cluster::load_text(
            std::path::Path::new("t.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: own\n  namespace: blog\nspec:\n  egress:\n  - hosts: [\"./*\"]\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
        let mut c = Cluster::from_objects(objs).expect("cluster");
        let web = labels(&[("app", "web")]);
        let other = labels(&[("app", "other")]);

        c.held_sidecars = vec![held("shop", Some(&[("app", "web")]))];
        assert!(super::held(&c, "shop", &web).is_some());
        assert!(super::held(&c, "shop", &other).is_none(), "its selector does not match");
        assert!(super::held(&c, "blog", &web).is_none(), "another namespace");

        c.held_sidecars = vec![held("shop", None)];
        assert!(super::held(&c, "shop", &other).is_some(), "no readable selector: the whole namespace");

        // The root namespace's selector-less one: every pod without a Sidecar of its own.
        c.held_sidecars = vec![held("istio-system", None)];
        assert!(super::held(&c, "shop", &web).is_some());
        assert!(super::held(&c, "blog", &web).is_none(), "blog's own Sidecar governs it");
        c.held_sidecars = vec![held("istio-system", Some(&[("app", "web")]))];
        assert!(super::held(&c, "shop", &web).is_none(), "with a selector it governs root-namespace pods only");
    }
}
