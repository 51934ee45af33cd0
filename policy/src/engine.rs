//! Per-pod policy: the governing Sidecar, imported services, listeners and capture knobs, and
//! the decision for any outbound destination or inbound port (docs/kernel-contract.md).

mod decide;
pub mod scope;

use std::net::IpAddr;

use serde::Serialize;

use crate::cluster::{Cluster, PodRef};
use crate::import::{self, Imported};
use crate::knobs::{self, KnobError, Knobs, ProxyIdentity};
use crate::listeners::{self, BuildContext, OutboundListener};
use crate::model::OutboundMode;
use crate::model::sidecar::{CaptureMode, EgressListener, TrafficPolicyMode};
use crate::registry::{self, ServiceView};
use crate::select;

pub use scope::{ScopeKey, Scopes};

/// What ALLOW_ANY does with a destination no listener matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowAnyMode {
    /// Straight to the destination, not through Envoy (the seed article's "透传").
    #[default]
    Passthrough,
    /// Through Envoy's PassthroughCluster, as Istio does (telemetry for unknown destinations).
    Capture,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineOptions {
    pub allow_any: AllowAnyMode,
    /// The node's proxy identity; a pod's `sidecap.io/proxy-identity` overrides it.
    pub proxy_identity: ProxyIdentity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Capture,
    Passthrough,
    Drop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Capture => "capture",
            Action::Passthrough => "passthrough",
            Action::Drop => "drop",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

impl Decision {
    fn new(action: Action, reason: impl Into<String>) -> Decision {
        Decision { action, reason: reason.into() }
    }
}

/// One service port a pod imported: `NS/HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ImportedService {
    pub namespace: String,
    pub hostname: String,
    pub port: u16,
}

impl std::fmt::Display for ImportedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.hostname, self.port)
    }
}

/// A Sidecar ingress listener's capture decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IngressPort {
    pub port: u16,
    pub captured: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodPolicy {
    pub pod: PodRef,
    /// `NS/NAME` of the governing Sidecar; None for the implicit default.
    pub sidecar: Option<String>,
    pub outbound_traffic_policy: OutboundMode,
    pub allow_any: AllowAnyMode,
    /// How the kernel recognises this pod's proxy (annotation, else the node's option).
    pub proxy_identity: ProxyIdentity,
    pub listeners: Vec<OutboundListener>,
    pub services: Vec<ImportedService>,
    pub knobs: Knobs,
    pub ingress: Vec<IngressPort>,
    pub ips: Vec<IpAddr>,
    /// From annotation `sidecap.io/netns` (e.g. `/run/netns/NAME`); what the agent attaches to.
    pub netns: Option<String>,
    pub meshed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("pod {0} not found")]
    PodNotFound(PodRef),
    #[error("pod {pod}: {source}")]
    Knob { pod: PodRef, source: KnobError },
    #[error("pod {pod}: Sidecar {sidecar} could govern it but cannot be read ({reason}); its previous policy stays")]
    Held { pod: PodRef, sidecar: String, reason: String },
}

/// Evaluates one pod exactly as istiod (SidecarScope, listeners) and istio-cni (capture knobs)
/// would, so that `decide_*` answers like istio-init + Envoy.
pub fn evaluate(cluster: &Cluster, pod_ref: &PodRef, opts: &EngineOptions) -> Result<PodPolicy, PolicyError> {
    evaluate_in(cluster, &registry::build(cluster), pod_ref, opts)
}

/// [`evaluate`] with the service registry built once (`registry::build(cluster)`) and
/// shared by every pod of a pass: building it is most of the cost at 10,000 services.
pub fn evaluate_in(cluster: &Cluster, registry: &[ServiceView], pod_ref: &PodRef, opts: &EngineOptions) -> Result<PodPolicy, PolicyError> {
    let pod = cluster.pod(pod_ref).ok_or_else(|| PolicyError::PodNotFound(pod_ref.clone()))?;
    let knobs = knobs::from_pod(pod, &cluster.mesh).map_err(|source| PolicyError::Knob { pod: pod_ref.clone(), source })?;
    if let Some(h) = select::held(cluster, &pod_ref.namespace, &pod.metadata.labels) {
        return Err(PolicyError::Held { pod: pod_ref.clone(), sidecar: h.key(), reason: h.reason.clone() });
    }
    let ips = knobs::pod_ips(pod);
    let selected = select::select(cluster, &pod_ref.namespace, &pod.metadata.labels);
    let config_ns = selected.config_namespace.as_str();

    let visible: Vec<&ServiceView> = registry.iter().filter(|s| s.visible_to(config_ns, &cluster.mesh.default_service_export_to)).collect();

    // A Sidecar without egress gets a `*/*` catch-all; so does the implicit default.
    let spec = selected.sidecar.map(|s| &s.obj.spec);
    let egress: Vec<&EgressListener> = spec.map(|s| s.egress.iter().flatten().collect()).unwrap_or_default();
    let default_hosts = vec!["*/*".to_string()];
    let mut per_listener: Vec<(Option<&EgressListener>, Vec<Imported<'_>>)> = Vec::new();
    if egress.is_empty() {
        per_listener.push((None, import::import(&visible, &default_hosts, None, config_ns)));
    } else {
        for e in egress {
            let port = e.port.as_ref().map(|p| (p.number, p.protocol.as_str()));
            per_listener.push((Some(e), import::import(&visible, &e.hosts, port, config_ns)));
        }
    }

    // Sorted and deduplicated as borrowed names, then copied once (the default mesh imports
    // every service: 20,000 entries at 10,000 Services).
    let mut names: Vec<(&str, &str, u16)> = per_listener
        .iter()
        .flat_map(|(_, imps)| imps.iter())
        .flat_map(|i| i.ports.iter().map(|p| (i.svc.namespace.as_str(), i.svc.hostname.as_str(), p.port)))
        .collect();
    names.sort_unstable();
    names.dedup();
    let services: Vec<ImportedService> = names
        .into_iter()
        .map(|(namespace, hostname, port)| ImportedService { namespace: namespace.to_string(), hostname: hostname.to_string(), port })
        .collect();

    let listeners = listeners::build(&BuildContext {
        interception_none: knobs.interception == knobs::Interception::None,
        ip_mode: listeners::IpMode::of(&ips),
        pod_ip: ips.first().copied(),
        egress: per_listener,
    });

    // pilot/pkg/model/sidecar.go `convertToSidecarScope`: a Sidecar's outboundTrafficPolicy is
    // used whenever present (`{}` is REGISTRY_ONLY, the mode's zero value); else the mesh's.
    let outbound_traffic_policy = match spec.and_then(|s| s.outbound_traffic_policy.as_ref()) {
        Some(tp) => match tp.mode {
            TrafficPolicyMode::RegistryOnly => OutboundMode::RegistryOnly,
            _ => OutboundMode::AllowAny,
        },
        None => cluster.mesh.outbound_mode(),
    };

    let ingress = spec
        .map(|s| {
            s.ingress
                .iter()
                .flatten()
                .filter_map(|i| {
                    let port = u16::try_from(i.port.as_ref()?.number).ok()?;
                    Some(IngressPort { port, captured: i.capture_mode != CaptureMode::None })
                })
                .collect()
        })
        .unwrap_or_default();

    Ok(PodPolicy {
        pod: pod_ref.clone(),
        sidecar: selected.sidecar.map(|s| s.obj.metadata.key()),
        outbound_traffic_policy,
        allow_any: opts.allow_any,
        proxy_identity: knobs.proxy_identity.unwrap_or(opts.proxy_identity),
        listeners,
        services,
        knobs,
        ingress,
        ips,
        netns: pod.metadata.annotations.get(knobs::ANN_NETNS).cloned(),
        meshed: knobs::is_meshed(pod),
    })
}
