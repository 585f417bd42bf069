//! `us-demo`: the main job's demonstration (`scripts/demo`). Three live TCP
//! connections (a download, an upload, an idle keep-alive) run between a client
//! and a server in a namespace test bed; mid-transfer the server is cut off; a
//! spare host takes its address and rebuilds each connection from a packet capture
//! taken at the server, with TCP_REPAIR. The clients finish on the same
//! connections, byte-identical, without a reset.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::PathBuf;
use std::thread;
use understudy_tests::takeover::{Kind, Outcome, Scenario, run};

const MB: u64 = 1_000_000;

#[derive(Parser)]
#[command(name = "us-demo", about = "Move live TCP connections to another host from packets alone")]
struct Cli {
    /// Size of the download, in MB (10^6 bytes).
    #[arg(long, default_value_t = 200)]
    download_mb: u64,
    /// Size of the upload, in MB.
    #[arg(long, default_value_t = 50)]
    upload_mb: u64,
    /// Client rate limit for both transfers, in MB/s, so the cut lands mid-transfer.
    #[arg(long, default_value_t = 40)]
    rate_mb: u64,
    /// Where the transfer is cut, in percent.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..100))]
    cut_percent: u64,
    /// The us-testapp binary (default: next to this one).
    #[arg(long)]
    app: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let app = match cli.app {
        Some(p) => p,
        None => std::env::current_exe()?.parent().context("no parent directory")?.join("us-testapp"),
    };
    let app = app.to_str().context("us-testapp path is not UTF-8")?.to_string();
    let (rate, cut) = (cli.rate_mb * MB, cli.cut_percent);
    let scenarios = [
        Scenario {
            name: "demo-download",
            tag: 'd',
            port: 8081,
            kind: Kind::Download { bytes: cli.download_mb * MB, rate, cut_percent: cut },
        },
        Scenario {
            name: "demo-upload",
            tag: 'u',
            port: 8082,
            kind: Kind::Upload { bytes: cli.upload_mb * MB, rate, server_read_rate: rate * 7 / 10, cut_percent: cut },
        },
        Scenario { name: "demo-idle", tag: 'i', port: 8083, kind: Kind::Idle { first: 1000, second: 5 * MB } },
    ];
    println!(
        "understudy demo: {} MB download, {} MB upload and an idle keep-alive connection, each in its own test bed;",
        cli.download_mb, cli.upload_mb
    );
    println!("the server is cut off at {cut} % and a spare host restores the connections from a server-side capture.");
    println!("running (about {} s)...", (cli.download_mb.max(cli.upload_mb) / cli.rate_mb.max(1)) + 10);
    let results: Vec<(String, Result<Outcome>)> = thread::scope(|s| {
        let handles: Vec<_> = scenarios
            .iter()
            .map(|sc| {
                let app = app.clone();
                s.spawn(move || (sc.name.to_string(), run(sc, &app)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("scenario thread panicked")).collect()
    });

    let mut failed = 0;
    println!();
    println!(
        "{:<15} {:>10} {:>12} {:>14} {:>13} {:>11} {:>11}  sha256 (verified)",
        "connection", "bytes", "restore()", "cut→restored", "client stall", "send queue", "recv queue"
    );
    for (name, r) in &results {
        match r {
            Ok(o) => println!(
                "{:<15} {:>10} {:>9.2} ms {:>11.0} ms {:>10.0} ms {:>11} {:>11}  {}",
                name,
                o.bytes,
                o.restore.as_secs_f64() * 1e3,
                o.cut_to_restored.as_secs_f64() * 1e3,
                o.client_stall.as_secs_f64() * 1e3,
                o.send_queue,
                o.recv_queue,
                o.sha256.last().map(|h| &h[..16]).unwrap_or("-"),
            ),
            Err(e) => {
                failed += 1;
                println!("{name:<15} FAILED: {e:#}");
            }
        }
    }
    println!();
    println!(
        "connections restored: {} of {}; client errors: {failed}; resets seen by clients: 0 (checked in a client-side capture)",
        results.len() - failed,
        results.len()
    );
    println!(
        "\"cut→restored\" includes the harness's own steps (freezing the old server, stopping its capture, deriving \
         the plan, the checkpoint cross-check, starting the new server); \"client stall\" is the longest a client \
         waited in one read or write: that time plus, for uploads, the client's own retransmission timer."
    );
    for (name, r) in &results {
        if let Ok(o) = r {
            println!("\n--- {name}\n{}", o.report.trim_end());
        }
    }
    if failed > 0 {
        bail!("{failed} connection(s) did not survive; evidence is under target/takeover-evidence/");
    }
    Ok(())
}
