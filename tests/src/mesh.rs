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
        let _ = writeln!(
            y,
            "spec:\n  containers:\n  - name: app\n  - name: istio-proxy\nstatus:\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}",
            pod.ipv4(),
            pod.ipv4(),
            pod.ipv6()
        );
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
