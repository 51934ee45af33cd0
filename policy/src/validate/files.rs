//! Validation of files and directories as `sidecap validate` reports it: each file's load
//! errors, then each Sidecar in it with Istio's verdict, in file order. Typed: the binary
//! renders it.

use std::path::PathBuf;

use crate::cluster::{LoadError, Object, load};

use super::{Validation, validate_sidecar};

#[derive(Debug)]
pub enum Finding {
    /// A path that could not be read, or a document that could not be parsed.
    Load(LoadError),
    /// One Sidecar and what Istio's admission says of it.
    Sidecar {
        /// `namespace/name`.
        key: String,
        validation: Validation,
    },
}

impl Finding {
    /// True when this finding fails validation (a load error, or a Sidecar Istio rejects).
    pub fn is_error(&self) -> bool {
        match self {
            Finding::Load(_) => true,
            Finding::Sidecar { validation, .. } => !validation.errors.is_empty(),
        }
    }
}

/// Every finding for `paths` (files, or directories read recursively).
pub fn validate_paths(paths: &[PathBuf]) -> Vec<Finding> {
    let files = match load::expand_paths(paths) {
        Ok(f) => f,
        Err(e) => return vec![Finding::Load(e)],
    };
    let mut out = Vec::new();
    for file in files {
        let (objs, errs) = load::load_documents(&file);
        out.extend(errs.into_iter().map(Finding::Load));
        for o in objs {
            let Object::Sidecar(sc) = &o.obj else { continue };
            out.push(Finding::Sidecar { key: sc.metadata.key(), validation: validate_sidecar(sc) });
        }
    }
    out
}
