#![no_std]
// The programs are in the `sidecap` binary target (src/main.rs), built for bpfel-unknown-none
// by agent/build.rs. This library target exists so the agent can list it as a
// build-dependency (cargo then rebuilds the agent when this crate changes).
