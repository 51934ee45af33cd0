//! Original destination: sockops moves it from the connecting socket's cookie to the
//! connection's tuple; cgroup/getsockopt answers SO_ORIGINAL_DST from it on the proxy side.

mod established;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockOpsContext, SockoptContext},
};
use sidecap_common::{
    CONNECTING_SLOTS, ConnectingSlot, OrigDst, PodConfig, TupleKey, pod_flags, stale_claim,
    trace::{lookup, orig_flags},
};

use crate::{
    addr::{self, Addr},
    maps::{CONNECTING, ORIG_DST, ORIG_DST_BY_COOKIE, PODS},
    sockmap, trace,
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
    // SAFETY: p is a reference into the context, valid and aligned for a u32 read.
    unsafe { core::ptr::read_volatile(p) }
}

/// (local, local port, remote, remote port) of a sockops socket, v4 kept v4-mapped.
#[inline(always)]
fn sockops_tuple(ctx: &SockOpsContext) -> Option<(Addr, u16, Addr, u16)> {
    let ops = ctx.ops;
    let (local, remote) = match ctx.family() {
        AF_INET => (addr::from_v4(ctx.local_ip4()), addr::from_v4(ctx.remote_ip4())),
        // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this run; its fields are read by value.
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

#[inline(always)]
fn slot(cookie: u64) -> Option<*mut ConnectingSlot> {
    CONNECTING.get_ptr_mut((cookie as u32) & (CONNECTING_SLOTS - 1))
}

/// Compare-and-swap (BPF_CMPXCHG): the bpf target leaves `AtomicU64::compare_exchange` out,
/// the intrinsic lowers to the instruction.
#[inline(always)]
fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg};
    // SAFETY: p points at a slot's cookie in an array map value, live (and 8-byte aligned)
    // for the program's run; every access to it that races is atomic.
    unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new) }.1
}

/// connect, for a captured socket: keeps its original destination until its handshake
/// completes. In its `CONNECTING` slot when that is free (or held by a connect that will
/// never complete, see `CONNECTING_STALE_COOKIES`): a compare-and-swap on an array slot
/// where the LRU hash costs two locked updates (insert here, delete at ESTABLISHED).
/// Otherwise in `ORIG_DST_BY_COOKIE`. False when neither could take it.
#[inline(always)]
pub fn remember(cookie: u64, od: OrigDst) -> bool {
    remember_in_slot(cookie, od) || ORIG_DST_BY_COOKIE.insert(cookie, od, 0).is_ok()
}

/// `remember`'s first half: the `CONNECTING` slot only. False when it is held by another.
#[inline(always)]
pub fn remember_in_slot(cookie: u64, od: OrigDst) -> bool {
    if let Some(s) = slot(cookie) {
        // SAFETY: s is an array map value, live for this run.
        let p = unsafe { &raw mut (*s).cookie };
        // SAFETY: as above; an aligned 8-byte load is atomic, and only a compare-and-swap acts on what it read.
        let held = unsafe { core::ptr::read_volatile(p) };
        let stale = stale_claim(held, cookie);
        // held == cookie: this socket connects again (after a failed attempt); its claim is
        // its own, and its connects are serialized by the socket lock.
        if held == cookie || ((held == 0 || stale) && cas(p, held, cookie)) {
            // The slot is this socket's until `take` releases it: no one else writes it.
            // SAFETY: as above.
            unsafe { (*s).od = od };
            return true;
        }
    }
    false
}

/// The original destination `remember` kept for this socket, taken out.
#[inline(always)]
fn take(cookie: u64) -> Option<OrigDst> {
    if let Some(od) = take_from_slot(cookie) {
        return Some(od);
    }
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let od: OrigDst = unsafe { *ORIG_DST_BY_COOKIE.get_ptr(cookie)? };
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    Some(od)
}

/// `take`'s first half: what `remember_in_slot` kept, from the `CONNECTING` slot only.
#[inline(always)]
fn take_from_slot(cookie: u64) -> Option<OrigDst> {
    if let Some(s) = slot(cookie) {
        // SAFETY: s is an array map value, live for this run.
        let p = unsafe { &raw mut (*s).cookie };
        // SAFETY: as above; an aligned 8-byte load is atomic (another connect may be claiming it).
        if unsafe { core::ptr::read_volatile(p) } == cookie {
            // SAFETY: as above: a slot this socket holds is written by no one else.
            let od = unsafe { (*s).od };
            // Released only if still ours (a takeover of a claim thought stale wins).
            if cas(p, cookie, 0) {
                return Some(od);
            }
        }
    }
    None
}

/// sockops ACTIVE_ESTABLISHED_CB, the app's side. Runs before its final ACK leaves, hence
/// before the proxy can accept and ask. A captured connect always goes to localhost
/// (127.0.0.1, ::1 or ::ffff:127.0.0.1); Envoy's inbound hop leaves from 127.0.0.6 / ::6
/// (an array slot only, see `inbound_hop`): any other socket leaves without a lookup.
pub fn on_active_established(ctx: &SockOpsContext) {
    let Some((local, lport, remote, rport)) = sockops_tuple(ctx) else { return };
    if !addr::is_localhost(&remote) {
        if sockmap::node_enabled() && is_inbound_passthrough(&local) {
            inbound_hop(ctx, local, lport, remote, rport);
        }
        return;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(od) = take(cookie) else { return };
    // An inbound-hop mark is never an original destination (getsockopt must not answer it).
    if od.flags & orig_flags::ACCEL_ONLY != 0 {
        return;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let k = key(netns, local, lport, remote, rport);
    if !established::put(&k, &od, cookie) {
        let _ = ORIG_DST.insert(k, od, 0);
    }
    if od.flags & orig_flags::SOCKMAP != 0 {
        sockmap::add(ctx, k, key(netns, remote, rport, local, lport));
    }
}

#[inline(always)]
fn is_inbound_passthrough(a: &Addr) -> bool {
    addr::eq(a, &addr::from_v4(addr::INBOUND_PASSTHROUGH_V4)) || addr::eq(a, &addr::INBOUND_PASSTHROUGH_V6)
}

/// Envoy's socket of the inbound hop (connect marked it, `pod_flags::SOCKMAP` pods only):
/// into `ACCEL_SOCKS`, its peer the app's accepted socket.
#[inline(always)]
fn inbound_hop(ctx: &SockOpsContext, local: Addr, lport: u16, remote: Addr, rport: u16) {
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(od) = take_from_slot(cookie) else { return };
    if od.flags & orig_flags::ACCEL_ONLY == 0 {
        return;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    sockmap::add(ctx, key(netns, local, lport, remote, rport), key(netns, remote, rport, local, lport));
}

/// sockops PASSIVE_ESTABLISHED_CB, the proxy's accepted socket (on localhost, as above):
/// when it carries a captured connection, its close ends the entry's use, so it asks for
/// state callbacks; no other socket ever does. Also the app's socket accepted from
/// 127.0.0.6 / ::6 (Envoy's inbound hop), accelerated when its pod has `pod_flags::SOCKMAP`.
pub fn on_passive_established(ctx: &SockOpsContext) {
    let Some((local, lport, remote, rport)) = sockops_tuple(ctx) else { return };
    if !addr::is_localhost(&local) {
        if sockmap::node_enabled() && is_inbound_passthrough(&remote) {
            inbound_hop_accepted(ctx, local, lport, remote, rport);
        }
        return;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let app = key(netns, remote, rport, local, lport);
    let flags = if let Some((s, held, od)) = established::find(&app) {
        established::accept(s, held);
        od.flags
    } else if let Some(od) = ORIG_DST.get_ptr(app) {
        // SAFETY: a pointer from a successful map lookup points at a live value for this run.
        unsafe { (*od).flags }
    } else {
        return;
    };
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if flags & orig_flags::SOCKMAP != 0 {
        sockmap::add(ctx, key(netns, local, lport, remote, rport), app);
    }
}

/// The app's end of the inbound hop. The pod's flag decides (one lookup, paid only by
/// sockets accepted from 127.0.0.6 / ::6): when Envoy's end is not in `ACCEL_SOCKS` (its
/// slot was taken) this end's first message finds no peer and it falls back to TCP.
#[inline(always)]
fn inbound_hop_accepted(ctx: &SockOpsContext, local: Addr, lport: u16, remote: Addr, rport: u16) {
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = PODS.get_ptr(netns) else { return };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run.
    if unsafe { (*pod).flags } & pod_flags::SOCKMAP == 0 {
        return;
    }
    sockmap::add(ctx, key(netns, local, lport, remote, rport), key(netns, remote, rport, local, lport));
}

/// sockops STATE_CB: only the proxy's flagged sockets; only their close matters.
pub fn on_state(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let Some((local, lport, remote, rport)) = sockops_tuple(ctx) else { return };
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let app = key(netns, remote, rport, local, lport);
    match established::find(&app) {
        Some((s, held, _)) => established::release(s, held),
        None => {
            let _ = ORIG_DST.remove(app);
        }
    }
}

pub fn getsockopt(ctx: &SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // Every getsockopt of every socket in the cgroup comes here: two loads decide.
    // SAFETY: so is the kernel's bpf_sockopt for this call; the verifier checks every field access.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if (level != SOL_IP && level != SOL_IPV6) || optname != SO_ORIGINAL_DST {
        // Untouched; past a page the kernel wants optlen 0 to hand back its own buffer.
        // SAFETY: so is the kernel's bpf_sockopt for this call; the verifier checks every field access.
        if unsafe { (*so).optlen } > PAGE_SIZE {
            // SAFETY: so is the kernel's bpf_sockopt for this call; the verifier checks every field access.
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
    // SAFETY: so is the kernel's bpf_sockopt for this call; its sk is checked for null before any field is read.
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
    let app = key(netns, remote, rport, local, lport);
    let found = match established::find(&app) {
        Some((_, _, od)) => Some(od),
        // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
        None => ORIG_DST.get_ptr(app).map(|od| unsafe { *od }),
    };
    let (od, traced, result): (Option<OrigDst>, bool, u8) = match found {
        Some(od) => {
            // Stamped at connect when the pod was traced: no PODS lookup on this path.
            (Some(od), od.flags & orig_flags::TRACED != 0, lookup::CAPTURED)
        }
        // Inbound capture (sk_lookup) does no NAT: a socket accepted on one of the pod's
        // own addresses was addressed to exactly that address.
        None => {
            // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
            let pod = unsafe { *PODS.get_ptr(netns)? };
            let od = inbound_local(&pod, &local, lport);
            (od, pod.flags & pod_flags::TRACE != 0, if od.is_some() { lookup::INBOUND } else { lookup::MISS })
        }
    };
    // The one branch an untraced pod pays (the record reads the socket's ends again).
    // (A reference into `od` itself would make LLVM store its payload even when None, which
    // the verifier refuses as a read of an uninitialized register.)
    if traced {
        match od {
            Some(o) => trace::getsockopt(ctx, netns, result, &o),
            None => trace::getsockopt(ctx, netns, result, &OrigDst::default()),
        }
    }
    let od = od?;
    // SAFETY: so is the kernel's bpf_sockopt for this call; write_sockaddr checks optval's bounds before writing.
    unsafe { write_sockaddr(so, &od, v6) }
}

#[inline(always)]
fn inbound_local(pod: &PodConfig, local: &Addr, lport: u16) -> Option<OrigDst> {
    if lport == pod.outbound_port || lport == pod.inbound_port {
        return None;
    }
    let mut i = 0;
    while i < sidecap_common::MAX_POD_IPS {
        if i < pod.n_ips as usize && addr::eq(&addr::from_bytes(&pod.ips[i]), local) {
            let family = if addr::is_v4_mapped(local) { AF_INET } else { AF_INET6 } as u16;
            return Some(OrigDst { addr: addr::to_bytes(local), port: lport, family, flags: 0 });
        }
        i += 1;
    }
    None
}

/// Writes sockaddr_in (16 bytes) or sockaddr_in6 (28 bytes) into optval.
#[inline(always)]
unsafe fn write_sockaddr(so: *mut aya_ebpf::bindings::bpf_sockopt, od: &OrigDst, v6: bool) -> Option<()> {
    // SAFETY: so is the kernel's bpf_sockopt for this call; the verifier checks every field access.
    let start = unsafe { (*so).__bindgen_anon_2.optval } as *mut u8;
    // SAFETY: so is the kernel's bpf_sockopt for this call; the verifier checks every field access.
    let end = unsafe { (*so).__bindgen_anon_3.optval_end } as *mut u8;
    let a = addr::from_bytes(&od.addr);
    let port_be = od.port.to_be();
    if !v6 {
        if !addr::is_v4_mapped(&a) {
            return None;
        }
        // SAFETY: address arithmetic only; the result is compared with optval_end before anything is accessed.
        if unsafe { start.add(16) } > end {
            return None;
        }
        let p = start as *mut u32;
        // SAFETY: the bounds check just above keeps these writes inside [optval, optval_end).
        unsafe {
            // sin_family (host order u16) + sin_port (network order u16)
            *p = (AF_INET & 0xffff) | ((port_be as u32) << 16);
            *p.add(1) = a[3];
            *p.add(2) = 0;
            *p.add(3) = 0;
            (*so).optlen = 16;
        }
    } else {
        // SAFETY: address arithmetic only; the result is compared with optval_end before anything is accessed.
        if unsafe { start.add(28) } > end {
            return None;
        }
        let p = start as *mut u32;
        // SAFETY: the bounds check just above keeps these writes inside [optval, optval_end).
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
    // SAFETY: so is the kernel's bpf_sockopt for this call; the verifier checks every field access.
    unsafe { (*so).retval = 0 };
    Some(())
}
