//! The rule maps as the shared decisions read them (`sidecap_common::decide::Lookup`).

use aya_ebpf::btf_maps::lpm_trie::Key;
use sidecap_common::{
    CIDR_FIXED_BITS, CidrKey, CidrRule, InPortKey, InPortRule, LISTENER_FIXED_BITS, ListenerKey, ListenerRule, PortKey, PortRule,
    decide::Lookup,
};

use crate::maps::{IN_PORTS, OUT_CIDRS, OUT_LISTENERS, OUT_PORTS};

/// The kernel's rule maps (the decisions are generic over their lookups; this is the one
/// the programs use, inlined into them).
pub struct KernelMaps;

impl Lookup for KernelMaps {
    #[inline(always)]
    fn out_port(&self, key: &PortKey) -> Option<PortRule> {
        OUT_PORTS.get_ptr(key).map(|p| {
            // SAFETY: a value pointer from the lookup helper, valid for this program run;
            // the value is copied out at once.
            unsafe { *p }
        })
    }

    #[inline(always)]
    fn out_cidr(&self, key: &CidrKey) -> Option<CidrRule> {
        OUT_CIDRS.get(&Key::new(CIDR_FIXED_BITS + 128, *key)).copied()
    }

    #[inline(always)]
    fn out_listener(&self, key: &ListenerKey) -> Option<ListenerRule> {
        OUT_LISTENERS.get(&Key::new(LISTENER_FIXED_BITS + 128, *key)).copied()
    }

    #[inline(always)]
    fn in_port(&self, key: &InPortKey) -> Option<InPortRule> {
        IN_PORTS.get_ptr(key).map(|p| {
            // SAFETY: as in `out_port`.
            unsafe { *p }
        })
    }
}
