//! Pods that share a scope key share one evaluation and one rule set (the agent evaluates
//! each distinct scope once per pass): equal keys must mean equal compiled rules, and equal
//! pod configs up to the pod's own addresses. Checked here over every pair of a cluster
//! built to tempt the key into being too coarse: namespaces with and without Sidecars,
//! a workload-selected Sidecar, capture annotations, a pod that is a headless endpoint,
//! IPv6 and dual-stack pods.

mod common;

use common::*;
use sidecap_policy::{EngineOptions, PodRef, Scopes, compile, evaluate_in, registry};

fn pod(ns: &str, name: &str, labels: &str, annotations: &str, ips: &[&str]) -> String {
    let ip_list: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\n  annotations: {{sidecar.istio.io/status: x{annotations}}}\nspec: {{containers: [{{name: istio-proxy}}]}}\nstatus: {{podIP: '{}', podIPs: [{}]}}\n",
        ips[0],
        ip_list.join(", ")
    )
}

const REST: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: tcp-db, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: other}
spec: {clusterIP: 10.96.0.11, ports: [{name: tcp-redis, port: 6379}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{name: tcp-pg, port: 5433}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.3]}, {addresses: [10.244.0.4]}]
ports: [{name: tcp-pg, port: 5433}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: narrow, namespace: locked}
spec: {egress: [{hosts: ['./*']}], outboundTrafficPolicy: {mode: REGISTRY_ONLY}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: for-api, namespace: shop}
spec: {workloadSelector: {labels: {app: api}}, egress: [{hosts: ['other/*']}]}
";

#[test]
fn equal_scope_keys_compile_to_equal_rule_sets() {
    let pods = [
        pod("shop", "a", "app: web", "", &["10.244.0.1"]),
        pod("shop", "b", "app: web", "", &["10.244.0.2"]),
        pod("shop", "c", "app: db", "", &["10.244.0.3"]),  // a headless endpoint itself
        pod("shop", "d", "app: db", "", &["10.244.0.4"]),  // another one
        pod("shop", "e", "app: api", "", &["10.244.0.5"]), // selected by for-api
        pod("shop", "f", "app: web", ", traffic.sidecar.istio.io/excludeOutboundPorts: '5432'", &["10.244.0.6"]),
        pod("shop", "g", "app: web", "", &["fd00::7"]),
        pod("shop", "h", "app: web", "", &["10.244.0.8", "fd00::8"]),
        pod("other", "i", "app: web", "", &["10.244.1.1"]),
        pod("other", "j", "app: web", "", &["10.244.1.2"]),
        pod("locked", "k", "app: web", "", &["10.244.2.1"]),
        pod("locked", "l", "app: web", "", &["10.244.2.2"]),
    ]
    .concat();
    let c = load_with(&[], &format!("{pods}{REST}"));
    let reg = registry::build(&c);
    let scopes = Scopes::new(&reg);
    let opts = EngineOptions::default();
    let refs = c.meshed_pods();
    assert_eq!(refs.len(), 12);
    let mut compiled = Vec::new();
    for r in &refs {
        let key = scopes.key(&c, r).expect("every pod here has a key");
        let g = compile(&evaluate_in(&c, &reg, r, &opts).expect("evaluate"), 0, 0);
        compiled.push((r.clone(), key, g));
    }
    let mut shared = 0;
    for (i, (ra, ka, ga)) in compiled.iter().enumerate() {
        for (rb, kb, gb) in &compiled[i + 1..] {
            if ka != kb {
                continue;
            }
            shared += 1;
            assert_eq!(ga.rules_hash(), gb.rules_hash(), "{ra} and {rb} share a scope key but not their rules");
            assert_eq!((&ga.listeners, &ga.out_ports, &ga.in_ports), (&gb.listeners, &gb.out_ports, &gb.in_ports));
            let ips_of_b = sidecap_policy::knobs::pod_ips(c.pod(rb).expect("pod"));
            assert_eq!(sidecap_policy::with_ips(&ga.pod, &ips_of_b), gb.pod, "{ra} vs {rb}: only the addresses differ");
        }
    }
    let key = |p: &str| compiled.iter().find(|(r, _, _)| *r == p.parse::<PodRef>().unwrap()).map(|(_, k, _)| *k).unwrap();
    // What must share: same namespace, same Sidecar (none), same knobs, same family.
    assert_eq!(key("shop/a"), key("shop/b"));
    assert_eq!(key("other/i"), key("other/j"));
    assert_eq!(key("locked/k"), key("locked/l"));
    // What must not: a headless endpoint (no listener for itself), another Sidecar,
    // other knobs, another family.
    assert_ne!(key("shop/c"), key("shop/d"));
    assert_ne!(key("shop/a"), key("shop/c"));
    assert_ne!(key("shop/a"), key("shop/e"));
    assert_ne!(key("shop/a"), key("shop/f"));
    assert_ne!(key("shop/a"), key("shop/g"));
    assert_ne!(key("shop/a"), key("shop/h"));
    assert!(shared >= 3, "the cluster exercises sharing ({shared} pairs)");
}

#[test]
fn pods_of_different_namespaces_may_still_share_a_rule_set() {
    // Keys are per namespace (exportTo is seen from the pod's namespace), but when the
    // compiled rules come out equal the agent shares the kernel set by content anyway.
    let c = load_with(
        &[],
        &format!("{}{}{REST}", pod("shop", "a", "app: web", "", &["10.244.0.1"]), pod("other", "i", "app: web", "", &["10.244.1.1"])),
    );
    let reg = registry::build(&c);
    let opts = EngineOptions::default();
    let g = |p: &str| compile(&evaluate_in(&c, &reg, &p.parse().unwrap(), &opts).expect("evaluate"), 0, 0);
    assert_eq!(g("shop/a").rules_hash(), g("other/i").rules_hash());
}

#[test]
fn a_rule_set_captured_whole_sends_everything_not_excluded_to_the_proxy() {
    // The fallback for a pod whose rules do not fit the maps: istio-init's behaviour, every
    // outbound connection to the proxy except what the pod excludes. Nothing passes through
    // on sidecap's own shortcut, and REGISTRY_ONLY's drop is left to the proxy.
    use sidecap_policy::{Action, compile::simulate::outbound};
    let pods = [
        pod("shop", "f", "app: web", ", traffic.sidecar.istio.io/excludeOutboundPorts: '5432'", &["10.244.0.6"]),
        pod("locked", "k", "app: web", "", &["10.244.2.1"]),
    ]
    .concat();
    let c = load_with(&[], &format!("{pods}{REST}"));
    let reg = registry::build(&c);
    let opts = EngineOptions::default();
    let g = |p: &str| compile(&evaluate_in(&c, &reg, &p.parse().unwrap(), &opts).expect("evaluate"), 0, 0);
    let to = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    let tcp = sidecap_common::proto::TCP;

    let f = g("shop/f");
    let whole = f.capture_all();
    assert!(whole.listeners.is_empty() && whole.listener_names.is_empty());
    assert_eq!(whole.entry_counts().listeners, 0);
    assert!(f.differs_in_listeners_only(&whole), "only listener entries go");
    assert_eq!(outbound(&f, to("10.96.0.10:80"), tcp), Action::Capture);
    assert_eq!(outbound(&whole, to("10.96.0.10:80"), tcp), Action::Capture);
    assert_eq!(outbound(&f, to("192.0.2.1:443"), tcp), Action::Passthrough, "ALLOW_ANY: sidecap's direct passthrough");
    assert_eq!(outbound(&whole, to("192.0.2.1:443"), tcp), Action::Capture, "captured whole: the proxy passes it through");
    assert_eq!(outbound(&whole, to("10.96.0.10:5432"), tcp), Action::Passthrough, "an excluded port stays excluded");

    let k = g("locked/k");
    assert_eq!(outbound(&k, to("10.96.0.11:6379"), tcp), Action::Drop, "REGISTRY_ONLY: not in the Sidecar's scope");
    assert_eq!(outbound(&k.capture_all(), to("10.96.0.11:6379"), tcp), Action::Capture, "the proxy enforces REGISTRY_ONLY");
    assert_ne!(whole.rules_hash(), f.rules_hash(), "a set of its own, unless the pod had no listener entries anyway");
}

#[test]
fn default_mesh_pods_of_ordinary_namespaces_share_one_scope() {
    // No Sidecar: every pod imports `*/*`, so namespaces differ only where visibility or
    // hostname precedence differ (pilot/pkg/model/push_context.go `IsServiceVisible`,
    // sidecar.go `UnifiedSidecarScoping`). Those namespaces keep their own key.
    let extra = "
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: secret}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: shared, namespace: secret, annotations: {networking.istio.io/exportTo: 'secret,partner'}}
spec: {clusterIP: 10.96.0.21, ports: [{name: http, port: 81}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: dup1}
spec: {hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: dup2}
spec: {hosts: [api.example.com], ports: [{number: 8443, name: tls, protocol: TLS}], resolution: DNS}
";
    let pods = ["shop", "other", "plain1", "plain2", "secret", "partner", "dup1", "dup2", "locked"]
        .iter()
        .enumerate()
        .map(|(i, ns)| pod(ns, "p", "app: web", "", &[&format!("10.244.9.{}", i + 1)]))
        .collect::<String>();
    let c = load_with(&[], &format!("{pods}{REST}{extra}"));
    let reg = registry::build(&c);
    let scopes = Scopes::new(&reg);
    let opts = EngineOptions::default();
    let key = |ns: &str| scopes.key(&c, &format!("{ns}/p").parse().unwrap()).unwrap();
    let rules = |ns: &str| compile(&evaluate_in(&c, &reg, &format!("{ns}/p").parse().unwrap(), &opts).unwrap(), 0, 0).rules_hash();
    for ns in ["other", "plain1", "plain2"] {
        assert_eq!(key(ns), key("shop"), "{ns} is an ordinary namespace");
        assert_eq!(rules(ns), rules("shop"));
    }
    for ns in ["secret", "partner", "dup1", "dup2"] {
        assert_ne!(key(ns), key("shop"), "{ns} may see the registry differently");
    }
    // Their rules do differ, except dup1's: other namespaces get the oldest copy of a
    // duplicated host (creation, then namespace order), which happens to be dup1's own.
    for ns in ["secret", "partner", "dup2"] {
        assert_ne!(rules(ns), rules("shop"), "{ns}");
    }
    assert_eq!(rules("dup1"), rules("shop"));
    assert_ne!(key("locked"), key("shop"), "a Sidecar keeps the namespace in the key");
}

#[test]
fn an_added_service_changes_only_its_own_listener_entries() {
    // Listener ids come from listener names, not positions: in a shared default-mesh set, a
    // new Service is written in place as its own entries, not as every entry sorted after it.
    let pods = pod("shop", "a", "app: web", "", &["10.244.0.1"]);
    let added = "
---
apiVersion: v1
kind: Service
metadata: {name: aaa-first, namespace: other}
spec: {clusterIP: 10.96.0.1, ports: [{name: tcp-x, port: 7000}]}
";
    let g = |extra: &str| {
        let c = load_with(&[], &format!("{pods}{REST}{extra}"));
        let reg = registry::build(&c);
        compile(&evaluate_in(&c, &reg, &"shop/a".parse().unwrap(), &EngineOptions::default()).unwrap(), 0, 0)
    };
    let (before, after) = (g(""), g(added));
    let changed: Vec<_> = after.listeners.iter().filter(|(k, v)| before.listeners.get(k) != Some(v)).collect();
    let removed = before.listeners.keys().filter(|k| !after.listeners.contains_key(k)).count();
    assert_eq!((changed.len(), removed), (1, 0), "one new entry, nothing else rewritten: {changed:?}");
    assert_eq!(after.listener_names.get(&changed[0].1.listener_id).map(String::as_str), Some("10.96.0.1_7000"));
    assert!(before.differs_in_listeners_only(&after));
}
