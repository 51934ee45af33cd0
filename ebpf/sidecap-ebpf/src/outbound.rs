//! The outbound decision (docs/kernel-contract.md, "Outbound"), shared by connect4/6: the
//! shared `sidecap_common::decide::outbound`, run over the kernel's maps.

use sidecap_common::{PodConfig, decide};

pub use sidecap_common::decide::{Connect, RedirectKind, Verdict};

use crate::lookup::KernelMaps;

#[inline(always)]
pub fn decide(pod: &PodConfig, c: &Connect) -> Verdict {
    decide::outbound(pod, &KernelMaps, c).verdict
}
