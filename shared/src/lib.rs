//! What both roles share: the replication protocol (messages, frames, codec, the
//! link), node configuration, the replica table (TCP tracker + HTTP framer per
//! connection), and the VIP/ARP helpers. See ARCHITECTURE.md.
//!
//! Invariant: the replica table is a deterministic function of the replication
//! stream; the same code runs on both nodes.

pub mod admin;
pub mod auth;
pub mod codec;
pub mod config;
pub mod frame;
pub mod lease;
pub mod link;
pub mod protocol;
pub mod replica;
pub mod vip;
