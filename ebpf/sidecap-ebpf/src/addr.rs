//! Addresses as four network-order words; IPv4 is kept IPv4-mapped so that one code path
//! (and one map key layout) serves v4, v6 and v4-mapped v6 sockets.

pub type Addr = [u32; 4];

/// `0xffff` in the third word of an IPv4-mapped address, as it sits in memory.
const V4_MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const LOOPBACK_V6_W3: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
pub const LOCALHOST_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
pub const INBOUND_PASSTHROUGH_V4: u32 = u32::from_ne_bytes([127, 0, 0, 6]);
/// `::6`, Envoy's IPv6 inbound passthrough source.
pub const INBOUND_PASSTHROUGH_V6: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 6])];

#[inline(always)]
pub fn from_v4(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_W2, ip4]
}

#[inline(always)]
pub fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_W2
}

/// 127.0.0.0/8 (also v4-mapped) or ::1.
#[inline(always)]
pub fn is_loopback(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        return a[3].to_ne_bytes()[0] == 127;
    }
    a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK_V6_W3
}

/// 127.0.0.1 (also v4-mapped) or ::1: where the iptables rules say `-d 127.0.0.1/32`.
#[inline(always)]
pub fn is_localhost(a: &Addr) -> bool {
    (is_v4_mapped(a) && a[3] == LOCALHOST_V4) || (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == LOOPBACK_V6_W3)
}

#[inline(always)]
pub fn eq(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
pub fn to_bytes(a: &Addr) -> [u8; 16] {
    // Same memory: the words are already in network order.
    // SAFETY: [u32; 4] and [u8; 16] have the same size and no invalid bit patterns.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(*a) }
}

#[inline(always)]
pub fn from_bytes(b: &[u8; 16]) -> Addr {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and no invalid bit patterns.
    unsafe { core::mem::transmute::<[u8; 16], Addr>(*b) }
}

/// The loopback address a capture redirects to, in the socket's own family.
#[inline(always)]
pub fn localhost_like(orig: &Addr, v6_socket: bool) -> Addr {
    if !v6_socket || is_v4_mapped(orig) {
        from_v4(LOCALHOST_V4)
    } else {
        [0, 0, 0, LOOPBACK_V6_W3]
    }
}
