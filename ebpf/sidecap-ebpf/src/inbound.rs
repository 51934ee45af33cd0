//! Inbound capture without NAT: sockops registers the proxy's inbound listener per netns
//! at LISTEN; sk_lookup hands connections for captured ports straight to it. The accepted
//! socket's local address *is* the original destination.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_SOCK_OPS_TCP_LISTEN_CB,
    helpers::bpf_get_netns_cookie,
    programs::{SkLookupContext, SockOpsContext},
};
use sidecap_common::{DropEvent, decide, drop_reason, pod_flags, proto, trace::assign};

use crate::{
    addr::{self, Addr},
    counters::{self, Counter},
    lookup::KernelMaps,
    maps::{INBOUND_LISTENERS, POD_ADDRS, PODS},
    trace,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// SockHash key bit for a netns's IPv6 listener (cookies are small counters).
pub const V6_LISTENER: u64 = 1 << 63;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[inline(always)]
unsafe fn rd(p: &u32) -> u32 {
    // SAFETY: p is a reference into the context, valid and aligned for a u32 read.
    unsafe { core::ptr::read_volatile(p) }
}

/// sockops TCP_LISTEN_CB: remember the proxy's inbound listener of each meshed netns.
pub fn on_listen(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_TCP_LISTEN_CB {
        return;
    }
    // SAFETY: the helper takes the program's own context pointer.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = PODS.get_ptr(netns) else { return };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let inbound_port = unsafe { (*pod).inbound_port };
    if ctx.local_port() != inbound_port as u32 {
        return;
    }
    let key = if ctx.family() == AF_INET6 { netns | V6_LISTENER } else { netns };
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this run, the socket the helper stores.
    let _ = INBOUND_LISTENERS.update(key, unsafe { &mut *ctx.ops }, 0);
}

pub fn sk_lookup(ctx: &SkLookupContext) -> u32 {
    // Pass unless refused: either we assigned the proxy's socket, or the normal lookup goes on.
    try_sk_lookup(ctx).unwrap_or(SK_PASS)
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> Option<u32> {
    let l = ctx.lookup;
    // SAFETY: ctx.lookup is the kernel's bpf_sk_lookup for this run; fields are read by value.
    let (family, protocol, lport) = unsafe { ((*l).family, (*l).protocol, (*l).local_port) };
    if protocol != proto::TCP as u32 {
        return None;
    }
    // SAFETY: as above; the IPv6 words are read one by one, as the verifier requires.
    let (local, remote): (Addr, Addr) = unsafe {
        match family {
            AF_INET => (addr::from_v4((*l).local_ip4), addr::from_v4((*l).remote_ip4)),
            AF_INET6 => {
                let a = &(*l).local_ip6;
                let b = &(*l).remote_ip6;
                ([rd(&a[0]), rd(&a[1]), rd(&a[2]), rd(&a[3])], [rd(&b[0]), rd(&b[1]), rd(&b[2]), rd(&b[3])])
            }
            _ => return None,
        }
    };
    // Loopback is never a pod's address: the captured connect to the proxy itself (and any
    // other loopback connection in the pod) leaves before the address lookup.
    if addr::is_loopback(&local) {
        return None;
    }
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let netns = unsafe { *POD_ADDRS.get_ptr(addr::to_bytes(&local))? };
    // SAFETY: a pointer from a successful map lookup points at a live value for this run; it is copied out at once.
    let pod = unsafe { *PODS.get_ptr(netns)? };
    let decision = decide::inbound(&pod, &KernelMaps, &remote, lport as u16);
    let result = if !decision.capture {
        assign::PASSED
    } else {
        // An IPv4 connection may go to a dual-stack IPv6 listener; no listener means the
        // proxy is not up (yet, or again): the connection is refused (below), never
        // handed to the app uncaptured.
        let assigned = if family == AF_INET {
            INBOUND_LISTENERS.redirect_sk_lookup(ctx, netns, 0).is_ok()
                || INBOUND_LISTENERS.redirect_sk_lookup(ctx, netns | V6_LISTENER, 0).is_ok()
        } else {
            INBOUND_LISTENERS.redirect_sk_lookup(ctx, netns | V6_LISTENER, 0).is_ok()
        };
        if assigned {
            counters::add(netns, Counter::InboundCaptured);
            assign::ASSIGNED
        } else {
            let (addr, port, family) = (addr::to_bytes(&local), lport as u16, family as u8);
            let reason = drop_reason::INBOUND_NO_PROXY;
            counters::refused(DropEvent { netns, policy: pod.policy, reason, addr, port, proto: proto::TCP, family, uid: 0 });
            assign::NO_LISTENER
        }
    };
    // The one branch an untraced pod pays. The record reads the addresses from the context
    // again: kept live until here, they cost the untraced path spills.
    if pod.flags & pod_flags::TRACE != 0 {
        trace::sk_lookup(ctx, netns, decision.step.rule(), result);
    }
    // SK_DROP: the kernel finds no socket and answers the SYN with a reset.
    Some(if result == assign::NO_LISTENER { SK_DROP } else { SK_PASS })
}
