//! End-to-end test support: the `us-testapp` application (protocol, record,
//! resume), deterministic payloads, and the namespace harness of the kernel
//! takeover tests (`tests/takeover.rs`).

pub mod app;
pub mod derive;
pub mod harness;
#[cfg(target_os = "linux")]
pub mod pair;
pub mod pattern;
#[cfg(target_os = "linux")]
pub mod takeover;
