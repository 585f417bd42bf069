//! The bodies of understudy's fuzz targets, as plain functions.
//!
//! `fuzz/fuzz_targets/*.rs` (cargo-fuzz, nightly) each call one function here; the
//! stable test `tests/seeds.rs` runs the same functions over the seed corpora and
//! over mutations of them, so the bodies build and hold on every `cargo test`.
//!
//! Every body takes untrusted bytes and panics only when a property fails: a panic
//! inside the product code is a bug, and so is a broken property. What each body
//! checks is stated on it. [`inputs`] builds inputs in the formats the bodies read
//! (the seed tool uses it); [`seeds`] extracts seed corpora from the pcap fixtures.

pub mod inputs;
pub mod seeds;

use bytes::BytesMut;
use shared::codec;
use shared::frame::{self, FrameCodec, HEADER_LEN, Parsed};
use shared::protocol::{Handshake, ToBackup, ToPrimary};
use shared::replica::http::{Awaiting, ConnFramer, Event, Framer, Phase};
use std::time::Duration;
use tcp_replay::segment::SegmentBuilder;
use tcp_replay::{Checksums, Dir, ParseError, Segment, Tracker};
use tokio_util::codec::Decoder;

/// Segment parser: `Segment::parse_ipv4` on an arbitrary datagram.
///
/// * Verifying checksums only ever adds a checksum error: where both parse, they agree.
/// * A parsed segment's payload is exactly the datagram's tail up to its IPv4 total length.
/// * Re-emitting a parsed segment (with `SegmentBuilder`, when its options fit a TCP
///   header) gives a datagram that parses, checksums verified, to the same segment.
pub fn segment(data: &[u8]) {
    let skip = Segment::parse_ipv4(data, Checksums::Skip);
    let verify = Segment::parse_ipv4(data, Checksums::Verify);
    match (&skip, &verify) {
        (Ok(s), Ok(v)) => assert_eq!(s, v),
        (Ok(_), Err(e)) => assert!(is_checksum(e), "parses unverified, fails verified with {e:?}"),
        (Err(e), Err(f)) => assert!(e == f || is_checksum(f), "unverified {e:?}, verified {f:?}"),
        (Err(e), Ok(_)) => panic!("parses verified but not unverified: {e:?}"),
    }
    let Ok(seg) = skip else { return };
    let total = u16::from_be_bytes([data[2], data[3]]) as usize;
    let payload_at = seg.payload.as_ptr() as usize - data.as_ptr() as usize;
    assert_eq!(payload_at + seg.payload.len(), total, "payload does not end at the IPv4 total length");
    assert_eq!(seg.seq_len() as usize, seg.payload.len() + seg.flags.syn() as usize + seg.flags.fin() as usize);

    let o = &seg.options;
    // The builder's option layout: MSS 4, SACK-permitted 2, timestamps 10, NOP + window scale 4,
    // two NOPs + SACK 2 + 8 per block; padded to 4.
    let opts = 4 * o.mss.is_some() as usize
        + 2 * o.sack_permitted as usize
        + 10 * o.timestamps.is_some() as usize
        + 4 * o.wscale.is_some() as usize
        + if o.sack().is_empty() { 0 } else { 4 + 8 * o.sack().len() };
    let opts = opts.next_multiple_of(4);
    if opts > 40 || 40 + opts + seg.payload.len() > usize::from(u16::MAX) {
        return;
    }
    let mut b = SegmentBuilder::new(seg.src, seg.dst);
    b.flags = seg.flags.0;
    b.seq = seg.seq;
    b.ack = seg.ack;
    b.window = seg.window;
    b.options = seg.options;
    let again = b.build(seg.payload);
    assert_eq!(Segment::parse_ipv4(&again, Checksums::Verify).as_ref(), Ok(&seg), "re-emitted segment differs");
}

fn is_checksum(e: &ParseError) -> bool {
    matches!(e, ParseError::BadIpChecksum | ParseError::BadTcpChecksum)
}

/// Connection tracker: a sequence of operations (segments either way, server bytes
/// from the reply log, trims) on one `Tracker`, in the format of [`inputs::tracker`].
/// Checksums are not verified, so mutated segments reach the tracker.
///
/// * A refused segment changes nothing (the tracker's documented contract, and what
///   makes a flood of bogus segments harmless).
/// * The state survives the snapshot encoding a joining spare receives (it encodes,
///   and decodes, invariants checked, to an equal tracker): after every operation
///   while it retains up to 4 KiB, and at the end up to 256 KiB.
/// * Each direction's stream is consistent: retained bytes are the contiguous run
///   plus the pending pieces, in order.
/// * A restore plan, when one can be made, is for the state the tracker reports.
pub fn tracker(data: &[u8]) {
    let (config, ops) = inputs::parse_tracker(data);
    let mut t = Tracker::with_validation(config.validation);
    t.set_server_acks(config.server_acks);
    t.set_trim_on_ack(config.trim_on_ack);
    let mut now = Duration::ZERO;
    for op in ops {
        match op {
            inputs::TrackerOp::Segment { dir, after, datagram } => {
                now += after;
                let Ok(seg) = Segment::parse_ipv4(datagram, Checksums::Skip) else { continue };
                let before = t.clone();
                if let Err(e) = t.handle_segment(now, dir, &seg) {
                    assert_eq!(t, before, "refused segment ({e}) changed the tracker");
                }
            }
            inputs::TrackerOp::ServerData { offset, bytes } => {
                let before = t.clone();
                if let Err(e) = t.handle_server_data(offset, bytes) {
                    assert_eq!(t, before, "refused server data ({e}) changed the tracker");
                }
            }
            inputs::TrackerOp::Trim { dir, offset } => t.trim(dir, offset),
        }
        check_tracker(&t, now, 4 << 10);
    }
    check_tracker(&t, now, 256 << 10);
}

/// Checks `t`; its snapshot encoding only while it retains at most `encode_up_to`
/// bytes: the encoding walks every byte, and past that it would make the run, not the
/// tracker, slow (zero-filled holes alone reach a megabyte each).
fn check_tracker(t: &Tracker, now: Duration, encode_up_to: usize) {
    let state = t.state();
    if t.addresses().is_some() {
        for dir in [Dir::ToServer, Dir::ToClient] {
            let s = t.stream(dir);
            assert!(s.start() <= s.contiguous_end() && s.contiguous_end() <= s.highest_end(), "{dir:?} stream bounds");
            assert_eq!(
                s.retained_bytes() as u64,
                s.contiguous_end() - s.start() + s.pending_bytes() as u64,
                "{dir:?} retained bytes"
            );
            let _ = t.acked_offset(dir);
        }
        let _ = t.client_bytes_beyond_ack();
    }
    if let Ok(plan) = t.restore_plan(now) {
        assert_eq!(plan.state, state, "plan state differs from the tracker's");
        let _ = (plan.snd_nxt(), plan.recv_queue_seq());
    }
    let retained: usize = [Dir::ToServer, Dir::ToClient]
        .iter()
        .filter_map(|d| t.endpoint(*d).map(|_| t.stream(*d).retained_bytes()))
        .sum();
    if retained > encode_up_to {
        return;
    }
    let bytes = codec::encode(t).expect("a tracker always encodes");
    match codec::decode::<Tracker>(&bytes) {
        Ok(back) => assert_eq!(&back, t, "tracker changed through the snapshot encoding"),
        Err(e) => panic!("tracker state does not decode from its own snapshot encoding: {e}"),
    }
}

/// Frame decoder: the replication link's byte stream, in the format of
/// [`inputs::frame`] (message type, maximum frame length, chunking, wire bytes).
///
/// * Fed whole or in any chunks, the codec yields the same messages and the same
///   error (a TCP stream's segmentation must not matter).
/// * Every frame the raw layer cuts out re-encodes to exactly its own bytes.
/// * A message is not always encoded canonically on the wire (bincode accepts a
///   wide varint for a small number), so the property for messages is: a decoded
///   message re-encodes, through the codec and a frame, to bytes that decode to the
///   same message.
pub fn frame(data: &[u8]) {
    let input = inputs::parse_frame(data);
    match input.kind {
        inputs::FrameKind::ToBackup => frame_messages::<ToBackup>(&input),
        inputs::FrameKind::ToPrimary => frame_messages::<ToPrimary>(&input),
        inputs::FrameKind::Handshake => frame_messages::<Handshake>(&input),
        inputs::FrameKind::Raw => {}
    }
    frame_raw(&input);
}

fn frame_messages<D>(input: &inputs::FrameInput<'_>)
where
    D: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let whole = decode_chunked::<D>(input.wire, &[], input.max_frame);
    let split = decode_chunked::<D>(input.wire, &input.cuts, input.max_frame);
    assert_eq!(whole, split, "chunking changed what decodes");
    for m in whole.0 {
        let payload = codec::encode(&m).expect("a decoded message encodes");
        assert_eq!(codec::decode::<D>(&payload).as_ref(), Ok(&m), "re-encoded message decodes differently");
        let mut wire = BytesMut::new();
        match frame::encode_value(&m, input.max_frame, &mut wire) {
            Ok(()) => {
                let mut codec = FrameCodec::<D>::new(input.max_frame);
                assert_eq!(codec.decode(&mut wire).ok().flatten().as_ref(), Some(&m), "re-framed message differs");
                assert!(wire.is_empty());
            }
            // The re-encoding is the shortest one, so what arrived in a frame fits one again.
            Err(e) => panic!("a message that arrived in a frame cannot be framed again: {e}"),
        }
    }
}

/// Decodes `wire` fed in the pieces `cuts` marks; the messages, then the error that
/// ended the stream (its text: `FrameError` holds `io::Error`, which has no `PartialEq`).
fn decode_chunked<D: serde::de::DeserializeOwned>(wire: &[u8], cuts: &[usize], max: usize) -> (Vec<D>, Option<String>) {
    let mut codec = FrameCodec::<D>::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in inputs::pieces(wire, cuts) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}

fn frame_raw(input: &inputs::FrameInput<'_>) {
    let mut rest = input.wire;
    loop {
        match frame::parse(rest, input.max_frame) {
            Ok(Parsed::Frame { payload, frame_len }) => {
                assert_eq!(frame_len, HEADER_LEN + payload.len());
                let mut again = BytesMut::new();
                frame::encode(payload, input.max_frame, &mut again).expect("a frame that parsed is within the maximum");
                assert_eq!(&again[..], &rest[..frame_len], "frame re-encodes to other bytes");
                rest = &rest[frame_len..];
            }
            Ok(Parsed::Incomplete { need }) => {
                assert!(need > rest.len() && need <= HEADER_LEN + input.max_frame.min(frame::MAX_FRAME_LIMIT));
                let eof = frame::check_eof(rest, input.max_frame);
                assert_eq!(eof.is_ok(), rest.is_empty());
                return;
            }
            Err(_) => return,
        }
    }
}

/// HTTP framer: a connection's client bytes then server bytes, in the format of
/// [`inputs::http`], through a `ConnFramer` (requests register what their responses
/// may carry).
///
/// * Differential: split at arbitrary points, the bytes give the same events (body
///   ranges merged), the same error, and the same final framer state as fed whole
///   (but for where a failed side stopped consuming).
/// * Without an error, each side has consumed every byte fed.
/// * Message boundaries tile: each side's completions come in order, within the
///   bytes fed, and a request's head lies between its start and its end.
/// * The final state survives the snapshot encoding.
pub fn http_framer(data: &[u8]) {
    let input = inputs::parse_http(data);
    let whole = run_conn_framer(input.client, input.server, &[]);
    let split = run_conn_framer(input.client, input.server, &input.cuts);
    assert_eq!(
        (&whole.1, &whole.2, &whole.3, &whole.4),
        (&split.1, &split.2, &split.3, &split.4),
        "splitting changed the events or the errors"
    );
    assert_eq!(view(whole.0.requests()), view(split.0.requests()), "splitting changed the request framer");
    assert_eq!(view(whole.0.responses()), view(split.0.responses()), "splitting changed the response framer");
    if client_ok_and_server_ok(&whole) {
        assert_eq!(whole.0, split.0, "splitting changed the framer");
    }
    let (framer, client_events, client_result, server_events, server_result) = whole;
    if client_result.is_ok() {
        assert_eq!(framer.requests().pos(), input.client.len() as u64);
    }
    if server_result.is_ok() {
        assert_eq!(framer.responses().pos(), input.server.len() as u64);
    }
    for (events, len) in [(&client_events, input.client.len()), (&server_events, input.server.len())] {
        let mut last_end = 0;
        for e in events {
            match e {
                Event::Complete { end, .. } => {
                    assert!(*end >= last_end && *end <= len as u64, "completion at {end} out of order");
                    last_end = *end;
                }
                Event::RequestHead { head, raw } => {
                    assert!(head.start <= head.head_end && head.start >= last_end);
                    assert_eq!(raw.len() as u64, head.head_end - head.start);
                }
                Event::ResponseHead { head, raw } => {
                    assert!(head.start <= head.head_end && head.start >= last_end);
                    assert_eq!(raw.len() as u64, head.head_end - head.start);
                }
                Event::Body { range, .. } => assert!(range.start >= last_end && range.end <= len as u64),
            }
        }
    }
    let bytes = codec::encode(&framer).expect("a framer always encodes");
    assert_eq!(codec::decode::<ConnFramer>(&bytes).as_ref(), Ok(&framer), "framer changed through its encoding");
}

/// A framer's state to compare across splits. Where a failed framer stopped consuming
/// depends on how its input was cut, and nothing reads it after the failure (the
/// connection is unprotected), so its position is left out.
fn view(f: &Framer) -> (Phase, Option<u64>, u64, Option<Awaiting>) {
    let failed = matches!(f.phase(), Phase::Failed(_));
    (f.phase().clone(), (!failed).then_some(f.pos()), f.next_index(), f.awaiting().cloned())
}

fn client_ok_and_server_ok(run: &FramerRun) -> bool {
    run.2.is_ok() && run.4.is_ok()
}

type FramerRun = (
    ConnFramer,
    Vec<Event>,
    Result<(), shared::replica::http::FrameError>,
    Vec<Event>,
    Result<(), shared::replica::http::FrameError>,
);

fn run_conn_framer(client: &[u8], server: &[u8], cuts: &[usize]) -> FramerRun {
    let mut f = ConnFramer::new();
    let feed = |bytes: &[u8], server_side: bool, f: &mut ConnFramer| {
        let mut events = Vec::new();
        let mut at = 0u64;
        for piece in inputs::pieces(bytes, cuts) {
            let r = if server_side {
                f.handle_server(at, piece, &mut events)
            } else {
                f.handle_client(at, piece, &mut events)
            };
            at += piece.len() as u64;
            if let Err(e) = r {
                return (merge_body_events(events), Err(e));
            }
        }
        (merge_body_events(events), Ok(()))
    };
    let (ce, cr) = feed(client, false, &mut f);
    let (se, sr) = feed(server, true, &mut f);
    (f, ce, cr, se, sr)
}

/// Adjacent body ranges of one message merged, so that different splits compare equal.
fn merge_body_events(events: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(events.len());
    for e in events {
        if let (Some(Event::Body { index: i, range: r, .. }), Event::Body { index: j, range: s, .. }) =
            (out.last_mut(), &e)
            && *i == *j
            && r.end == s.start
        {
            r.end = s.end;
            continue;
        }
        out.push(e);
    }
    out
}
