//! Seed corpora, made from the pcap fixtures of `tcp-replay/tests/fixtures` (real
//! Linux traffic) and from real protocol messages, so that fuzzing starts from
//! inputs that reach deep into each parser.
//!
//! * `segment`: the fixtures' IPv4 datagrams, one per kind (direction, flags,
//!   options, with or without payload).
//! * `tracker`: each fixture's handshake and first segments as the tracker is fed
//!   them, in three set-ups, payloads cut short; the first few whole; the last few
//!   (mid-stream); and as the replica feeds it (client segments, the server's
//!   SYN-ACK/FIN/RST, reply bytes as server data).
//! * `frame`: encoded streams of every replication message, segments and reply
//!   bytes taken from the fixtures, a replica snapshot of a fixture's connection.
//! * `http_framer`: the fixtures' first TCP payloads each way (not HTTP: they
//!   exercise refusal), and HTTP/1.1 exchanges of every framing the framer knows.

use crate::inputs::{self, FrameKind, TrackerConfig, TrackerOp};
use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use shared::frame::{DEFAULT_MAX_FRAME, encode_value};
use shared::protocol::{
    ConnKey, ExchangeStart, Handshake, Hello, Message, PROTOCOL_VERSION, Record, Role, ToBackup, ToPrimary, Welcome,
};
use shared::replica::ReplicaTable;
use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcp_replay::pcap::CaptureReader;
use tcp_replay::segment::SegmentBuilder;
use tcp_replay::{Checksums, Dir, Segment, ServerAcks, Validation};

/// The fuzz targets, by name.
pub const TARGETS: [&str; 4] = ["segment", "tracker", "frame", "http_framer"];

/// One seed input.
#[derive(Debug, Clone)]
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The pcap fixtures' directory in this repository.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tcp-replay/tests/fixtures")
}

/// A captured datagram, with its time and direction.
struct Captured {
    at: Duration,
    dir: Dir,
    datagram: Vec<u8>,
}

/// The TCP datagrams of one capture; the direction comes from the first SYN.
fn read_capture(path: &Path) -> Result<Vec<Captured>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = CaptureReader::new(BufReader::new(file)).with_context(|| format!("reading {}", path.display()))?;
    let mut client = None;
    let mut out = Vec::new();
    while let Some(p) = reader.next_packet().with_context(|| format!("reading {}", path.display()))? {
        let Ok(seg) = Segment::parse_ipv4(p.data, Checksums::Verify) else { continue };
        if client.is_none() && seg.flags.syn() && !seg.flags.ack() {
            client = Some(seg.src);
        }
        let Some(client) = client else { continue };
        let dir = if seg.src == client { Dir::ToServer } else { Dir::ToClient };
        out.push(Captured { at: p.ts, dir, datagram: p.data.to_vec() });
    }
    if out.is_empty() {
        bail!("{}: no TCP connection from its SYN", path.display());
    }
    Ok(out)
}

/// The fixtures' captures, by name, in name order.
fn captures() -> Result<Vec<(String, Vec<Captured>)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .with_context(|| format!("listing {}", fixtures_dir().display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("pcap" | "pcapng")))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("capture").to_string();
            Ok((name, read_capture(p)?))
        })
        .collect()
}

/// Every seed of every target.
pub fn all() -> Result<Vec<Seed>> {
    let captures = captures()?;
    let mut seeds = Vec::new();
    seeds.extend(segment_seeds(&captures));
    seeds.extend(tracker_seeds(&captures));
    seeds.extend(frame_seeds(&captures));
    seeds.extend(http_seeds(&captures));
    Ok(seeds)
}

fn seg(datagram: &[u8]) -> Segment<'_> {
    Segment::parse_ipv4(datagram, Checksums::Verify).expect("captured datagrams were parsed once already")
}

fn segment_seeds(captures: &[(String, Vec<Captured>)]) -> Vec<Seed> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (name, packets) in captures {
        for (i, p) in packets.iter().enumerate() {
            let s = seg(&p.datagram);
            let o = &s.options;
            let kind = (
                p.dir == Dir::ToClient,
                s.flags.0,
                o.mss.is_some(),
                o.wscale.is_some(),
                o.sack_permitted,
                o.timestamps.is_some(),
                o.sack().len(),
                s.payload.is_empty(),
            );
            if seen.insert(kind) {
                out.push(Seed { target: "segment", name: format!("{name}-{i}"), bytes: p.datagram.clone() });
            }
        }
    }
    out
}

/// Segments per tracker seed: the handshake and the first exchanges.
const TRACKER_SEGMENTS: usize = 24;
/// Payload bytes kept per segment in most tracker seeds: small inputs fuzz faster, and
/// the bytes cut out are what a lossy capture misses (the ACKs still cover them).
const TRACKER_PAYLOAD: usize = 32;

/// The datagram with its payload cut to `TRACKER_PAYLOAD` bytes, checksums redone.
fn shrink(datagram: &[u8]) -> Vec<u8> {
    let s = seg(datagram);
    let mut b = SegmentBuilder::new(s.src, s.dst);
    b.flags = s.flags.0;
    b.seq = s.seq;
    b.ack = s.ack;
    b.window = s.window;
    b.options = s.options;
    b.build(&s.payload[..s.payload.len().min(TRACKER_PAYLOAD)])
}

/// Every packet as a segment operation, timed as captured; payloads shrunk or whole.
fn segment_ops(packets: &[Captured], whole: bool) -> Vec<(Dir, Duration, Vec<u8>)> {
    let mut last = None;
    packets
        .iter()
        .map(|p| {
            let after = last.map_or(Duration::ZERO, |l| p.at.saturating_sub(l));
            last = Some(p.at);
            (p.dir, after, if whole { p.datagram.clone() } else { shrink(&p.datagram) })
        })
        .collect()
}

fn tracker_input(config: TrackerConfig, ops: &[(Dir, Duration, Vec<u8>)]) -> Vec<u8> {
    let ops: Vec<TrackerOp<'_>> =
        ops.iter().map(|(dir, after, datagram)| TrackerOp::Segment { dir: *dir, after: *after, datagram }).collect();
    inputs::tracker(config, &ops)
}

fn tracker_seeds(captures: &[(String, Vec<Captured>)]) -> Vec<Seed> {
    let kernel = TrackerConfig { validation: Validation::Kernel, server_acks: ServerAcks::Seen, trim_on_ack: true };
    let configs = [
        ("kernel", kernel),
        ("observer", TrackerConfig { validation: Validation::Observer, ..kernel }),
        ("keep", TrackerConfig { trim_on_ack: false, ..kernel }),
    ];
    let mut out = Vec::new();
    for (name, packets) in captures {
        let head = segment_ops(&packets[..packets.len().min(TRACKER_SEGMENTS)], false);
        for (label, config) in configs {
            out.push(Seed { target: "tracker", name: format!("{name}-{label}"), bytes: tracker_input(config, &head) });
        }
        // The handshake and first data whole: a connection the tracker can restore.
        let whole = segment_ops(&packets[..packets.len().min(8)], true);
        out.push(Seed { target: "tracker", name: format!("{name}-whole"), bytes: tracker_input(kernel, &whole) });
        // The end of the connection (FIN or RST), seen mid-stream.
        let tail = segment_ops(&packets[packets.len().saturating_sub(TRACKER_SEGMENTS / 2)..], false);
        out.push(Seed { target: "tracker", name: format!("{name}-tail"), bytes: tracker_input(configs[1].1, &tail) });

        // As the replica is fed: every client segment, the server's control segments,
        // and the server's bytes from the reply log.
        let replica = TrackerConfig { server_acks: ServerAcks::Inferred, ..kernel };
        let mut shrunk = Vec::new();
        let mut plan = Vec::new();
        let mut last = None;
        let mut server_offset = 0u64;
        for p in packets.iter().take(TRACKER_SEGMENTS * 2) {
            let s = seg(&p.datagram);
            let after = last.map_or(Duration::ZERO, |l| p.at.saturating_sub(l));
            last = Some(p.at);
            if p.dir == Dir::ToServer || s.flags.syn() || s.flags.fin() || s.flags.rst() {
                shrunk.push(shrink(&p.datagram));
                plan.push((p.dir, after, shrunk.len() - 1, None));
            }
            if p.dir == Dir::ToClient && !s.payload.is_empty() {
                let bytes = &s.payload[..s.payload.len().min(TRACKER_PAYLOAD)];
                plan.push((p.dir, after, usize::MAX, Some((server_offset, bytes))));
                server_offset += s.payload.len() as u64;
            }
        }
        let mut ops: Vec<TrackerOp<'_>> = plan
            .iter()
            .map(|(dir, after, i, data)| match data {
                Some((offset, bytes)) => TrackerOp::ServerData { offset: *offset, bytes },
                None => TrackerOp::Segment { dir: *dir, after: *after, datagram: &shrunk[*i] },
            })
            .collect();
        ops.push(TrackerOp::Trim { dir: Dir::ToServer, offset: 100 });
        out.push(Seed { target: "tracker", name: format!("{name}-replica"), bytes: inputs::tracker(replica, &ops) });
    }
    out
}

fn key(captures: &[(String, Vec<Captured>)]) -> ConnKey {
    let s = seg(&captures[0].1[0].datagram);
    ConnKey { client: s.src, server: s.dst }
}

/// A stream of frames carrying `msgs`.
fn wire<T: serde::Serialize>(msgs: &[T]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for m in msgs {
        encode_value(m, DEFAULT_MAX_FRAME, &mut buf).expect("seed messages fit a frame");
    }
    buf.to_vec()
}

fn frame_seeds(captures: &[(String, Vec<Captured>)]) -> Vec<Seed> {
    let conn = key(captures);
    let (_, packets) = &captures[0];
    let record = |seq: u64, msg: Message| ToBackup::Record(Record { seq, epoch: 3, msg });
    let segments: Vec<Message> = packets
        .iter()
        .take(6)
        .map(|p| Message::Segment { at_us: p.at.as_micros() as u64, dir: p.dir, datagram: p.datagram.clone() })
        .collect();
    let reply = packets.iter().map(|p| seg(&p.datagram)).find(|s| !s.payload.is_empty()).map(|s| s.payload.to_vec());
    let reply = reply.unwrap_or_else(|| b"HTTP/1.1 200 OK\r\n".to_vec());
    let others = vec![
        Message::Reply { conn, offset: 0, bytes: reply[..reply.len().min(200)].to_vec() },
        Message::ExchangeStart(ExchangeStart {
            conn,
            exchange: 0,
            request_offset: 0,
            method: "POST".into(),
            target: "/upload?x=1".into(),
            idempotency_key: Some("3f2a-77".into()),
            key_generated: false,
            upstream: Some("http://10.2.0.10:8080".into()),
        }),
        Message::Upstream {
            conn,
            exchange: 0,
            offset: 0,
            bytes: b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        },
        Message::ExchangeEnd { conn, exchange: 0, status: 201 },
        Message::ConnClosed { conn },
        Message::Ping,
        Message::Handover,
    ];

    // A joining spare's snapshot of the fixture's connection, as the replica holds it.
    let mut table = ReplicaTable::new();
    for (i, m) in segments.iter().enumerate() {
        let _ = table.apply(&Record { seq: i as u64 + 1, epoch: 3, msg: m.clone() });
    }
    let snapshot: Vec<ToBackup> =
        table.snapshot(4096).into_iter().enumerate().map(|(i, m)| record(100 + i as u64, m)).collect();

    let mut stream: Vec<ToBackup> =
        segments.into_iter().chain(others).enumerate().map(|(i, m)| record(i as u64 + 1, m)).collect();
    stream.insert(2, ToBackup::Heartbeat { sent_us: 1_234_567, epoch: 3 });
    let hello = Hello {
        version: PROTOCOL_VERSION,
        min_version: 2,
        cluster: "understudy".into(),
        node: "backup-b".into(),
        role: Role::Backup,
        epoch: 3,
    };
    let handshake = [
        Handshake::Hello(hello),
        Handshake::Welcome(Welcome::Accepted { version: PROTOCOL_VERSION, node: "primary-a".into(), epoch: 3 }),
        Handshake::Welcome(Welcome::Refused { reason: "cluster name differs".into() }),
    ];
    let to_primary = [
        ToPrimary::Ack { upto: 1000 },
        ToPrimary::Heartbeat { sent_us: 70_000, echo_us: 1_234_567 },
        ToPrimary::TakingOver { seq: 42, repl_listen: "10.1.0.3:7700".parse().expect("a valid address") },
    ];
    let to_backup = wire(&stream);
    vec![
        Seed { target: "frame", name: "to-backup".into(), bytes: inputs::frame(FrameKind::ToBackup, &[], &to_backup) },
        Seed {
            target: "frame",
            name: "to-backup-cut".into(),
            bytes: inputs::frame(FrameKind::ToBackup, &[3, 60, 9, 200], &to_backup),
        },
        Seed {
            target: "frame",
            name: "snapshot".into(),
            bytes: inputs::frame(FrameKind::ToBackup, &[17], &wire(&snapshot)),
        },
        Seed {
            target: "frame",
            name: "handshake".into(),
            bytes: inputs::frame(FrameKind::Handshake, &[5], &wire(&handshake)),
        },
        Seed {
            target: "frame",
            name: "to-primary".into(),
            bytes: inputs::frame(FrameKind::ToPrimary, &[1, 7], &wire(&to_primary)),
        },
        Seed {
            target: "frame",
            name: "raw".into(),
            bytes: inputs::frame(FrameKind::Raw, &[8], &to_backup[..to_backup.len().min(600)]),
        },
    ]
}

/// HTTP/1.1 exchanges (client bytes, server bytes), one per framing the framer knows.
const EXCHANGES: &[(&str, &str, &str)] = &[
    (
        "keepalive",
        "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    ),
    (
        "chunked",
        "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nIdempotency-Key: k1\r\n\r\n5;ext=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
        "HTTP/1.1 201 Created\r\nTransfer-Encoding: gzip, chunked\r\nETag: \"x\"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ),
    (
        "continue",
        "PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    ),
    (
        "head-304",
        "HEAD /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\nIf-None-Match: \"e\"\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
    ),
    (
        "range",
        "GET /big HTTP/1.1\r\nHost: a\r\nRange: bytes=2-5\r\n\r\n",
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2-5/10\r\nLast-Modified: Sun, 22 Nov 2026 10:00:00 GMT\r\nContent-Length: 4\r\n\r\ncdef",
    ),
    (
        "http10-close",
        "\r\nGET /old HTTP/1.0\r\n\r\n",
        "HTTP/1.0 200 OK\r\nServer: x\r\n\r\nbody until the connection closes",
    ),
    (
        "connection-close",
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    ),
    ("connect", "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "HTTP/1.1 200 Connection established\r\n\r\n"),
    (
        "upgrade",
        "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ),
    ("smuggle", "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ""),
    ("until-close", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzzz"),
    (
        "pipelined-lengths",
        "POST /a HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nxyPOST /b HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
    ),
];

fn http_seeds(captures: &[(String, Vec<Captured>)]) -> Vec<Seed> {
    let mut out = Vec::new();
    for (name, client, server) in EXCHANGES {
        out.push(Seed {
            target: "http_framer",
            name: (*name).into(),
            bytes: inputs::http(&[], client.as_bytes(), server.as_bytes()),
        });
        let cuts = [1, 13, 2, 40];
        out.push(Seed {
            target: "http_framer",
            name: format!("{name}-cut"),
            bytes: inputs::http(&cuts, client.as_bytes(), server.as_bytes()),
        });
    }
    for (name, packets) in captures {
        let first = |dir: Dir| {
            packets
                .iter()
                .map(|p| (p.dir, seg(&p.datagram)))
                .find(|(d, s)| *d == dir && !s.payload.is_empty())
                .map(|(_, s)| s.payload.to_vec())
        };
        let client = first(Dir::ToServer).unwrap_or_default();
        let server = first(Dir::ToClient).unwrap_or_default();
        out.push(Seed {
            target: "http_framer",
            name: format!("{name}-payloads"),
            bytes: inputs::http(&[7], &client, &server),
        });
    }
    out
}
