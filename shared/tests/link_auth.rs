//! The authenticated replication link over real loopback TCP: the right key links up, a wrong or missing key
//! is refused on both sides with the reason, and a frame altered, replayed or reordered in flight (by a relay
//! between the two ends that fixes the CRC, as an attacker would) ends the link with an integrity error.
//!
//! Every wait has a deadline; nothing sleeps.

use anyhow::{Context, Result, bail, ensure};
use bytes::BytesMut;
use shared::auth::{IntegrityError, LinkAuth, Psk};
use shared::frame::{self, FrameCodec, HEADER_LEN, Parsed};
use shared::link::{
    self, BackupLink, HandshakeError, LinkConfig, LinkError, LocalIdentity, PrimaryLink, Refusal, WelcomeError,
};
use shared::protocol::{Handshake, Message, Role, Welcome};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, fut).await.with_context(|| format!("{what}: no result within {DEADLINE:?}"))
}

fn primary_id() -> LocalIdentity {
    LocalIdentity::new("test-cluster", "node-a", Role::Primary, 3)
}

fn backup_id() -> LocalIdentity {
    LocalIdentity::new("test-cluster", "node-b", Role::Backup, 3)
}

fn key(byte: u8) -> LinkAuth {
    LinkAuth::Psk(Psk::from_bytes(vec![byte; 32]).expect("32 bytes is a valid key"))
}

fn cfg(auth: LinkAuth) -> LinkConfig {
    LinkConfig { handshake_timeout: Duration::from_secs(5), auth, ..LinkConfig::default() }
}

/// What the relay does to the frames of one direction; frames are counted from the connection's first,
/// handshake frames included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    /// Forward every frame as it is.
    None,
    /// Flip a bit in this frame's payload and fix its CRC.
    Flip(usize),
    /// Send this frame twice.
    Repeat(usize),
    /// Send this frame after the next one.
    Swap(usize),
}

/// Forwards frames from `from` to `to`, applying `tamper`, until either side closes.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, tamper: Tamper) -> Result<()> {
    let mut buf = BytesMut::new();
    let mut n = 0;
    let mut held: Option<Vec<u8>> = None;
    loop {
        while let Parsed::Frame { frame_len, .. } = frame::parse(&buf, frame::MAX_FRAME_LIMIT)? {
            let mut f = buf.split_to(frame_len).to_vec();
            match tamper {
                Tamper::Flip(i) if i == n => {
                    f[HEADER_LEN] ^= 0x01;
                    let crc = crc32fast::hash(&f[HEADER_LEN..]);
                    f[4..8].copy_from_slice(&crc.to_be_bytes());
                    to.write_all(&f).await?;
                }
                Tamper::Repeat(i) if i == n => {
                    to.write_all(&f).await?;
                    to.write_all(&f).await?;
                }
                Tamper::Swap(i) if i == n => held = Some(f),
                Tamper::Swap(i) if i + 1 == n => {
                    to.write_all(&f).await?;
                    to.write_all(&held.take().expect("held the frame before")).await?;
                }
                _ => to.write_all(&f).await?,
            }
            n += 1;
        }
        if from.read_buf(&mut buf).await? == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

/// A primary behind a relay: (primary's result, backup's result). `to_backup` and `to_primary` tamper
/// with each direction.
async fn handshake_via_relay(
    primary_cfg: LinkConfig,
    backup_cfg: LinkConfig,
    to_backup: Tamper,
    to_primary: Tamper,
) -> Result<(Result<PrimaryLink, HandshakeError>, Result<BackupLink, HandshakeError>)> {
    let primary_listener = TcpListener::bind("127.0.0.1:0").await?;
    let primary_addr = primary_listener.local_addr()?;
    let relay_listener = TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    tokio::spawn(async move {
        let Ok((backup_side, _)) = relay_listener.accept().await else { return };
        let Ok(primary_side) = TcpStream::connect(primary_addr).await else { return };
        let _ = (backup_side.set_nodelay(true), primary_side.set_nodelay(true));
        let (br, bw) = backup_side.into_split();
        let (pr, pw) = primary_side.into_split();
        let _ = tokio::join!(pump(br, pw, to_primary), pump(pr, bw, to_backup));
    });
    let accept = async {
        let (stream, _) = primary_listener.accept().await.map_err(HandshakeError::Io)?;
        link::prepare_tcp(&stream)?;
        let accepted = link::accept(stream, &primary_id(), &primary_cfg).await?;
        Ok(accepted.start(NonZeroU64::new(1).expect("1 is not zero")))
    };
    let join = async {
        let stream = TcpStream::connect(relay_addr).await.map_err(HandshakeError::Io)?;
        link::prepare_tcp(&stream)?;
        link::join(stream, &backup_id(), &backup_cfg).await
    };
    within("handshake", async { tokio::join!(accept, join) }).await
}

async fn direct(
    primary_cfg: LinkConfig,
    backup_cfg: LinkConfig,
) -> Result<(Result<PrimaryLink, HandshakeError>, Result<BackupLink, HandshakeError>)> {
    handshake_via_relay(primary_cfg, backup_cfg, Tamper::None, Tamper::None).await
}

/// Sends `n` pings and waits until the backup has received and acknowledged all of them.
async fn stream_pings(primary: &PrimaryLink, backup: &mut BackupLink, n: u64) -> Result<()> {
    for _ in 0..n {
        primary.send(Message::Ping).await?;
    }
    for seq in 1..=n {
        let rec = within("record", backup.recv()).await?.context("the link ended")?;
        ensure!(rec.seq == seq && rec.msg == Message::Ping, "{rec:?}");
        backup.applied(seq);
    }
    within("ack", primary.wait_acked(n)).await??;
    Ok(())
}

#[tokio::test]
async fn the_same_key_on_both_sides_links_up_and_streams_both_ways() -> Result<()> {
    let (primary, backup) = direct(cfg(key(7)), cfg(key(7))).await?;
    let (primary, mut backup) = (primary?, backup?);
    assert_eq!(primary.peer().node, "node-b");
    assert_eq!(backup.peer().version, shared::protocol::PROTOCOL_VERSION);
    // Records one way, acks (and heartbeats) the other, every frame tagged.
    stream_pings(&primary, &mut backup, 300).await?;
    primary.close().await?;
    let ended = within("backup end", backup.join()).await?;
    assert!(matches!(ended, Err(LinkError::PeerClosed)), "{ended:?}");
    Ok(())
}

#[tokio::test]
async fn a_wrong_key_is_refused_on_both_sides_with_the_reason() -> Result<()> {
    let (primary, backup) = direct(cfg(key(7)), cfg(key(8))).await?;
    let backup_err = backup.expect_err("the backup must refuse the primary's proof");
    assert!(matches!(backup_err, HandshakeError::WrongKey { .. }), "{backup_err:?}");
    assert!(backup_err.to_string().starts_with("wrong key: the primary \"node-a\""), "{backup_err}");
    let primary_err = primary.expect_err("the primary must not link");
    assert!(matches!(primary_err, HandshakeError::PeerAborted { .. }), "{primary_err:?}");
    assert!(primary_err.to_string().contains("wrong key"), "{primary_err}");
    Ok(())
}

#[tokio::test]
async fn a_joining_node_without_a_key_is_refused_by_a_primary_that_requires_one() -> Result<()> {
    let (primary, backup) = direct(cfg(key(7)), cfg(LinkAuth::Insecure)).await?;
    let primary_err = primary.expect_err("refused");
    assert!(matches!(primary_err, HandshakeError::Refused(Refusal::NoAuthentication { .. })), "{primary_err:?}");
    let backup_err = backup.expect_err("refused");
    let HandshakeError::Welcome(WelcomeError::Refused { reason }) = &backup_err else {
        bail!("the joining node is told why: {backup_err:?}");
    };
    assert!(reason.starts_with("no authentication") && reason.contains("--psk-file"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn a_joining_node_with_a_key_is_refused_by_an_insecure_primary() -> Result<()> {
    let (primary, backup) = direct(cfg(LinkAuth::Insecure), cfg(key(7))).await?;
    let primary_err = primary.expect_err("refused");
    assert!(matches!(primary_err, HandshakeError::Refused(Refusal::NotAuthenticating { .. })), "{primary_err:?}");
    let backup_err = backup.expect_err("refused");
    assert!(backup_err.to_string().contains("--insecure-replication"), "{backup_err}");
    Ok(())
}

#[tokio::test]
async fn two_insecure_nodes_still_link_without_tags() -> Result<()> {
    let (primary, backup) = direct(cfg(LinkAuth::Insecure), cfg(LinkAuth::Insecure)).await?;
    let (primary, mut backup) = (primary?, backup?);
    stream_pings(&primary, &mut backup, 10).await
}

/// A raw peer on the primary's side of a joining node with a key.
async fn raw_primary(answer: impl AsyncFnOnce(&mut TcpStream, Handshake) -> Result<()>) -> Result<HandshakeError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let speak = async {
        let (mut raw, _) = listener.accept().await?;
        let mut buf = BytesMut::new();
        let hello = loop {
            if let Some(h) = FrameCodec::<Handshake>::default().decode(&mut buf)? {
                break h;
            }
            ensure!(raw.read_buf(&mut buf).await? > 0, "closed before the hello");
        };
        answer(&mut raw, hello).await
    };
    let join = async {
        let stream = TcpStream::connect(addr).await.map_err(HandshakeError::Io)?;
        link::join(stream, &backup_id(), &cfg(key(7))).await
    };
    let (spoke, joined) = within("handshake", async { tokio::join!(speak, join) }).await?;
    spoke?;
    Ok(joined.expect_err("the joining node must not link"))
}

#[tokio::test]
async fn a_primary_before_protocol_4_closing_on_the_authenticated_hello_is_reported_as_such() -> Result<()> {
    // An older primary cannot decode the AuthHello variant and drops the connection.
    let err = raw_primary(async |_raw, hello| {
        ensure!(matches!(hello, Handshake::AuthHello { .. }), "{hello:?}");
        Ok(())
    })
    .await?;
    assert!(matches!(err, HandshakeError::ClosedOnAuthHello), "{err:?}");
    assert!(err.to_string().contains("before protocol 4 cannot authenticate"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_primary_that_accepts_without_a_proof_is_refused() -> Result<()> {
    let err = raw_primary(async |raw, _hello| {
        let welcome = Welcome::Accepted { version: 4, node: "impostor".into(), epoch: 3 };
        let mut buf = BytesMut::new();
        frame::encode_value(&Handshake::Welcome(welcome), 1 << 16, &mut buf)?;
        raw.write_all(&buf).await?;
        Ok(())
    })
    .await?;
    assert!(matches!(err, HandshakeError::Welcome(WelcomeError::NotAuthenticated { .. })), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_primary_whose_proof_is_a_guess_is_refused_as_a_wrong_key() -> Result<()> {
    let err = raw_primary(async |raw, _hello| {
        let welcome = Welcome::Accepted { version: 4, node: "impostor".into(), epoch: 3 };
        let answer = Handshake::AuthWelcome { welcome, nonce: vec![1; 32], proof: vec![0; 32] };
        let mut buf = BytesMut::new();
        frame::encode_value(&answer, 1 << 16, &mut buf)?;
        raw.write_all(&buf).await?;
        // The joining node says why before it closes.
        let mut back = BytesMut::new();
        let abort = loop {
            if let Some(h) = FrameCodec::<Handshake>::default().decode(&mut back)? {
                break h;
            }
            ensure!(raw.read_buf(&mut back).await? > 0, "closed without a reason");
        };
        ensure!(matches!(&abort, Handshake::Abort { reason } if reason.starts_with("wrong key")), "{abort:?}");
        Ok(())
    })
    .await?;
    assert!(matches!(err, HandshakeError::WrongKey { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_joining_impostor_with_a_guessed_proof_is_refused_as_a_wrong_key() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accept = async {
        let (stream, _) = listener.accept().await.map_err(HandshakeError::Io)?;
        link::accept(stream, &primary_id(), &cfg(key(7))).await.map(|_| ())
    };
    let impostor = async {
        let mut raw = TcpStream::connect(addr).await?;
        let hello = Handshake::AuthHello { hello: backup_id().hello(), nonce: vec![2; 32] };
        let mut buf = BytesMut::new();
        frame::encode_value(&hello, 1 << 16, &mut buf)?;
        raw.write_all(&buf).await?;
        let mut back = BytesMut::new();
        loop {
            if let Some(h) = FrameCodec::<Handshake>::default().decode(&mut back)? {
                ensure!(matches!(h, Handshake::AuthWelcome { .. }), "{h:?}");
                break;
            }
            ensure!(raw.read_buf(&mut back).await? > 0, "closed before the welcome");
        }
        let mut buf = BytesMut::new();
        frame::encode_value(&Handshake::Proof { proof: vec![0; 32] }, 1 << 16, &mut buf)?;
        raw.write_all(&buf).await?;
        Ok::<_, anyhow::Error>(raw)
    };
    let (accepted, raw) = within("handshake", async { tokio::join!(accept, impostor) }).await?;
    let _raw = raw?;
    let err = accepted.expect_err("an impostor must not link");
    assert!(matches!(err, HandshakeError::WrongKey { .. }), "{err:?}");
    assert!(err.to_string().contains("wrong key: joining node \"node-b\""), "{err}");
    Ok(())
}

/// Links through a relay tampering with one direction, streams pings, and returns how each end ended.
async fn tampered(to_backup: Tamper, to_primary: Tamper) -> Result<(Result<(), LinkError>, Result<(), LinkError>)> {
    let (primary, backup) = handshake_via_relay(cfg(key(7)), cfg(key(7)), to_backup, to_primary).await?;
    let (primary, mut backup) = (primary?, backup?);
    for _ in 0..5 {
        // The link may already be down; what matters is how it ended.
        if primary.send(Message::Ping).await.is_err() {
            break;
        }
    }
    // Take what arrives until the link ends (its queue closes): nothing the tamper touched may be delivered.
    let mut received = Vec::new();
    if to_backup != Tamper::None {
        within("backup end", async {
            while let Some(rec) = backup.recv().await {
                backup.applied(rec.seq);
                received.push(rec.seq);
            }
        })
        .await?;
    }
    assert!(received.windows(2).all(|w| w[1] == w[0] + 1), "only an untouched prefix: {received:?}");
    let backup_end = within("backup end", backup.join()).await?;
    let primary_end = within("primary end", primary.join()).await?;
    Ok((primary_end, backup_end))
}

fn integrity(end: &Result<(), LinkError>) -> Option<IntegrityError> {
    match end {
        Err(LinkError::Integrity(e)) => Some(e.clone()),
        _ => None,
    }
}

// Towards the backup, frame 0 is the AuthWelcome; 1 is the first frame of the link (its first heartbeat).

#[tokio::test]
async fn a_frame_altered_in_flight_towards_the_backup_ends_the_link_with_an_integrity_error() -> Result<()> {
    let (_, backup_end) = tampered(Tamper::Flip(1), Tamper::None).await?;
    assert_eq!(integrity(&backup_end), Some(IntegrityError::BadTag { frame: 0 }), "{backup_end:?}");
    assert!(backup_end.unwrap_err().to_string().contains("failed authentication"));
    Ok(())
}

#[tokio::test]
async fn a_frame_altered_later_in_the_stream_ends_the_link_at_that_frame() -> Result<()> {
    let (_, backup_end) = tampered(Tamper::Flip(4), Tamper::None).await?;
    assert_eq!(integrity(&backup_end), Some(IntegrityError::BadTag { frame: 3 }), "{backup_end:?}");
    Ok(())
}

#[tokio::test]
async fn a_replayed_frame_ends_the_link() -> Result<()> {
    let (_, backup_end) = tampered(Tamper::Repeat(2), Tamper::None).await?;
    assert_eq!(integrity(&backup_end), Some(IntegrityError::BadTag { frame: 2 }), "{backup_end:?}");
    Ok(())
}

#[tokio::test]
async fn reordered_frames_end_the_link() -> Result<()> {
    let (_, backup_end) = tampered(Tamper::Swap(2), Tamper::None).await?;
    assert_eq!(integrity(&backup_end), Some(IntegrityError::BadTag { frame: 1 }), "{backup_end:?}");
    Ok(())
}

// Towards the primary, frames 0 and 1 are the AuthHello and the Proof; 2 is the backup's first frame.

#[tokio::test]
async fn a_frame_altered_towards_the_primary_ends_the_link_there() -> Result<()> {
    let (primary_end, _) = tampered(Tamper::None, Tamper::Flip(2)).await?;
    assert_eq!(integrity(&primary_end), Some(IntegrityError::BadTag { frame: 0 }), "{primary_end:?}");
    Ok(())
}
