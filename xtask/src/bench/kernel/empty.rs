//! The floor: `r0 = 1; exit` programs on sidecap's busiest hooks (sockops, connect4,
//! getsockopt), attached beside its own for one pass, so the report can tell the cost of
//! running any program at all (dispatch plus the accounting's two clock reads) from the
//! cost of what sidecap's programs do. Loaded and attached through bpf(2) directly (no
//! object file needed); detached when dropped.

use std::{io, os::fd::OwnedFd, path::Path};

use sidecap_tests::rawprog::RawProgram;

/// (hook name, program type, attach type) from include/uapi/linux/bpf.h.
const HOOKS: [(&str, u32, u32); 3] = [
    ("sockops", 13, 3),     // BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS
    ("connect4", 18, 10),   // BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    ("getsockopt", 25, 21), // BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_CGROUP_GETSOCKOPT
];

/// One empty program per hook, linked to a cgroup.
pub struct EmptyPrograms {
    /// (hook, program id, program, link).
    progs: Vec<(&'static str, u64, RawProgram, OwnedFd)>,
}

impl EmptyPrograms {
    pub fn attach(cgroup: &Path) -> io::Result<EmptyPrograms> {
        // r0 = 1 (allow / keep going); exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];
        let mut progs = Vec::new();
        for (hook, prog_type, attach_type) in HOOKS {
            let prog = RawProgram::load(&format!("kc_empty_{hook}"), prog_type, attach_type, &insns)?;
            let link = prog.link(cgroup, 0)?;
            let id = u64::from(prog.id()?);
            progs.push((hook, id, prog, link));
        }
        Ok(EmptyPrograms { progs })
    }

    /// (row name, program id) for [`super::rows`].
    pub fn ids(&self) -> Vec<(String, u64)> {
        self.progs.iter().map(|(hook, id, _, _)| (format!("empty {hook}"), *id)).collect()
    }
}
