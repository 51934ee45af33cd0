//! `ESTABLISHED`: a captured connection's original destination from the app's handshake
//! until the proxy's accepted socket closes, in an array slot chosen by the connection's
//! tuple. An LRU hash insert touches a bucket, an element and the LRU lists, all cold
//! (about 370 ns at 16,384 entries, bench scenario 7); a slot is one compare-and-swap and
//! one cache line. `ORIG_DST` takes a connection whose slot another holds.

use sidecap_common::{
    EstablishedSlot, OrigDst, TupleKey,
    established::{ACCEPTED, COOKIE, WRITING, may_take, slot},
};

use super::cas;
use crate::maps::ESTABLISHED;

#[inline(always)]
fn slot_of(k: &TupleKey) -> Option<*mut EstablishedSlot> {
    ESTABLISHED.get_ptr_mut(slot(k))
}

#[inline(always)]
fn owner_ptr(s: *mut EstablishedSlot) -> *mut u64 {
    // SAFETY: address arithmetic on a live array map value.
    unsafe { &raw mut (*s).owner }
}

#[inline(always)]
fn owner(s: *mut EstablishedSlot) -> u64 {
    // SAFETY: s is an array map value, live for this run; an aligned 8-byte load is atomic.
    unsafe { core::ptr::read_volatile(owner_ptr(s)) }
}

/// The app's ACTIVE_ESTABLISHED: keeps `od` for the connection `k` (the app's view) in its
/// slot when the slot is free (or stale). False when another connection holds it.
#[inline(always)]
pub fn put(k: &TupleKey, od: &OrigDst, cookie: u64) -> bool {
    let Some(s) = slot_of(k) else { return false };
    let held = owner(s);
    if !may_take(held, cookie) || !cas(owner_ptr(s), held, (cookie & COOKIE) | WRITING) {
        return false;
    }
    // SAFETY: the slot is this connection's (WRITING): readers skip it until the store below.
    unsafe {
        core::ptr::write_volatile(&raw mut (*s).key, *k);
        core::ptr::write_volatile(&raw mut (*s).od, *od);
        // Stores are not reordered with stores (x86 TSO; BPF's memory model follows the
        // arch): a reader that sees the owner without WRITING sees the key and value.
        core::ptr::write_volatile(&raw mut (*s).owner, cookie & COOKIE);
    }
    true
}

/// The slot holding connection `k` (the app's view), its owner word and value; None when
/// the slot is free, being written, or another connection's. The owner is read before and
/// after the copy: a slot taken over meanwhile is not this connection's answer.
#[inline(always)]
pub fn find(k: &TupleKey) -> Option<(*mut EstablishedSlot, u64, OrigDst)> {
    let s = slot_of(k)?;
    let o1 = owner(s);
    if o1 == 0 || o1 & WRITING != 0 {
        return None;
    }
    // SAFETY: s is an array map value, live for this run.
    if !same(unsafe { &raw const (*s).key }, k) {
        return None;
    }
    // SAFETY: as above; copied out at once.
    let od = unsafe { core::ptr::read_volatile(&raw const (*s).od) };
    if owner(s) != o1 {
        return None;
    }
    Some((s, o1, od))
}

/// The slot's key equals `k`, compared in place a word at a time (a copy of the key would
/// not fit sockops' stack beside the caller's).
#[inline(always)]
fn same(slot_key: *const TupleKey, k: &TupleKey) -> bool {
    let a = slot_key as *const u64;
    let b = k as *const TupleKey as *const u64;
    let mut i = 0;
    while i < core::mem::size_of::<TupleKey>() / 8 {
        // SAFETY: both point at a 48-byte, 8-aligned TupleKey (repr(C), explicit padding);
        // i stays below its 6 words.
        if unsafe { core::ptr::read_volatile(a.add(i)) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// The proxy's PASSIVE_ESTABLISHED: its close will release the slot, so it is never stale.
#[inline(always)]
pub fn accept(s: *mut EstablishedSlot, held: u64) {
    if held & ACCEPTED == 0 {
        let _ = cas(owner_ptr(s), held, held | ACCEPTED);
    }
}

/// The proxy's close: the slot is free again (unless it was taken over meanwhile).
#[inline(always)]
pub fn release(s: *mut EstablishedSlot, held: u64) {
    let _ = cas(owner_ptr(s), held, 0);
}
