//! Writes the seed corpora (see `understudy_fuzz::seeds`) as `DIR/TARGET/NAME`, for
//! `scripts/fuzz`. The seeds are made from the pcap fixtures, not committed.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        bail!("usage: fuzz-seeds DIR");
    };
    let dir = PathBuf::from(dir);
    let seeds = understudy_fuzz::seeds::all()?;
    for target in understudy_fuzz::seeds::TARGETS {
        let out = dir.join(target);
        // Rewritten each time, so a changed seed never lingers.
        if out.exists() {
            std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
        }
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let mine: Vec<_> = seeds.iter().filter(|s| s.target == target).collect();
        for s in &mine {
            std::fs::write(out.join(&s.name), &s.bytes).with_context(|| format!("writing {}", s.name))?;
        }
        let bytes: usize = mine.iter().map(|s| s.bytes.len()).sum();
        println!("{target}: {} seeds, {bytes} bytes in {}", mine.len(), out.display());
    }
    Ok(())
}
