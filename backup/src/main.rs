//! `backup`: runs the node (`backup::node::run`) through `primary::cli` until SIGINT or SIGTERM. After a
//! takeover the same process serves as primary.
//!
//! Exit status: 0 after a clean stop; 2 for bad flags or configuration (one line on stderr); 1 when the
//! node could not start or failed (a takeover that could not claim the VIP, ...).

use shared::config::BackupArgs;

fn main() {
    primary::cli::switchover_command("backup");
    let args: BackupArgs = primary::cli::parse_args("backup", |command| command);
    primary::cli::run_node("backup", args, backup::node::run);
}
