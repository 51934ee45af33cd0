//! The operator-facing commands `sidecap validate` and `sidecap explain` (the `sidecap`
//! binary parses flags and calls these).

mod explain;
mod validate;

pub use explain::{ExplainArgs, ExplainError, OutputFormat, explain};
pub use validate::validate;
