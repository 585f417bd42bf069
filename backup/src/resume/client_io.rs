//! The restored socket: graceful close, and the reads this node frames itself before hyper reads on.

use super::*;

/// A restored socket that closes gracefully: when dropped, a task shuts it down (FIN after the send
/// queue) and drains the client's bytes until the client closes or [`LINGER`] passes.
pub struct Graceful {
    stream: Option<TcpStream>,
}

impl Graceful {
    pub fn new(stream: TcpStream) -> Graceful {
        Graceful { stream: Some(stream) }
    }

    pub(super) fn get(&mut self) -> &mut TcpStream {
        self.stream.as_mut().expect("the stream is only taken on drop")
    }
}

impl Drop for Graceful {
    fn drop(&mut self) {
        let (Some(mut stream), Ok(rt)) = (self.stream.take(), tokio::runtime::Handle::try_current()) else { return };
        rt.spawn(async move {
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 16 * 1024];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

impl AsyncRead for Graceful {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Graceful {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().get()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().get()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()).poll_shutdown(cx)
    }
}

/// What to keep of the request being consumed: its head (to re-issue it) and its body.
pub(super) struct Capture {
    pub(super) exchange: u64,
    pub(super) head: Option<oneshot::Sender<Vec<u8>>>,
    pub(super) body: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
}

/// The client side of a restored connection: client bytes this node read ahead go to hyper first,
/// then the socket's; reads can be made to end at a client-stream offset (a request that must not
/// be read). Writes go to the connection's [`LoggedIo`].
pub struct ClientIo<T> {
    io: T,
    /// Client bytes read but not consumed, from stream offset `pos`.
    buf: BytesMut,
    pos: u64,
    /// Reads end (EOF) at this client-stream offset.
    pub(super) limit: Option<u64>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> ClientIo<T> {
    /// `io` positioned at client-stream offset `pos` (the restored receive queue's start).
    pub fn new(io: T, pos: u64) -> ClientIo<T> {
        ClientIo { io, buf: BytesMut::new(), pos, limit: None }
    }

    /// Client-stream offset of the next byte not consumed.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Reads more client bytes into the buffer.
    pub(super) async fn fill(&mut self, idle: Duration) -> Result<(), ResumeError> {
        let end = self.pos + self.buf.len() as u64;
        match tokio::time::timeout(idle, self.io.read_buf(&mut self.buf)).await {
            Err(_) => Err(ResumeError::ClientTimeout(idle)),
            Ok(Ok(0)) => Err(ResumeError::ClientClosed(end)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Consumes the client's requests from the current offset (a request boundary, numbered `base`)
    /// through exchange `through`, framing them with the replica's framer. `capture` receives one
    /// request's head and body on the way.
    pub(super) async fn consume_through(
        &mut self,
        base: u64,
        through: u64,
        mut capture: Option<Capture>,
        idle: Duration,
    ) -> Result<(), ResumeError> {
        if through < base {
            return Ok(());
        }
        let mut framer = Framer::requests(self.pos).with_body_events();
        let mut events = Vec::new();
        loop {
            if self.buf.is_empty() {
                self.fill(idle).await?;
            }
            let chunk = self.buf.split().freeze();
            let at = self.pos;
            events.clear();
            framer.feed(at, &chunk, &mut events)?;
            let mut end = None;
            for e in events.drain(..) {
                match e {
                    Event::RequestHead { head, raw } => {
                        if let Some(c) = capture.as_mut().filter(|c| c.exchange == base + head.index)
                            && let Some(tx) = c.head.take()
                        {
                            let _ = tx.send(raw);
                        }
                    }
                    Event::Body { index, range, .. } => {
                        if let Some(c) = capture.as_mut().filter(|c| c.exchange == base + index)
                            && let Some(tx) = &c.body
                            && tx
                                .send(Ok(chunk.slice((range.start - at) as usize..(range.end - at) as usize)))
                                .await
                                .is_err()
                        {
                            // The re-issued request stopped reading; the rest is only consumed.
                            c.body = None;
                        }
                    }
                    Event::Complete { index, end: e, .. } if base + index == through => {
                        end = Some(e);
                        break;
                    }
                    _ => {}
                }
            }
            match end {
                Some(e) => {
                    self.buf = BytesMut::from(&chunk[(e - at) as usize..]);
                    self.pos = e;
                    return Ok(());
                }
                None => self.pos = at + chunk.len() as u64,
            }
            if framer.phase() == &Phase::Done {
                // A closing request before `through`: nothing after it is ever read.
                return Err(ResumeError::ClientClosed(self.pos));
            }
        }
    }

    /// Writes `bytes` to the client, failing if it makes no progress for `timeout`.
    pub(super) async fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ResumeError> {
        for piece in bytes.chunks(WRITE_PIECE) {
            match tokio::time::timeout(timeout, self.io.write_all(piece)).await {
                Err(_) => return Err(ResumeError::SendTimeout(timeout)),
                Ok(r) => r?,
            }
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self, timeout: Duration) -> Result<(), ResumeError> {
        match tokio::time::timeout(timeout, self.io.flush()).await {
            Err(_) => Err(ResumeError::SendTimeout(timeout)),
            Ok(r) => Ok(r?),
        }
    }

    /// Closes the connection honestly: what was written is flushed, then FIN; the socket drains
    /// the client's bytes for a while after (see [`Graceful`]).
    pub(super) async fn close(mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.io.shutdown()).await;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let max = this.limit.map_or(usize::MAX, |l| l.saturating_sub(this.pos).min(usize::MAX as u64) as usize);
        if max == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.buf.is_empty() {
            let n = this.buf.len().min(buf.remaining()).min(max);
            buf.put_slice(&this.buf[..n]);
            this.buf.advance(n);
            this.pos += n as u64;
            return Poll::Ready(Ok(()));
        }
        if max >= buf.remaining() {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.io).poll_read(cx, buf);
            this.pos += (buf.filled().len() - before) as u64;
            return polled;
        }
        // Only up to the limit: read into a bounded buffer.
        let mut scratch = vec![0u8; max.min(16 * 1024)];
        let mut small = ReadBuf::new(&mut scratch);
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut small);
        let n = small.filled().len();
        buf.put_slice(small.filled());
        this.pos += n as u64;
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body read from the restored receive queue as the consumer frames it.
pub(super) struct ChannelBody {
    pub(super) rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    /// Bytes still expected, for a Content-Length body.
    pub(super) remaining: Option<u64>,
    pub(super) done: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = &mut this.remaining {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done = true;
                match this.remaining {
                    Some(r) if r > 0 => Poll::Ready(Some(Err("client request body ended short".into()))),
                    _ => Poll::Ready(None),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(r) => SizeHint::with_exact(r),
            None => SizeHint::default(),
        }
    }
}

/// The request head the client sent, as `http` parts.
pub(super) fn parse_request_head(raw: &[u8]) -> Result<http::request::Parts, ResumeError> {
    let bad = |e: &dyn std::fmt::Display| ResumeError::RequestHead(e.to_string());
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad(&"incomplete")),
        Err(e) => return Err(bad(&e)),
    }
    let mut b = http::Request::builder()
        .method(req.method.unwrap_or("GET"))
        .uri(req.path.unwrap_or("/"))
        .version(if req.version == Some(0) { http::Version::HTTP_10 } else { http::Version::HTTP_11 });
    for f in req.headers.iter() {
        b = b.header(f.name, f.value);
    }
    let (parts, ()) = b.body(()).map_err(|e| bad(&e))?.into_parts();
    Ok(parts)
}
