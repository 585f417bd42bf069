//! The logged client IO (ARCHITECTURE.md "Reply log", invariant 1 "output commit").
//!
//! [`LoggedIo`] wraps the client socket. Every byte hyper writes is first appended to a
//! [`ReplyLog`] with its offset in the server→client byte stream (0 = the first byte after
//! the SYN-ACK), and reaches the socket only after that append resolved, i.e. once the
//! backup holds it. Bytes reach the socket exactly once, in order, at the offsets that were
//! logged. Reads pass straight through: inbound bytes are protected by the gate, below TCP.
//!
//! Back-pressure: at most `window` bytes may be appended but not yet written to the socket, and no
//! more than [`AHEAD_OF_A_SLOW_SOCKET`] plus what the socket took in its last second (its drain
//! rate): a fast client gets the whole window, so a response of up to a window is read from the
//! upstream and logged at once; a slow reader (a download read at 50 kB/s) is logged little ahead of
//! it, which would only grow both nodes' state, not its rate. A log handing over to its backup
//! ([`ReplyLog::handing_over`]) gets the whole window, and its flushes complete at once: what it
//! takes then is what the backup can carry on without asking the upstream again.
//! Beyond that `poll_write` returns `Pending` until the log accepts and the socket drains.
//! `poll_flush` (but while handing over) and `poll_shutdown` complete only when every accepted
//! byte was logged and written. Bytes taken by `poll_write` (it returned `Ok(n)`) are owned by the wrapper, so
//! the `AsyncWrite` contract holds: `Pending` always means "nothing taken".

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Where reply bytes go before the client may see them.
pub trait ReplyLog: Send + Sync + 'static {
    /// Why the log refused bytes (link down for good, node fenced): the bytes must never be sent.
    type Error: std::error::Error + Send + Sync + 'static;

    /// `true` for a log that protects nothing ([`NoLog`]): the wrapper then writes straight to
    /// the socket without copying and never calls `append`.
    const PASS_THROUGH: bool = false;

    /// Appends `bytes` at `offset`. Offsets are contiguous: each call starts where the
    /// previous one ended.
    ///
    /// The append takes its place in the log's order *when called*, not when the future is
    /// first polled: the wrapper keeps several appends outstanding and polls only the oldest.
    /// The future resolves once the bytes are safe (the backup acknowledged them). It owns
    /// what it needs (`'static`) because it outlives the `poll_write` call that created it.
    fn append(&self, offset: u64, bytes: Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static;

    /// Whether the log holds what is appended for a backup about to carry the connection on (a planned
    /// switchover): the wrapper then takes up to its whole window whatever the socket does, and its
    /// flushes complete at once (no byte will reach the socket from this node), so that a response in
    /// flight is logged in full instead of fetched again from the upstream.
    fn handing_over(&self) -> bool {
        false
    }
}

/// The unprotected mode: no backup, bytes go straight to the socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLog;

impl ReplyLog for NoLog {
    type Error = std::convert::Infallible;
    const PASS_THROUGH: bool = true;

    fn append(&self, _offset: u64, _bytes: Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        std::future::ready(Ok(()))
    }
}

/// Default bound on bytes appended but not yet written to the socket.
pub const DEFAULT_WINDOW: usize = 1 << 20;
/// Largest single append: a larger `poll_write` is taken in several pieces.
const MAX_APPEND: usize = 64 * 1024;
/// Bytes appended but not yet written that any socket may have on top of its last second's drain:
/// enough to refill it at once when it drains, while the next appends are acknowledged.
const AHEAD_OF_A_SLOW_SOCKET: usize = MAX_APPEND;

/// Bytes a socket took per one-second bucket: its drain rate, without a timer.
#[derive(Debug, Default)]
struct Drained {
    since: Option<Instant>,
    current: usize,
    previous: usize,
}

impl Drained {
    fn roll(&mut self, now: Instant) {
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= Duration::from_secs(1) {
            self.previous = if elapsed >= Duration::from_secs(2) { 0 } else { self.current };
            self.current = 0;
            self.since = Some(now);
        }
    }

    fn add(&mut self, now: Instant, n: usize) {
        self.roll(now);
        self.current += n;
    }

    /// What the socket took in about the last second.
    fn per_second(&mut self, now: Instant) -> usize {
        self.roll(now);
        self.current.max(self.previous)
    }
}

type AckFuture<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

struct Entry<E> {
    bytes: Bytes,
    /// Bytes of `bytes` already written to the socket.
    written: usize,
    /// The pending append; `None` once it resolved.
    ack: Option<AckFuture<E>>,
}

/// An `AsyncRead + AsyncWrite` client socket whose writes go through a [`ReplyLog`] first.
pub struct LoggedIo<T, L: ReplyLog> {
    inner: T,
    log: L,
    /// Offset of the next byte `poll_write` will take.
    next_offset: u64,
    /// Bytes written to the socket so far (= offset of the oldest unwritten byte).
    written: u64,
    /// What the socket took in the current and the previous second.
    drained: Drained,
    queue: VecDeque<Entry<L::Error>>,
    /// Bytes in `queue` not yet written to the socket.
    queued: usize,
    window: usize,
    /// A refused append or a socket error: every later call fails the same way.
    failed: Option<(io::ErrorKind, String)>,
}

impl<T, L: ReplyLog> LoggedIo<T, L> {
    /// Wraps `inner`; the first byte written is at offset 0.
    pub fn new(inner: T, log: L) -> Self {
        Self::with_offset(inner, log, 0)
    }

    /// Wraps `inner` whose server→client stream already carried `offset` bytes (a socket
    /// restored by a takeover continues at its replica's offset).
    pub fn with_offset(inner: T, log: L, offset: u64) -> Self {
        LoggedIo {
            inner,
            log,
            next_offset: offset,
            written: offset,
            drained: Drained::default(),
            queue: VecDeque::new(),
            queued: 0,
            window: DEFAULT_WINDOW,
            failed: None,
        }
    }

    /// Sets the bound on bytes appended but not yet on the socket (at least one append is
    /// always allowed, whatever its size).
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Offset of the next byte the wrapper will take (bytes taken so far, plus the start offset).
    pub fn offset(&self) -> u64 {
        self.next_offset
    }

    /// Offset up to which bytes were written to the socket.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    pub fn log(&self) -> &L {
        &self.log
    }

    fn error(&self) -> Option<io::Error> {
        self.failed.as_ref().map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }

    fn fail(&mut self, err: io::Error) -> io::Error {
        self.failed = Some((err.kind(), err.to_string()));
        // Nothing behind a failure may reach the socket.
        self.queue.clear();
        self.queued = 0;
        err
    }
}

impl<T: AsyncWrite + Unpin, L: ReplyLog> LoggedIo<T, L> {
    /// Moves queued bytes to the socket, oldest first, each only after its append resolved.
    /// `Ready(Ok)` when the queue is empty; `Pending` with the waker registered otherwise.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(head) = self.queue.front_mut() {
            if let Some(ack) = head.ack.as_mut() {
                match ready!(ack.as_mut().poll(cx)) {
                    Ok(()) => head.ack = None,
                    Err(e) => {
                        let msg = format!("reply log refused bytes at offset {}: {e}", self.written);
                        return Poll::Ready(Err(self.fail(io::Error::new(io::ErrorKind::BrokenPipe, msg))));
                    }
                }
            }
            while head.written < head.bytes.len() {
                match ready!(Pin::new(&mut self.inner).poll_write(cx, &head.bytes[head.written..])) {
                    Ok(0) => return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => {
                        self.drained.add(Instant::now(), n);
                        head.written += n;
                        self.written += n as u64;
                        self.queued -= n;
                    }
                    Err(e) => return Poll::Ready(Err(self.fail(e))),
                }
            }
            self.queue.pop_front();
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `bytes` (already copied out of the caller's buffers) into the log and the queue.
    fn take(&mut self, cx: &mut Context<'_>, bytes: Bytes) -> io::Result<usize> {
        let n = bytes.len();
        let ack = Box::pin(self.log.append(self.next_offset, bytes.clone()));
        self.next_offset += n as u64;
        self.queued += n;
        self.queue.push_back(Entry { bytes, written: 0, ack: Some(ack) });
        // A log that accepts at once lets the bytes out now rather than at the next flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            return Err(e);
        }
        Ok(n)
    }

    /// Bytes that may be appended but not yet written now (see the module's documentation).
    fn ahead_bound(&mut self) -> usize {
        if self.log.handing_over() {
            return self.window;
        }
        let rate = self.drained.per_second(Instant::now());
        self.window.min(AHEAD_OF_A_SLOW_SOCKET.saturating_add(rate))
    }

    /// How many more bytes may be taken now; 0 means `Pending` (the waker is registered).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if let Some(e) = self.error() {
            return Poll::Ready(Err(e));
        }
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        if self.queue.is_empty() {
            return Poll::Ready(Ok(MAX_APPEND));
        }
        // poll_drain returned Pending here, so the waker is registered.
        match self.ahead_bound().saturating_sub(self.queued) {
            0 => Poll::Pending,
            room => Poll::Ready(Ok(room.min(MAX_APPEND))),
        }
    }
}

impl<T: AsyncRead + Unpin, L: ReplyLog + Unpin> AsyncRead for LoggedIo<T, L> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin, L: ReplyLog + Unpin> AsyncWrite for LoggedIo<T, L> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if L::PASS_THROUGH {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
            this.next_offset += n as u64;
            this.written += n as u64;
            return Poll::Ready(Ok(n));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = ready!(this.poll_room(cx))?;
        let n = buf.len().min(room);
        Poll::Ready(this.take(cx, Bytes::copy_from_slice(&buf[..n])))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if L::PASS_THROUGH {
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
            this.next_offset += n as u64;
            this.written += n as u64;
            return Poll::Ready(Ok(n));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let room = ready!(this.poll_room(cx))?;
        // The log needs its own copy anyway, so gathering costs nothing extra.
        let mut gathered = BytesMut::with_capacity(total.min(room));
        for b in bufs {
            let take = b.len().min(room - gathered.len());
            gathered.extend_from_slice(&b[..take]);
            if gathered.len() == room {
                break;
            }
        }
        Poll::Ready(this.take(cx, gathered.freeze()))
    }

    fn is_write_vectored(&self) -> bool {
        // Pass-through follows the socket; the logging path gathers into one copy.
        !L::PASS_THROUGH || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.error() {
            return Poll::Ready(Err(e));
        }
        if this.log.handing_over() {
            // Nothing reaches the socket from here on, and the backup carries on from what is logged: a
            // flush waited on would hold the rest of the response in the upstream.
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.error() {
            return Poll::Ready(Err(e));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    /// A log that holds each append until the test releases it, records offsets, and checks
    /// that they are contiguous.
    #[derive(Clone, Default)]
    struct HeldLog(Arc<Mutex<Held>>);

    #[derive(Default)]
    struct Held {
        appended: Vec<u8>,
        /// Offsets of every append, in call order.
        offsets: Vec<u64>,
        /// End offset of the bytes released so far.
        released: u64,
        waiting: VecDeque<(u64, oneshot::Sender<Result<(), Refused>>)>,
        refuse_from: Option<u64>,
        handing_over: bool,
    }

    #[derive(Debug, thiserror::Error, Clone)]
    #[error("refused")]
    struct Refused;

    impl ReplyLog for HeldLog {
        type Error = Refused;
        fn append(&self, offset: u64, bytes: Bytes) -> impl Future<Output = Result<(), Refused>> + Send + 'static {
            let mut h = self.0.lock().unwrap();
            assert_eq!(offset, h.appended.len() as u64, "appends must be contiguous");
            h.offsets.push(offset);
            h.appended.extend_from_slice(&bytes);
            let (tx, rx) = oneshot::channel();
            let end = offset + bytes.len() as u64;
            h.waiting.push_back((end, tx));
            async move { rx.await.unwrap_or(Err(Refused)) }
        }
        fn handing_over(&self) -> bool {
            self.0.lock().unwrap().handing_over
        }
    }

    impl HeldLog {
        /// Releases the oldest waiting append; false if none waits.
        fn release_one(&self) -> bool {
            let mut h = self.0.lock().unwrap();
            let Some((end, tx)) = h.waiting.pop_front() else { return false };
            let verdict = match h.refuse_from {
                Some(at) if end > at => Err(Refused),
                _ => {
                    h.released = end;
                    Ok(())
                }
            };
            let _ = tx.send(verdict);
            true
        }
        fn released(&self) -> u64 {
            self.0.lock().unwrap().released
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Releases appends one at a time, yielding in between, until `stop` fires.
    fn spawn_releaser(log: HeldLog, mut stop: oneshot::Receiver<()>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut step = 0u32;
            loop {
                if stop.try_recv().is_ok() {
                    return;
                }
                // Uneven pacing: sometimes several releases at once, sometimes none.
                step = step.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                for _ in 0..(step >> 29) {
                    log.release_one();
                }
                tokio::task::yield_now().await;
            }
        })
    }

    #[tokio::test]
    async fn delayed_log_every_byte_reaches_socket_once_in_order_after_its_append() {
        let total = 3 * 1024 * 1024 + 17;
        let data = pattern(total);
        let (client, server) = tokio::io::duplex(4096);
        let log = HeldLog::default();
        let mut io = LoggedIo::new(server, log.clone()).with_window(200_000);
        let (stop_tx, stop_rx) = oneshot::channel();
        let releaser = spawn_releaser(log.clone(), stop_rx);

        let reader_log = log.clone();
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::with_capacity(total);
            let mut buf = vec![0u8; 7000];
            loop {
                let n = client.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                assert!(
                    got.len() as u64 <= reader_log.released(),
                    "byte {} reached the socket before its append resolved",
                    got.len()
                );
            }
            got
        });

        let mut sent = 0;
        let mut size = 1;
        while sent < total {
            let end = (sent + size).min(total);
            if size % 3 == 0 {
                let mid = (sent + end) / 2;
                let bufs = [IoSlice::new(&data[sent..mid]), IoSlice::new(&data[mid..end])];
                sent += io.write_vectored(&bufs).await.unwrap();
            } else {
                io.write_all(&data[sent..end]).await.unwrap();
                sent = end;
            }
            size = size * 5 % 150_001 + 1;
            assert!(io.offset() - io.written() <= 200_000 + MAX_APPEND as u64);
        }
        io.shutdown().await.unwrap();
        assert_eq!(io.written(), total as u64);
        let got = reader.await.unwrap();
        let _ = stop_tx.send(());
        releaser.await.unwrap();
        assert_eq!(got, data, "socket bytes differ from what was written");
        let h = log.0.lock().unwrap();
        assert_eq!(h.appended, data, "logged bytes differ from what was written");
        assert!(h.offsets.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn log_that_never_accepts_blocks_writes_at_the_window_and_sends_nothing() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let log = HeldLog::default();
        let mut io = LoggedIo::new(server, log.clone()).with_window(100_000);
        let data = pattern(500_000);
        let write = tokio::time::timeout(std::time::Duration::from_millis(200), io.write_all(&data)).await;
        assert!(write.is_err(), "write_all must stall while the log holds everything");
        assert!(io.offset() <= 100_000 + MAX_APPEND as u64, "took {} bytes", io.offset());
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), client.read(&mut buf)).await;
        assert!(read.is_err(), "nothing may reach the socket");
    }

    /// A log that holds every append at once.
    #[derive(Clone, Default)]
    struct InstantLog(Arc<Mutex<Vec<u8>>>);

    impl ReplyLog for InstantLog {
        type Error = Refused;
        fn append(&self, _offset: u64, bytes: Bytes) -> impl Future<Output = Result<(), Refused>> + Send + 'static {
            self.0.lock().unwrap().extend_from_slice(&bytes);
            std::future::ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_logged_little_ahead_of_and_then_gets_everything() {
        let (mut client, server) = tokio::io::duplex(8192);
        let log = InstantLog::default();
        let window = 256 * 1024;
        let mut io = LoggedIo::new(server, log.clone()).with_window(window);
        let data = pattern(2 << 20);
        let stall = std::time::Duration::from_millis(100);
        // A new connection's socket that took 8192 bytes and nothing more: logged little ahead of it.
        assert!(tokio::time::timeout(stall, io.write_all(&data)).await.is_err(), "nothing read, all written");
        assert_eq!(io.written(), 8192, "the socket took what it holds");
        let ahead = io.offset() - io.written();
        assert!(
            ahead <= (AHEAD_OF_A_SLOW_SOCKET + MAX_APPEND) as u64 + 8192,
            "{ahead} bytes logged ahead of a new connection's socket that took 8192 (window {window})"
        );
        // The client reads 16 KiB every half second (32 kB/s) until it has 400 KiB, then stops.
        let (slow_tx, slow_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            while got.len() < 400 * 1024 {
                client.read_exact(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            slow_tx.send(()).unwrap();
            go_rx.await.unwrap();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let taken = io.offset() as usize;
        tokio::select! {
            _ = io.write_all(&data[taken..]) => panic!("all of it written though the client read only part"),
            _ = slow_rx => {}
        }
        let ahead = io.offset() - io.written();
        assert!(
            ahead <= (AHEAD_OF_A_SLOW_SOCKET + 2 * 16 * 1024 + MAX_APPEND) as u64,
            "{ahead} bytes logged ahead of a socket drained at 32 kB/s (window {window})"
        );
        // Once the client reads on, everything arrives, in order, and the log holds every byte once.
        go_tx.send(()).unwrap();
        let taken = io.offset() as usize;
        io.write_all(&data[taken..]).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), data);
        assert_eq!(*log.0.lock().unwrap(), data);
    }

    #[tokio::test]
    async fn a_log_handing_over_takes_a_whole_response_and_its_flush_completes_with_nothing_sent() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let log = HeldLog::default();
        log.0.lock().unwrap().handing_over = true;
        // A new connection (its socket took nothing yet) whose log holds every append for its backup.
        let mut io = LoggedIo::new(server, log.clone()).with_window(512 * 1024);
        let data = pattern(400_000);
        let written = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            io.write_all(&data).await?;
            io.flush().await
        });
        written.await.expect("the whole response is taken and flushed").unwrap();
        assert_eq!(log.0.lock().unwrap().appended, data, "every byte logged for the backup");
        assert_eq!(io.written(), 0);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), client.read(&mut buf)).await;
        assert!(read.is_err(), "nothing may reach the socket");
    }

    #[tokio::test]
    async fn refused_append_fails_the_stream_and_nothing_after_it_is_sent() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let log = HeldLog::default();
        log.0.lock().unwrap().refuse_from = Some(10);
        let mut io = LoggedIo::new(server, log.clone());
        io.write_all(b"0123456789").await.unwrap();
        io.write_all(b"abcdef").await.unwrap();
        assert!(log.release_one());
        assert!(log.release_one());
        let err = io.flush().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(io.write_all(b"more").await.is_err());
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"0123456789");
    }

    #[tokio::test]
    async fn no_log_passes_bytes_straight_through_and_counts_offsets() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut io = LoggedIo::with_offset(server, NoLog, 1000);
        io.write_all(b"hello").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!((io.offset(), io.written()), (1005, 1005));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }
}
