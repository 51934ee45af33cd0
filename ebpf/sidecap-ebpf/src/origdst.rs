//! Original destination: sockops moves it from the connecting socket's cookie to the
//! connection's tuple; cgroup/getsockopt answers SO_ORIGINAL_DST from it on the proxy side.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockOpsContext, SockoptContext},
};
use sidecap_common::{OrigDst, TupleKey};

use crate::{
    addr::{self, Addr},
    maps::{ORIG_DST, ORIG_DST_BY_COOKIE, PODS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number.
const SO_ORIGINAL_DST: i32 = 80;
const PAGE_SIZE: i32 = 4096;

#[inline(always)]
unsafe fn rd(p: &u32) -> u32 {
    // SAFETY: p is a reference: valid and aligned for reads (volatile keeps the 4-byte context load the verifier wants).
    unsafe { core::ptr::read_volatile(p) }
}

/// (local, local port, remote, remote port) of a sockops socket, v4 kept v4-mapped.
#[inline(always)]
fn sockops_tuple(ctx: &SockOpsContext) -> Option<(Addr, u16, Addr, u16)> {
    let ops = ctx.ops;
    let (local, remote) = match ctx.family() {
        AF_INET => (addr::from_v4(ctx.local_ip4()), addr::from_v4(ctx.remote_ip4())),
        // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this call; the verifier checks every field access.
        AF_INET6 => unsafe {
            let l = &(*ops).local_ip6;
            let r = &(*ops).remote_ip6;
            ([rd(&l[0]), rd(&l[1]), rd(&l[2]), rd(&l[3])], [rd(&r[0]), rd(&r[1]), rd(&r[2]), rd(&r[3])])
        },
        _ => return None,
    };
    // local_port is host order; remote_port holds the network-order port in its high half.
    Some((local, ctx.local_port() as u16, remote, u32::from_be(ctx.remote_port()) as u16))
}

#[inline(always)]
fn key(netns: u64, local: Addr, lport: u16, remote: Addr, rport: u16) -> TupleKey {
    TupleKey { netns, local: addr::to_bytes(&local), remote: addr::to_bytes(&remote), local_port: lport, remote_port: rport, _pad: 0 }
}

pub fn sockops(ctx: &SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    let Some((local, lport, remote, rport)) = sockops_tuple(ctx) else { return 1 };
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // The app's captured socket: runs before its final ACK leaves, hence before
            // the proxy can accept and ask.
            // SAFETY: the helper reads this program's own context, as the kernel passed it.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(od) = ORIG_DST_BY_COOKIE.get_ptr(cookie) {
                // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
                let od: OrigDst = unsafe { *od };
                let _ = ORIG_DST.insert(key(netns, local, lport, remote, rport), od, 0);
                let _ = ORIG_DST_BY_COOKIE.remove(cookie);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The proxy's accepted socket: its close ends the entry's use.
            if ORIG_DST.get_ptr(key(netns, remote, rport, local, lport)).is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        _ => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = ORIG_DST.remove(key(netns, remote, rport, local, lport));
            }
        }
    }
    1
}

pub fn getsockopt(ctx: &SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: so is the kernel's bpf_sockopt for this call (its sk checked for null before use); the verifier checks every field access.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    let ours = optname == SO_ORIGINAL_DST && (level == SOL_IP || level == SOL_IPV6);
    if !ours {
        // Untouched; past a page the kernel wants optlen 0 to hand back its own buffer.
        if optlen > PAGE_SIZE {
            // SAFETY: so is the kernel's bpf_sockopt for this call (its sk checked for null before use); the verifier checks every field access.
            unsafe { (*so).optlen = 0 };
        }
        return 1;
    }
    let _ = answer(ctx, level == SOL_IPV6);
    1
}

#[inline(always)]
fn answer(ctx: &SockoptContext, v6: bool) -> Option<()> {
    let so = ctx.sockopt;
    // SAFETY: so is the kernel's bpf_sockopt for this call (its sk checked for null before use); the verifier checks every field access.
    let (local, lport, remote, rport) = unsafe {
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        let fam = (*sk).family;
        let (l, r) = if fam == AF_INET {
            (addr::from_v4((*sk).src_ip4), addr::from_v4((*sk).dst_ip4))
        } else if fam == AF_INET6 {
            let s = &(*sk).src_ip6;
            let d = &(*sk).dst_ip6;
            ([rd(&s[0]), rd(&s[1]), rd(&s[2]), rd(&s[3])], [rd(&d[0]), rd(&d[1]), rd(&d[2]), rd(&d[3])])
        } else {
            return None;
        };
        (l, (*sk).src_port as u16, r, u16::from_be((*sk).dst_port))
    };
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The client's view: its local end is our remote end.
    let od: OrigDst = match ORIG_DST.get_ptr(key(netns, remote, rport, local, lport)) {
        // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
        Some(od) => unsafe { *od },
        // Inbound capture (sk_lookup) does no NAT: a socket accepted on one of the pod's
        // own addresses was addressed to exactly that address.
        None => inbound_local(netns, &local, lport)?,
    };
    // SAFETY: so is this call's bpf_sockopt, all that write_sockaddr needs.
    unsafe { write_sockaddr(so, &od, v6) }
}

#[inline(always)]
fn inbound_local(netns: u64, local: &Addr, lport: u16) -> Option<OrigDst> {
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let pod = unsafe { *PODS.get_ptr(netns)? };
    if lport == pod.outbound_port || lport == pod.inbound_port {
        return None;
    }
    let mut i = 0;
    while i < sidecap_common::MAX_POD_IPS {
        if i < pod.n_ips as usize && addr::eq(&addr::from_bytes(&pod.ips[i]), local) {
            let family = if addr::is_v4_mapped(local) { AF_INET } else { AF_INET6 } as u16;
            return Some(OrigDst { addr: addr::to_bytes(local), port: lport, family, _pad: 0 });
        }
        i += 1;
    }
    None
}

/// Writes sockaddr_in (16 bytes) or sockaddr_in6 (28 bytes) into optval.
#[inline(always)]
unsafe fn write_sockaddr(so: *mut aya_ebpf::bindings::bpf_sockopt, od: &OrigDst, v6: bool) -> Option<()> {
    // SAFETY: so is the kernel's bpf_sockopt for this call (its sk checked for null before use); the verifier checks every field access.
    let start = unsafe { (*so).__bindgen_anon_2.optval } as *mut u8;
    // SAFETY: so is the kernel's bpf_sockopt for this call (its sk checked for null before use); the verifier checks every field access.
    let end = unsafe { (*so).__bindgen_anon_3.optval_end } as *mut u8;
    let a = addr::from_bytes(&od.addr);
    let port_be = od.port.to_be();
    if !v6 {
        if !addr::is_v4_mapped(&a) {
            return None;
        }
        // SAFETY: only compared with end: the bounds check the verifier requires before the writes below.
        if unsafe { start.add(16) } > end {
            return None;
        }
        let p = start as *mut u32;
        // SAFETY: start + 16 <= end was checked above, so every write is inside the optval buffer.
        unsafe {
            // sin_family (host order u16) + sin_port (network order u16)
            *p = (AF_INET & 0xffff) | ((port_be as u32) << 16);
            *p.add(1) = a[3];
            *p.add(2) = 0;
            *p.add(3) = 0;
            (*so).optlen = 16;
        }
    } else {
        // SAFETY: only compared with end: the bounds check the verifier requires before the writes below.
        if unsafe { start.add(28) } > end {
            return None;
        }
        let p = start as *mut u32;
        // SAFETY: start + 28 <= end was checked above, so every write is inside the optval buffer.
        unsafe {
            *p = (AF_INET6 & 0xffff) | ((port_be as u32) << 16);
            *p.add(1) = 0; // sin6_flowinfo
            *p.add(2) = a[0];
            *p.add(3) = a[1];
            *p.add(4) = a[2];
            *p.add(5) = a[3];
            *p.add(6) = 0; // sin6_scope_id
            (*so).optlen = 28;
        }
    }
    // SAFETY: so is the kernel's bpf_sockopt for this call (its sk checked for null before use); the verifier checks every field access.
    unsafe { (*so).retval = 0 };
    Some(())
}
