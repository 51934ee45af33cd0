//! sidecap's policy engine: Istio's `Sidecar` semantics and istio-init's capture knobs,
//! evaluated per pod and compiled into the kernel's map entries. Pure: no kernel, no I/O
//! beyond reading config files.
//!
//! Flow: `Cluster::load_paths` → `evaluate` (selection, host import, listeners, knobs) →
//! `PodPolicy::decide_*` / `compile` → `diff` between generations.

pub mod cluster;
pub mod compile;
pub mod engine;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod import;
pub mod knobs;
pub mod listeners;
pub mod model;
pub mod registry;
pub mod select;
pub mod validate;

pub use cluster::{Cluster, LoadError, PodRef};
pub use compile::{EntryCounts, Generation, GenerationDiff, MapDiff, compile, diff, with_ips};
pub use engine::{Action, AllowAnyMode, Decision, EngineOptions, PodPolicy, PolicyError, ScopeKey, Scopes, evaluate, evaluate_in};
pub use sidecap_common::{CidrKey, CidrRule, InPortKey, InPortRule, ListenerKey, ListenerRule, PodConfig, PortKey, PortRule};
