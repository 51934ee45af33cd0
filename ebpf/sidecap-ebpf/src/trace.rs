//! Live decision trace: one aya-log record per decision of a pod whose `PodConfig::flags`
//! has `pod_flags::TRACE` (docs/kernel-contract.md, "Trace records"). The callers test the
//! flag; what is here runs only for traced pods and is kept out of line (`inline(never)`:
//! a BPF-to-BPF call), so the untraced path is that one branch.
//!
//! A record is `HOOK HEX`, the bytes of a `sidecap_common::trace::*Record` (one aya-log
//! argument: the program and its calls share 512 bytes of stack, and aya-log keeps each
//! argument there). The agent decodes them (`agent/src/trace/record.rs`).

use aya_ebpf::{
    btf_maps::PerCpuArray,
    macros::btf_map,
    programs::{SkLookupContext, SockAddrContext, SockoptContext},
};
use aya_log_ebpf::info;
use sidecap_common::{
    OrigDst,
    ip::{self, Addr},
    trace::{ConnectRecord, DnsRecord, GetsockoptRecord, SkLookupRecord},
};

/// The record's bytes, as aya-log's hex formatter takes them: a slice, which aya-log
/// writes from where it is (an array argument would be copied on the stack first).
#[inline(always)]
fn bytes<T>(r: &T) -> &[u8] {
    // SAFETY: T is one of the repr(C) record structs, whose padding is explicit fields, so all size_of::<T>() bytes are initialized.
    unsafe { core::slice::from_raw_parts(r as *const T as *const u8, core::mem::size_of::<T>()) }
}

const AF_INET6: u32 = 10;

/// A connect decision, packed into scalars: a BPF call takes five, and a struct on the
/// program's own stack would count against its 512 bytes too.
#[derive(Clone, Copy)]
pub struct Decision {
    pub verdict: u8,
    pub step: u8,
    pub rule: u8,
    pub proto: u8,
    pub listener: u32,
    pub dst_port: u16,
    /// The port the destination is rewritten to (0: left alone).
    pub to_port: u16,
}

impl Decision {
    #[inline(always)]
    pub fn pack(&self) -> (u64, u64) {
        let what = (u64::from(self.listener) << 32)
            | (u64::from(self.verdict) << 24)
            | (u64::from(self.step) << 16)
            | (u64::from(self.rule) << 8)
            | u64::from(self.proto);
        let ports = (u64::from(self.to_port) << 16) | u64::from(self.dst_port);
        (what, ports)
    }
}

#[inline(always)]
unsafe fn rd(p: &u32) -> u32 {
    // SAFETY: p is a reference into the context, valid and aligned for a u32 read (volatile keeps the 4-byte load the verifier wants).
    unsafe { core::ptr::read_volatile(p) }
}

/// Per-CPU room for a connect record: connect6 uses most of the 512 bytes of stack that a
/// program and its calls share, so the record is written here, not on the stack. Not
/// pinned: each load has its own (like aya-log's `AYA_LOGS`).
#[btf_map]
static TRACE_CONNECT: PerCpuArray<ConnectRecord, 1> = PerCpuArray::new();

/// connect4's record (`ids`: uid | gid << 32, as the helper gives them). Called before
/// the destination is rewritten: the context still holds the app's.
#[inline(never)]
pub fn connect4(ctx: &SockAddrContext, netns: u64, ids: u64, what: u64, ports: u64) {
    let Some(r) = TRACE_CONNECT.get_ptr_mut(0) else { return };
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (dst, src, src_port) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (ip::from_v4((*ctx.sock_addr).user_ip4), ip::from_v4((*sk).src_ip4), (*sk).src_port)
    };
    // SAFETY: r is this CPU's slot of the map, valid for this run and used by no one else meanwhile.
    let r = unsafe { &mut *r };
    fill(r, 4, netns, ids, what, ports, &dst, &src, src_port, false);
    info!(ctx, "connect4 {:x}", bytes(r));
}

/// connect6's record.
#[inline(never)]
pub fn connect6(ctx: &SockAddrContext, netns: u64, ids: u64, what: u64, ports: u64) {
    let Some(r) = TRACE_CONNECT.get_ptr_mut(0) else { return };
    // SAFETY: ctx.sock_addr is the kernel's bpf_sock_addr for this call (with its sk); the verifier checks every field access.
    let (dst, src, src_port) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let d = &(*ctx.sock_addr).user_ip6;
        let s = &(*sk).src_ip6;
        ([rd(&d[0]), rd(&d[1]), rd(&d[2]), rd(&d[3])], [rd(&s[0]), rd(&s[1]), rd(&s[2]), rd(&s[3])], (*sk).src_port)
    };
    // SAFETY: r is this CPU's slot of the map, valid for this run and used by no one else meanwhile.
    let r = unsafe { &mut *r };
    fill(r, 6, netns, ids, what, ports, &dst, &src, src_port, true);
    info!(ctx, "connect6 {:x}", bytes(r));
}

/// Writes the record field by field (a whole struct value would be built on the stack).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fill(r: &mut ConnectRecord, family: u8, netns: u64, ids: u64, what: u64, ports: u64, dst: &Addr, src: &Addr, src_port: u32, v6: bool) {
    let to_port = (ports >> 16) as u16;
    let to = if to_port != 0 { ip::localhost_like(dst, v6) } else { [0; 4] };
    r.netns = netns;
    r.src = ip::to_bytes(src);
    r.dst = ip::to_bytes(dst);
    r.to = ip::to_bytes(&to);
    r.uid = ids as u32;
    r.gid = (ids >> 32) as u32;
    r.listener = (what >> 32) as u32;
    r.src_port = src_port as u16;
    r.dst_port = ports as u16;
    r.to_port = to_port;
    r.family = family;
    r.proto = what as u8;
    r.verdict = (what >> 24) as u8;
    r.step = (what >> 16) as u8;
    r.rule = (what >> 8) as u8;
    r._pad = 0;
}

/// getsockopt's record: the asking socket's ends (from its context), the answer (zero on a
/// miss) and how it was found.
#[inline(never)]
pub fn getsockopt(ctx: &SockoptContext, netns: u64, result: u8, orig: &OrigDst) {
    // SAFETY: ctx.sockopt is the kernel's bpf_sockopt for this call; its sk is checked for null before any field is read, the IPv6 words are read one by one.
    let ends = unsafe {
        let sk = (*ctx.sockopt).__bindgen_anon_1.sk;
        if sk.is_null() {
            return;
        }
        let (l, r) = if (*sk).family == AF_INET6 {
            let s = &(*sk).src_ip6;
            let d = &(*sk).dst_ip6;
            ([rd(&s[0]), rd(&s[1]), rd(&s[2]), rd(&s[3])], [rd(&d[0]), rd(&d[1]), rd(&d[2]), rd(&d[3])])
        } else {
            (ip::from_v4((*sk).src_ip4), ip::from_v4((*sk).dst_ip4))
        };
        (l, (*sk).src_port as u16, r, u16::from_be((*sk).dst_port))
    };
    let r = GetsockoptRecord {
        netns,
        local: ip::to_bytes(&ends.0),
        remote: ip::to_bytes(&ends.2),
        orig: orig.addr,
        local_port: ends.1,
        remote_port: ends.3,
        orig_port: orig.port,
        result,
        _pad: 0,
    };
    info!(ctx, "getsockopt {:x}", bytes(&r));
}

/// sk_lookup's record: the connection as the context has it, and the decision.
#[inline(never)]
pub fn sk_lookup(ctx: &SkLookupContext, netns: u64, rule: u8, result: u8) {
    let l = ctx.lookup;
    // SAFETY: ctx.lookup is the kernel's bpf_sk_lookup for this run; fields are read by value, the IPv6 words one by one.
    let (local, remote, port, remote_port) = unsafe {
        let (local, remote) = if (*l).family == AF_INET6 {
            let a = &(*l).local_ip6;
            let b = &(*l).remote_ip6;
            ([rd(&a[0]), rd(&a[1]), rd(&a[2]), rd(&a[3])], [rd(&b[0]), rd(&b[1]), rd(&b[2]), rd(&b[3])])
        } else {
            (ip::from_v4((*l).local_ip4), ip::from_v4((*l).remote_ip4))
        };
        (local, remote, (*l).local_port as u16, u16::from_be((*l).remote_port))
    };
    let r =
        SkLookupRecord { netns, remote: ip::to_bytes(&remote), local: ip::to_bytes(&local), remote_port, port, rule, result, _pad: [0; 2] };
    info!(ctx, "sk_lookup {:x}", bytes(&r));
}

#[inline(never)]
pub fn dns<C>(ctx: &C, r: &DnsRecord) {
    if r.family == 6 {
        info!(ctx, "sendmsg6 {:x}", bytes(r));
    } else {
        info!(ctx, "sendmsg4 {:x}", bytes(r));
    }
}
