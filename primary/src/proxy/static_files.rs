//! The built-in static file server (`--root DIR`).
//!
//! * RFC 9110 §9.3.1/§9.3.2: GET and HEAD (HEAD sends GET's headers, no body); anything else
//!   is 405 with `Allow`.
//! * RFC 9110 §8.8: a strong `ETag` from inode, size and modification time (ns), and
//!   `Last-Modified`.
//! * RFC 9110 §13.2.2: preconditions in order — `If-Match`, `If-Unmodified-Since` (412),
//!   `If-None-Match` (weak comparison), `If-Modified-Since` (304), then `Range` with `If-Range`
//!   (strong comparison; a date only when it is a strong validator, §13.1.5/§8.8.2.2).
//! * RFC 9110 §14: `Range: bytes=` on GET. One satisfiable range gives 206 with
//!   `Content-Range`; none satisfiable gives 416 with `Content-Range: bytes */len`; several
//!   ranges are answered with the whole representation (200), which §14.2 permits; an
//!   invalid `Range` is ignored.
//! * Paths: percent-decoded per segment (RFC 3986 §2.1). A `..` segment is 403, an encoded
//!   slash (`%2F`) is 404, NUL is 400. Files are opened with `openat2(2)` and
//!   `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` relative to the root, so the kernel refuses any
//!   resolution leaving the root (symlinks out of it, absolute symlinks, `..` in a symlink
//!   target): 403. Only regular files are served; a directory serves its `index.html`, with a
//!   301 to the slash-terminated path first. Bodies are streamed from disk in 256 KiB reads.

use super::httpdate;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes read from disk per body frame.
const READ_CHUNK: u64 = 256 * 1024;

/// Why the root directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum StaticRootError {
    /// The root could not be opened as a directory.
    #[error("cannot open root directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel lacks `openat2(2)` (Linux < 5.6, or a seccomp filter forbids it): without
    /// it, confinement to the root cannot be guaranteed, so the server refuses to start.
    #[error("openat2(2) with RESOLVE_BENEATH is unavailable ({0}); the static file server needs Linux ≥ 5.6")]
    NoOpenat2(#[source] io::Error),
}

/// The static file server over one root directory.
#[derive(Debug)]
pub struct StaticFiles {
    root: OwnedFd,
    path: PathBuf,
}

/// How a request path was refused before touching the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRejection {
    /// Not a path (no leading `/`), a bad percent escape, or a NUL byte: 400.
    BadRequest,
    /// A `..` segment: 403.
    Traversal,
    /// A segment with an encoded `/`: no file can have that name, 404.
    EncodedSlash,
}

/// A request path mapped below the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath {
    /// Relative path, `.` for the root itself.
    pub rel: PathBuf,
    /// Whether the request path ended in `/`.
    pub trailing_slash: bool,
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(segment: &str) -> Option<Vec<u8>> {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex_val(*b.get(i + 1)?)?;
            let lo = hex_val(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Maps the path of a request target to a path relative to the root (pure).
pub fn resolve_path(path: &str) -> Result<RelPath, PathRejection> {
    let rest = path.strip_prefix('/').ok_or(PathRejection::BadRequest)?;
    let mut rel = PathBuf::new();
    for segment in rest.split('/') {
        let decoded = percent_decode(segment).ok_or(PathRejection::BadRequest)?;
        if decoded.contains(&0) {
            return Err(PathRejection::BadRequest);
        }
        if decoded.contains(&b'/') {
            return Err(PathRejection::EncodedSlash);
        }
        match decoded.as_slice() {
            b"" | b"." => {}
            b".." => return Err(PathRejection::Traversal),
            name => rel.push(OsStr::from_bytes(name)),
        }
    }
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    Ok(RelPath { rel, trailing_slash: path.ends_with('/') })
}

/// What evaluating the request against a file gives (pure; RFC 9110 §13.2.2 and §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// 200 with the whole file.
    Full,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 304.
    NotModified,
    /// 412.
    PreconditionFailed,
    /// 416.
    RangeNotSatisfiable,
}

/// The validators of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// The strong entity tag, quotes included.
    pub etag: String,
    /// Modification time, whole seconds since the epoch.
    pub mtime: u64,
    pub len: u64,
}

impl Validators {
    pub fn from_metadata(meta: &std::fs::Metadata) -> Self {
        let mtime_ns = (meta.mtime() as i128) * 1_000_000_000 + meta.mtime_nsec() as i128;
        Validators {
            etag: format!("\"{:x}-{:x}-{:x}\"", meta.ino(), meta.len(), mtime_ns.max(0)),
            mtime: meta.mtime().max(0) as u64,
            len: meta.len(),
        }
    }
}

/// One entity tag of a list: (weak, opaque tag with quotes).
fn entity_tags(list: &str) -> Option<Vec<(bool, &str)>> {
    let mut out = Vec::new();
    let mut s = list.trim_start_matches([' ', '\t', ',']);
    while !s.is_empty() {
        let weak = s.starts_with("W/");
        if weak {
            s = &s[2..];
        }
        if !s.starts_with('"') {
            return None;
        }
        let close = s[1..].find('"')? + 1;
        out.push((weak, &s[..=close]));
        s = s[close + 1..].trim_start_matches([' ', '\t', ',']);
    }
    Some(out)
}

/// `*` or a list containing `etag` (strong: both strong and equal; weak: opaque tags equal).
fn list_matches(list: &str, etag: &str, strong: bool) -> bool {
    if list.trim() == "*" {
        return true;
    }
    entity_tags(list).is_some_and(|tags| tags.iter().any(|(weak, tag)| *tag == etag && !(strong && *weak)))
}

/// What a `Range` header asks for, against a representation of known length.
enum RangeSpec {
    Ignore,
    One(u64, u64),
    Several,
    Unsatisfiable,
}

fn parse_range(value: &str, len: u64) -> RangeSpec {
    let Some((unit, set)) = value.split_once('=') else { return RangeSpec::Ignore };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeSpec::Ignore;
    }
    let mut satisfiable = Vec::new();
    let mut any = false;
    for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        any = true;
        let Some((first, last)) = spec.split_once('-') else { return RangeSpec::Ignore };
        let (first, last) = (first.trim(), last.trim());
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if first.is_empty() {
            // suffix-range: the last N bytes
            if !digits(last) {
                return RangeSpec::Ignore;
            }
            let Ok(n) = last.parse::<u64>() else { return RangeSpec::Ignore };
            if n > 0 && len > 0 {
                satisfiable.push((len - n.min(len), len - 1));
            }
        } else {
            if !digits(first) || !(last.is_empty() || digits(last)) {
                return RangeSpec::Ignore;
            }
            let Ok(start) = first.parse::<u64>() else { return RangeSpec::Ignore };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match last.parse::<u64>() {
                    Ok(end) if end >= start => end,
                    // last < first makes the whole header invalid (RFC 9110 §14.1.1).
                    _ => return RangeSpec::Ignore,
                }
            };
            if start < len {
                satisfiable.push((start, end.min(len - 1)));
            }
        }
    }
    match satisfiable.as_slice() {
        _ if !any => RangeSpec::Ignore,
        [] => RangeSpec::Unsatisfiable,
        [(s, e)] => RangeSpec::One(*s, *e),
        _ => RangeSpec::Several,
    }
}

/// Evaluates preconditions and `Range` for a GET or HEAD of a file with validators `v`, at
/// time `now` (seconds since the epoch).
pub fn decide(method: &Method, headers: &HeaderMap, v: &Validators, now: u64) -> Decision {
    let get_or_head = *method == Method::GET || *method == Method::HEAD;
    let text = |name: header::HeaderName| headers.get(name).and_then(|h| h.to_str().ok());
    if let Some(list) = text(header::IF_MATCH) {
        if !list_matches(list, &v.etag, true) {
            return Decision::PreconditionFailed;
        }
    } else if let Some(date) = text(header::IF_UNMODIFIED_SINCE).and_then(httpdate::parse)
        && v.mtime > date
    {
        return Decision::PreconditionFailed;
    }
    if let Some(list) = text(header::IF_NONE_MATCH) {
        if list_matches(list, &v.etag, false) {
            return if get_or_head { Decision::NotModified } else { Decision::PreconditionFailed };
        }
    } else if get_or_head
        && let Some(date) = text(header::IF_MODIFIED_SINCE).and_then(httpdate::parse)
        && v.mtime <= date
    {
        return Decision::NotModified;
    }
    if *method != Method::GET {
        return Decision::Full;
    }
    let Some(range) = text(header::RANGE) else { return Decision::Full };
    if let Some(if_range) = text(header::IF_RANGE) {
        let if_range = if_range.trim();
        let current = if if_range.starts_with('"') || if_range.starts_with("W/") {
            !if_range.starts_with("W/") && if_range == v.etag
        } else {
            // A date validates only if Last-Modified is strong: at least a second old.
            httpdate::parse(if_range).is_some_and(|d| d == v.mtime && v.mtime < now)
        };
        if !current {
            return Decision::Full;
        }
    }
    match parse_range(range, v.len) {
        RangeSpec::Ignore | RangeSpec::Several => Decision::Full,
        RangeSpec::One(start, end) => Decision::Partial { start, end },
        RangeSpec::Unsatisfiable => Decision::RangeNotSatisfiable,
    }
}

/// Content type by file extension; `application/octet-stream` when unknown.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(OsStr::to_str).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("txt" | "log") => "text/plain; charset=utf-8",
        Some("md") => "text/markdown; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("xml") => "application/xml",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("avif") => "image/avif",
        Some("ico") => "image/x-icon",
        Some("pdf") => "application/pdf",
        Some("wasm") => "application/wasm",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("ogg") => "audio/ogg",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("otf") => "font/otf",
        Some("zip") => "application/zip",
        Some("gz") => "application/gzip",
        Some("tar") => "application/x-tar",
        _ => "application/octet-stream",
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive, so it cannot be built here).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `rel` below `root` without ever leaving it (see the module doc).
fn open_beneath(root: &OwnedFd, rel: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let c = CString::new(rel.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        // O_NONBLOCK: opening a FIFO must not hang; it has no effect on regular files.
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `c` is NUL-terminated and `how` is a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a fresh descriptor we now own.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// The response the static server chose, before exchange accounting.
pub type StaticResponse = Response<StaticBody>;

impl StaticFiles {
    /// Opens `root` and checks that the kernel can confine lookups to it.
    pub fn new(root: &Path) -> Result<Self, StaticRootError> {
        let c = CString::new(root.as_os_str().as_bytes()).map_err(|_| StaticRootError::Open {
            path: root.to_owned(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `c` is NUL-terminated.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(StaticRootError::Open { path: root.to_owned(), source: io::Error::last_os_error() });
        }
        // SAFETY: a fresh descriptor we now own.
        let root_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        match open_beneath(&root_fd, Path::new(".")) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) || e.raw_os_error() == Some(libc::EPERM) => {
                return Err(StaticRootError::NoOpenat2(e));
            }
            Err(source) => return Err(StaticRootError::Open { path: root.to_owned(), source }),
        }
        Ok(StaticFiles { root: root_fd, path: root.to_owned() })
    }

    pub fn root(&self) -> &Path {
        &self.path
    }

    /// Answers one request. `path` and `query` come from the request target.
    pub async fn serve(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> StaticResponse {
        if *method != Method::GET && *method != Method::HEAD {
            let mut r = text_response(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let rel = match resolve_path(path) {
            Ok(rel) => rel,
            Err(PathRejection::BadRequest) => return text_response(StatusCode::BAD_REQUEST),
            Err(PathRejection::Traversal) => return text_response(StatusCode::FORBIDDEN),
            Err(PathRejection::EncodedSlash) => return text_response(StatusCode::NOT_FOUND),
        };
        let this = Arc::clone(self);
        let opened = tokio::task::spawn_blocking(move || this.open_file(&rel)).await;
        let (file, meta, served_path) = match opened {
            Ok(Ok(Opened::File(file, meta, p))) => (file, meta, p),
            Ok(Ok(Opened::Redirect)) => {
                let mut location = format!("{path}/");
                if let Some(q) = query {
                    location.push('?');
                    location.push_str(q);
                }
                let mut r = text_response(StatusCode::MOVED_PERMANENTLY);
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
            Ok(Err(status)) => return text_response(status),
            Err(join) => {
                tracing::error!(error = %join, "static file open task failed");
                return text_response(StatusCode::INTERNAL_SERVER_ERROR);
            }
        };
        let v = Validators::from_metadata(&meta);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let decision = decide(method, headers, &v, now);
        let mut builder = Response::builder();
        let h = builder.headers_mut().expect("fresh builder");
        if let Ok(etag) = HeaderValue::from_str(&v.etag) {
            h.insert(header::ETAG, etag);
        }
        if let Ok(lm) = HeaderValue::from_str(&httpdate::format(v.mtime)) {
            h.insert(header::LAST_MODIFIED, lm);
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let (status, start, len) = match decision {
            Decision::NotModified => {
                return builder.status(StatusCode::NOT_MODIFIED).body(StaticBody::Empty).expect("valid response");
            }
            Decision::PreconditionFailed => return with_headers(text_response(StatusCode::PRECONDITION_FAILED), h),
            Decision::RangeNotSatisfiable => {
                let mut r = with_headers(text_response(StatusCode::RANGE_NOT_SATISFIABLE), h);
                if let Ok(cr) = HeaderValue::from_str(&format!("bytes */{}", v.len)) {
                    r.headers_mut().insert(header::CONTENT_RANGE, cr);
                }
                return r;
            }
            Decision::Full => (StatusCode::OK, 0, v.len),
            Decision::Partial { start, end } => {
                if let Ok(cr) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", v.len)) {
                    h.insert(header::CONTENT_RANGE, cr);
                }
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
            }
        };
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&served_path)));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        let body = if *method == Method::HEAD { StaticBody::Empty } else { StaticBody::file(file, start, len) };
        builder.status(status).body(body).expect("valid response")
    }

    /// Blocking: opens the file a relative path names (a directory's `index.html`).
    fn open_file(&self, rel: &RelPath) -> Result<Opened, StatusCode> {
        let file = open_beneath(&self.root, &rel.rel).map_err(|e| status_for_open_error(&e, &rel.rel))?;
        let meta = file.metadata().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
        if meta.is_dir() {
            if !rel.trailing_slash {
                return Ok(Opened::Redirect);
            }
            let index = rel.rel.join("index.html");
            let file = open_beneath(&self.root, &index).map_err(|e| match status_for_open_error(&e, &index) {
                // A directory without an index: no listings.
                StatusCode::NOT_FOUND => StatusCode::FORBIDDEN,
                other => other,
            })?;
            let meta = file.metadata().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
            if !meta.is_file() {
                return Err(StatusCode::FORBIDDEN);
            }
            return Ok(Opened::File(file, Box::new(meta), index));
        }
        if !meta.is_file() {
            return Err(StatusCode::FORBIDDEN);
        }
        if rel.trailing_slash {
            // "file.txt/" names a directory that does not exist.
            return Err(StatusCode::NOT_FOUND);
        }
        Ok(Opened::File(file, Box::new(meta), rel.rel.clone()))
    }
}

enum Opened {
    File(File, Box<std::fs::Metadata>, PathBuf),
    Redirect,
}

fn status_for_open_error(e: &io::Error, rel: &Path) -> StatusCode {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG) => StatusCode::NOT_FOUND,
        // EXDEV: the resolution would leave the root; ELOOP: too many or refused links.
        Some(libc::EXDEV | libc::ELOOP | libc::EACCES | libc::EPERM) => {
            tracing::debug!(path = %rel.display(), error = %e, "static path refused");
            StatusCode::FORBIDDEN
        }
        _ => {
            tracing::warn!(path = %rel.display(), error = %e, "static file open failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn with_headers(mut r: StaticResponse, validators: &HeaderMap) -> StaticResponse {
    for (k, v) in validators {
        r.headers_mut().insert(k.clone(), v.clone());
    }
    r
}

/// A small text response such as `404 Not Found`.
pub fn text_response(status: StatusCode) -> StaticResponse {
    let text = format!("{} {}\n", status.as_str(), status.canonical_reason().unwrap_or(""));
    let mut r = Response::new(StaticBody::Full(Some(Bytes::from(text))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A static response body: nothing, a small in-memory text, or a file range read from disk.
pub enum StaticBody {
    Empty,
    Full(Option<Bytes>),
    File(FileBody),
}

impl StaticBody {
    fn file(file: File, start: u64, len: u64) -> Self {
        StaticBody::File(FileBody { file: Arc::new(file), pos: start, remaining: len, reading: None })
    }
}

/// Streams `remaining` bytes of a file from `pos`, one 256 KiB `pread` at a time on the
/// blocking pool, with one read ahead.
pub struct FileBody {
    file: Arc<File>,
    pos: u64,
    remaining: u64,
    reading: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
}

impl FileBody {
    fn start_read(&mut self) {
        let want = self.remaining.min(READ_CHUNK) as usize;
        let (file, pos) = (Arc::clone(&self.file), self.pos);
        self.reading = Some(tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                match file.read_at(&mut buf[filled..], pos + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(filled);
            Ok(Bytes::from(buf))
        }));
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        if self.reading.is_none() {
            self.start_read();
        }
        let handle = self.reading.as_mut().expect("read started above");
        let chunk = match std::task::ready!(Pin::new(handle).poll(cx)) {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) => return Poll::Ready(Some(Err(e))),
            Err(join) => return Poll::Ready(Some(Err(io::Error::other(join)))),
        };
        self.reading = None;
        if chunk.is_empty() {
            // The file shrank under us: end the body short rather than pad it.
            let err = io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being served");
            return Poll::Ready(Some(Err(err)));
        }
        self.pos += chunk.len() as u64;
        self.remaining -= chunk.len() as u64;
        if self.remaining > 0 {
            self.start_read();
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        if let Some(h) = self.reading.take() {
            h.abort();
        }
    }
}

impl Body for StaticBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            StaticBody::Empty => Poll::Ready(None),
            StaticBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            StaticBody::File(f) => Pin::new(f).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            StaticBody::Empty => true,
            StaticBody::Full(b) => b.is_none(),
            StaticBody::File(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            StaticBody::Empty => SizeHint::with_exact(0),
            StaticBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            StaticBody::File(f) => f.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn v() -> Validators {
        Validators { etag: "\"abc\"".into(), mtime: 1_000_000, len: 1000 }
    }

    const NOW: u64 = 2_000_000;

    fn get(pairs: &[(&str, &str)]) -> Decision {
        decide(&Method::GET, &hm(pairs), &v(), NOW)
    }

    #[test]
    fn paths_are_decoded_per_segment_and_escapes_refused() {
        assert_eq!(resolve_path("/").unwrap(), RelPath { rel: ".".into(), trailing_slash: true });
        assert_eq!(resolve_path("/a/./b%20c/").unwrap(), RelPath { rel: "a/b c".into(), trailing_slash: true });
        assert_eq!(resolve_path("/a//b").unwrap().rel, PathBuf::from("a/b"));
        assert_eq!(resolve_path("/../etc/passwd"), Err(PathRejection::Traversal));
        assert_eq!(resolve_path("/a/%2e%2E/b"), Err(PathRejection::Traversal));
        assert_eq!(resolve_path("/a%2Fb"), Err(PathRejection::EncodedSlash));
        assert_eq!(resolve_path("/a%2fb"), Err(PathRejection::EncodedSlash));
        assert_eq!(resolve_path("/a%00b"), Err(PathRejection::BadRequest));
        assert_eq!(resolve_path("/a%zz"), Err(PathRejection::BadRequest));
        assert_eq!(resolve_path("/a%2"), Err(PathRejection::BadRequest));
        assert_eq!(resolve_path("relative"), Err(PathRejection::BadRequest));
    }

    #[test]
    fn single_ranges_are_partial_and_clamped() {
        assert_eq!(get(&[("range", "bytes=0-99")]), Decision::Partial { start: 0, end: 99 });
        assert_eq!(get(&[("range", "bytes=990-5000")]), Decision::Partial { start: 990, end: 999 });
        assert_eq!(get(&[("range", "bytes=500-")]), Decision::Partial { start: 500, end: 999 });
        assert_eq!(get(&[("range", "bytes=-100")]), Decision::Partial { start: 900, end: 999 });
        assert_eq!(get(&[("range", "bytes=-5000")]), Decision::Partial { start: 0, end: 999 });
        assert_eq!(get(&[("range", "BYTES = 1-1")]), Decision::Partial { start: 1, end: 1 });
    }

    #[test]
    fn unsatisfiable_several_and_invalid_ranges() {
        assert_eq!(get(&[("range", "bytes=1000-")]), Decision::RangeNotSatisfiable);
        assert_eq!(get(&[("range", "bytes=-0")]), Decision::RangeNotSatisfiable);
        assert_eq!(get(&[("range", "bytes=2000-3000, 5000-")]), Decision::RangeNotSatisfiable);
        assert_eq!(get(&[("range", "bytes=0-1,5-6")]), Decision::Full);
        assert_eq!(get(&[("range", "bytes=0-1,5000-6000")]), Decision::Partial { start: 0, end: 1 });
        for invalid in ["bytes=5-1", "bytes=a-b", "items=0-1", "bytes=", "bytes 0-1", "bytes=--1", "bytes=+1-2"] {
            assert_eq!(get(&[("range", invalid)]), Decision::Full, "{invalid}");
        }
        let empty = Validators { len: 0, ..v() };
        assert_eq!(decide(&Method::GET, &hm(&[("range", "bytes=0-")]), &empty, NOW), Decision::RangeNotSatisfiable);
        assert_eq!(decide(&Method::HEAD, &hm(&[("range", "bytes=0-1")]), &v(), NOW), Decision::Full);
    }

    #[test]
    fn conditionals_follow_rfc_9110_order() {
        let lm = httpdate::format(1_000_000);
        let earlier = httpdate::format(999_999);
        assert_eq!(get(&[("if-none-match", "\"x\", W/\"abc\"")]), Decision::NotModified);
        assert_eq!(get(&[("if-none-match", "*")]), Decision::NotModified);
        assert_eq!(get(&[("if-none-match", "\"x\"")]), Decision::Full);
        assert_eq!(get(&[("if-modified-since", &lm)]), Decision::NotModified);
        assert_eq!(get(&[("if-modified-since", &earlier)]), Decision::Full);
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(get(&[("if-none-match", "\"x\""), ("if-modified-since", &lm)]), Decision::Full);
        assert_eq!(get(&[("if-modified-since", "garbage")]), Decision::Full);
        assert_eq!(get(&[("if-match", "\"x\"")]), Decision::PreconditionFailed);
        assert_eq!(get(&[("if-match", "W/\"abc\"")]), Decision::PreconditionFailed);
        assert_eq!(get(&[("if-match", "\"abc\"")]), Decision::Full);
        assert_eq!(get(&[("if-unmodified-since", &earlier)]), Decision::PreconditionFailed);
        assert_eq!(decide(&Method::HEAD, &hm(&[("if-none-match", "\"abc\"")]), &v(), NOW), Decision::NotModified);
    }

    #[test]
    fn if_range_honours_range_only_for_the_current_strong_validator() {
        let range = ("range", "bytes=0-9");
        let part = Decision::Partial { start: 0, end: 9 };
        assert_eq!(get(&[range, ("if-range", "\"abc\"")]), part);
        assert_eq!(get(&[range, ("if-range", "\"old\"")]), Decision::Full);
        assert_eq!(get(&[range, ("if-range", "W/\"abc\"")]), Decision::Full);
        assert_eq!(get(&[range, ("if-range", &httpdate::format(1_000_000))]), part);
        assert_eq!(get(&[range, ("if-range", &httpdate::format(1_000_001))]), Decision::Full);
        // Modified within the current second: the date is only a weak validator.
        assert_eq!(
            decide(&Method::GET, &hm(&[range, ("if-range", &httpdate::format(1_000_000))]), &v(), 1_000_000),
            Decision::Full
        );
    }

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type(Path::new("a/index.HTML")), "text/html; charset=utf-8");
        assert_eq!(content_type(Path::new("x.woff2")), "font/woff2");
        assert_eq!(content_type(Path::new("noext")), "application/octet-stream");
    }
}
