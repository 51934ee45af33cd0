//! Sidecar selection (pilot/pkg/model/push_context.go `initSidecarScopes`, `getSidecarScope`),
//! host import (pilot/pkg/model/sidecar.go `selectServices`, `hostClassification`) and
//! listener shapes (pilot/pkg/networking/core/listener.go) on small inline clusters.

mod common;

use common::*;
use sidecap_policy::Action;

const POD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: app
  namespace: team
  labels: {app: web}
  annotations: {sidecar.istio.io/status: x}
spec: {containers: [{name: istio-proxy}]}
status: {podIP: 10.244.0.9}
";

fn cluster(yaml: &str) -> sidecap_policy::Cluster {
    load_with(&[], &format!("{POD}\n---\n{yaml}"))
}

fn sidecar(ns: &str, name: &str, created: &str, selector: Option<&str>, host: &str) -> String {
    let sel = selector.map(|s| format!("  workloadSelector: {s}\n")).unwrap_or_default();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}\nspec:\n{sel}  egress: [{{hosts: ['{host}']}}]\n"
    )
}

#[test]
fn oldest_first_then_name() {
    let c = cluster(
        &[
            sidecar("team", "b-newer", "2024-01-02T00:00:00Z", None, "./*"),
            sidecar("team", "z-older", "2024-01-01T00:00:00Z", None, "./*"),
            sidecar("team", "a-older", "2024-01-01T00:00:00Z", None, "./*"),
        ]
        .concat(),
    );
    assert_eq!(policy(&c, "team/app").sidecar.as_deref(), Some("team/a-older"));
}

#[test]
fn any_selector_even_empty_beats_selectorless() {
    let c = cluster(
        &[
            sidecar("team", "plain", "2020-01-01T00:00:00Z", None, "./*"),
            sidecar("team", "empty-selector", "2024-01-01T00:00:00Z", Some("{}"), "./*"),
        ]
        .concat(),
    );
    assert_eq!(policy(&c, "team/app").sidecar.as_deref(), Some("team/empty-selector"));
    let c = cluster(
        &[
            sidecar("team", "plain", "2020-01-01T00:00:00Z", None, "./*"),
            sidecar("team", "other-app", "2024-01-01T00:00:00Z", Some("{labels: {app: db}}"), "./*"),
            sidecar("team", "this-app", "2025-01-01T00:00:00Z", Some("{labels: {app: web}}"), "./*"),
        ]
        .concat(),
    );
    assert_eq!(policy(&c, "team/app").sidecar.as_deref(), Some("team/this-app"));
}

#[test]
fn root_default_only_without_selector() {
    let c = cluster(&sidecar("istio-system", "with-selector", "2020-01-01T00:00:00Z", Some("{labels: {app: web}}"), "*/*"));
    assert_eq!(policy(&c, "team/app").sidecar, None, "a root Sidecar with a selector is never a mesh default");
    let c = cluster(
        &[
            sidecar("istio-system", "with-selector", "2020-01-01T00:00:00Z", Some("{labels: {app: web}}"), "*/*"),
            sidecar("istio-system", "mesh-default", "2024-01-01T00:00:00Z", None, "./*"),
            sidecar("elsewhere", "x", "2019-01-01T00:00:00Z", None, "*/*"),
        ]
        .concat(),
    );
    assert_eq!(policy(&c, "team/app").sidecar.as_deref(), Some("istio-system/mesh-default"));
}

const SERVICES: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: team}
spec: {clusterIP: 10.0.0.1, ports: [{name: tcp, port: 7000}]}
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: other, annotations: {networking.istio.io/exportTo: '.'}}
spec: {clusterIP: 10.0.0.2, ports: [{name: tcp, port: 7001}]}
---
apiVersion: v1
kind: Service
metadata: {name: shared, namespace: other, annotations: {networking.istio.io/exportTo: 'team'}}
spec: {clusterIP: 10.0.0.3, ports: [{name: tcp, port: 7002}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: other}
spec:
  hosts: ['*.foo.com']
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exact, namespace: other}
spec:
  hosts: [a.b.foo.com]
  addresses: [240.1.1.1]
  ports: [{number: 8443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup-there, namespace: other, creationTimestamp: '2020-01-01T00:00:00Z'}
spec:
  hosts: [dup.example.com]
  addresses: [240.2.2.2]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup-here, namespace: team, creationTimestamp: '2024-01-01T00:00:00Z'}
spec:
  hosts: [dup.example.com]
  addresses: [240.3.3.3]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cidr, namespace: other}
spec:
  hosts: [range.example.com]
  addresses: [192.168.0.0/16]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec: {clusterIP: None, ports: [{name: tcp, port: 9042}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: other, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: [10.244.5.1]}, {addresses: [10.244.5.2]}, {addresses: [10.244.0.9]}]
ports: [{name: tcp, port: 9042}]
";

fn import(host: &str) -> Vec<String> {
    let c = cluster(&format!("{SERVICES}{}", sidecar("team", "s", "2024-01-01T00:00:00Z", None, host)));
    names(&policy(&c, "team/app"))
}

#[test]
fn export_to_is_honoured() {
    let all = import("*/*");
    assert!(all.contains(&"10.0.0.3_7002".to_string()), "exported to team: {all:?}");
    assert!(!all.contains(&"10.0.0.2_7001".to_string()), "private to other: {all:?}");
}

#[test]
fn wildcard_hosts_match_by_suffix_and_never_as_subsets_of_exact_imports() {
    // `*.foo.com` imports the exact SE a.b.foo.com and the wildcard SE *.foo.com.
    let w = import("other/*.foo.com");
    assert_eq!(w, sorted(&["0.0.0.0_443", "240.1.1.1_8443"]));
    // An exact import never pulls in the wildcard service.
    assert_eq!(import("other/a.b.foo.com"), vec!["240.1.1.1_8443".to_string()]);
    assert!(import("other/foo.com").is_empty(), "*.foo.com does not cover foo.com");
}

#[test]
fn one_namespace_per_hostname_the_pods_first() {
    let all = import("*/*");
    assert!(all.contains(&"240.3.3.3_9000".to_string()), "{all:?}");
    assert!(!all.contains(&"240.2.2.2_9000".to_string()), "the older SE elsewhere loses to team's: {all:?}");
}

#[test]
fn exclusions_win_over_imports() {
    let c = cluster(&format!(
        "{SERVICES}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s, namespace: team}}\nspec:\n  egress: [{{hosts: ['*/*', '~other/*', '~/api.team.svc.cluster.local']}}]\n"
    ));
    let n = names(&policy(&c, "team/app"));
    assert_eq!(n, vec!["240.3.3.3_9000".to_string()], "only team's SE survives");
}

#[test]
fn headless_listeners_per_endpoint_except_own_pod_and_cidr_entries() {
    let all = import("other/*");
    assert!(all.contains(&"10.244.5.1_9042".to_string()) && all.contains(&"10.244.5.2_9042".to_string()), "{all:?}");
    assert!(!all.contains(&"10.244.0.9_9042".to_string()), "the pod's own IP: {all:?}");
    assert!(all.contains(&"0.0.0.0_5432".to_string()), "CIDR SE binds the wildcard: {all:?}");
    let c = cluster(&format!("{SERVICES}{}", sidecar("team", "s", "2024-01-01T00:00:00Z", Some("{}"), "other/*")));
    let p = policy(&c, "team/app");
    check_out(
        &p,
        &[
            ("192.168.3.4:5432", Action::Capture, "listener 0.0.0.0_5432 from other/cidr"),
            ("10.1.1.1:5432", Action::Passthrough, "ALLOW_ANY"),
            ("10.244.5.2:9042", Action::Capture, "listener 10.244.5.2_9042 from other/db"),
            ("10.244.5.3:9042", Action::Passthrough, "ALLOW_ANY"),
        ],
    );
}

#[test]
fn egress_port_trims_imports_and_http_proxy_imports_all_ports() {
    let c = cluster(&format!(
        "{SERVICES}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s, namespace: team}}\nspec:\n  egress:\n  - port: {{number: 7002, protocol: TCP, name: t}}\n    hosts: ['other/*']\n"
    ));
    let p = policy(&c, "team/app");
    assert_eq!(names(&p), vec!["10.0.0.3_7002".to_string()]);
    assert_eq!(p.services.iter().map(ToString::to_string).collect::<Vec<_>>(), vec!["other/shared.other.svc.cluster.local:7002"]);
}

#[test]
fn annotations_shape_capture() {
    let c = load_with(
        &[],
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: n\n  annotations:\n    sidecar.istio.io/status: x\n    traffic.sidecar.istio.io/includeOutboundIPRanges: 10.0.0.0/8\n    traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.96.0.0/12\n    traffic.sidecar.istio.io/includeInboundPorts: '8080'\n    traffic.sidecar.istio.io/excludeInboundPorts: '8080,9090'\nspec: {containers: [{name: istio-proxy}]}\n",
    );
    let p = policy(&c, "n/p");
    check_out(
        &p,
        &[
            ("10.96.0.10:53", Action::Passthrough, "excludeOutboundIPRanges has 10.96.0.0/12"),
            ("8.8.8.8:53", Action::Passthrough, "not in includeOutboundIPRanges"),
            ("10.1.1.1:80", Action::Passthrough, "ALLOW_ANY"),
        ],
    );
    // excludeInboundPorts is ignored when includeInboundPorts is a list (istio-iptables).
    check_in(&p, &[(8080, Action::Capture), (9090, Action::Passthrough)]);
    let unmeshed = load_with(
        &[],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n, annotations: {sidecar.istio.io/status: x, sidecar.istio.io/inject: 'false'}}\nspec: {containers: [{name: istio-proxy}]}\n",
    );
    assert!(unmeshed.meshed_pods().is_empty());
    check_out(&policy(&unmeshed, "n/p"), &[("1.1.1.1:80", Action::Passthrough, "not meshed")]);
}
