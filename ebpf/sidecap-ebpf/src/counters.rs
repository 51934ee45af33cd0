//! Per-pod per-CPU counters, and the refusals reported to the agent.

use sidecap_common::DropEvent;

use crate::maps::{COUNTERS, DROP_EVENTS};

pub enum Counter {
    Captured,
    Passthrough,
    Dropped,
    InboundCaptured,
    Dns,
    SockmapFallback,
}

#[inline(always)]
pub fn add(netns: u64, which: Counter) {
    // The agent creates the entry with the pod; per-CPU, so plain increments are safe.
    if let Some(c) = COUNTERS.get_ptr_mut(netns) {
        // SAFETY: a per-CPU map value from a successful lookup: live for this run and written only from this CPU.
        unsafe {
            match which {
                Counter::Captured => (*c).captured += 1,
                Counter::Passthrough => (*c).passthrough += 1,
                Counter::Dropped => (*c).dropped += 1,
                Counter::InboundCaptured => (*c).inbound_captured += 1,
                Counter::Dns => (*c).dns += 1,
                Counter::SockmapFallback => (*c).sockmap_fallbacks += 1,
            }
        }
    }
}

/// A refused connection: counted as dropped and sent to the agent's log. Best effort: a
/// full ring must not turn a refusal into a pass.
#[inline(always)]
pub fn refused(ev: DropEvent) {
    add(ev.netns, Counter::Dropped);
    let _ = DROP_EVENTS.output(ev, 0);
}

/// One message of `size` bytes handed to the peer socket by the sockmap program.
#[inline(always)]
pub fn sockmap_redirected(netns: u64, size: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(netns) {
        // SAFETY: a per-CPU map value from a successful lookup: live for this run and written only from this CPU.
        unsafe {
            (*c).sockmap_msgs += 1;
            (*c).sockmap_bytes += u64::from(size);
        }
    }
}
