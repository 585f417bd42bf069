//! Tracker throughput on a bulk transfer: 1460-byte server segments, each
//! acknowledged by the client (trimming the retained bytes), as the backup sees
//! a download. Reports segments/s (elements) and payload bytes/s.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::net::SocketAddrV4;
use std::time::Duration;
use tcp_replay::segment::{Checksums, Segment, SegmentBuilder, TcpFlags, TcpOptions, Timestamps};
use tcp_replay::{Dir, Seq, Tracker};

const MSS: usize = 1460;
const SEGMENTS: usize = 4096;

struct Packets {
    handshake: Vec<(Dir, Vec<u8>)>,
    bulk: Vec<(Dir, Vec<u8>)>,
}

fn build(timestamps: bool) -> Packets {
    let c: SocketAddrV4 = "10.0.0.1:40000".parse().unwrap();
    let s: SocketAddrV4 = "10.0.0.2:80".parse().unwrap();
    let (cisn, sisn) = (Seq(u32::MAX - 100_000), Seq(12345));
    let seg = |dir: Dir, flags: u8, seq: Seq, ack: Seq, ts: u32, payload: &[u8]| {
        let (src, dst) = if dir == Dir::ToServer { (c, s) } else { (s, c) };
        let mut b = SegmentBuilder::new(src, dst);
        b.flags = flags;
        b.seq = seq;
        b.ack = ack;
        b.window = 65535;
        let mut o = TcpOptions::default();
        if flags & TcpFlags::SYN != 0 {
            o.mss = Some(MSS as u16);
            o.wscale = Some(7);
            o.sack_permitted = true;
        }
        if timestamps {
            o.timestamps = Some(Timestamps { val: ts, ecr: ts });
        }
        b.options = o;
        (dir, b.build(payload))
    };
    let handshake = vec![
        seg(Dir::ToServer, TcpFlags::SYN, cisn, Seq(0), 1, b""),
        seg(Dir::ToClient, TcpFlags::SYN | TcpFlags::ACK, sisn, cisn + 1, 1, b""),
        seg(Dir::ToServer, TcpFlags::ACK, cisn + 1, sisn + 1, 1, b""),
    ];
    let payload = vec![0x5a; MSS];
    let mut bulk = Vec::with_capacity(SEGMENTS * 2);
    for i in 0..SEGMENTS as u32 {
        let seq = sisn + 1 + i * MSS as u32;
        bulk.push(seg(Dir::ToClient, TcpFlags::ACK, seq, cisn + 1, i, &payload));
        bulk.push(seg(Dir::ToServer, TcpFlags::ACK, cisn + 1, seq + MSS as u32, i, b""));
    }
    Packets { handshake, bulk }
}

fn run(p: &Packets, checksums: Checksums, parse_only_once: Option<&[(Dir, Segment<'_>)]>) -> Tracker {
    let mut t = Tracker::new();
    for (dir, bytes) in &p.handshake {
        let seg = Segment::parse_ipv4(bytes, Checksums::Verify).unwrap();
        t.handle_segment(Duration::ZERO, *dir, &seg).unwrap();
    }
    match parse_only_once {
        Some(parsed) => {
            for (i, (dir, seg)) in parsed.iter().enumerate() {
                t.handle_segment(Duration::from_micros(i as u64), *dir, seg).unwrap();
            }
        }
        None => {
            for (i, (dir, bytes)) in p.bulk.iter().enumerate() {
                let seg = Segment::parse_ipv4(bytes, checksums).unwrap();
                t.handle_segment(Duration::from_micros(i as u64), *dir, &seg).unwrap();
            }
        }
    }
    t
}

fn tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker");
    for ts in [false, true] {
        let p = build(ts);
        let parsed: Vec<(Dir, Segment<'_>)> =
            p.bulk.iter().map(|(d, b)| (*d, Segment::parse_ipv4(b, Checksums::Verify).unwrap())).collect();
        let name = if ts { "timestamps" } else { "no-timestamps" };
        g.throughput(Throughput::Elements(p.bulk.len() as u64));
        g.bench_function(format!("handle_segment/{name}/segments"), |b| {
            b.iter(|| black_box(run(&p, Checksums::Skip, Some(&parsed))))
        });
        // The same run again, counted in payload bytes.
        g.throughput(Throughput::Bytes((SEGMENTS * MSS) as u64));
        g.bench_function(format!("handle_segment/{name}/bytes"), |b| {
            b.iter(|| black_box(run(&p, Checksums::Skip, Some(&parsed))))
        });
        g.throughput(Throughput::Elements(p.bulk.len() as u64));
        g.bench_function(format!("parse+verify+handle/{name}/segments"), |b| {
            b.iter(|| black_box(run(&p, Checksums::Verify, None)))
        });
    }
    g.finish();
}

criterion_group!(benches, tracker);
criterion_main!(benches);
