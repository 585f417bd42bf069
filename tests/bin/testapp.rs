//! `us-testapp`: the client/server application of the kernel takeover tests.
//! The protocol and the record format are described in `understudy_tests::app`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use understudy_tests::app::{self, PlanOffsets, Scenario};

#[derive(Parser)]
#[command(name = "us-testapp", about = "Test application for live TCP connection takeover")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept one connection and serve GET/PUT requests until the client closes.
    /// When DIR/freeze appears: write DIR/record.json and hold the socket open forever.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Record directory (pid, ready, freeze, record.json, upload bodies).
        #[arg(long)]
        record: PathBuf,
        /// Limit reading from the client to this many bytes per second.
        #[arg(long)]
        read_rate: Option<u64>,
    },
    /// Connect, run one scenario, verify every byte; exit non-zero on any error.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        /// Progress file (JSON), rewritten as the transfer advances.
        #[arg(long)]
        progress: PathBuf,
        /// Result file (JSON), written at the end.
        #[arg(long)]
        result: PathBuf,
        /// Fail when a read or write waits longer than this.
        #[arg(long, default_value_t = 30)]
        io_timeout_secs: u64,
        #[command(subcommand)]
        scenario: ClientCmd,
    },
    /// Restore a connection from a restore plan (TCP_REPAIR) and continue serving it
    /// from the old server's record.
    Resume {
        /// RestorePlan JSON (as `tcp-replay plan` prints it).
        #[arg(long)]
        plan: PathBuf,
        /// The old server's record directory.
        #[arg(long)]
        record: PathBuf,
        /// Server-stream offset of the plan's snd_una (0 = ISN + 1).
        #[arg(long)]
        snd_una_offset: u64,
        /// Client-stream offset of the first byte of the plan's receive queue.
        #[arg(long)]
        recv_queue_offset: u64,
        #[arg(long)]
        read_rate: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ClientCmd {
    /// One GET of BYTES, read at RATE bytes per second.
    Download {
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        rate: Option<u64>,
    },
    /// One PUT of BYTES, written at RATE bytes per second.
    Upload {
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        rate: Option<u64>,
    },
    /// GET FIRST, report phase "idle", wait for the GO file, then GET SECOND.
    Idle {
        #[arg(long)]
        first: u64,
        #[arg(long)]
        second: u64,
        #[arg(long)]
        go: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { listen, record, read_rate } => app::serve(listen, &record, read_rate),
        Cmd::Client { connect, progress, result, io_timeout_secs, scenario } => {
            let scenario = match scenario {
                ClientCmd::Download { bytes, rate } => Scenario::Download { bytes, rate },
                ClientCmd::Upload { bytes, rate } => Scenario::Upload { bytes, rate },
                ClientCmd::Idle { first, second, go } => Scenario::Idle { first, second, go },
            };
            app::client(connect, &scenario, &progress, &result, Duration::from_secs(io_timeout_secs))
        }
        Cmd::Resume { plan, record, snd_una_offset, recv_queue_offset, read_rate } => app::resume(
            &plan,
            PlanOffsets { snd_una: snd_una_offset, recv_queue: recv_queue_offset },
            &record,
            read_rate,
        ),
    }
}
