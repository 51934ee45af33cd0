use std::env;

// The eBPF object depends on the bpf-linker binary, which cargo does not track:
// rebuild when it changes (e.g. after `cargo xtask setup` rebuilt it).
fn main() {
    let linker = which::which("bpf-linker").unwrap_or_else(|e| panic!("bpf-linker not found ({e}): run `cargo xtask setup` first"));
    println!("cargo:rerun-if-changed={}", linker.display());
    let _ = env::var_os("OUT_DIR");
}
