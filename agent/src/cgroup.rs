//! Finding the cgroup v2 hierarchy: `/sys/fs/cgroup` on a unified host,
//! `/sys/fs/cgroup/unified` on a hybrid one — read from mountinfo, never assumed.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: relative cgroup path, but no cgroup2 mount was found")]
    NoRoot { path: String },
    #[error("{}: {source}", path.display())]
    Stat { path: PathBuf, source: std::io::Error },
    #[error("{}: not a directory", path.display())]
    NotDir { path: PathBuf },
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    #[error("no cgroup v2 (cgroup2) filesystem is mounted; sidecap needs cgroup v2")]
    NotMounted,
}

/// Mount point of the cgroup2 filesystem.
pub fn v2_root() -> Result<PathBuf, Error> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::Mountinfo)?;
    parse_mountinfo(&text).ok_or(Error::NotMounted)
}

/// The cgroup v2 id of directory `path` (absolute, or relative to the cgroup2 mount
/// `root`): its inode number, which is what `bpf_get_current_cgroup_id` returns for a task
/// in it (kernfs node ids are inode numbers on 64-bit kernels).
pub fn id_of(root: Option<&Path>, path: &str) -> Result<u64, Error> {
    use std::os::unix::fs::MetadataExt;
    let p = Path::new(path.trim());
    let full = if p.is_absolute() { p.to_path_buf() } else { root.ok_or_else(|| Error::NoRoot { path: path.into() })?.join(p) };
    let md = std::fs::metadata(&full).map_err(|source| Error::Stat { path: full.clone(), source })?;
    if !md.is_dir() {
        return Err(Error::NotDir { path: full });
    }
    Ok(md.ino())
}

/// The first cgroup2 mount point in mountinfo text (`ID PARENT MAJ:MIN ROOT MOUNT OPTS... - FSTYPE ...`).
pub fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mountinfo(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(parse_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn ids_are_directory_inodes() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("sidecap-cgid-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).expect("mkdir");
        let ino = std::fs::metadata(dir.join("a/b")).expect("stat").ino();
        assert_eq!(id_of(Some(&dir), "a/b").expect("relative"), ino);
        assert_eq!(id_of(None, dir.join("a/b").to_str().expect("utf-8")).expect("absolute"), ino);
        assert!(matches!(id_of(None, "a/b"), Err(Error::NoRoot { .. })));
        assert!(matches!(id_of(Some(&dir), "missing"), Err(Error::Stat { .. })));
        std::fs::write(dir.join("f"), "").expect("write");
        assert!(matches!(id_of(Some(&dir), "f"), Err(Error::NotDir { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unescapes_octal() {
        let line = "41 31 0:38 / /mnt/a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(line), Some(PathBuf::from("/mnt/a b")));
    }
}
