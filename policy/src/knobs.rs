//! Capture knobs from pod annotations with istio-cni's defaults
//! (cni/pkg/plugin/sidecar_redirect.go `NewRedirect`, cni/pkg/plugin/kubernetes.go
//! `ExtractPodInfo`), and which pods are meshed at all.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Serialize;

use crate::model::{Cidr, MeshConfig, Pod};

pub const ANN_STATUS: &str = "sidecar.istio.io/status";
pub const ANN_INJECT: &str = "sidecar.istio.io/inject";
pub const ANN_INTERCEPTION: &str = "sidecar.istio.io/interceptionMode";
pub const ANN_STATUS_PORT: &str = "status.sidecar.istio.io/port";
pub const ANN_INCLUDE_CIDRS: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const ANN_EXCLUDE_CIDRS: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const ANN_INCLUDE_IN_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const ANN_EXCLUDE_IN_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const ANN_INCLUDE_OUT_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const ANN_EXCLUDE_OUT_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const ANN_NETNS: &str = "sidecap.io/netns";
/// `uid` or `cgroup`: how this pod's proxy is recognised (overrides `--proxy-identity`).
pub const ANN_PROXY_IDENTITY: &str = "sidecap.io/proxy-identity";
/// The proxy container's cgroup v2 directory, absolute or relative to the cgroup2 mount:
/// written by the directory source's user, or by the Kubernetes source from the
/// `istio-proxy` container's id.
pub const ANN_PROXY_CGROUP: &str = "sidecap.io/proxy-cgroup";
/// sidecap's own: `"true"` keeps the pod's live decision trace on (see `sidecap trace`).
pub const ANN_TRACE: &str = "sidecap.io/trace";
/// Per-pod override of the agent's `--sockmap` (absent: the node's setting).
pub const ANN_SOCKMAP: &str = "sidecap.io/sockmap";
/// istio-iptables `-k` (`RerouteVirtualInterfaces`), from either annotation.
pub const ANN_KUBEVIRT: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const ANN_REROUTE_VIRTUAL: &str = "istio.io/reroute-virtual-interfaces";
/// istio-iptables' owner-group filters (tools/istio-iptables/pkg/constants `OwnerGroupsInclude`,
/// `OwnerGroupsExclude`): environment only, `*` and empty by default.
pub const ENV_OWNER_GROUPS: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
pub const ENV_OWNER_GROUPS_EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";

/// Ports istio-cni always appends to excludeInboundPorts: status (15020), health (15021),
/// Prometheus (15090).
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 3] = [15020, 15021, 15090];
/// istio-cni's excludeOutboundPorts default when the annotation is absent.
pub const DEFAULT_EXCLUDED_OUTBOUND: u16 = 15020;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KnobError {
    #[error("annotation {key}: {message}")]
    Annotation { key: &'static str, message: String },
    /// A capture knob sidecap does not implement: the pod is refused, never half-captured.
    #[error("{setting}: {value:?} is not supported by sidecap ({why}); the pod is refused rather than captured differently")]
    Unsupported { setting: String, value: String, why: &'static str },
}

/// How the proxy is recognised in the kernel (`pod_flags::PROXY_CGROUP`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyIdentity {
    /// The proxy uid/gid alone, as istio-iptables: any process of the pod running as 1337
    /// is exempt.
    #[default]
    Uid,
    /// The proxy uid/gid in the proxy container's cgroup; anything else is an app.
    Cgroup,
}

impl std::str::FromStr for ProxyIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "uid" => Ok(ProxyIdentity::Uid),
            "cgroup" => Ok(ProxyIdentity::Cgroup),
            other => Err(format!("{other:?} is not a proxy identity (uid or cgroup)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Interception {
    #[serde(rename = "REDIRECT")]
    Redirect,
    /// No capture at all (`sidecar.istio.io/interceptionMode: NONE`).
    #[serde(rename = "NONE")]
    None,
}

/// includeOutboundIPRanges / includeInboundPorts: `*`, a list, or empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Include<T> {
    All,
    List(Vec<T>),
}

impl<T> Include<T> {
    pub fn is_empty(&self) -> bool {
        matches!(self, Include::List(v) if v.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Knobs {
    pub interception: Interception,
    pub include_cidrs: Include<Cidr>,
    pub exclude_cidrs: Vec<Cidr>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_inbound_ports: Include<u16>,
    /// Ignored when includeInboundPorts is an explicit list, as in istio-iptables.
    pub exclude_inbound_ports: Vec<u16>,
    /// `status.sidecar.istio.io/port` (0 = none); exempt from inbound capture.
    pub status_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub dns_capture: bool,
    /// `sidecap.io/proxy-identity`; None: the node's `--proxy-identity`.
    pub proxy_identity: Option<ProxyIdentity>,
}

/// istio-cni's gate: an `istio-proxy` container, the injection status annotation, no
/// `sidecar.istio.io/inject: "false"` opt-out, and no `istio-init` init container (its
/// iptables capture the pod already: cni/pkg/plugin/plugin.go skips such pods too). That
/// keeps pods injected before and after a switch between istio-init and sidecap apart.
pub fn is_meshed(pod: &Pod) -> bool {
    let ann = &pod.metadata.annotations;
    if !ann.contains_key(ANN_STATUS) || pod.proxy_container().is_none() {
        return false;
    }
    if pod.spec.init_containers.iter().any(|c| c.name == "istio-init") {
        return false;
    }
    let opt_out = |v: Option<&String>| v.is_some_and(|v| matches!(v.as_str(), "false" | "False" | "FALSE" | "0" | "f" | "F"));
    !(opt_out(ann.get(ANN_INJECT)) || opt_out(pod.metadata.labels.get(ANN_INJECT)))
}

/// The `sidecap.io/trace` annotation: absent is false; the values of Go's
/// `strconv.ParseBool` (as Istio reads its boolean annotations); anything else is an error
/// naming the annotation and its value.
pub fn trace(pod: &Pod) -> Result<bool, KnobError> {
    Ok(bool_annotation(pod, ANN_TRACE)?.unwrap_or(false))
}

/// The `sidecap.io/sockmap` annotation: None when absent (the node's `--sockmap` decides),
/// else read as `trace` reads its annotation.
pub fn sockmap(pod: &Pod) -> Result<Option<bool>, KnobError> {
    bool_annotation(pod, ANN_SOCKMAP)
}

fn bool_annotation(pod: &Pod, key: &'static str) -> Result<Option<bool>, KnobError> {
    match pod.metadata.annotations.get(key).map(String::as_str) {
        None => Ok(None),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
        Some(v) => Err(KnobError::Annotation { key, message: format!("{v:?} is not true or false") }),
    }
}

/// `status.podIPs`, else `status.podIP`; unparsable entries are skipped.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = pod.status.pod_ips.iter().filter_map(|p| p.ip.parse().ok()).collect();
    if out.is_empty() {
        out.extend(pod.status.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    out
}

fn parse_ports(key: &'static str, v: &str) -> Result<Vec<u16>, KnobError> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for p in v.split(',') {
        let t = p.trim();
        // Trailing commas appear in Istio's own test data ("6000,7000,").
        if t.is_empty() {
            continue;
        }
        let n: u16 = t
            .parse()
            .map_err(|_| KnobError::Annotation { key, message: format!("port {t:?} is not a number in 0..65535") })?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

fn parse_ports_or_all(key: &'static str, v: &str) -> Result<Include<u16>, KnobError> {
    if v.trim() == "*" { Ok(Include::All) } else { parse_ports(key, v).map(Include::List) }
}

fn parse_cidrs(key: &'static str, v: &str) -> Result<Vec<Cidr>, KnobError> {
    let mut out = Vec::new();
    for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        // istio-cni requires prefix notation (netip.ParsePrefix).
        if !c.contains('/') {
            return Err(KnobError::Annotation { key, message: format!("failed parsing cidr '{c}'") });
        }
        out.push(c.parse().map_err(|_| KnobError::Annotation { key, message: format!("failed parsing cidr '{c}'") })?);
    }
    Ok(out)
}

fn unsupported(setting: String, value: &str, why: &'static str) -> KnobError {
    KnobError::Unsupported { setting, value: value.to_string(), why }
}

/// Knobs istio-init honours that sidecap cannot: virtual interfaces (forwarded VM traffic
/// never meets a socket hook) and owner-group filters (set through the proxy's environment,
/// as proxyMetadata puts them there, or the mesh's proxyMetadata).
fn refuse_unimplemented(pod: &Pod, mesh: &MeshConfig) -> Result<(), KnobError> {
    for key in [ANN_REROUTE_VIRTUAL, ANN_KUBEVIRT] {
        if let Some(v) = pod.metadata.annotations.get(key).filter(|v| !v.trim().is_empty()) {
            return Err(unsupported(
                format!("annotation {key}"),
                v,
                "traffic forwarded from virtual interfaces never reaches a socket hook",
            ));
        }
    }
    let is_default = |name: &str, v: &str| if name == ENV_OWNER_GROUPS { v.trim() == "*" } else { v.trim().is_empty() };
    for name in [ENV_OWNER_GROUPS, ENV_OWNER_GROUPS_EXCLUDE] {
        let from_pod = pod
            .all_containers()
            .filter(|c| c.name == "istio-proxy" || c.name == "istio-validation")
            .find_map(|c| c.env.iter().find(|e| e.name == name).map(|e| (format!("container {} env {name}", c.name), e.value.clone())));
        let from_mesh = || {
            mesh.default_config
                .proxy_metadata
                .get(name)
                .map(|v| (format!("mesh defaultConfig.proxyMetadata {name}"), Some(v.clone())))
        };
        if let Some((setting, Some(v))) = from_pod.or_else(from_mesh) {
            if !is_default(name, &v) {
                return Err(unsupported(setting, &v, "owner-group filters are not implemented"));
            }
        }
    }
    Ok(())
}

/// Reads every knob; defaults are istio-cni's.
pub fn from_pod(pod: &Pod, mesh: &MeshConfig) -> Result<Knobs, KnobError> {
    let ann = &pod.metadata.annotations;
    let get = |k: &str| ann.get(k).map(String::as_str);
    let interception = match get(ANN_INTERCEPTION).unwrap_or("REDIRECT") {
        "REDIRECT" => Interception::Redirect,
        "NONE" => Interception::None,
        // TPROXY's point is that the app sees the client's address (Envoy binds the upstream
        // to it, with mangle marks and policy routing bringing replies back): REDIRECT-style
        // capture would break those connections, so the pod is refused.
        "TPROXY" => {
            return Err(unsupported(
                format!("annotation {ANN_INTERCEPTION}"),
                "TPROXY",
                "only REDIRECT and NONE are implemented; TPROXY needs mangle marks and policy routing",
            ));
        }
        other => {
            return Err(KnobError::Annotation { key: ANN_INTERCEPTION, message: format!("interceptionMode invalid: {other}") });
        }
    };
    refuse_unimplemented(pod, mesh)?;
    let include_cidrs = match get(ANN_INCLUDE_CIDRS).unwrap_or("*") {
        "*" => Include::All,
        v => Include::List(parse_cidrs(ANN_INCLUDE_CIDRS, v)?),
    };
    let exclude_cidrs = parse_cidrs(ANN_EXCLUDE_CIDRS, get(ANN_EXCLUDE_CIDRS).unwrap_or(""))?;
    let include_outbound_ports = parse_ports(ANN_INCLUDE_OUT_PORTS, get(ANN_INCLUDE_OUT_PORTS).unwrap_or(""))?;
    let exclude_outbound_ports = match get(ANN_EXCLUDE_OUT_PORTS) {
        Some(v) => parse_ports(ANN_EXCLUDE_OUT_PORTS, v)?,
        None => vec![DEFAULT_EXCLUDED_OUTBOUND],
    };
    let include_inbound_ports = parse_ports_or_all(ANN_INCLUDE_IN_PORTS, get(ANN_INCLUDE_IN_PORTS).unwrap_or("*"))?;
    let mut exclude_inbound_ports = match get(ANN_EXCLUDE_IN_PORTS) {
        Some(v) => parse_ports(ANN_EXCLUDE_IN_PORTS, v)?,
        None => vec![DEFAULT_EXCLUDED_OUTBOUND],
    };
    for p in ALWAYS_EXCLUDED_INBOUND {
        if !exclude_inbound_ports.contains(&p) {
            exclude_inbound_ports.push(p);
        }
    }
    let status_port = match get(ANN_STATUS_PORT) {
        Some(v) => v
            .trim()
            .parse::<u16>()
            .map_err(|_| KnobError::Annotation { key: ANN_STATUS_PORT, message: format!("port {v:?} is not a number") })?,
        None => 15020,
    };
    let proxy = pod.proxy_container();
    let sc = proxy.and_then(|c| c.security_context.as_ref());
    // A zero or absent runAsUser/runAsGroup keeps 1337.
    let id = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v != 0).unwrap_or(1337);
    let env_dns = proxy
        .and_then(|c| c.env.iter().find(|e| e.name == "ISTIO_META_DNS_CAPTURE"))
        .and_then(|e| e.value.clone())
        .or_else(|| mesh.default_config.proxy_metadata.get("ISTIO_META_DNS_CAPTURE").cloned());
    let dns_capture = env_dns.as_deref().is_some_and(|v| matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True"));
    let proxy_identity = get(ANN_PROXY_IDENTITY)
        .map(|v| v.parse::<ProxyIdentity>().map_err(|message| KnobError::Annotation { key: ANN_PROXY_IDENTITY, message }))
        .transpose()?;
    Ok(Knobs {
        interception,
        include_cidrs,
        exclude_cidrs,
        include_outbound_ports,
        exclude_outbound_ports,
        include_inbound_ports,
        exclude_inbound_ports,
        status_port,
        proxy_uid: id(sc.and_then(|s| s.run_as_user)),
        proxy_gid: id(sc.and_then(|s| s.run_as_group)),
        dns_capture,
        proxy_identity,
    })
}

impl Knobs {
    /// Outbound capture is on unless interception is NONE or nothing is included.
    pub fn outbound_capture(&self) -> bool {
        self.interception != Interception::None && !(self.include_cidrs.is_empty() && self.include_outbound_ports.is_empty())
    }

    /// istio-iptables' `HasLoopBackIP`: an include prefix whose address is loopback
    /// (tools/istio-iptables/pkg/capture/run.go `separateV4V6`). Then the
    /// "`-o lo` and not the proxy → RETURN" rule is left out.
    pub fn include_has_loopback(&self) -> bool {
        match &self.include_cidrs {
            Include::List(l) => l.iter().any(|c| c.addr.is_loopback()),
            Include::All => false,
        }
    }

    pub fn inbound_capture(&self) -> bool {
        self.interception != Interception::None && !self.include_inbound_ports.is_empty()
    }

    /// Ports never captured inbound in `*` mode: 15008, excluded ports, status port.
    pub fn inbound_exempt(&self) -> BTreeSet<u16> {
        let mut s: BTreeSet<u16> = self.exclude_inbound_ports.iter().copied().collect();
        s.insert(sidecap_common::defaults::TUNNEL_PORT);
        if self.status_port != 0 {
            s.insert(self.status_port);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pod::{Container, SecurityContext};

    fn pod(ann: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = "p".into();
        p.metadata.annotations.insert(ANN_STATUS.into(), "{}".into());
        for (k, v) in ann {
            p.metadata.annotations.insert((*k).into(), (*v).into());
        }
        p.spec.containers.push(Container { name: "istio-proxy".into(), ..Default::default() });
        p
    }

    #[test]
    fn the_trace_annotation_reads_as_a_go_bool() {
        assert!(!trace(&pod(&[])).unwrap());
        assert!(trace(&pod(&[(ANN_TRACE, "true")])).unwrap());
        assert!(!trace(&pod(&[(ANN_TRACE, "0")])).unwrap());
        let e = trace(&pod(&[(ANN_TRACE, "yes")])).unwrap_err().to_string();
        assert_eq!(e, "annotation sidecap.io/trace: \"yes\" is not true or false");
    }

    #[test]
    fn the_sockmap_annotation_is_absent_or_a_go_bool() {
        assert_eq!(sockmap(&pod(&[])).unwrap(), None);
        assert_eq!(sockmap(&pod(&[(ANN_SOCKMAP, "true")])).unwrap(), Some(true));
        assert_eq!(sockmap(&pod(&[(ANN_SOCKMAP, "F")])).unwrap(), Some(false));
        let e = sockmap(&pod(&[(ANN_SOCKMAP, "on")])).unwrap_err().to_string();
        assert_eq!(e, "annotation sidecap.io/sockmap: \"on\" is not true or false");
    }

    // Defaults from cni/pkg/plugin/sidecar_redirect.go (golden: cni-plugin/basic.txt.golden).
    #[test]
    fn cni_defaults() {
        let k = from_pod(&pod(&[]), &MeshConfig::default()).expect("defaults");
        assert_eq!(k.interception, Interception::Redirect);
        assert_eq!(k.include_cidrs, Include::All);
        assert_eq!(k.exclude_outbound_ports, vec![15020]);
        assert_eq!(k.include_inbound_ports, Include::All);
        assert_eq!(k.exclude_inbound_ports, vec![15020, 15021, 15090]);
        assert_eq!((k.proxy_uid, k.proxy_gid), (1337, 1337));
        assert!(!k.dns_capture);
        assert!(k.outbound_capture() && k.inbound_capture());
    }

    // cni-plugin/include-exclude-ports.txt.golden: the annotation replaces the 15020 default.
    #[test]
    fn exclude_outbound_annotation_replaces_default() {
        let k = from_pod(&pod(&[(ANN_EXCLUDE_OUT_PORTS, "5555,6666")]), &MeshConfig::default()).expect("valid");
        assert_eq!(k.exclude_outbound_ports, vec![5555, 6666]);
        let k = from_pod(&pod(&[(ANN_EXCLUDE_IN_PORTS, "3333,4444,")]), &MeshConfig::default()).expect("valid");
        assert_eq!(k.exclude_inbound_ports, vec![3333, 4444, 15020, 15021, 15090]);
    }

    // cni-plugin/custom-uid.txt.golden and custom-uid-zero (falls back to 1337).
    #[test]
    fn proxy_uid_from_istio_proxy_security_context() {
        let mut p = pod(&[]);
        p.spec.containers[0].security_context = Some(SecurityContext { run_as_user: Some(1000670000), run_as_group: Some(1000670001) });
        let k = from_pod(&p, &MeshConfig::default()).expect("valid");
        assert_eq!((k.proxy_uid, k.proxy_gid), (1000670000, 1000670001));
        p.spec.containers[0].security_context = Some(SecurityContext { run_as_user: Some(0), run_as_group: None });
        let k = from_pod(&p, &MeshConfig::default()).expect("valid");
        assert_eq!((k.proxy_uid, k.proxy_gid), (1337, 1337));
    }

    #[test]
    fn invalid_annotations_are_errors() {
        assert!(from_pod(&pod(&[(ANN_INTERCEPTION, "BOGUS")]), &MeshConfig::default()).is_err());
        assert!(from_pod(&pod(&[(ANN_INCLUDE_CIDRS, "10.0.0.1")]), &MeshConfig::default()).is_err());
        assert!(from_pod(&pod(&[(ANN_EXCLUDE_OUT_PORTS, "http")]), &MeshConfig::default()).is_err());
    }

    #[test]
    fn meshed_gate() {
        assert!(is_meshed(&pod(&[])));
        assert!(!is_meshed(&pod(&[(ANN_INJECT, "false")])));
        let mut p = pod(&[]);
        p.metadata.annotations.remove(ANN_STATUS);
        assert!(!is_meshed(&p));
        let mut p = pod(&[]);
        p.spec.containers.clear();
        assert!(!is_meshed(&p));
        // Injected with istio-init: its iptables own the pod. istio-validation is ours.
        let mut p = pod(&[]);
        p.spec.init_containers.push(Container { name: "istio-init".into(), ..Default::default() });
        assert!(!is_meshed(&p));
        let mut p = pod(&[]);
        p.spec.init_containers.push(Container { name: "istio-validation".into(), ..Default::default() });
        assert!(is_meshed(&p));
    }

    #[test]
    fn empty_includes_turn_capture_off() {
        let k = from_pod(&pod(&[(ANN_INCLUDE_CIDRS, ""), (ANN_INCLUDE_IN_PORTS, "")]), &MeshConfig::default()).expect("valid");
        assert!(!k.outbound_capture());
        assert!(!k.inbound_capture());
        let k = from_pod(&pod(&[(ANN_INTERCEPTION, "NONE")]), &MeshConfig::default()).expect("valid");
        assert!(!k.outbound_capture());
    }

    #[test]
    fn proxy_identity_annotation() {
        let m = MeshConfig::default();
        assert_eq!(from_pod(&pod(&[]), &m).expect("valid").proxy_identity, None);
        assert_eq!(from_pod(&pod(&[(ANN_PROXY_IDENTITY, "cgroup")]), &m).expect("valid").proxy_identity, Some(ProxyIdentity::Cgroup));
        assert_eq!(from_pod(&pod(&[(ANN_PROXY_IDENTITY, "uid")]), &m).expect("valid").proxy_identity, Some(ProxyIdentity::Uid));
        let e = from_pod(&pod(&[(ANN_PROXY_IDENTITY, "pid")]), &m).expect_err("invalid").to_string();
        assert!(e.contains(ANN_PROXY_IDENTITY) && e.contains("\"pid\""), "{e}");
    }
}
