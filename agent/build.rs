//! Builds the eBPF object (`ebpf/sidecap-ebpf`, binary target `sidecap`) for
//! bpf{el,eb}-unknown-none with the nightly toolchain; the agent embeds it from OUT_DIR.
//!
//! The inner cargo runs quiet with JSON messages: its progress lines ("Compiling …") are
//! dropped, and only the compiler's real warnings reach the outer build as `warning:`
//! lines, so that a first build shows a warning only where there is one. Errors fail the
//! build with the compiler's own text.

use std::env;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PACKAGE: &str = "sidecap-ebpf";

fn main() {
    if let Err(e) = build() {
        eprintln!("building the eBPF object ({PACKAGE}) failed:\n{e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../ebpf/sidecap-ebpf");
    let common = manifest.join("../ebpf/sidecap-common");
    // The build-dependency on the eBPF crate covers its library; its binary and the shared
    // types are watched here.
    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-changed={}", common.display());
    let out_dir = PathBuf::from(var("OUT_DIR")?);

    let target = match var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => return Err(format!("unsupported target endianness {other:?}")),
    };
    // aya-ebpf picks per-architecture definitions (pt_regs and the like) by this cfg.
    let arch = match var("CARGO_CFG_TARGET_ARCH")? {
        a if a.starts_with("riscv64") => "riscv64".to_owned(),
        a => a,
    };

    let mut cmd = nightly_cargo();
    cmd.args(["build", "--quiet", "--message-format=json", "--release", "--bins", "-Z", "build-std=core"])
        .args(["--package", PACKAGE, "--target", target])
        // Its own target dir: the outer build holds the lock on the workspace's.
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target"))
        .current_dir(&root)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [format!("--cfg=bpf_target_arch=\"{arch}\""), "-Cdebuginfo=2".into(), "-Clink-arg=--btf".into()].join("\x1f"),
        )
        // The outer build's compiler is the stable one; the inner cargo picks nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("starting {cmd:?}: {e}"))?;

    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut executables = Vec::new();
    let mut errors = Vec::new();
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            // Not a JSON message: something a build script of the eBPF build printed.
            warn(&line);
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) {
                    executables.push((name.to_owned(), PathBuf::from(exe)));
                }
            }
            Some("compiler-message") => {
                let m = &msg["message"];
                let rendered = m["rendered"].as_str().unwrap_or_default();
                match m["level"].as_str() {
                    Some("error") | Some("error: internal compiler error") => errors.push(rendered.to_owned()),
                    // "N warnings emitted" only counts the ones already shown.
                    Some("warning") if m["spans"].as_array().is_some_and(|s| !s.is_empty()) => rendered.lines().for_each(warn),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for cargo: {e}"))?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{cmd:?}: {status}\n{}{stderr}", errors.join("\n")));
    }
    // Quiet cargo prints only its own warnings on stderr (a manifest problem, say).
    stderr.lines().filter(|l| !l.trim().is_empty()).for_each(warn);

    if executables.is_empty() {
        return Err(format!("{cmd:?} built no executable"));
    }
    for (name, exe) in executables {
        let dst = out_dir.join(&name);
        std::fs::copy(&exe, &dst).map_err(|e| format!("copying {} to {}: {e}", exe.display(), dst.display()))?;
    }
    Ok(())
}

fn var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("{name}: {e}"))
}

fn warn(line: &str) {
    println!("cargo:warning={line}");
}

/// `rustup run nightly cargo`, or the `cargo` on PATH (then assumed to be a nightly) where
/// there is no rustup.
fn nightly_cargo() -> Command {
    match which("rustup") {
        Some(rustup) => {
            let mut c = Command::new(rustup);
            c.args(["run", "nightly", "cargo"]);
            c
        }
        None => {
            warn("rustup not found: building the eBPF object with the cargo on PATH, which must be a nightly");
            Command::new("cargo")
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join(program)).find(|p| Path::new(p).is_file())
}
