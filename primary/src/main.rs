//! `primary`: parses flags, sets up logging, loads the configuration, and runs the node
//! (`primary::node::run`) until SIGINT or SIGTERM.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start (the VIP is held by another node, an address is in use, ...), failed, or stepped
//! down (another node serves the VIP, or a later epoch exists).

use clap::{CommandFactory, FromArgMatches};
use shared::config::{NodeConfig, PrimaryArgs};
use std::io::IsTerminal;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// What `--help` adds about this build.
const BUILD_NOTE: &str = "\
Claims the VIP (after checking with ARP that nobody answers for it) and serves HTTP on it. Every segment for
VIP:port passes an NFQUEUE gate. A backup joins on --repl-listen: it receives a snapshot of every live
connection, then the stream, and from then on nothing reaches a client before the backup holds it (/status
peer \"connected\"). Until a backup joins, and after it is lost (its acks stop for the lease and nobody else
answers for the VIP), the primary serves unprotected (peer \"none\"). If another node answers for the VIP or
a later epoch exists, it steps down: it gives up the VIP, sends nothing more for its connections, and exits
with status 1.";

fn main() {
    let args = parse_args();
    // Logs go to stderr; RUST_LOG overrides the default level (info).
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = NodeConfig::load(args).unwrap_or_else(|e| {
        eprintln!("primary: {e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| {
        eprintln!("primary: cannot start the async runtime: {e}");
        std::process::exit(1)
    });
    let result = runtime.block_on(async {
        // Installed before anything is claimed, so a signal during startup still leads to a clean stop.
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("primary: cannot install signal handlers: {e}");
                std::process::exit(1)
            }
        };
        let shutdown = async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "stopping");
        };
        primary::node::run(config, shutdown).await
    });
    if let Err(e) = result {
        eprintln!("primary: {e}");
        std::process::exit(1);
    }
}

/// The flags, with this build's note in `--help`. A parse error is printed as one line and exits 2;
/// `--help` and `--version` print and exit 0.
fn parse_args() -> PrimaryArgs {
    let command = PrimaryArgs::command()
        .about("understudy primary: serves HTTP on the VIP and replicates every client connection to a backup")
        .mut_arg("repl_listen", |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} One backup at a time; another is refused while one is connected."))
        })
        .before_long_help(BUILD_NOTE);
    let parsed = command.try_get_matches().and_then(|m| PrimaryArgs::from_arg_matches(&m));
    match parsed {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("primary: {first} (see primary --help)");
            std::process::exit(2)
        }
    }
}
