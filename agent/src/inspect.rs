//! `sidecap inspect`: what the kernel is doing, read straight from the pinned maps, so it
//! works while the agent is down.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

use serde::Serialize;
use sidecap_common::decide::{Caller, Connect, InboundStep, Outbound, OutboundStep, RedirectKind, Verdict};
use sidecap_common::{LISTENER_FIXED_BITS, PodConfig, action, pod_flags};

use crate::{datapath, netns};

#[derive(Debug, Serialize)]
pub struct PodView {
    /// `namespace/name`, as the agent recorded it.
    pub pod: Option<String>,
    pub netns_cookie: u64,
    /// Where the netns was found (`/run/netns/NAME` or `/proc/PID/ns/net`), when found.
    pub netns: Option<String>,
    pub policy: u32,
    pub generation: u32,
    pub flags: Vec<&'static str>,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// How the proxy is recognised: `uid` (uid/gid alone), `cgroup <id>` (uid/gid in that
    /// cgroup), `cgroup unknown` (cgroup-bound, cgroup not found yet: nothing is the proxy).
    pub proxy_identity: String,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub no_listener: &'static str,
    pub ips: Vec<IpAddr>,
    pub counters: Counters,
    /// In the seed article's `ADDR_PORT::ADDR:PORT` form.
    pub listeners: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Counters {
    pub captured: u64,
    pub passthrough: u64,
    pub dropped: u64,
    pub inbound_captured: u64,
    pub dns: u64,
    /// Sockmap (`sockmap` flag): messages and bytes handed straight to the peer socket,
    /// and connections' sockets that fell back to TCP.
    pub sockmap_msgs: u64,
    pub sockmap_bytes: u64,
    pub sockmap_fallbacks: u64,
}

fn action_name(a: u8) -> &'static str {
    match a {
        action::CAPTURE => "capture",
        action::PASSTHROUGH => "passthrough",
        action::DROP => "drop",
        _ => "none",
    }
}

fn flag_names(f: u32) -> Vec<&'static str> {
    [
        (pod_flags::OUTBOUND_CAPTURE, "outbound"),
        (pod_flags::INCLUDE_ALL_CIDRS, "all-cidrs"),
        (pod_flags::INBOUND_CAPTURE, "inbound"),
        (pod_flags::INBOUND_ALL_PORTS, "all-inbound-ports"),
        (pod_flags::DNS_CAPTURE, "dns"),
        (pod_flags::LOOPBACK_IN_RANGE, "loopback-in-range"),
        (pod_flags::PROXY_CGROUP, "proxy-cgroup"),
        (pod_flags::TRACE, "trace"),
        (pod_flags::SOCKMAP, "sockmap"),
    ]
    .into_iter()
    .filter(|(b, _)| f & b != 0)
    .map(|(_, n)| n)
    .collect()
}

/// `PodView::proxy_identity`.
pub fn identity_name(c: &PodConfig) -> String {
    match (c.flags & pod_flags::PROXY_CGROUP != 0, c.proxy_cgroup) {
        (false, _) => "uid".into(),
        (true, 0) => "cgroup unknown".into(),
        (true, id) => format!("cgroup {id}"),
    }
}

pub fn ip_of(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
}

/// Listener name as istiod writes it, from an LPM entry: `0.0.0.0_PORT` for a wildcard,
/// `VIP_PORT` for an address, `CIDR_PORT` for a prefix.
pub fn listener_short_name(prefix: u32, port: u16, addr: [u8; 16]) -> String {
    listener_parts(prefix, port, addr).0
}

/// The seed article's `NAME::BIND:PORT` form (`10.96.0.10_53::10.96.0.10:53`).
pub fn listener_name(prefix: u32, port: u16, addr: [u8; 16]) -> String {
    let (name, bind) = listener_parts(prefix, port, addr);
    format!("{name}::{bind}:{port}")
}

fn listener_parts(prefix: u32, port: u16, addr: [u8; 16]) -> (String, String) {
    let bits = prefix.saturating_sub(LISTENER_FIXED_BITS);
    if bits == 0 {
        return (format!("0.0.0.0_{port}"), "0.0.0.0".into());
    }
    let ip = ip_of(addr);
    let (shown, bind) = match ip {
        IpAddr::V4(_) if bits < 128 => (format!("{ip}/{}", bits.saturating_sub(96)), ip.to_string()),
        IpAddr::V4(_) => (ip.to_string(), ip.to_string()),
        IpAddr::V6(_) if bits < 128 => (format!("{ip}/{bits}"), format!("[{ip}]")),
        IpAddr::V6(_) => (ip.to_string(), format!("[{ip}]")),
    };
    (format!("{shown}_{port}"), bind)
}

/// Netns cookies of the namespaces visible on this host: `/run/netns/*` and processes'.
fn known_netns() -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let p = e.path();
            if let Ok(c) = netns::cookie_of_path(&p) {
                out.entry(c).or_insert_with(|| p.display().to_string());
            }
        }
    }
    out
}

/// Every pod in the maps, or only `only` (`namespace/name`).
pub fn collect(bpffs: &Path, only: Option<&str>) -> Result<Vec<PodView>, datapath::Error> {
    let maps = datapath::Maps::open(bpffs)?;
    let listeners = datapath::listeners_by_policy(bpffs)?;
    let names = known_netns();
    let mut out = Vec::new();
    for st in maps.states()? {
        if only.is_some() && st.name.as_deref() != only {
            continue;
        }
        let c: PodConfig = st.config;
        let ls = listeners
            .get(&c.policy)
            .map(|v| {
                v.iter()
                    .filter(|(_, _, _, a)| *a == action::CAPTURE)
                    .map(|(len, port, addr, _)| listener_name(*len, *port, *addr))
                    .collect()
            })
            .unwrap_or_default();
        out.push(PodView {
            pod: st.name.clone(),
            netns_cookie: st.netns,
            netns: names.get(&st.netns).cloned(),
            policy: c.policy,
            generation: c.generation,
            flags: flag_names(c.flags),
            proxy_uid: c.proxy_uid,
            proxy_gid: c.proxy_gid,
            proxy_identity: identity_name(&c),
            outbound_port: c.outbound_port,
            inbound_port: c.inbound_port,
            no_listener: action_name(c.default_action),
            ips: c.ips.iter().take(c.n_ips as usize).map(|a| ip_of(*a)).collect(),
            counters: Counters {
                captured: st.counters.captured,
                passthrough: st.counters.passthrough,
                dropped: st.counters.dropped,
                inbound_captured: st.counters.inbound_captured,
                dns: st.counters.dns,
                sockmap_msgs: st.counters.sockmap_msgs,
                sockmap_bytes: st.counters.sockmap_bytes,
                sockmap_fallbacks: st.counters.sockmap_fallbacks,
            },
            listeners: ls,
        });
    }
    Ok(out)
}

pub fn render_text(pods: &[PodView]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if pods.is_empty() {
        s.push_str("no meshed pods in the maps\n");
    }
    for p in pods {
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "pod {} (netns {}, {})\n  ips: {}\n  policy {} generation {}  flags: {}  no-listener: {}\n  proxy uid/gid {}/{} ({})  outbound :{}  inbound :{}\n  counters: captured {} passthrough {} dropped {} inbound {} dns {}",
            p.pod.as_deref().unwrap_or("(name unknown)"),
            p.netns_cookie,
            p.netns.as_deref().unwrap_or("netns path unknown"),
            ips.join(", "),
            p.policy,
            p.generation,
            p.flags.join(","),
            p.no_listener,
            p.proxy_uid,
            p.proxy_gid,
            p.proxy_identity,
            p.outbound_port,
            p.inbound_port,
            p.counters.captured,
            p.counters.passthrough,
            p.counters.dropped,
            p.counters.inbound_captured,
            p.counters.dns,
        );
        let _ = writeln!(s, "  outbound listeners ({}):", p.listeners.len());
        for l in &p.listeners {
            let _ = writeln!(s, "    {l}");
        }
    }
    s
}

/// `sidecap explain` against the live kernel state: what the programs will do.
pub fn explain_live(bpffs: &Path, pod: &str, to: &[std::net::SocketAddr], inbound: &[u16]) -> Result<serde_json::Value, ExplainError> {
    use sidecap_policy::compile::simulate;
    let maps = datapath::Maps::open(bpffs)?;
    let netns = maps.netns_of(pod)?.ok_or_else(|| ExplainError::NoPod { pod: pod.to_string(), bpffs: bpffs.into() })?;
    let g = maps.generation_of(netns)?.ok_or_else(|| ExplainError::NoPod { pod: pod.to_string(), bpffs: bpffs.into() })?;
    let mut decisions = Vec::new();
    for dst in to {
        // The programs' own decision code, over the maps as they are now: once for an
        // application socket, once for the proxy's (its owner rules, in its cgroup), and
        // under cgroup-bound identity once for the proxy's ids outside its cgroup.
        let app = simulate::app_connect(&g.pod, *dst, sidecap_common::proto::TCP);
        let proxy = simulate::proxy_connect(&g.pod, *dst, sidecap_common::proto::TCP);
        let o = simulate::outbound_connect(&g, &app);
        let p = simulate::outbound_connect(&g, &proxy);
        let mut d = serde_json::json!({
            "to": dst.to_string(),
            "action": simulate::action_of(&o.verdict).as_str(),
            "reason": outbound_reason(&g, &app, &o),
            "proxy": {"verdict": verdict_name(&p.verdict), "reason": outbound_reason(&g, &proxy, &p)},
        });
        if g.pod.flags & pod_flags::PROXY_CGROUP != 0 {
            let other = Connect { cgroup: simulate::other_cgroup(&g.pod), ..proxy };
            let b = simulate::outbound_connect(&g, &other);
            d["proxy_ids_outside_its_cgroup"] = serde_json::json!({
                "action": simulate::action_of(&b.verdict).as_str(),
                "reason": outbound_reason(&g, &other, &b),
            });
        }
        decisions.push(d);
    }
    for port in inbound {
        let i = simulate::inbound_from(&g, &simulate::outside_addr(&g.pod), *port);
        let a = if i.capture { "capture" } else { "passthrough" };
        decisions.push(serde_json::json!({"inbound": port, "action": a, "reason": inbound_reason(&i.step, *port)}));
    }
    let mut listeners: Vec<&String> = g.listener_names.values().filter(|n| !n.is_empty()).collect();
    listeners.sort();
    listeners.dedup();
    Ok(serde_json::json!({
        "pod": pod,
        "source": "kernel",
        "netns_cookie": netns,
        "policy": g.pod.policy,
        "generation": g.pod.generation,
        "noListener": action_name(g.pod.default_action),
        "proxyIdentity": identity_name(&g.pod),
        "listeners": listeners,
        "decisions": decisions,
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error("pod {pod} is not in the maps under {bpffs} (not meshed on this node, or not synced yet)")]
    NoPod { pod: String, bpffs: std::path::PathBuf },
}

/// What a connect verdict does, in words.
fn verdict_name(v: &Verdict) -> String {
    match v {
        Verdict::Untouched => "untouched".into(),
        Verdict::Passthrough => "passthrough".into(),
        Verdict::Redirect { port, kind: RedirectKind::Capture } => format!("capture to 127.0.0.1:{port}"),
        Verdict::Redirect { port, kind: RedirectKind::ProxyToSelf } => format!("to the proxy's inbound 127.0.0.1:{port}"),
        Verdict::Redirect { port, kind: RedirectKind::Dns } => format!("DNS proxy 127.0.0.1:{port}"),
        Verdict::Drop { .. } => "drop".into(),
    }
}

/// The kernel step that decided an outbound connect, for `sidecap explain`.
fn outbound_reason(g: &datapath::Generation, c: &Connect, o: &Outbound) -> String {
    let why = step_reason(g, c, o);
    if o.caller == Caller::OutsideProxyCgroup {
        return format!("{why} (the proxy's uid/gid outside the proxy's cgroup: an app)");
    }
    why
}

fn step_reason(g: &datapath::Generation, c: &Connect, o: &Outbound) -> String {
    let ip = std::net::IpAddr::from(sidecap_common::ip::to_bytes(&c.dst)).to_canonical();
    let port = c.port;
    match o.step {
        OutboundStep::ExcludedPort => format!("excluded outbound port {port}"),
        OutboundStep::PassthroughSource => "bound to the inbound passthrough source 127.0.0.6".into(),
        OutboundStep::ProxyUid => format!("the proxy's own traffic (uid {})", g.pod.proxy_uid),
        OutboundStep::ProxyGid => format!("the proxy's own traffic (gid {})", g.pod.proxy_gid),
        OutboundStep::ProxyGidLoopback => format!("proxy gid {} to loopback or the pod itself", g.pod.proxy_gid),
        OutboundStep::ProxySelfCall => format!("the proxy calling its own pod at {ip}: through inbound"),
        OutboundStep::Dns => format!("DNS capture: port 53 to 127.0.0.1:{}", g.pod.dns_port),
        OutboundStep::Loopback => format!("loopback or the pod's own address {ip}"),
        OutboundStep::CaptureOff => "outbound capture off for this pod".into(),
        OutboundStep::ExcludedCidr => format!("{ip} is in an excluded outbound range"),
        OutboundStep::OutOfRange => format!("{ip} is outside the included outbound ranges"),
        OutboundStep::Listener { id } => {
            let name = g.listener_names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
            let udp = c.proto == sidecap_common::proto::UDP && !matches!(o.verdict, Verdict::Drop { .. });
            if udp { format!("listener {name}, but UDP is never redirected to the proxy") } else { format!("listener {name}") }
        }
        OutboundStep::NoListener => match g.pod.default_action {
            action::DROP => "no listener: REGISTRY_ONLY".into(),
            action::CAPTURE => "no listener: ALLOW_ANY through the proxy (Istio-exact mode)".into(),
            _ => "no listener: ALLOW_ANY passthrough".into(),
        },
    }
}

/// The kernel step that decided an inbound connection, for `sidecap explain`.
fn inbound_reason(step: &InboundStep, port: u16) -> String {
    match step {
        InboundStep::CaptureOff => "inbound capture off for this pod".into(),
        InboundStep::PassthroughSource => "from the inbound passthrough source".into(),
        InboundStep::FromSelf => "from loopback or the pod itself".into(),
        InboundStep::PortRule { action: a } => format!("IN_PORTS rule for port {port}: {}", action_name(*a)),
        InboundStep::AllPorts => format!("port {port}: includeInboundPorts is *"),
        InboundStep::NotIncluded => format!("port {port} is not in includeInboundPorts"),
    }
}
