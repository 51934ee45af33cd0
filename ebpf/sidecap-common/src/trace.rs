//! Live decision trace (`sidecap trace`): the records the kernel programs send through
//! aya-log for a pod whose `PodConfig::flags` has `pod_flags::TRACE`, the codes in them and
//! their names, so that the agent renders exactly what the programs meant.
//!
//! A record is aya-log text `HOOK HEX`: the hook's name, then the bytes of one of the
//! `#[repr(C)]` structs below in lowercase hex (docs/kernel-contract.md, "Trace records").
//! One formatted argument, not one per field: aya-log keeps every argument of a record on
//! the stack, and connect4/6 with a dozen fields went past the kernel's 512 bytes.

use crate::decide::{InboundStep, OutboundStep, RedirectKind, Verdict};

/// A connect4/connect6 decision (TCP and connected UDP). Addresses are 16 bytes (IPv4
/// v4-mapped), ports host order; `to` is zero when the destination was left alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectRecord {
    pub netns: u64,
    /// The socket's bound address and port at connect (zero when unbound: the kernel picks
    /// them after the program).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub to: [u8; 16],
    pub uid: u32,
    pub gid: u32,
    /// Step 6's listener id, else 0.
    pub listener: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub to_port: u16,
    /// 4 or 6: the hook.
    pub family: u8,
    pub proto: u8,
    /// `verdict::*`.
    pub verdict: u8,
    /// docs/kernel-contract.md's outbound step, 1–7.
    pub step: u8,
    /// `rule::*`.
    pub rule: u8,
    pub _pad: u8,
}

/// An SO_ORIGINAL_DST asked on a socket of a traced pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetsockoptRecord {
    pub netns: u64,
    /// The asking socket's ends.
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// The answer (zero on a miss).
    pub orig: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub orig_port: u16,
    /// `lookup::*`.
    pub result: u8,
    pub _pad: u8,
}

/// An inbound TCP connection to a traced pod's address (sk_lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkLookupRecord {
    pub netns: u64,
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port: u16,
    pub port: u16,
    /// `inbound_rule::*`.
    pub rule: u8,
    /// `assign::*`.
    pub result: u8,
    pub _pad: [u8; 2],
}

/// A datagram to port 53 sent (unconnected UDP, sendmsg4/6) to the DNS proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsRecord {
    pub netns: u64,
    /// The socket's bound address and port (zero until the kernel picks them).
    pub src: [u8; 16],
    /// The resolver the app asked.
    pub dst: [u8; 16],
    pub uid: u32,
    pub gid: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// The DNS proxy's port on loopback.
    pub to_port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// `verdict=` of a connect record: what the program did with the socket.
pub mod verdict {
    pub const UNTOUCHED: u8 = 0;
    pub const PASSTHROUGH: u8 = 1;
    pub const CAPTURE: u8 = 2;
    /// The proxy calling its own pod, sent to its inbound port.
    pub const PROXY_TO_SELF: u8 = 3;
    pub const DNS: u8 = 4;
    pub const DROP: u8 = 5;
}

/// `rule=` of a connect record: which rule of its step decided (steps group several).
pub mod rule {
    pub const EXCLUDED_PORT: u8 = 1;
    pub const PASSTHROUGH_SOURCE: u8 = 2;
    pub const PROXY_UID: u8 = 3;
    pub const PROXY_GID_LOOPBACK: u8 = 4;
    pub const PROXY_GID: u8 = 5;
    pub const PROXY_SELF_CALL: u8 = 6;
    pub const DNS: u8 = 7;
    pub const LOOPBACK: u8 = 8;
    pub const CAPTURE_OFF: u8 = 9;
    pub const EXCLUDED_CIDR: u8 = 10;
    pub const OUT_OF_RANGE: u8 = 11;
    pub const LISTENER: u8 = 12;
    pub const NO_LISTENER: u8 = 13;
    /// Captured, but `ORIG_DST_BY_COOKIE` refused the entry: the connect fails.
    pub const NO_ROOM: u8 = 14;
    /// Captured, but the caller is outside `--pods-cgroup` (see
    /// `drop_reason::OUTSIDE_PODS_CGROUP`): refused.
    pub const OUTSIDE_PODS_CGROUP: u8 = 15;
}

/// `result=` of a getsockopt record.
pub mod lookup {
    /// No original destination for this socket (the caller gets the kernel's own answer).
    pub const MISS: u8 = 0;
    /// From `ORIG_DST`: a captured outbound connection.
    pub const CAPTURED: u8 = 1;
    /// The accepted socket's own local address: an inbound connection sk_lookup assigned.
    pub const INBOUND: u8 = 2;
}

/// `result=` of an sk_lookup record.
pub mod assign {
    /// Handed to the proxy's inbound listener.
    pub const ASSIGNED: u8 = 1;
    /// Not captured (see `step=`): the normal socket lookup goes on.
    pub const PASSED: u8 = 2;
    /// Captured, but the proxy has no inbound listener (yet): refused.
    pub const NO_LISTENER: u8 = 3;
}

/// `rule=` of an sk_lookup record: `decide::InboundStep`.
pub mod inbound_rule {
    pub const CAPTURE_OFF: u8 = 1;
    pub const PASSTHROUGH_SOURCE: u8 = 2;
    pub const FROM_SELF: u8 = 3;
    pub const PORT_CAPTURE: u8 = 4;
    pub const PORT_PASSTHROUGH: u8 = 5;
    pub const ALL_PORTS: u8 = 6;
    pub const NOT_INCLUDED: u8 = 7;
}

/// `OrigDst::flags`.
pub mod orig_flags {
    /// The connection's pod was traced when it was captured: getsockopt records its answer.
    pub const TRACED: u32 = 1 << 0;
    /// The connection's pod had `pod_flags::SOCKMAP` when it was captured: sockops puts
    /// the app's and the proxy's sockets in `ACCEL_SOCKS`.
    pub const SOCKMAP: u32 = 1 << 1;
    /// Envoy's inbound hop (bound to 127.0.0.6 / ::6, to one of the pod's own addresses) in
    /// a `pod_flags::SOCKMAP` pod: only a marker for sockops to accelerate it; never in
    /// `ORIG_DST`, so getsockopt never answers from it.
    pub const ACCEL_ONLY: u32 = 1 << 2;
}

impl OutboundStep {
    /// The step of docs/kernel-contract.md ("Outbound", 1–7) this rule belongs to.
    #[inline(always)]
    pub const fn number(&self) -> u8 {
        match self {
            OutboundStep::ExcludedPort => 1,
            OutboundStep::PassthroughSource
            | OutboundStep::ProxyUid
            | OutboundStep::ProxyGidLoopback
            | OutboundStep::ProxyGid
            | OutboundStep::ProxySelfCall => 2,
            OutboundStep::Dns => 3,
            OutboundStep::Loopback => 4,
            OutboundStep::CaptureOff | OutboundStep::ExcludedCidr | OutboundStep::OutOfRange => 5,
            OutboundStep::Listener { .. } => 6,
            OutboundStep::NoListener => 7,
        }
    }

    /// Its `rule::*` code.
    #[inline(always)]
    pub const fn rule(&self) -> u8 {
        match self {
            OutboundStep::ExcludedPort => rule::EXCLUDED_PORT,
            OutboundStep::PassthroughSource => rule::PASSTHROUGH_SOURCE,
            OutboundStep::ProxyUid => rule::PROXY_UID,
            OutboundStep::ProxyGidLoopback => rule::PROXY_GID_LOOPBACK,
            OutboundStep::ProxyGid => rule::PROXY_GID,
            OutboundStep::ProxySelfCall => rule::PROXY_SELF_CALL,
            OutboundStep::Dns => rule::DNS,
            OutboundStep::Loopback => rule::LOOPBACK,
            OutboundStep::CaptureOff => rule::CAPTURE_OFF,
            OutboundStep::ExcludedCidr => rule::EXCLUDED_CIDR,
            OutboundStep::OutOfRange => rule::OUT_OF_RANGE,
            OutboundStep::Listener { .. } => rule::LISTENER,
            OutboundStep::NoListener => rule::NO_LISTENER,
        }
    }

    /// The listener's id for step 6, else 0.
    #[inline(always)]
    pub const fn listener(&self) -> u32 {
        match self {
            OutboundStep::Listener { id } => *id,
            _ => 0,
        }
    }
}

impl InboundStep {
    /// Its `inbound_rule::*` code.
    #[inline(always)]
    pub const fn rule(&self) -> u8 {
        match self {
            InboundStep::CaptureOff => inbound_rule::CAPTURE_OFF,
            InboundStep::PassthroughSource => inbound_rule::PASSTHROUGH_SOURCE,
            InboundStep::FromSelf => inbound_rule::FROM_SELF,
            InboundStep::PortRule { action: crate::action::CAPTURE } => inbound_rule::PORT_CAPTURE,
            InboundStep::PortRule { .. } => inbound_rule::PORT_PASSTHROUGH,
            InboundStep::AllPorts => inbound_rule::ALL_PORTS,
            InboundStep::NotIncluded => inbound_rule::NOT_INCLUDED,
        }
    }
}

impl Verdict {
    /// Its `verdict::*` code.
    #[inline(always)]
    pub const fn code(&self) -> u8 {
        match self {
            Verdict::Untouched => verdict::UNTOUCHED,
            Verdict::Passthrough => verdict::PASSTHROUGH,
            Verdict::Redirect { kind: RedirectKind::Capture, .. } => verdict::CAPTURE,
            Verdict::Redirect { kind: RedirectKind::ProxyToSelf, .. } => verdict::PROXY_TO_SELF,
            Verdict::Redirect { kind: RedirectKind::Dns, .. } => verdict::DNS,
            Verdict::Drop { .. } => verdict::DROP,
        }
    }
}

/// Names for people and JSON (userspace renders codes with these).
pub mod names {
    use super::{assign, inbound_rule, lookup, rule, verdict};

    pub fn verdict(code: u8) -> Option<&'static str> {
        Some(match code {
            verdict::UNTOUCHED => "untouched",
            verdict::PASSTHROUGH => "passthrough",
            verdict::CAPTURE => "capture",
            verdict::PROXY_TO_SELF => "proxy-to-self",
            verdict::DNS => "dns",
            verdict::DROP => "drop",
            _ => return None,
        })
    }

    pub fn rule(code: u8) -> Option<&'static str> {
        Some(match code {
            rule::EXCLUDED_PORT => "excluded outbound port",
            rule::PASSTHROUGH_SOURCE => "bound to the proxy's inbound passthrough source",
            rule::PROXY_UID => "the proxy's own traffic (uid)",
            rule::PROXY_GID_LOOPBACK => "the proxy's gid to loopback or the pod itself",
            rule::PROXY_GID => "the proxy's own traffic (gid)",
            rule::PROXY_SELF_CALL => "the proxy calling its own pod",
            rule::DNS => "DNS capture",
            rule::LOOPBACK => "loopback or the pod's own address",
            rule::CAPTURE_OFF => "outbound capture off",
            rule::EXCLUDED_CIDR => "excluded outbound range",
            rule::OUT_OF_RANGE => "outside the included ranges and ports",
            rule::LISTENER => "outbound listener",
            rule::NO_LISTENER => "no listener: the pod's default",
            rule::NO_ROOM => "captured, but no room to keep the original destination: refused",
            rule::OUTSIDE_PODS_CGROUP => "captured, but outside the pods cgroup (no sockops or getsockopt there): refused",
            _ => return None,
        })
    }

    pub fn inbound_rule(code: u8) -> Option<&'static str> {
        Some(match code {
            inbound_rule::CAPTURE_OFF => "inbound capture off",
            inbound_rule::PASSTHROUGH_SOURCE => "from the proxy's inbound passthrough source",
            inbound_rule::FROM_SELF => "from loopback or the pod itself",
            inbound_rule::PORT_CAPTURE => "included inbound port",
            inbound_rule::PORT_PASSTHROUGH => "exempt inbound port",
            inbound_rule::ALL_PORTS => "every inbound port is captured",
            inbound_rule::NOT_INCLUDED => "port not in the included inbound ports",
            _ => return None,
        })
    }

    pub fn lookup(code: u8) -> Option<&'static str> {
        Some(match code {
            lookup::MISS => "miss",
            lookup::CAPTURED => "captured",
            lookup::INBOUND => "inbound",
            _ => return None,
        })
    }

    pub fn assign(code: u8) -> Option<&'static str> {
        Some(match code {
            assign::ASSIGNED => "assigned",
            assign::PASSED => "passed",
            assign::NO_LISTENER => "refused: no proxy listener",
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The record layouts are what the agent decodes: a change must be deliberate.
    #[test]
    fn record_sizes_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<ConnectRecord>(), 80);
        assert_eq!(core::mem::size_of::<GetsockoptRecord>(), 64);
        assert_eq!(core::mem::size_of::<SkLookupRecord>(), 48);
        assert_eq!(core::mem::size_of::<DnsRecord>(), 56);
    }

    #[test]
    fn every_step_has_its_contract_number_and_a_named_rule() {
        let steps = [
            (OutboundStep::ExcludedPort, 1),
            (OutboundStep::PassthroughSource, 2),
            (OutboundStep::ProxyUid, 2),
            (OutboundStep::ProxyGidLoopback, 2),
            (OutboundStep::ProxyGid, 2),
            (OutboundStep::ProxySelfCall, 2),
            (OutboundStep::Dns, 3),
            (OutboundStep::Loopback, 4),
            (OutboundStep::CaptureOff, 5),
            (OutboundStep::ExcludedCidr, 5),
            (OutboundStep::OutOfRange, 5),
            (OutboundStep::Listener { id: 7 }, 6),
            (OutboundStep::NoListener, 7),
        ];
        for (s, n) in steps {
            assert_eq!(s.number(), n, "{s:?}");
            assert!(names::rule(s.rule()).is_some(), "{s:?}");
        }
        assert_eq!(OutboundStep::Listener { id: 7 }.listener(), 7);
        assert_eq!(names::verdict(Verdict::Drop { reason: 1 }.code()), Some("drop"));
        assert_eq!(names::verdict(99), None);
    }
}
