//! Stand-in for `sidecap explain` until the agent binary wires it:
//! `cargo run -p sidecap-policy --example explain -- --config DIR --pod NS/NAME [--to A:P]... [--inbound P]... [--output json|text] [--istio-exact]`
use std::process::ExitCode;

use sidecap_policy::AllowAnyMode;
use sidecap_policy::cli::{ExplainArgs, OutputFormat, explain};

fn main() -> ExitCode {
    let mut args = ExplainArgs {
        config: Vec::new(),
        pod: sidecap_policy::PodRef::new("", ""),
        to: Vec::new(),
        inbound: Vec::new(),
        output: OutputFormat::Json,
        allow_any: AllowAnyMode::Passthrough,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        let ok = match a.as_str() {
            "--config" => {
                args.config.push(val().into());
                true
            }
            "--pod" => val().parse().map(|p| args.pod = p).is_ok(),
            "--to" => val().parse().map(|t| args.to.push(t)).is_ok(),
            "--inbound" => val().parse().map(|p| args.inbound.push(p)).is_ok(),
            "--output" => val().parse().map(|o| args.output = o).is_ok(),
            "--istio-exact" => {
                args.allow_any = AllowAnyMode::Capture;
                true
            }
            _ => false,
        };
        if !ok {
            eprintln!("bad argument near {a}");
            return ExitCode::from(2);
        }
    }
    match explain(&args, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
