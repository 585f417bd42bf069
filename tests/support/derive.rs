//! Derives a restore plan for one connection from a packet capture alone, with
//! `tcp_replay`'s pcap reader and tracker.

use crate::app::PlanOffsets;
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;
use tcp_replay::pcap::CaptureReader;
use tcp_replay::{Checksums, Dir, RestorePlan, Segment, Tracker};

/// A plan derived from a capture, and what the oracle and the resumed server need with it.
#[derive(Debug, Clone)]
pub struct Derived {
    pub plan: RestorePlan,
    /// Client bytes seen beyond the server's last ACK (for `plan::compare`).
    pub client_ahead: u32,
    /// Where the plan's queues sit in the two byte streams.
    pub offsets: PlanOffsets,
    /// Client-stream offset the receive queue was trimmed to (what the server
    /// application consumed, capped at what the server acknowledged).
    pub trimmed_to: u64,
    /// Segments of the connection fed to the tracker.
    pub segments: u64,
    /// Segments the tracker refused (a kernel would have dropped them), first few.
    pub refused: Vec<String>,
    pub refused_count: u64,
    /// Packets in the capture that did not parse as IPv4/TCP.
    pub unparsed: u64,
    /// The tracker after the capture, to derive the plan again at a later time.
    pub tracker: Tracker,
}

/// Feeds every segment between `client` and `server` in the capture at `path` to a
/// tracker, releases the client bytes the server application `consumed` (the
/// tracker can only vouch for what the server acknowledged, so never beyond that),
/// and asks for the plan at `now` (time since the UNIX epoch, as pcap timestamps).
pub fn plan_from_capture(
    path: &Path,
    client: SocketAddrV4,
    server: SocketAddrV4,
    consumed: u64,
    now: Duration,
) -> Result<Derived> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = CaptureReader::new(BufReader::new(file)).with_context(|| format!("reading {}", path.display()))?;
    let mut tracker = Tracker::new();
    let (mut segments, mut refused_count, mut unparsed) = (0u64, 0u64, 0u64);
    let mut refused = Vec::new();
    while let Some(p) = reader.next_packet().with_context(|| format!("reading {}", path.display()))? {
        let seg = match Segment::parse_ipv4(p.data, Checksums::Verify) {
            Ok(s) => s,
            Err(_) => {
                unparsed += 1;
                continue;
            }
        };
        let dir = if seg.src == client && seg.dst == server {
            Dir::ToServer
        } else if seg.src == server && seg.dst == client {
            Dir::ToClient
        } else {
            continue;
        };
        segments += 1;
        if let Err(e) = tracker.handle_segment(p.ts, dir, &seg) {
            refused_count += 1;
            if refused.len() < 10 {
                refused.push(format!("packet {}: {e}", p.number));
            }
        }
    }
    if segments == 0 {
        bail!("no segment between {client} and {server} in {}", path.display());
    }
    let (Some(client_isn), Some(server_isn)) = (tracker.sender(Dir::ToServer).isn, tracker.sender(Dir::ToClient).isn)
    else {
        bail!("the capture does not hold the handshake of {client} -> {server}");
    };
    // Offsets count from ISN + 1; these transfers stay far below 4 GiB.
    let client_off = |seq: tcp_replay::Seq| u64::from(seq.0.wrapping_sub(client_isn.0).wrapping_sub(1));
    let server_off = |seq: tcp_replay::Seq| u64::from(seq.0.wrapping_sub(server_isn.0).wrapping_sub(1));
    let acked = tracker.sender(Dir::ToClient).acked().map_or(0, client_off);
    let trimmed_to = consumed.min(acked);
    tracker.trim(Dir::ToServer, trimmed_to);
    let plan = tracker.restore_plan(now).context("deriving the restore plan")?;
    let offsets = PlanOffsets { snd_una: server_off(plan.snd_una), recv_queue: client_off(plan.recv_queue_seq()) };
    Ok(Derived {
        client_ahead: tracker.client_bytes_beyond_ack(),
        plan,
        offsets,
        trimmed_to,
        segments,
        refused,
        refused_count,
        unparsed,
        tracker,
    })
}
