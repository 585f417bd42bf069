//! What the `us-demo` and `us-scale` tools share around their run: SIGINT/SIGTERM turned into a clean stop
//! (the run returns [`Interrupted`] through its stack, which drops the `Pair` and its processes), the exit
//! status, timestamped progress lines, and the open-files limit a run of thousands of connections needs.

use anyhow::{Context, Result};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// SIGINT or SIGTERM arrived: the run stops and everything is cleaned up.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM only set a flag, which the run checks between steps and while it waits
/// ([`check_interrupted`]).
fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic (async-signal-safe).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

/// [`Interrupted`] once SIGINT or SIGTERM arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Runs the tool `name` and exits: 0 when `run` says everything passed, 1 when it did not or failed (the
/// error on stderr), 130 when interrupted. `keep` keeps the scratch directory (`UNDERSTUDY_KEEP`).
pub fn main(name: &str, keep: bool, run: impl FnOnce() -> Result<bool>) -> ! {
    if keep {
        // SAFETY: single-threaded here; read by the Pair's scratch directory on drop.
        unsafe { std::env::set_var("UNDERSTUDY_KEEP", "1") };
    }
    let code = match install_signal_handlers().and_then(|()| run()) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("{name}: interrupted; the test bed and every process were cleaned up");
            130
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Seconds since the run's start, for progress lines.
pub struct Clock(pub Instant);

impl Clock {
    pub fn line(&self, text: &str) {
        println!("{:>6.1} s  {text}", self.0.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    }
}

/// Raises the soft open-files limit to at least `want` (the processes started later inherit it), within the
/// hard limit, which is raised too when this process may (CAP_SYS_RESOURCE).
pub fn raise_open_files(want: u64) -> Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct owned by this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur >= want {
            return Ok(());
        }
        if lim.rlim_max < want {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Ok(());
            }
        }
        let hard = lim.rlim_max;
        anyhow::ensure!(
            hard >= want,
            "the open-files limit's hard limit is {hard}, and this run needs {want} descriptors: raise it \
             (ulimit -Hn), or run fewer connections"
        );
        lim.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("raising the open-files limit to {want}"));
        }
    }
    Ok(())
}
