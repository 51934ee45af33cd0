//! A pure model of the kernel programs' lookups (docs/kernel-contract.md, outbound steps 2–7
//! and inbound): hash lookups and longest-prefix match over a `Generation`. Tests check it
//! against the engine's decisions; it is what proves the compiled maps mean what was decided.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use sidecap_common::{CidrKey, ListenerKey, PortKey, action, cidr_flags, pod_flags, port_flags, proto};

use crate::engine::Action;
use crate::model::Cidr;
use crate::model::cidr::canonical;

use super::Generation;

fn as_action(a: u8) -> Action {
    match a {
        action::CAPTURE => Action::Capture,
        action::DROP => Action::Drop,
        _ => Action::Passthrough,
    }
}

/// Longest-prefix match as BPF_MAP_TYPE_LPM_TRIE does it: the entry with the longest prefix
/// whose first `len` bits equal the query's.
fn lpm<'a, K, V>(map: &'a BTreeMap<(u32, K), V>, bytes: impl Fn(&K) -> Vec<u8>, query: &[u8]) -> Option<&'a V> {
    map.iter()
        .filter(|((len, k), _)| prefix_eq(&bytes(k), query, *len))
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, v)| v)
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let bits = bits as usize;
    if bits > a.len() * 8 || bits > b.len() * 8 {
        return false;
    }
    let full = bits / 8;
    if a[..full] != b[..full] {
        return false;
    }
    let rem = bits % 8;
    rem == 0 || {
        let m = 0xffu8 << (8 - rem);
        (a[full] & m) == (b[full] & m)
    }
}

fn cidr_bytes(k: &CidrKey) -> Vec<u8> {
    let mut v = k.policy.to_vec();
    v.extend_from_slice(&k.addr);
    v
}

fn listener_bytes(k: &ListenerKey) -> Vec<u8> {
    let mut v = k.policy.to_vec();
    v.extend_from_slice(&k.port);
    v.push(k.proto);
    v.push(k._pad);
    v.extend_from_slice(&k.addr);
    v
}

/// An application socket (not the proxy's, not bound to 127.0.0.6) connecting to `dst`.
pub fn outbound(g: &Generation, dst: SocketAddr, l4: u8) -> Action {
    outbound_why(g, dst, l4).0
}

/// Like [`outbound`], with the kernel step that decided, for `sidecap explain` on live maps.
pub fn outbound_why(g: &Generation, dst: SocketAddr, l4: u8) -> (Action, String) {
    let pod = &g.pod;
    let ip = canonical(dst.ip());
    let addr = Cidr::mapped(ip);
    let port = dst.port();
    // 1. Excluded ports (first, as in istio-iptables' ISTIO_OUTPUT).
    let port_rule = g.out_ports.get(&PortKey { policy: pod.policy, port, proto: l4, _pad: 0 });
    if port_rule.is_some_and(|r| r.flags & port_flags::EXCLUDED != 0) {
        return (Action::Passthrough, format!("excluded outbound port {port}"));
    }
    // 3. DNS capture.
    if pod.flags & pod_flags::DNS_CAPTURE != 0 && port == 53 {
        return (Action::Capture, format!("DNS capture: port 53 to 127.0.0.1:{}", pod.dns_port));
    }
    // 4. Loopback and the pod's own addresses.
    let loopback = match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6.is_loopback(),
    };
    let n = usize::from(pod.n_ips).min(pod.ips.len());
    let localhost = match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6.is_loopback(),
    };
    let lo_routed = loopback || pod.ips[..n].contains(&addr);
    if localhost || (lo_routed && pod.flags & pod_flags::LOOPBACK_IN_RANGE == 0) {
        return (Action::Passthrough, format!("loopback or the pod's own address {ip}"));
    }
    // 5. Capture range.
    if pod.flags & pod_flags::OUTBOUND_CAPTURE == 0 {
        return (Action::Passthrough, "outbound capture off for this pod".into());
    }
    let mut q = pod.policy.to_be_bytes().to_vec();
    q.extend_from_slice(&addr);
    let cidr = lpm(&g.out_cidrs, cidr_bytes, &q);
    if cidr.is_some_and(|r| r.flags & cidr_flags::EXCLUDED != 0) {
        return (Action::Passthrough, format!("{ip} is in an excluded outbound range"));
    }
    let in_range = pod.flags & pod_flags::INCLUDE_ALL_CIDRS != 0
        || cidr.is_some_and(|r| r.flags & cidr_flags::INCLUDED != 0)
        || port_rule.is_some_and(|r| r.flags & port_flags::INCLUDED != 0);
    if !in_range {
        return (Action::Passthrough, format!("{ip} is outside the included outbound ranges"));
    }
    // 6. Listeners.
    let mut q = pod.policy.to_be_bytes().to_vec();
    q.extend_from_slice(&port.to_be_bytes());
    q.push(l4);
    q.push(0);
    q.extend_from_slice(&addr);
    if let Some(rule) = lpm(&g.listeners, listener_bytes, &q) {
        let a = as_action(rule.action);
        let name = g.listener_names.get(rule.listener_id as usize).cloned().unwrap_or_else(|| format!("#{}", rule.listener_id));
        if l4 == proto::UDP && a == Action::Capture {
            return (Action::Passthrough, format!("listener {name}, but UDP is never redirected to the proxy"));
        }
        return (a, format!("listener {name}"));
    }
    // 7. Default.
    let why = match pod.default_action {
        action::DROP => "no listener: REGISTRY_ONLY",
        action::CAPTURE => "no listener: ALLOW_ANY through the proxy (Istio-exact mode)",
        _ => "no listener: ALLOW_ANY passthrough",
    };
    (as_action(pod.default_action), why.into())
}

/// A connection from outside the pod to its `port`.
pub fn inbound(g: &Generation, port: u16) -> Action {
    let pod = &g.pod;
    if pod.flags & pod_flags::INBOUND_CAPTURE == 0 {
        return Action::Passthrough;
    }
    match g.in_ports.get(&sidecap_common::InPortKey { policy: pod.policy, port, _pad: 0 }) {
        Some(r) => as_action(r.action),
        None if pod.flags & pod_flags::INBOUND_ALL_PORTS != 0 => Action::Capture,
        None => Action::Passthrough,
    }
}
