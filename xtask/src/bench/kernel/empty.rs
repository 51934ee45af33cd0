//! The floor: `r0 = 1; exit` programs on sidecap's busiest hooks (sockops, connect4,
//! getsockopt), attached beside its own for one pass, so the report can tell the cost of
//! running any program at all (dispatch plus the accounting's two clock reads) from the
//! cost of what sidecap's programs do. Loaded and attached through bpf(2) directly (no
//! object file needed); detached when dropped.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

/// (hook name, program type, attach type) from include/uapi/linux/bpf.h.
const HOOKS: [(&str, u32, u32); 3] = [
    ("sockops", 13, 3),     // BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS
    ("connect4", 18, 10),   // BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    ("getsockopt", 25, 21), // BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_CGROUP_GETSOCKOPT
];

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a correctly sized bpf_attr prefix for cmd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
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
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// One empty program per hook, linked to a cgroup.
pub struct EmptyPrograms {
    /// (hook, program id, program fd, link fd).
    progs: Vec<(&'static str, u64, OwnedFd, OwnedFd)>,
}

impl EmptyPrograms {
    pub fn attach(cgroup: &Path) -> io::Result<EmptyPrograms> {
        let cg = File::open(cgroup)?;
        let license = CString::new("GPL").expect("license");
        // r0 = 1 (allow / keep going); exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
        let mut progs = Vec::new();
        for (hook, prog_type, attach_type) in HOOKS {
            let mut name = [0u8; 16];
            let n = format!("kc_empty_{hook}");
            let len = n.len().min(15);
            name[..len].copy_from_slice(&n.as_bytes()[..len]);
            let mut attr = ProgLoadAttr {
                prog_type,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                prog_name: name,
                expected_attach_type: attach_type,
                ..Default::default()
            };
            // SAFETY: the kernel returned a new fd we own.
            let prog = unsafe { OwnedFd::from_raw_fd(bpf(BPF_PROG_LOAD, &mut attr)? as i32) };
            let mut link =
                LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_fd: cg.as_raw_fd() as u32, attach_type, ..Default::default() };
            // SAFETY: as above.
            let link = unsafe { OwnedFd::from_raw_fd(bpf(BPF_LINK_CREATE, &mut link)? as i32) };
            let mut info = [0u8; 96];
            let mut q = InfoAttr { bpf_fd: prog.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
            bpf(BPF_OBJ_GET_INFO_BY_FD, &mut q)?;
            // bpf_prog_info: type (u32), then id (u32).
            let id = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]) as u64;
            progs.push((hook, id, prog, link));
        }
        Ok(EmptyPrograms { progs })
    }

    /// (row name, program id) for [`super::rows`].
    pub fn ids(&self) -> Vec<(String, u64)> {
        self.progs.iter().map(|(hook, id, _, _)| (format!("empty {hook}"), *id)).collect()
    }
}
