//! Sockmap acceleration of the app↔proxy hop (`pod_flags::SOCKMAP`, docs/kernel-contract.md
//! "Sockmap"): sockops puts both sockets of a captured connection in `ACCEL_SOCKS`, each
//! under its own tuple, with its peer's key in its `ACCEL_PEERS` storage; the sk_msg
//! program hands each message straight to the peer's receive queue. When the peer is not
//! there (not inserted yet, closed, map full) or the helper refuses, the message takes the
//! TCP path, and so does every later message of that socket: a redirected message lands in
//! the peer's sk_msg queue, which its reads drain before TCP's, so a redirect after a TCP
//! send could overtake it.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, sk_action::SK_PASS},
    helpers::generated::bpf_sk_storage_get,
    programs::{SkMsgContext, SockOpsContext},
};
use sidecap_common::{AccelPeer, TupleKey};

use crate::{
    counters,
    maps::{ACCEL_PEERS, ACCEL_SOCKS},
};

/// 1 when the agent runs with `--sockmap`, set at load (`EbpfLoader::set_global`; read-only,
/// so the verifier knows it). At 0 the inbound hop's checks in sockops end at this load:
/// on a node without the flag no socket pays a lookup for the feature.
#[unsafe(no_mangle)]
static SIDECAP_SOCKMAP_NODE: u8 = 0;

/// Whether this load of the programs serves `--sockmap`.
#[inline(always)]
pub fn node_enabled() -> bool {
    // SAFETY: a read of a global of this object; volatile keeps the compiler from folding the
    // 0 it was built with (the loader sets the value).
    unsafe { core::ptr::read_volatile(&raw const SIDECAP_SOCKMAP_NODE) != 0 }
}

#[inline(always)]
fn peers_map() -> *mut core::ffi::c_void {
    (&raw const ACCEL_PEERS).cast_mut().cast()
}

/// sockops ESTABLISHED (either end): `own` is the socket's own tuple, `peer` the other
/// end's. The storage first: a socket in `ACCEL_SOCKS` always has its peer's key. A failure
/// leaves this end out (its messages take TCP; the other end finds no peer and falls back).
#[inline(always)]
pub fn add(ctx: &SockOpsContext, mut own: TupleKey, peer: TupleKey) {
    let ops = ctx.ops;
    // SAFETY: ops is the kernel's bpf_sock_ops of this run; `sk` is read by value (may be null).
    let sk = unsafe { (*ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let mut v = AccelPeer { peer, fell_back: 0, _pad: 0 };
    // SAFETY: ACCEL_PEERS is a socket storage map, sk this run's socket, v a value of its type on the stack.
    let p = unsafe { bpf_sk_storage_get(peers_map(), sk.cast(), (&raw mut v).cast(), BPF_SK_STORAGE_GET_F_CREATE as u64) };
    if p.is_null() {
        return;
    }
    // SAFETY: ops is the kernel's bpf_sock_ops of this run, the context the helper wants.
    let _ = ACCEL_SOCKS.update(&mut own, unsafe { &mut *ops }, 0);
}

/// sk_msg verdict of every message sent on a socket of `ACCEL_SOCKS`. Always SK_PASS:
/// redirected when the helper took it, the TCP path otherwise (never SK_DROP).
pub fn sk_msg(ctx: &SkMsgContext) -> u32 {
    // SAFETY: ctx.msg is the kernel's sk_msg_md of this run; `sk` is the sending socket.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    // SAFETY: ACCEL_PEERS is a socket storage map and sk this run's socket; no value, no create.
    let v = unsafe { bpf_sk_storage_get(peers_map(), sk.cast(), core::ptr::null_mut(), 0) }.cast::<AccelPeer>();
    if v.is_null() {
        return SK_PASS;
    }
    // SAFETY: a storage value from a successful lookup, live for this run; this socket's
    // sends hold its lock, so no other run writes it meanwhile.
    let (mut peer, fell_back) = unsafe { ((*v).peer, (*v).fell_back) };
    if fell_back != 0 {
        return SK_PASS;
    }
    let size = ctx.size();
    if ACCEL_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        counters::sockmap_redirected(peer.netns, size);
        return SK_PASS;
    }
    // The first failure: this socket's messages take TCP from now on.
    // SAFETY: as above.
    unsafe { (*v).fell_back = 1 };
    counters::add(peer.netns, counters::Counter::SockmapFallback);
    SK_PASS
}
