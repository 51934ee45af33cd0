//! `networking.istio.io` `ServiceEntry`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::meta::ObjectMeta;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<ServiceEntryPort>,
    pub location: Option<String>,
    /// NONE (passthrough), STATIC, DNS, DNS_ROUND_ROBIN, DYNAMIC_DNS; absent = NONE.
    pub resolution: Option<String>,
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<super::sidecar::WorkloadSelector>,
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceEntryPort {
    pub number: u32,
    pub protocol: String,
    pub name: String,
    pub target_port: u32,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: String,
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
}
