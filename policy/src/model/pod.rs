//! Kubernetes `Pod` (the parts istio-cni reads) and `Namespace`.

use serde::Deserialize;

use super::meta::ObjectMeta;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<Container>,
    /// Native sidecars (`restartPolicy: Always`) put `istio-proxy` here.
    pub init_containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub env: Vec<EnvVar>,
    pub security_context: Option<SecurityContext>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    pub container_statuses: Vec<ContainerStatus>,
    /// Native sidecars (`restartPolicy: Always`) report here.
    pub init_container_statuses: Vec<ContainerStatus>,
}

/// The part of a container's status the agent reads: which container runs now.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    /// `<runtime>://<id>` (e.g. `containerd://0123…`); absent until the container is created.
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PodIp {
    pub ip: String,
}

impl Pod {
    /// All containers, init containers first (as istio-cni's `containers()` lists them).
    pub fn all_containers(&self) -> impl Iterator<Item = &Container> {
        self.spec.init_containers.iter().chain(self.spec.containers.iter())
    }

    pub fn proxy_container(&self) -> Option<&Container> {
        self.all_containers().find(|c| c.name == "istio-proxy")
    }

    /// The running `istio-proxy` container's id without its `<runtime>://` scheme, from
    /// `containerStatuses` or (native sidecar) `initContainerStatuses`.
    pub fn proxy_container_id(&self) -> Option<&str> {
        let st = &self.status;
        let s = st.init_container_statuses.iter().chain(&st.container_statuses).find(|c| c.name == "istio-proxy")?;
        let id = s.container_id.as_deref()?;
        let id = id.split_once("://").map_or(id, |(_, id)| id);
        (!id.is_empty()).then_some(id)
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Namespace {
    pub metadata: ObjectMeta,
}
