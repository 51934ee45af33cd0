//! The operator-facing commands `sidecap validate` and `sidecap explain --config`: the
//! policy engine's typed results rendered as JSON or text (the binary parses flags and
//! calls these; `explain` against the live maps is in `inspect`).

mod explain;
mod trace;
mod validate;

pub use explain::{ExplainArgs, ExplainError, OutputFormat, explain};
pub use trace::{Summary as TraceSummary, TraceArgs, TraceError, parse_duration, trace};
pub use validate::validate;
