//! Real Linux traffic, recorded once by `scripts/record-fixtures` into
//! `tests/fixtures/` (see the README there): for every capture, the `tcp-replay`
//! CLI must reassemble exactly the bytes the two applications exchanged
//! (`NAME.c2s`, `NAME.s2c`) and report the connection as the kernels had it
//! (`NAME.json`: SYN options, ISNs, the server socket's final state). FIN/RST
//! are checked through the library, since `conns` does not print them.
//!
//! The expectations come from the applications and their kernels (`TCP_INFO`,
//! `ss`), cross-checked with tshark when recorded, never from our own code.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use tcp_replay::flows::Flows;
use tcp_replay::pcap::CaptureReader;
use tcp_replay::{Checksums, Dir};

/// Every fixture has a test below; `every_fixture_has_a_test` keeps it so.
const FIXTURES: &[&str] = &[
    "bulk-defaults",
    "bulk-nooptions",
    "halfclose",
    "reset",
    "tinywin",
    "wrap",
    "pcapng",
    "cooked-sll",
    "cooked-sll2",
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Fixture {
    name: String,
    spec: Value,
    capture: PathBuf,
}

impl Fixture {
    fn load(name: &str) -> Result<Fixture> {
        let dir = fixtures_dir();
        let path = dir.join(format!("{name}.json"));
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let spec: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let file = spec["capture"]["file"].as_str().context("capture.file missing")?;
        Ok(Fixture { name: name.to_string(), capture: dir.join(file), spec })
    }

    fn bytes(&self, key: &str) -> Result<Vec<u8>> {
        let file = self.spec[key].as_str().with_context(|| format!("{key} missing"))?;
        let path = fixtures_dir().join(file);
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn side(&self, side: &str) -> &Value {
        &self.spec[side]
    }
}

fn tcp_replay(args: &[&str]) -> Result<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_tcp-replay"))
        .args(args)
        .output()
        .with_context(|| format!("running tcp-replay {args:?}"))?;
    let stdout = String::from_utf8(out.stdout).context("stdout is not UTF-8")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "tcp-replay {args:?} exited with {}: {stderr}", out.status);
    Ok((stdout, stderr))
}

/// Where two byte strings first differ, for a readable failure.
fn same_bytes(what: &str, got: &[u8], want: &[u8]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let show = |b: &[u8]| String::from_utf8_lossy(&b[at.min(b.len())..(at + 40).min(b.len())]).into_owned();
    bail!(
        "{what}: {} bytes reassembled, {} expected; first difference at offset {at}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    )
}

/// `tcp-replay conns` must describe the one connection as NAME.json does.
fn check_conns(fx: &Fixture) -> Result<Value> {
    let capture = fx.capture.to_str().context("path is not UTF-8")?;
    let (stdout, stderr) = tcp_replay(&["conns", capture])?;
    let conns: Vec<Value> =
        stdout.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("conns output is not JSON lines")?;
    ensure!(conns.len() == 1, "{}: {} connections, expected 1: {stdout}", fx.name, conns.len());
    let c = conns.into_iter().next().context("one connection")?;
    let spec = &fx.spec;
    let expect = |field: &str, got: &Value, want: &Value| -> Result<()> {
        ensure!(got == want, "{}: {field} is {got}, expected {want} (conns: {c}; stderr: {stderr})", fx.name);
        Ok(())
    };
    expect("client", &c["client"], &fx.side("client")["addr"])?;
    expect("server", &c["server"], &fx.side("server")["addr"])?;
    expect("state", &c["state"], &spec["state"])?;
    expect("handshake_seen", &c["handshake_seen"], &spec["handshake_seen"])?;
    expect("client_isn", &c["client_isn"], &fx.side("client")["isn"])?;
    expect("server_isn", &c["server_isn"], &fx.side("server")["isn"])?;
    for side in ["client", "server"] {
        let opts = &c[format!("{side}_options")];
        for key in ["mss", "wscale", "sack_permitted", "timestamps"] {
            expect(&format!("{side}_options.{key}"), &opts[key], &fx.side(side)[key])?;
        }
    }
    expect("c2s_bytes", &c["c2s_bytes"], &spec["bytes_c2s"])?;
    expect("s2c_bytes", &c["s2c_bytes"], &spec["bytes_s2c"])?;
    // Every byte was delivered in the end, so none can be missing from the capture.
    expect("c2s_gap_bytes", &c["c2s_gap_bytes"], &Value::from(0))?;
    expect("s2c_gap_bytes", &c["s2c_gap_bytes"], &Value::from(0))?;
    // Server segments lost on the client's side were captured twice.
    if spec["observed"]["retransmissions_s2c"].as_u64().unwrap_or(0) > 0 {
        ensure!(
            c["s2c_retransmitted_bytes"].as_u64().unwrap_or(0) > 0,
            "{}: tshark saw server retransmissions, tcp-replay none: {c}",
            fx.name
        );
    }
    println!("{}: {c}", fx.name);
    Ok(c)
}

/// `tcp-replay streams` must write exactly the applications' bytes.
fn check_streams(fx: &Fixture) -> Result<()> {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fixtures-{}-{}", fx.name, std::process::id()));
    let _ = fs::remove_dir_all(&out);
    let capture = fx.capture.to_str().context("path is not UTF-8")?;
    let (_, stderr) = tcp_replay(&["streams", capture, "--out", out.to_str().context("path is not UTF-8")?])?;
    let addr = |side: &str| -> Result<String> {
        Ok(fx.side(side)["addr"].as_str().context("addr missing")?.replace(':', "_"))
    };
    let base = format!("{}-{}", addr("client")?, addr("server")?);
    let mut files: Vec<String> =
        fs::read_dir(&out)?.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect::<Result<_>>()?;
    files.sort();
    ensure!(
        files == [format!("{base}.c2s"), format!("{base}.s2c")],
        "{}: stream files {files:?}, expected {base}.c2s/.s2c (stderr: {stderr})",
        fx.name
    );
    for ext in ["c2s", "s2c"] {
        let got = fs::read(out.join(format!("{base}.{ext}")))?;
        same_bytes(&format!("{} {ext}", fx.name), &got, &fx.bytes(ext)?)?;
    }
    fs::remove_dir_all(&out)?;
    Ok(())
}

/// FINs and RSTs, which `conns` does not print, through the library.
fn check_closes(fx: &Fixture) -> Result<()> {
    let mut reader = CaptureReader::new(File::open(&fx.capture)?)?;
    let mut flows = Flows::new(Checksums::Verify);
    while let Some(p) = reader.next_packet()? {
        flows.handle_packet(p.ts, p.data);
    }
    ensure!(flows.len() == 1, "{}: {} connections", fx.name, flows.len());
    let t = flows.connections()[0].tracker();
    let fin_from: Vec<&str> =
        fx.spec["fin_from"].as_array().context("fin_from")?.iter().filter_map(Value::as_str).collect();
    let rst_from = fx.spec["rst_from"].as_str();
    ensure!(fx.spec["reset"].as_bool() == Some(rst_from.is_some()), "{}: reset and rst_from disagree", fx.name);
    for (side, dir) in [("client", Dir::ToServer), ("server", Dir::ToClient)] {
        let e = t.sender(dir);
        ensure!(
            e.fin_seen == fin_from.contains(&side),
            "{}: {side} fin_seen {}, expected FINs from {fin_from:?}",
            fx.name,
            e.fin_seen
        );
        ensure!(
            e.rst_seen == (rst_from == Some(side)),
            "{}: {side} rst_seen {}, expected RST from {rst_from:?}",
            fx.name,
            e.rst_seen
        );
    }
    Ok(())
}

fn check(name: &str) -> Result<Value> {
    let fx = Fixture::load(name)?;
    let conn = check_conns(&fx)?;
    check_streams(&fx)?;
    check_closes(&fx)?;
    Ok(conn)
}

#[test]
fn every_fixture_has_a_test() -> Result<()> {
    let mut found: Vec<String> = fs::read_dir(fixtures_dir())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .collect();
    found.sort();
    let mut listed: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "fixtures on disk and FIXTURES differ");
    Ok(())
}

#[test]
fn bulk_with_all_options_and_loss_reassembles_exactly() -> Result<()> {
    let c = check("bulk-defaults")?;
    for side in ["client_options", "server_options"] {
        assert_eq!(c[side]["timestamps"], true);
        assert_eq!(c[side]["sack_permitted"], true);
        assert!(c[side]["wscale"].is_u64(), "{side}: no window scale: {c}");
    }
    Ok(())
}

#[test]
fn bulk_without_options_and_with_loss_reassembles_exactly() -> Result<()> {
    let c = check("bulk-nooptions")?;
    for side in ["client_options", "server_options"] {
        assert_eq!(c[side]["timestamps"], false);
        assert_eq!(c[side]["sack_permitted"], false);
        assert!(c[side]["wscale"].is_null(), "{side}: window scale offered: {c}");
    }
    Ok(())
}

#[test]
fn half_close_with_server_sending_after_client_fin_reassembles_exactly() -> Result<()> {
    check("halfclose")?;
    Ok(())
}

#[test]
fn server_reset_with_pending_data_is_seen_and_streams_end_at_reset() -> Result<()> {
    let c = check("reset")?;
    let fx = Fixture::load("reset")?;
    assert_eq!(c["state"], "CLOSE");
    // The RST really left data behind: the server application wrote more than arrived.
    let wrote = fx.spec["observed"]["server_app_wrote"].as_u64().context("server_app_wrote")?;
    assert!(wrote > c["s2c_bytes"].as_u64().context("s2c_bytes")?, "nothing was pending at the reset: {c}");
    Ok(())
}

#[test]
fn tiny_receive_window_with_zero_window_probes_reassembles_exactly() -> Result<()> {
    check("tinywin")?;
    let fx = Fixture::load("tinywin")?;
    assert!(fx.spec["observed"]["zero_window_probes"].as_u64().unwrap_or(0) > 0, "fixture has no zero-window probe");
    Ok(())
}

#[test]
fn sequence_numbers_wrapping_past_2_pow_32_in_both_directions_reassemble_exactly() -> Result<()> {
    let c = check("wrap")?;
    let isn = |k: &str| c[k].as_u64().with_context(|| format!("{k} missing"));
    let (client_isn, server_isn) = (isn("client_isn")?, isn("server_isn")?);
    let (c2s, s2c) = (c["c2s_bytes"].as_u64().context("c2s")?, c["s2c_bytes"].as_u64().context("s2c")?);
    // Not vacuous: both ISNs sit just below 2^32 and both streams run past it.
    assert_eq!(client_isn, 0xffff_0000);
    assert!(server_isn >= (1 << 32) - 140_000, "server ISN {server_isn:#x} is not near 2^32");
    assert!(client_isn + 1 + c2s > 1 << 32, "client stream does not wrap");
    assert!(server_isn + 1 + s2c > 1 << 32, "server stream does not wrap");
    Ok(())
}

#[test]
fn pcapng_capture_reassembles_exactly() -> Result<()> {
    check("pcapng")?;
    Ok(())
}

#[test]
fn linux_cooked_v1_capture_reassembles_exactly() -> Result<()> {
    check("cooked-sll")?;
    Ok(())
}

#[test]
fn linux_cooked_v2_capture_reassembles_exactly() -> Result<()> {
    check("cooked-sll2")?;
    Ok(())
}
