//! The replication link over real loopback TCP: handshake outcomes, a pipelined
//! stream with cumulative acks, heartbeats, and a peer that misbehaves (raw sockets
//! speaking the handshake, then corrupt, oversized, out-of-order or cut-off frames).
//!
//! Every wait has a deadline; timings are printed, never asserted.

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::frame::{self, DecodeError, FrameCodec};
use shared::link::{
    self, BackupLink, HANDSHAKE_MAX_FRAME, HandshakeError, LinkConfig, LinkError, LocalIdentity, PrimaryLink, Refusal,
    StreamError, WelcomeError,
};
use shared::protocol::{
    ConnKey, Handshake, Hello, Message, PROTOCOL_VERSION, Record, Role, ToBackup, ToPrimary, Welcome,
};
use std::future::Future;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};
use tcp_replay::Dir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

fn cfg() -> LinkConfig {
    LinkConfig { handshake_timeout: Duration::from_secs(5), ..LinkConfig::default() }
}

fn conn() -> ConnKey {
    ConnKey { client: "10.0.0.7:40000".parse().unwrap(), server: "10.0.0.100:80".parse().unwrap() }
}

/// A connected loopback pair: (accepted side, connecting side).
async fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
    let (accepted, _) = accepted?;
    let connected = connected?;
    link::prepare_tcp(&accepted)?;
    link::prepare_tcp(&connected)?;
    Ok((accepted, connected))
}

/// Runs both handshakes concurrently.
async fn handshake(
    primary: LocalIdentity,
    backup: LocalIdentity,
    cfg: LinkConfig,
    first_seq: u64,
) -> (Result<PrimaryLink, HandshakeError>, Result<BackupLink, HandshakeError>) {
    let (a, b) = tcp_pair().await.expect("loopback pair");
    let pcfg = cfg.clone();
    let accept = async move {
        let accepted = link::accept(a, &primary, &pcfg).await?;
        Ok(accepted.start(NonZeroU64::new(first_seq).expect("first_seq >= 1")))
    };
    let join = link::join(b, &backup, &cfg);
    tokio::join!(accept, join)
}

async fn linked(cfg: LinkConfig, first_seq: u64) -> Result<(PrimaryLink, BackupLink)> {
    let (p, b) = within("handshake", handshake(primary_id(), backup_id(), cfg, first_seq)).await?;
    Ok((p?, b?))
}

// --- raw peers ---------------------------------------------------------------------

fn raw_frame<T: Serialize>(value: &T) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frame::encode_value(value, frame::DEFAULT_MAX_FRAME, &mut buf).expect("test frames encode");
    buf.to_vec()
}

/// Reads one frame of `T` from a raw socket, keeping unread bytes in `buf`.
async fn raw_read<T: DeserializeOwned>(s: &mut TcpStream, buf: &mut BytesMut) -> Result<T> {
    let mut codec = FrameCodec::<T>::default();
    loop {
        if let Some(v) = codec.decode(buf)? {
            return Ok(v);
        }
        if s.read_buf(buf).await? == 0 {
            bail!("raw peer: end of stream");
        }
    }
}

/// A raw "backup": sends a Hello, expects to be accepted by a real primary.
async fn raw_backup_joined(first_seq: u64) -> Result<(TcpStream, PrimaryLink)> {
    let (a, mut raw) = tcp_pair().await?;
    let accept = async {
        let accepted = link::accept(a, &primary_id(), &cfg()).await?;
        Ok::<_, HandshakeError>(accepted.start(NonZeroU64::new(first_seq).unwrap()))
    };
    let speak = async {
        raw.write_all(&raw_frame(&Handshake::Hello(backup_id().hello()))).await?;
        let mut buf = BytesMut::new();
        let welcome: Handshake = raw_read(&mut raw, &mut buf).await?;
        anyhow::ensure!(matches!(welcome, Handshake::Welcome(Welcome::Accepted { .. })), "{welcome:?}");
        Ok::<_, anyhow::Error>(())
    };
    let (primary, spoke) = within("raw backup handshake", async { tokio::join!(accept, speak) }).await?;
    spoke?;
    Ok((raw, primary?))
}

/// A raw "primary": accepts a real backup's Hello and welcomes it at `epoch`.
async fn raw_primary_joined(epoch: u64) -> Result<(TcpStream, BackupLink)> {
    let (mut raw, b) = tcp_pair().await?;
    let speak = async {
        let mut buf = BytesMut::new();
        let hello: Handshake = raw_read(&mut raw, &mut buf).await?;
        anyhow::ensure!(matches!(hello, Handshake::Hello(_)), "{hello:?}");
        let welcome = Welcome::Accepted { version: PROTOCOL_VERSION, node: "raw-primary".into(), epoch };
        raw.write_all(&raw_frame(&Handshake::Welcome(welcome))).await?;
        Ok::<_, anyhow::Error>(())
    };
    let (spoke, backup) = within("raw primary handshake", async {
        let (id, cfg) = (backup_id(), cfg());
        tokio::join!(speak, link::join(b, &id, &cfg))
    })
    .await?;
    spoke?;
    Ok((raw, backup?))
}

fn record(seq: u64, epoch: u64) -> ToBackup {
    ToBackup::Record(Record { seq, epoch, msg: Message::ConnClosed { conn: conn() } })
}

// --- handshake -----------------------------------------------------------------------

#[tokio::test]
async fn handshake_between_matching_nodes_is_accepted() -> Result<()> {
    let (primary, backup) = linked(cfg(), 1).await?;
    assert_eq!(primary.peer().node, "node-b");
    assert_eq!(primary.peer().role, Role::Backup);
    assert_eq!(backup.peer().node, "node-a");
    assert_eq!(backup.peer().role, Role::Primary);
    assert_eq!(backup.peer().epoch, 3);
    assert_eq!(backup.peer().version, PROTOCOL_VERSION);
    within("close", primary.close()).await??;
    assert!(matches!(within("backup end", backup.join()).await?, Err(LinkError::PeerClosed)));
    Ok(())
}

#[tokio::test]
async fn wrong_cluster_is_refused_with_the_reason_on_both_ends() -> Result<()> {
    let mut joiner = backup_id();
    joiner.cluster = "other-cluster".into();
    let (p, b) = within("handshake", handshake(primary_id(), joiner, cfg(), 1)).await?;
    let Err(HandshakeError::Refused(refusal)) = p else { bail!("primary side: {p:?}") };
    assert!(matches!(refusal, Refusal::WrongCluster { .. }), "{refusal:?}");
    let Err(HandshakeError::Welcome(WelcomeError::Refused { reason })) = b else { bail!("backup side: {b:?}") };
    assert_eq!(reason, refusal.to_string());
    assert!(reason.contains("test-cluster") && reason.contains("other-cluster"), "{reason}");
    println!("refusal seen by the joining node: {reason}");
    Ok(())
}

#[tokio::test]
async fn incompatible_version_is_refused_with_the_reason_on_both_ends() -> Result<()> {
    let mut joiner = backup_id();
    (joiner.min_version, joiner.version) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 4);
    let (p, b) = within("handshake", handshake(primary_id(), joiner, cfg(), 1)).await?;
    let Err(HandshakeError::Refused(refusal)) = p else { bail!("primary side: {p:?}") };
    assert!(matches!(refusal, Refusal::IncompatibleVersion { .. }), "{refusal:?}");
    let Err(HandshakeError::Welcome(WelcomeError::Refused { reason })) = b else { bail!("backup side: {b:?}") };
    assert!(reason.contains("incompatible protocol versions"), "{reason}");
    println!("refusal seen by the joining node: {reason}");
    Ok(())
}

#[tokio::test]
async fn two_primaries_are_refused_with_the_reason_on_both_ends() -> Result<()> {
    let mut joiner = backup_id();
    joiner.role = Role::Primary;
    joiner.epoch = 2;
    let (p, b) = within("handshake", handshake(primary_id(), joiner, cfg(), 1)).await?;
    let Err(HandshakeError::Refused(refusal)) = p else { bail!("primary side: {p:?}") };
    assert_eq!(refusal, Refusal::TwoPrimaries { node: "node-b".into(), our_epoch: 3, their_epoch: 2 });
    let Err(HandshakeError::Welcome(WelcomeError::Refused { reason })) = b else { bail!("backup side: {b:?}") };
    assert!(reason.contains("two primaries"), "{reason}");
    println!("refusal seen by the joining node: {reason}");
    Ok(())
}

#[tokio::test]
async fn joining_node_ahead_in_epoch_is_refused_as_a_sign_to_step_down() -> Result<()> {
    let mut joiner = backup_id();
    joiner.epoch = 4;
    let (p, b) = within("handshake", handshake(primary_id(), joiner, cfg(), 1)).await?;
    let Err(HandshakeError::Refused(refusal)) = p else { bail!("primary side: {p:?}") };
    assert!(matches!(refusal, Refusal::PeerEpochAhead { our_epoch: 3, their_epoch: 4, .. }), "{refusal:?}");
    let Err(HandshakeError::Welcome(WelcomeError::Refused { reason })) = b else { bail!("backup side: {b:?}") };
    assert!(reason.contains("step down"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn silent_peer_times_out_the_handshake() -> Result<()> {
    let (a, _silent) = tcp_pair().await?;
    let short = LinkConfig { handshake_timeout: Duration::from_millis(200), ..cfg() };
    let t0 = Instant::now();
    let got = within("accept", link::accept(a, &primary_id(), &short)).await?;
    assert!(matches!(got, Err(HandshakeError::Timeout(_))), "{got:?}");
    println!("handshake timeout reported after {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn oversized_hello_is_refused_from_its_header() -> Result<()> {
    let (a, mut raw) = tcp_pair().await?;
    // A 1 GiB Hello, of which only the header is ever sent.
    raw.write_all(&(1u32 << 30).to_be_bytes()).await?;
    raw.write_all(&[0; 4]).await?;
    let got = within("accept", link::accept(a, &primary_id(), &cfg())).await?;
    match got {
        Err(HandshakeError::Frame(DecodeError::Oversized { len, max })) => {
            assert_eq!((len, max), (1 << 30, HANDSHAKE_MAX_FRAME));
        }
        other => bail!("{other:?}"),
    }
    Ok(())
}

// --- the stream ----------------------------------------------------------------------

#[tokio::test]
async fn hundred_thousand_records_are_pipelined_and_acknowledged_in_order() -> Result<()> {
    const N: u64 = 100_000;
    const FIRST: u64 = 1_000_001;
    let (primary, mut backup) = linked(cfg(), FIRST).await?;
    let last = FIRST + N - 1;

    let payload = |i: u64| -> Message {
        if i.is_multiple_of(4) {
            Message::Segment { at_us: i, dir: Dir::ToServer, datagram: vec![i as u8; 60 + (i % 1400) as usize] }
        } else {
            Message::Reply { conn: conn(), offset: i * 1000, bytes: vec![(i >> 3) as u8; 1 + (i % 700) as usize] }
        }
    };
    let bytes_of = |m: &Message| match m {
        Message::Segment { datagram, .. } => datagram.len(),
        Message::Reply { bytes, .. } => bytes.len(),
        _ => 0,
    };

    let receiver = tokio::spawn(async move {
        let mut expected = FIRST;
        while expected <= last {
            let Some(rec) = backup.recv().await else { bail!("link ended at record {expected}") };
            anyhow::ensure!(rec.seq == expected, "record {} arrived when {expected} was due", rec.seq);
            anyhow::ensure!(rec.epoch == 3, "epoch {}", rec.epoch);
            anyhow::ensure!(rec.msg == payload(rec.seq - FIRST), "record {} has the wrong content", rec.seq);
            backup.applied(rec.seq);
            expected += 1;
        }
        Ok(backup)
    });

    let t0 = Instant::now();
    let sender = primary.sender();
    let acked = primary.acked();
    assert_eq!(*acked.borrow(), FIRST - 1, "nothing acknowledged before the first record");
    let mut bytes = 0;
    let mut max_in_flight = 0;
    for i in 0..N {
        let msg = payload(i);
        bytes += bytes_of(&msg);
        let seq = sender.send(msg).await?;
        assert_eq!(seq, FIRST + i);
        max_in_flight = max_in_flight.max(seq - *acked.borrow());
    }
    let queued = t0.elapsed();
    within("ack of the last record", primary.wait_acked(last)).await??;
    let elapsed = t0.elapsed();
    assert_eq!(*primary.acked().borrow(), last);
    let backup = within("receiver", receiver).await???;

    let secs = elapsed.as_secs_f64();
    println!(
        "{N} records ({:.1} MB of payload) queued in {queued:?}, all acknowledged after {elapsed:?}: \
         {:.0} records/s, {:.1} MB/s; at most {max_in_flight} records in flight",
        bytes as f64 / 1e6,
        N as f64 / secs,
        bytes as f64 / 1e6 / secs,
    );
    assert!(max_in_flight > 1, "the sender waited for acks");

    within("close", primary.close()).await??;
    assert!(matches!(within("backup end", backup.join()).await?, Err(LinkError::PeerClosed)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_share_one_numbering_in_queue_order() -> Result<()> {
    const TASKS: u64 = 4;
    const EACH: u64 = 5_000;
    let (primary, mut backup) = linked(cfg(), 1).await?;
    // The backup's end comes back with the records: dropped as soon as the last one arrived, it could take
    // its last acknowledgements with it, and the primary would see the link down before they were counted.
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while (got.len() as u64) < TASKS * EACH {
            let Some(rec) = backup.recv().await else { bail!("link ended after {} records", got.len()) };
            let Message::Reply { offset, .. } = rec.msg else { bail!("unexpected {:?}", rec.msg) };
            backup.applied(rec.seq);
            got.push((rec.seq, offset));
        }
        Ok((got, backup))
    });
    let mut senders = Vec::new();
    for task in 0..TASKS {
        let sender = primary.sender();
        senders.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                let offset = task * 1_000_000 + i;
                seqs.push((sender.send(Message::Reply { conn: conn(), offset, bytes: vec![1; 32] }).await?, offset));
            }
            Ok::<_, link::SendError>(seqs)
        }));
    }
    let mut sent = Vec::new();
    for s in senders {
        sent.extend(within("sender", s).await???);
    }
    let (got, backup) = within("receiver", receiver).await???;
    // The backup saw 1, 2, 3, ... (a gap would have ended the link), each carrying
    // the message whose `send` returned that number.
    sent.sort_unstable();
    assert_eq!(got, sent);
    within("all acknowledged", primary.wait_acked(TASKS * EACH)).await??;
    drop(backup);
    Ok(())
}

#[tokio::test]
async fn a_lone_record_is_acknowledged_at_once_without_an_ack_timer() -> Result<()> {
    // No ack timer and a batch of 64: only the idle rule can acknowledge a lone
    // record, as output commit needs for a client segment on a quiet connection.
    let untimed = LinkConfig { ack_delay: Duration::ZERO, ack_every: 64, ..cfg() };
    let (primary, mut backup) = linked(untimed, 1).await?;
    let applier = tokio::spawn(async move {
        while let Some(rec) = backup.recv().await {
            backup.applied(rec.seq);
        }
        backup.join().await
    });
    let mut rtts = Vec::new();
    for _ in 0..1000 {
        let t0 = Instant::now();
        let seq = primary.send(Message::Reply { conn: conn(), offset: 0, bytes: vec![5; 100] }).await?;
        within("ack of a lone record", primary.wait_acked(seq)).await??;
        rtts.push(t0.elapsed());
    }
    rtts.sort();
    println!(
        "send -> ack of a lone record over loopback: median {:?}, p99 {:?}, max {:?}",
        rtts[rtts.len() / 2],
        rtts[rtts.len() * 99 / 100],
        rtts[rtts.len() - 1]
    );
    within("close", primary.close()).await??;
    assert!(matches!(within("backup end", applier).await??, Err(LinkError::PeerClosed)));
    Ok(())
}

#[tokio::test]
async fn records_nothing_waits_on_ride_with_the_next_held_record_or_the_lazy_timer() -> Result<()> {
    // Heartbeats and the lazy timer far away: only a held record can acknowledge.
    let quiet = LinkConfig {
        heartbeat_interval: Duration::from_secs(60),
        ack_delay: Duration::ZERO,
        ack_lazy: Duration::from_secs(60),
        ..cfg()
    };
    let (primary, mut backup) = linked(quiet, 1).await?;
    let applier = tokio::spawn(async move {
        while let Some(rec) = backup.recv().await {
            backup.applied(rec.seq);
        }
        backup.join().await
    });
    let upstream = |offset| Message::Upstream { conn: conn(), exchange: 0, offset, bytes: vec![1; 1000] };
    // Each side's first heartbeat goes out at once (and would carry an ack): let them pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    primary.send(upstream(0)).await?;
    primary.send(upstream(1000)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*primary.acked().borrow(), 0, "logged upstream bytes alone are not acknowledged on their own");
    let seq = primary.send(Message::Segment { at_us: 1, dir: Dir::ToServer, datagram: vec![0x45; 40] }).await?;
    within("ack of a held record", primary.wait_acked(seq)).await??;
    assert_eq!(*primary.acked().borrow(), 3, "one cumulative ack covers the records before it");
    within("close", primary.close()).await??;
    assert!(matches!(within("backup end", applier).await??, Err(LinkError::PeerClosed)));

    // With the default lazy delay a lone record nothing waits on is acknowledged soon all the same.
    let (primary, mut backup) = linked(LinkConfig { heartbeat_interval: Duration::from_secs(60), ..cfg() }, 1).await?;
    let applier = tokio::spawn(async move {
        while let Some(rec) = backup.recv().await {
            backup.applied(rec.seq);
        }
        backup.join().await
    });
    let t0 = Instant::now();
    let seq = primary.send(upstream(0)).await?;
    within("lazy ack", primary.wait_acked(seq)).await??;
    println!("lone unheld record acknowledged after {:?} (lazy delay {:?})", t0.elapsed(), cfg().ack_lazy);
    within("close", primary.close()).await??;
    assert!(matches!(within("backup end", applier).await??, Err(LinkError::PeerClosed)));
    Ok(())
}

#[tokio::test]
async fn closing_while_the_peer_reads_nothing_gives_up_after_the_close_timeout() -> Result<()> {
    let (a, mut raw) = tcp_pair().await?;
    let small = LinkConfig { queue: 16, close_timeout: Duration::from_millis(300), ..cfg() };
    let speak = async {
        raw.write_all(&raw_frame(&Handshake::Hello(backup_id().hello()))).await?;
        let mut buf = BytesMut::new();
        raw_read::<Handshake>(&mut raw, &mut buf).await
    };
    let id = primary_id();
    let (accepted, welcome) = within("handshake", async { tokio::join!(link::accept(a, &id, &small), speak) }).await?;
    welcome?;
    let primary = accepted?.start(NonZeroU64::MIN);
    // Fill the queue and both socket buffers: the raw peer never reads again.
    let sender = primary.sender();
    let mut full_since: Option<Instant> = None;
    let mut queued = 0u64;
    within("filling", async {
        loop {
            match sender.try_send(Message::Reply { conn: conn(), offset: 0, bytes: vec![9; 60_000] }) {
                Ok(_) => {
                    queued += 1;
                    full_since = None;
                }
                Err(link::TrySendError::Full(_)) => {
                    if full_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(300) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await?;
    let t0 = Instant::now();
    let got = within("close", primary.close()).await?;
    println!("{queued} records queued before the link stalled; close gave up after {:?}: {got:?}", t0.elapsed());
    assert!(matches!(got, Err(LinkError::CloseTimedOut(_))), "{got:?}");
    drop(raw);
    Ok(())
}

#[tokio::test]
async fn heartbeats_flow_both_ways_while_no_records_are_sent() -> Result<()> {
    let fast = LinkConfig { heartbeat_interval: Duration::from_millis(10), ..cfg() };
    let (primary, backup) = linked(fast, 1).await?;
    let (p_live, b_live) = (primary.liveness(), backup.liveness());
    let t0 = Instant::now();
    within("20 heartbeats each way", async {
        while p_live.heartbeats() < 20 || b_live.heartbeats() < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    let now = Instant::now();
    println!(
        "after {:?}: primary heard {} heartbeats (silent {:?}, rtt {:?}), backup heard {} (silent {:?})",
        t0.elapsed(),
        p_live.heartbeats(),
        p_live.silent_for(now),
        p_live.rtt(),
        b_live.heartbeats(),
        b_live.silent_for(now),
    );
    assert!(p_live.rtt().is_some(), "the backup echoes the primary's heartbeats");
    let echoed = p_live.last_echoed().expect("an echo dates the primary's heartbeat");
    let rtt = p_live.rtt().expect("rtt");
    assert!(echoed > t0 && echoed <= now, "the echo dates a heartbeat sent during the test: {:?}", echoed - t0);
    assert!(
        now - echoed >= rtt,
        "the echo is dated when the heartbeat left, a round trip before its answer was read ({:?} < {rtt:?})",
        now - echoed
    );
    assert!(b_live.last_echoed().is_none(), "the backup measures no echoes");
    assert!(p_live.last_heartbeat().is_some() && b_live.last_heartbeat().is_some());
    assert!(!primary.is_finished() && !backup.is_finished());
    within("close", backup.close()).await??;
    assert!(matches!(within("primary end", primary.join()).await?, Err(LinkError::PeerClosed)));
    Ok(())
}

// --- misbehaving peers -----------------------------------------------------------------

#[tokio::test]
async fn corrupt_frame_ends_the_link_with_a_crc_error() -> Result<()> {
    let (mut raw, primary) = raw_backup_joined(1).await?;
    let seq = primary.send(Message::SnapshotEnd).await?;
    let mut acked = primary.acked();
    let mut frame = raw_frame(&ToPrimary::Ack { upto: seq });
    raw.write_all(&frame).await?;
    within("first ack", link::wait_acked(&mut acked, seq)).await??;

    // The same ack again with one payload bit flipped.
    let last = frame.len() - 1;
    frame[last] ^= 0x04;
    raw.write_all(&frame).await?;
    let got = within("link end", primary.join()).await?;
    println!("primary link ended: {got:?}");
    assert!(matches!(got, Err(LinkError::Frame(DecodeError::Crc { .. }))), "{got:?}");
    assert!(link::wait_acked(&mut acked, seq + 1).await.is_err(), "waiters learn the link is down");
    Ok(())
}

#[tokio::test]
async fn oversized_length_prefix_ends_the_link_without_waiting_for_the_payload() -> Result<()> {
    let (mut raw, primary) = raw_backup_joined(1).await?;
    // Header only: a 4 GiB frame. The link must refuse it from these 8 bytes, while the
    // socket stays open (no end of stream to rescue it).
    raw.write_all(&u32::MAX.to_be_bytes()).await?;
    raw.write_all(&0u32.to_be_bytes()).await?;
    let got = within("link end", primary.join()).await?;
    match got {
        Err(LinkError::Frame(DecodeError::Oversized { len, max })) => {
            assert_eq!((len, max), (u32::MAX as u64, frame::DEFAULT_MAX_FRAME));
        }
        other => bail!("{other:?}"),
    }
    drop(raw);
    Ok(())
}

#[tokio::test]
async fn ack_for_a_record_never_sent_ends_the_link() -> Result<()> {
    let (mut raw, primary) = raw_backup_joined(10).await?;
    raw.write_all(&raw_frame(&ToPrimary::Ack { upto: 10 })).await?;
    let got = within("link end", primary.join()).await?;
    assert!(matches!(got, Err(LinkError::Stream(StreamError::AckBeyondSent { upto: 10, sent: 9 }))), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn sequence_gap_from_the_primary_ends_the_link() -> Result<()> {
    let (mut raw, mut backup) = raw_primary_joined(3).await?;
    raw.write_all(&raw_frame(&record(7, 3))).await?;
    raw.write_all(&raw_frame(&record(9, 3))).await?;
    let first = within("first record", backup.recv()).await?.context("record 7")?;
    assert_eq!(first.seq, 7);
    assert!(within("end of records", backup.recv()).await?.is_none());
    let got = within("link end", backup.join()).await?;
    assert!(matches!(got, Err(LinkError::Stream(StreamError::Gap { expected: 8, got: 9 }))), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn epoch_regression_from_the_primary_ends_the_link() -> Result<()> {
    let (mut raw, mut backup) = raw_primary_joined(5).await?;
    raw.write_all(&raw_frame(&record(1, 5))).await?;
    raw.write_all(&raw_frame(&ToBackup::Heartbeat { sent_us: 1, epoch: 4 })).await?;
    assert_eq!(within("first record", backup.recv()).await?.context("record 1")?.seq, 1);
    let got = within("link end", backup.join()).await?;
    assert!(matches!(got, Err(LinkError::Stream(StreamError::EpochRegressed { current: 5, got: 4 }))), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn primary_closing_mid_frame_is_a_truncated_frame_error() -> Result<()> {
    let (mut raw, mut backup) = raw_primary_joined(3).await?;
    raw.write_all(&raw_frame(&record(1, 3))).await?;
    let second = raw_frame(&record(2, 3));
    raw.write_all(&second[..second.len() - 3]).await?;
    raw.shutdown().await?;
    assert_eq!(within("first record", backup.recv()).await?.context("record 1")?.seq, 1);
    assert!(within("end of records", backup.recv()).await?.is_none());
    let got = within("link end", backup.join()).await?;
    println!("backup link ended: {got:?}");
    let need = second.len();
    assert!(
        matches!(got, Err(LinkError::Frame(DecodeError::Truncated { have, need: n })) if have == need - 3 && n == need),
        "{got:?}"
    );
    Ok(())
}

#[tokio::test]
async fn primary_closing_between_frames_is_a_clean_peer_closed_error() -> Result<()> {
    let (mut raw, mut backup) = raw_primary_joined(3).await?;
    raw.write_all(&raw_frame(&record(1, 3))).await?;
    raw.shutdown().await?;
    assert_eq!(within("first record", backup.recv()).await?.context("record 1")?.seq, 1);
    let got = within("link end", backup.join()).await?;
    assert!(matches!(got, Err(LinkError::PeerClosed)), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn backup_vanishing_mid_stream_ends_the_primary_link_and_wakes_ack_waiters() -> Result<()> {
    let (primary, mut backup) = linked(cfg(), 1).await?;
    for _ in 0..1000 {
        primary.send(Message::Reply { conn: conn(), offset: 0, bytes: vec![1; 512] }).await?;
    }
    let rec = within("a record", backup.recv()).await?.context("record 1")?;
    backup.applied(rec.seq);
    within("ack of record 1", primary.wait_acked(1)).await??;
    drop(backup);
    let waiter = primary.wait_acked(1_000_000);
    assert!(within("waiter", waiter).await?.is_err(), "waiting for a record never held fails once the link is down");
    let got = within("link end", primary.join()).await?;
    println!("primary link ended: {got:?}");
    assert!(matches!(got, Err(LinkError::PeerClosed) | Err(LinkError::Io(_))), "{got:?}");
    Ok(())
}

#[tokio::test]
async fn hello_frames_after_the_handshake_are_not_mistaken_for_acks() -> Result<()> {
    let (mut raw, primary) = raw_backup_joined(1).await?;
    let hello: Hello = backup_id().hello();
    raw.write_all(&raw_frame(&Handshake::Hello(hello))).await?;
    let got = within("link end", primary.join()).await?;
    assert!(matches!(got, Err(LinkError::Frame(DecodeError::Payload(_)))), "{got:?}");
    Ok(())
}
