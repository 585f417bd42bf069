//! The admin endpoint (`--admin`): `GET /status` (JSON), `GET /metrics` (Prometheus text,
//! version 0.0.4) and `GET /healthz`, and the metric handles the rest of the node updates.
//!
//! * [`metrics`]: counters, gauges and histograms as atomics behind typed handles
//!   (struct fields, enum-indexed families); no name lookups on hot paths.
//! * [`state`]: [`AdminState`], the cheaply cloned handle every component holds: identity,
//!   role, peer, epoch, failovers, connections ([`ConnectionGuard`]) and the [`Metrics`];
//!   read as a [`NodeStatus`] or as the exposition, at a time passed in.
//! * [`expo`]: the exposition format, written by hand (a few dozen series do not need a
//!   crate).
//! * [`server`]: [`serve`], the hyper 1 server, and [`AdminAuth`], the bearer-token check
//!   (loopback is open by default; anything else needs a token).

pub mod expo;
pub mod metrics;
pub mod server;
pub mod state;

pub use metrics::{
    Counter, Direction, FailoverPhase, GateQueue, Gauge, Histogram, Label, Lag, Limit, Metrics, ResumePath,
    UnprotectedReason,
};
pub use server::{AdminAuth, AuthConfigError, ServeError, TokenFileError, Unauthorized, load_token, serve};
pub use state::{
    AdminState, AlarmStatus, ConnectionGuard, FailoverRecord, NodeStatus, PeerLostStatus, PeerState, Protection,
    ReplicaStatus, SwitchoverReply,
};
