//! What the `us-demo` and `us-scale` tools share around their run: SIGINT/SIGTERM turned into a clean stop
//! (the run returns [`Interrupted`] through its stack, which drops the `Pair` and its processes), the exit
//! status, and timestamped progress lines.

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
