//! A real container runtime (issue 11, point 5): podman creates the container's netns and runs
//! the CNI chain `bridge` + `host-local` + `sidecap-cni`, the chain `sidecap install-cni` wrote
//! into a private CNI conf dir. No image registry: the container's root is a directory holding
//! the test's own `sc-probe` and the libraries it links.
//!
//! Everything podman reads or writes lives in the test's temp dir (CONTAINERS_CONF,
//! CONTAINERS_STORAGE_CONF, vfs storage, file locks, events), except libcni's result cache,
//! which podman 4 keeps at /var/lib/cni (entries go with the container). podman runs in a netns
//! of the test's (`nsenter --net`, mounts shared), so the bridge and the host ends of the
//! container veths live there, never in the machine's root netns. runc with the cgroupfs manager
//! (crun refuses this kind of hybrid cgroup host) puts the container under `--cgroup-parent`,
//! the test cgroup the agent attaches to.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use sidecap_tests::*;

/// The bridge's subnet (inside the test's netns).
const SUBNET: &str = "10.251.77.0/24";
const SVC_ADDR: &str = "10.251.100.10:80";
/// Namespace the plugin gives podman's containers (podman sends no K8S_POD_NAMESPACE).
const NAMESPACE: &str = "podman";

fn which(bin: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin"].iter().map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}

/// A CNI plugin where Debian's containernetworking-plugins (or the upstream tarball) puts it.
fn cni_plugin(name: &str) -> Option<PathBuf> {
    ["/usr/lib/cni", "/opt/cni/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// podman (with runc and the CNI plugins) isolated under one directory.
struct Podman {
    dir: PathBuf,
    host_netns: PathBuf,
    /// The cgroup's name, also created by runc in each cgroup v1 hierarchy.
    cgroup_name: String,
}

impl Podman {
    fn new(dir: &Path, host: &Netns, cgroup: &TestCgroup) -> Podman {
        for d in ["cni-bin", "cni-conf", "graph", "run", "tmp", "ipam", "rootfs", "volumes"] {
            std::fs::create_dir_all(dir.join(d)).expect("podman dirs");
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            std::fs::copy(cni_plugin(plugin).expect("CNI plugin"), dir.join("cni-bin").join(plugin)).expect("copying plugin");
        }
        // The node's primary network: a bridge with host-local addresses.
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "cn-net",
            "plugins": [{
                "type": "bridge", "bridge": "cn-br0", "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": dir.join("ipam")},
            }],
        });
        std::fs::write(dir.join("cni-conf/10-cn.conflist"), serde_json::to_string_pretty(&conflist).unwrap()).unwrap();
        // Without CAP_SYS_RESOURCE (this machine's sandbox) no limit can be raised, and podman
        // asks for more by default: ask for what this process has. runc still refuses an
        // nproc equal to the hard limit here (EPERM, measured); a lower one is always allowed.
        let (nofile, nproc) = (hard_limit(libc::RLIMIT_NOFILE), hard_limit(libc::RLIMIT_NPROC).min(4096));
        let d = dir.display();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/cni-bin\"]\n\
                 network_config_dir = \"{d}/cni-conf\"\ndefault_network = \"cn-net\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nlock_type = \"file\"\n\
                 events_logger = \"file\"\nevents_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\n\
                 volume_path = \"{d}/volumes\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/graph\"\nrunroot = \"{d}/run\"\n"),
        )
        .unwrap();
        rootfs(&dir.join("rootfs"), Path::new(probe_bin!()));
        let cgroup_name = cgroup.path().file_name().unwrap().to_string_lossy().into_owned();
        Podman { dir: dir.into(), host_netns: host.path(), cgroup_name }
    }

    /// `podman ARGS` (bounded), in the test's host netns.
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new("timeout");
        c.args(["120", "nsenter"])
            .arg(format!("--net={}", self.host_netns.display()))
            .args(["podman", "--root"])
            .arg(self.dir.join("graph"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        c.output().expect("running podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "podman {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A container running `sc-probe ARGS` as its only process.
    fn create(&self, name: &str, probe_args: &[&str]) {
        let parent = format!("/{}", self.cgroup_name);
        let rootfs = self.dir.join("rootfs").display().to_string();
        let mut args = vec!["create", "--name", name, "--network", "cn-net", "--cgroup-parent", &parent, "--rootfs", &rootfs, "/sc-probe"];
        args.extend(probe_args);
        self.ok(&args);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        // runc's cgroupfs manager made the parent in every cgroup v1 hierarchy too.
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            let top = hierarchy.path().join(&self.cgroup_name);
            if hierarchy.file_name() != "unified" && top.is_dir() {
                remove_empty_tree(&top);
            }
        }
    }
}

fn remove_empty_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_tree(&e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("sidecap-tests: cgroup {}: {e}", dir.display());
    }
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid, writable rlimit for the kernel to fill.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut r) }, 0);
    r.rlim_max
}

/// A root holding `bin` at `/sc-probe` and the shared libraries it needs (from ldd).
fn rootfs(root: &Path, bin: &Path) {
    std::fs::copy(bin, root.join("sc-probe")).expect("copying sc-probe");
    let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&ldd.stdout);
    for lib in text.split_whitespace().filter(|w| w.starts_with('/')) {
        let dest = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dest).unwrap_or_else(|e| panic!("copying {lib}: {e}"));
    }
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
}

fn meshed_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  annotations:\n    \
         sidecar.istio.io/status: '{{\"containers\":[\"istio-proxy\"]}}'\nspec:\n  containers:\n  - name: app\n  - name: istio-proxy\n"
    )
}

fn missing_tools() -> Option<String> {
    let mut missing: Vec<&str> = ["podman", "runc", "conmon", "nsenter"].into_iter().filter(|b| which(b).is_none()).collect();
    missing.extend(["bridge", "host-local", "loopback"].into_iter().filter(|p| cni_plugin(p).is_none()));
    (!missing.is_empty())
        .then(|| format!("{missing:?} not installed (`cargo xtask setup` installs podman, runc, containernetworking-plugins)"))
}

#[test]
fn podman_runs_a_captured_container_through_the_cni_chain() {
    require_root!();
    if let Some(why) = missing_tools() {
        eprintln!("SKIP podman: {why}");
        return;
    }
    let cgroup = TestCgroup::new("cn-podman").expect("cgroup");
    let host = Netns::new("cn-host").expect("netns");
    let pins = BpfPinDir::new("cn-podman").expect("pins");
    let dir = TempDir::new("cn-podman").expect("tmp");
    let socket = dir.path().join("cni.sock");
    let mesh = MeshDir::new();
    mesh.write("pod-web.yaml", &meshed_pod("web"));
    mesh.service(NAMESPACE, "web", "10.251.100.10".parse().unwrap(), &[("tcp", 80)]);
    let sock_arg = socket.display().to_string();
    let mut agent = Agent::start(cgroup.path(), pins.path(), mesh.path(), &["--cni-socket", &sock_arg, "--cni-wait-secs", "10"]);
    agent.wait_ready(Duration::from_secs(20));
    let podman = Podman::new(&dir.path().join("podman"), &host, &cgroup);

    // The chain as a node would have it: install-cni appends sidecap-cni to the primary.
    let (conf_dir, bin_dir) = (podman.dir.join("cni-conf"), podman.dir.join("cni-bin"));
    let (code, out, err) = sidecap(&[
        "install-cni",
        "--cni-conf-dir",
        &conf_dir.display().to_string(),
        "--cni-bin-dir",
        &bin_dir.display().to_string(),
        "--socket",
        &sock_arg,
        "--pod-namespace",
        NAMESPACE,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let list: serde_json::Value = serde_json::from_slice(&std::fs::read(conf_dir.join("10-cn.conflist")).unwrap()).unwrap();
    assert_eq!(list["plugins"][1], serde_json::json!({"type": "sidecap-cni", "socketPath": sock_arg, "podNamespace": NAMESPACE}));

    // `podman init` makes the netns and runs the chain; the ADD returns once captured.
    podman.create("web", &["connect", SVC_ADDR, "--send", "first"]);
    podman.ok(&["init", "web"]);
    let v = inspect(pins.path());
    assert_eq!(v[0]["pod"], format!("{NAMESPACE}/web"), "{v:#}\n{}", agent.log());
    let ip = v[0]["ips"][0].as_str().unwrap_or_default().to_string();
    assert!(ip.starts_with("10.251.77."), "the pod's IP from the bridge's result: {v:#}");

    // The proxy (as the proxy user, in the test cgroup) listens in the container's netns
    // before the app's process starts.
    let sandbox = podman.ok(&["inspect", "web", "--format", "{{.NetworkSettings.SandboxKey}}"]);
    let netns = Netns::existing(Path::new(&sandbox)).expect("podman's netns");
    let proxy_cg = cgroup.child("proxy").expect("proxy cgroup");
    let probe = Probe::at(probe_bin!());
    let mut proxy =
        spawn_with(&netns, &proxy_cg, Creds::PROXY, probe.command(&["listen", "127.0.0.1:15001", "--max-conns", "1", "--max-secs", "60"]))
            .expect("proxy");
    assert!(proxy.wait_stdout("\"listening\"", Duration::from_secs(10)), "proxy: {}", proxy.stderr());

    // The container's first and only connect: captured, with the Service as original destination.
    let app = podman.ok(&["start", "--attach", "web"]);
    let r: serde_json::Value = serde_json::from_str(app.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {app}"));
    assert_eq!((r["ok"].as_bool(), r["peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    assert!(proxy.wait_stdout("\"conn\"", Duration::from_secs(10)));
    let conn: serde_json::Value =
        proxy.stdout().lines().find(|l| l.contains("\"conn\"")).map(|l| serde_json::from_str(l).unwrap()).unwrap();
    assert_eq!((conn["orig_dst"].as_str(), conn["received"].as_str()), (Some(SVC_ADDR), Some("first")), "{conn}");
    // The app exited, so podman tore its network down (CNI DEL): capture and CNI state go.
    let state_file = dir.path().join("cni.state.json");
    let no_attachments = || {
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
        state["attachments"] == serde_json::json!({})
    };
    wait_until("web's capture removed", Duration::from_secs(30), || inspect(pins.path()).as_array().unwrap().is_empty());
    assert!(no_attachments());
    podman.ok(&["rm", "web"]);

    // A container that keeps running (a server) is captured until it is removed.
    mesh.write("pod-server.yaml", &meshed_pod("server"));
    podman.create("server", &["listen", "0.0.0.0:9080", "--max-secs", "120"]);
    podman.ok(&["start", "server"]);
    let v = inspect(pins.path());
    assert_eq!(v[0]["pod"], format!("{NAMESPACE}/server"), "{v:#}\n{}", agent.log());
    assert!(!no_attachments());
    podman.ok(&["rm", "--force", "--time", "0", "server"]);
    wait_until("server's capture removed", Duration::from_secs(30), || inspect(pins.path()).as_array().unwrap().is_empty());
    assert!(no_attachments());

    // A captured container running when the agent goes down, then removed: its DEL cannot
    // reach the agent, yet `podman rm` succeeds (DEL always exits 0).
    podman.create("late", &["listen", "0.0.0.0:9080", "--max-secs", "120"]);
    mesh.write("pod-late.yaml", &meshed_pod("late"));
    podman.ok(&["start", "late"]);
    assert!(!no_attachments());
    assert_eq!(inspect(pins.path())[0]["pod"], format!("{NAMESPACE}/late"));
    agent.stop();
    podman.ok(&["rm", "--force", "--time", "0", "late"]);

    // With the agent down a new container is refused (fails closed), naming the reason; and
    // removing it still works.
    podman.create("web2", &["connect", SVC_ADDR]);
    let out = podman.run(&["start", "web2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without the agent: {err}");
    assert!(err.contains("sidecap agent unreachable at") && err.contains("pod podman/web2 cannot be captured"), "{err}");
    podman.ok(&["rm", "--force", "web2"]);

    // The next agent forgets the container whose DEL it missed (its netns is gone) and
    // removes its capture.
    agent.restart();
    agent.wait_ready(Duration::from_secs(20));
    assert!(agent.log().contains("netns gone while the agent was down; forgotten container="), "{}", agent.log());
    assert!(no_attachments());
    wait_until("late's capture removed", Duration::from_secs(30), || inspect(pins.path()).as_array().unwrap().is_empty());
}
