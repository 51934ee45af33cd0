//! Live decision trace (`sidecap trace --pod NS/NAME`). The kernel programs send one
//! aya-log record per decision of a pod whose `PODS` entry has `pod_flags::TRACE`
//! (docs/kernel-contract.md, "Trace records"); the agent runs aya-log's reader
//! ([`logger`]), names the pod, forwards each record into `tracing` and to the CLI
//! sessions watching that pod ([`hub`]), over a length-prefixed stream on the admin
//! endpoint ([`frame`], [`session`]).
//!
//! A session holds a lease: the CLI sends a heartbeat every [`HEARTBEAT`]; the agent ends
//! the session, and turns the pod's switch off, when the connection closes or no heartbeat
//! came for [`LEASE`] (a CLI that was killed, stopped or cut off).

pub mod frame;
pub mod hub;
pub mod logger;
pub mod record;
pub mod session;

use std::time::Duration;

pub use frame::{Decoder, Frame, FrameError};
pub use hub::TraceHub;
pub use record::Record;

/// How long the agent keeps a pod traced without hearing from the CLI.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often the CLI renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Records per second each session (and the agent's own log) passes by default; the
/// rest are counted and reported as dropped (`--trace-rate`).
pub const DEFAULT_RATE: u32 = 200;
/// The admin endpoint's path: `GET /trace?pod=NS/NAME`.
pub const PATH: &str = "/trace";
/// Content type of the answer's stream of frames.
pub const CONTENT_TYPE: &str = "application/x-sidecap-trace";
