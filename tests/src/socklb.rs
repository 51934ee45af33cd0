//! A socket load balancer of our own, as Cilium's kube-proxy replacement does it: a
//! `cgroup/connect4` program that rewrites one Service VIP to one backend at connect time.
//! Hand-assembled (eight instructions) and loaded and attached through bpf(2) directly, so
//! that it needs no BPF toolchain and can be placed with the mprog flags (BPF_F_BEFORE,
//! BPF_F_PREORDER) that Debian's bpftool does not know. The link is detached on Drop.

use std::{
    ffi::CString,
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::util::assert_allowed_addr;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const CGROUP_INET4_CONNECT: u32 = 10;

/// mprog flags (include/uapi/linux/bpf.h).
pub const BPF_F_BEFORE: u32 = 1 << 3;
pub const BPF_F_PREORDER: u32 = 1 << 6;

/// The fixture's program name, as `bpf_prog_info.name` reports it.
pub const NAME: &str = "cx_sock_lb";

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a valid, correctly sized bpf_attr prefix for cmd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// One `struct bpf_insn` as a little-endian u64: code, dst|src<<4, off, imm.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | (u64::from(dst | (src << 4)) << 8) | (u64::from(off as u16) << 16) | (u64::from(imm as u32) << 32)
}

/// `struct bpf_sock_addr` offsets: user_ip4 and user_port, both in network byte order.
const USER_IP4: i16 = 4;
const USER_PORT: i16 = 24;

fn program(vip: SocketAddrV4, backend: Ipv4Addr) -> Vec<u64> {
    let ne = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets()) as i32;
    let port = u32::from(vip.port().to_be()) as i32;
    vec![
        insn(0x61, 2, 1, USER_IP4, 0),      // r2 = ctx->user_ip4
        insn(0x56, 2, 0, 4, ne(*vip.ip())), // if w2 != VIP goto out
        insn(0x61, 2, 1, USER_PORT, 0),     // r2 = ctx->user_port
        insn(0x56, 2, 0, 2, port),          // if w2 != port goto out
        insn(0xb4, 2, 0, 0, ne(backend)),   // w2 = backend
        insn(0x63, 1, 2, USER_IP4, 0),      // ctx->user_ip4 = r2
        insn(0xb7, 0, 0, 0, 1),             // out: r0 = 1 (allow)
        insn(0x95, 0, 0, 0, 0),             // exit
    ]
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
    relative: u32,
    _pad: u32,
    expected_revision: u64,
    _rest: [u64; 4],
}

/// The loaded program plus its cgroup link (detached when dropped).
pub struct SockLb {
    prog: OwnedFd,
    link: Option<OwnedFd>,
    pub vip: SocketAddrV4,
    pub backend: Ipv4Addr,
}

impl SockLb {
    /// Loads the program rewriting `vip` to `backend` (same port).
    pub fn load(vip: SocketAddrV4, backend: Ipv4Addr) -> io::Result<SockLb> {
        assert_allowed_addr((*vip.ip()).into());
        assert_allowed_addr(backend.into());
        let insns = program(vip, backend);
        let mut name = [0u8; 16];
        name[..NAME.len()].copy_from_slice(NAME.as_bytes());
        let license = CString::new("GPL").expect("license");
        let mut attr = ProgLoadAttr {
            prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: the kernel returned a new fd we own.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(SockLb { prog, link: None, vip, backend })
    }

    /// Attaches to `cgroup` (a test's own cgroup) with `flags` (0: append, as before 6.17).
    pub fn attach(&mut self, cgroup: &Path, flags: u32) -> io::Result<()> {
        assert!(self.link.is_none(), "already attached");
        let cg = File::open(cgroup)?;
        let mut attr = LinkCreateAttr {
            prog_fd: self.prog.as_raw_fd() as u32,
            target_fd: cg.as_raw_fd() as u32,
            attach_type: CGROUP_INET4_CONNECT,
            flags,
            ..Default::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new fd we own.
        self.link = Some(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        Ok(())
    }

    /// Detaches (closing the link's only reference).
    pub fn detach(&mut self) {
        self.link = None;
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
        let mut attr = InfoAttr { bpf_fd: self.prog.as_raw_fd() as u32, info_len: buf.len() as u32, info: buf.as_mut_ptr() as u64 };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
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
