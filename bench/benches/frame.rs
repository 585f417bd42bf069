//! Replication link frames (`shared::frame`: length, CRC-32, bincode payload) encoded
//! and decoded the way the link does it: the sender encodes a batch of records into one
//! buffer (`frame::encode_value` per record, as `RecordSender` does), the receiver cuts
//! frames out of its read buffer (`frame::decode`) and decodes each payload
//! (`codec::decode`). Three realistic batches:
//!
//! * `segments`: 64 records of a client segment carrying 1460 bytes (a 1512-byte IPv4
//!   datagram with timestamps), as the gate forwards an upload;
//! * `replies`: 16 reply-log records of 16 KiB (256 KiB, the link's default write batch);
//! * `acks`: 64 small frames from the backup, acks and heartbeats alternating.
//!
//! Reports frames/s (elements) and frame bytes/s, headers included.
//!
//! The `frame_auth` group does the same on an authenticated link (`shared::auth`): each frame also gets an
//! HMAC-SHA-256 tag over its number and payload (`frame::encode_value_sealed` with a `Sealer`), and the
//! receiver checks it (`Opener::open`) before decoding. Its difference to `frame` is the per-frame cost of
//! authentication.

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::auth::{Psk, SessionKeys};
use shared::codec;
use shared::frame::{self, DEFAULT_MAX_FRAME};
use shared::protocol::{Message, Record, Role, ToBackup, ToPrimary};
use std::hint::black_box;
use std::time::{Duration, Instant};

use bench::http::body;
use bench::stream::{Client, MSS};

fn segments() -> Vec<ToBackup> {
    let mut c = Client::new(1);
    c.open().take();
    let msgs = c.send(&body(64 * MSS)).take();
    assert_eq!(msgs.len(), 64);
    msgs.into_iter().zip(100..).map(|(msg, seq)| ToBackup::Record(Record { seq, epoch: 3, msg })).collect()
}

fn replies() -> Vec<ToBackup> {
    let mut c = Client::new(1);
    let reply = body(16 << 10);
    for _ in 0..16 {
        c.reply(&reply);
    }
    let msgs = c.take();
    assert!(msgs.iter().all(|m| matches!(m, Message::Reply { .. })));
    msgs.into_iter().zip(1_000_000..).map(|(msg, seq)| ToBackup::Record(Record { seq, epoch: 3, msg })).collect()
}

fn acks() -> Vec<ToPrimary> {
    (0..64u64)
        .map(|i| match i % 2 {
            0 => ToPrimary::Ack { upto: 1_000_000 + i * 40 },
            _ => ToPrimary::Heartbeat { sent_us: 86_400_000_000 + i * 10_000, echo_us: 86_399_990_000 + i * 10_000 },
        })
        .collect()
}

fn encode_all<T: Serialize>(msgs: &[T], buf: &mut BytesMut) {
    buf.clear();
    for m in msgs {
        frame::encode_value(m, DEFAULT_MAX_FRAME, buf).expect("every benchmark message fits a frame");
    }
}

/// Decodes every frame of `wire`, timing only the decoding (not the copy into the read buffer).
fn decode_all<T: DeserializeOwned>(wire: &[u8], frames: usize, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut buf = BytesMut::from(wire);
        let t = Instant::now();
        let mut n = 0;
        while let Some(payload) = frame::decode(&mut buf, DEFAULT_MAX_FRAME).expect("valid frames") {
            black_box(codec::decode::<T>(&payload).expect("valid payload"));
            n += 1;
        }
        total += t.elapsed();
        assert_eq!(n, frames);
    }
    total
}

fn bench_kind<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    c: &mut Criterion,
    name: &str,
    msgs: &[T],
) {
    let mut wire = BytesMut::new();
    encode_all(msgs, &mut wire);
    let wire = wire.freeze();
    // What is measured round-trips.
    let mut check = BytesMut::from(&wire[..]);
    for m in msgs {
        let payload = frame::decode(&mut check, DEFAULT_MAX_FRAME).unwrap().expect("a whole frame");
        assert_eq!(&codec::decode::<T>(&payload).unwrap(), m);
    }

    let mut g = c.benchmark_group("frame");
    for (unit, throughput) in
        [("frames", Throughput::Elements(msgs.len() as u64)), ("bytes", Throughput::Bytes(wire.len() as u64))]
    {
        g.throughput(throughput);
        let mut buf = BytesMut::with_capacity(wire.len());
        g.bench_function(format!("encode/{name}/{unit}"), |b| {
            b.iter(|| {
                encode_all(msgs, &mut buf);
                black_box(&buf);
            })
        });
        g.bench_function(format!("decode/{name}/{unit}"), |b| {
            b.iter_custom(|iters| decode_all::<T>(&wire, msgs.len(), iters))
        });
    }
    g.finish();
}

/// Keys of a link as both ends derive them (the transcript is fixed: only the per-frame cost is measured).
fn keys() -> SessionKeys {
    SessionKeys::derive(&Psk::from_bytes(vec![0x5a; 32]).expect("a 32-byte key"), [7; 32])
}

fn encode_all_sealed<T: Serialize>(msgs: &[T], from: Role, keys: &SessionKeys, buf: &mut BytesMut) {
    buf.clear();
    let mut sealer = keys.sealer(from);
    for m in msgs {
        frame::encode_value_sealed(m, DEFAULT_MAX_FRAME, buf, |body| sealer.seal(body))
            .expect("every benchmark message fits a frame");
    }
}

/// Checks and decodes every frame of `wire` sent by `from`, timing only that.
fn open_all<T: DeserializeOwned>(wire: &[u8], frames: usize, to: Role, keys: &SessionKeys, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut buf = BytesMut::from(wire);
        let t = Instant::now();
        let mut opener = keys.opener(to);
        let mut n = 0;
        while let Some(payload) = frame::decode(&mut buf, DEFAULT_MAX_FRAME).expect("valid frames") {
            let body = opener.open(&payload).expect("valid tags");
            black_box(codec::decode::<T>(body).expect("valid payload"));
            n += 1;
        }
        total += t.elapsed();
        assert_eq!(n, frames);
    }
    total
}

fn bench_kind_sealed<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    c: &mut Criterion,
    name: &str,
    msgs: &[T],
    from: Role,
) {
    let to = match from {
        Role::Primary => Role::Backup,
        Role::Backup => Role::Primary,
    };
    let keys = keys();
    let mut wire = BytesMut::new();
    encode_all_sealed(msgs, from, &keys, &mut wire);
    let wire = wire.freeze();
    // What is measured round-trips, tags checked.
    let mut check = BytesMut::from(&wire[..]);
    let mut opener = keys.opener(to);
    for m in msgs {
        let payload = frame::decode(&mut check, DEFAULT_MAX_FRAME).unwrap().expect("a whole frame");
        assert_eq!(&codec::decode::<T>(opener.open(&payload).unwrap()).unwrap(), m);
    }

    let mut g = c.benchmark_group("frame_auth");
    for (unit, throughput) in
        [("frames", Throughput::Elements(msgs.len() as u64)), ("bytes", Throughput::Bytes(wire.len() as u64))]
    {
        g.throughput(throughput);
        let mut buf = BytesMut::with_capacity(wire.len());
        g.bench_function(format!("encode/{name}/{unit}"), |b| {
            b.iter(|| {
                encode_all_sealed(msgs, from, &keys, &mut buf);
                black_box(&buf);
            })
        });
        g.bench_function(format!("decode/{name}/{unit}"), |b| {
            b.iter_custom(|iters| open_all::<T>(&wire, msgs.len(), to, &keys, iters))
        });
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    bench_kind(c, "segments", &segments());
    bench_kind(c, "replies", &replies());
    bench_kind(c, "acks", &acks());
}

fn frames_auth(c: &mut Criterion) {
    bench_kind_sealed(c, "segments", &segments(), Role::Primary);
    bench_kind_sealed(c, "replies", &replies(), Role::Primary);
    bench_kind_sealed(c, "acks", &acks(), Role::Backup);
}

criterion_group!(benches, frames, frames_auth);
criterion_main!(benches);
