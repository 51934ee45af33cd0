//! Writing the agent's configuration directory: Pods (with the `sidecap.io/netns`
//! annotation naming the sandbox netns), Services, Sidecars, the mesh ConfigMap.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{Pod, TempDir};

pub struct MeshDir {
    dir: TempDir,
}

/// The istio-proxy container's fields that istio-cni reads (see [`MeshDir::pod_with_proxy`]).
#[derive(Clone, Debug, Default)]
pub struct ProxyContainer {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub env: Vec<(String, String)>,
}

impl MeshDir {
    pub fn new() -> MeshDir {
        MeshDir { dir: TempDir::new("mesh").expect("mesh config dir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes (or replaces) one file atomically, so the agent never reads half of it.
    pub fn write(&self, file: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
        path
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.path().join(file));
    }

    /// A meshed pod (istio-proxy container + `sidecar.istio.io/status`) in `namespace`,
    /// with the sandbox pod's addresses and netns, labels and extra annotations.
    pub fn pod(&self, pod: &Pod, namespace: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PathBuf {
        self.pod_with_proxy(pod, namespace, labels, annotations, &ProxyContainer::default())
    }

    /// Like [`MeshDir::pod`], with the istio-proxy container's `securityContext`
    /// (runAsUser/runAsGroup: istio-cni's proxy UID/GID) and `env` (e.g.
    /// `ISTIO_META_DNS_CAPTURE`).
    pub fn pod_with_proxy(
        &self,
        pod: &Pod,
        namespace: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
        proxy: &ProxyContainer,
    ) -> PathBuf {
        let mut y = String::new();
        let _ = writeln!(y, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {namespace}", pod.name());
        if !labels.is_empty() {
            y.push_str("  labels:\n");
            for (k, v) in labels {
                let _ = writeln!(y, "    {k}: {v:?}");
            }
        }
        y.push_str("  annotations:\n");
        let _ = writeln!(y, "    sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'");
        let _ = writeln!(y, "    sidecap.io/netns: {}", pod.netns().path().display());
        for (k, v) in annotations {
            let _ = writeln!(y, "    {k}: {v:?}");
        }
        y.push_str("spec:\n  containers:\n  - name: app\n  - name: istio-proxy\n");
        if proxy.run_as_user.is_some() || proxy.run_as_group.is_some() {
            y.push_str("    securityContext:\n");
            if let Some(u) = proxy.run_as_user {
                let _ = writeln!(y, "      runAsUser: {u}");
            }
            if let Some(g) = proxy.run_as_group {
                let _ = writeln!(y, "      runAsGroup: {g}");
            }
        }
        if !proxy.env.is_empty() {
            y.push_str("    env:\n");
            for (k, v) in &proxy.env {
                let _ = writeln!(y, "    - name: {k}\n      value: {v:?}");
            }
        }
        let _ = writeln!(y, "status:\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}", pod.ipv4(), pod.ipv4(), pod.ipv6());
        self.write(&format!("pod-{}.yaml", pod.name()), &y)
    }

    /// A ClusterIP Service with TCP ports `(name, port)`.
    pub fn service(&self, namespace: &str, name: &str, cluster_ip: IpAddr, ports: &[(&str, u16)]) -> PathBuf {
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {cluster_ip}\n  ports:\n"
        );
        for (pname, port) in ports {
            let _ = writeln!(y, "  - name: {pname}\n    port: {port}\n    protocol: TCP");
        }
        self.write(&format!("svc-{namespace}-{name}.yaml"), &y)
    }

    /// The `istio` ConfigMap with the mesh-wide outbound traffic policy.
    pub fn mesh_mode(&self, mode: &str) -> PathBuf {
        let y = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: {mode}\n"
        );
        self.write("mesh.yaml", &y)
    }
}

impl Default for MeshDir {
    fn default() -> Self {
        Self::new()
    }
}
