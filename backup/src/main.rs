//! `backup`: parses flags, sets up logging, loads the configuration, and runs the node
//! (`backup::node::run`) until SIGINT or SIGTERM. After a takeover the same process serves as primary.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start or failed (a takeover that could not claim the VIP, ...).

use clap::{CommandFactory, FromArgMatches};
use shared::config::{BackupArgs, NodeConfig};
use std::io::IsTerminal;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() {
    let args = parse_args();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = NodeConfig::load(args).unwrap_or_else(|e| {
        eprintln!("backup: {e}");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| {
        eprintln!("backup: cannot start the async runtime: {e}");
        std::process::exit(1)
    });
    let result = runtime.block_on(async {
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("backup: cannot install signal handlers: {e}");
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
        backup::node::run(config, shutdown).await
    });
    if let Err(e) = result {
        eprintln!("backup: {e}");
        std::process::exit(1);
    }
}

/// The flags. A parse error is printed as one line and exits 2; `--help` and `--version` exit 0.
fn parse_args() -> BackupArgs {
    let parsed = BackupArgs::command().try_get_matches().and_then(|m| BackupArgs::from_arg_matches(&m));
    match parsed {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("backup: {first} (see backup --help)");
            std::process::exit(2)
        }
    }
}
