//! A takeover at the edges of a connection's life: a client whose handshake, or whose close, the primary
//! had not finished answering when it died or handed over. The old primary's part is forced with an
//! iptables rule in its own host (a lost ACK) before it is killed, or by a switchover held open by a slow
//! answer; the client must go on with the new primary as if nothing happened, and never see a reset.
//!
//! Needs root, nginx, curl (installed by `scripts/test`) and the workspace's binaries built.

use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;
use understudy_tests::harness::{unique_id, wait_until};
use understudy_tests::pair::{Origin, PORT, Pair, PairOptions, VIP};
use understudy_tests::pattern;
use understudy_tests::takeover::CLIENT_IP;

const BODY: u64 = 5_000;
const KEY: u64 = 0xed6e;

fn vip() -> SocketAddr {
    format!("{VIP}:{PORT}").parse().expect("the VIP parses")
}

/// A pair protecting nothing yet, with `small.bin` at the origin.
fn pair(tag: char) -> Result<Pair> {
    Pair::up(&unique_id(tag), &PairOptions::default(), |www| {
        pattern::write_file(&www.join("small.bin"), KEY, BODY).map(drop).context("writing small.bin")
    })
}

/// A blocking TCP connection from the client host, bound to `local_port`, to the VIP: the socket is made
/// in the client's network namespace.
fn connect(pair: &Pair, local_port: u16) -> Result<TcpStream> {
    let ns = format!("/run/netns/us{}-client", pair.tb.id);
    std::thread::scope(|s| {
        s.spawn(|| {
            let target = fs::File::open(&ns).with_context(|| format!("opening namespace {ns}"))?;
            // SAFETY: setns(2) with a namespace descriptor we hold; it changes this short-lived thread only.
            if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).context("setns into the client's namespace");
            }
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            let local: SocketAddr = format!("{CLIENT_IP}:{local_port}").parse()?;
            sock.bind(&local.into()).with_context(|| format!("binding {local}"))?;
            sock.connect_timeout(&vip().into(), Duration::from_secs(5)).context("connecting to the VIP")?;
            Ok(TcpStream::from(sock))
        })
        .join()
        .unwrap_or_else(|_| bail!("the connecting thread panicked"))
    })
}

/// The client socket's TCP state (Linux's numbering) and pending error.
fn tcp_state(s: &TcpStream) -> Result<u8> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let r =
        unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    ensure!(r == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info.tcpi_state)
}

/// Waits until the client's socket, which sent its FIN, is closed by an ACK of it, not by a reset.
fn wait_fin_acknowledged(pair: &Pair, client: &TcpStream) -> Result<()> {
    const TCP_CLOSE: u8 = 7;
    wait_until("the client's FIN to be answered", Duration::from_secs(20), || {
        Ok((tcp_state(client)? == TCP_CLOSE).then_some(()))
    })
    .with_context(|| pair.logs_tail())?;
    let error = client.take_error()?;
    ensure!(error.is_none(), "the client's close ended with {error:?}, not an ACK\n{}", pair.logs_tail());
    Ok(())
}

/// Waits until every record the primary sent was acknowledged by the backup.
fn wait_replicated(pair: &Pair, sent_before: u64) -> Result<()> {
    let host = pair.primary_host;
    pair.wait_status(host, "the backup to acknowledge everything sent", Duration::from_secs(10), |s| {
        let r = &s["replication"];
        r["records_sent"].as_u64().unwrap_or(0) > sent_before && r["lag_records"].as_u64() == Some(0)
    })?;
    Ok(())
}

fn records_sent(pair: &Pair) -> Result<u64> {
    pair.status(pair.primary_host)?["replication"]["records_sent"].as_u64().context("records_sent in /status")
}

fn request() -> String {
    format!("GET /small.bin HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n")
}

/// Checks a `Connection: close` response read to its end: status 200 and the file's bytes.
fn check_response(raw: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(raw);
    let head_end = text.find("\r\n\r\n").context("no end of the response head")? + 4;
    ensure!(text.starts_with("HTTP/1.1 200"), "unexpected response: {}", &text[..head_end.min(200)]);
    let body = &raw[head_end..];
    ensure!(body.len() as u64 == BODY, "{} body bytes, want {BODY}", body.len());
    ensure!(pattern::first_mismatch(KEY, 0, body).is_none(), "the body differs from small.bin");
    Ok(())
}

/// The server closed (its response ended with `Connection: close`), the client answered with its own FIN,
/// and the primary's ACK of that FIN never left: the replica holds the connection as TIME_WAIT, the
/// client sits in LAST_ACK resending its FIN. The new primary must acknowledge it, not reset it.
#[test]
fn a_client_fin_whose_ack_died_with_the_primary_is_acknowledged_by_the_new_one() -> Result<()> {
    let mut pair = pair('f')?;
    let port = 41_000 + (std::process::id() % 1000) as u16;
    let mut client = connect(&pair, port)?;
    client.write_all(request().as_bytes())?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut raw = Vec::new();
    client.read_to_end(&mut raw).context("reading the response to the server's FIN")?;
    check_response(&raw)?;

    // The primary's ACKs to this client (pure ACKs: no payload) are lost from now on.
    let host = pair.primary_host;
    let p = port.to_string();
    let drop_acks = ["-s", VIP, "--sport", "80", "-d", CLIENT_IP, "--dport", &p, "-m", "length", "--length", "40:80"];
    let mut rule = vec!["iptables", "-w", "-I", "OUTPUT", "-p", "tcp"];
    rule.extend(drop_acks);
    rule.extend(["-j", "DROP"]);
    pair.tb.exec(host, &rule)?;
    let sent = records_sent(&pair)?;
    client.shutdown(Shutdown::Write)?;
    wait_replicated(&pair, sent)?;
    const TCP_LAST_ACK: u8 = 9;
    ensure!(tcp_state(&client)? == TCP_LAST_ACK, "the client should wait for the ACK of its FIN");

    pair.kill_primary()?;
    pair.wait_taken_over(Duration::from_secs(20))?;
    wait_fin_acknowledged(&pair, &client)?;
    println!("the client's resent FIN was acknowledged by the new primary");
    Ok(())
}

/// The client completed its handshake and sent its request, but the primary's gate never saw its ACK nor
/// the request (dropped in front of it here): the replica holds a handshake without its last ACK. The new
/// primary must ask the client, find it established, and serve the request it resends.
#[test]
fn a_handshake_whose_last_ack_died_with_the_primary_is_served_by_the_new_one() -> Result<()> {
    let mut pair = pair('h')?;
    let port = 42_000 + (std::process::id() % 1000) as u16;
    let host = pair.primary_host;
    let p = port.to_string();
    // Everything from this client port but its SYN is lost in front of the primary.
    let rule = [
        "iptables",
        "-w",
        "-t",
        "raw",
        "-I",
        "PREROUTING",
        "-p",
        "tcp",
        "-s",
        CLIENT_IP,
        "--sport",
        &p,
        "-d",
        VIP,
        "--dport",
        "80",
        "!",
        "--syn",
        "-j",
        "DROP",
    ];
    pair.tb.exec(host, &rule)?;
    let sent = records_sent(&pair)?;
    let mut client = connect(&pair, port)?;
    client.write_all(request().as_bytes())?;
    wait_replicated(&pair, sent)?;

    pair.kill_primary()?;
    pair.wait_taken_over(Duration::from_secs(20))?;
    client.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut raw = Vec::new();
    client.read_to_end(&mut raw).with_context(|| format!("reading the response\n{}", pair.logs_tail()))?;
    check_response(&raw)?;
    ensure!(client.take_error()?.is_none(), "the connection ended with an error");
    println!("the request sent after an unseen handshake ACK was served by the new primary");
    Ok(())
}

/// A client's FIN that reaches a primary handing over (a planned switchover, held open here while a slow
/// answer is awaited) is replicated but never released into that node's kernel, so nothing acknowledges
/// it there. The connection is over in the replica (TIME_WAIT), but it must not be dropped from it before
/// the FIN is committed: the new primary acknowledges the client's resent FIN, and the slow exchange
/// finishes too.
#[test]
fn a_client_fin_that_reaches_a_primary_handing_over_is_acknowledged_by_the_new_one() -> Result<()> {
    let opts = PairOptions { origin: Origin::UsOrigin, ..PairOptions::default() };
    let mut pair = Pair::up(&unique_id('s'), &opts, |_| Ok(()))?;
    let port = 43_000 + (std::process::id() % 1000) as u16;
    let mut closing = connect(&pair, port)?;
    closing.write_all(
        format!("GET /file?len={BODY}&key={KEY} HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    closing.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut raw = Vec::new();
    closing.read_to_end(&mut raw).context("reading the response to the server's FIN")?;
    check_response(&raw)?;

    // The switchover waits for the slow request's answer (about 1.5 s) between freezing and handing over.
    let mut slow = connect(&pair, port + 1)?;
    slow.write_all(
        format!("GET /slow?ms=1500&len={BODY}&key={KEY} HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    wait_until("the slow request to reach the origin", Duration::from_secs(10), || {
        Ok(pair
            .origin_executions()?
            .iter()
            .any(|e| e["target"].as_str().is_some_and(|t| t.starts_with("/slow")))
            .then_some(()))
    })?;
    let log = pair.dir.0.join(format!("{}.log", pair.node_log_stems()[0]));
    std::thread::scope(|s| -> Result<()> {
        let fin = s.spawn(|| -> Result<()> {
            wait_until("the primary to freeze for the handover", Duration::from_secs(10), || {
                Ok(fs::read_to_string(&log)?.contains("handing over: nothing more reaches a client").then_some(()))
            })?;
            closing.shutdown(Shutdown::Write).context("sending the client's FIN")
        });
        let answer = pair.switchover();
        fin.join().unwrap_or_else(|_| bail!("the closing thread panicked"))?;
        answer.map(drop)
    })?;

    wait_fin_acknowledged(&pair, &closing)?;
    slow.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut raw = Vec::new();
    slow.read_to_end(&mut raw).with_context(|| format!("reading the slow response\n{}", pair.logs_tail()))?;
    check_response(&raw)?;
    println!("the FIN sent during the handover was acknowledged by the new primary");
    Ok(())
}
