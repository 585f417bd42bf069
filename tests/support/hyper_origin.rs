//! A small HTTP/1.1 origin in the test's own process, for what nginx cannot show (an origin that
//! records what it received, deduplicates, streams or answers slowly): hyper's server on every
//! connection a listener accepts, each request answered by the test's handler.

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::error::Error;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Serves HTTP/1.1 on every connection `listener` accepts, each request answered by `handler`, until
/// the returned task is aborted (or its runtime shut down). Call from inside a Tokio runtime.
pub fn serve<F, Fut, B, E>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
    E: Into<Box<dyn Error + Send + Sync>>,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(handler);
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn each_request_is_answered_by_the_handler_until_the_task_is_aborted() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = serve(listener, |req: Request<Incoming>| async move {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("saw {}", req.uri().path())))))
        });
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /a HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n").await?;
        let mut got = String::new();
        s.read_to_string(&mut got).await?;
        assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("saw /a"), "{got}");
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        Ok(())
    }
}
