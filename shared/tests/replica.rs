//! The replica table and the resume planner fed with realistic replication streams:
//! real IPv4/TCP datagrams built with `SegmentBuilder`, the primary's reply log and
//! exchange records, in the order the primary produces them.

use proptest::prelude::*;
use shared::codec::CodecError;
use shared::config::{RetryConfig, RetryPolicy};
use shared::protocol::{ConnKey, ExchangeStart, Message, Record};
use shared::replica::ReplicaTable;
use shared::replica::http::{Event, Framer};
use shared::replica::resume::{
    ConnResume, Continuation, Decision, RefuseReason, ResendReason, TruncateReason, plan_conn, plan_takeover,
};
use shared::replica::table::{Applied, ApplyError, Ignored, SnapshotError, Unprotection};
use std::net::SocketAddrV4;
use std::time::Duration;
use tcp_replay::segment::{SegmentBuilder, Timestamps};
use tcp_replay::{Dir, Seq, TcpFlags, TcpOptions, TcpState};

const A: u8 = TcpFlags::ACK;
const SERVER: &str = "10.0.0.100:80";

/// The primary's replication stream being written.
struct Log {
    epoch: u64,
    next_seq: u64,
    records: Vec<Record>,
}

impl Log {
    fn new() -> Log {
        Log { epoch: 1, next_seq: 1, records: Vec::new() }
    }

    fn push(&mut self, msg: Message) {
        self.records.push(Record { seq: self.next_seq, epoch: self.epoch, msg });
        self.next_seq += 1;
    }

    /// Records from index `from` on, applied to `table`; every outcome returned.
    fn apply_from(&self, table: &mut ReplicaTable, from: usize) -> Vec<Applied> {
        self.records[from..].iter().map(|r| table.apply(r).expect("a well-formed stream applies")).collect()
    }
}

/// One client connection, scripted from both ends as the primary sees it.
struct Pair {
    key: ConnKey,
    cisn: u32,
    sisn: u32,
    /// Client bytes sent, server bytes logged, server bytes the client acknowledged.
    sent: u64,
    logged: u64,
    acked: u64,
    ts: bool,
    now_us: u64,
}

impl Pair {
    fn new(port: u16, cisn: u32, sisn: u32, ts: bool) -> Pair {
        let client = SocketAddrV4::new("10.0.0.1".parse().unwrap(), port);
        Pair {
            key: ConnKey { client, server: SERVER.parse().unwrap() },
            cisn,
            sisn,
            sent: 0,
            logged: 0,
            acked: 0,
            ts,
            now_us: 1_000_000,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn seg(&mut self, log: &mut Log, dir: Dir, flags: u8, seq: u32, ack: u32, opts: TcpOptions, payload: &[u8]) {
        let window = if flags & TcpFlags::SYN != 0 { 64240 } else { 502 };
        self.seg_with_window(log, dir, flags, seq, ack, window, opts, payload);
    }

    #[allow(clippy::too_many_arguments)]
    fn seg_with_window(
        &mut self,
        log: &mut Log,
        dir: Dir,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        opts: TcpOptions,
        payload: &[u8],
    ) {
        self.now_us += 150;
        let (src, dst) = match dir {
            Dir::ToServer => (self.key.client, self.key.server),
            Dir::ToClient => (self.key.server, self.key.client),
        };
        let mut b = SegmentBuilder::new(src, dst);
        b.flags = flags;
        b.seq = Seq(seq);
        b.ack = Seq(ack);
        b.window = window;
        b.options = opts;
        if self.ts && b.options.timestamps.is_none() {
            let base = if dir == Dir::ToServer { 7_000_000 } else { 3_000 };
            b.options.timestamps = Some(Timestamps { val: base + (self.now_us / 1000) as u32, ecr: 0 });
        }
        log.push(Message::Segment { at_us: self.now_us, dir, datagram: b.build(payload) });
    }

    fn cseq(&self, off: u64) -> u32 {
        self.cisn.wrapping_add(1).wrapping_add(off as u32)
    }

    fn sseq(&self, off: u64) -> u32 {
        self.sisn.wrapping_add(1).wrapping_add(off as u32)
    }

    /// SYN with MSS, window scale 7, SACK; SYN-ACK with scale 9; the client's ACK.
    fn open(&mut self, log: &mut Log) {
        self.open_with(log, Some((7, 9)));
    }

    /// The handshake with these window scales (client, server), or none.
    fn open_with(&mut self, log: &mut Log, wscale: Option<(u8, u8)>) {
        let mut o = TcpOptions::default();
        o.mss = Some(1460);
        o.wscale = wscale.map(|w| w.0);
        o.sack_permitted = true;
        self.seg(log, Dir::ToServer, TcpFlags::SYN, self.cisn, 0, o, b"");
        o.wscale = wscale.map(|w| w.1);
        self.seg(log, Dir::ToClient, TcpFlags::SYN | A, self.sisn, self.cisn.wrapping_add(1), o, b"");
        self.seg(log, Dir::ToServer, A, self.cseq(0), self.sseq(0), TcpOptions::default(), b"");
    }

    /// Client bytes, in segments of at most 1400 bytes.
    fn send(&mut self, log: &mut Log, bytes: &[u8]) {
        for piece in bytes.chunks(1400) {
            let (seq, ack) = (self.cseq(self.sent), self.sseq(self.acked));
            self.seg(log, Dir::ToServer, A | TcpFlags::PSH, seq, ack, TcpOptions::default(), piece);
            self.sent += piece.len() as u64;
        }
    }

    /// Client bytes at an arbitrary offset (reordering, retransmission).
    fn send_at(&mut self, log: &mut Log, off: u64, bytes: &[u8]) {
        let (seq, ack) = (self.cseq(off), self.sseq(self.acked));
        self.seg(log, Dir::ToServer, A, seq, ack, TcpOptions::default(), bytes);
        self.sent = self.sent.max(off + bytes.len() as u64);
    }

    /// Reply bytes in the primary's reply log.
    fn reply(&mut self, log: &mut Log, bytes: &[u8]) {
        log.push(Message::Reply { conn: self.key, offset: self.logged, bytes: bytes.to_vec() });
        self.logged += bytes.len() as u64;
    }

    /// The client acknowledges every reply byte logged so far.
    fn ack_all(&mut self, log: &mut Log) {
        self.acked = self.logged;
        let (seq, ack) = (self.cseq(self.sent), self.sseq(self.acked));
        self.seg(log, Dir::ToServer, A, seq, ack, TcpOptions::default(), b"");
    }

    fn start(&self, log: &mut Log, exchange: u64, method: &str, key: Option<&str>, generated: bool) {
        log.push(Message::ExchangeStart(ExchangeStart {
            conn: self.key,
            exchange,
            request_offset: 0,
            method: method.into(),
            target: "/".into(),
            idempotency_key: key.map(String::from),
            key_generated: generated,
            upstream: Some("http://10.2.0.10:8080".into()),
        }));
    }

    fn upstream(&self, log: &mut Log, exchange: u64, offset: u64, bytes: &[u8]) {
        log.push(Message::Upstream { conn: self.key, exchange, offset, bytes: bytes.to_vec() });
    }

    fn end(&self, log: &mut Log, exchange: u64, status: u16) {
        log.push(Message::ExchangeEnd { conn: self.key, exchange, status });
    }

    fn server_fin(&mut self, log: &mut Log) {
        let (seq, ack) = (self.sseq(self.logged), self.cseq(self.sent));
        self.seg(log, Dir::ToClient, TcpFlags::FIN | A, seq, ack, TcpOptions::default(), b"");
    }

    /// One GET answered in full through the upstream, the client acknowledging.
    fn get(&mut self, log: &mut Log, exchange: u64, body: &[u8]) {
        self.send(log, b"GET /obj HTTP/1.1\r\nHost: origin\r\n\r\n");
        self.start(log, exchange, "GET", None, false);
        let resp = [format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat();
        self.upstream(log, exchange, 0, &resp);
        self.reply(log, &resp);
        self.end(log, exchange, 200);
        self.ack_all(log);
    }
}

fn retry(policy: RetryPolicy, honours: bool) -> RetryConfig {
    RetryConfig { non_idempotent: policy, origin_honours_generated_keys: honours, ..RetryConfig::default() }
}

fn plan(table: &ReplicaTable, pair: &Pair, retry: &RetryConfig) -> ConnResume {
    plan_conn(table.conn(&pair.key).expect("connection in the table"), Duration::from_secs(10), retry)
}

fn with_key() -> RetryConfig {
    retry(RetryPolicy::WithKey, false)
}

fn fresh(log: &Log) -> ReplicaTable {
    let mut t = ReplicaTable::new();
    log.apply_from(&mut t, 0);
    t
}

fn chunked_head() -> &'static [u8] {
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"v7\"\r\n\r\n"
}

#[test]
fn pipelined_gets_answered_in_full_and_acknowledged_leave_nothing_behind() {
    let mut log = Log::new();
    let mut p = Pair::new(40001, 1000, 5000, true);
    p.open(&mut log);
    let reqs = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
    p.send(&mut log, reqs);
    for (i, body) in [&b"alpha"[..], b"bravo!", b"c"].iter().enumerate() {
        p.start(&mut log, i as u64, "GET", None, false);
        let resp = [format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat();
        p.upstream(&mut log, i as u64, 0, &resp);
        p.reply(&mut log, &resp);
        p.end(&mut log, i as u64, 200);
    }
    let mut table = ReplicaTable::new();
    assert!(log.apply_from(&mut table, 0).iter().all(|a| *a == Applied::Taken));
    // Before the client's ACK: the three responses wait in the send queue.
    let r = plan(&table, &p, &with_key());
    assert_eq!(r.written, vec![0, 1, 2]);
    assert_eq!(r.decision, Decision::Written { exchange: 2 });
    let restore = r.restore.expect("restorable");
    assert_eq!(restore.send_queue.len() as u64, p.logged);
    assert!(restore.recv_queue.is_empty(), "answered requests are trimmed from the receive queue");
    assert_eq!(r.recv_start, reqs.len() as u64);
    let before = log.records.len();
    p.ack_all(&mut log);
    log.apply_from(&mut table, before);
    let t = table.conn(&p.key).unwrap().tracked().unwrap();
    assert!(t.exchanges().is_empty());
    assert_eq!(table.retained_bytes(), 0);
    assert_eq!(plan(&table, &p, &with_key()).decision, Decision::Idle);
}

#[test]
fn pipelined_burst_cut_in_the_second_response_continues_it_and_queues_the_third() {
    let mut log = Log::new();
    let mut p = Pair::new(40002, u32::MAX - 10, u32::MAX - 3, false); // both ISNs wrap
    p.open(&mut log);
    p.send(&mut log, b"GET /0 HTTP/1.1\r\n\r\nGET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n");
    p.start(&mut log, 0, "GET", None, false);
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    p.end(&mut log, 0, 200);
    p.start(&mut log, 1, "GET", None, false);
    let body: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let resp = [b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\nETag: \"abc\"\r\n\r\n".as_slice(), &body].concat();
    p.upstream(&mut log, 1, 0, &resp[..1000]);
    p.reply(&mut log, &resp[..800]);
    let table = fresh(&log);
    let r = plan(&table, &p, &with_key());
    assert_eq!(r.written, vec![0]);
    let Decision::ContinueWithRange { exchange: 1, at, if_range } = &r.decision else {
        panic!("expected a ranged continuation, got {:?}", r.decision)
    };
    assert_eq!(if_range, "\"abc\"");
    let head_len = resp.len() - body.len();
    assert_eq!(at.body_offset, (800 - head_len) as u64);
    assert_eq!(at.body_crc, crc32fast::hash(&body[..800 - head_len]));
    assert_eq!(at.framing, Continuation::Length { remaining: (3000 - (800 - head_len)) as u64 });
    assert_eq!(at.reply_offset, p.logged);
    assert_eq!(r.queued.len(), 1);
    assert_eq!(r.queued[0].decision, Decision::NotStarted { exchange: 2 });
    // The whole upstream response logged: the rest comes from the log.
    let mut log2 = log;
    p.upstream(&mut log2, 1, 1000, &resp[1000..]);
    let table = fresh(&log2);
    let r = plan(&table, &p, &with_key());
    assert!(matches!(r.decision, Decision::ContinueFromLog { exchange: 1, .. }), "{:?}", r.decision);
    let ex = table.conn(&p.key).unwrap().tracked().unwrap().exchange(1).unwrap();
    let log_rest = ex.upstream.as_ref().unwrap().payload_from((800 - head_len) as u64);
    assert_eq!(log_rest, &body[800 - head_len..]);
}

/// The bytes a backup writes after the reply log to continue a chunked response
/// from the upstream log, in chunks of `chunk` bytes.
fn chunked_continuation(c: &Continuation, mut payload: &[u8], chunk: usize) -> Vec<u8> {
    let Continuation::Chunked { prefix, open_chunk, finished } = c else { panic!("not chunked: {c:?}") };
    let mut out = prefix.clone();
    if *finished {
        return out;
    }
    let open = *open_chunk as usize;
    if open > 0 {
        out.extend_from_slice(&payload[..open]);
        out.extend_from_slice(b"\r\n");
        payload = &payload[open..];
    }
    for piece in payload.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[test]
fn chunked_response_cut_mid_chunk_continues_with_a_well_formed_chunked_body() {
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 256) as u8).collect();
    // The client-facing response is re-chunked by the proxy: 0x800-byte chunks.
    let mut reply = chunked_head().to_vec();
    for piece in body.chunks(0x800) {
        reply.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        reply.extend_from_slice(piece);
        reply.extend_from_slice(b"\r\n");
    }
    reply.extend_from_slice(b"0\r\n\r\n");
    let upstream =
        [format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v7\"\r\n\r\n", body.len()).as_bytes(), &body]
            .concat();
    let head_len = chunked_head().len();
    // Cut points: inside chunk data, inside a size line, in a CRLF, in the last chunk line.
    let second_size_line = head_len + 6 + 0x800 + 2;
    for cut in [head_len + 100, second_size_line + 1, second_size_line - 1, reply.len() - 4, head_len + 6] {
        let mut log = Log::new();
        let mut p = Pair::new(40003, 77, 99, true);
        p.open(&mut log);
        p.send(&mut log, b"GET /big HTTP/1.1\r\n\r\n");
        p.start(&mut log, 0, "GET", None, false);
        // The upstream's whole response is logged; the primary dies while writing the reply.
        p.upstream(&mut log, 0, 0, &upstream);
        p.reply(&mut log, &reply[..cut]);
        let table = fresh(&log);
        let r = plan(&table, &p, &with_key());
        let Decision::ContinueFromLog { exchange: 0, at } = &r.decision else { panic!("cut {cut}: {:?}", r.decision) };
        let ex = table.conn(&p.key).unwrap().tracked().unwrap().exchange(0).unwrap();
        let rest = ex.upstream.as_ref().unwrap().payload_from(at.body_offset);
        assert_eq!(at.body_crc, crc32fast::hash(&body[..at.body_offset as usize]));
        // The client's decoder, fed what it got and then the continuation, sees the
        // whole body in a well-formed message.
        let mut stream = reply[..cut].to_vec();
        stream.extend(chunked_continuation(&at.framing, &rest, 1000));
        let mut f = Framer::responses(0).with_body_events();
        f.expect_response(0, "GET");
        let mut ev = Vec::new();
        f.feed(0, &stream, &mut ev).unwrap_or_else(|e| panic!("cut {cut}: continuation malformed: {e}"));
        let decoded: Vec<u8> = ev
            .iter()
            .filter_map(|e| {
                if let Event::Body { range, .. } = e {
                    Some(&stream[range.start as usize..range.end as usize])
                } else {
                    None
                }
            })
            .flatten()
            .copied()
            .collect();
        assert_eq!(decoded, body, "cut {cut}");
        assert!(matches!(ev.last(), Some(Event::Complete { end, .. }) if *end == stream.len() as u64), "cut {cut}");
    }
}

#[test]
fn chunked_response_cut_without_a_complete_log_is_fetched_by_range_or_refetched() {
    let run = |head: &[u8], method: &str| {
        let mut log = Log::new();
        let mut p = Pair::new(40004, 1, 1, false);
        p.open(&mut log);
        p.send(&mut log, format!("{method} /f HTTP/1.1\r\n\r\n").as_bytes());
        p.start(&mut log, 0, method, None, false);
        p.upstream(&mut log, 0, 0, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        p.reply(&mut log, &[head, b"1000\r\n", &[b'x'; 300]].concat());
        plan(&fresh(&log), &p, &with_key()).decision
    };
    let d = run(chunked_head(), "GET");
    let Decision::ContinueWithRange { at, if_range, .. } = &d else { panic!("{d:?}") };
    assert_eq!(if_range, "\"v7\"");
    assert_eq!(at.framing, Continuation::Chunked { prefix: vec![], open_chunk: 0x1000 - 300, finished: false });
    let weak = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: W/\"v7\"\r\n\r\n";
    assert!(matches!(run(weak, "GET"), Decision::ContinueWithRefetch { why: ResendReason::Idempotent, .. }));
    assert!(matches!(
        run(chunked_head(), "POST"),
        Decision::Truncate { why: TruncateReason::NotResendable(RefuseReason::NoKey), .. }
    ));
}

/// A POST answered by nothing yet: the origin is slow and the primary dies.
fn post_in_flight(key: Option<&str>, generated: bool) -> (ReplicaTable, Pair) {
    let mut log = Log::new();
    let mut p = Pair::new(40005, 500, 600, true);
    p.open(&mut log);
    let mut req = b"POST /orders HTTP/1.1\r\nContent-Length: 10\r\n".to_vec();
    if let (Some(k), false) = (key, generated) {
        req.extend_from_slice(format!("Idempotency-Key: {k}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n{\"qty\": 1}");
    p.send(&mut log, &req);
    p.start(&mut log, 0, "POST", key, generated);
    (fresh(&log), p)
}

#[test]
fn post_without_reply_follows_the_retry_policy_and_the_key() {
    use RetryPolicy::*;
    let cases: [(Option<&str>, bool, RetryPolicy, bool, Decision); 7] = [
        (None, false, Never, false, Decision::Refuse { exchange: 0, why: RefuseReason::PolicyNever }),
        (None, false, WithKey, false, Decision::Refuse { exchange: 0, why: RefuseReason::NoKey }),
        (
            None,
            false,
            Always,
            false,
            Decision::Resend { exchange: 0, why: ResendReason::PolicyAlways, idempotency_key: None },
        ),
        (Some("c-1"), false, Never, false, Decision::Refuse { exchange: 0, why: RefuseReason::PolicyNever }),
        (
            Some("c-1"),
            false,
            WithKey,
            false,
            Decision::Resend { exchange: 0, why: ResendReason::ClientKey, idempotency_key: Some("c-1".into()) },
        ),
        (
            Some("gen-9"),
            true,
            WithKey,
            false,
            Decision::Refuse { exchange: 0, why: RefuseReason::GeneratedKeyNotHonoured },
        ),
        (
            Some("gen-9"),
            true,
            WithKey,
            true,
            Decision::Resend { exchange: 0, why: ResendReason::GeneratedKey, idempotency_key: Some("gen-9".into()) },
        ),
    ];
    for (key, generated, policy, honours, want) in cases {
        let (table, p) = post_in_flight(key, generated);
        let ex = table.conn(&p.key).unwrap().tracked().unwrap().exchange(0).unwrap();
        assert_eq!(ex.request.idempotency_key.as_deref(), if generated { None } else { key });
        let r = plan(&table, &p, &retry(policy, honours));
        assert_eq!(r.decision, want, "{key:?} generated={generated} {policy:?} honours={honours}");
        assert_eq!(r.restore.unwrap().recv_queue.len() as u64, p.sent, "the request is re-read from the receive queue");
    }
}

#[test]
fn get_without_reply_is_resent_or_replayed_from_a_complete_upstream_log() {
    let mut log = Log::new();
    let mut p = Pair::new(40006, 10, 20, false);
    p.open(&mut log);
    p.send(&mut log, b"GET /slow HTTP/1.1\r\n\r\n");
    p.start(&mut log, 0, "GET", None, false);
    let d = plan(&fresh(&log), &p, &with_key()).decision;
    assert_eq!(d, Decision::Resend { exchange: 0, why: ResendReason::Idempotent, idempotency_key: None });
    p.upstream(&mut log, 0, 0, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nsl");
    assert!(
        matches!(plan(&fresh(&log), &p, &with_key()).decision, Decision::Resend { .. }),
        "a partial log is not replayed"
    );
    p.upstream(&mut log, 0, 40, b"ow");
    assert_eq!(plan(&fresh(&log), &p, &with_key()).decision, Decision::ReplayFromLog { exchange: 0 });
    let table = fresh(&log);
    let u = table.conn(&p.key).unwrap().tracked().unwrap().exchange(0).unwrap().upstream.clone().unwrap();
    assert_eq!(u.head.as_ref().unwrap().status, 200);
    assert!(u.head_raw.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(u.payload_from(0), b"slow");
}

#[test]
fn head_request_response_without_body_is_written_in_full() {
    let mut log = Log::new();
    let mut p = Pair::new(40007, 3, 4, false);
    p.open(&mut log);
    p.send(&mut log, b"HEAD /big HTTP/1.1\r\n\r\n");
    p.start(&mut log, 0, "HEAD", None, false);
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n");
    let r = plan(&fresh(&log), &p, &with_key());
    assert_eq!(r.decision, Decision::Written { exchange: 0 });
}

#[test]
fn expect_100_continue_keeps_reading_then_resends_once_the_body_is_in() {
    let mut log = Log::new();
    let mut p = Pair::new(40008, 8, 9, false);
    p.open(&mut log);
    p.send(&mut log, b"PUT /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2000\r\n\r\n");
    p.start(&mut log, 0, "PUT", None, false);
    p.reply(&mut log, b"HTTP/1.1 100 Continue\r\n\r\n");
    let table = fresh(&log);
    let ex = table.conn(&p.key).unwrap().tracked().unwrap().exchange(0).unwrap();
    assert!(ex.request.expect_continue && ex.reply.interim_sent && ex.reply.head.is_none());
    assert_eq!(plan(&table, &p, &with_key()).decision, Decision::KeepReading { exchange: 0, started_upstream: true });
    p.send(&mut log, &[b'u'; 2000]);
    let d = plan(&fresh(&log), &p, &with_key()).decision;
    assert_eq!(d, Decision::Resend { exchange: 0, why: ResendReason::Idempotent, idempotency_key: None });
}

#[test]
fn partial_request_head_and_partial_response_head_are_reported() {
    let mut log = Log::new();
    let mut p = Pair::new(40009, 8, 9, false);
    p.open(&mut log);
    p.send(&mut log, b"GET /a HTTP/1.1\r\nHo");
    assert_eq!(
        plan(&fresh(&log), &p, &with_key()).decision,
        Decision::KeepReading { exchange: 0, started_upstream: false }
    );
    p.send(&mut log, b"st: x\r\n\r\n");
    p.start(&mut log, 0, "GET", None, false);
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\nContent-Le");
    let d = plan(&fresh(&log), &p, &with_key()).decision;
    assert_eq!(d, Decision::Truncate { exchange: 0, why: TruncateReason::PartialHead });
}

#[test]
fn connection_first_seen_mid_stream_is_kept_unprotected_until_it_resets() {
    let mut log = Log::new();
    let mut p = Pair::new(40010, 100, 200, false);
    // No handshake: data from a connection the table never saw open.
    p.send(&mut log, b"GET /late HTTP/1.1\r\n\r\n");
    let mut table = ReplicaTable::new();
    let out = log.apply_from(&mut table, 0);
    assert_eq!(out, vec![Applied::Unprotected { conn: p.key, reason: Unprotection::MidStream }]);
    assert_eq!(table.unprotected(), 1);
    let r = plan(&table, &p, &with_key());
    assert_eq!(r.decision, Decision::Unprotected { reason: Unprotection::MidStream });
    assert!(r.restore.is_none());
    // Later records about it change nothing; a RST ends it.
    let n = log.records.len();
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\n");
    let (seq, ack) = (p.cseq(p.sent), p.sseq(0));
    p.seg(&mut log, Dir::ToServer, TcpFlags::RST | A, seq, ack, TcpOptions::default(), b"");
    assert_eq!(log.apply_from(&mut table, n), vec![Applied::Ignored(Ignored::Unprotected(p.key)); 2]);
    assert!(table.is_empty());
    // A pure ACK of a connection never seen (the tail of a closed one) creates nothing.
    let n = log.records.len();
    p.ack_all(&mut log);
    assert_eq!(log.apply_from(&mut table, n), vec![Applied::Ignored(Ignored::Stray)]);
}

#[test]
fn segments_no_tcp_would_take_for_unknown_connections_leave_nothing_behind() {
    use TcpFlags as F;
    let mut log = Log::new();
    let mut live = Pair::new(40020, 1000, 2000, false);
    live.open(&mut log);
    live.get(&mut log, 0, b"ok");
    let mut table = ReplicaTable::new();
    log.apply_from(&mut table, 0);
    let before = table.summary();
    assert_eq!(before.connections, 1);
    // Data without ACK, SYN with FIN or RST, SYN-ACK from a client, a bare FIN: dropped by the server's TCP
    // (RFC 9293 3.10.7), so the table keeps nothing of them.
    let n = log.records.len();
    for (i, flags) in [0, F::FIN, F::PSH, F::SYN | F::FIN, F::SYN | F::RST, F::SYN | A, F::SYN | F::FIN | A, 0xff]
        .into_iter()
        .enumerate()
    {
        let mut p = Pair::new(41000 + i as u16, 7, 9, false);
        p.seg(&mut log, Dir::ToServer, flags, 12345, 678, TcpOptions::default(), b"GET /evil HTTP/1.1\r\n\r\n");
    }
    let out = log.apply_from(&mut table, n);
    assert!(out.iter().all(|a| matches!(a, Applied::Ignored(Ignored::Stray))), "{out:?}");
    assert_eq!(table.summary(), before, "bogus segments changed the table");
    // A real connection request still opens one.
    let n = log.records.len();
    let mut p = Pair::new(42000, 7, 9, false);
    p.seg(&mut log, Dir::ToServer, F::SYN, 7, 0, TcpOptions::default(), b"");
    log.apply_from(&mut table, n);
    assert_eq!(table.summary().connections, 2);
    assert_ne!(table.summary().digest, before.digest);
}

#[test]
fn malformed_request_unprotects_only_its_connection() {
    let mut log = Log::new();
    let mut good = Pair::new(40011, 1, 2, false);
    let mut bad = Pair::new(40012, 3, 4, false);
    good.open(&mut log);
    bad.open(&mut log);
    bad.send(&mut log, b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
    good.get(&mut log, 0, b"fine");
    let mut table = ReplicaTable::new();
    let out = log.apply_from(&mut table, 0);
    assert!(
        out.iter()
            .any(|a| matches!(a, Applied::Unprotected { conn, reason: Unprotection::Framing(_) } if *conn == bad.key))
    );
    assert_eq!(table.unprotected(), 1);
    assert!(table.conn(&good.key).unwrap().tracked().is_some());
    assert!(matches!(plan(&table, &bad, &with_key()).decision, Decision::Unprotected { .. }));
}

#[test]
fn exchange_start_with_another_method_than_framed_unprotects() {
    let mut log = Log::new();
    let mut p = Pair::new(40013, 1, 2, false);
    p.open(&mut log);
    p.send(&mut log, b"GET / HTTP/1.1\r\n\r\n");
    p.start(&mut log, 0, "POST", None, false);
    let mut table = ReplicaTable::new();
    let out = log.apply_from(&mut table, 0);
    assert!(matches!(out.last(), Some(Applied::Unprotected { reason: Unprotection::ExchangeMismatch { .. }, .. })));
}

#[test]
fn records_of_an_older_epoch_or_out_of_sequence_are_refused() {
    let mut log = Log::new();
    let mut p = Pair::new(40014, 1, 2, false);
    p.open(&mut log);
    let mut table = fresh(&log);
    let stale = Record { seq: 4, epoch: 0, msg: Message::ConnClosed { conn: p.key } };
    assert_eq!(table.apply(&stale), Err(ApplyError::StaleEpoch { seq: 4, record: 0, table: 1 }));
    let repeat = Record { seq: 3, epoch: 1, msg: Message::ConnClosed { conn: p.key } };
    assert_eq!(table.apply(&repeat), Err(ApplyError::OutOfSequence { last: 3, got: 3 }));
    assert_eq!(table.len(), 1, "refused records change nothing");
    // A new epoch (a takeover) starts its own numbering.
    let next = Record { seq: 1, epoch: 2, msg: Message::ConnClosed { conn: p.key } };
    assert_eq!(table.apply(&next), Ok(Applied::Taken));
    assert_eq!(table.epoch(), 2);
}

#[test]
fn snapshot_errors_are_typed() {
    let mut t = ReplicaTable::new();
    let rec = |seq, msg| Record { seq, epoch: 1, msg };
    assert_eq!(t.apply(&rec(1, Message::SnapshotEnd)), Err(SnapshotError::NotInSnapshot("SnapshotEnd").into()));
    t.apply(&rec(1, Message::SnapshotBegin { connections: 2 })).unwrap();
    let key = ConnKey { client: "10.0.0.1:1".parse().unwrap(), server: SERVER.parse().unwrap() };
    let bad = Message::SnapshotConn { conn: key, state: b"\xffnot a state".to_vec(), more: false };
    assert!(matches!(t.apply(&rec(2, bad)), Err(ApplyError::Snapshot(SnapshotError::Decode { .. }))));
    assert_eq!(t.apply(&rec(2, Message::ConnClosed { conn: key })), Err(SnapshotError::Interrupted.into()));
    assert_eq!(t.apply(&rec(2, Message::SnapshotEnd)), Err(SnapshotError::Count { announced: 2, received: 1 }.into()));

    // A connection's parts cut by another connection's part, or by the end.
    let other = ConnKey { client: "10.0.0.1:2".parse().unwrap(), server: SERVER.parse().unwrap() };
    let part = |conn, more| Message::SnapshotConn { conn, state: vec![0; 4], more };
    let mut t = ReplicaTable::new();
    t.apply(&rec(1, Message::SnapshotBegin { connections: 2 })).unwrap();
    t.apply(&rec(2, part(key, true))).unwrap();
    assert_eq!(t.apply(&rec(3, part(other, false))), Err(SnapshotError::PartsCut { conn: key }.into()));
    let mut t = ReplicaTable::new();
    t.apply(&rec(1, Message::SnapshotBegin { connections: 1 })).unwrap();
    t.apply(&rec(2, part(key, true))).unwrap();
    assert_eq!(t.apply(&rec(3, Message::SnapshotEnd)), Err(SnapshotError::PartsCut { conn: key }.into()));
}

/// Stream A: several connections in every state worth carrying.
fn stream_a(log: &mut Log) -> Vec<Pair> {
    let mut pairs = Vec::new();
    // Keep-alive with history, then a chunked response cut mid-chunk, upstream partly logged.
    let mut p = Pair::new(41001, 4_000_000_000, 4_294_000_000, true);
    p.open(log);
    p.get(log, 0, b"first");
    p.send(log, b"GET /stream HTTP/1.1\r\n\r\n");
    p.start(log, 1, "GET", None, false);
    p.upstream(log, 1, 0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n");
    p.reply(log, chunked_head());
    p.reply(log, b"10\r\n0123456789");
    pairs.push(p);
    // A POST upload in progress, with out-of-order client bytes pending.
    let mut p = Pair::new(41002, 17, 4_294_967_290, true);
    p.open(log);
    let head = b"POST /up HTTP/1.1\r\nContent-Length: 6000\r\nIdempotency-Key: up-1\r\n\r\n";
    p.send(log, head);
    p.start(log, 0, "POST", Some("up-1"), false);
    p.send(log, &[b'a'; 2000]);
    let at = p.sent;
    p.send_at(log, at + 1000, &[b'c'; 500]);
    pairs.push(p);
    // Pipelined: one answered, one waiting on the origin, one not started.
    let mut p = Pair::new(41003, 5, 6, false);
    p.open(log);
    p.send(log, b"GET /x HTTP/1.1\r\n\r\nDELETE /y HTTP/1.1\r\n\r\nGET /z HTTP/1.1\r\n\r\n");
    p.start(log, 0, "GET", None, false);
    p.reply(log, b"HTTP/1.1 204 No Content\r\n\r\n");
    p.end(log, 0, 204);
    p.start(log, 1, "DELETE", None, false);
    pairs.push(p);
    // The server closed after its response; the client has not acknowledged the FIN.
    let mut p = Pair::new(41004, 9, 10, true);
    p.open(log);
    p.send(log, b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n");
    p.start(log, 0, "GET", None, false);
    p.reply(log, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye");
    p.end(log, 0, 200);
    p.server_fin(log);
    pairs.push(p);
    // Handshake in progress; a mid-stream connection.
    let mut p = Pair::new(41005, 11, 12, false);
    let mut o = TcpOptions::default();
    o.mss = Some(1400);
    p.seg(log, Dir::ToServer, TcpFlags::SYN, 11, 0, o, b"");
    pairs.push(p);
    let mut p = Pair::new(41006, 13, 14, false);
    p.send(log, b"GET /mid HTTP/1.1\r\n\r\n");
    pairs.push(p);
    pairs
}

/// Stream B: everything moves on.
fn stream_b(log: &mut Log, pairs: &mut [Pair]) {
    let [a, b, c, d, e, _f] = pairs else { unreachable!("six pairs") };
    a.reply(log, b"abcdef\r\n0\r\n\r\n");
    a.end(log, 1, 200);
    a.ack_all(log);
    a.get(log, 2, b"third");
    let hole = b.sent - 1500;
    b.send_at(log, hole, &[b'b'; 1000]);
    let head_len = 66;
    let rest = head_len + 6000 - b.sent;
    b.send(log, &vec![b'd'; rest as usize]);
    b.reply(log, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
    b.end(log, 0, 201);
    c.upstream(log, 1, 0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    c.reply(log, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    c.end(log, 1, 200);
    c.start(log, 2, "GET", None, false);
    c.ack_all(log);
    d.ack_all(log);
    let (seq, ack) = (d.cseq(d.sent), d.sseq(d.logged + 1));
    d.seg(log, Dir::ToServer, TcpFlags::FIN | A, seq, ack, TcpOptions::default(), b"");
    e.seg(log, Dir::ToClient, TcpFlags::SYN | A, 12, 12, TcpOptions::default(), b"");
    e.seg(log, Dir::ToServer, A, 12, 13, TcpOptions::default(), b"");
    log.push(Message::ConnClosed { conn: d.key });
}

#[test]
fn snapshot_applied_to_an_empty_table_yields_an_equal_table_that_stays_equal() {
    let mut log = Log::new();
    let mut pairs = stream_a(&mut log);
    let mut primary = ReplicaTable::new();
    log.apply_from(&mut primary, 0);
    assert_eq!(primary.len(), 6);
    assert_eq!(primary.unprotected(), 1);
    // The spare joins: snapshot records, then the stream from there on.
    let mut spare = ReplicaTable::new();
    // Parts far smaller than any state: every connection arrives in several.
    let snapshot = primary.snapshot(353);
    let parts = snapshot.iter().filter(|m| matches!(m, Message::SnapshotConn { .. })).count();
    assert!(parts > 6 * 3, "{parts} parts for 6 connections");
    for msg in snapshot {
        let n = log.records.len();
        log.push(msg);
        assert_eq!(spare.apply(&log.records[n]), Ok(Applied::Taken));
    }
    let joined_at = log.records.len();
    assert!(primary == spare, "the snapshot rebuilds an equal table");
    for (c, p) in primary.conns().zip(spare.conns()) {
        if let (Some(a), Some(b)) = (c.tracked(), p.tracked()) {
            assert_eq!(a.tracker(), b.tracker(), "{:?}", c.key());
        }
    }
    let now = Duration::from_secs(30);
    let r = retry(RetryPolicy::WithKey, false);
    let plans = plan_takeover(&spare, now, &r);
    assert_eq!(plan_takeover(&primary, now, &r), plans);
    let decisions: Vec<&str> = plans.iter().map(|p| p.decision.kind()).collect();
    assert_eq!(
        decisions,
        ["continue_with_range", "keep_reading", "resend", "written", "not_restorable", "unprotected"]
    );
    assert_eq!(plans[2].queued[0].decision, Decision::NotStarted { exchange: 2 });
    // Stream B, applied to both.
    stream_b(&mut log, &mut pairs);
    let out_primary = log.apply_from(&mut primary, joined_at);
    let out_spare = log.apply_from(&mut spare, joined_at);
    // The primary's table never applied the snapshot records: its numbering jumps.
    assert_eq!(out_primary, out_spare);
    assert!(primary == spare, "equal after the same records");
    let plans = plan_takeover(&spare, now, &r);
    assert_eq!(plan_takeover(&primary, now, &r), plans);
    for (c, p) in primary.conns().zip(spare.conns()) {
        let (Some(a), Some(b)) = (c.tracked(), p.tracked()) else { continue };
        assert_eq!(a.tracker().restore_plan(now), b.tracker().restore_plan(now));
        assert_eq!(a.tracker(), b.tracker(), "{:?}", c.key());
    }
    // What stream B did, as the planner sees it (the closed connection is gone).
    let decisions: Vec<&str> = plans.iter().map(|p| p.decision.kind()).collect();
    assert_eq!(decisions, ["idle", "written", "resend", "idle", "unprotected"]);
    let b = spare.conn(&pairs[1].key).unwrap().tracked().unwrap();
    assert_eq!(b.tracker().stream(Dir::ToServer).contiguous_end(), pairs[1].sent, "the pending piece carried over");
}

#[test]
fn snapshot_carries_a_connection_with_timestamps_across_the_sequence_wrap() {
    let mut log = Log::new();
    let mut p = Pair::new(42000, u32::MAX - 1, u32::MAX, true);
    p.open(&mut log);
    p.get(&mut log, 0, &vec![b'z'; 70_000]);
    p.send(&mut log, b"GET /again HTTP/1.1\r\n\r\n");
    let primary = fresh(&log);
    let mut spare = ReplicaTable::new();
    // Frames smaller than the connection's state: it comes in parts that each fit one.
    let max_frame = 320;
    let snapshot = primary.snapshot(max_frame);
    assert!(snapshot.len() > 3, "{} records", snapshot.len());
    for (i, msg) in snapshot.into_iter().enumerate() {
        let rec = Record { seq: 100 + i as u64, epoch: 1, msg };
        let len = shared::codec::encode(&rec).unwrap().len();
        assert!(len <= max_frame, "record {i} is {len} bytes, over a {max_frame}-byte frame");
        spare.apply(&rec).unwrap();
    }
    assert!(primary == spare);
    let (a, b) = (primary.conn(&p.key).unwrap().tracked().unwrap(), spare.conn(&p.key).unwrap().tracked().unwrap());
    let now = Duration::from_secs(50);
    assert_eq!(a.tracker().restore_plan(now), b.tracker().restore_plan(now));
    assert_eq!(a.tracker(), b.tracker());
    assert!(a.tracker().restore_plan(now).unwrap().tsval.is_some());
}

#[test]
fn memory_stays_bounded_over_ten_thousand_exchanges_on_one_connection() {
    let mut log = Log::new();
    let mut p = Pair::new(43000, 123, 456, true);
    p.open(&mut log);
    let mut table = fresh(&log);
    let body = vec![b'm'; 3000];
    let mut peak = 0;
    for i in 0..10_000u64 {
        let n = log.records.len();
        p.get(&mut log, i, &body);
        for a in log.apply_from(&mut table, n) {
            assert_eq!(a, Applied::Taken);
        }
        let t = table.conn(&p.key).unwrap().tracked().unwrap();
        assert!(t.exchanges().is_empty(), "exchange {i} acknowledged and forgotten");
        peak = peak.max(table.retained_bytes());
        // The stream is only kept in memory for the part not yet applied.
        log.records.clear();
    }
    assert_eq!(peak, 0, "nothing retained between exchanges");
    let t = table.conn(&p.key).unwrap().tracked().unwrap();
    assert_eq!(t.tracker().stream(Dir::ToServer).start(), p.sent);
    assert_eq!(t.tracker().stream(Dir::ToClient).start(), p.logged);
    assert_eq!(t.tracker().state(), TcpState::Established);
    println!("10000 exchanges: {} client bytes, {} reply bytes, peak retained {peak} bytes", p.sent, p.logged);
}

#[test]
fn upstream_log_is_trimmed_as_the_reply_covers_it() {
    let mut log = Log::new();
    let mut p = Pair::new(44000, 1, 1, false);
    p.open(&mut log);
    p.send(&mut log, b"GET /big HTTP/1.1\r\n\r\n");
    p.start(&mut log, 0, "GET", None, false);
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
    p.upstream(&mut log, 0, 0, head);
    p.reply(&mut log, head);
    let mut table = fresh(&log);
    for k in 0..100u64 {
        let n = log.records.len();
        let piece = vec![(k % 256) as u8; 1000];
        p.upstream(&mut log, 0, head.len() as u64 + k * 1000, &piece);
        p.reply(&mut log, &piece);
        p.ack_all(&mut log);
        log.apply_from(&mut table, n);
        let ex = table.conn(&p.key).unwrap().tracked().unwrap().exchange(0).cloned();
        if let Some(ex) = ex {
            assert!(ex.upstream.unwrap().payload.is_empty(), "payload the reply covers is dropped");
        }
        assert!(table.retained_bytes() < 2 * head.len());
    }
    let t = table.conn(&p.key).unwrap().tracked().unwrap();
    assert!(t.exchanges().is_empty(), "complete and acknowledged");
}

/// Snapshots the table after every record of `log` and checks that each snapshot
/// yields an equal table, every tracker equal field for field (counters included).
fn assert_snapshots_faithful_at_every_step(log: &Log) {
    let mut primary = ReplicaTable::new();
    for (i, rec) in log.records.iter().enumerate() {
        primary.apply(rec).unwrap();
        let mut spare = ReplicaTable::new();
        for (j, msg) in primary.snapshot(4096).into_iter().enumerate() {
            let out = spare.apply(&Record { seq: 1 + j as u64, epoch: 1, msg }).unwrap();
            assert_eq!(out, Applied::Taken, "after record {i}");
        }
        assert!(primary == spare, "after record {i}");
        for (c, p) in primary.conns().zip(spare.conns()) {
            if let (Some(a), Some(b)) = (c.tracked(), p.tracked()) {
                assert_eq!(a.tracker(), b.tracker(), "after record {i}");
            }
        }
    }
}

#[test]
fn snapshot_is_faithful_through_reordering_window_changes_retransmitted_fins_and_resets() {
    let mut log = Log::new();
    let mut p = Pair::new(45000, 4_294_967_000, 123_456, true);
    p.open(&mut log);
    p.send(&mut log, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n");
    // Out of order, then the hole fills.
    let at = p.sent;
    p.send_at(&mut log, at + 5, b"\r\n");
    p.send_at(&mut log, at, b"Host:");
    p.start(&mut log, 0, "GET", None, false);
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc");
    // The client's window shrinks to zero, then reopens; its ACK stays put.
    for window in [0u16, 0, 40, 7] {
        let (seq, ack) = (p.cseq(p.sent), p.sseq(p.acked));
        p.now_us += 1000;
        let mut b = SegmentBuilder::new(p.key.client, p.key.server);
        b.seq = Seq(seq);
        b.ack = Seq(ack);
        b.window = window;
        b.options.timestamps = Some(Timestamps { val: 9_000_000 + window as u32, ecr: 1 });
        log.push(Message::Segment { at_us: p.now_us, dir: Dir::ToServer, datagram: b.build(b"") });
    }
    p.ack_all(&mut log);
    // The server closes; its FIN is retransmitted with a closed window.
    p.server_fin(&mut log);
    let (seq, ack) = (p.sseq(p.logged), p.cseq(p.sent));
    p.now_us += 200_000;
    let mut b = SegmentBuilder::new(p.key.server, p.key.client);
    b.flags = TcpFlags::FIN | A;
    b.seq = Seq(seq);
    b.ack = Seq(ack);
    b.window = 0;
    log.push(Message::Segment { at_us: p.now_us, dir: Dir::ToClient, datagram: b.build(b"") });
    // The client resets.
    let (seq, ack) = (p.cseq(p.sent), p.sseq(p.logged + 1));
    p.seg(&mut log, Dir::ToServer, TcpFlags::RST | A, seq, ack, TcpOptions::default(), b"");
    assert_snapshots_faithful_at_every_step(&log);
}

#[test]
fn snapshot_is_faithful_at_every_step_of_a_busy_stream() {
    let mut log = Log::new();
    let mut pairs = stream_a(&mut log);
    stream_b(&mut log, &mut pairs);
    assert_snapshots_faithful_at_every_step(&log);
}

#[test]
fn bytes_after_a_closing_request_are_released_once_it_is_answered() {
    let mut log = Log::new();
    let mut p = Pair::new(46000, 1, 2, false);
    p.open(&mut log);
    p.send(&mut log, b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n");
    p.start(&mut log, 0, "GET", None, false);
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n!");
    p.end(&mut log, 0, 200);
    let mut table = fresh(&log);
    let key = p.key;
    let retained =
        |t: &ReplicaTable| t.conn(&key).unwrap().tracked().unwrap().tracker().stream(Dir::ToServer).retained_bytes();
    assert_eq!(retained(&table), 0, "the server never reads what follows the closing request");
    let n = log.records.len();
    p.send(&mut log, b"more ignored bytes");
    log.apply_from(&mut table, n);
    assert_eq!(retained(&table), 0);
    assert_eq!(plan(&table, &p, &with_key()).decision, Decision::Written { exchange: 0 });
}

#[test]
fn a_new_syn_on_a_closed_connection_starts_a_new_replica() {
    let mut log = Log::new();
    let mut p = Pair::new(46001, 1000, 2000, false);
    p.open(&mut log);
    p.get(&mut log, 0, b"x");
    let (seq, ack) = (p.cseq(p.sent), p.sseq(p.logged));
    p.seg(&mut log, Dir::ToServer, TcpFlags::RST | A, seq, ack, TcpOptions::default(), b"");
    let mut table = fresh(&log);
    assert_eq!(table.conn(&p.key).unwrap().tracked().unwrap().tracker().state(), TcpState::Close);
    let n = log.records.len();
    let mut q = Pair::new(46001, 90_000, 80_000, false);
    q.open(&mut log);
    assert!(log.apply_from(&mut table, n).iter().all(|a| *a == Applied::Taken));
    let t = table.conn(&q.key).unwrap().tracked().unwrap().tracker();
    assert_eq!((t.state(), t.sender(Dir::ToServer).isn), (TcpState::Established, Some(Seq(90_000))));
}

#[test]
fn unprotected_connection_is_forgotten_once_both_sides_closed() {
    let mut log = Log::new();
    let mut p = Pair::new(46002, 5, 6, false);
    p.send(&mut log, b"mid-stream bytes");
    let (seq, ack) = (p.cseq(p.sent), p.sseq(0));
    p.seg(&mut log, Dir::ToServer, TcpFlags::FIN | A, seq, ack, TcpOptions::default(), b"");
    let mut table = fresh(&log);
    assert_eq!(table.unprotected(), 1);
    let n = log.records.len();
    p.server_fin(&mut log);
    log.apply_from(&mut table, n);
    assert!(table.is_empty());
}

#[test]
fn answering_the_request_before_a_closing_one_keeps_the_closing_request() {
    let mut log = Log::new();
    let mut p = Pair::new(46003, 1, 2, false);
    p.open(&mut log);
    let closing = b"GET /b HTTP/1.1\r\nConnection: close\r\n\r\n";
    p.send(&mut log, &[b"GET /a HTTP/1.1\r\n\r\n".as_slice(), closing].concat());
    p.start(&mut log, 0, "GET", None, false);
    p.reply(&mut log, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na");
    p.end(&mut log, 0, 200);
    let table = fresh(&log);
    let r = plan(&table, &p, &with_key());
    assert_eq!(r.restore.unwrap().recv_queue, closing, "the closing request is still to be answered");
    assert_eq!(r.decision, Decision::NotStarted { exchange: 1 });
}

#[test]
fn snapshot_of_two_thousand_connections_with_a_request_in_flight_reports_size_and_time() {
    use std::time::Instant;
    let mut log = Log::new();
    let mut pairs = Vec::new();
    for i in 0..2000u32 {
        let mut p = Pair::new(50000 + i as u16, i.wrapping_mul(2_654_435_761), i.wrapping_mul(40_503), true);
        p.open(&mut log);
        let req = format!(
            "GET /objects/{i} HTTP/1.1\r\nHost: origin.example\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
        );
        p.send(&mut log, req.as_bytes());
        p.start(&mut log, 0, "GET", None, false);
        pairs.push(p);
    }
    let mut primary = ReplicaTable::new();
    let t0 = Instant::now();
    let applied = log.apply_from(&mut primary, 0);
    let stream_time = t0.elapsed();
    assert!(applied.iter().all(|a| *a == Applied::Taken));
    assert_eq!((primary.len(), primary.unprotected()), (2000, 0));
    let t0 = Instant::now();
    let snapshot = primary.snapshot(usize::MAX);
    let encode_time = t0.elapsed();
    let state_bytes: usize =
        snapshot.iter().map(|m| if let Message::SnapshotConn { state, .. } = m { state.len() } else { 0 }).sum();
    let mut spare = ReplicaTable::new();
    let t0 = Instant::now();
    for (i, msg) in snapshot.into_iter().enumerate() {
        assert_eq!(spare.apply(&Record { seq: 1 + i as u64, epoch: 1, msg }), Ok(Applied::Taken));
    }
    let decode_time = t0.elapsed();
    assert!(primary == spare);
    println!(
        "2000 connections, a request in flight each: stream of {} records applied in {:.1} ms ({:.2} µs/record); \
         snapshot {} state bytes ({} per connection), encoded in {:.2} ms, decoded and applied in {:.2} ms",
        log.records.len(),
        stream_time.as_secs_f64() * 1e3,
        stream_time.as_secs_f64() * 1e6 / log.records.len() as f64,
        state_bytes,
        state_bytes / 2000,
        encode_time.as_secs_f64() * 1e3,
        decode_time.as_secs_f64() * 1e3,
    );
}

/// A snapshot's state for one busy connection: a tracker with timestamps past the
/// sequence wrap, a framer inside a chunked response, exchange records with an upstream log.
fn busy_state() -> (ConnKey, Vec<u8>) {
    let mut log = Log::new();
    let pairs = stream_a(&mut log);
    let table = fresh(&log);
    let key = pairs[0].key;
    let state = table
        .snapshot(usize::MAX)
        .into_iter()
        .find_map(|m| match m {
            Message::SnapshotConn { conn, state, .. } if conn == key => Some(state),
            _ => None,
        })
        .expect("the connection is in the snapshot");
    (key, state)
}

/// Applies a snapshot of one connection with this state to an empty table.
fn apply_state(key: ConnKey, state: Vec<u8>) -> Result<Applied, ApplyError> {
    let mut t = ReplicaTable::new();
    t.apply(&Record { seq: 1, epoch: 1, msg: Message::SnapshotBegin { connections: 1 } }).unwrap();
    t.apply(&Record { seq: 2, epoch: 1, msg: Message::SnapshotConn { conn: key, state, more: false } })
}

fn decode_error(r: Result<Applied, ApplyError>) -> CodecError {
    match r {
        Err(ApplyError::Snapshot(SnapshotError::Decode { source, .. })) => source,
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn corrupt_snapshot_state_is_a_typed_error_never_a_panic() {
    let (key, state) = busy_state();
    assert_eq!(apply_state(key, state.clone()), Ok(Applied::Taken));
    // Cut anywhere: the value ends early.
    for n in 0..state.len() {
        let e = decode_error(apply_state(key, state[..n].to_vec()));
        assert!(matches!(e, CodecError::Truncated | CodecError::Invalid(_)), "cut at {n}: {e:?}");
    }
    // One byte too many.
    let mut long = state.clone();
    long.push(0);
    assert_eq!(decode_error(apply_state(key, long)), CodecError::TrailingBytes { used: state.len(), extra: 1 });
    // A variant that does not exist.
    assert!(matches!(decode_error(apply_state(key, vec![7])), CodecError::Invalid(_)));
    // A string claiming 2^60 bytes: Unprotected(Lost { ExchangeMismatch { exchange: 0, logged: <claim> } }).
    let claim = [&[1u8, 2, 0, 253][..], &(1u64 << 60).to_le_bytes()].concat();
    assert_eq!(decode_error(apply_state(key, claim)), CodecError::LimitExceeded);
    // Every byte changed, one at a time, in several ways: an error or a decoded state, never a panic.
    let mut outcomes = [0usize; 3];
    for i in 0..state.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut bad = state.clone();
            bad[i] ^= x;
            match apply_state(key, bad) {
                Ok(Applied::Taken) => outcomes[0] += 1,
                Err(ApplyError::Snapshot(SnapshotError::Decode { conn, .. })) if conn == key => outcomes[1] += 1,
                Err(ApplyError::Snapshot(SnapshotError::Inconsistent { conn, .. })) if conn == key => outcomes[2] += 1,
                other => panic!("byte {i} ^ {x:#x}: {other:?}"),
            }
        }
    }
    println!(
        "{}-byte state, {} single-byte corruptions: {} decode to some state, {} fail to decode, {} are inconsistent",
        state.len(),
        3 * state.len(),
        outcomes[0],
        outcomes[1],
        outcomes[2]
    );
}

#[test]
fn snapshot_state_of_another_connection_is_refused_as_inconsistent() {
    let (key, state) = busy_state();
    let other = ConnKey { client: "10.0.0.9:9".parse().unwrap(), server: key.server };
    let r = apply_state(other, state);
    assert!(
        matches!(&r, Err(ApplyError::Snapshot(SnapshotError::Inconsistent { conn, .. })) if *conn == other),
        "{r:?}"
    );
}

// ------------------------------------------------ snapshots of one connection driven at random

/// The client's request stream: `REQUEST` over and over. The reply log answers each
/// complete request with `RESPONSE`.
const REQUEST: &[u8] = b"GET /r HTTP/1.1\r\nHost: o\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello, again";

fn stream_bytes(unit: &[u8], from: u64, len: u64) -> Vec<u8> {
    (from..from + len).map(|i| unit[(i % unit.len() as u64) as usize]).collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Client bytes `back` bytes behind the highest sent (retransmission, reordering),
    /// acknowledging `ack`/255 of the reply log.
    Data {
        back: u16,
        len: u16,
        window: u16,
        ack: u8,
    },
    /// Reply bytes, as far as the requests received so far are answered.
    Reply {
        len: u16,
    },
    /// A client pure ACK.
    Ack {
        window: u16,
        ack: u8,
    },
    /// The server's FIN (retransmitted where it first was), acknowledging what the table holds.
    ServerFin {
        window: u16,
    },
    ClientFin,
    Rst {
        client: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..600u16, 0..300u16, any::<u16>(), any::<u8>())
            .prop_map(|(back, len, window, ack)| Op::Data { back, len, window, ack }),
        3 => (1..3000u16).prop_map(|len| Op::Reply { len }),
        3 => (any::<u16>(), any::<u8>()).prop_map(|(window, ack)| Op::Ack { window, ack }),
        1 => prop_oneof![Just(0u16), any::<u16>()].prop_map(|window| Op::ServerFin { window }),
        1 => Just(Op::ClientFin),
        1 => any::<bool>().prop_map(|client| Op::Rst { client }),
    ]
}

/// Drives one connection through the handshake and `ops` into a table, like a TCP
/// stack would (a FIN ends its stream and is retransmitted where it is; the reply
/// log answers requests in order), then checks a snapshot after every record.
fn run_ops(cisn: u32, sisn: u32, wscale: Option<(u8, u8)>, ts: bool, ops: Vec<Op>) -> (ReplicaTable, Pair) {
    let mut log = Log::new();
    let mut p = Pair::new(47000, cisn, sisn, ts);
    p.open_with(&mut log, wscale);
    let mut table = fresh(&log);
    let (mut client_fin, mut server_fin) = (None::<u64>, None::<u64>);
    let mut started = 0u64;
    for op in ops {
        let n = log.records.len();
        let tracked = table.conn(&p.key).and_then(|c| c.tracked()).map(|t| t.tracker().clone());
        let server_ack = |p: &Pair, frac: u8| p.sseq(p.logged * frac as u64 / 255);
        match op {
            Op::Data { back, len, window, ack } => {
                let off = p.sent.saturating_sub(back as u64);
                let len = client_fin.map_or(len as u64, |f| (len as u64).min(f.saturating_sub(off)));
                let (seq, ack) = (p.cseq(off), server_ack(&p, ack));
                let payload = stream_bytes(REQUEST, off, len);
                p.seg_with_window(&mut log, Dir::ToServer, A, seq, ack, window, TcpOptions::default(), &payload);
                p.sent = p.sent.max(off + len);
            }
            Op::Reply { len } => {
                let Some(t) = tracked.filter(|_| server_fin.is_none()) else { continue };
                let requests = t.stream(Dir::ToServer).contiguous_end() / REQUEST.len() as u64;
                let len = (len as u64).min((requests * RESPONSE.len() as u64).saturating_sub(p.logged));
                let mut at = p.logged;
                while at < p.logged + len {
                    let (exchange, within) = (at / RESPONSE.len() as u64, at % RESPONSE.len() as u64);
                    if exchange == started {
                        p.start(&mut log, exchange, "GET", None, false);
                        p.upstream(&mut log, exchange, 0, RESPONSE);
                        started += 1;
                    }
                    let piece = (RESPONSE.len() as u64 - within).min(p.logged + len - at);
                    log.push(Message::Reply {
                        conn: p.key,
                        offset: at,
                        bytes: RESPONSE[within as usize..(within + piece) as usize].to_vec(),
                    });
                    at += piece;
                    if at.is_multiple_of(RESPONSE.len() as u64) {
                        p.end(&mut log, exchange, 200);
                    }
                }
                p.logged = at;
            }
            Op::Ack { window, ack } => {
                let (seq, ack) = (p.cseq(p.sent), server_ack(&p, ack));
                p.seg_with_window(&mut log, Dir::ToServer, A, seq, ack, window, TcpOptions::default(), b"");
            }
            Op::ServerFin { window } => {
                let at = *server_fin.get_or_insert(p.logged);
                let got = tracked.map_or(0, |t| t.stream(Dir::ToServer).contiguous_end());
                let (seq, ack) = (p.sseq(at), p.cseq(got));
                p.seg_with_window(
                    &mut log,
                    Dir::ToClient,
                    TcpFlags::FIN | A,
                    seq,
                    ack,
                    window,
                    TcpOptions::default(),
                    b"",
                );
            }
            Op::ClientFin => {
                let at = *client_fin.get_or_insert(p.sent);
                let (seq, ack) = (p.cseq(at), server_ack(&p, 255));
                p.seg(&mut log, Dir::ToServer, TcpFlags::FIN | A, seq, ack, TcpOptions::default(), b"");
            }
            Op::Rst { client: true } => {
                let seq = p.cseq(p.sent);
                p.seg(&mut log, Dir::ToServer, TcpFlags::RST, seq, 0, TcpOptions::default(), b"");
            }
            Op::Rst { client: false } => {
                let acked = tracked.and_then(|t| t.endpoint(Dir::ToServer).and_then(|e| e.acked()));
                let seq = acked.map_or(p.sseq(0), |s| s.0);
                p.seg(&mut log, Dir::ToClient, TcpFlags::RST, seq, 0, TcpOptions::default(), b"");
            }
        }
        log.apply_from(&mut table, n);
    }
    assert_snapshots_faithful_at_every_step(&log);
    (table, p)
}

/// The connection's tracker, which must still be followed.
fn tracker_of(run: &(ReplicaTable, Pair)) -> &tcp_replay::Tracker {
    run.0.conn(&run.1.key).and_then(|c| c.tracked()).expect("still protected").tracker()
}

proptest! {
    #[test]
    fn any_tracked_connection_snapshots_to_an_equal_table_at_every_step(
        cisn in any::<u32>(),
        sisn in any::<u32>(),
        wscale in prop::option::of((0u8..15, 0u8..15)),
        ts in any::<bool>(),
        ops in prop::collection::vec(op(), 0..40),
    ) {
        run_ops(cisn, sisn, wscale, ts, ops);
    }
}

fn server_fin(window: u16) -> Op {
    Op::ServerFin { window }
}

fn data(window: u16, ack: u8) -> Op {
    Op::Data { back: 0, len: 1, window, ack }
}

// The window bookkeeping cases a rebuilt tracker once got wrong; a snapshot must carry them too.

#[test]
fn snapshot_carries_a_retransmitted_server_fin_with_a_newer_ack_and_a_closed_window() {
    let run = run_ops(0, 0, None, false, vec![server_fin(0), data(0, 0), server_fin(0)]);
    assert_eq!(tracker_of(&run).state(), TcpState::FinWait1);
}

#[test]
fn snapshot_carries_a_retransmitted_server_fin_that_opens_the_window() {
    let run = run_ops(0, 0, None, false, vec![server_fin(0), data(0, 0), server_fin(1)]);
    assert_eq!(tracker_of(&run).state(), TcpState::FinWait1);
}

#[test]
fn snapshot_carries_server_fin_windows_large_zero_small_at_one_sequence_number() {
    let run = run_ops(0, 0, None, false, vec![server_fin(24300), server_fin(0), server_fin(1)]);
    assert_eq!(tracker_of(&run).sender(Dir::ToClient).window_raw(), 1);
}

#[test]
fn snapshot_carries_client_data_with_an_older_ack_than_its_latest() {
    let ops = vec![
        Op::Data { back: 0, len: 600, window: 502, ack: 0 },
        Op::Reply { len: 900 },
        data(30, 255),
        data(40, 10),
        Op::Ack { window: 7, ack: 5 },
    ];
    let run = run_ops(7, u32::MAX - 2, Some((7, 9)), true, ops);
    assert_eq!(run.1.logged, 900, "the reply log answered the requests");
    let t = tracker_of(&run);
    // The latest segment acknowledged less than an earlier one.
    assert_eq!(t.sender(Dir::ToServer).acked(), Some(Seq(run.1.sseq(900))));
    assert_eq!(t.sender(Dir::ToServer).window_raw(), 7);
}
