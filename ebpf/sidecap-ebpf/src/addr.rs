//! Addresses as four network-order words (shared with userspace: `sidecap_common::ip`).

pub use sidecap_common::ip::*;
