//! The serving role: the HTTP/1.1 proxy (or built-in static file server), the
//! inbound gate (NFQUEUE), the logged client IO, and the replication sender.
//!
//! Invariant (output commit): nothing leaves towards a client — ACK, reply byte,
//! FIN or RST — unless the backup already holds what it needs to reproduce it.

pub mod claim;
pub mod cli;
pub mod gate;
pub mod leftovers;
pub mod node;
pub mod proxy;
pub mod replicate;
