//! deploy/ in CI: every manifest parses as the Kubernetes type it claims (k8s-openapi, and a
//! field the type does not know fails: typed, serialized again, compared), every kustomize
//! patch is checked merged onto what it patches, every kustomization renders (`kubectl
//! kustomize`, kustomize built into kubectl), and every `sidecap` invocation in a DaemonSet
//! uses only flags its `--help` documents, with values its parser accepts. No root needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sidecap_tests::sidecap_bin;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").canonicalize().expect("deploy/")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
}

/// Every document of a YAML stream, as JSON values (empty documents skipped).
fn parse_docs(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).unwrap_or_else(|e| panic!("{what}: document {}: {e}", i + 1));
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

fn load(path: &Path) -> Vec<Value> {
    parse_docs(&std::fs::read_to_string(path).expect("read"), &path.display().to_string())
}

/// Typed as `T`, then serialized again: whatever the input has that the output lacks (or
/// has differently) is a field `T` does not know, i.e. a typo Kubernetes would drop or reject.
fn strict<T: DeserializeOwned + Serialize>(v: &Value) -> Result<(), String> {
    let t: T = serde_path_to_error::deserialize(v).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut errs = Vec::new();
    diff(v, &back, "", &mut errs);
    if errs.is_empty() { Ok(()) } else { Err(errs.join("; ")) }
}

fn diff(input: &Value, output: &Value, path: &str, errs: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => diff(va, vb, &p, errs),
                    None if va.is_null() => {}
                    None => errs.push(format!("{p}: unknown field")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(x, y, &format!("{path}[{i}]"), errs);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => errs.push(format!("{path}: {a} reads back as {b}")),
    }
}

const KUSTOMIZATION_KEYS: [&str; 8] = ["apiVersion", "kind", "resources", "patches", "images", "namespace", "labels", "commonAnnotations"];

/// One manifest document against the type its apiVersion/kind name.
fn check_typed(v: &Value) -> Result<(), String> {
    let api = v["apiVersion"].as_str().unwrap_or("");
    let kind = v["kind"].as_str().unwrap_or("");
    match (api, kind) {
        ("v1", "Namespace") => strict::<Namespace>(v),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(v),
        ("v1", "ConfigMap") => strict::<ConfigMap>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(v),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict::<ClusterRoleBinding>(v),
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(v),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<RoleBinding>(v),
        ("apps/v1", "DaemonSet") => strict::<DaemonSet>(v),
        ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
            let unknown: Vec<&String> = v
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
                .filter(|k| !KUSTOMIZATION_KEYS.contains(&k.as_str()))
                .collect();
            if unknown.is_empty() { Ok(()) } else { Err(format!("Kustomization fields this test does not know: {unknown:?}")) }
        }
        _ => Err(format!("apiVersion {api:?} kind {kind:?}: not a type this test checks (add it)")),
    }
}

fn name_of(v: &Value) -> (String, String) {
    (v["kind"].as_str().unwrap_or("").to_string(), v["metadata"]["name"].as_str().unwrap_or("").to_string())
}

/// Strategic merge as kustomize does it for these patches: maps merge, lists of named
/// items merge by name, other lists and scalars are replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, pv) in p {
                match b.get_mut(k) {
                    Some(bv) => merge(bv, pv),
                    None => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p)) if p.iter().chain(b.iter()).all(|x| x["name"].is_string()) => {
            for pv in p {
                match b.iter_mut().find(|bv| bv["name"] == pv["name"]) {
                    Some(bv) => merge(bv, pv),
                    None => b.push(pv.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// The kustomizations under deploy/ and the files they name.
struct Tree {
    kustomizations: Vec<PathBuf>,
    resources: BTreeSet<PathBuf>,
    patches: BTreeSet<PathBuf>,
}

fn tree(deploy: &Path) -> Tree {
    let mut files = Vec::new();
    yaml_files(deploy, &mut files);
    let mut t = Tree { kustomizations: Vec::new(), resources: BTreeSet::new(), patches: BTreeSet::new() };
    for k in files.iter().filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml")) {
        t.kustomizations.push(k.clone());
        let dir = k.parent().unwrap();
        let v = &load(k)[0];
        for r in v["resources"].as_array().into_iter().flatten() {
            let p = dir.join(r.as_str().expect("resource path"));
            assert!(p.exists(), "{}: resource {} does not exist", k.display(), p.display());
            if p.is_file() {
                t.resources.insert(p.canonicalize().unwrap());
            }
        }
        for pt in v["patches"].as_array().into_iter().flatten() {
            let p = dir.join(pt["path"].as_str().expect("patches[].path"));
            assert!(p.is_file(), "{}: patch {} does not exist", k.display(), p.display());
            t.patches.insert(p.canonicalize().unwrap());
        }
    }
    t
}

#[test]
fn every_manifest_is_the_kubernetes_type_it_claims() {
    let deploy = deploy_dir();
    let t = tree(&deploy);
    let mut files = Vec::new();
    yaml_files(&deploy, &mut files);
    let resources: Vec<Value> = t.resources.iter().flat_map(|p| load(p)).collect();
    let mut checked = 0;
    let mut errors = Vec::new();
    for f in &files {
        let canon = f.canonicalize().unwrap();
        let is_kustomization = t.kustomizations.contains(f);
        if !is_kustomization && !t.resources.contains(&canon) && !t.patches.contains(&canon) {
            errors.push(format!("{}: no kustomization names it", f.display()));
        }
        for (i, doc) in load(f).iter().enumerate() {
            let what = format!("{} (document {})", f.strip_prefix(&deploy).unwrap().display(), i + 1);
            let result = if t.patches.contains(&canon) {
                // A patch is partial: check it merged onto what it patches.
                match resources.iter().find(|r| name_of(r) == name_of(doc)) {
                    Some(base) => {
                        let mut merged = base.clone();
                        merge(&mut merged, doc);
                        check_typed(&merged)
                    }
                    None => Err(format!("patches {:?}, which no resource defines", name_of(doc))),
                }
            } else {
                check_typed(doc)
            };
            if let Err(e) = result {
                errors.push(format!("{what}: {e}"));
            }
            checked += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 12, "only {checked} documents found under {}", deploy.display());
    eprintln!("{checked} documents in {} files typed strictly", files.len());
}

#[test]
fn the_strict_check_catches_a_typo() {
    let ds = load(&deploy_dir().join("base/daemonset.yaml")).remove(0);
    assert_eq!(check_typed(&ds), Ok(()));
    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let err = check_typed(&typo).unwrap_err();
    assert!(err.contains(".spec.template.spec.hostNetwrok: unknown field"), "{err}");
    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["ad"] = serde_json::json!(["BPF"]);
    assert!(check_typed(&typo).unwrap_err().contains("capabilities.ad: unknown field"));
    let mut wrong_type = ds;
    wrong_type["spec"]["template"]["spec"]["hostPID"] = Value::String("yes".into());
    assert!(check_typed(&wrong_type).unwrap_err().contains("hostPID"));
}

/// Long flags `sidecap SUB --help` documents.
fn documented_flags(sub: &str) -> BTreeSet<String> {
    let out = Command::new(sidecap_bin()).args([sub, "--help"]).output().expect("sidecap --help");
    assert!(out.status.success(), "sidecap {sub} --help: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect::<String>())
        .filter(|w| !w.is_empty())
        .collect()
}

/// `$(VAR)` expanded as the kubelet does; an undefined variable is an error.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(')').ok_or_else(|| format!("unclosed $( in {arg:?}"))?;
        let name = &rest[i + 2..i + end];
        out.push_str(env.get(name).ok_or_else(|| format!("{arg:?}: ${name} is not defined for the container"))?);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The container's environment: envFrom ConfigMaps, then env (literals and ConfigMap keys).
fn container_env(c: &Container, configmaps: &BTreeMap<String, BTreeMap<String, String>>) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            let data = configmaps.get(&r.name).ok_or_else(|| format!("envFrom ConfigMap {} not in the manifests", r.name))?;
            env.extend(data.iter().map(|(k, v)| (format!("{}{k}", from.prefix.as_deref().unwrap_or("")), v.clone())));
        }
    }
    for e in c.env.iter().flatten() {
        let v = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(vf)) => match (&vf.config_map_key_ref, &vf.field_ref) {
                (Some(k), _) => configmaps
                    .get(&k.name)
                    .and_then(|d| d.get(&k.key))
                    .cloned()
                    .ok_or_else(|| format!("env {}: ConfigMap {} key {} not found", e.name, k.name, k.key))?,
                (None, Some(f)) => format!("<{}>", f.field_path),
                _ => format!("<{}>", e.name),
            },
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), v);
    }
    Ok(env)
}

/// Every `sidecap` invocation in the DaemonSets of a document set, checked against the binary.
fn check_invocations(docs: &[Value], what: &str) -> usize {
    let configmaps: BTreeMap<String, BTreeMap<String, String>> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| {
            let cm: ConfigMap = serde_json::from_value(d.clone()).expect("ConfigMap");
            (cm.metadata.name.unwrap_or_default(), cm.data.unwrap_or_default().into_iter().collect())
        })
        .collect();
    let mut n = 0;
    for d in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
        let ds: DaemonSet = serde_json::from_value(d.clone()).expect("DaemonSet");
        let pod = ds.spec.unwrap().template.spec.unwrap();
        for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
            let who = format!("{what}: DaemonSet {} container {}", name_of(d).1, c.name);
            // The image's ENTRYPOINT is sidecap; `command` may name it or something else.
            let runs_sidecap = c.command.as_ref().is_none_or(|cmd| cmd.first().is_some_and(|b| b.rsplit('/').next() == Some("sidecap")));
            if !runs_sidecap {
                continue;
            }
            let env = container_env(c, &configmaps).unwrap_or_else(|e| panic!("{who}: {e}"));
            let mut argv: Vec<String> = c.command.iter().flatten().skip(1).chain(c.args.iter().flatten()).cloned().collect();
            argv = argv.iter().map(|a| expand(a, &env)).collect::<Result<_, _>>().unwrap_or_else(|e| panic!("{who}: {e}"));
            let sub = argv.first().unwrap_or_else(|| panic!("{who}: no subcommand")).clone();
            let known = documented_flags(&sub);
            for a in argv.iter().skip(1).filter(|a| a.starts_with("--")) {
                let flag = a[2..].split('=').next().unwrap();
                assert!(known.contains(flag), "{who}: --{flag} is not a flag of `sidecap {sub}` (its --help documents {known:?})");
            }
            // The real parser takes every flag and value: `--help` last returns 0 only then.
            let out = Command::new(sidecap_bin()).args(&argv).arg("--help").output().expect("sidecap");
            assert!(out.status.success(), "{who}: `sidecap {}` is refused: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr));
            n += 1;
        }
    }
    n
}

#[test]
fn daemonset_flags_are_ones_the_agent_documents() {
    let deploy = deploy_dir();
    let base: Vec<Value> = ["base/config.yaml", "base/daemonset.yaml"].iter().flat_map(|f| load(&deploy.join(f))).collect();
    assert_eq!(check_invocations(&base, "deploy/base"), 2, "agent and install-cni");
    let uninstall = load(&deploy.join("uninstall/daemonset.yaml"));
    assert_eq!(check_invocations(&uninstall, "deploy/uninstall"), 1);
}

#[test]
fn the_flag_check_catches_an_unknown_flag_and_a_bad_value() {
    let deploy = deploy_dir();
    let mut docs: Vec<Value> = ["base/config.yaml", "base/daemonset.yaml"].iter().flat_map(|f| load(&deploy.join(f))).collect();
    let args = &mut docs[1]["spec"]["template"]["spec"]["containers"][0]["args"];
    args.as_array_mut().unwrap().push("--proxy-uid=1337".into());
    let r = std::panic::catch_unwind(|| check_invocations(&docs, "typo"));
    let msg = r.err().and_then(|e| e.downcast_ref::<String>().cloned()).unwrap_or_default();
    assert!(msg.contains("--proxy-uid is not a flag of `sidecap agent`"), "{msg}");

    let mut docs: Vec<Value> = ["base/config.yaml", "base/daemonset.yaml"].iter().flat_map(|f| load(&deploy.join(f))).collect();
    docs[0]["data"]["SIDECAP_ALLOW_ANY"] = "sometimes".into();
    let r = std::panic::catch_unwind(|| check_invocations(&docs, "bad value"));
    let msg = r.err().and_then(|e| e.downcast_ref::<String>().cloned()).unwrap_or_default();
    assert!(msg.contains("is refused") && msg.contains("sometimes"), "{msg}");
}

/// What the deployment promises, on the rendered DaemonSet: no privileged container, named
/// capabilities, host namespaces, node name, probes on the admin port, resources, priority,
/// tolerations, one node at a time, the mounts the agent uses.
fn check_agent_daemonset(docs: &[Value], what: &str) {
    let d = docs
        .iter()
        .find(|d| name_of(d) == ("DaemonSet".into(), "sidecap".into()))
        .unwrap_or_else(|| panic!("{what}: no DaemonSet sidecap"));
    let ds: DaemonSet = serde_json::from_value(d.clone()).unwrap();
    let spec = ds.spec.unwrap();
    let ru = spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(ru.max_unavailable, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)), "{what}");
    let pod = spec.template.spec.unwrap();
    assert_eq!((pod.host_pid, pod.host_network), (Some(true), Some(true)), "{what}");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{what}");
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "{what}: tolerate every taint"
    );
    let cm = docs.iter().find(|d| name_of(d) == ("ConfigMap".into(), "sidecap-config".into())).unwrap();
    let admin_port: i32 = cm["data"]["SIDECAP_ADMIN_ADDR"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let socket = PathBuf::from(cm["data"]["SIDECAP_CNI_SOCKET"].as_str().unwrap());
    for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        let sc = c.security_context.clone().unwrap_or_else(|| panic!("{what}: {} has no securityContext", c.name));
        assert_ne!(sc.privileged, Some(true), "{what}: {} is privileged", c.name);
        let caps = sc.capabilities.unwrap_or_default();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{what}: {} drops every capability first", c.name);
        let r = c.resources.clone().unwrap_or_default();
        assert!(r.requests.is_some_and(|m| m.contains_key("cpu") && m.contains_key("memory")), "{what}: {} requests", c.name);
        assert!(r.limits.is_some_and(|m| m.contains_key("memory")), "{what}: {} memory limit", c.name);
    }
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let caps = agent.security_context.clone().unwrap().capabilities.unwrap().add.unwrap();
    assert_eq!(caps, ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"], "{what}: the capabilities deploy/README.md explains");
    let node = agent.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(node.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    let port = agent.ports.iter().flatten().find(|p| p.name.as_deref() == Some("admin")).expect("admin port");
    assert_eq!(port.container_port, admin_port, "{what}: the probes' port is the one --admin-addr serves");
    for (probe, path) in [(&agent.liveness_probe, "/healthz"), (&agent.readiness_probe, "/readyz")] {
        let g = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{what}: {path} probe"));
        assert_eq!((g.path.as_deref(), g.host.as_deref()), (Some(path), Some("127.0.0.1")), "{what}");
        assert_eq!(g.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("admin".into()));
    }
    // Mounts: name → (mountPath, hostPath).
    let host: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    let mounts: BTreeMap<String, String> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.clone(), host.get(&m.name).cloned().unwrap_or_default()))
        .collect();
    assert_eq!(mounts.get("/sys/fs/bpf").map(String::as_str), Some("/sys/fs/bpf"), "{what}: bpffs");
    assert!(mounts.contains_key("/host/sys/fs/cgroup"), "{what}: cgroup v2");
    assert_eq!(mounts.get("/var/run/netns").map(String::as_str), Some("/var/run/netns"), "{what}: CNI_NETNS paths");
    let sock_dir = socket.parent().unwrap().display().to_string();
    assert_eq!(mounts.get(&sock_dir), Some(&sock_dir), "{what}: the CNI socket's directory is the same path on the host");
    let cgroup = cm["data"]["SIDECAP_CGROUP"].as_str().unwrap();
    assert!(cgroup.starts_with("/host/sys/fs/cgroup"), "{what}: --cgroup {cgroup} is inside the host's cgroup2 mount");
    let installer = pod.containers.iter().find(|c| c.name == "install-cni").expect("install-cni container");
    let im: BTreeSet<String> = installer.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
    assert!(im.contains("/host/opt/cni/bin") && im.contains("/host/etc/cni/net.d"), "{what}: CNI dirs");
}

#[test]
fn every_kustomization_renders_and_keeps_its_promises() {
    let deploy = deploy_dir();
    let have_kubectl = Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success());
    if !have_kubectl {
        assert!(std::env::var_os("CI").is_none(), "CI needs kubectl (kustomize) to render deploy/");
        eprintln!("SKIP rendering: no kubectl (its built-in kustomize renders deploy/)");
        let base: Vec<Value> = ["base/config.yaml", "base/daemonset.yaml"].iter().flat_map(|f| load(&deploy.join(f))).collect();
        check_agent_daemonset(&base, "deploy/base (unrendered)");
        return;
    }
    for k in tree(&deploy).kustomizations {
        let dir = k.parent().unwrap();
        let what = dir.strip_prefix(&deploy).unwrap().display().to_string();
        let out = Command::new("kubectl").arg("kustomize").arg(dir).output().expect("kubectl kustomize");
        assert!(out.status.success(), "kubectl kustomize {what}: {}", String::from_utf8_lossy(&out.stderr));
        let docs = parse_docs(&String::from_utf8_lossy(&out.stdout), &what);
        for d in &docs {
            check_typed(d).unwrap_or_else(|e| panic!("{what} rendered, {:?}: {e}", name_of(d)));
        }
        let n = check_invocations(&docs, &what);
        if what == "uninstall" {
            assert_eq!(n, 1);
        } else {
            assert_eq!(n, 2, "{what}");
            assert_eq!(docs.len(), 8, "{what}: Namespace, ServiceAccount, ClusterRole(Binding), Role(Binding), ConfigMap, DaemonSet");
            check_agent_daemonset(&docs, &what);
        }
        eprintln!("{what}: rendered {} objects, {n} sidecap invocations checked", docs.len());
    }
}
