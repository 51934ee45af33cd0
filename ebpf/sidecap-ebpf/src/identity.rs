//! The calling task's identity for `sidecap_common::decide::caller`: uid, gid and, only
//! when the decision will read it, the cgroup v2 id (one helper call, for the proxy's ids
//! under cgroup-bound identity; apps and uid-mode pods never make it).

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid};
use sidecap_common::{PodConfig, decide};

/// (uid, gid, cgroup id or 0 when not needed) of the current task.
#[inline(always)]
pub fn current(pod: &PodConfig) -> (u32, u32, u64) {
    let ids = bpf_get_current_uid_gid();
    let (uid, gid) = (ids as u32, (ids >> 32) as u32);
    let cgroup = if decide::needs_cgroup(pod, uid, gid) {
        // SAFETY: the helper takes no arguments and reads only the current task.
        unsafe { bpf_get_current_cgroup_id() }
    } else {
        0
    };
    (uid, gid, cgroup)
}
