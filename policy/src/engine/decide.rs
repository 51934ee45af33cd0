//! Decisions in the kernel's order (docs/kernel-contract.md, "Outbound"), each with a
//! human reason.

use std::net::{IpAddr, SocketAddr};

use crate::knobs::{Include, Interception};
use crate::listeners::{ListenerAction, OutboundListener};
use crate::model::OutboundMode;
use crate::model::cidr::canonical;

use super::{Action, AllowAnyMode, Decision, PodPolicy};

impl PodPolicy {
    /// The most specific listener for (dst, port): longest prefix, wildcard last; at equal
    /// specificity a capturing listener wins (Envoy's original-destination match only sees
    /// redirected connections, and a port-bound listener only its own address).
    pub fn listener_for(&self, dst: SocketAddr) -> Option<&OutboundListener> {
        let ip = canonical(dst.ip());
        self.listeners
            .iter()
            .filter(|l| l.port == dst.port())
            .filter_map(|l| l.matches(ip).map(|len| (len, l.action == ListenerAction::Capture, l)))
            .max_by_key(|(len, cap, _)| (*len, *cap))
            .map(|(_, _, l)| l)
    }

    /// What happens to an application's TCP connect to `dst`.
    pub fn decide_outbound(&self, dst: SocketAddr) -> Decision {
        let k = &self.knobs;
        let ip = canonical(dst.ip());
        let port = dst.port();
        if !self.meshed {
            return Decision::new(Action::Passthrough, "pod is not meshed (no istio-proxy with sidecar.istio.io/status)");
        }
        // istio-iptables: the excluded-port RETURNs are the first ISTIO_OUTPUT rules.
        if k.exclude_outbound_ports.contains(&port) {
            return Decision::new(Action::Passthrough, format!("excludeOutboundPorts has {port}"));
        }
        if k.interception != Interception::None && k.dns_capture && port == 53 {
            return Decision::new(Action::Capture, format!("DNS capture: port 53 to 127.0.0.1:{}", sidecap_common::defaults::DNS_PORT));
        }
        // `-o lo ! --uid-owner PROXY -j RETURN`, left out when an include range is
        // loopback; `-d 127.0.0.1/32 -j RETURN` is always there.
        if is_localhost(ip) {
            return Decision::new(Action::Passthrough, format!("loopback destination {ip}"));
        }
        if !k.include_has_loopback() {
            if is_loopback(ip) {
                return Decision::new(Action::Passthrough, format!("loopback destination {ip}"));
            }
            if self.ips.iter().any(|p| canonical(*p) == ip) {
                return Decision::new(Action::Passthrough, format!("the pod's own address {ip}"));
            }
        }
        if !k.outbound_capture() {
            let why = if k.interception == Interception::None {
                "interceptionMode NONE"
            } else {
                "includeOutboundIPRanges and includeOutboundPorts are empty"
            };
            return Decision::new(Action::Passthrough, format!("outbound capture off: {why}"));
        }
        if let Some(c) = k.exclude_cidrs.iter().find(|c| c.contains(ip)) {
            return Decision::new(Action::Passthrough, format!("excludeOutboundIPRanges has {c}"));
        }
        let in_range = match &k.include_cidrs {
            Include::All => true,
            Include::List(l) => l.iter().any(|c| c.contains(ip)),
        } || k.include_outbound_ports.contains(&port);
        if !in_range {
            return Decision::new(Action::Passthrough, format!("{ip} is not in includeOutboundIPRanges"));
        }
        if let Some(l) = self.listener_for(SocketAddr::new(ip, port)) {
            let from = if l.services.is_empty() { String::new() } else { format!(" from {}", l.services.join(", ")) };
            return match l.action {
                ListenerAction::Capture => Decision::new(Action::Capture, format!("listener {}{from}", l.name)),
                ListenerAction::Passthrough => {
                    Decision::new(Action::Passthrough, format!("listener {}{from} binds its port (captureMode NONE)", l.name))
                }
            };
        }
        match (self.outbound_traffic_policy, self.allow_any) {
            (OutboundMode::RegistryOnly, _) => Decision::new(Action::Drop, "REGISTRY_ONLY: no listener"),
            (OutboundMode::AllowAny, AllowAnyMode::Passthrough) => {
                Decision::new(Action::Passthrough, "ALLOW_ANY: no listener, passthrough (透传)")
            }
            (OutboundMode::AllowAny, AllowAnyMode::Capture) => {
                Decision::new(Action::Capture, "ALLOW_ANY: no listener, Envoy's PassthroughCluster (Istio-exact)")
            }
        }
    }

    /// Whether a connection to the pod's `port` goes to Envoy's inbound listener.
    pub fn decide_inbound(&self, port: u16) -> Decision {
        let k = &self.knobs;
        if !self.meshed {
            return Decision::new(Action::Passthrough, "pod is not meshed (no istio-proxy with sidecar.istio.io/status)");
        }
        if !k.inbound_capture() {
            let why = if k.interception == Interception::None { "interceptionMode NONE" } else { "includeInboundPorts is empty" };
            return Decision::new(Action::Passthrough, format!("inbound capture off: {why}"));
        }
        if port == sidecap_common::defaults::TUNNEL_PORT {
            return Decision::new(Action::Passthrough, "HBONE tunnel port 15008 is never captured");
        }
        if self.ingress.iter().any(|i| i.port == port && !i.captured) {
            return Decision::new(Action::Passthrough, format!("Sidecar ingress listener on {port} has captureMode NONE"));
        }
        match &k.include_inbound_ports {
            Include::List(l) if l.contains(&port) => Decision::new(Action::Capture, format!("includeInboundPorts has {port}")),
            Include::List(_) => Decision::new(Action::Passthrough, format!("includeInboundPorts does not have {port}")),
            Include::All => {
                if k.exclude_inbound_ports.contains(&port) {
                    Decision::new(Action::Passthrough, format!("excludeInboundPorts has {port}"))
                } else if port == k.status_port {
                    Decision::new(Action::Passthrough, format!("proxy status port {port}"))
                } else {
                    Decision::new(Action::Capture, "includeInboundPorts is *")
                }
            }
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// 127.0.0.1 or ::1 (the address the always-present `-d 127.0.0.1/32 RETURN` names).
fn is_localhost(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
    }
}
