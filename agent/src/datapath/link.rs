//! bpf_link creation and pinning through the bpf(2) syscall directly: one code path for
//! every attach type (aya 0.14 cannot turn every link kind into a pinnable FdLink).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

/// Attach and query flags (include/uapi/linux/bpf.h).
pub mod flags {
    /// mprog (cgroups: Linux 6.17+): insert before the relative program, or first.
    pub const BEFORE: u32 = 1 << 3;
    /// The relative program is named by id, not fd.
    pub const ID: u32 = 1 << 5;
    /// Run before the programs of descendant cgroups (links: 6.17+).
    pub const PREORDER: u32 = 1 << 6;
    /// The relative object is a link (a link attach can only be placed relative to links).
    pub const LINK: u32 = 1 << 13;
    /// BPF_PROG_QUERY: the programs that run for this cgroup, in run order (own + inherited).
    pub const QUERY_EFFECTIVE: u32 = 1 << 0;
}

/// `enum bpf_attach_type` values (include/uapi/linux/bpf.h).
pub mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    /// An sk_msg program on a sockmap/sockhash (links: Linux 6.10+).
    pub const SK_MSG_VERDICT: u32 = 7;
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
    /// `link_create.cgroup` (6.17+): relative_fd / relative_id, then expected_revision.
    relative: u32,
    _pad: u32,
    expected_revision: u64,
    _rest: [u64; 4],
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
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Attaches `prog` to `target` (a cgroup or netns fd) as a bpf_link. Cgroup links always
/// coexist with other programs on the same hook (multi-attach): without flags the new one
/// runs after those already there.
pub fn create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    create_with(prog, target, attach_type, 0, 0, 0)
}

/// [`create`] with mprog placement: `flags` (see [`flags`]), the relative program (fd, or id
/// with [`flags::ID`]; 0 with [`flags::BEFORE`] = first), and the revision of the hook's
/// list the placement was decided on (0: any; otherwise ESTALE when it changed since).
pub fn create_with(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
    relative: u32,
    expected_revision: u64,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags,
        relative,
        expected_revision,
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
    let mut attr = LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: new_prog.as_raw_fd() as u32, ..Default::default() };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    /// Written by 6.17+ kernels for a cgroup's own list; stays 0 before.
    revision: u64,
}

/// The programs on one hook of a cgroup, in run order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    pub prog_ids: Vec<u32>,
    /// The list's revision (mprog kernels, own list only; 0 otherwise).
    pub revision: u64,
}

/// BPF_PROG_QUERY: the cgroup's own list (`effective` false) or every program that runs
/// for it, inherited ones included, in the order they run (`effective` true).
pub fn query(cgroup: BorrowedFd<'_>, attach_type: u32, effective: bool) -> io::Result<Attached> {
    let mut cap = 8usize;
    // A program attached between the count and the copy: ENOSPC, ask again with more room.
    for _ in 0..8 {
        let mut ids = vec![0u32; cap];
        let mut attr = QueryAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            query_flags: if effective { flags::QUERY_EFFECTIVE } else { 0 },
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: cap as u32,
            ..Default::default()
        };
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(Attached { prog_ids: ids, revision: attr.revision });
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => cap = (attr.prog_cnt as usize).max(cap) * 2,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("BPF_PROG_QUERY: the program list kept growing"))
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn info_by_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut attr = InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: buf.len() as u32, info: buf.as_mut_ptr() as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

/// What the kernel says about a link (`struct bpf_link_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// Cgroup links: the cgroup's id (its inode number on cgroup2); netns links: the netns
    /// inode, 0 once the netns is gone (the link is severed).
    pub target: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let mut b = [0u8; 64];
    info_by_fd(link, &mut b)?;
    // type @0, id @4, prog_id @8; union @16: cgroup { u64 cgroup_id }, netns { u32 netns_ino }.
    let target = if u32_at(&b, 0) == BPF_LINK_TYPE_CGROUP { u64_at(&b, 16) } else { u64::from(u32_at(&b, 16)) };
    Ok(LinkInfo { id: u32_at(&b, 4), prog_id: u32_at(&b, 8), target })
}

#[repr(C)]
#[derive(Default)]
struct GetByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// A program's name (`bpf_prog_info.name`, at most 15 bytes), by id.
pub fn prog_name(id: u32) -> io::Result<String> {
    let mut attr = GetByIdAttr { id, ..Default::default() };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut b = [0u8; 96];
    info_by_fd(fd.as_fd(), &mut b)?;
    // name[16] @64 in struct bpf_prog_info.
    let name = &b[64..80];
    let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads `insns` (raw `struct bpf_insn`s) as a program of `prog_type` for `attach_type`.
/// Only for tiny programs (probes): no maps, no relocations, no verifier log.
pub fn load_raw(prog_type: u32, attach_type: u32, name: &str, insns: &[u64]) -> io::Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
