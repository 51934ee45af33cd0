//! Tiny eBPF programs loaded and linked through bpf(2) directly: no object file and no BPF
//! toolchain, and any link flags (the mprog BPF_F_BEFORE/BPF_F_PREORDER that Debian's
//! bpftool does not know). For test fixtures and the bench's empty programs.

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

/// mprog flags (include/uapi/linux/bpf.h).
pub const BPF_F_BEFORE: u32 = 1 << 3;
pub const BPF_F_PREORDER: u32 = 1 << 6;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a valid, correctly sized bpf_attr prefix for cmd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// One `struct bpf_insn` as a little-endian u64: code, dst|src<<4, off, imm.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | (u64::from(dst | (src << 4)) << 8) | (u64::from(off as u16) << 16) | (u64::from(imm as u32) << 32)
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

/// A loaded program (unloaded when dropped with its links).
pub struct RawProgram {
    fd: OwnedFd,
    attach_type: u32,
}

impl RawProgram {
    /// Loads `insns` as a GPL program of `prog_type` for `attach_type`, named `name`
    /// (`bpf_prog_info.name` keeps 15 bytes).
    pub fn load(name: &str, prog_type: u32, attach_type: u32, insns: &[u64]) -> io::Result<RawProgram> {
        let mut prog_name = [0u8; 16];
        let len = name.len().min(15);
        prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
        let license = CString::new("GPL").expect("license");
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
        Ok(RawProgram { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) }, attach_type })
    }

    /// Links the program to `cgroup` with `flags` (0: appended, as before Linux 6.17); the
    /// link is detached when the returned fd is closed.
    pub fn link(&self, cgroup: &Path, flags: u32) -> io::Result<OwnedFd> {
        let cg = File::open(cgroup)?;
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_fd: cg.as_raw_fd() as u32,
            attach_type: self.attach_type,
            flags,
            ..Default::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// The program's id (`bpf_prog_info.id`).
    pub fn id(&self) -> io::Result<u32> {
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut buf = [0u8; 96];
        let mut attr = InfoAttr { bpf_fd: self.fd.as_raw_fd() as u32, info_len: buf.len() as u32, info: buf.as_mut_ptr() as u64 };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        // bpf_prog_info: type (u32), then id (u32).
        Ok(u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_instructions_as_the_kernel_reads_them() {
        // r0 = 1; exit
        assert_eq!(insn(0xb7, 0, 0, 0, 1), 0x0000_0001_0000_00b7);
        assert_eq!(insn(0x95, 0, 0, 0, 0), 0x95);
        // *(u32 *)(r1 + 4) = r2: dst r1, src r2, off 4
        assert_eq!(insn(0x63, 1, 2, 4, 0), 0x0000_0000_0004_2163);
        // a negative imm keeps its 32 bits
        assert_eq!(insn(0xb4, 2, 0, 0, -1) >> 32, 0xffff_ffff);
    }
}
