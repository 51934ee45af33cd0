//! `sidecap-cni`: a chained CNI plugin (after the primary network plugin). On ADD it tells
//! the sidecap agent about the new pod's netns and returns only once the pod's capture is in
//! place; if the agent cannot be reached the pod fails to start with a clear error, as with
//! istio-cni. It never changes the network result: prevResult is passed on unchanged.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use sidecap::cni::protocol::{self, Command, Reply, Request};

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    // Every command gets the network configuration on stdin (VERSION too).
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let conf: serde_json::Value = serde_json::from_str(&stdin).unwrap_or(serde_json::Value::Null);
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    match run(&command, &conf) {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err((code, msg, details)) => {
            // The CNI error format: the runtime shows `msg` in the pod's events.
            println!("{}", serde_json::json!({"cniVersion": version, "code": code, "msg": msg, "details": details}));
            ExitCode::FAILURE
        }
    }
}

type Failure = (u32, String, String);

fn env(name: &'static str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| (4, format!("{name} is not set"), String::new()))
}

fn run(command: &str, conf: &serde_json::Value) -> Result<Option<String>, Failure> {
    match command {
        "VERSION" => Ok(Some(serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}).to_string())),
        "CHECK" | "STATUS" | "GC" => Ok(None),
        "ADD" | "DEL" => {
            let socket = PathBuf::from(conf["socketPath"].as_str().unwrap_or(protocol::DEFAULT_SOCKET));
            let args = env("CNI_ARGS")?;
            let (namespace, name, uid) = protocol::pod_from_cni_args(&args).map_err(|e| (4, e.to_string(), args.clone()))?;
            let prev = conf.get("prevResult").cloned().unwrap_or_else(|| serde_json::json!({}));
            let req = Request {
                command: if command == "ADD" { Command::Add } else { Command::Del },
                namespace,
                name,
                uid,
                container_id: env("CNI_CONTAINERID")?,
                netns: PathBuf::from(std::env::var("CNI_NETNS").unwrap_or_default()),
                ips: protocol::ips_from_prev_result(&prev),
            };
            let timeout = Duration::from_millis(conf["timeoutMs"].as_u64().unwrap_or(55_000));
            let reply = call(&socket, &req, timeout);
            if command == "DEL" {
                // DEL must succeed even when the agent is gone: the pod is being torn down.
                return Ok(None);
            }
            let reply = reply.map_err(|e| {
                (11, format!("sidecap agent unreachable at {}: {e}; pod {} cannot be captured", socket.display(), req.pod()), String::new())
            })?;
            if !reply.ok {
                return Err((11, format!("sidecap: {}", reply.message), req.pod()));
            }
            // Chained plugins pass the previous result on unchanged.
            let mut out = prev;
            if out.get("cniVersion").is_none() {
                out["cniVersion"] = conf["cniVersion"].clone();
            }
            Ok(Some(out.to_string()))
        }
        other => Err((4, format!("unknown CNI_COMMAND {other:?}"), String::new())),
    }
}

fn call(socket: &std::path::Path, req: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "{}", serde_json::to_string(req).map_err(std::io::Error::other)?)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
