//! Header rules of a forwarding proxy.
//!
//! * RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields before forwarding — `Connection`
//!   and every field it names, `Keep-Alive`, `Proxy-Connection` (and the other `Proxy-*`
//!   fields, which describe the hop to this proxy), `TE`, `Trailer`, `Transfer-Encoding` and
//!   `Upgrade`. Message framing is re-done by hyper on each side (RFC 9112 §6), so dropping
//!   `Transfer-Encoding` loses nothing; hyper already discards `Content-Length` when a request
//!   carries both (RFC 9112 §6.3, against request smuggling).
//! * RFC 9110 §10.1.1: `Expect: 100-continue` is answered by this proxy itself (hyper sends
//!   `100 Continue` when the body is first read, i.e. once the upstream is connected and
//!   wants it), so the expectation is not forwarded.
//! * RFC 9110 §7.6.3: `Via` is added in both directions. `X-Forwarded-For` (de facto) gets the
//!   client's address appended.
//! * RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT and DELETE are idempotent; any other
//!   method (POST, PATCH, unknown extension methods) carries an `Idempotency-Key`
//!   (draft-ietf-httpapi-idempotency-key-header) towards the upstream so that a backup may
//!   re-send it after a failover only where the origin deduplicates.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use std::net::IpAddr;

/// `Idempotency-Key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1 (and `Proxy-*`) from `headers`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // The fields named by Connection go first, while Connection is still there to read.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in
        [&header::CONNECTION, &KEEP_ALIVE, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING, &header::UPGRADE]
    {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// The protocol part of a `Via` entry for a message received with `version`.
fn via_protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Appends `<version> <node>` to `Via`.
pub fn append_via(headers: &mut HeaderMap, received: Version, node: &str) {
    let entry = format!("{} {node}", via_protocol(received));
    append_list(headers, header::VIA, &entry);
}

/// Appends the client's address to `X-Forwarded-For`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    append_list(headers, X_FORWARDED_FOR.clone(), &client.to_string());
}

/// Joins all existing lines of a list-valued field and `entry` into one line.
fn append_list(headers: &mut HeaderMap, name: HeaderName, entry: &str) {
    let mut joined: Vec<String> =
        headers.get_all(&name).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect();
    joined.push(entry.to_owned());
    match HeaderValue::from_str(&joined.join(", ")) {
        Ok(value) => {
            headers.insert(name, value);
        }
        // A node name that cannot be a header value is refused by config validation; an
        // existing opaque (non-ASCII) value is left alone rather than mangled.
        Err(_) => {
            if let Ok(value) = HeaderValue::from_str(entry) {
                headers.append(name, value);
            }
        }
    }
}

/// RFC 9110 §9.2.2.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// A fresh `Idempotency-Key` value: a random (version 4) UUID as a structured-field string,
/// the form the draft's examples use. 122 random bits from the kernel's CSPRNG.
pub fn generate_idempotency_key() -> String {
    let mut b = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("\"{}-{}-{}-{}-{}\"", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn random_bytes() -> [u8; 16] {
    let mut buf = [0u8; 16];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else {
            let err = std::io::Error::last_os_error();
            // getrandom(2) only fails with EINTR for requests this small once the pool is up
            // (Linux ≥ 3.17); anything else means the kernel lacks the call, which this
            // Linux-only program cannot run without anyway.
            assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "getrandom(2) failed: {err}");
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn connection_named_fields_and_fixed_hop_by_hop_fields_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("content-length", "5"),
            ("x-kept", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    #[test]
    fn via_and_forwarded_for_append_to_existing_lists() {
        let mut h = map(&[("via", "1.0 fred"), ("via", "1.1 p.example.net"), ("x-forwarded-for", "10.0.0.1")]);
        append_via(&mut h, Version::HTTP_11, "node-a");
        append_forwarded_for(&mut h, "192.0.2.7".parse().unwrap());
        assert_eq!(h["via"], "1.0 fred, 1.1 p.example.net, 1.1 node-a");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        let mut empty = HeaderMap::new();
        append_via(&mut empty, Version::HTTP_10, "n");
        assert_eq!(empty["via"], "1.0 n");
    }

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PROPFIND", "LOCK"] {
            assert!(!is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
    }

    #[test]
    fn generated_keys_are_quoted_v4_uuids_and_distinct() {
        let a = generate_idempotency_key();
        let b = generate_idempotency_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 38);
        assert!(a.starts_with('"') && a.ends_with('"'));
        assert_eq!(&a[15..16], "4");
        assert!(HeaderValue::from_str(&a).is_ok());
    }
}
