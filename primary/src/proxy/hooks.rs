//! Where the replication layer plugs into the proxy.
//!
//! * [`ExchangeObserver`]: told, per connection, when an exchange starts (head parsed), each
//!   upstream response head and body chunk as it arrives, and when the exchange ends. The
//!   calls are synchronous and must not block: an implementation queues a replication record.
//!   That stays bounded without back-pressure here, because the reply bytes built from an
//!   upstream chunk go through the [`ReplyLog`](super::ReplyLog), whose acknowledgement
//!   comes after the chunk's own record on the one ordered stream: the proxy never runs
//!   more than a few chunks ahead of the backup.
//! * [`ConnectionHooks`]: per accepted connection, the reply log and observer to use.
//!
//! [`Unprotected`] is the mode without a backup: [`NoLog`] and [`NoObserver`].

use super::logged_io::{NoLog, ReplyLog};
use bytes::Bytes;
use http::Method;
use std::net::SocketAddr;

/// An exchange begins: the request head was parsed.
///
/// The request's offset in the client's byte stream is not here: hyper reads ahead (it
/// buffers pipelined requests), so the proxy cannot tell where a request started. The
/// replica's own HTTP framer, which parses the client stream from the segments, knows; it
/// pairs its requests with these by `exchange`, the request's number on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeInfo {
    /// Exchange number on the connection, from 0, in request order.
    pub exchange: u64,
    pub method: Method,
    /// The request target as received (origin form: path and query).
    pub target: String,
    /// The `Idempotency-Key` sent upstream (non-idempotent methods only).
    pub idempotency_key: Option<String>,
    /// Whether the proxy generated that key (the client sent none).
    pub key_generated: bool,
    /// The upstream (`host:port`) the request goes to; `None` for the static file server.
    pub upstream: Option<String>,
}

/// An exchange ended: its response body was handed to the client connection, or abandoned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeOutcome {
    pub exchange: u64,
    /// The status handed to the client connection; `None` if no response was produced
    /// (the client went away first).
    pub status: Option<u16>,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes handed to the client connection.
    pub bytes_out: u64,
    /// Whether the response body was delivered to its end.
    pub complete: bool,
}

/// Observes the exchanges of one connection. Every method defaults to doing nothing.
pub trait ExchangeObserver: Send + Sync + 'static {
    fn on_exchange_start(&self, _info: &ExchangeInfo) {}

    /// The upstream's response head, after hop-by-hop processing: what the proxy hands to the
    /// client connection (hyper adds `Date` and the framing fields when it writes it).
    fn on_upstream_head(&self, _exchange: u64, _head: &http::response::Parts) {}

    /// Upstream response body bytes (de-chunked), at `offset` within the body, as they arrive.
    fn on_upstream_data(&self, _exchange: u64, _offset: u64, _data: &Bytes) {}

    fn on_exchange_end(&self, _outcome: &ExchangeOutcome) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl ExchangeObserver for NoObserver {}

/// Chooses the reply log and observer of each accepted connection.
pub trait ConnectionHooks: Send + Sync + 'static {
    type Log: ReplyLog + Unpin;
    type Observer: ExchangeObserver;

    /// Called once per accepted connection, before any byte is read. `local` is the address
    /// the client reached (the VIP and port).
    fn open(&self, peer: SocketAddr, local: SocketAddr) -> (Self::Log, Self::Observer);
}

/// No backup: replies go straight to the socket and nothing is observed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unprotected;

impl ConnectionHooks for Unprotected {
    type Log = NoLog;
    type Observer = NoObserver;

    fn open(&self, _peer: SocketAddr, _local: SocketAddr) -> (NoLog, NoObserver) {
        (NoLog, NoObserver)
    }
}
