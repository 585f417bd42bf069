//! Length-prefixed, checksummed frames: how messages are cut out of the replication
//! TCP stream.
//!
//! # Wire format
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     payload length (u32)                      |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                    CRC-32 of payload (u32)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                payload (length bytes, bincode) ...            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! * Both header fields are big-endian (network byte order). The length counts the
//!   payload only, not the 8 header bytes. A zero length is a valid frame (it
//!   decodes to no message and is rejected one layer up).
//! * The CRC is CRC-32/ISO-HDLC (the zlib/Ethernet/PNG CRC: polynomial 0x04C11DB7
//!   reflected, init and xor-out 0xFFFFFFFF) over the payload bytes, as computed by
//!   `crc32fast`. TCP's own 16-bit checksum misses some corruptions (RFC 1071's sum is
//!   blind to reordered 16-bit words; offload engines and middleboxes have bugs); the
//!   replication stream decides what a client sees after a failover, so it carries
//!   its own.
//! * The payload is one `codec`-encoded message (bincode 2, standard config).
//! * A length above the configured maximum is rejected as soon as the 4 length bytes
//!   are in, before any buffer is grown for the payload: a hostile or corrupt prefix
//!   cannot make the receiver allocate gigabytes. The sender enforces the same maximum.
//!
//! Everything here is pure: [`parse`], [`decode`], [`encode`] and [`encode_value`]
//! work on byte buffers; [`FrameCodec`] plugs them into `tokio_util::codec`.

use crate::codec::{self, CodecError};
use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use tokio_util::codec::{Decoder, Encoder};

/// Bytes before the payload: length and CRC.
pub const HEADER_LEN: usize = 8;
/// Default maximum payload length.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// Largest maximum a codec accepts: what one payload decode may claim.
pub const MAX_FRAME_LIMIT: usize = codec::DECODE_LIMIT;

/// Why bytes from the wire are not a frame carrying a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload's CRC-32 differs from the header's: corrupted in transit or misframed.
    #[error("frame CRC mismatch: header says {expected:#010x}, payload has {actual:#010x} ({len} bytes)")]
    Crc { expected: u32, actual: u32, len: usize },
    /// The header announces a payload longer than the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized { len: u64, max: usize },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    /// The frame is intact but its payload is not a valid message.
    #[error("frame payload: {0}")]
    Payload(CodecError),
}

/// Why a frame could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload is longer than the maximum the peer accepts.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized { len: u64, max: usize },
    /// The value could not be encoded.
    #[error("frame payload: {0}")]
    Payload(CodecError),
}

/// Errors of [`FrameCodec`] (tokio_util codecs must absorb I/O errors).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Incoming bytes are not a valid frame or message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An outgoing value could not be framed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The underlying stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The state of a buffer's first frame, as found by [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not a whole frame yet; `need` is the total the frame needs (header only, if
    /// the header is incomplete).
    Incomplete { need: usize },
    /// A whole frame with a good CRC; it spans `frame_len` bytes of the buffer.
    Frame { payload: &'a [u8], frame_len: usize },
}

/// Looks at the first frame in `buf` without consuming it. Checks the length
/// against `max_frame` as soon as the header is in, and the CRC once the payload is.
pub fn parse(buf: &[u8], max_frame: usize) -> Result<Parsed<'_>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(Parsed::Incomplete { need: HEADER_LEN });
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let expected = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let max_frame = max_frame.min(MAX_FRAME_LIMIT);
    if len as usize > max_frame {
        return Err(DecodeError::Oversized { len: len.into(), max: max_frame });
    }
    let frame_len = HEADER_LEN + len as usize;
    let Some(payload) = buf.get(HEADER_LEN..frame_len) else {
        return Ok(Parsed::Incomplete { need: frame_len });
    };
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(DecodeError::Crc { expected, actual, len: payload.len() });
    }
    Ok(Parsed::Frame { payload, frame_len })
}

/// Removes the first whole frame from `src` and returns its payload, or returns
/// `None` (having reserved room for the rest of the frame) when it is incomplete.
pub fn decode(src: &mut BytesMut, max_frame: usize) -> Result<Option<BytesMut>, DecodeError> {
    match parse(src, max_frame)? {
        Parsed::Incomplete { need } => {
            // The length was checked against the maximum before this reservation.
            src.reserve(need - src.len());
            Ok(None)
        }
        Parsed::Frame { frame_len, .. } => {
            let mut frame = src.split_to(frame_len);
            frame.advance(HEADER_LEN);
            Ok(Some(frame))
        }
    }
}

/// What remains in `src` once the stream has ended: nothing, or a truncated frame.
pub fn check_eof(src: &[u8], max_frame: usize) -> Result<(), DecodeError> {
    if src.is_empty() {
        return Ok(());
    }
    match parse(src, max_frame)? {
        Parsed::Incomplete { need } => Err(DecodeError::Truncated { have: src.len(), need }),
        // A whole frame is the caller's to take first; the bytes after it are what
        // decides, so this only happens if the caller skipped `decode`.
        Parsed::Frame { frame_len, .. } => check_eof(&src[frame_len..], max_frame),
    }
}

/// Appends a frame carrying `payload` to `dst`.
pub fn encode(payload: &[u8], max_frame: usize, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let max_frame = max_frame.min(MAX_FRAME_LIMIT);
    if payload.len() > max_frame {
        return Err(EncodeError::Oversized { len: payload.len() as u64, max: max_frame });
    }
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_u32(payload.len() as u32);
    dst.put_u32(crc32fast::hash(payload));
    dst.put_slice(payload);
    Ok(())
}

/// Appends a frame carrying the encoding of `value` to `dst`, encoding in place.
/// On error `dst` is left as it was.
pub fn encode_value<T: Serialize>(value: &T, max_frame: usize, dst: &mut BytesMut) -> Result<(), EncodeError> {
    encode_value_sealed::<T, 0>(value, max_frame, dst, |_| [])
}

/// Like [`encode_value`], with a trailer appended inside the payload: `seal` gets the encoded value and
/// returns the trailer (an authentication tag). `seal` is called only once the frame is known to fit
/// `max_frame`, so a refused frame consumes no tag number. On error `dst` is left as it was.
pub fn encode_value_sealed<T: Serialize, const N: usize>(
    value: &T,
    max_frame: usize,
    dst: &mut BytesMut,
    seal: impl FnOnce(&[u8]) -> [u8; N],
) -> Result<(), EncodeError> {
    let max_frame = max_frame.min(MAX_FRAME_LIMIT);
    let start = dst.len();
    dst.put_bytes(0, HEADER_LEN);
    let len = match codec::encode_into(value, dst) {
        Ok(len) => len,
        Err(e) => {
            dst.truncate(start);
            return Err(EncodeError::Payload(e));
        }
    };
    if len + N > max_frame {
        dst.truncate(start);
        return Err(EncodeError::Oversized { len: (len + N) as u64, max: max_frame });
    }
    let trailer = seal(&dst[start + HEADER_LEN..]);
    dst.put_slice(&trailer);
    let crc = crc32fast::hash(&dst[start + HEADER_LEN..]);
    dst[start..start + 4].copy_from_slice(&((len + N) as u32).to_be_bytes());
    dst[start + 4..start + HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// A `tokio_util` codec: decodes frames into `D` messages, encodes any
/// serializable value into a frame.
#[derive(Debug)]
pub struct FrameCodec<D> {
    max_frame: usize,
    _decodes: PhantomData<fn() -> D>,
}

impl<D> FrameCodec<D> {
    /// A codec enforcing `max_frame` (capped at [`MAX_FRAME_LIMIT`]) in both directions.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame: max_frame.min(MAX_FRAME_LIMIT), _decodes: PhantomData }
    }

    /// The maximum payload length in force.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl<D> Default for FrameCodec<D> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<D> Clone for FrameCodec<D> {
    fn clone(&self) -> Self {
        Self::new(self.max_frame)
    }
}

impl<D: DeserializeOwned> Decoder for FrameCodec<D> {
    type Item = D;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, FrameError> {
        match decode(src, self.max_frame)? {
            None => Ok(None),
            Some(payload) => Ok(Some(codec::decode(&payload).map_err(DecodeError::Payload)?)),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<D>, FrameError> {
        if let Some(item) = Decoder::decode(self, src)? {
            return Ok(Some(item));
        }
        check_eof(src, self.max_frame)?;
        Ok(None)
    }
}

impl<D, E: Serialize> Encoder<&E> for FrameCodec<D> {
    type Error = FrameError;

    fn encode(&mut self, item: &E, dst: &mut BytesMut) -> Result<(), FrameError> {
        Ok(encode_value(item, self.max_frame, dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Message, Record, ToBackup, ToPrimary};
    use proptest::prelude::*;

    fn frame(payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(payload, DEFAULT_MAX_FRAME, &mut buf).unwrap();
        buf
    }

    #[test]
    fn header_is_big_endian_length_then_crc() {
        let buf = frame(b"abc");
        assert_eq!(&buf[..4], &[0, 0, 0, 3]);
        // CRC-32/ISO-HDLC check value of "abc".
        assert_eq!(&buf[4..8], &0x3524_41C2u32.to_be_bytes());
        assert_eq!(&buf[8..], b"abc");
    }

    #[test]
    fn round_trip_of_several_frames_in_one_buffer() {
        let mut buf = frame(b"first");
        buf.extend_from_slice(&frame(b""));
        buf.extend_from_slice(&frame(&[7; 1000]));
        assert_eq!(&decode(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap()[..], b"first");
        assert_eq!(&decode(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap()[..], b"");
        assert_eq!(&decode(&mut buf, DEFAULT_MAX_FRAME).unwrap().unwrap()[..], &[7; 1000][..]);
        assert_eq!(decode(&mut buf, DEFAULT_MAX_FRAME), Ok(None));
        assert!(buf.is_empty());
    }

    #[test]
    fn typed_round_trip_through_the_codec() {
        let mut codec = FrameCodec::<ToBackup>::default();
        let msg = ToBackup::Record(Record { seq: 9, epoch: 2, msg: Message::SnapshotBegin { connections: 4 } });
        let mut buf = BytesMut::new();
        codec.encode(&msg, &mut buf).unwrap();
        codec.encode(&ToBackup::Heartbeat { sent_us: 5, epoch: 2 }, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), Some(ToBackup::Heartbeat { sent_us: 5, epoch: 2 }));
        assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn every_truncation_is_incomplete_then_truncated_at_eof() {
        let whole = frame(b"hello, backup");
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut buf, DEFAULT_MAX_FRAME), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "an incomplete frame is not consumed");
            let need = if cut < HEADER_LEN { HEADER_LEN } else { whole.len() };
            let expected = if cut == 0 { Ok(()) } else { Err(DecodeError::Truncated { have: cut, need }) };
            assert_eq!(check_eof(&buf, DEFAULT_MAX_FRAME), expected, "cut at {cut}");

            let mut codec = FrameCodec::<Vec<u8>>::default();
            let got = codec.decode_eof(&mut buf);
            match expected {
                Ok(()) => assert!(matches!(got, Ok(None))),
                Err(e) => assert!(matches!(got, Err(FrameError::Decode(ref d)) if *d == e), "{got:?}"),
            }
        }
    }

    #[test]
    fn every_flipped_payload_bit_is_a_crc_error() {
        let whole = frame(b"the backup must hold this");
        for byte in HEADER_LEN..whole.len() {
            for bit in 0..8 {
                let mut buf = whole.clone();
                buf[byte] ^= 1 << bit;
                assert!(matches!(decode(&mut buf, DEFAULT_MAX_FRAME), Err(DecodeError::Crc { .. })));
            }
        }
        let mut buf = whole.clone();
        buf[5] ^= 0x10; // in the CRC field
        assert!(matches!(decode(&mut buf, DEFAULT_MAX_FRAME), Err(DecodeError::Crc { len: 25, .. })));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone_without_reserving() {
        let mut buf = BytesMut::with_capacity(16);
        buf.put_u32(u32::MAX);
        buf.put_u32(0);
        let before = buf.capacity();
        assert_eq!(
            decode(&mut buf, DEFAULT_MAX_FRAME),
            Err(DecodeError::Oversized { len: u32::MAX as u64, max: DEFAULT_MAX_FRAME })
        );
        assert_eq!(buf.capacity(), before);

        let mut small = frame(&[1; 101]);
        assert_eq!(decode(&mut small, 100), Err(DecodeError::Oversized { len: 101, max: 100 }));
        let mut exact = frame(&[1; 100]);
        assert!(decode(&mut exact, 100).unwrap().is_some());
    }

    #[test]
    fn oversized_payload_is_refused_when_encoding() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        assert_eq!(encode(&[0; 65], 64, &mut buf), Err(EncodeError::Oversized { len: 65, max: 64 }));
        let big = ToPrimary::Heartbeat { sent_us: u64::MAX, echo_us: u64::MAX };
        assert!(matches!(encode_value(&big, 4, &mut buf), Err(EncodeError::Oversized { max: 4, .. })));
        assert_eq!(&buf[..], b"keep", "a failed encode leaves the buffer as it was");
        assert!(encode_value(&big, 64, &mut buf).is_ok());
    }

    #[test]
    fn sealed_frame_carries_the_trailer_over_the_encoded_value_inside_the_payload() {
        let msg = ToPrimary::Ack { upto: 1000 };
        let mut buf = BytesMut::from(&b"keep"[..]);
        let mut sealed_over = Vec::new();
        encode_value_sealed(&msg, 64, &mut buf, |body| {
            sealed_over = body.to_vec();
            [0xee; 4]
        })
        .unwrap();
        assert_eq!(sealed_over, codec::encode(&msg).unwrap());
        let mut wire = buf.split_off(4);
        let payload = decode(&mut wire, 64).unwrap().unwrap();
        assert_eq!(&payload[..], &[&sealed_over[..], &[0xee; 4]].concat()[..]);

        // Too long with its trailer: refused before sealing, buffer untouched.
        let mut buf = BytesMut::from(&b"keep"[..]);
        let got = encode_value_sealed(&msg, sealed_over.len() + 3, &mut buf, |_| -> [u8; 4] { unreachable!() });
        assert_eq!(got, Err(EncodeError::Oversized { len: sealed_over.len() as u64 + 4, max: sealed_over.len() + 3 }));
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn maximum_is_capped_at_the_decode_limit() {
        assert_eq!(FrameCodec::<()>::new(usize::MAX).max_frame(), MAX_FRAME_LIMIT);
    }

    #[test]
    fn undecodable_payload_is_a_payload_error() {
        let mut buf = frame(&[200, 1, 2]);
        let got = FrameCodec::<ToPrimary>::default().decode(&mut buf);
        assert!(matches!(got, Err(FrameError::Decode(DecodeError::Payload(_)))), "{got:?}");
        let mut trailing = BytesMut::new();
        let mut payload = codec::encode(&ToPrimary::Ack { upto: 3 }).unwrap();
        payload.push(0);
        encode(&payload, DEFAULT_MAX_FRAME, &mut trailing).unwrap();
        let got = FrameCodec::<ToPrimary>::default().decode(&mut trailing);
        assert!(
            matches!(got, Err(FrameError::Decode(DecodeError::Payload(CodecError::TrailingBytes { .. })))),
            "{got:?}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(
            // Zero-heavy bytes give small lengths, so payload and CRC paths are reached too.
            bytes in proptest::collection::vec(prop_oneof![any::<u8>(), Just(0u8)], 0..4096),
            max in 0usize..2048,
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = FrameCodec::<ToBackup>::new(max);
            // Stop at the first error, as the link does.
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = codec.decode_eof(&mut buf);
            let mut raw = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut raw, max) {}
            let _ = check_eof(&raw, max);
        }

        #[test]
        fn random_headers_with_valid_crc_never_panic(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8)
        ) {
            // Random payloads behind a correct CRC: every payload decoder path is reached.
            let mut buf = BytesMut::new();
            for p in &payloads {
                encode(p, DEFAULT_MAX_FRAME, &mut buf).unwrap();
            }
            let mut a = buf.clone();
            while let Ok(Some(_)) = FrameCodec::<ToBackup>::default().decode(&mut a) {}
            let mut b = buf;
            while let Ok(Some(_)) = FrameCodec::<ToPrimary>::default().decode(&mut b) {}
        }

        #[test]
        fn frames_split_at_arbitrary_points_decode_to_the_same_frames(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            cuts in proptest::collection::vec(0usize..6000, 0..30),
        ) {
            let mut wire = BytesMut::new();
            for p in &payloads {
                encode(p, DEFAULT_MAX_FRAME, &mut wire).unwrap();
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();

            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            for cut in cuts {
                buf.extend_from_slice(&wire[at..cut]);
                at = cut;
                while let Some(payload) = decode(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                    got.push(payload.to_vec());
                }
            }
            prop_assert_eq!(check_eof(&buf, DEFAULT_MAX_FRAME), Ok(()));
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn typed_frames_split_at_arbitrary_points_decode_to_the_same_messages(
            acks in proptest::collection::vec(any::<u64>(), 0..50),
            cuts in proptest::collection::vec(0usize..2000, 0..20),
        ) {
            let mut codec = FrameCodec::<ToPrimary>::default();
            let msgs: Vec<ToPrimary> = acks
                .iter()
                .map(|&a| if a % 3 == 0 { ToPrimary::Heartbeat { sent_us: a, echo_us: a / 3 } } else { ToPrimary::Ack { upto: a } })
                .collect();
            let mut wire = BytesMut::new();
            for m in &msgs {
                codec.encode(m, &mut wire).unwrap();
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            for cut in cuts {
                buf.extend_from_slice(&wire[at..cut]);
                at = cut;
                while let Some(m) = codec.decode(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            prop_assert!(codec.decode_eof(&mut buf).unwrap().is_none());
            prop_assert_eq!(got, msgs);
        }
    }
}
