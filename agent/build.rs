use aya_build::{Package, Toolchain};

// Builds the eBPF object (`ebpf/sidecap-ebpf`, binary target `sidecap`) for
// bpfel-unknown-none with the nightly toolchain; the agent embeds it from OUT_DIR.
fn main() -> aya_build::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/sidecap-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "sidecap-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
