//! What the CNI plugin told the agent, keyed as the CNI spec keys attachments: by container
//! id (CNI_CONTAINERID). A pod recreated under the same name is another container; a DEL or
//! GC for one container never touches another's entry. Kept in a file beside the socket, so
//! that a restarted agent still knows the netns of pods it learned from the plugin.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::Request;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI state file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("CNI state file {path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
}

/// One container the plugin added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// `namespace/name`.
    pub pod: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// The network configuration's name (GC is per network).
    #[serde(default)]
    pub network: String,
    /// Order of ADDs: when two containers claim one pod name, the newer one is the pod.
    pub seq: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniState {
    attachments: BTreeMap<String, Attachment>,
    next_seq: u64,
}

impl CniState {
    /// The state file beside a socket: `cni.sock` → `cni.state.json`.
    pub fn path_for(socket: &Path) -> PathBuf {
        socket.with_extension("state.json")
    }

    /// What a previous agent left; empty when there is no file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.into(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Io { path: path.into(), source }),
        }
    }

    /// Temp file + rename: a crash leaves the old state or the new, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let io = |source| Error::Io { path: path.into(), source };
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).map_err(|source| Error::Json { path: path.into(), source })?;
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// ADD: a new container, or the same one again (idempotent: same entry, same order).
    pub fn add(&mut self, req: &Request) {
        let seq = match self.attachments.get(&req.container_id) {
            Some(a) if a.pod == req.pod() => a.seq,
            _ => {
                self.next_seq += 1;
                self.next_seq
            }
        };
        let a = Attachment { pod: req.pod(), netns: req.netns.clone(), ips: req.ips.clone(), network: req.network.clone(), seq };
        self.attachments.insert(req.container_id.clone(), a);
    }

    /// DEL: forgets exactly this container.
    pub fn remove(&mut self, container_id: &str) -> Option<Attachment> {
        self.attachments.remove(container_id)
    }

    /// GC: forgets the containers of `network` not in `valid`; returns their ids.
    pub fn collect(&mut self, network: &str, valid: &[String]) -> Vec<String> {
        let gone: Vec<String> = self
            .attachments
            .iter()
            .filter(|(id, a)| a.network == network && !valid.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.attachments.remove(id);
        }
        gone
    }

    /// Forgets containers whose netns is gone: their DEL was missed (the agent was down when
    /// the runtime tore them down). A live container's netns path always exists.
    pub fn prune_gone(&mut self) -> Vec<(String, Attachment)> {
        let gone: Vec<String> = self
            .attachments
            .iter()
            .filter(|(_, a)| !a.netns.as_os_str().is_empty() && !a.netns.exists())
            .map(|(id, _)| id.clone())
            .collect();
        gone.into_iter().filter_map(|id| self.attachments.remove(&id).map(|a| (id, a))).collect()
    }

    pub fn get(&self, container_id: &str) -> Option<&Attachment> {
        self.attachments.get(container_id)
    }

    /// The pod's current container: the newest ADD under its name.
    pub fn by_pod(&self) -> BTreeMap<&str, &Attachment> {
        let mut out: BTreeMap<&str, &Attachment> = BTreeMap::new();
        for a in self.attachments.values() {
            if out.get(a.pod.as_str()).is_none_or(|b| b.seq < a.seq) {
                out.insert(&a.pod, a);
            }
        }
        out
    }

    /// The container currently holding `pod`'s name.
    pub fn current(&self, pod: &str) -> Option<(&str, &Attachment)> {
        self.attachments
            .iter()
            .filter(|(_, a)| a.pod == pod)
            .max_by_key(|(_, a)| a.seq)
            .map(|(id, a)| (id.as_str(), a))
    }

    pub fn is_empty(&self) -> bool {
        self.attachments.is_empty()
    }

    pub fn len(&self) -> usize {
        self.attachments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::protocol::Command;

    fn add(ns: &str, name: &str, id: &str, netns: &str) -> Request {
        Request {
            command: Command::Add,
            namespace: ns.into(),
            name: name.into(),
            uid: None,
            container_id: id.into(),
            netns: netns.into(),
            ips: vec![],
            network: "k8s".into(),
            valid: vec![],
        }
    }

    #[test]
    fn a_pod_recreated_under_its_name_is_the_newer_container() {
        let mut s = CniState::default();
        s.add(&add("d", "web", "c1", "/run/netns/one"));
        s.add(&add("d", "web", "c2", "/run/netns/two"));
        assert_eq!(s.by_pod()["d/web"].netns, PathBuf::from("/run/netns/two"));
        // A stale DEL of the old container leaves the running one alone.
        assert!(s.remove("c1").is_some());
        assert_eq!(s.current("d/web").map(|(id, _)| id), Some("c2"));
        // The same ADD again changes nothing.
        let before = s.clone();
        s.add(&add("d", "web", "c2", "/run/netns/two"));
        assert_eq!(s, before);
    }

    #[test]
    fn gc_forgets_only_invalid_containers_of_its_network() {
        let mut s = CniState::default();
        s.add(&add("d", "a", "c1", "/x"));
        s.add(&add("d", "b", "c2", "/y"));
        let mut other = add("d", "c", "c3", "/z");
        other.network = "other".into();
        s.add(&other);
        assert_eq!(s.collect("k8s", &["c1".into()]), vec!["c2".to_string()]);
        assert_eq!(s.len(), 2);
        assert!(s.get("c3").is_some());
    }

    #[test]
    fn survives_a_restart_through_its_file() {
        let dir = std::env::temp_dir().join(format!("sidecap-cni-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = CniState::path_for(&dir.join("cni.sock"));
        assert_eq!(path.file_name().unwrap(), "cni.state.json");
        assert_eq!(CniState::load(&path).unwrap(), CniState::default());
        let mut s = CniState::default();
        s.add(&add("d", "a", "c1", "/x"));
        s.save(&path).unwrap();
        assert_eq!(CniState::load(&path).unwrap(), s);
        // A container torn down while the agent was down: its netns path is gone.
        s.add(&add("d", "b", "c2", &dir.display().to_string()));
        let pruned = s.prune_gone();
        assert_eq!(pruned.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["c1"]);
        assert!(s.get("c2").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
