//! A node-like attach for the *host process* case: an agent of its own with `--cgroup` on a
//! cgroup standing for the node's root and `--pods-cgroup` on its `kubepods` child, as the
//! DaemonSet's default places the programs (no pods configured). A process in the first
//! but not the second is what kubelet, the container runtime or a node daemon is: it runs
//! connect4 (and sendmsg), never sockops, getsockopt or recvmsg.

use std::time::Duration;

use sidecap_tests::{Agent, BpfPinDir, MeshDir, TestCgroup};

pub struct NodeAttach {
    // Field order is drop order: the agent, then its config, pins and cgroups.
    agent: Agent,
    _mesh: MeshDir,
    pub pins: BpfPinDir,
    _pods: TestCgroup,
    pub node: TestCgroup,
}

impl NodeAttach {
    pub fn start() -> anyhow::Result<NodeAttach> {
        let node = TestCgroup::new("bench-node")?;
        let pods = node.child("kubepods")?;
        let pins = BpfPinDir::new("bench-node")?;
        let mesh = MeshDir::new();
        let pods_arg = pods.path().display().to_string();
        let mut agent = Agent::start(node.path(), pins.path(), mesh.path(), &["--pods-cgroup", &pods_arg]);
        agent.wait_ready(Duration::from_secs(30));
        let log = agent.log();
        if !log.contains(&format!("pods_cgroup={pods_arg}")) {
            anyhow::bail!("the node agent did not place its observers on {pods_arg}: {log}");
        }
        Ok(NodeAttach { agent, _mesh: mesh, pins, _pods: pods, node })
    }

    /// Panics (with the agent's log) when the agent has died.
    pub fn assert_running(&mut self) {
        self.agent.assert_running();
    }
}
