//! Plumbing for the kernel and end-to-end tests: the `scripts/testbed` bed, processes
//! started in its hosts (ended by PID on every exit path), packet captures, commands,
//! bounded waits, unique names, and taking a socket out of another process (`pidfd_getfd`).

use anyhow::{Context, Result, bail, ensure};
use std::fs::{self, File};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (the root package's manifest directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `probe` every few milliseconds until it yields a value; fails with `what`
/// once `timeout` has passed.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = poll(what, timeout, deadline, &mut probe)? {
            return Ok(v);
        }
        std::thread::sleep(POLL);
    }
}

/// [`wait_until`] for async tests: sleeps on the Tokio timer, so tasks of the same runtime (a
/// responder, a server) run while it waits.
pub async fn wait_until_async<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = poll(what, timeout, deadline, &mut probe)? {
            return Ok(v);
        }
        tokio::time::sleep(POLL).await;
    }
}

const POLL: Duration = Duration::from_millis(3);

/// One look of a bounded wait: the value, none yet, or the timeout.
fn poll<T>(
    what: &str,
    timeout: Duration,
    deadline: Instant,
    probe: &mut impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let v = probe()?;
    if v.is_none() && Instant::now() >= deadline {
        bail!("timed out after {timeout:?} waiting for {what}");
    }
    Ok(v)
}

/// Whether this process runs as root (namespaces, raw sockets, iptables and NFQUEUE need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `n` in base 36 (short unique suffixes for namespace and test bed names).
pub fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

/// A test bed ID unique to this process: `prefix` (which test file), `tag` (which test), and the
/// PID in base 36; at most 7 characters.
pub fn testbed_id(prefix: char, tag: char) -> String {
    format!("{prefix}{tag}{}", base36(std::process::id()))
}

/// A test bed ID unique to this process: `t`, `tag`, and the PID in base 36.
pub fn unique_id(tag: char) -> String {
    testbed_id('t', tag)
}

/// A loopback port that nothing listened on a moment ago (the OS's choice of an ephemeral port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind an ephemeral port").port()
}

/// Runs a command to completion, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("starting {cmd:?}"))
}

/// Parses a hardware address as `ip` prints it (`02:00:0a:00:00:01`).
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    ensure!(parts.len() == 6, "not a MAC: {s}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC: {s}"))?;
    }
    Ok(mac)
}

/// Runs a command to completion; fails with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A test bed made by `scripts/testbed up ID`; `Drop` takes it down.
pub struct Testbed {
    pub id: String,
    script: PathBuf,
}

impl Testbed {
    /// Builds test bed `id` ([a-z0-9], at most 8 characters).
    pub fn up(id: &str) -> Result<Testbed> {
        let script = workspace_root().join("scripts/testbed");
        ensure!(script.exists(), "{} is missing", script.display());
        run(Command::new(&script).args(["up", id]))?;
        Ok(Testbed { id: id.to_string(), script })
    }

    /// Builds test bed `id` with the replicated pair's networks (`up ID --pair`): replication link
    /// 10.1.0.0/24 and origin network 10.2.0.0/24 with host `origin` at 10.2.0.10.
    pub fn up_pair(id: &str) -> Result<Testbed> {
        let script = workspace_root().join("scripts/testbed");
        ensure!(script.exists(), "{} is missing", script.display());
        let tb = Testbed { id: id.to_string(), script };
        // Constructed first so that a failed `up` still runs `down` (it is idempotent).
        run(Command::new(&tb.script).args(["up", id, "--pair"]))?;
        Ok(tb)
    }

    /// `scripts/testbed exec ID HOST ARGS...` as a command (it execs: the child's PID is the program's).
    pub fn command(&self, host: &str, args: &[&str]) -> Command {
        let mut c = Command::new(&self.script);
        c.args(["exec", &self.id, host]).args(args);
        c
    }

    /// Runs `args` in `host` to completion.
    pub fn exec(&self, host: &str, args: &[&str]) -> Result<String> {
        run(&mut self.command(host, args))
    }

    /// The network namespace of `host` (`/run/netns/<name>`), for threads that enter it.
    pub fn ns(&self, host: &str) -> String {
        format!("us{}-{host}", self.id)
    }

    /// The hardware address of `iface` in `host`, as `ip` reports it.
    pub fn hw_addr(&self, host: &str, iface: &str) -> Result<[u8; 6]> {
        let out = self.exec(host, &["ip", "-j", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        parse_mac(v[0]["address"].as_str().context("no address in `ip link` output")?)
    }

    /// Moves the VIP to `host` (with gratuitous ARP).
    pub fn vip(&self, host: &str) -> Result<()> {
        run(Command::new(&self.script).args(["vip", &self.id, host])).map(drop)
    }

    /// Starts `args` in `host`, stdout and stderr to `log`.
    pub fn spawn(&self, name: &str, host: &str, args: &[&str], log: &Path) -> Result<Proc> {
        self.spawn_command(name, self.command(host, args), log)
    }

    /// Starts `cmd` (made by [`Testbed::command`], then given an environment for example), stdout
    /// and stderr to `log`.
    pub fn spawn_command(&self, name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        match Command::new(&self.script).args(["down", &self.id]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("testbed down {} failed: {}", self.id, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("testbed down {} failed: {e}", self.id),
        }
    }
}

/// A process started by a test; `Drop` kills it (by PID) and reaps it.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// Waits (bounded) for the process to exit; a timeout reports its log.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.name.clone();
        let status = wait_until(&format!("{name} to exit"), timeout, || self.try_wait())
            .with_context(|| format!("log of {name}:\n{}", self.log_text()))?;
        self.child = None;
        Ok(status)
    }

    /// Waits until the log contains `needle`; fails early (with the log) if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let name = self.name.clone();
        wait_until(&format!("{name} to log {needle:?}"), timeout, || {
            if let Some(status) = self.try_wait()? {
                bail!("{name} exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            Ok(self.log_text().contains(needle).then_some(()))
        })
        .with_context(|| format!("log of {name}:\n{}", self.log_text()))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.pid() as libc::pid_t;
        ensure!(pid > 0, "{} is not running", self.name);
        // SAFETY: plain kill(2) on our own child's PID.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("signalling {}", self.name));
        }
        Ok(())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What tcpdump reported when it stopped.
#[derive(Debug, Clone, Default)]
pub struct CaptureStats {
    /// Packets written to the file.
    pub captured: u64,
    /// Packets the kernel handed to the capture socket.
    pub received: u64,
    pub dropped_by_kernel: u64,
}

/// A tcpdump writing a pcap file in a test bed host.
pub struct Capture {
    proc: Proc,
    pub path: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `iface` of `host` (unbuffered, `snaplen` 0 = whole packets)
    /// and waits until it is listening.
    pub fn start(tb: &Testbed, host: &str, iface: &str, filter: &str, snaplen: u32, path: &Path) -> Result<Capture> {
        let log = path.with_extension("tcpdump.log");
        let snap = snaplen.to_string();
        let file = path.to_str().context("capture path is not UTF-8")?;
        // Immediate mode: a packet is written as it arrives. Without it, packets wait in a
        // ring block, and the ones still there when SIGINT arrives are never written.
        let args = [
            "tcpdump",
            "-i",
            iface,
            "-n",
            "--immediate-mode",
            "-U",
            "-Z",
            "root",
            "-B",
            "32768",
            "-s",
            &snap,
            "-w",
            file,
            filter,
        ];
        let mut proc = tb.spawn(&format!("tcpdump {host}/{iface}"), host, &args, &log)?;
        wait_until(&format!("tcpdump on {host}/{iface} to listen"), Duration::from_secs(10), || {
            if let Some(status) = proc.try_wait()? {
                bail!("tcpdump on {host}/{iface} exited ({status}): {}", proc.log_text());
            }
            Ok(proc.log_text().contains("listening on").then_some(()))
        })?;
        Ok(Capture { proc, path: path.to_path_buf() })
    }

    /// Stops tcpdump with SIGINT (it flushes and closes the file) and reads its counts.
    pub fn stop(mut self) -> Result<CaptureStats> {
        self.proc.signal(libc::SIGINT)?;
        let status = self.proc.wait(Duration::from_secs(10))?;
        let log = self.proc.log_text();
        ensure!(status.success(), "{} exited with {status}: {log}", self.proc.name);
        let count = |what: &str| -> u64 {
            log.lines().find(|l| l.ends_with(what)).and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0)
        };
        Ok(CaptureStats {
            captured: count("packets captured"),
            received: count("received by filter"),
            dropped_by_kernel: count("dropped by kernel"),
        })
    }
}

/// Counts the packets of a capture that match a tcpdump filter (`tcpdump -r`).
pub fn count_matching(path: &Path, filter: &str) -> Result<(usize, String)> {
    let out = run(Command::new("tcpdump").args(["-nn", "-r"]).arg(path).arg(filter))?;
    Ok((out.lines().count(), out))
}

/// The packets of capture `path` matching `filter` stamped after `since` (seconds since the Unix epoch,
/// as `tcpdump -tt` prints them), one tcpdump line each.
pub fn packets_after(path: &Path, filter: &str, since: f64) -> Result<Vec<String>> {
    let out = run(Command::new("tcpdump").args(["-nn", "-tt", "-r"]).arg(path).arg(filter))?;
    Ok(out
        .lines()
        .filter(|l| l.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()).is_some_and(|t| t > since))
        .map(str::to_owned)
        .collect())
}

/// Duplicates descriptor `fd` of process `pid` into this process (`pidfd_getfd`,
/// needs ptrace rights over `pid`: root).
pub fn take_fd(pid: u32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: raw syscalls with integer arguments; results are checked before use.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pidfd_open({pid})"));
    }
    // SAFETY: pidfd_open returned a fresh descriptor that we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pidfd_getfd({pid}, {fd})"));
    }
    // SAFETY: pidfd_getfd returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_is_a_valid_testbed_id() {
        let id = unique_id('d');
        assert!(id.starts_with("td") && id.len() <= 8, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{id}");
    }

    #[test]
    fn base36_and_mac_parsing() {
        assert_eq!(
            (base36(0), base36(35), base36(36), base36(u32::MAX)),
            ("0".into(), "z".into(), "10".into(), "1z141z3".into())
        );
        assert_eq!(parse_mac("02:00:0a:00:00:ff").unwrap(), [2, 0, 10, 0, 0, 255]);
        for bad in ["02:00:0a:00:00", "02:00:0a:00:00:ff:01", "02:00:0a:00:00:zz", ""] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn wait_until_async_lets_the_runtime_run_meanwhile() {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(7).ok() });
        let got = wait_until_async("the task's value", Duration::from_secs(5), || Ok(rx.try_recv().ok())).await;
        assert_eq!(got.unwrap(), 7);
    }

    #[test]
    fn wait_until_reports_what_it_waited_for() {
        let err = wait_until::<()>("the impossible", Duration::from_millis(20), || Ok(None)).unwrap_err();
        assert!(err.to_string().contains("the impossible"), "{err}");
        assert_eq!(wait_until("three", Duration::from_secs(1), || Ok(Some(3))).unwrap(), 3);
    }
}
