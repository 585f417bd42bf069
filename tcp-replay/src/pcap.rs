//! Capture input: classic pcap and pcapng, read as a stream of IPv4 datagrams.
//!
//! Formats: <https://www.tcpdump.org/manpages/pcap-savefile.5.html> (classic pcap,
//! either byte order, micro- or nanosecond timestamps), the pcapng draft
//! (draft-ietf-opsawg-pcapng: several interfaces per section, each with its own link
//! type, `if_tsresol` and `if_tsoffset`), and the link types of
//! <https://www.tcpdump.org/linktypes.html>.
//!
//! The reader streams through a fixed buffer (grown only for a record that does not
//! fit), so a multi-gigabyte capture never sits in memory. Each packet is handed out
//! as (timestamp since the UNIX epoch, IPv4 datagram); frames that carry anything
//! else are counted and skipped. A frame cut by the snap length is handed out as
//! far as it was captured, so the cut shows up as `ParseError::Truncated` when the
//! segment is parsed, not here.

use pcap_parser::traits::PcapReaderIterator;
use pcap_parser::{Block, LegacyPcapReader, PcapBlockOwned, PcapError, PcapNGReader};
use serde::Serialize;
use std::io::{self, Cursor, Read};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Initial read buffer; records larger than this grow it.
const BUFFER: usize = 1 << 20;
/// No sane record is larger (libpcap's own limit is 256 KiB); beyond this a length
/// field is corrupt, and growing further would let a bad file exhaust memory.
const MAX_RECORD: usize = 64 << 20;

/// Why a capture cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The input does not start with a pcap or pcapng magic number.
    #[error("not a pcap or pcapng capture (first bytes: {found})")]
    NotCapture {
        /// The first bytes, in hex, or "none" for an empty input.
        found: String,
    },
    /// The input ends inside a file header, block or packet record.
    #[error("capture truncated at byte offset {offset} (after {packets} complete packets)")]
    Truncated {
        /// Offset of the incomplete header or record.
        offset: u64,
        /// Packet records read completely before it.
        packets: u64,
    },
    /// A header or record is malformed.
    #[error("corrupt capture at byte offset {offset} (after {packets} packets): {reason}")]
    Corrupt {
        /// Offset of the malformed header or record.
        offset: u64,
        /// Packet records read completely before it.
        packets: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A packet arrived on an interface whose link-layer header this reader cannot
    /// decode. Classic pcap reports it when the file is opened.
    #[error("unsupported link type {linktype}{} on interface {interface}", linktype_name(*.linktype))]
    UnsupportedLinkType {
        /// The LINKTYPE_/DLT_ number.
        linktype: i32,
        /// pcapng interface id (always 0 for classic pcap).
        interface: u32,
    },
    /// Reading the input failed.
    #[error("reading capture: {0}")]
    Io(#[from] io::Error),
}

/// Counts kept while reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CaptureStats {
    /// Packet records read.
    pub packets: u64,
    /// Records handed out as IPv4 datagrams.
    pub ipv4: u64,
    /// Records skipped because they carry something other than IPv4 (IPv6, ARP, ...).
    pub non_ipv4: u64,
    /// Records cut by the snap length inside the link-layer header; handed out as an
    /// empty datagram so they count as truncated segments.
    pub short_frames: u64,
    /// Records whose captured length is below their original length.
    pub snapped: u64,
}

/// The container format of a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFormat {
    /// Classic pcap.
    Pcap { big_endian: bool, nanosecond: bool },
    /// pcapng.
    PcapNg,
}

/// One captured IPv4 datagram, borrowed from the reader until the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Capture time since the UNIX epoch.
    pub ts: Duration,
    /// 1-based number of the packet record in the file (skipped records included).
    pub number: u64,
    /// The IPv4 datagram as captured (possibly cut short by the snap length).
    pub data: &'a [u8],
}

/// What a link-layer frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An IPv4 datagram, starting at its header.
    Ipv4(&'a [u8]),
    /// Another protocol.
    Other,
    /// The frame ends before its link-layer header does.
    Short,
}

/// Whether [`decode_link`] understands `linktype`.
pub fn linktype_supported(linktype: i32) -> bool {
    matches!(linktype, 0 | 1 | 12 | 14 | 101 | 108 | 113 | 228 | 276)
}

fn linktype_name(linktype: i32) -> String {
    let name = match linktype {
        6 => "IEEE802_5",
        9 => "PPP",
        10 => "FDDI",
        50 => "PPP_HDLC",
        105 => "IEEE802_11",
        127 => "IEEE802_11_RADIOTAP",
        192 => "PPI",
        195 => "IEEE802_15_4",
        220 => "USB_LINUX_MMAPPED",
        229 => "IPV6",
        239 => "NFLOG",
        252 => "WIRESHARK_UPPER_PDU",
        _ => return String::new(),
    };
    format!(" ({name})")
}

const ETHERTYPE_IPV4: u16 = 0x0800;

/// Strips the link-layer header of a frame of type `linktype` (which must be
/// [supported](linktype_supported)).
pub fn decode_link(linktype: i32, frame: &[u8]) -> Frame<'_> {
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    match linktype {
        // BSD loopback: 4-byte address family, in the capturing host's byte order for
        // NULL (0) and in network order for LOOP (108). AF_INET is 2 everywhere.
        0 | 108 => {
            let Some(family) = frame.get(..4) else { return Frame::Short };
            let family = [family[0], family[1], family[2], family[3]];
            if u32::from_le_bytes(family) == 2 || u32::from_be_bytes(family) == 2 {
                Frame::Ipv4(&frame[4..])
            } else {
                Frame::Other
            }
        }
        1 => {
            if frame.len() < 14 {
                return Frame::Short;
            }
            ethertype_payload(be16(frame, 12), &frame[14..])
        }
        // Raw IP: LINKTYPE_RAW, the DLT_RAW values 12 and 14 some systems write, and
        // LINKTYPE_IPV4. The version nibble tells IPv4 from IPv6.
        12 | 14 | 101 | 228 => match frame.first() {
            None => Frame::Short,
            Some(b) if b >> 4 == 4 => Frame::Ipv4(frame),
            Some(_) => Frame::Other,
        },
        // Linux cooked v1: protocol (ethertype) in the last two of 16 bytes.
        113 => {
            if frame.len() < 16 {
                return Frame::Short;
            }
            ethertype_payload(be16(frame, 14), &frame[16..])
        }
        // Linux cooked v2: protocol first, 20-byte header.
        276 => {
            if frame.len() < 20 {
                return Frame::Short;
            }
            ethertype_payload(be16(frame, 0), &frame[20..])
        }
        _ => Frame::Other,
    }
}

/// Follows 802.1Q / 802.1ad (QinQ) tags to the payload.
fn ethertype_payload(mut ethertype: u16, mut rest: &[u8]) -> Frame<'_> {
    while matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
        if rest.len() < 4 {
            return Frame::Short;
        }
        ethertype = u16::from_be_bytes([rest[2], rest[3]]);
        rest = &rest[4..];
    }
    if ethertype == ETHERTYPE_IPV4 { Frame::Ipv4(rest) } else { Frame::Other }
}

/// Makes every `read` fill the buffer (or hit EOF), so the parser's first read sees a
/// whole header even from a pipe, and keeps the `io::Error` the parser would discard.
struct ReadFull<R> {
    inner: R,
    /// An error hit after some bytes were read: returned by the next call.
    deferred: Option<io::Error>,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl<R: Read> ReadFull<R> {
    fn fail(&mut self, e: io::Error) -> io::Error {
        let copy = io::Error::new(e.kind(), e.to_string());
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(e);
        }
        copy
    }
}

impl<R: Read> Read for ReadFull<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.deferred.take() {
            return Err(self.fail(e));
        }
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if n > 0 => {
                    self.deferred = Some(e);
                    break;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(n)
    }
}

type Input<R> = ReadFull<std::io::Chain<Cursor<[u8; 4]>, R>>;

enum Inner<R: Read> {
    Pcap(LegacyPcapReader<Input<R>>),
    PcapNg(PcapNGReader<Input<R>>),
}

impl<R: Read> Inner<R> {
    fn it(&mut self) -> &mut dyn PcapReaderIterator {
        match self {
            Inner::Pcap(r) => r,
            Inner::PcapNg(r) => r,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Interface {
    linktype: i32,
    snaplen: u32,
    /// Timestamp units per second.
    units: u64,
    /// Seconds added to every timestamp.
    offset: i64,
}

/// A streaming reader of IPv4 datagrams from a pcap or pcapng capture.
///
/// Call [`next_packet`](CaptureReader::next_packet) until it returns `Ok(None)`.
pub struct CaptureReader<R: Read> {
    inner: Inner<R>,
    format: CaptureFormat,
    /// Classic pcap: the file's link type, as interface 0. pcapng: the current section's.
    interfaces: Vec<Interface>,
    ng_big_endian: bool,
    /// Bytes of the last block handed out, consumed on the next call (the packet
    /// borrows them until then).
    pending: usize,
    error: Arc<Mutex<Option<io::Error>>>,
    stats: CaptureStats,
    /// Size of the read buffer.
    capacity: usize,
    /// pcapng simple packet blocks carry no timestamp; they get the previous one.
    last_ts: Duration,
    scratch: Vec<u8>,
}

/// What one parser step produced, with the parser's borrow released.
enum Step {
    Again,
    Packet { ts: Duration, interface: u32, origlen: u32 },
    Eof,
    Refill,
    Grow,
    Truncated,
    Failed(&'static str),
    ReadFailed,
    Unsupported { linktype: i32, interface: u32 },
}

impl<R: Read> CaptureReader<R> {
    /// Opens a capture, detecting its format from the magic number. Classic pcap
    /// files with an unsupported link type fail here.
    pub fn new(mut input: R) -> Result<CaptureReader<R>, CaptureError> {
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match input.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CaptureError::Io(e)),
            }
        }
        const MAGICS: [(u32, CaptureFormat); 6] = [
            (0xa1b2_c3d4, CaptureFormat::Pcap { big_endian: false, nanosecond: false }),
            // Kuznetzov's patched format: microseconds, longer records.
            (0xa1b2_cd34, CaptureFormat::Pcap { big_endian: false, nanosecond: false }),
            (0xa1b2_3c4d, CaptureFormat::Pcap { big_endian: false, nanosecond: true }),
            (0xd4c3_b2a1, CaptureFormat::Pcap { big_endian: true, nanosecond: false }),
            (0x4d3c_b2a1, CaptureFormat::Pcap { big_endian: true, nanosecond: true }),
            (0x0a0d_0d0a, CaptureFormat::PcapNg),
        ];
        let known = MAGICS.iter().find(|(m, _)| m.to_le_bytes()[..got] == magic[..got]);
        let format = match known {
            Some(_) if got == 0 => return Err(CaptureError::NotCapture { found: "none".into() }),
            Some(_) if got < 4 => return Err(CaptureError::Truncated { offset: 0, packets: 0 }),
            Some((_, format)) => *format,
            None => return Err(CaptureError::NotCapture { found: hex::encode(&magic[..got]) }),
        };
        let error = Arc::new(Mutex::new(None));
        let input = ReadFull { inner: Cursor::new(magic).chain(input), deferred: None, error: error.clone() };
        let header_error = |e: PcapError<&'static [u8]>, error: &Arc<Mutex<Option<io::Error>>>| match e {
            PcapError::Incomplete(_) | PcapError::UnexpectedEof | PcapError::Eof => {
                CaptureError::Truncated { offset: 0, packets: 0 }
            }
            PcapError::ReadError => io_error(error),
            other => CaptureError::Corrupt { offset: 0, packets: 0, reason: format!("bad file header: {other}") },
        };
        let inner = match format {
            CaptureFormat::Pcap { .. } => {
                Inner::Pcap(LegacyPcapReader::new(BUFFER, input).map_err(|e| header_error(e, &error))?)
            }
            CaptureFormat::PcapNg => {
                Inner::PcapNg(PcapNGReader::new(BUFFER, input).map_err(|e| header_error(e, &error))?)
            }
        };
        let mut reader = CaptureReader {
            inner,
            format,
            interfaces: Vec::new(),
            ng_big_endian: false,
            pending: 0,
            error,
            stats: CaptureStats::default(),
            capacity: BUFFER,
            last_ts: Duration::ZERO,
            scratch: Vec::new(),
        };
        if let Inner::Pcap(r) = &mut reader.inner {
            // The legacy reader hands out the file header as its first block.
            let (len, linktype, snaplen) = match r.next() {
                Ok((len, PcapBlockOwned::LegacyHeader(h))) => (len, h.network.0, h.snaplen),
                _ => {
                    return Err(CaptureError::Corrupt { offset: 0, packets: 0, reason: "bad file header".into() });
                }
            };
            reader.pending = len;
            if !linktype_supported(linktype) {
                return Err(CaptureError::UnsupportedLinkType { linktype, interface: 0 });
            }
            let units = match reader.format {
                CaptureFormat::Pcap { nanosecond: true, .. } => 1_000_000_000,
                _ => 1_000_000,
            };
            reader.interfaces.push(Interface { linktype, snaplen, units, offset: 0 });
        }
        Ok(reader)
    }

    /// The container format.
    pub fn format(&self) -> CaptureFormat {
        self.format
    }

    /// Counts so far.
    pub fn stats(&self) -> CaptureStats {
        self.stats
    }

    /// Byte offset of the record being parsed (a failed one is not consumed).
    fn offset(&mut self) -> u64 {
        self.inner.it().consumed() as u64
    }

    /// The next IPv4 datagram, or `None` at the end of the capture.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'_>>, CaptureError> {
        loop {
            if self.pending > 0 {
                let n = std::mem::take(&mut self.pending);
                self.inner.it().consume(n);
            }
            let step = self.step();
            match step {
                Step::Again => {}
                Step::Eof => return Ok(None),
                Step::Packet { ts, interface, origlen } => {
                    self.stats.packets += 1;
                    let iface = self.interfaces[interface as usize];
                    let captured = self.scratch.len();
                    if (origlen as usize) > captured {
                        self.stats.snapped += 1;
                    }
                    match decode_link(iface.linktype, &self.scratch) {
                        Frame::Ipv4(ip) => {
                            let start = captured - ip.len();
                            self.stats.ipv4 += 1;
                            return Ok(Some(Packet { ts, number: self.stats.packets, data: &self.scratch[start..] }));
                        }
                        Frame::Short => {
                            self.stats.short_frames += 1;
                            return Ok(Some(Packet { ts, number: self.stats.packets, data: &[] }));
                        }
                        Frame::Other => self.stats.non_ipv4 += 1,
                    }
                }
                Step::Refill => {
                    let before = self.inner.it().data().len();
                    if self.inner.it().refill().is_err() {
                        return Err(io_error(&self.error));
                    }
                    let it = self.inner.it();
                    if it.data().len() == before && !it.reader_exhausted() {
                        // The buffer is full and the parser still wants more.
                        self.grow()?;
                    }
                }
                Step::Grow => {
                    self.grow()?;
                    if self.inner.it().refill().is_err() {
                        return Err(io_error(&self.error));
                    }
                }
                Step::Truncated => {
                    return Err(CaptureError::Truncated { offset: self.offset(), packets: self.stats.packets });
                }
                Step::Failed(reason) => {
                    let (offset, packets) = (self.offset(), self.stats.packets);
                    return Err(CaptureError::Corrupt { offset, packets, reason: reason.to_string() });
                }
                Step::ReadFailed => return Err(io_error(&self.error)),
                Step::Unsupported { linktype, interface } => {
                    return Err(CaptureError::UnsupportedLinkType { linktype, interface });
                }
            }
        }
    }

    /// Doubles the read buffer, for a record that does not fit.
    fn grow(&mut self) -> Result<(), CaptureError> {
        let want = self.capacity * 2;
        if want > MAX_RECORD || !self.inner.it().grow(want) {
            let offset = self.offset();
            return Err(CaptureError::Corrupt {
                offset,
                packets: self.stats.packets,
                reason: format!("record longer than {} MiB", MAX_RECORD >> 20),
            });
        }
        self.capacity = want;
        Ok(())
    }

    /// Parses one block. Errors that need the reader's offset are returned as steps.
    fn step(&mut self) -> Step {
        let result = self.inner.it().next();
        let (len, block) = match result {
            Ok(ok) => ok,
            Err(PcapError::Eof) => return Step::Eof,
            Err(PcapError::Incomplete(_)) => return Step::Refill,
            Err(PcapError::BufferTooSmall) => return Step::Grow,
            Err(PcapError::UnexpectedEof) => return Step::Truncated,
            Err(PcapError::ReadError) => return Step::ReadFailed,
            Err(PcapError::HeaderNotRecognized) => return Step::Failed("unrecognised block"),
            Err(PcapError::NomError(..) | PcapError::OwnedNomError(..)) => {
                return Step::Failed("malformed block or record");
            }
        };
        self.pending = len;
        match block {
            PcapBlockOwned::LegacyHeader(_) => Step::Again,
            PcapBlockOwned::Legacy(b) => {
                let iface = self.interfaces[0];
                let nanos = if iface.units == 1_000_000_000 { b.ts_usec } else { b.ts_usec.saturating_mul(1000) };
                self.scratch.clear();
                self.scratch.extend_from_slice(b.data);
                // Duration::new carries excess nanoseconds into the seconds.
                let ts = Duration::new(b.ts_sec as u64, 0) + Duration::from_nanos(nanos as u64);
                Step::Packet { ts, interface: 0, origlen: b.origlen }
            }
            PcapBlockOwned::NG(Block::SectionHeader(shb)) => {
                self.ng_big_endian = shb.big_endian();
                self.interfaces.clear();
                Step::Again
            }
            PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                let Some(units) = ts_units(idb.if_tsresol) else {
                    return Step::Failed("interface with an impossible if_tsresol");
                };
                // pcap-parser decodes if_tsoffset as little-endian only.
                let mut offset = 0i64;
                for opt in &idb.options {
                    if opt.code.0 == 14 && opt.value.len() >= 8 {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&opt.value[..8]);
                        offset = if self.ng_big_endian { i64::from_be_bytes(v) } else { i64::from_le_bytes(v) };
                    }
                }
                self.interfaces.push(Interface { linktype: idb.linktype.0, snaplen: idb.snaplen, units, offset });
                Step::Again
            }
            PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                let Some(iface) = self.interfaces.get(epb.if_id as usize).copied() else {
                    return Step::Failed("packet on an interface no block described");
                };
                if !linktype_supported(iface.linktype) {
                    return Step::Unsupported { linktype: iface.linktype, interface: epb.if_id };
                }
                let raw = ((epb.ts_high as u64) << 32) | epb.ts_low as u64;
                let ts = ng_timestamp(raw, iface.units, iface.offset);
                self.last_ts = ts;
                let caplen = (epb.caplen as usize).min(epb.data.len());
                self.scratch.clear();
                self.scratch.extend_from_slice(&epb.data[..caplen]);
                Step::Packet { ts, interface: epb.if_id, origlen: epb.origlen }
            }
            PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
                let Some(iface) = self.interfaces.first().copied() else {
                    return Step::Failed("simple packet block before any interface block");
                };
                if !linktype_supported(iface.linktype) {
                    return Step::Unsupported { linktype: iface.linktype, interface: 0 };
                }
                let mut caplen = (spb.origlen as usize).min(spb.data.len());
                if iface.snaplen > 0 {
                    caplen = caplen.min(iface.snaplen as usize);
                }
                self.scratch.clear();
                self.scratch.extend_from_slice(&spb.data[..caplen]);
                Step::Packet { ts: self.last_ts, interface: 0, origlen: spb.origlen }
            }
            PcapBlockOwned::NG(_) => Step::Again,
        }
    }
}

/// Timestamp units per second for an `if_tsresol` value: 10^n, or 2^n with the top bit set.
fn ts_units(tsresol: u8) -> Option<u64> {
    let n = (tsresol & 0x7f) as u32;
    if tsresol & 0x80 == 0 { 10u64.checked_pow(n) } else { 1u64.checked_shl(n).filter(|_| n < 64) }
}

fn io_error(slot: &Arc<Mutex<Option<io::Error>>>) -> CaptureError {
    let kept = slot.lock().ok().and_then(|mut s| s.take());
    CaptureError::Io(kept.unwrap_or_else(|| io::Error::other("read failed")))
}

/// `raw` units of `1/units` s since the epoch, plus `offset` seconds; clamped at 0.
fn ng_timestamp(raw: u64, units: u64, offset: i64) -> Duration {
    let secs = (raw / units) as i128 + offset as i128;
    let nanos = ((raw % units) as u128 * 1_000_000_000 / units as u128) as u32;
    if secs < 0 {
        return Duration::ZERO;
    }
    Duration::new(secs.min(u64::MAX as i128) as u64, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic pcap file: header in either byte order, records of (sec, frac, captured, origlen).
    fn classic(big_endian: bool, nanos: bool, linktype: u32, records: &[(u32, u32, &[u8], u32)]) -> Vec<u8> {
        let u32b = |v: u32| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let u16b = |v: u16| if big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
        let mut f = Vec::new();
        f.extend_from_slice(&u32b(if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }));
        f.extend_from_slice(&u16b(2));
        f.extend_from_slice(&u16b(4));
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&u32b(65535));
        f.extend_from_slice(&u32b(linktype));
        for (sec, frac, data, orig) in records {
            for v in [*sec, *frac, data.len() as u32, *orig] {
                f.extend_from_slice(&u32b(v));
            }
            f.extend_from_slice(data);
        }
        f
    }

    fn ng_block(kind: u32, body: &[u8]) -> Vec<u8> {
        let mut body = body.to_vec();
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
        let len = (body.len() + 12) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&body);
        b.extend_from_slice(&len.to_le_bytes());
        b
    }

    fn ng_shb() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(-1i64).to_le_bytes());
        ng_block(0x0a0d_0d0a, &body)
    }

    /// An interface description with optional if_tsresol and if_tsoffset.
    fn ng_idb(linktype: u16, tsresol: Option<u8>, tsoffset: Option<i64>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&linktype.to_le_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&0u32.to_le_bytes());
        if let Some(r) = tsresol {
            body.extend_from_slice(&[9, 0, 1, 0, r, 0, 0, 0]);
        }
        if let Some(o) = tsoffset {
            body.extend_from_slice(&[14, 0, 8, 0]);
            body.extend_from_slice(&o.to_le_bytes());
        }
        if tsresol.is_some() || tsoffset.is_some() {
            body.extend_from_slice(&[0, 0, 0, 0]);
        }
        ng_block(1, &body)
    }

    fn ng_epb(if_id: u32, ts: u64, data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for v in [if_id, (ts >> 32) as u32, ts as u32, data.len() as u32, data.len() as u32] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(data);
        ng_block(6, &body)
    }

    fn ipv4() -> Vec<u8> {
        let mut b =
            crate::segment::SegmentBuilder::new("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:80".parse().unwrap());
        b.flags = crate::segment::TcpFlags::SYN;
        b.build(b"")
    }

    fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// (timestamp, record number, datagram) of every packet handed out.
    type Packets = Vec<(Duration, u64, Vec<u8>)>;

    fn read_all(bytes: &[u8]) -> Result<(Packets, CaptureStats), CaptureError> {
        let mut r = CaptureReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(p) = r.next_packet()? {
            out.push((p.ts, p.number, p.data.to_vec()));
        }
        Ok((out, r.stats()))
    }

    #[test]
    fn classic_little_endian_ethernet_yields_ipv4_and_skips_arp() {
        let ip = ipv4();
        let arp = ether(0x0806, &[0; 28]);
        let f = classic(false, false, 1, &[(100, 250_000, &ether(0x0800, &ip), 0), (101, 0, &arp, 60)]);
        let (pkts, stats) = read_all(&f).unwrap();
        assert_eq!(pkts, vec![(Duration::new(100, 250_000_000), 1, ip)]);
        assert_eq!(stats, CaptureStats { packets: 2, ipv4: 1, non_ipv4: 1, short_frames: 0, snapped: 1 });
    }

    #[test]
    fn classic_big_endian_nanosecond_raw_ip_keeps_nanoseconds() {
        let ip = ipv4();
        for linktype in [101, 12, 14, 228] {
            let f = classic(true, true, linktype, &[(7, 123_456_789, &ip, ip.len() as u32)]);
            let mut r = CaptureReader::new(&f[..]).unwrap();
            assert_eq!(r.format(), CaptureFormat::Pcap { big_endian: true, nanosecond: true });
            let p = r.next_packet().unwrap().unwrap();
            assert_eq!(p.ts, Duration::new(7, 123_456_789));
            assert_eq!(p.data, &ip[..]);
            assert!(r.next_packet().unwrap().is_none());
        }
    }

    #[test]
    fn pcapng_interfaces_keep_their_own_link_type_and_clock() {
        let ip = ipv4();
        let mut sll2 = vec![0x08, 0x00, 0, 0, 0, 0, 0, 3, 0, 1, 4, 6];
        sll2.extend_from_slice(&[0; 8]);
        sll2.extend_from_slice(&ip);
        let mut f = ng_shb();
        f.extend(ng_idb(1, None, None)); // microseconds
        f.extend(ng_idb(276, Some(9), Some(1000))); // nanoseconds, +1000 s
        f.extend(ng_block(4, &[0, 0, 0, 0])); // a name resolution block, ignored
        f.extend(ng_epb(0, 5_000_001, &ether(0x0800, &ip)));
        f.extend(ng_epb(1, 2_000_000_007, &sll2));
        f.extend(ng_epb(1, 3_000_000_000, &{
            let mut v6 = sll2.clone();
            v6[..2].copy_from_slice(&0x86ddu16.to_be_bytes());
            v6
        }));
        let (pkts, stats) = read_all(&f).unwrap();
        assert_eq!(pkts.len(), 2);
        assert_eq!(pkts[0], (Duration::new(5, 1_000), 1, ip.clone()));
        assert_eq!(pkts[1], (Duration::new(1002, 7), 2, ip));
        assert_eq!(stats.non_ipv4, 1);
        assert_eq!(stats.packets, 3);
    }

    #[test]
    fn pcapng_binary_resolution_is_honoured() {
        let mut f = ng_shb();
        f.extend(ng_idb(101, Some(0x80 | 10), None)); // 1/1024 s
        f.extend(ng_epb(0, 1024 * 3 + 512, &ipv4()));
        let (pkts, _) = read_all(&f).unwrap();
        assert_eq!(pkts[0].0, Duration::new(3, 500_000_000));
    }

    #[test]
    fn link_layers_are_stripped() {
        let ip = [0x45u8, 1, 2, 3];
        let mut qinq = ether(0x88a8, &[0, 10, 0x81, 0x00, 0, 20, 0x08, 0x00]);
        qinq.extend_from_slice(&ip);
        assert_eq!(decode_link(1, &qinq), Frame::Ipv4(&ip));
        assert_eq!(decode_link(1, &ether(0x8100, &[0, 1])), Frame::Short);
        assert_eq!(decode_link(1, &ether(0x86dd, &ip)), Frame::Other);
        assert_eq!(decode_link(1, &[0; 13]), Frame::Short);
        let mut sll = vec![0, 0, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00];
        sll.extend_from_slice(&ip);
        assert_eq!(decode_link(113, &sll), Frame::Ipv4(&ip));
        assert_eq!(decode_link(113, &sll[..15]), Frame::Short);
        for family in [[2u8, 0, 0, 0], [0, 0, 0, 2]] {
            let mut null = family.to_vec();
            null.extend_from_slice(&ip);
            assert_eq!(decode_link(0, &null), Frame::Ipv4(&ip));
            assert_eq!(decode_link(108, &null), Frame::Ipv4(&ip));
        }
        assert_eq!(decode_link(0, &[30, 0, 0, 0, 0x60]), Frame::Other);
        assert_eq!(decode_link(101, &[0x60, 0, 0, 0]), Frame::Other);
        assert_eq!(decode_link(101, &[]), Frame::Short);
    }

    #[test]
    fn frame_cut_inside_its_link_header_is_an_empty_datagram() {
        let f = classic(false, false, 1, &[(1, 0, &[0u8; 10], 60)]);
        let (pkts, stats) = read_all(&f).unwrap();
        assert_eq!(pkts, vec![(Duration::new(1, 0), 1, vec![])]);
        assert_eq!(stats.short_frames, 1);
    }

    #[test]
    fn snapped_frame_is_handed_out_as_far_as_captured() {
        let ip = ipv4();
        let f = classic(false, false, 101, &[(1, 0, &ip[..30], ip.len() as u32)]);
        let (pkts, stats) = read_all(&f).unwrap();
        assert_eq!(pkts[0].2, &ip[..30]);
        assert_eq!(stats.snapped, 1);
        assert!(matches!(
            crate::segment::Segment::parse_ipv4(&pkts[0].2, crate::segment::Checksums::Verify),
            Err(crate::segment::ParseError::Truncated { .. })
        ));
    }

    #[test]
    fn non_captures_are_refused() {
        assert!(matches!(CaptureReader::new(&b""[..]), Err(CaptureError::NotCapture { found }) if found == "none"));
        let e = CaptureReader::new(&b"GET / HTTP/1.1\r\n"[..]).err().unwrap();
        assert_eq!(e.to_string(), "not a pcap or pcapng capture (first bytes: 47455420)");
    }

    #[test]
    fn truncated_header_and_record_report_where() {
        let ip = ipv4();
        let f = classic(false, false, 101, &[(1, 0, &ip, 0), (2, 0, &ip, 0)]);
        assert!(matches!(CaptureReader::new(&f[..10]), Err(CaptureError::Truncated { offset: 0, packets: 0 })));
        assert!(matches!(CaptureReader::new(&f[..2]), Err(CaptureError::Truncated { offset: 0, packets: 0 })));
        let cut = f.len() - 5;
        let mut r = CaptureReader::new(&f[..cut]).unwrap();
        assert!(r.next_packet().unwrap().is_some());
        let e = r.next_packet().err().unwrap();
        let second = 24 + 16 + ip.len() as u64;
        assert!(matches!(e, CaptureError::Truncated { offset, packets: 1 } if offset == second), "{e}");
        let mut ng = ng_shb();
        ng.extend(ng_idb(101, None, None));
        ng.extend(ng_epb(0, 0, &ip));
        let ng_cut = ng.len() - 3;
        let e = read_all(&ng[..ng_cut]).err().unwrap();
        assert!(matches!(e, CaptureError::Truncated { packets: 0, .. }), "{e}");
    }

    #[test]
    fn unsupported_link_types_name_the_number() {
        let f = classic(false, false, 105, &[]);
        let e = CaptureReader::new(&f[..]).err().unwrap();
        assert_eq!(e.to_string(), "unsupported link type 105 (IEEE802_11) on interface 0");
        let mut ng = ng_shb();
        ng.extend(ng_idb(1, None, None));
        ng.extend(ng_idb(147, None, None));
        ng.extend(ng_epb(0, 0, &ether(0x0800, &ipv4())));
        ng.extend(ng_epb(1, 0, &[1, 2, 3]));
        let mut r = CaptureReader::new(&ng[..]).unwrap();
        assert!(r.next_packet().unwrap().is_some());
        assert!(matches!(
            r.next_packet().err().unwrap(),
            CaptureError::UnsupportedLinkType { linktype: 147, interface: 1 }
        ));
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        // A caplen far beyond any sane record.
        let mut f = classic(false, false, 101, &[]);
        f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
        f.extend_from_slice(&[0u8; 100]);
        assert!(read_all(&f).is_err());
        // A pcapng packet on an interface never described.
        let mut ng = ng_shb();
        let at = ng.len() as u64;
        ng.extend(ng_epb(3, 0, &ipv4()));
        assert!(matches!(read_all(&ng), Err(CaptureError::Corrupt { offset, packets: 0, .. }) if offset == at));
        // A block whose trailing length disagrees.
        let mut ng = ng_shb();
        ng.extend(ng_idb(101, None, None));
        let mut epb = ng_epb(0, 0, &ipv4());
        let n = epb.len();
        epb[n - 4] ^= 0x40;
        ng.extend(epb);
        assert!(matches!(read_all(&ng), Err(CaptureError::Corrupt { .. })));
        // Every prefix of a valid file is an error or a shorter read, never a panic.
        let mut ng = ng_shb();
        ng.extend(ng_idb(1, Some(9), None));
        ng.extend(ng_epb(0, 9, &ether(0x0800, &ipv4())));
        for n in 0..ng.len() {
            let _ = read_all(&ng[..n]);
        }
    }

    /// Hands out one byte per read, as a slow pipe might.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }

    #[test]
    fn short_reads_and_records_larger_than_the_buffer_work() {
        let big = {
            let mut ip = ipv4();
            ip.resize(5 * BUFFER + 3, 0); // not valid IPv4 beyond the header, but a valid record
            ip
        };
        let ip = ipv4();
        let f = classic(false, false, 101, &[(1, 0, &ip, 0), (2, 0, &big, 0), (3, 0, &ip, 0)]);
        let mut r = CaptureReader::new(Trickle(&f)).unwrap();
        let mut lens = Vec::new();
        while let Some(p) = r.next_packet().unwrap() {
            lens.push(p.data.len());
        }
        assert_eq!(lens, vec![ip.len(), big.len(), ip.len()]);
    }

    #[test]
    fn io_errors_surface_as_io() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::PermissionDenied, "nope"))
            }
        }
        assert!(matches!(CaptureReader::new(Broken), Err(CaptureError::Io(_))));
        let f = classic(false, false, 101, &[(1, 0, &ipv4(), 0)]);
        let failing = (&f[..]).chain(Broken);
        let mut r = CaptureReader::new(failing).unwrap();
        // The whole file fits in the first read; the error comes on the refill at its end.
        assert!(r.next_packet().unwrap().is_some());
        assert!(matches!(r.next_packet(), Err(CaptureError::Io(e)) if e.kind() == io::ErrorKind::PermissionDenied));
    }
}
