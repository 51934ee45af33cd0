//! The kernel programs' decisions over a `Generation` instead of the kernel's maps: the very
//! code the programs run (`sidecap_common::decide`), with the maps' lookups (hash and
//! longest-prefix match) done over the compiled entries. Tests check it against the
//! engine's decisions; it is what proves the compiled maps mean what was decided, and what
//! `sidecap explain` runs over the live maps.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sidecap_common::decide::{self, Connect, Inbound, Lookup, Outbound, Verdict};
use sidecap_common::ip::{self, Addr};
use sidecap_common::{
    CIDR_FIXED_BITS, CidrKey, CidrRule, InPortKey, InPortRule, LISTENER_FIXED_BITS, ListenerKey, ListenerRule, PodConfig, PortKey, PortRule,
};

use crate::engine::Action;
use crate::model::Cidr;
use crate::model::cidr::canonical;

use super::Generation;

impl Lookup for Generation {
    fn out_port(&self, key: &PortKey) -> Option<PortRule> {
        self.out_ports.get(key).copied()
    }

    fn out_cidr(&self, key: &CidrKey) -> Option<CidrRule> {
        lpm(&self.out_cidrs, cidr_bytes, &cidr_bytes(key), CIDR_FIXED_BITS + 128)
    }

    fn out_listener(&self, key: &ListenerKey) -> Option<ListenerRule> {
        lpm(&self.listeners, listener_bytes, &listener_bytes(key), LISTENER_FIXED_BITS + 128)
    }

    fn in_port(&self, key: &InPortKey) -> Option<InPortRule> {
        self.in_ports.get(key).copied()
    }
}

/// Longest-prefix match as BPF_MAP_TYPE_LPM_TRIE does it for a query of `query_len` bits:
/// the entry with the longest prefix (at most `query_len`) whose first bits equal the query's.
fn lpm<K, V: Copy>(map: &BTreeMap<(u32, K), V>, bytes: impl Fn(&K) -> Vec<u8>, query: &[u8], query_len: u32) -> Option<V> {
    map.iter()
        .filter(|((len, k), _)| *len <= query_len && prefix_eq(&bytes(k), query, *len))
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, v)| *v)
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

/// `dst`'s address as the programs see it (IPv4 and v4-mapped IPv6 alike).
pub fn kernel_addr(dst: std::net::IpAddr) -> Addr {
    ip::from_bytes(&Cidr::mapped(canonical(dst)))
}

/// A uid (and gid) that is neither the pod's proxy uid nor its proxy gid: an application.
pub fn app_id(pod: &PodConfig) -> u32 {
    let mut id = 1000;
    while id == pod.proxy_uid || id == pod.proxy_gid {
        id += 1;
    }
    id
}

/// An application socket (not the proxy's, not bound) connecting to `dst`.
pub fn app_connect(pod: &PodConfig, dst: SocketAddr, l4: u8) -> Connect {
    let id = app_id(pod);
    Connect { dst: kernel_addr(dst.ip()), port: dst.port(), proto: l4, bound_src: [0; 4], uid: id, gid: id, cgroup: 1 }
}

/// The proxy's socket (its uid and gid, in its own cgroup) connecting to `dst`.
pub fn proxy_connect(pod: &PodConfig, dst: SocketAddr, l4: u8) -> Connect {
    Connect { uid: pod.proxy_uid, gid: pod.proxy_gid, cgroup: pod.proxy_cgroup, ..app_connect(pod, dst, l4) }
}

/// A cgroup id that is not the proxy's (an app container's).
pub fn other_cgroup(pod: &PodConfig) -> u64 {
    pod.proxy_cgroup.wrapping_add(1).max(2)
}

/// What connect does with `c`, and the rule that decided.
pub fn outbound_connect(g: &Generation, c: &Connect) -> Outbound {
    decide::outbound(&g.pod, g, c)
}

/// The engine's terms for a connect verdict: a redirect (to the proxy, its inbound port
/// or the DNS proxy) is a capture; a socket left alone passes through.
pub fn action_of(v: &Verdict) -> Action {
    match v {
        Verdict::Redirect { .. } => Action::Capture,
        Verdict::Drop { .. } => Action::Drop,
        Verdict::Untouched | Verdict::Passthrough => Action::Passthrough,
    }
}

/// An application socket connecting to `dst`.
pub fn outbound(g: &Generation, dst: SocketAddr, l4: u8) -> Action {
    action_of(&outbound_connect(g, &app_connect(&g.pod, dst, l4)).verdict)
}

/// An address outside the pod (not loopback, not one of its own): TEST-NET-1's first free one.
pub fn outside_addr(pod: &PodConfig) -> Addr {
    let mut last = 1u8;
    loop {
        let a = ip::from_v4(u32::from_ne_bytes([192, 0, 2, last]));
        if !decide::is_pod_ip(pod, &a) || last == u8::MAX {
            return a;
        }
        last += 1;
    }
}

/// A TCP connection from `remote` to the pod's `port`.
pub fn inbound_from(g: &Generation, remote: &Addr, port: u16) -> Inbound {
    decide::inbound(&g.pod, g, remote, port)
}

/// A connection from outside the pod to its `port`.
pub fn inbound(g: &Generation, port: u16) -> Action {
    if inbound_from(g, &outside_addr(&g.pod), port).capture { Action::Capture } else { Action::Passthrough }
}
