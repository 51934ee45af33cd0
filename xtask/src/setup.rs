//! `cargo xtask setup`: everything a fresh machine of this kind needs, idempotently.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Debian packages the tests and the demo use: (package, a binary it provides).
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables-restore"),
    ("iproute2", "ip"),
    // tests/tests/podman.rs: a real container runtime running the CNI chain.
    ("podman", "podman"),
    ("runc", "runc"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    // `promtool check metrics` lints a live agent's /metrics (tests/tests/operate.rs).
    ("prometheus", "promtool"),
    // The bench's keepalive scenario: wrk → HAProxy (HTTP mode) → nginx.
    ("nginx", "nginx"),
    ("wrk", "wrk"),
];

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(bin: &str) -> Option<PathBuf> {
    // A full path: a file outside PATH (CNI plugins live in /usr/lib/cni).
    if bin.starts_with('/') {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

pub fn run() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()?;
    Ok(())
}

/// The privileged tests pin under /sys/fs/bpf: mount a bpffs there when the machine has none.
fn bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(" - ").nth(1).is_some_and(|r| r.starts_with("bpf ")) && l.split_whitespace().nth(4) == Some("/sys/fs/bpf"));
    if mounted || !is_root() {
        return Ok(());
    }
    eprintln!("setup: mounting a bpf filesystem at /sys/fs/bpf");
    let st = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
    if !st.success() {
        bail!("`mount -t bpf bpf /sys/fs/bpf` failed");
    }
    Ok(())
}

/// clippy and rustfmt for the default toolchain, clippy for the nightly (the eBPF crate).
pub fn lint_tools() -> anyhow::Result<()> {
    for (toolchain, components) in [(None, &["clippy", "rustfmt"][..]), (Some("nightly"), &["clippy"][..])] {
        let mut list = Command::new("rustup");
        list.args(["component", "list", "--installed"]);
        if let Some(t) = toolchain {
            list.args(["--toolchain", t]);
        }
        let installed = output(&mut list).unwrap_or_default();
        for c in components {
            if installed.lines().any(|l| l.starts_with(c)) {
                continue;
            }
            eprintln!("setup: adding {c} to the {} toolchain", toolchain.unwrap_or("default"));
            let mut add = Command::new("rustup");
            add.args(["component", "add", c]);
            if let Some(t) = toolchain {
                add.args(["--toolchain", t]);
            }
            if !add.status()?.success() {
                bail!("`rustup component add {c}` failed");
            }
        }
    }
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if !quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!(
            "the `nightly` Rust toolchain is missing: install it with `rustup toolchain install nightly` (eBPF programs need -Z build-std)"
        );
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"])).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        let st = Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]).status()?;
        if !st.success() {
            bail!("`rustup component add rust-src --toolchain nightly` failed");
        }
    }
    Ok(())
}

/// The nightly's own libLLVM (bpf-linker must link the same LLVM as rustc emits).
fn nightly_llvm() -> anyhow::Result<(PathBuf, u32)> {
    let sysroot =
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context("asking the nightly rustc for its sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for e in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(ver) = name.strip_prefix("libLLVM.so.") {
            let major = ver.split('.').next().and_then(|m| m.parse().ok());
            if let Some(major) = major {
                return Ok((lib.join(&name), major));
            }
        }
    }
    bail!("no libLLVM.so.* in {}: the nightly toolchain is incomplete", lib.display())
}

fn bpf_linker() -> anyhow::Result<()> {
    // bpf-linker loads the nightly's libLLVM, which `rustup run` puts on the library path.
    if quiet(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
        return Ok(());
    }
    let (libllvm, major) = nightly_llvm()?;
    let prefix = crate::workspace_root().join("target/llvm-prefix");
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    let link = libdir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    eprintln!("setup: building bpf-linker against the nightly's LLVM {major} (takes a few minutes, once)");
    let st = Command::new("cargo")
        .args(["+nightly", "install", "--force", "bpf-linker", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !st.success() {
        bail!("building bpf-linker failed: see the output above (it needs the nightly toolchain and network access to crates.io)");
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(_, bin)| which(bin).is_none()).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {}: install them with `sudo apt-get install -y {}`", missing.join(" "), missing.join(" "));
    }
    if which("apt-get").is_none() {
        bail!("missing packages {} and no apt-get to install them with", missing.join(" "));
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let st = Command::new("apt-get").arg("update").arg("-qq").envs(env).status()?;
    if !st.success() {
        bail!("`apt-get update` failed");
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .envs(env)
        .status()?;
    if !st.success() {
        bail!("`apt-get install {}` failed", missing.join(" "));
    }
    Ok(())
}
