//! sk_lookup: whether a TCP connection to a pod address goes to the proxy's inbound
//! listener.

use crate::ip::{self, Addr};
use crate::{InPortKey, PodConfig, action, pod_flags};

use super::{Lookup, is_pod_ip};

/// The rule that decided, for people (`sidecap explain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundStep {
    /// Inbound capture is off for the pod.
    CaptureOff,
    /// From Envoy's inbound passthrough source (127.0.0.6 / ::6).
    PassthroughSource,
    /// From loopback or the pod itself.
    FromSelf,
    /// An `IN_PORTS` entry (its `action::*`).
    PortRule { action: u8 },
    /// No entry: includeInboundPorts is `*`.
    AllPorts,
    /// No entry: the port is not in includeInboundPorts.
    NotIncluded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// True: hand the connection to the proxy's inbound listener.
    pub capture: bool,
    pub step: InboundStep,
}

#[inline(always)]
fn done(capture: bool, step: InboundStep) -> Inbound {
    Inbound { capture, step }
}

/// A TCP connection from `remote` to the pod's `port`.
#[inline(always)]
pub fn inbound<L: Lookup>(pod: &PodConfig, maps: &L, remote: &Addr, port: u16) -> Inbound {
    use InboundStep as S;
    if pod.flags & pod_flags::INBOUND_CAPTURE == 0 {
        return done(false, S::CaptureOff);
    }
    // Envoy's inbound passthrough (127.0.0.6 / ::6) and the pod talking to itself.
    if ip::eq(remote, &ip::from_v4(ip::INBOUND_PASSTHROUGH_V4)) || ip::eq(remote, &ip::INBOUND_PASSTHROUGH_V6) {
        return done(false, S::PassthroughSource);
    }
    if ip::is_loopback(remote) || is_pod_ip(pod, remote) {
        return done(false, S::FromSelf);
    }
    match maps.in_port(&InPortKey { policy: pod.policy, port, _pad: 0 }) {
        Some(r) if r.action == action::CAPTURE => done(true, S::PortRule { action: r.action }),
        Some(r) if r.action == action::PASSTHROUGH => done(false, S::PortRule { action: r.action }),
        // No entry (or one with no inbound meaning): includeInboundPorts decides.
        _ if pod.flags & pod_flags::INBOUND_ALL_PORTS != 0 => done(true, S::AllPorts),
        _ => done(false, S::NotIncluded),
    }
}
