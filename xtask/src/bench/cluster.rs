//! Synthetic clusters for the control-plane scenario: S services (two ports each: HTTP 80
//! and a TCP port) in up to 100 namespaces, P meshed pods spread over the namespaces, and
//! either one namespace-wide Sidecar per namespace (egress `./*` and `istio-system/*`, as
//! teams restrict their pods) or none at all (Istio's default mesh: every pod imports every
//! service). Addresses are config only (never contacted), inside 10.251.0.0/16.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

pub struct Spec {
    pub pods: usize,
    pub services: usize,
    /// One Sidecar per namespace (scoped); false: the default mesh.
    pub sidecars: bool,
}

impl Spec {
    pub fn namespaces(&self) -> usize {
        (self.services / 100).clamp(1, 100)
    }
}

fn ns(i: usize) -> String {
    format!("ns-{i:03}")
}

/// The Sidecar of namespace `i`; `wide` also imports the next namespace and switches to
/// REGISTRY_ONLY (the change whose convergence is measured).
pub fn sidecar(i: usize, wide: bool) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\n  namespace: {}\nspec:\n  outboundTrafficPolicy:\n    mode: {}\n  egress:\n  - hosts:\n    - \"./*\"\n    - \"istio-system/*\"\n",
        ns(i),
        if wide { "REGISTRY_ONLY" } else { "ALLOW_ANY" }
    );
    if wide {
        let _ = writeln!(y, "    - \"{}/*\"", ns(i + 1));
    }
    y
}

/// One meshed pod, in the format the agent's directory source reads.
pub fn pod(i: usize, namespace: &str, netns: &str) -> String {
    let ip = format!("10.251.{}.{}", 192 + i / 256, i % 256);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i:04}\n  namespace: {namespace}\n  labels:\n    app: pod-{i:04}\n  annotations:\n    sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'\n    sidecap.io/netns: {netns}\nspec:\n  containers:\n  - name: app\n  - name: istio-proxy\nstatus:\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n"
    )
}

/// Writes the cluster into `dir`; pod i's netns annotation is `netns(i)`. Returns the
/// Sidecar file to toggle, with its two variants beside it (`.a` as written, `.b` wide).
pub fn write(dir: &Path, spec: &Spec, netns: &dyn Fn(usize) -> String) -> anyhow::Result<PathBuf> {
    let nss = spec.namespaces();
    let mut per_ns: Vec<String> = vec![String::new(); nss];
    for s in 0..spec.services {
        let i = 128 * 256 + s; // 10.251.128.0 onwards
        let _ = write!(
            per_ns[s % nss],
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s:05}\n  namespace: {}\nspec:\n  clusterIP: 10.251.{}.{}\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n  - name: tcp-grpc\n    port: {}\n    protocol: TCP\n",
            ns(s % nss),
            i / 256,
            i % 256,
            7000 + s % 100
        );
    }
    for (i, text) in per_ns.iter().enumerate() {
        std::fs::write(dir.join(format!("services-{}.yaml", ns(i))), text)?;
        if spec.sidecars {
            std::fs::write(dir.join(format!("sidecar-{}.yaml", ns(i))), sidecar(i, false))?;
        }
    }
    let mut pods = String::new();
    for p in 0..spec.pods {
        pods.push_str("---\n");
        pods.push_str(&pod(p, &ns(p % nss), &netns(p)));
    }
    std::fs::write(dir.join("pods.yaml"), pods)?;
    let toggle = dir.join(format!("sidecar-{}.yaml", ns(0)));
    std::fs::write(toggle.with_extension("a"), sidecar(0, false))?;
    std::fs::write(toggle.with_extension("b"), sidecar(0, true))?;
    Ok(toggle)
}
