//! `namespace/name` of a pod.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodRefError {
    #[error("pod must be NAMESPACE/NAME, got {0:?}")]
    Malformed(String),
}

impl PodRef {
    pub fn new(namespace: &str, name: &str) -> PodRef {
        PodRef { namespace: namespace.to_string(), name: name.to_string() }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodRef {
    type Err = PodRefError;

    fn from_str(s: &str) -> Result<PodRef, PodRefError> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(PodRef::new(ns, name)),
            _ => Err(PodRefError::Malformed(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r: PodRef = "default/client".parse().expect("valid ref");
        assert_eq!(r.to_string(), "default/client");
        assert!("client".parse::<PodRef>().is_err());
        assert!("/client".parse::<PodRef>().is_err());
        assert!("a/b/c".parse::<PodRef>().is_err());
    }
}
