//! Where the cluster's objects come from. A source hands the agent whole snapshots
//! (`sidecap_policy::Cluster`); the agent diffs what it compiles, not what it reads.

pub mod dir;
pub mod kube;

use std::time::Duration;

use sidecap_policy::Cluster;

/// A configuration source: a directory of YAML, or the Kubernetes API.
pub trait Source: Send {
    /// Waits up to `timeout` for a change. `Some(Ok)` is a new complete snapshot,
    /// `Some(Err)` a rejected one (the caller keeps the previous), `None` no change.
    fn next(&mut self, timeout: Duration) -> Option<Result<Cluster, String>>;

    /// True once the source has delivered a complete view at least once.
    fn synced(&self) -> bool;

    /// What to call it in logs.
    fn describe(&self) -> String;
}
