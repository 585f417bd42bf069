//! Node configuration: the settings of `primary` and `backup`, from built-in defaults, a TOML file and
//! command-line flags.
//!
//! Loading order: defaults < file (`--config FILE`) < flags. [`NodeConfig::load`] merges the layers, then runs
//! [`NodeConfig::validate`] (pure: ranges and impossible combinations) and checks the paths it names (`--root`
//! must be a directory, the `--request-log` directory must exist). Every error names the flag and the key.
//!
//! The file's schema is the same as [`NodeConfig`]; unknown keys are refused (`deny_unknown_fields`), so a
//! misspelt timeout fails loudly with the key's dotted name, file line and column instead of being ignored.
//! Durations are strings with a unit everywhere, in the file and in flags: `"500us"`, `"20ms"`, `"1s"`, `"2m"`.
//! Byte sizes and counts are plain integers whose unit is in the key's name (`max_frame_bytes`).
//!
//! An example file with every key: `shared/tests/fixtures/example.toml`.
//!
//! ```no_run
//! use clap::Parser;
//! use shared::config::{NodeConfig, PrimaryArgs};
//! let config = NodeConfig::load(PrimaryArgs::parse()).unwrap_or_else(|e| {
//!     eprintln!("primary: {e}");
//!     std::process::exit(2)
//! });
//! tracing::info!("starting: {config}");
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::auth::{LinkAuth, Psk};
use crate::protocol::Role;

/// TCP port served on the VIP when neither `--port` nor `port` is given.
pub const DEFAULT_PORT: u16 = 80;
/// Cluster name when none is given.
pub const DEFAULT_CLUSTER: &str = "understudy";
/// Address the admin endpoint binds when `--admin` gives only a port.
pub const DEFAULT_ADMIN_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Time between two heartbeats on the replication link.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);
/// Heartbeats missed in a row before the peer is declared dead.
pub const DEFAULT_HEARTBEAT_MISSES: u32 = 5;
/// Detection times above this draw a warning: the issue promises a dead primary is detected within it.
pub const DETECTION_TARGET: Duration = Duration::from_millis(200);
/// ARP probes of the VIP sent while fencing.
pub const DEFAULT_ARP_PROBES: u32 = 3;
/// Wait for an answer after each ARP probe.
pub const DEFAULT_ARP_TIMEOUT: Duration = Duration::from_millis(15);
/// Time the operator fencing command may run.
pub const DEFAULT_FENCE_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest request line plus header section accepted, in bytes (beyond: 431).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Smallest `limits.max_header_bytes` accepted: RFC 9112 section 3 recommends supporting request lines of
/// at least 8000 octets.
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest number of header fields in a request or an upstream response.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Time a client has to send a complete request head (beyond: 408 and close).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Client connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Time a request body may keep the proxy waiting before it must have delivered its minimum (below).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Slowest request body accepted, bytes per second, measured over each `body_read_timeout`.
pub const DEFAULT_BODY_MIN_RATE: u32 = 500;
/// Reply bytes the replica may hold per connection: the reply log window plus the client socket's send
/// buffer (see `LimitsConfig::replica_bytes_per_connection`).
pub const DEFAULT_REPLICA_BYTES_PER_CONNECTION: usize = 1024 * 1024;
/// Smallest `limits.replica_bytes_per_connection`: a few full-sized segments each way of the split.
pub const MIN_REPLICA_BYTES_PER_CONNECTION: usize = 64 * 1024;
/// NFQUEUE number of the inbound gate.
pub const DEFAULT_INBOUND_QUEUE: u16 = 7701;
/// NFQUEUE number for the segments of the primary's closed sockets (orphans; see `QueuesConfig::outbound`).
pub const DEFAULT_OUTBOUND_QUEUE: u16 = 7702;
/// Largest replication frame, in bytes, enforced when encoding and decoding.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;
/// Smallest `replication.max_frame_bytes`: a frame must carry a whole 64 KiB IPv4 datagram plus its record.
pub const MIN_MAX_FRAME_BYTES: u32 = 128 * 1024;
/// Largest `replication.max_frame_bytes`: bounds what one corrupt length prefix can make a node allocate.
pub const MAX_MAX_FRAME_BYTES: u32 = crate::frame::MAX_FRAME_LIMIT as u32;
/// Records the backup may take in before it must send a cumulative ack.
pub const DEFAULT_ACK_MAX_RECORDS: u32 = 64;
/// Extra time the backup may wait to batch acks (zero: ack as soon as its input is drained).
pub const DEFAULT_ACK_MAX_DELAY: Duration = Duration::ZERO;

/// One setting, as an operator writes it: its key in the file and, when there is one, its flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Setting {
    /// Dotted key in the config file (`detection.heartbeat_interval`).
    pub key: &'static str,
    /// Command-line flag, if the setting has one.
    pub flag: Option<&'static str>,
}

impl Setting {
    const fn new(key: &'static str, flag: &'static str) -> Self {
        Setting { key, flag: Some(flag) }
    }
    const fn key_only(key: &'static str) -> Self {
        Setting { key, flag: None }
    }
    pub const VIP: Setting = Setting::new("vip", "--vip");
    pub const IFACE: Setting = Setting::new("iface", "--iface");
    pub const PORT: Setting = Setting::new("port", "--port");
    pub const REPL_LISTEN: Setting = Setting::new("repl_listen", "--repl-listen");
    pub const JOIN: Setting = Setting::new("join", "--join");
    pub const UPSTREAM: Setting = Setting::new("upstream", "--upstream");
    pub const ROOT: Setting = Setting::new("root", "--root");
    pub const ADMIN: Setting = Setting::new("admin", "--admin");
    pub const REQUEST_LOG: Setting = Setting::new("request_log", "--request-log");
    pub const ADMIN_TOKEN_FILE: Setting = Setting::new("admin_token_file", "--admin-token-file");
    pub const CLUSTER: Setting = Setting::new("cluster", "--cluster");
    pub const NODE: Setting = Setting::new("node", "--node");
    pub const HEARTBEAT_INTERVAL: Setting = Setting::new("detection.heartbeat_interval", "--heartbeat-interval");
    pub const MISSES: Setting = Setting::new("detection.misses", "--heartbeat-misses");
    pub const LEASE: Setting = Setting::new("detection.lease", "--lease");
    pub const ARP_PROBES: Setting = Setting::key_only("fencing.arp_probes");
    pub const ARP_TIMEOUT: Setting = Setting::key_only("fencing.arp_timeout");
    pub const FENCE_COMMAND: Setting = Setting::key_only("fencing.command");
    pub const FENCE_COMMAND_TIMEOUT: Setting = Setting::key_only("fencing.command_timeout");
    pub const NON_IDEMPOTENT: Setting = Setting::new("retry.non_idempotent", "--non-idempotent-retry");
    pub const ORIGIN_HONOURS_GENERATED_KEYS: Setting =
        Setting::new("retry.origin_honours_generated_keys", "--origin-honours-generated-keys");
    pub const MAX_HEADER_BYTES: Setting = Setting::key_only("limits.max_header_bytes");
    pub const MAX_HEADERS: Setting = Setting::key_only("limits.max_headers");
    pub const HEADER_READ_TIMEOUT: Setting = Setting::key_only("limits.header_read_timeout");
    pub const IDLE_TIMEOUT: Setting = Setting::key_only("limits.idle_timeout");
    pub const MAX_CONNECTIONS: Setting = Setting::key_only("limits.max_connections");
    pub const BODY_READ_TIMEOUT: Setting = Setting::key_only("limits.body_read_timeout");
    pub const BODY_MIN_RATE: Setting = Setting::key_only("limits.body_min_rate");
    pub const REPLICA_BYTES_PER_CONNECTION: Setting = Setting::key_only("limits.replica_bytes_per_connection");
    pub const INBOUND_QUEUE: Setting = Setting::key_only("queues.inbound");
    pub const OUTBOUND_QUEUE: Setting = Setting::key_only("queues.outbound");
    pub const MAX_FRAME_BYTES: Setting = Setting::key_only("replication.max_frame_bytes");
    pub const ACK_MAX_RECORDS: Setting = Setting::key_only("replication.ack_max_records");
    pub const ACK_MAX_DELAY: Setting = Setting::key_only("replication.ack_max_delay");
    pub const PSK_FILE: Setting = Setting::new("replication.psk_file", "--psk-file");
    pub const INSECURE_REPLICATION: Setting = Setting::new("replication.insecure", "--insecure-replication");
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.flag {
            Some(flag) => write!(f, "{flag} (key `{}`)", self.key),
            None => write!(f, "key `{}`", self.key),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown key, or a value of the wrong type or form. `key` is
    /// the dotted key at the error, when the error sits inside one.
    #[error("{}", file_error_text(path.as_deref(), *line, *column, key.as_deref(), message))]
    File { path: Option<PathBuf>, line: usize, column: usize, key: Option<String>, message: String },
    /// A required setting was given neither as a flag nor in the file.
    #[error("{setting} is required: {hint}")]
    Missing { setting: Setting, hint: &'static str },
    /// A setting's value is out of range or impossible on its own.
    #[error("{setting}: {reason}")]
    Invalid { setting: Setting, reason: String },
    /// Two settings cannot hold together.
    #[error("{first} and {second} conflict: {reason}")]
    Conflict { first: Setting, second: Setting, reason: String },
}

impl ConfigError {
    /// The dotted config key the error is about, when there is one (for `Conflict`, the first).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::File { key, .. } => key.as_deref(),
            ConfigError::Missing { setting, .. } | ConfigError::Invalid { setting, .. } => Some(setting.key),
            ConfigError::Conflict { first, .. } => Some(first.key),
        }
    }
}

fn file_error_text(path: Option<&Path>, line: usize, column: usize, key: Option<&str>, message: &str) -> String {
    let path = path.map_or_else(|| "config".to_owned(), |p| p.display().to_string());
    match key {
        Some(key) => format!("{path}:{line}:{column}: key `{key}`: {message}"),
        None => format!("{path}:{line}:{column}: {message}"),
    }
}

/// A setting that is allowed but probably not what the operator wants. Logged at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub setting: Setting,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// Why one value (a duration, a VIP, an upstream URL, an admin address) could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not a duration: a whole number followed by a unit (`ns`, `us`, `ms`, `s`, `m`).
    #[error("invalid duration {input:?}: {reason}")]
    Duration { input: String, reason: String },
    /// Not `IPv4/PREFIX`.
    #[error("invalid VIP {input:?}: {reason}")]
    Vip { input: String, reason: String },
    /// Not a supported upstream URL (`http://HOST[:PORT]`).
    #[error("invalid upstream {input:?}: {reason}")]
    Upstream { input: String, reason: String },
    /// Not `PORT` or `ADDR:PORT`.
    #[error("invalid admin address {input:?}: {reason}")]
    Admin { input: String, reason: String },
}

/// Parses a duration written as a whole number and a unit: `ns`, `us` (or `µs`), `ms`, `s`, `m`.
/// Fractions are refused (write `1500ms`, not `1.5s`) so that every value has one spelling.
pub fn parse_duration(input: &str) -> Result<Duration, ValueError> {
    let err = |reason: &str| ValueError::Duration { input: input.to_owned(), reason: reason.to_owned() };
    let text = input.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(err("expected a whole number followed by a unit, like \"20ms\" or \"1s\""));
    }
    let n: u64 = number.parse().map_err(|_| err("number too large"))?;
    let too_large = || err("too large");
    match unit.trim_start() {
        "ns" => Ok(Duration::from_nanos(n)),
        "us" | "µs" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(too_large),
        "" => Err(err("missing unit: write ns, us, ms, s or m after the number, like \"20ms\"")),
        u if u.starts_with('.') || u.starts_with(',') => {
            Err(err("fractions are not supported: use a smaller unit, like \"1500ms\""))
        }
        _ => Err(err("unknown unit: use ns, us, ms, s or m, like \"20ms\"")),
    }
}

/// Formats a duration in the form [`parse_duration`] reads, with the largest exact unit.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0ms".to_owned()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// serde for a [`Duration`] field written as a string with a unit.
mod duration_str {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationVisitor)
    }

    pub(super) struct DurationVisitor;

    impl de::Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string with a unit, like \"20ms\" or \"1s\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
}

/// serde for an optional [`Duration`] field; absent means `None`.
mod opt_duration_str {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_str(duration_str::DurationVisitor).map(Some)
    }
}

/// The virtual IP and the prefix length of the client network it lives on (`10.0.0.100/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vip {
    pub addr: Ipv4Addr,
    /// Prefix length, 1..=32 (checked by [`NodeConfig::validate`]).
    pub prefix: u8,
}

impl Vip {
    /// The network mask (`255.255.255.0` for /24). Prefixes above 32 count as 32.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::from(self.prefix.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
    }

    /// Whether `ip` is on the VIP's network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask());
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }

    fn check(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.prefix) {
            return Err(format!("prefix /{} is out of range: use 1..=32", self.prefix));
        }
        let a = self.addr;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return Err(format!("{a} cannot be a virtual IP: use a unicast address of the client network"));
        }
        if self.prefix <= 30 {
            let host = u32::from(a) & !u32::from(self.netmask());
            if host == 0 || host == !u32::from(self.netmask()) {
                return Err(format!("{a} is the network or broadcast address of /{}", self.prefix));
            }
        }
        Ok(())
    }
}

impl FromStr for Vip {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = |reason: &str| ValueError::Vip { input: s.to_owned(), reason: reason.to_owned() };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| err("missing /PREFIX, like 10.0.0.100/24"))?;
        let addr = addr.parse().map_err(|_| err("not an IPv4 address (IPv6 is not supported)"))?;
        let prefix = prefix.parse().map_err(|_| err("the prefix must be a number, 1..=32"))?;
        Ok(Vip { addr, prefix })
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Vip {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Vip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// The origin requests are proxied to: `http://HOST[:PORT]`. Plain HTTP only for now: TLS towards the origin
/// (`https://`) is not supported yet and refused with a clear error, as are paths, queries and user info.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// IPv4 literal or DNS name (resolved when connecting).
    pub host: String,
    /// TCP port; 80 when the URL has none.
    pub port: u16,
}

impl Upstream {
    /// `host:port`, for connecting and for the `Host` header of requests that lack one.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl FromStr for Upstream {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = |reason: &str| ValueError::Upstream { input: s.to_owned(), reason: reason.to_owned() };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| err("expected http://HOST[:PORT]"))?;
        if scheme.eq_ignore_ascii_case("https") {
            return Err(err("https upstreams are not supported yet: use http://"));
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(err("the scheme must be http://"));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(err("paths, queries and fragments are not supported: give only http://HOST[:PORT]"));
        }
        if authority.contains('@') {
            return Err(err("user info (user@host) is not supported"));
        }
        if authority.starts_with('[') {
            return Err(err("IPv6 upstreams are not supported"));
        }
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => {
                let port: u16 = port.parse().map_err(|_| err("the port must be a number, 1..=65535"))?;
                (host, port)
            }
            None => (authority, 80),
        };
        if port == 0 {
            return Err(err("port 0 is not a port an origin listens on"));
        }
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid_name {
            return Err(err("the host must be an IPv4 address or a DNS name"));
        }
        Ok(Upstream { host: host.to_ascii_lowercase(), port })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

impl Serialize for Upstream {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Where the admin endpoint listens: `PORT` (on 127.0.0.1) or `ADDR:PORT`. In the file also a bare integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdminAddr(pub SocketAddr);

impl FromStr for AdminAddr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = |reason: &str| ValueError::Admin { input: s.to_owned(), reason: reason.to_owned() };
        let addr = if let Ok(port) = s.parse::<u16>() {
            SocketAddr::from((DEFAULT_ADMIN_IP, port))
        } else {
            s.parse().map_err(|_| err("expected PORT (binds 127.0.0.1) or ADDR:PORT"))?
        };
        if addr.port() == 0 {
            return Err(err("port 0 would bind a port nobody knows"));
        }
        Ok(AdminAddr(addr))
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for AdminAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = AdminAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (binds 127.0.0.1) or \"ADDR:PORT\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AdminAddr, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<AdminAddr, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<AdminAddr, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// When a non-idempotent request (POST, PATCH, ...) whose reply had not started is sent to the upstream
/// again after a failover. Idempotent methods (RFC 9110 section 9.2.2) are always re-sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RetryPolicy {
    /// Never re-send: the connection is closed and the request counted as lost.
    Never,
    /// Re-send only with an Idempotency-Key the origin deduplicates: the client's own, or a generated one when
    /// the origin honours generated keys.
    #[default]
    WithKey,
    /// Always re-send (the origin may execute the request twice).
    Always,
}

impl RetryPolicy {
    /// The spelling used in the file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryPolicy::Never => "never",
            RetryPolicy::WithKey => "with-key",
            RetryPolicy::Always => "always",
        }
    }
}

/// Failure detection on the replication link. Both nodes send a heartbeat every `heartbeat_interval`; a peer
/// that misses `misses` in a row (or whose link breaks) is dead. Detection time = interval × misses.
///
/// The defaults, 20 ms × 5 = 100 ms, detect a dead primary well within the promised 200 ms and leave room
/// for fencing (3 ARP probes × 15 ms) inside it. They do not fail over on a healthy but busy pair because
/// heartbeats are sent by the link's own task, never queued behind proxy work, and any frame from the
/// primary (records included) counts as life: a busy stream never looks dead, and five heartbeat intervals
/// must pass in silence, which on a live host takes a stall of 100 ms (longer than a scheduler hiccup on a
/// loaded 2-core machine).
///
/// The primary holds a lease that the backup's acks and heartbeats renew. It is slightly longer than the
/// detection time and shorter than detection plus fencing: a primary stalled long enough for the backup to
/// take over finds its lease expired when it wakes, and holds every VIP segment until an ARP probe shows it
/// still owns the address (ARCHITECTURE.md, "Who owns the VIP").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectionConfig {
    /// Time between heartbeats, each way. Duration. Default `"20ms"`.
    #[serde(with = "duration_str")]
    pub heartbeat_interval: Duration,
    /// Heartbeats missed in a row before the peer is dead. Count, at least 1. Default 5.
    pub misses: u32,
    /// The primary's lease. Duration, longer than `heartbeat_interval` and shorter than detection plus
    /// fencing. Default: detection time + half the ARP fencing time (122500us with the defaults).
    #[serde(with = "opt_duration_str", skip_serializing_if = "Option::is_none")]
    pub lease: Option<Duration>,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            misses: DEFAULT_HEARTBEAT_MISSES,
            lease: None,
        }
    }
}

impl DetectionConfig {
    /// Interval × misses: how long after the last heartbeat a peer is declared dead.
    pub fn detection_time(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(self.misses)
    }
}

/// Fencing: before the backup claims the VIP it confirms that the primary is not serving it
/// (ARCHITECTURE.md, invariant 4). It cannot be turned off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// ARP probes of the VIP sent on `iface`; any answer means the primary still serves, so the backup stands
    /// down and alarms. Count, 1..=100. Default 3.
    pub arp_probes: u32,
    /// Wait for an answer after each probe. Duration. Default `"15ms"` (an ARP answer on a LAN takes well
    /// under a millisecond; the primary answers from a dedicated task).
    #[serde(with = "duration_str")]
    pub arp_timeout: Duration,
    /// Optional operator command run after the ARP probes pass, as an argument vector without a shell
    /// (`["/usr/local/sbin/fence-peer", "--node", "a"]`). Exit status 0 confirms that the old primary is
    /// fenced; any other status, or running past `command_timeout`, means stand down and alarm.
    /// Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Time the command may run. Duration. Default `"1s"`. It adds to the takeover time.
    #[serde(with = "duration_str")]
    pub command_timeout: Duration,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            arp_probes: DEFAULT_ARP_PROBES,
            arp_timeout: DEFAULT_ARP_TIMEOUT,
            command: None,
            command_timeout: DEFAULT_FENCE_COMMAND_TIMEOUT,
        }
    }
}

impl FencingConfig {
    /// Probes × timeout: how long the ARP part of fencing takes when nobody answers.
    pub fn arp_time(&self) -> Duration {
        self.arp_timeout.saturating_mul(self.arp_probes)
    }
}

/// Resuming exchanges that a failover interrupted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Policy for non-idempotent requests whose reply had not started: `"never"`, `"with-key"` or
    /// `"always"`. Default `"with-key"`.
    pub non_idempotent: RetryPolicy,
    /// Whether the origin deduplicates requests by an `Idempotency-Key` the proxy generated (not only by
    /// keys clients send). Only then do generated keys make a request re-sendable under `with-key`.
    /// Default false.
    pub origin_honours_generated_keys: bool,
    /// After a takeover, send each restored client an ICMP host-unreachable quoting the next byte expected
    /// from it (RFC 6069), so a client whose retransmission timer backed off during the outage resends at
    /// once instead of seconds later. Turn it off only for clients that set `IP_RECVERR` on their TCP
    /// sockets: they would see the message as an error. Default true.
    pub prompt_retransmit: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            non_idempotent: RetryPolicy::default(),
            origin_honours_generated_keys: false,
            prompt_retransmit: true,
        }
    }
}

impl RetryConfig {
    /// Whether a non-idempotent request may be sent to the upstream again. `key_generated` is `None` when the
    /// request carried no `Idempotency-Key`, else whether the proxy generated it.
    pub fn may_resend_non_idempotent(&self, key_generated: Option<bool>) -> bool {
        match self.non_idempotent {
            RetryPolicy::Never => false,
            RetryPolicy::Always => true,
            RetryPolicy::WithKey => match key_generated {
                None => false,
                Some(false) => true,
                Some(true) => self.origin_honours_generated_keys,
            },
        }
    }
}

/// Limits on client connections and requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request line plus header section. Bytes, 8192..=1048576. Default 32768. Beyond: 431.
    pub max_header_bytes: usize,
    /// Largest number of header fields in a request or upstream response. Count, 1..=10000. Default 100.
    /// Beyond: 431 for requests, 502 for responses.
    pub max_headers: usize,
    /// Time a client has to send a complete request head once it starts one. Duration. Default `"10s"`.
    /// Beyond: 408 and close.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// Time an idle keep-alive connection stays open. Duration. Default `"60s"`.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Client connections served at once, restored ones included. Count, at least 1. Default 10000. A
    /// connection beyond it is answered `503` with `Connection: close` and closed; restored connections are
    /// never refused. With `replica_bytes_per_connection` it bounds the replica table's memory.
    pub max_connections: u32,
    /// How long a request body may keep the proxy waiting (time spent waiting on the client only, not on
    /// the upstream) before it must have sent `body_min_rate` bytes per second of it; each time it has,
    /// the clock starts again. Duration. Default `"20s"`. Beyond: `408` (or the response cut, if it had
    /// started) and close.
    #[serde(with = "duration_str")]
    pub body_read_timeout: Duration,
    /// Slowest request body accepted, bytes per second, over each `body_read_timeout`. 0..=1e9. Default
    /// 500. 0 keeps only the timeout: one byte per `body_read_timeout` is then enough.
    pub body_min_rate: u32,
    /// Reply bytes the replica holds at most per connection: half for bytes logged but not yet written to
    /// the client's socket, half for bytes written and not yet acknowledged by the client (the socket's
    /// send buffer, `SO_SNDBUF`, which then no longer autotunes). Of the latter, about an eighth of this
    /// waits unsent in the socket at most (`TCP_NOTSENT_LOWAT`); the log runs a whole window ahead of a
    /// fast client's socket only, of a slow one 64 KiB plus what it took in its last second: a client that
    /// reads slowly or stops reading holds about half of this bound or less, the rest of its response waits
    /// upstream, and the proxy stops reading from the upstream. Bytes, 65536..=268435456. Default 1048576.
    pub replica_bytes_per_connection: usize,
}

impl LimitsConfig {
    /// Bytes a connection may have logged but not yet written to its socket.
    pub fn reply_window(&self) -> usize {
        self.replica_bytes_per_connection / 2
    }

    /// The `SO_SNDBUF` value for client sockets: the kernel doubles it for its own bookkeeping, so
    /// the bytes it holds stay within the other half.
    pub fn client_send_buffer(&self) -> usize {
        self.replica_bytes_per_connection / 4
    }

    /// The `TCP_NOTSENT_LOWAT` value for client sockets: unsent bytes beyond which a socket takes no more
    /// (what is in flight is bounded by the send buffer alone).
    pub fn client_unsent_bytes(&self) -> u32 {
        (self.replica_bytes_per_connection / 8).try_into().unwrap_or(u32::MAX)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            body_min_rate: DEFAULT_BODY_MIN_RATE,
            replica_bytes_per_connection: DEFAULT_REPLICA_BYTES_PER_CONNECTION,
        }
    }
}

/// NFQUEUE numbers (iptables `-j NFQUEUE --queue-num N`). Queue numbers are per network namespace and shared
/// by every program in it: pick numbers that no other NFQUEUE user on the host (an IPS such as Suricata, which
/// defaults to queue 0) binds, or both break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuesConfig {
    /// Queue of the inbound gate (client segments to VIP:port). Number 0..=65535. Default 7701.
    pub inbound: u16,
    /// Queue for what the primary's closed sockets still send from VIP:port (passed while the process
    /// lives, dropped once it died; their FINs and RSTs use `inbound`). Number 0..=65535. Default 7702.
    pub outbound: u16,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        QueuesConfig { inbound: DEFAULT_INBOUND_QUEUE, outbound: DEFAULT_OUTBOUND_QUEUE }
    }
}

/// The replication link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Largest frame, enforced when encoding and decoding; a larger one ends the link. Bytes,
    /// 131072..=268435456. Default 4194304 (4 MiB). Both nodes should agree.
    pub max_frame_bytes: u32,
    /// Records the backup may take in before it must send a cumulative ack, even if more are waiting. Count,
    /// at least 1. Default 64.
    pub ack_max_records: u32,
    /// Extra time the backup may hold an ack to batch more records. Duration, below the heartbeat interval.
    /// Default `"0ms"`: ack as soon as the input read so far is applied. Every client segment waits for this
    /// ack (output commit), so any delay here is added to the client's round trip.
    #[serde(with = "duration_str")]
    pub ack_max_delay: Duration,
    /// File holding the pre-shared key that authenticates the link: hex, at least 32 digits (16 bytes),
    /// white space around it ignored, not readable by others (mode 600 or 640). Both nodes need the same key.
    /// Required unless `insecure` is set; read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    /// Run the link without authentication: anyone who reaches the replication port can join as the spare
    /// (and read every client's bytes) or alter the stream. Only on a network nobody else can reach.
    /// Default false.
    pub insecure: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            ack_max_records: DEFAULT_ACK_MAX_RECORDS,
            ack_max_delay: DEFAULT_ACK_MAX_DELAY,
            psk_file: None,
            insecure: false,
        }
    }
}

/// The effective configuration of one node.
///
/// Its TOML form is the config file; unknown keys are refused with their name (the file is read through a
/// `deny_unknown_fields` struct of the same shape, so that required keys may come from flags instead).
/// Deserializing a `NodeConfig` directly reads a complete file: defaults < file, validated, role `backup` when
/// `join` is set. [`NodeConfig::load`] is the normal way in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FileConfig")]
pub struct NodeConfig {
    /// Which binary runs: set by the binary, not by the file.
    #[serde(skip)]
    pub role: Role,
    /// The virtual IP and its prefix on the client network. Required.
    pub vip: Vip,
    /// Client-facing interface: where the VIP is added and ARP probes and gratuitous ARPs go. Required.
    pub iface: String,
    /// TCP port served on the VIP. Default 80.
    pub port: u16,
    /// Address the replication link listens on (on the replication network, never the VIP, which moves).
    /// Required.
    pub repl_listen: SocketAddrV4,
    /// The primary's replication address, which a backup joins. Required for `backup`, refused for
    /// `primary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<SocketAddrV4>,
    /// Origin to proxy to. Exactly one of `upstream` and `root`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    /// Directory served by the built-in static file server. Exactly one of `upstream` and `root`. Relative
    /// paths are relative to the working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Admin endpoint (`GET /status`, `GET /metrics`). Default: none (off). A bare port binds 127.0.0.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// File holding the admin endpoint's bearer token (one line, readable by its owner and group only).
    /// Required when `admin` is not a loopback address; with it every route but `/healthz` needs
    /// `Authorization: Bearer <token>`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// File the request log (one JSON line per exchange) is appended to. Default: none (off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_log: Option<PathBuf>,
    /// Cluster name; the replication handshake refuses a peer of another cluster. 1..=64 characters of
    /// `A-Z a-z 0-9 . _ -`. Default `"understudy"`.
    pub cluster: String,
    /// This node's name, for logs, `/status` and the handshake. Same characters. Default: the hostname.
    pub node: String,
    /// `[detection]`: heartbeats, misses, lease.
    pub detection: DetectionConfig,
    /// `[fencing]`: ARP probes and the operator command.
    pub fencing: FencingConfig,
    /// `[retry]`: resuming non-idempotent requests.
    pub retry: RetryConfig,
    /// `[limits]`: client request limits and timeouts.
    pub limits: LimitsConfig,
    /// `[queues]`: NFQUEUE numbers.
    pub queues: QueuesConfig,
    /// `[replication]`: frame size, ack batching, the key file.
    pub replication: ReplicationConfig,
    /// The key read from `replication.psk_file` ([`NodeConfig::load`] or [`NodeConfig::load_psk`] reads it;
    /// never in the file form).
    #[serde(skip)]
    pub psk: Option<Psk>,
    /// The token read from `admin_token_file` ([`NodeConfig::load`] reads it; never in the file form).
    #[serde(skip)]
    pub admin_token: Option<String>,
}

/// The file layer: the same keys as [`NodeConfig`], each optional so that flags can supply it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    vip: Option<Vip>,
    iface: Option<String>,
    port: Option<u16>,
    repl_listen: Option<SocketAddrV4>,
    join: Option<SocketAddrV4>,
    upstream: Option<Upstream>,
    root: Option<PathBuf>,
    admin: Option<AdminAddr>,
    admin_token_file: Option<PathBuf>,
    request_log: Option<PathBuf>,
    cluster: Option<String>,
    node: Option<String>,
    #[serde(default)]
    detection: DetectionConfig,
    #[serde(default)]
    fencing: FencingConfig,
    #[serde(default)]
    retry: RetryConfig,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    queues: QueuesConfig,
    #[serde(default)]
    replication: ReplicationConfig,
}

impl TryFrom<FileConfig> for NodeConfig {
    type Error = ConfigError;
    fn try_from(file: FileConfig) -> Result<Self, ConfigError> {
        let role = if file.join.is_some() { Role::Backup } else { Role::Primary };
        let config = NodeConfig::resolve(role, file)?;
        config.validate()?;
        Ok(config)
    }
}

const LOADING_HELP: &str = "\
Settings come from built-in defaults, then the --config file, then flags: a flag overrides the file's key,
and --upstream or --root on the command line replaces either one in the file. A flag given twice: the last
wins. Every flag names its file key; the file (TOML) also has keys without flags, and refuses unknown keys.
Durations are written with a unit: 500us, 20ms, 1s, 2m. An example file with every key:
shared/tests/fixtures/example.toml in the sources.";

/// Flags shared by `primary` and `backup`. Each mirrors a config-file key and, when given, overrides it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct CommonArgs {
    /// Virtual IP served by the pair, with the prefix length of the client network (10.0.0.100/24).
    /// Required. [key: vip]
    #[arg(long, value_name = "IPV4/PREFIX")]
    pub vip: Option<Vip>,
    /// Client-facing interface (eth0): the VIP is added there and ARP probes and gratuitous ARPs go out on it.
    /// Required. [key: iface]
    #[arg(long, value_name = "NAME")]
    pub iface: Option<String>,
    /// TCP port served on the VIP. [default: 80] [key: port]
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Address the replication link listens on, on the replication network (never the VIP). Required.
    /// [key: repl_listen]
    #[arg(long, value_name = "IPV4:PORT")]
    pub repl_listen: Option<SocketAddrV4>,
    /// Proxy requests to this origin, http://HOST or http://HOST:PORT (https is not supported yet).
    /// Required unless --root is given; not both. [key: upstream]
    #[arg(long, value_name = "URL")]
    pub upstream: Option<Upstream>,
    /// Serve this directory with the built-in static file server (Range, ETag, Last-Modified, HEAD).
    /// Required unless --upstream is given; not both. [key: root]
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Serve GET /status (JSON) and GET /metrics (Prometheus) on PORT (binds 127.0.0.1) or ADDR:PORT.
    /// [default: off] [key: admin]
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub admin: Option<AdminAddr>,
    /// Require `Authorization: Bearer <token>` on the admin endpoint (all routes but /healthz), the token
    /// read from FILE (one line; the file must not be readable by other users). Required when --admin is
    /// not a loopback address. [default: none] [key: admin_token_file]
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Append one JSON line per HTTP exchange to FILE (connection, method, target, status, bytes, serving node,
    /// resume path). [default: off] [key: request_log]
    #[arg(long, value_name = "FILE")]
    pub request_log: Option<PathBuf>,
    /// Read settings from this TOML file first; flags override it. [default: none]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Cluster name; the replication handshake refuses a peer of another cluster. [default: understudy]
    /// [key: cluster]
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// This node's name in logs, /status and the handshake. [default: the hostname] [key: node]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Time between heartbeats on the replication link. Detection time = interval x misses, 100ms by default.
    /// [default: 20ms] [key: detection.heartbeat_interval]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Heartbeats missed in a row before the peer is declared dead. [default: 5] [key: detection.misses]
    #[arg(long, value_name = "COUNT")]
    pub heartbeat_misses: Option<u32>,
    /// The primary's lease, renewed by the backup: when it runs out the primary holds VIP traffic until an ARP
    /// probe shows it still owns the VIP. Between the heartbeat interval and detection + fencing time.
    /// [default: detection time + half the ARP fencing time] [key: detection.lease]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Whether a non-idempotent request (POST, PATCH, ...) interrupted by a failover before its reply started
    /// is sent to the origin again. [default: with-key] [key: retry.non_idempotent]
    #[arg(long, value_name = "POLICY")]
    pub non_idempotent_retry: Option<RetryPolicy>,
    /// Declare that the origin deduplicates by Idempotency-Key, so keys the proxy generates make requests
    /// re-sendable under with-key. Without the flag the file's key decides. [default: false]
    /// [key: retry.origin_honours_generated_keys]
    #[arg(long)]
    pub origin_honours_generated_keys: bool,
    /// File with the pre-shared key that authenticates the replication link, as hex (at least 32 digits; make
    /// one with `head -c 32 /dev/urandom | xxd -p -c 64`), mode 600. Both nodes need the same key. Required
    /// unless --insecure-replication. [default: none] [key: replication.psk_file]
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// Run the replication link without authentication: anyone who can reach the replication port can join
    /// as the spare or alter the stream. Only for a network nobody else reaches. [default: false]
    /// [key: replication.insecure]
    #[arg(long)]
    pub insecure_replication: bool,
}

/// Command line of `primary`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "primary",
    version,
    args_override_self = true,
    about = "understudy primary: serves HTTP on the VIP and replicates every client connection to a backup",
    after_long_help = LOADING_HELP
)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Command line of `backup`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "backup",
    version,
    args_override_self = true,
    about = "understudy backup: joins a primary, holds a replica of its connections, and takes them over \
             when it dies",
    after_long_help = LOADING_HELP
)]
pub struct BackupArgs {
    /// The primary's replication address (its --repl-listen) to join. Required. [key: join]
    #[arg(long, value_name = "IPV4:PORT")]
    pub join: Option<SocketAddrV4>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Either binary's command line: what [`NodeConfig::load`] takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeArgs {
    Primary(PrimaryArgs),
    Backup(BackupArgs),
}

impl From<PrimaryArgs> for NodeArgs {
    fn from(args: PrimaryArgs) -> Self {
        NodeArgs::Primary(args)
    }
}

impl From<BackupArgs> for NodeArgs {
    fn from(args: BackupArgs) -> Self {
        NodeArgs::Backup(args)
    }
}

impl NodeArgs {
    pub fn role(&self) -> Role {
        match self {
            NodeArgs::Primary(_) => Role::Primary,
            NodeArgs::Backup(_) => Role::Backup,
        }
    }

    pub fn common(&self) -> &CommonArgs {
        match self {
            NodeArgs::Primary(a) => &a.common,
            NodeArgs::Backup(a) => &a.common,
        }
    }

    fn join(&self) -> Option<SocketAddrV4> {
        match self {
            NodeArgs::Primary(_) => None,
            NodeArgs::Backup(a) => a.join,
        }
    }

    /// Lays the flags over the file layer.
    fn apply(&self, file: &mut FileConfig) {
        let a = self.common();
        fn set<T: Clone>(slot: &mut Option<T>, flag: &Option<T>) {
            if flag.is_some() {
                slot.clone_from(flag);
            }
        }
        set(&mut file.vip, &a.vip);
        set(&mut file.iface, &a.iface);
        set(&mut file.port, &a.port);
        set(&mut file.repl_listen, &a.repl_listen);
        set(&mut file.join, &self.join());
        // The origin is one choice: a flag for either replaces the file's choice.
        if a.upstream.is_some() || a.root.is_some() {
            file.upstream.clone_from(&a.upstream);
            file.root.clone_from(&a.root);
        }
        set(&mut file.admin, &a.admin);
        set(&mut file.admin_token_file, &a.admin_token_file);
        set(&mut file.request_log, &a.request_log);
        set(&mut file.cluster, &a.cluster);
        set(&mut file.node, &a.node);
        if let Some(v) = a.heartbeat_interval {
            file.detection.heartbeat_interval = v;
        }
        if let Some(v) = a.heartbeat_misses {
            file.detection.misses = v;
        }
        set(&mut file.detection.lease, &a.lease);
        if let Some(v) = a.non_idempotent_retry {
            file.retry.non_idempotent = v;
        }
        if a.origin_honours_generated_keys {
            file.retry.origin_honours_generated_keys = true;
        }
        if a.psk_file.is_some() {
            file.replication.psk_file.clone_from(&a.psk_file);
        }
        if a.insecure_replication {
            file.replication.insecure = true;
        }
    }
}

impl NodeConfig {
    /// Loads the configuration: defaults < `--config` file < flags, then [`validate`](Self::validate) and the
    /// path checks. Warnings are logged (`tracing::warn!`), not returned; call `validate` to see them.
    pub fn load(args: impl Into<NodeArgs>) -> Result<NodeConfig, ConfigError> {
        let args = args.into();
        let mut file = match &args.common().config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                parse_file(Some(path), &text)?
            }
            None => FileConfig::default(),
        };
        args.apply(&mut file);
        let mut config = NodeConfig::resolve(args.role(), file)?;
        let warnings = config.validate()?;
        config.check_paths()?;
        config.load_psk()?;
        config.load_admin_token()?;
        for warning in warnings {
            tracing::warn!(role = role_name(config.role), "config: {warning}");
        }
        Ok(config)
    }

    /// Reads a complete configuration from TOML text with no flags: defaults < text, validated (paths are not
    /// checked). Errors carry line, column and key.
    pub fn from_toml_str(role: Role, text: &str) -> Result<NodeConfig, ConfigError> {
        let config = NodeConfig::resolve(role, parse_file(None, text)?)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as a TOML document that [`NodeConfig::from_toml_str`] reads back.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("every field of NodeConfig has a TOML form")
    }

    /// Reads the token named by `admin_token_file` into [`admin_token`](Self::admin_token) (nothing
    /// without one).
    pub fn load_admin_token(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.admin_token_file {
            let token =
                crate::admin::load_token(path).map_err(|e| invalid(Setting::ADMIN_TOKEN_FILE, e.to_string()))?;
            self.admin_token = Some(token);
        }
        Ok(())
    }

    /// Reads the key named by `replication.psk_file` into [`psk`](Self::psk). Without a key file, refuses
    /// unless `replication.insecure` is set: the binaries never run an unauthenticated link by default.
    pub fn load_psk(&mut self) -> Result<(), ConfigError> {
        match &self.replication.psk_file {
            Some(path) => {
                let psk = Psk::load(path).map_err(|e| invalid(Setting::PSK_FILE, e.to_string()))?;
                self.psk = Some(psk);
                Ok(())
            }
            None if self.replication.insecure => Ok(()),
            None => Err(ConfigError::Missing {
                setting: Setting::PSK_FILE,
                hint: "a file with the pre-shared key both nodes hold (authenticates the replication link), \
                       or --insecure-replication to run the link without authentication",
            }),
        }
    }

    /// How the replication link authenticates: with the loaded key, else not at all.
    pub fn link_auth(&self) -> LinkAuth {
        self.psk.clone().map_or(LinkAuth::Insecure, LinkAuth::Psk)
    }

    /// The lease in force: `detection.lease`, or detection time + half the ARP fencing time.
    pub fn lease(&self) -> Duration {
        self.detection.lease.unwrap_or_else(|| self.detection.detection_time() + self.fencing.arp_time() / 2)
    }

    /// The socket address served on the VIP.
    pub fn service_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip.addr, self.port)
    }

    /// Fills defaults and refuses missing required settings.
    fn resolve(role: Role, file: FileConfig) -> Result<NodeConfig, ConfigError> {
        let missing = |setting, hint| ConfigError::Missing { setting, hint };
        Ok(NodeConfig {
            role,
            vip: file.vip.ok_or_else(|| missing(Setting::VIP, "the virtual IP with its prefix, like 10.0.0.100/24"))?,
            iface: file.iface.ok_or_else(|| missing(Setting::IFACE, "the client-facing interface, like eth0"))?,
            port: file.port.unwrap_or(DEFAULT_PORT),
            repl_listen: file
                .repl_listen
                .ok_or_else(|| missing(Setting::REPL_LISTEN, "the replication address, like 10.1.0.2:7700"))?,
            join: file.join,
            upstream: file.upstream,
            root: file.root,
            admin: file.admin.map(|a| a.0),
            admin_token_file: file.admin_token_file,
            request_log: file.request_log,
            cluster: file.cluster.unwrap_or_else(|| DEFAULT_CLUSTER.to_owned()),
            node: file.node.unwrap_or_else(hostname),
            detection: file.detection,
            fencing: file.fencing,
            retry: file.retry,
            limits: file.limits,
            queues: file.queues,
            replication: file.replication,
            psk: None,
            admin_token: None,
        })
    }

    /// Checks ranges and combinations. Pure: touches no file or socket. Returns the warnings of a valid
    /// configuration, or the first error found.
    pub fn validate(&self) -> Result<Vec<ConfigWarning>, ConfigError> {
        self.check_addresses()?;
        check_name(&self.cluster).map_err(|r| invalid(Setting::CLUSTER, r))?;
        check_name(&self.node).map_err(|r| invalid(Setting::NODE, r))?;
        let warnings = self.check_timing()?;
        self.check_limits()?;
        if self.replication.insecure && self.replication.psk_file.is_some() {
            return Err(conflict(
                Setting::PSK_FILE,
                Setting::INSECURE_REPLICATION,
                "a key file authenticates the link, --insecure-replication turns authentication off: give one".into(),
            ));
        }
        Ok(warnings)
    }

    /// The VIP, the interface, the replication addresses by role, the origin, and listeners that would collide.
    fn check_addresses(&self) -> Result<(), ConfigError> {
        self.vip.check().map_err(|r| invalid(Setting::VIP, r))?;
        check_iface(&self.iface).map_err(|r| invalid(Setting::IFACE, r))?;
        if self.port == 0 {
            return Err(invalid(Setting::PORT, "port 0 cannot be served: use 1..=65535".into()));
        }

        // Replication addresses.
        if self.repl_listen.port() == 0 {
            return Err(invalid(Setting::REPL_LISTEN, "port 0 would listen where the peer cannot find it".into()));
        }
        if *self.repl_listen.ip() == self.vip.addr {
            return Err(conflict(
                Setting::REPL_LISTEN,
                Setting::VIP,
                "the replication link must not use the VIP: the VIP moves on takeover".into(),
            ));
        }
        match (self.role, self.join) {
            (Role::Primary, Some(_)) => {
                return Err(invalid(Setting::JOIN, "only a backup joins: remove it, or run `backup`".into()));
            }
            (Role::Backup, None) => {
                return Err(ConfigError::Missing {
                    setting: Setting::JOIN,
                    hint: "the primary's replication address, like 10.1.0.2:7700",
                });
            }
            (Role::Backup, Some(join)) => {
                if join.ip().is_unspecified() || join.port() == 0 {
                    return Err(invalid(Setting::JOIN, format!("{join} is not an address a primary listens on")));
                }
                if join == self.repl_listen {
                    return Err(conflict(
                        Setting::JOIN,
                        Setting::REPL_LISTEN,
                        format!("both are {join}: a backup joins the primary's address, not its own"),
                    ));
                }
                if *join.ip() == self.vip.addr {
                    return Err(conflict(
                        Setting::JOIN,
                        Setting::VIP,
                        "the replication link must not use the VIP: the VIP moves on takeover".into(),
                    ));
                }
            }
            (Role::Primary, None) => {}
        }

        // The origin.
        match (&self.upstream, &self.root) {
            (Some(_), Some(_)) => {
                return Err(conflict(
                    Setting::UPSTREAM,
                    Setting::ROOT,
                    "give exactly one: proxy to an origin, or serve a directory".into(),
                ));
            }
            (None, None) => {
                return Err(ConfigError::Missing {
                    setting: Setting::UPSTREAM,
                    hint: "give --upstream http://HOST:PORT to proxy, or --root DIR to serve files (key `root`)",
                });
            }
            (None, Some(root)) if root.as_os_str().is_empty() => {
                return Err(invalid(Setting::ROOT, "empty path".into()));
            }
            _ => {}
        }

        // Listening sockets must not overlap.
        let service = SocketAddr::V4(self.service_addr());
        let repl = SocketAddr::V4(self.repl_listen);
        if overlaps(service, repl) {
            return Err(conflict(
                Setting::REPL_LISTEN,
                Setting::PORT,
                format!("{repl} would also receive the clients' connections to {service}"),
            ));
        }
        if let Some(admin) = self.admin {
            if admin.port() == 0 {
                return Err(invalid(Setting::ADMIN, "port 0 would bind a port nobody knows".into()));
            }
            if overlaps(admin, service) {
                return Err(conflict(
                    Setting::ADMIN,
                    Setting::PORT,
                    format!("{admin} overlaps the service address {service}"),
                ));
            }
            if overlaps(admin, repl) {
                return Err(conflict(Setting::ADMIN, Setting::REPL_LISTEN, format!("both listen on {admin}")));
            }
            if !admin.ip().is_loopback() && self.admin_token_file.is_none() {
                return Err(ConfigError::Missing {
                    setting: Setting::ADMIN_TOKEN_FILE,
                    hint: "a file with the admin endpoint's bearer token: the endpoint listens on an address \
                           other hosts can reach, and its routes include a planned switchover",
                });
            }
        } else if self.admin_token_file.is_some() {
            return Err(conflict(
                Setting::ADMIN_TOKEN_FILE,
                Setting::ADMIN,
                "a token for an admin endpoint that is off (give --admin too)".into(),
            ));
        }
        if let Some(log) = &self.request_log
            && (log.as_os_str().is_empty() || log.file_name().is_none())
        {
            return Err(invalid(Setting::REQUEST_LOG, format!("{:?} is not a file path", log.display())));
        }
        Ok(())
    }

    /// Detection, fencing and the lease between them.
    fn check_timing(&self) -> Result<Vec<ConfigWarning>, ConfigError> {
        let mut warnings = Vec::new();
        let d = &self.detection;
        if d.heartbeat_interval < Duration::from_millis(1) {
            return Err(invalid(Setting::HEARTBEAT_INTERVAL, "must be at least 1ms".into()));
        }
        if d.misses == 0 {
            return Err(invalid(Setting::MISSES, "must be at least 1".into()));
        }
        if d.misses == 1 {
            warnings.push(ConfigWarning {
                setting: Setting::MISSES,
                message: "a single late heartbeat will declare the peer dead; 3 or more is safer".into(),
            });
        }
        let detection = d.detection_time();
        if detection > DETECTION_TARGET {
            warnings.push(ConfigWarning {
                setting: Setting::HEARTBEAT_INTERVAL,
                message: format!(
                    "detection time {} x {} = {} is above {}: a dead primary is noticed late",
                    format_duration(d.heartbeat_interval),
                    d.misses,
                    format_duration(detection),
                    format_duration(DETECTION_TARGET),
                ),
            });
        }
        let f = &self.fencing;
        if !(1..=100).contains(&f.arp_probes) {
            return Err(invalid(
                Setting::ARP_PROBES,
                "must be 1..=100: fencing cannot be turned off (two nodes answering for the VIP is the worst \
                 failure)"
                    .into(),
            ));
        }
        if f.arp_timeout < Duration::from_millis(1) {
            return Err(invalid(Setting::ARP_TIMEOUT, "must be at least 1ms".into()));
        }
        if let Some(command) = &f.command
            && command.first().is_none_or(|program| program.is_empty())
        {
            return Err(invalid(
                Setting::FENCE_COMMAND,
                "give the program and its arguments, like [\"/sbin/fence\"]".into(),
            ));
        }
        if f.command_timeout.is_zero() {
            return Err(invalid(Setting::FENCE_COMMAND_TIMEOUT, "must be above zero".into()));
        }
        let lease = self.lease();
        let takeover_floor = detection + f.arp_time();
        if lease <= d.heartbeat_interval {
            return Err(conflict(
                Setting::LEASE,
                Setting::HEARTBEAT_INTERVAL,
                format!(
                    "lease {} would run out between two heartbeats of a healthy pair ({})",
                    format_duration(lease),
                    format_duration(d.heartbeat_interval)
                ),
            ));
        }
        if lease >= takeover_floor {
            return Err(conflict(
                Setting::LEASE,
                Setting::HEARTBEAT_INTERVAL,
                format!(
                    "lease {} must be shorter than detection + ARP fencing time ({} + {}): else a stalled primary \
                     could still trust its lease after the backup took the VIP",
                    format_duration(lease),
                    format_duration(detection),
                    format_duration(f.arp_time())
                ),
            ));
        }
        if lease < detection {
            warnings.push(ConfigWarning {
                setting: Setting::LEASE,
                message: format!(
                    "lease {} is shorter than the detection time {}: the primary will hold traffic and probe on \
                     every hiccup the backup would tolerate",
                    format_duration(lease),
                    format_duration(detection)
                ),
            });
        }
        Ok(warnings)
    }

    /// Request limits, queue numbers, replication frames and acks.
    fn check_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if !(MIN_MAX_HEADER_BYTES..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(invalid(
                Setting::MAX_HEADER_BYTES,
                format!(
                    "must be {MIN_MAX_HEADER_BYTES}..=1048576 (RFC 9112 asks for at least 8000-octet request lines)"
                ),
            ));
        }
        if !(8..=10_000).contains(&l.max_headers) {
            return Err(invalid(
                Setting::MAX_HEADERS,
                "must be 8..=10000 (the proxy needs room for the headers every request carries)".into(),
            ));
        }
        if l.header_read_timeout.is_zero() {
            return Err(invalid(Setting::HEADER_READ_TIMEOUT, "must be above zero".into()));
        }
        if l.idle_timeout.is_zero() {
            return Err(invalid(Setting::IDLE_TIMEOUT, "must be above zero".into()));
        }
        if l.max_connections == 0 {
            return Err(invalid(Setting::MAX_CONNECTIONS, "must be at least 1".into()));
        }
        if l.body_read_timeout.is_zero() {
            return Err(invalid(Setting::BODY_READ_TIMEOUT, "must be above zero".into()));
        }
        if l.body_min_rate > 1_000_000_000 {
            return Err(invalid(Setting::BODY_MIN_RATE, "must be 0..=1000000000 bytes per second".into()));
        }
        if !(MIN_REPLICA_BYTES_PER_CONNECTION..=256 << 20).contains(&l.replica_bytes_per_connection) {
            return Err(invalid(
                Setting::REPLICA_BYTES_PER_CONNECTION,
                format!("must be {MIN_REPLICA_BYTES_PER_CONNECTION}..=268435456 bytes"),
            ));
        }

        if self.queues.inbound == self.queues.outbound {
            return Err(conflict(
                Setting::INBOUND_QUEUE,
                Setting::OUTBOUND_QUEUE,
                format!("both are queue {}: the gate and the outbound control need a queue each", self.queues.inbound),
            ));
        }

        let r = &self.replication;
        if !(MIN_MAX_FRAME_BYTES..=MAX_MAX_FRAME_BYTES).contains(&r.max_frame_bytes) {
            return Err(invalid(
                Setting::MAX_FRAME_BYTES,
                format!(
                    "must be {MIN_MAX_FRAME_BYTES}..={MAX_MAX_FRAME_BYTES}: a frame carries whole 64 KiB datagrams"
                ),
            ));
        }
        if r.ack_max_records == 0 {
            return Err(invalid(Setting::ACK_MAX_RECORDS, "must be at least 1".into()));
        }
        if r.ack_max_delay >= self.detection.heartbeat_interval {
            return Err(conflict(
                Setting::ACK_MAX_DELAY,
                Setting::HEARTBEAT_INTERVAL,
                "acks renew the primary's lease and release client segments: hold them less than a heartbeat \
                 interval"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks the paths the configuration names: `root` is a directory, the request log's directory exists.
    fn check_paths(&self) -> Result<(), ConfigError> {
        if let Some(root) = &self.root {
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ConfigError::Invalid {
                        setting: Setting::ROOT,
                        reason: format!("{} is not a directory", root.display()),
                    });
                }
                Err(e) => {
                    return Err(ConfigError::Invalid {
                        setting: Setting::ROOT,
                        reason: format!("{}: {e}", root.display()),
                    });
                }
            }
        }
        if let Some(log) = &self.request_log {
            let dir = match log.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(ConfigError::Invalid {
                    setting: Setting::REQUEST_LOG,
                    reason: format!("directory {} does not exist", dir.display()),
                });
            }
        }
        Ok(())
    }
}

/// The startup log line: every effective setting as `key=value`, with the keys of the file.
impl fmt::Display for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt<T: fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "none".to_owned(), T::to_string)
        }
        let origin = match (&self.upstream, &self.root) {
            (Some(u), _) => format!("upstream={u}"),
            (None, Some(r)) => format!("root={}", r.display()),
            (None, None) => "origin=none".to_owned(),
        };
        let d = &self.detection;
        let fe = &self.fencing;
        let l = &self.limits;
        let r = &self.replication;
        write!(
            f,
            "role={} node={} cluster={} vip={} iface={} port={} repl_listen={} join={} {origin} admin={} \
             admin_token_file={} request_log={} heartbeat_interval={} misses={} detection={} lease={} arp_probes={} arp_timeout={} \
             fence_command={} non_idempotent={} origin_honours_generated_keys={} prompt_retransmit={} \
             max_header_bytes={} max_headers={} header_read_timeout={} idle_timeout={} max_connections={} \
             body_read_timeout={} body_min_rate={} replica_bytes_per_connection={} \
             queues={}/{} max_frame_bytes={} ack_max_records={} ack_max_delay={} psk_file={} insecure_replication={}",
            role_name(self.role),
            self.node,
            self.cluster,
            self.vip,
            self.iface,
            self.port,
            self.repl_listen,
            opt(&self.join),
            opt(&self.admin),
            opt(&self.admin_token_file.as_ref().map(|p| p.display().to_string())),
            opt(&self.request_log.as_ref().map(|p| p.display().to_string())),
            format_duration(d.heartbeat_interval),
            d.misses,
            format_duration(d.detection_time()),
            format_duration(self.lease()),
            fe.arp_probes,
            format_duration(fe.arp_timeout),
            fe.command.as_ref().map_or_else(|| "none".to_owned(), |c| format!("{:?}", c.join(" "))),
            self.retry.non_idempotent.as_str(),
            self.retry.origin_honours_generated_keys,
            self.retry.prompt_retransmit,
            l.max_header_bytes,
            l.max_headers,
            format_duration(l.header_read_timeout),
            format_duration(l.idle_timeout),
            l.max_connections,
            format_duration(l.body_read_timeout),
            l.body_min_rate,
            l.replica_bytes_per_connection,
            self.queues.inbound,
            self.queues.outbound,
            r.max_frame_bytes,
            r.ack_max_records,
            format_duration(r.ack_max_delay),
            opt(&r.psk_file.as_ref().map(|p| p.display().to_string())),
            r.insecure,
        )
    }
}

/// `"primary"` or `"backup"`, as in logs and `/status`.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    }
}

/// This host's name (the UTS namespace's), or `"node"` if it has none.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_owned(),
        _ => "node".to_owned(),
    }
}

fn invalid(setting: Setting, reason: String) -> ConfigError {
    ConfigError::Invalid { setting, reason }
}

fn conflict(first: Setting, second: Setting, reason: String) -> ConfigError {
    ConfigError::Conflict { first, second, reason }
}

/// Whether two listening addresses would collide: same port and same address, or either is the wildcard.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let wildcard = |ip: IpAddr| ip.is_unspecified();
    a.port() == b.port() && (a.ip() == b.ip() || wildcard(a.ip()) || wildcard(b.ip()))
}

fn check_iface(name: &str) -> Result<(), String> {
    // IFNAMSIZ is 16 with the NUL; the kernel refuses '/', ':' is an alias label, whitespace breaks tools.
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} is not an interface name: 1..=15 bytes"));
    }
    if name == "." || name == ".." || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!("{name:?} is not an interface name"));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?}: use 1..=64 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(format!("{name:?}: use only A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// Parses the file layer, turning a toml error into one that names line, column and key.
fn parse_file(path: Option<&Path>, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let (line, column) = line_column(text, offset);
        ConfigError::File {
            path: path.map(Path::to_path_buf),
            line,
            column,
            key: key_at(text, offset),
            message: e.message().trim_end().to_owned(),
        }
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted key whose name or value covers `offset`, if the document parses.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    key_in_table(doc.get_ref(), offset, &mut path).then(|| path.join("."))
}

fn key_in_table(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (key, value) in table.iter() {
        path.push(key.get_ref().to_string());
        if key.span().contains(&offset) {
            return true;
        }
        // A `[section]` header's span does not cover its keys, so look inside every table.
        if let Some(inner) = value.get_ref().as_table()
            && key_in_table(inner, offset, path)
        {
            return true;
        }
        if value.span().contains(&offset) {
            return true;
        }
        path.pop();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_units_parse() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("500µs"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 20 ms "), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn duration_without_unit_fraction_or_number_is_refused_with_reason() {
        let reason = |s: &str| match parse_duration(s) {
            Err(ValueError::Duration { input, reason }) => {
                assert_eq!(input, s);
                reason
            }
            other => panic!("{s:?} parsed as {other:?}"),
        };
        assert!(reason("20").contains("missing unit"));
        assert!(reason("1.5s").contains("fractions"));
        assert!(reason("20xs").contains("unknown unit"));
        assert!(reason("ms").contains("whole number"));
        assert!(reason("").contains("whole number"));
        assert!(reason("-5ms").contains("whole number"));
        assert!(reason("99999999999999999999s").contains("too large"));
        assert!(reason("999999999999999999m").contains("too large"));
    }

    #[test]
    fn duration_format_reads_back() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(20),
            Duration::from_secs(60),
            Duration::from_micros(122_500),
            Duration::from_nanos(1_000_000_001),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{}", format_duration(d));
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn vip_parses_and_prints() {
        let vip: Vip = "10.0.0.100/24".parse().unwrap();
        assert_eq!(vip, Vip { addr: Ipv4Addr::new(10, 0, 0, 100), prefix: 24 });
        assert_eq!(vip.to_string(), "10.0.0.100/24");
        assert_eq!(vip.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(vip.contains(Ipv4Addr::new(10, 0, 0, 7)));
        assert!(!vip.contains(Ipv4Addr::new(10, 0, 1, 7)));
        assert_eq!(Vip { addr: Ipv4Addr::new(10, 0, 0, 1), prefix: 32 }.netmask(), Ipv4Addr::BROADCAST);
        assert!(matches!("10.0.0.100".parse::<Vip>(), Err(ValueError::Vip { .. })));
        assert!(matches!("fe80::1/64".parse::<Vip>(), Err(ValueError::Vip { .. })));
        assert!(matches!("10.0.0.100/x".parse::<Vip>(), Err(ValueError::Vip { .. })));
    }

    #[test]
    fn vip_check_refuses_impossible_addresses() {
        let check = |s: &str| s.parse::<Vip>().unwrap().check();
        assert!(check("10.0.0.100/24").is_ok());
        assert!(check("10.0.0.100/32").is_ok());
        assert!(check("10.0.0.100/0").unwrap_err().contains("1..=32"));
        assert!(check("10.0.0.100/33").unwrap_err().contains("1..=32"));
        assert!(check("10.0.0.0/24").unwrap_err().contains("network or broadcast"));
        assert!(check("10.0.0.255/24").unwrap_err().contains("network or broadcast"));
        assert!(check("0.0.0.0/24").is_err());
        assert!(check("224.0.0.1/24").is_err());
        assert!(check("127.0.0.5/8").is_err());
    }

    #[test]
    fn upstream_accepts_http_host_and_port_only() {
        let u: Upstream = "http://10.2.0.10:8080".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("10.2.0.10", 8080));
        assert_eq!(u.to_string(), "http://10.2.0.10:8080");
        assert_eq!(u.authority(), "10.2.0.10:8080");
        let u: Upstream = "HTTP://Origin.Example/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("origin.example", 80));
        let reason = |s: &str| match s.parse::<Upstream>() {
            Err(ValueError::Upstream { reason, .. }) => reason,
            other => panic!("{s:?} parsed as {other:?}"),
        };
        assert!(reason("https://origin").contains("not supported yet"));
        assert!(reason("ftp://origin").contains("http://"));
        assert!(reason("origin:8080").contains("http://HOST"));
        assert!(reason("http://origin/api").contains("paths"));
        assert!(reason("http://origin?x=1").contains("paths"));
        assert!(reason("http://u:p@origin").contains("user info"));
        assert!(reason("http://[::1]:80").contains("IPv6"));
        assert!(reason("http://origin:0").contains("port 0"));
        assert!(reason("http://origin:99999").contains("port"));
        assert!(reason("http://").contains("host"));
        assert!(reason("http://bad_name").contains("host"));
    }

    #[test]
    fn admin_bare_port_binds_loopback() {
        assert_eq!("9900".parse::<AdminAddr>().unwrap().0, "127.0.0.1:9900".parse().unwrap());
        assert_eq!("0.0.0.0:9900".parse::<AdminAddr>().unwrap().0, "0.0.0.0:9900".parse().unwrap());
        assert!(matches!("0".parse::<AdminAddr>(), Err(ValueError::Admin { .. })));
        assert!(matches!("localhost:9900".parse::<AdminAddr>(), Err(ValueError::Admin { .. })));
    }

    #[test]
    fn retry_policy_decides_non_idempotent_resend() {
        let cfg = |non_idempotent, origin_honours_generated_keys| RetryConfig {
            non_idempotent,
            origin_honours_generated_keys,
            ..RetryConfig::default()
        };
        for honours in [false, true] {
            for key in [None, Some(false), Some(true)] {
                assert!(!cfg(RetryPolicy::Never, honours).may_resend_non_idempotent(key));
                assert!(cfg(RetryPolicy::Always, honours).may_resend_non_idempotent(key));
            }
        }
        let with_key = cfg(RetryPolicy::WithKey, false);
        assert!(!with_key.may_resend_non_idempotent(None));
        assert!(with_key.may_resend_non_idempotent(Some(false)));
        assert!(!with_key.may_resend_non_idempotent(Some(true)));
        assert!(cfg(RetryPolicy::WithKey, true).may_resend_non_idempotent(Some(true)));
    }

    #[test]
    fn key_at_finds_keys_in_sections_dotted_and_inline_tables() {
        let text = "vip = 'x'\n[detection]\nmisses = 3\n[limits]\nidle_timeout = '1s'\n";
        let at = |needle: &str| key_at(text, text.find(needle).unwrap());
        assert_eq!(at("vip").as_deref(), Some("vip"));
        assert_eq!(at("misses").as_deref(), Some("detection.misses"));
        assert_eq!(at("3").as_deref(), Some("detection.misses"));
        assert_eq!(at("'1s'").as_deref(), Some("limits.idle_timeout"));
        let text = "detection.misses = 3\nfencing = { arp_probes = 2 }\n";
        assert_eq!(key_at(text, text.find('3').unwrap()).as_deref(), Some("detection.misses"));
        assert_eq!(key_at(text, text.find('2').unwrap()).as_deref(), Some("fencing.arp_probes"));
        assert_eq!(key_at("a = \n", 4), None);
    }

    #[test]
    fn line_column_counts_characters_from_one() {
        assert_eq!(line_column("ab\ncdé\nf", 0), (1, 1));
        assert_eq!(line_column("ab\ncdé\nf", 3), (2, 1));
        assert_eq!(line_column("ab\ncdé\nf", 8), (3, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn overlapping_listeners_are_detected() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:80"), a("10.0.0.1:80")));
        assert!(overlaps(a("10.0.0.1:80"), a("10.0.0.1:80")));
        assert!(!overlaps(a("10.0.0.1:80"), a("10.0.0.2:80")));
        assert!(!overlaps(a("0.0.0.0:80"), a("0.0.0.0:81")));
    }

    #[test]
    fn interface_and_node_names() {
        assert!(check_iface("eth0").is_ok());
        assert!(check_iface("veth-us-12345ab").is_ok());
        assert!(check_iface("").is_err());
        assert!(check_iface("a-very-long-name0").is_err());
        assert!(check_iface("eth0:1").is_err());
        assert!(check_iface("a b").is_err());
        assert!(check_name("node-a.dc1_x").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }
}
