//! Stand-in for `sidecap validate PATH...` until the agent binary wires it.
fn main() {
    let args: Vec<std::path::PathBuf> = std::env::args().skip(1).map(Into::into).collect();
    let mut out = std::io::stdout();
    std::process::exit(sidecap_policy::cli::validate(&args, &mut out));
}
