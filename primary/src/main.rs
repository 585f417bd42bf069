//! `primary`: runs the node (`primary::node::run`) through `primary::cli` until SIGINT or SIGTERM.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start (the VIP is held by another node, an address is in use, ...), failed, or stepped
//! down (another node serves the VIP, or a later epoch exists).

use shared::config::PrimaryArgs;

/// What `--help` adds about this build.
const BUILD_NOTE: &str = "\
Claims the VIP (after checking with ARP that nobody answers for it) and serves HTTP on it. Every segment for
VIP:port passes an NFQUEUE gate. A backup joins on --repl-listen: it receives a snapshot of every live
connection, then the stream, and from then on nothing reaches a client before the backup holds it (/status
peer \"connected\"). Until a backup joins, and after it is lost (its acks stop for the lease and nobody else
answers for the VIP), the primary serves unprotected (peer \"none\"). If another node answers for the VIP or
a later epoch exists, it steps down: it gives up the VIP, sends nothing more for its connections, and exits
with status 1.

Planned switchover (maintenance, upgrades): `primary switchover --admin ADDR` (or POST /admin/switchover)
hands every connection to the connected backup with nothing lost and no fencing delay; this process then
restarts itself, same PID and flags, as `backup --join <the new primary>`. `primary switchover --help`.";

fn main() {
    primary::cli::switchover_command("primary");
    let args: PrimaryArgs = primary::cli::parse_args("primary", |command| {
        command
            .about("understudy primary: serves HTTP on the VIP and replicates every client connection to a backup")
            .mut_arg("repl_listen", |a| {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                a.help(format!("{help} One backup at a time; another is refused while one is connected."))
            })
            .before_long_help(BUILD_NOTE)
    });
    primary::cli::run_node("primary", args, primary::node::run);
}
