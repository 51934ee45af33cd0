//! The outbound decision (docs/kernel-contract.md, "Outbound"), shared by connect4/6: the
//! shared `sidecap_common::decide::outbound`, run over the kernel's maps.

use sidecap_common::{PodConfig, decide};

pub use sidecap_common::decide::{Connect, Outbound, RedirectKind, Verdict};

use crate::lookup::KernelMaps;

/// The verdict, and the step that decided (used only when the pod is traced).
#[inline(always)]
pub fn decide(pod: &PodConfig, c: &Connect) -> Outbound {
    decide::outbound(pod, &KernelMaps, c)
}
