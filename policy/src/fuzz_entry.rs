//! The whole pure pipeline on arbitrary text, for the fuzz target and the never-panics test:
//! YAML → objects → validation → evaluation → compile → diff.

use std::path::Path;

use crate::cluster::{Cluster, Object, load_text};
use crate::engine::{AllowAnyMode, EngineOptions, evaluate};

/// Runs every stage on `text`; returns how many pods were evaluated. Must never panic.
pub fn run(text: &str) -> usize {
    let (objs, _errs) = load_text(Path::new("fuzz.yaml"), text);
    for o in &objs {
        if let Object::Sidecar(s) = &o.obj {
            let _ = crate::validate::validate_sidecar(s);
        }
    }
    let Ok(cluster) = Cluster::from_objects(objs) else { return 0 };
    let mut n = 0;
    let pods: Vec<_> = cluster.pods.iter().map(|p| crate::PodRef::new(p.obj.metadata.ns(), &p.obj.metadata.name)).collect();
    for r in pods {
        for allow_any in [AllowAnyMode::Passthrough, AllowAnyMode::Capture] {
            let Ok(p) = evaluate(&cluster, &r, &EngineOptions { allow_any, ..Default::default() }) else { continue };
            let g1 = crate::compile(&p, 1, 1);
            let g2 = crate::compile(&p, 2, 2);
            let _ = crate::diff(&g1, &g2);
            for l in &p.listeners {
                let _ = p.decide_outbound(std::net::SocketAddr::new(
                    l.prefixes.first().map(|c| c.addr).unwrap_or(std::net::IpAddr::from([1, 2, 3, 4])),
                    l.port,
                ));
            }
            let _ = p.decide_inbound(80);
            n += 1;
        }
    }
    n
}
