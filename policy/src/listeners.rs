//! The outbound listener set istiod builds for a sidecar
//! (pilot/pkg/networking/core/listener.go `buildSidecarOutboundListeners`,
//! `buildSidecarOutboundListener`; names from `getListenerName`: `BIND_PORT`). Addresses
//! follow the pod's IP family (pilot/pkg/model/service.go `GetAddressForProxy`,
//! `GetExtraAddressesForProxy`; listener_address.go `wildCards`, `localHosts`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};

use serde::Serialize;

use crate::import::Imported;
use crate::model::cidr::canonical;
use crate::model::sidecar::{CaptureMode, EgressListener};
use crate::model::{Cidr, Protocol};
use crate::registry::{Registry, Resolution, ServiceView, SvcAddress, SvcPort};

/// What a listener does with a connection it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerAction {
    /// Through Envoy's outbound port.
    Capture,
    /// The listener binds its port itself (captureMode NONE, interception NONE): no redirect.
    Passthrough,
}

/// One Envoy outbound listener, and the destinations it receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutboundListener {
    /// Envoy's name, e.g. `10.96.0.10_53` or `0.0.0.0_8080`.
    pub name: String,
    /// The listener's address (`0.0.0.0` for wildcard and CIDR listeners).
    pub address: String,
    pub port: u16,
    /// Every destination on the port (`0.0.0.0_PORT` for HTTP and address-less services).
    pub any: bool,
    /// Otherwise, the prefixes it matches (a VIP is a host prefix).
    pub prefixes: Vec<Cidr>,
    pub action: ListenerAction,
    /// `NS/NAME` of the services behind it, in the order they were added.
    pub services: Vec<String>,
}

impl OutboundListener {
    /// The matched prefix length over the 128-bit mapped address (0 for a wildcard), the same
    /// ranking the kernel's LPM trie uses.
    pub fn matches(&self, ip: IpAddr) -> Option<u32> {
        if self.any {
            return Some(0);
        }
        self.prefixes.iter().filter(|c| c.contains_mapped(ip)).map(Cidr::mapped_len).max()
    }

    /// The seed article's form: `NAME::ADDR:PORT`.
    pub fn seed_line(&self) -> String {
        let addr = if self.address.contains(':') { format!("[{}]", self.address) } else { self.address.clone() };
        format!("{}::{}:{}", self.name, addr, self.port)
    }
}

struct Entry {
    listener: OutboundListener,
    /// Entries from port-specific egress listeners can't be changed by the catch-all.
    locked: bool,
    /// `listener.services` as a set once it has more than a few: a wildcard listener
    /// (`0.0.0.0_80` for every HTTP service on port 80) can collect thousands, and a linear
    /// search each time was quadratic; most listeners (a VIP's) have one service.
    services: Option<HashSet<String>>,
}

/// Past this many services a listener's are looked up in a set, not searched.
const SERVICES_SEARCHED: usize = 8;

impl Entry {
    /// Adds `origin` to the listener's services unless it is there.
    fn add_service(&mut self, origin: &str) {
        let l = &mut self.listener;
        let new = match &mut self.services {
            Some(set) => set.insert(origin.to_string()),
            None => !l.services.iter().any(|s| s == origin),
        };
        if !new {
            return;
        }
        l.services.push(origin.to_string());
        if self.services.is_none() && l.services.len() > SERVICES_SEARCHED {
            self.services = Some(l.services.iter().cloned().collect());
        }
    }
}

/// Listeners by (address, port), in the order they were first added.
#[derive(Default)]
struct Listeners {
    index: HashMap<(String, u16), usize>,
    entries: Vec<Entry>,
}

/// The pod's IP families (pkg/model/proxy.go `DiscoverIPMode`: all v4, all v6, else dual).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpMode {
    V4,
    V6,
    Dual,
}

impl IpMode {
    /// `DiscoverIPMode`: no addresses counts as IPv4 (`AllIPv4` of nothing is true).
    pub fn of(ips: &[IpAddr]) -> IpMode {
        if ips.iter().all(IpAddr::is_ipv4) {
            IpMode::V4
        } else if ips.iter().all(IpAddr::is_ipv6) {
            IpMode::V6
        } else {
            IpMode::Dual
        }
    }

    fn supports(self, ip: IpAddr) -> bool {
        match self {
            IpMode::V4 => ip.is_ipv4(),
            IpMode::V6 => ip.is_ipv6(),
            IpMode::Dual => true,
        }
    }

    /// `wildCards[mode][0]`.
    fn wildcard(self) -> &'static str {
        if self == IpMode::V6 { WILDCARD_V6 } else { WILDCARD }
    }

    /// `localHosts[mode]`: the primary, and `::1` as an additional address for dual-stack.
    fn localhost(self) -> &'static str {
        if self == IpMode::V6 { LOCALHOST_V6 } else { LOCALHOST }
    }
}

/// pilot/pkg/util/network/ip.go `FilterAddressesByIPFamily`: the addresses of the families
/// the pod has; a dual-stack pod keeps only those of the first address's family.
fn filter_by_family(addrs: &[IpAddr], mode: IpMode) -> Vec<IpAddr> {
    let family = match (mode, addrs.first()) {
        (IpMode::Dual, Some(first)) => IpMode::of(&[*first]),
        (IpMode::Dual, None) => return Vec::new(),
        (m, _) => m,
    };
    addrs.iter().copied().filter(|a| family.supports(*a)).collect()
}

/// The service address a listener without a bind uses, and the extra addresses it also
/// matches: `GetAddressForProxy` and `GetExtraAddressesForProxy` (as istiod computes them
/// with `ISTIO_DUAL_STACK`, which Istio requires for dual-stack pods: a dual-stack pod
/// keeps every clusterIP, the others filter by family).
fn service_addresses(svc: &ServiceView, mode: IpMode) -> (SvcAddress, Vec<IpAddr>) {
    if svc.cluster_vips.is_empty() {
        // ServiceEntries: DefaultAddress whatever the family; an address-less one listens
        // on `::` for an IPv6 pod and also on `::` for a dual-stack one (listener.go
        // `buildSidecarOutboundListener`, provider.External).
        let extra = match (svc.registry, svc.address, mode) {
            (Registry::External, SvcAddress::Unspecified, IpMode::Dual) => vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
            _ => Vec::new(),
        };
        return (svc.address, extra);
    }
    let primary = filter_by_family(&svc.cluster_vips, mode).first().map_or(svc.address, |ip| SvcAddress::Vip(*ip));
    let all = if mode == IpMode::Dual { svc.cluster_vips.clone() } else { filter_by_family(&svc.cluster_vips, mode) };
    let all = if all.is_empty() {
        match svc.address {
            SvcAddress::Vip(ip) if mode.supports(ip) => vec![ip],
            _ => Vec::new(),
        }
    } else {
        all
    };
    (primary, all.into_iter().skip(1).collect())
}

/// Inputs that differ per pod.
pub struct BuildContext<'a> {
    /// `sidecar.istio.io/interceptionMode: NONE`: every listener binds its port.
    pub interception_none: bool,
    /// The pod's IP families: which clusterIP a listener takes, and the wildcard's name.
    pub ip_mode: IpMode,
    /// The pod's first IP: headless endpoints equal to it get no listener.
    pub pod_ip: Option<IpAddr>,
    /// Each egress listener (None = the implicit `*/*`) with the services it imported.
    pub egress: Vec<(Option<&'a EgressListener>, Vec<Imported<'a>>)>,
}

const WILDCARD: &str = "0.0.0.0";
const WILDCARD_V6: &str = "::";
const LOCALHOST: &str = "127.0.0.1";
const LOCALHOST_V6: &str = "::1";
/// Envoy's static (15021, 15090) and virtual (15001, 15006) listeners win over wildcard ones.
const RESERVED_PORTS: [u16; 4] = [15001, 15006, 15021, 15090];

pub fn build(ctx: &BuildContext<'_>) -> Vec<OutboundListener> {
    let mut map = Listeners::default();
    for (egress, services) in &ctx.egress {
        let mut bind_to_port = ctx.interception_none;
        if let Some(e) = egress {
            if e.capture_mode == CaptureMode::None || e.bind.starts_with("unix://") {
                bind_to_port = true;
            }
        }
        let bind: Option<String> = match egress {
            Some(e) if !e.bind.is_empty() => Some(e.bind.clone()),
            _ if bind_to_port => Some(ctx.ip_mode.localhost().to_string()),
            _ => None,
        };
        if bind.as_deref().is_some_and(|b| b.starts_with("unix://")) {
            continue; // UDS listeners carry no TCP destination.
        }
        let action = if bind_to_port { ListenerAction::Passthrough } else { ListenerAction::Capture };
        let mode = ctx.ip_mode;
        let mut add = |bind: Option<&str>, port: &SvcPort, svc: &Imported<'_>, lock: bool| {
            add_listener(&mut map, mode, bind, port, svc, action, lock);
        };
        match egress.and_then(|e| e.port.as_ref()) {
            Some(p) => {
                let Ok(number) = u16::try_from(p.number) else { continue };
                if number == 0 {
                    continue;
                }
                let listen = SvcPort { name: p.name.clone(), port: number, protocol: Protocol::parse(&p.protocol) };
                if conflicts_with_reserved(mode, bind.as_deref(), &listen) {
                    continue;
                }
                for s in services {
                    add(bind.as_deref(), &listen, s, true);
                }
            }
            None => {
                for e in &mut map.entries {
                    e.locked = true;
                }
                let mut add = |bind: Option<&str>, port: &SvcPort, svc: &Imported<'_>| {
                    add_listener(&mut map, mode, bind, port, svc, action, false);
                };
                for s in services {
                    let saddress = service_addresses(s.svc, mode).0;
                    for port in &s.ports {
                        if conflicts_with_reserved(mode, bind.as_deref(), port) {
                            continue;
                        }
                        let headless = bind.is_none()
                            && s.svc.resolution == Resolution::Passthrough
                            && saddress == SvcAddress::Unspecified
                            && (port.protocol.is_tcp() || port.protocol == Protocol::Unsupported);
                        if !headless {
                            add(bind.as_deref(), port, s);
                            continue;
                        }
                        let instances = s.svc.endpoints_for(port);
                        if s.svc.registry != Registry::Kubernetes && instances.is_empty() && !s.svc.has_label_selector {
                            add(None, port, s);
                            continue;
                        }
                        // One listener per endpoint address, except the pod's own.
                        for ip in instances {
                            if Some(canonical(ip)) == ctx.pod_ip.map(canonical) {
                                continue;
                            }
                            add(Some(&ip.to_string()), port, s);
                        }
                    }
                }
            }
        }
    }
    map.entries.into_iter().map(|e| e.listener).collect()
}

/// context.go `conflictWithReservedListener`, against the pod's wildcard.
fn conflicts_with_reserved(mode: IpMode, bind: Option<&str>, port: &SvcPort) -> bool {
    let wildcard_bound = match bind {
        Some(b) => b == mode.wildcard(),
        None => port.protocol.is_http(),
    };
    wildcard_bound && RESERVED_PORTS.contains(&port.port)
}

#[allow(clippy::too_many_arguments)]
fn add_listener(
    map: &mut Listeners,
    mode: IpMode,
    bind: Option<&str>,
    port: &SvcPort,
    svc: &Imported<'_>,
    action: ListenerAction,
    lock: bool,
) {
    if svc.svc.resolution == Resolution::Alias || port.protocol == Protocol::Udp {
        return; // ExternalName services and UDP ports get no listener.
    }
    // Resolve the bind address and what the listener matches. Extra addresses (the other
    // family's clusterIP of a dual-stack Service, for a dual-stack pod) are matched too.
    let (address, any, prefixes): (String, bool, Vec<Cidr>) = match bind {
        Some(b) => {
            let prefix = b.parse::<IpAddr>().ok().map(Cidr::host);
            let any = b == WILDCARD || b == WILDCARD_V6;
            (b.to_string(), any, prefix.into_iter().collect())
        }
        None if port.protocol.is_http() => (mode.wildcard().to_string(), true, Vec::new()),
        None => {
            let (primary, extra) = service_addresses(svc.svc, mode);
            let extra = extra.into_iter().map(Cidr::host);
            match primary {
                SvcAddress::Vip(ip) => (ip.to_string(), false, std::iter::once(Cidr::host(ip)).chain(extra).collect()),
                SvcAddress::Cidr(c) => (mode.wildcard().to_string(), false, std::iter::once(c).chain(extra).collect()),
                // Kubernetes keeps `0.0.0.0` (its DefaultAddress) whatever the family;
                // an address-less ServiceEntry takes the pod's wildcard.
                SvcAddress::Unspecified if svc.svc.registry == Registry::External => (mode.wildcard().to_string(), true, Vec::new()),
                SvcAddress::Unspecified => (WILDCARD.to_string(), true, Vec::new()),
            }
        }
    };
    // A passthrough (bound) listener owns its port for every destination.
    let any = any || action == ListenerAction::Passthrough;
    let origin = svc.svc.origin.as_str();
    let key = (address, port.port);
    match map.index.get(&key) {
        Some(&i) => {
            let e = &mut map.entries[i];
            if e.locked && !lock {
                return;
            }
            let l = &mut e.listener;
            l.any |= any;
            for p in prefixes {
                if !l.prefixes.contains(&p) {
                    l.prefixes.push(p);
                }
            }
            e.add_service(origin);
        }
        None => {
            let address = key.0.clone();
            map.index.insert(key, map.entries.len());
            map.entries.push(Entry {
                listener: OutboundListener {
                    name: format!("{address}_{}", port.port),
                    address,
                    port: port.port,
                    any,
                    prefixes,
                    action,
                    services: vec![origin.to_string()],
                },
                locked: false,
                services: None,
            });
        }
    }
}
