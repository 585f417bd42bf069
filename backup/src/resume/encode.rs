//! A continuation's framing (pure): the rest of a body in the client's framing, and the refetch's
//! check of the skipped prefix.

use super::*;

/// Why a continuation's source does not fit the client's framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The source has more payload than the client's framing leaves room for.
    #[error("the source has more body than the {framing} framing allows")]
    TooLong { framing: &'static str },
    /// The source ended before the client's framing was satisfied.
    #[error("the source ended {missing} bytes short")]
    Short { missing: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EncodeState {
    /// Content-Length: `total` payload bytes to write, `taken` so far; the last byte waits for
    /// the source's end, so a longer source never completes the client's message.
    Length {
        total: u64,
        taken: u64,
        held: Option<u8>,
    },
    /// Chunked: `open` bytes of the chunk in progress still owed; `finished`: the message is
    /// complete once the prefix is out.
    Chunked {
        open: u64,
        finished: bool,
    },
    UntilClose,
}

/// Writes a body's rest in the framing the client is in the middle of (RFC 9112 §6.3, §7.1):
/// what the source hands over with [`push`](Self::push), then [`finish`](Self::finish) at its end.
/// Nothing is emitted before the first payload byte or the end, so a check that fails before
/// (the refetch prefix) leaves the client with nothing new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuationEncoder {
    prefix: Option<Vec<u8>>,
    state: EncodeState,
}

impl ContinuationEncoder {
    pub fn new(framing: &Continuation) -> ContinuationEncoder {
        let (prefix, state) = match framing {
            Continuation::Length { remaining } => {
                (None, EncodeState::Length { total: *remaining, taken: 0, held: None })
            }
            Continuation::Chunked { prefix, open_chunk, finished } => {
                (Some(prefix.clone()), EncodeState::Chunked { open: *open_chunk, finished: *finished })
            }
            Continuation::UntilClose => (None, EncodeState::UntilClose),
        };
        ContinuationEncoder { prefix: prefix.filter(|p| !p.is_empty()), state }
    }

    /// Appends the framed form of `data`, the source's next payload bytes, to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.state {
            EncodeState::Length { total, taken, held } => {
                if *taken + data.len() as u64 > *total {
                    return Err(EncodeError::TooLong { framing: "Content-Length" });
                }
                *taken += data.len() as u64;
                if *taken == *total {
                    let (last, rest) = data.split_last().expect("data is not empty");
                    *held = Some(*last);
                    data = rest;
                }
                out.extend_from_slice(data);
            }
            EncodeState::Chunked { finished: true, .. } => {
                return Err(EncodeError::TooLong { framing: "chunked (last chunk sent)" });
            }
            EncodeState::Chunked { open, .. } => {
                if let Some(p) = self.prefix.take() {
                    out.extend_from_slice(&p);
                }
                if *open > 0 {
                    let n = (*open).min(data.len() as u64) as usize;
                    out.extend_from_slice(&data[..n]);
                    *open -= n as u64;
                    if *open == 0 {
                        out.extend_from_slice(b"\r\n");
                    }
                    data = &data[n..];
                }
                if !data.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                }
            }
            EncodeState::UntilClose => out.extend_from_slice(data),
        }
        Ok(())
    }

    /// The source ended: appends what completes the message to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &mut self.state {
            EncodeState::Length { total, taken, held } => {
                if taken < total {
                    return Err(EncodeError::Short { missing: *total - *taken });
                }
                out.extend(held.take());
            }
            EncodeState::Chunked { open, finished } => {
                if *open > 0 {
                    return Err(EncodeError::Short { missing: *open });
                }
                if let Some(p) = self.prefix.take() {
                    out.extend_from_slice(&p);
                }
                if !*finished {
                    out.extend_from_slice(b"0\r\n\r\n");
                    *finished = true;
                }
            }
            EncodeState::UntilClose => {}
        }
        Ok(())
    }

    /// Payload bytes the client's framing still requires, when it says.
    pub fn remaining(&self) -> Option<u64> {
        match &self.state {
            EncodeState::Length { total, taken, .. } => Some(total - taken),
            _ => None,
        }
    }
}

/// The refetched body's first `skip` bytes differ from the ones the client already has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the first {skip} body bytes fetched have crc32 {got:#010x}, the client has {want:#010x}")]
pub struct PrefixMismatch {
    pub skip: u64,
    pub want: u32,
    pub got: u32,
}

/// Skips a refetched body's first `skip` bytes, checking their crc32 against what the client got.
#[derive(Debug, Clone)]
pub struct PrefixCheck {
    skip: u64,
    seen: u64,
    hasher: crc32fast::Hasher,
    want: u32,
}

impl PrefixCheck {
    pub fn new(skip: u64, want: u32) -> PrefixCheck {
        PrefixCheck { skip, seen: 0, hasher: crc32fast::Hasher::new(), want }
    }

    /// Takes the source's next bytes; returns those after the prefix (once it has checked out).
    pub fn feed<'a>(&mut self, data: &'a [u8]) -> Result<&'a [u8], PrefixMismatch> {
        if self.seen >= self.skip {
            return Ok(data);
        }
        let n = (self.skip - self.seen).min(data.len() as u64) as usize;
        self.hasher.update(&data[..n]);
        self.seen += n as u64;
        if self.seen == self.skip {
            let got = self.hasher.clone().finalize();
            if got != self.want {
                return Err(PrefixMismatch { skip: self.skip, want: self.want, got });
            }
        }
        Ok(&data[n..])
    }

    /// Whether the whole prefix was seen (and matched).
    pub fn passed(&self) -> bool {
        self.seen >= self.skip
    }
}
