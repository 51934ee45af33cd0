//! sidecap's kernel programs: one object, attached once per node (cgroup programs) and
//! per pod netns (sk_lookup). See docs/kernel-contract.md.
#![no_std]
#![no_main]
// origdst's compare-and-swap: the bpf target has no `compare_exchange`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod connect;
mod counters;
mod dns;
mod identity;
mod inbound;
mod lookup;
mod maps;
mod observers;
mod origdst;
mod outbound;
mod sockmap;
mod trace;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, sk_lookup, sk_msg, sock_ops},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};

#[cgroup_sock_addr(connect4)]
pub fn sidecap_connect4(ctx: SockAddrContext) -> i32 {
    connect::connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sidecap_connect6(ctx: SockAddrContext) -> i32 {
    connect::connect6(&ctx)
}

/// Runs for every TCP event of every socket in the cgroup: the ops below are ours, the rest
/// leave after one load. The only callback flag ever set is STATE_CB, on the proxy's
/// sockets that carry a captured connection (no RTT, retransmit or header-option ops).
#[sock_ops]
pub fn sidecap_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => origdst::on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => origdst::on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => origdst::on_state(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => inbound::on_listen(&ctx),
        _ => {}
    }
    1
}

#[sk_lookup]
pub fn sidecap_sk_lookup(ctx: SkLookupContext) -> u32 {
    inbound::sk_lookup(&ctx)
}

/// Attached to `ACCEL_SOCKS` (under `--sockmap` only): runs for each message sent on a
/// socket in it.
#[sk_msg]
pub fn sidecap_sk_msg(ctx: SkMsgContext) -> u32 {
    sockmap::sk_msg(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sidecap_sendmsg4(ctx: SockAddrContext) -> i32 {
    dns::sendmsg4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sidecap_sendmsg6(ctx: SockAddrContext) -> i32 {
    dns::sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sidecap_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::recvmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sidecap_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::recvmsg6(&ctx)
}

#[cgroup_sockopt(getsockopt)]
pub fn sidecap_getsockopt(ctx: SockoptContext) -> i32 {
    origdst::getsockopt(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
