//! One test per ValidateSidecar rule (istio pkg/config/validation/validation.go
//! `ValidateSidecar`, `validateSidecarEgressPortBindAndCaptureMode`,
//! `validateSidecarIngressPortAndBind`, `validateSidecarOutboundTrafficPolicy`,
//! `ValidateAlphaWorkloadSelector`; pkg/config/validation/agent/validation.go
//! `ValidateNamespaceSlashWildcardHostname`): the spec as YAML, Istio's messages.

use sidecap_policy::model::SidecarSpec;
use sidecap_policy::validate::{Validation, validate_spec};

fn v(spec_yaml: &str) -> Validation {
    let spec: SidecarSpec = serde_norway::from_str(spec_yaml).unwrap_or_else(|e| panic!("spec {spec_yaml:?}: {e}"));
    validate_spec("ns", &spec)
}

fn errors(spec_yaml: &str) -> Vec<String> {
    v(spec_yaml).errors
}

fn warnings(spec_yaml: &str) -> Vec<String> {
    v(spec_yaml).warnings
}

#[test]
fn empty_spec() {
    assert_eq!(errors("{}"), vec!["sidecar: empty configuration provided"]);
    assert!(errors("outboundTrafficPolicy: {mode: REGISTRY_ONLY}").is_empty());
    assert!(errors("inboundConnectionPool: {tcp: {maxConnections: 1}}").is_empty());
}

#[test]
fn selector_keys_values_and_wildcards() {
    assert_eq!(
        errors("workloadSelector: {labels: {'': x}}\negress: [{hosts: ['*/*']}]"),
        vec!["empty key is not supported in selector: \"=x\""]
    );
    assert_eq!(
        errors("workloadSelector: {labels: {app: 'a*'}}\negress: [{hosts: ['*/*']}]"),
        vec!["wildcard is not supported in selector: \"app=a*\""]
    );
    // Selector errors end validation: the empty spec is not reported as well.
    assert_eq!(errors("workloadSelector: {labels: {'*': x}}").len(), 1);
}

#[test]
fn empty_selector_warns() {
    assert_eq!(
        warnings("workloadSelector: {}\negress: [{hosts: ['./*']}]"),
        vec!["sidecar: workload selector specified without labels, will be applied to all services in namespace"]
    );
}

#[test]
fn port_range_protocol_and_name() {
    assert_eq!(
        errors("ingress: [{port: {number: 70000, protocol: HTTP, name: a}}]"),
        vec!["port number 70000 must be in the range 1..65535"]
    );
    assert_eq!(errors("ingress: [{port: {number: 80, protocol: FOO}}]"), vec!["unsupported protocol: FOO"]);
    assert_eq!(errors("ingress: [{port: {number: 80, name: Bad_Name}}]"), vec!["invalid port name: Bad_Name"]);
    assert_eq!(
        errors("egress: [{port: {number: 0, protocol: HTTP}, hosts: ['*/*']}]"),
        vec!["sidecar: ports with 0 value must have a unix domain socket bind address"]
    );
    assert_eq!(errors("ingress: [{port: null}]"), vec!["sidecar: port is required for ingress listeners"]);
    assert_eq!(errors("ingress: [null]"), vec!["sidecar: ingress may not be null"]);
    assert_eq!(errors("egress: [null]"), vec!["egress listener may not be null"]);
}

#[test]
fn target_port_rejected() {
    assert_eq!(errors("ingress: [{port: {number: 80, targetPort: 8080}}]"), vec!["targetPort has no impact on Sidecars"]);
    assert_eq!(errors("egress: [{port: {number: 80, targetPort: 8080}, hosts: ['*/*']}]"), vec!["targetPort has no impact on Sidecars"]);
}

#[test]
fn bind_must_be_an_ip_uds_only_for_egress() {
    assert_eq!(errors("ingress: [{port: {number: 80}, bind: foo}]"), vec!["foo is not a valid IP"]);
    assert_eq!(errors("ingress: [{port: {number: 80}, bind: 'unix:///a.sock'}]"), vec!["unix:///a.sock is not a valid IP"]);
    assert_eq!(errors("egress: [{port: {number: 80}, bind: 1.2.3, hosts: ['*/*']}]"), vec!["1.2.3 is not a valid IP"]);
    assert!(errors("egress: [{port: {number: 0}, bind: 'unix:///a.sock', hosts: ['*/*']}]").is_empty());
    assert_eq!(
        errors("egress: [{port: {number: 0}, bind: 'unix://a.sock', hosts: ['*/*']}]"),
        vec!["a.sock is not an absolute path to a file"]
    );
}

#[test]
fn unique_ports_on_ip_bound_listeners() {
    assert_eq!(
        errors("ingress: [{port: {number: 80}}, {port: {number: 80}}]"),
        vec!["sidecar: ports on IP bound listeners must be unique"]
    );
    assert_eq!(
        errors("egress: [{port: {number: 80}, hosts: ['*/*']}, {port: {number: 80}, hosts: ['*/*']}]"),
        vec!["sidecar: ports on IP bound listeners must be unique"]
    );
    assert_eq!(
        errors("egress: [{port: {number: 0}, bind: 'unix:///a', hosts: ['*/*']}, {port: {number: 0}, bind: 'unix:///a', hosts: ['*/*']}]"),
        vec!["sidecar: unix domain socket values for listeners must be unique"]
    );
}

#[test]
fn portless_egress_listener_must_be_last_and_unique() {
    assert_eq!(
        errors("egress: [{hosts: ['*/*']}, {port: {number: 80}, hosts: ['*/*']}]"),
        vec!["sidecar: the egress listener with empty port should be the last listener in the list"]
    );
    assert_eq!(errors("egress: [{port: {number: 80}, hosts: ['a/*']}, {hosts: ['b/*']}]"), Vec::<String>::new());
}

#[test]
fn uds_capture_mode_must_be_default_or_none() {
    assert_eq!(
        errors("egress: [{port: {number: 0}, bind: 'unix:///a', captureMode: IPTABLES, hosts: ['*/*']}]"),
        vec!["sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners"]
    );
    assert!(errors("egress: [{port: {number: 0}, bind: 'unix:///a', captureMode: NONE, hosts: ['*/*']}]").is_empty());
}

#[test]
fn default_endpoint_forms() {
    assert!(errors("ingress: [{port: {number: 80}, defaultEndpoint: '127.0.0.1:8080'}]").is_empty());
    assert!(errors("ingress: [{port: {number: 80}, defaultEndpoint: '[::1]:8080'}]").is_empty());
    assert!(errors("ingress: [{port: {number: 80}, defaultEndpoint: ':8080'}]").is_empty());
    assert!(errors("ingress: [{port: {number: 80}, defaultEndpoint: 'unix:///var/run/a.sock'}]").is_empty());
    assert_eq!(
        errors("ingress: [{port: {number: 80}, defaultEndpoint: '10.0.0.1:8080'}]"),
        vec!["sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset"]
    );
    assert_eq!(
        errors("ingress: [{port: {number: 80}, defaultEndpoint: '127.0.0.1:99999'}]"),
        vec!["port number 99999 must be in the range 1..65535"]
    );
}

#[test]
fn hosts_forms() {
    assert_eq!(errors("egress: [{port: {number: 80}}]"), vec!["sidecar: egress listener must contain at least one host"]);
    assert_eq!(errors("egress: [{hosts: [foo.com]}]"), vec!["host must be of form namespace/dnsName"]);
    assert_eq!(errors("egress: [{hosts: [ns/foo]}]"), vec!["short names (non FQDN) are not allowed"]);
    assert_eq!(errors("egress: [{hosts: ['ns/*.foo.com', '~ns2/*', '~/a.b.com', './*', '~./x.y']}]"), Vec::<String>::new());
    assert_eq!(
        errors("egress: [{hosts: ['ns/a*.foo.com']}]").last().map(String::as_str),
        Some("partial wildcard \"a*.foo.com\" not allowed")
    );
    assert_eq!(errors("egress: [{hosts: ['Bad_NS/a.com']}]"), vec!["invalid namespace value \"Bad_NS\" in sidecar"]);
    assert_eq!(errors("egress: [{hosts: ['~Bad_NS/a.com']}]"), vec!["invalid namespace value \"~Bad_NS\" in sidecar"]);
}

#[test]
fn duplicate_and_wildcard_host_warnings() {
    assert_eq!(warnings("egress: [{hosts: ['ns/a.com', 'ns/a.com']}]"), vec!["duplicated egress host: ns/a.com"]);
    assert_eq!(warnings("egress: [{hosts: ['ns/*', 'ns/a.com']}]"), vec!["duplicated egress host: ns/a.com"]);
    assert_eq!(warnings("egress: [{hosts: ['./a.com', 'ns/*']}]"), vec!["duplicated egress host: ns/*"], "`.` is the Sidecar's namespace");
    assert_eq!(warnings("egress: [{hosts: ['*/*', 'ns/a.com']}]"), vec!["`*/*` host select all resources, no other hosts can be added"]);
    assert!(warnings("egress: [{hosts: ['*/*', '~ns/*']}]").is_empty(), "exclusions are not imports");
}

#[test]
fn ingress_tls_restrictions() {
    let base = "ingress: [{port: {number: 443, protocol: HTTPS}, tls: ";
    assert!(errors(&format!("{base}{{mode: SIMPLE, serverCertificate: /c, privateKey: /k}}}}]")).is_empty());
    assert_eq!(
        errors(&format!("{base}{{mode: ISTIO_MUTUAL}}}}]")),
        vec!["configuration is invalid: cannot set mode to ISTIO_MUTUAL in sidecar ingress tls"]
    );
    assert_eq!(
        errors(&format!("{base}{{mode: SIMPLE, credentialName: x}}}}]")),
        vec!["sidecar: credentialName is not currently supported"]
    );
    assert_eq!(
        errors(&format!("{base}{{mode: SIMPLE, serverCertificate: /c, privateKey: /k, httpsRedirect: true}}}}]")),
        vec!["sidecar: httpsRedirect is not supported"]
    );
    assert_eq!(
        errors(&format!("{base}{{mode: SIMPLE, serverCertificate: /c, privateKey: /k, subjectAltNames: [a]}}}}]")),
        vec!["sidecar: subjectAltNames is not supported in ingress tls"]
    );
    assert_eq!(
        errors("ingress: [{port: {number: 80, protocol: HTTP}, tls: {mode: SIMPLE, serverCertificate: /c, privateKey: /k}}]"),
        vec!["server cannot have TLS settings for non HTTPS/TLS ports"]
    );
    assert_eq!(
        errors(&format!("{base}{{mode: MUTUAL, serverCertificate: /c}}}}]")),
        vec!["MUTUAL TLS requires a client CA bundle", "MUTUAL TLS requires a private key"]
    );
}

#[test]
fn egress_proxy_only_with_allow_any() {
    assert_eq!(
        errors("outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: proxy.example.com, port: {number: 80}}}"),
        vec!["sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode"]
    );
    assert!(errors("outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: proxy.example.com, port: {number: 80}}}").is_empty());
    // No mode is the zero value REGISTRY_ONLY (`validateSidecarOutboundTrafficPolicy`).
    assert_eq!(
        errors("outboundTrafficPolicy: {egressProxy: {host: proxy.example.com, port: {number: 80}}}"),
        vec!["sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode"]
    );
    assert_eq!(
        errors("outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: proxy.example.com}}"),
        vec!["sidecar: egress_proxy port must be non-nil"]
    );
    assert_eq!(
        errors("outboundTrafficPolicy: {mode: ALLOW_ANY_DYNAMIC_DNS}"),
        vec!["sidecar: ALLOW_ANY_DYNAMIC_DNS mode is only supported in MeshConfig, not in Sidecar resource"]
    );
}

#[test]
fn connection_pools() {
    assert_eq!(errors("inboundConnectionPool: {}"), vec!["connection pool must have at least one field"]);
    assert_eq!(errors("inboundConnectionPool: {tcp: {maxConnections: -1}}"), vec!["max connections must be non-negative"]);
    assert_eq!(
        warnings("ingress: [{port: {number: 80, protocol: TCP, name: t}, connectionPool: {http: {maxRetries: 1}}}]"),
        vec![
            "sidecar: HTTP connection pool settings are configured for port 80 (\"t\") but its protocol is not HTTP (TCP); only TCP settings will apply"
        ]
    );
}
