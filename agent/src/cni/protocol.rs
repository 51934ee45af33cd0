//! The plugin ↔ agent messages (one JSON line each way) and the CNI inputs they come from.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/var/run/sidecap/cni.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Add,
    Del,
    /// Is the container's capture still in place?
    Check,
    /// Is the agent ready for ADDs? (CNI 1.1)
    Status,
    /// Forget every container of `network` not in `valid` (CNI 1.1).
    Gc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// Empty on a DEL whose CNI_ARGS lack it (a DEL is keyed by `container_id` alone), and on
    /// STATUS/GC.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
    /// CNI_CONTAINERID: the key of the agent's CNI state, as the CNI spec keys attachments.
    #[serde(default)]
    pub container_id: String,
    /// CNI_NETNS (e.g. /var/run/netns/cni-…).
    pub netns: PathBuf,
    /// From the primary plugin's prevResult.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The network configuration's `name` (GC is per network).
    #[serde(default)]
    pub network: String,
    /// GC: the container ids still attached to `network` (`cni.dev/valid-attachments`).
    #[serde(default)]
    pub valid: Vec<String>,
}

impl Request {
    pub fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// What happened (ok) or why not (error), for the kubelet's event.
    pub message: String,
}

/// The plugin configuration key naming the namespace of pods whose runtime sends no
/// `K8S_POD_NAMESPACE` (podman, which sends only `K8S_POD_NAME`). Kubernetes runtimes always
/// send it, and then it wins: the key never overrides what Kubernetes says.
pub const POD_NAMESPACE_KEY: &str = "podNamespace";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("CNI_ARGS has no {0} (is this plugin chained by a Kubernetes runtime?)")]
    Missing(&'static str),
    #[error(
        "CNI_ARGS has no K8S_POD_NAMESPACE and the plugin configuration no \"podNamespace\" \
         (a runtime outside Kubernetes, e.g. podman: install with `sidecap install-cni --pod-namespace NS`)"
    )]
    NoNamespace,
}

/// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from CNI_ARGS (`K=V;K=V`); the
/// namespace falls back to `default_namespace` (the configuration's `podNamespace`) only
/// when CNI_ARGS has none.
pub fn pod_from_cni_args(args: &str, default_namespace: Option<&str>) -> Result<(String, String, Option<String>), ArgsError> {
    let get = |k: &str| args.split(';').find_map(|kv| kv.split_once('=').filter(|(key, _)| *key == k).map(|(_, v)| v.to_string()));
    let name = get("K8S_POD_NAME").ok_or(ArgsError::Missing("K8S_POD_NAME"))?;
    let ns = get("K8S_POD_NAMESPACE")
        .or_else(|| default_namespace.filter(|n| !n.is_empty()).map(String::from))
        .ok_or(ArgsError::NoNamespace)?;
    Ok((ns, name, get("K8S_POD_UID")))
}

/// The pod's addresses from a CNI prevResult (`ips[].address`, CIDR notation; 0.4+ and
/// 1.x results; `ip4`/`ip6` of 0.2 results).
pub fn ips_from_prev_result(prev: &serde_json::Value) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut push = |s: Option<&str>| {
        if let Some(ip) = s.and_then(|s| s.split('/').next()).and_then(|s| s.parse().ok()) {
            out.push(ip);
        }
    };
    for ip in prev["ips"].as_array().into_iter().flatten() {
        push(ip["address"].as_str());
    }
    for key in ["ip4", "ip6"] {
        push(prev[key]["ip"].as_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pod_from_cni_args() {
        let a = "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1";
        assert_eq!(pod_from_cni_args(a, None), Ok(("prod".into(), "web-0".into(), Some("u-1".into()))));
        assert_eq!(pod_from_cni_args("K8S_POD_NAME=x", None), Err(ArgsError::NoNamespace));
        assert_eq!(pod_from_cni_args("K8S_POD_NAMESPACE=x", Some("d")), Err(ArgsError::Missing("K8S_POD_NAME")));
    }

    #[test]
    fn the_configured_namespace_serves_only_runtimes_that_send_none() {
        // podman: only K8S_POD_NAME.
        let podman = "IgnoreUnknown=1;K8S_POD_NAME=web";
        assert_eq!(pod_from_cni_args(podman, Some("podman")), Ok(("podman".into(), "web".into(), None)));
        // Kubernetes always sends the namespace, and it wins over the configuration.
        let kube = "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web";
        assert_eq!(pod_from_cni_args(kube, Some("podman")), Ok(("prod".into(), "web".into(), None)));
        assert_eq!(pod_from_cni_args(podman, Some("")), Err(ArgsError::NoNamespace));
    }

    #[test]
    fn reads_ips_from_prev_results_of_every_version() {
        let v1 = serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}, {"address": "fd00::5/64"}]});
        assert_eq!(ips_from_prev_result(&v1), vec!["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        let v02 = serde_json::json!({"ip4": {"ip": "10.1.2.3/16"}});
        assert_eq!(ips_from_prev_result(&v02), vec!["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert!(ips_from_prev_result(&serde_json::json!({})).is_empty());
    }
}
