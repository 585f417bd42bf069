//! Running the `ip` and `arptables` commands: blocking, short, in the calling thread's
//! network namespace (a child inherits the namespace of the thread that forks it), or in
//! a namespace held open by a descriptor.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};

/// A finished command.
pub(crate) struct Ran {
    /// The command line, for error messages.
    pub line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// The calling thread's network namespace, held open.
pub(crate) fn this_netns() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Runs `program args..` to completion, in `netns` if given. `Err` only when it could not
/// be started.
pub(crate) fn run(program: &str, args: &[String], netns: Option<&File>) -> Result<Ran, (String, io::Error)> {
    let line = std::iter::once(program).chain(args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ");
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        // SAFETY: setns(2) is a plain system call, safe between fork and exec; `fd` stays
        // open in the child until exec (it is CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    match cmd.output() {
        Ok(out) => Ok(Ran {
            line,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
        Err(e) => Err((line, e)),
    }
}
