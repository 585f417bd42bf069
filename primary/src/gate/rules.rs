//! The iptables rules that divert VIP:port traffic into the gate's NFQUEUE, installed at start, removed
//! on exit, and found again by their comment tag after a crash.
//!
//! Where the rules sit (iptables-extensions(8) NFQUEUE, comment; the netfilter hook order):
//! * Inbound: `mangle PREROUTING`. PREROUTING runs for every segment that arrives on any interface,
//!   loopback included (a local client's segment leaves through OUTPUT and comes back in through
//!   PREROUTING), before routing and long before TCP sees it. Conntrack (priority -200) has looked at it;
//!   nothing that answers or ACKs has. INPUT would also precede TCP but runs after the routing decision,
//!   so segments the host would forward or reject never show up; PREROUTING sees all of them.
//! * Outbound control: `mangle OUTPUT` for segments from VIP:port carrying SYN+ACK, FIN or RST. OUTPUT
//!   is where locally generated segments enter netfilter (SYN-ACKs from the listener, FINs and RSTs from
//!   sockets, and RSTs the kernel sends for segments that match no socket), before they are routed out.
//!   Plain data segments and pure ACKs of a live socket match none of the rules and are not diverted.
//! * Orphans: `mangle OUTPUT` for segments from VIP:port whose socket has no open file
//!   (`-m owner ! --socket-exists`), to a queue of their own, after the control rules. xt_owner matches
//!   when `skb_to_full_sk(skb)` is NULL or its `sk_socket` is NULL, and `tcp_close()` ends with
//!   `sock_orphan()`, which clears `sk_socket`: from then on everything TCP sends for that connection
//!   (retransmissions, the rest of its send queue, window probes, ACKs in FIN_WAIT2) matches, whether the
//!   process closed the socket or died (`kill -9` closes every descriptor). A live socket never matches,
//!   nor a SYN-ACK (its request socket maps to the listener). The orphan queue's reader accepts at once
//!   while the process lives; when it is dead the queue has no reader and the kernel drops them, so a
//!   dead primary's host cannot keep sending data from the VIP after the backup took over.
//! * Rules are inserted at the top of their chain so an earlier `ACCEPT` in mangle cannot let a segment
//!   bypass the gate. An accepted packet continues with the next hook, not the next rule, so a segment
//!   matching two of our rules (FIN+RST, or an orphan's FIN) is queued once, by the first: control
//!   segments of orphans go to the replicated queue, not the orphan queue.
//! * No `--queue-bypass`: with no reader, the kernel drops what the rules match (fail-closed).
//!
//! Every rule carries `-m comment --comment understudy:<instance>`. Before installing, every mangle
//! rule with exactly that comment is deleted: those are leftovers of a run of the same instance that
//! died without cleaning up. `iptables -S` prints the comment in double quotes with `\"` escapes.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The table every gate rule lives in.
pub const TABLE: &str = "mangle";

/// Why installing or removing rules failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The instance name cannot be used in a rule comment.
    #[error("instance name {instance:?} is not usable in a rule tag: want 1-64 of [A-Za-z0-9._-]")]
    BadInstance { instance: String },
    /// The network namespace to run iptables in could not be recorded.
    #[error("cannot open this thread's network namespace: {0}")]
    Netns(#[source] io::Error),
    /// iptables could not be started.
    #[error("`{command}` could not be started: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    /// iptables ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
}

/// One rule: the chain and the match/target arguments (everything after `-A CHAIN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub chain: &'static str,
    pub args: Vec<String>,
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-t {TABLE} {} {}", self.chain, self.args.join(" "))
    }
}

/// The comment that tags the rules of `instance`.
pub fn tag(instance: &str) -> Result<String, RulesError> {
    let ok = !instance.is_empty()
        && instance.len() <= 64
        && instance.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(format!("understudy:{instance}")) } else { Err(RulesError::BadInstance { instance: instance.into() }) }
}

/// The gate's rules, tagged with `tag`, in installation order: inbound segments for `vip:port`, and (when
/// `outbound`) the server's SYN-ACK, FIN and RST from `vip:port`, all to queue `queue`; then (when
/// `outbound` and `orphans` is set) every other segment from `vip:port` of a socket without an open file,
/// to queue `orphans`.
pub fn gate_rules(
    vip: Ipv4Addr,
    port: u16,
    queue: u16,
    tag: &str,
    outbound: bool,
    orphans: Option<u16>,
) -> Vec<RuleSpec> {
    let vip = format!("{vip}/32");
    let port = port.to_string();
    let spec = |chain, matches: &[&str], queue: u16| {
        let mut args: Vec<String> = matches.iter().map(|s| s.to_string()).collect();
        let target = ["-m", "comment", "--comment", tag, "-j", "NFQUEUE", "--queue-num", &queue.to_string()];
        args.extend(target.map(String::from));
        RuleSpec { chain, args }
    };
    // Segments a takeover injects into restored sockets (`tcp_replay::repair::INJECT_MARK`) are the
    // table's own replay, not client input: they bypass the gate, which may already run meanwhile.
    let injected = format!("{:#x}", tcp_replay::repair::INJECT_MARK);
    let inbound = ["-p", "tcp", "-d", &vip, "--dport", &port, "-m", "mark", "!", "--mark", &injected];
    let mut rules = vec![spec("PREROUTING", &inbound, queue)];
    if outbound {
        let from = ["-p", "tcp", "-s", &vip, "--sport", &port];
        for flags in [["SYN,ACK", "SYN,ACK"], ["FIN", "FIN"], ["RST", "RST"]] {
            let m: Vec<&str> = from.iter().copied().chain(["--tcp-flags"]).chain(flags).collect();
            rules.push(spec("OUTPUT", &m, queue));
        }
        // After the control rules: an orphan's FIN or RST is replicated like any other.
        if let Some(orphans) = orphans {
            let m: Vec<&str> = from.iter().copied().chain(["-m", "owner", "!", "--socket-exists"]).collect();
            rules.push(spec("OUTPUT", &m, orphans));
        }
    }
    rules
}

/// The rules in `iptables -S` output whose comment is exactly `tag`, as (chain, args) ready for `-D`.
pub fn tagged_rules(save: &str, tag: &str) -> Vec<(String, Vec<String>)> {
    save.lines()
        .filter_map(split_words)
        .filter_map(|words| {
            let [a, chain, rest @ ..] = words.as_slice() else { return None };
            let tagged = rest.windows(2).any(|w| w[0] == "--comment" && w[1] == tag);
            (a == "-A" && tagged).then(|| (chain.clone(), rest.to_vec()))
        })
        .collect()
}

/// Splits one line of `iptables -S` output into words: blanks separate, double quotes group, and a
/// backslash inside quotes escapes the next character. `None` for an unterminated quote.
pub fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        c => cur.push(c),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// The `-D` commands that delete `rules` (as [`tagged_rules`] lists them).
fn deletions(rules: &[(String, Vec<String>)]) -> Vec<Vec<&str>> {
    rules
        .iter()
        .map(|(chain, args)| {
            let mut a = vec!["-D", chain.as_str()];
            a.extend(args.iter().map(String::as_str));
            a
        })
        .collect()
}

/// The `-I` position of each of `specs`, so that each chain's rules end up at its top in the given order.
fn insert_positions(specs: &[RuleSpec]) -> Vec<String> {
    let mut next: Vec<(&str, usize)> = Vec::new();
    specs
        .iter()
        .map(|spec| {
            let pos = match next.iter_mut().find(|(c, _)| *c == spec.chain) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    next.push((spec.chain, 1));
                    1
                }
            };
            pos.to_string()
        })
        .collect()
}

/// `iptables-restore` beside `iptables` (same directory, same variant: `iptables-nft` gives
/// `iptables-nft-restore`).
fn restore_program(iptables: &Path) -> PathBuf {
    let mut name = iptables.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "iptables".into());
    name.push("-restore");
    iptables.with_file_name(name)
}

/// One word of an `iptables-restore` line: as it is when plain, else double-quoted with `"` and `\`
/// escaped (the quoting [`split_words`] reads back).
fn quote(word: &str) -> String {
    let plain = !word.is_empty() && !word.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '#');
    if plain {
        return word.to_owned();
    }
    let mut q = String::with_capacity(word.len() + 2);
    q.push('"');
    for c in word.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Runs iptables in the network namespace that was current for the thread that created it, whichever
/// thread runs the command later (a `Drop` on another thread, a runtime's blocking pool).
#[derive(Debug)]
pub struct Iptables {
    program: PathBuf,
    netns: File,
}

impl Iptables {
    /// Records the calling thread's network namespace.
    pub fn here(program: &Path) -> Result<Iptables, RulesError> {
        let netns = File::open("/proc/thread-self/ns/net").map_err(RulesError::Netns)?;
        Ok(Iptables { program: program.to_path_buf(), netns })
    }

    /// Runs `iptables -w -t mangle ARGS`; returns its standard output.
    pub fn run(&self, args: &[&str]) -> Result<String, RulesError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(["-w", "-t", TABLE]).args(args).stdin(Stdio::null());
        let command = format!("{} -w -t {TABLE} {}", self.program.display(), args.join(" "));
        in_netns(&mut cmd, &self.netns);
        let out = cmd.output().map_err(|source| RulesError::Spawn { command: command.clone(), source })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(RulesError::Failed { command, status: out.status, stderr });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies `commands` (each the arguments of one `iptables -t mangle` call, such as `-I CHAIN 1 ...`)
    /// in one `iptables-restore --noflush` run: one process instead of one per rule, and all or nothing.
    pub fn batch(&self, commands: &[Vec<&str>]) -> Result<(), RulesError> {
        if commands.is_empty() {
            return Ok(());
        }
        let program = restore_program(&self.program);
        let mut script = format!("*{TABLE}\n");
        for c in commands {
            let words: Vec<String> = c.iter().map(|w| quote(w)).collect();
            script.push_str(&words.join(" "));
            script.push('\n');
        }
        script.push_str("COMMIT\n");
        let command = format!("{} -w --noflush <<< {:?}", program.display(), script);
        let mut cmd = Command::new(&program);
        cmd.args(["-w", "--noflush"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
        in_netns(&mut cmd, &self.netns);
        let spawn = |source| RulesError::Spawn { command: command.clone(), source };
        let mut child = cmd.spawn().map_err(spawn)?;
        let written = child.stdin.take().map(|mut stdin| stdin.write_all(script.as_bytes()));
        let out = child.wait_with_output().map_err(spawn)?;
        if let Some(Err(source)) = written {
            return Err(RulesError::Spawn { command, source });
        }
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(RulesError::Failed { command, status: out.status, stderr });
        }
        Ok(())
    }

    /// Runs `commands` as one batch, or one by one when the batch fails (no `iptables-restore`, or a
    /// rule of it is refused): every command is then attempted, and the first failure is returned.
    fn batch_or_each(&self, commands: &[Vec<&str>]) -> Result<(), RulesError> {
        match self.batch(commands) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "iptables-restore batch failed; running the rules one by one");
                let mut first = None;
                for c in commands {
                    if let Err(e) = self.run(c) {
                        first.get_or_insert(e);
                    }
                }
                first.map_or(Ok(()), Err)
            }
        }
    }

    /// Deletes every mangle rule tagged exactly `tag`; returns how many there were.
    pub fn remove_tagged(&self, tag: &str) -> Result<usize, RulesError> {
        let stale = tagged_rules(&self.run(&["-S"])?, tag);
        self.batch_or_each(&deletions(&stale))?;
        Ok(stale.len())
    }

    /// How many mangle rules are tagged exactly `tag`.
    pub fn count_tagged(&self, tag: &str) -> Result<usize, RulesError> {
        Ok(tagged_rules(&self.run(&["-S"])?, tag).len())
    }
}

/// Makes `cmd` run in network namespace `netns` when the calling thread is elsewhere (a `Drop` on
/// another thread, a runtime's blocking pool).
pub(crate) fn in_netns(cmd: &mut Command, netns: &File) {
    let here = std::fs::metadata("/proc/thread-self/ns/net");
    let same = match (netns.metadata(), here) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    if same {
        return;
    }
    let fd = netns.as_raw_fd();
    // SAFETY: setns(2) is async-signal-safe and `fd` stays open until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Installed rules; removed by [`Rules::remove`] or, failing that, on drop.
#[derive(Debug)]
pub struct Rules {
    ipt: Iptables,
    tag: String,
    installed: Vec<RuleSpec>,
}

impl Rules {
    /// Removes stale rules tagged `tag`, then inserts `specs` at the top of their chains (in the given
    /// order). On failure, whatever was inserted is removed again. Returns the rules and the number of
    /// stale ones removed.
    ///
    /// Both happen in one `iptables-restore` run, atomically; when that fails, rule by rule.
    pub fn install(ipt: Iptables, tag: &str, specs: Vec<RuleSpec>) -> Result<(Rules, usize), RulesError> {
        let stale = tagged_rules(&ipt.run(&["-S"])?, tag);
        let positions = insert_positions(&specs);
        let insertions: Vec<Vec<&str>> = specs
            .iter()
            .zip(&positions)
            .map(|(spec, pos)| {
                let mut a = vec!["-I", spec.chain, pos.as_str()];
                a.extend(spec.args.iter().map(String::as_str));
                a
            })
            .collect();
        let mut all = deletions(&stale);
        all.extend(insertions.iter().cloned());
        if let Err(e) = ipt.batch(&all) {
            tracing::debug!(error = %e, "iptables-restore batch failed; installing the rules one by one");
            ipt.batch_or_each(&deletions(&stale))?;
            let mut rules = Rules { ipt, tag: tag.to_string(), installed: Vec::new() };
            for (spec, args) in specs.iter().zip(&insertions) {
                rules.ipt.run(args)?; // on error, `rules` drops and removes what it holds
                rules.installed.push(spec.clone());
            }
            return Ok((rules, stale.len()));
        }
        Ok((Rules { ipt, tag: tag.to_string(), installed: specs }, stale.len()))
    }

    /// The rules as installed.
    pub fn specs(&self) -> &[RuleSpec] {
        &self.installed
    }

    /// The comment tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Deletes the installed rules. Every rule is attempted; the first failure is returned.
    pub fn remove(mut self) -> Result<(), RulesError> {
        self.remove_installed()
    }

    fn remove_installed(&mut self) -> Result<(), RulesError> {
        let installed = std::mem::take(&mut self.installed);
        let commands: Vec<Vec<&str>> = installed
            .iter()
            .rev()
            .map(|spec| {
                let mut a = vec!["-D", spec.chain];
                a.extend(spec.args.iter().map(String::as_str));
                a
            })
            .collect();
        self.ipt.batch_or_each(&commands)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        if let Err(e) = self.remove_installed() {
            tracing::error!(tag = %self.tag, error = %e, "removing the gate's iptables rules failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_accepts_plain_names_and_rejects_what_needs_quoting() {
        assert_eq!(tag("node-1.a_b").unwrap(), "understudy:node-1.a_b");
        for bad in ["", "a b", "a\"b", "x/y", &"n".repeat(65)] {
            assert!(matches!(tag(bad), Err(RulesError::BadInstance { .. })), "{bad:?}");
        }
    }

    #[test]
    fn gate_rules_divert_inbound_outbound_control_then_orphans() {
        let r = gate_rules(Ipv4Addr::new(10, 0, 0, 100), 80, 5, "understudy:t", true, Some(6));
        let text: Vec<String> = r.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            text,
            [
                "-t mangle PREROUTING -p tcp -d 10.0.0.100/32 --dport 80 -m mark ! --mark 0x75737464 -m comment --comment understudy:t -j NFQUEUE --queue-num 5",
                "-t mangle OUTPUT -p tcp -s 10.0.0.100/32 --sport 80 --tcp-flags SYN,ACK SYN,ACK -m comment --comment understudy:t -j NFQUEUE --queue-num 5",
                "-t mangle OUTPUT -p tcp -s 10.0.0.100/32 --sport 80 --tcp-flags FIN FIN -m comment --comment understudy:t -j NFQUEUE --queue-num 5",
                "-t mangle OUTPUT -p tcp -s 10.0.0.100/32 --sport 80 --tcp-flags RST RST -m comment --comment understudy:t -j NFQUEUE --queue-num 5",
                "-t mangle OUTPUT -p tcp -s 10.0.0.100/32 --sport 80 -m owner ! --socket-exists -m comment --comment understudy:t -j NFQUEUE --queue-num 6",
            ]
        );
        assert!(r.iter().all(|r| !r.args.iter().any(|a| a.contains("bypass"))));
        assert_eq!(gate_rules(Ipv4Addr::LOCALHOST, 1, 0, "t", false, Some(1)).len(), 1, "orphans are outbound");
        let no_orphans = gate_rules(Ipv4Addr::new(10, 0, 0, 100), 80, 5, "understudy:t", true, None);
        assert_eq!(no_orphans, r[..4]);
    }

    #[test]
    fn tagged_rules_match_the_exact_tag_only() {
        let save = r#"-P PREROUTING ACCEPT
-A PREROUTING -d 10.0.0.100/32 -p tcp -m tcp --dport 80 -m comment --comment "understudy:a" -j NFQUEUE --queue-num 3
-A PREROUTING -d 10.0.0.100/32 -p tcp -m tcp --dport 80 -m comment --comment "understudy:ab" -j NFQUEUE --queue-num 4
-A OUTPUT -s 10.0.0.100/32 -p tcp -m tcp --sport 80 --tcp-flags FIN FIN -m comment --comment "understudy:a" -j NFQUEUE --queue-num 3
-A OUTPUT -m comment --comment "say \"understudy:a\"" -j ACCEPT
-A OUTPUT -j LOG --log-prefix "understudy:a"
"#;
        let found = tagged_rules(save, "understudy:a");
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, "PREROUTING");
        assert_eq!(found[1].0, "OUTPUT");
        assert_eq!(found[1].1.last().map(String::as_str), Some("3"));
        assert!(found[0].1.contains(&"understudy:a".to_string()));
    }

    #[test]
    fn quoted_words_read_back_as_they_were() {
        let words = ["-m", "comment", "--comment", "a b", "say \"hi\"", "back\\slash", "", "#x"];
        let line: Vec<String> = words.iter().map(|w| quote(w)).collect();
        assert_eq!(line[..3], ["-m", "comment", "--comment"]);
        assert_eq!(split_words(&line.join(" ")).unwrap(), words);
    }

    #[test]
    fn insert_positions_count_per_chain() {
        let spec = |chain| RuleSpec { chain, args: vec![] };
        let specs = [spec("PREROUTING"), spec("OUTPUT"), spec("OUTPUT"), spec("PREROUTING"), spec("OUTPUT")];
        assert_eq!(insert_positions(&specs), ["1", "1", "2", "2", "3"]);
    }

    #[test]
    fn restore_program_sits_beside_iptables() {
        assert_eq!(restore_program(Path::new("iptables")), Path::new("iptables-restore"));
        assert_eq!(restore_program(Path::new("/usr/sbin/iptables-nft")), Path::new("/usr/sbin/iptables-nft-restore"));
    }

    #[test]
    fn split_words_handles_quotes_escapes_and_rejects_open_quotes() {
        assert_eq!(
            split_words(r#"-A X --comment "a \"b\" c" -j Y"#).unwrap(),
            ["-A", "X", "--comment", "a \"b\" c", "-j", "Y"]
        );
        assert_eq!(split_words(r#"--comment """#).unwrap(), ["--comment", ""]);
        assert_eq!(split_words("  a   b ").unwrap(), ["a", "b"]);
        assert_eq!(split_words(r#"-A X "open"#), None);
        assert_eq!(split_words(r#"-A X "esc\"#), None);
    }
}
