//! Host import of one egress listener (pilot/pkg/model/sidecar.go `convertIstioListenerToWrapper`,
//! `selectServices`, `matchingService`, `serviceMatchingListenerPort`).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Protocol;
use crate::model::host::{is_wildcarded, subset_of};
use crate::registry::{Registry, ServiceView, SvcPort};

/// Hosts of one namespace key: exact names, all names, and `~` exclusions.
#[derive(Default, Debug)]
struct HostClass {
    exact: BTreeSet<String>,
    all: Vec<String>,
    excluded: Vec<String>,
}

impl HostClass {
    fn excludes(&self, h: &str) -> bool {
        self.excluded.iter().any(|e| subset_of(h, e))
    }

    /// `hostClassification.Matches`: exact lookup, then wildcard subset matching; two exact
    /// names only match by the exact lookup.
    fn matches(&self, h: &str) -> bool {
        if self.exact.contains(h) {
            return true;
        }
        let hw = is_wildcarded(h);
        self.all.iter().any(|imp| (hw || is_wildcarded(imp)) && subset_of(h, imp))
    }
}

/// `ns/host` entries grouped by namespace (`.` → config namespace, `~ns` → exclusion in ns,
/// `~` → exclusion everywhere). Malformed entries are skipped, as istiod logs and skips them.
fn classify(hosts: &[String], config_ns: &str) -> BTreeMap<String, HostClass> {
    let mut out: BTreeMap<String, HostClass> = BTreeMap::new();
    for h in hosts {
        if h.matches('/').count() != 1 {
            continue;
        }
        let Some((ns, name)) = h.split_once('/') else { continue };
        let (excluded, mut ns) = match ns.strip_prefix('~') {
            Some("") => (true, "*"),
            Some(rest) => (true, rest),
            None => (false, ns),
        };
        if ns == "." {
            ns = config_ns;
        }
        let hc = out.entry(ns.to_string()).or_default();
        if excluded {
            hc.excluded.push(name.to_string());
            continue;
        }
        if !is_wildcarded(name) {
            hc.exact.insert(name.to_string());
        }
        hc.all.push(name.to_string());
    }
    out
}

/// A service as one egress listener imports it, possibly trimmed to the listener's port.
#[derive(Clone, Debug)]
pub struct Imported<'a> {
    pub svc: &'a ServiceView,
    pub ports: Vec<SvcPort>,
}

/// Services imported by an egress listener with `hosts` and optional port (`None` for the
/// catch-all). Listener ports trim services to that port (unless HTTP_PROXY, which imports all
/// ports); one namespace is kept per hostname, the config namespace's first.
pub fn import<'a>(visible: &[&'a ServiceView], hosts: &[String], listener_port: Option<(u32, &str)>, config_ns: &str) -> Vec<Imported<'a>> {
    let classes = classify(hosts, config_ns);
    let wildcard = classes.get("*");
    // needsPortMatch: a numbered port whose protocol is not HTTP_PROXY.
    let match_port = listener_port.filter(|(n, proto)| *n != 0 && Protocol::parse(proto) != Protocol::HttpProxy).map(|(n, _)| n);
    let trim = |s: &'a ServiceView| -> Option<Imported<'a>> {
        match match_port {
            None => Some(Imported { svc: s, ports: s.ports.clone() }),
            Some(n) => s.ports.iter().find(|p| u32::from(p.port) == n).map(|p| Imported { svc: s, ports: vec![p.clone()] }),
        }
    };
    let mut imported = Vec::new();
    for s in visible {
        let ns_class = classes.get(&s.namespace);
        if ns_class.is_some_and(|c| c.excludes(&s.hostname)) || wildcard.is_some_and(|c| c.excludes(&s.hostname)) {
            continue;
        }
        if let Some(c) = ns_class {
            if c.matches(&s.hostname) {
                if let Some(i) = trim(s) {
                    imported.push(i);
                    continue;
                }
            }
        }
        if let Some(c) = wildcard {
            if c.matches(&s.hostname) {
                if let Some(i) = trim(s) {
                    imported.push(i);
                }
            }
        }
    }
    // UnifiedSidecarScoping: one namespace per hostname — the config namespace's, else a
    // Kubernetes Service over a ServiceEntry, else the first seen.
    let mut chosen: BTreeMap<&str, (&str, bool)> = BTreeMap::new();
    for i in &imported {
        let np = (i.svc.namespace.as_str(), i.svc.registry == Registry::Kubernetes);
        match chosen.get(i.svc.hostname.as_str()) {
            None => {
                chosen.insert(&i.svc.hostname, np);
            }
            Some(ex) => {
                if np.0 == config_ns || (!ex.1 && np.1 && ex.0 != config_ns) {
                    chosen.insert(&i.svc.hostname, np);
                }
            }
        }
    }
    imported.retain(|i| chosen.get(i.svc.hostname.as_str()).is_some_and(|c| c.0 == i.svc.namespace));
    imported
}
