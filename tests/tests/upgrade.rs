//! Upgrades and removal: a new agent (e.g. a new DaemonSet version) takes over the pinned
//! links by swapping their programs atomically; uninstall leaves nothing behind.

use std::{process::Command, time::Duration};

use sidecap_tests::{fixture::SVC, *};

/// (link id, program id) of a pinned link, from bpftool.
fn link_info(pin: &std::path::Path) -> (u64, u64) {
    let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(pin).output().expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool link show {}: {e}: {}", pin.display(), String::from_utf8_lossy(&out.stderr)));
    (v["id"].as_u64().expect("link id"), v["prog_id"].as_u64().expect("prog id"))
}

fn prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn a_new_agent_swaps_programs_in_place_with_no_failed_connect() {
    require_root!();
    let mut m = Mesh::start(MeshSpec::default());
    let a = m.topo.pod("a");
    let _up = Upstream::start(m.topo.services(), (SVC, 80).into()).expect("upstream");
    let hp = Haproxy::start(a, HaproxyConfig::default()).expect("haproxy");
    let pins = m.pins.path().to_path_buf();
    let cookie = a.cookie().expect("cookie");
    let watched = [pins.join("links/connect4"), pins.join("links/getsockopt"), pins.join(format!("links/netns/{cookie}"))];
    let before: Vec<(u64, u64)> = watched.iter().map(|p| link_info(p)).collect();

    let p = Probe::at(probe_bin!());
    let args = ["loop", "10.251.100.10:80", "--count", "40", "--interval-ms", "50", "--summary-only", "--send", "u"];
    let mut looper = spawn_in(a, Creds::APP.uid, Creds::APP.gid, p.command(&args)).expect("loop");
    std::thread::sleep(Duration::from_millis(400));
    // The "old version" stops (as a rolling update's SIGTERM does), the "new" one starts.
    assert_eq!(m.agent.stop(), Some(0));
    m.agent.restart();
    m.agent.wait_ready(sidecap_tests::fixture::WAIT);
    let (_, out) = looper.finish(Duration::from_secs(60));
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("summary");
    assert_eq!((summary["ok"].as_u64(), summary["failed"].as_u64()), (Some(40), Some(0)), "{summary}\n{}", m.agent.log());
    assert!(hp.log_lines().iter().filter(|e| e.frontend == Some((SVC, 80).into())).count() == 40, "every connect captured");

    let after: Vec<(u64, u64)> = watched.iter().map(|p| link_info(p)).collect();
    for ((pin, (l0, p0)), (l1, p1)) in watched.iter().zip(&before).zip(&after) {
        assert_eq!(l0, l1, "{}: the same link object stays attached", pin.display());
        assert_ne!(p0, p1, "{}: it runs the new agent's program", pin.display());
        assert!(!prog_exists(*p0), "{}: the old program {p0} is released", pin.display());
    }
    assert!(m.agent.log().contains("pod_links_updated=1"), "{}", m.agent.log());
}

/// `maps/ABI_VERSION[0]` as pinned.
fn pinned_abi_version(pins: &std::path::Path) -> u32 {
    let out = Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(pins.join("maps/ABI_VERSION"))
        .args(["key", "0", "0", "0", "0"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool map lookup: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let bytes: Vec<u8> = v["value"]
        .as_array()
        .expect("value bytes")
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().expect("hex byte").trim_start_matches("0x"), 16).expect("hex"))
        .collect();
    u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn set_pinned_abi_version(pins: &std::path::Path, v: u32) {
    let mut args: Vec<String> = vec!["map".into(), "update".into(), "pinned".into()];
    args.push(pins.join("maps/ABI_VERSION").display().to_string());
    args.extend(["key", "0", "0", "0", "0", "value"].map(String::from));
    args.extend(v.to_le_bytes().iter().map(|b| b.to_string()));
    let st = Command::new("bpftool").args(&args).status().expect("bpftool");
    assert!(st.success(), "bpftool {args:?}");
}

/// Pins made by another layout version (a newer agent's, or one from before versioning)
/// are refused with both versions named, and left as they are: the running programs keep
/// their maps, nothing is misread or overwritten.
#[test]
fn an_agent_refuses_maps_pinned_by_another_layout_version() {
    require_root!();
    let mut m = Mesh::start(MeshSpec::default());
    let pins = m.pins.path().to_path_buf();
    let ours = pinned_abi_version(&pins);
    assert!(ours >= 1, "the agent stamps its layout version, got {ours}");
    let (_, prog_before) = link_info(&pins.join("links/connect4"));
    assert_eq!(m.agent.stop(), Some(0));

    // A layout this agent does not know.
    set_pinned_abi_version(&pins, ours + 1);
    m.agent.restart();
    let code = m.agent.wait_exit(Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0), "the agent must exit with an error, got {code:?}\n{}", m.agent.log());
    let want = format!("layout version {}, this sidecap uses version {ours}", ours + 1);
    assert!(m.agent.log().contains(&want), "{want:?} not in the log:\n{}", m.agent.log());
    assert_eq!(link_info(&pins.join("links/connect4")).1, prog_before, "the attached program is left alone");
    let (code, _, err) = sidecap(&["inspect", "--bpffs", &pins.display().to_string()]);
    assert!(code != 0 && err.contains(&want), "inspect refuses too: {code} {err}");

    // Back to ours: the agent adopts the pins again.
    set_pinned_abi_version(&pins, ours);
    m.agent.restart();
    m.agent.wait_ready(sidecap_tests::fixture::WAIT);
    assert_eq!(m.agent.stop(), Some(0));

    // Maps from before versioning carry no version map at all.
    std::fs::remove_file(pins.join("maps/ABI_VERSION")).expect("unpin ABI_VERSION");
    m.agent.restart();
    let code = m.agent.wait_exit(Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0), "got {code:?}\n{}", m.agent.log());
    let want = format!("layout version 0, this sidecap uses version {ours}");
    assert!(m.agent.log().contains(&want), "{want:?} not in the log:\n{}", m.agent.log());
}
