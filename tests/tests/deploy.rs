//! What the DaemonSet does on a node, on the real kernel: `sidecap install-cni` chains the
//! plugin into a node's CNI configuration so that a runtime walking the conflist captures
//! the pod before ADD returns; `sidecap uninstall` gives the conf dir back byte for byte and
//! detaches everything; the agent runs with exactly the capabilities deploy/ grants it (and
//! captures nothing without SYS_ADMIN), the uninstall DaemonSet with its single one. (Upgrades: upgrade.rs.)

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use sidecap_tests::{fixture::SVC, *};

/// A pod as the API server has it before its sandbox exists: no netns, no IP yet.
fn pod_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'\nspec:\n  containers:\n  - name: app\n  - name: istio-proxy\n"
    )
}

/// The node's network plugin: hands out the sandbox pod's address, like any primary plugin.
const FAKE_PRIMARY: &str = r#"#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
ADD) printf '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"%s"}],"ips":[{"address":"10.251.1.2/24","interface":0}]}' "$CNI_NETNS" ;;
VERSION) printf '{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}' ;;
esac
"#;

/// Calico-shaped conflist naming the fake primary.
const CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {
      "type": "fake-primary",
      "log_level": "info",
      "ipam": {
          "type": "calico-ipam"
      }
    }
  ]
}
"#;

/// Every file of a directory with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read")))
        .collect()
}

/// What kubelet's runtime does with the node's primary conflist (libcni): each plugin in
/// order, its entry plus the list's name and version and the previous result on stdin.
fn runtime(command: &str, conf_dir: &Path, bin_dir: &Path, pod: &str, netns: &Path) -> Result<Value, String> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&lists[0]).unwrap()).unwrap();
    let mut plugins: Vec<Value> = list["plugins"].as_array().unwrap().clone();
    if command == "DEL" {
        plugins.reverse();
    }
    let mut prev: Option<Value> = None;
    for p in plugins {
        let mut conf = p.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(prev) = &prev {
            conf["prevResult"] = prev.clone();
        }
        let ty = p["type"].as_str().unwrap();
        let mut child = Command::new(bin_dir.join(ty))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin_dir)
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID=u-{pod}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{ty}: {e}"))?;
        let _ = child.stdin.take().unwrap().write_all(conf.to_string().as_bytes());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!("{ty} {command} failed: {text}"));
        }
        if command == "ADD" {
            prev = Some(serde_json::from_str(&text).map_err(|e| format!("{ty}: {e}: {text}"))?);
        }
    }
    Ok(prev.unwrap_or(Value::Null))
}

#[test]
fn install_cni_chains_the_plugin_the_runtime_runs_and_uninstall_gives_the_node_back() {
    require_root!();
    let topo = Topology::builder().pod("a").service_addr(SVC).build().expect("topology");
    let a = topo.pod("a");
    let mesh = MeshDir::new();
    mesh.write("pod-a.yaml", &pod_yaml("a"));
    mesh.service("default", "web", SVC.into(), &[("tcp", 80)]);
    let pins = BpfPinDir::new("deploy-cni").expect("pins");

    // A node: /etc/cni/net.d and /opt/cni/bin with the network plugin already there.
    let node = TempDir::new("node").expect("tmp");
    let (conf, bin) = (node.path().join("net.d"), node.path().join("bin"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("fake-primary"), FAKE_PRIMARY).unwrap();
    std::fs::set_permissions(bin.join("fake-primary"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(conf.join("10-calico.conflist"), CONFLIST).unwrap();
    std::fs::write(conf.join("calico-kubeconfig"), "apiVersion: v1\nkind: Config\n").unwrap();
    std::fs::write(conf.join("99-loopback.conf"), "{\"cniVersion\": \"1.0.0\", \"name\": \"lo\", \"type\": \"loopback\"}\n").unwrap();
    let conf_before = snapshot(&conf);
    let socket = node.path().join("run/cni.sock");
    let (conf_s, bin_s, sock_s) = (conf.display().to_string(), bin.display().to_string(), socket.display().to_string());

    // The DaemonSet's install-cni container, then its agent.
    let (code, out, err) = sidecap(&["install-cni", "--cni-bin-dir", &bin_s, "--cni-conf-dir", &conf_s, "--socket", &sock_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sidecap-cni chained"), "{out}");
    let mut agent = Agent::start(topo.cgroup().path(), pins.path(), mesh.path(), &["--cni-socket", &sock_s, "--cni-wait-secs", "5"]);
    agent.wait_pods(&[], 0, Duration::from_secs(20));
    agent.wait_cni_socket(&socket, Duration::from_secs(20));
    let _up = Upstream::start(topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    assert!(inspect(pins.path()).as_array().unwrap().is_empty(), "nothing knows pod a's netns yet");

    // The runtime sets the pod up: primary plugin, then sidecap-cni from the bin dir.
    let result = runtime("ADD", &conf, &bin, "a", &a.netns().path()).unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    assert_eq!(result["ips"][0]["address"], "10.251.1.2/24", "the primary's result comes out of the chain: {result}");
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("first"));
    assert!(r.ok, "{r:?}");
    assert_eq!(hp.wait_log_lines(1, Duration::from_secs(5))[0].frontend, Some((SVC, 80).into()), "the first connect is captured");
    let v = inspect(pins.path());
    assert_eq!((v[0]["pod"].as_str(), v[0]["ips"].clone()), (Some("default/a"), serde_json::json!(["10.251.1.2"])), "{v:#}");
    runtime("DEL", &conf, &bin, "a", &a.netns().path()).expect("DEL");

    // The uninstall DaemonSet: CNI first, then links and pins.
    assert_eq!(agent.stop(), Some(0));
    let bpffs = pins.path().display().to_string();
    let (code, out, err) = sidecap(&["uninstall", "--bpffs", &bpffs, "--cni-conf-dir", &conf_s, "--cni-bin-dir", &bin_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(snapshot(&conf), conf_before, "the conf dir is as it was, byte for byte");
    assert_eq!(snapshot(&bin).keys().collect::<Vec<_>>(), ["fake-primary"], "our binary is gone, the others stay");
    assert!(!pins.path().exists(), "no pin left");
    let shown = Command::new("bpftool").args(["cgroup", "show"]).arg(topo.cgroup().path()).output().expect("bpftool");
    assert!(
        String::from_utf8_lossy(&shown.stdout).trim().is_empty(),
        "programs still attached: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("after"));
    assert_eq!(r.peer_addr(), Some((SVC, 80).into()), "not captured any more: {r:?}");
}

/// `capabilities.add` of a container in a deploy/ manifest, as setpriv names them.
fn manifest_caps(file: &str, container: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)).expect("manifest");
    let v: Value = serde_json::to_value(serde_norway::from_str::<serde_norway::Value>(&text).expect("yaml")).expect("json");
    let spec = &v["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("{file}: no container {container}"));
    c["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_ascii_lowercase())
        .collect()
}

/// `sidecap ARGS` as root with only `caps` (bounding and inheritable sets cut down, as a
/// container with `drop: [ALL]` and these `add`s gets them).
fn with_caps(caps: &[String], args: &[&str], log: &Path) -> Child {
    let bounding = std::iter::once("-all".to_string()).chain(caps.iter().map(|c| format!("+{c}"))).collect::<Vec<_>>().join(",");
    let log = std::fs::File::create(log).expect("log");
    Command::new("setpriv")
        .args(["--inh-caps=-all", &format!("--bounding-set={bounding}"), "--"])
        .arg(sidecap_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("setpriv (util-linux)")
}

fn cap_bit(name: &str) -> u64 {
    1 << match name {
        "net_admin" => 12,
        "perfmon" => 38,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "bpf" => 39,
        other => panic!("add {other} to cap_bit"),
    }
}

fn stop(mut child: Child) -> Option<i32> {
    // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs the agent with `caps` on the sandbox; returns whether pod `a` got captured within
/// `wait` (its PODS entry), the exit code after SIGTERM (None: it had exited by itself with
/// an error, or hung), and the log.
fn agent_with(caps: &[String], topo: &Topology, mesh: &MeshDir, wait: Duration, check_eff: bool) -> (bool, Option<i32>, String) {
    let pins = BpfPinDir::new("caps").expect("pins");
    let dir = TempDir::new("caps").expect("tmp");
    let log = dir.path().join("agent.log");
    let (cgroup, config, bpffs) =
        (topo.cgroup().path().display().to_string(), mesh.path().display().to_string(), pins.path().display().to_string());
    let args = [
        "agent",
        "--config",
        &config,
        "--cgroup",
        &cgroup,
        "--bpffs",
        &bpffs,
        "--poll-interval-ms",
        "100",
        "--admin-addr",
        "127.0.0.1:0",
        "--cni-socket",
        "off",
    ];
    let mut child = with_caps(caps, &args, &log);
    if check_eff {
        std::thread::sleep(Duration::from_millis(200));
        let eff = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:").map(|v| u64::from_str_radix(v.trim(), 16).unwrap()));
        assert_eq!(eff, Some(caps.iter().map(|c| cap_bit(c)).fold(0, |a, b| a | b)), "the agent runs with exactly {caps:?}");
    }
    let cookie = topo.pod("a").cookie().expect("cookie");
    let deadline = Instant::now() + wait;
    let mut captured = false;
    while Instant::now() < deadline && !captured {
        captured = sidecap_tests::agent::try_inspect(pins.path())
            .ok()
            .is_some_and(|v| v.as_array().into_iter().flatten().any(|p| p["netns_cookie"].as_u64() == Some(cookie)));
        if !captured && child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let exited_alone = child.try_wait().ok().flatten().is_some();
    let code = if exited_alone { None } else { stop(child) };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = sidecap(&["uninstall", "--bpffs", &bpffs]);
    (captured, code, text)
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_sys_admin_is_needed() {
    require_root!();
    let caps = manifest_caps("base/daemonset.yaml", "agent");
    let topo = Topology::builder().pod("a").service_addr(SVC).build().expect("topology");
    let mesh = MeshDir::new();
    mesh.pod(topo.pod("a"), "default", &[("app", "a")], &[]);
    mesh.service("default", "web", SVC.into(), &[("tcp", 80)]);

    // Exactly the DaemonSet's set: the pod is captured, SIGTERM exits cleanly.
    let (captured, code, log) = agent_with(&caps, &topo, &mesh, Duration::from_secs(20), true);
    assert!(captured && code == Some(0), "with {caps:?}: captured={captured} exit={code:?}\n{log}");

    // Without SYS_ADMIN the programs load and attach (BPF, PERFMON, NET_ADMIN), but the
    // agent cannot enter the pod's netns (setns) to learn its cookie: nothing is captured.
    let no_sys_admin: Vec<String> = caps.iter().filter(|c| *c != "sys_admin").cloned().collect();
    let (captured, code, log) = agent_with(&no_sys_admin, &topo, &mesh, Duration::from_secs(4), false);
    assert!(log.contains("programs in place"), "{log}");
    assert!(log.contains("entering netns") && log.contains("Operation not permitted"), "the reason is setns: {log}");
    assert!(!captured && code == Some(0), "without sys_admin: captured={captured} exit={code:?}\n{log}");

    // Without BPF/PERFMON/NET_ADMIN *and* SYS_ADMIN nothing loads.
    let (captured, code, log) = agent_with(&["sys_ptrace".to_string()], &topo, &mesh, Duration::from_secs(10), false);
    assert!(!captured && code.is_none(), "with sys_ptrace only: captured={captured} exit={code:?}\n{log}");
}

#[test]
fn the_daemonsets_capabilities_adopt_a_running_proxy_and_sys_ptrace_is_needed() {
    require_root!();
    let caps = manifest_caps("base/daemonset.yaml", "agent");
    let topo = Topology::builder().pod("a").service_addr(SVC).build().expect("topology");
    let mesh = MeshDir::new();
    mesh.pod(topo.pod("a"), "default", &[("app", "a")], &[]);
    // The proxy (uid 1337, not the agent's) listens before any agent runs.
    let _hp = Haproxy::start(topo.pod("a"), HaproxyConfig::default()).expect("haproxy");

    // The DaemonSet's set: its 15006 listener is taken over (pidfd_getfd) at once.
    let (captured, code, log) = agent_with(&caps, &topo, &mesh, Duration::from_secs(20), false);
    assert!(captured && code == Some(0), "with {caps:?}: captured={captured} exit={code:?}\n{log}");
    assert!(log.contains("adopted the proxy's running inbound listener pod=default/a port=15006"), "{log}");

    // Without SYS_PTRACE the pod is captured but the running listener cannot be seen, and
    // the log says why.
    let no_ptrace: Vec<String> = caps.iter().filter(|c| *c != "sys_ptrace").cloned().collect();
    let (captured, code, log) = agent_with(&no_ptrace, &topo, &mesh, Duration::from_secs(20), false);
    assert!(captured && code == Some(0), "without sys_ptrace: captured={captured} exit={code:?}\n{log}");
    assert!(log.contains("inbound capture waits until the proxy listens again") && log.contains("the agent lacks CAP_SYS_PTRACE"), "{log}");
}

#[test]
fn the_uninstall_daemonsets_one_capability_removes_everything() {
    require_root!();
    let mut m = Mesh::start(MeshSpec::default());
    let a = m.topo.pod("a");
    let _up = Upstream::start(m.topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    assert_eq!(m.agent.stop(), Some(0));
    let caps = manifest_caps("uninstall/daemonset.yaml", "uninstall");
    assert_eq!(caps, ["bpf"]);
    let dir = TempDir::new("uninstall").expect("tmp");
    let log = dir.path().join("uninstall.log");
    let bpffs = m.pins.path().display().to_string();
    let st = with_caps(&caps, &["uninstall", "--bpffs", &bpffs], &log).wait().expect("uninstall");
    assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(!m.pins.path().exists(), "no pin left");
    let shown = Command::new("bpftool").args(["cgroup", "show"]).arg(m.topo.cgroup().path()).output().expect("bpftool");
    assert!(
        String::from_utf8_lossy(&shown.stdout).trim().is_empty(),
        "programs still attached: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let r = Probe::at(probe_bin!()).connect(a, Creds::APP, "10.251.100.10:80", &ConnectOpts::send("after"));
    assert_eq!(r.peer_addr(), Some((SVC, 80).into()), "not captured any more: {r:?}");
    assert!(hp.log_lines().is_empty(), "{:?}", hp.log_lines());
}
