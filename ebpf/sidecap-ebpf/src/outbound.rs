//! The outbound decision (docs/kernel-contract.md, "Outbound"), shared by connect4/6: the
//! shared `sidecap_common::decide::outbound`, run over the kernel's maps.

use aya_ebpf::btf_maps::lpm_trie::Key;
use sidecap_common::{
    CIDR_FIXED_BITS, CidrKey, CidrRule, InPortKey, InPortRule, LISTENER_FIXED_BITS, ListenerKey, ListenerRule, PodConfig, PortKey,
    PortRule, decide,
};

pub use sidecap_common::decide::{Connect, RedirectKind, Verdict};

use crate::maps::{IN_PORTS, OUT_CIDRS, OUT_LISTENERS, OUT_PORTS};

/// The rule maps, for the shared decisions.
pub struct KernelMaps;

impl decide::Lookup for KernelMaps {
    #[inline(always)]
    fn out_port(&self, key: &PortKey) -> Option<PortRule> {
        // SAFETY: a map value pointer from the helper, valid for this program run.
        OUT_PORTS.get_ptr(key).map(|p| unsafe { *p })
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
        // SAFETY: as in `out_port`.
        IN_PORTS.get_ptr(key).map(|p| unsafe { *p })
    }
}

#[inline(always)]
pub fn decide(pod: &PodConfig, c: &Connect) -> Verdict {
    decide::outbound(pod, &KernelMaps, c).verdict
}
