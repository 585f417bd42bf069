//! Runs the `tcp-replay` binary on captures written by hand: classic pcap in both
//! byte orders and resolutions, and pcapng with several interfaces, over every
//! supported link type.

use serde_json::{Value, json};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tcp_replay::segment::{SegmentBuilder, TcpFlags, TcpOptions, Timestamps};
use tcp_replay::seq::Seq;

const SYN: u8 = TcpFlags::SYN;
const ACK: u8 = TcpFlags::ACK;
const FIN: u8 = TcpFlags::FIN;
const PSH: u8 = TcpFlags::PSH;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tcp-replay-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir is writable");
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("temp file is writable");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().expect("test address parses")
}

/// One captured datagram: when, which way (true: client to server), the IPv4 bytes.
#[derive(Clone)]
struct Pkt {
    ts: Duration,
    to_server: bool,
    ip: Vec<u8>,
}

/// Builds the segments of one connection between `client` and `server`.
struct Conn {
    client: SocketAddrV4,
    server: SocketAddrV4,
    /// Timestamp option clocks (client, server), when negotiated.
    ts: Option<(u32, u32)>,
    start: Duration,
    pkts: Vec<Pkt>,
}

impl Conn {
    fn new(client: &str, server: &str) -> Conn {
        Conn {
            client: addr(client),
            server: addr(server),
            ts: Some((100, 5000)),
            start: Duration::new(1_700_000_000, 250_000_000),
            pkts: Vec::new(),
        }
    }

    fn seg(&mut self, to_server: bool, flags: u8, seq: u32, ack: u32, payload: &[u8], syn_opts: Option<TcpOptions>) {
        let (src, dst) = if to_server { (self.client, self.server) } else { (self.server, self.client) };
        let mut b = SegmentBuilder::new(src, dst);
        b.flags = flags;
        b.seq = Seq(seq);
        b.ack = Seq(ack);
        if let Some(o) = syn_opts {
            b.options = o;
        }
        if let Some((c, s)) = self.ts {
            let n = self.pkts.len() as u32;
            let (val, ecr) = if to_server { (c + n, s + n) } else { (s + n, c + n) };
            b.options.timestamps = Some(Timestamps { val, ecr: if flags == SYN { 0 } else { ecr } });
        }
        let ts = self.start + Duration::from_micros(1500 * self.pkts.len() as u64);
        self.pkts.push(Pkt { ts, to_server, ip: b.build(payload) });
    }

    fn c2s(&mut self, flags: u8, seq: u32, ack: u32, payload: &[u8]) {
        self.seg(true, flags, seq, ack, payload, None);
    }

    fn s2c(&mut self, flags: u8, seq: u32, ack: u32, payload: &[u8]) {
        self.seg(false, flags, seq, ack, payload, None);
    }

    fn handshake(&mut self, c: u32, s: u32) {
        let opts = |mss, ws| {
            let mut o = TcpOptions::default();
            o.mss = Some(mss);
            o.wscale = Some(ws);
            o.sack_permitted = true;
            o
        };
        self.seg(true, SYN, c, 0, b"", Some(opts(1460, 7)));
        self.seg(false, SYN | ACK, s, c.wrapping_add(1), b"", Some(opts(1400, 9)));
        self.c2s(ACK, c.wrapping_add(1), s.wrapping_add(1), b"");
    }
}

const REQUEST: &[u8] = b"GET /index.html HTTP/1.1\r\nHost: example\r\n\r\n";
const MORE: &[u8] = b"BYE\r\n";
const C_ISN: u32 = 0xffff_fff0; // both streams wrap 2^32 early on
const S_ISN: u32 = 0xffff_fffa;

/// Handshake, a request, a reply sent out of order ("world!" before "hello "), a
/// retransmission of "hello ", more client data, and a FIN from each side.
fn full_connection(client: &str, server: &str) -> Conn {
    let mut k = Conn::new(client, server);
    let c = |n: usize| C_ISN.wrapping_add(n as u32);
    let s = |n: usize| S_ISN.wrapping_add(n as u32);
    let l = REQUEST.len();
    k.handshake(C_ISN, S_ISN);
    k.c2s(PSH | ACK, c(1), s(1), REQUEST);
    k.s2c(ACK, s(1), c(1 + l), b"");
    k.s2c(PSH | ACK, s(7), c(1 + l), b"world!");
    k.s2c(ACK, s(1), c(1 + l), b"hello ");
    k.c2s(ACK, c(1 + l), s(13), b"");
    k.s2c(ACK, s(1), c(1 + l), b"hello ");
    k.c2s(ACK, c(1 + l), s(13), b"");
    k.c2s(PSH | ACK, c(1 + l), s(13), MORE);
    k.s2c(ACK, s(13), c(1 + l + 5), b"");
    k.c2s(FIN | ACK, c(1 + l + 5), s(13), b"");
    k.s2c(FIN | ACK, s(13), c(1 + l + 6), b"");
    k.c2s(ACK, c(1 + l + 6), s(14), b"");
    k
}

fn full_connection_conns_json(client: &str, server: &str) -> Value {
    json!({
        "id": 0,
        "client": client,
        "server": server,
        "state": "CLOSE",
        "handshake_seen": true,
        "client_isn": C_ISN,
        "server_isn": S_ISN,
        "client_options": {"mss": 1460, "wscale": 7, "sack_permitted": true, "timestamps": true},
        "server_options": {"mss": 1400, "wscale": 9, "sack_permitted": true, "timestamps": true},
        "c2s_bytes": REQUEST.len() + MORE.len(),
        "s2c_bytes": 12,
        "c2s_retransmitted_bytes": 0,
        "s2c_retransmitted_bytes": 6,
        "c2s_gap_bytes": 0,
        "s2c_gap_bytes": 0,
        "client_fin": true,
        "server_fin": true,
        "client_rst": false,
        "server_rst": false,
        "segments": 15,
        "refused_segments": 0,
    })
}

/// Link-layer framings.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    Ethernet,
    Vlan,
    QinQ,
    Raw101,
    Raw12,
    Raw14,
    Ipv4,
    Sll,
    Sll2,
    Null,
    Loop,
}

impl Link {
    const ALL: [Link; 11] = [
        Link::Ethernet,
        Link::Vlan,
        Link::QinQ,
        Link::Raw101,
        Link::Raw12,
        Link::Raw14,
        Link::Ipv4,
        Link::Sll,
        Link::Sll2,
        Link::Null,
        Link::Loop,
    ];

    fn linktype(self) -> u16 {
        match self {
            Link::Ethernet | Link::Vlan | Link::QinQ => 1,
            Link::Raw101 => 101,
            Link::Raw12 => 12,
            Link::Raw14 => 14,
            Link::Ipv4 => 228,
            Link::Sll => 113,
            Link::Sll2 => 276,
            Link::Null => 0,
            Link::Loop => 108,
        }
    }

    fn frame(self, ip: &[u8], to_server: bool) -> Vec<u8> {
        let mut f = Vec::new();
        let mac = |n: u8| [0x02, 0, 0, 0, 0, n];
        match self {
            Link::Ethernet | Link::Vlan | Link::QinQ => {
                let (a, b) = if to_server { (2, 1) } else { (1, 2) };
                f.extend_from_slice(&mac(a));
                f.extend_from_slice(&mac(b));
                if self == Link::QinQ {
                    f.extend_from_slice(&[0x88, 0xa8, 0x00, 0x64]);
                }
                if self != Link::Ethernet {
                    f.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
                }
                f.extend_from_slice(&[0x08, 0x00]);
            }
            Link::Raw101 | Link::Raw12 | Link::Raw14 | Link::Ipv4 => {}
            Link::Sll => {
                f.extend_from_slice(&[0, if to_server { 0 } else { 4 }, 0, 1, 0, 6]);
                f.extend_from_slice(&mac(1));
                f.extend_from_slice(&[0, 0, 0x08, 0x00]);
            }
            Link::Sll2 => {
                f.extend_from_slice(&[0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1, if to_server { 0 } else { 4 }, 6]);
                f.extend_from_slice(&mac(1));
                f.extend_from_slice(&[0, 0]);
            }
            Link::Null => f.extend_from_slice(&2u32.to_le_bytes()),
            Link::Loop => f.extend_from_slice(&2u32.to_be_bytes()),
        }
        f.extend_from_slice(ip);
        if matches!(self, Link::Ethernet | Link::Vlan | Link::QinQ) && f.len() < 60 {
            f.resize(60, 0); // minimum-frame padding, as on the wire
        }
        f
    }
}

/// Capture container formats.
#[derive(Debug, Clone, Copy)]
enum Format {
    Classic { big_endian: bool, nanos: bool },
    PcapNg,
}

const FORMATS: [Format; 3] = [
    Format::Classic { big_endian: false, nanos: false },
    Format::Classic { big_endian: true, nanos: true },
    Format::PcapNg,
];

/// Classic pcap: 24-byte header, then a 16-byte header per record.
fn classic(big_endian: bool, nanos: bool, linktype: u16, records: &[(Duration, Vec<u8>, u32)]) -> Vec<u8> {
    let w32 =
        |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&if big_endian { v.to_be_bytes() } else { v.to_le_bytes() });
    let w16 =
        |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&if big_endian { v.to_be_bytes() } else { v.to_le_bytes() });
    let mut f = Vec::new();
    w32(&mut f, if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 });
    w16(&mut f, 2);
    w16(&mut f, 4);
    w32(&mut f, 0);
    w32(&mut f, 0);
    w32(&mut f, 262_144);
    w32(&mut f, linktype as u32);
    for (ts, data, orig) in records {
        w32(&mut f, ts.as_secs() as u32);
        w32(&mut f, if nanos { ts.subsec_nanos() } else { ts.subsec_micros() });
        w32(&mut f, data.len() as u32);
        w32(&mut f, *orig);
        f.extend_from_slice(data);
    }
    f
}

fn ng_block(f: &mut Vec<u8>, kind: u32, body: &[u8]) {
    let pad = (4 - body.len() % 4) % 4;
    let len = (12 + body.len() + pad) as u32;
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(body);
    f.extend(std::iter::repeat_n(0u8, pad));
    f.extend_from_slice(&len.to_le_bytes());
}

/// pcapng (little-endian): a section header, one interface block per (link type,
/// if_tsresol) and an enhanced packet block per (interface, time, frame).
fn pcapng(interfaces: &[(u16, u8)], packets: &[(u32, Duration, Vec<u8>)]) -> Vec<u8> {
    let mut f = Vec::new();
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    ng_block(&mut f, 0x0a0d_0d0a, &shb);
    for (linktype, tsresol) in interfaces {
        let mut idb = Vec::new();
        idb.extend_from_slice(&linktype.to_le_bytes());
        idb.extend_from_slice(&[0, 0]);
        idb.extend_from_slice(&0u32.to_le_bytes());
        idb.extend_from_slice(&[9, 0, 1, 0, *tsresol, 0, 0, 0]); // if_tsresol
        idb.extend_from_slice(&[0, 0, 0, 0]); // opt_endofopt
        ng_block(&mut f, 1, &idb);
    }
    for (if_id, ts, data) in packets {
        let units = 10u128.pow(interfaces[*if_id as usize].1 as u32);
        let t = (ts.as_nanos() * units / 1_000_000_000) as u64;
        let mut epb = Vec::new();
        for v in [*if_id, (t >> 32) as u32, t as u32, data.len() as u32, data.len() as u32] {
            epb.extend_from_slice(&v.to_le_bytes());
        }
        epb.extend_from_slice(data);
        ng_block(&mut f, 6, &epb);
    }
    f
}

fn capture(format: Format, link: Link, pkts: &[Pkt]) -> Vec<u8> {
    match format {
        Format::Classic { big_endian, nanos } => {
            let records: Vec<_> = pkts
                .iter()
                .map(|p| {
                    let frame = link.frame(&p.ip, p.to_server);
                    let len = frame.len() as u32;
                    (p.ts, frame, len)
                })
                .collect();
            classic(big_endian, nanos, link.linktype(), &records)
        }
        Format::PcapNg => {
            let packets: Vec<_> = pkts.iter().map(|p| (0, p.ts, link.frame(&p.ip, p.to_server))).collect();
            pcapng(&[(link.linktype(), 6)], &packets)
        }
    }
}

fn tcp_replay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcp-replay")).args(args).output().expect("tcp-replay runs")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Runs `conns` and returns its JSON lines; the run must succeed.
fn conns(file: &Path, extra: &[&str]) -> (Vec<Value>, String) {
    let mut args = vec!["conns", path_str(file)];
    args.extend_from_slice(extra);
    let out = tcp_replay(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "conns failed: {stderr}");
    let lines = String::from_utf8(out.stdout)
        .expect("stdout is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    (lines, stderr)
}

/// Checks the timestamps of a `conns` object, then drops them for comparison.
fn without_times(mut v: Value, first: Duration, last: Duration) -> Value {
    let obj = v.as_object_mut().expect("conns lines are objects");
    let f = obj.remove("first_ts").and_then(|t| t.as_f64()).expect("first_ts");
    let l = obj.remove("last_ts").and_then(|t| t.as_f64()).expect("last_ts");
    assert!((f - first.as_secs_f64()).abs() < 1e-5, "first_ts {f} vs {first:?}");
    assert!((l - last.as_secs_f64()).abs() < 1e-5, "last_ts {l} vs {last:?}");
    v
}

fn streams(file: &Path, out: &Path) -> String {
    let o = tcp_replay(&["streams", path_str(file), "--out", path_str(out)]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "streams failed: {stderr}");
    stderr
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Asserts a failed run: exit status 2, nothing on stdout, one line on stderr
/// containing `needle`.
fn assert_bad_input(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "expected {needle:?}; stderr: {stderr}; stdout: {stdout}");
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
    assert!(stderr.contains(needle), "stderr {stderr:?} lacks {needle:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn full_connection_gives_conns_json_and_streams_for_every_link_type_and_format() {
    let dir = TempDir::new("full");
    let (client, server) = ("192.168.1.20:51000", "192.168.1.1:80");
    let k = full_connection(client, server);
    let first = k.pkts[0].ts;
    let last = k.pkts[k.pkts.len() - 1].ts;
    let mut reply = b"hello ".to_vec();
    reply.extend_from_slice(b"world!");
    let mut request = REQUEST.to_vec();
    request.extend_from_slice(MORE);
    for (i, link) in Link::ALL.iter().enumerate() {
        for format in FORMATS {
            let name = format!("{link:?}-{i}-{format:?}.cap").replace([' ', '{', '}', ':', ','], "");
            let file = dir.write(&name, &capture(format, *link, &k.pkts));
            let (lines, stderr) = conns(&file, &[]);
            assert_eq!(lines.len(), 1, "{link:?} {format:?}: {lines:?}");
            assert_eq!(
                without_times(lines[0].clone(), first, last),
                full_connection_conns_json(client, server),
                "{link:?} {format:?}"
            );
            assert!(stderr.is_empty(), "{link:?} {format:?}: {stderr}");
            let out = dir.path(&format!("{name}.out"));
            streams(&file, &out);
            let base = "192.168.1.20_51000-192.168.1.1_80";
            assert_eq!(read(out.join(format!("{base}.c2s"))), request, "{link:?} {format:?}");
            assert_eq!(read(out.join(format!("{base}.s2c"))), reply, "{link:?} {format:?}");
            assert_eq!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0), 2);
        }
    }
}

#[test]
fn pcapng_with_an_interface_per_direction_and_foreign_frames() {
    let dir = TempDir::new("ng-multi");
    let (client, server) = ("10.1.0.2:40000", "10.1.0.1:8080");
    let k = full_connection(client, server);
    let arp = {
        let mut f = vec![0xff; 12];
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0; 46]);
        f
    };
    let mut packets = vec![(0, k.start, arp)];
    for p in &k.pkts {
        // Client segments on an Ethernet interface (microseconds), server segments
        // on a Linux cooked v2 interface (nanoseconds).
        let (iface, link) = if p.to_server { (0, Link::Ethernet) } else { (1, Link::Sll2) };
        packets.push((iface, p.ts, link.frame(&p.ip, p.to_server)));
    }
    let mut v6 = Link::Sll2.frame(&[0x60, 0, 0, 0], false);
    v6[..2].copy_from_slice(&[0x86, 0xdd]);
    packets.push((1, k.start, v6));
    let file = dir.write("multi.pcapng", &pcapng(&[(1, 6), (276, 9)], &packets));
    let (lines, stderr) = conns(&file, &[]);
    assert_eq!(lines.len(), 1);
    let last = k.pkts[k.pkts.len() - 1].ts;
    assert_eq!(without_times(lines[0].clone(), k.pkts[0].ts, last), full_connection_conns_json(client, server));
    assert!(stderr.contains("2 of 17 frames were not IPv4"), "{stderr}");
}

/// A connection already running when the capture started: the server (port 443)
/// speaks first.
fn mid_stream() -> Conn {
    let mut k = Conn::new("10.0.0.7:33000", "10.0.0.9:443");
    k.ts = None;
    k.s2c(PSH | ACK, 7000, 900, b"server first ");
    k.c2s(ACK, 900, 7013, b"");
    k.c2s(PSH | ACK, 900, 7013, b"client data");
    k.s2c(ACK, 7013, 911, b"");
    k
}

#[test]
fn mid_stream_connection_is_flagged_and_its_client_is_the_higher_port() {
    let dir = TempDir::new("mid");
    let k = mid_stream();
    let file = dir.write("mid.pcap", &capture(FORMATS[0], Link::Ethernet, &k.pkts));
    let (lines, _) = conns(&file, &[]);
    assert_eq!(lines.len(), 1);
    let c = &lines[0];
    assert_eq!(c["client"], "10.0.0.7:33000");
    assert_eq!(c["server"], "10.0.0.9:443");
    assert_eq!(c["handshake_seen"], false);
    assert_eq!(c["state"], "ESTABLISHED");
    assert_eq!(c["client_isn"], Value::Null);
    assert_eq!(c["c2s_bytes"], 11);
    assert_eq!(c["s2c_bytes"], 13);
    let out = dir.path("out");
    streams(&file, &out);
    assert_eq!(read(out.join("10.0.0.7_33000-10.0.0.9_443.c2s")), b"client data");
    assert_eq!(read(out.join("10.0.0.7_33000-10.0.0.9_443.s2c")), b"server first ");
    // No plan for it: the options were never seen.
    let o = tcp_replay(&["plan", path_str(&file), "--now", "1700000001"]);
    assert_bad_input(&o, "mid-stream");
}

#[test]
fn a_bad_checksum_segment_changes_nothing() {
    let dir = TempDir::new("checksum");
    let (client, server) = ("192.168.1.20:51000", "192.168.1.1:80");
    let k = full_connection(client, server);
    let mut pkts = k.pkts.clone();
    // A corrupted copy of the request, seen before the real one: its payload
    // differs, so if it were taken the streams would show it.
    let mut bad = pkts[3].clone();
    let n = bad.ip.len();
    bad.ip[n - 3..].copy_from_slice(b"XXX");
    pkts.insert(3, bad);
    let clean = dir.write("clean.pcap", &capture(FORMATS[0], Link::Ethernet, &k.pkts));
    let dirty = dir.write("dirty.pcap", &capture(FORMATS[0], Link::Ethernet, &pkts));
    let (a, _) = conns(&clean, &[]);
    let (b, stderr) = conns(&dirty, &[]);
    assert_eq!(a, b);
    assert!(stderr.contains("bad TCP checksum: 1"), "{stderr}");
    assert!(!stderr.contains("--no-verify-checksums"), "one bad segment is no offload: {stderr}");
    let (out_a, out_b) = (dir.path("a"), dir.path("b"));
    streams(&clean, &out_a);
    streams(&dirty, &out_b);
    for ext in ["c2s", "s2c"] {
        let f = format!("192.168.1.20_51000-192.168.1.1_80.{ext}");
        assert_eq!(read(out_a.join(&f)), read(out_b.join(&f)));
    }
}

#[test]
fn offloaded_checksums_suggest_the_flag_which_then_accepts_them() {
    let dir = TempDir::new("offload");
    let mut pkts = full_connection("10.0.0.1:40000", "10.0.0.2:80").pkts;
    // The capturing host was the server: its segments carry unfinished checksums.
    for p in pkts.iter_mut().filter(|p| !p.to_server) {
        p.ip[36..38].copy_from_slice(&[0, 0]);
    }
    let file = dir.write("offload.pcap", &capture(FORMATS[1], Link::Raw101, &pkts));
    let (lines, stderr) = conns(&file, &[]);
    assert!(stderr.contains("--no-verify-checksums"), "{stderr}");
    assert_eq!(lines[0]["s2c_bytes"], 0);
    let (lines, stderr) = conns(&file, &["--no-verify-checksums"]);
    assert_eq!(lines[0]["s2c_bytes"], 12);
    assert_eq!(lines[0]["state"], "CLOSE");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn reused_four_tuple_gets_a_second_connection_and_a_numbered_file() {
    let dir = TempDir::new("reuse");
    let (client, server) = ("10.0.0.1:40000", "10.0.0.2:80");
    let first = full_connection(client, server);
    let mut second = Conn::new(client, server);
    second.start = first.pkts[first.pkts.len() - 1].ts + Duration::from_secs(1);
    second.handshake(1_000_000, 2_000_000);
    second.c2s(PSH | ACK, 1_000_001, 2_000_001, b"again");
    second.s2c(ACK, 2_000_001, 1_000_006, b"");
    let mut pkts = first.pkts.clone();
    pkts.extend(second.pkts.clone());
    let file = dir.write("reuse.pcapng", &capture(Format::PcapNg, Link::Sll, &pkts));
    let (lines, _) = conns(&file, &[]);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["state"], "CLOSE");
    assert_eq!(lines[1]["id"], 1);
    assert_eq!(lines[1]["state"], "ESTABLISHED");
    assert_eq!(lines[1]["client_isn"], 1_000_000);
    let out = dir.path("out");
    streams(&file, &out);
    let base = "10.0.0.1_40000-10.0.0.2_80";
    assert_eq!(read(out.join(format!("{base}.c2s"))).len(), REQUEST.len() + MORE.len());
    assert_eq!(read(out.join(format!("{base}.2.c2s"))), b"again");
    assert_eq!(read(out.join(format!("{base}.2.s2c"))), b"");
}

#[test]
fn bytes_never_captured_are_left_out_of_streams_and_reported() {
    let dir = TempDir::new("gap");
    let mut k = Conn::new("10.0.0.1:40000", "10.0.0.2:80");
    k.handshake(500, 9000);
    k.c2s(PSH | ACK, 501, 9001, b"ab");
    // "cde" (501+2..501+5) was lost by the capture; the server acknowledges it.
    k.c2s(PSH | ACK, 506, 9001, b"fg");
    k.s2c(ACK, 9001, 508, b"");
    // Held beyond a hole that never fills: "xyz" after 3 bytes never seen.
    k.c2s(PSH | ACK, 511, 9001, b"xyz");
    let file = dir.write("gap.pcap", &capture(FORMATS[0], Link::Raw101, &k.pkts));
    let out = dir.path("out");
    let stderr = streams(&file, &out);
    assert_eq!(read(out.join("10.0.0.1_40000-10.0.0.2_80.c2s")), b"abfgxyz");
    assert!(stderr.contains(".c2s: bytes 2..5 (3 bytes) were never captured"), "{stderr}");
    assert!(stderr.contains(".c2s: bytes 7..10 (3 bytes) were never captured"), "{stderr}");
    let (lines, _) = conns(&file, &[]);
    assert_eq!(lines[0]["c2s_gap_bytes"], 6);
    assert_eq!(lines[0]["c2s_bytes"], 7);
}

#[test]
fn snapped_segments_are_counted_not_fatal() {
    let dir = TempDir::new("snap");
    let k = full_connection("10.0.0.1:40000", "10.0.0.2:80");
    let records: Vec<_> = k
        .pkts
        .iter()
        .map(|p| {
            let f = Link::Ethernet.frame(&p.ip, p.to_server);
            let orig = f.len() as u32;
            (p.ts, f[..f.len().min(100)].to_vec(), orig) // snaplen 100 cuts only the request
        })
        .collect();
    let file = dir.write("snap.pcap", &classic(false, false, 1, &records));
    let (lines, stderr) = conns(&file, &[]);
    assert_eq!(lines.len(), 1);
    // The server acknowledged the request the capture cut: a gap, the rest intact.
    assert_eq!(lines[0]["c2s_gap_bytes"], REQUEST.len());
    assert_eq!(lines[0]["c2s_bytes"], MORE.len());
    assert_eq!(lines[0]["s2c_bytes"], 12);
    assert!(stderr.contains("truncated: 1"), "{stderr}");
    assert!(stderr.contains("snap length"), "{stderr}");
}

/// An established connection: the request acknowledged by the server, the reply
/// sent and only partly acknowledged by the client.
fn established() -> Conn {
    let mut k = Conn::new("10.0.0.1:40000", "10.0.0.2:80");
    k.handshake(C_ISN, S_ISN);
    let c = |n: usize| C_ISN.wrapping_add(n as u32);
    let s = |n: usize| S_ISN.wrapping_add(n as u32);
    let l = REQUEST.len();
    k.c2s(PSH | ACK, c(1), s(1), REQUEST);
    k.s2c(PSH | ACK, s(1), c(1 + l), b"HTTP/1.1 200 OK\r\n");
    k.c2s(ACK, c(1 + l), s(10), b"");
    k
}

#[test]
fn plan_prints_the_restore_plan_and_honours_consumed_and_now() {
    let dir = TempDir::new("plan");
    let k = established();
    let file = dir.write("plan.pcapng", &capture(Format::PcapNg, Link::Ethernet, &k.pkts));
    let last = k.pkts[k.pkts.len() - 1].ts;
    let s2c_last = k.pkts[k.pkts.len() - 2].ts;
    let now = format!("{}", (last + Duration::from_secs(2)).as_secs_f64());
    let run = |extra: &[&str]| {
        let mut args = vec!["plan", path_str(&file), "--now", &now];
        args.extend_from_slice(extra);
        let o = tcp_replay(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout).expect("plan is JSON")
    };
    let p = run(&[]);
    assert_eq!(p["local"], "10.0.0.2:80");
    assert_eq!(p["remote"], "10.0.0.1:40000");
    assert_eq!(p["state"], "ESTABLISHED");
    assert_eq!(p["snd_una"], S_ISN.wrapping_add(10));
    assert_eq!(p["send_queue"], hex::encode(&b"HTTP/1.1 200 OK\r\n"[9..]));
    assert_eq!(p["rcv_nxt"], C_ISN.wrapping_add(1 + REQUEST.len() as u32));
    assert_eq!(p["recv_queue"], "");
    assert_eq!(p["options"], json!({"mss": 1460, "wscale": [7, 9], "sack": true, "timestamps": true}));
    // The server's clock (5000 + segment index 4) advanced by the time since it was seen.
    let elapsed_ms = ((last + Duration::from_secs(2)).as_millis() - s2c_last.as_millis()) as u64;
    let tsval = p["tsval"].as_u64().expect("tsval");
    assert!(tsval.abs_diff(5004 + elapsed_ms) <= 1, "tsval {tsval}, expected about {}", 5004 + elapsed_ms);
    let p = run(&["--consumed", "4", "--client", "10.0.0.1:40000"]);
    assert_eq!(p["recv_queue"], hex::encode(&REQUEST[4..]));
    // Without --now the wall clock is used: still a plan.
    let o = tcp_replay(&["plan", path_str(&file)]);
    assert!(o.status.success());
}

#[test]
fn plan_refuses_unknown_or_ambiguous_connections_and_clamps_consumed_to_the_ack() {
    let dir = TempDir::new("plan-bad");
    let mut pkts = established().pkts;
    let mut other = full_connection("10.0.0.3:40001", "10.0.0.2:80");
    other.start = pkts[0].ts;
    pkts.extend(other.pkts);
    let file = dir.write("two.pcap", &capture(FORMATS[2], Link::Null, &pkts));
    let f = path_str(&file);
    assert_bad_input(&tcp_replay(&["plan", f, "--now", "1700000001"]), "choose one with --client");
    assert_bad_input(&tcp_replay(&["plan", f, "--client", "10.9.9.9:1", "--now", "1"]), "no connection from client");
    assert_bad_input(&tcp_replay(&["plan", f, "--client", "10.0.0.3:40001"]), "nothing to restore");
    // Reading beyond the server's last ACK is legitimate after a cut: a plan with a
    // warning that the client will retransmit those bytes.
    let o = tcp_replay(&["plan", f, "--client", "10.0.0.1:40000", "--consumed", "1000", "--now", "1700000001"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("beyond the server's last ACK"));
    assert_eq!(serde_json::from_slice::<Value>(&o.stdout).expect("plan is JSON")["recv_queue"], "");
    assert_bad_input(&tcp_replay(&["plan", f, "--now", "yesterday"]), "not a number");
    assert_bad_input(&tcp_replay(&["plan", f, "--client", "nonsense"]), "--client");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let dir = TempDir::new("bad");
    let k = full_connection("10.0.0.1:40000", "10.0.0.2:80");
    let text = dir.write("notes.txt", b"this is not a capture\n");
    let empty = dir.write("empty.pcap", b"");
    let good = capture(FORMATS[0], Link::Ethernet, &k.pkts);
    let truncated = dir.write("truncated.pcap", &good[..good.len() - 7]);
    let short_header = dir.write("short.pcap", &good[..10]);
    let good_ng = capture(Format::PcapNg, Link::Ethernet, &k.pkts);
    let truncated_ng = dir.write("truncated.pcapng", &good_ng[..good_ng.len() - 30]);
    let wifi = dir.write("wifi.pcap", &classic(false, false, 105, &[]));
    let wifi_ng = dir.write("wifi.pcapng", &pcapng(&[(105, 6)], &[(0, Duration::from_secs(1), vec![0; 40])]));
    for cmd in [&["conns"][..], &["streams", "--out", path_str(&dir.path("o"))][..], &["plan"][..]] {
        let run = |file: &Path| {
            let mut args = vec![cmd[0], path_str(file)];
            args.extend_from_slice(&cmd[1..]);
            tcp_replay(&args)
        };
        assert_bad_input(&run(&text), "not a pcap or pcapng capture");
        assert_bad_input(&run(&empty), "not a pcap or pcapng capture");
        assert_bad_input(&run(&truncated), "truncated at byte offset");
        assert_bad_input(&run(&short_header), "truncated at byte offset 0");
        assert_bad_input(&run(&truncated_ng), "truncated");
        assert_bad_input(&run(&wifi), "unsupported link type 105");
        assert_bad_input(&run(&wifi_ng), "unsupported link type 105");
        assert_bad_input(&run(&dir.path("missing.pcap")), "cannot open");
    }
    assert_bad_input(&tcp_replay(&["conns", path_str(&text), "--bogus"]), "--bogus");
    assert_bad_input(&tcp_replay(&["frobnicate"]), "frobnicate");
    assert_bad_input(&tcp_replay(&[]), "command is required");
    assert_bad_input(&tcp_replay(&["streams", path_str(&text)]), "--out");
}

#[test]
fn help_explains_the_commands_and_the_checksum_flag() {
    let o = tcp_replay(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for word in ["conns", "streams", "plan", "--no-verify-checksums", "checksum offload", "pcapng"] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
    let o = tcp_replay(&["streams", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains(".c2s") && help.contains("numeric suffix"), "{help}");
}

#[test]
fn corrupted_captures_exit_0_or_2_and_never_panic() {
    let dir = TempDir::new("corrupt");
    let k = full_connection("10.0.0.1:40000", "10.0.0.2:80");
    let originals: Vec<Vec<u8>> = FORMATS.iter().map(|f| capture(*f, Link::Vlan, &k.pkts)).collect();
    // A fixed linear congruential generator: the same corruptions on every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % n
    };
    for i in 0..90 {
        let mut bytes = originals[i % originals.len()].clone();
        for _ in 0..1 + next(6) {
            let at = next(bytes.len());
            bytes[at] = next(256) as u8;
        }
        if next(4) == 0 {
            bytes.truncate(next(bytes.len()));
        }
        let file = dir.write("c.cap", &bytes);
        let cmd: &[&str] = match i % 3 {
            0 => &["conns"],
            1 => &["streams", "--out"],
            _ => &["plan", "--now", "1700000000"],
        };
        let out_dir = dir.path("out");
        let mut args = vec![cmd[0], path_str(&file)];
        args.extend_from_slice(&cmd[1..]);
        if cmd[0] == "streams" {
            args.push(path_str(&out_dir));
        }
        let o = tcp_replay(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(matches!(o.status.code(), Some(0 | 2)), "run {i}: {:?} {stderr}", o.status);
        assert!(!stderr.contains("panicked"), "run {i}: {stderr}");
        if o.status.code() == Some(2) {
            assert_eq!(stderr.lines().count(), 1, "run {i}: {stderr}");
        }
    }
}
