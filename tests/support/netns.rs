//! Threads inside network namespaces (`/run/netns/<name>`, as `ip netns` and `scripts/testbed` make
//! them).
//!
//! `setns(2)` with `CLONE_NEWNET` moves only the calling thread; sockets keep the namespace they were
//! made in, whichever thread uses them later. So a test either moves a thread of its own for good
//! ([`enter`], [`in_ns`]) or for a scope ([`Netns`]).

use anyhow::{Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns(2) on a namespace descriptor we hold; it affects this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves this thread into network namespace `ns` for good.
pub fn enter(ns: &str) -> Result<()> {
    let f = File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("opening netns {ns}"))?;
    setns(&f).with_context(|| format!("entering netns {ns}"))
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

/// This thread inside another network namespace until dropped.
pub struct Netns {
    home: File,
}

impl Netns {
    /// Moves this thread into namespace `ns`; dropping the guard moves it back.
    pub fn enter(ns: &str) -> Result<Netns> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's namespace")?;
        enter(ns)?;
        Ok(Netns { home })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let back = setns(&self.home);
        // A thread left in a test namespace would act on the wrong network: stop here.
        assert!(back.is_ok(), "cannot return to the original network namespace: {back:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_a_missing_namespace_names_it() {
        let err = enter("us-no-such-namespace").unwrap_err();
        assert!(format!("{err:#}").contains("us-no-such-namespace"), "{err:#}");
        let err = in_ns("us-no-such-namespace", || Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("us-no-such-namespace"), "{err:#}");
    }

    #[test]
    fn panic_text_reads_both_kinds_of_payload() {
        let owned = std::thread::spawn(|| panic!("{}", String::from("owned"))).join().unwrap_err();
        let fixed = std::thread::spawn(|| panic!("fixed")).join().unwrap_err();
        assert_eq!((panic_text(&owned), panic_text(&fixed)), ("owned".to_string(), "fixed".to_string()));
    }
}
