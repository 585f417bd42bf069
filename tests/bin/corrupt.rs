//! `us-corrupt`: corrupts replication frames in flight (`scripts/faults corrupt`). Runs in the receiving
//! host's namespace and serves an NFQUEUE that an iptables rule fills with the replication link's arriving
//! segments. Of those with a payload it alters `--percent` at random (`understudy_tests::corrupt`: one byte
//! flipped, the TCP checksum fixed, so the kernel delivers it), accepts every segment, and prints one line
//! per altered segment. Ends on SIGTERM or SIGINT; the rule's `--queue-bypass` lets segments through
//! whenever it is not running.

use anyhow::{Context, Result, ensure};
use clap::Parser;
use nfq::{Queue, Verdict};
use understudy_tests::corrupt::{Mode, alter};

#[derive(Parser)]
#[command(
    name = "us-corrupt",
    about = "Alter a share of the replication segments queued to an NFQUEUE (scripts/faults corrupt)",
    long_about = "Serves NFQUEUE --queue: of the TCP segments with a payload it receives, alters --percent at \
                  random and accepts every segment. `wire` flips a payload byte (the frame CRC catches it); \
                  `tamper` flips a byte inside a whole frame of the segment and recomputes that frame's CRC (only \
                  the frame's authentication tag catches it; segments without a whole frame are left and the \
                  next one is tried). The TCP checksum is fixed either way. Needs root (CAP_NET_ADMIN)."
)]
struct Cli {
    /// NFQUEUE number to serve.
    #[arg(long)]
    queue: u16,
    /// Share of the payload-carrying segments to alter, 0 to 100.
    #[arg(long)]
    percent: f64,
    /// `wire` (caught by the frame CRC) or `tamper` (caught by the HMAC tag).
    #[arg(long, default_value = "tamper")]
    mode: Mode,
    /// Seed of the random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!((0.0..=100.0).contains(&cli.percent), "--percent {} is not within 0 to 100", cli.percent);
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut queue = Queue::open().context("opening a netfilter queue socket (root needed)")?;
    queue.bind(cli.queue).with_context(|| format!("binding NFQUEUE {}", cli.queue))?;
    // A full queue lets segments through rather than drop them: loss is another fault.
    queue.set_fail_open(cli.queue, true).context("setting the queue fail-open")?;
    println!("us-corrupt: queue {}, {} % of segments, mode {:?}, seed {seed}", cli.queue, cli.percent, cli.mode);
    let (mut seen, mut altered, mut armed) = (0u64, 0u64, false);
    loop {
        let mut msg = queue.recv().context("receiving from the queue")?;
        seen += 1;
        armed |= rng.f64() * 100.0 < cli.percent;
        if armed {
            let mut datagram = msg.get_payload().to_vec();
            if let Some(a) = alter(&mut datagram, cli.mode, rng.u64(..), rng.u8(1..)) {
                armed = false;
                altered += 1;
                let (src, dst) = endpoints(&datagram);
                let frame = a.frame.map_or(String::new(), |(k, len)| {
                    format!(", inside the {len}-byte frame at payload offset {k} (frame CRC recomputed)")
                });
                println!(
                    "us-corrupt: altered segment {altered} of {seen} ({src} -> {dst}): payload byte {} xor {:#04x}{frame}",
                    a.at, a.xor
                );
                msg.set_payload(datagram);
            }
        }
        msg.set_verdict(Verdict::Accept);
        queue.verdict(msg).context("giving the verdict")?;
    }
}

/// `src:port` and `dst:port` of an IPv4 TCP datagram, for the log.
fn endpoints(d: &[u8]) -> (String, String) {
    if d.len() < 24 {
        return ("?".into(), "?".into());
    }
    let ihl = (d[0] & 0x0f) as usize * 4;
    let port = |at: usize| d.get(at..at + 2).map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
    (
        format!("{}.{}.{}.{}:{}", d[12], d[13], d[14], d[15], port(ihl)),
        format!("{}.{}.{}.{}:{}", d[16], d[17], d[18], d[19], port(ihl + 2)),
    )
}
