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

/// CNI error codes (spec, "Error codes").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const BAD_ENV: u32 = 4;
    pub const BAD_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
}

fn env(name: &'static str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| (code::BAD_ENV, format!("{name} is not set"), String::new()))
}

fn socket_of(conf: &serde_json::Value) -> PathBuf {
    PathBuf::from(conf["socketPath"].as_str().unwrap_or(protocol::DEFAULT_SOCKET))
}

/// The request every command sends: container id, pod, netns and the primary's IPs.
fn request(command: Command, conf: &serde_json::Value) -> Result<Request, Failure> {
    let args = env("CNI_ARGS")?;
    let (namespace, name, uid) = protocol::pod_from_cni_args(&args, conf[protocol::POD_NAMESPACE_KEY].as_str())
        .map_err(|e| (code::BAD_ENV, e.to_string(), args.clone()))?;
    Ok(Request {
        command,
        namespace,
        name,
        uid,
        container_id: env("CNI_CONTAINERID")?,
        netns: PathBuf::from(std::env::var("CNI_NETNS").unwrap_or_default()),
        ips: protocol::ips_from_prev_result(&conf["prevResult"]),
        network: conf["name"].as_str().unwrap_or_default().to_string(),
        valid: Vec::new(),
    })
}

fn run(command: &str, conf: &serde_json::Value) -> Result<Option<String>, Failure> {
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0");
    if command != "VERSION" && command != "DEL" && !SUPPORTED.contains(&version) {
        return Err((code::INCOMPATIBLE_VERSION, format!("cniVersion {version} is not supported"), format!("{SUPPORTED:?}")));
    }
    let socket = socket_of(conf);
    let timeout = Duration::from_millis(conf["timeoutMs"].as_u64().unwrap_or(55_000));
    let unreachable = |e: std::io::Error, what: &str| {
        (code::TRY_AGAIN, format!("sidecap agent unreachable at {}: {e}; {what}", socket.display()), String::new())
    };
    match command {
        "VERSION" => Ok(Some(serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}).to_string())),
        "DEL" => {
            del(conf, &socket);
            Ok(None)
        }
        "ADD" => {
            let req = request(Command::Add, conf)?;
            let reply = call(&socket, &req, timeout).map_err(|e| unreachable(e, &format!("pod {} cannot be captured", req.pod())))?;
            if !reply.ok {
                return Err((code::TRY_AGAIN, format!("sidecap: {}", reply.message), req.pod()));
            }
            // Chained plugins pass the previous result on unchanged.
            let mut out = conf.get("prevResult").cloned().unwrap_or_else(|| serde_json::json!({}));
            if out.get("cniVersion").is_none() {
                out["cniVersion"] = conf["cniVersion"].clone();
            }
            Ok(Some(out.to_string()))
        }
        "CHECK" => {
            let req = request(Command::Check, conf)?;
            let reply = call(&socket, &req, timeout).map_err(|e| unreachable(e, &format!("pod {} cannot be checked", req.pod())))?;
            if !reply.ok {
                return Err((code::UNKNOWN_CONTAINER, format!("sidecap: {}", reply.message), req.pod()));
            }
            Ok(None)
        }
        "STATUS" => {
            let req = Request { command: Command::Status, ..blank() };
            match call(&socket, &req, Duration::from_secs(5)) {
                Ok(r) if r.ok => Ok(None),
                Ok(r) => Err((code::NOT_AVAILABLE, format!("sidecap: {}", r.message), String::new())),
                Err(e) => Err((code::NOT_AVAILABLE, format!("sidecap agent unreachable at {}: {e}", socket.display()), String::new())),
            }
        }
        "GC" => {
            let Some(valid) = conf["cni.dev/valid-attachments"].as_array() else {
                return Err((code::BAD_CONFIG, "GC without cni.dev/valid-attachments".into(), String::new()));
            };
            let req = Request {
                command: Command::Gc,
                network: conf["name"].as_str().unwrap_or_default().to_string(),
                valid: valid.iter().filter_map(|a| a["containerID"].as_str().map(String::from)).collect(),
                ..blank()
            };
            let reply = call(&socket, &req, timeout).map_err(|e| unreachable(e, "nothing collected"))?;
            if !reply.ok {
                return Err((code::TRY_AGAIN, format!("sidecap: {}", reply.message), String::new()));
            }
            Ok(None)
        }
        other => Err((code::BAD_ENV, format!("unknown CNI_COMMAND {other:?}"), String::new())),
    }
}

fn blank() -> Request {
    Request {
        command: Command::Status,
        namespace: String::new(),
        name: String::new(),
        uid: None,
        container_id: String::new(),
        netns: PathBuf::new(),
        ips: Vec::new(),
        network: String::new(),
        valid: Vec::new(),
    }
}

/// DEL always succeeds (the spec: a runtime must be able to tear a container down), so every
/// problem is only written to stderr. It is keyed by CNI_CONTAINERID: the agent forgets that
/// container, whatever the pod fields say, and they may be missing.
fn del(conf: &serde_json::Value, socket: &std::path::Path) {
    let Ok(container_id) = std::env::var("CNI_CONTAINERID") else {
        eprintln!("sidecap-cni: DEL without CNI_CONTAINERID: nothing to forget");
        return;
    };
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let (namespace, name, uid) = protocol::pod_from_cni_args(&args, conf[protocol::POD_NAMESPACE_KEY].as_str()).unwrap_or_default();
    let req = Request {
        command: Command::Del,
        namespace,
        name,
        uid,
        container_id,
        netns: PathBuf::from(std::env::var("CNI_NETNS").unwrap_or_default()),
        network: conf["name"].as_str().unwrap_or_default().to_string(),
        ..blank()
    };
    if let Err(e) = call(socket, &req, Duration::from_secs(10)) {
        eprintln!("sidecap-cni: DEL of container {}: agent unreachable at {}: {e}", req.container_id, socket.display());
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
