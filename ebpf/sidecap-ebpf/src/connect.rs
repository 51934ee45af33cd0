//! cgroup/connect4 and cgroup/connect6: apply the outbound verdict to the socket.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use sidecap_common::{
    DropEvent, OrigDst, PodConfig,
    decide::{OutboundStep, is_pod_ip},
    drop_reason, pod_flags, proto, trace as trace_codes,
};

use crate::{
    addr::{self, Addr},
    counters::{self, Counter},
    identity,
    maps::PODS,
    observers, origdst,
    outbound::{self, Connect, RedirectKind, Verdict},
    trace,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// 1 lets the connect proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx is this program's connect context, all that meshed needs.
    let Some((pod, netns, proto)) = (unsafe { meshed(ctx) }) else { return ALLOW };
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (dst4, port_be, bound4) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        ((*sa).user_ip4, (*sa).user_port, (*sk).src_ip4)
    };
    let dst = addr::from_v4(dst4);
    let bound = if bound4 == 0 { [0; 4] } else { addr::from_v4(bound4) };
    let Some(to) = apply(ctx, &pod, netns, proto, dst, port_be, bound, AF_INET) else {
        return DENY;
    };
    if let Some((ip, port)) = to {
        // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
        unsafe {
            (*sa).user_ip4 = ip[3];
            (*sa).user_port = port;
        }
    }
    ALLOW
}

pub fn connect6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx is this program's connect context, all that meshed needs.
    let Some((pod, netns, proto)) = (unsafe { meshed(ctx) }) else { return ALLOW };
    // Word by word: the verifier only allows 4-byte context reads of these arrays.
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (dst, port_be, bound) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        let d = &(*sa).user_ip6;
        let s = &(*sk).src_ip6;
        ([read(&d[0]), read(&d[1]), read(&d[2]), read(&d[3])], (*sa).user_port, [read(&s[0]), read(&s[1]), read(&s[2]), read(&s[3])])
    };
    let Some(to) = apply(ctx, &pod, netns, proto, dst, port_be, bound, AF_INET6) else {
        return DENY;
    };
    if let Some((ip, port)) = to {
        // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
        unsafe {
            let d = &mut (*sa).user_ip6;
            core::ptr::write_volatile(&mut d[0], ip[0]);
            core::ptr::write_volatile(&mut d[1], ip[1]);
            core::ptr::write_volatile(&mut d[2], ip[2]);
            core::ptr::write_volatile(&mut d[3], ip[3]);
            (*sa).user_port = port;
        }
    }
    ALLOW
}

#[inline(always)]
unsafe fn read(p: &u32) -> u32 {
    // SAFETY: p is a reference: valid and aligned for reads (volatile keeps the 4-byte context load the verifier wants).
    unsafe { core::ptr::read_volatile(p) }
}

/// The pod's config when this socket lives in a meshed netns and is TCP or UDP.
#[inline(always)]
unsafe fn meshed(ctx: &SockAddrContext) -> Option<(PodConfig, u64, u8)> {
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let proto = match unsafe { (*ctx.sock_addr).type_ } {
        SOCK_STREAM => proto::TCP,
        SOCK_DGRAM => proto::UDP,
        _ => return None,
    };
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Copy once: a concurrent policy flip must not mix two generations in one decision.
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let pod = unsafe { *PODS.get_ptr(netns)? };
    Some((pod, netns, proto))
}

/// Decides, records and (for a traced pod) traces; returns None to deny, Some(None) to
/// leave the address, Some(Some((ip, user_port))) to rewrite it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply(
    ctx: &SockAddrContext,
    pod: &PodConfig,
    netns: u64,
    proto: u8,
    dst: Addr,
    port_be: u32,
    bound: Addr,
    family: u16,
) -> Option<Option<(Addr, u32)>> {
    let port = u16::from_be(port_be as u16);
    let (uid, gid, cgroup) = identity::current(pod);
    let c = Connect { dst, port, proto, bound_src: bound, uid, gid, cgroup };
    let out = outbound::decide(pod, &c);
    let traced = pod.flags & pod_flags::TRACE != 0;
    let (done, rule, to_port) = enforce(ctx, pod, netns, &c, out.verdict, family, traced);
    // The one compare an untagged pod pays here.
    if pod.flags & pod_flags::SOCKMAP != 0 && matches!(out.step, OutboundStep::PassthroughSource) {
        mark_inbound_hop(ctx, pod, &c, family);
    }
    // The one branch an untraced pod pays.
    if traced {
        // Set only by a refused redirect.
        let verdict = if rule != 0 { trace_codes::verdict::DROP } else { out.verdict.code() };
        let d = trace::Decision {
            verdict,
            step: out.step.number(),
            rule: if rule == 0 { out.step.rule() } else { rule },
            proto,
            listener: out.step.listener(),
            dst_port: port,
            to_port,
        };
        let (what, ports) = d.pack();
        let ids = (u64::from(gid) << 32) | u64::from(uid);
        if family == AF_INET6 {
            trace::connect6(ctx, netns, ids, what, ports);
        } else {
            trace::connect4(ctx, netns, ids, what, ports);
        }
    }
    done
}

/// Envoy's inbound hop (`--sockmap` pods): its connect from 127.0.0.6 / ::6 to one of the
/// pod's own addresses (the connection sk_lookup gave it on the inbound port) gets a marker
/// for sockops, which puts both ends in `ACCEL_SOCKS`. Only in the socket's `CONNECTING`
/// slot: when that is taken the hop stays plain TCP, and sockops looks nowhere else.
#[inline(always)]
fn mark_inbound_hop(ctx: &SockAddrContext, pod: &PodConfig, c: &Connect, family: u16) {
    if c.proto != proto::TCP || !is_pod_ip(pod, &c.dst) {
        return;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let flags = trace_codes::orig_flags::SOCKMAP | trace_codes::orig_flags::ACCEL_ONLY;
    let _ = origdst::remember_in_slot(cookie, OrigDst { addr: addr::to_bytes(&c.dst), port: c.port, family, flags });
}

/// Applies the verdict to the socket: counters, drop events, the original destination.
/// Also a `trace::rule` code overriding the decision's (0: none) and the port the
/// destination is rewritten to (0: none), both set on every path: reading them out of the
/// first value's payload let LLVM read a register the verifier finds uninitialized.
#[inline(always)]
fn enforce(
    ctx: &SockAddrContext,
    pod: &PodConfig,
    netns: u64,
    c: &Connect,
    verdict: Verdict,
    family: u16,
    traced: bool,
) -> (Option<Option<(Addr, u32)>>, u8, u16) {
    let (dst, port) = (c.dst, c.port);
    match verdict {
        Verdict::Untouched => (Some(None), 0, 0),
        Verdict::Passthrough => {
            counters::add(netns, Counter::Passthrough);
            (Some(None), 0, 0)
        }
        Verdict::Drop { reason } => {
            deny(pod, netns, c, family, reason);
            (None, 0, 0)
        }
        Verdict::Redirect { port: to_port, kind } => {
            if !observers::cover_current() {
                // No sockops would hand the original destination over (nor recvmsg restore
                // a DNS reply): redirected, the connection could not be served; direct, it
                // would be uncaptured. It fails.
                deny(pod, netns, c, family, drop_reason::OUTSIDE_PODS_CGROUP);
                return (None, trace_codes::rule::OUTSIDE_PODS_CGROUP, 0);
            }
            match kind {
                RedirectKind::Capture | RedirectKind::ProxyToSelf => {
                    // SAFETY: the helper reads this program's own context, as the kernel passed it.
                    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                    // getsockopt traces its answer when the pod was traced at connect.
                    let mut flags = if traced { trace_codes::orig_flags::TRACED } else { 0 };
                    // Of the redirects, only the app's hop to the outbound port is
                    // accelerated (both ends in this netns, the peer the proxy's accepted
                    // socket); the inbound hop is marked in `mark_inbound_hop`.
                    if pod.flags & pod_flags::SOCKMAP != 0 && matches!(kind, RedirectKind::Capture) {
                        flags |= trace_codes::orig_flags::SOCKMAP;
                    }
                    let od = OrigDst { addr: addr::to_bytes(&dst), port, family, flags };
                    if !origdst::remember(cookie, od) {
                        // Without the original destination the proxy could not route it,
                        // and going direct would leave it uncaptured: the connect fails.
                        deny(pod, netns, c, family, drop_reason::NO_ROOM);
                        return (None, trace_codes::rule::NO_ROOM, 0);
                    }
                    counters::add(netns, if matches!(kind, RedirectKind::Capture) { Counter::Captured } else { Counter::InboundCaptured });
                }
                RedirectKind::Dns => counters::add(netns, Counter::Dns),
            }
            let ip = addr::localhost_like(&dst, family == AF_INET6);
            (Some(Some((ip, (to_port.to_be() as u32)))), 0, to_port)
        }
    }
}

/// A denied connect: counted, and reported with its destination and caller.
#[inline(always)]
fn deny(pod: &PodConfig, netns: u64, c: &Connect, family: u16, reason: u32) {
    let addr = addr::to_bytes(&c.dst);
    counters::refused(DropEvent {
        netns,
        policy: pod.policy,
        reason,
        addr,
        port: c.port,
        proto: c.proto,
        family: family as u8,
        uid: c.uid,
    });
}
