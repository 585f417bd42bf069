//! Runs every fuzz target's body, on stable, over its seed corpus and over a few
//! thousand deterministic mutations of it: the bodies cannot rot between fuzzing
//! runs, and a crash input found once stays fixed (its unit test lives in the crate
//! where the bug was). Also checks that the seeds reach what they are for, so a
//! seed tool that silently breaks fails here.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use understudy_fuzz::seeds::{self, Seed, TARGETS};

fn body(target: &str) -> fn(&[u8]) {
    match target {
        "segment" => understudy_fuzz::segment,
        "tracker" => understudy_fuzz::tracker,
        "frame" => understudy_fuzz::frame,
        "http_framer" => understudy_fuzz::http_framer,
        other => panic!("no body for target {other}"),
    }
}

/// Runs `target`'s body on `input`; on a panic, keeps the input and fails naming it.
fn run(target: &str, label: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| body(target)(input))).is_err() {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        std::fs::create_dir_all(&dir).expect("creating the failures directory");
        let path = dir.join(format!("{target}-{label}"));
        std::fs::write(&path, input).expect("keeping the failing input");
        panic!(
            "{target} body failed on {label}; input kept at {} (replay: cargo fuzz run {target} {0})",
            path.display()
        );
    }
}

fn all_seeds() -> Vec<Seed> {
    seeds::all().expect("seeds from the pcap fixtures")
}

/// xorshift64*: deterministic, so a failure here reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four libFuzzer-like edits: flip a bit, set an interesting byte, insert,
/// delete, truncate, duplicate a run.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len());
        match rng.below(6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = [0, 1, 0x7f, 0x80, 0xff, b'\r', b'\n', b'0'][rng.below(8)],
            2 => v.insert(at.min(v.len()), rng.next() as u8),
            3 if !v.is_empty() => {
                v.remove(at);
            }
            4 => v.truncate(at),
            _ if !v.is_empty() => {
                let len = rng.below(16).min(v.len() - at);
                let run: Vec<u8> = v[at..at + len].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, run);
            }
            _ => {}
        }
    }
    v
}

/// Mutations per seed: a few thousand inputs in all, a few seconds.
const MUTATIONS: usize = 60;

#[test]
fn every_target_body_holds_on_its_seeds_and_their_mutations() {
    let seeds = all_seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for target in TARGETS {
        let mine: Vec<&Seed> = seeds.iter().filter(|s| s.target == target).collect();
        assert!(mine.len() >= 6, "{target}: only {} seeds", mine.len());
        for s in &mine {
            run(target, &s.name, &s.bytes);
            for i in 0..MUTATIONS {
                run(target, &format!("{}-m{i}", s.name), &mutate(&mut rng, &s.bytes));
            }
        }
        run(target, "empty", &[]);
    }
}

#[test]
fn segment_seeds_are_valid_datagrams_of_every_kind() {
    use tcp_replay::{Checksums, Segment};
    let seeds = all_seeds();
    let segs: Vec<_> = seeds
        .iter()
        .filter(|s| s.target == "segment")
        .map(|s| Segment::parse_ipv4(&s.bytes, Checksums::Verify).expect("a seed datagram parses"))
        .collect();
    assert!(segs.iter().any(|s| s.flags.syn() && s.options.wscale.is_some()), "no SYN with options");
    assert!(segs.iter().any(|s| !s.options.sack().is_empty()), "no SACK blocks");
    assert!(segs.iter().any(|s| s.flags.rst()), "no RST");
    assert!(segs.iter().any(|s| s.flags.fin() && !s.payload.is_empty()), "no FIN with data");
}

#[test]
fn tracker_seeds_follow_their_connections_past_the_handshake() {
    use tcp_replay::{Checksums, Segment, TcpState, Tracker};
    use understudy_fuzz::inputs::{TrackerOp, parse_tracker};
    let seeds = all_seeds();
    let mut established = 0;
    for s in seeds.iter().filter(|s| s.target == "tracker" && s.name.ends_with("-whole")) {
        let (_, ops) = parse_tracker(&s.bytes);
        let mut t = Tracker::new();
        for op in ops {
            let TrackerOp::Segment { dir, datagram, .. } = op else { continue };
            let seg = Segment::parse_ipv4(datagram, Checksums::Verify).expect("a seed datagram parses");
            t.handle_segment(std::time::Duration::ZERO, dir, &seg).expect("a real capture's segment is taken");
        }
        established +=
            (t.state() == TcpState::Established && t.restore_plan(std::time::Duration::ZERO).is_ok()) as usize;
    }
    assert!(established >= 5, "only {established} tracker seeds reach a restorable established connection");
}

#[test]
fn frame_seeds_decode_to_messages_of_every_type() {
    use bytes::BytesMut;
    use shared::frame::FrameCodec;
    use shared::protocol::{Handshake, Message, Record, ToBackup, ToPrimary};
    use tokio_util::codec::Decoder;
    use understudy_fuzz::inputs::{FrameKind, parse_frame};
    fn decode<D: serde::de::DeserializeOwned>(wire: &[u8]) -> Vec<D> {
        let mut buf = BytesMut::from(wire);
        let mut codec = FrameCodec::<D>::default();
        let mut out = Vec::new();
        while let Some(m) = codec.decode_eof(&mut buf).expect("a seed decodes") {
            out.push(m);
        }
        out
    }
    let seeds = all_seeds();
    let mut records = 0;
    let mut snapshot_parts = 0;
    let mut others = 0;
    for s in seeds.iter().filter(|s| s.target == "frame") {
        let input = parse_frame(&s.bytes);
        match input.kind {
            FrameKind::ToBackup => {
                for m in decode::<ToBackup>(input.wire) {
                    if let ToBackup::Record(Record { msg, .. }) = m {
                        records += 1;
                        snapshot_parts += matches!(msg, Message::SnapshotConn { .. }) as usize;
                    }
                }
            }
            FrameKind::ToPrimary => others += decode::<ToPrimary>(input.wire).len(),
            FrameKind::Handshake => others += decode::<Handshake>(input.wire).len(),
            FrameKind::Raw => {}
        }
    }
    assert!(
        records >= 20 && snapshot_parts >= 1 && others == 6,
        "records {records}, snapshot parts {snapshot_parts}, others {others}"
    );
}

#[test]
fn http_seeds_frame_whole_exchanges() {
    use shared::replica::http::{ConnFramer, Event};
    use understudy_fuzz::inputs::parse_http;
    let seeds = all_seeds();
    let keepalive = seeds.iter().find(|s| s.name == "keepalive").expect("the keep-alive seed");
    let input = parse_http(&keepalive.bytes);
    let mut f = ConnFramer::new();
    let mut events = Vec::new();
    f.handle_client(0, input.client, &mut events).unwrap();
    f.handle_server(0, input.server, &mut events).unwrap();
    let ends: Vec<_> = events.iter().filter(|e| matches!(e, Event::Complete { .. })).collect();
    assert_eq!(ends.len(), 4, "two requests and two responses: {events:?}");
    assert!(seeds.iter().filter(|s| s.target == "http_framer" && s.name.ends_with("-payloads")).count() >= 8);
}
