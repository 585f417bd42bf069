//! Kernel tests: a live TCP connection moves to a third host from packets alone.
//!
//! A client and a server talk over the VIP in a `scripts/testbed` bed; the only
//! observer is tcpdump on the server's eth0. Mid-transfer the server host is cut
//! off (its interface downed), a restore plan is derived from the capture (plus
//! how many client bytes the server application consumed), checked against the
//! frozen socket's own checkpoint (`plan::compare`), and restored with TCP_REPAIR
//! on the spare, which has taken the VIP. The client must finish byte-identical,
//! without a reset, on the same connection. See `understudy_tests::takeover`.
//!
//! Needs root (namespaces, iptables, pidfd_getfd, TCP_REPAIR). The scenarios use
//! distinct test bed IDs and ports, so they run in parallel.

use understudy_tests::takeover::{Kind, Scenario, run};

const APP: &str = env!("CARGO_BIN_EXE_us-testapp");
const MB: u64 = 1_000_000;

fn check(scenario: Scenario) {
    match run(&scenario, APP) {
        Ok(outcome) => println!("{}: passed\n{}", scenario.name, outcome.report),
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn download_50mb_in_progress_continues_on_the_spare() {
    check(Scenario {
        name: "download_50mb_in_progress_continues_on_the_spare",
        tag: 'd',
        port: 8081,
        kind: Kind::Download { bytes: 50 * MB, rate: 20 * MB, cut_percent: 40 },
    });
}

#[test]
fn upload_20mb_in_progress_continues_on_the_spare() {
    check(Scenario {
        name: "upload_20mb_in_progress_continues_on_the_spare",
        tag: 'u',
        port: 8082,
        // The server reads slower than the client writes, so its kernel holds
        // unread request bytes when it is cut off: the plan must carry them.
        kind: Kind::Upload { bytes: 20 * MB, rate: 10 * MB, server_read_rate: 7 * MB, cut_percent: 40 },
    });
}

#[test]
fn idle_connection_carries_a_new_request_after_takeover() {
    check(Scenario {
        name: "idle_connection_carries_a_new_request_after_takeover",
        tag: 'i',
        port: 8083,
        kind: Kind::Idle { first: 1000, second: 5 * MB },
    });
}
