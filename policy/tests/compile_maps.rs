//! The bytes the kernel sees: LPM keys (policy and port big-endian, IPv4-mapped addresses,
//! prefix lengths per sidecap-common), PodConfig fields, and minimal diffs.

mod common;

use common::*;
use sidecap_common::{LISTENER_FIXED_BITS, action, pod_flags, port_flags, proto};
use sidecap_policy::{compile, diff};

fn seed(sidecar: &str) -> sidecap_policy::PodPolicy {
    let c = load(&[testdata("seed-cluster"), testdata(&format!("seed-sidecars/{sidecar}"))]);
    policy(&c, "default/client")
}

#[test]
fn registry_only_generation() {
    let p = seed("05-registry-only-8080.yaml");
    let g = compile(&p, 0x0102_0304, 9);
    assert_eq!(g.pod.policy, 0x0102_0304);
    assert_eq!(g.pod.generation, 9);
    assert_eq!(g.pod.default_action, action::DROP);
    assert_eq!(
        g.pod.flags,
        pod_flags::INCLUDE_ALL_CIDRS | pod_flags::INBOUND_ALL_PORTS | pod_flags::INBOUND_CAPTURE | pod_flags::OUTBOUND_CAPTURE
    );
    assert_eq!((g.pod.proxy_uid, g.pod.proxy_gid, g.pod.outbound_port, g.pod.inbound_port), (1337, 1337, 15001, 15006));
    assert_eq!(g.pod.n_ips, 1);
    assert_eq!(g.pod.ips[0], sidecap_common::addr::v4_mapped([10, 244, 1, 10]));
    assert_eq!(g.listener_names.values().cloned().collect::<Vec<_>>(), vec!["0.0.0.0_8080".to_string()]);
    let ((len, key), rule) = g.listeners.iter().next().unwrap_or_else(|| panic!("one listener entry"));
    assert_eq!(*len, LISTENER_FIXED_BITS, "wildcard listener: only the fixed part");
    assert_eq!(key.policy, [1, 2, 3, 4], "policy big-endian");
    assert_eq!(key.port, [0x1f, 0x90], "8080 big-endian");
    assert_eq!(key.proto, proto::TCP);
    assert_eq!(key.addr, [0; 16]);
    assert_eq!(rule.action, action::CAPTURE);
    assert_eq!(g.listener_names.get(&rule.listener_id).map(String::as_str), Some("0.0.0.0_8080"), "the entry names its listener");
    // 15020 excluded outbound for TCP and UDP (istio-cni default).
    assert_eq!(g.out_ports.len(), 2);
    assert!(g.out_ports.iter().all(|(k, r)| k.port == 15020 && r.flags == port_flags::EXCLUDED));
    // Inbound: PASSTHROUGH for 15008 and the proxy's ports.
    let mut exempt: Vec<u16> = g.in_ports.keys().map(|k| k.port).collect();
    exempt.sort();
    assert_eq!(exempt, vec![15008, 15020, 15021, 15090]);
    assert!(g.in_ports.values().all(|r| r.action == action::PASSTHROUGH));
}

#[test]
fn vip_listener_key_is_a_v4_mapped_host_prefix() {
    let c = load(&[testdata("seed-cluster")]);
    let p = policy(&c, "default/client");
    let g = compile(&p, 1, 1);
    let id = g
        .listener_names
        .iter()
        .find(|(_, n)| *n == "10.96.0.10_53")
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("kube-dns listener"));
    let entry = g.listeners.iter().find(|(_, r)| r.listener_id == id).unwrap_or_else(|| panic!("entry for {id}"));
    let ((len, key), _) = entry;
    assert_eq!(*len, LISTENER_FIXED_BITS + 96 + 32);
    assert_eq!(key.port, 53u16.to_be_bytes());
    assert_eq!(key.addr, sidecap_common::addr::v4_mapped([10, 96, 0, 10]));
    assert_eq!(g.pod.default_action, action::PASSTHROUGH);
}

#[test]
fn same_policy_id_diff_touches_only_changes() {
    let before = compile(&seed("06-allow-any-8080.yaml"), 5, 1);
    let after = compile(&seed("05-registry-only-8080.yaml"), 5, 2);
    let d = diff(&before, &after);
    assert!(d.listeners.is_empty() && d.out_ports.is_empty() && d.in_ports.is_empty() && d.out_cidrs.is_empty(), "{d:?}");
    assert_eq!(d.pod.map(|p| p.default_action), Some(action::DROP));
    // A fresh id rewrites every rule and deletes the old set.
    let fresh = compile(&seed("05-registry-only-8080.yaml"), 6, 2);
    let d = diff(&before, &fresh);
    assert_eq!(d.listeners.upserts.len(), 1);
    assert_eq!(d.listeners.deletes.len(), 1);
    assert_eq!(d.apply(&before), fresh);
}
