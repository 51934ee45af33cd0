//! A ready sandbox: pods, the services netns, and the real `sidecap agent` running on it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use crate::{Agent, BpfPinDir, MeshDir, Pod, Topology};

/// Service addresses every fixture has (in the services netns).
pub const SVC: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 10);
pub const SVC2: Ipv4Addr = Ipv4Addr::new(10, 251, 100, 20);
pub const SVC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5ca9, 0, 0, 0, 0, 0x100, 0x10);
/// How long to wait for the agent to install a pod's policy.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Mesh {
    pub topo: Topology,
    pub mesh: MeshDir,
    pub agent: Agent,
    // Declared last: dropped after the agent, so pins go once it is dead.
    pub pins: BpfPinDir,
}

/// What a fixture starts with.
pub struct MeshSpec<'a> {
    pub pods: &'a [&'a str],
    /// Annotations on every pod.
    pub annotations: &'a [(&'a str, &'a str)],
    /// Extra files for the config dir before the agent starts: (file name, YAML).
    pub files: &'a [(&'a str, &'a str)],
    /// Extra `sidecap agent` flags.
    pub agent_args: &'a [&'a str],
}

impl Default for MeshSpec<'_> {
    fn default() -> Self {
        MeshSpec { pods: &["a"], annotations: &[], files: &[], agent_args: &[] }
    }
}

impl Mesh {
    /// Pods (meshed, namespace `default`, label `app: <name>`), services `web` (SVC:80,8082),
    /// `web2` (SVC2:80) and `web6` (SVC6:80).
    pub fn start(spec: MeshSpec<'_>) -> Mesh {
        let mut b = Topology::builder();
        for n in spec.pods {
            b = b.pod(n);
        }
        let topo = b.service_addr(SVC).service_addr(SVC2).service_addr(SVC6).build().expect("topology");
        let mesh = MeshDir::new();
        for p in topo.pods() {
            mesh.pod(p, "default", &[("app", p.name())], spec.annotations);
        }
        mesh.service("default", "web", IpAddr::from(SVC), &[("tcp-web", 80), ("tcp-alt", 8082)]);
        mesh.service("default", "web2", IpAddr::from(SVC2), &[("tcp-web", 80)]);
        mesh.service("default", "web6", IpAddr::from(SVC6), &[("tcp-web", 80)]);
        for (name, yaml) in spec.files {
            mesh.write(name, yaml);
        }
        let pins = BpfPinDir::new("e2e").expect("bpffs pin dir");
        let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), spec.agent_args);
        let cookies: Vec<u64> = topo.pods().iter().map(|p| p.cookie().expect("cookie")).collect();
        agent.wait_pods(&cookies, 1, WAIT);
        Mesh { topo, mesh, agent, pins }
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    /// `inspect` output for one pod.
    pub fn inspect_pod(&self, pod: &Pod) -> serde_json::Value {
        let cookie = pod.cookie().expect("cookie");
        let v = crate::inspect(self.pins.path());
        v.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["netns_cookie"].as_u64() == Some(cookie))
            .cloned()
            .unwrap_or_else(|| panic!("pod {} not in inspect: {v:#}", pod.name()))
    }

    /// Waits until the agent has written generation `n` (or later) for `pod`.
    pub fn wait_generation(&mut self, pod_name: &str, n: u64) {
        let cookie = self.topo.pod(pod_name).cookie().expect("cookie");
        self.agent.wait_pods(&[cookie], n, WAIT);
    }
}
