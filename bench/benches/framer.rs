//! The replica table's HTTP/1.1 framer (`shared::replica::http::Framer`) over one
//! direction of a connection, configured as `ConnFramer` configures it: requests
//! without body events, responses with them (each expected by a `GET`).
//!
//! Input is fed the way the table feeds it: requests in 1460-byte pieces (client
//! segments as they become contiguous), responses in 16 KiB pieces (reply-log appends).
//! Cases: 64 pipelined small messages (no body, or 512-byte bodies with a
//! Content-Length or chunked in two chunks), and one message with a 1 MiB body
//! (Content-Length, or chunked in 16 KiB chunks). Reports bytes/s.

use bench::http::{Framing, body, request, response};
use bench::stream::MSS;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use shared::replica::http::{Event, Framer};

const SMALL: usize = 512;
const LARGE: usize = 1 << 20;
const PIPELINED: usize = 64;
const REPLY_PIECE: usize = 16 << 10;

struct Case {
    name: &'static str,
    stream: Vec<u8>,
    messages: usize,
}

fn case(name: &'static str, messages: usize, one: Vec<u8>) -> Case {
    Case { name, stream: one.repeat(messages), messages }
}

fn requests() -> Vec<Case> {
    vec![
        case("get", PIPELINED, request("GET", "/index.html", Framing::Length, b"")),
        case("length-512", PIPELINED, request("POST", "/api", Framing::Length, &body(SMALL))),
        case("chunked-512", PIPELINED, request("POST", "/api", Framing::Chunked(SMALL / 2), &body(SMALL))),
        case("length-1MiB", 1, request("PUT", "/upload", Framing::Length, &body(LARGE))),
        case("chunked-1MiB", 1, request("PUT", "/upload", Framing::Chunked(16 << 10), &body(LARGE))),
    ]
}

fn responses() -> Vec<Case> {
    vec![
        case("length-512", PIPELINED, response(Framing::Length, &body(SMALL))),
        case("chunked-512", PIPELINED, response(Framing::Chunked(SMALL / 2), &body(SMALL))),
        case("length-1MiB", 1, response(Framing::Length, &body(LARGE))),
        case("chunked-1MiB", 1, response(Framing::Chunked(16 << 10), &body(LARGE))),
    ]
}

fn new_framer(response: bool, messages: usize) -> Framer {
    if response {
        let mut f = Framer::responses(0).with_body_events();
        for i in 0..messages as u64 {
            f.expect_response(i, "GET");
        }
        f
    } else {
        Framer::requests(0)
    }
}

fn feed(mut f: Framer, stream: &[u8], piece: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let mut at = 0;
    for p in stream.chunks(piece) {
        f.feed(at, p, &mut out).expect("a valid stream frames");
        at += p.len() as u64;
    }
    out
}

fn framer(c: &mut Criterion) {
    let mut g = c.benchmark_group("framer");
    for (side, response, piece, cases) in
        [("request", false, MSS, requests()), ("response", true, REPLY_PIECE, responses())]
    {
        for Case { name, stream, messages } in cases {
            // What is measured frames every message.
            let ends = feed(new_framer(response, messages), &stream, piece)
                .iter()
                .filter(|e| matches!(e, Event::Complete { .. }))
                .count();
            assert_eq!(ends, messages, "{side}/{name}");
            g.throughput(Throughput::Bytes(stream.len() as u64));
            g.bench_function(format!("{side}/{name}"), |b| {
                b.iter_batched(|| new_framer(response, messages), |f| feed(f, &stream, piece), BatchSize::SmallInput)
            });
        }
    }
    g.finish();
}

criterion_group!(benches, framer);
criterion_main!(benches);
