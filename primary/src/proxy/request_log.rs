//! The request log (`--request-log FILE`): one JSON object per line per HTTP exchange.
//!
//! Lines are appended with one `write(2)` each on an `O_APPEND` file, so concurrent
//! connections never interleave within a line and a crash loses at most the line being
//! written. Connection-level failures that hyper answers itself (400, 414, 431) or closes
//! (header timeout, logged as 408 with `"sent": false`) get a line with no method.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One exchange, as written to the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestLogEntry {
    /// When the exchange ended, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The node that served it (`node` in the config).
    pub node: String,
    /// The client's `address:port`.
    pub connection: String,
    /// Exchange number on the connection, from 0 in request order; `None` for a connection
    /// that failed before a request was read.
    pub exchange: Option<u64>,
    pub method: Option<String>,
    pub target: Option<String>,
    /// Status sent (or, with `sent == false`, the status the failure stands for).
    pub status: Option<u16>,
    /// Whether a response head was handed to the client connection.
    pub sent: bool,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes handed to the client connection (not counting head or chunk framing).
    pub bytes_out: u64,
    /// Whether the response body was delivered to its end.
    pub complete: bool,
    pub duration_ms: f64,
    /// The upstream the request went to, when proxying.
    pub upstream: Option<String>,
    /// The `Idempotency-Key` sent upstream.
    pub idempotency_key: Option<String>,
    /// Whether this proxy generated that key.
    pub key_generated: bool,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// How a failover resumed this exchange; `None` unless a takeover interrupted it (the
    /// backup fills it on the lines it writes).
    pub resume: Option<String>,
}

/// Why the request log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RequestLogError {
    /// The file could not be created or opened for appending.
    #[error("cannot open request log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open request log. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RequestLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl RequestLog {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, RequestLogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| RequestLogError::Open { path: path.to_owned(), source })?;
        Ok(RequestLog { path: path.to_owned(), file: Mutex::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. A failed write is reported in the process log, never to the client:
    /// the exchange it describes already happened.
    pub fn write(&self, entry: &RequestLogEntry) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "request log entry not serialisable");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::error!(path = %self.path.display(), error = %e, "request log write failed");
        }
    }
}
