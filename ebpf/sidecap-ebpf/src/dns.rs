//! DNS capture for unconnected UDP (sendmsg/recvmsg): queries to port 53 go to the DNS
//! proxy on loopback; replies look as if the resolver the app asked had sent them.
//! (Connected UDP and TCP port 53 are handled by connect4/6.)

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use sidecap_common::{DropEvent, OrigDst, decide, drop_reason, pod_flags, proto, trace::DnsRecord};

use crate::{
    addr::{self, Addr},
    counters::{self, Counter},
    identity,
    maps::{DNS_ORIG, PODS},
    observers, trace,
};

const ALLOW: i32 = 1;
/// Fails the sendmsg with EPERM.
const DENY: i32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
unsafe fn rd(p: &u32) -> u32 {
    // SAFETY: p is a reference: valid and aligned for reads (volatile keeps the 4-byte context load the verifier wants).
    unsafe { core::ptr::read_volatile(p) }
}

/// Where a captured query goes, and what a traced pod's record needs.
struct Target {
    netns: u64,
    policy: u32,
    dns_port: u16,
    traced: bool,
    ids: u64,
}

/// The DNS port to redirect to, when this socket's pod captures DNS and the caller is the app.
#[inline(always)]
fn dns_target(ctx: &SockAddrContext, port: u16) -> Option<Target> {
    if port != 53 {
        return None;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let pod = unsafe { *PODS.get_ptr(netns)? };
    if pod.flags & pod_flags::DNS_CAPTURE == 0 {
        return None;
    }
    // The DNS proxy itself runs as the proxy user and must reach the real resolver.
    let (uid, gid, cgroup) = identity::current(&pod);
    if decide::caller(&pod, uid, gid, cgroup).is_proxy() {
        return None;
    }
    let ids = (u64::from(gid) << 32) | u64::from(uid);
    Some(Target { netns, policy: pod.policy, dns_port: pod.dns_port, traced: pod.flags & pod_flags::TRACE != 0, ids })
}

/// A traced pod's record of one redirected query.
#[inline(always)]
fn traced(ctx: &SockAddrContext, t: &Target, dst: &Addr, port: u16, family: u8) {
    if t.traced {
        // The socket's bound source (zero until the kernel picks one), for the 5-tuple.
        // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
        let (src, src_port) = unsafe {
            let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
            let src = if family == 6 {
                let s = &(*sk).src_ip6;
                [rd(&s[0]), rd(&s[1]), rd(&s[2]), rd(&s[3])]
            } else {
                addr::from_v4((*sk).src_ip4)
            };
            (src, (*sk).src_port as u16)
        };
        let r = DnsRecord {
            netns: t.netns,
            src: addr::to_bytes(&src),
            dst: addr::to_bytes(dst),
            uid: t.ids as u32,
            gid: (t.ids >> 32) as u32,
            src_port,
            dst_port: port,
            to_port: t.dns_port,
            family,
            _pad: 0,
        };
        trace::dns(ctx, &r);
    }
}

/// A query from outside the observers' cgroup (see `observers`): no recvmsg there would
/// show the reply as the resolver's, and sent on as it is it would bypass the DNS proxy.
/// Refused, counted and reported.
#[inline(always)]
fn refuse(t: &Target, dst: &Addr, port: u16, family: u16) -> i32 {
    counters::refused(DropEvent {
        netns: t.netns,
        policy: t.policy,
        reason: drop_reason::OUTSIDE_PODS_CGROUP,
        addr: addr::to_bytes(dst),
        port,
        proto: proto::UDP,
        family: family as u8,
        uid: t.ids as u32,
    });
    DENY
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &Addr, port: u16, family: u16) {
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let od = OrigDst { addr: addr::to_bytes(dst), port, family, flags: 0 };
    let _ = DNS_ORIG.insert(cookie, od, 0);
}

pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (ip, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let port = u16::from_be(port_be as u16);
    let Some(t) = dns_target(ctx, port) else { return ALLOW };
    let dst = addr::from_v4(ip);
    if addr::is_loopback(&dst) {
        return ALLOW;
    }
    if !observers::cover_current() {
        return refuse(&t, &dst, port, AF_INET);
    }
    remember(ctx, &dst, port, AF_INET);
    counters::add(t.netns, Counter::Dns);
    traced(ctx, &t, &dst, port, 4);
    let to = t.dns_port;
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    unsafe {
        (*sa).user_ip4 = addr::LOCALHOST_V4;
        (*sa).user_port = to.to_be() as u32;
    }
    ALLOW
}

pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (dst, port_be) = unsafe {
        let d = &(*sa).user_ip6;
        ([rd(&d[0]), rd(&d[1]), rd(&d[2]), rd(&d[3])], (*sa).user_port)
    };
    let port = u16::from_be(port_be as u16);
    let Some(t) = dns_target(ctx, port) else { return ALLOW };
    if addr::is_loopback(&dst) {
        return ALLOW;
    }
    if !observers::cover_current() {
        return refuse(&t, &dst, port, AF_INET6);
    }
    remember(ctx, &dst, port, AF_INET6);
    counters::add(t.netns, Counter::Dns);
    traced(ctx, &t, &dst, port, 6);
    let to = t.dns_port;
    let lo = addr::localhost_like(&dst, true);
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    unsafe {
        let d = &mut (*sa).user_ip6;
        core::ptr::write_volatile(&mut d[0], lo[0]);
        core::ptr::write_volatile(&mut d[1], lo[1]);
        core::ptr::write_volatile(&mut d[2], lo[2]);
        core::ptr::write_volatile(&mut d[3], lo[3]);
        (*sa).user_port = to.to_be() as u32;
    }
    ALLOW
}

/// The resolver to show for a reply from the DNS proxy, if this socket sent to one.
#[inline(always)]
fn restore(ctx: &SockAddrContext, src: &Addr, port: u16) -> Option<OrigDst> {
    if !addr::is_loopback(src) {
        return None;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let pod = unsafe { *PODS.get_ptr(netns)? };
    if port != pod.dns_port {
        return None;
    }
    // SAFETY: the helper reads this program's own context, as the kernel passed it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    Some(unsafe { *DNS_ORIG.get_ptr(cookie)? })
}

pub fn recvmsg4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (ip, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let Some(od) = restore(ctx, &addr::from_v4(ip), u16::from_be(port_be as u16)) else {
        return ALLOW;
    };
    let a = addr::from_bytes(&od.addr);
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    unsafe {
        (*sa).user_ip4 = a[3];
        (*sa).user_port = od.port.to_be() as u32;
    }
    ALLOW
}

pub fn recvmsg6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (src, port_be) = unsafe {
        let d = &(*sa).user_ip6;
        ([rd(&d[0]), rd(&d[1]), rd(&d[2]), rd(&d[3])], (*sa).user_port)
    };
    let Some(od) = restore(ctx, &src, u16::from_be(port_be as u16)) else { return ALLOW };
    let a = addr::from_bytes(&od.addr);
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    unsafe {
        let d = &mut (*sa).user_ip6;
        core::ptr::write_volatile(&mut d[0], a[0]);
        core::ptr::write_volatile(&mut d[1], a[1]);
        core::ptr::write_volatile(&mut d[2], a[2]);
        core::ptr::write_volatile(&mut d[3], a[3]);
        (*sa).user_port = od.port.to_be() as u32;
    }
    ALLOW
}
