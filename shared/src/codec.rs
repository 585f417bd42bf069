//! Payload encoding of replication messages: the one module that touches bincode.
//!
//! bincode 2.0.1 (pinned; 3.0 is an empty tombstone) through serde, with
//! `bincode::config::standard()`: little-endian, variable-length integers (a `u64`
//! below 251 is one byte, see bincode's `varint` docs), enum variants as their
//! index, sequences and strings prefixed by their varint length. The encoding has
//! no self-description: both ends must run the same message types, which the
//! handshake's protocol version guarantees.
//!
//! # Byte layout (for dissectors)
//!
//! * Unsigned integers (`u16`, `u32`, `u64`, also lengths and enum indexes): one byte
//!   if below 251; else a marker byte then little-endian bytes: 251 → `u16`,
//!   252 → `u32`, 253 → `u64`. `bool`, `u8`: one byte.
//! * Enum: variant index (varint, in declaration order), then the variant's fields.
//!   `Handshake`: 0 Hello, 1 Welcome, 2 AuthHello, 3 AuthWelcome, 4 Proof, 5 Abort. `Welcome`: 0 Accepted,
//!   1 Refused. `ToBackup`: 0 Record, 1 Heartbeat. `ToPrimary`: 0 Ack, 1 Heartbeat, 2 TakingOver. `Role`: 0 Primary,
//!   1 Backup. `Dir`: 0 ToServer, 1 ToClient. `Message`: 0 Segment, 1 Reply,
//!   2 ExchangeStart, 3 Upstream, 4 ExchangeEnd, 5 ConnClosed, 6 SnapshotBegin,
//!   7 SnapshotConn, 8 SnapshotEnd, 9 Ping, 10 Handover.
//! * Struct: its fields in declaration order, nothing between them.
//! * `String`, `Vec<u8>`: varint length, then the bytes. `Option`: 0, or 1 then the value.
//! * `SocketAddrV4`: the 4 address octets, then the port as a varint.
//!
//! Example: `ToPrimary::Ack { upto: 1000 }` is `00 fb e8 03`: variant 0 (Ack), then
//! marker 251 and 1000 as a little-endian `u16`. The test
//! `layout_matches_the_documentation` pins these rules.
//!
//! Hostile input: a length prefix inside a payload is a claim, not a fact. The
//! config carries a decode limit ([`DECODE_LIMIT`]); bincode checks every claimed
//! allocation against it before allocating, so a payload claiming a 2^60-byte
//! string fails with [`CodecError::LimitExceeded`] instead of asking the allocator
//! for it. A value followed by unread bytes is rejected ([`CodecError::TrailingBytes`]):
//! one frame carries exactly one message.

use ::bytes::{BufMut, BytesMut};
use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Most bytes one decode may claim (allocations plus primitive reads, as bincode
/// counts them). Frames are capped below this (see `frame::MAX_FRAME_LIMIT`), so a
/// legitimate payload of bytes and strings always fits.
pub const DECODE_LIMIT: usize = 64 << 20;

type Config = Configuration<LittleEndian, Varint, Limit<DECODE_LIMIT>>;

const CONFIG: Config = bincode::config::standard().with_limit::<DECODE_LIMIT>();

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The value cannot be represented (serde reported an error while encoding).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The input ends before the value does.
    #[error("payload ends before the value is complete")]
    Truncated,
    /// A length inside the input claims more than [`DECODE_LIMIT`] bytes.
    #[error("payload claims more than the decode limit of {DECODE_LIMIT} bytes")]
    LimitExceeded,
    /// The value decoded but bytes are left over.
    #[error("{extra} trailing bytes after a {used}-byte value")]
    TrailingBytes { used: usize, extra: usize },
    /// The input is not an encoding of the expected type (bad variant, bad UTF-8, ...).
    #[error("invalid payload: {0}")]
    Invalid(String),
}

/// Encodes `value` into a new vector.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, CONFIG).map_err(encode_error)
}

/// Appends the encoding of `value` to `dst` and returns its length. On error `dst`
/// is left as it was.
pub fn encode_into<T: Serialize>(value: &T, dst: &mut BytesMut) -> Result<usize, CodecError> {
    let start = dst.len();
    let mut writer = BufWriter(dst);
    match bincode::serde::encode_into_writer(value, &mut writer, CONFIG) {
        Ok(()) => Ok(dst.len() - start),
        Err(e) => {
            dst.truncate(start);
            Err(encode_error(e))
        }
    }
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, CONFIG).map_err(decode_error)?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes { used, extra: bytes.len() - used });
    }
    Ok(value)
}

/// Serde adapter for `Vec<u8>` fields: `#[serde(with = "crate::codec::bytes")]`.
///
/// The wire format is the same as serde's default for `Vec<u8>` (varint length, then
/// the bytes), so adding it changes no encoding. It only changes speed: serde's
/// default treats a byte vector as a sequence of `u8`, which bincode writes and reads
/// one byte at a time; this writes and reads the bytes as one slice.
pub mod bytes {
    use serde::{Deserializer, Serializer};

    /// Serializes the bytes as one slice.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    /// Deserializes a byte vector in one piece.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(ByteBufVisitor)
    }

    struct ByteBufVisitor;

    impl<'de> serde::de::Visitor<'de> for ByteBufVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte buffer")
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// bincode's `Writer` over a growing buffer.
struct BufWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BufWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.put_slice(bytes);
        Ok(())
    }
}

fn encode_error(e: bincode::error::EncodeError) -> CodecError {
    CodecError::Encode(e.to_string())
}

fn decode_error(e: bincode::error::DecodeError) -> CodecError {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedEnd { .. } => CodecError::Truncated,
        E::LimitExceeded => CodecError::LimitExceeded,
        other => CodecError::Invalid(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_encodes_its_bytes_as_it_did_as_sequences_and_decodes_either() {
        use std::collections::{BTreeMap, VecDeque};
        // The form a Stream had before it wrote its bytes as byte strings (serde's default for these types).
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Before {
            start: u64,
            data: VecDeque<u8>,
            pending: BTreeMap<u64, Vec<u8>>,
            pending_bytes: usize,
            gaps: Vec<std::ops::Range<u64>>,
        }
        let mut stream = tcp_replay::stream::Stream::new();
        stream.insert(0, b"GET / HTTP/1.1\r\n");
        stream.insert(40, b"later");
        stream.insert(45, b"touching");
        let mut data: VecDeque<u8> = b"GET / HTTP/1.1\r\n".iter().copied().collect();
        data.rotate_left(3); // a deque whose bytes wrap around its buffer
        data.rotate_right(3);
        let before = Before {
            start: 0,
            data,
            pending: BTreeMap::from([(40, b"later".to_vec()), (45, b"touching".to_vec())]),
            pending_bytes: 13,
            gaps: Vec::new(),
        };
        let bytes = encode(&before).unwrap();
        assert_eq!(encode(&stream).unwrap(), bytes, "the wire format is unchanged");
        assert_eq!(decode::<tcp_replay::stream::Stream>(&bytes).unwrap(), stream);
    }
    use crate::protocol::{ConnKey, Message, Record, ToBackup};
    use std::net::SocketAddrV4;

    fn conn() -> ConnKey {
        ConnKey { client: "10.0.0.7:40000".parse::<SocketAddrV4>().unwrap(), server: "10.0.0.100:80".parse().unwrap() }
    }

    #[test]
    fn record_round_trips() {
        let rec = ToBackup::Record(Record {
            seq: 1 << 40,
            epoch: 3,
            msg: Message::Reply { conn: conn(), offset: 77, bytes: vec![1, 2, 3, 255] },
        });
        let bytes = encode(&rec).unwrap();
        assert_eq!(decode::<ToBackup>(&bytes).unwrap(), rec);

        let mut buf = BytesMut::from(&b"xy"[..]);
        let n = encode_into(&rec, &mut buf).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(&buf[2..], &bytes[..]);
    }

    #[test]
    fn small_integers_are_one_byte() {
        assert_eq!(encode(&5u64).unwrap(), [5]);
        assert_eq!(encode(&250u64).unwrap(), [250]);
        assert_eq!(encode(&251u64).unwrap().len(), 3);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&7u64).unwrap();
        bytes.push(0);
        assert_eq!(decode::<u64>(&bytes), Err(CodecError::TrailingBytes { used: 1, extra: 1 }));
    }

    #[test]
    fn truncated_value_is_rejected() {
        let bytes = encode(&"hello".to_string()).unwrap();
        assert_eq!(decode::<String>(&bytes[..3]), Err(CodecError::Truncated));
        assert_eq!(decode::<String>(&[]), Err(CodecError::Truncated));
    }

    #[test]
    fn hostile_string_length_fails_before_allocating() {
        // varint marker 253 = u64 follows: a string claiming 2^60 bytes.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert_eq!(decode::<String>(&bytes), Err(CodecError::LimitExceeded));
    }

    #[test]
    fn hostile_byte_vector_length_inside_a_message_fails_fast() {
        // Reply { conn, offset, bytes } whose byte vector claims u64::MAX bytes: the
        // `bytes` adapter reads it as one slice, so the decode limit refuses it before
        // anything is allocated.
        let mut msg = encode(&Message::Reply { conn: conn(), offset: 0, bytes: vec![] }).unwrap();
        msg.pop(); // the empty vector's length
        msg.push(253);
        msg.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode::<Message>(&msg), Err(CodecError::LimitExceeded));
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Plain {
        offset: u64,
        bytes: Vec<u8>,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sliced {
        offset: u64,
        #[serde(with = "super::bytes")]
        bytes: Vec<u8>,
    }

    #[test]
    fn bytes_adapter_keeps_the_wire_format_and_is_faster() {
        for len in [0, 1, 250, 251, 70_000] {
            let plain = Plain { offset: 9, bytes: (0..len).map(|i| i as u8).collect() };
            let sliced = Sliced { offset: 9, bytes: plain.bytes.clone() };
            let wire = encode(&plain).unwrap();
            assert_eq!(encode(&sliced).unwrap(), wire, "len {len}");
            assert_eq!(decode::<Sliced>(&wire).unwrap(), sliced);
        }
        // A hostile length through the adapter is checked against the limit first.
        let mut hostile = vec![9, 253];
        hostile.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert_eq!(decode::<Sliced>(&hostile), Err(CodecError::LimitExceeded));

        let plain = Plain { offset: 9, bytes: vec![7; 1400] };
        let sliced = Sliced { offset: 9, bytes: vec![7; 1400] };
        let time = |f: &dyn Fn()| {
            let t0 = std::time::Instant::now();
            for _ in 0..2000 {
                f();
            }
            t0.elapsed() / 2000
        };
        let wire = encode(&plain).unwrap();
        let plain_t = time(&|| {
            std::hint::black_box(decode::<Plain>(&wire).unwrap());
            std::hint::black_box(encode(&plain).unwrap());
        });
        let sliced_t = time(&|| {
            std::hint::black_box(decode::<Sliced>(&wire).unwrap());
            std::hint::black_box(encode(&sliced).unwrap());
        });
        println!("1400-byte field, encode + decode: serde default {plain_t:?}, bytes adapter {sliced_t:?}");
    }

    #[test]
    fn layout_matches_the_documentation() {
        use crate::protocol::{Handshake, Role, ToPrimary, Welcome};
        assert_eq!(encode(&ToPrimary::Ack { upto: 1000 }).unwrap(), [0x00, 0xfb, 0xe8, 0x03]);
        assert_eq!(
            encode(&ToPrimary::Heartbeat { sent_us: 70_000, echo_us: 5 }).unwrap(),
            [0x01, 0xfc, 0x70, 0x11, 0x01, 0x00, 0x05]
        );
        assert_eq!(encode(&(1u64 << 40)).unwrap(), [0xfd, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(encode(&Role::Backup).unwrap(), [1]);
        assert_eq!(
            encode(&Handshake::Welcome(Welcome::Refused { reason: "no".into() })).unwrap(),
            [1, 1, 2, b'n', b'o']
        );
        let rec = ToBackup::Record(Record {
            seq: 7,
            epoch: 2,
            msg: Message::Segment { at_us: 3, dir: tcp_replay::Dir::ToClient, datagram: vec![0xaa, 0xbb] },
        });
        assert_eq!(encode(&rec).unwrap(), [0, 7, 2, 0, 3, 1, 2, 0xaa, 0xbb]);
        assert_eq!(
            encode(&Message::ConnClosed { conn: conn() }).unwrap(),
            [5, 10, 0, 0, 7, 0xfb, 0x40, 0x9c, 10, 0, 0, 100, 80]
        );
        assert_eq!(encode(&Some(3u16)).unwrap(), [1, 3]);
    }

    #[test]
    fn unknown_variant_is_invalid() {
        assert!(matches!(decode::<ToBackup>(&[9]), Err(CodecError::Invalid(_))));
    }
}
