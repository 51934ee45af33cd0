//! `metadata` shared by every object.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Absent in many hand-written files: `kubectl apply` puts those in `default`.
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339, as the API server writes it; drives "oldest first" ordering.
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The namespace, `default` when the file leaves it out.
    pub fn ns(&self) -> &str {
        match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => "default",
        }
    }

    /// Creation time in seconds since the epoch; 0 when absent or unparsable (Istio's zero time
    /// for file-based config), so such objects sort first and then by name.
    pub fn created(&self) -> i64 {
        self.creation_timestamp.as_deref().and_then(super::time::parse_rfc3339).unwrap_or(0)
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.ns(), self.name)
    }
}
