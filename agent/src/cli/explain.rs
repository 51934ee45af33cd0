//! `sidecap explain --config DIR --pod NS/NAME [--to ADDR:PORT]... [--inbound PORT]...
//! [--output json|text]`: a pod's governing Sidecar, listeners, imported services and the
//! decision for each destination asked about.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde_json::{Value, json};

use sidecap_policy::cluster::{Cluster, LoadError, PodRef};
use sidecap_policy::engine::{AllowAnyMode, EngineOptions, PodPolicy, PolicyError, evaluate};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Json,
    Text,
}

impl FromStr for OutputFormat {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<OutputFormat, ExplainError> {
        match s {
            "json" => Ok(OutputFormat::Json),
            "text" => Ok(OutputFormat::Text),
            other => Err(ExplainError::Output(other.to_string())),
        }
    }
}

/// Mirrors the command's flags.
#[derive(Clone, Debug)]
pub struct ExplainArgs {
    /// `--config` (a directory or files; any mix of kinds, including the mesh ConfigMap).
    pub config: Vec<PathBuf>,
    pub pod: PodRef,
    pub to: Vec<SocketAddr>,
    pub inbound: Vec<u16>,
    pub output: OutputFormat,
    /// ALLOW_ANY with no listener: passthrough (default) or capture (Istio-exact).
    pub allow_any: AllowAnyMode,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("--output must be json or text, got {0:?}")]
    Output(String),
    #[error("writing output: {0}")]
    Write(#[from] std::io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn explain(args: &ExplainArgs, out: &mut dyn Write) -> Result<(), ExplainError> {
    let cluster = Cluster::load_paths(&args.config)?;
    let policy = evaluate(&cluster, &args.pod, &EngineOptions { allow_any: args.allow_any, ..Default::default() })?;
    let mut decisions = Vec::new();
    for to in &args.to {
        let d = policy.decide_outbound(*to);
        decisions.push(json!({"to": to.to_string(), "action": d.action.as_str(), "reason": d.reason}));
    }
    for port in &args.inbound {
        let d = policy.decide_inbound(*port);
        decisions.push(json!({"inbound": port, "action": d.action.as_str(), "reason": d.reason}));
    }
    let doc = json!({
        "pod": policy.pod.to_string(),
        "sidecar": policy.sidecar,
        "outboundTrafficPolicy": policy.outbound_traffic_policy.as_str(),
        "allowAny": policy.allow_any,
        // From the pod's annotation; without one, `sidecap agent --proxy-identity` decides
        // (explain --config assumes its default, uid).
        "proxyIdentity": policy.proxy_identity,
        "meshed": policy.meshed,
        "netns": policy.netns,
        "listeners": policy.listeners.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
        "services": policy.services.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "decisions": decisions,
    });
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &doc)?;
            writeln!(out)?;
        }
        OutputFormat::Text => write_text(&policy, &doc, out)?,
    }
    Ok(())
}

fn write_text(policy: &PodPolicy, doc: &Value, out: &mut dyn Write) -> Result<(), ExplainError> {
    writeln!(out, "pod:                    {}", policy.pod)?;
    writeln!(out, "sidecar:                {}", policy.sidecar.as_deref().unwrap_or("(implicit default */*)"))?;
    writeln!(out, "outboundTrafficPolicy:  {}", policy.outbound_traffic_policy.as_str())?;
    writeln!(out, "meshed:                 {}", policy.meshed)?;
    writeln!(out, "listeners:")?;
    for l in &policy.listeners {
        writeln!(out, "  {}", l.seed_line())?;
    }
    writeln!(out, "services:")?;
    for s in &policy.services {
        writeln!(out, "  {s}")?;
    }
    writeln!(out, "decisions:")?;
    let rows: Vec<(String, String, String)> = doc["decisions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    let what = match (&d["to"], &d["inbound"]) {
                        (Value::String(t), _) => format!("to {t}"),
                        (_, Value::Number(p)) => format!("inbound {p}"),
                        _ => String::new(),
                    };
                    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                    (what, s(&d["action"]), s(&d["reason"]))
                })
                .collect()
        })
        .unwrap_or_default();
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max("DESTINATION".len());
    writeln!(out, "  {:<w$}  {:<11}  REASON", "DESTINATION", "ACTION")?;
    for (what, action, reason) in rows {
        writeln!(out, "  {what:<w$}  {action:<11}  {reason}")?;
    }
    Ok(())
}
