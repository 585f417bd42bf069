//! What `us-corrupt` (tests/bin/corrupt.rs, `scripts/faults corrupt`) does to one replication segment, as
//! pure functions over an IPv4 datagram: alter a byte of its TCP payload and fix the TCP checksum, so the
//! receiving kernel delivers the segment and only the replication link's own checks can catch it.
//!
//! Two ways, as `shared/src/auth.rs` tells them apart:
//! * [`Mode::Wire`]: a byte flipped anywhere in the payload, as a faulty NIC or middlebox would: the frame
//!   CRC (`shared/src/frame.rs`) catches it (or the length check, if it hit a length field).
//! * [`Mode::Tamper`]: a byte flipped inside the payload of a frame lying whole in the segment, and that
//!   frame's CRC recomputed, as an attacker would: only the frame's HMAC tag catches it. A complete frame
//!   is found without following the stream: an offset where a length, a CRC and a payload of that length
//!   whose CRC-32 matches line up (a false match has odds of 2^-32).

use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::tcp::{MutableTcpPacket, TcpPacket, ipv4_checksum};

/// Bytes of a frame header: length and CRC-32, both big-endian.
const FRAME_HEADER: usize = 8;
/// A frame after the handshake carries at least its 32-byte tag.
const MIN_TAGGED_PAYLOAD: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Wire,
    Tamper,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "wire" => Ok(Mode::Wire),
            "tamper" => Ok(Mode::Tamper),
            _ => Err(format!("unknown mode {s:?}: want wire or tamper")),
        }
    }
}

/// What was altered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Altered {
    /// Offset of the flipped byte in the TCP payload.
    pub at: usize,
    pub xor: u8,
    /// Tamper: the frame's offset in the payload and its payload length.
    pub frame: Option<(usize, usize)>,
}

/// The TCP payload's range in an IPv4 datagram, if it is TCP with a payload.
pub fn tcp_payload(datagram: &[u8]) -> Option<std::ops::Range<usize>> {
    let ip = Ipv4Packet::new(datagram)?;
    if ip.get_next_level_protocol().0 != 6 || ip.get_fragment_offset() != 0 {
        return None;
    }
    let ihl = ip.get_header_length() as usize * 4;
    let total = (ip.get_total_length() as usize).min(datagram.len());
    let tcp = TcpPacket::new(datagram.get(ihl..total)?)?;
    let start = ihl + tcp.get_data_offset() as usize * 4;
    (start < total).then_some(start..total)
}

/// The first complete frame in `payload` at or after `from`: (offset, frame payload length).
pub fn find_frame(payload: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut k = from;
    while k + FRAME_HEADER + MIN_TAGGED_PAYLOAD <= payload.len() {
        let len = u32::from_be_bytes(payload[k..k + 4].try_into().ok()?) as usize;
        let end = k + FRAME_HEADER + len;
        if len >= MIN_TAGGED_PAYLOAD && end <= payload.len() {
            let crc = u32::from_be_bytes(payload[k + 4..k + 8].try_into().ok()?);
            if crc32fast::hash(&payload[k + FRAME_HEADER..end]) == crc {
                return Some((k, len));
            }
        }
        k += 1;
    }
    None
}

/// Alters `datagram` (an IPv4 TCP segment) in place by `mode`; `pick` chooses the byte (any `u64`,
/// reduced here) and `xor` is the nonzero mask. `None` when there is nothing to alter: no payload, or
/// (tamper) no whole frame in it.
pub fn alter(datagram: &mut [u8], mode: Mode, pick: u64, xor: u8) -> Option<Altered> {
    let xor = if xor == 0 { 0x5a } else { xor };
    let range = tcp_payload(datagram)?;
    let payload = &mut datagram[range.clone()];
    let altered = match mode {
        Mode::Wire => {
            let at = (pick % payload.len() as u64) as usize;
            payload[at] ^= xor;
            Altered { at, xor, frame: None }
        }
        Mode::Tamper => {
            let (k, len) = find_frame(payload, 0)?;
            let at = k + FRAME_HEADER + (pick % len as u64) as usize;
            payload[at] ^= xor;
            let crc = crc32fast::hash(&payload[k + FRAME_HEADER..k + FRAME_HEADER + len]);
            payload[k + 4..k + 8].copy_from_slice(&crc.to_be_bytes());
            Altered { at, xor, frame: Some((k, len)) }
        }
    };
    fix_tcp_checksum(datagram)?;
    Some(altered)
}

/// Recomputes the TCP checksum of an IPv4 datagram.
pub fn fix_tcp_checksum(datagram: &mut [u8]) -> Option<()> {
    let ip = Ipv4Packet::new(datagram)?;
    let (src, dst) = (ip.get_source(), ip.get_destination());
    let ihl = ip.get_header_length() as usize * 4;
    let total = (ip.get_total_length() as usize).min(datagram.len());
    let mut tcp = MutableTcpPacket::new(&mut datagram[ihl..total])?;
    let sum = ipv4_checksum(&tcp.to_immutable(), &src, &dst);
    tcp.set_checksum(sum);
    Some(())
}

/// Whether the TCP checksum of an IPv4 datagram is right.
pub fn tcp_checksum_ok(datagram: &[u8]) -> bool {
    let Some(ip) = Ipv4Packet::new(datagram) else { return false };
    let ihl = ip.get_header_length() as usize * 4;
    let total = (ip.get_total_length() as usize).min(datagram.len());
    let Some(tcp) = TcpPacket::new(&datagram[ihl..total]) else { return false };
    tcp.get_checksum() == ipv4_checksum(&tcp, &ip.get_source(), &ip.get_destination())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::ipv4::MutableIpv4Packet;
    use std::net::Ipv4Addr;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    /// An IPv4/TCP datagram (no options) carrying `payload`, with correct checksums.
    fn datagram(payload: &[u8]) -> Vec<u8> {
        let total = 20 + 20 + payload.len();
        let mut d = vec![0u8; total];
        {
            let mut ip = MutableIpv4Packet::new(&mut d).unwrap();
            ip.set_version(4);
            ip.set_header_length(5);
            ip.set_total_length(total as u16);
            ip.set_ttl(64);
            ip.set_next_level_protocol(pnet_packet::ip::IpNextHeaderProtocols::Tcp);
            ip.set_source(Ipv4Addr::new(10, 1, 0, 2));
            ip.set_destination(Ipv4Addr::new(10, 1, 0, 3));
        }
        {
            let mut tcp = MutableTcpPacket::new(&mut d[20..]).unwrap();
            tcp.set_source(7700);
            tcp.set_destination(40000);
            tcp.set_data_offset(5);
            tcp.set_sequence(0xffff_fff0);
        }
        d[40..].copy_from_slice(payload);
        fix_tcp_checksum(&mut d).unwrap();
        d
    }

    #[test]
    fn tamper_flips_a_byte_inside_a_whole_frame_and_fixes_both_checksums() {
        let body: Vec<u8> = (0..80u8).collect();
        // The segment starts in the middle of an earlier frame, then holds one whole frame, then a cut one.
        let mut payload = vec![0xee; 13];
        let whole = frame(&body);
        payload.extend_from_slice(&whole);
        payload.extend_from_slice(&frame(&body)[..20]);
        let mut d = datagram(&payload);
        assert!(tcp_checksum_ok(&d));
        let a = alter(&mut d, Mode::Tamper, 1_000_003, 0x01).expect("a whole frame to tamper with");
        assert_eq!(a.frame, Some((13, 80)));
        assert!(tcp_checksum_ok(&d), "the TCP checksum is fixed");
        let p = &d[40..];
        let got = &p[13..13 + 88];
        assert_ne!(got, &whole[..], "a byte changed");
        assert_eq!(crc32fast::hash(&got[8..]), u32::from_be_bytes(got[4..8].try_into().unwrap()), "CRC fixed");
        assert_eq!(&got[..4], &whole[..4], "the length stays");
        let changed: Vec<usize> = (8..88).filter(|&i| got[i] != whole[i]).collect();
        assert_eq!(changed.len(), 1, "exactly one payload byte differs: {changed:?}");
    }

    #[test]
    fn tamper_leaves_a_segment_without_a_whole_frame() {
        let mut d = datagram(&frame(&[7u8; 100])[..60]);
        let before = d.clone();
        assert_eq!(alter(&mut d, Mode::Tamper, 5, 1), None);
        assert_eq!(d, before);
    }

    #[test]
    fn wire_flips_one_payload_byte_with_a_valid_tcp_checksum() {
        let payload = frame(&[9u8; 64]);
        let mut d = datagram(&payload);
        let a = alter(&mut d, Mode::Wire, 70, 0).expect("a payload to flip");
        assert_eq!((a.at, a.xor), (70, 0x5a));
        assert!(tcp_checksum_ok(&d));
        assert_eq!(d[40 + 70], payload[70] ^ 0x5a);
        assert_ne!(
            crc32fast::hash(&d[48..]),
            u32::from_be_bytes(d[44..48].try_into().unwrap()),
            "the CRC no longer matches"
        );
    }

    #[test]
    fn segments_without_payload_or_not_tcp_are_left_alone() {
        let mut d = datagram(&[]);
        assert_eq!(alter(&mut d, Mode::Wire, 1, 1), None);
        let mut udp = datagram(&[1, 2, 3]);
        udp[9] = 17;
        assert_eq!(alter(&mut udp, Mode::Wire, 1, 1), None);
        assert_eq!(alter(&mut [0u8; 10], Mode::Wire, 1, 1), None);
    }
}
