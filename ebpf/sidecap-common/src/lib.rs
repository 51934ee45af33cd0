//! Types shared by the kernel programs (`sidecap-ebpf`) and userspace (`sidecap`,
//! `sidecap-policy`): the layout of every pinned map's keys and values.
//!
//! Conventions (so that `bpftool map dump` output reads naturally):
//! - addresses are 16 bytes in network order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`),
//!   so one map serves both families and v4-mapped v6 sockets behave like v4 ones;
//! - ports and ids are host-order integers;
//! - every struct is `#[repr(C)]` with explicit padding, which callers zero, because the
//!   kernel hashes and compares keys byte by byte.
#![no_std]

pub mod abi;
pub mod decide;
pub mod ip;
pub mod trace;

/// Istio's defaults (istio-iptables / pilot-agent).
pub mod defaults {
    pub const PROXY_UID: u32 = 1337;
    pub const PROXY_GID: u32 = 1337;
    /// Envoy's outbound capture listener (`virtualOutbound`).
    pub const OUTBOUND_PORT: u16 = 15001;
    /// Envoy's inbound capture listener (`virtualInbound`).
    pub const INBOUND_PORT: u16 = 15006;
    /// HBONE tunnel port: never redirected.
    pub const TUNNEL_PORT: u16 = 15008;
    /// istio-agent's DNS proxy.
    pub const DNS_PORT: u16 = 15053;
    /// Source address Envoy uses for inbound passthrough connections.
    pub const INBOUND_PASSTHROUGH_SRC: [u8; 4] = [127, 0, 0, 6];
}

/// Maximum number of addresses a pod may have (dual-stack, a few secondaries).
pub const MAX_POD_IPS: usize = 4;

/// What happens to an outbound connection.
pub mod action {
    /// No decision (only in map values that are not actions).
    pub const NONE: u8 = 0;
    /// Rewrite the destination to the proxy's outbound port; keep the original.
    pub const CAPTURE: u8 = 1;
    /// Leave the connection alone.
    pub const PASSTHROUGH: u8 = 2;
    /// Fail the connect with EPERM.
    pub const DROP: u8 = 3;
}

/// `PodConfig::flags`.
pub mod pod_flags {
    /// includeOutboundIPRanges is `*`: every address not excluded is in range.
    pub const INCLUDE_ALL_CIDRS: u32 = 1 << 0;
    /// includeInboundPorts is `*`: every inbound port not exempt is captured.
    pub const INBOUND_ALL_PORTS: u32 = 1 << 1;
    /// DNS capture (`ISTIO_META_DNS_CAPTURE`): port 53 to the DNS proxy.
    pub const DNS_CAPTURE: u32 = 1 << 2;
    /// Inbound capture is on for this pod (false when includeInboundPorts is empty).
    pub const INBOUND_CAPTURE: u32 = 1 << 3;
    /// Outbound capture is on for this pod (false when nothing is included).
    pub const OUTBOUND_CAPTURE: u32 = 1 << 4;
    /// includeOutboundIPRanges names a loopback prefix: istio-iptables then omits its
    /// "loopback, not the proxy → RETURN" rule, so only 127.0.0.1/::1 bypass the ranges.
    pub const LOOPBACK_IN_RANGE: u32 = 1 << 5;
    /// Proxy identity is cgroup-bound: the proxy is the proxy uid/gid *and* a task in
    /// `PodConfig::proxy_cgroup` (0: not known yet, which matches no task). Without the
    /// flag the uid/gid alone decide, as in istio-iptables.
    pub const PROXY_CGROUP: u32 = 1 << 6;
    /// Live decision trace (`sidecap trace`, annotation `sidecap.io/trace`): the programs
    /// send a record of each decision for this pod (`trace`). Every program tests it once,
    /// after its decision, so an untraced pod pays that one branch.
    pub const TRACE: u32 = 1 << 7;
    /// Sockmap acceleration of the app↔proxy loopback hop (agent `--sockmap`, annotation
    /// `sidecap.io/sockmap`): connect stamps `trace::orig_flags::SOCKMAP` on a captured
    /// connection, and sockops puts both of its sockets in `ACCEL_SOCKS`. Off: no program
    /// pays anything for it beyond that one flag test at connect.
    pub const SOCKMAP: u32 = 1 << 8;
}

/// Per-pod configuration: `PODS[netns cookie]`.
///
/// `policy` names the rule set in the rule maps; a policy change writes a new rule set
/// under a fresh id, then flips this one field (a single map update), so a connect sees
/// the old rules or the new ones, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodConfig {
    /// Rule set id: the `policy` field of every rule-map key for this pod.
    pub policy: u32,
    /// `pod_flags::*`.
    pub flags: u32,
    /// Monotonic per-pod generation, for inspection.
    pub generation: u32,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub dns_port: u16,
    pub tunnel_port: u16,
    /// Action when no listener matches (`action::*`): DROP for REGISTRY_ONLY,
    /// PASSTHROUGH for ALLOW_ANY, CAPTURE for ALLOW_ANY in Istio-exact mode.
    pub default_action: u8,
    /// Number of valid entries in `ips`.
    pub n_ips: u8,
    pub _pad: [u8; 2],
    /// The pod's own addresses (IPv4-mapped or IPv6).
    pub ips: [[u8; 16]; MAX_POD_IPS],
    /// cgroup v2 id (the directory's inode, as `bpf_get_current_cgroup_id` reports it) of
    /// the proxy container, read only under `pod_flags::PROXY_CGROUP`; 0 while unknown.
    pub proxy_cgroup: u64,
}

/// Protocol numbers used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Key of `OUT_PORTS`: per-policy outbound port rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub policy: u32,
    pub port: u16,
    /// `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// `PortRule::flags`.
pub mod port_flags {
    /// excludeOutboundPorts: passthrough, before any address rule.
    pub const EXCLUDED: u32 = 1 << 0;
    /// includeOutboundPorts: in capture range whatever the address.
    pub const INCLUDED: u32 = 1 << 1;
}

/// Value of `OUT_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRule {
    pub flags: u32,
}

/// Key data of `OUT_CIDRS` (LPM trie): policy id, then the address.
/// The LPM prefix length is `32 + 96 + v4_len` for IPv4, `32 + v6_len` for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// Big-endian bytes of the policy id (LPM keys match bit by bit from the first byte).
    pub policy: [u8; 4],
    pub addr: [u8; 16],
}

/// `CidrRule::flags`.
pub mod cidr_flags {
    /// excludeOutboundIPRanges: passthrough.
    pub const EXCLUDED: u32 = 1 << 0;
    /// includeOutboundIPRanges: in capture range.
    pub const INCLUDED: u32 = 1 << 1;
}

/// Value of `OUT_CIDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrRule {
    pub flags: u32,
}

/// Key data of `OUT_LISTENERS` (LPM trie): (policy, port, proto) always fully matched,
/// then the address: prefix `64` is a wildcard listener (`0.0.0.0_PORT`), `64 + 96 + 32`
/// an IPv4 VIP, `64 + 128` an IPv6 one, anything between a CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub policy: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}

/// Bits of an LPM prefix that cover `ListenerKey`'s fixed part.
pub const LISTENER_FIXED_BITS: u32 = 64;
/// Bits of an LPM prefix that cover `CidrKey`'s fixed part.
pub const CIDR_FIXED_BITS: u32 = 32;

/// Value of `OUT_LISTENERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerRule {
    /// `action::*` (CAPTURE, or PASSTHROUGH for a captureMode NONE egress listener).
    pub action: u8,
    pub _pad: [u8; 3],
    /// Index into the agent's listener-name table, for logs and drop events.
    pub listener_id: u32,
}

/// Key of `IN_PORTS`: per-policy inbound port rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InPortKey {
    pub policy: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `IN_PORTS`: `action::CAPTURE` (to the inbound port) or `action::PASSTHROUGH`
/// (exempt: excluded port, 15008, the proxy's own ports, captureMode NONE ingress).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InPortRule {
    pub action: u8,
    pub _pad: [u8; 3],
}

/// The destination an app asked for before capture rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    pub port: u16,
    /// AF_INET (2) or AF_INET6 (10): the family the app used.
    pub family: u16,
    /// `trace::orig_flags::*` (0 in `DNS_ORIG`).
    pub flags: u32,
}

/// A slot of `CONNECTING`: the original destination of one captured connect, from connect
/// until the app's handshake completes. `cookie` (the app socket's cookie, 0 when free) is
/// claimed and released with compare-and-swap, so a slot has one owner at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectingSlot {
    pub cookie: u64,
    pub od: OrigDst,
}

/// Slots in `CONNECTING` (a power of two: a socket's slot is its cookie's low bits).
pub const CONNECTING_SLOTS: u32 = 1 << 14;

/// A claim this many socket cookies older than a new connect's belongs to a connect that
/// will never complete (refused, timed out, closed mid-handshake) and may be taken over.
/// Cookies come from one node-wide counter (in per-CPU batches of 4096, so a newer
/// socket's cookie can be the smaller: only an older claim is ever stale), so this is
/// 16 M sockets created since: at
/// 100,000 new sockets a second, 2.8 minutes, longer than Linux's default SYN retries
/// (`tcp_syn_retries` 6: 127 s). One word is claimed, so a takeover is one compare-and-swap.
pub const CONNECTING_STALE_COOKIES: u64 = 1 << 24;

/// A slot of `ESTABLISHED`: the original destination of one captured connection, from the
/// app's handshake until the proxy's accepted socket closes. `owner` (0 when free) is the
/// app socket's cookie with [`established::WRITING`] while the slot is being filled and
/// [`established::ACCEPTED`] once the proxy's socket holds it; it is claimed, marked and
/// released with compare-and-swap, so a slot has one owner at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EstablishedSlot {
    pub owner: u64,
    pub key: TupleKey,
    pub od: OrigDst,
}

/// `ESTABLISHED`'s slot index and owner word: pure, so that the tests compute what the
/// programs do.
pub mod established {
    use super::TupleKey;

    /// Slots in `ESTABLISHED` (a power of two).
    pub const SLOTS: u32 = 1 << 14;
    /// Owner bit: the app's sockops is still writing the slot (readers skip it).
    pub const WRITING: u64 = 1 << 62;
    /// Owner bit: the proxy accepted the connection; its close releases the slot, which is
    /// therefore never stale.
    pub const ACCEPTED: u64 = 1 << 63;
    /// The app socket's cookie in an owner word.
    pub const COOKIE: u64 = !(WRITING | ACCEPTED);

    /// The slot of a connection, from its tuple as the app's socket sees it: a base spread
    /// by the pod (netns, addresses, the proxy's port), plus the app's port halved. Linux
    /// gives a socket's connects to one destination ports of one parity, close to the
    /// previous one, so one pod's successive connections fill neighbouring slots: the
    /// cache lines and pages a connection touches are those the last one did. A hash of
    /// the whole tuple lands anywhere in the map's 1.3 MB, and that cold access cost more
    /// than the LRU insert it replaced (bench scenario 7, docs/kernel-contract.md).
    #[inline(always)]
    pub fn slot(k: &TupleKey) -> u32 {
        let w = |a: &[u8; 16]| u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        let pod = (k.netns as u32) ^ ((k.netns >> 32) as u32) ^ w(&k.local) ^ w(&k.remote).rotate_left(7) ^ k.remote_port as u32;
        (pod.wrapping_mul(0x9E37_79B1) >> 16).wrapping_add(k.local_port as u32 >> 1) & (SLOTS - 1)
    }

    /// Whether a new connection (its app socket's `cookie`) may take a slot held by
    /// `owner`: free, or claimed by a connection the proxy never accepted (its socket was
    /// dropped before accept: no close will release it) that is
    /// `CONNECTING_STALE_COOKIES` sockets older.
    #[inline(always)]
    pub fn may_take(owner: u64, cookie: u64) -> bool {
        owner == 0 || (owner & ACCEPTED == 0 && crate::stale_claim(owner & COOKIE, cookie))
    }
}

/// Whether a claim by the socket `held` is stale for the newer socket `cookie` (see
/// [`CONNECTING_STALE_COOKIES`]). Signed: cookies are handed out in per-CPU batches, so a
/// live claim can be newer.
#[inline(always)]
pub fn stale_claim(held: u64, cookie: u64) -> bool {
    held != 0 && (cookie.wrapping_sub(held) as i64) > CONNECTING_STALE_COOKIES as i64
}

/// Key of `ORIG_DST`: one TCP connection as seen from the connecting socket.
/// The netns cookie matters: 127.0.0.1 tuples repeat in every pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns: u64,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

/// Value of `ACCEL_PEERS` (socket storage) on each socket of `ACCEL_SOCKS`: where its
/// messages go, so that the sk_msg program reads no address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelPeer {
    /// The other end's key in `ACCEL_SOCKS` (its own tuple; `netns` is the pod's).
    pub peer: TupleKey,
    /// Nonzero once a redirect failed: this socket's messages take TCP for good.
    pub fell_back: u32,
    pub _pad: u32,
}

/// A pod's name, `namespace/name`, NUL-padded (`POD_NAMES[netns]`): only for people and
/// tools reading the pinned maps while the agent is down; the programs never read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodName {
    pub name: [u8; 128],
}

impl Default for PodName {
    fn default() -> Self {
        PodName { name: [0; 128] }
    }
}

/// Per-pod counters (`COUNTERS[netns]`, per-CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    pub captured: u64,
    pub passthrough: u64,
    pub dropped: u64,
    pub inbound_captured: u64,
    pub dns: u64,
    /// Messages the sockmap program handed straight to the peer socket (`pod_flags::SOCKMAP`).
    pub sockmap_msgs: u64,
    /// Bytes in those messages.
    pub sockmap_bytes: u64,
    /// Accelerated connections that fell back to the TCP path (the peer socket was not in
    /// `ACCEL_SOCKS`, or the redirect failed): counted once per socket.
    pub sockmap_fallbacks: u64,
}

/// Reason codes of `DropEvent`.
pub mod drop_reason {
    /// REGISTRY_ONLY and no outbound listener matched.
    pub const REGISTRY_ONLY: u32 = 1;
    /// A listener rule said DROP.
    pub const LISTENER: u32 = 2;
    /// Inbound (sk_lookup): a captured port of a pod whose proxy has no inbound listener
    /// (not up yet, or restarting). Refused, as istio-init's REDIRECT to a closed 15006
    /// is: the app never sees an uncaptured connection. `addr`/`port`: the pod's end.
    pub const INBOUND_NO_PROXY: u32 = 3;
    /// A captured connect whose original destination had nowhere to be kept (its
    /// `CONNECTING` slot held and `ORIG_DST_BY_COOKIE` refusing the insert): failed, not
    /// sent direct.
    pub const NO_ROOM: u32 = 4;
    /// A captured connect or DNS query from a process outside the cgroup where sockops,
    /// getsockopt and recvmsg are attached (`--pods-cgroup`): the proxy could not learn
    /// its original destination (or the reply its resolver's address). Failed, not sent
    /// direct.
    pub const OUTSIDE_PODS_CGROUP: u32 = 5;
}

/// A denied connect, sent on the `DROP_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub netns: u64,
    pub policy: u32,
    pub reason: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub uid: u32,
}

/// Address helpers usable on both sides.
pub mod addr {
    /// `::ffff:a.b.c.d` for an IPv4 address given in network-order bytes.
    #[inline(always)]
    pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
    }

    /// True for `::ffff:0:0/96`.
    #[inline(always)]
    pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
        a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for PodConfig {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for PortRule {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for CidrKey {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for CidrRule {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for ListenerRule {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for InPortKey {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for InPortRule {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for ConnectingSlot {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for EstablishedSlot {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for TupleKey {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for PodCounters {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for AccelPeer {}

    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for PodName {}
    // SAFETY: repr(C) and Copy, with explicit padding fields and no pointers: any bytes are a valid value.
    unsafe impl aya::Pod for DropEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // Sizes are part of the pinned-map ABI: a change must be deliberate.
    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<PodConfig>(), 32 + 64 + 8);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<CidrKey>(), 20);
        assert_eq!(size_of::<ListenerKey>(), 24);
        assert_eq!(size_of::<ListenerRule>(), 8);
        assert_eq!(size_of::<InPortKey>(), 8);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<TupleKey>(), 48);
        assert_eq!(size_of::<DropEvent>(), 40);
        assert_eq!(size_of::<PodCounters>(), 64);
        assert_eq!(size_of::<AccelPeer>(), 56);
        assert_eq!(size_of::<EstablishedSlot>(), 80);
    }

    fn tuple(netns: u64, app_port: u16) -> TupleKey {
        let lo = addr::v4_mapped([127, 0, 0, 1]);
        TupleKey { netns, local: lo, remote: lo, local_port: app_port, remote_port: 15001, _pad: 0 }
    }

    #[test]
    fn one_pods_successive_connects_take_neighbouring_slots_and_pods_start_apart() {
        // connect() ports: one parity, ascending. Successive ones take successive slots.
        let s0 = established::slot(&tuple(7, 40000));
        assert_eq!(established::slot(&tuple(7, 40002)), (s0 + 1) % established::SLOTS);
        assert_eq!(established::slot(&tuple(7, 40000 + 2 * 100)), (s0 + 100) % established::SLOTS);
        // The other parity (an app that bound its port) shares its neighbour's slot: the
        // second of two such live connections goes to ORIG_DST (a test pins that).
        assert_eq!(established::slot(&tuple(7, 40001)), s0);
        // 14,000 live connects of one pod (an ephemeral range's worth) never share a slot.
        let mut seen = [false; established::SLOTS as usize];
        for port in (32768..60768u16).step_by(2) {
            let s = established::slot(&tuple(7, port)) as usize;
            assert!(!seen[s], "port {port} shares slot {s}");
            seen[s] = true;
        }
        // Pods begin at different places (their netns cookies are small counters).
        let mut starts = [0u32; 64];
        for (i, s) in starts.iter_mut().enumerate() {
            *s = established::slot(&tuple(i as u64 + 1, 32768));
        }
        starts.sort_unstable();
        let distinct = 1 + starts.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct >= 60, "64 pods start at only {distinct} places");
    }

    #[test]
    fn an_accepted_slot_is_never_stale_and_a_never_accepted_one_is_after_its_time() {
        use established::{ACCEPTED, WRITING, may_take};
        let old = 1000u64;
        let newer = old + CONNECTING_STALE_COOKIES + 1;
        assert!(may_take(0, old));
        assert!(!may_take(old, old + 5), "a fresh claim is kept");
        assert!(!may_take(old | WRITING, old + 5));
        assert!(may_take(old, newer), "never accepted, 2^24 sockets later: stale");
        assert!(!may_take(old | ACCEPTED, newer), "the proxy's close will release it");
        assert!(!may_take(newer, old), "an older cookie never takes a newer claim");
    }

    #[test]
    fn v4_mapped_round_trip() {
        let m = addr::v4_mapped([10, 96, 0, 10]);
        assert!(addr::is_v4_mapped(&m));
        assert_eq!(&m[12..], &[10, 96, 0, 10]);
        assert!(!addr::is_v4_mapped(&[0u8; 16]));
    }
}
