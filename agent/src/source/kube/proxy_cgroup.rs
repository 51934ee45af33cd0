//! Finding the proxy container's cgroup: kubelet puts each container of a pod in a cgroup
//! directory below the pod's, named after the container id the pod's status reports:
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>/<id>` (CRI-O: `crio-<id>`);
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/`
//!   `cri-containerd-<id>.scope` (`crio-<id>.scope`, `docker-<id>.scope`).
//!
//! The search reads only directory names: from the cgroup2 root it descends into
//! `kubepods*`/`kubelet*` directories (kind nests kubelet's own slice) and the cgroupfs QoS
//! classes (`burstable`, `besteffort`) to the pod's
//! directory, then picks the child that names the container.

use std::path::{Path, PathBuf};

use super::netns::{normalise_uid, pod_uid_in_segment};

/// Deepest pod directory looked for (`kubelet.slice/kubelet-kubepods.slice/…-<qos>.slice/pod`).
const MAX_DEPTH: usize = 5;

/// The cgroup directory of container `container_id` (no `<runtime>://` scheme) of the pod
/// with UID `pod_uid`, under the cgroup2 mount `root`; None when it does not exist (yet).
pub fn container_cgroup(root: &Path, pod_uid: &str, container_id: &str) -> Option<PathBuf> {
    let uid = normalise_uid(pod_uid)?;
    if container_id.is_empty() || container_id.contains('/') {
        return None;
    }
    let pod_dir = find_pod_dir(root, &uid, 0)?;
    subdirs(&pod_dir).into_iter().find(|(name, _)| names_container(name, container_id)).map(|(_, path)| path)
}

fn find_pod_dir(dir: &Path, uid: &str, depth: usize) -> Option<PathBuf> {
    if depth >= MAX_DEPTH {
        return None;
    }
    let children = subdirs(dir);
    if let Some((_, p)) = children.iter().find(|(name, _)| pod_uid_in_segment(name).as_deref() == Some(uid)) {
        return Some(p.clone());
    }
    children
        .iter()
        .filter(|(name, _)| name.starts_with("kubepods") || name.starts_with("kubelet") || (depth > 0 && is_qos(name)))
        .find_map(|(_, p)| find_pod_dir(p, uid, depth + 1))
}

/// cgroupfs's QoS classes below `kubepods` (guaranteed pods sit in `kubepods` itself).
fn is_qos(name: &str) -> bool {
    matches!(name, "burstable" | "besteffort")
}

/// `<id>`, `<runtime>-<id>` or `<runtime>-<id>.scope`; never CRI-O's monitor
/// (`crio-conmon-<id>.scope`), which runs beside the container, not in it.
fn names_container(name: &str, id: &str) -> bool {
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    if stem == id {
        return true;
    }
    stem.strip_suffix(id)
        .and_then(|p| p.strip_suffix('-'))
        .is_some_and(|runtime| !runtime.is_empty() && !runtime.ends_with("conmon"))
}

/// (name, path) of each subdirectory, sorted by name (deterministic).
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e";
    const SYSTEMD_POD: &str = "kubepods-burstable-pod1b2c3d4e_5f6a_4b7c_8d9e_0f1a2b3c4d5e.slice";
    const PROXY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const APP: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str, dirs: &[String]) -> Tree {
            let root = std::env::temp_dir().join(format!("sidecap-cgtree-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for d in dirs {
                std::fs::create_dir_all(root.join(d)).expect("mkdir");
            }
            Tree(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn cgroupfs_driver() {
        let pod = format!("kubepods/burstable/pod{UID}");
        let t = Tree::new("cgroupfs", &[format!("{pod}/{PROXY}"), format!("{pod}/{APP}"), "kubepods/besteffort/podx".into()]);
        assert_eq!(container_cgroup(&t.0, UID, PROXY), Some(t.0.join(&pod).join(PROXY)));
        assert_eq!(container_cgroup(&t.0, UID, APP), Some(t.0.join(&pod).join(APP)));
        assert_eq!(container_cgroup(&t.0, &UID.to_uppercase(), PROXY), Some(t.0.join(&pod).join(PROXY)));
        // Guaranteed pods sit directly under kubepods.
        let g = Tree::new("guaranteed", &[format!("kubepods/pod{UID}/{PROXY}")]);
        assert_eq!(container_cgroup(&g.0, UID, PROXY), Some(g.0.join(format!("kubepods/pod{UID}/{PROXY}"))));
    }

    #[test]
    fn systemd_driver_and_runtimes() {
        let pod = format!("kubepods.slice/kubepods-burstable.slice/{SYSTEMD_POD}");
        let t = Tree::new(
            "systemd",
            &[
                format!("{pod}/crio-conmon-{PROXY}.scope"),
                format!("{pod}/crio-{PROXY}.scope"),
                format!("{pod}/cri-containerd-{APP}.scope"),
                "system.slice/containerd.service".into(),
            ],
        );
        assert_eq!(container_cgroup(&t.0, UID, PROXY), Some(t.0.join(&pod).join(format!("crio-{PROXY}.scope"))));
        assert_eq!(container_cgroup(&t.0, UID, APP), Some(t.0.join(&pod).join(format!("cri-containerd-{APP}.scope"))));
        // kind: kubelet's own slice above kubepods.
        let k = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/{}",
            SYSTEMD_POD.replace("kubepods-", "kubelet-kubepods-")
        );
        let kind = Tree::new("kind", &[format!("{k}/cri-containerd-{PROXY}.scope")]);
        assert_eq!(container_cgroup(&kind.0, UID, PROXY), Some(kind.0.join(&k).join(format!("cri-containerd-{PROXY}.scope"))));
    }

    #[test]
    fn not_found() {
        let pod = format!("kubepods/burstable/pod{UID}");
        let t = Tree::new("missing", &[format!("{pod}/{APP}"), format!("other/pod{UID}/{PROXY}")]);
        // A restarted container's new id before its cgroup exists; a prefix of an id.
        assert_eq!(container_cgroup(&t.0, UID, PROXY), None, "only under kubepods/kubelet directories");
        assert_eq!(container_cgroup(&t.0, UID, &APP[..12]), None);
        assert_eq!(container_cgroup(&t.0, "00000000-0000-0000-0000-000000000001", APP), None);
        assert_eq!(container_cgroup(&t.0, "not-a-uid", APP), None);
        assert_eq!(container_cgroup(&t.0, UID, ""), None);
        assert_eq!(container_cgroup(&t.0, UID, "../x"), None);
        assert_eq!(container_cgroup(&t.0.join("absent"), UID, APP), None);
    }
}
