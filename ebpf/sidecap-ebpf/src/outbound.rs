//! The outbound decision (docs/kernel-contract.md, "Outbound"), shared by connect4/6.

use aya_ebpf::btf_maps::lpm_trie::Key;
use sidecap_common::{
    CIDR_FIXED_BITS, CidrKey, LISTENER_FIXED_BITS, ListenerKey, PodConfig, PortKey, action,
    cidr_flags, drop_reason, pod_flags, port_flags, proto,
};

use crate::{
    addr::{self, Addr},
    maps::{OUT_CIDRS, OUT_LISTENERS, OUT_PORTS},
};

/// What connect does with the socket.
pub enum Verdict {
    /// Not ours to count: the proxy's own traffic, or 127.0.0.6.
    Untouched,
    Passthrough,
    /// Rewrite to loopback:port; `kind` says why (and which counter it feeds).
    Redirect { port: u16, kind: RedirectKind },
    Drop { reason: u32 },
}

#[derive(Clone, Copy)]
pub enum RedirectKind {
    /// App → proxy outbound port (original destination recorded).
    Capture,
    /// Proxy → its own pod IP → proxy inbound port (original destination recorded).
    ProxyToSelf,
    /// Port 53 → DNS proxy.
    Dns,
}

pub struct Connect {
    pub dst: Addr,
    pub port: u16,
    pub proto: u8,
    /// Source address the socket is bound to, if any (v4-mapped or v6).
    pub bound_src: Addr,
    pub uid: u32,
    pub gid: u32,
}

#[inline(always)]
fn is_pod_ip(pod: &PodConfig, a: &Addr) -> bool {
    let n = pod.n_ips as usize;
    let mut i = 0;
    while i < sidecap_common::MAX_POD_IPS {
        if i < n && addr::eq(&addr::from_bytes(&pod.ips[i]), a) {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
pub fn decide(pod: &PodConfig, c: &Connect) -> Verdict {
    // 1. Excluded outbound ports: the very first ISTIO_OUTPUT rules, before even the
    //    proxy's own exemptions.
    let port_key = PortKey { policy: pod.policy, port: c.port, proto: c.proto, _pad: 0 };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let port_rule = OUT_PORTS.get_ptr(port_key).map(|p| unsafe { (*p).flags }).unwrap_or(0);
    if port_rule & port_flags::EXCLUDED != 0 {
        return Verdict::Passthrough;
    }

    // 2. Envoy's inbound passthrough source and the proxy itself: istio-iptables' owner
    //    rules, in their order (the uid block, then the gid block).
    if addr::eq(&c.bound_src, &addr::from_v4(addr::INBOUND_PASSTHROUGH_V4))
        || addr::eq(&c.bound_src, &addr::INBOUND_PASSTHROUGH_V6)
    {
        return Verdict::Untouched;
    }
    let uid_match = c.uid == pod.proxy_uid;
    if uid_match || c.gid == pod.proxy_gid {
        let dns = pod.flags & pod_flags::DNS_CAPTURE != 0;
        let lo_routed = addr::is_loopback(&c.dst) || is_pod_ip(pod, &c.dst);
        // `-o lo ! -d 127.0.0.1 -p tcp ! --dport 15008 … -j ISTIO_IN_REDIRECT`: the proxy
        // calling its own pod goes through inbound.
        let self_call = c.proto == proto::TCP
            && lo_routed
            && !addr::is_localhost(&c.dst)
            && c.port != pod.tunnel_port;
        if uid_match {
            // The uid rule also spares port 53 under DNS capture.
            if self_call && !(dns && c.port == 53) {
                return Verdict::Redirect { port: pod.inbound_port, kind: RedirectKind::ProxyToSelf };
            }
            return Verdict::Untouched;
        }
        // Only the gid matches: the uid block's "-o lo, not the proxy uid → RETURN" comes
        // first (left out when loopback is in the include ranges; under DNS capture it
        // spares TCP port 53).
        let tcp53 = dns && c.proto == proto::TCP && c.port == 53;
        if lo_routed && pod.flags & pod_flags::LOOPBACK_IN_RANGE == 0 && !tcp53 {
            return Verdict::Passthrough;
        }
        if self_call {
            return Verdict::Redirect { port: pod.inbound_port, kind: RedirectKind::ProxyToSelf };
        }
        return Verdict::Untouched;
    }

    // 3. DNS capture (ISTIO_OUTPUT_DNS), for every destination, loopback included.
    if pod.flags & pod_flags::DNS_CAPTURE != 0 && c.port == 53 {
        return Verdict::Redirect { port: pod.dns_port, kind: RedirectKind::Dns };
    }

    // 4. Loopback and the pod's own addresses (`-o lo … RETURN`, absent when loopback is
    //    in the include ranges; `-d 127.0.0.1/32 RETURN` always).
    if addr::is_localhost(&c.dst) {
        return Verdict::Passthrough;
    }
    if pod.flags & pod_flags::LOOPBACK_IN_RANGE == 0 && (addr::is_loopback(&c.dst) || is_pod_ip(pod, &c.dst)) {
        return Verdict::Passthrough;
    }

    // 5. Capture range: excluded/included CIDRs, included ports.
    if pod.flags & pod_flags::OUTBOUND_CAPTURE == 0 {
        return Verdict::Passthrough;
    }
    let policy_be = pod.policy.to_be_bytes();
    let cidr_key = Key::new(
        CIDR_FIXED_BITS + 128,
        CidrKey { policy: policy_be, addr: addr::to_bytes(&c.dst) },
    );
    let cidr = OUT_CIDRS.get(&cidr_key).map(|r| r.flags).unwrap_or(0);
    if cidr & cidr_flags::EXCLUDED != 0 {
        return Verdict::Passthrough;
    }
    let in_range = pod.flags & pod_flags::INCLUDE_ALL_CIDRS != 0
        || cidr & cidr_flags::INCLUDED != 0
        || port_rule & port_flags::INCLUDED != 0;
    if !in_range {
        return Verdict::Passthrough;
    }

    // 6. The pod's outbound listeners (Sidecar scope).
    let lkey = Key::new(
        LISTENER_FIXED_BITS + 128,
        ListenerKey {
            policy: policy_be,
            port: c.port.to_be_bytes(),
            proto: c.proto,
            _pad: 0,
            addr: addr::to_bytes(&c.dst),
        },
    );
    let (act, drop_why) = match OUT_LISTENERS.get(&lkey) {
        Some(rule) => (rule.action, drop_reason::LISTENER),
        // 7. No listener: REGISTRY_ONLY drops, ALLOW_ANY passes (or captures).
        None => (pod.default_action, drop_reason::REGISTRY_ONLY),
    };
    match act {
        // Istio never redirects non-DNS UDP to Envoy.
        action::CAPTURE if c.proto == proto::TCP => {
            Verdict::Redirect { port: pod.outbound_port, kind: RedirectKind::Capture }
        }
        action::DROP => Verdict::Drop { reason: drop_why },
        _ => Verdict::Passthrough,
    }
}
