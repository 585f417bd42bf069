//! Helpers shared by the primary's kernel tests: commands, unique names, and
//! threads inside network namespaces.

// Each test crate uses a subset of these helpers.
#![allow(dead_code)]

use anyhow::{Context, Result, ensure};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

/// `n` in base 36 (short unique suffixes for namespace names).
pub fn base36(mut n: u32) -> String {
    let mut d = Vec::new();
    loop {
        d.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    d.iter().rev().collect()
}

/// Runs a command to completion; fails with its stderr unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves this thread into network namespace `ns` for good.
pub fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("opening netns {ns}"))?;
    // SAFETY: setns on this thread only, with a namespace descriptor we just opened.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("entering netns {ns}"));
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let name = ns.to_string();
    std::thread::spawn(move || {
        enter(&name)?;
        f()
    })
    .join()
    .map_err(|p| anyhow::anyhow!("thread in netns {ns} panicked: {}", panic_text(&p)))?
}

/// The message of a caught panic.
pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}
