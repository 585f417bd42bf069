//! What the `primary` and `backup` binaries share around their node: flags parsed into one line of error
//! and exit 2, logs on stderr (`RUST_LOG` overrides the default level, info), the configuration loaded, and
//! the node run on a multi-thread runtime until SIGINT or SIGTERM.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start or failed (one line on stderr).
//!
//! After a planned switchover handed this node's connections to its backup, the process replaces itself
//! (same PID, same flags) with `backup --join <the new primary>`: the old primary rejoins as the spare.
//!
//! `primary switchover` / `backup switchover` (first argument) asks a running node's admin endpoint for a
//! planned switchover instead of running a node ([`switchover_command`]).

use clap::{Command, CommandFactory, FromArgMatches};
use shared::config::{NodeArgs, NodeConfig};
use std::fmt::Display;
use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
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

/// How a node's run ended, as far as the binary cares.
pub trait NodeEnd: Display {
    /// Where to rejoin as the spare after a planned switchover handed everything over.
    fn handed_over(&self) -> Option<SocketAddr>;
}

impl NodeEnd for crate::node::NodeError {
    fn handed_over(&self) -> Option<SocketAddr> {
        match self {
            crate::node::NodeError::HandedOver { join } => Some(*join),
            _ => None,
        }
    }
}

/// Sets up logging, loads the configuration from `args`, and runs `node(config, shutdown)` until it
/// returns; `shutdown` resolves on the first SIGINT or SIGTERM. Exits the process on any error; after a
/// planned switchover, becomes the spare ([`rejoin_as_spare`]).
pub fn run_node<F, E>(name: &str, args: impl Into<NodeArgs>, node: impl FnOnce(NodeConfig, Shutdown) -> F)
where
    F: Future<Output = Result<(), E>>,
    E: NodeEnd,
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
    keep_freed_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(reserve_thread_heap)
        .build()
        .unwrap_or_else(|e| {
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
        if let Some(join) = e.handed_over() {
            rejoin_as_spare(name, join);
        }
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// Replaces this process (same PID, same flags) with `backup … --join <join>`: the `backup` binary beside
/// this one, else the one on `PATH`. Returns only if that could not be started (logged), and the caller
/// exits 1.
fn rejoin_as_spare(name: &str, join: SocketAddr) {
    use std::os::unix::process::CommandExt;
    let here = std::env::current_exe().ok();
    let program = match &here {
        Some(exe) if name == "backup" => exe.clone(),
        Some(exe) => exe.with_file_name("backup"),
        None => "backup".into(),
    };
    let program = if program.exists() { program } else { "backup".into() };
    // `args_override_self`: the last --join wins over the one given before, if any.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    tracing::info!(program = %program.display(), %join, "restarting as the spare of the new primary");
    let error = std::process::Command::new(&program).args(&args).arg("--join").arg(join.to_string()).exec();
    tracing::error!(program = %program.display(), %error, "cannot restart as the spare; start `backup --join {join}` by hand");
    eprintln!("{name}: handed over, but cannot restart as `{} --join {join}`: {error}", program.display());
}

/// `<binary> switchover [--admin ADDR] [--token TOKEN | --token-file FILE]`: asks the primary's admin endpoint for a planned
/// switchover, prints its JSON answer, and exits 0 when the backup took over, 1 otherwise (2 for bad
/// arguments). Returns without doing anything unless the first argument is `switchover`.
pub fn switchover_command(name: &str) {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("switchover") {
        return;
    }
    let command = Command::new("switchover")
        .bin_name(format!("{name} switchover"))
        .about(
            "Planned switchover: asks the running primary (at its --admin address) to hand every connection \
             to its backup with nothing lost and no fencing delay. Answers once the backup serves them; the \
             old primary then restarts as the spare. Exits 0 on success, 1 when refused or failed (the answer \
             says why).",
        )
        .arg(
            clap::Arg::new("admin")
                .long("admin")
                .value_name("IPV4:PORT")
                .default_value("127.0.0.1:9900")
                .value_parser(clap::value_parser!(SocketAddr))
                .help("The primary's admin endpoint"),
        )
        .arg(
            clap::Arg::new("token")
                .long("token")
                .value_name("TOKEN")
                .env("UNDERSTUDY_ADMIN_TOKEN")
                .conflicts_with("token_file")
                .help(
                    "Bearer token, when the admin endpoint requires one (visible to other users in the \
                       process list: prefer --token-file)",
                ),
        )
        .arg(
            clap::Arg::new("token_file")
                .long("token-file")
                .value_name("FILE")
                .value_parser(clap::value_parser!(std::path::PathBuf))
                .help("File holding the bearer token (the node's --admin-token-file)"),
        );
    let matches = match command.try_get_matches_from(std::iter::once(format!("{name} switchover")).chain(args)) {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("{name} switchover: {}", first.strip_prefix("error: ").unwrap_or(first));
            std::process::exit(2)
        }
    };
    let admin = *matches.get_one::<SocketAddr>("admin").expect("defaulted");
    let token = match matches.get_one::<std::path::PathBuf>("token_file") {
        Some(path) => match shared::admin::load_token(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{name} switchover: admin token: {e}");
                std::process::exit(2)
            }
        },
        None => matches.get_one::<String>("token").cloned(),
    };
    match post_switchover(admin, token.as_deref()) {
        Ok((status, body)) => {
            print!("{body}");
            if !body.ends_with('\n') {
                println!();
            }
            std::process::exit(if status == 200 { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("{name} switchover: cannot reach the admin endpoint at {admin}: {e}");
            std::process::exit(1)
        }
    }
}

/// One `POST /admin/switchover` over HTTP/1.1 (the admin endpoint answers with a length and closes on
/// `Connection: close`): the status code and the body.
fn post_switchover(admin: SocketAddr, token: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let timeout = shared::admin::server::SWITCHOVER_TIMEOUT + std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(5))?;
    stream.set_read_timeout(Some(timeout))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        stream,
        "POST /admin/switchover HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.to_string()))
}

/// Resolves on the first SIGINT or SIGTERM.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Has glibc's allocator keep freed memory mapped for reuse: large blocks from the heap rather than mappings
/// of their own, and no trimming of the heap's top. A join's snapshot copies what the replica holds of every
/// busy connection (up to `replica_bytes_per_connection` each: a hundred megabytes for a hundred slow
/// downloads), on both nodes. With the defaults each such buffer is a fresh mapping whose every page faults
/// on first touch. (Measured on the takeover's plans, which copied as much until they left the bytes in
/// the table: most of the copy's time. One arena for all threads made it faster still, but cost the
/// replicated pair 7-9 % of its requests per second.) The price: the process keeps its peak heap. A
/// setting given by the environment (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) is left as it is.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (name, param, value) in [
        // glibc's largest: larger blocks are still mappings of their own.
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 32 << 20),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 30),
    ] {
        if std::env::var_os(name).is_some() {
            continue;
        }
        // SAFETY: mallopt takes two integers and only changes the allocator's parameters.
        if unsafe { libc::mallopt(param, value) } != 1 {
            tracing::warn!(setting = name, value, "glibc refused an allocator setting; large copies may be slower");
        }
    }
}

/// Grows the calling thread's glibc heap (its arena) by [`THREAD_HEAP_RESERVE`] and gives the block back: the
/// arena keeps it as free space (no trimming, see [`keep_freed_memory`]). Address space, not memory: pages are
/// only backed once used. A thread arena otherwise grows a few pages at a time, each step an `mprotect`: a
/// takeover's first polls of ten thousand restored connections, on the runtime's threads, spent a sixth of
/// their time there.
fn reserve_thread_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    drop(std::hint::black_box(Vec::<u8>::with_capacity(THREAD_HEAP_RESERVE)));
}

/// What [`reserve_thread_heap`] reserves: below the mmap threshold (32 MiB, so it comes from the arena) and
/// half a thread arena's largest heap (64 MiB).
const THREAD_HEAP_RESERVE: usize = 30 << 20;

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
