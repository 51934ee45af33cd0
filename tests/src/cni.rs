//! Calls to the chained plugin `sidecap-cni`, exactly as a container runtime makes them.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::agent::sidecap_bin;

pub fn plugin_bin() -> PathBuf {
    sidecap_bin().with_file_name("sidecap-cni")
}

/// The network configuration a runtime hands the plugin, with the primary's result.
pub fn conf(socket: &Path, prev_ips: &[&str]) -> serde_json::Value {
    let ips: Vec<serde_json::Value> = prev_ips.iter().map(|ip| serde_json::json!({"address": ip})).collect();
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "sidecap-cni",
        "socketPath": socket,
        "prevResult": {"cniVersion": "1.0.0", "ips": ips},
    })
}

/// One plugin call with exactly these CNI_* variables (besides CNI_COMMAND, CNI_IFNAME and
/// CNI_PATH); returns (exit code, stdout as JSON or Null).
pub fn call(command: &str, env: &[(&str, &str)], conf: &serde_json::Value) -> (i32, serde_json::Value) {
    let mut child = Command::new(plugin_bin())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sidecap-cni (built with the agent)");
    // The plugin may exit before reading everything (an early error): ignore EPIPE.
    let _ = child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes());
    let out = child.wait_with_output().expect("sidecap-cni output");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

/// A Kubernetes runtime's call for container `id` of pod `ns/pod` in `netns`.
pub fn kube(command: &str, ns: &str, pod: &str, id: &str, netns: &Path, socket: &Path, prev_ips: &[&str]) -> (i32, serde_json::Value) {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={id}");
    let netns = netns.display().to_string();
    call(command, &[("CNI_CONTAINERID", id), ("CNI_NETNS", &netns), ("CNI_ARGS", &args)], &conf(socket, prev_ips))
}
