//! A private pin directory on bpffs per test (for sidecap's `--pin-dir`), removed with
//! everything pinned in it on Drop, so pinned links/maps never outlive a test.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::util::unique_name;

/// Where bpffs is mounted (usually /sys/fs/bpf), from /proc/self/mountinfo.
pub fn bpffs_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "bpf" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[derive(Debug)]
pub struct BpfPinDir {
    path: PathBuf,
}

impl BpfPinDir {
    /// `<bpffs>/sidecap-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> io::Result<BpfPinDir> {
        let mount = bpffs_mount().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "bpffs is not mounted"))?;
        let path = mount.join(unique_name(name));
        fs::create_dir(&path)?;
        Ok(BpfPinDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfPinDir {
    fn drop(&mut self) {
        // Unlinking a pin drops that reference; a pinned bpf_link detaches when its last
        // reference goes (the agent process holding an fd must be stopped first).
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("sidecap-tests: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}
