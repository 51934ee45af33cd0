//! sidecap: the node agent that replaces istio-init's iptables with eBPF.
//!
//! Data flows one way: sources (a directory of YAML here) → `sidecap_policy` (pure:
//! model, selection, listeners, compile) → [`datapath`] (thin: pinned maps and links) → kernel.

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod datapath;
pub mod inspect;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod source;
pub mod trace;
