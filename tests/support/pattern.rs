//! Deterministic test payloads that can be generated from any offset.
//!
//! A payload is a sequence of 8-byte blocks; block `i` of the payload with key `k`
//! is `splitmix64(k * GOLDEN ^ i)` in little-endian order. A server that takes over
//! a transfer half-way regenerates exactly the bytes the old one would have sent.

use sha2::{Digest, Sha256};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn block(key: u64, index: u64) -> [u8; 8] {
    splitmix64(key.wrapping_mul(GOLDEN) ^ index).to_le_bytes()
}

/// Fills `buf` with the payload of `key` starting at `offset`.
pub fn fill(key: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = 0;
    let mut off = offset;
    while pos < buf.len() {
        let b = block(key, off / 8);
        let within = (off % 8) as usize;
        let n = (8 - within).min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&b[within..within + n]);
        pos += n;
        off += n as u64;
    }
}

/// Index of the first byte of `data` that differs from the payload at `offset`.
pub fn first_mismatch(key: u64, offset: u64, data: &[u8]) -> Option<usize> {
    let mut expected = vec![0u8; data.len()];
    fill(key, offset, &mut expected);
    data.iter().zip(&expected).position(|(a, b)| a != b)
}

/// SHA-256 (hex) of the first `len` bytes of the payload of `key`.
pub fn sha256_hex(key: u64, len: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        fill(key, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    hex::encode(h.finalize())
}

/// Writes the first `len` bytes of the payload of `key` to a new file at `path`; returns their
/// SHA-256 (hex).
pub fn write_file(path: &std::path::Path, key: u64, len: u64) -> std::io::Result<String> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        fill(key, off, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    f.flush()?;
    Ok(hex::encode(h.finalize()))
}

/// Key of the response to the `index`-th request on a connection (0-based).
pub fn response_key(index: u64) -> u64 {
    0x5e_ed00_0000 + index
}

/// Key of the body the client uploads in its `index`-th request.
pub fn upload_key(index: u64) -> u64 {
    0xb0_d700_0000 + index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_from_any_offset_matches_payload_from_zero() {
        let mut whole = vec![0u8; 1000];
        fill(7, 0, &mut whole);
        for start in [0usize, 1, 7, 8, 9, 333, 999] {
            for len in [0usize, 1, 5, 8, 17] {
                let len = len.min(1000 - start);
                let mut part = vec![0u8; len];
                fill(7, start as u64, &mut part);
                assert_eq!(part, whole[start..start + len], "start {start} len {len}");
            }
        }
        assert_eq!(first_mismatch(7, 100, &whole[100..200]), None);
        let mut bad = whole[100..200].to_vec();
        bad[42] ^= 1;
        assert_eq!(first_mismatch(7, 100, &bad), Some(42));
    }

    #[test]
    fn different_keys_give_different_payloads_and_hashes() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        fill(response_key(0), 0, &mut a);
        fill(response_key(1), 0, &mut b);
        assert_ne!(a, b);
        assert_ne!(sha256_hex(1, 100_000), sha256_hex(2, 100_000));
        let mut all = vec![0u8; 100_000];
        fill(1, 0, &mut all);
        assert_eq!(sha256_hex(1, 100_000), hex::encode(Sha256::digest(&all)));
    }
}
