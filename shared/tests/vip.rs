//! VIP ownership on a real Ethernet: `scripts/testbed` namespaces (client 10.0.0.1, server
//! 10.0.0.2, spare 10.0.0.3 on one bridge), real kernels answering or kept silent, real
//! ARP sockets. Needs root. Probe timings are printed, never asserted.
//!
//! Sockets, `ip` and `arptables` act in the calling thread's network namespace, so each
//! test runs on a current-thread runtime and switches its own thread into a host's
//! namespace (`setns`) only while it opens a socket or runs a command there; a socket
//! stays in the namespace it was made in.

use anyhow::{Context, Result, bail, ensure};
use shared::vip::arp::{ArpFrame, ArpKind, Mac};
use shared::vip::{ArpSocket, KernelArpSilence, ProbeOutcome, Responder, addr, announce_on, probe, probe_on, rules};
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::time::{Duration, Instant};
use understudy_tests::harness::{Testbed, is_root, parse_mac, testbed_id, wait_until_async};
use understudy_tests::netns::Netns;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PREFIX: u8 = 24;
const IFACE: &str = "eth0";
/// Probes per check and the time they get: a takeover's budget, not RFC 5227's seconds.
const PROBES: u32 = 3;
const PROBE_TIME: Duration = Duration::from_millis(300);

/// A test bed from `scripts/testbed`, with this test's queries; dropped, it is taken down.
struct Bed(Testbed);

impl Deref for Bed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.0
    }
}

impl Bed {
    /// Test bed `v<tag><pid in base 36>`: unique per test and per process.
    fn up(tag: char) -> Result<Bed> {
        ensure!(is_root(), "the VIP tests need root (network namespaces, raw sockets)");
        Ok(Bed(Testbed::up(&testbed_id('v', tag))?))
    }

    /// Runs `f` with this thread in `host`'s network namespace.
    fn within<T>(&self, host: &str, f: impl FnOnce() -> T) -> Result<T> {
        let _inside = Netns::enter(&self.ns(host))?;
        Ok(f())
    }

    /// The hardware address of `host`'s eth0, as `ip` reports it.
    fn mac(&self, host: &str) -> Result<Mac> {
        Ok(Mac(self.hw_addr(host, IFACE)?))
    }

    /// The client's neighbour entry for the VIP: its MAC, if it has one.
    fn client_neighbour(&self) -> Result<Option<Mac>> {
        let out = self.exec("client", &["ip", "-j", "neigh", "show", &VIP.to_string(), "dev", IFACE])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v.get(0).and_then(|n| n.get("lladdr")).and_then(|l| l.as_str()).map(|s| parse_mac(s).map(Mac)).transpose()
    }

    /// Whether the client's kernel reaches the VIP: a TCP connect to a closed port is
    /// refused by the holder's kernel, which needs the client to have resolved the VIP by
    /// ARP first. Async, so a responder on this runtime can answer meanwhile.
    async fn client_reaches_vip(&self) -> Result<bool> {
        let socket = self.within("client", tokio::net::TcpSocket::new_v4)??;
        let connect = socket.connect((VIP, 9).into());
        Ok(match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Err(_elapsed) => false,
        })
    }
}

/// Probes the VIP from the spare and prints what happened.
async fn spare_probes(bed: &Bed, label: &str) -> Result<ProbeOutcome> {
    let socket = bed.within("spare", || ArpSocket::open(IFACE))??;
    let outcome = probe_on(&socket, VIP, PROBES, PROBE_TIME).await?;
    println!("{label}: {outcome:?}");
    Ok(outcome)
}

fn expect_answered_by(outcome: ProbeOutcome, mac: Mac) -> Result<()> {
    match outcome {
        ProbeOutcome::Answered { mac: m, .. } if m == mac => Ok(()),
        other => bail!("expected an answer from {mac}, got {other:?}"),
    }
}

fn expect_unanswered(outcome: ProbeOutcome) -> Result<()> {
    match outcome {
        ProbeOutcome::Unanswered { probes_sent, solicitations: 0, .. } if probes_sent == PROBES => Ok(()),
        other => bail!("expected no answer, got {other:?}"),
    }
}

#[tokio::test]
async fn probe_of_vip_nobody_holds_is_unanswered() -> Result<()> {
    let bed = Bed::up('a')?;
    // The plain `probe` entry point opens its socket when first polled, in the namespace
    // of the polling thread: stay in the spare's for the whole probe.
    let outcome = {
        let _inside = Netns::enter(&bed.ns("spare"))?;
        probe(IFACE, VIP, PROBES, PROBE_TIME).await?
    };
    println!("nobody holds the VIP: {outcome:?}");
    expect_unanswered(outcome)
}

#[tokio::test]
async fn probe_of_vip_held_by_another_kernel_is_answered_with_its_mac() -> Result<()> {
    let bed = Bed::up('b')?;
    assert_eq!(bed.within("server", || addr::add(IFACE, VIP, PREFIX))??, addr::AddrChange::Done);
    // Idempotent both ways.
    assert_eq!(bed.within("server", || addr::add(IFACE, VIP, PREFIX))??, addr::AddrChange::Unchanged);
    let server = bed.mac("server")?;
    // The socket's MAC (getsockname in the namespace) is what `ip` reports.
    assert_eq!(bed.within("server", || ArpSocket::open(IFACE))??.mac(), server);
    expect_answered_by(spare_probes(&bed, "server's kernel holds the VIP").await?, server)?;

    assert_eq!(bed.within("server", || addr::remove(IFACE, VIP, PREFIX))??, addr::AddrChange::Done);
    assert_eq!(bed.within("server", || addr::remove(IFACE, VIP, PREFIX))??, addr::AddrChange::Unchanged);
    expect_unanswered(spare_probes(&bed, "VIP removed from the server").await?)
}

#[tokio::test]
async fn silenced_kernel_stays_quiet_responder_answers_and_dropping_it_quiets_the_vip_at_once() -> Result<()> {
    let bed = Bed::up('c')?;
    let server = bed.mac("server")?;
    // Rule first, then the address: the kernel never gets to answer.
    let silence = bed.within("server", || KernelArpSilence::install(IFACE, VIP))??;
    bed.within("server", || addr::add(IFACE, VIP, PREFIX))??;
    expect_unanswered(spare_probes(&bed, "VIP configured, kernel silenced, no responder").await?)?;
    assert!(!bed.client_reaches_vip().await?, "the client cannot resolve the VIP while nothing answers");

    let responder = bed.within("server", || Responder::spawn(IFACE, VIP))??;
    assert_eq!(responder.mac(), server);
    expect_answered_by(spare_probes(&bed, "responder running").await?, server)?;
    // An ordinary who-has from the client's kernel is answered too, and traffic flows.
    assert!(bed.client_reaches_vip().await?, "the client reaches the VIP through the responder's answer");
    assert_eq!(bed.client_neighbour()?, Some(server));
    let counts = responder.counts();
    println!("responder: {counts:?}");
    assert!(counts.answered >= 2, "answered the spare's probe and the client's request: {counts:?}");
    assert_eq!((counts.conflicts, counts.malformed), (0, 0));

    // The process "dies": the address is still configured, yet nobody answers.
    drop(responder);
    expect_unanswered(spare_probes(&bed, "responder dropped, address still configured").await?)?;
    assert!(bed.within("server", || addr::has(IFACE, VIP))??, "the VIP is still on the server");

    // Removing the rule hands the address back to the kernel.
    bed.within("server", || silence.remove())??;
    assert!(!bed.within("server", || rules::is_installed(IFACE, VIP))??);
    expect_answered_by(spare_probes(&bed, "rule removed: kernel answers again").await?, server)
}

#[tokio::test]
async fn install_removes_stale_rules_of_a_crashed_run_and_drop_removes_its_own() -> Result<()> {
    let bed = Bed::up('d')?;
    let spec = rules::rule_spec(IFACE, VIP);
    let count = || -> Result<usize> {
        let out = bed.exec("server", &["arptables", "-S", "OUTPUT"])?;
        Ok(out.lines().filter(|l| l.contains(&VIP.to_string())).count())
    };
    // Three crashed runs left their rule behind.
    for _ in 0..3 {
        let mut args = vec!["arptables", "-A", "OUTPUT"];
        args.extend(spec.iter().map(String::as_str));
        bed.exec("server", &args)?;
    }
    assert_eq!(count()?, 3);
    let silence = bed.within("server", || KernelArpSilence::install(IFACE, VIP))??;
    assert_eq!(count()?, 1, "stale copies removed, one installed");
    // A rule for another address is not ours and stays.
    let other = Ipv4Addr::new(10, 0, 0, 101);
    let other_rule = bed.within("server", || KernelArpSilence::install(IFACE, other))??;
    // Dropped on this thread, outside the server's namespace: the guard still removes the
    // rule where it installed it.
    drop(silence);
    assert_eq!(count()?, 0, "dropping the guard removes the rule");
    assert!(bed.within("server", || rules::is_installed(IFACE, other))??);
    drop(other_rule);
    assert!(!bed.within("server", || rules::is_installed(IFACE, other))??);
    // Removing when absent is fine.
    assert_eq!(bed.within("server", || rules::remove_all(IFACE, VIP))??, 0);
    Ok(())
}

#[tokio::test]
async fn gratuitous_arp_moves_the_clients_neighbour_entry_to_the_new_holder() -> Result<()> {
    let bed = Bed::up('e')?;
    let (server, spare) = (bed.mac("server")?, bed.mac("spare")?);
    bed.within("server", || addr::add(IFACE, VIP, PREFIX))??;
    assert!(bed.client_reaches_vip().await?);
    assert_eq!(bed.client_neighbour()?, Some(server), "the client learnt the server's MAC");

    // The server dies (its link goes down); the spare claims the VIP and announces it
    // with the request form only.
    bed.exec("server", &["ip", "link", "set", IFACE, "down"])?;
    bed.within("spare", || addr::add(IFACE, VIP, PREFIX))??;
    let spare_socket = bed.within("spare", || ArpSocket::open(IFACE))??;
    let sent = Instant::now();
    spare_socket.send(&ArpFrame::announcement(spare, VIP).emit()).await?;
    wait_until_async("the client's entry to move to the spare (request form)", Duration::from_secs(2), || {
        Ok((bed.client_neighbour()? == Some(spare)).then_some(()))
    })
    .await?;
    println!("request-form gratuitous ARP: client's entry moved after {:?}", sent.elapsed());
    assert!(bed.client_reaches_vip().await?, "the client reaches the VIP at the spare");

    // The server comes back and takes it over with the reply form only, within the
    // entry's locktime (1 s by default) of the last update: gratuitous ARP overrides it.
    bed.within("spare", || addr::remove(IFACE, VIP, PREFIX))??;
    bed.exec("server", &["ip", "link", "set", IFACE, "up"])?;
    wait_until_async("the server's link to be up", Duration::from_secs(5), || {
        let out = bed.exec("server", &["ip", "-o", "link", "show", "dev", IFACE])?;
        Ok(out.contains("state UP").then_some(()))
    })
    .await?;
    let server_socket = bed.within("server", || ArpSocket::open(IFACE))??;
    let sent = Instant::now();
    server_socket.send(&ArpFrame::gratuitous_reply(server, VIP).emit()).await?;
    wait_until_async("the client's entry to move back to the server (reply form)", Duration::from_secs(2), || {
        Ok((bed.client_neighbour()? == Some(server)).then_some(()))
    })
    .await?;
    println!("reply-form gratuitous ARP: client's entry moved after {:?}", sent.elapsed());

    // And `announce` (both forms per round) moves it once more.
    bed.within("server", || addr::remove(IFACE, VIP, PREFIX))??;
    bed.within("spare", || addr::add(IFACE, VIP, PREFIX))??;
    let sent = Instant::now();
    assert_eq!(announce_on(&spare_socket, VIP, 2, Duration::from_millis(20)).await?, 4);
    wait_until_async("the client's entry to move to the spare (announce)", Duration::from_secs(2), || {
        Ok((bed.client_neighbour()? == Some(spare)).then_some(()))
    })
    .await?;
    println!("announce: client's entry moved within {:?}", sent.elapsed());
    assert!(bed.client_reaches_vip().await?);
    Ok(())
}

/// Frames a hostile or confused neighbour sends: none of them is an answer for the VIP.
fn noise(client: Mac, spare: Mac) -> Vec<Vec<u8>> {
    let other = Ipv4Addr::new(10, 0, 0, 101);
    let mut frames = vec![
        // Answers about other addresses, unicast to the prober.
        ArpFrame::reply_to(&ArpFrame::probe(spare, Ipv4Addr::new(10, 0, 0, 2)).arp, client).emit().to_vec(),
        ArpFrame::reply_to(&ArpFrame::probe(spare, other).arp, client).emit().to_vec(),
        ArpFrame::announcement(client, other).emit().to_vec(),
        ArpFrame::gratuitous_reply(client, other).emit().to_vec(),
        ArpFrame::probe(client, other).emit().to_vec(),
    ];
    // A third host asking who-has VIP says nothing about who holds it.
    let mut ask = ArpFrame::probe(client, VIP);
    ask.arp.sender_ip = Ipv4Addr::new(10, 0, 0, 1);
    frames.push(ask.emit().to_vec());
    // The prober's own hardware address as ARP sender: ours, so never an answer.
    let mut own = ArpFrame::gratuitous_reply(client, VIP);
    own.arp.sender_mac = spare;
    own.arp.target_mac = spare;
    frames.push(own.emit().to_vec());
    frames.extend(hostile(client, spare));
    frames
}

/// Malformed ARP frames claiming the VIP, unicast to `to`.
fn hostile(from: Mac, to: Mac) -> Vec<Vec<u8>> {
    let mut good = ArpFrame::gratuitous_reply(from, VIP);
    good.eth_dst = to;
    let good = good.emit();
    let with = |at: usize, bytes: &[u8]| {
        let mut f = good.to_vec();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    vec![
        good[..20].to_vec(),     // truncated inside the ARP body
        good[..41].to_vec(),     // one byte short
        with(18, &[8, 4]),       // hardware address length 8
        with(18, &[6, 16]),      // protocol address length 16
        with(14, &[0, 6]),       // IEEE 802 hardware type
        with(16, &[0x86, 0xdd]), // IPv6 protocol type
        with(20, &[0, 4]),       // RARP reply
    ]
}

#[tokio::test]
async fn probe_ignores_answers_for_other_addresses_own_frames_and_malformed_frames() -> Result<()> {
    let bed = Bed::up('f')?;
    let (client, spare) = (bed.mac("client")?, bed.mac("spare")?);
    let noise = noise(client, spare);
    let injector = bed.within("client", || ArpSocket::open(IFACE))??;
    let prober = bed.within("spare", || ArpSocket::open(IFACE))??;
    let probing = probe_on(&prober, VIP, PROBES, PROBE_TIME);
    let injecting = async {
        // Noise every 20 ms for as long as the probe listens.
        let deadline = Instant::now() + PROBE_TIME;
        let mut sent = 0;
        while Instant::now() < deadline {
            for f in &noise {
                injector.send(f).await?;
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(sent)
    };
    let (outcome, sent) = tokio::join!(probing, injecting);
    let outcome = outcome?;
    println!("probe amid {} noise frames: {outcome:?}", sent?);
    expect_unanswered(outcome)
}

#[tokio::test]
async fn responder_survives_hostile_frames_and_reports_another_node_claiming_the_vip() -> Result<()> {
    let bed = Bed::up('g')?;
    let (client, server, spare) = (bed.mac("client")?, bed.mac("server")?, bed.mac("spare")?);
    let silence = bed.within("server", || KernelArpSilence::install(IFACE, VIP))??;
    bed.within("server", || addr::add(IFACE, VIP, PREFIX))??;
    let mut responder = bed.within("server", || Responder::spawn(IFACE, VIP))??;

    let injector = bed.within("client", || ArpSocket::open(IFACE))??;
    let hostile = hostile(client, server);
    for f in &hostile {
        injector.send(f).await?;
    }
    // Every malformed frame reaches the responder (bridge and veth pass short frames).
    wait_until_async("the responder to count the malformed frames", Duration::from_secs(2), || {
        Ok((responder.counts().malformed == hostile.len() as u64).then_some(()))
    })
    .await?;
    assert!(responder.is_running());
    expect_answered_by(spare_probes(&bed, "responder after hostile frames").await?, server)?;

    // The spare announces the VIP as well: the responder reports the conflict.
    let spare_socket = bed.within("spare", || ArpSocket::open(IFACE))??;
    announce_on(&spare_socket, VIP, 1, Duration::ZERO).await?;
    let conflict = tokio::time::timeout(Duration::from_secs(2), responder.conflict())
        .await
        .context("no conflict reported")?
        .context("responder ended")?;
    println!("conflict: {conflict:?}; responder: {:?}", responder.counts());
    assert_eq!(conflict.mac, spare);
    assert!(matches!(conflict.kind, ArpKind::Announcement | ArpKind::GratuitousReply));
    drop(responder);
    drop(silence);
    Ok(())
}
