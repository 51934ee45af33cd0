//! The capture decisions (docs/kernel-contract.md, "Outbound" and "Inbound"), written once:
//! the kernel programs run them over their maps, and userspace (`simulate`, `sidecap
//! explain`, the property tests) runs the very same code over a compiled generation.
//!
//! Generic over [`Lookup`], the rule maps as the decisions read them, and
//! `#[inline(always)]` throughout, so that the kernel side compiles to what it would be
//! written by hand (the verifier sees no calls and no trait objects).

mod inbound;
mod outbound;

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
