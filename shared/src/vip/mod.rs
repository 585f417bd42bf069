//! VIP ownership: ARP on the client network, and the address itself.
//!
//! ARCHITECTURE.md "Who owns the VIP" and "Takeover" steps 2 and 4. The serving node keeps
//! its kernel from answering ARP for the VIP ([`rules::KernelArpSilence`]) and answers from
//! its process ([`Responder`]), so an answer proves a live understudy process and a dead
//! one leaves the address silent at once. A node that wants the VIP fences with
//! [`probe()`] (RFC 5227 probes: an answer means someone serves it — stand down), then
//! claims it: rule, [`addr::add`], [`Responder`], [`announce`] (gratuitous ARP).
//!
//! Layers: [`arp`] is the wire format and the pure decisions (no I/O); [`socket`] is the
//! AF_PACKET socket; [`probe`](mod@probe) and [`responder`] are thin drivers over them;
//! [`rules`] and [`addr`] run `arptables` and `ip` (blocking, a few milliseconds each).
//! Everything acts in the network namespace of the calling thread (for the async
//! [`probe()`] and [`announce()`]: of the thread that first polls them); a socket stays in the
//! namespace it was opened in, and a [`KernelArpSilence`] removes its rule from the
//! namespace it installed it in. Needs CAP_NET_RAW (sockets) and CAP_NET_ADMIN (rules,
//! addresses).

pub mod addr;
pub mod arp;
mod command;
pub mod probe;
pub mod responder;
pub mod rules;
pub mod socket;

pub use arp::{ArpFrame, ArpKind, Mac};
pub use probe::{ProbeOutcome, STALE_ROUND, announce, announce_from, announce_on, announce_on_from, probe, probe_on};
pub use responder::{Conflict, Responder, ResponderCounts};
pub use rules::KernelArpSilence;
pub use socket::{ArpError, ArpSocket};
