//! `tcp-replay`: inspect the TCP connections of a packet capture the way the
//! understudy tracker sees them.
//!
//! Exit status: 0 on success, 2 for bad input (not a capture, truncated or corrupt
//! capture, unsupported link type, unknown connection, wrong flags, a connection
//! that cannot be planned), 1 when writing the output fails.

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::net::SocketAddrV4;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tcp_replay::flows::{ConnId, Connection, Flows, Piece};
use tcp_replay::pcap::{CaptureReader, CaptureStats};
use tcp_replay::tracker::{Endpoint, PlanError};
use tcp_replay::{Checksums, Dir, TcpState, Validation};

const ABOUT: &str = "Follow the TCP connections of a packet capture as the understudy tracker does";

const LONG_ABOUT: &str = "\
Follow the TCP connections of a packet capture as the understudy tracker does.

Reads classic pcap (either byte order, micro- or nanosecond timestamps) and pcapng
(several interfaces, each with its own link type and clock). Link types: Ethernet
(with 802.1Q/802.1ad VLAN tags), raw IP (101, 12, 14, 228), Linux cooked v1 (113)
and v2 (276), BSD loopback (0, 108). Only IPv4/TCP is followed; other frames are
counted and skipped. FILE may be '-' for standard input.

A connection's client is the side that sent the SYN; for a connection whose
handshake is not in the capture, the side with the higher port (then the higher
address). A new SYN on the addresses of a connection that is closed or reset starts
a new connection.

Segments with a wrong checksum are ignored, as the receiving kernel would drop
them. Captures taken on a sending host with checksum offload carry unfinished
checksums on outgoing segments: use --no-verify-checksums for those.

Exit status: 0 on success; 2 for bad input (not a capture, truncated or corrupt
file, unsupported link type, unknown connection, wrong flags, a connection that
cannot be planned), with a one-line error on stderr; 1 if writing output fails.";

#[derive(Parser, Debug)]
#[command(name = "tcp-replay", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// Accept segments whose IPv4 or TCP checksum is wrong (captures taken on a
    /// host with checksum offload).
    #[arg(long, global = true)]
    no_verify_checksums: bool,

    /// Refuse segments the receiving kernel would drop as out of window, judged by
    /// the windows seen. Off by default: a capture that missed a window update
    /// (tcpdump drops) would make later segments look out of window. Either way,
    /// what the server acknowledged decides what it received.
    #[arg(long, global = true)]
    strict_windows: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print one JSON object per connection, in order of first appearance.
    ///
    /// Fields: id, client, server, state (the server socket's Linux state, e.g.
    /// ESTABLISHED), handshake_seen (false: first seen mid-stream, options unknown),
    /// client_isn/server_isn, client_options/server_options (mss, wscale,
    /// sack_permitted, timestamps as offered in each side's SYN), c2s_bytes/s2c_bytes
    /// (unique payload bytes), c2s_retransmitted_bytes/s2c_retransmitted_bytes,
    /// c2s_gap_bytes/s2c_gap_bytes (bytes sent but never captured), first_ts/last_ts
    /// (UNIX seconds), segments and refused_segments (segments the tracker rejected).
    Conns {
        /// Capture file (pcap or pcapng), or '-' for standard input.
        file: PathBuf,
    },
    /// Write each connection's reassembled bytes, one file per direction.
    ///
    /// Files are DIR/<client-ip>_<client-port>-<server-ip>_<server-port>.c2s (client
    /// to server) and .s2c (server to client). When a 4-tuple is reused, the n-th
    /// later connection on it gets a numeric suffix: <name>.2.c2s, <name>.3.c2s, ...
    /// Every byte seen on the wire appears exactly once, in stream order (like
    /// Wireshark's Follow TCP Stream). Bytes never captured are left out, not
    /// zero-filled; each such gap is reported on stderr with its stream offsets.
    Streams {
        /// Capture file (pcap or pcapng), or '-' for standard input.
        file: PathBuf,
        /// Output directory (created if missing; existing files are overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print the restore plan (JSON) of one connection: what TCP_REPAIR needs to
    /// rebuild its server end.
    ///
    /// The connection is the only one in the capture, or the latest one whose client
    /// is --client. The client stream is trimmed to --consumed bytes first.
    Plan {
        /// Capture file (pcap or pcapng), or '-' for standard input.
        file: PathBuf,
        /// The client address (IP:PORT) of the connection to plan.
        #[arg(long, value_name = "IP:PORT")]
        client: Option<SocketAddrV4>,
        /// Client bytes the server application had already read, counted from the
        /// first byte after the SYN. The rest of what the server acknowledged goes
        /// into the receive queue. Default: everything acknowledged was read (an
        /// empty receive queue). A count beyond the server's last ACK is allowed (the
        /// application read bytes whose ACK never left): the client retransmits those.
        #[arg(long, value_name = "N")]
        consumed: Option<u64>,
        /// The time of the restore, in UNIX seconds (fractions allowed); the server's
        /// timestamp clock is extrapolated to it. Default: now.
        #[arg(long, value_name = "UNIX_SECONDS", value_parser = parse_unix_seconds)]
        now: Option<Duration>,
    },
}

fn parse_unix_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(v).map_err(|_| format!("'{s}' is not a non-negative number of seconds"))
}

/// Input the user must fix: exit status 2.
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn bad(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg.into()))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    return ExitCode::SUCCESS;
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
                    eprintln!(
                        "tcp-replay: error: a command is required (conns, streams or plan); see 'tcp-replay --help'"
                    );
                }
                _ => {
                    // clap's message runs until the first blank line (usage follows).
                    let text = e.render().to_string();
                    let msg: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
                    let msg = msg.join(" ");
                    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
                    eprintln!("tcp-replay: error: {msg}; see 'tcp-replay --help'");
                }
            }
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let input =
                e.downcast_ref::<BadInput>().is_some() || e.downcast_ref::<tcp_replay::pcap::CaptureError>().is_some();
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("tcp-replay: error: {msg}");
            ExitCode::from(if input { 2 } else { 1 })
        }
    }
}

/// How captured datagrams are checked.
#[derive(Debug, Clone, Copy)]
struct Reading {
    checksums: Checksums,
    validation: Validation,
}

impl Reading {
    fn flows(self) -> Flows {
        let mut flows = Flows::new(self.checksums);
        flows.set_validation(self.validation);
        flows
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let checksums = if cli.no_verify_checksums { Checksums::Skip } else { Checksums::Verify };
    let validation = if cli.strict_windows { Validation::Kernel } else { Validation::Observer };
    let reading = Reading { checksums, validation };
    match cli.command {
        Command::Conns { file } => conns(&file, reading),
        Command::Streams { file, out } => streams(&file, &out, reading),
        Command::Plan { file, client, consumed, now } => plan(&file, reading, client, consumed, now),
    }
}

fn open_input(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdin().lock()));
    }
    let f = File::open(path).map_err(|e| bad(format!("cannot open {}: {e}", path.display())))?;
    Ok(Box::new(f))
}

/// Feeds every packet of the capture to `flows`, calling `after` with the
/// connection each segment touched.
fn read_capture(
    path: &Path,
    flows: &mut Flows,
    mut after: impl FnMut(&mut Flows, ConnId, Dir) -> anyhow::Result<()>,
) -> anyhow::Result<CaptureStats> {
    let mut reader = CaptureReader::new(open_input(path)?)?;
    while let Some(p) = reader.next_packet()? {
        if let Some((id, dir)) = flows.handle_packet(p.ts, p.data) {
            after(flows, id, dir)?;
        }
    }
    Ok(reader.stats())
}

/// Notes on stderr about what was skipped or refused, and the checksum hint.
fn report(flows: &Flows, capture: &CaptureStats) {
    let stats = flows.stats();
    if capture.non_ipv4 > 0 {
        eprintln!("tcp-replay: {} of {} frames were not IPv4 and were skipped", capture.non_ipv4, capture.packets);
    }
    let errors = &stats.parse_errors;
    if errors.total() > 0 {
        let kinds: Vec<String> = errors.nonzero().iter().map(|(k, n)| format!("{k}: {n}")).collect();
        eprintln!("tcp-replay: {} IPv4 datagrams ignored ({})", errors.total(), kinds.join(", "));
    }
    if errors.truncated > 0 && capture.snapped > 0 {
        eprintln!(
            "tcp-replay: {} frames were cut by the capture's snap length; capture with a larger one (tcpdump -s 0)",
            capture.snapped
        );
    }
    // With offload, every segment the capturing host sent fails: a large share.
    let checksum = errors.checksum();
    if checksum > 0 && checksum * 5 >= stats.packets {
        eprintln!(
            "tcp-replay: {checksum} of {} segments failed checksum verification; if the capture was taken on a \
             sending host with checksum offload, rerun with --no-verify-checksums",
            stats.packets
        );
    }
    if stats.refused_total() > 0 {
        let kinds: Vec<String> =
            stats.refused.iter().map(|(k, t)| format!("{k}: {} (first: {})", t.count, t.first)).collect();
        eprintln!("tcp-replay: {} segments refused by the tracker ({})", stats.refused_total(), kinds.join("; "));
    }
}

#[derive(Serialize)]
struct OptionsJson {
    mss: Option<u16>,
    wscale: Option<u8>,
    sack_permitted: bool,
    timestamps: bool,
}

impl OptionsJson {
    fn of(e: &Endpoint) -> OptionsJson {
        OptionsJson { mss: e.mss, wscale: e.wscale, sack_permitted: e.sack_permitted, timestamps: e.timestamps }
    }
}

#[derive(Serialize)]
struct ConnJson {
    id: ConnId,
    client: String,
    server: String,
    state: TcpState,
    handshake_seen: bool,
    client_isn: Option<u32>,
    server_isn: Option<u32>,
    client_options: OptionsJson,
    server_options: OptionsJson,
    c2s_bytes: u64,
    s2c_bytes: u64,
    c2s_retransmitted_bytes: u64,
    s2c_retransmitted_bytes: u64,
    c2s_gap_bytes: u64,
    s2c_gap_bytes: u64,
    client_fin: bool,
    server_fin: bool,
    client_rst: bool,
    server_rst: bool,
    first_ts: f64,
    last_ts: f64,
    segments: u64,
    refused_segments: u64,
}

impl ConnJson {
    fn of(id: ConnId, c: &Connection) -> ConnJson {
        let t = c.tracker();
        let (cl, sv) = (t.sender(Dir::ToServer), t.sender(Dir::ToClient));
        ConnJson {
            id,
            client: c.client().to_string(),
            server: c.server().to_string(),
            state: t.state(),
            handshake_seen: t.handshake_seen(),
            client_isn: cl.isn.map(|s| s.0),
            server_isn: sv.isn.map(|s| s.0),
            client_options: OptionsJson::of(cl),
            server_options: OptionsJson::of(sv),
            c2s_bytes: cl.payload_bytes,
            s2c_bytes: sv.payload_bytes,
            c2s_retransmitted_bytes: cl.retransmitted_bytes,
            s2c_retransmitted_bytes: sv.retransmitted_bytes,
            c2s_gap_bytes: c.gap_bytes(Dir::ToServer),
            s2c_gap_bytes: c.gap_bytes(Dir::ToClient),
            client_fin: cl.fin_seen,
            server_fin: sv.fin_seen,
            client_rst: cl.rst_seen,
            server_rst: sv.rst_seen,
            first_ts: c.first_seen().as_secs_f64(),
            last_ts: c.last_seen().as_secs_f64(),
            segments: c.segments(),
            refused_segments: c.refused_segments(),
        }
    }
}

fn conns(file: &Path, reading: Reading) -> anyhow::Result<()> {
    let mut flows = reading.flows();
    let capture = read_capture(file, &mut flows, |flows, id, _| {
        // Only counters are reported: release the bytes so memory stays bounded.
        for dir in [Dir::ToServer, Dir::ToClient] {
            flows.drain(id, dir, |_| Ok::<(), anyhow::Error>(()))?;
        }
        Ok(())
    })?;
    let mut out = BufWriter::new(io::stdout().lock());
    for (id, c) in flows.connections().iter().enumerate() {
        serde_json::to_writer(&mut out, &ConnJson::of(id, c))?;
        out.write_all(b"\n")?;
    }
    out.flush().context("writing to stdout")?;
    report(&flows, &capture);
    Ok(())
}

/// The file name (without extension) of a connection's streams.
fn stream_name(c: &Connection) -> String {
    let (cl, sv) = (c.client(), c.server());
    let base = format!("{}_{}-{}_{}", cl.ip(), cl.port(), sv.ip(), sv.port());
    if c.ordinal() > 1 { format!("{base}.{}", c.ordinal()) } else { base }
}

fn ext(dir: Dir) -> &'static str {
    match dir {
        Dir::ToServer => "c2s",
        Dir::ToClient => "s2c",
    }
}

/// Output files of the streams command; a bounded number stay open at once.
struct StreamFiles {
    dir: PathBuf,
    names: Vec<String>,
    open: HashMap<(ConnId, Dir), BufWriter<File>>,
    gaps: Vec<(ConnId, Dir, Range<u64>)>,
}

/// Beyond this many open files, all are flushed and closed (reopened on demand).
const MAX_OPEN_FILES: usize = 128;

impl StreamFiles {
    fn path(&self, id: ConnId, dir: Dir) -> PathBuf {
        self.dir.join(format!("{}.{}", self.names[id], ext(dir)))
    }

    /// Creates (truncates) both files of a connection seen for the first time.
    fn create(&mut self, id: ConnId, c: &Connection) -> anyhow::Result<()> {
        self.names.push(stream_name(c));
        for dir in [Dir::ToServer, Dir::ToClient] {
            let path = self.path(id, dir);
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(())
    }

    fn write(&mut self, id: ConnId, dir: Dir, piece: Piece<'_>) -> anyhow::Result<()> {
        let data = match piece {
            Piece::Data(d) => d,
            Piece::Gap(g) => {
                self.gaps.push((id, dir, g));
                return Ok(());
            }
        };
        if !self.open.contains_key(&(id, dir)) {
            if self.open.len() >= MAX_OPEN_FILES {
                self.close_all()?;
            }
            let path = self.path(id, dir);
            let f =
                OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
            self.open.insert((id, dir), BufWriter::new(f));
        }
        let path = self.path(id, dir);
        let w = self.open.get_mut(&(id, dir)).ok_or_else(|| anyhow!("output file vanished"))?;
        w.write_all(data).with_context(|| format!("writing {}", path.display()))
    }

    fn close_all(&mut self) -> anyhow::Result<()> {
        for (_, mut w) in self.open.drain() {
            w.flush().context("writing stream file")?;
        }
        Ok(())
    }
}

fn streams(file: &Path, out: &Path, reading: Reading) -> anyhow::Result<()> {
    // Open the capture first, so bad input leaves no directory behind.
    let mut reader = CaptureReader::new(open_input(file)?)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut flows = reading.flows();
    // Server bytes are written before they are released, not dropped on the client's ACK.
    flows.set_trim_on_ack(false);
    let mut files = StreamFiles { dir: out.to_path_buf(), names: Vec::new(), open: HashMap::new(), gaps: Vec::new() };
    while let Some(p) = reader.next_packet()? {
        let Some((id, dir)) = flows.handle_packet(p.ts, p.data) else { continue };
        if id >= files.names.len() {
            let c = flows.get(id).ok_or_else(|| anyhow!("connection {id} missing"))?;
            files.create(id, c)?;
        }
        // An ACK in one direction can complete the other direction's stream (a gap).
        for d in [dir, dir.reverse()] {
            flows.drain(id, d, |piece| files.write(id, d, piece))?;
        }
    }
    for id in 0..flows.len() {
        for d in [Dir::ToServer, Dir::ToClient] {
            flows.drain_all(id, d, |piece| files.write(id, d, piece))?;
        }
    }
    files.close_all()?;
    const MAX_GAP_LINES: usize = 50;
    for (id, d, g) in files.gaps.iter().take(MAX_GAP_LINES) {
        eprintln!(
            "tcp-replay: {}.{}: bytes {}..{} ({} bytes) were never captured and are left out",
            files.names[*id],
            ext(*d),
            g.start,
            g.end,
            g.end - g.start
        );
    }
    if files.gaps.len() > MAX_GAP_LINES {
        eprintln!("tcp-replay: ... and {} more gaps", files.gaps.len() - MAX_GAP_LINES);
    }
    report(&flows, &reader.stats());
    eprintln!("tcp-replay: wrote {} connections to {}", flows.len(), out.display());
    Ok(())
}

/// Stream offset of the client bytes the server acknowledged, when the handshake
/// fixed the client's stream origin.
fn server_ack_offset(c: &Connection) -> Option<u64> {
    let t = c.tracker();
    if !t.handshake_seen() {
        return None;
    }
    t.acked_offset(Dir::ToServer)
}

fn plan(
    file: &Path,
    reading: Reading,
    client: Option<SocketAddrV4>,
    consumed: Option<u64>,
    now: Option<Duration>,
) -> anyhow::Result<()> {
    let mut flows = reading.flows();
    let capture = read_capture(file, &mut flows, |flows, id, _| {
        // Release client bytes the application is taken to have read, as they come.
        let Some(c) = flows.get_mut(id) else { return Ok(()) };
        // Never past the server's ACK: bytes beyond it stay with the client, which retransmits them.
        let acked = server_ack_offset(c);
        let keep_from = match (consumed, acked) {
            (Some(n), Some(a)) => Some(n.min(a)),
            (Some(n), None) => Some(n),
            (None, a) => a,
        };
        let t = c.tracker_mut();
        let end = t.stream(Dir::ToServer).contiguous_end();
        t.trim(Dir::ToServer, keep_from.unwrap_or(end).min(end));
        Ok(())
    })?;
    let id = match client {
        Some(addr) => {
            let matching: Vec<ConnId> = (0..flows.len()).filter(|&i| flows.connections()[i].client() == addr).collect();
            let Some(&last) = matching.last() else {
                return Err(bad(format!("no connection from client {addr} in the capture")));
            };
            let server = flows.connections()[last].server();
            if matching.iter().any(|&i| flows.connections()[i].server() != server) {
                return Err(bad(format!("client {addr} has connections to several servers")));
            }
            last
        }
        None => match flows.len() {
            0 => return Err(bad("no TCP connection in the capture")),
            1 => 0,
            n => {
                let clients: Vec<String> = flows.connections().iter().take(5).map(|c| c.client().to_string()).collect();
                return Err(bad(format!(
                    "{n} connections in the capture; choose one with --client (e.g. {}{})",
                    clients.join(", "),
                    if n > 5 { ", ..." } else { "" }
                )));
            }
        },
    };
    let now = match now {
        Some(t) => t,
        None => SystemTime::now().duration_since(UNIX_EPOCH).context("system clock before 1970")?,
    };
    let conn = &flows.connections()[id];
    if let (Some(n), Some(acked)) = (consumed, server_ack_offset(conn))
        && n > acked
    {
        // Legitimate after a cut: the application read bytes whose ACK never left.
        eprintln!(
            "tcp-replay: the application read {} client bytes beyond the server's last ACK (offset {acked}); \
             the client will retransmit them, so the restored application must skip them",
            n - acked
        );
    }
    let plan = conn.tracker().restore_plan(now).map_err(|e| match (e, consumed) {
        (PlanError::TrimmedPastAck { acked, .. }, Some(n)) => bad(format!(
            "--consumed {n} is beyond the {acked} client bytes the server acknowledged for {}",
            conn.client()
        )),
        (e, _) => bad(format!("connection {} -> {}: {e}", conn.client(), conn.server())),
    })?;
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &plan)?;
    out.write_all(b"\n")?;
    out.flush().context("writing to stdout")?;
    report(&flows, &capture);
    Ok(())
}
