//! sidecap's test sandbox: network namespaces as "pods", a "services" netns with upstream
//! servers, per-pod cgroups, processes spawned into a pod as a given uid, the `sc-probe`
//! client/server, and HAProxy as a stand-in sidecar. See tests/README.md.
//!
//! Safety: everything lives in namespaces and cgroups the test created, joined by veths
//! that never touch the root netns; only 127/8, ::1, 10.251.0.0/16 and fd00:5ca9::/64 are
//! ever used; everything is removed on Drop (also when a test panics).

pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod cni;
pub mod differential;
pub mod fixture;
pub mod haproxy;
pub mod mesh;
pub mod netns;
pub mod probe;
pub mod process;
pub mod rawprog;
pub mod sockaddr;
pub mod socklb;
pub mod topology;
pub mod upstream;
pub mod util;

pub use agent::{Agent, inspect, sidecap, sidecap_bin};
pub use bpffs::{BpfPinDir, bpffs_mount};
pub use cgroup::{TestCgroup, cgroup2_mount};
pub use fixture::{Mesh, MeshSpec};
pub use haproxy::{Haproxy, HaproxyConfig, HaproxyLogEntry, OutboundBackend};
pub use mesh::{MeshDir, ProxyContainer};
pub use netns::{Netns, current_netns_cookie};
pub use probe::{ConnectOpts, ConnectResult, ListenConn, Probe, ProbeListener};
pub use process::{Creds, Spawned, spawn_in, spawn_with};
pub use topology::{Pod, Topology, TopologyBuilder};
pub use upstream::{Upstream, UpstreamConn};
pub use util::{TempDir, is_allowed_addr, is_root, set_name_prefix, unique_name, wait_until};
