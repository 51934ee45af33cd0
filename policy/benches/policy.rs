//! Policy engine micro-benchmarks on a cluster of 10,000 services (100 namespaces, two
//! ports each, one namespace-wide Sidecar per namespace): Sidecar selection, host import,
//! the full per-pod evaluation, compile to map entries, and the diff of two generations.
//! Run by `cargo xtask bench` (scenario 6), or `cargo bench -p sidecap-policy --bench policy`.

use std::{fmt::Write as _, hint::black_box, path::Path};

use criterion::{Criterion, criterion_group, criterion_main};
use sidecap_policy::{Cluster, EngineOptions, PodRef, compile, diff, evaluate, import, registry, select};

const SERVICES: usize = 10_000;
const NAMESPACES: usize = 100;

fn cluster() -> Cluster {
    let mut y = String::new();
    for s in 0..SERVICES {
        let i = 128 * 256 + s;
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s:05}\n  namespace: ns-{:03}\nspec:\n  clusterIP: 10.251.{}.{}\n  ports:\n  - name: http\n    port: 80\n  - name: tcp-grpc\n    port: {}\n",
            s % NAMESPACES,
            i / 256,
            i % 256,
            7000 + s % 100
        );
    }
    for n in 0..NAMESPACES {
        let _ = write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata:\n  name: default\n  namespace: ns-{n:03}\nspec:\n  egress:\n  - hosts:\n    - \"./*\"\n    - \"istio-system/*\"\n"
        );
    }
    // One pod under a namespace Sidecar, one in a namespace without (imports everything).
    for (name, ns) in [("scoped", "ns-000"), ("everything", "open")] {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {name}\n  annotations:\n    sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'\nspec:\n  containers:\n  - name: app\n  - name: istio-proxy\nstatus:\n  podIP: 10.251.1.2\n"
        );
    }
    let (objs, errs) = sidecap_policy::cluster::load_text(Path::new("bench.yaml"), &y);
    assert!(errs.is_empty(), "{errs:?}");
    Cluster::from_objects(objs).expect("cluster")
}

fn benches(c: &mut Criterion) {
    let cluster = cluster();
    let opts = EngineOptions::default();
    let scoped = PodRef::new("ns-000", "scoped");
    let everything = PodRef::new("open", "everything");
    let labels = cluster.pod(&scoped).expect("pod").metadata.labels.clone();

    c.bench_function("select/100-sidecars", |b| b.iter(|| black_box(select::select(&cluster, "ns-000", &labels))));
    c.bench_function("registry/build-10k-services", |b| b.iter(|| black_box(registry::build(&cluster))));

    let reg = registry::build(&cluster);
    let visible: Vec<&registry::ServiceView> = reg.iter().collect();
    let all = vec!["*/*".to_string()];
    let scoped_hosts = vec!["./*".to_string(), "istio-system/*".to_string()];
    c.bench_function("import/10k-services-all", |b| b.iter(|| black_box(import::import(&visible, &all, None, "open"))));
    c.bench_function("import/10k-services-namespace", |b| b.iter(|| black_box(import::import(&visible, &scoped_hosts, None, "ns-000"))));

    c.bench_function("evaluate/pod-scoped-of-10k", |b| b.iter(|| black_box(evaluate(&cluster, &scoped, &opts).expect("evaluate"))));
    c.bench_function("evaluate/pod-importing-10k", |b| b.iter(|| black_box(evaluate(&cluster, &everything, &opts).expect("evaluate"))));

    let p_all = evaluate(&cluster, &everything, &opts).expect("evaluate");
    let p_scoped = evaluate(&cluster, &scoped, &opts).expect("evaluate");
    c.bench_function("compile/10k-services", |b| b.iter(|| black_box(compile(&p_all, 1, 1))));
    c.bench_function("compile/100-services", |b| b.iter(|| black_box(compile(&p_scoped, 1, 1))));

    let g1 = compile(&p_all, 1, 1);
    let g2 = compile(&p_scoped, 2, 2);
    c.bench_function("diff/10k-vs-100-services", |b| b.iter(|| black_box(diff(&g1, &g2))));
}

criterion_group!(policy, benches);
criterion_main!(policy);
