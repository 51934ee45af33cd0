//! The capture decisions (docs/kernel-contract.md, "Outbound" and "Inbound"), written once:
//! the kernel programs run them over their maps, and userspace (`simulate`, `sidecap
//! explain`, the property tests) runs the very same code over a compiled generation.
//!
//! Generic over [`Lookup`], the rule maps as the decisions read them, and
//! `#[inline(always)]` throughout, so that the kernel side compiles to what it would be
//! written by hand (the verifier sees no calls and no trait objects).

mod identity;
mod inbound;
mod outbound;

pub use identity::{Caller, caller, needs_cgroup};
pub use inbound::{Inbound, InboundStep, inbound};
pub use outbound::{Connect, Outbound, OutboundStep, RedirectKind, Verdict, outbound};

use crate::{CidrKey, CidrRule, InPortKey, InPortRule, ListenerKey, ListenerRule, PortKey, PortRule};

/// The rule maps a decision reads: one method per map, each one map lookup in the kernel.
pub trait Lookup {
    /// `OUT_PORTS[key]`.
    fn out_port(&self, key: &PortKey) -> Option<PortRule>;
    /// `OUT_CIDRS`: the longest prefix matching `key` taken as a full-length (/128) key.
    fn out_cidr(&self, key: &CidrKey) -> Option<CidrRule>;
    /// `OUT_LISTENERS`: the longest prefix matching `key` taken as a full-length key.
    fn out_listener(&self, key: &ListenerKey) -> Option<ListenerRule>;
    /// `IN_PORTS[key]`.
    fn in_port(&self, key: &InPortKey) -> Option<InPortRule>;
}

/// True when `a` is one of the pod's own addresses.
#[inline(always)]
pub fn is_pod_ip(pod: &crate::PodConfig, a: &crate::ip::Addr) -> bool {
    let n = pod.n_ips as usize;
    let mut i = 0;
    // A bounded loop over the array (not a slice of `n`): the verifier wants the bound.
    while i < crate::MAX_POD_IPS {
        if i < n && crate::ip::eq(&crate::ip::from_bytes(&pod.ips[i]), a) {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PodConfig, action, addr, ip, pod_flags, proto};

    /// Rule maps with no entries: only the pod's flags and defaults decide.
    struct Empty;

    impl Lookup for Empty {
        fn out_port(&self, _: &PortKey) -> Option<PortRule> {
            None
        }
        fn out_cidr(&self, _: &CidrKey) -> Option<CidrRule> {
            None
        }
        fn out_listener(&self, _: &ListenerKey) -> Option<ListenerRule> {
            None
        }
        fn in_port(&self, _: &InPortKey) -> Option<InPortRule> {
            None
        }
    }

    const POD_IP: [u8; 4] = [10, 244, 0, 5];
    const SVC: [u8; 4] = [10, 96, 0, 10];

    fn pod() -> PodConfig {
        let mut p = PodConfig {
            flags: pod_flags::OUTBOUND_CAPTURE | pod_flags::INCLUDE_ALL_CIDRS | pod_flags::INBOUND_CAPTURE | pod_flags::INBOUND_ALL_PORTS,
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            dns_port: 15053,
            tunnel_port: 15008,
            default_action: action::CAPTURE,
            n_ips: 1,
            ..PodConfig::default()
        };
        p.ips[0] = addr::v4_mapped(POD_IP);
        p
    }

    fn v4(a: [u8; 4]) -> ip::Addr {
        ip::from_v4(u32::from_ne_bytes(a))
    }

    fn connect(dst: [u8; 4], port: u16, proto: u8, uid: u32) -> Connect {
        Connect { dst: v4(dst), port, proto, bound_src: [0; 4], uid, gid: uid, cgroup: 0 }
    }

    #[test]
    fn an_app_is_captured_and_udp_is_not() {
        let o = outbound(&pod(), &Empty, &connect(SVC, 80, proto::TCP, 1000));
        assert_eq!(o.verdict, Verdict::Redirect { port: 15001, kind: RedirectKind::Capture });
        assert_eq!(o.step, OutboundStep::NoListener);
        assert_eq!(outbound(&pod(), &Empty, &connect(SVC, 80, proto::UDP, 1000)).verdict, Verdict::Passthrough);
    }

    #[test]
    fn the_proxy_calling_its_own_pod_goes_through_inbound() {
        let o = outbound(&pod(), &Empty, &connect(POD_IP, 8080, proto::TCP, 1337));
        assert_eq!(o.verdict, Verdict::Redirect { port: 15006, kind: RedirectKind::ProxyToSelf });
        assert_eq!(outbound(&pod(), &Empty, &connect(SVC, 80, proto::TCP, 1337)).verdict, Verdict::Untouched);
        assert_eq!(outbound(&pod(), &Empty, &connect([127, 0, 0, 1], 80, proto::TCP, 1337)).verdict, Verdict::Untouched);
    }

    #[test]
    fn under_cgroup_identity_an_app_with_the_proxy_uid_is_an_app() {
        let p = PodConfig { flags: pod().flags | pod_flags::PROXY_CGROUP, proxy_cgroup: 42, ..pod() };
        let proxy = Connect { cgroup: 42, ..connect(SVC, 80, proto::TCP, 1337) };
        assert_eq!(outbound(&p, &Empty, &proxy).step, OutboundStep::ProxyUid);
        let borrowed = Connect { cgroup: 43, ..proxy };
        let o = outbound(&p, &Empty, &borrowed);
        assert_eq!(o.verdict, Verdict::Redirect { port: 15001, kind: RedirectKind::Capture });
        assert_eq!(o.caller, Caller::OutsideProxyCgroup);
        // Its call to its own pod is an app's (loopback passthrough), not the proxy's inbound detour.
        assert_eq!(outbound(&p, &Empty, &Connect { dst: v4(POD_IP), port: 8080, ..borrowed }).step, OutboundStep::Loopback);
        // REGISTRY_ONLY drops it; unknown cgroup (0) too.
        let ro = PodConfig { default_action: action::DROP, ..p };
        assert!(matches!(outbound(&ro, &Empty, &borrowed).verdict, Verdict::Drop { .. }));
        let unknown = PodConfig { proxy_cgroup: 0, ..ro };
        assert!(matches!(outbound(&unknown, &Empty, &proxy).verdict, Verdict::Drop { .. }));
        // DNS goes to the DNS proxy like any app's.
        let dns = PodConfig { flags: p.flags | pod_flags::DNS_CAPTURE, ..p };
        assert_eq!(outbound(&dns, &Empty, &Connect { port: 53, proto: proto::UDP, ..borrowed }).step, OutboundStep::Dns);
        assert_eq!(outbound(&dns, &Empty, &Connect { port: 53, proto: proto::UDP, ..proxy }).step, OutboundStep::ProxyUid);
    }

    #[test]
    fn envoys_passthrough_source_is_left_alone() {
        let c = Connect { bound_src: v4([127, 0, 0, 6]), ..connect(SVC, 80, proto::TCP, 1000) };
        assert_eq!(outbound(&pod(), &Empty, &c).step, OutboundStep::PassthroughSource);
    }

    #[test]
    fn inbound_spares_the_pod_itself_and_captures_the_rest() {
        assert_eq!(inbound(&pod(), &Empty, &v4(POD_IP), 8080).step, InboundStep::FromSelf);
        assert_eq!(inbound(&pod(), &Empty, &v4([127, 0, 0, 6]), 8080).step, InboundStep::PassthroughSource);
        assert!(inbound(&pod(), &Empty, &v4([10, 244, 1, 9]), 8080).capture);
    }
}
