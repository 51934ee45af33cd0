//! Istio's documented Sidecar examples (testdata/istio/sidecar-examples/) as table tests: validation,
//! the governing Sidecar, the listener set and decisions for pods of
//! testdata/examples-cluster.

mod common;

use common::cli;
use common::*;
use sidecap_policy::Action;

fn with(examples: &[&str]) -> sidecap_policy::Cluster {
    let mut paths = vec![testdata("examples-cluster")];
    paths.extend(examples.iter().map(|e| istio(&format!("sidecar-examples/{e}"))));
    load(&paths)
}

#[test]
fn every_example_validates_as_istio_accepts_it() {
    let mut out = Vec::new();
    let code = cli::validate(&[istio("sidecar-examples")], &mut out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "istio-config/default: ok\nprod-us1/default: ok\nprod-us1/default: ok\nprod-us1/ratings: ok\n\
         prod-us1/no-ip-tables: ok\nprod-us1/partial-ip-tables: ok\nprod-us1/ratings: ok\n\
         prod-us1/connection-pool-settings: ok\n"
    );
}

#[test]
fn ex01_root_namespace_default_applies_in_each_namespace() {
    let c = with(&["01-root-ns-default.yaml"]);
    let p = policy(&c, "prod-us1/reviews-1");
    assert_eq!(p.sidecar.as_deref(), Some("istio-config/default"));
    // `./*` means the pod's namespace, not istio-config.
    assert_eq!(names(&p), sorted(&["0.0.0.0_9080", "10.10.1.4_3306", "240.0.0.2_443", "0.0.0.0_15010", "10.96.204.80_15012"]));
    let q = policy(&c, "prod-us2/client-1");
    assert_eq!(names(&q), sorted(&["0.0.0.0_8080", "10.20.1.2_6379", "0.0.0.0_15010", "10.96.204.80_15012"]));
    check_out(
        &q,
        &[
            ("10.20.1.2:6379", Action::Capture, "listener 10.20.1.2_6379 from prod-us2/cache"),
            ("10.10.1.4:3306", Action::Passthrough, "ALLOW_ANY"),
        ],
    );
}

#[test]
fn ex02_namespace_override_imports_three_namespaces() {
    let c = with(&["01-root-ns-default.yaml", "02-ns-override.yaml"]);
    let p = policy(&c, "prod-us1/reviews-1");
    assert_eq!(p.sidecar.as_deref(), Some("prod-us1/default"), "the namespace's own Sidecar beats the root default");
    assert_eq!(
        names(&p),
        sorted(&[
            "0.0.0.0_9080",
            "10.10.1.4_3306",
            "240.0.0.2_443",
            "240.0.0.1_443",
            "0.0.0.0_9000",
            "0.0.0.0_15010",
            "10.96.204.80_15012"
        ])
    );
    let q = policy(&c, "prod-us2/client-1");
    assert_eq!(q.sidecar.as_deref(), Some("istio-config/default"));
}

#[test]
fn ex03_exclusions_remove_namespace_and_hosts() {
    let c = with(&["03-exclusion-tilde.yaml"]);
    let p = policy(&c, "prod-us1/reviews-1");
    assert_eq!(
        names(&p),
        sorted(&["0.0.0.0_9080", "10.10.1.4_3306", "0.0.0.0_9000", "0.0.0.0_15010", "10.96.204.80_15012", "10.96.0.10_53"])
    );
    check_out(
        &p,
        &[
            ("240.0.0.1:443", Action::Passthrough, "ALLOW_ANY"),
            ("240.0.0.2:443", Action::Passthrough, "ALLOW_ANY"),
            ("10.20.1.2:6379", Action::Passthrough, "ALLOW_ANY"),
            ("10.96.0.10:53", Action::Capture, "listener 10.96.0.10_53 from kube-system/kube-dns"),
        ],
    );
}

#[test]
fn ex04_ratings_port_listener_and_catch_all() {
    let c = with(&["04-ratings-uds-ingress.yaml"]);
    let p = policy(&c, "prod-us1/ratings-1");
    assert_eq!(p.sidecar.as_deref(), Some("prod-us1/ratings"));
    assert_eq!(names(&p), sorted(&["0.0.0.0_9080", "0.0.0.0_15010", "10.96.204.80_15012"]));
    check_out(&p, &[("10.10.1.1:9080", Action::Capture, "listener 0.0.0.0_9080"), ("10.10.1.4:3306", Action::Passthrough, "ALLOW_ANY")]);
    check_in(&p, &[(9080, Action::Capture), (15021, Action::Passthrough)]);
    let other = policy(&c, "prod-us1/reviews-1");
    assert_eq!(other.sidecar, None, "selector does not match reviews; no root default loaded");
    assert!(names(&other).contains(&"10.20.1.2_6379".to_string()));
}

#[test]
fn ex05_capture_mode_none_listeners_bind_their_ports() {
    let c = with(&["05-no-iptables-captureMode-none.yaml", "06-serviceentry-mysql.yaml"]);
    let p = policy(&c, "prod-us1/productpage-1");
    assert_eq!(p.sidecar.as_deref(), Some("prod-us1/no-ip-tables"));
    assert_eq!(names(&p), vec!["127.0.0.1_3306".to_string()]);
    check_out(
        &p,
        &[
            ("10.10.1.4:3306", Action::Passthrough, "listener 127.0.0.1_3306 from ns1/external-svc-mysql binds its port"),
            ("10.10.1.1:9080", Action::Passthrough, "ALLOW_ANY"),
        ],
    );
    check_in(&p, &[(9080, Action::Passthrough), (8080, Action::Capture)]);
}

#[test]
fn ex06_dns_service_entry_without_addresses_listens_on_wildcard() {
    let c = with(&["06-serviceentry-mysql.yaml"]);
    let p = policy(&c, "prod-us1/reviews-1");
    assert!(names(&p).contains(&"0.0.0.0_3306".to_string()), "{:?}", names(&p));
    check_out(
        &p,
        &[
            ("10.10.1.4:3306", Action::Capture, "listener 10.10.1.4_3306 from prod-us1/db"),
            ("203.0.113.9:3306", Action::Capture, "listener 0.0.0.0_3306 from ns1/external-svc-mysql"),
        ],
    );
}

#[test]
fn ex07_partial_iptables_ingress_none_egress_iptables() {
    let c = with(&["07-partial-iptables-bind.yaml"]);
    let p = policy(&c, "prod-us1/productpage-1");
    assert_eq!(p.sidecar.as_deref(), Some("prod-us1/partial-ip-tables"));
    assert!(names(&p).contains(&"10.20.1.2_6379".to_string()));
    check_in(&p, &[(80, Action::Passthrough), (9080, Action::Capture)]);
    check_out(&p, &[("10.20.1.2:6379", Action::Capture, "listener 10.20.1.2_6379")]);
}

#[test]
fn ex08_tls_ingress_and_namespace_less_service() {
    let c = with(&["08-ingress-tls-simple.yaml"]);
    let p = policy(&c, "prod-us1/ratings-1");
    assert_eq!(p.sidecar.as_deref(), Some("prod-us1/ratings"));
    // The example's Service has no namespace (default) and no clusterIP: bound on 0.0.0.0.
    assert!(p.services.iter().any(|s| s.to_string() == "default/ratings.default.svc.cluster.local:8443"));
    assert!(names(&p).contains(&"0.0.0.0_8443".to_string()));
    check_in(&p, &[(80, Action::Capture)]);
}

#[test]
fn ex09_connection_pool_sidecar_changes_no_capture() {
    let c = with(&["09-inbound-connection-pool.yaml"]);
    let p = policy(&c, "prod-us1/productpage-1");
    assert_eq!(p.sidecar.as_deref(), Some("prod-us1/connection-pool-settings"));
    check_in(&p, &[(80, Action::Capture)]);
    assert!(names(&p).contains(&"10.96.0.10_53".to_string()), "no egress: the */* catch-all");
}

#[test]
fn istio_testdata_validates_like_istio() {
    let mut out = Vec::new();
    let code = cli::validate(&[istio("sidecar-datasets")], &mut out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 1, "{text}");
    // Sidecars without a spec are rejected (pkg/config/analysis testdata, ambient cases).
    for line in [
        "ns-ambient/namespace-scoped: error: sidecar: empty configuration provided",
        "ns-ambient/pod-scoped: error: sidecar: empty configuration provided",
        "default/valid-sidecar-config: ok",
        "none/default: ok",
        "consumerns/consumerapp: ok",
        "default/maps-to-nonexistent: ok",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
}
