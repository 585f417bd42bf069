//! The replicated pair in a `scripts/testbed up ID --pair` bed, for the end-to-end tests
//! (`tests/pair.rs`) and the demo: nginx as the origin (host `origin`, 10.2.0.10:8080), the `primary`
//! binary on `server` (replication on 10.1.0.2:7700), the `backup` binary on `spare`
//! (10.1.0.3:7700), clients on `client`. Admin endpoints on 127.0.0.1:9900 in each node's namespace.
//! [`Origin::UsOrigin`] puts the test origin `us-origin` (tests/bin/origin.rs: slow, deduplicating by
//! Idempotency-Key, chunked) in place of nginx; its executions are read with [`Pair::origin_executions`].
//! Every process is ended by PID and the bed taken down on drop; the scratch directory is kept only
//! when `UNDERSTUDY_KEEP` is set (its path is printed).

use crate::harness::{Proc, Testbed, run, wait_until};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const VIP: &str = "10.0.0.100";
pub const PORT: u16 = 80;
pub const ORIGIN: &str = "10.2.0.10:8080";
pub const PRIMARY_REPL: &str = "10.1.0.2:7700";
pub const BACKUP_REPL: &str = "10.1.0.3:7700";
pub const ADMIN: &str = "127.0.0.1:9900";

/// A built binary of the workspace, next to the test executable's directory (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test executable has no directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    ensure!(path.exists(), "{} is missing: build the workspace first (cargo build --workspace)", path.display());
    Ok(path)
}

/// A scratch directory, removed on drop unless `UNDERSTUDY_KEEP` is set.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Result<Scratch> {
        let path = std::env::temp_dir().join(format!("understudy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("UNDERSTUDY_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Which origin runs in host `origin`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// nginx serving `www/` (PUT under `/up/`); its access log is [`Pair::origin_log`].
    #[default]
    Nginx,
    /// `us-origin`; every request it received is in [`Pair::origin_executions`].
    UsOrigin,
}

/// Extra flags for the nodes, and the origin.
#[derive(Debug, Clone, Default)]
pub struct PairOptions {
    /// Flags added to both nodes' command lines (e.g. `--non-idempotent-retry never`).
    pub node_flags: Vec<String>,
    pub origin: Origin,
}

/// The running pair. Field order is drop order: processes end before the bed goes down.
pub struct Pair {
    pub primary: Option<Proc>,
    pub backup: Option<Proc>,
    pub origin: Option<Proc>,
    pub tb: Testbed,
    /// Origin document root (`www/`), node logs and request logs.
    pub dir: Scratch,
    /// Pairs in one test process run one at a time: each loads the 2-core hosts these tests run on
    /// as a deployment would, and two at once would measure the machine, not the pair.
    _serial: MutexGuard<'static, ()>,
}

static SERIAL: Mutex<()> = Mutex::new(());

impl Pair {
    /// Builds bed `id`, starts nginx serving `dir/www` (the caller fills it after, or before via
    /// `prepare`), the primary, then the backup, and waits until the pair is protected.
    pub fn up(id: &str, opts: &PairOptions, prepare: impl FnOnce(&Path) -> Result<()>) -> Result<Pair> {
        // A test that failed while holding the lock poisons it; the next one may still run.
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = Scratch::new(id)?;
        let www = dir.0.join("www");
        fs::create_dir_all(&www)?;
        prepare(&www)?;
        let tb = Testbed::up_pair(id)?;
        let mut pair = Pair { primary: None, backup: None, origin: None, tb, dir, _serial: serial };
        pair.origin = Some(match opts.origin {
            Origin::Nginx => pair.start_nginx()?,
            Origin::UsOrigin => pair.start_us_origin()?,
        });
        let primary = pair.start_node("primary", "server", opts)?;
        pair.primary = Some(primary);
        pair.wait_status("server", "the primary to serve", Duration::from_secs(20), |s| s["role"] == "primary")?;
        let backup = pair.start_node("backup", "spare", opts)?;
        pair.backup = Some(backup);
        pair.wait_protected(Duration::from_secs(20))?;
        Ok(pair)
    }

    fn start_nginx(&self) -> Result<Proc> {
        let d = self.dir.0.join("nginx");
        fs::create_dir_all(&d)?;
        let dd = d.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dd}/nginx.pid;\n\
             error_log {dd}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  log_format reqs '$connection $request_method $uri $status $request_length $http_transfer_encoding';\n\
             access_log {dd}/access.log reqs;\n  client_body_temp_path {dd}/body;\n  proxy_temp_path {dd}/proxy;\n\
             fastcgi_temp_path {dd}/fastcgi;\n  uwsgi_temp_path {dd}/uwsgi;\n  scgi_temp_path {dd}/scgi;\n\
             keepalive_requests 100000;\n  keepalive_timeout 75s;\n  sendfile on;\n\
             types {{ application/octet-stream bin; text/plain txt; }}\n\
             server {{ listen {ORIGIN}; root {www}; location / {{ }}\n\
             location /up/ {{ dav_methods PUT; create_full_put_path on; client_max_body_size 0; }} }}\n}}\n",
            www = self.dir.0.join("www").display()
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let p = d.to_str().context("path")?;
        let c = conf_path.to_str().context("path")?;
        let mut proc = self.tb.spawn("nginx", "origin", &["nginx", "-p", p, "-c", c], &d.join("stdout.log"))?;
        wait_until("nginx on the origin to listen", Duration::from_secs(10), || {
            if let Some(status) = proc.try_wait()? {
                bail!("nginx exited ({status}): {}", fs::read_to_string(d.join("error.log")).unwrap_or_default());
            }
            let listening = self.tb.exec("origin", &["ss", "-Hltn", &format!("src {ORIGIN}")])?;
            Ok((!listening.trim().is_empty()).then_some(()))
        })?;
        Ok(proc)
    }

    fn start_us_origin(&self) -> Result<Proc> {
        let bin = workspace_bin("us-origin")?;
        let log = self.dir.0.join("origin.jsonl");
        let args = [bin.to_str().context("path")?, "--listen", ORIGIN, "--log", log.to_str().context("path")?];
        let mut proc = self.tb.spawn("us-origin", "origin", &args, &self.dir.0.join("origin.log"))?;
        wait_until("us-origin on the origin to listen", Duration::from_secs(10), || {
            if let Some(status) = proc.try_wait()? {
                bail!("us-origin exited ({status}): {}", proc.log_text());
            }
            let listening = self.tb.exec("origin", &["ss", "-Hltn", &format!("src {ORIGIN}")])?;
            Ok((!listening.trim().is_empty()).then_some(()))
        })?;
        Ok(proc)
    }

    fn start_node(&self, role: &str, host: &str, opts: &PairOptions) -> Result<Proc> {
        let bin = workspace_bin(role)?;
        let bin = bin.to_str().context("path")?.to_string();
        let request_log = self.dir.0.join(format!("{role}-requests.jsonl"));
        let (repl, node) = match role {
            "primary" => (PRIMARY_REPL, "alpha"),
            _ => (BACKUP_REPL, "bravo"),
        };
        let mut args: Vec<String> = vec![
            bin,
            "--vip".into(),
            format!("{VIP}/24"),
            "--iface".into(),
            "eth0".into(),
            "--port".into(),
            PORT.to_string(),
            "--repl-listen".into(),
            repl.into(),
            "--upstream".into(),
            format!("http://{ORIGIN}"),
            "--admin".into(),
            ADMIN.into(),
            "--request-log".into(),
            request_log.to_str().context("path")?.into(),
            "--node".into(),
            node.into(),
        ];
        if role == "backup" {
            args.extend(["--join".into(), PRIMARY_REPL.into()]);
        }
        args.extend(opts.node_flags.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        self.tb.spawn(role, host, &argv, &self.dir.0.join(format!("{role}.log")))
    }

    /// `GET /status` of the node on `host`.
    pub fn status(&self, host: &str) -> Result<Value> {
        let out = self.tb.exec(host, &["curl", "-sS", "--max-time", "2", &format!("http://{ADMIN}/status")])?;
        serde_json::from_str(&out).with_context(|| format!("status of {host}: {out}"))
    }

    /// `GET /metrics` of the node on `host`.
    pub fn metrics(&self, host: &str) -> Result<String> {
        self.tb.exec(host, &["curl", "-sS", "--max-time", "2", &format!("http://{ADMIN}/metrics")])
    }

    /// Waits until `/status` of `host` satisfies `ok`; fails early if a node process exited.
    pub fn wait_status(&self, host: &str, what: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status(host)
                && ok(&s)
            {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}; logs:\n{}", self.logs_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until both nodes report the pair connected.
    pub fn wait_protected(&self, timeout: Duration) -> Result<()> {
        self.wait_status("server", "the primary to see its backup connected", timeout, |s| s["peer"] == "connected")?;
        self.wait_status("spare", "the backup to be connected", timeout, |s| s["peer"] == "connected")?;
        Ok(())
    }

    /// SIGKILL to the primary process; its host stays up.
    pub fn kill_primary(&mut self) -> Result<()> {
        let p = self.primary.as_mut().context("primary not running")?;
        p.signal(libc::SIGKILL)?;
        p.wait(Duration::from_secs(10))?;
        Ok(())
    }

    /// The primary's host loses power: every interface goes down at once (the process keeps running,
    /// cut off).
    pub fn power_cut_primary(&self) -> Result<()> {
        self.tb.exec("server", &["sh", "-c", "ip link set eth0 down; ip link set eth1 down; ip link set eth2 down"])?;
        Ok(())
    }

    /// SIGKILL to the backup process.
    pub fn kill_backup(&mut self) -> Result<()> {
        let b = self.backup.as_mut().context("backup not running")?;
        b.signal(libc::SIGKILL)?;
        b.wait(Duration::from_secs(10))?;
        Ok(())
    }

    /// Waits until the backup serves as primary; returns its status.
    pub fn wait_taken_over(&self, timeout: Duration) -> Result<Value> {
        self.wait_status("spare", "the backup to take over", timeout, |s| {
            s["role"] == "primary" && s["failovers"].as_array().is_some_and(|f| !f.is_empty())
        })
    }

    /// The last lines of each node's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for role in ["primary", "backup"] {
            let text = fs::read_to_string(self.dir.0.join(format!("{role}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {role}.log (last 40 lines)\n"));
            for l in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Lines of a node's request log, parsed.
    pub fn request_log(&self, role: &str) -> Result<Vec<Value>> {
        let text = fs::read_to_string(self.dir.0.join(format!("{role}-requests.jsonl"))).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("request log line {l}"))).collect()
    }

    /// The origin's access log: `connection method uri status request_length transfer_encoding` per request
    /// (`-` for no Transfer-Encoding).
    pub fn origin_log(&self) -> Vec<String> {
        let text = fs::read_to_string(self.dir.0.join("nginx/access.log")).unwrap_or_default();
        text.lines().map(str::to_owned).collect()
    }

    /// What `us-origin` received, one JSON object per request (`method`, `target`, `key`,
    /// `outcome` = "executed" | "deduplicated", `execution`, `conn`, `bytes_in`, `ms`).
    pub fn origin_executions(&self) -> Result<Vec<Value>> {
        let text = fs::read_to_string(self.dir.0.join("origin.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("origin log line {l}"))).collect()
    }

    /// A TCP connection to `addr` opened from `host`: the socket is made on a thread that entered the
    /// host's network namespace, and stays there when used from any thread.
    pub fn connect_from(&self, host: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let ns = format!("/run/netns/us{}-{host}", self.tb.id);
        std::thread::scope(|s| {
            s.spawn(|| {
                let target = fs::File::open(&ns).with_context(|| format!("opening namespace {ns}"))?;
                // SAFETY: setns(2) with a namespace descriptor we hold; it changes this (scoped,
                // short-lived) thread only.
                if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
                }
                TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr} from {host}"))
            })
            .join()
            .unwrap_or_else(|_| bail!("the connecting thread panicked"))
        })
    }

    /// Runs a command in the client host to completion.
    pub fn client(&self, args: &[&str]) -> Result<String> {
        self.tb.exec("client", args)
    }

    /// `sha256sum` of a file (in this namespace: the scratch directory is shared).
    pub fn sha256(path: &Path) -> Result<String> {
        let out = run(std::process::Command::new("sha256sum").arg(path))?;
        Ok(out.split_whitespace().next().unwrap_or_default().to_string())
    }
}

/// The file offset of the descriptor process `pid` holds on `path` (how far it has read), if it has one.
pub fn read_offset(pid: u32, path: &Path) -> Option<u64> {
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if fs::read_link(entry.path()).ok().as_deref() == Some(path) {
            let info =
                fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy())).ok()?;
            return info.lines().find_map(|l| l.strip_prefix("pos:")).and_then(|v| v.trim().parse().ok());
        }
    }
    None
}
