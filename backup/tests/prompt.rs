//! Prompting clients to retransmit after an outage (RFC 6069), on real kernels: `scripts/testbed`
//! namespaces (client 10.0.0.1, server 10.0.0.2). Needs root.
//!
//! Two client connections send while the server drops everything they send, until both clients' TCP has
//! backed off three times (their next resend is 1.6 s away). Then the outage ends and only connection A
//! is prompted, from the server's own checkpoint of it (`rcv_nxt`), exactly as a takeover does: A's
//! bytes must arrive while B, unprompted, is still waiting on its backed-off timer. B then recovers on
//! its own, so the difference is the prompt and nothing else.

use anyhow::{Context, Result, ensure};
use backup::prompt::{self, Prompt};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use understudy_tests::harness::{Testbed, is_root, testbed_id, wait_until};
use understudy_tests::netns::Netns;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const PORT: u16 = 8123;

/// `tcpi_backoff` of `struct tcp_info`: how many times the retransmission timer has doubled.
fn backoff(s: &TcpStream) -> Result<u8> {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt(TCP_INFO) copies at most `len` bytes into `info`, which is that long.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    ensure!(rc == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info[4])
}

/// Reads exactly `n` bytes, or fails after `timeout`.
fn read_n(s: &mut TcpStream, n: usize, timeout: Duration) -> Result<Vec<u8>> {
    s.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).with_context(|| format!("reading {n} bytes within {timeout:?}"))?;
    Ok(buf)
}

/// Whether the server has any byte of `s` waiting (without consuming it).
fn has_data(s: &TcpStream) -> Result<bool> {
    s.set_nonblocking(true)?;
    let r = s.peek(&mut [0u8; 1]);
    s.set_nonblocking(false)?;
    match r {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[test]
fn a_prompted_client_resends_at_once_while_an_unprompted_one_waits_for_its_timer() -> Result<()> {
    ensure!(is_root(), "the prompt test needs root (network namespaces, raw sockets, TCP_REPAIR)");
    let bed = Testbed::up(&testbed_id('p', 'a'))?;

    let listener = {
        let _in = Netns::enter(&bed.ns("server"))?;
        TcpListener::bind((SERVER, PORT))?
    };
    let (mut client_a, mut client_b) = {
        let _in = Netns::enter(&bed.ns("client"))?;
        (TcpStream::connect((SERVER, PORT))?, TcpStream::connect((SERVER, PORT))?)
    };
    let (mut server_a, _) = listener.accept()?;
    let (mut server_b, _) = listener.accept()?;
    ensure!(server_a.peer_addr()? == client_a.local_addr()?, "accepted in connect order");

    // The connections work.
    client_a.write_all(b"hello a")?;
    client_b.write_all(b"hello b")?;
    assert_eq!(read_n(&mut server_a, 7, Duration::from_secs(2))?, b"hello a");
    assert_eq!(read_n(&mut server_b, 7, Duration::from_secs(2))?, b"hello b");

    // The outage: the server hears nothing of what the clients send.
    let drop_rule = ["-p", "tcp", "--dport", "8123", "-j", "DROP"];
    bed.exec("server", &[&["iptables", "-I", "INPUT"][..], &drop_rule[..]].concat())?;
    let outage_began = Instant::now();
    let lost_a = vec![b'a'; 1000];
    let lost_b = vec![b'b'; 1000];
    client_a.write_all(&lost_a)?;
    client_b.write_all(&lost_b)?;
    wait_until("both clients to back off three times", Duration::from_secs(5), || {
        Ok((backoff(&client_a)? >= 3 && backoff(&client_b)? >= 3).then_some(()))
    })?;

    // What a takeover knows of A: the server end's state.
    let plan = tcp_replay::repair::checkpoint(&server_a).context("checkpoint of the server end of A")?;
    let p = Prompt::for_plan(&plan).context("an established connection is prompted")?;
    assert_eq!(
        p.client,
        match client_a.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => anyhow::bail!("IPv4 expected, got {other}"),
        }
    );
    assert_eq!(p.server, SocketAddrV4::new(SERVER, PORT));

    // The outage ends; only A is prompted.
    bed.exec("server", &[&["iptables", "-D", "INPUT"][..], &drop_rule[..]].concat())?;
    let report = {
        let _in = Netns::enter(&bed.ns("server"))?;
        // As many messages as the outage allowed backoff steps (and one more): enough to undo them all.
        prompt::send(SERVER, &[p], prompt::burst_for(outage_began.elapsed()))?
    };
    assert_eq!(report, prompt::PromptReport { prompted: 1, ..Default::default() });

    assert_eq!(read_n(&mut server_a, 1000, Duration::from_millis(800))?, lost_a, "A resent after the prompt");
    assert!(!has_data(&server_b)?, "B's bytes arrived as early as A's: the test cannot tell the prompt's effect");
    assert!(backoff(&client_b)? >= 3, "B is still backed off");

    // B recovers by itself, on its timer.
    assert_eq!(read_n(&mut server_b, 1000, Duration::from_secs(5))?, lost_b, "B resent on its own timer");
    wait_until("A's client to leave backoff", Duration::from_secs(2), || Ok((backoff(&client_a)? == 0).then_some(())))?;
    Ok(())
}
