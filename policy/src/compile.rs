//! Decisions → kernel map entries for one generation (types from `sidecap-common`, meaning
//! from docs/kernel-contract.md), and the diff between two generations.

mod diff;
pub mod simulate;

use std::collections::BTreeMap;

use sidecap_common::{
    CIDR_FIXED_BITS, CidrKey, CidrRule, InPortKey, InPortRule, LISTENER_FIXED_BITS, ListenerKey, ListenerRule, MAX_POD_IPS, PodConfig,
    PortKey, PortRule, action, cidr_flags, defaults, pod_flags, port_flags, proto,
};

pub use diff::{GenerationDiff, MapDiff, diff};

use crate::engine::{AllowAnyMode, PodPolicy};
use crate::knobs::{Include, Interception, ProxyIdentity};
use crate::listeners::ListenerAction;
use crate::model::cidr::mask;
use crate::model::{Cidr, OutboundMode};

/// Every map entry of one pod's rule set. LPM keys carry their prefix length next to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    pub pod: PodConfig,
    pub out_ports: BTreeMap<PortKey, PortRule>,
    pub out_cidrs: BTreeMap<(u32, CidrKey), CidrRule>,
    pub listeners: BTreeMap<(u32, ListenerKey), ListenerRule>,
    pub in_ports: BTreeMap<InPortKey, InPortRule>,
    /// listener_id → Envoy listener name (`10.96.0.10_53`). Ids are derived from the name
    /// (`listener_id`), so a Service added or removed changes only its own map entries.
    pub listener_names: BTreeMap<u32, String>,
}

/// Entries per map of a rule set (what it needs of each map's capacity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounts {
    pub out_ports: usize,
    pub out_cidrs: usize,
    pub listeners: usize,
    pub in_ports: usize,
}

impl Generation {
    /// Fingerprint of the rule set alone (not `pod`, not the listener names): pods whose
    /// rules hash alike share one rule set in the kernel. Compiled with policy id 0, so that
    /// equal content gives equal keys whatever id it is written under.
    pub fn rules_hash(&self) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        self.out_ports.hash(&mut h);
        self.out_cidrs.hash(&mut h);
        self.listeners.hash(&mut h);
        self.in_ports.hash(&mut h);
        h.finish()
    }

    pub fn entry_counts(&self) -> EntryCounts {
        EntryCounts {
            out_ports: self.out_ports.len(),
            out_cidrs: self.out_cidrs.len(),
            listeners: self.listeners.len(),
            in_ports: self.in_ports.len(),
        }
    }

    /// This rule set without its listener entries, every other outbound connection captured:
    /// istio-init's own behaviour (everything not excluded goes to the proxy, which decides).
    /// It is what a pod gets when its full rule set does not fit the maps and it has no
    /// previous policy: captured whole, not left open. It loses only sidecap's shortcuts
    /// (direct passthrough, immediate drop), so it is tiny and almost always fits.
    pub fn capture_all(&self) -> Generation {
        Generation {
            pod: PodConfig { default_action: sidecap_common::action::CAPTURE, ..self.pod },
            out_ports: self.out_ports.clone(),
            out_cidrs: self.out_cidrs.clone(),
            listeners: BTreeMap::new(),
            in_ports: self.in_ports.clone(),
            listener_names: BTreeMap::new(),
        }
    }

    /// True when `other` differs from this rule set in listener entries only: such a change
    /// (a Service added or removed) can be written in place, entry by entry, since each entry
    /// decides its own destinations; anything else moves pods to a completely written set.
    pub fn differs_in_listeners_only(&self, other: &Generation) -> bool {
        self.out_ports == other.out_ports && self.out_cidrs == other.out_cidrs && self.in_ports == other.in_ports
    }
}

/// `template` (a pod config compiled for another pod of the same scope) with `ips` as the
/// pod's own addresses.
pub fn with_ips(template: &PodConfig, ips: &[std::net::IpAddr]) -> PodConfig {
    let mut c = *template;
    c.ips = [[0u8; 16]; MAX_POD_IPS];
    let mut n = 0;
    for (slot, ip) in c.ips.iter_mut().zip(ips.iter()) {
        *slot = Cidr::mapped(*ip);
        n += 1;
    }
    c.n_ips = n;
    c
}

/// A listener's id: FNV-1a of its name (31 bits), the next free one on a collision. Stable
/// across generations, unlike a position in the list: a Service added to a rule set shared by
/// the default mesh rewrites its own entries in place, not every entry sorted after it.
fn listener_id(name: &str, taken: &BTreeMap<u32, String>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let mut id = h & 0x7fff_ffff;
    while taken.contains_key(&id) {
        id = (id + 1) & 0x7fff_ffff;
    }
    id
}

pub fn compile(p: &PodPolicy, policy_id: u32, generation: u32) -> Generation {
    let mut g = Generation { pod: pod_config(p, policy_id, generation), ..Generation::default() };
    if !p.meshed {
        return g; // No flags: the kernel leaves every connection alone.
    }
    let k = &p.knobs;
    let pol = policy_id.to_be_bytes();

    for port in &k.exclude_outbound_ports {
        for pr in [proto::TCP, proto::UDP] {
            let key = PortKey { policy: policy_id, port: *port, proto: pr, _pad: 0 };
            g.out_ports.entry(key).or_default().flags |= port_flags::EXCLUDED;
        }
    }
    for port in &k.include_outbound_ports {
        let key = PortKey { policy: policy_id, port: *port, proto: proto::TCP, _pad: 0 };
        g.out_ports.entry(key).or_default().flags |= port_flags::INCLUDED;
    }

    for c in &k.exclude_cidrs {
        g.out_cidrs.entry(cidr_key(pol, c)).or_default().flags |= cidr_flags::EXCLUDED;
    }
    if let Include::List(includes) = &k.include_cidrs {
        // An include nested in an exclude is dropped, so that longest-prefix match gives
        // istio-iptables' "excludes first" answer.
        for c in includes.iter().filter(|c| !k.exclude_cidrs.iter().any(|e| e.covers(c))) {
            g.out_cidrs.entry(cidr_key(pol, c)).or_default().flags |= cidr_flags::INCLUDED;
        }
    }

    // A v6 prefix such as `::/0` also spans the v4-mapped space in the trie; a neutral /96
    // entry keeps IPv4 destinations governed by IPv4 prefixes only.
    let v6_wide = k.exclude_cidrs.iter().chain(match &k.include_cidrs {
        Include::List(l) => l.iter(),
        Include::All => [].iter(),
    });
    if v6_wide.into_iter().any(Cidr::covers_v4_mapped_space) {
        let space = Cidr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)), 96);
        g.out_cidrs.entry(cidr_key(pol, &space)).or_default();
    }

    for l in &p.listeners {
        let id = listener_id(&l.name, &g.listener_names);
        g.listener_names.insert(id, l.name.clone());
        let act = match l.action {
            ListenerAction::Capture => action::CAPTURE,
            ListenerAction::Passthrough => action::PASSTHROUGH,
        };
        let rule = ListenerRule { action: act, _pad: [0; 3], listener_id: id };
        let mut put = |len: u32, addr: [u8; 16]| {
            let key = ListenerKey { policy: pol, port: l.port.to_be_bytes(), proto: proto::TCP, _pad: 0, addr };
            match g.listeners.get(&(len, key)) {
                // At equal specificity a capturing listener wins (as `listener_for` decides).
                Some(existing) if existing.action == action::CAPTURE => {}
                _ => {
                    g.listeners.insert((len, key), rule);
                }
            }
        };
        if l.any {
            put(LISTENER_FIXED_BITS, [0; 16]);
        } else {
            for c in &l.prefixes {
                put(LISTENER_FIXED_BITS + c.mapped_len(), c.mapped_network());
            }
        }
    }

    if k.inbound_capture() {
        let mut set = |port: u16, act: u8| {
            g.in_ports.insert(InPortKey { policy: policy_id, port, _pad: 0 }, InPortRule { action: act, _pad: [0; 3] });
        };
        match &k.include_inbound_ports {
            Include::All => {
                for port in k.inbound_exempt() {
                    set(port, action::PASSTHROUGH);
                }
            }
            Include::List(ports) => {
                for port in ports {
                    set(*port, action::CAPTURE);
                }
            }
        }
        for i in p.ingress.iter().filter(|i| !i.captured) {
            set(i.port, action::PASSTHROUGH);
        }
        set(defaults::TUNNEL_PORT, action::PASSTHROUGH);
    }
    g
}

fn cidr_key(pol: [u8; 4], c: &Cidr) -> (u32, CidrKey) {
    let len = c.mapped_len();
    (CIDR_FIXED_BITS + len, CidrKey { policy: pol, addr: mask(c.mapped_network(), len) })
}

fn pod_config(p: &PodPolicy, policy_id: u32, generation: u32) -> PodConfig {
    let k = &p.knobs;
    let mut flags = 0;
    if p.meshed {
        if k.include_cidrs == Include::All {
            flags |= pod_flags::INCLUDE_ALL_CIDRS;
        }
        if k.include_inbound_ports == Include::All {
            flags |= pod_flags::INBOUND_ALL_PORTS;
        }
        if k.dns_capture && k.interception != Interception::None {
            flags |= pod_flags::DNS_CAPTURE;
        }
        if k.inbound_capture() {
            flags |= pod_flags::INBOUND_CAPTURE;
        }
        if k.outbound_capture() {
            flags |= pod_flags::OUTBOUND_CAPTURE;
        }
        if k.include_has_loopback() {
            flags |= pod_flags::LOOPBACK_IN_RANGE;
        }
    }
    if p.proxy_identity == ProxyIdentity::Cgroup {
        // `proxy_cgroup` stays 0 (nothing is the proxy) until the agent finds the cgroup.
        flags |= pod_flags::PROXY_CGROUP;
    }
    let default_action = match (p.outbound_traffic_policy, p.allow_any) {
        (OutboundMode::RegistryOnly, _) => action::DROP,
        (OutboundMode::AllowAny, AllowAnyMode::Passthrough) => action::PASSTHROUGH,
        (OutboundMode::AllowAny, AllowAnyMode::Capture) => action::CAPTURE,
    };
    let config = PodConfig {
        policy: policy_id,
        flags,
        generation,
        proxy_uid: k.proxy_uid,
        proxy_gid: k.proxy_gid,
        outbound_port: defaults::OUTBOUND_PORT,
        inbound_port: defaults::INBOUND_PORT,
        dns_port: defaults::DNS_PORT,
        tunnel_port: defaults::TUNNEL_PORT,
        default_action,
        n_ips: 0,
        _pad: [0; 2],
        ips: [[0u8; 16]; MAX_POD_IPS],
        proxy_cgroup: 0,
    };
    with_ips(&config, &p.ips)
}
