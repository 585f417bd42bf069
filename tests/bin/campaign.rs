//! `us-campaign`: the fault campaign (`scripts/campaign`). Builds one namespace test bed with the replicated
//! pair and `us-origin`, makes N randomized injections (fault × moment) under a mixed workload, checks each,
//! and prints a table per fault type. Exit status 0 when every injection was survived, 1 otherwise.

use anyhow::{Result, ensure};
use clap::Parser;
use understudy_tests::campaign::{self, plan};
use understudy_tests::harness::testbed_id;
use understudy_tests::tool::{self, Clock};

#[derive(Parser)]
#[command(
    name = "us-campaign",
    about = "Randomized fault injections into a replicated pair under a mixed workload, each verified",
    long_about = "Builds a namespace test bed (scripts/testbed up ID --pair) with the primary, the backup and \
                  us-origin, then makes N injections. Each draws a fault (kill -9, SIGSTOP or power cut of the \
                  primary, kill -9 of the backup, replication partition, loss on the client or replication \
                  network, replication frame corruption, planned switchover) and a moment (during handshakes, \
                  an upload, a slow origin, mid-response, idle keep-alive, a spare's join, a takeover) under \
                  keep-alive GET loops, pipelined bursts, POSTs with Idempotency-Key, a download and an upload. \
                  After each the pair is made protected again and the injection is survived when every client \
                  finished with every body checked, no reset from the VIP reached the client, the origin's \
                  ledger shows every POST executed exactly once with the body sent, and the VIP changed hands \
                  on ARP exactly as often as the injection handed it over. Faults that end the primary are not \
                  drawn during a join or a takeover (the pair protects nothing then). Needs root, the release \
                  build of the workspace's binaries, nginx, curl, tcpdump, arping."
)]
struct Cli {
    /// Number of injections.
    #[arg(default_value_t = 20)]
    n: usize,
    /// Seed of the draw (and of each injection's own choices): the same seed makes the same plan.
    #[arg(long)]
    seed: Option<u64>,
    /// Every fault once and every moment at least once (about 9 injections), instead of N random ones.
    #[arg(long)]
    cover: bool,
    /// Make these injections (FAULT@MOMENT, repeatable) instead of N random ones, e.g. to repeat one that
    /// failed. Faults: kill-primary, stop-primary, power-cut, kill-backup, partition, loss-client, loss-repl,
    /// corrupt, switchover. Moments: handshake, upload, slow-origin, mid-response, idle, join, takeover.
    /// Pairings the draw leaves out are run as asked.
    #[arg(long = "inject", value_name = "FAULT@MOMENT")]
    inject: Vec<String>,
    /// Keep the scratch directory (node logs, captures, the origin's ledger).
    #[arg(long)]
    keep: bool,
    /// Test bed ID ([a-z0-9], at most 8 characters; default from the PID).
    #[arg(long)]
    id: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    tool::main("us-campaign", cli.keep, || run(cli))
}

fn run(cli: Cli) -> Result<bool> {
    ensure!(understudy_tests::harness::is_root(), "us-campaign needs root (namespaces, iptables, NFQUEUE)");
    ensure!(cli.cover || cli.n > 0, "N must be at least 1");
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let injections = if !cli.inject.is_empty() {
        let mut rng = fastrand::Rng::with_seed(seed);
        cli.inject
            .iter()
            .map(|t| plan::parse_injection(t, rng.u64(..)).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?
    } else if cli.cover {
        plan::covering_plan(seed)
    } else {
        plan::plan(seed, cli.n)
    };
    let id = cli.id.unwrap_or_else(|| testbed_id('c', 'a'));
    let clock = Clock(std::time::Instant::now());
    let log = |l: &str| clock.line(l);
    log(&format!("seed {seed} (repeat with --seed {seed}{})", if cli.cover { " --cover" } else { "" }));
    let results = campaign::run(&id, &injections, None, &log)?;
    println!("\n{}", plan::table(&results));
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(_, (_, o))| !o.survived())
        .map(|(i, (inj, _))| format!("#{} {} {}", i + 1, inj.fault, inj.moment))
        .collect();
    if failed.is_empty() {
        println!("all {} injections survived (seed {seed})", results.len());
    } else {
        println!("{} of {} injections NOT survived (seed {seed}): {}", failed.len(), results.len(), failed.join(", "));
    }
    Ok(failed.is_empty())
}
