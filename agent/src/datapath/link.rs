//! bpf_link creation and pinning through the bpf(2) syscall directly: one code path for
//! every attach type (aya 0.14 cannot turn every link kind into a pinnable FdLink).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_attach_type` values (include/uapi/linux/bpf.h).
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_UDP4_SENDMSG: u32 = 14;
    pub const CGROUP_UDP6_SENDMSG: u32 = 15;
    pub const CGROUP_UDP4_RECVMSG: u32 = 19;
    pub const CGROUP_UDP6_RECVMSG: u32 = 20;
    pub const CGROUP_GETSOCKOPT: u32 = 21;
    pub const SK_LOOKUP: u32 = 36;
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable bpf_attr of the layout cmd expects, its size passed along.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint)
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Attaches `prog` to `target` (a cgroup or netns fd) as a bpf_link. Cgroup links always
/// coexist with other programs on the same hook (multi-attach), so no flags are needed.
pub fn create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: bpf() returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpf object (link, map, program) at `path` on a bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut attr = ObjPinAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens a pinned bpf object (program, link, map).
pub fn get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut attr = ObjPinAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: bpf() returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Swaps the program behind a link in one step: the hook never runs without a program.
pub fn update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
