//! Where the observing programs run. connect and sendmsg rewrite destinations, so they sit
//! where they cover every process (the node's root cgroup, first in line); sockops,
//! getsockopt and recvmsg only serve pods' sockets and may sit lower, on the cgroup that
//! holds the pods (`--pods-cgroup`), so that host processes never run them. A redirect is
//! then only safe for a caller under that cgroup: elsewhere no sockops would hand its
//! original destination to the proxy, and no recvmsg would restore a DNS reply's source.

use aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id;

/// Level (the cgroup2 root is 0) of the cgroup the observers are attached to; 0 when they
/// are attached with connect and sendmsg, so that every caller is covered. Set by the
/// loader (read-only data: the verifier knows it, and at 0 the check below is gone).
#[unsafe(no_mangle)]
static SIDECAP_PODS_CGROUP_LEVEL: u32 = 0;
/// That cgroup's id (its inode number).
#[unsafe(no_mangle)]
static SIDECAP_PODS_CGROUP_ID: u64 = 0;

/// Whether the current task is under the observers' cgroup.
#[inline(always)]
pub fn cover_current() -> bool {
    // SAFETY: a read of a global of this object; volatile keeps the compiler from folding the
    // 0 it was built with (the loader sets the value).
    let level = unsafe { core::ptr::read_volatile(&raw const SIDECAP_PODS_CGROUP_LEVEL) };
    if level == 0 {
        return true;
    }
    // SAFETY: as above.
    let id = unsafe { core::ptr::read_volatile(&raw const SIDECAP_PODS_CGROUP_ID) };
    // SAFETY: the helper reads only the current task's cgroup; a level deeper than the task's gives 0.
    unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) == id }
}
