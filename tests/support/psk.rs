//! Replication keys for tests that run real nodes: a fresh random key in a test's own directory, written
//! as the README tells operators to (hex, mode 600), so the nodes read it the way they do in production.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `dir/psk`, holding 32 random bytes as hex; created (mode 600) unless it exists. Every node of one test
/// that gets this path shares the key.
pub fn key_file(dir: &Path) -> Result<PathBuf> {
    write_key(&dir.join("psk"))
}

/// Another key at `path` (mode 600), for a node that must not share the usual one.
pub fn write_key(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_owned());
    }
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom for a test key")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{}", hex::encode(key)).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_owned())
}
