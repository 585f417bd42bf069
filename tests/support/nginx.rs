//! nginx as a real origin for tests: one process (`master_process off`, `daemon off`), its config,
//! logs and temp paths in a directory of its own, serving static files from a root. [`Nginx`] runs it
//! on a loopback port; [`write_config`] alone serves tests that start it elsewhere (in a test bed
//! host). Needs `nginx` (`apt-get install -y nginx`).

use crate::harness::{free_port, wait_until};
use crate::tempdir::TempDir;
use anyhow::{Context, Result, bail};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What differs between the tests' nginx configs.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    pub worker_connections: u32,
    /// The access log's `log_format` (what a test reads back); `None` for nginx's `combined`.
    pub log_format: Option<&'static str>,
    /// More directives for the `http` block (`keepalive_requests 100000;` for example).
    pub http: &'static str,
}

impl Default for NginxOptions {
    fn default() -> NginxOptions {
        NginxOptions { worker_connections: 512, log_format: None, http: "" }
    }
}

/// Writes `dir/nginx.conf` for one server on `listen` serving `root`, with the error log, access log,
/// pid file and temp paths in `dir`; returns the command line that runs it in the foreground.
pub fn write_config(dir: &Path, listen: &str, root: &Path, opts: &NginxOptions) -> Result<Vec<String>> {
    let d = dir.display();
    let access_log = match opts.log_format {
        Some(format) => format!("log_format test '{format}';\n  access_log {d}/access.log test;"),
        None => format!("access_log {d}/access.log;"),
    };
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections {workers}; }}\n\
         http {{\n  {access_log}\n\
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  {http}\n\
         types {{ text/plain txt; application/octet-stream bin; }}\n\
         server {{ listen {listen}; root {root}; location / {{ }} }}\n}}\n",
        workers = opts.worker_connections,
        http = opts.http,
        root = root.display()
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
    let path = |p: &Path| p.to_str().map(str::to_owned).context("nginx paths must be UTF-8");
    Ok(vec![
        "nginx".into(),
        "-p".into(),
        format!("{}/", path(dir)?),
        "-c".into(),
        path(&conf_path)?,
        "-e".into(),
        path(&dir.join("error.log"))?,
    ])
}

/// nginx serving a root on a loopback port; killed by PID on drop.
pub struct Nginx {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx on a free loopback port and waits until it accepts connections; tries another
    /// port when one was taken in the meantime.
    pub fn start(root: &Path, opts: &NginxOptions) -> Result<Nginx> {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = TempDir::new("nginx")?;
            let port = free_port();
            let argv = write_config(dir.path(), &format!("127.0.0.1:{port}"), root, opts)?;
            let child = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting nginx (apt-get install -y nginx)")?;
            let mut nginx = Nginx { child, port, dir };
            let up = wait_until("nginx to listen", Duration::from_secs(10), || {
                if let Ok(Some(_)) = nginx.child.try_wait() {
                    return Ok(Some(false));
                }
                Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(|_| true))
            })?;
            if up {
                return Ok(nginx);
            }
            last = fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
        }
        bail!("nginx did not start: {last}")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The access log's lines so far, in the [`NginxOptions::log_format`] it was started with.
    pub fn access_log(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_log_format_and_keeps_every_path_in_its_directory() -> Result<()> {
        let dir = TempDir::new("nginx-conf")?;
        let opts =
            NginxOptions { log_format: Some("$request|$status"), http: "keepalive_requests 9;", ..Default::default() };
        let argv = write_config(dir.path(), "127.0.0.1:8", Path::new("/srv/www"), &opts)?;
        let conf = fs::read_to_string(dir.join("nginx.conf"))?;
        let d = dir.path().display().to_string();
        assert!(conf.contains("log_format test '$request|$status';"), "{conf}");
        assert!(conf.contains(&format!("access_log {d}/access.log test;")), "{conf}");
        assert!(conf.contains("keepalive_requests 9;") && conf.contains("worker_connections 512;"), "{conf}");
        assert!(conf.contains("listen 127.0.0.1:8; root /srv/www;"), "{conf}");
        assert_eq!(argv[0], "nginx");
        assert_eq!(argv[4], format!("{d}/nginx.conf"));
        Ok(())
    }

    #[test]
    fn nginx_serves_its_root_on_loopback_and_logs_in_the_format_given() -> Result<()> {
        let root = TempDir::new("nginx-root")?;
        fs::write(root.join("a.txt"), b"hello")?;
        let opts = NginxOptions { log_format: Some("$request|$status"), ..Default::default() };
        let nginx = Nginx::start(root.path(), &opts)?;
        let mut s = TcpStream::connect(nginx.addr())?;
        std::io::Write::write_all(&mut s, b"GET /a.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
        let mut got = String::new();
        std::io::Read::read_to_string(&mut s, &mut got)?;
        assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("hello"), "{got}");
        let log = wait_until("nginx to log the request", Duration::from_secs(5), || {
            let log = nginx.access_log();
            Ok((!log.is_empty()).then_some(log))
        })?;
        assert_eq!(log, ["GET /a.txt HTTP/1.1|200"]);
        Ok(())
    }
}
