//! The service registry istiod would build: Kubernetes Services (pilot/pkg/serviceregistry/kube
//! `ConvertService`) and ServiceEntries (serviceentry `convertServices`, one per host × address).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::cluster::Cluster;
use crate::model::{Cidr, EndpointSlice, Protocol};

/// Istio's `DomainSuffix` default.
pub const DOMAIN_SUFFIX: &str = "cluster.local";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registry {
    Kubernetes,
    External,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    ClientSideLb,
    /// Headless Services, ServiceEntry `resolution: NONE`.
    Passthrough,
    Dns,
    /// ExternalName Services: no listener.
    Alias,
}

/// Where a service listens: a VIP, a CIDR (ServiceEntry addresses), or nowhere (`0.0.0.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvcAddress {
    Vip(IpAddr),
    Cidr(Cidr),
    Unspecified,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug)]
pub struct ServiceView {
    pub hostname: String,
    pub namespace: String,
    /// `NS/NAME` of the object it came from (the ServiceEntry's name for SEs).
    pub origin: String,
    pub registry: Registry,
    pub resolution: Resolution,
    /// Istio's `DefaultAddress`: `spec.clusterIP` (`clusterIPs[0]`), a ServiceEntry address.
    pub address: SvcAddress,
    /// Kubernetes `ClusterVIPs`: every `clusterIPs` entry in order (dual-stack Services have
    /// two); empty for ServiceEntries, which only have `address`.
    pub cluster_vips: Vec<IpAddr>,
    pub ports: Vec<SvcPort>,
    /// Endpoint addresses with the port names they serve (empty list: every port).
    pub endpoints: Vec<(IpAddr, Vec<String>)>,
    /// ServiceEntry `workloadSelector` set (its endpoints come from workloads).
    pub has_label_selector: bool,
    pub export_to: Vec<String>,
    pub created: i64,
}

impl ServiceView {
    /// `IsServiceVisible`: exportTo `*`, `.` (own namespace), a namespace name; `~` hides it.
    pub fn visible_to(&self, ns: &str, mesh_default: &[String]) -> bool {
        let set = if self.export_to.is_empty() { mesh_default } else { &self.export_to };
        set.iter().any(|e| e == "*" || (e == "." && self.namespace == ns) || e == ns)
    }

    /// Endpoint addresses serving service port `port` (`ServiceEndpointsByPort`).
    pub fn endpoints_for(&self, port: &SvcPort) -> Vec<IpAddr> {
        self.endpoints
            .iter()
            .filter(|(_, names)| names.is_empty() || names.contains(&port.name))
            .map(|(ip, _)| *ip)
            .collect()
    }
}

/// Every service in the cluster, oldest first (then hostname, namespace), as istiod orders them.
pub fn build(cluster: &Cluster) -> Vec<ServiceView> {
    let mut out = Vec::new();
    // EndpointSlices by (namespace, service-name), so that each Service finds its own
    // without scanning all of them (10,000 Services × 20,000 slices otherwise).
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for es in &cluster.endpoint_slices {
        if let Some(svc) = es.obj.service_name() {
            slices.entry((es.obj.metadata.ns(), svc)).or_default().push(&es.obj);
        }
    }
    for s in &cluster.services {
        let own = slices.get(&(s.obj.metadata.ns(), s.obj.metadata.name.as_str())).map(Vec::as_slice).unwrap_or_default();
        out.push(from_kube(own, &s.obj));
    }
    for se in &cluster.service_entries {
        out.extend(from_service_entry(cluster, &se.obj));
    }
    out.sort_by(|a, b| (a.created, &a.hostname, &a.namespace).cmp(&(b.created, &b.hostname, &b.namespace)));
    out
}

fn port_u16(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// `svc` with `slices`, the EndpointSlices naming it.
fn from_kube(slices: &[&EndpointSlice], svc: &crate::model::Service) -> ServiceView {
    let ns = svc.metadata.ns().to_string();
    let name = &svc.metadata.name;
    let spec = &svc.spec;
    let mut resolution = Resolution::ClientSideLb;
    if spec.type_.as_deref() == Some("ExternalName") && spec.external_name.as_deref().is_some_and(|e| !e.is_empty()) {
        resolution = Resolution::Alias;
    }
    // ConvertService: addrs = [clusterIP], or every clusterIPs entry when there are several.
    let mut address = SvcAddress::Unspecified;
    let mut cluster_vips = Vec::new();
    match spec.cluster_ip.as_deref() {
        Some("None") => resolution = Resolution::Passthrough,
        Some(ip) if !ip.is_empty() => {
            let addrs: Vec<&str> =
                if spec.cluster_ips.len() > 1 { spec.cluster_ips.iter().map(String::as_str).collect() } else { vec![ip] };
            cluster_vips = addrs.iter().filter_map(|a| a.parse::<IpAddr>().ok()).collect();
            if let Some(first) = addrs.first().and_then(|a| a.parse::<IpAddr>().ok()) {
                address = SvcAddress::Vip(first);
            }
        }
        _ => {}
    }
    let ports = spec
        .ports
        .iter()
        .filter_map(|p| {
            Some(SvcPort {
                name: p.name.clone(),
                port: port_u16(p.port)?,
                protocol: Protocol::from_kube_port(p.port, &p.name, p.protocol.as_deref(), p.app_protocol.as_deref()),
            })
        })
        .collect();
    let mut endpoints = Vec::new();
    for es in slices {
        let names: Vec<String> = es.ports.iter().map(|p| p.name.clone().unwrap_or_default()).collect();
        for ep in &es.endpoints {
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    endpoints.push((ip, names.clone()));
                }
            }
        }
    }
    let export_to = svc
        .metadata
        .annotations
        .get("networking.istio.io/exportTo")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    ServiceView {
        hostname: format!("{name}.{ns}.svc.{DOMAIN_SUFFIX}"),
        namespace: ns.clone(),
        origin: format!("{ns}/{name}"),
        registry: Registry::Kubernetes,
        resolution,
        address,
        cluster_vips,
        ports,
        endpoints,
        has_label_selector: spec.selector.is_some(),
        export_to,
        created: svc.metadata.created(),
    }
}

fn from_service_entry(cluster: &Cluster, se: &crate::model::ServiceEntry) -> Vec<ServiceView> {
    let ns = se.metadata.ns().to_string();
    let spec = &se.spec;
    let resolution = match spec.resolution.as_deref().unwrap_or("NONE") {
        "STATIC" => Resolution::ClientSideLb,
        "DNS" | "DNS_ROUND_ROBIN" | "DYNAMIC_DNS" => Resolution::Dns,
        _ => Resolution::Passthrough,
    };
    let ports: Vec<SvcPort> = spec
        .ports
        .iter()
        .filter_map(|p| Some(SvcPort { name: p.name.clone(), port: port_u16(p.number)?, protocol: Protocol::parse(&p.protocol) }))
        .collect();
    let mut endpoints: Vec<(IpAddr, Vec<String>)> =
        spec.endpoints.iter().filter_map(|e| e.address.parse::<IpAddr>().ok().map(|ip| (ip, Vec::new()))).collect();
    if let Some(sel) = &spec.workload_selector {
        // Workloads selected by the ServiceEntry are its endpoints (pods here).
        for p in &cluster.pods {
            let p = &p.obj;
            if p.metadata.ns() == ns && sel.labels.iter().all(|(k, v)| p.metadata.labels.get(k) == Some(v)) {
                for ip in crate::knobs::pod_ips(p) {
                    endpoints.push((ip, Vec::new()));
                }
            }
        }
    }
    // One service per host × address, CIDRs kept as CIDRs (a /32 becomes its address).
    let mut addresses = Vec::new();
    for a in &spec.addresses {
        if let Ok(ip) = a.parse::<IpAddr>() {
            addresses.push(SvcAddress::Vip(ip));
        } else if let Ok(c) = a.parse::<Cidr>() {
            let full = if c.addr.is_ipv4() { 32 } else { 128 };
            addresses.push(if c.len == full { SvcAddress::Vip(c.addr) } else { SvcAddress::Cidr(c) });
        }
    }
    if spec.addresses.is_empty() {
        addresses.push(SvcAddress::Unspecified);
    }
    let mut out = Vec::new();
    for h in &spec.hosts {
        for a in &addresses {
            out.push(ServiceView {
                hostname: h.clone(),
                namespace: ns.clone(),
                origin: format!("{ns}/{}", se.metadata.name),
                registry: Registry::External,
                resolution,
                address: *a,
                cluster_vips: Vec::new(),
                ports: ports.clone(),
                endpoints: endpoints.clone(),
                has_label_selector: spec.workload_selector.is_some(),
                export_to: spec.export_to.clone(),
                created: se.metadata.created(),
            });
        }
    }
    out
}

/// Namespace → services, for callers that want grouping.
pub fn by_namespace(services: &[ServiceView]) -> BTreeMap<&str, Vec<&ServiceView>> {
    let mut m: BTreeMap<&str, Vec<&ServiceView>> = BTreeMap::new();
    for s in services {
        m.entry(s.namespace.as_str()).or_default().push(s);
    }
    m
}
