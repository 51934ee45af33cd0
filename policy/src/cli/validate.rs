//! `sidecap validate PATH...`: one line per Sidecar (`NS/NAME: ok`, `NS/NAME: warning: MSG`,
//! `NS/NAME: error: MSG`), load errors as `error: FILE:LINE: ...`; exit 1 on any error.

use std::io::Write;
use std::path::PathBuf;

use crate::cluster::{Object, load};
use crate::validate::validate_sidecar;

/// Returns the process exit code.
pub fn validate(paths: &[PathBuf], out: &mut dyn Write) -> i32 {
    let mut failed = false;
    let files = match load::expand_paths(paths) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(out, "error: {e}");
            return 1;
        }
    };
    for file in files {
        let (objs, errs) = load::load_documents(&file);
        for e in errs {
            failed = true;
            let _ = writeln!(out, "error: {e}");
        }
        for o in objs {
            let Object::Sidecar(sc) = &o.obj else { continue };
            let key = sc.metadata.key();
            let v = validate_sidecar(sc);
            for w in &v.warnings {
                let _ = writeln!(out, "{key}: warning: {w}");
            }
            for e in &v.errors {
                failed = true;
                let _ = writeln!(out, "{key}: error: {e}");
            }
            if v.warnings.is_empty() && v.errors.is_empty() {
                let _ = writeln!(out, "{key}: ok");
            }
        }
    }
    i32::from(failed)
}
