//! Typed Istio and Kubernetes objects, as much of each as sidecap's decisions need.
//!
//! Field names follow the Kubernetes/Istio YAML (camelCase); unknown fields are ignored, as
//! the API server would prune them from these structural schemas.

pub mod cidr;
pub mod host;
pub mod mesh;
pub mod meta;
pub mod pod;
pub mod protocol;
pub mod service;
pub mod service_entry;
pub mod sidecar;
pub mod time;

pub use cidr::Cidr;
pub use mesh::{MeshConfig, OutboundMode};
pub use meta::ObjectMeta;
pub use pod::{Namespace, Pod};
pub use protocol::Protocol;
pub use service::{EndpointSlice, Service};
pub use service_entry::ServiceEntry;
pub use sidecar::{CaptureMode, Sidecar, SidecarSpec};
