//! Test cgroups (v2): created under the cgroup2 mount, never the root cgroup itself;
//! removed with all their processes on Drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::{unique_name, wait_for};

/// Where cgroup2 is mounted, from /proc/self/mountinfo: `/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones. Panics if there is none.
pub fn cgroup2_mount() -> PathBuf {
    try_cgroup2_mount().expect("no cgroup2 mount in /proc/self/mountinfo")
}

/// Like [`cgroup2_mount`], but None when cgroup2 is not mounted.
pub fn try_cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(parse_cgroup2_line)
}

// mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
fn parse_cgroup2_line(line: &str) -> Option<PathBuf> {
    let (pre, post) = line.split_once(" - ")?;
    if post.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mountpoint = pre.split_whitespace().nth(4)?;
    Some(PathBuf::from(unescape_mountinfo(mountpoint)))
}

// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup made by a test. Dropping it kills every process in its subtree and removes it
/// (children first). Child cgroups made with [`TestCgroup::child`] are removed by whichever
/// of parent/child is dropped first; the other finds them gone.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// `<cgroup2 mount>/sidecap-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> io::Result<TestCgroup> {
        let mount = try_cgroup2_mount().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "cgroup2 is not mounted"))?;
        let path = mount.join(unique_name(name));
        fs::create_dir(&path).map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))?;
        Ok(TestCgroup { path })
    }

    /// A child cgroup `<self>/<name>` (name must be a plain path component).
    pub fn child(&self, name: &str) -> io::Result<TestCgroup> {
        assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..", "bad cgroup child name {name:?}");
        let path = self.path.join(name);
        fs::create_dir(&path).map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's id (its inode number), as `bpf_get_current_cgroup_id` reports it.
    pub fn id(&self) -> io::Result<u64> {
        Ok(std::os::unix::fs::MetadataExt::ino(&fs::metadata(&self.path)?))
    }

    /// PIDs directly in this cgroup (not its children).
    pub fn procs(&self) -> io::Result<Vec<i32>> {
        read_procs(&self.path)
    }

    /// Move a process into this cgroup.
    pub fn add_pid(&self, pid: i32) -> io::Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
    }

    /// True when a process is in this cgroup or below (`cgroup.events` populated).
    pub fn populated(&self) -> io::Result<bool> {
        let events = fs::read_to_string(self.path.join("cgroup.events"))?;
        Ok(events.lines().any(|l| l.trim() == "populated 1"))
    }

    /// Kill every process in the subtree and wait (bounded) until it is empty.
    pub fn kill_all(&self) -> io::Result<()> {
        kill_subtree(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        if let Err(e) = kill_subtree(&self.path) {
            eprintln!("sidecap-tests: cgroup {}: {e}", self.path.display());
        }
        if let Err(e) = remove_tree(&self.path, 0) {
            eprintln!("sidecap-tests: cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

fn read_procs(path: &Path) -> io::Result<Vec<i32>> {
    Ok(fs::read_to_string(path.join("cgroup.procs"))?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn kill_subtree(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill_file = path.join("cgroup.kill");
    // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, incl. forking processes.
    if kill_file.exists() {
        fs::write(&kill_file, "1")?;
    } else {
        signal_tree(path, 0)?;
    }
    let empty = wait_for(Duration::from_secs(5), Duration::from_millis(10), || {
        let populated = fs::read_to_string(path.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false);
        if populated {
            // Older kernels: repeat, a process may have forked between read and kill.
            if !kill_file.exists() {
                let _ = signal_tree(path, 0);
            }
            None
        } else {
            Some(())
        }
    });
    empty.ok_or_else(|| io::Error::other(format!("{} still populated after 5s", path.display())))
}

fn signal_tree(path: &Path, depth: usize) -> io::Result<()> {
    if depth > 32 {
        return Ok(());
    }
    for pid in read_procs(path).unwrap_or_default() {
        // SAFETY: plain syscall; pids come from this test's own cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            signal_tree(&entry.path(), depth + 1)?;
        }
    }
    Ok(())
}

// rmdir depth-first; a cgroup dir only contains control files and child dirs.
fn remove_tree(path: &Path, depth: usize) -> io::Result<()> {
    if depth > 32 {
        return Err(io::Error::other("cgroup tree too deep"));
    }
    match fs::read_dir(path) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    remove_tree(&entry.path(), depth + 1)?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    // rmdir may briefly fail with EBUSY right after the last process exited.
    let mut last = None;
    for _ in 0..100 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(last.unwrap_or_else(|| io::Error::other("rmdir failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_and_unified_mountinfo() {
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(parse_cgroup2_line(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 24 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(parse_cgroup2_line(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let v1 = "35 31 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        assert_eq!(parse_cgroup2_line(v1), None);
        let escaped = "1 2 0:1 / /mnt/a\\040b rw - cgroup2 none rw";
        assert_eq!(parse_cgroup2_line(escaped), Some(PathBuf::from("/mnt/a b")));
    }
}
