//! The helpers `gate.rs` takes from here, now in the workspace's test-support library
//! (`understudy_tests`, tests/support); new tests use that directly.

pub use understudy_tests::harness::{base36, run};
pub use understudy_tests::netns::in_ns;
