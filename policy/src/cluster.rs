//! Every object loaded from files, indexed for the policy engine.

pub mod fingerprint;
pub mod load;
mod pod_ref;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use load::{LoadError, Loaded, Object, Source, load_documents, load_json, load_text};
pub use pod_ref::{PodRef, PodRefError};

use crate::model::mesh::ConfigMap;
use crate::model::{EndpointSlice, MeshConfig, Namespace, Pod, Service, ServiceEntry, Sidecar};

/// An object of a snapshot, shared with the source that read it.
pub type Shared<T> = Loaded<Arc<T>>;

/// The cluster as files describe it. Later definitions of the same kind/namespace/name replace
/// earlier ones, as repeated `kubectl apply` would.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub sidecars: Vec<Shared<Sidecar>>,
    pub services: Vec<Shared<Service>>,
    pub endpoint_slices: Vec<Shared<EndpointSlice>>,
    pub service_entries: Vec<Shared<ServiceEntry>>,
    pub pods: Vec<Shared<Pod>>,
    pub namespaces: Vec<Shared<Namespace>>,
    pub mesh: MeshConfig,
    /// Where the mesh config came from (None: Istio's defaults).
    pub mesh_source: Option<Source>,
    /// Objects replaced by a later definition, for operators to notice.
    pub replaced: Vec<String>,
    /// Sidecars known to exist but never read successfully (an API server's object that does
    /// not type): the pods they could govern are held (see `select::held`).
    pub held_sidecars: Vec<HeldSidecar>,
}

/// A Sidecar that exists but whose content is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldSidecar {
    pub namespace: String,
    pub name: String,
    /// `spec.workloadSelector.labels` when it could be read; None: no selector, or one that
    /// could not be read (then it could govern every pod of its namespace).
    pub selector: Option<std::collections::BTreeMap<String, String>>,
    /// Why it could not be read.
    pub reason: String,
}

impl HeldSidecar {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Cluster {
    /// Loads files and directories (recursively: `*.yaml`, `*.yml`, `*.json`), every document of
    /// each. The first malformed document fails the load.
    pub fn load_paths(paths: &[PathBuf]) -> Result<Cluster, LoadError> {
        let mut objects = Vec::new();
        for file in load::expand_paths(paths)? {
            let (objs, errs) = load_documents(&file);
            if let Some(e) = errs.into_iter().next() {
                return Err(e);
            }
            objects.extend(objs);
        }
        Cluster::from_objects(objects)
    }

    /// Builds the index from already-loaded objects (also used by tests and fuzzing).
    pub fn from_objects(objects: Vec<Loaded<Object>>) -> Result<Cluster, LoadError> {
        let mut c = Cluster::default();
        // (kind, key) → where it was first seen and its index in its list: replacing a
        // repeated object is a lookup, not a scan (10,000 Services must not be quadratic).
        let mut seen: HashMap<(&'static str, String), (Source, usize)> = HashMap::new();
        for loaded in objects {
            let (obj, loaded) = loaded.split();
            match obj {
                Object::Sidecar(s) => {
                    let k = ("Sidecar", s.metadata.key());
                    c.replaced.extend(upsert(&mut c.sidecars, &mut seen, k, loaded.with(s)));
                }
                Object::Service(s) => {
                    let k = ("Service", s.metadata.key());
                    c.replaced.extend(upsert(&mut c.services, &mut seen, k, loaded.with(s)));
                }
                Object::EndpointSlice(s) => {
                    let k = ("EndpointSlice", s.metadata.key());
                    c.replaced.extend(upsert(&mut c.endpoint_slices, &mut seen, k, loaded.with(s)));
                }
                Object::ServiceEntry(s) => {
                    let k = ("ServiceEntry", s.metadata.key());
                    c.replaced.extend(upsert(&mut c.service_entries, &mut seen, k, loaded.with(s)));
                }
                Object::Pod(p) => {
                    let k = ("Pod", p.metadata.key());
                    c.replaced.extend(upsert(&mut c.pods, &mut seen, k, loaded.with(p)));
                }
                Object::Namespace(n) => {
                    let k = ("Namespace", n.metadata.name.clone());
                    c.replaced.extend(upsert(&mut c.namespaces, &mut seen, k, loaded.with(n)));
                }
                Object::ConfigMap(cm) => c.take_mesh_config(&cm, loaded.source)?,
                Object::Other { .. } => {}
            }
        }
        Ok(c)
    }

    /// ConfigMap `istio` with a `mesh` key: the one in `istio-system` wins over others.
    fn take_mesh_config(&mut self, cm: &ConfigMap, source: Source) -> Result<(), LoadError> {
        if cm.metadata.name != "istio" {
            return Ok(());
        }
        let Some(text) = cm.data.get("mesh") else { return Ok(()) };
        if self.mesh_source.is_some() && cm.metadata.ns() != "istio-system" {
            return Ok(());
        }
        let mesh = load::parse_mesh(text, &source, &cm.metadata.key())?;
        self.mesh = mesh;
        self.mesh_source = Some(source);
        Ok(())
    }

    /// Pods that istio-cni would set up (see `knobs::meshed`), in load order.
    pub fn meshed_pods(&self) -> Vec<PodRef> {
        self.pods
            .iter()
            .filter(|p| crate::knobs::is_meshed(&p.obj))
            .map(|p| PodRef::new(p.obj.metadata.ns(), &p.obj.metadata.name))
            .collect()
    }

    pub fn pod(&self, r: &PodRef) -> Option<&Pod> {
        self.pods.iter().map(|p| &*p.obj).find(|p| p.metadata.ns() == r.namespace && p.metadata.name == r.name)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().map(|n| &*n.obj).find(|n| n.metadata.name == name)
    }
}

/// Adds `item`, or replaces the earlier object with the same key (as a repeated
/// `kubectl apply` would); returns the note for `Cluster::replaced` when it replaced one.
fn upsert<T>(
    v: &mut Vec<Loaded<T>>,
    seen: &mut HashMap<(&'static str, String), (Source, usize)>,
    key: (&'static str, String),
    item: Loaded<T>,
) -> Option<String> {
    match seen.get_mut(&key) {
        Some((prev, i)) => {
            let note = format!("{} {} at {} replaces the one at {}", key.0, key.1, item.source, prev);
            *prev = item.source.clone();
            v[*i] = item;
            Some(note)
        }
        None => {
            seen.insert(key, (item.source.clone(), v.len()));
            v.push(item);
            None
        }
    }
}
