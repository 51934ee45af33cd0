//! What the watchers keep of each object: only its typed form (the policy crate's model,
//! not the API server's JSON), the last version that typed, and why the current one does
//! not. An object that stops typing keeps its last typed version in force; one that never
//! typed is left out (a Sidecar among them holds the pods it could govern, see
//! `sidecap_policy::select::held`).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use sidecap_policy::{
    cluster::{HeldSidecar, LoadError, Loaded, Object, Source as ObjectSource, load_json},
    validate::validate_sidecar,
};

use super::watch::Kind;

/// One object as kept.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The last version that typed (None: no version ever did).
    pub typed: Option<Vec<Loaded<Object>>>,
    /// A running pod's UID (to find its netns from its processes).
    pub uid: Option<String>,
    /// Why the current version does not type (None: it does).
    pub untyped: Option<String>,
    /// Istio's validation errors of the typed Sidecar (the admission webhook would reject it).
    pub invalid: Option<String>,
    /// A Sidecar's `spec.workloadSelector.labels`, read without typing the rest.
    pub selector: Option<BTreeMap<String, String>>,
}

/// Objects of one kind by `namespace/name`.
#[derive(Debug, Default)]
pub struct Store {
    pub objects: HashMap<String, Entry>,
}

/// What became of one object version, for logs and metrics.
#[derive(Debug, Default)]
pub struct Outcome {
    /// It does not type, for a reason not reported for this object before.
    pub newly_untyped: Option<String>,
    /// The field it fails on, when the policy crate names one.
    pub field: Option<String>,
    /// It types but Istio's validation rejects it, for reasons not reported before.
    pub newly_invalid: Option<String>,
}

pub fn key_of(obj: &serde_json::Value) -> String {
    let meta = |f: &str| obj.pointer(&format!("/metadata/{f}")).and_then(|v| v.as_str()).unwrap_or("").to_string();
    format!("{}/{}", meta("namespace"), meta("name"))
}

/// Types one object version; `prev` looks up what was kept of the object before (asked only
/// when this version does not type or is invalid: the common case takes no lock).
pub fn entry_of(
    kind: Kind,
    api_version: &str,
    kind_name: &str,
    obj: serde_json::Value,
    prev: &dyn Fn(&str) -> Option<Entry>,
) -> (Entry, Outcome) {
    let key = key_of(&obj);
    let mut out = Outcome::default();
    let host_network = obj.pointer("/spec/hostNetwork").and_then(|v| v.as_bool()).unwrap_or(false);
    let phase = obj.pointer("/status/phase").and_then(|v| v.as_str()).unwrap_or("");
    // Succeeded/Failed pods have no processes and no netns to find.
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .filter(|_| kind == Kind::Pod && !matches!(phase, "Succeeded" | "Failed"));
    let selector = (kind == Kind::Sidecar).then(|| read_selector(&obj)).flatten();
    if kind == Kind::Pod && host_network {
        // Its processes live in the node's netns: never captured, so not kept.
        let e = Entry { typed: Some(Vec::new()), uid: None, untyped: None, invalid: None, selector: None };
        return (e, out);
    }
    let (typed, errs) = type_object(api_version, kind_name, &key, obj);
    let entry = match errs.first() {
        None => {
            let invalid = typed.iter().find_map(|o| match &o.obj {
                Object::Sidecar(s) => sidecar_problems(s),
                _ => None,
            });
            if invalid.is_some() && prev(&key).and_then(|p| p.invalid) != invalid {
                out.newly_invalid = invalid.clone();
            }
            Entry { typed: Some(typed), uid, untyped: None, invalid, selector }
        }
        Some(e) => {
            let why = describe(e);
            let prev = prev(&key);
            let prev = prev.as_ref();
            if prev.and_then(|p| p.untyped.as_ref()) != Some(&why) {
                out.newly_untyped = Some(why.clone());
                out.field = match e {
                    LoadError::Field(f) => Some(f.field.clone()),
                    _ => None,
                };
            }
            Entry {
                typed: prev.and_then(|p| p.typed.clone()),
                uid: prev.and_then(|p| p.uid.clone()),
                untyped: Some(why),
                invalid: prev.and_then(|p| p.invalid.clone()),
                selector: selector.or_else(|| prev.and_then(|p| p.selector.clone())),
            }
        }
    };
    (entry, out)
}

/// `field F: reason` when the policy crate names the field, else its whole message.
fn describe(e: &LoadError) -> String {
    match e {
        LoadError::Field(f) => format!("field {}: {}", f.field, f.message),
        LoadError::Shape { message, .. } | LoadError::Yaml { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Istio's validation errors, and egress hosts istiod skips (`pilot/pkg/model/sidecar.go`
/// `convertIstioListenerToWrapper`: "Illegal host in sidecar resource"), as one line.
fn sidecar_problems(s: &sidecap_policy::model::Sidecar) -> Option<String> {
    let mut problems = validate_sidecar(s).errors;
    for e in s.spec.egress.iter().flatten() {
        for h in e.hosts.iter().filter(|h| h.matches('/').count() != 1) {
            problems.push(format!("egress host {h:?} is ignored: host must be of form namespace/dnsName"));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// `spec.workloadSelector.labels` when every label is a string.
fn read_selector(obj: &serde_json::Value) -> Option<BTreeMap<String, String>> {
    let labels = obj.pointer("/spec/workloadSelector/labels")?.as_object()?;
    labels.iter().map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()
}

/// An object as JSON (given the apiVersion/kind that list items omit) → typed objects.
pub fn type_object(api_version: &str, kind_name: &str, key: &str, mut value: serde_json::Value) -> (Vec<Loaded<Object>>, Vec<LoadError>) {
    let src = ObjectSource { file: PathBuf::from(format!("kubernetes:{kind_name}/{}", key.trim_start_matches('/'))), document: 1, line: 1 };
    if let Some(m) = value.as_object_mut() {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind_name.into());
        // What the policy crate never reads is not kept: 30,000 objects' labels and
        // annotations are most of what a Service or EndpointSlice weighs once typed.
        if let Some(meta) = m.get_mut("metadata").and_then(|v| v.as_object_mut()) {
            meta.remove("managedFields");
            if let Some(ann) = meta.get_mut("annotations").and_then(|v| v.as_object_mut()) {
                ann.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
            let keep = |map: Option<&mut serde_json::Value>, wanted: &str| {
                if let Some(map) = map.and_then(|v| v.as_object_mut()) {
                    map.retain(|k, _| k == wanted);
                }
            };
            match kind_name {
                // Read: the exportTo annotation (registry.rs), nothing of the labels.
                "Service" => {
                    meta.remove("labels");
                    keep(meta.get_mut("annotations"), "networking.istio.io/exportTo");
                }
                // Read: the service-name label only.
                "EndpointSlice" => {
                    meta.remove("annotations");
                    keep(meta.get_mut("labels"), "kubernetes.io/service-name");
                }
                _ => {}
            }
        }
        // Only a pod's status (its IPs, its phase) is read.
        if kind_name != "Pod" {
            m.remove("status");
        }
    }
    load_json(&value, &src)
}

/// The Sidecars that exist but never typed.
pub fn held(store: &Store) -> Vec<HeldSidecar> {
    let mut out: Vec<HeldSidecar> = store
        .objects
        .iter()
        .filter(|(_, e)| e.typed.is_none())
        .map(|(key, e)| {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            HeldSidecar {
                namespace: ns.to_string(),
                name: name.to_string(),
                selector: e.selector.clone(),
                reason: e.untyped.clone().unwrap_or_default(),
            }
        })
        .collect();
    out.sort_by_key(|h| h.key());
    out
}
