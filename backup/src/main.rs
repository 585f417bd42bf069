//! `backup`: runs the node (`backup::node::run`) through `primary::cli` until SIGINT or SIGTERM. After a
//! takeover the same process serves as primary.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start or failed (a takeover that could not claim the VIP, ...).

use shared::config::BackupArgs;

/// What `--help` adds about this build.
const BUILD_NOTE: &str = "\
Joins the primary at --join, keeps a replica of every client connection, and takes them over when the primary
dies (detection, ARP fence, restore with TCP_REPAIR). After a takeover this process serves as primary; a
planned switchover (`backup switchover --admin ADDR` on it then) hands the connections back, and it restarts
itself as the spare of the new primary.";

fn main() {
    primary::cli::switchover_command("backup");
    let args: BackupArgs = primary::cli::parse_args("backup", |command| command.before_long_help(BUILD_NOTE));
    primary::cli::run_node("backup", args, backup::node::run);
}
