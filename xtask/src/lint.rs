//! `cargo xtask lint`: formatting and clippy (`-D warnings`) on the workspace, and clippy on
//! the eBPF crate for its own target, built as agent/build.rs builds it.

use std::process::Command;

use crate::{cargo, status};

pub fn run() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    status(fmt, "cargo fmt --all --check")?;

    // The eBPF crate does not build for the host (no_std, its own panic handler).
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--exclude", "sidecap-ebpf", "--all-targets", "--", "-D", "warnings"]);
    status(clippy, "cargo clippy --workspace")?;

    let mut ebpf = Command::new("rustup");
    ebpf.current_dir(crate::workspace_root())
        .args(["run", "nightly", "cargo", "clippy", "--package", "sidecap-ebpf", "--bins"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"])
        // aya-ebpf picks per-architecture definitions by this cfg (agent/build.rs sets it too).
        .env("RUSTFLAGS", format!("--cfg bpf_target_arch=\"{}\"", std::env::consts::ARCH))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    status(ebpf, "cargo clippy on sidecap-ebpf (bpfel-unknown-none)")
}
