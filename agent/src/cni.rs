//! The chained CNI plugin's side channel: `sidecap-cni` hands a new pod's netns (and the IPs
//! the primary plugin gave it) to the agent over a unix socket and waits until the pod's
//! capture is in place, so the app's first packet is already captured — the guarantee
//! istio-init gives by running first. What it was told is kept by container id, as the CNI
//! spec keys attachments (`state`).

pub mod install;
pub mod protocol;
pub mod server;
pub mod state;

pub use protocol::{Reply, Request};
