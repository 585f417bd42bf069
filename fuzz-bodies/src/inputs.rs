//! The byte formats the fuzz bodies read, and builders for them (seeds, tests).
//!
//! The formats are simple on purpose: libFuzzer mutates bytes, and a mutation of a
//! length or a control byte should still give a usable input. Every byte string is
//! a valid input; missing bytes read as zero or as an empty tail.

use std::time::Duration;
use tcp_replay::{Dir, ServerAcks, Validation};

/// Splits `bytes` at the positions `cuts` (ascending; clamped to the length).
pub fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for &c in cuts {
        let c = c.clamp(at, bytes.len());
        out.push(&bytes[at..c]);
        at = c;
    }
    out.push(&bytes[at..]);
    out
}

/// Cut positions from byte deltas (so that every byte string means ascending cuts).
fn cuts_from(deltas: &[u8]) -> Vec<usize> {
    deltas
        .iter()
        .scan(0usize, |at, &d| {
            *at += d as usize;
            Some(*at)
        })
        .collect()
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

// ---- tracker ------------------------------------------------------------------

/// How the tracker is set up (first byte: bit 0 Observer validation, bit 1 inferred
/// server ACKs, as the replica table uses, bit 2 trimming on ACK off, as the CLI's
/// drain uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerConfig {
    pub validation: Validation,
    pub server_acks: ServerAcks,
    pub trim_on_ack: bool,
}

impl TrackerConfig {
    fn byte(self) -> u8 {
        (self.validation == Validation::Observer) as u8
            | ((self.server_acks == ServerAcks::Inferred) as u8) << 1
            | (!self.trim_on_ack as u8) << 2
    }
}

/// One call on the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerOp<'a> {
    /// `handle_segment(now + after, dir, datagram)`.
    Segment { dir: Dir, after: Duration, datagram: &'a [u8] },
    /// `handle_server_data(offset, bytes)`.
    ServerData { offset: u64, bytes: &'a [u8] },
    /// `trim(dir, offset)`.
    Trim { dir: Dir, offset: u64 },
}

/// Tracker input: the config byte, then operations, each `[ctrl][len: u16 BE][len bytes]`.
/// `ctrl & 3`: 0 a segment to the server, 1 a segment to the client (`ctrl >> 2` ms
/// after the previous one; the bytes are an IPv4 datagram), 2 server data (a u32 BE
/// offset, then the bytes), 3 a trim (`ctrl & 4`: of the server's stream; a u32 BE offset).
pub fn parse_tracker(data: &[u8]) -> (TrackerConfig, Vec<TrackerOp<'_>>) {
    let mut data = data;
    let c = take(&mut data, 1).first().copied().unwrap_or(0);
    let config = TrackerConfig {
        validation: if c & 1 != 0 { Validation::Observer } else { Validation::Kernel },
        server_acks: if c & 2 != 0 { ServerAcks::Inferred } else { ServerAcks::Seen },
        trim_on_ack: c & 4 == 0,
    };
    let mut ops = Vec::new();
    while !data.is_empty() {
        let head = take(&mut data, 3);
        let ctrl = head[0];
        let len = u16::from_be_bytes([head.get(1).copied().unwrap_or(0), head.get(2).copied().unwrap_or(0)]);
        let mut body = take(&mut data, len as usize);
        let u32_of = |b: &[u8]| {
            let mut w = [0u8; 4];
            w[..b.len()].copy_from_slice(b);
            u32::from_be_bytes(w) as u64
        };
        ops.push(match ctrl & 3 {
            0 | 1 => TrackerOp::Segment {
                dir: if ctrl & 3 == 0 { Dir::ToServer } else { Dir::ToClient },
                after: Duration::from_millis((ctrl >> 2) as u64),
                datagram: body,
            },
            2 => TrackerOp::ServerData { offset: u32_of(take(&mut body, 4)), bytes: body },
            _ => TrackerOp::Trim {
                dir: if ctrl & 4 != 0 { Dir::ToClient } else { Dir::ToServer },
                offset: u32_of(take(&mut body, 4)),
            },
        });
    }
    (config, ops)
}

/// Encodes a tracker input (see [`parse_tracker`]); times are rounded to the 63 ms a
/// step can carry.
pub fn tracker(config: TrackerConfig, ops: &[TrackerOp<'_>]) -> Vec<u8> {
    let mut out = vec![config.byte()];
    for op in ops {
        let (ctrl, body): (u8, Vec<u8>) = match *op {
            TrackerOp::Segment { dir, after, datagram } => {
                let step = after.as_millis().min(63) as u8;
                ((step << 2) | (dir == Dir::ToClient) as u8, datagram.to_vec())
            }
            TrackerOp::ServerData { offset, bytes } => {
                let mut b = (offset as u32).to_be_bytes().to_vec();
                b.extend_from_slice(bytes);
                (2, b)
            }
            TrackerOp::Trim { dir, offset } => {
                (3 | ((dir == Dir::ToClient) as u8) << 2, (offset as u32).to_be_bytes().to_vec())
            }
        };
        let len = body.len().min(u16::MAX as usize);
        out.push(ctrl);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&body[..len]);
    }
    out
}

// ---- frame --------------------------------------------------------------------

/// Which message type the replication stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Primary to backup, after the handshake.
    ToBackup,
    /// Backup to primary.
    ToPrimary,
    /// The handshake.
    Handshake,
    /// Frames only, no message decoding.
    Raw,
}

/// The maximum frame lengths an input can pick.
const MAX_FRAMES: [usize; 4] = [shared::frame::DEFAULT_MAX_FRAME, 64, 512, 4096];

/// A frame body's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInput<'a> {
    pub kind: FrameKind,
    pub max_frame: usize,
    /// Where the stream is cut into reads.
    pub cuts: Vec<usize>,
    pub wire: &'a [u8],
}

/// Frame input: `[ctrl][n cut deltas][wire]`; `ctrl & 3` the kind (in [`FrameKind`]
/// order), `(ctrl >> 2) & 3` the maximum frame length (16 MiB, 64, 512, 4096), `ctrl >> 4`
/// the number of cuts.
pub fn parse_frame(data: &[u8]) -> FrameInput<'_> {
    let mut data = data;
    let ctrl = take(&mut data, 1).first().copied().unwrap_or(0);
    let kind = [FrameKind::ToBackup, FrameKind::ToPrimary, FrameKind::Handshake, FrameKind::Raw][(ctrl & 3) as usize];
    let cuts = cuts_from(take(&mut data, (ctrl >> 4) as usize));
    FrameInput { kind, max_frame: MAX_FRAMES[((ctrl >> 2) & 3) as usize], cuts, wire: data }
}

/// Encodes a frame input with the default maximum and the given cut deltas.
pub fn frame(kind: FrameKind, cut_deltas: &[u8], wire: &[u8]) -> Vec<u8> {
    let n = cut_deltas.len().min(15);
    let kind = [FrameKind::ToBackup, FrameKind::ToPrimary, FrameKind::Handshake, FrameKind::Raw]
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is listed") as u8;
    let mut out = vec![kind | (n as u8) << 4];
    out.extend_from_slice(&cut_deltas[..n]);
    out.extend_from_slice(wire);
    out
}

// ---- HTTP framer --------------------------------------------------------------

/// An HTTP framer body's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpInput<'a> {
    /// Where both streams are cut into reads.
    pub cuts: Vec<usize>,
    pub client: &'a [u8],
    pub server: &'a [u8],
}

/// HTTP input: `[n][client length: u16 BE][n cut deltas][client bytes][server bytes]`
/// (`n & 15` cuts).
pub fn parse_http(data: &[u8]) -> HttpInput<'_> {
    let mut data = data;
    let n = take(&mut data, 1).first().copied().unwrap_or(0) & 15;
    let len = take(&mut data, 2);
    let client_len = u16::from_be_bytes([len.first().copied().unwrap_or(0), len.get(1).copied().unwrap_or(0)]);
    let cuts = cuts_from(take(&mut data, n as usize));
    let client = take(&mut data, client_len as usize);
    HttpInput { cuts, client, server: data }
}

/// Encodes an HTTP input (the client bytes are cut to 64 KiB).
pub fn http(cut_deltas: &[u8], client: &[u8], server: &[u8]) -> Vec<u8> {
    let n = cut_deltas.len().min(15);
    let client = &client[..client.len().min(u16::MAX as usize)];
    let mut out = vec![n as u8];
    out.extend_from_slice(&(client.len() as u16).to_be_bytes());
    out.extend_from_slice(&cut_deltas[..n]);
    out.extend_from_slice(client);
    out.extend_from_slice(server);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip_through_their_builders() {
        let config =
            TrackerConfig { validation: Validation::Observer, server_acks: ServerAcks::Inferred, trim_on_ack: false };
        let ops = [
            TrackerOp::Segment { dir: Dir::ToClient, after: Duration::from_millis(5), datagram: b"abc" },
            TrackerOp::ServerData { offset: 7, bytes: b"xy" },
            TrackerOp::Trim { dir: Dir::ToClient, offset: 9 },
            TrackerOp::Segment { dir: Dir::ToServer, after: Duration::ZERO, datagram: b"" },
        ];
        assert_eq!(parse_tracker(&tracker(config, &ops)), (config, ops.to_vec()));

        let f = frame(FrameKind::Handshake, &[3, 4], b"wire");
        assert_eq!(
            parse_frame(&f),
            FrameInput { kind: FrameKind::Handshake, max_frame: MAX_FRAMES[0], cuts: vec![3, 7], wire: b"wire" }
        );

        let h = http(&[1, 1], b"GET", b"HTTP");
        assert_eq!(parse_http(&h), HttpInput { cuts: vec![1, 2], client: b"GET", server: b"HTTP" });
    }

    #[test]
    fn pieces_cover_the_bytes_once_whatever_the_cuts() {
        assert_eq!(pieces(b"abcdef", &[2, 2, 9]), vec![&b"ab"[..], b"", b"cdef", b""]);
        assert_eq!(pieces(b"", &[]), vec![&b""[..]]);
        assert_eq!(pieces(b"abc", &[2, 1]).concat(), b"abc");
    }

    #[test]
    fn short_inputs_read_as_zeros_and_empty_tails() {
        assert_eq!(parse_tracker(&[]).1, vec![]);
        let (_, ops) = parse_tracker(&[0, 2, 0]);
        assert_eq!(ops, vec![TrackerOp::ServerData { offset: 0, bytes: b"" }]);
        assert_eq!(parse_http(&[0x31]), HttpInput { cuts: vec![], client: b"", server: b"" });
        assert_eq!(parse_frame(&[]).wire, b"");
    }
}
