//! Istio fidelity: dual-stack Services and pods, listener names per IP family, the Sidecar's
//! outboundTrafficPolicy default, and capture modes sidecap refuses. Each test names the
//! Istio file and function it follows.

mod common;

use common::*;
use sidecap_common::proto;
use sidecap_policy::compile::simulate;
use sidecap_policy::{Action, EngineOptions, PodRef, compile, evaluate};

fn mesh(mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: {mode}\n"
    )
}

fn pod(ips: &[&str], annotations: &str, env: &str) -> String {
    let ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  namespace: team\n  labels: {{app: web}}\n  annotations: {{sidecar.istio.io/status: x{annotations}}}\nspec: {{containers: [{{name: istio-proxy, env: [{env}]}}]}}\nstatus: {{podIPs: [{}]}}\n",
        ips.join(", ")
    )
}

/// A dual-stack Service, IPv6 first, as Kubernetes lists `PreferDualStack` with v6 primary.
const REDIS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: redis, namespace: team}\nspec:\n  clusterIP: fd00:10:96::c2\n  clusterIPs: [fd00:10:96::c2, 10.96.12.2]\n  ports: [{name: tcp-redis, port: 6379}]\n";
const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: team}\nspec:\n  clusterIP: 10.96.0.80\n  clusterIPs: [10.96.0.80, fd00:10:96::80]\n  ports: [{name: http, port: 80}]\n";
const EXT: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: team}\nspec:\n  hosts: [ext.example.com]\n  resolution: DNS\n  ports: [{number: 9000, name: tcp, protocol: TCP}]\n";

fn cluster(parts: &[&str]) -> sidecap_policy::Cluster {
    load_with(&[], &parts.join("\n---\n"))
}

/// The decision the compiled maps give, which must equal the engine's.
fn kernel(p: &sidecap_policy::PodPolicy, dst: &str) -> Action {
    simulate::outbound(&compile(p, 7, 1), addr(dst), proto::TCP)
}

// pilot/pkg/serviceregistry/kube/conversion.go `ConvertService` keeps every clusterIP;
// pilot/pkg/model/service.go `GetAddressForProxy` picks the one of the proxy's family
// (pilot/pkg/util/network/ip.go `FilterAddressesByIPFamily`), so an IPv4 pod listens on the
// IPv4 VIP even when the Service lists IPv6 first.
#[test]
fn ipv4_pod_listens_on_the_ipv4_clusterip_of_a_dual_stack_service() {
    let c = cluster(&[&mesh("REGISTRY_ONLY"), &pod(&["10.244.0.9"], "", ""), REDIS]);
    let p = policy(&c, "team/app");
    assert_eq!(names(&p), vec!["10.96.12.2_6379".to_string()]);
    check_out(&p, &[("10.96.12.2:6379", Action::Capture, "listener 10.96.12.2_6379 from team/redis")]);
    // No listener on the v6 VIP for a v4 pod (no extra addresses for a single-family proxy).
    check_out(&p, &[("[fd00:10:96::c2]:6379", Action::Drop, "REGISTRY_ONLY")]);
    assert_eq!(kernel(&p, "10.96.12.2:6379"), Action::Capture);
    assert_eq!(kernel(&p, "[fd00:10:96::c2]:6379"), Action::Drop);
}

// Same functions for an IPv6-only pod: the IPv6 clusterIP, whichever comes first.
#[test]
fn ipv6_pod_listens_on_the_ipv6_clusterip() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: redis, namespace: team}\nspec:\n  clusterIP: 10.96.12.2\n  clusterIPs: [10.96.12.2, fd00:10:96::c2]\n  ports: [{name: tcp-redis, port: 6379}]\n";
    let c = cluster(&[&mesh("REGISTRY_ONLY"), &pod(&["fd00:10:244::9"], "", ""), svc]);
    let p = policy(&c, "team/app");
    assert_eq!(names(&p), vec!["fd00:10:96::c2_6379".to_string()]);
    check_out(&p, &[("[fd00:10:96::c2]:6379", Action::Capture, "fd00:10:96::c2_6379"), ("10.96.12.2:6379", Action::Drop, "REGISTRY_ONLY")]);
}

// pilot/pkg/model/service.go `GetExtraAddressesForProxy` (dual-stack proxy, ISTIO_DUAL_STACK):
// the listener is named after the first clusterIP and carries the other family's VIP as an
// additional address (listener.go `buildListenerFromEntry`: AdditionalAddresses), so both
// VIPs reach the proxy.
#[test]
fn dual_stack_pod_reaches_both_vips_through_one_listener() {
    let c = cluster(&[&mesh("REGISTRY_ONLY"), &pod(&["10.244.0.9", "fd00:10:244::9"], "", ""), REDIS]);
    let p = policy(&c, "team/app");
    assert_eq!(names(&p), vec!["fd00:10:96::c2_6379".to_string()]);
    for dst in ["10.96.12.2:6379", "[fd00:10:96::c2]:6379"] {
        check_out(&p, &[(dst, Action::Capture, "listener fd00:10:96::c2_6379")]);
        assert_eq!(kernel(&p, dst), Action::Capture, "{dst}");
    }
    check_out(&p, &[("10.96.12.3:6379", Action::Drop, "REGISTRY_ONLY")]);
    assert_eq!(kernel(&p, "10.96.12.3:6379"), Action::Drop);
}

// listener_address.go `wildCards`: `0.0.0.0` for IPv4 and dual-stack proxies, `::` for
// IPv6-only ones (HTTP listeners, listener.go `buildSidecarOutboundListener`); an
// address-less ServiceEntry listens on `::` for an IPv6 proxy (provider.External and
// `IsIPv6`); `localHosts`: a captureMode NONE listener binds `::1`.
#[test]
fn ipv6_only_pod_names_wildcard_listeners_after_the_ipv6_wildcard() {
    let none = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s, namespace: team}\nspec:\n  egress:\n  - {port: {number: 9000, protocol: TCP, name: t}, captureMode: NONE, hosts: ['./*']}\n  - {hosts: ['./*']}\n";
    let c = cluster(&[&mesh("ALLOW_ANY"), &pod(&["fd00:10:244::9"], "", ""), WEB, EXT, none]);
    let p = policy(&c, "team/app");
    assert_eq!(names(&p), sorted(&["::1_9000", "::_80", "::_9000"]));
    check_out(
        &p,
        &[("[fd00:10:96::80]:80", Action::Capture, "listener ::_80"), ("[2001:db8::1]:9000", Action::Capture, "listener ::_9000")],
    );

    let c = cluster(&[&mesh("ALLOW_ANY"), &pod(&["10.244.0.9"], "", ""), WEB, EXT, none]);
    assert_eq!(names(&policy(&c, "team/app")), sorted(&["127.0.0.1_9000", "0.0.0.0_80", "0.0.0.0_9000"]));
    // Dual-stack: the IPv4 wildcard is the primary address (`::` is an additional one).
    let c = cluster(&[&mesh("ALLOW_ANY"), &pod(&["fd00:10:244::9", "10.244.0.9"], "", ""), WEB, EXT, none]);
    assert_eq!(names(&policy(&c, "team/app")), sorted(&["127.0.0.1_9000", "0.0.0.0_80", "0.0.0.0_9000"]));
}

// pilot/pkg/model/sidecar.go `convertToSidecarScope`: the Sidecar's outboundTrafficPolicy is
// used whenever present, and `{}` is the proto's zero value REGISTRY_ONLY
// (networking/v1alpha3/sidecar.proto `OutboundTrafficPolicy.Mode`); absent, the mesh's mode.
#[test]
fn empty_outbound_traffic_policy_is_registry_only() {
    let sc = |otp: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: s, namespace: team}}\nspec:\n  egress: [{{hosts: ['./*']}}]\n{otp}"
        )
    };
    let c = cluster(&[&mesh("ALLOW_ANY"), &pod(&["10.244.0.9"], "", ""), REDIS, &sc("  outboundTrafficPolicy: {}\n")]);
    let p = policy(&c, "team/app");
    assert_eq!(p.outbound_traffic_policy, sidecap_policy::model::OutboundMode::RegistryOnly);
    check_out(&p, &[("192.0.2.1:443", Action::Drop, "REGISTRY_ONLY")]);
    assert_eq!(kernel(&p, "192.0.2.1:443"), Action::Drop);

    let c = cluster(&[&mesh("ALLOW_ANY"), &pod(&["10.244.0.9"], "", ""), REDIS, &sc("")]);
    check_out(&policy(&c, "team/app"), &[("192.0.2.1:443", Action::Passthrough, "ALLOW_ANY")]);
    let c = cluster(&[&mesh("REGISTRY_ONLY"), &pod(&["10.244.0.9"], "", ""), REDIS, &sc("  outboundTrafficPolicy: {mode: ALLOW_ANY}\n")]);
    check_out(&policy(&c, "team/app"), &[("192.0.2.1:443", Action::Passthrough, "ALLOW_ANY")]);
}

fn refused(annotations: &str, env: &str, mesh_yaml: &str) -> String {
    let c = cluster(&[mesh_yaml, &pod(&["10.244.0.9"], annotations, env)]);
    let r: PodRef = "team/app".parse().expect("pod ref");
    match evaluate(&c, &r, &EngineOptions::default()) {
        Ok(p) => panic!("{annotations} {env}: evaluated, knobs {:?}", p.knobs),
        Err(e) => e.to_string(),
    }
}

// istio-cni (cni/pkg/plugin/sidecar_redirect.go `NewRedirect`) accepts REDIRECT, TPROXY and
// NONE; sidecap implements REDIRECT and NONE and refuses TPROXY with an error naming the
// annotation and its value (the agent fails the pod's CNI ADD with it).
#[test]
fn tproxy_and_unknown_interception_modes_are_refused_by_name() {
    let e = refused(", sidecar.istio.io/interceptionMode: TPROXY", "", &mesh("ALLOW_ANY"));
    assert!(e.starts_with("pod team/app: annotation sidecar.istio.io/interceptionMode: \"TPROXY\" is not supported"), "{e}");
    let e = refused(", sidecar.istio.io/interceptionMode: BOGUS", "", &mesh("ALLOW_ANY"));
    assert!(e.contains("sidecar.istio.io/interceptionMode") && e.contains("BOGUS"), "{e}");
    // REDIRECT and NONE evaluate.
    for mode in ["REDIRECT", "NONE"] {
        let c = cluster(&[&mesh("ALLOW_ANY"), &pod(&["10.244.0.9"], &format!(", sidecar.istio.io/interceptionMode: {mode}"), "")]);
        policy(&c, "team/app");
    }
}

// Injection template `-k` from istio.io/reroute-virtual-interfaces or
// traffic.sidecar.istio.io/kubevirtInterfaces (istio-iptables `RerouteVirtualInterfaces`).
#[test]
fn virtual_interfaces_are_refused_by_name() {
    let e = refused(", traffic.sidecar.istio.io/kubevirtInterfaces: 'net1,net2'", "", &mesh("ALLOW_ANY"));
    assert!(e.contains("annotation traffic.sidecar.istio.io/kubevirtInterfaces: \"net1,net2\" is not supported"), "{e}");
    let e = refused(", istio.io/reroute-virtual-interfaces: net1", "", &mesh("ALLOW_ANY"));
    assert!(e.contains("annotation istio.io/reroute-virtual-interfaces: \"net1\""), "{e}");
}

// tools/istio-iptables/pkg/constants/constants.go `OwnerGroupsInclude` (default `*`) and
// `OwnerGroupsExclude` (default empty), environment of the init container, which the
// injection template fills from proxyMetadata.
#[test]
fn owner_group_filters_are_refused_by_name() {
    let e = refused("", "{name: ISTIO_OUTBOUND_OWNER_GROUPS, value: 'java'}", &mesh("ALLOW_ANY"));
    assert!(e.contains("container istio-proxy env ISTIO_OUTBOUND_OWNER_GROUPS: \"java\" is not supported"), "{e}");
    let with_meta =
        format!("{}    defaultConfig:\n      proxyMetadata:\n        ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: '1001'\n", mesh("ALLOW_ANY"));
    let e = refused("", "", &with_meta);
    assert!(e.contains("mesh defaultConfig.proxyMetadata ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: \"1001\""), "{e}");
    // The defaults are not filters.
    let c = cluster(&[
        &mesh("ALLOW_ANY"),
        &pod(
            &["10.244.0.9"],
            "",
            "{name: ISTIO_OUTBOUND_OWNER_GROUPS, value: '*'}, {name: ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE, value: ''}",
        ),
    ]);
    policy(&c, "team/app");
}
