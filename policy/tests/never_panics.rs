//! Arbitrary YAML-ish input through load → validate → evaluate → compile never panics
//! (the same entry point as the cargo-fuzz target in policy/fuzz/).

mod common;

use proptest::prelude::*;
use sidecap_policy::fuzz_entry;

fn seed_texts() -> Vec<String> {
    let mut out = Vec::new();
    for dir in [
        common::testdata("seed-cluster"),
        common::testdata("seed-sidecars"),
        common::istio("sidecar-examples"),
        common::testdata("examples-cluster"),
    ] {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path()) {
                out.push(t);
            }
        }
    }
    out
}

/// Tokens that make YAML structures the loader and engine have to cope with.
fn yamlish() -> impl Strategy<Value = String> {
    let tok = proptest::sample::select(vec![
        "kind: Sidecar\n",
        "kind: Pod\n",
        "kind: Service\n",
        "kind: ServiceEntry\n",
        "kind: ConfigMap\n",
        "kind: List\n",
        "metadata:\n  name: a\n  namespace: ns\n",
        "metadata: {name: istio, namespace: istio-system}\n",
        "spec:\n",
        "  egress:\n",
        "  - hosts: ['*/*', '~ns/a.b', './*']\n",
        "  - port: {number: 0, protocol: HTTP}\n",
        "    bind: unix:///x\n",
        "  ingress: [null, {port: {number: 70000}}]\n",
        "  workloadSelector: {}\n",
        "  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
        "  clusterIP: None\n",
        "  clusterIP: 10.0.0.1\n",
        "  ports: [{port: 80, name: http}, {port: 99999}]\n",
        "  addresses: ['10.0.0.0/8', '::/0', 'x']\n",
        "  annotations: {sidecar.istio.io/status: x, traffic.sidecar.istio.io/excludeOutboundIPRanges: '::/0'}\n",
        "  containers: [{name: istio-proxy}]\n",
        "status: {podIP: 10.0.0.9}\n",
        "data: {mesh: 'rootNamespace: [x]'}\n",
        "---\n",
        "- \n",
        "&a [*a]\n",
        "{",
        "]",
        ": :\n",
        "'unterminated\n",
        "\t",
        "~\n",
        "!!binary x\n",
        "number: -1\n",
    ]);
    proptest::collection::vec(tok, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn token_soup_never_panics(text in yamlish()) {
        let _ = fuzz_entry::run(&text);
    }

    #[test]
    fn mutated_real_files_never_panic(idx in any::<prop::sample::Index>(), edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12), cut in any::<prop::sample::Index>()) {
        let seeds = seed_texts();
        prop_assume!(!seeds.is_empty());
        let mut bytes = seeds[idx.index(seeds.len())].clone().into_bytes();
        for (pos, b) in edits {
            if !bytes.is_empty() {
                let i = pos.index(bytes.len());
                bytes[i] = b;
            }
        }
        let keep = cut.index(bytes.len() + 1);
        bytes.truncate(keep);
        let _ = fuzz_entry::run(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn arbitrary_strings_never_panic(text in ".{0,400}") {
        let _ = fuzz_entry::run(&text);
    }
}

#[test]
fn real_files_run_through_the_pipeline() {
    let all: String = seed_texts().join("\n---\n");
    assert!(fuzz_entry::run(&all) > 0, "pods were evaluated");
}
