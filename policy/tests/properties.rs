//! Property tests: the compiled maps, read by the kernel programs' own decision code
//! (`sidecap_common::decide`, over a model of the maps' lookups), decide what the engine
//! decided; exclusions only ever reduce capture; REGISTRY_ONLY drops what no listener
//! matches; diffs are complete.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;
use sidecap_common::decide::{Connect, RedirectKind, Verdict};
use sidecap_common::proto;
use sidecap_policy::compile::simulate;
use sidecap_policy::engine::IngressPort;
use sidecap_policy::knobs::{Include, Interception, Knobs, ProxyIdentity};
use sidecap_policy::listeners::{ListenerAction, OutboundListener};
use sidecap_policy::model::{Cidr, OutboundMode};
use sidecap_policy::{Action, AllowAnyMode, PodPolicy, PodRef, compile, diff};

const PORTS: [u16; 8] = [53, 80, 443, 3306, 8080, 15020, 15008, 9090];

fn ip_pool() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4, 0u8..4).prop_map(|(a, b)| IpAddr::V4(Ipv4Addr::new(10, a, b, 1))),
        (0u8..4).prop_map(|a| IpAddr::V4(Ipv4Addr::new(10, a, 0, 0))),
        Just(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
        Just(IpAddr::V4(Ipv4Addr::new(10, 244, 0, 5))),
        Just("2001:db8::1".parse::<IpAddr>().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))),
        Just("::ffff:10.1.1.1".parse::<IpAddr>().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))),
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![proptest::sample::select(PORTS.to_vec()), any::<u16>()]
}

fn cidr() -> impl Strategy<Value = Cidr> {
    (ip_pool(), 0u8..=32).prop_map(|(ip, len)| match ip {
        IpAddr::V4(_) => Cidr::new(ip, len),
        IpAddr::V6(_) => Cidr::new(ip, len * 4),
    })
}

fn listener() -> impl Strategy<Value = OutboundListener> {
    (proptest::sample::select(PORTS.to_vec()), any::<bool>(), proptest::collection::vec(cidr(), 0..3), any::<bool>()).prop_map(
        |(port, any, prefixes, capture)| OutboundListener {
            name: format!("l_{port}"),
            address: "0.0.0.0".into(),
            port,
            any: any || prefixes.is_empty(),
            prefixes,
            action: if capture { ListenerAction::Capture } else { ListenerAction::Passthrough },
            services: vec!["ns/svc".into()],
        },
    )
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        prop_oneof![Just(Interception::Redirect), Just(Interception::None)],
        prop_oneof![Just(Include::All), proptest::collection::vec(cidr(), 0..3).prop_map(Include::List)],
        proptest::collection::vec(cidr(), 0..3),
        proptest::collection::vec(port(), 0..2),
        proptest::collection::vec(port(), 0..3),
        prop_oneof![Just(Include::All), proptest::collection::vec(port(), 0..3).prop_map(Include::List)],
        proptest::collection::vec(port(), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(
                interception,
                include_cidrs,
                exclude_cidrs,
                include_outbound_ports,
                exclude_outbound_ports,
                include_inbound_ports,
                mut exclude_inbound_ports,
                dns_capture,
            )| {
                exclude_inbound_ports.extend([15020, 15021, 15090]);
                Knobs {
                    interception,
                    include_cidrs,
                    exclude_cidrs,
                    include_outbound_ports,
                    exclude_outbound_ports,
                    include_inbound_ports,
                    exclude_inbound_ports,
                    status_port: 15020,
                    proxy_uid: 1337,
                    proxy_gid: 1337,
                    dns_capture,
                    proxy_identity: None,
                }
            },
        )
}

fn pod_policy() -> impl Strategy<Value = PodPolicy> {
    (
        proptest::collection::vec(listener(), 0..6),
        knobs(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec((port(), any::<bool>()), 0..3),
        any::<bool>(),
    )
        .prop_map(|(listeners, knobs, registry_only, allow_capture, meshed, ingress, cgroup_identity)| PodPolicy {
            pod: PodRef::new("ns", "pod"),
            sidecar: None,
            outbound_traffic_policy: if registry_only { OutboundMode::RegistryOnly } else { OutboundMode::AllowAny },
            allow_any: if allow_capture { AllowAnyMode::Capture } else { AllowAnyMode::Passthrough },
            proxy_identity: if cgroup_identity { ProxyIdentity::Cgroup } else { ProxyIdentity::Uid },
            listeners,
            services: Vec::new(),
            knobs,
            ingress: ingress.into_iter().map(|(port, captured)| IngressPort { port, captured }).collect(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, 0, 5))],
            netns: None,
            meshed: meshed || registry_only,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The kernel's algorithm over the compiled maps gives the engine's action.
    #[test]
    fn compiled_maps_decide_like_the_engine(p in pod_policy(), dsts in proptest::collection::vec((ip_pool(), port()), 1..24), inbound in proptest::collection::vec(port(), 1..8), policy_id in any::<u32>()) {
        let g = compile(&p, policy_id, 1);
        for (ip, port) in dsts {
            let dst = SocketAddr::new(ip, port);
            let want = p.decide_outbound(dst);
            prop_assert_eq!(simulate::outbound(&g, dst, proto::TCP), want.action, "dst {} reason {}", dst, want.reason);
        }
        for port in inbound.into_iter().chain([15008, 15020, 15021, 15090]) {
            let want = p.decide_inbound(port);
            prop_assert_eq!(simulate::inbound(&g, port), want.action, "inbound {} reason {}", port, want.reason);
        }
    }

    /// The proxy's own connects (its uid, or only its gid), through the kernel's decision
    /// code: never captured to the outbound port, never dropped; redirected only to its own
    /// inbound port, and only for TCP to the pod's own address or loopback other than
    /// 127.0.0.1, as istio-iptables' owner rules do.
    #[test]
    fn the_proxy_is_never_captured_or_dropped(p in pod_policy(), dsts in proptest::collection::vec((ip_pool(), port()), 1..24), by_gid in any::<bool>(), udp in any::<bool>()) {
        let mut g = compile(&p, 7, 1);
        // The proxy's container cgroup, as the agent fills it in (read under cgroup identity).
        g.pod.proxy_cgroup = 4242;
        let l4 = if udp { proto::UDP } else { proto::TCP };
        for (ip, port) in dsts {
            let dst = SocketAddr::new(ip, port);
            let proxy = simulate::proxy_connect(&g.pod, dst, l4);
            let c = if by_gid { Connect { uid: simulate::app_id(&g.pod), ..proxy } } else { proxy };
            let v = simulate::outbound_connect(&g, &c).verdict;
            match v {
                Verdict::Untouched | Verdict::Passthrough => {}
                Verdict::Redirect { kind: RedirectKind::ProxyToSelf, port: to } => {
                    prop_assert_eq!(to, g.pod.inbound_port);
                    prop_assert!(!udp, "UDP never goes to inbound: {}", dst);
                    let own = g.pod.ips[..usize::from(g.pod.n_ips)].contains(&sidecap_common::ip::to_bytes(&c.dst));
                    let lo = ip.to_canonical().is_loopback() && !matches!(ip.to_canonical(), IpAddr::V4(Ipv4Addr::LOCALHOST) | IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
                    prop_assert!(own || lo, "only self calls go to inbound: {}", dst);
                }
                other => prop_assert!(false, "proxy connect to {} by {}: {:?}", dst, if by_gid { "gid" } else { "uid" }, other),
            }
        }
    }

    /// Cgroup-bound identity: the proxy's uid/gid outside the proxy's cgroup (or while that
    /// cgroup is unknown) is decided exactly as an app's, step for step.
    #[test]
    fn the_proxy_ids_elsewhere_are_an_app(mut p in pod_policy(), dsts in proptest::collection::vec((ip_pool(), port()), 1..24), by_gid in any::<bool>(), udp in any::<bool>(), known in any::<bool>()) {
        p.proxy_identity = ProxyIdentity::Cgroup;
        let mut g = compile(&p, 7, 1);
        g.pod.proxy_cgroup = if known { 4242 } else { 0 };
        let l4 = if udp { proto::UDP } else { proto::TCP };
        for (ip, port) in dsts {
            let dst = SocketAddr::new(ip, port);
            let app = simulate::app_connect(&g.pod, dst, l4);
            let ids = if by_gid { Connect { gid: g.pod.proxy_gid, ..app } } else { Connect { uid: g.pod.proxy_uid, gid: g.pod.proxy_gid, ..app } };
            let borrowed = Connect { cgroup: simulate::other_cgroup(&g.pod), ..ids };
            let (a, b) = (simulate::outbound_connect(&g, &app), simulate::outbound_connect(&g, &borrowed));
            prop_assert_eq!((a.verdict, a.step), (b.verdict, b.step), "dst {}", dst);
            if !known {
                let c = simulate::outbound_connect(&g, &Connect { cgroup: 0, ..ids });
                prop_assert_eq!((a.verdict, a.step), (c.verdict, c.step), "unknown cgroup, dst {}", dst);
            }
        }
    }

    /// Adding an excluded CIDR or port never turns passthrough into capture.
    #[test]
    fn exclusions_never_add_capture(p in pod_policy(), c in cidr(), xport in port(), ip in ip_pool(), dport in port()) {
        let dst = SocketAddr::new(ip, dport);
        let before = p.decide_outbound(dst).action;
        let mut q = p.clone();
        q.knobs.exclude_cidrs.push(c);
        let mut r = p.clone();
        r.knobs.exclude_outbound_ports.push(xport);
        for after in [q.decide_outbound(dst).action, r.decide_outbound(dst).action] {
            prop_assert!(!(before == Action::Passthrough && after == Action::Capture), "{} {:?} -> {:?}", dst, before, after);
            prop_assert!(!(before != Action::Capture && after == Action::Capture));
        }
    }

    /// REGISTRY_ONLY: a destination in capture range that no listener matches is dropped.
    #[test]
    fn registry_only_never_passes_unlisted(mut p in pod_policy(), ip in ip_pool(), dport in port()) {
        p.outbound_traffic_policy = OutboundMode::RegistryOnly;
        p.meshed = true;
        p.knobs.interception = Interception::Redirect;
        p.knobs.include_cidrs = Include::All;
        p.knobs.exclude_cidrs.clear();
        p.knobs.exclude_outbound_ports.clear();
        p.knobs.dns_capture = false;
        let dst = SocketAddr::new(ip, dport);
        let d = p.decide_outbound(dst);
        let local = ip.is_loopback() || p.ips.contains(&ip) || ip == "::ffff:127.0.0.1".parse::<IpAddr>().unwrap_or(ip);
        if p.listener_for(dst).is_none() && !local {
            prop_assert_eq!(d.action, Action::Drop, "{} {}", dst, d.reason);
        }
    }

    /// Applying `diff(old, new)` to `old` gives `new`, whatever the two policies.
    #[test]
    fn diff_is_complete(a in pod_policy(), b in pod_policy(), same_id in any::<bool>()) {
        let old = compile(&a, 7, 1);
        let new = compile(&b, if same_id { 7 } else { 8 }, 2);
        let d = diff(&old, &new);
        let applied = d.apply(&old);
        prop_assert_eq!(&applied.pod, &new.pod);
        prop_assert_eq!(&applied.out_ports, &new.out_ports);
        prop_assert_eq!(&applied.out_cidrs, &new.out_cidrs);
        prop_assert_eq!(&applied.listeners, &new.listeners);
        prop_assert_eq!(&applied.in_ports, &new.in_ports);
        prop_assert!(diff(&new, &new).is_empty());
    }
}

/// Real clusters: the seed cluster under each of the article's Sidecars, the simulator agrees
/// with the engine for random destinations.
#[test]
fn seed_cluster_compiles_to_the_same_decisions() {
    let sidecars = [
        "",
        "03-example1-client-imports.yaml",
        "04-example2-port80-no-hosts.yaml",
        "05-registry-only-8080.yaml",
        "06-allow-any-8080.yaml",
        "01-default-uds.yaml",
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    for s in sidecars {
        let mut paths = vec![common::testdata("seed-cluster")];
        if !s.is_empty() {
            paths.push(common::testdata(&format!("seed-sidecars/{s}")));
        }
        let c = common::load(&paths);
        for mode in [AllowAnyMode::Passthrough, AllowAnyMode::Capture] {
            let p = common::policy_with(&c, "default/client", &sidecap_policy::EngineOptions { allow_any: mode, ..Default::default() });
            let g = compile(&p, 42, 1);
            let mut known: Vec<SocketAddr> =
                p.listeners.iter().flat_map(|l| l.prefixes.iter().map(move |c| SocketAddr::new(c.addr, l.port))).collect();
            known.push(common::addr("1.2.3.4:8080"));
            for dst in &known {
                assert_eq!(simulate::outbound(&g, *dst, proto::TCP), p.decide_outbound(*dst).action, "{s} {dst}");
            }
            let result = runner.run(&(ip_pool(), port()), |(ip, port)| {
                let dst = SocketAddr::new(ip, port);
                prop_assert_eq!(simulate::outbound(&g, dst, proto::TCP), p.decide_outbound(dst).action, "{} {}", s, dst);
                Ok(())
            });
            if let Err(e) = result {
                panic!("{s}: {e}");
            }
        }
    }
}

/// Found by the simulator property: a v6 `::/0` prefix and a wildcard listener rank equally
/// in the trie (same key), so the engine must not rank the prefix higher; capture wins ties.
#[test]
fn v6_default_prefix_ties_with_wildcard_and_capture_wins() {
    let mk = |any: bool, prefixes: Vec<Cidr>, action| OutboundListener {
        name: "l".into(),
        address: "0.0.0.0".into(),
        port: 15008,
        any,
        prefixes,
        action,
        services: Vec::new(),
    };
    let v6_all = Cidr::new("2001:db8::1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0);
    let mut p = PodPolicy {
        pod: PodRef::new("ns", "pod"),
        sidecar: None,
        outbound_traffic_policy: OutboundMode::RegistryOnly,
        allow_any: AllowAnyMode::Passthrough,
        proxy_identity: ProxyIdentity::Uid,
        listeners: vec![mk(true, Vec::new(), ListenerAction::Capture), mk(false, vec![v6_all], ListenerAction::Passthrough)],
        services: Vec::new(),
        knobs: Knobs {
            interception: Interception::Redirect,
            include_cidrs: Include::All,
            exclude_cidrs: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: Include::All,
            exclude_inbound_ports: Vec::new(),
            status_port: 15020,
            proxy_uid: 1337,
            proxy_gid: 1337,
            dns_capture: false,
            proxy_identity: None,
        },
        ingress: Vec::new(),
        ips: Vec::new(),
        netns: None,
        meshed: true,
    };
    let dst = common::addr("10.0.0.1:15008");
    assert_eq!(p.decide_outbound(dst).action, Action::Capture);
    assert_eq!(simulate::outbound(&compile(&p, 0, 1), dst, proto::TCP), Action::Capture);
    p.listeners.reverse();
    assert_eq!(p.decide_outbound(dst).action, Action::Capture);
    assert_eq!(simulate::outbound(&compile(&p, 0, 1), dst, proto::TCP), Action::Capture);
}
