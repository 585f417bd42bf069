//! `ReplicaTable::apply` over the replication stream of 1000 concurrent client
//! connections, interleaved one record at a time, as the backup applies it. Each
//! connection opens (SYN, the primary's SYN-ACK, ACK), carries its exchanges as the
//! proxying primary logs them (request segments, exchange start, the response logged
//! from the upstream and in the reply log in 4 KiB appends, each acknowledged by the
//! client, which trims it; exchange end) and closes (FINs both ways, `ConnClosed`).
//!
//! * `download`: two GETs with 8 KiB responses per connection;
//! * `upload`: one POST with a 16 KiB body (12 client segments) and a small response.
//!
//! Reports records/s.

use bench::http::{Framing, body, request, response};
use bench::stream::{Client, interleave, number};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use shared::protocol::Record;
use shared::replica::{Applied, ReplicaTable};
use std::hint::black_box;

const CONNS: u32 = 1000;
const PIECE: usize = 4 << 10;

fn download() -> Vec<Record> {
    let get = request("GET", "/static/app.js", Framing::Length, b"");
    let resp = response(Framing::Length, &body(8 << 10));
    let conns = (0..CONNS)
        .map(|n| {
            let mut c = Client::new(n);
            c.open().exchange("GET", &get, &resp, PIECE).exchange("GET", &get, &resp, PIECE).close().take()
        })
        .collect();
    number(interleave(conns))
}

fn upload() -> Vec<Record> {
    let post = request("POST", "/upload", Framing::Length, &body(16 << 10));
    let resp = response(Framing::Length, br#"{"ok":true}"#);
    let conns = (0..CONNS)
        .map(|n| {
            let mut c = Client::new(n);
            c.open().exchange("POST", &post, &resp, PIECE).close().take()
        })
        .collect();
    number(interleave(conns))
}

fn apply_all(records: &[Record]) -> ReplicaTable {
    let mut t = ReplicaTable::new();
    for r in records {
        black_box(t.apply(r).expect("a well-formed stream applies"));
    }
    t
}

fn replica(c: &mut Criterion) {
    let mut g = c.benchmark_group("replica");
    // Tens of milliseconds per iteration: few samples, each of the same iteration count.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for (name, records) in [("download", download()), ("upload", upload())] {
        // What is measured takes every record, holds every connection at its peak and
        // ends empty: no record is ignored or leaves a connection unprotected.
        let mut t = ReplicaTable::new();
        let mut peak = 0;
        for r in &records {
            let applied = t.apply(r).expect("a well-formed stream applies");
            assert_eq!(applied, Applied::Taken, "{name}: record {} ({:?})", r.seq, r.msg);
            peak = peak.max(t.len());
        }
        assert_eq!((peak, t.len()), (CONNS as usize, 0), "{name}");

        g.throughput(Throughput::Elements(records.len() as u64));
        g.bench_function(format!("apply/{name}/{CONNS}-conns"), |b| b.iter(|| apply_all(&records)));
    }
    g.finish();
}

criterion_group!(benches, replica);
criterion_main!(benches);
