//! A socket load balancer of our own, as Cilium's kube-proxy replacement does it: a
//! `cgroup/connect4` program that rewrites one Service VIP to one backend at connect time.
//! Hand-assembled (eight instructions) and loaded and attached through bpf(2) directly, so
//! that it needs no BPF toolchain and can be placed with the mprog flags (BPF_F_BEFORE,
//! BPF_F_PREORDER) that Debian's bpftool does not know. The link is detached on Drop.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    path::Path,
};

pub use crate::rawprog::{BPF_F_BEFORE, BPF_F_PREORDER};
use crate::{
    rawprog::{RawProgram, insn},
    util::assert_allowed_addr,
};

const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const CGROUP_INET4_CONNECT: u32 = 10;

/// The fixture's program name, as `bpf_prog_info.name` reports it.
pub const NAME: &str = "cx_sock_lb";

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

/// The loaded program plus its cgroup link (detached when dropped).
pub struct SockLb {
    prog: RawProgram,
    link: Option<OwnedFd>,
    pub vip: SocketAddrV4,
    pub backend: Ipv4Addr,
}

impl SockLb {
    /// Loads the program rewriting `vip` to `backend` (same port).
    pub fn load(vip: SocketAddrV4, backend: Ipv4Addr) -> io::Result<SockLb> {
        assert_allowed_addr((*vip.ip()).into());
        assert_allowed_addr(backend.into());
        let prog = RawProgram::load(NAME, PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT, &program(vip, backend))?;
        Ok(SockLb { prog, link: None, vip, backend })
    }

    /// Attaches to `cgroup` (a test's own cgroup) with `flags` (0: append, as before 6.17).
    pub fn attach(&mut self, cgroup: &Path, flags: u32) -> io::Result<()> {
        assert!(self.link.is_none(), "already attached");
        self.link = Some(self.prog.link(cgroup, flags)?);
        Ok(())
    }

    /// Detaches (closing the link's only reference).
    pub fn detach(&mut self) {
        self.link = None;
    }

    /// The program's id (`bpf_prog_info.id`).
    pub fn id(&self) -> io::Result<u32> {
        self.prog.id()
    }
}
