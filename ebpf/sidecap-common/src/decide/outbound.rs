//! connect4/connect6 (and UDP connect): where an outbound connection goes.

use crate::ip::{self, Addr};
use crate::{
    CIDR_FIXED_BITS, CidrKey, LISTENER_FIXED_BITS, ListenerKey, PodConfig, PortKey, action, cidr_flags, drop_reason, pod_flags, port_flags,
    proto,
};

use super::{Caller, Lookup, caller, is_pod_ip};

// Both LPM lookups are made with full-length keys.
const _: () = assert!(CIDR_FIXED_BITS + 128 == (core::mem::size_of::<CidrKey>() * 8) as u32);
const _: () = assert!(LISTENER_FIXED_BITS + 128 == (core::mem::size_of::<ListenerKey>() * 8) as u32);

/// One connect as the program sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    pub dst: Addr,
    /// Destination port, host order.
    pub port: u16,
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// Source address the socket is bound to, if any (v4-mapped or v6; zero when unbound).
    pub bound_src: Addr,
    pub uid: u32,
    pub gid: u32,
    /// The task's cgroup v2 id; read only when `needs_cgroup` (the kernel leaves it 0 otherwise).
    pub cgroup: u64,
}

/// What connect does with the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours to count: the proxy's own traffic, or 127.0.0.6.
    Untouched,
    Passthrough,
    /// Rewrite to loopback:port; `kind` says why (and which counter it feeds).
    Redirect {
        port: u16,
        kind: RedirectKind,
    },
    Drop {
        reason: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectKind {
    /// App → proxy outbound port (original destination recorded).
    Capture,
    /// Proxy → its own pod IP → proxy inbound port (original destination recorded).
    ProxyToSelf,
    /// Port 53 → DNS proxy.
    Dns,
}

/// The rule that decided, for people (`sidecap explain`); the kernel ignores it (and the
/// compiler drops it there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundStep {
    /// 1. excludeOutboundPorts.
    ExcludedPort,
    /// 2. bound to Envoy's inbound passthrough source (127.0.0.6 / ::6).
    PassthroughSource,
    /// 2. the proxy uid: its own traffic.
    ProxyUid,
    /// 2. the proxy gid (not uid) to loopback or the pod itself.
    ProxyGidLoopback,
    /// 2. the proxy gid: its own traffic.
    ProxyGid,
    /// 2. the proxy calling its own pod: through inbound.
    ProxySelfCall,
    /// 3. DNS capture.
    Dns,
    /// 4. loopback or the pod's own address.
    Loopback,
    /// 5. outbound capture is off for the pod.
    CaptureOff,
    /// 5. excludeOutboundIPRanges.
    ExcludedCidr,
    /// 5. outside includeOutboundIPRanges / includeOutboundPorts.
    OutOfRange,
    /// 6. an outbound listener (its `listener_id`).
    Listener { id: u32 },
    /// 7. no listener: the pod's `default_action`.
    NoListener,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound {
    pub verdict: Verdict,
    pub step: OutboundStep,
    /// Who the caller was taken for (from step 2 on; `App` before it).
    pub caller: Caller,
}

#[inline(always)]
fn done(verdict: Verdict, step: OutboundStep) -> Outbound {
    Outbound { verdict, step, caller: Caller::App }
}

/// The outbound decision, in istio-iptables' rule order.
#[inline(always)]
pub fn outbound<L: Lookup>(pod: &PodConfig, maps: &L, c: &Connect) -> Outbound {
    use OutboundStep as S;
    // 1. Excluded outbound ports: the very first ISTIO_OUTPUT rules, before even the
    //    proxy's own exemptions.
    let port_key = PortKey { policy: pod.policy, port: c.port, proto: c.proto, _pad: 0 };
    let port_rule = match maps.out_port(&port_key) {
        Some(r) => r.flags,
        None => 0,
    };
    if port_rule & port_flags::EXCLUDED != 0 {
        return done(Verdict::Passthrough, S::ExcludedPort);
    }

    // 2. Envoy's inbound passthrough source and the proxy itself: istio-iptables' owner
    //    rules, in their order (the uid block, then the gid block).
    if ip::eq(&c.bound_src, &ip::from_v4(ip::INBOUND_PASSTHROUGH_V4)) || ip::eq(&c.bound_src, &ip::INBOUND_PASSTHROUGH_V6) {
        return done(Verdict::Untouched, S::PassthroughSource);
    }
    let who = caller(pod, c.uid, c.gid, c.cgroup);
    let done = |verdict, step| Outbound { verdict, step, caller: who };
    if who.is_proxy() {
        let uid_match = who == Caller::ProxyUid;
        let dns = pod.flags & pod_flags::DNS_CAPTURE != 0;
        let lo_routed = ip::is_loopback(&c.dst) || is_pod_ip(pod, &c.dst);
        // `-o lo ! -d 127.0.0.1 -p tcp ! --dport 15008 … -j ISTIO_IN_REDIRECT`: the proxy
        // calling its own pod goes through inbound.
        let self_call = c.proto == proto::TCP && lo_routed && !ip::is_localhost(&c.dst) && c.port != pod.tunnel_port;
        let to_self = Verdict::Redirect { port: pod.inbound_port, kind: RedirectKind::ProxyToSelf };
        if uid_match {
            // The uid rule also spares port 53 under DNS capture.
            if self_call && !(dns && c.port == 53) {
                return done(to_self, S::ProxySelfCall);
            }
            return done(Verdict::Untouched, S::ProxyUid);
        }
        // Only the gid matches: the uid block's "-o lo, not the proxy uid → RETURN" comes
        // first (left out when loopback is in the include ranges; under DNS capture it
        // spares TCP port 53).
        let tcp53 = dns && c.proto == proto::TCP && c.port == 53;
        if lo_routed && pod.flags & pod_flags::LOOPBACK_IN_RANGE == 0 && !tcp53 {
            return done(Verdict::Passthrough, S::ProxyGidLoopback);
        }
        if self_call {
            return done(to_self, S::ProxySelfCall);
        }
        return done(Verdict::Untouched, S::ProxyGid);
    }

    // 3. DNS capture (ISTIO_OUTPUT_DNS), for every destination, loopback included.
    if pod.flags & pod_flags::DNS_CAPTURE != 0 && c.port == 53 {
        return done(Verdict::Redirect { port: pod.dns_port, kind: RedirectKind::Dns }, S::Dns);
    }

    // 4. Loopback and the pod's own addresses (`-o lo … RETURN`, absent when loopback is
    //    in the include ranges; `-d 127.0.0.1/32 RETURN` always).
    if ip::is_localhost(&c.dst) {
        return done(Verdict::Passthrough, S::Loopback);
    }
    if pod.flags & pod_flags::LOOPBACK_IN_RANGE == 0 && (ip::is_loopback(&c.dst) || is_pod_ip(pod, &c.dst)) {
        return done(Verdict::Passthrough, S::Loopback);
    }

    // 5. Capture range: excluded/included CIDRs, included ports.
    if pod.flags & pod_flags::OUTBOUND_CAPTURE == 0 {
        return done(Verdict::Passthrough, S::CaptureOff);
    }
    let policy_be = pod.policy.to_be_bytes();
    let dst = ip::to_bytes(&c.dst);
    let cidr = match maps.out_cidr(&CidrKey { policy: policy_be, addr: dst }) {
        Some(r) => r.flags,
        None => 0,
    };
    if cidr & cidr_flags::EXCLUDED != 0 {
        return done(Verdict::Passthrough, S::ExcludedCidr);
    }
    let in_range =
        pod.flags & pod_flags::INCLUDE_ALL_CIDRS != 0 || cidr & cidr_flags::INCLUDED != 0 || port_rule & port_flags::INCLUDED != 0;
    if !in_range {
        return done(Verdict::Passthrough, S::OutOfRange);
    }

    // 6. The pod's outbound listeners (Sidecar scope).
    let lkey = ListenerKey { policy: policy_be, port: c.port.to_be_bytes(), proto: c.proto, _pad: 0, addr: dst };
    let (act, drop_why, step) = match maps.out_listener(&lkey) {
        Some(rule) => (rule.action, drop_reason::LISTENER, S::Listener { id: rule.listener_id }),
        // 7. No listener: REGISTRY_ONLY drops, ALLOW_ANY passes (or captures).
        None => (pod.default_action, drop_reason::REGISTRY_ONLY, S::NoListener),
    };
    let verdict = match act {
        // Istio never redirects non-DNS UDP to Envoy.
        action::CAPTURE if c.proto == proto::TCP => Verdict::Redirect { port: pod.outbound_port, kind: RedirectKind::Capture },
        action::DROP => Verdict::Drop { reason: drop_why },
        _ => Verdict::Passthrough,
    };
    done(verdict, step)
}
