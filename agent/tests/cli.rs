//! `sidecap validate` and `sidecap explain` output contracts.

use std::net::SocketAddr;
use std::path::PathBuf;

use sidecap::cli::{self, ExplainArgs, OutputFormat};
use sidecap_policy::{AllowAnyMode, PodRef};

/// The policy crate's test clusters.
fn testdata(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy/testdata").join(p)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn explain(sidecar: Option<&str>, to: &[&str], inbound: &[u16], output: OutputFormat) -> String {
    let mut config = vec![testdata("seed-cluster")];
    config.extend(sidecar.map(|s| testdata(&format!("seed-sidecars/{s}"))));
    let args = ExplainArgs {
        config,
        pod: PodRef::new("default", "client"),
        to: to.iter().map(|t| addr(t)).collect(),
        inbound: inbound.to_vec(),
        output,
        allow_any: AllowAnyMode::Passthrough,
    };
    let mut out = Vec::new();
    cli::explain(&args, &mut out).unwrap_or_else(|e| panic!("explain: {e}"));
    String::from_utf8(out).unwrap_or_else(|e| panic!("utf8: {e}"))
}

#[test]
fn explain_json_has_the_documented_fields() {
    let text = explain(Some("05-registry-only-8080.yaml"), &["10.99.26.101:8080", "10.96.0.10:53"], &[8080], OutputFormat::Json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("json: {e}\n{text}"));
    assert_eq!(v["pod"], "default/client");
    assert_eq!(v["sidecar"], "default/client");
    assert_eq!(v["outboundTrafficPolicy"], "REGISTRY_ONLY");
    assert_eq!(v["listeners"], serde_json::json!(["0.0.0.0_8080"]));
    assert_eq!(v["services"], serde_json::json!(["default/demoapp.default.svc.cluster.local:8080"]));
    let d = &v["decisions"];
    assert_eq!(d[0]["to"], "10.99.26.101:8080");
    assert_eq!(d[0]["action"], "capture");
    assert_eq!(d[1]["action"], "drop");
    assert_eq!(d[1]["reason"], "REGISTRY_ONLY: no listener");
    assert_eq!(d[2]["inbound"], 8080);
    assert_eq!(d[2]["action"], "capture");
}

#[test]
fn explain_implicit_default_has_null_sidecar() {
    let text = explain(None, &["10.96.0.10:53"], &[], OutputFormat::Json);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("json: {e}\n{text}"));
    assert!(v["sidecar"].is_null(), "{text}");
    assert_eq!(v["decisions"][0]["reason"], "listener 10.96.0.10_53 from kube-system/kube-dns");
}

#[test]
fn explain_text_prints_seed_listener_lines_and_a_table() {
    let text = explain(Some("05-registry-only-8080.yaml"), &["10.96.0.10:53"], &[15021], OutputFormat::Text);
    assert!(text.contains("\n  0.0.0.0_8080::0.0.0.0:8080\n"), "{text}");
    assert!(text.contains("DESTINATION"), "{text}");
    assert!(text.lines().any(|l| l.contains("to 10.96.0.10:53") && l.contains("drop") && l.contains("REGISTRY_ONLY")), "{text}");
    assert!(text.lines().any(|l| l.contains("inbound 15021") && l.contains("passthrough")), "{text}");
}

#[test]
fn explain_unknown_pod_is_an_error() {
    let args = ExplainArgs {
        config: vec![testdata("seed-cluster")],
        pod: PodRef::new("default", "nobody"),
        to: Vec::new(),
        inbound: Vec::new(),
        output: OutputFormat::Json,
        allow_any: AllowAnyMode::Passthrough,
    };
    let err = cli::explain(&args, &mut Vec::new()).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(err, "pod default/nobody not found");
}

#[test]
fn validate_seed_sidecars() {
    let mut out = Vec::new();
    let code = cli::validate(&[testdata("seed-sidecars")], &mut out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        text,
        "default/default: ok\nprod-us1/partial-ip-tables: ok\ndefault/client: ok\n\
         default/client: error: sidecar: egress listener must contain at least one host\n\
         default/client: ok\ndefault/client: ok\n"
    );
}

#[test]
fn validate_reports_malformed_input_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("sidecap-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let f = dir.join("bad.yaml");
    std::fs::write(&f, "kind: Sidecar\nmetadata: {name: a, namespace: b}\nspec:\n  egress:\n  - hosts: [\"*/*\"]\n---\nkind: Sidecar\nmetadata: {name: c}\nspec: {egress: [{port: {number: x}}]}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    let code = cli::validate(&[f.clone(), dir.join("missing.yaml")], &mut out);
    let text = String::from_utf8_lossy(&out);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 1);
    assert!(text.contains("error: ") && text.contains("cannot read"), "{text}");
    let mut out = Vec::new();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&f, "kind: Sidecar\nmetadata: {name: a, namespace: b}\nspec:\n  egress:\n  - hosts: [\"*/*\"]\n---\nkind: Sidecar\nmetadata: {name: c}\nspec: {egress: [{port: {number: x}}]}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let code = cli::validate(std::slice::from_ref(&f), &mut out);
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 1, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("bad.yaml:6: document 2: Sidecar c: field spec.egress[0].port.number:"),
        "{text}"
    );
    assert_eq!(lines[1], "b/a: ok");
}
