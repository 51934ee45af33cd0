//! Project commands: `cargo xtask setup | build | test | lint | demo | bench`.

mod bench;
mod demo;
mod lint;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "sidecap's project commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; fast when already present):
    /// nightly rust-src, bpf-linker built against the nightly's LLVM, Debian packages.
    Setup,
    /// Build the agent (and its embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests and the privileged end-to-end tests (need root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting and run clippy with `-D warnings` (workspace, and the eBPF crate for
    /// its target).
    Lint,
    /// Show capture working end to end in a throwaway sandbox.
    Demo,
    /// Benchmark sidecap against istio-init's iptables and no capture (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Cmd::Lint => {
            setup::run()?;
            setup::lint_tools()?;
            lint::run()
        }
        Cmd::Demo => {
            setup::run()?;
            build(false)?;
            demo::run()
        }
        Cmd::Bench(args) => {
            if args.bin_dir.is_none() && args.render.is_none() {
                setup::run()?;
            }
            bench::run(args)
        }
    }
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn status(mut c: Command, what: &str) -> anyhow::Result<()> {
    let st = c.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["build", "-p", "sidecap", "-p", "sidecap-tests", "--bins"]);
    if release {
        c.arg("--release");
    }
    status(c, "cargo build")
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    build(false)?;
    if !setup::is_root() {
        eprintln!("xtask: not root: privileged end-to-end tests will report themselves skipped");
    }
    let mut c = cargo();
    c.args(["test", "--workspace", "--exclude", "sidecap-ebpf", "--no-fail-fast"]);
    c.env("SIDECAP_BIN", workspace_root().join("target/debug/sidecap"));
    if !extra.is_empty() {
        c.arg("--").args(extra);
    }
    status(c, "cargo test")
}
