use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::*;

/// Calico's conflist as its install-cni writes it (calico-node v3.2x), with its kubeconfig beside it.
const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    }
  ]
}
"#;

/// Flannel's kube-flannel.yml `cni-conf.json`.
const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;

/// Old flannel: a single-plugin `.conf`.
const FLANNEL_CONF: &str = "{\n  \"name\": \"cbr0\",\n  \"cniVersion\": \"0.3.1\",\n  \"type\": \"flannel\",\n  \"delegate\": {\n    \"isDefaultGateway\": true\n  }\n}\n";

/// kindnet's template, tabs and its odd comma placement included.
const KINDNET: &str = "{\n\t\"cniVersion\": \"0.3.1\",\n\t\"name\": \"kindnet\",\n\t\"plugins\": [\n\t{\n\t\t\"type\": \"ptp\",\n\t\t\"ipMasq\": false,\n\t\t\"ipam\": {\n\t\t\t\"type\": \"host-local\",\n\t\t\t\"dataDir\": \"/run/cni-ipam-state\",\n\t\t\t\"routes\": [\n\t\t\t\t{ \"dst\": \"0.0.0.0/0\" }\n\t\t\t],\n\t\t\t\"ranges\": [\n\t\t\t\t[ { \"subnet\": \"10.244.0.0/24\" } ]\n\t\t\t]\n\t\t}\n\t\t,\n\t\t\"mtu\": 1500\n\t\t\n\t},\n\t{\n\t\t\"type\": \"portmap\",\n\t\t\"capabilities\": {\n\t\t\t\"portMappings\": true\n\t\t}\n\t}\n\t]\n}\n";

/// Cilium's, and a one-line conflist with a tricky string.
const CILIUM: &str = "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"cilium\",\n  \"plugins\": [\n    {\n       \"type\": \"cilium-cni\",\n       \"enable-debug\": false,\n       \"log-file\": \"/var/run/cilium/cilium-cni.log\"\n    }\n  ]\n}";
const ONE_LINE: &str = r#"{"cniVersion":"1.0.0","name":"x]\"}","meta":{"plugins":[1,2]},"plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","ranges":[[{"subnet":"10.22.0.0/16"}]]}}]}"#;

struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Dirs {
        let root = std::env::temp_dir().join(format!("sidecap-cni-install-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("net.d")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        // Other plugins already installed, and our source binary.
        fs::write(root.join("bin/calico"), b"\x7fELF calico").unwrap();
        fs::write(root.join("sidecap-cni.src"), b"\x7fELF sidecap-cni v1").unwrap();
        Dirs { root }
    }
    fn conf(&self) -> PathBuf {
        self.root.join("net.d")
    }
    fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.conf().join(name);
        fs::write(&p, text).unwrap();
        p
    }
    fn opts(&self, socket: &str) -> Options {
        Options {
            bin_dir: self.bin(),
            conf_dir: self.conf(),
            socket: socket.into(),
            plugin: self.root.join("sidecap-cni.src"),
            pod_namespace: None,
        }
    }
    /// Every file in the conf and bin dirs with its bytes and mode.
    fn snapshot(&self) -> Vec<(String, Vec<u8>, u32)> {
        let mut out = Vec::new();
        for d in [self.conf(), self.bin()] {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let m = e.metadata().unwrap().permissions().mode() & 0o7777;
                out.push((e.path().display().to_string(), fs::read(e.path()).unwrap(), m));
            }
        }
        out.sort();
        out
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

const SOCK: &str = "/var/run/sidecap/cni.sock";

fn plugins(path: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    v["plugins"].as_array().unwrap().clone()
}

#[test]
fn appends_to_each_real_conflist_and_removal_restores_every_byte() {
    for (name, text) in [
        ("10-calico.conflist", CALICO),
        ("10-flannel.conflist", FLANNEL),
        ("10-kindnet.conflist", KINDNET),
        ("05-cilium.conflist", CILIUM),
        ("10-one.conflist", ONE_LINE),
    ] {
        let d = Dirs::new("real");
        let path = d.write(name, text);
        d.write("calico-kubeconfig", "apiVersion: v1\nkind: Config\n");
        let before = d.snapshot();
        let orig: Vec<Value> = plugins(&path);

        let got = install(&d.opts(SOCK)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((got.conf.clone(), got.change.clone()), (path.clone(), ConfChange::Appended), "{name}");
        assert!(got.binary_written);
        let after = plugins(&path);
        assert_eq!(&after[..orig.len()], &orig[..], "{name}: the other plugins are untouched");
        assert_eq!(after.len(), orig.len() + 1);
        assert_eq!(after.last().unwrap(), &serde_json::json!({"type": "sidecap-cni", "socketPath": SOCK}), "{name}");
        let top_before: Value = serde_json::from_str(text).unwrap();
        let top_after: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(top_before["name"], top_after["name"]);
        assert_eq!(top_before["cniVersion"], top_after["cniVersion"]);
        let bin = d.bin().join("sidecap-cni");
        assert_eq!(fs::read(&bin).unwrap(), b"\x7fELF sidecap-cni v1");
        assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);

        // Idempotent: nothing is written the second time.
        let once = d.snapshot();
        let again = install(&d.opts(SOCK)).unwrap();
        assert_eq!((again.change, again.binary_written), (ConfChange::Unchanged, false), "{name}");
        assert_eq!(d.snapshot(), once, "{name}");

        let removed = uninstall(&d.conf(), &d.bin()).unwrap();
        assert_eq!(removed.confs, vec![path.clone()]);
        assert_eq!(removed.binary, Some(bin));
        let mut expected = before.clone();
        expected.retain(|(p, _, _)| !p.ends_with("sidecap-cni"));
        assert_eq!(d.snapshot(), expected, "{name}: uninstall gives back every byte");
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }
}

#[test]
fn picks_the_lexically_first_valid_configuration() {
    let d = Dirs::new("primary");
    d.write("99-loopback.conf", r#"{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}"#);
    d.write("10-calico.conflist", CALICO);
    d.write("05-broken.conflist", "{\"plugins\": [");
    d.write("04-empty.conflist", r#"{"name": "e", "plugins": []}"#);
    d.write("03-list-in-a-conf.conf", FLANNEL); // libcni: a .conf needs a type
    d.write("02-readme.md", "# not a config");
    d.write("calico-kubeconfig", "x");
    assert_eq!(primary_config(&d.conf()).unwrap(), Some(d.conf().join("10-calico.conflist")));
    let got = install(&d.opts(SOCK)).unwrap();
    assert_eq!(got.conf, d.conf().join("10-calico.conflist"));
    assert_eq!(
        fs::read_to_string(d.conf().join("99-loopback.conf")).unwrap(),
        r#"{"cniVersion": "0.3.1", "name": "lo", "type": "loopback"}"#
    );
    assert_eq!(fs::read_to_string(d.conf().join("03-list-in-a-conf.conf")).unwrap(), FLANNEL);
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_and_comes_back_on_removal() {
    let d = Dirs::new("conf");
    let conf = d.write("10-flannel.conf", FLANNEL_CONF);
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
    let before = d.snapshot();

    let got = install(&d.opts(SOCK)).unwrap();
    let list = d.conf().join("10-flannel.conflist");
    assert_eq!(got.change, ConfChange::Converted { from: conf.clone() });
    assert_eq!(got.conf, list);
    assert!(!conf.exists(), "the .conf is replaced: the runtime would pick it first");
    let v: Value = serde_json::from_str(&fs::read_to_string(&list).unwrap()).unwrap();
    assert_eq!((v["name"].as_str(), v["cniVersion"].as_str()), (Some("cbr0"), Some("0.3.1")));
    let p = v["plugins"].as_array().unwrap();
    assert_eq!(p[0], serde_json::from_str::<Value>(FLANNEL_CONF).unwrap(), "the plugin itself, unchanged");
    assert_eq!((p[1]["type"].as_str(), p.len()), (Some("sidecap-cni"), 2));
    assert_eq!(fs::metadata(&list).unwrap().permissions().mode() & 0o777, 0o600, "mode kept");
    assert_eq!(primary_config(&d.conf()).unwrap(), Some(list.clone()));

    assert_eq!(install(&d.opts(SOCK)).unwrap().change, ConfChange::Unchanged);
    // A new socket path keeps the record of the conversion.
    assert_eq!(install(&d.opts("/run/other.sock")).unwrap().change, ConfChange::Updated);

    let removed = uninstall(&d.conf(), &d.bin()).unwrap();
    assert_eq!(removed.restored, vec![conf.clone()]);
    let mut expected = before;
    expected.retain(|(p, _, _)| !p.ends_with("sidecap-cni"));
    assert_eq!(d.snapshot(), expected, "the .conf is back, byte for byte, mode too");
}

#[test]
fn a_conf_the_network_plugin_wrote_again_wins_over_our_stale_conflist() {
    let d = Dirs::new("rewrite");
    let conf = d.write("10-flannel.conf", FLANNEL_CONF);
    install(&d.opts(SOCK)).unwrap();
    // flanneld restarts and writes its .conf again: it sorts before our .conflist.
    d.write("10-flannel.conf", FLANNEL_CONF);
    assert_eq!(primary_config(&d.conf()).unwrap(), Some(conf.clone()));
    let got = install(&d.opts(SOCK)).unwrap();
    assert_eq!(got.change, ConfChange::Converted { from: conf.clone() });
    assert_eq!(got.cleaned, vec![d.conf().join("10-flannel.conflist")]);
    assert_eq!(plugins(&got.conf).len(), 2);

    // Rewritten again, then removal: the stale conflist goes, the fresh .conf stays.
    d.write("10-flannel.conf", "{\"type\": \"flannel\", \"name\": \"cbr0\", \"new\": true}");
    let removed = uninstall(&d.conf(), &d.bin()).unwrap();
    assert_eq!(removed.confs, vec![d.conf().join("10-flannel.conflist")]);
    assert!(!d.conf().join("10-flannel.conflist").exists());
    assert_eq!(fs::read_to_string(&conf).unwrap(), "{\"type\": \"flannel\", \"name\": \"cbr0\", \"new\": true}");
}

#[test]
fn our_entry_is_moved_last_and_kept_single() {
    let d = Dirs::new("move");
    let path = d.write("10-calico.conflist", CALICO);
    install(&d.opts(SOCK)).unwrap();
    // Someone appended after us (another chained plugin), and a duplicate of ours.
    let text = fs::read_to_string(&path).unwrap();
    let text = append_element(&text, r#"{"type": "tuning"}"#).unwrap();
    let text = append_element(&text, r#"{"type": "sidecap-cni", "socketPath": "/old"}"#).unwrap();
    let text = append_element(&text, r#"{"type": "sidecar-other"}"#).unwrap();
    fs::write(&path, text).unwrap();

    assert_eq!(install(&d.opts(SOCK)).unwrap().change, ConfChange::Updated);
    let types: Vec<String> = plugins(&path).iter().map(|p| p["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types, ["calico", "portmap", "bandwidth", "tuning", "sidecar-other", "sidecap-cni"]);
    assert_eq!(plugins(&path).last().unwrap()["socketPath"], SOCK);
    uninstall(&d.conf(), &d.bin()).unwrap();
    let types: Vec<String> = plugins(&path).iter().map(|p| p["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(types, ["calico", "portmap", "bandwidth", "tuning", "sidecar-other"]);
}

#[test]
fn a_new_primary_takes_our_entry_from_the_old_one() {
    let d = Dirs::new("switch");
    let flannel = d.write("10-flannel.conflist", FLANNEL);
    install(&d.opts(SOCK)).unwrap();
    let calico = d.write("05-calico.conflist", CALICO);
    let got = install(&d.opts(SOCK)).unwrap();
    assert_eq!((got.conf.clone(), got.change), (calico.clone(), ConfChange::Appended));
    assert_eq!(got.cleaned, vec![flannel.clone()]);
    assert_eq!(fs::read_to_string(&flannel).unwrap(), FLANNEL, "the old one is as it was");
    uninstall(&d.conf(), &d.bin()).unwrap();
    assert_eq!(fs::read_to_string(&calico).unwrap(), CALICO);
}

#[test]
fn clear_errors_and_a_forgiving_uninstall() {
    let d = Dirs::new("errors");
    match install(&d.opts(SOCK)) {
        Err(e @ Error::NoPrimary { .. }) => assert!(e.to_string().contains("no valid CNI network configuration"), "{e}"),
        other => panic!("{other:?}"),
    }
    d.write("10-calico.conflist", CALICO);
    let mut o = d.opts(SOCK);
    o.plugin = d.root.join("missing");
    assert!(matches!(install(&o), Err(Error::NoPlugin { .. })));
    assert_eq!(uninstall(&d.root.join("nope"), &d.root.join("nope-bin")).unwrap(), Removed::default());
    // Nothing of ours: nothing touched.
    let before = d.snapshot();
    assert_eq!(uninstall(&d.conf(), &d.bin()).unwrap(), Removed::default());
    assert_eq!(d.snapshot(), before);
    // A killed run's temp file is swept.
    fs::write(d.conf().join(".sidecap-10-calico.conflist.999.tmp"), "x").unwrap();
    install(&d.opts(SOCK)).unwrap();
    assert!(!d.conf().join(".sidecap-10-calico.conflist.999.tmp").exists());
}

#[test]
fn scanner_finds_the_top_level_plugins_only() {
    let s = plugins_spans(ONE_LINE).unwrap();
    assert_eq!(s.elems.len(), 1);
    assert_eq!(&ONE_LINE[s.open..=s.close], &ONE_LINE[ONE_LINE.rfind(":[{\"type\":\"bridge\"").unwrap() + 1..ONE_LINE.len() - 1]);
    assert!(plugins_spans(r#"{"a": {"plugins": [1]}}"#).is_err());
    let empty = r#"{"plugins": []}"#;
    assert_eq!(append_element(empty, "{\"type\": \"x\"}").unwrap(), r#"{"plugins": [{"type": "x"}]}"#);
    assert_eq!(remove_element(r#"{"plugins": [{"type": "x"}, 2]}"#, 0).unwrap(), r#"{"plugins": [2]}"#);
}

#[test]
fn the_pod_namespace_is_written_and_a_change_of_it_updates_the_entry() {
    let d = Dirs::new("podns");
    let path = d.write("87-podman.conflist", ONE_LINE);
    let podman = Options { pod_namespace: Some("podman".into()), ..d.opts(SOCK) };
    assert_eq!(install(&podman).unwrap().change, ConfChange::Appended);
    assert_eq!(plugins(&path).last().unwrap(), &serde_json::json!({"type": "sidecap-cni", "socketPath": SOCK, "podNamespace": "podman"}));
    assert_eq!(install(&podman).unwrap().change, ConfChange::Unchanged);
    // Without the flag the key goes again (a Kubernetes node never gets a guessed namespace).
    assert_eq!(install(&d.opts(SOCK)).unwrap().change, ConfChange::Updated);
    assert_eq!(plugins(&path).last().unwrap(), &serde_json::json!({"type": "sidecap-cni", "socketPath": SOCK}));
    uninstall(&d.conf(), &d.bin()).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), ONE_LINE);
}
