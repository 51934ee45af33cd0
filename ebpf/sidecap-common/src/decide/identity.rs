//! Who is calling, as capture sees it: the pod's proxy or an app. Istio (and, by default,
//! sidecap) recognises the proxy by uid/gid alone, so any process of the pod running as
//! 1337 is exempt. Under `pod_flags::PROXY_CGROUP` the caller must also be a task of the
//! proxy container's cgroup; a uid/gid match elsewhere (or while that cgroup is not known,
//! `proxy_cgroup == 0`) is an app like any other: fail closed.

use crate::{PodConfig, pod_flags};

/// The caller's identity, for the decisions (and `sidecap explain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Not the proxy.
    App,
    /// The proxy's uid/gid outside the proxy's cgroup (cgroup-bound identity): an app.
    OutsideProxyCgroup,
    /// The proxy, by uid (and cgroup, when bound).
    ProxyUid,
    /// The proxy, by gid only (and cgroup, when bound).
    ProxyGid,
}

impl Caller {
    #[inline(always)]
    pub fn is_proxy(self) -> bool {
        matches!(self, Caller::ProxyUid | Caller::ProxyGid)
    }
}

/// True when [`caller`] will read the task's cgroup: only a uid/gid match under cgroup-bound
/// identity. The kernel asks `bpf_get_current_cgroup_id` only then, so apps, and every pod
/// in uid mode, pay nothing for it.
#[inline(always)]
pub fn needs_cgroup(pod: &PodConfig, uid: u32, gid: u32) -> bool {
    pod.flags & pod_flags::PROXY_CGROUP != 0 && (uid == pod.proxy_uid || gid == pod.proxy_gid)
}

/// The caller with these ids in cgroup `cgroup` (ignored unless [`needs_cgroup`]).
#[inline(always)]
pub fn caller(pod: &PodConfig, uid: u32, gid: u32, cgroup: u64) -> Caller {
    let uid_match = uid == pod.proxy_uid;
    if !uid_match && gid != pod.proxy_gid {
        return Caller::App;
    }
    // A zero `proxy_cgroup` (unknown) equals no task's cgroup id: the root cgroup's id is 1.
    if pod.flags & pod_flags::PROXY_CGROUP != 0 && (pod.proxy_cgroup == 0 || cgroup != pod.proxy_cgroup) {
        return Caller::OutsideProxyCgroup;
    }
    if uid_match { Caller::ProxyUid } else { Caller::ProxyGid }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(flags: u32, proxy_cgroup: u64) -> PodConfig {
        PodConfig { flags, proxy_uid: 1337, proxy_gid: 1337, proxy_cgroup, ..PodConfig::default() }
    }

    #[test]
    fn uid_mode_is_istio_exact() {
        let p = pod(0, 0);
        assert_eq!(caller(&p, 1337, 0, 99), Caller::ProxyUid);
        assert_eq!(caller(&p, 1000, 1337, 99), Caller::ProxyGid);
        assert_eq!(caller(&p, 1000, 1000, 99), Caller::App);
        assert!(!needs_cgroup(&p, 1337, 1337));
    }

    #[test]
    fn cgroup_mode_needs_both() {
        let p = pod(pod_flags::PROXY_CGROUP, 42);
        assert!(needs_cgroup(&p, 1337, 0) && needs_cgroup(&p, 0, 1337) && !needs_cgroup(&p, 1000, 1000));
        assert_eq!(caller(&p, 1337, 1337, 42), Caller::ProxyUid);
        assert_eq!(caller(&p, 1000, 1337, 42), Caller::ProxyGid);
        assert_eq!(caller(&p, 1337, 1337, 43), Caller::OutsideProxyCgroup);
        assert_eq!(caller(&p, 1000, 1000, 42), Caller::App, "the proxy's cgroup alone is not the proxy");
    }

    #[test]
    fn unknown_cgroup_fails_closed() {
        let p = pod(pod_flags::PROXY_CGROUP, 0);
        assert_eq!(caller(&p, 1337, 1337, 0), Caller::OutsideProxyCgroup);
        assert_eq!(caller(&p, 1337, 1337, 1), Caller::OutsideProxyCgroup);
        assert!(!caller(&p, 1337, 1337, 0).is_proxy());
    }
}
