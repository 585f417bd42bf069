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
///
/// Roles move between the two hosts: `primary` and `backup` are the processes in those roles now, and
/// [`Pair::primary_host`] says where the primary runs. After a takeover, [`Pair::promoted`] records the
/// swap and [`Pair::start_spare`] restarts the dead side as a spare joining the survivor.
pub struct Pair {
    pub primary: Option<Proc>,
    pub backup: Option<Proc>,
    pub origin: Option<Proc>,
    pub tb: Testbed,
    /// `"server"` or `"spare"`: the host whose node serves as primary.
    pub primary_host: &'static str,
    opts: PairOptions,
    /// Stems of every node log file written so far (`primary`, `backup`, `spare2-server`, ...), in order.
    node_logs: Vec<String>,
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
        let mut pair = Pair {
            primary: None,
            backup: None,
            origin: None,
            tb,
            primary_host: "server",
            opts: opts.clone(),
            node_logs: Vec::new(),
            dir,
            _serial: serial,
        };
        pair.origin = Some(match opts.origin {
            Origin::Nginx => pair.start_nginx()?,
            Origin::UsOrigin => pair.start_us_origin()?,
        });
        let primary = pair.start_node("primary", "server", None, "primary")?;
        pair.primary = Some(primary);
        pair.wait_status("server", "the primary to serve", Duration::from_secs(20), |s| s["role"] == "primary")?;
        let backup = pair.start_node("backup", "spare", Some(PRIMARY_REPL), "backup")?;
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
             error_log {dd}/error.log warn;\nworker_rlimit_nofile 65536;\nevents {{ worker_connections 16384; }}\n\
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

    /// Starts `role` on `host` (joining `join` when given); its log is `<stem>.log`, its request log
    /// `<stem>-requests.jsonl`. Each host keeps its node name and replication address across restarts.
    fn start_node(&mut self, role: &str, host: &str, join: Option<&str>, stem: &str) -> Result<Proc> {
        let bin = workspace_bin(role)?;
        let bin = bin.to_str().context("path")?.to_string();
        let request_log = self.dir.0.join(format!("{stem}-requests.jsonl"));
        let (repl, node) = host_node(host)?;
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
        if let Some(join) = join {
            args.extend(["--join".into(), join.into()]);
        }
        // Both nodes read the same key file, as the README sets up a pair; restarted nodes read it again.
        let psk = crate::psk::key_file(&self.dir.0)?;
        args.extend(["--psk-file".into(), psk.to_str().context("path")?.into()]);
        args.extend(self.opts.node_flags.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        self.node_logs.push(stem.to_string());
        self.tb.spawn(role, host, &argv, &self.dir.0.join(format!("{stem}.log")))
    }

    /// Starts the pair over when no node can be brought back to a protected pair by a restart (both stepped
    /// down, say): ends both nodes, starts a primary on `server` and a backup joining it on `spare`, and waits
    /// until it is protected. The clients' connections are not carried over.
    pub fn restart_fresh(&mut self, timeout: Duration) -> Result<()> {
        drop(self.backup.take());
        drop(self.primary.take());
        self.primary_host = "server";
        let stem = format!("primary{}-server", self.node_logs.len());
        let primary = self.start_node("primary", "server", None, &stem)?;
        self.primary = Some(primary);
        self.wait_status("server", "the fresh primary to serve", timeout, |s| s["role"] == "primary")?;
        let stem = format!("backup{}-spare", self.node_logs.len());
        let backup = self.start_node("backup", "spare", Some(PRIMARY_REPL), &stem)?;
        self.backup = Some(backup);
        self.wait_protected(timeout)
    }

    /// The host of the backup (or of the dead primary's replacement): the one that is not primary.
    pub fn backup_host(&self) -> &'static str {
        other_host(self.primary_host)
    }

    /// Records a takeover: the backup's process is the primary now, on the other host; the dead
    /// primary's process, if any is left, is killed.
    pub fn promoted(&mut self) -> Result<()> {
        // Dropping a `Proc` kills (by PID) and reaps it unless that was done already.
        drop(self.primary.take());
        self.primary = Some(self.backup.take().context("no backup to promote")?);
        self.primary_host = other_host(self.primary_host);
        Ok(())
    }

    /// Starts a spare (the `backup` binary) on the host that is not primary, joining the primary.
    /// Returns once it runs; [`Pair::wait_protected`] waits for it to catch up.
    pub fn start_spare(&mut self) -> Result<()> {
        ensure!(self.backup.is_none(), "a backup is already running");
        let host = self.backup_host();
        let (join, _) = host_node(self.primary_host)?;
        let stem = format!("spare{}-{host}", self.node_logs.len());
        let proc = self.start_node("backup", host, Some(join), &stem)?;
        self.backup = Some(proc);
        Ok(())
    }

    /// A planned switchover through the command line (`primary switchover --admin …` on the primary's
    /// host): the node's JSON answer. On success the backup serves as primary and the old primary's
    /// process (same PID) restarts as the spare joining it; the roles here are swapped to match.
    pub fn switchover(&mut self) -> Result<Value> {
        let bin = workspace_bin("primary")?;
        let bin = bin.to_str().context("path")?;
        let out = self.tb.exec(self.primary_host, &[bin, "switchover", "--admin", ADMIN])?;
        let answer: Value = serde_json::from_str(&out).with_context(|| format!("switchover answer: {out}"))?;
        ensure!(answer.get("error").is_none(), "switchover failed: {answer}\n{}", self.logs_tail());
        std::mem::swap(&mut self.primary, &mut self.backup);
        self.primary_host = other_host(self.primary_host);
        Ok(answer)
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
        self.wait_status(self.primary_host, "the primary to see its backup connected", timeout, |s| {
            s["role"] == "primary" && s["peer"] == "connected"
        })?;
        self.wait_status(self.backup_host(), "the backup to be connected", timeout, |s| {
            s["role"] == "backup" && s["peer"] == "connected"
        })?;
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
        let host = self.primary_host;
        self.tb.exec(host, &["sh", "-c", "ip link set eth0 down; ip link set eth1 down; ip link set eth2 down"])?;
        Ok(())
    }

    /// SIGKILL to the backup process; a spare may be started after.
    pub fn kill_backup(&mut self) -> Result<()> {
        let mut b = self.backup.take().context("backup not running")?;
        b.signal(libc::SIGKILL)?;
        b.wait(Duration::from_secs(10))?;
        Ok(())
    }

    /// Waits until the backup serves as primary; returns its status.
    pub fn wait_taken_over(&self, timeout: Duration) -> Result<Value> {
        self.wait_status(self.backup_host(), "the backup to take over", timeout, |s| {
            s["role"] == "primary" && s["failovers"].as_array().is_some_and(|f| !f.is_empty())
        })
    }

    /// The last lines of each node's log, for failure messages.
    /// Stems of every node's log and request log so far, oldest first.
    pub fn node_log_stems(&self) -> &[String] {
        &self.node_logs
    }

    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for stem in &self.node_logs {
            let text = fs::read_to_string(self.dir.0.join(format!("{stem}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {stem}.log (last 40 lines)\n"));
            for l in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Lines of a node's request log, parsed: `stem` is `primary` or `backup` for the first two nodes,
    /// as in [`Pair::node_log_stems`] for spares started later.
    pub fn request_log(&self, stem: &str) -> Result<Vec<Value>> {
        let text = fs::read_to_string(self.dir.0.join(format!("{stem}-requests.jsonl"))).unwrap_or_default();
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

    /// A GET of `path` through the VIP from the client host, on a new connection: the HTTP status code
    /// curl reports (`000` when no response came within 5 s).
    pub fn get_status(&self, path: &str) -> Result<String> {
        let url = format!("http://{VIP}{path}");
        let out = self.client(&["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", &url])?;
        Ok(out.trim().to_string())
    }

    /// `sha256sum` of a file (in this namespace: the scratch directory is shared).
    pub fn sha256(path: &Path) -> Result<String> {
        let out = run(std::process::Command::new("sha256sum").arg(path))?;
        Ok(out.split_whitespace().next().unwrap_or_default().to_string())
    }
}

/// A host's replication address and node name, the same across restarts.
fn host_node(host: &str) -> Result<(&'static str, &'static str)> {
    match host {
        "server" => Ok((PRIMARY_REPL, "alpha")),
        "spare" => Ok((BACKUP_REPL, "bravo")),
        other => bail!("no node runs on host {other}"),
    }
}

fn other_host(host: &str) -> &'static str {
    if host == "server" { "spare" } else { "server" }
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
