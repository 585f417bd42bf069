//! Benchmarks and measurement tools for understudy. The criterion benchmarks live in `benches/`.
//!
//! This library holds what several benchmarks build their input from: HTTP/1.1 messages
//! ([`http`]) and replication streams as the primary writes them ([`stream`]): real IPv4/TCP
//! datagrams from `SegmentBuilder`, reply-log and exchange records, in the order the primary
//! produces them (the same shape as `shared/tests/replica.rs`).

pub mod http {
    //! HTTP/1.1 messages with a `Content-Length` or a chunked body (RFC 9112 §6, §7.1).

    /// How a message's body is delimited.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Framing {
        /// `Content-Length`.
        Length,
        /// `Transfer-Encoding: chunked`, in chunks of at most this many bytes (and a
        /// trailer-less last chunk).
        Chunked(usize),
    }

    /// Appends the body `body` framed by `framing` (after a head ending in CRLF CRLF).
    fn body_into(out: &mut Vec<u8>, framing: Framing, body: &[u8]) {
        match framing {
            Framing::Length => out.extend_from_slice(body),
            Framing::Chunked(size) => {
                for chunk in body.chunks(size.max(1)) {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
    }

    fn length_field(framing: Framing, len: usize) -> String {
        match framing {
            Framing::Length => format!("Content-Length: {len}\r\n"),
            Framing::Chunked(_) => "Transfer-Encoding: chunked\r\n".into(),
        }
    }

    /// A request with the header fields a browser or `curl` typically sends. A `GET` with an
    /// empty body and `Framing::Length` carries no length field at all.
    pub fn request(method: &str, target: &str, framing: Framing, body: &[u8]) -> Vec<u8> {
        let length = if method == "GET" && body.is_empty() && framing == Framing::Length {
            String::new()
        } else {
            length_field(framing, body.len())
        };
        let mut out = format!(
            "{method} {target} HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: curl/8.5.0\r\n\
             Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n{length}\r\n"
        )
        .into_bytes();
        body_into(&mut out, framing, body);
        out
    }

    /// A `200 OK` with the header fields an origin behind the proxy typically sends.
    pub fn response(framing: Framing, body: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\nServer: origin\r\n\
             Content-Type: application/octet-stream\r\nETag: \"5f3a-1c2b\"\r\n\
             Last-Modified: Sat, 21 Nov 2026 09:00:00 GMT\r\n{}\r\n",
            length_field(framing, body.len())
        )
        .into_bytes();
        body_into(&mut out, framing, body);
        out
    }

    /// `len` bytes of a repeating, non-constant pattern.
    pub fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }
}

pub mod stream {
    //! The primary's replication stream for scripted client connections.

    use shared::protocol::{ConnKey, ExchangeStart, Message, Record};
    use std::net::{Ipv4Addr, SocketAddrV4};
    use tcp_replay::segment::{SegmentBuilder, Timestamps};
    use tcp_replay::{Dir, Seq, TcpFlags, TcpOptions};

    /// Largest client segment payload (Ethernet MTU, IPv4, TCP with timestamps would be 1448;
    /// 1460 is the figure without options that the benchmarks are quoted in).
    pub const MSS: usize = 1460;
    /// The VIP:port every scripted connection reaches.
    pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);

    /// Numbers messages into records of one epoch, from seq 1.
    pub fn number(msgs: impl IntoIterator<Item = Message>) -> Vec<Record> {
        msgs.into_iter().zip(1..).map(|(msg, seq)| Record { seq, epoch: 1, msg }).collect()
    }

    /// Interleaves per-connection message lists one message at a time, round robin, as many
    /// concurrent connections reach the primary.
    pub fn interleave(conns: Vec<Vec<Message>>) -> Vec<Message> {
        let total = conns.iter().map(Vec::len).sum();
        let mut iters: Vec<_> = conns.into_iter().map(Vec::into_iter).collect();
        let mut out = Vec::with_capacity(total);
        while out.len() < total {
            for it in &mut iters {
                out.extend(it.next());
            }
        }
        out
    }

    /// One client connection scripted from both ends as the primary sees it: client
    /// segments (with timestamps, window scale 7 and SACK, as Linux sends them), the
    /// primary's SYN-ACK and FIN, the reply log and the exchange records.
    pub struct Client {
        pub key: ConnKey,
        cisn: u32,
        sisn: u32,
        /// Client bytes sent, server bytes logged, server bytes the client acknowledged.
        sent: u64,
        logged: u64,
        acked: u64,
        now_us: u64,
        exchanges: u64,
        /// The messages so far.
        pub msgs: Vec<Message>,
    }

    impl Client {
        /// Connection number `n` (distinct client address and port, ISNs spread over the
        /// sequence space so that some wrap).
        pub fn new(n: u32) -> Client {
            let client =
                SocketAddrV4::new(Ipv4Addr::new(10, 1, (n >> 16) as u8, (n >> 8) as u8), (10_000 + n % 50_000) as u16);
            Client {
                key: ConnKey { client, server: VIP },
                cisn: n.wrapping_mul(0x9E37_79B9),
                sisn: n.wrapping_mul(0x85EB_CA6B) ^ 0x5555_5555,
                sent: 0,
                logged: 0,
                acked: 0,
                now_us: 1_000_000 + n as u64,
                exchanges: 0,
                msgs: Vec::new(),
            }
        }

        fn seg(&mut self, dir: Dir, flags: u8, seq: u32, ack: u32, opts: TcpOptions, payload: &[u8]) {
            self.now_us += 150;
            let (src, dst) = match dir {
                Dir::ToServer => (self.key.client, self.key.server),
                Dir::ToClient => (self.key.server, self.key.client),
            };
            let mut b = SegmentBuilder::new(src, dst);
            b.flags = flags;
            b.seq = Seq(seq);
            b.ack = Seq(ack);
            b.window = if flags & TcpFlags::SYN != 0 { 64240 } else { 502 };
            b.options = opts;
            let base = if dir == Dir::ToServer { 7_000_000 } else { 3_000 };
            b.options.timestamps = Some(Timestamps { val: base + (self.now_us / 1000) as u32, ecr: 0 });
            self.msgs.push(Message::Segment { at_us: self.now_us, dir, datagram: b.build(payload) });
        }

        fn cseq(&self, off: u64) -> u32 {
            self.cisn.wrapping_add(1).wrapping_add(off as u32)
        }

        fn sseq(&self, off: u64) -> u32 {
            self.sisn.wrapping_add(1).wrapping_add(off as u32)
        }

        /// SYN (MSS 1460, window scale 7, SACK), the primary's SYN-ACK (scale 9), the ACK.
        pub fn open(&mut self) -> &mut Self {
            let mut o = TcpOptions::default();
            o.mss = Some(MSS as u16);
            o.wscale = Some(7);
            o.sack_permitted = true;
            self.seg(Dir::ToServer, TcpFlags::SYN, self.cisn, 0, o, b"");
            o.wscale = Some(9);
            self.seg(Dir::ToClient, TcpFlags::SYN | TcpFlags::ACK, self.sisn, self.cisn.wrapping_add(1), o, b"");
            self.seg(Dir::ToServer, TcpFlags::ACK, self.cseq(0), self.sseq(0), TcpOptions::default(), b"");
            self
        }

        /// Client bytes, in segments of at most [`MSS`] bytes.
        pub fn send(&mut self, bytes: &[u8]) -> &mut Self {
            for piece in bytes.chunks(MSS) {
                let (seq, ack) = (self.cseq(self.sent), self.sseq(self.acked));
                self.seg(Dir::ToServer, TcpFlags::ACK | TcpFlags::PSH, seq, ack, TcpOptions::default(), piece);
                self.sent += piece.len() as u64;
            }
            self
        }

        /// Reply bytes in the primary's reply log, one record.
        pub fn reply(&mut self, bytes: &[u8]) -> &mut Self {
            self.msgs.push(Message::Reply { conn: self.key, offset: self.logged, bytes: bytes.to_vec() });
            self.logged += bytes.len() as u64;
            self
        }

        /// The client acknowledges every reply byte logged so far (the backup trims them).
        pub fn ack_all(&mut self) -> &mut Self {
            self.acked = self.logged;
            let (seq, ack) = (self.cseq(self.sent), self.sseq(self.acked));
            self.seg(Dir::ToServer, TcpFlags::ACK, seq, ack, TcpOptions::default(), b"");
            self
        }

        /// One exchange as the primary logs it when proxying: the request in client
        /// segments, the exchange start, then the response in `piece`-byte appends, each
        /// logged from the upstream, then in the reply log, then acknowledged by the
        /// client; the exchange ends before the client acknowledges the last append.
        pub fn exchange(&mut self, method: &str, request: &[u8], response: &[u8], piece: usize) -> &mut Self {
            let exchange = self.exchanges;
            self.exchanges += 1;
            let request_offset = self.sent;
            self.send(request);
            self.msgs.push(Message::ExchangeStart(ExchangeStart {
                conn: self.key,
                exchange,
                request_offset,
                method: method.into(),
                target: "/".into(),
                idempotency_key: None,
                key_generated: false,
                upstream: Some("http://10.2.0.10:8080".into()),
            }));
            let mut offset = 0;
            let pieces = response.chunks(piece.max(1));
            let last = pieces.len() - 1;
            for (i, p) in pieces.enumerate() {
                self.msgs.push(Message::Upstream { conn: self.key, exchange, offset, bytes: p.to_vec() });
                offset += p.len() as u64;
                self.reply(p);
                if i == last {
                    // Handed to the socket in full before the client acknowledges it all.
                    self.msgs.push(Message::ExchangeEnd { conn: self.key, exchange, status: 200 });
                }
                self.ack_all();
            }
            self
        }

        /// The client's FIN, the primary's FIN, the client's last ACK, and the primary's
        /// report that the connection is gone.
        pub fn close(&mut self) -> &mut Self {
            let fa = TcpFlags::FIN | TcpFlags::ACK;
            self.seg(Dir::ToServer, fa, self.cseq(self.sent), self.sseq(self.logged), TcpOptions::default(), b"");
            let (seq, ack) = (self.sseq(self.logged), self.cseq(self.sent + 1));
            self.seg(Dir::ToClient, fa, seq, ack, TcpOptions::default(), b"");
            let (seq, ack) = (self.cseq(self.sent + 1), self.sseq(self.logged + 1));
            self.seg(Dir::ToServer, TcpFlags::ACK, seq, ack, TcpOptions::default(), b"");
            self.msgs.push(Message::ConnClosed { conn: self.key });
            self
        }

        /// The messages, leaving the script empty.
        pub fn take(&mut self) -> Vec<Message> {
            std::mem::take(&mut self.msgs)
        }
    }
}
