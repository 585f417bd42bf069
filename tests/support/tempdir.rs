//! Temporary directories for tests (fixtures, logs, an origin's config), removed on drop.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty directory `us-<tag>-<pid>-<n>` in the system's temp directory: the PID keeps
/// parallel test processes apart, the counter the tests of one process. Removed with its contents on
/// drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("us-{tag}-{}-{n}", std::process::id()));
        // Left over from an earlier process with the same PID.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_distinct_and_removed_on_drop() -> Result<()> {
        let (a, b) = (TempDir::new("x")?, TempDir::new("x")?);
        assert_ne!(a.path(), b.path());
        fs::write(a.join("f"), b"data")?;
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "{} still exists", path.display());
        Ok(())
    }
}
