//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use sidecap_policy::{Action, Cluster, EngineOptions, PodPolicy, PodRef, evaluate};

pub fn testdata(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(p)
}

/// Istio's own Sidecar examples and data sets, kept in the repository's `testdata/istio/`.
pub fn istio(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/istio").join(p)
}

pub fn load(paths: &[PathBuf]) -> Cluster {
    Cluster::load_paths(paths).unwrap_or_else(|e| panic!("loading {paths:?}: {e}"))
}

/// Loads files plus inline YAML documents (written to a temp file).
pub fn load_with(paths: &[PathBuf], extra_yaml: &str) -> Cluster {
    let dir = std::env::temp_dir().join(format!("sidecap-policy-test-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
    let f = dir.join("extra.yaml");
    std::fs::write(&f, extra_yaml).unwrap_or_else(|e| panic!("write {f:?}: {e}"));
    let mut all = paths.to_vec();
    all.push(f);
    let c = load(&all);
    let _ = std::fs::remove_dir_all(&dir);
    c
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn policy(c: &Cluster, pod: &str) -> PodPolicy {
    policy_with(c, pod, &EngineOptions::default())
}

pub fn policy_with(c: &Cluster, pod: &str, opts: &EngineOptions) -> PodPolicy {
    let r: PodRef = pod.parse().unwrap_or_else(|e| panic!("{pod}: {e}"));
    evaluate(c, &r, opts).unwrap_or_else(|e| panic!("evaluate {pod}: {e}"))
}

pub fn names(p: &PodPolicy) -> Vec<String> {
    let mut v: Vec<String> = p.listeners.iter().map(|l| l.name.clone()).collect();
    v.sort();
    v
}

pub fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Asserts outbound decisions: (destination, action, substring of the reason).
pub fn check_out(p: &PodPolicy, cases: &[(&str, Action, &str)]) {
    for (dst, want, why) in cases {
        let d = p.decide_outbound(addr(dst));
        assert_eq!(d.action, *want, "{} -> {dst}: {}", p.pod, d.reason);
        assert!(d.reason.contains(why), "{} -> {dst}: reason {:?} lacks {why:?}", p.pod, d.reason);
    }
}

pub fn check_in(p: &PodPolicy, cases: &[(u16, Action)]) {
    for (port, want) in cases {
        let d = p.decide_inbound(*port);
        assert_eq!(d.action, *want, "{} inbound {port}: {}", p.pod, d.reason);
    }
}

/// `sidecap validate`'s verdicts, from the engine's typed findings, one `NS/NAME: ok` /
/// `NS/NAME: error: MSG` line each (the binary's own rendering is tested in agent/tests/cli.rs).
pub mod cli {
    use std::io::Write;
    use std::path::PathBuf;

    use sidecap_policy::validate::{Finding, validate_paths};

    /// Writes the verdict lines; returns 1 when any finding is an error.
    pub fn validate(paths: &[PathBuf], out: &mut Vec<u8>) -> i32 {
        let findings = validate_paths(paths);
        for f in &findings {
            match f {
                Finding::Load(e) => writeln!(out, "error: {e}"),
                Finding::Sidecar { key, validation: v } => {
                    let mut lines: Vec<String> = v.warnings.iter().map(|w| format!("{key}: warning: {w}")).collect();
                    lines.extend(v.errors.iter().map(|e| format!("{key}: error: {e}")));
                    if lines.is_empty() {
                        lines.push(format!("{key}: ok"));
                    }
                    lines.iter().try_for_each(|l| writeln!(out, "{l}"))
                }
            }
            .unwrap_or_else(|e| panic!("{e}"));
        }
        i32::from(findings.iter().any(Finding::is_error))
    }
}
