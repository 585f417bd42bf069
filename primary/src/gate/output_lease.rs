//! The kernel's copy of this node's right to send from the VIP: a dead man's switch for output.
//!
//! A primary's process can stop without dying (SIGSTOP, a stalled VM, a wedged runtime) while its
//! kernel goes on: retransmission timers fire and queued bytes leave from VIP:port, even after the
//! backup has taken the connections over. Only the kernel can stop that, so it holds a lease: an
//! nftables set with one element, the VIP, that expires on its own, and a rule dropping everything sent
//! from VIP:port while the element is missing. A thread of this process renews the element every quarter
//! of `ttl`, but only up to the time the replication sender last said it may send
//! ([`OutputLease::grant_until`]). A frozen process renews nothing, so within `ttl` (the detection
//! time, which the backup waits out before it even fences) its kernel sends nothing more; after
//! `SIGCONT` the grant is stale until the sender has looked at its link again, and a sender that
//! learns it was replaced steps down without ever granting again.
//!
//! The table is `inet understudy_<instance>`, its chain hooks `postrouting`, after the gate's `mangle
//! OUTPUT` queues: the lease is checked as a segment leaves, so one the gate held while the lease lapsed
//! (a FIN queued just before a freeze, accepted by the resumed process) is dropped, not sent. A run that
//! died leaves the table behind with the element expired: that host then sends nothing from VIP:port
//! until the next start of the same node replaces the table, the fail-closed state a dead primary
//! should be in. `nft -i` reads the renewals from a pipe, so a renewal costs a write, not a process.

use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

use super::rules::in_netns;
use shared::link::PeerLiveness;

/// The first grant, before the sender runs: covers a takeover's restore of thousands of connections.
pub const STARTUP_GRANT: Duration = Duration::from_secs(2);

/// Why the lease could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum OutputLeaseError {
    #[error("cannot run `nft` (install nftables): {0}")]
    Spawn(#[source] io::Error),
    #[error("`nft -f -` failed to install the output lease ({status}): {stderr}")]
    Install { status: std::process::ExitStatus, stderr: String },
    #[error("cannot open this thread's network namespace: {0}")]
    Netns(#[source] io::Error),
}

struct Shared {
    base: Instant,
    /// Microseconds after `base` until which renewals may run.
    grant_us: AtomicU64,
    stop: AtomicBool,
    /// `nft -i`'s input: renewals and revocations are written under this lock, so a revocation is
    /// never followed by a renewal decided before it.
    nft: std::sync::Mutex<Option<ChildStdin>>,
    table: String,
    vip: Ipv4Addr,
    /// While set, the grant also runs to `after` past the send time of the backup's latest heartbeat
    /// echo, read by the renewing thread itself: a replication sender kept busy for a moment does not let
    /// the lease lapse while the backup still hears this node.
    follow: std::sync::Mutex<Option<(PeerLiveness, Duration)>>,
}

/// The installed lease; renewals run until it is removed ([`OutputLease::remove`] or drop).
pub struct OutputLease {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    child: Option<Child>,
    table: String,
    ttl: Duration,
    netns: File,
}

impl std::fmt::Debug for OutputLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputLease").field("table", &self.table).finish()
    }
}

/// The nftables table name for `instance` (`[A-Za-z0-9._-]`, checked by the gate's tag): nft names
/// take letters, digits and `_`.
pub fn table_name(instance: &str) -> String {
    let safe: String = instance.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("understudy_{safe}")
}

/// The script that (re)creates the table with the element valid for `grant`.
pub fn install_script(table: &str, vip: Ipv4Addr, port: u16, ttl: Duration, grant: Duration) -> String {
    // An element's expiry may not exceed its timeout.
    let grant = grant.as_millis().max(ttl.as_millis()).max(1);
    format!(
        "table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tset lease {{ type ipv4_addr; flags timeout; }}\n\
         \tchain out {{\n\
         \t\ttype filter hook postrouting priority 300; policy accept;\n\
         \t\tip saddr {vip} tcp sport {port} ip saddr != @lease drop\n\
         \t}}\n\
         }}\n\
         add element inet {table} lease {{ {vip} timeout {grant}ms expires {grant}ms }}\n"
    )
}

/// One renewal: the element valid for `ms` more milliseconds.
pub fn renewal(table: &str, vip: Ipv4Addr, ttl: Duration, ms: u128) -> String {
    format!("add element inet {table} lease {{ {vip} timeout {}ms expires {}ms }}\n", ttl.as_millis().max(1), ms.max(1))
}

impl OutputLease {
    /// Installs the lease for `vip:port` in this thread's network namespace (replacing a table a dead run
    /// of `instance` left) with the element valid for [`STARTUP_GRANT`], and starts renewing.
    pub fn install(vip: Ipv4Addr, port: u16, instance: &str, ttl: Duration) -> Result<OutputLease, OutputLeaseError> {
        let netns = File::open("/proc/thread-self/ns/net").map_err(OutputLeaseError::Netns)?;
        let table = table_name(instance);
        let mut nft = Command::new("nft");
        nft.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = nft.spawn().map_err(OutputLeaseError::Spawn)?;
        let script = install_script(&table, vip, port, ttl, STARTUP_GRANT);
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(OutputLeaseError::Spawn)?;
        }
        let out = child.wait_with_output().map_err(OutputLeaseError::Spawn)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(OutputLeaseError::Install { status: out.status, stderr });
        }
        let mut renewer = Command::new("nft");
        renewer.arg("-i").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = renewer.spawn().map_err(OutputLeaseError::Spawn)?;
        let stdin = child.stdin.take().ok_or_else(|| OutputLeaseError::Spawn(io::Error::other("no stdin")))?;
        let shared = Arc::new(Shared {
            base: Instant::now(),
            grant_us: AtomicU64::new(STARTUP_GRANT.as_micros() as u64),
            stop: AtomicBool::new(false),
            nft: std::sync::Mutex::new(Some(stdin)),
            table: table.clone(),
            vip,
            follow: std::sync::Mutex::new(None),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("output-lease".into())
                .spawn(move || renew_loop(&shared, ttl))
                .map_err(OutputLeaseError::Spawn)?
        };
        info!(%vip, port, table, ?ttl, "output lease installed: the kernel drops VIP output unless renewed");
        Ok(OutputLease { shared, thread: Some(thread), child: Some(child), table, ttl, netns })
    }

    /// Lets renewals run until `until`; each grant replaces the one before (a grant of now revokes).
    pub fn grant_until(&self, until: Instant) {
        let us = until.saturating_duration_since(self.shared.base).as_micros() as u64;
        self.shared.grant_us.store(us, Ordering::Relaxed);
    }

    /// Grants until `until` and writes the renewal at once instead of at the renewing thread's next turn:
    /// a takeover whose lease was installed (and revoked) long before sends right after this.
    pub fn grant_now(&self, until: Instant) -> io::Result<()> {
        let mut nft = self.shared.nft.lock().unwrap_or_else(|e| e.into_inner());
        self.grant_until(until);
        let left = until.saturating_duration_since(Instant::now()).min(self.ttl);
        let stdin = nft.as_mut().ok_or_else(|| io::Error::other("the lease's nft process is gone"))?;
        stdin.write_all(renewal(&self.shared.table, self.shared.vip, self.ttl, left.as_millis()).as_bytes())?;
        stdin.flush()
    }

    /// Lets the grant also follow the backup's heartbeat echoes on `liveness`, to `after` past each echoed
    /// heartbeat's send time (`None` stops that). Safe for the reason the lease is: the backup heard this
    /// node no earlier than that send time, so it declares it dead no earlier than the detection time
    /// after it; `after` must be below that.
    pub fn follow_echoes(&self, follow: Option<(PeerLiveness, Duration)>) {
        *self.shared.follow.lock().unwrap_or_else(|e| e.into_inner()) = follow;
    }

    /// Ends the grant now: the element is deleted (not left to expire), and no renewal follows until a
    /// later [`grant_until`](Self::grant_until). A planned switchover's old primary calls it before it
    /// hands over, so its kernel sends nothing more from the VIP.
    pub fn revoke_now(&self) -> io::Result<()> {
        let mut nft = self.shared.nft.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.grant_us.store(0, Ordering::Relaxed);
        self.follow_echoes(None);
        let stdin = nft.as_mut().ok_or_else(|| io::Error::other("the lease's nft process is gone"))?;
        let (table, vip) = (&self.shared.table, self.shared.vip);
        stdin.write_all(format!("delete element inet {table} lease {{ {vip} }}\n").as_bytes())?;
        stdin.flush()?;
        info!(table, "output lease revoked: the kernel drops VIP output from now on");
        Ok(())
    }

    /// Stops renewing and deletes the table (VIP output flows freely again). Every step is tried.
    pub fn remove(mut self) -> io::Result<()> {
        self.stop_renewing();
        let mut cmd = Command::new("nft");
        cmd.args(["delete", "table", "inet", &self.table]).stdin(Stdio::null());
        in_netns(&mut cmd, &self.netns);
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "nft delete table inet {}: {}",
                self.table,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        info!(table = self.table, "output lease removed");
        Ok(())
    }

    fn stop_renewing(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OutputLease {
    /// Without [`OutputLease::remove`], renewals stop and the table stays: the element expires and the
    /// kernel drops VIP output (a node that steps down wants exactly that).
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

fn renew_loop(shared: &Shared, ttl: Duration) {
    let period = (ttl / 4).max(Duration::from_millis(1));
    let (table, vip) = (&shared.table, shared.vip);
    let mut lapsed = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut nft = shared.nft.lock().unwrap_or_else(|e| e.into_inner());
        let now = shared.base.elapsed().as_micros() as u64;
        let mut grant = shared.grant_us.load(Ordering::Relaxed);
        if let Some((liveness, after)) = &*shared.follow.lock().unwrap_or_else(|e| e.into_inner())
            && let Some(echoed) = liveness.last_echoed()
        {
            let until = (echoed + *after).saturating_duration_since(shared.base).as_micros() as u64;
            grant = grant.max(until);
        }
        if grant > now {
            // Never past the grant: a process frozen right after this write stops sending by then.
            let left = Duration::from_micros(grant - now).min(ttl);
            let written = match nft.as_mut() {
                Some(stdin) => stdin.write_all(renewal(table, vip, ttl, left.as_millis()).as_bytes()),
                None => Err(io::Error::other("the lease's nft process is gone")),
            };
            if let Err(e) = written {
                error!(error = %e, table, "renewing the output lease failed: the kernel will drop VIP output");
                nft.take();
                return;
            }
            if lapsed {
                info!(table, "output lease renewed again");
                lapsed = false;
            }
        } else if !lapsed && grant != 0 {
            // (A grant of 0 is a revocation, logged as such: a backup keeps its lease revoked until it
            // takes over.)
            warn!(
                table,
                "output lease not renewed: the sender has not granted it (suspected backup, stepped down, \
                 handing over, or stalled)"
            );
            lapsed = true;
        }
        drop(nft);
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_scripts() {
        assert_eq!(table_name("node-a.1"), "understudy_node_a_1");
        let s =
            install_script("understudy_a", Ipv4Addr::new(10, 0, 0, 100), 80, Duration::from_millis(100), STARTUP_GRANT);
        assert!(s.starts_with("table inet understudy_a\ndelete table inet understudy_a\n"), "{s}");
        assert!(s.contains("hook postrouting priority 300"), "{s}");
        assert!(s.contains("ip saddr 10.0.0.100 tcp sport 80 ip saddr != @lease drop"), "{s}");
        assert!(s.ends_with("lease { 10.0.0.100 timeout 2000ms expires 2000ms }\n"), "{s}");
        assert_eq!(
            renewal("understudy_a", Ipv4Addr::new(10, 0, 0, 100), Duration::from_millis(100), 0),
            "add element inet understudy_a lease { 10.0.0.100 timeout 100ms expires 1ms }\n"
        );
    }
}
