//! The directory source: YAML files, re-read when they change. inotify wakes the agent at
//! once; a fingerprint of every file (path, size, mtime) decides whether anything really
//! changed, which also covers subdirectories and editors that replace files.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use sidecap_policy::{
    Cluster,
    cluster::{Loaded, Object, load::expand_paths, load_documents},
};

use super::Source;

type Fingerprint = BTreeMap<PathBuf, (u64, SystemTime)>;
/// A file's (size, mtime) and what it parsed into.
type Parsed = BTreeMap<PathBuf, ((u64, SystemTime), Vec<Loaded<Object>>)>;

pub struct DirSource {
    dir: PathBuf,
    inotify: Option<OwnedFd>,
    last: Option<Fingerprint>,
    /// Parsed objects per file, valid while the file's (size, mtime) is unchanged: a
    /// change re-parses only the files that changed (10,000 Services need not be re-read
    /// because one Sidecar was edited).
    parsed: Parsed,
    synced: bool,
}

impl DirSource {
    pub fn new(dir: &Path) -> DirSource {
        DirSource { dir: dir.to_path_buf(), inotify: watch(dir), last: None, parsed: BTreeMap::new(), synced: false }
    }

    /// The whole directory as a cluster, re-parsing only files whose fingerprint changed.
    /// Any file that does not parse rejects the snapshot (the previous one stays in force).
    fn load(&mut self, fp: &Fingerprint) -> Result<Cluster, String> {
        let files = expand_paths(std::slice::from_ref(&self.dir)).map_err(|e| e.to_string())?;
        self.parsed.retain(|p, _| fp.contains_key(p));
        let mut objects = Vec::new();
        for file in files {
            let stamp = fp.get(&file).copied();
            let cached = self.parsed.get(&file).filter(|(s, _)| Some(*s) == stamp);
            let objs = match cached {
                Some((_, objs)) => objs.clone(),
                None => {
                    let (objs, errs) = load_documents(&file);
                    if let Some(e) = errs.into_iter().next() {
                        self.parsed.remove(&file);
                        return Err(e.to_string());
                    }
                    if let Some(s) = stamp {
                        self.parsed.insert(file.clone(), (s, objs.clone()));
                    }
                    objs
                }
            };
            objects.extend(objs);
        }
        Cluster::from_objects(objects).map_err(|e| e.to_string())
    }
}

/// inotify on the directory; None (fall back to polling) if it cannot be set up.
fn watch(dir: &Path) -> Option<OwnedFd> {
    // SAFETY: inotify_init1 takes no pointers.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: inotify_init1 returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mask = libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MODIFY
        | libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: c is a NUL-terminated path; fd is our open inotify descriptor.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
        tracing::warn!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "inotify unavailable; polling");
        return None;
    }
    Some(fd)
}

fn fingerprint(dir: &Path, out: &mut Fingerprint, depth: u32) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = std::fs::metadata(&p) else { continue };
        if md.is_dir() {
            if depth < 8 {
                fingerprint(&p, out, depth + 1);
            }
        } else {
            out.insert(p, (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        }
    }
}

impl DirSource {
    /// Blocks until inotify reports something or `timeout` passes; drains the events.
    fn wait(&self, timeout: Duration) {
        let Some(fd) = &self.inotify else {
            std::thread::sleep(timeout);
            return;
        };
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is one valid, writable pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
            // Let a burst of writes (an editor's save, `kubectl`-style temp + rename) land
            // together; a half-written file only fails to parse and is read again.
            std::thread::sleep(Duration::from_millis(2));
            let mut buf = [0u8; 4096];
            // SAFETY: buf is valid and writable for buf.len() bytes.
            while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        }
    }
}

impl Source for DirSource {
    fn next(&mut self, timeout: Duration) -> Option<Result<Cluster, String>> {
        if self.last.is_some() {
            self.wait(timeout);
        }
        let mut fp = Fingerprint::new();
        fingerprint(&self.dir, &mut fp, 0);
        if self.last.as_ref() == Some(&fp) {
            return None;
        }
        let snap = self.load(&fp);
        self.last = Some(fp);
        if snap.is_ok() {
            self.synced = true;
        }
        Some(snap)
    }

    fn synced(&self) -> bool {
        self.synced
    }

    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {ip}\n  ports:\n  - port: 80\n"
        )
    }

    fn names(c: &Cluster) -> Vec<String> {
        let mut v: Vec<String> = c
            .services
            .iter()
            .map(|s| format!("{}={}", s.obj.metadata.name, s.obj.spec.cluster_ip.clone().unwrap_or_default()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn snapshots_follow_edits_additions_removals_and_errors() {
        let dir = std::env::temp_dir().join(format!("sidecap-dirsource-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.yaml"), svc("a", "10.0.0.1")).unwrap();
        std::fs::write(dir.join("sub/b.yaml"), svc("b", "10.0.0.2")).unwrap();
        let mut src = DirSource::new(&dir);
        let first = src.next(Duration::from_millis(10)).expect("first snapshot").expect("loads");
        assert_eq!(names(&first), ["a=10.0.0.1", "b=10.0.0.2"]);
        assert!(src.synced());
        assert!(src.next(Duration::from_millis(10)).is_none(), "no change, no snapshot");

        // Edit one file (different size, so the fingerprint surely differs).
        std::fs::write(dir.join("sub/b.yaml"), svc("b", "10.0.0.222")).unwrap();
        let c = src.next(Duration::from_millis(100)).expect("changed").expect("loads");
        assert_eq!(names(&c), ["a=10.0.0.1", "b=10.0.0.222"]);
        // The file that did not change is not re-read: both snapshots hold the same object
        // (one copy in memory), with the same fingerprint; the edited one differs.
        assert!(std::sync::Arc::ptr_eq(&first.services[0].obj, &c.services[0].obj), "a.yaml's Service is shared");
        assert_eq!(first.services[0].fingerprint(), c.services[0].fingerprint());
        assert_ne!(first.services[1].fingerprint(), c.services[1].fingerprint(), "b.yaml's edit changes its fingerprint");

        // A broken file rejects the snapshot, naming the file; fixing it recovers.
        std::fs::write(dir.join("c.yaml"), "apiVersion: v1\nkind: Service\nmetadata: [\n").unwrap();
        let e = src.next(Duration::from_millis(100)).expect("changed").expect_err("broken");
        assert!(e.contains("c.yaml"), "{e}");
        std::fs::write(dir.join("c.yaml"), svc("c", "10.0.0.3")).unwrap();
        let c = src.next(Duration::from_millis(100)).expect("changed").expect("loads");
        assert_eq!(names(&c), ["a=10.0.0.1", "b=10.0.0.222", "c=10.0.0.3"]);

        // Removal.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let c = src.next(Duration::from_millis(100)).expect("changed").expect("loads");
        assert_eq!(names(&c), ["b=10.0.0.222", "c=10.0.0.3"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
