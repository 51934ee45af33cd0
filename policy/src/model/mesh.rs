//! Mesh config as Istio stores it: ConfigMap `istio` (in `istio-system`), key `mesh`, a YAML
//! document of its own.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::meta::ObjectMeta;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ConfigMap {
    pub metadata: ObjectMeta,
    pub data: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
pub enum OutboundMode {
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
    /// Istio's default.
    #[default]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
}

impl OutboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundMode::RegistryOnly => "REGISTRY_ONLY",
            OutboundMode::AllowAny => "ALLOW_ANY",
        }
    }
}

/// The fields of `MeshConfig` sidecap uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct MeshConfig {
    pub outbound_traffic_policy: MeshOutboundPolicy,
    pub root_namespace: String,
    /// Services without `exportTo` are visible here (`*` = everywhere, `.` = own namespace).
    pub default_service_export_to: Vec<String>,
    pub default_config: ProxyConfig,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct MeshOutboundPolicy {
    /// A string so that `ALLOW_ANY_DYNAMIC_DNS` (ALLOW_ANY for capture purposes) loads.
    pub mode: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ProxyConfig {
    pub proxy_metadata: BTreeMap<String, String>,
}

impl Default for MeshConfig {
    fn default() -> MeshConfig {
        MeshConfig {
            outbound_traffic_policy: MeshOutboundPolicy::default(),
            root_namespace: "istio-system".to_string(),
            default_service_export_to: vec!["*".to_string()],
            default_config: ProxyConfig::default(),
        }
    }
}

impl MeshConfig {
    pub fn outbound_mode(&self) -> OutboundMode {
        if self.outbound_traffic_policy.mode == "REGISTRY_ONLY" { OutboundMode::RegistryOnly } else { OutboundMode::AllowAny }
    }
}
