//! Why a pod's policy is not (wholly) in the kernel. Typed, so that the CNI answer, readiness
//! and logs decide by kind instead of by reading text; shared (`Arc`) sources, because one
//! scope's evaluation error is every pod's of that scope.

use std::{fmt, sync::Arc};

use crate::{datapath, netns};

/// A map that has no room for what a pod needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub map: &'static str,
    pub flag: &'static str,
    pub need: usize,
    pub free: usize,
    pub max: usize,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Shortfall { map, flag, need, free, max } = self;
        write!(f, "rule set needs {need} entries of map {map}, which has {free} of {max} free ({flag}); never written in part")
    }
}

/// What a pod refused for capacity has meanwhile.
#[derive(Clone, Debug)]
pub enum Meanwhile {
    /// It keeps the policy it had.
    PreviousPolicy,
    /// It had none: its rules without listener entries, everything else captured.
    CapturedWhole,
    /// Not even that could be written (None: even its rules without listener entries do not fit).
    NotCaptured(Option<Box<PodError>>),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    Policy(Arc<sidecap_policy::PolicyError>),
    #[error("{0}")]
    Netns(Arc<netns::Error>),
    #[error("{0}")]
    Datapath(Arc<datapath::Error>),
    #[error("{shortfall}; {}", match meanwhile {
        Meanwhile::PreviousPolicy => "the previous policy stays in force".to_string(),
        Meanwhile::CapturedWhole => "meanwhile every outbound connection of the pod goes to its proxy (no direct passthrough, no immediate drop)".to_string(),
        Meanwhile::NotCaptured(None) => "not captured at all: even its rules without listener entries do not fit".to_string(),
        Meanwhile::NotCaptured(Some(e)) => format!("not captured at all: {e}"),
    })]
    Capacity { shortfall: Shortfall, meanwhile: Meanwhile },
    #[error("the node already has {managed} meshed pods, the size of map PODS (--max-pods); not captured")]
    PodsFull { managed: usize },
}

impl PodError {
    /// True when the pod's own rules are not in force for lack of map capacity.
    pub fn is_capacity(&self) -> bool {
        matches!(self, PodError::Capacity { .. } | PodError::PodsFull { .. })
    }
}

impl From<sidecap_policy::PolicyError> for PodError {
    fn from(e: sidecap_policy::PolicyError) -> Self {
        PodError::Policy(Arc::new(e))
    }
}

impl From<netns::Error> for PodError {
    fn from(e: netns::Error) -> Self {
        PodError::Netns(Arc::new(e))
    }
}

impl From<datapath::Error> for PodError {
    fn from(e: datapath::Error) -> Self {
        PodError::Datapath(Arc::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capacity_refusal_says_what_the_pod_has_meanwhile() {
        let shortfall = Shortfall { map: "OUT_LISTENERS", flag: "--max-listeners", need: 3, free: 1, max: 4 };
        let whole = PodError::Capacity { shortfall: shortfall.clone(), meanwhile: Meanwhile::CapturedWhole };
        assert_eq!(
            whole.to_string(),
            "rule set needs 3 entries of map OUT_LISTENERS, which has 1 of 4 free (--max-listeners); never written in part; \
             meanwhile every outbound connection of the pod goes to its proxy (no direct passthrough, no immediate drop)"
        );
        let kept = PodError::Capacity { shortfall: shortfall.clone(), meanwhile: Meanwhile::PreviousPolicy };
        assert!(kept.to_string().ends_with("; the previous policy stays in force"));
        let none = PodError::Capacity { shortfall, meanwhile: Meanwhile::NotCaptured(Some(Box::new(PodError::PodsFull { managed: 2 }))) };
        assert!(
            none.to_string()
                .ends_with("not captured at all: the node already has 2 meshed pods, the size of map PODS (--max-pods); not captured")
        );
        assert!(whole.is_capacity() && PodError::PodsFull { managed: 1 }.is_capacity());
    }
}
