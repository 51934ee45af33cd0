//! Every object loaded from files, indexed for the policy engine.

pub mod load;
mod pod_ref;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use load::{LoadError, Loaded, Object, Source, load_documents, load_json, load_text};
pub use pod_ref::{PodRef, PodRefError};

use crate::model::mesh::ConfigMap;
use crate::model::{EndpointSlice, MeshConfig, Namespace, Pod, Service, ServiceEntry, Sidecar};

/// The cluster as files describe it. Later definitions of the same kind/namespace/name replace
/// earlier ones, as repeated `kubectl apply` would.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub sidecars: Vec<Loaded<Sidecar>>,
    pub services: Vec<Loaded<Service>>,
    pub endpoint_slices: Vec<Loaded<EndpointSlice>>,
    pub service_entries: Vec<Loaded<ServiceEntry>>,
    pub pods: Vec<Loaded<Pod>>,
    pub namespaces: Vec<Loaded<Namespace>>,
    pub mesh: MeshConfig,
    /// Where the mesh config came from (None: Istio's defaults).
    pub mesh_source: Option<Source>,
    /// Objects replaced by a later definition, for operators to notice.
    pub replaced: Vec<String>,
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
        let mut seen: BTreeMap<(String, String), Source> = BTreeMap::new();
        for Loaded { obj, source } in objects {
            let key = |kind: &str, m: &crate::model::ObjectMeta| (kind.to_string(), m.key());
            match obj {
                Object::Sidecar(s) => {
                    let k = key("Sidecar", &s.metadata);
                    c.note_replaced(&mut seen, k, &source);
                    upsert(&mut c.sidecars, Loaded { obj: s, source }, |x| x.metadata.key());
                }
                Object::Service(s) => {
                    let k = key("Service", &s.metadata);
                    c.note_replaced(&mut seen, k, &source);
                    upsert(&mut c.services, Loaded { obj: s, source }, |x| x.metadata.key());
                }
                Object::EndpointSlice(s) => {
                    let k = key("EndpointSlice", &s.metadata);
                    c.note_replaced(&mut seen, k, &source);
                    upsert(&mut c.endpoint_slices, Loaded { obj: s, source }, |x| x.metadata.key());
                }
                Object::ServiceEntry(s) => {
                    let k = key("ServiceEntry", &s.metadata);
                    c.note_replaced(&mut seen, k, &source);
                    upsert(&mut c.service_entries, Loaded { obj: s, source }, |x| x.metadata.key());
                }
                Object::Pod(p) => {
                    let k = key("Pod", &p.metadata);
                    c.note_replaced(&mut seen, k, &source);
                    upsert(&mut c.pods, Loaded { obj: p, source }, |x| x.metadata.key());
                }
                Object::Namespace(n) => {
                    let k = ("Namespace".to_string(), n.metadata.name.clone());
                    c.note_replaced(&mut seen, k, &source);
                    upsert(&mut c.namespaces, Loaded { obj: n, source }, |x| x.metadata.name.clone());
                }
                Object::ConfigMap(cm) => c.take_mesh_config(cm, source)?,
                Object::Other { .. } => {}
            }
        }
        Ok(c)
    }

    fn note_replaced(&mut self, seen: &mut BTreeMap<(String, String), Source>, key: (String, String), at: &Source) {
        if let Some(prev) = seen.insert(key.clone(), at.clone()) {
            self.replaced.push(format!("{} {} at {} replaces the one at {}", key.0, key.1, at, prev));
        }
    }

    /// ConfigMap `istio` with a `mesh` key: the one in `istio-system` wins over others.
    fn take_mesh_config(&mut self, cm: ConfigMap, source: Source) -> Result<(), LoadError> {
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
        self.pods
            .iter()
            .map(|p| &p.obj)
            .find(|p| p.metadata.ns() == r.namespace && p.metadata.name == r.name)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().map(|n| &n.obj).find(|n| n.metadata.name == name)
    }
}

fn upsert<T>(v: &mut Vec<Loaded<T>>, item: Loaded<T>, key: impl Fn(&T) -> String) {
    let k = key(&item.obj);
    match v.iter_mut().find(|x| key(&x.obj) == k) {
        Some(slot) => *slot = item,
        None => v.push(item),
    }
}
