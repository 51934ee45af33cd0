//! `sidecap`: the node agent and the operator CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sidecap::{agent, cgroup, datapath, inspect};

#[derive(Parser)]
#[command(
    name = "sidecap",
    version,
    about = "eBPF replacement for istio-init: steers meshed pods' traffic to their sidecar without iptables"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum AllowAny {
    /// Destinations with no outbound listener go directly, not through the proxy.
    Passthrough,
    /// Istio-exact: they go through the proxy (PassthroughCluster), as with istio-init.
    Capture,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProxyIdentity {
    /// The proxy is its uid/gid (1337), as with istio-init: any process of the pod running
    /// as that uid or gid is exempt from capture.
    Uid,
    /// The proxy is its uid/gid *in the proxy container's cgroup*; the same ids elsewhere in
    /// the pod are an app's (captured; dropped under REGISTRY_ONLY).
    Cgroup,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: attach the programs once, then keep every meshed pod's maps in
    /// step with the configuration. Stopping it leaves capture in place (all state is pinned).
    #[command(group(clap::ArgGroup::new("source").required(true).multiple(false)))]
    Agent {
        /// Directory of YAML (Pods with a `sidecap.io/netns` annotation, Sidecars, Services,
        /// ServiceEntries, EndpointSlices, Namespaces, the `istio` mesh ConfigMap); re-read on change.
        #[arg(long, value_name = "DIR", group = "source")]
        config: Option<PathBuf>,
        /// Read the cluster from the Kubernetes API instead: this node's Pods, Sidecars,
        /// Services, EndpointSlices, ServiceEntries, Namespaces, the `istio` mesh ConfigMap.
        #[arg(long, group = "source")]
        kubernetes: bool,
        /// kubeconfig for --kubernetes [default: $KUBECONFIG or ~/.kube/config, else in-cluster].
        #[arg(long, value_name = "PATH", conflicts_with = "config")]
        kubeconfig: Option<PathBuf>,
        /// This node's name for --kubernetes: only pods scheduled here are read [default: $NODE_NAME].
        #[arg(long, value_name = "NAME", conflicts_with = "config")]
        node_name: Option<String>,
        /// cgroup v2 directory to attach to [default: the cgroup v2 root (from
        /// /proc/self/mountinfo) where the kernel places programs first (mprog, Linux 6.17+);
        /// elsewhere, or with --no-mprog, the cgroup that holds all pods (kubepods,
        /// kubepods.slice), found in the cgroup tree, so that sidecap runs before socket load
        /// balancers attached at the root].
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// cgroup v2 directory holding every pod, where sockops, getsockopt and recvmsg4/6
        /// are attached (they serve pods' sockets only, so host processes never run them);
        /// --cgroup itself or a cgroup below it. A captured connect or DNS query from a
        /// process outside it is refused (EPERM), never sent direct [default: when --cgroup
        /// is the cgroup2 root, the cgroup that holds all pods (kubepods, kubepods.slice)
        /// if there is one; otherwise --cgroup].
        #[arg(long, value_name = "PATH")]
        pods_cgroup: Option<PathBuf>,
        /// The host's cgroup v2 mount as this process sees it (in the DaemonSet:
        /// /host/sys/fs/cgroup): searched for proxy containers' cgroups, and the base of
        /// relative `sidecap.io/proxy-cgroup` paths [default: the cgroup2 mount in
        /// /proc/self/mountinfo].
        #[arg(long, value_name = "PATH")]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory holding sidecap's pinned maps and links.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/sidecap")]
        bpffs: PathBuf,
        /// What ALLOW_ANY does with a destination that no outbound listener matches.
        #[arg(long, value_enum, default_value = "passthrough")]
        allow_any: AllowAny,
        /// How the kernel recognises a pod's proxy; a pod's `sidecap.io/proxy-identity:
        /// uid|cgroup` annotation overrides it.
        #[arg(long, value_enum, default_value = "uid")]
        proxy_identity: ProxyIdentity,
        /// Longest wait for a configuration change before checking again, in milliseconds
        /// (changes to the directory wake the agent at once through inotify).
        #[arg(long, value_name = "MS", default_value_t = 500)]
        poll_interval_ms: u64,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this address ("off" to disable).
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9977")]
        admin_addr: String,
        /// Unix socket for the chained `sidecap-cni` plugin ("off" to disable).
        #[arg(long, value_name = "PATH", default_value = sidecap::cni::protocol::DEFAULT_SOCKET)]
        cni_socket: String,
        /// How long a `sidecap-cni` call waits for its pod to appear in the source, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        cni_wait_secs: u64,
        /// Meshed pods this node can hold (size of PODS and the per-pod maps; fixed once the
        /// maps are pinned, until `sidecap uninstall`).
        #[arg(long, value_name = "N", default_value_t = sidecap::datapath::MapSizes::default().pods, value_parser = clap::value_parser!(u32).range(1..))]
        max_pods: u32,
        /// Listener entries of all rule sets together (OUT_LISTENERS). Pods with equal rules
        /// share one set: Istio's default mesh needs about 2 per Service port per distinct scope.
        #[arg(long, value_name = "N", default_value_t = sidecap::datapath::MapSizes::default().listeners, value_parser = clap::value_parser!(u32).range(1..))]
        max_listeners: u32,
        /// Port and CIDR rules of all rule sets together (OUT_PORTS, OUT_CIDRS, IN_PORTS, each).
        #[arg(long, value_name = "N", default_value_t = sidecap::datapath::MapSizes::default().rules, value_parser = clap::value_parser!(u32).range(1..))]
        max_rules: u32,
        /// Connections whose original destination is held at once, between the app's
        /// connect and the proxy's accept (ORIG_DST, ORIG_DST_BY_COOKIE, DNS_ORIG, each; LRU).
        #[arg(long, value_name = "N", default_value_t = sidecap::datapath::MapSizes::default().connections, value_parser = clap::value_parser!(u32).range(1024..))]
        max_connections: u32,
        /// Do not use cgroup mprog placement (BPF_F_BEFORE/BPF_F_PREORDER) even where the
        /// kernel has it: attach as on kernels older than 6.17.
        #[arg(long)]
        no_mprog: bool,
        /// How often to look for other programs that run before sidecap's, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        order_check_secs: u64,
        /// With --kubernetes: /readyz fails, naming the kind, when a kind has had no successful
        /// list, event, bookmark or server-ended watch for this many seconds (the API server ends
        /// each watch after 240 s, so a healthy but quiet kind never goes that long).
        #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
        kube_stale_after_secs: u64,
        /// Kernel trace records per second that each `sidecap trace` session (and the agent's
        /// own log) passes; the rest are counted and reported as dropped.
        #[arg(long, value_name = "N", default_value_t = sidecap::trace::DEFAULT_RATE, value_parser = clap::value_parser!(u32).range(1..))]
        trace_rate: u32,
        /// Accelerate the app↔proxy hops with sockmap (sk_msg redirect between the two
        /// sockets: the app's captured connection to the proxy, and the proxy's inbound
        /// connection to the app), for every pod whose `sidecap.io/sockmap` annotation is not
        /// "false". Off by default: see docs/sockmap.md.
        #[arg(long)]
        sockmap: bool,
    },
    /// Detach every program and remove every pin sidecap made under the bpffs directory;
    /// with --cni-conf-dir/--cni-bin-dir first remove the chained plugin from the node.
    Uninstall {
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/sidecap")]
        bpffs: PathBuf,
        /// Remove our entry from every CNI network configuration here (a .conf sidecap turned
        /// into a conflist is restored).
        #[arg(long, value_name = "DIR", requires = "cni_bin_dir")]
        cni_conf_dir: Option<PathBuf>,
        /// Remove the `sidecap-cni` binary from here.
        #[arg(long, value_name = "DIR", requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
    /// Install the chained CNI plugin on this node: copy `sidecap-cni` into the CNI bin dir and
    /// append it to the primary network configuration (idempotent; atomic writes).
    InstallCni {
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The agent's CNI socket (`socketPath` of our entry), as the container runtime sees it.
        #[arg(long, value_name = "PATH", default_value = sidecap::cni::protocol::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The plugin binary to install [default: `sidecap-cni` next to this executable].
        #[arg(long, value_name = "PATH")]
        plugin: Option<PathBuf>,
        /// Keep checking every SECS seconds and put the entry back when the network plugin
        /// rewrites its configuration (0: install once and exit).
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        watch_secs: u64,
        /// Namespace of pods whose runtime sends no K8S_POD_NAMESPACE in CNI_ARGS (podman sends
        /// only K8S_POD_NAME); written as `podNamespace` into our entry. Not needed (and not
        /// used) with Kubernetes, whose runtimes always send the namespace.
        #[arg(long, value_name = "NS")]
        pod_namespace: Option<String>,
    },
    /// Show each meshed pod as the kernel sees it (reads the pinned maps; the agent may be down).
    Inspect {
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/sidecap")]
        bpffs: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Only this pod (NAMESPACE/NAME).
        #[arg(long, value_name = "NS/NAME")]
        pod: Option<String>,
    },
    /// Watch a pod's connections live: the agent turns the pod's kernel trace on and streams
    /// one record per decision (connect, sendmsg, getsockopt, sk_lookup) until --for
    /// elapses or Ctrl-C; the trace goes off again then, and also when this command dies
    /// (the agent's lease: 5 s without a heartbeat).
    Trace {
        /// The pod, as NAMESPACE/NAME.
        #[arg(long, value_name = "NS/NAME")]
        pod: String,
        /// Stop after this long (30s, 5m, 1h, 500ms) [default: until Ctrl-C].
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// The agent's admin endpoint (its --admin-addr).
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9977")]
        admin_addr: std::net::SocketAddr,
    },
    /// Validate Sidecar resources with Istio's rules: one line per Sidecar (`NS/NAME: ok`,
    /// `NS/NAME: warning: MSG`, `NS/NAME: error: MSG`); exit 1 on any error.
    Validate {
        /// Files or directories of YAML.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Explain what happens to a pod's connections: from a configuration directory
    /// (`--config`), or from what the kernel holds now (the pinned maps under `--bpffs`).
    Explain {
        #[arg(long, value_name = "DIR")]
        config: Option<PathBuf>,
        /// Without --config: read the live state from these pinned maps.
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/sidecap")]
        bpffs: PathBuf,
        /// The pod, as NAMESPACE/NAME.
        #[arg(long, value_name = "NS/NAME")]
        pod: String,
        /// An outbound destination to decide (repeatable); IPv6 as `[ADDR]:PORT`.
        #[arg(long = "to", value_name = "ADDR:PORT")]
        to: Vec<std::net::SocketAddr>,
        /// An inbound port to decide (repeatable).
        #[arg(long, value_name = "PORT")]
        inbound: Vec<u16>,
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
        #[arg(long, value_enum, default_value = "passthrough")]
        allow_any: AllowAny,
    },
}

fn engine(allow_any: AllowAny, identity: ProxyIdentity) -> sidecap_policy::EngineOptions {
    sidecap_policy::EngineOptions {
        allow_any: match allow_any {
            AllowAny::Passthrough => sidecap_policy::AllowAnyMode::Passthrough,
            AllowAny::Capture => sidecap_policy::AllowAnyMode::Capture,
        },
        proxy_identity: match identity {
            ProxyIdentity::Uid => sidecap_policy::knobs::ProxyIdentity::Uid,
            ProxyIdentity::Cgroup => sidecap_policy::knobs::ProxyIdentity::Cgroup,
        },
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sidecap: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text is already shown
/// (most of our errors name their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Agent {
            config,
            kubernetes,
            kubeconfig,
            node_name,
            cgroup,
            pods_cgroup,
            cgroup_root,
            bpffs,
            allow_any,
            proxy_identity,
            poll_interval_ms,
            admin_addr,
            cni_socket,
            cni_wait_secs,
            max_pods,
            max_listeners,
            max_rules,
            max_connections,
            no_mprog,
            order_check_secs,
            kube_stale_after_secs,
            trace_rate,
            sockmap,
        } => {
            let cgroup_root = cgroup_root.or_else(|| cgroup::v2_root().ok());
            let source = match config {
                Some(dir) => agent::SourceConfig::Dir(dir),
                None => {
                    debug_assert!(kubernetes, "clap: --config or --kubernetes");
                    let node = node_name
                        .or_else(|| std::env::var("NODE_NAME").ok())
                        .filter(|n| !n.is_empty())
                        .context("--kubernetes needs the node's name: --node-name or NODE_NAME")?;
                    let mut opts = sidecap::source::kube::KubeOptions::new(node);
                    opts.kubeconfig = kubeconfig;
                    opts.cgroup_root = cgroup_root.clone();
                    opts.stale_after = Duration::from_secs(kube_stale_after_secs);
                    agent::SourceConfig::Kubernetes(opts)
                }
            };
            let cgroup = match cgroup {
                Some(c) => c,
                None => default_cgroup(no_mprog)?,
            };
            let pods_cgroup = match pods_cgroup {
                Some(p) => p,
                None => default_pods_cgroup(&cgroup),
            };
            let cfg = agent::Config {
                source,
                cgroup,
                pods_cgroup,
                bpffs,
                engine: engine(allow_any, proxy_identity),
                poll_interval: Duration::from_millis(poll_interval_ms.max(10)),
                resync_interval: Duration::from_secs(5),
                admin_addr: match admin_addr.as_str() {
                    "off" => None,
                    a => Some(a.parse().with_context(|| format!("--admin-addr {a:?}: want ADDR:PORT or off"))?),
                },
                cni_socket: (cni_socket != "off").then(|| PathBuf::from(&cni_socket)),
                cni_wait: Duration::from_secs(cni_wait_secs),
                map_sizes: sidecap::datapath::MapSizes {
                    pods: max_pods,
                    listeners: max_listeners,
                    rules: max_rules,
                    connections: max_connections,
                },
                mprog: !no_mprog,
                order_check: Duration::from_secs(order_check_secs),
                cgroup_root,
                trace_rate,
                sockmap,
            };
            agent::run(&cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Uninstall { bpffs, cni_conf_dir, cni_bin_dir } => {
            // The CNI entry first: no new pod may wait on an agent that is going away.
            if let (Some(conf), Some(bin)) = (cni_conf_dir, cni_bin_dir) {
                let r = sidecap::cni::install::uninstall(&conf, &bin)?;
                for p in r.confs.iter().chain(&r.restored) {
                    println!("removed sidecap-cni from {}", p.display());
                }
                if let Some(b) = r.binary {
                    println!("removed {}", b.display());
                }
            }
            let removed = datapath::uninstall(&bpffs)?;
            println!("removed {} pins under {}", removed.len(), bpffs.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::InstallCni { cni_bin_dir, cni_conf_dir, socket, plugin, watch_secs, pod_namespace } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe().context("locating this executable")?.with_file_name("sidecap-cni"),
            };
            let opts = sidecap::cni::install::Options { bin_dir: cni_bin_dir, conf_dir: cni_conf_dir, socket, plugin, pod_namespace };
            install_cni(&opts, watch_secs)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { bpffs, output, pod } => {
            let pods = inspect::collect(&bpffs, pod.as_deref())?;
            if let (Some(p), true) = (&pod, pods.is_empty()) {
                anyhow::bail!("pod {p} is not in the maps under {} (not meshed on this node, or not synced yet)", bpffs.display());
            }
            match output {
                Output::Text => print!("{}", inspect::render_text(&pods)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&pods)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Trace { pod, duration, output, admin_addr } => {
            let _: sidecap_policy::PodRef = pod.parse().map_err(|e| anyhow::anyhow!("--pod {pod:?}: {e}"))?;
            let args = sidecap::cli::TraceArgs {
                admin: admin_addr,
                duration: duration.as_deref().map(sidecap::cli::parse_duration).transpose()?,
                pod: pod.clone(),
                output: match output {
                    Output::Json => sidecap::cli::OutputFormat::Json,
                    Output::Text => sidecap::cli::OutputFormat::Text,
                },
            };
            let s = sidecap::cli::trace(&args, &mut std::io::stdout())?;
            eprintln!("trace of {pod} ended ({}): {} records, {} dropped by the rate limit", s.reason, s.records, s.dropped);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { paths } => {
            let code = sidecap::cli::validate(&paths, &mut std::io::stdout());
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Cmd::Explain { config: None, bpffs, pod, to, inbound, output, .. } => {
            let v = inspect::explain_live(&bpffs, &pod, &to, &inbound)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Text => {
                    println!("pod {pod} (kernel state: policy {} generation {})", v["policy"], v["generation"]);
                    for l in v["listeners"].as_array().into_iter().flatten() {
                        println!("  listener {}", l.as_str().unwrap_or_default());
                    }
                    for d in v["decisions"].as_array().into_iter().flatten() {
                        let what = d.get("to").or(d.get("inbound")).map(|x| x.to_string()).unwrap_or_default();
                        println!(
                            "  {:<28} {:<12} {}",
                            what.trim_matches('"'),
                            d["action"].as_str().unwrap_or("?"),
                            d["reason"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Explain { config: Some(config), pod, to, inbound, output, allow_any, .. } => {
            let pod: sidecap_policy::PodRef = pod.parse().map_err(|e| anyhow::anyhow!("--pod {pod:?}: {e}"))?;
            let args = sidecap::cli::ExplainArgs {
                config: vec![config],
                pod,
                to,
                inbound,
                output: match output {
                    Output::Json => sidecap::cli::OutputFormat::Json,
                    Output::Text => sidecap::cli::OutputFormat::Text,
                },
                allow_any: engine(allow_any, ProxyIdentity::Uid).allow_any,
            };
            sidecap::cli::explain(&args, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Where to attach without `--cgroup`: the root where the kernel can place sidecap's programs
/// first; otherwise the cgroup holding all pods, since a child cgroup's programs run before
/// its parent's (socket load balancers attach at the root).
fn default_cgroup(no_mprog: bool) -> anyhow::Result<PathBuf> {
    let root = cgroup::v2_root().context("finding the cgroup v2 root")?;
    if !no_mprog && datapath::probe_mprog(&root)? {
        return Ok(root);
    }
    match datapath::find_pods_cgroup(&root) {
        Some(pods) => {
            tracing::info!(cgroup = %pods.display(), "no cgroup mprog: attaching at the cgroup that holds all pods");
            Ok(pods)
        }
        None => {
            tracing::warn!(
                root = %root.display(),
                "no cgroup mprog and no kubepods cgroup found: attaching at the root, after any program already there \
                 (pass --cgroup with the cgroup that holds the pods)"
            );
            Ok(root)
        }
    }
}

/// Where sockops, getsockopt and recvmsg go without `--pods-cgroup` (see
/// `datapath::observers::default_pods_cgroup`).
fn default_pods_cgroup(cgroup: &std::path::Path) -> PathBuf {
    match datapath::observers::default_pods_cgroup(cgroup) {
        Some(pods) => {
            tracing::info!(cgroup = %pods.display(), "sockops, getsockopt and recvmsg go on the cgroup that holds all pods: host processes do not run them");
            pods
        }
        None => cgroup.into(),
    }
}

/// `install-cni`: once, or (watch) every `watch_secs`, logging failures and retrying.
fn install_cni(opts: &sidecap::cni::install::Options, watch_secs: u64) -> anyhow::Result<()> {
    use sidecap::cni::install::{self, ConfChange};
    let mut last_error = None;
    loop {
        match install::install(opts) {
            Ok(r) => {
                last_error = None;
                if r.binary_written {
                    println!("installed {}", r.binary.display());
                }
                for p in &r.cleaned {
                    println!("removed sidecap-cni from {} (not the primary configuration)", p.display());
                }
                match &r.change {
                    ConfChange::Unchanged if watch_secs > 0 => {}
                    ConfChange::Unchanged => println!("{}: sidecap-cni already chained", r.conf.display()),
                    ConfChange::Appended => println!("{}: sidecap-cni chained", r.conf.display()),
                    ConfChange::Updated => println!("{}: sidecap-cni entry updated", r.conf.display()),
                    ConfChange::Converted { from } => {
                        println!("{}: made from {} with sidecap-cni chained", r.conf.display(), from.display())
                    }
                }
            }
            Err(e) if watch_secs == 0 => return Err(e.into()),
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    eprintln!("sidecap: install-cni: {msg} (retrying every {watch_secs}s)");
                    last_error = Some(msg);
                }
            }
        }
        if watch_secs == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(watch_secs));
    }
}
