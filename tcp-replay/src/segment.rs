//! IPv4/TCP segment views.
//!
//! Read RFC 791 (IPv4 header), RFC 9293 §3.1 (TCP header), RFC 7323 (window scale,
//! timestamps) and RFC 2018 (SACK). Every length in the input is checked once, before
//! any field is read, so no getter can panic on hostile input. A segment whose
//! checksum is wrong is rejected: the receiving kernel would drop it, so it must not
//! change tracked state.

use crate::seq::Seq;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::tcp::TcpPacket;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Why a buffer is not a usable IPv4/TCP segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than a header (or the length a header claims) needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// IP version other than 4.
    #[error("not IPv4 (version {0})")]
    NotIpv4(u8),
    /// IP protocol other than TCP.
    #[error("not TCP (IP protocol {0})")]
    NotTcp(u8),
    /// A header length field smaller than the fixed header or larger than the packet.
    #[error("impossible {layer} header length {len}")]
    BadHeaderLength { layer: &'static str, len: usize },
    /// A fragment: TCP is only parsed from unfragmented datagrams.
    #[error("IPv4 fragment")]
    Fragment,
    /// IPv4 header checksum mismatch.
    #[error("bad IPv4 header checksum")]
    BadIpChecksum,
    /// TCP checksum mismatch.
    #[error("bad TCP checksum")]
    BadTcpChecksum,
    /// A TCP option whose length runs past the header or is below 2.
    #[error("malformed TCP option kind {kind}")]
    BadOption { kind: u8 },
}

/// Whether to verify checksums while parsing.
///
/// Captures taken on the sending host with checksum offload carry unfinished
/// checksums on outbound segments; `Skip` exists for those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksums {
    #[default]
    Verify,
    Skip,
}

/// TCP header flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    #[inline]
    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    #[inline]
    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    #[inline]
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    #[inline]
    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
}

impl std::fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        let set: Vec<&str> = (0..8).filter(|i| self.0 & (1 << i) != 0).map(|i| NAMES[i]).collect();
        write!(f, "[{}]", set.join("|"))
    }
}

/// RFC 7323 timestamps option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamps {
    pub val: u32,
    pub ecr: u32,
}

/// The TCP options the tracker uses. `Copy` and allocation-free on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamps: Option<Timestamps>,
    sack_blocks: [(Seq, Seq); 4],
    sack_len: u8,
}

impl TcpOptions {
    /// SACK blocks (left edge, right edge) carried by the segment.
    pub fn sack(&self) -> &[(Seq, Seq)] {
        &self.sack_blocks[..self.sack_len as usize]
    }

    /// Appends a SACK block; at most four fit in a TCP header, the rest are ignored.
    pub fn push_sack(&mut self, left: Seq, right: Seq) {
        if (self.sack_len as usize) < self.sack_blocks.len() {
            self.sack_blocks[self.sack_len as usize] = (left, right);
            self.sack_len += 1;
        }
    }

    /// Parses the options area of a TCP header (RFC 9293 §3.2).
    pub fn parse(mut opts: &[u8]) -> Result<TcpOptions, ParseError> {
        let mut out = TcpOptions::default();
        while let Some(&kind) = opts.first() {
            match kind {
                0 => break,
                1 => {
                    opts = &opts[1..];
                    continue;
                }
                _ => {}
            }
            let len = *opts.get(1).ok_or(ParseError::BadOption { kind })? as usize;
            if len < 2 || len > opts.len() {
                return Err(ParseError::BadOption { kind });
            }
            let body = &opts[2..len];
            match (kind, body.len()) {
                (2, 2) => out.mss = Some(u16::from_be_bytes([body[0], body[1]])),
                (3, 1) => out.wscale = Some(body[0]),
                (4, 0) => out.sack_permitted = true,
                (5, n) if n % 8 == 0 => {
                    for b in body.chunks_exact(8) {
                        let l = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        let r = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                        out.push_sack(Seq(l), Seq(r));
                    }
                }
                (8, 8) => {
                    out.timestamps = Some(Timestamps {
                        val: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        ecr: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    })
                }
                (2 | 3 | 4 | 5 | 8, _) => return Err(ParseError::BadOption { kind }),
                _ => {} // Unknown options are skipped by length, as a receiver does.
            }
            opts = &opts[len..];
        }
        Ok(out)
    }
}

/// A parsed IPv4/TCP segment borrowing its payload from the packet buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: TcpFlags,
    pub seq: Seq,
    pub ack: Seq,
    /// Raw (unscaled) window field.
    pub window: u16,
    pub options: TcpOptions,
    pub payload: &'a [u8],
}

impl<'a> Segment<'a> {
    /// Parses an IPv4 datagram carrying one TCP segment. Trailing bytes after the
    /// IPv4 total length (Ethernet padding) are ignored.
    pub fn parse_ipv4(packet: &'a [u8], checksums: Checksums) -> Result<Segment<'a>, ParseError> {
        let have = packet.len();
        if have < 20 {
            return Err(ParseError::Truncated { need: 20, have });
        }
        let version = packet[0] >> 4;
        if version != 4 {
            return Err(ParseError::NotIpv4(version));
        }
        let ihl = ((packet[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
        if ihl < 20 || ihl > total {
            return Err(ParseError::BadHeaderLength { layer: "IPv4", len: ihl });
        }
        if total > have {
            return Err(ParseError::Truncated { need: total, have });
        }
        let packet = &packet[..total];
        // Lengths are valid from here on, so pnet's fixed-field getters cannot panic.
        let ip = Ipv4Packet::new(packet).ok_or(ParseError::Truncated { need: 20, have })?;
        let frag = u16::from_be_bytes([packet[6], packet[7]]);
        if frag & 0x3fff != 0 {
            return Err(ParseError::Fragment);
        }
        let proto = ip.get_next_level_protocol().0;
        if proto != 6 {
            return Err(ParseError::NotTcp(proto));
        }
        if checksums == Checksums::Verify && ones_complement_sum(&packet[..ihl], 0) != 0xffff {
            return Err(ParseError::BadIpChecksum);
        }
        let src_ip = ip.get_source();
        let dst_ip = ip.get_destination();
        let tcp_bytes = &packet[ihl..];
        if tcp_bytes.len() < 20 {
            return Err(ParseError::Truncated { need: ihl + 20, have: total });
        }
        let doff = ((tcp_bytes[12] >> 4) as usize) * 4;
        if doff < 20 || doff > tcp_bytes.len() {
            return Err(ParseError::BadHeaderLength { layer: "TCP", len: doff });
        }
        if checksums == Checksums::Verify && !tcp_checksum_ok(src_ip, dst_ip, tcp_bytes) {
            return Err(ParseError::BadTcpChecksum);
        }
        let tcp = TcpPacket::new(tcp_bytes).ok_or(ParseError::Truncated { need: 20, have })?;
        let options = TcpOptions::parse(&tcp_bytes[20..doff])?;
        Ok(Segment {
            src: SocketAddrV4::new(src_ip, tcp.get_source()),
            dst: SocketAddrV4::new(dst_ip, tcp.get_destination()),
            flags: TcpFlags(tcp_bytes[13]),
            seq: Seq(tcp.get_sequence()),
            ack: Seq(tcp.get_acknowledgement()),
            window: tcp.get_window(),
            options,
            payload: &tcp_bytes[doff..],
        })
    }

    /// Sequence space the segment occupies: payload plus one each for SYN and FIN.
    #[inline]
    pub fn seq_len(&self) -> u32 {
        self.payload.len() as u32 + self.flags.syn() as u32 + self.flags.fin() as u32
    }
}

/// RFC 1071 ones' complement sum, folded to 16 bits, starting from `initial`.
pub fn ones_complement_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64
            + u16::from_be_bytes([c[2], c[3]]) as u64
            + u16::from_be_bytes([c[4], c[5]]) as u64
            + u16::from_be_bytes([c[6], c[7]]) as u64;
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = rest.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u16::from_be_bytes([s[0], s[1]]) as u32
        + u16::from_be_bytes([s[2], s[3]]) as u32
        + u16::from_be_bytes([d[0], d[1]]) as u32
        + u16::from_be_bytes([d[2], d[3]]) as u32
        + 6
        + tcp_len as u32
}

fn tcp_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8]) -> bool {
    ones_complement_sum(tcp, pseudo_header_sum(src, dst, tcp.len())) == 0xffff
}

/// Computes the TCP checksum for a segment whose checksum field is zero.
pub fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8]) -> u16 {
    !ones_complement_sum(tcp, pseudo_header_sum(src, dst, tcp.len()))
}

/// Builds a well-formed IPv4/TCP datagram with valid checksums. Used by tests,
/// fuzz seeds and anyone who needs to inject a segment.
#[derive(Debug, Clone)]
pub struct SegmentBuilder {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub seq: Seq,
    pub ack: Seq,
    pub window: u16,
    pub options: TcpOptions,
}

impl SegmentBuilder {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        SegmentBuilder {
            src,
            dst,
            flags: TcpFlags::ACK,
            seq: Seq(0),
            ack: Seq(0),
            window: 65535,
            options: TcpOptions::default(),
        }
    }

    /// Serialises the segment with `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut opts = Vec::with_capacity(40);
        if let Some(mss) = self.options.mss {
            opts.extend_from_slice(&[2, 4]);
            opts.extend_from_slice(&mss.to_be_bytes());
        }
        if self.options.sack_permitted {
            opts.extend_from_slice(&[4, 2]);
        }
        if let Some(ts) = self.options.timestamps {
            opts.extend_from_slice(&[8, 10]);
            opts.extend_from_slice(&ts.val.to_be_bytes());
            opts.extend_from_slice(&ts.ecr.to_be_bytes());
        }
        if let Some(ws) = self.options.wscale {
            opts.extend_from_slice(&[1, 3, 3, ws]);
        }
        let sack = self.options.sack();
        if !sack.is_empty() {
            opts.extend_from_slice(&[1, 1, 5, 2 + 8 * sack.len() as u8]);
            for (l, r) in sack {
                opts.extend_from_slice(&l.0.to_be_bytes());
                opts.extend_from_slice(&r.0.to_be_bytes());
            }
        }
        while opts.len() % 4 != 0 {
            opts.push(0);
        }
        let tcp_len = 20 + opts.len() + payload.len();
        let total = 20 + tcp_len;
        let mut p = Vec::with_capacity(total);
        p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&self.src.ip().octets());
        p.extend_from_slice(&self.dst.ip().octets());
        let ipsum = !ones_complement_sum(&p[..20], 0);
        p[10..12].copy_from_slice(&ipsum.to_be_bytes());
        p.extend_from_slice(&self.src.port().to_be_bytes());
        p.extend_from_slice(&self.dst.port().to_be_bytes());
        p.extend_from_slice(&self.seq.0.to_be_bytes());
        p.extend_from_slice(&self.ack.0.to_be_bytes());
        p.push((((20 + opts.len()) / 4) as u8) << 4);
        p.push(self.flags);
        p.extend_from_slice(&self.window.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(&opts);
        p.extend_from_slice(payload);
        let sum = tcp_checksum(*self.src.ip(), *self.dst.ip(), &p[20..]);
        p[36..38].copy_from_slice(&sum.to_be_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn sample() -> SegmentBuilder {
        let mut b = SegmentBuilder::new(addr("10.0.0.1:40000"), addr("10.0.0.2:80"));
        b.flags = TcpFlags::SYN;
        b.seq = Seq(0xffff_fff0);
        b.options.mss = Some(1460);
        b.options.wscale = Some(7);
        b.options.sack_permitted = true;
        b.options.timestamps = Some(Timestamps { val: 123, ecr: 0 });
        b
    }

    #[test]
    fn syn_with_all_options_round_trips() {
        let bytes = sample().build(b"");
        let s = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
        assert_eq!(s.src, addr("10.0.0.1:40000"));
        assert_eq!(s.dst, addr("10.0.0.2:80"));
        assert!(s.flags.syn() && !s.flags.ack());
        assert_eq!(s.seq, Seq(0xffff_fff0));
        assert_eq!(s.options.mss, Some(1460));
        assert_eq!(s.options.wscale, Some(7));
        assert!(s.options.sack_permitted);
        assert_eq!(s.options.timestamps, Some(Timestamps { val: 123, ecr: 0 }));
        assert_eq!(s.seq_len(), 1);
    }

    #[test]
    fn data_segment_with_sack_blocks_and_padding_parses() {
        let mut b = sample();
        b.flags = TcpFlags::ACK | TcpFlags::PSH | TcpFlags::FIN;
        b.options = TcpOptions::default();
        b.options.push_sack(Seq(10), Seq(20));
        b.options.push_sack(Seq(30), Seq(40));
        let mut bytes = b.build(b"hello");
        bytes.extend_from_slice(&[0; 6]); // Ethernet minimum-frame padding
        let s = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
        assert_eq!(s.payload, b"hello");
        assert_eq!(s.options.sack(), &[(Seq(10), Seq(20)), (Seq(30), Seq(40))]);
        assert_eq!(s.seq_len(), 6);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample().build(b"payload");
        for n in 0..bytes.len() {
            assert!(Segment::parse_ipv4(&bytes[..n], Checksums::Skip).is_err(), "len {n}");
        }
    }

    #[test]
    fn impossible_header_lengths_are_rejected() {
        let mut bytes = sample().build(b"x");
        bytes[0] = 0x44; // IHL 16 bytes
        assert!(matches!(
            Segment::parse_ipv4(&bytes, Checksums::Skip),
            Err(ParseError::BadHeaderLength { layer: "IPv4", .. })
        ));
        let mut bytes = sample().build(b"x");
        bytes[32] = 0xf0; // data offset 60 > segment
        assert!(matches!(
            Segment::parse_ipv4(&bytes, Checksums::Skip),
            Err(ParseError::BadHeaderLength { layer: "TCP", .. })
        ));
        let mut bytes = sample().build(b"x");
        bytes[2..4].copy_from_slice(&4000u16.to_be_bytes());
        assert!(matches!(Segment::parse_ipv4(&bytes, Checksums::Skip), Err(ParseError::Truncated { need: 4000, .. })));
    }

    #[test]
    fn corrupted_bytes_fail_the_checksum() {
        let good = sample().build(b"abc");
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(Segment::parse_ipv4(&bad, Checksums::Verify), Err(ParseError::BadTcpChecksum));
        assert!(Segment::parse_ipv4(&bad, Checksums::Skip).is_ok());
        let mut bad = good.clone();
        bad[8] = 1; // TTL
        assert_eq!(Segment::parse_ipv4(&bad, Checksums::Verify), Err(ParseError::BadIpChecksum));
    }

    #[test]
    fn fragments_and_other_protocols_are_refused() {
        let mut bytes = sample().build(b"x");
        bytes[6] = 0x20; // MF
        assert_eq!(Segment::parse_ipv4(&bytes, Checksums::Skip), Err(ParseError::Fragment));
        let mut bytes = sample().build(b"x");
        bytes[9] = 17;
        assert_eq!(Segment::parse_ipv4(&bytes, Checksums::Skip), Err(ParseError::NotTcp(17)));
        let mut bytes = sample().build(b"x");
        bytes[0] = 0x65;
        assert_eq!(Segment::parse_ipv4(&bytes, Checksums::Skip), Err(ParseError::NotIpv4(6)));
    }

    #[test]
    fn malformed_options_are_errors() {
        assert_eq!(TcpOptions::parse(&[2, 4, 5]), Err(ParseError::BadOption { kind: 2 }));
        assert_eq!(TcpOptions::parse(&[8, 1]), Err(ParseError::BadOption { kind: 8 }));
        assert_eq!(TcpOptions::parse(&[3, 4, 7, 0]), Err(ParseError::BadOption { kind: 3 }));
        assert_eq!(TcpOptions::parse(&[30]), Err(ParseError::BadOption { kind: 30 }));
        // Unknown option skipped by its length; EOL ends parsing.
        let o = TcpOptions::parse(&[30, 3, 9, 1, 4, 2, 0, 2, 4]).unwrap();
        assert!(o.sack_permitted);
        assert_eq!(o.mss, None);
    }

    #[test]
    fn checksum_matches_a_known_vector() {
        // RFC 1071 §3 example.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ones_complement_sum(&data, 0), 0xddf2);
    }
}
