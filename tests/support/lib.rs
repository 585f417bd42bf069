//! Test support for the whole workspace: the one home of helpers that more than one test uses. The
//! end-to-end tests (`tests/`) and the crates' own tests (`primary`, `backup` and `shared` have it as
//! a dev-dependency) share it.
//!
//! * [`harness`]: the `scripts/testbed` bed, processes in its hosts, packet captures, commands,
//!   bounded waits ([`harness::wait_until`]), unique names.
//! * [`netns`]: threads inside network namespaces.
//! * [`tempdir`]: directories removed on drop.
//! * [`nginx`]: nginx as a real origin; [`hyper_origin`]: a small origin in the test's process.
//! * [`pattern`]: deterministic payloads generated from any offset.
//! * [`app`], [`derive`], [`takeover`]: the `us-testapp` application and the kernel takeover tests
//!   (`tests/takeover.rs`); [`pair`]: the replicated pair in a test bed (`tests/pair.rs`), roles moving
//!   between its hosts across failovers; [`load`]: a steady keep-alive load with every body checked.
//! * [`campaign`]: the fault campaign (`us-campaign`, `scripts/campaign`, `tests/campaign.rs`).
//! * [`corrupt`]: what `us-corrupt` does to a replication segment (`scripts/faults corrupt`).
//! * [`psk`]: replication key files for tests that run real nodes.
//! * [`tool`]: what the `us-demo` and `us-scale` tools share (clean stop on SIGINT, exit status, progress).
//! * [`bench_load`]: the benchmark's load clients (`us-bench`: throughput over time, stalls, resets; idle
//!   connections for a takeover's scale); [`plot`]: SVG line plots for its report.
//!
//! It depends on no crate of ours but `tcp-replay`, so any crate can take it as a dev-dependency.

pub mod app;
#[cfg(target_os = "linux")]
pub mod bench_load;
#[cfg(target_os = "linux")]
pub mod campaign;
pub mod corrupt;
pub mod derive;
pub mod harness;
pub mod hyper_origin;
#[cfg(target_os = "linux")]
pub mod load;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod nginx;
#[cfg(target_os = "linux")]
pub mod pair;
pub mod pattern;
pub mod plot;
pub mod psk;
#[cfg(target_os = "linux")]
pub mod takeover;
pub mod tempdir;
#[cfg(target_os = "linux")]
pub mod tool;
