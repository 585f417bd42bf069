//! The campaign's pure parts: which injections to make (fault × moment, seeded), what counts as surviving
//! one, the ARP rule for the VIP, the origin ledger, and the summary table. No I/O; unit-tested below.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// What is done to the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// `kill -9` of the primary process.
    KillPrimary,
    /// SIGSTOP of the primary until the backup took over, then SIGCONT.
    StopPrimary,
    /// Every interface of the primary's host down (its process is then killed, as the power took it).
    PowerCut,
    /// `kill -9` of the backup (or of the joining spare).
    KillBackup,
    /// The replication network cut, then healed.
    Partition,
    /// Random loss on the client network for a while.
    LossClient,
    /// Random loss on the replication network for a while.
    LossRepl,
    /// Replication frames altered in flight for a while (`scripts/faults corrupt`).
    Corrupt,
    /// A planned switchover.
    Switchover,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::KillPrimary,
        Fault::StopPrimary,
        Fault::PowerCut,
        Fault::KillBackup,
        Fault::Partition,
        Fault::LossClient,
        Fault::LossRepl,
        Fault::Corrupt,
        Fault::Switchover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill -9 primary",
            Fault::StopPrimary => "SIGSTOP primary",
            Fault::PowerCut => "power cut primary",
            Fault::KillBackup => "kill -9 backup",
            Fault::Partition => "repl partition",
            Fault::LossClient => "loss client net",
            Fault::LossRepl => "loss repl net",
            Fault::Corrupt => "frame corruption",
            Fault::Switchover => "planned switchover",
        }
    }

    /// Whether the fault ends the primary's service (the backup, or the spare, must continue).
    pub fn moves_primary(self) -> bool {
        matches!(self, Fault::KillPrimary | Fault::StopPrimary | Fault::PowerCut | Fault::Switchover)
    }

    /// The moments this fault can meet and still leave a pair that can protect its clients. A fault that ends
    /// the primary cannot land during a join (the spare protects nothing until it has synced: README,
    /// Limitations) nor during a takeover (the takeover's survivor is then the only node); killing the backup
    /// during a takeover kills the survivor.
    pub fn moments(self) -> &'static [Moment] {
        use Moment::*;
        if self.moves_primary() {
            &[Handshake, Upload, SlowOrigin, MidResponse, Idle]
        } else if self == Fault::KillBackup {
            &[Handshake, Upload, SlowOrigin, MidResponse, Idle, Join]
        } else {
            &Moment::ALL
        }
    }
}

impl Fault {
    /// The short name on the command line (`--inject kill-primary@idle`).
    pub fn key(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill-primary",
            Fault::StopPrimary => "stop-primary",
            Fault::PowerCut => "power-cut",
            Fault::KillBackup => "kill-backup",
            Fault::Partition => "partition",
            Fault::LossClient => "loss-client",
            Fault::LossRepl => "loss-repl",
            Fault::Corrupt => "corrupt",
            Fault::Switchover => "switchover",
        }
    }
}

impl Moment {
    /// The short name on the command line.
    pub fn key(self) -> &'static str {
        match self {
            Moment::Handshake => "handshake",
            Moment::Upload => "upload",
            Moment::SlowOrigin => "slow-origin",
            Moment::MidResponse => "mid-response",
            Moment::Idle => "idle",
            Moment::Join => "join",
            Moment::Takeover => "takeover",
        }
    }
}

/// Parses `FAULT@MOMENT` (short names, as [`Fault::key`] and [`Moment::key`]) into an injection with `seed`.
/// A pairing that [`Fault::moments`] leaves out is accepted: it is run as asked.
pub fn parse_injection(text: &str, seed: u64) -> Result<Injection, String> {
    let (f, m) = text.split_once('@').ok_or_else(|| format!("{text:?}: want FAULT@MOMENT"))?;
    let fault = Fault::ALL
        .into_iter()
        .find(|x| x.key() == f)
        .ok_or_else(|| format!("unknown fault {f:?}: want one of {}", Fault::ALL.map(Fault::key).join(", ")))?;
    let moment = Moment::ALL
        .into_iter()
        .find(|x| x.key() == m)
        .ok_or_else(|| format!("unknown moment {m:?}: want one of {}", Moment::ALL.map(Moment::key).join(", ")))?;
    Ok(Injection { fault, moment, seed })
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When the fault lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Moment {
    /// While clients open new connections, one after the other.
    Handshake,
    /// While a request body is being uploaded.
    Upload,
    /// While requests wait on a slow origin (GET and POST with `Idempotency-Key`).
    SlowOrigin,
    /// In the middle of a download.
    MidResponse,
    /// While keep-alive connections sit idle between requests.
    Idle,
    /// While a spare joins (the backup was killed and a new one is syncing).
    Join,
    /// While the backup takes over from a killed primary.
    Takeover,
}

impl Moment {
    pub const ALL: [Moment; 7] = [
        Moment::Handshake,
        Moment::Upload,
        Moment::SlowOrigin,
        Moment::MidResponse,
        Moment::Idle,
        Moment::Join,
        Moment::Takeover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Moment::Handshake => "during handshakes",
            Moment::Upload => "during an upload",
            Moment::SlowOrigin => "while the origin is slow",
            Moment::MidResponse => "mid-response",
            Moment::Idle => "idle keep-alive",
            Moment::Join => "during a spare's join",
            Moment::Takeover => "during a takeover",
        }
    }
}

impl fmt::Display for Moment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One planned injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    pub fault: Fault,
    pub moment: Moment,
    /// Seed of this injection's own random choices (sizes, percentages, when exactly).
    pub seed: u64,
}

impl Injection {
    /// How many times the VIP may change hands in this injection: once when the primary is ended or hands
    /// over, or when the moment is itself a takeover.
    pub fn handovers(&self) -> usize {
        usize::from(self.fault.moves_primary() || self.moment == Moment::Takeover)
    }
}

/// `n` injections drawn from `seed`: a fault uniformly, then one of its moments. The same seed gives the
/// same plan.
pub fn plan(seed: u64, n: usize) -> Vec<Injection> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| {
            let fault = Fault::ALL[rng.usize(..Fault::ALL.len())];
            let moments = fault.moments();
            Injection { fault, moment: moments[rng.usize(..moments.len())], seed: rng.u64(..) }
        })
        .collect()
}

/// A plan that makes every fault once (in order), each at a moment drawn from `seed`, and then meets every
/// moment not met yet with a fault that can meet it: the short campaign of the test command.
pub fn covering_plan(seed: u64) -> Vec<Injection> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out: Vec<Injection> = Fault::ALL
        .iter()
        .map(|&fault| {
            let moments = fault.moments();
            Injection { fault, moment: moments[rng.usize(..moments.len())], seed: rng.u64(..) }
        })
        .collect();
    for m in Moment::ALL {
        if !out.iter().any(|i| i.moment == m) {
            let faults: Vec<Fault> = Fault::ALL.iter().copied().filter(|f| f.moments().contains(&m)).collect();
            // Replace an injection of a fault met more than once... every fault is met once, so re-aim the
            // last injection of a fault that can meet `m` and whose moment is met elsewhere too.
            let pos = out
                .iter()
                .rposition(|i| faults.contains(&i.fault) && out.iter().filter(|j| j.moment == i.moment).count() > 1);
            match pos {
                Some(p) => out[p].moment = m,
                None => out.push(Injection { fault: faults[rng.usize(..faults.len())], moment: m, seed: rng.u64(..) }),
            }
        }
    }
    out
}

/// How many times the MAC claiming the VIP changed over a capture's claims (time order): each claim is a
/// reply "VIP is-at MAC" or a gratuitous announcement by MAC. Two nodes answering at once show as the
/// claimant flipping back and forth.
pub fn arp_changes(claims: &[(f64, String)]) -> usize {
    claims.windows(2).filter(|w| w[0].1 != w[1].1).count()
}

/// What the origin's ledger says about the POSTs a client made: every key the client sent must have been
/// executed exactly once (deduplicated repeats are fine), with the body the client sent.
pub fn ledger_problems(lines: &[Value], posts: &[(String, usize, String)]) -> Vec<String> {
    let mut executed: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for l in lines {
        if l["method"] == "POST"
            && l["outcome"] == "executed"
            && let Some(k) = l["key"].as_str()
        {
            executed.entry(k).or_default().push(l);
        }
    }
    let mut problems = Vec::new();
    for (key, len, sha) in posts {
        match executed.get(key.as_str()).map(Vec::as_slice) {
            None | Some([]) => problems.push(format!("POST {key} never executed at the origin")),
            Some([one]) => {
                if one["bytes_in"].as_u64() != Some(*len as u64) || one["sha256"].as_str() != Some(sha) {
                    problems.push(format!(
                        "POST {key}: the origin got {} bytes (sha256 {}), the client sent {len} ({sha})",
                        one["bytes_in"], one["sha256"]
                    ));
                }
            }
            Some(many) => problems.push(format!("POST {key} executed {} times at the origin", many.len())),
        }
    }
    problems
}

/// What one injection came to.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Requests the clients completed, every body checked.
    pub requests: u64,
    /// Client-side failures (a connection error, a wrong status or body, a missing response).
    pub client_errors: Vec<String>,
    /// Resets from the VIP seen at the client.
    pub resets: usize,
    /// Other findings: ledger, ARP, the pair not protected again.
    pub problems: Vec<String>,
    /// The longest a client waited for a byte it was owed.
    pub max_stall: Duration,
    /// GETs the origin served more than once (re-sent after a takeover: allowed for idempotent requests).
    pub refetches: usize,
    /// Claims on the VIP seen on ARP at the client, and how often the claiming MAC changed.
    pub arp_claims: usize,
    pub arp_changes: usize,
    /// What the fault did, for the progress line (loss share, segments altered, takeover time).
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn survived(&self) -> bool {
        self.client_errors.is_empty() && self.resets == 0 && self.problems.is_empty()
    }
}

/// One row of the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub injections: usize,
    pub survived: usize,
    pub client_errors: usize,
    pub resets: usize,
    pub max_stall: Duration,
}

/// Rows per fault type (in [`Fault::ALL`] order, faults never drawn left out), and the total.
pub fn summarize(results: &[(Injection, Outcome)]) -> (Vec<(Fault, Row)>, Row) {
    let mut rows: BTreeMap<Fault, Row> = BTreeMap::new();
    let mut total = Row::default();
    for (inj, out) in results {
        for row in [rows.entry(inj.fault).or_default(), &mut total] {
            row.injections += 1;
            row.survived += usize::from(out.survived());
            row.client_errors += out.client_errors.len();
            row.resets += out.resets;
            row.max_stall = row.max_stall.max(out.max_stall);
        }
    }
    (rows.into_iter().collect(), total)
}

/// The summary as a Markdown table.
pub fn table(results: &[(Injection, Outcome)]) -> String {
    let (rows, total) = summarize(results);
    let mut t = String::from(
        "| fault | injections | survived | client errors | resets | max stall |\n|---|---|---|---|---|---|\n",
    );
    let line = |name: &str, r: &Row| {
        format!(
            "| {name} | {} | {} | {} | {} | {} ms |\n",
            r.injections,
            r.survived,
            r.client_errors,
            r.resets,
            r.max_stall.as_millis()
        )
    };
    for (f, r) in &rows {
        t.push_str(&line(f.name(), r));
    }
    t.push_str(&line("**all**", &total));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plans_are_repeatable_and_only_pair_faults_with_their_moments() {
        let a = plan(7, 200);
        assert_eq!(a, plan(7, 200));
        assert_ne!(a, plan(8, 200));
        for i in &a {
            assert!(i.fault.moments().contains(&i.moment), "{i:?}");
        }
        for f in Fault::ALL {
            assert!(a.iter().any(|i| i.fault == f), "{f} drawn in 200");
        }
        assert!(!a.iter().any(|i| i.fault == Fault::KillPrimary && i.moment == Moment::Join));
        assert!(!a.iter().any(|i| i.fault == Fault::KillBackup && i.moment == Moment::Takeover));
    }

    #[test]
    fn the_covering_plan_meets_every_fault_and_every_moment() {
        for seed in 0..50 {
            let p = covering_plan(seed);
            assert!(p.len() <= 10, "{}", p.len());
            for f in Fault::ALL {
                assert!(p.iter().any(|i| i.fault == f), "seed {seed}: {f} missing: {p:?}");
            }
            for m in Moment::ALL {
                assert!(p.iter().any(|i| i.moment == m), "seed {seed}: {m} missing: {p:?}");
            }
            for i in &p {
                assert!(i.fault.moments().contains(&i.moment), "{i:?}");
            }
        }
    }

    #[test]
    fn injections_parse_from_their_short_names() {
        assert_eq!(
            parse_injection("kill-primary@join", 3),
            Ok(Injection { fault: Fault::KillPrimary, moment: Moment::Join, seed: 3 })
        );
        for f in Fault::ALL {
            for m in Moment::ALL {
                assert_eq!(
                    parse_injection(&format!("{}@{}", f.key(), m.key()), 0).map(|i| (i.fault, i.moment)),
                    Ok((f, m))
                );
            }
        }
        assert!(parse_injection("kill-primary", 0).unwrap_err().contains("FAULT@MOMENT"));
        assert!(parse_injection("nuke@idle", 0).unwrap_err().contains("unknown fault"));
        assert!(parse_injection("corrupt@noon", 0).unwrap_err().contains("unknown moment"));
    }

    #[test]
    fn handovers_count_a_moved_primary_or_a_takeover_moment() {
        let i = |fault, moment| Injection { fault, moment, seed: 0 };
        assert_eq!(i(Fault::KillPrimary, Moment::Idle).handovers(), 1);
        assert_eq!(i(Fault::Switchover, Moment::Upload).handovers(), 1);
        assert_eq!(i(Fault::LossClient, Moment::Takeover).handovers(), 1);
        assert_eq!(i(Fault::Partition, Moment::Join).handovers(), 0);
    }

    #[test]
    fn arp_changes_count_flips_of_the_claiming_mac() {
        let c = |v: &[(f64, &str)]| v.iter().map(|(t, m)| (*t, m.to_string())).collect::<Vec<_>>();
        assert_eq!(arp_changes(&c(&[])), 0);
        assert_eq!(arp_changes(&c(&[(1.0, "a"), (2.0, "a")])), 0);
        assert_eq!(arp_changes(&c(&[(1.0, "a"), (2.0, "b"), (3.0, "b")])), 1);
        assert_eq!(arp_changes(&c(&[(1.0, "a"), (2.0, "b"), (3.0, "a")])), 2);
    }

    #[test]
    fn the_ledger_wants_each_post_executed_once_with_the_sent_body() {
        let line = |key: &str, outcome: &str, n: u64, sha: &str| json!({"method": "POST", "key": key, "outcome": outcome, "bytes_in": n, "sha256": sha});
        let lines = vec![
            line("k1", "executed", 10, "s1"),
            line("k1", "deduplicated", 10, "s1"),
            line("k2", "executed", 5, "s2"),
            line("k2", "executed", 5, "s2"),
            line("k3", "executed", 4, "bad"),
            json!({"method": "GET", "key": null, "outcome": "executed"}),
        ];
        let posts = |k: &str, n: usize, s: &str| (k.to_string(), n, s.to_string());
        assert!(ledger_problems(&lines, &[posts("k1", 10, "s1")]).is_empty());
        let p = ledger_problems(&lines, &[posts("k2", 5, "s2"), posts("k3", 4, "s3"), posts("k4", 1, "s4")]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("executed 2 times"), "{p:?}");
        assert!(p[1].contains("the origin got 4 bytes"), "{p:?}");
        assert!(p[2].contains("never executed"), "{p:?}");
    }

    #[test]
    fn the_summary_has_a_row_per_fault_and_a_total() {
        let inj = |fault| Injection { fault, moment: Moment::Idle, seed: 0 };
        let ok = Outcome { max_stall: Duration::from_millis(300), ..Outcome::default() };
        let bad = Outcome {
            client_errors: vec!["reset".into()],
            resets: 2,
            max_stall: Duration::from_millis(900),
            ..Outcome::default()
        };
        let results =
            vec![(inj(Fault::KillPrimary), ok.clone()), (inj(Fault::KillPrimary), bad), (inj(Fault::Corrupt), ok)];
        let (rows, total) = summarize(&results);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            (
                Fault::KillPrimary,
                Row { injections: 2, survived: 1, client_errors: 1, resets: 2, max_stall: Duration::from_millis(900) }
            )
        );
        assert_eq!((total.injections, total.survived), (3, 2));
        let t = table(&results);
        assert!(t.contains("| kill -9 primary | 2 | 1 | 1 | 2 | 900 ms |"), "{t}");
        assert!(t.contains("| **all** | 3 | 2 | 1 | 2 | 900 ms |"), "{t}");
    }
}
