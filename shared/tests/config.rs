//! Node configuration as the binaries load it: flags parsed by clap, a TOML file on disk, defaults.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use shared::config::{
    BackupArgs, ConfigError, NodeConfig, PrimaryArgs, RetryPolicy, Setting, Upstream, Vip, format_duration,
};
use shared::protocol::Role;
use understudy_tests::tempdir::TempDir;

const EXAMPLE: &str = include_str!("fixtures/example.toml");

/// A scratch directory (`understudy_tests::tempdir`), unique per process and test, removed on drop.
struct Scratch(TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(TempDir::new("config").expect("create scratch dir"))
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write scratch file");
        path
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

const PRIMARY_FLAGS: &[&str] = &[
    "primary",
    "--vip",
    "10.0.0.100/24",
    "--iface",
    "eth0",
    "--repl-listen",
    "10.1.0.2:7700",
    "--upstream",
    "http://10.2.0.10:8080",
    "--insecure-replication",
];

fn primary(extra: &[&str]) -> Result<NodeConfig, ConfigError> {
    let args: Vec<&str> = PRIMARY_FLAGS.iter().chain(extra).copied().collect();
    NodeConfig::load(PrimaryArgs::try_parse_from(args).expect("flags parse"))
}

fn backup(extra: &[&str]) -> Result<NodeConfig, ConfigError> {
    let mut args = vec!["backup", "--join", "10.1.0.2:7700", "--repl-listen", "10.1.0.3:7700"];
    args.extend(&PRIMARY_FLAGS[1..5]);
    args.extend(&PRIMARY_FLAGS[7..]);
    args.extend(extra);
    NodeConfig::load(BackupArgs::try_parse_from(args).expect("flags parse"))
}

/// A valid primary file with `top` keys added (or replacing the base's) and `tail` appended (sections).
fn file_text(top: &[(&str, &str)], tail: &str) -> String {
    let mut keys: Vec<(String, String)> = [
        ("vip", "\"10.0.0.100/24\""),
        ("iface", "\"eth0\""),
        ("repl_listen", "\"10.1.0.2:7700\""),
        ("upstream", "\"http://10.2.0.10:8080\""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in top {
        match keys.iter_mut().find(|(key, _)| key == k) {
            Some(entry) => entry.1 = v.to_string(),
            None => keys.push((k.to_string(), v.to_string())),
        }
    }
    let mut text: String = keys.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k} = {v}\n")).collect();
    text.push_str(tail);
    text
}

fn from_file(role: Role, top: &[(&str, &str)], tail: &str) -> Result<NodeConfig, ConfigError> {
    NodeConfig::from_toml_str(role, &file_text(top, tail))
}

#[track_caller]
fn expect_error(result: Result<NodeConfig, ConfigError>, key: &str, words: &str) -> ConfigError {
    let err = match result {
        Ok(config) => panic!("expected an error about `{key}`, got a config: {config}"),
        Err(err) => err,
    };
    let text = err.to_string();
    assert_eq!(err.key(), Some(key), "error names the wrong key: {text}");
    assert!(text.contains(&format!("`{key}`")), "message does not name key `{key}`: {text}");
    assert!(text.contains(words), "message lacks {words:?}: {text}");
    err
}

#[test]
fn minimal_flags_get_documented_defaults() {
    let config = primary(&[]).expect("minimal primary loads");
    assert_eq!(config.role, Role::Primary);
    assert_eq!(config.vip, Vip { addr: Ipv4Addr::new(10, 0, 0, 100), prefix: 24 });
    assert_eq!(config.iface, "eth0");
    assert_eq!(config.port, 80);
    assert_eq!(config.repl_listen, "10.1.0.2:7700".parse::<SocketAddrV4>().unwrap());
    assert_eq!(config.join, None);
    assert_eq!(config.upstream, Some(Upstream { host: "10.2.0.10".into(), port: 8080 }));
    assert_eq!(config.root, None);
    assert_eq!(config.admin, None);
    assert_eq!(config.request_log, None);
    assert_eq!(config.cluster, "understudy");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("read hostname");
    assert_eq!(config.node, hostname.trim());

    let d = &config.detection;
    assert_eq!((d.heartbeat_interval, d.misses, d.lease), (Duration::from_millis(20), 5, None));
    assert_eq!(d.detection_time(), Duration::from_millis(100));
    let f = &config.fencing;
    assert_eq!((f.arp_probes, f.arp_timeout), (3, Duration::from_millis(15)));
    assert_eq!((&f.command, f.command_timeout), (&None, Duration::from_secs(1)));
    // Lease: detection + half the ARP time, between detection and detection + fencing.
    assert_eq!(config.lease(), Duration::from_micros(122_500));
    assert!(config.lease() > d.detection_time() && config.lease() < d.detection_time() + f.arp_time());
    assert!(d.detection_time() + f.arp_time() <= Duration::from_millis(200), "detect + fence within 200ms");
    assert_eq!(config.retry.non_idempotent, RetryPolicy::WithKey);
    assert!(!config.retry.origin_honours_generated_keys);
    let l = &config.limits;
    assert_eq!((l.max_header_bytes, l.max_headers, l.max_connections), (32768, 100, 10_000));
    assert_eq!((l.header_read_timeout, l.idle_timeout), (Duration::from_secs(10), Duration::from_secs(60)));
    assert_eq!((l.body_read_timeout, l.body_min_rate), (Duration::from_secs(20), 500));
    assert_eq!((l.replica_bytes_per_connection, l.reply_window(), l.client_send_buffer()), (1 << 20, 1 << 19, 1 << 18));
    assert_eq!(l.client_unsent_bytes(), 1 << 17);
    assert_eq!((config.queues.inbound, config.queues.outbound), (7701, 7702));
    let r = &config.replication;
    assert_eq!((r.max_frame_bytes, r.ack_max_records, r.ack_max_delay), (4 << 20, 64, Duration::ZERO));
    assert_eq!(config.validate().expect("valid"), vec![], "defaults draw no warning");
}

#[test]
fn file_alone_configures_a_backup() {
    let dir = Scratch::new();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let text = format!(
        r#"
vip = "192.168.5.10/16"
iface = "ens3"
port = 8080
repl_listen = "10.1.0.3:7700"
join = "10.1.0.2:7700"
root = "{}"
admin = 9901
request_log = "{}"
cluster = "shop"
node = "b-1"

[detection]
heartbeat_interval = "10ms"
misses = 8

[fencing]
arp_probes = 2
arp_timeout = "20ms"
command = ["/usr/local/sbin/fence", "--peer", "a-1"]
command_timeout = "500ms"

[retry]
non_idempotent = "never"
origin_honours_generated_keys = true

[limits]
max_header_bytes = 16384
max_headers = 50
header_read_timeout = "5s"
idle_timeout = "2m"
max_connections = 20

[queues]
inbound = 10
outbound = 11

[replication]
max_frame_bytes = 1048576
ack_max_records = 8
ack_max_delay = "2ms"
insecure = true
"#,
        www.display(),
        dir.path().join("requests.jsonl").display()
    );
    let path = dir.file("backup.toml", &text);
    let config = NodeConfig::load(BackupArgs::parse_from(["backup", "--config", path.to_str().unwrap()]))
        .expect("file-only backup loads");
    assert_eq!(config.role, Role::Backup);
    assert_eq!(config.vip.to_string(), "192.168.5.10/16");
    assert_eq!((config.iface.as_str(), config.port), ("ens3", 8080));
    assert_eq!(config.join, Some("10.1.0.2:7700".parse().unwrap()));
    assert_eq!(config.root.as_deref(), Some(www.as_path()));
    assert_eq!(config.upstream, None);
    assert_eq!(config.admin, Some("127.0.0.1:9901".parse::<SocketAddr>().unwrap()));
    assert_eq!(config.request_log, Some(dir.path().join("requests.jsonl")));
    assert_eq!((config.cluster.as_str(), config.node.as_str()), ("shop", "b-1"));
    assert_eq!(config.detection.detection_time(), Duration::from_millis(80));
    assert_eq!(config.fencing.command.as_ref().unwrap(), &["/usr/local/sbin/fence", "--peer", "a-1"]);
    assert_eq!(config.fencing.command_timeout, Duration::from_millis(500));
    assert_eq!(config.lease(), Duration::from_millis(100));
    assert_eq!(config.retry.non_idempotent, RetryPolicy::Never);
    assert!(config.retry.origin_honours_generated_keys);
    assert_eq!(config.limits.idle_timeout, Duration::from_secs(120));
    assert_eq!((config.limits.max_header_bytes, config.limits.max_connections), (16384, 20));
    assert_eq!((config.queues.inbound, config.queues.outbound), (10, 11));
    assert_eq!(config.replication.ack_max_delay, Duration::from_millis(2));
    assert!(config.replication.insecure);
}

#[test]
fn flags_override_the_file_key_by_key() {
    let dir = Scratch::new();
    let text = file_text(
        &[("port", "8080"), ("cluster", "\"from-file\""), ("node", "\"file-node\"")],
        "[detection]\nheartbeat_interval = \"30ms\"\nmisses = 4\n[retry]\nnon_idempotent = \"always\"\n",
    );
    let path = dir.file("primary.toml", &text);
    let www = dir.path().to_str().unwrap();
    let args = [
        "primary",
        "--config",
        path.to_str().unwrap(),
        "--port",
        "81",
        "--heartbeat-interval",
        "25ms",
        "--root",
        www,
        "--non-idempotent-retry",
        "never",
        "--origin-honours-generated-keys",
        "--node",
        "flag-node",
        "--insecure-replication",
    ];
    let config = NodeConfig::load(PrimaryArgs::parse_from(args)).expect("loads");
    assert_eq!(config.port, 81, "flag wins");
    assert_eq!(config.detection.heartbeat_interval, Duration::from_millis(25), "flag wins");
    assert_eq!(config.detection.misses, 4, "file kept where no flag");
    assert_eq!(config.cluster, "from-file", "file kept where no flag");
    assert_eq!(config.node, "flag-node");
    assert_eq!(config.retry.non_idempotent, RetryPolicy::Never);
    assert!(config.retry.origin_honours_generated_keys);
    // --root replaces the file's upstream instead of conflicting with it.
    assert_eq!((config.upstream.as_ref(), config.root.as_deref()), (None, Some(Path::new(www))));
    assert_eq!(config.vip.to_string(), "10.0.0.100/24", "file supplies what flags lack");
}

#[test]
fn unknown_keys_are_refused_with_their_name_and_place() {
    let err = expect_error(
        from_file(Role::Primary, &[("heartbeat_intervall", "\"20ms\"")], ""),
        "heartbeat_intervall",
        "unknown field",
    );
    let ConfigError::File { line, column, .. } = err else { panic!("not a file error: {err:?}") };
    assert_eq!((line, column), (5, 1));

    let text = "[detection]\nheartbeat_interval = \"20ms\"\nmises = 3\n";
    let err = expect_error(from_file(Role::Primary, &[], text), "detection.mises", "unknown field `mises`");
    assert!(err.to_string().contains("`misses`"), "suggests the real keys: {err}");
    expect_error(from_file(Role::Primary, &[], "[detections]\nmisses = 3\n"), "detections", "unknown field");
    expect_error(from_file(Role::Primary, &[], "limits = { max_header = 3 }\n"), "limits.max_header", "unknown");
    // The role comes from the binary, not the file.
    expect_error(from_file(Role::Primary, &[("role", "\"backup\"")], ""), "role", "unknown field");
}

#[test]
fn file_errors_name_path_line_and_key() {
    let dir = Scratch::new();
    let path = dir.file("bad.toml", &file_text(&[], "[limits]\nmax_headers = \"many\"\n"));
    let err = NodeConfig::load(PrimaryArgs::parse_from(["primary", "--config", path.to_str().unwrap()]))
        .expect_err("a string is not a count");
    let text = err.to_string();
    assert!(text.starts_with(&format!("{}:6:15: key `limits.max_headers`: ", path.display())), "{text}");
    assert!(text.contains("invalid type"), "{text}");

    let path = dir.file("syntax.toml", "vip = \n");
    let err = NodeConfig::load(PrimaryArgs::parse_from(["primary", "--config", path.to_str().unwrap()]))
        .expect_err("not TOML");
    assert!(matches!(err, ConfigError::File { line: 1, .. }), "{err:?}");

    let missing = dir.path().join("absent.toml");
    let err = NodeConfig::load(PrimaryArgs::parse_from(["primary", "--config", missing.to_str().unwrap()]))
        .expect_err("no such file");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.toml"), "{err}");
}

#[test]
fn bad_durations_name_the_key_or_flag() {
    let section = |v: &str| format!("[detection]\nheartbeat_interval = {v}\n");
    expect_error(from_file(Role::Primary, &[], &section("\"20\"")), "detection.heartbeat_interval", "missing unit");
    expect_error(from_file(Role::Primary, &[], &section("\"1.5s\"")), "detection.heartbeat_interval", "fractions");
    expect_error(
        from_file(Role::Primary, &[], &section("\"20 jiffies\"")),
        "detection.heartbeat_interval",
        "unknown unit",
    );
    expect_error(from_file(Role::Primary, &[], &section("20")), "detection.heartbeat_interval", "with a unit");
    expect_error(
        from_file(Role::Primary, &[], "[limits]\nidle_timeout = \"forever\"\n"),
        "limits.idle_timeout",
        "whole number",
    );
    expect_error(
        from_file(Role::Primary, &[], "[fencing]\narp_timeout = \"10xs\"\n"),
        "fencing.arp_timeout",
        "unknown unit",
    );

    for (flag, value, words) in [
        ("--heartbeat-interval", "20", "missing unit"),
        ("--lease", "0.1s", "fractions"),
        ("--lease", "x", "whole number"),
    ] {
        let args: Vec<&str> = PRIMARY_FLAGS.iter().copied().chain([flag, value]).collect();
        let err = PrimaryArgs::try_parse_from(args).expect_err("bad duration flag");
        let text = err.to_string();
        assert!(text.contains(flag) && text.contains(words), "{text}");
    }
}

#[test]
fn other_bad_values_name_the_flag() {
    for (flag, value, words) in [
        ("--vip", "10.0.0.100", "PREFIX"),
        ("--upstream", "https://origin", "not supported yet"),
        ("--admin", "nowhere", "ADDR:PORT"),
        ("--port", "http", "invalid digit"),
        ("--non-idempotent-retry", "sometimes", "with-key"),
    ] {
        let args: Vec<&str> = PRIMARY_FLAGS.iter().copied().chain([flag, value]).collect();
        let text = PrimaryArgs::try_parse_from(args).expect_err("bad value").to_string();
        assert!(text.contains(flag) && text.contains(words), "{flag} {value}: {text}");
    }
    let args: Vec<&str> = PRIMARY_FLAGS.iter().copied().chain(["--join", "10.1.0.3:7700"]).collect();
    let err = PrimaryArgs::try_parse_from(args).expect_err("primary has no --join");
    assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    expect_error(from_file(Role::Primary, &[("vip", "\"10.0.0.1/abc\"")], ""), "vip", "prefix must be a number");
    expect_error(from_file(Role::Primary, &[("port", "70000")], ""), "port", "u16");
    expect_error(from_file(Role::Primary, &[("upstream", "\"http://o/api\"")], ""), "upstream", "paths");
}

#[test]
fn addresses_and_roles_are_validated() {
    expect_error(primary(&["--vip", "10.0.0.100/0"]), "vip", "1..=32");
    expect_error(primary(&["--vip", "10.0.0.100/33"]), "vip", "--vip");
    expect_error(primary(&["--vip", "10.0.0.255/24"]), "vip", "broadcast");
    expect_error(primary(&["--iface", "eth0:1"]), "iface", "--iface");
    expect_error(primary(&["--port", "0"]), "port", "--port");
    expect_error(primary(&["--repl-listen", "10.1.0.2:0"]), "repl_listen", "port 0");
    expect_error(primary(&["--repl-listen", "10.0.0.100:7700"]), "repl_listen", "VIP moves");
    expect_error(primary(&["--repl-listen", "0.0.0.0:80"]), "repl_listen", "clients' connections");
    expect_error(primary(&["--admin", "0.0.0.0:80"]), "admin", "overlaps the service");
    expect_error(primary(&["--admin", "10.1.0.2:7700"]), "admin", "--repl-listen");
    expect_error(primary(&["--cluster", "my cluster"]), "cluster", "--cluster");
    expect_error(primary(&["--node", ""]), "node", "--node");

    let err = expect_error(from_file(Role::Primary, &[("vip", "")], ""), "vip", "--vip");
    assert!(matches!(err, ConfigError::Missing { .. }), "{err:?}");
    expect_error(from_file(Role::Primary, &[("iface", "")], ""), "iface", "required");
    expect_error(from_file(Role::Primary, &[("repl_listen", "")], ""), "repl_listen", "required");

    // Roles: the backup must join, the primary must not, and not itself.
    expect_error(from_file(Role::Primary, &[("join", "\"10.1.0.3:7700\"")], ""), "join", "only a backup");
    expect_error(from_file(Role::Backup, &[], ""), "join", "required");
    expect_error(backup(&["--join", "10.1.0.3:7700"]), "join", "not its own");
    expect_error(backup(&["--join", "0.0.0.0:7700"]), "join", "not an address");
    expect_error(backup(&["--join", "10.0.0.100:7700"]), "join", "VIP moves");
    assert_eq!(backup(&[]).expect("valid backup").role, Role::Backup);
}

#[test]
fn origin_is_exactly_one_of_upstream_and_root() {
    let dir = Scratch::new();
    let err = expect_error(from_file(Role::Primary, &[("root", "\"/srv\"")], ""), "upstream", "exactly one");
    assert!(err.to_string().contains("--root"), "{err}");
    expect_error(from_file(Role::Primary, &[("upstream", "")], ""), "upstream", "--root DIR");

    // Paths are checked on load: --root must be a directory, the request log's directory must exist.
    let file = dir.file("not-a-dir", "x");
    let mut args: Vec<&str> = PRIMARY_FLAGS[..7].to_vec();
    args.extend(["--root", file.to_str().unwrap()]);
    let err = NodeConfig::load(PrimaryArgs::parse_from(args.iter().copied())).expect_err("root is a file");
    assert!(err.to_string().contains("--root") && err.to_string().contains("not a directory"), "{err}");
    let absent = dir.path().join("absent");
    args[8] = absent.to_str().unwrap();
    let err = NodeConfig::load(PrimaryArgs::parse_from(args.iter().copied())).expect_err("root is absent");
    assert_eq!(err.key(), Some("root"), "{err}");
    let log = absent.join("requests.jsonl");
    expect_error(primary(&["--request-log", log.to_str().unwrap()]), "request_log", "does not exist");
    let log = dir.path().join("requests.jsonl");
    assert_eq!(primary(&["--request-log", log.to_str().unwrap()]).unwrap().request_log, Some(log));
}

#[test]
fn detection_lease_and_fencing_are_validated() {
    expect_error(primary(&["--heartbeat-misses", "0"]), "detection.misses", "--heartbeat-misses");
    expect_error(primary(&["--heartbeat-interval", "500us"]), "detection.heartbeat_interval", "at least 1ms");
    expect_error(primary(&["--lease", "20ms"]), "detection.lease", "between two heartbeats");
    expect_error(primary(&["--lease", "145ms"]), "detection.lease", "shorter than detection + ARP fencing");
    assert_eq!(primary(&["--lease", "144ms"]).unwrap().lease(), Duration::from_millis(144));
    expect_error(
        from_file(Role::Primary, &[], "[fencing]\narp_probes = 0\n"),
        "fencing.arp_probes",
        "cannot be turned off",
    );
    expect_error(from_file(Role::Primary, &[], "[fencing]\narp_timeout = \"0ms\"\n"), "fencing.arp_timeout", "1ms");
    expect_error(from_file(Role::Primary, &[], "[fencing]\ncommand = []\n"), "fencing.command", "program");
    expect_error(from_file(Role::Primary, &[], "[fencing]\ncommand = [\"\"]\n"), "fencing.command", "program");
    expect_error(
        from_file(Role::Primary, &[], "[fencing]\ncommand_timeout = \"0s\"\n"),
        "fencing.command_timeout",
        "zero",
    );

    // Allowed, with a warning: slow detection, a single miss, a lease shorter than detection.
    let warned = |extra: &[&str]| primary(extra).expect("valid").validate().expect("valid");
    let w = warned(&["--heartbeat-interval", "50ms"]);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].setting, Setting::HEARTBEAT_INTERVAL);
    assert!(w[0].to_string().contains("250ms is above 200ms"), "{}", w[0]);
    let w = warned(&["--heartbeat-misses", "1", "--heartbeat-interval", "100ms"]);
    assert_eq!(w.iter().map(|w| w.setting).collect::<Vec<_>>(), [Setting::MISSES]);
    let w = warned(&["--lease", "60ms"]);
    assert_eq!(w.iter().map(|w| w.setting).collect::<Vec<_>>(), [Setting::LEASE]);
}

#[test]
fn limits_queues_and_replication_are_validated() {
    let check = |tail: &str, key: &str, words: &str| {
        expect_error(from_file(Role::Primary, &[], tail), key, words);
    };
    check("[limits]\nmax_header_bytes = 4096\n", "limits.max_header_bytes", "RFC 9112");
    check("[limits]\nmax_header_bytes = 2000000\n", "limits.max_header_bytes", "8192..=1048576");
    check("[limits]\nmax_headers = 0\n", "limits.max_headers", "8..=10000");
    check("[limits]\nheader_read_timeout = \"0s\"\n", "limits.header_read_timeout", "zero");
    check("[limits]\nidle_timeout = \"0ms\"\n", "limits.idle_timeout", "zero");
    check("[limits]\nmax_connections = 0\n", "limits.max_connections", "at least 1");
    check("[limits]\nmax_connections = -1\n", "limits.max_connections", "u32");
    check("[limits]\nbody_read_timeout = \"0s\"\n", "limits.body_read_timeout", "zero");
    check("[limits]\nbody_read_timeout = \"soon\"\n", "limits.body_read_timeout", "soon");
    check("[limits]\nbody_min_rate = 2000000000\n", "limits.body_min_rate", "0..=1000000000");
    check("[limits]\nreplica_bytes_per_connection = 1000\n", "limits.replica_bytes_per_connection", "65536..=");
    check("[limits]\nreplica_bytes_per_connection = 1000000000\n", "limits.replica_bytes_per_connection", "268435456");
    check("[queues]\ninbound = 5\noutbound = 5\n", "queues.inbound", "queues.outbound");
    check("[queues]\ninbound = 65536\n", "queues.inbound", "u16");
    check("[replication]\nmax_frame_bytes = 65536\n", "replication.max_frame_bytes", "64 KiB");
    check("[replication]\nmax_frame_bytes = 4294967295\n", "replication.max_frame_bytes", "67108864");
    check("[replication]\nack_max_records = 0\n", "replication.ack_max_records", "at least 1");
    check("[replication]\nack_max_delay = \"20ms\"\n", "replication.ack_max_delay", "heartbeat");
}

#[test]
fn help_explains_every_flag_with_its_key() {
    for (mut command, role) in [(PrimaryArgs::command(), "primary"), (BackupArgs::command(), "backup")] {
        let help = command.render_long_help().to_string();
        let args: Vec<clap::Arg> = command.get_arguments().cloned().collect();
        assert!(args.len() >= 16, "{role}: {} flags", args.len());
        for arg in &args {
            let long = arg.get_long().unwrap_or_else(|| panic!("{role}: {:?} has no long flag", arg.get_id()));
            assert!(help.contains(&format!("--{long}")), "{role} --help lacks --{long}");
            let text = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
            assert!(!text.is_empty(), "{role} --{long} is not explained");
            if !["config", "help", "version"].contains(&long) {
                assert!(text.len() > 40, "{role} --{long} is barely explained: {text:?}");
                assert!(text.contains("[key: "), "{role} --{long} does not name its key: {text}");
                assert!(text.contains("[default: ") || text.contains("Required"), "{role} --{long}: {text}");
            }
        }
        for words in ["[default: 80]", "[default: 20ms]", "[default: 5]", "[default: with-key]", "never", "always"] {
            assert!(help.contains(words), "{role} --help lacks {words:?}");
        }
        assert!(help.contains("then the --config file, then flags"), "{role} --help explains the loading order");
        command.debug_assert();
    }
    let backup_help = BackupArgs::command().render_long_help().to_string();
    assert!(backup_help.contains("--join"));
    assert!(!PrimaryArgs::command().render_long_help().to_string().contains("--join"));
}

#[test]
fn every_flag_maps_to_the_key_its_errors_name() {
    let settings = [
        Setting::VIP,
        Setting::IFACE,
        Setting::PORT,
        Setting::REPL_LISTEN,
        Setting::JOIN,
        Setting::UPSTREAM,
        Setting::ROOT,
        Setting::ADMIN,
        Setting::ADMIN_TOKEN_FILE,
        Setting::REQUEST_LOG,
        Setting::CLUSTER,
        Setting::NODE,
        Setting::HEARTBEAT_INTERVAL,
        Setting::MISSES,
        Setting::LEASE,
        Setting::NON_IDEMPOTENT,
        Setting::ORIGIN_HONOURS_GENERATED_KEYS,
        Setting::PSK_FILE,
        Setting::INSECURE_REPLICATION,
    ];
    let command = BackupArgs::command();
    for setting in settings {
        let flag = setting.flag.expect("has a flag");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == flag))
            .unwrap_or_else(|| panic!("{flag} is not a flag of backup"));
        let help = arg.get_long_help().or(arg.get_help()).unwrap().to_string();
        assert!(help.contains(&format!("[key: {}]", setting.key)), "{flag}: {help}");
    }
    let flags = command
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| !["config", "help", "version"].contains(&l)))
        .count();
    assert_eq!(flags, settings.len(), "a flag without a Setting");
}

#[test]
fn example_file_is_valid_and_lists_every_key() {
    let config = NodeConfig::from_toml_str(Role::Primary, EXAMPLE).expect("example.toml is valid");
    assert_eq!(config.validate().expect("valid"), vec![]);
    assert_eq!(config.node, "node-a");

    // Every key of a fully populated config appears in the example, set or commented out, in its section.
    let mut full = config.clone();
    full.role = Role::Backup;
    full.join = Some("10.1.0.2:7700".parse().unwrap());
    full.root = Some("/srv/www".into());
    full.request_log = Some("/var/log/requests.jsonl".into());
    full.admin_token_file = Some("/etc/understudy/admin.token".into());
    full.detection.lease = Some(Duration::from_millis(120));
    full.fencing.command = Some(vec!["/bin/true".into()]);
    let table: toml::Table = toml::from_str(&full.to_toml_string()).unwrap();
    let section_text = |name: &str| -> &str {
        let start = EXAMPLE.find(&format!("\n[{name}]\n")).unwrap_or_else(|| panic!("no [{name}] in example"));
        let rest = &EXAMPLE[start + 1..];
        &rest[..rest[1..].find("\n[").map_or(rest.len(), |i| i + 1)]
    };
    let top_text = &EXAMPLE[..EXAMPLE.find("\n[").unwrap()];
    let mentions = |text: &str, key: &str| {
        text.lines().any(|l| l.trim_start_matches(['#', ' ']).starts_with(&format!("{key} = ")))
    };
    for (key, value) in &table {
        match value.as_table() {
            Some(section) => {
                let text = section_text(key);
                for inner in section.keys() {
                    assert!(mentions(text, inner), "example.toml lacks {key}.{inner}");
                }
            }
            None => assert!(mentions(top_text, key), "example.toml lacks {key}"),
        }
    }
    assert!(table.len() >= 17, "{table:?}");
}

#[test]
fn toml_form_reads_back_unchanged() {
    let mut config = primary(&["--admin", "9900", "--lease", "110ms"]).unwrap();
    config.fencing.command = Some(vec!["/bin/fence".into(), "--now".into()]);
    config.limits.header_read_timeout = Duration::from_micros(2_500_100);
    let text = config.to_toml_string();
    assert_eq!(NodeConfig::from_toml_str(Role::Primary, &text).expect("reads back"), config, "{text}");

    // Deserializing NodeConfig directly reads a complete file; `join` makes it a backup.
    let direct: NodeConfig = toml::from_str(&file_text(&[("join", "\"10.1.0.9:7700\"")], "")).unwrap();
    assert_eq!(direct.role, Role::Backup);
    let err = toml::from_str::<NodeConfig>("vip = \"10.0.0.100/24\"\n").expect_err("incomplete");
    assert!(err.to_string().contains("--iface"), "{err}");
}

#[test]
fn summary_line_shows_the_effective_settings() {
    let config = backup(&["--admin", "9900"]).unwrap();
    let line = config.to_string();
    for words in [
        "role=backup",
        "cluster=understudy",
        "vip=10.0.0.100/24",
        "iface=eth0",
        "port=80",
        "repl_listen=10.1.0.3:7700",
        "join=10.1.0.2:7700",
        "upstream=http://10.2.0.10:8080",
        "admin=127.0.0.1:9900",
        "request_log=none",
        "heartbeat_interval=20ms misses=5 detection=100ms",
        &format!("lease={}", format_duration(config.lease())),
        "arp_probes=3 arp_timeout=15ms",
        "non_idempotent=with-key",
        "queues=7701/7702",
        "max_frame_bytes=4194304",
    ] {
        assert!(line.contains(words), "summary lacks {words:?}: {line}");
    }
    assert!(!line.contains('\n'), "one line: {line}");
}

/// Flags of a primary with neither a key nor --insecure-replication.
fn primary_without_auth(extra: &[&str]) -> Result<NodeConfig, ConfigError> {
    let args: Vec<&str> =
        PRIMARY_FLAGS.iter().filter(|f| **f != "--insecure-replication").chain(extra).copied().collect();
    NodeConfig::load(PrimaryArgs::try_parse_from(args).expect("flags parse"))
}

fn private_file(dir: &Scratch, name: &str, text: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.file(name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.display().to_string()
}

#[test]
fn a_node_without_a_key_refuses_to_start_unless_told_insecure() {
    let err = primary_without_auth(&[]).unwrap_err();
    assert!(matches!(err, ConfigError::Missing { setting: Setting::PSK_FILE, .. }), "{err}");
    assert!(err.to_string().contains("--insecure-replication"), "{err}");
    let config = primary(&[]).expect("insecure, explicitly");
    assert!(config.replication.insecure);
    assert_eq!(config.link_auth(), shared::auth::LinkAuth::Insecure);
}

#[test]
fn a_key_file_is_read_at_load_and_bad_ones_are_refused_with_the_reason() {
    let dir = Scratch::new();
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let good = private_file(&dir, "psk", &format!("{key}\n"), 0o600);
    let config = primary_without_auth(&["--psk-file", &good]).expect("a good key");
    assert!(config.link_auth().is_secure());
    assert!(!format!("{config:?} {config}").contains(key), "the key is never printed");

    let text = |r: Result<NodeConfig, ConfigError>| r.unwrap_err().to_string();
    let open = private_file(&dir, "open", key, 0o644);
    let e = text(primary_without_auth(&["--psk-file", &open]));
    assert!(e.contains("--psk-file") && e.contains("readable by other users") && e.contains("0644"), "{e}");
    let short = private_file(&dir, "short", "0011223344", 0o600);
    let e = text(primary_without_auth(&["--psk-file", &short]));
    assert!(e.contains("5 bytes of key; at least 16"), "{e}");
    let not_hex = private_file(&dir, "b64", "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=", 0o600);
    let e = text(primary_without_auth(&["--psk-file", &not_hex]));
    assert!(e.contains("not a hex digit"), "{e}");
    let absent = dir.path().join("absent").display().to_string();
    let e = text(primary_without_auth(&["--psk-file", &absent]));
    assert!(e.contains("cannot read the pre-shared key file") && e.contains("absent"), "{e}");
    let e = text(primary(&["--psk-file", &good]));
    assert!(e.contains("conflict"), "{e}");

    // The file's key works the same way as the flag.
    let file = dir.file("node.toml", &file_text(&[], &format!("[replication]\npsk_file = {good:?}\n")));
    let config = primary_without_auth(&["--config", &file.display().to_string()]).expect("key from the file");
    assert_eq!(config.psk, primary_without_auth(&["--psk-file", &good]).unwrap().psk);
}

#[test]
fn an_admin_endpoint_other_hosts_reach_needs_a_token_file_read_at_load() {
    let dir = Scratch::new();
    let text = |r: Result<NodeConfig, ConfigError>| r.unwrap_err().to_string();
    let e = text(primary(&["--admin", "0.0.0.0:9900"]));
    assert!(e.contains("--admin-token-file") && e.contains("other hosts"), "{e}");
    let e = text(backup(&["--admin", "10.0.0.5:9900"]));
    assert!(e.contains("--admin-token-file"), "{e}");
    assert_eq!(primary(&["--admin", "9900"]).expect("loopback needs no token").admin_token, None);

    let good = private_file(&dir, "token", "s3cr3t-Token_1\n", 0o600);
    let config = primary(&["--admin", "0.0.0.0:9900", "--admin-token-file", &good]).expect("a good token");
    assert_eq!(config.admin_token.as_deref(), Some("s3cr3t-Token_1"));
    assert!(!format!("{config}").contains("s3cr3t"), "the token is never printed");
    // On loopback a token is allowed too, and then enforced.
    let config = primary(&["--admin", "9900", "--admin-token-file", &good]).expect("token on loopback");
    assert!(config.admin_token.is_some());

    let open = private_file(&dir, "open", "s3cr3t", 0o644);
    let e = text(primary(&["--admin", "0.0.0.0:9900", "--admin-token-file", &open]));
    assert!(e.contains("--admin-token-file") && e.contains("other users") && e.contains("644"), "{e}");
    let bad = private_file(&dir, "bad", "two words", 0o600);
    let e = text(primary(&["--admin", "0.0.0.0:9900", "--admin-token-file", &bad]));
    assert!(e.contains("only letters, digits"), "{e}");
    let empty = private_file(&dir, "empty", "\n", 0o600);
    let e = text(primary(&["--admin", "0.0.0.0:9900", "--admin-token-file", &empty]));
    assert!(e.contains("empty"), "{e}");
    let absent = dir.path().join("absent").display().to_string();
    let e = text(primary(&["--admin", "0.0.0.0:9900", "--admin-token-file", &absent]));
    assert!(e.contains("cannot read") && e.contains("absent"), "{e}");
    let e = text(primary(&["--admin-token-file", &good]));
    assert!(e.contains("--admin") && e.contains("off"), "{e}");

    // The file's key works the same way as the flag.
    let file =
        dir.file("node.toml", &file_text(&[], &format!("admin = \"0.0.0.0:9900\"\nadmin_token_file = {good:?}\n")));
    let config = primary(&["--config", &file.display().to_string()]).expect("token from the file");
    assert_eq!(config.admin_token.as_deref(), Some("s3cr3t-Token_1"));
}
