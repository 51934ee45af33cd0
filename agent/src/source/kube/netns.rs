//! Finding a pod's network namespace from its processes: kubelet puts every container of a
//! pod (the sandbox's pause process included) in a cgroup whose path names the pod UID, as
//! `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid_with_underscores>.slice`
//! (systemd driver). Any such process's `/proc/<pid>/ns/net` is the pod's netns.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// The pod UID named by one line of `/proc/<pid>/cgroup` (`ID:CONTROLLERS:PATH`), normalised
/// to the API's dashed form. The innermost pod segment wins.
pub fn pod_uid_in_cgroup_line(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').rev().find_map(pod_uid_in_segment)
}

/// `pod<uid>`, `pod<uid_>.slice`, `kubepods-besteffort-pod<uid_>.slice`.
pub(crate) fn pod_uid_in_segment(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let rest = match seg.strip_prefix("pod") {
        Some(r) => r,
        None => &seg[seg.rfind("-pod")? + 4..],
    };
    normalise_uid(rest)
}

/// A UID is 8-4-4-4-12 hex digits; systemd slices spell the dashes as underscores.
pub(crate) fn normalise_uid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split(['-', '_']).collect();
    let shape_ok =
        groups.len() == 5 && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    shape_ok.then(|| groups.join("-").to_ascii_lowercase())
}

/// Every pod UID with a live process under `proc_root`, mapped to its lowest PID (the sandbox
/// usually starts first).
pub fn pod_pids(proc_root: &Path) -> HashMap<String, u32> {
    let mut out: HashMap<String, u32> = HashMap::new();
    let Ok(rd) = std::fs::read_dir(proc_root) else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(text) = std::fs::read_to_string(e.path().join("cgroup")) else { continue };
        if let Some(uid) = text.lines().find_map(pod_uid_in_cgroup_line) {
            out.entry(uid).and_modify(|p| *p = (*p).min(pid)).or_insert(pid);
        }
    }
    out
}

/// The network namespace of the pod with this UID: `/proc/<pid>/ns/net` of one of its
/// processes, or None when none runs on this node (yet).
pub fn netns_of_pod(proc_root: &Path, uid: &str) -> Option<PathBuf> {
    let uid = normalise_uid(uid)?;
    pod_pids(proc_root).get(&uid).map(|pid| netns_path(proc_root, *pid))
}

pub fn netns_path(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("ns/net")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e";

    #[test]
    fn cgroupfs_and_systemd_lines() {
        let lines = [
            // cgroup v2, cgroupfs driver, burstable and guaranteed
            "0::/kubepods/burstable/pod1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e/0123456789abcdef",
            "0::/kubepods/pod1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e/0123456789abcdef",
            // cgroup v1, cgroupfs driver
            "11:memory:/kubepods/besteffort/pod1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e/abc",
            // systemd driver (cgroup v2 and v1)
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f6a_4b7c_8d9e_0f1a2b3c4d5e.slice/cri-containerd-0123.scope",
            "0::/kubepods.slice/kubepods-pod1b2c3d4e_5f6a_4b7c_8d9e_0f1a2b3c4d5e.slice/crio-0123.scope",
            "3:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_5f6a_4b7c_8d9e_0f1a2b3c4d5e.slice/docker-0123.scope",
            // nested (kind): kubelet's own prefix
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod1B2C3D4E_5F6A_4B7C_8D9E_0F1A2B3C4D5E.slice/cri-containerd-0.scope",
            // the pod cgroup itself (no container below)
            "0::/kubepods/burstable/pod1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
        ];
        for l in lines {
            assert_eq!(pod_uid_in_cgroup_line(l).as_deref(), Some(UID), "{l}");
        }
    }

    #[test]
    fn non_pod_lines() {
        let lines = [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-1000.slice/session-2.scope",
            "0::/kubepods/burstable",
            "0::/kubepods.slice/kubepods-burstable.slice",
            "0::/kubepods/burstable/pod1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5", // one digit short
            "0::/kubepods/burstable/podzzzzzzzz-5f6a-4b7c-8d9e-0f1a2b3c4d5e", // not hex
            "0::/kubepods/burstable/pods/1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e", // not a pod segment
            "garbage",
        ];
        for l in lines {
            assert_eq!(pod_uid_in_cgroup_line(l), None, "{l}");
        }
    }

    #[test]
    fn scans_a_proc_tree() {
        let root = std::env::temp_dir().join(format!("sidecap-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |pid: &str, text: &str| {
            std::fs::create_dir_all(root.join(pid)).expect("mkdir");
            std::fs::write(root.join(pid).join("cgroup"), text).expect("write");
        };
        write("1", "0::/init.scope\n");
        write("700", &format!("0::/kubepods/burstable/pod{UID}/bbb\n"));
        write("650", &format!("0::/kubepods/burstable/pod{UID}/aaa\n"));
        write("800", "0::/kubepods.slice/kubepods-pod00000000_0000_0000_0000_000000000001.slice/x.scope\n");
        write("self", "0::/\n");
        std::fs::create_dir_all(root.join("net")).expect("mkdir");

        assert_eq!(netns_of_pod(&root, UID), Some(root.join("650/ns/net")));
        assert_eq!(netns_of_pod(&root, &UID.to_uppercase()), Some(root.join("650/ns/net")));
        assert_eq!(netns_of_pod(&root, "00000000-0000-0000-0000-000000000001"), Some(root.join("800/ns/net")));
        assert_eq!(netns_of_pod(&root, "00000000-0000-0000-0000-000000000002"), None);
        assert_eq!(netns_of_pod(&root, "not-a-uid"), None);
        assert_eq!(pod_pids(&root).len(), 2);
        let _ = std::fs::remove_dir_all(&root);
    }
}
