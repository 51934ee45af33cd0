//! Multi-document YAML → typed objects, with errors that name file, document, object and field.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_norway::Value;

use crate::model::mesh::ConfigMap;
use crate::model::{EndpointSlice, MeshConfig, Namespace, Pod, Service, ServiceEntry, Sidecar};

/// Where a document came from: file, 1-based document index, 1-based first line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub document: usize,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} (document {})", self.file.display(), self.line, self.document)
    }
}

/// One object and where it came from. Objects are shared (`Arc`): a source's cache and every
/// snapshot built from it hold the same copy, so a snapshot of 10,000 Services costs pointers,
/// not a deep copy, and the agent keeps one copy of each object however many snapshots exist.
#[derive(Clone, Debug)]
pub struct Loaded<T> {
    pub obj: T,
    pub source: Source,
    /// A hash of the object's content, computed once when it is read (and after
    /// [`Loaded::modify`]), so that what a pod's policy depends on is fingerprinted per pass
    /// from these, never by re-reading every object.
    fingerprint: u64,
}

impl<T: fmt::Debug> Loaded<T> {
    pub fn new(obj: T, source: Source) -> Loaded<T> {
        let fingerprint = super::fingerprint::of(&obj);
        Loaded { obj, source, fingerprint }
    }

    /// Changes the object (copying it first when it is shared) and its fingerprint with it.
    pub fn modify<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        let r = f(&mut self.obj);
        self.fingerprint = super::fingerprint::of(&self.obj);
        r
    }
}

impl<T> Loaded<T> {
    /// The content hash of `obj` (equal objects, equal fingerprints, within one process).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The object apart from where it came from and its fingerprint, to be put back with
    /// [`Loaded::with`] under another type (`Object::Service(s)` → `Loaded<Arc<Service>>`).
    pub fn split(self) -> (T, Loaded<()>) {
        (self.obj, Loaded { obj: (), source: self.source, fingerprint: self.fingerprint })
    }
}

impl Loaded<()> {
    /// `obj` with the source and fingerprint of what [`Loaded::split`] took it from.
    pub fn with<U>(self, obj: U) -> Loaded<U> {
        Loaded { obj, source: self.source, fingerprint: self.fingerprint }
    }
}

/// A document of a kind sidecap understands; anything else is kept as `Other` and ignored.
#[derive(Clone, Debug)]
pub enum Object {
    Sidecar(Arc<Sidecar>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    ServiceEntry(Arc<ServiceEntry>),
    Pod(Arc<Pod>),
    Namespace(Arc<Namespace>),
    ConfigMap(Arc<ConfigMap>),
    Other { kind: String },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: document {document}: invalid YAML: {message}", file.display())]
    Yaml { file: PathBuf, document: usize, line: usize, message: String },
    #[error("{}:{line}: document {document}: {message}", file.display())]
    Shape { file: PathBuf, document: usize, line: usize, message: String },
    #[error(transparent)]
    Field(Box<FieldError>),
}

/// A field of a known object that does not have the expected type or value.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: document {document}: {kind} {object}: field {field}: {message}", file.display())]
pub struct FieldError {
    pub file: PathBuf,
    pub document: usize,
    pub line: usize,
    pub kind: String,
    pub object: String,
    pub field: String,
    pub message: String,
}

impl LoadError {
    fn shape(src: &Source, message: impl Into<String>) -> LoadError {
        LoadError::Shape { file: src.file.clone(), document: src.document, line: src.line, message: message.into() }
    }
}

/// Files named by `paths`: files as given, directories walked for YAML/JSON files, sorted.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| LoadError::Read { path: p.clone(), source: e })?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let rd = std::fs::read_dir(dir).map_err(|e| LoadError::Read { path: dir.to_path_buf(), source: e })?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            walk(&e, out)?;
        } else if e.extension().and_then(|x| x.to_str()).is_some_and(|x| matches!(x, "yaml" | "yml" | "json")) {
            out.push(e);
        }
    }
    Ok(())
}

/// Every document of one file: the objects that loaded and an error for each that did not.
pub fn load_documents(path: &Path) -> (Vec<Loaded<Object>>, Vec<LoadError>) {
    match std::fs::read(path) {
        Err(e) => (Vec::new(), vec![LoadError::Read { path: path.to_path_buf(), source: e }]),
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => load_text(path, &text),
            Err(_) => {
                let src = Source { file: path.to_path_buf(), document: 1, line: 1 };
                (Vec::new(), vec![LoadError::shape(&src, "file is not UTF-8 text")])
            }
        },
    }
}

/// Splits at `---` lines (YAML document markers are always at column 0) so that every error
/// can name its document and an absolute line number.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_marker {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 1;
            // Content after the marker on the same line belongs to the new document.
            cur.push_str(line.get(3..).unwrap_or(""));
            cur.push('\n');
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.push((start, cur));
    docs
}

pub fn load_text(path: &Path, text: &str) -> (Vec<Loaded<Object>>, Vec<LoadError>) {
    let mut objs = Vec::new();
    let mut errs = Vec::new();
    let mut index = 0;
    for (line, doc) in split_documents(text) {
        if doc.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        index += 1;
        let src = Source { file: path.to_path_buf(), document: index, line };
        let value: Value = match serde_norway::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                let at = e.location().map(|l| line + l.line().saturating_sub(1)).unwrap_or(line);
                errs.push(LoadError::Yaml { file: src.file.clone(), document: index, line: at, message: e.to_string() });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        collect_value(value, &src, &mut objs, &mut errs, 0);
    }
    (objs, errs)
}

/// One object as the Kubernetes API serves it (JSON), typed exactly as a file's document is;
/// `src` names it in errors. A `kind: List` expands into its items.
pub fn load_json(value: &serde_json::Value, src: &Source) -> (Vec<Loaded<Object>>, Vec<LoadError>) {
    let mut objs = Vec::new();
    let mut errs = Vec::new();
    match serde_norway::to_value(value) {
        Ok(v) if v.is_null() => {}
        Ok(v) => collect_value(v, src, &mut objs, &mut errs, 0),
        Err(e) => errs.push(LoadError::shape(src, e.to_string())),
    }
    (objs, errs)
}

/// One document's value; `kind: List` is expanded into its items.
fn collect_value(value: Value, src: &Source, objs: &mut Vec<Loaded<Object>>, errs: &mut Vec<LoadError>, depth: usize) {
    let Some(map) = value.as_mapping() else {
        errs.push(LoadError::shape(src, "document is not an object (expected apiVersion/kind/metadata)"));
        return;
    };
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return errs.push(LoadError::shape(src, "field kind: must be a string")),
        None => return errs.push(LoadError::shape(src, "field kind: missing")),
    };
    if kind == "List" && depth == 0 {
        if let Some(Value::Sequence(items)) = map.get("items") {
            for item in items.clone() {
                collect_value(item, src, objs, errs, depth + 1);
            }
        }
        return;
    }
    let name = map.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("").to_string();
    let namespace = map.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str);
    let object = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    };
    let known = matches!(kind.as_str(), "Sidecar" | "Service" | "EndpointSlice" | "ServiceEntry" | "Pod" | "Namespace" | "ConfigMap");
    if !known {
        objs.push(Loaded::new(Object::Other { kind }, src.clone()));
        return;
    }
    if name.is_empty() {
        return errs.push(LoadError::Field(Box::new(FieldError {
            file: src.file.clone(),
            document: src.document,
            line: src.line,
            kind,
            object,
            field: "metadata.name".into(),
            message: "missing or empty".into(),
        })));
    }
    let obj = match kind.as_str() {
        "Sidecar" => typed(value, src, &kind, &object).map(|o| Object::Sidecar(Arc::new(o))),
        "Service" => typed(value, src, &kind, &object).map(|o| Object::Service(Arc::new(o))),
        "EndpointSlice" => typed(value, src, &kind, &object).map(|o| Object::EndpointSlice(Arc::new(o))),
        "ServiceEntry" => typed(value, src, &kind, &object).map(|o| Object::ServiceEntry(Arc::new(o))),
        "Pod" => typed(value, src, &kind, &object).map(|o| Object::Pod(Arc::new(o))),
        "Namespace" => typed(value, src, &kind, &object).map(|o| Object::Namespace(Arc::new(o))),
        _ => typed(value, src, &kind, &object).map(|o| Object::ConfigMap(Arc::new(o))),
    };
    match obj {
        Ok(obj) => objs.push(Loaded::new(obj, src.clone())),
        Err(e) => errs.push(e),
    }
}

fn typed<T: DeserializeOwned>(value: Value, src: &Source, kind: &str, object: &str) -> Result<T, LoadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        LoadError::Field(Box::new(FieldError {
            file: src.file.clone(),
            document: src.document,
            line: src.line,
            kind: kind.to_string(),
            object: object.to_string(),
            field,
            message: e.into_inner().to_string(),
        }))
    })
}

/// The `mesh` key of the `istio` ConfigMap: a YAML document of its own.
pub fn parse_mesh(text: &str, src: &Source, object: &str) -> Result<MeshConfig, LoadError> {
    let field_err = |field: String, message: String| {
        LoadError::Field(Box::new(FieldError {
            file: src.file.clone(),
            document: src.document,
            line: src.line,
            kind: "ConfigMap".into(),
            object: object.to_string(),
            field,
            message,
        }))
    };
    let value: Value = serde_norway::from_str(text).map_err(|e| field_err("data.mesh".into(), e.to_string()))?;
    if value.is_null() {
        return Ok(MeshConfig::default());
    }
    let mut mesh: MeshConfig =
        serde_path_to_error::deserialize(value).map_err(|e| field_err(format!("data.mesh.{}", e.path()), e.into_inner().to_string()))?;
    if mesh.root_namespace.is_empty() {
        mesh.root_namespace = "istio-system".into();
    }
    if mesh.default_service_export_to.is_empty() {
        mesh.default_service_export_to = vec!["*".into()];
    }
    Ok(mesh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (Vec<Loaded<Object>>, Vec<LoadError>) {
        load_text(Path::new("t.yaml"), text)
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: s\n  namespace: ns\nspec:\n  egress:\n  - port:\n      number: many\n";
        let (objs, errs) = load(text);
        assert_eq!(objs.len(), 1, "the namespace loads");
        let msg = errs.first().map(ToString::to_string).unwrap_or_default();
        assert!(msg.starts_with("t.yaml:5: document 2: Sidecar ns/s: field spec.egress[0].port.number:"), "{msg}");
    }

    #[test]
    fn syntax_error_has_absolute_line() {
        let text = "kind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: [unclosed\n";
        let (_, errs) = load(text);
        let msg = errs.first().map(ToString::to_string).unwrap_or_default();
        assert!(msg.starts_with("t.yaml:"), "{msg}");
        assert!(msg.contains("document 2"), "{msg}");
    }

    #[test]
    fn unknown_kinds_and_empty_documents_are_skipped() {
        let text = "---\n# comment only\n---\nkind: PeerAuthentication\nmetadata: {name: x}\n---\n";
        let (objs, errs) = load(text);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(matches!(objs.as_slice(), [Loaded { obj: Object::Other { .. }, .. }]));
    }

    #[test]
    fn missing_kind_and_name_are_errors() {
        let (_, errs) = load("metadata: {name: x}\n---\nkind: Pod\nmetadata: {}\n---\n- a\n");
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs[0].contains("field kind: missing"), "{msgs:?}");
        assert!(msgs[1].contains("field metadata.name: missing"), "{msgs:?}");
        assert!(msgs[2].contains("not an object"), "{msgs:?}");
    }

    #[test]
    fn list_kind_expands() {
        let (objs, errs) = load("kind: List\nitems:\n- kind: Namespace\n  metadata: {name: a}\n- kind: Namespace\n  metadata: {name: b}\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
    }

    #[test]
    fn json_objects_type_as_documents_do() {
        let src = Source { file: "kubernetes:Sidecar/ns/s".into(), document: 1, line: 1 };
        let sc = serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": {"name": "s", "namespace": "ns", "resourceVersion": "7", "uid": "u"},
            "spec": {"egress": [{"hosts": ["./*"], "port": {"number": 80, "protocol": "HTTP", "name": "http"}}]},
        });
        let (objs, errs) = load_json(&sc, &src);
        assert!(errs.is_empty(), "{errs:?}");
        let [Loaded { obj: Object::Sidecar(s), .. }] = objs.as_slice() else { panic!("{objs:?}") };
        let yaml = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: ns}\nspec:\n  egress:\n  - hosts: [./*]\n    port: {number: 80, protocol: HTTP, name: http}\n";
        let (from_yaml, _) = load(yaml);
        let [Loaded { obj: Object::Sidecar(y), .. }] = from_yaml.as_slice() else { panic!("{from_yaml:?}") };
        assert_eq!(s.spec, y.spec);

        let bad = serde_json::json!({"kind": "Sidecar", "metadata": {"name": "s", "namespace": "ns"}, "spec": {"egress": [{"port": {"number": "many"}}]}});
        let (_, errs) = load_json(&bad, &src);
        let msg = errs.first().map(ToString::to_string).unwrap_or_default();
        assert!(msg.starts_with("kubernetes:Sidecar/ns/s:1: document 1: Sidecar ns/s: field spec.egress[0].port.number:"), "{msg}");
        assert!(load_json(&serde_json::Value::Null, &src).0.is_empty());
    }

    #[test]
    fn mesh_config_from_configmap() {
        let src = Source { file: "m.yaml".into(), document: 1, line: 1 };
        let m = parse_mesh("outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\nrootNamespace: istio-config\n", &src, "istio-system/istio")
            .expect("valid mesh config");
        assert_eq!(m.outbound_mode(), crate::model::OutboundMode::RegistryOnly);
        assert_eq!(m.root_namespace, "istio-config");
        let e = parse_mesh("rootNamespace: [x]\n", &src, "istio-system/istio").expect_err("bad type");
        assert!(e.to_string().contains("field data.mesh.rootNamespace"), "{e}");
    }

    #[test]
    fn fingerprints_follow_content_and_modify() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n";
        let (a, _) = load(text);
        let (b, _) = load(text);
        assert_eq!(a[0].fingerprint(), b[0].fingerprint(), "equal content, equal fingerprint");
        let mut m = a[0].clone();
        m.modify(|o| {
            if let Object::Namespace(n) = o {
                Arc::make_mut(n).metadata.labels.insert("k".into(), "v".into());
            }
        });
        assert_ne!(m.fingerprint(), a[0].fingerprint(), "a change made through modify is seen");
        let Object::Namespace(orig) = &a[0].obj else { panic!("{a:?}") };
        assert!(orig.metadata.labels.is_empty(), "the shared original is untouched");
    }
}
