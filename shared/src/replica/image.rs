//! A serde-able image of a [`Tracker`], and its exact rebuild: how a connection's
//! TCP state travels in a snapshot (ARCHITECTURE.md invariant 3).
//!
//! `tcp_replay::Tracker` is not serde-able and keeps part of its state private (the
//! window bookkeeping `snd_wl1`/`max_window`, when a timestamp was seen, where FINs
//! sit). The table therefore keeps a [`Shadow`] of those fields, updated from the
//! same segments with the same rules (Linux `tcp_may_update_window`, as in the
//! tracker), and checked against the tracker's public view after every segment.
//! An image is the tracker's public view plus the shadow; [`TrackerImage::rebuild`]
//! replays a short synthetic segment script (handshake, stream positions, window
//! updates, timestamps) into a fresh tracker and then verifies that the rebuilt
//! tracker shows exactly the image, restore plan included. A rebuild that does not
//! verify is an error, never an approximation.
//!
//! Not carried: the tracker's statistics counters (payload, retransmitted and
//! missing byte counts). They describe the past and change no decision.
//!
//! Once `Tracker` derives `Serialize`/`Deserialize`, this module goes away.

use serde::{Deserialize, Serialize};
use std::net::SocketAddrV4;
use std::time::Duration;
use tcp_replay::plan::{PlanOptions, RepairWindow};
use tcp_replay::segment::{TcpOptions, Timestamps};
use tcp_replay::{Dir, Segment, Seq, ServerAcks, TcpFlags, TcpState, Tracker};

/// Per endpoint, what the tracker keeps privately, followed from the same segments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointShadow {
    /// Raw window of this endpoint's SYN (never scaled), when seen.
    pub syn_window: Option<u16>,
    /// Latest window update: scaled value, raw field, and the (seq, ack) of the segment carrying it.
    pub window: u32,
    pub window_raw: u16,
    pub wl: Option<(Seq, Seq)>,
    /// Largest window advertised after the handshake, scaled.
    pub max_window: u32,
    /// Latest timestamp value and when it was seen (µs, the stream's clock).
    pub ts: Option<(u32, u64)>,
    /// Sequence number of this endpoint's FIN, and the ACK that FIN carried.
    pub fin: Option<Seq>,
    pub fin_ack: Option<Seq>,
}

/// Both endpoints' shadows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    pub client: EndpointShadow,
    pub server: EndpointShadow,
}

/// What the tracker showed before a segment, for [`Shadow::observe`].
#[derive(Debug, Clone, Copy)]
pub struct Before {
    isn: Option<Seq>,
    acked: Option<Seq>,
}

impl Before {
    pub fn of(t: &Tracker, dir: Dir) -> Before {
        let e = t.endpoint(dir);
        Before { isn: e.and_then(|e| e.isn), acked: e.and_then(|e| e.acked()) }
    }
}

impl Shadow {
    fn get_mut(&mut self, dir: Dir) -> &mut EndpointShadow {
        match dir {
            Dir::ToServer => &mut self.client,
            Dir::ToClient => &mut self.server,
        }
    }

    fn get(&self, dir: Dir) -> &EndpointShadow {
        match dir {
            Dir::ToServer => &self.client,
            Dir::ToClient => &self.server,
        }
    }

    /// Follows a segment the tracker has just accepted (`before` taken just before).
    /// Returns false when the shadow disagrees with the tracker's public view, which
    /// would make a snapshot of this connection unfaithful.
    pub fn observe(&mut self, t: &Tracker, before: Before, now_us: u64, dir: Dir, seg: &Segment<'_>) -> bool {
        let both_scale =
            [Dir::ToServer, Dir::ToClient].iter().all(|&d| t.endpoint(d).is_some_and(|e| e.wscale.is_some()));
        let Some(sender) = t.endpoint(dir) else { return false };
        let sh = self.get_mut(dir);
        if seg.flags.syn() {
            if before.isn.is_none() {
                // The window in a SYN is never scaled (RFC 7323 §2.2).
                sh.syn_window = Some(seg.window);
                sh.window = seg.window as u32;
                sh.window_raw = seg.window;
                sh.wl = Some((seg.seq, seg.ack));
            }
        } else if !seg.flags.rst() {
            if seg.flags.ack() {
                let shift = if both_scale { sender.wscale.unwrap_or(0).min(14) } else { 0 };
                let nwin = (seg.window as u32) << shift;
                let ack_advanced = before.acked.is_none_or(|p| seg.ack.diff(p) > 0);
                let update = match sh.wl {
                    None => true,
                    Some((wl1, _)) => {
                        ack_advanced || seg.seq.diff(wl1) > 0 || (seg.seq == wl1 && (nwin > sh.window || nwin == 0))
                    }
                };
                if update {
                    sh.window = nwin;
                    sh.window_raw = seg.window;
                    sh.wl = Some((seg.seq, seg.ack));
                    sh.max_window = sh.max_window.max(nwin);
                }
            }
            if seg.flags.fin() && sh.fin.is_none() {
                sh.fin = Some(seg.seq + seg.payload.len() as u32);
                if dir == Dir::ToClient {
                    sh.fin_ack = seg.flags.ack().then_some(seg.ack);
                }
            }
        }
        let ts = sender.ts_val();
        if ts != sh.ts.map(|(v, _)| v) {
            sh.ts = ts.map(|v| (v, now_us));
        }
        sh.window_raw == sender.window_raw()
    }
}

/// One endpoint in an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointImage {
    pub isn: Option<Seq>,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamps: bool,
    pub acked: Option<Seq>,
    pub snd_max: Option<Seq>,
    /// Stream offset of `snd_max` (after data and FIN).
    pub high: u64,
    pub fin_seen: bool,
    pub rst_seen: bool,
    /// Retained stream: contiguous bytes from `start`, then out-of-order pieces.
    pub start: u64,
    pub data: Vec<u8>,
    pub pending: Vec<(u64, Vec<u8>)>,
    pub shadow: EndpointShadow,
}

/// The restore plan's fields except the queues (checked on rebuild; the queues
/// follow from the streams).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanCheck {
    pub state: TcpState,
    pub options: PlanOptions,
    pub snd_una: Seq,
    pub rcv_nxt: Seq,
    pub send_len: usize,
    pub recv_len: usize,
    pub fin_sent: bool,
    pub fin_received: bool,
    pub window: RepairWindow,
    pub tsval: Option<u32>,
    pub ts_recent: Option<u32>,
}

/// A tracker's state as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerImage {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub state: TcpState,
    pub c: EndpointImage,
    pub s: EndpointImage,
    /// The restore plan at a fixed late time (or why there is none).
    pub plan: Result<PlanCheck, String>,
}

/// Time at which images compare restore plans: late enough that a timestamp clock
/// seen at a different time would show.
const PROBE: Duration = Duration::from_secs(1 << 31);

/// Client stream distance covered per synthetic segment when moving a rebuilt
/// stream forward (well inside the 2^30 the tracker accepts beyond its ACK).
const HOP: u64 = 1 << 29;

/// Payload per synthetic data segment.
const SEGMENT_BYTES: usize = 32 * 1024;

impl TrackerImage {
    /// The image of `t`, whose private fields `shadow` follows.
    pub fn capture(t: &Tracker, shadow: &Shadow) -> Result<TrackerImage, String> {
        let (client, server) = t.addresses().ok_or("tracker has seen no segment")?;
        let plan = t.restore_plan(PROBE).map_err(|e| e.to_string()).map(|p| PlanCheck {
            state: p.state,
            options: p.options,
            snd_una: p.snd_una,
            rcv_nxt: p.rcv_nxt,
            send_len: p.send_queue.len(),
            recv_len: p.recv_queue.len(),
            fin_sent: p.fin_sent,
            fin_received: p.fin_received,
            window: p.window,
            tsval: p.tsval,
            ts_recent: p.ts_recent,
        });
        Ok(TrackerImage {
            client,
            server,
            state: t.state(),
            c: endpoint_image(t, Dir::ToServer, shadow.get(Dir::ToServer))?,
            s: endpoint_image(t, Dir::ToClient, shadow.get(Dir::ToClient))?,
            plan,
        })
    }

    /// The shadow the image carries.
    pub fn shadow(&self) -> Shadow {
        Shadow { client: self.c.shadow.clone(), server: self.s.shadow.clone() }
    }

    /// A tracker showing exactly this image (see the module documentation).
    pub fn rebuild(&self) -> Result<Tracker, String> {
        let mut r = Rebuild { t: Tracker::new(), client: self.client, server: self.server };
        r.t.set_server_acks(ServerAcks::Inferred);
        let (c, s) = (&self.c, &self.s);
        let cisn = c.isn.ok_or("no client SYN in the image")?;
        let opts = |e: &EndpointImage| {
            let mut o = TcpOptions::default();
            o.mss = e.mss;
            o.wscale = e.wscale;
            o.sack_permitted = e.sack_permitted;
            o
        };
        // 1. Handshake. Each SYN carries its endpoint's latest timestamp, seen when it was.
        let mut o = opts(c);
        let (cts, cts_at) = ts_for_syn(c);
        o.timestamps = cts;
        r.seg(cts_at, Dir::ToServer, TcpFlags::SYN, cisn, Seq(0), c.shadow.syn_window.unwrap_or(0), o, &[])?;
        if let Some(sisn) = s.isn {
            let mut o = opts(s);
            let (sts, sts_at) = ts_for_syn(s);
            o.timestamps = sts;
            r.seg(
                sts_at,
                Dir::ToClient,
                TcpFlags::SYN | TcpFlags::ACK,
                sisn,
                cisn + 1,
                s.shadow.syn_window.unwrap_or(0),
                o,
                &[],
            )?;
            // 2. Server stream, from the reply log's point of view.
            let data_high = s.high - s.fin_seen as u64;
            r.t.trim(Dir::ToClient, s.start);
            r.server_data(s.start, &s.data)?;
            for (off, piece) in &s.pending {
                r.server_data(*off, piece)?;
            }
            r.server_data(data_high, &[])?;
        }
        // 3. Client stream: move forward, then data, out-of-order pieces, FIN. No ACK
        // flag, so windows and acknowledgements stay as the handshake left them.
        let cseq0 = cisn + 1;
        let mut at = 0u64;
        while at < c.start {
            let next = (at + HOP).min(c.start);
            r.t.trim(Dir::ToServer, next);
            r.seg(Duration::ZERO, Dir::ToServer, 0, cseq0 + (next - 1) as u32, Seq(0), 0, TcpOptions::default(), &[0])?;
            at = next;
        }
        r.t.trim(Dir::ToServer, c.start);
        for (i, chunk) in c.data.chunks(SEGMENT_BYTES).enumerate() {
            let off = c.start + (i * SEGMENT_BYTES) as u64;
            r.seg(Duration::ZERO, Dir::ToServer, 0, cseq0 + off as u32, Seq(0), 0, TcpOptions::default(), chunk)?;
        }
        for (off, piece) in &c.pending {
            for (i, chunk) in piece.chunks(SEGMENT_BYTES).enumerate() {
                let off = off + (i * SEGMENT_BYTES) as u64;
                r.seg(Duration::ZERO, Dir::ToServer, 0, cseq0 + off as u32, Seq(0), 0, TcpOptions::default(), chunk)?;
            }
        }
        if let Some(fin) = c.shadow.fin {
            r.seg(Duration::ZERO, Dir::ToServer, TcpFlags::FIN, fin, Seq(0), 0, TcpOptions::default(), &[])?;
        }
        // 4. The server's FIN and window, while the client has acknowledged nothing
        // (so any server sequence number is acceptable). Only the SYN-ACK and FINs
        // ever carry a server window here.
        if let Some(sisn) = s.isn {
            let sh = &s.shadow;
            // With the same sequence number a later segment only takes a larger or a
            // zero window (Linux tcp_may_update_window): the FIN advertises the
            // largest, then a zero window, then the latest, as far as each is needed.
            let max_raw = raw_of(self, Dir::ToClient, sh.max_window);
            let mut last = (Some((sisn, cisn + 1)), sh.syn_window.unwrap_or(0) as u32);
            if let Some(fin) = sh.fin {
                match sh.fin_ack {
                    Some(ack) => {
                        let same_seq = sh.wl.map(|w| w.0) == Some(fin);
                        let raw = match (sh.max_window > sh.window, same_seq) {
                            (false, true) if sh.wl == Some((fin, ack)) => sh.window_raw,
                            (false, true) => 0,
                            _ => max_raw,
                        };
                        let flags = TcpFlags::FIN | TcpFlags::ACK;
                        r.seg(Duration::ZERO, Dir::ToClient, flags, fin, ack, raw, TcpOptions::default(), &[])?;
                        last = (Some((fin, ack)), scaled(self, Dir::ToClient, raw));
                    }
                    None => {
                        r.seg(Duration::ZERO, Dir::ToClient, TcpFlags::FIN, fin, Seq(0), 0, TcpOptions::default(), &[])?
                    }
                }
            }
            if let Some((seq, ack)) = sh.wl
                && (last.0 != sh.wl || last.1 != sh.window)
            {
                if last.0.map(|w| w.0) == Some(seq) && sh.window > 0 && sh.window <= last.1 {
                    r.seg(Duration::ZERO, Dir::ToClient, TcpFlags::ACK, seq, ack, 0, TcpOptions::default(), &[])?;
                }
                r.seg(
                    Duration::ZERO,
                    Dir::ToClient,
                    TcpFlags::ACK,
                    seq,
                    ack,
                    sh.window_raw,
                    TcpOptions::default(),
                    &[],
                )?;
            }
            r.timestamp(s, Dir::ToClient)?;
            // Bytes logged after the FIN (never in a sane stream) leave the high mark beyond it.
            r.server_data(s.high, &[])?;
        }
        // 5. The client's acknowledgement and window, and a timestamp its SYN did not carry.
        if c.acked.is_some() {
            r.client_window(self)?;
        }
        r.timestamp(c, Dir::ToServer)?;
        // 6. Resets.
        if c.rst_seen {
            let seq = r.t.endpoint(Dir::ToClient).and_then(|x| x.acked()).unwrap_or(cseq0);
            r.seg(Duration::ZERO, Dir::ToServer, TcpFlags::RST, seq, Seq(0), 0, TcpOptions::default(), &[])?;
        }
        if s.rst_seen {
            let seq = r.t.endpoint(Dir::ToServer).and_then(|x| x.acked()).or(s.isn).unwrap_or(Seq(0));
            r.seg(Duration::ZERO, Dir::ToClient, TcpFlags::RST, seq, Seq(0), 0, TcpOptions::default(), &[])?;
        }
        let rebuilt = TrackerImage::capture(&r.t, &self.shadow())?;
        if &rebuilt != self {
            return Err(describe_difference(self, &rebuilt));
        }
        Ok(r.t)
    }
}

/// The timestamp option a rebuilt SYN carries, and when it is seen.
fn ts_for_syn(e: &EndpointImage) -> (Option<Timestamps>, Duration) {
    match (e.timestamps, e.shadow.ts) {
        (true, Some((val, at))) => (Some(Timestamps { val, ecr: 0 }), Duration::from_micros(at)),
        _ => (None, Duration::ZERO),
    }
}

/// The window scale shift of the sender in `dir` (RFC 7323 §2.3: both must offer it).
fn shift_of(img: &TrackerImage, dir: Dir) -> u32 {
    let e = if dir == Dir::ToServer { &img.c } else { &img.s };
    match (img.c.wscale, img.s.wscale) {
        (Some(_), Some(_)) => e.wscale.unwrap_or(0).min(14) as u32,
        _ => 0,
    }
}

/// The raw window field that scales to `scaled` for the sender in `dir`.
fn raw_of(img: &TrackerImage, dir: Dir, scaled: u32) -> u16 {
    (scaled >> shift_of(img, dir)).min(u16::MAX as u32) as u16
}

/// The scaled value of raw window field `raw` from the sender in `dir`.
fn scaled(img: &TrackerImage, dir: Dir, raw: u16) -> u32 {
    (raw as u32) << shift_of(img, dir)
}

fn endpoint_image(t: &Tracker, dir: Dir, shadow: &EndpointShadow) -> Result<EndpointImage, String> {
    let e = t.endpoint(dir).ok_or("endpoint never seen")?;
    let st = t.stream(dir);
    let (start, cend, hend) = (st.start(), st.contiguous_end(), st.highest_end());
    let mut pending = Vec::new();
    if hend > cend {
        // Out-of-order pieces are private to the stream: a copy that skips the holes shows them.
        let mut copy = st.clone();
        let known_gaps = copy.gaps().len();
        copy.skip_to(hend);
        let mut cursor = cend;
        let holes: Vec<_> = copy.gaps()[known_gaps..].to_vec();
        for hole in holes.iter().chain(std::iter::once(&(hend..hend))) {
            if hole.start > cursor {
                pending.push((cursor, copy.copy_range(cursor..hole.start)));
            }
            cursor = cursor.max(hole.end);
        }
    }
    let high = match (e.isn, e.snd_max()) {
        (Some(isn), Some(snd_max)) => {
            let base = hend;
            (base as i64 + snd_max.diff(isn + 1 + base as u32) as i64).max(0) as u64
        }
        _ => 0,
    };
    Ok(EndpointImage {
        isn: e.isn,
        mss: e.mss,
        wscale: e.wscale,
        sack_permitted: e.sack_permitted,
        timestamps: e.timestamps,
        acked: e.acked(),
        snd_max: e.snd_max(),
        high,
        fin_seen: e.fin_seen,
        rst_seen: e.rst_seen,
        start,
        data: st.copy_range(start..cend),
        pending,
        shadow: shadow.clone(),
    })
}

fn describe_difference(want: &TrackerImage, got: &TrackerImage) -> String {
    let (w, g) = (format!("{want:?}"), format!("{got:?}"));
    let at = w.bytes().zip(g.bytes()).take_while(|(a, b)| a == b).count();
    let from = at.saturating_sub(60);
    let near = |s: &str| s.get(from..(at + 60).min(s.len())).unwrap_or("").to_string();
    format!("rebuilt tracker differs from its image: want …{}…, got …{}…", near(&w), near(&g))
}

/// A tracker being rebuilt from synthetic segments.
struct Rebuild {
    t: Tracker,
    client: SocketAddrV4,
    server: SocketAddrV4,
}

impl Rebuild {
    #[allow(clippy::too_many_arguments)]
    fn seg(
        &mut self,
        now: Duration,
        dir: Dir,
        flags: u8,
        seq: Seq,
        ack: Seq,
        window: u16,
        options: TcpOptions,
        payload: &[u8],
    ) -> Result<(), String> {
        let (src, dst) = match dir {
            Dir::ToServer => (self.client, self.server),
            Dir::ToClient => (self.server, self.client),
        };
        let seg = Segment { src, dst, flags: TcpFlags(flags), seq, ack, window, options, payload };
        self.t.handle_segment(now, dir, &seg).map_err(|e| format!("rebuild: {e}"))
    }

    fn server_data(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        self.t.handle_server_data(offset, bytes).map_err(|e| format!("rebuild: {e}"))
    }

    /// Sends `dir`'s latest timestamp in a flagless segment when its SYN did not carry it.
    fn timestamp(&mut self, e: &EndpointImage, dir: Dir) -> Result<(), String> {
        let shown = self.t.endpoint(dir).and_then(|x| x.ts_val());
        if let Some((val, at_us)) = e.shadow.ts
            && shown != Some(val)
        {
            let mut o = TcpOptions::default();
            o.timestamps = Some(Timestamps { val, ecr: 0 });
            let seq = self.t.endpoint(dir).and_then(|x| x.snd_max()).unwrap_or(Seq(0));
            self.seg(Duration::from_micros(at_us), dir, 0, seq, Seq(0), 0, o, &[])?;
        }
        Ok(())
    }

    /// Brings the client's window bookkeeping to the image's. The first segment carries
    /// the client's ACK (advancing it from nothing) and its largest window; the second
    /// is the latest window update, with its own ACK, which may be older than the
    /// client's latest (a segment with newer data and an older ACK).
    fn client_window(&mut self, img: &TrackerImage) -> Result<(), String> {
        let (e, dir) = (&img.c, Dir::ToServer);
        let sh = &e.shadow;
        let Some((wl_seq, wl_ack)) = sh.wl else { return Ok(()) };
        let acked = e.acked.unwrap_or(wl_ack);
        let raw = raw_of(img, dir, sh.max_window);
        self.seg(Duration::ZERO, dir, TcpFlags::ACK, wl_seq - 1, acked, raw, TcpOptions::default(), &[])?;
        self.seg(Duration::ZERO, dir, TcpFlags::ACK, wl_seq, wl_ack, sh.window_raw, TcpOptions::default(), &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tracker's whole state, private fields included, without its statistics counters.
    fn without_counters(t: &Tracker) -> String {
        format!("{t:?}")
            .split(", ")
            .filter(|p| {
                !["payload_bytes: ", "retransmitted_bytes: ", "missing_bytes: "].iter().any(|f| p.starts_with(f))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Client data `back` bytes behind its highest offset (retransmission, reordering).
        Data {
            back: u16,
            len: u16,
            window: u16,
            ack: u8,
            ts: bool,
        },
        /// Reply bytes from the primary's log.
        Reply {
            len: u16,
        },
        /// A client pure ACK of a fraction of the reply.
        Ack {
            window: u16,
            ack: u8,
            ts: bool,
        },
        ServerFin {
            window: u16,
            ts: bool,
        },
        ClientFin,
        Rst {
            client: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..600u16, 0..300u16, any::<u16>(), any::<u8>(), any::<bool>())
                .prop_map(|(back, len, window, ack, ts)| Op::Data { back, len, window, ack, ts }),
            3 => (1..3000u16).prop_map(|len| Op::Reply { len }),
            3 => (any::<u16>(), any::<u8>(), any::<bool>()).prop_map(|(window, ack, ts)| Op::Ack { window, ack, ts }),
            1 => (prop_oneof![Just(0u16), any::<u16>()], any::<bool>()).prop_map(|(window, ts)| Op::ServerFin { window, ts }),
            1 => Just(Op::ClientFin),
            1 => any::<bool>().prop_map(|client| Op::Rst { client }),
        ]
    }

    struct Driver {
        t: Tracker,
        shadow: Shadow,
        client: SocketAddrV4,
        server: SocketAddrV4,
        now_us: u64,
    }

    impl Driver {
        #[allow(clippy::too_many_arguments)]
        fn seg(&mut self, dir: Dir, flags: u8, seq: Seq, ack: Seq, window: u16, options: TcpOptions, payload: &[u8]) {
            self.now_us += 700;
            let (src, dst) = if dir == Dir::ToServer { (self.client, self.server) } else { (self.server, self.client) };
            let seg = Segment { src, dst, flags: TcpFlags(flags), seq, ack, window, options, payload };
            let before = Before::of(&self.t, dir);
            if self.t.handle_segment(Duration::from_micros(self.now_us), dir, &seg).is_ok() {
                assert!(self.shadow.observe(&self.t, before, self.now_us, dir, &seg), "shadow diverged on {seg:?}");
            }
        }

        fn ts(&self, on: bool, dir: Dir) -> TcpOptions {
            let mut o = TcpOptions::default();
            if on {
                let base = if dir == Dir::ToServer { 1 << 31 } else { 17 };
                o.timestamps = Some(Timestamps { val: base + (self.now_us / 1000) as u32, ecr: 0 });
            }
            o
        }

        fn check_rebuild(&self) {
            let img = TrackerImage::capture(&self.t, &self.shadow).unwrap();
            let rebuilt = img.rebuild().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(without_counters(&rebuilt), without_counters(&self.t));
        }
    }

    proptest! {
        #[test]
        fn any_tracked_connection_rebuilds_to_the_same_tracker(
            cisn in any::<u32>(),
            sisn in any::<u32>(),
            wscale in prop::option::of((0u8..15, 0u8..15)),
            ts in any::<bool>(),
            ops in prop::collection::vec(op(), 0..40),
        ) {
            run(cisn, sisn, wscale, ts, ops);
        }
    }

    /// Drives a tracker through the handshake and `ops`, checking the rebuild after each step.
    fn run(cisn: u32, sisn: u32, wscale: Option<(u8, u8)>, ts: bool, ops: Vec<Op>) {
        let mut d = Driver {
            t: Tracker::new(),
            shadow: Shadow::default(),
            client: "10.0.0.1:40000".parse().unwrap(),
            server: "10.0.0.2:80".parse().unwrap(),
            now_us: 5_000_000,
        };
        d.t.set_server_acks(ServerAcks::Inferred);
        let (cisn, sisn) = (Seq(cisn), Seq(sisn));
        let mut o = d.ts(ts, Dir::ToServer);
        o.mss = Some(1460);
        o.wscale = wscale.map(|w| w.0);
        o.sack_permitted = true;
        d.seg(Dir::ToServer, TcpFlags::SYN, cisn, Seq(0), 64240, o, &[]);
        d.check_rebuild();
        let mut o = d.ts(ts, Dir::ToClient);
        o.wscale = wscale.map(|w| w.1);
        d.seg(Dir::ToClient, TcpFlags::SYN | TcpFlags::ACK, sisn, cisn + 1, 65160, o, &[]);
        d.check_rebuild();
        d.seg(Dir::ToServer, TcpFlags::ACK, cisn + 1, sisn + 1, 502, d.ts(ts, Dir::ToServer), &[]);
        // Like a TCP stack: a FIN ends its stream and is retransmitted where it is.
        let (mut sent, mut logged) = (0u64, 0u64);
        let (mut client_fin, mut server_fin) = (None::<u64>, None::<u64>);
        let server_ack = |logged: u64, frac: u8| sisn + 1 + (logged * frac as u64 / 255) as u32;
        const A: u8 = TcpFlags::ACK;
        for op in ops {
            match op {
                Op::Data { back, len, window, ack, ts: t } => {
                    let off = sent.saturating_sub(back as u64);
                    let len = client_fin.map_or(len as u64, |f| (len as u64).min(f.saturating_sub(off)));
                    let payload: Vec<u8> = (0..len).map(|i| (off + i) as u8).collect();
                    let (seq, o) = (cisn + 1 + off as u32, d.ts(ts && t, Dir::ToServer));
                    d.seg(Dir::ToServer, A, seq, server_ack(logged, ack), window, o, &payload);
                    sent = sent.max(off + len);
                }
                Op::Reply { .. } if server_fin.is_some() => {}
                Op::Reply { len } => {
                    let bytes: Vec<u8> = (0..len).map(|i| (logged + i as u64) as u8 ^ 0x5a).collect();
                    d.t.handle_server_data(logged, &bytes).unwrap();
                    logged += len as u64;
                }
                Op::Ack { window, ack, ts: t } => {
                    let (seq, o) = (cisn + 1 + sent as u32, d.ts(ts && t, Dir::ToServer));
                    d.seg(Dir::ToServer, A, seq, server_ack(logged, ack), window, o, &[]);
                }
                Op::ServerFin { window, ts: t } => {
                    let at = *server_fin.get_or_insert(logged);
                    let got = d.t.stream(Dir::ToServer).contiguous_end();
                    let (seq, o) = (sisn + 1 + at as u32, d.ts(ts && t, Dir::ToClient));
                    d.seg(Dir::ToClient, TcpFlags::FIN | A, seq, cisn + 1 + got as u32, window, o, &[]);
                }
                Op::ClientFin => {
                    let at = *client_fin.get_or_insert(sent);
                    let seq = cisn + 1 + at as u32;
                    d.seg(
                        Dir::ToServer,
                        TcpFlags::FIN | A,
                        seq,
                        server_ack(logged, 255),
                        502,
                        TcpOptions::default(),
                        &[],
                    );
                }
                Op::Rst { client: true } => {
                    d.seg(Dir::ToServer, TcpFlags::RST, cisn + 1 + sent as u32, Seq(0), 0, TcpOptions::default(), &[]);
                }
                Op::Rst { client: false } => {
                    let at = d.t.endpoint(Dir::ToServer).and_then(|e| e.acked()).unwrap_or(sisn + 1);
                    d.seg(Dir::ToClient, TcpFlags::RST, at, Seq(0), 0, TcpOptions::default(), &[]);
                }
            }
            d.check_rebuild();
        }
    }

    fn fin(window: u16) -> Op {
        Op::ServerFin { window, ts: false }
    }

    fn data(window: u16, ack: u8) -> Op {
        Op::Data { back: 0, len: 1, window, ack, ts: false }
    }

    #[test]
    fn retransmitted_server_fin_with_a_newer_ack_and_a_closed_window_rebuilds() {
        run(0, 0, None, false, vec![fin(0), data(0, 0), fin(0)]);
    }

    #[test]
    fn retransmitted_server_fin_that_opens_the_window_rebuilds() {
        run(0, 0, None, false, vec![fin(0), data(0, 0), fin(1)]);
    }

    #[test]
    fn server_fin_windows_large_zero_small_at_one_sequence_number_rebuild() {
        run(0, 0, None, false, vec![fin(24300), fin(0), fin(1)]);
    }

    #[test]
    fn client_data_with_an_older_ack_than_its_latest_rebuilds() {
        let ops = vec![Op::Reply { len: 900 }, data(30, 255), data(40, 10), Op::Ack { window: 7, ack: 5, ts: false }];
        run(7, u32::MAX - 2, Some((7, 9)), true, ops);
    }
}
