//! Istio's admission rules for `Sidecar`, with Istio's wording
//! (pkg/config/validation/validation.go `ValidateSidecar` and the helpers it calls).

mod files;
pub mod names;
mod pool;
pub mod ports;
mod tls;

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Protocol;
use crate::model::sidecar::{CaptureMode, OutboundTrafficPolicy, Sidecar, SidecarSpec, TrafficPolicyMode};

pub use files::{Finding, validate_paths};

use names::{go_quote, validate_sidecar_host};
use ports::{UNIX_PREFIX, validate_ip_address, validate_port, validate_port_name, validate_protocol, validate_unix_address};

/// Errors reject the object; warnings are printed by `kubectl apply` and let it through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validation {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Validation {
    pub fn error(&mut self, msg: impl Into<String>) {
        self.errors.push(msg.into());
    }
    pub fn warning(&mut self, msg: impl Into<String>) {
        self.warnings.push(msg.into());
    }
    fn result(&mut self, r: Result<(), String>) {
        if let Err(e) = r {
            self.errors.push(e);
        }
    }
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

pub fn validate_sidecar(sc: &Sidecar) -> Validation {
    validate_spec(sc.metadata.ns(), &sc.spec)
}

/// `ValidateSidecar` for a spec living in `namespace` (which `.` in hosts stands for).
pub fn validate_spec(namespace: &str, spec: &SidecarSpec) -> Validation {
    let mut v = Validation::default();

    // Selector errors end validation at once (Istio returns before anything else).
    if let Some(sel) = &spec.workload_selector {
        for (k, val) in &sel.labels {
            let kv = go_quote(&format!("{k}={val}"));
            if k.is_empty() {
                v.error(format!("empty key is not supported in selector: {kv}"));
            }
            if k.contains('*') || val.contains('*') {
                v.error(format!("wildcard is not supported in selector: {kv}"));
            }
        }
        if !v.errors.is_empty() {
            return v;
        }
        if sel.labels.is_empty() {
            v.warning("sidecar: workload selector specified without labels, will be applied to all services in namespace");
        }
    }

    if spec.egress.is_empty() && spec.ingress.is_empty() && spec.outbound_traffic_policy.is_none() && spec.inbound_connection_pool.is_none()
    {
        return Validation { errors: vec!["sidecar: empty configuration provided".into()], warnings: Vec::new() };
    }

    validate_ingress(spec, &mut v);
    pool::validate_connection_pool(spec.inbound_connection_pool.as_ref(), &mut v);
    validate_egress(namespace, spec, &mut v);
    if let Some(tp) = &spec.outbound_traffic_policy {
        validate_outbound_traffic_policy(tp, &mut v);
    }
    v
}

fn validate_ingress(spec: &SidecarSpec, v: &mut Validation) {
    let mut ports = BTreeSet::new();
    for ingress in &spec.ingress {
        let Some(i) = ingress else {
            v.error("sidecar: ingress may not be null");
            continue;
        };
        let Some(port) = &i.port else {
            v.error("sidecar: port is required for ingress listeners");
            continue;
        };
        if port.target_port > 0 {
            v.error("targetPort has no impact on Sidecars");
        }
        // validateSidecarIngressPortAndBind: a UDS bind is not an IP, so it is rejected here.
        if !port.name.is_empty() {
            v.result(validate_port_name(&port.name));
        }
        v.result(validate_protocol(&port.protocol));
        v.result(validate_port(i64::from(port.number)));
        if !i.bind.is_empty() {
            v.result(validate_ip_address(&i.bind));
        }
        if !ports.insert(port.number) {
            v.error("sidecar: ports on IP bound listeners must be unique");
        }
        if !i.default_endpoint.is_empty() {
            v.errors.extend(ports::validate_default_endpoint(&i.default_endpoint));
        }
        if let Some(t) = &i.tls {
            tls::validate_ingress_tls(t, &port.protocol, v);
        }
        pool::validate_connection_pool(i.connection_pool.as_ref(), v);
        if i.connection_pool.as_ref().is_some_and(|p| p.http.is_some()) && !Protocol::parse(&port.protocol).is_http() {
            v.warning(format!(
                "sidecar: HTTP connection pool settings are configured for port {} ({}) but its protocol is not HTTP ({}); only TCP settings will apply",
                port.number,
                go_quote(&port.name),
                port.protocol
            ));
        }
    }
}

fn validate_egress(namespace: &str, spec: &SidecarSpec, v: &mut Validation) {
    let mut ports = BTreeSet::new();
    let mut uds = BTreeSet::new();
    let mut catch_all_found = false;
    let last = spec.egress.len().saturating_sub(1);
    for (index, egress) in spec.egress.iter().enumerate() {
        let Some(e) = egress else {
            v.error("egress listener may not be null");
            continue;
        };
        match &e.port {
            None => {
                if catch_all_found {
                    v.error("sidecar: egress can have only one listener with empty port");
                    continue;
                }
                if index == last {
                    catch_all_found = true;
                } else {
                    v.error("sidecar: the egress listener with empty port should be the last listener in the list");
                }
            }
            Some(port) => {
                if port.target_port > 0 {
                    v.error("targetPort has no impact on Sidecars");
                }
                // validateSidecarEgressPortBindAndCaptureMode
                if !port.name.is_empty() {
                    v.result(validate_port_name(&port.name));
                }
                v.result(validate_protocol(&port.protocol));
                if port.number == 0 {
                    match e.bind.strip_prefix(UNIX_PREFIX) {
                        None => v.error("sidecar: ports with 0 value must have a unix domain socket bind address"),
                        Some(path) => v.result(validate_unix_address(path)),
                    }
                    if !matches!(e.capture_mode, CaptureMode::Default | CaptureMode::None) {
                        v.error("sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners");
                    }
                    if !uds.insert(e.bind.clone()) {
                        v.error("sidecar: unix domain socket values for listeners must be unique");
                    }
                } else {
                    v.result(validate_port(i64::from(port.number)));
                    if !e.bind.is_empty() {
                        v.result(validate_ip_address(&e.bind));
                    }
                    if !ports.insert(port.number) {
                        v.error("sidecar: ports on IP bound listeners must be unique");
                    }
                }
            }
        }
        validate_egress_hosts(namespace, &e.hosts, v);
    }
}

fn validate_egress_hosts(namespace: &str, hosts: &[String], v: &mut Validation) {
    if hosts.is_empty() {
        v.error("sidecar: egress listener must contain at least one host");
        return;
    }
    // namespace -> hosts imported from it, for the duplicate warnings (exclusions don't count).
    let mut by_ns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for hostname in hosts {
        if let Some((ns, svc)) = hostname.split_once('/') {
            if !ns.starts_with('~') {
                let ns = if ns == "." { namespace } else { ns };
                let seen = by_ns.entry(ns.to_string()).or_default();
                let dup = if svc != "*" { seen.contains(svc) || seen.contains("*") } else { !seen.is_empty() };
                if dup {
                    v.warning(format!("duplicated egress host: {hostname}"));
                }
                seen.insert(svc.to_string());
            }
        }
        v.errors.extend(validate_sidecar_host(hostname));
    }
    if by_ns.get("*").is_some_and(|s| s.contains("*")) && by_ns.len() != 1 {
        v.warning("`*/*` host select all resources, no other hosts can be added");
    }
}

fn validate_outbound_traffic_policy(tp: &OutboundTrafficPolicy, v: &mut Validation) {
    if tp.mode == TrafficPolicyMode::AllowAnyDynamicDns {
        v.error("sidecar: ALLOW_ANY_DYNAMIC_DNS mode is only supported in MeshConfig, not in Sidecar resource");
        return;
    }
    let Some(proxy) = &tp.egress_proxy else { return };
    if tp.mode != TrafficPolicyMode::AllowAny {
        v.error("sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode");
        return;
    }
    v.result(names::validate_fqdn(&proxy.host));
    let Some(port) = &proxy.port else {
        v.error("sidecar: egress_proxy port must be non-nil");
        return;
    };
    // validateDestination
    if proxy.host == "*" {
        v.error(format!("invalid destination host {}", proxy.host));
    } else {
        v.result(names::validate_wildcard_domain(&proxy.host));
    }
    if !proxy.subset.is_empty() && !names::is_dns1123_label(&proxy.subset) {
        v.error(format!("subset name is invalid: {}", proxy.subset));
    }
    v.result(validate_port(i64::from(port.number)));
}
