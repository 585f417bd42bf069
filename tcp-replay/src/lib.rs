//! tcp-replay: know the exact state of a TCP connection from its packets alone, and
//! recreate that connection in another host's kernel.
//!
//! Layers, bottom up:
//! * [`seq`], [`segment`]: wrap-safe sequence numbers and checked IPv4/TCP views.
//! * [`stream`]: exactly-once reassembly of one direction's byte stream.
//! * [`tracker`]: the sans-IO connection tracker (`handle_segment(now, dir, seg)`).
//!   It never reads a clock or touches a socket.
//! * [`plan`]: the restore plan a tracker derives, and its comparison with the
//!   kernel's own view.
//! * [`flows`]: demultiplexes a capture into per-connection trackers.
//! * [`pcap`]: classic pcap and pcapng input.
//! * [`repair`] (Linux): `TCP_REPAIR` restore and checkpoint of live sockets.

pub mod flows;
pub mod pcap;
pub mod plan;
#[cfg(target_os = "linux")]
pub mod repair;
pub mod segment;
pub mod seq;
pub mod stream;
pub mod tracker;

pub use plan::{RestorePlan, TcpState};
pub use segment::{Checksums, ParseError, Segment, TcpFlags, TcpOptions};
pub use seq::Seq;
pub use tracker::{Dir, ServerAcks, TrackError, Tracker, Validation};
