//! The replica table (ARCHITECTURE.md, "Replica table"): per client connection, a
//! TCP tracker, an HTTP/1.1 framer over both directions, and per-exchange records,
//! kept as a deterministic function of the replication stream (invariant 2) in
//! bounded memory (invariant 5), with the resume planner that turns it into
//! takeover decisions. Pure logic: no sockets, no clocks (time is an argument).
//!
//! * [`http`]: the HTTP/1.1 framer.
//! * [`table`]: [`ReplicaTable`], fed with [`crate::protocol::Record`]s; snapshots.
//! * [`resume`]: what to do with each connection at takeover.

pub mod http;
pub mod resume;
pub mod table;

pub use resume::{ConnResume, Decision, plan_takeover};
pub use table::{Applied, ApplyError, ReplicaTable, TableSummary};
