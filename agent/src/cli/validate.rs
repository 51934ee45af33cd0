//! `sidecap validate PATH...`: one line per Sidecar (`NS/NAME: ok`, `NS/NAME: warning: MSG`,
//! `NS/NAME: error: MSG`), load errors as `error: FILE:LINE: ...`; exit 1 on any error.

use std::io::Write;
use std::path::PathBuf;

use sidecap_policy::validate::{Finding, validate_paths};

/// Prints the findings for `paths`; returns the process exit code.
pub fn validate(paths: &[PathBuf], out: &mut dyn Write) -> i32 {
    let findings = validate_paths(paths);
    for f in &findings {
        let _ = match f {
            Finding::Load(e) => writeln!(out, "error: {e}"),
            Finding::Sidecar { key, validation } => write_sidecar(out, key, validation),
        };
    }
    i32::from(findings.iter().any(Finding::is_error))
}

fn write_sidecar(out: &mut dyn Write, key: &str, v: &sidecap_policy::validate::Validation) -> std::io::Result<()> {
    for w in &v.warnings {
        writeln!(out, "{key}: warning: {w}")?;
    }
    for e in &v.errors {
        writeln!(out, "{key}: error: {e}")?;
    }
    if v.warnings.is_empty() && v.errors.is_empty() {
        writeln!(out, "{key}: ok")?;
    }
    Ok(())
}
