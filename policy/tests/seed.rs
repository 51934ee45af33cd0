//! The seed article's cluster and Sidecars: the write-up of Istio's Sidecar resource that sidecap
//! started from, whose listener lists (before/after a REGISTRY_ONLY Sidecar) are reproduced below.

mod common;

use common::*;
use sidecap_policy::{Action, AllowAnyMode, EngineOptions};

/// The article's "before" list minus Envoy's own listeners (15090, 15021, virtualOutbound,
/// virtualInbound), which no Service creates.
const BEFORE: &[&str] = &[
    "10.96.204.80_15012",
    "10.96.204.80_443",
    "10.105.56.24_443",
    "10.99.143.236_31400",
    "10.106.32.122_443",
    "10.99.143.236_443",
    "10.99.143.236_15443",
    "10.101.185.70_443",
    "10.96.0.1_443",
    "10.96.0.10_53",
    "10.103.44.131_443",
    "0.0.0.0_9090",
    "0.0.0.0_15010",
    "0.0.0.0_15014",
    "0.0.0.0_80",
    "10.99.186.117_80",
    "10.103.231.91_80",
    "10.96.0.10_9153",
    "0.0.0.0_8000",
    "10.106.250.70_14268",
    "0.0.0.0_16685",
    "10.104.246.237_80",
    "0.0.0.0_20001",
    "10.99.143.236_15021",
    "10.108.57.115_3000",
    "10.106.250.70_14250",
    "0.0.0.0_9411",
    "10.99.26.101_8080",
    "0.0.0.0_8082",
];

fn cluster(sidecar: Option<&str>) -> sidecap_policy::Cluster {
    let mut paths = vec![testdata("seed-cluster")];
    if let Some(s) = sidecar {
        paths.push(testdata(&format!("seed-sidecars/{s}")));
    }
    load(&paths)
}

#[test]
fn before_any_sidecar_the_listeners_are_the_articles() {
    let c = cluster(None);
    let p = policy(&c, "default/client");
    assert_eq!(p.sidecar, None, "implicit default");
    assert_eq!(names(&p), sorted(BEFORE));
    assert_eq!(p.netns.as_deref(), Some("/run/netns/client"));
    // ALLOW_ANY by the mesh config; sidecap's default: passthrough when no listener matches.
    check_out(
        &p,
        &[
            ("10.96.0.10:53", Action::Capture, "listener 10.96.0.10_53 from kube-system/kube-dns"),
            ("10.99.26.101:8080", Action::Capture, "listener 10.99.26.101_8080 from default/demoapp"),
            ("1.2.3.4:80", Action::Capture, "listener 0.0.0.0_80"),
            ("1.2.3.4:8080", Action::Passthrough, "ALLOW_ANY: no listener"),
            ("10.96.0.10:5353", Action::Passthrough, "ALLOW_ANY"),
            ("127.0.0.1:15000", Action::Passthrough, "loopback"),
            ("10.244.1.10:8080", Action::Passthrough, "own address"),
            ("10.1.1.1:15020", Action::Passthrough, "excludeOutboundPorts"),
        ],
    );
    check_in(
        &p,
        &[
            (8080, Action::Capture),
            (15008, Action::Passthrough),
            (15020, Action::Passthrough),
            (15021, Action::Passthrough),
            (15090, Action::Passthrough),
        ],
    );
}

#[test]
fn registry_only_reduces_listeners_to_8080() {
    let c = cluster(Some("05-registry-only-8080.yaml"));
    let p = policy(&c, "default/client");
    assert_eq!(p.sidecar.as_deref(), Some("default/client"));
    assert_eq!(names(&p), vec!["0.0.0.0_8080".to_string()], "the article's after list");
    assert_eq!(p.listeners[0].seed_line(), "0.0.0.0_8080::0.0.0.0:8080");
    assert_eq!(p.services.iter().map(ToString::to_string).collect::<Vec<_>>(), vec!["default/demoapp.default.svc.cluster.local:8080"]);
    check_out(
        &p,
        &[
            ("10.99.26.101:8080", Action::Capture, "listener 0.0.0.0_8080 from default/demoapp"),
            ("93.184.216.34:8080", Action::Capture, "0.0.0.0_8080"),
            ("10.96.0.10:53", Action::Drop, "REGISTRY_ONLY: no listener"),
            ("10.99.186.117:80", Action::Drop, "REGISTRY_ONLY"),
            ("93.184.216.34:443", Action::Drop, "REGISTRY_ONLY"),
            ("127.0.0.1:9999", Action::Passthrough, "loopback"),
        ],
    );
}

#[test]
fn allow_any_passes_everything_but_8080_through() {
    let c = cluster(Some("06-allow-any-8080.yaml"));
    let p = policy(&c, "default/client");
    assert_eq!(names(&p), vec!["0.0.0.0_8080".to_string()]);
    check_out(
        &p,
        &[
            ("10.99.26.101:8080", Action::Capture, "listener 0.0.0.0_8080"),
            ("10.99.186.117:80", Action::Passthrough, "透传"),
            ("10.96.0.10:53", Action::Passthrough, "ALLOW_ANY"),
        ],
    );
    // Istio-exact mode sends unknown destinations through Envoy's PassthroughCluster.
    let exact = policy_with(&c, "default/client", &EngineOptions { allow_any: AllowAnyMode::Capture, ..Default::default() });
    check_out(&exact, &[("10.99.186.117:80", Action::Capture, "PassthroughCluster")]);
}

#[test]
fn example1_imports_own_namespace_and_istio_system() {
    let c = cluster(Some("03-example1-client-imports.yaml"));
    let p = policy(&c, "default/client");
    let mut want: Vec<&str> = BEFORE
        .iter()
        .copied()
        .filter(|n| !["10.96.0.10_53", "10.96.0.10_9153", "10.103.44.131_443", "10.106.32.122_443"].contains(n))
        .collect();
    want.sort();
    assert_eq!(names(&p), sorted(&want), "kube-system and ingress-nginx services are not imported");
    check_out(&p, &[("10.96.0.10:53", Action::Passthrough, "ALLOW_ANY: no listener")]);
}

#[test]
fn example2_port_listener_without_hosts_imports_nothing() {
    let c = cluster(Some("04-example2-port80-no-hosts.yaml"));
    let p = policy(&c, "default/client");
    // The port-80 listener has no hosts, so only the catch-all `./*` contributes.
    assert_eq!(names(&p), sorted(&["10.96.0.1_443", "10.99.26.101_8080", "10.99.186.117_80", "0.0.0.0_8000", "0.0.0.0_8082"]));
    check_out(&p, &[("10.105.56.24:443", Action::Drop, "REGISTRY_ONLY")]);
}

#[test]
fn article_default_sidecar_with_uds_ingress() {
    let c = cluster(Some("01-default-uds.yaml"));
    let p = policy(&c, "default/client");
    assert_eq!(p.sidecar.as_deref(), Some("default/default"));
    // Port 9080 listener: no default-namespace service has 9080, so only istio-system's catch-all.
    assert!(names(&p).iter().all(|n| !n.ends_with("_9080")), "{:?}", names(&p));
    assert!(names(&p).contains(&"10.96.204.80_15012".to_string()));
    assert!(!names(&p).contains(&"10.99.26.101_8080".to_string()), "default/* only on 9080");
    check_in(&p, &[(9080, Action::Capture)]);
}

#[test]
fn partial_ip_tables_sidecar_does_not_apply_to_client() {
    let c = cluster(Some("02-partial-ip-tables.yaml"));
    let p = policy(&c, "default/client");
    assert_eq!(p.sidecar, None, "prod-us1 Sidecar never governs a default pod");
    assert_eq!(names(&p), sorted(BEFORE));
}
