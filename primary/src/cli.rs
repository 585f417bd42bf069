//! What the `primary` and `backup` binaries share around their node: flags parsed into one line of error
//! and exit 2, logs on stderr (`RUST_LOG` overrides the default level, info), the configuration loaded, and
//! the node run on a multi-thread runtime until SIGINT or SIGTERM.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start or failed (one line on stderr).

use clap::{Command, CommandFactory, FromArgMatches};
use shared::config::{NodeArgs, NodeConfig};
use std::fmt::Display;
use std::future::Future;
use std::io::IsTerminal;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Parses the flags of binary `name` with `adjust` applied to its command (help texts). A parse error is
/// printed as one line and exits 2; `--help` and `--version` print and exit 0.
pub fn parse_args<A: CommandFactory + FromArgMatches>(name: &str, adjust: impl FnOnce(Command) -> Command) -> A {
    let parsed = adjust(A::command()).try_get_matches().and_then(|m| A::from_arg_matches(&m));
    match parsed {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("{name}: {first} (see {name} --help)");
            std::process::exit(2)
        }
    }
}

/// Sets up logging, loads the configuration from `args`, and runs `node(config, shutdown)` until it
/// returns; `shutdown` resolves on the first SIGINT or SIGTERM. Exits the process on any error.
pub fn run_node<F, E>(name: &str, args: impl Into<NodeArgs>, node: impl FnOnce(NodeConfig, Shutdown) -> F)
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = NodeConfig::load(args).unwrap_or_else(|e| {
        eprintln!("{name}: {e}");
        std::process::exit(2)
    });
    raise_open_files_limit(config.limits.max_connections);
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| {
        eprintln!("{name}: cannot start the async runtime: {e}");
        std::process::exit(1)
    });
    let result = runtime.block_on(async {
        // Installed before anything is claimed, so a signal during startup still leads to a clean stop.
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("{name}: cannot install signal handlers: {e}");
                std::process::exit(1)
            }
        };
        let shutdown: Shutdown = Box::pin(async move {
            let signal = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal, "stopping");
        });
        node(config, shutdown).await
    });
    if let Err(e) = result {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Raises the soft limit on open descriptors to the hard limit: each client connection takes one, and
/// so does each upstream connection, so the usual soft limit of 1024 would refuse clients long before
/// `limits.max_connections`. Warns when even the hard limit is too low for it.
fn raise_open_files_limit(max_connections: u32) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct owned by this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let was = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), was, "cannot raise the open-files limit");
                lim.rlim_cur = was;
            }
        }
    }
    // One per client connection, plus pooled upstream connections and the node's own descriptors.
    let want = u64::from(max_connections) + 1024;
    if lim.rlim_cur < want {
        tracing::warn!(
            limit = lim.rlim_cur,
            want,
            max_connections,
            "the open-files limit is below what limits.max_connections needs; raise it (ulimit -n, LimitNOFILE=)"
        );
    }
}
