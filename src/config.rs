//! Everything the driver is told at start: the command line (clap's builder API, so no
//! proc-macro crates in the build) and the `Config` it fills.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{value_parser, Arg, ArgMatches, Command};

use crate::logging::LogFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Beside csi-provisioner: Identity and Controller.
    Controller,
    /// Beside kubelet on every node: Identity and Node.
    Node,
}

/// What happens to a node's copy of a volume when its last publish on that node goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOnUnpublish {
    /// Kept for the next pod on this node (a cache); removed when the volume is deleted.
    Keep,
    /// Deleted as soon as no target on this node uses it (scratch space).
    Delete,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub driver_name: String,
    /// Node id reported to the CO; empty in controller mode.
    pub node_name: String,
    pub csi_socket: PathBuf,
    /// Where each node keeps `<volume-id>/`.
    pub base_dir: PathBuf,
    /// Targets must lie below this dir: the kubelet root as kubelet names it.
    pub kubelet_dir: PathBuf,
    pub data_on_unpublish: DataOnUnpublish,
    /// Threads that run mount, unmount, stats and delete work.
    pub workers: usize,
    /// Calls waiting for a worker beyond this are refused with UNAVAILABLE.
    pub queue_depth: usize,
    /// How long a computed volume usage is reused.
    pub stats_cache_ttl: Duration,
    /// How long SIGTERM waits for calls in flight.
    pub shutdown_timeout: Duration,
    /// Testing only: every publish sleeps this long before mounting.
    pub test_publish_delay: Duration,
    /// Testing only (no flag): a deleting unpublish that found another call on the volume
    /// under way keeps its target this long before it lets go.
    pub test_unpublish_delay: Duration,
    /// The node's cache budget: bytes all copies together may hold (0: no limit of its own).
    pub max_cache_bytes: u64,
    /// The node's cache budget: free space to keep on the base dir's filesystem, in percent of
    /// its size (0: none).
    pub min_free_percent: u8,
    /// How often the eviction pass looks at the node's copies.
    pub eviction_interval: Duration,
}

impl Config {
    /// Defaults for everything but the mode; used by tests and as the flags' defaults.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            driver_name: "node-local-cache.csi.io".into(),
            node_name: String::new(),
            csi_socket: "/csi/csi.sock".into(),
            base_dir: "/var/node-local-cache".into(),
            kubelet_dir: "/var/lib/kubelet".into(),
            data_on_unpublish: DataOnUnpublish::Keep,
            workers: 4,
            queue_depth: 256,
            stats_cache_ttl: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            test_publish_delay: Duration::ZERO,
            test_unpublish_delay: Duration::ZERO,
            max_cache_bytes: 0,
            // kubelet's default hard eviction starts at 15 % free on the image filesystem, which
            // is the root filesystem on most nodes: 5 points above it leave a pass time to act.
            min_free_percent: 20,
            eviction_interval: Duration::from_secs(60),
        }
    }
}

/// The longest duration a flag takes.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `250ms`, `30s`, `5m`, `1h`, `24h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 1h)"))?;
    let secs = |per: u64| n.checked_mul(per).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    // Every duration here is added to a clock reading somewhere; past a year is a typo.
    d.filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("{s:?} is too long a duration (a year at most)"))
}

/// `50Gi`, `512Mi`, `10G`, `1000000`: binary (Ki, Mi, Gi, Ti) or decimal (k, M, G, T) units; a
/// bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 50Gi, 10G, 1048576)"))?;
    let scale: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use Ki, Mi, Gi, Ti, k, M, G or T)"
            ))
        }
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too large"))
}

/// A percentage from 0 to 99.
pub fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(p) if p < 100 => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 99")),
    }
}

/// What the command line sets besides `Config`: what `main` wires around the CSI services.
#[derive(Debug)]
pub struct Flags {
    /// Everything but `csi_socket`, which `main` resolves from the flag below.
    pub config: Config,
    /// As given: a path or `unix:///path`.
    pub csi_socket: String,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    /// Empty: no metrics endpoint.
    pub metrics_addr: String,
    pub kube_api_url: Option<String>,
    pub kube_token_file: Option<PathBuf>,
    pub kube_ca_file: Option<PathBuf>,
    pub namespace: Option<String>,
    pub cleanup_poll_interval: Duration,
    pub cleanup_timeout: Duration,
    pub cleanup_retention: Duration,
    pub orphan_grace: Duration,
}

/// `--name <VALUE>`, with its help line.
fn opt(name: &'static str, value: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).value_name(value).help(help)
}

fn duration(name: &'static str, value: &'static str, default: &'static str, help: &'static str) -> Arg {
    opt(name, value, help)
        .default_value(default)
        .value_parser(parse_duration)
}

fn path(name: &'static str, value: &'static str, help: &'static str) -> Arg {
    opt(name, value, help).value_parser(value_parser!(PathBuf))
}

/// Every flag of `node-local-cache`, with its default and environment variable.
pub fn command() -> Command {
    Command::new("node-local-cache")
        .version(env!("CARGO_PKG_VERSION"))
        .about(env!("CARGO_PKG_DESCRIPTION"))
        .args([
            opt("mode", "MODE", "Which half of the driver to run")
                .required(true)
                .value_parser(["controller", "node"]),
            opt("csi-socket", "CSI_SOCKET", "Unix socket to serve CSI on: a path or unix:///path")
                .default_value("/csi/csi.sock"),
            opt("node-name", "NODE_NAME", "This node's name, reported as the CSI node id (required in node mode)")
                .env("NODE_NAME"),
            path("base-dir", "BASE_DIR", "Where each node keeps <volume-id>/ directories").default_value("/var/node-local-cache"),
            path("kubelet-dir", "KUBELET_DIR", "Kubelet's root dir; publish targets must lie below it")
                .default_value("/var/lib/kubelet"),
            opt(
                "driver-name",
                "DRIVER_NAME",
                "CSI driver name (as in the CSIDriver object and the StorageClass provisioner)",
            )
            .default_value("node-local-cache.csi.io"),
            opt(
                "data-on-unpublish",
                "DATA_ON_UNPUBLISH",
                "What a node does with its copy when no pod on it uses the volume any more",
            )
            .default_value("keep")
            .value_parser(["keep", "delete"]),
            opt("workers", "WORKERS", "Threads for mount, unmount, stats and delete work")
                .default_value("4")
                .value_parser(value_parser!(usize)),
            duration(
                "stats-cache-ttl",
                "STATS_CACHE_TTL",
                "60s",
                "How long a measured volume usage is reused by NodeGetVolumeStats",
            ),
            duration(
                "shutdown-timeout",
                "SHUTDOWN_TIMEOUT",
                "10s",
                "How long SIGTERM waits for calls in flight before cancelling them",
            ),
            opt(
                "metrics-addr",
                "METRICS_ADDR",
                "Address for /metrics, /livez and /readyz (\":9809\" is every IPv4 and IPv6 address); empty turns it off",
            )
            .default_value(":9809"),
            opt(
                "kube-api-url",
                "KUBE_API_URL",
                "Kubernetes API URL (default: in-cluster from KUBERNETES_SERVICE_HOST/PORT). Without one the driver runs standalone and DeleteVolume only logs",
            ),
            path(
                "kube-token-file",
                "KUBE_TOKEN_FILE",
                "Bearer token file, re-read when it changes (default: the service account's)",
            ),
            path(
                "kube-ca-file",
                "KUBE_CA_FILE",
                "CA bundle the API server's certificate is verified against (default: the service account's)",
            ),
            opt(
                "namespace",
                "NAMESPACE",
                "Namespace holding the cleanup records (default: the service account's)",
            )
            .env("POD_NAMESPACE"),
            duration(
                "cleanup-poll-interval",
                "CLEANUP_POLL_INTERVAL",
                "30s",
                "How often nodes (and the controller) poll for cleanup work, with jitter",
            ),
            duration(
                "cleanup-timeout",
                "CLEANUP_TIMEOUT",
                "60s",
                "How long the controller waits for every node before releasing a deleted volume's PV",
            ),
            duration(
                "cleanup-retention",
                "CLEANUP_RETENTION",
                "24h",
                "How long a finished cleanup record is kept for nodes that were down",
            ),
            duration(
                "orphan-grace",
                "ORPHAN_GRACE",
                "1h",
                "How long a node keeps a volume dir whose PV is gone before deleting it",
            ),
            opt(
                "max-cache-bytes",
                "BYTES",
                "The node's cache budget: bytes all copies together may hold (50Gi, 10G, ...; 0: no limit of its own). Over it, idle copies are evicted, least recently used first",
            )
            .default_value("0")
            .value_parser(parse_size),
            opt(
                "min-free-percent",
                "PERCENT",
                "The node's cache budget: percent of the base dir's filesystem to keep free (0: none). The default stays clear of kubelet's default DiskPressure threshold (15 % free)",
            )
            .default_value("20")
            .value_parser(parse_percent),
            duration(
                "eviction-interval",
                "EVICTION_INTERVAL",
                "60s",
                "How often the node holds its copies to their capacities and its cache budget",
            ),
            opt("log-format", "LOG_FORMAT", "Log line format")
                .default_value("text")
                .value_parser(["text", "json"]),
            opt(
                "log-level",
                "LOG_LEVEL",
                "Log filter (error, warn, info, debug, trace, or env_logger syntax); overrides RUST_LOG",
            ),
            // Testing only: delay every publish, so tests can catch a call in flight.
            duration("test-publish-delay", "TEST_PUBLISH_DELAY", "0s", "").hide(true),
        ])
}

impl Flags {
    /// The process's own command line; bad usage prints clap's message and exits 2.
    pub fn from_env() -> Result<Flags, String> {
        Flags::from_matches(&command().get_matches())
    }

    /// For tests: `args` without the program name.
    pub fn parse_from<I: Into<OsString> + Clone>(args: impl IntoIterator<Item = I>) -> Result<Flags, String> {
        let argv = std::iter::once(OsString::from("node-local-cache")).chain(args.into_iter().map(Into::into));
        let matches = command().try_get_matches_from(argv).map_err(|e| e.to_string())?;
        Flags::from_matches(&matches)
    }

    fn from_matches(m: &ArgMatches) -> Result<Flags, String> {
        let text = |id: &str| m.get_one::<String>(id).cloned();
        let path = |id: &str| m.get_one::<PathBuf>(id).cloned();
        let duration = |id: &str| m.get_one::<Duration>(id).copied().unwrap_or_default();
        let mode = match text("mode").as_deref() {
            Some("node") => Mode::Node,
            _ => Mode::Controller,
        };
        let mut cfg = Config::new(mode);
        let driver_name = text("driver-name").unwrap_or_default();
        if !valid_driver_name(&driver_name) {
            return Err(format!(
                "--driver-name {driver_name:?}: want at most 63 characters of [a-z0-9.-], alphanumeric at both ends"
            ));
        }
        cfg.driver_name = driver_name;
        cfg.node_name = text("node-name").unwrap_or_default();
        if mode == Mode::Node && cfg.node_name.is_empty() {
            return Err("--node-name (or NODE_NAME) is required in node mode".into());
        }
        for (flag, dir) in [("base-dir", &mut cfg.base_dir), ("kubelet-dir", &mut cfg.kubelet_dir)] {
            if let Some(p) = path(flag) {
                if !p.is_absolute() {
                    return Err(format!("--{flag} {}: must be an absolute path", p.display()));
                }
                *dir = p;
            }
        }
        if text("data-on-unpublish").as_deref() == Some("delete") {
            cfg.data_on_unpublish = DataOnUnpublish::Delete;
        }
        cfg.workers = m.get_one::<usize>("workers").copied().unwrap_or(cfg.workers).max(1);
        cfg.stats_cache_ttl = duration("stats-cache-ttl");
        cfg.shutdown_timeout = duration("shutdown-timeout");
        cfg.test_publish_delay = duration("test-publish-delay");
        cfg.max_cache_bytes = m.get_one::<u64>("max-cache-bytes").copied().unwrap_or_default();
        cfg.min_free_percent = m.get_one::<u8>("min-free-percent").copied().unwrap_or_default();
        cfg.eviction_interval = duration("eviction-interval");
        if cfg.eviction_interval.is_zero() {
            return Err("--eviction-interval must be longer than 0s".into());
        }
        // Every node polls the API at this period: 0 would be a loop of requests on every node.
        let cleanup_poll_interval = duration("cleanup-poll-interval");
        if cleanup_poll_interval.is_zero() {
            return Err("--cleanup-poll-interval must be longer than 0s".into());
        }
        Ok(Flags {
            config: cfg,
            csi_socket: text("csi-socket").unwrap_or_default(),
            log_format: match text("log-format").as_deref() {
                Some("json") => LogFormat::Json,
                _ => LogFormat::Text,
            },
            log_level: text("log-level"),
            metrics_addr: text("metrics-addr").unwrap_or_default(),
            kube_api_url: text("kube-api-url"),
            kube_token_file: path("kube-token-file"),
            kube_ca_file: path("kube-ca-file"),
            namespace: text("namespace"),
            cleanup_poll_interval,
            cleanup_timeout: duration("cleanup-timeout"),
            cleanup_retention: duration("cleanup-retention"),
            orphan_grace: duration("orphan-grace"),
        })
    }
}

/// A DNS-1123-ish name, as the CSIDriver object's name must be.
fn valid_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        // Past u64 seconds once multiplied: refused, not wrapped round to a short period; past a
        // year: refused, not left to overflow a deadline (a panic in the thread that adds it).
        for bad in [
            "",
            "s",
            "1d",
            "-1s",
            "1.5s",
            "307445734561825861m",
            "5124095576030432h",
            "10000000000000000000s",
            "8761h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_percentages() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("50Gi").unwrap(), 50 << 30);
        assert_eq!(parse_size("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "Gi", "1.5Gi", "-1", "1GB", "99999999999Ti"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_percent("20").unwrap(), 20);
        assert_eq!(parse_percent("15%").unwrap(), 15);
        for bad in ["100", "-1", "x", ""] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn defaults_fill_config_as_config_new_does() {
        let f = Flags::parse_from(["--mode=controller"]).unwrap();
        let want = Config::new(Mode::Controller);
        assert_eq!(f.config.mode, Mode::Controller);
        assert_eq!(f.config.driver_name, want.driver_name);
        assert_eq!(f.csi_socket, "/csi/csi.sock");
        assert_eq!(f.config.base_dir, want.base_dir);
        assert_eq!(f.config.kubelet_dir, want.kubelet_dir);
        assert_eq!(f.config.data_on_unpublish, DataOnUnpublish::Keep);
        assert_eq!(f.config.workers, want.workers);
        assert_eq!(f.config.stats_cache_ttl, want.stats_cache_ttl);
        assert_eq!(f.config.shutdown_timeout, want.shutdown_timeout);
        assert_eq!(f.config.test_publish_delay, Duration::ZERO);
        assert_eq!(f.config.max_cache_bytes, want.max_cache_bytes);
        assert_eq!(f.config.min_free_percent, want.min_free_percent);
        assert_eq!(f.config.eviction_interval, want.eviction_interval);
        assert_eq!(f.log_format, LogFormat::Text);
        assert_eq!(f.log_level, None);
        assert_eq!(f.metrics_addr, ":9809");
        assert_eq!(f.cleanup_poll_interval, Duration::from_secs(30));
        assert_eq!(f.cleanup_timeout, Duration::from_secs(60));
        assert_eq!(f.cleanup_retention, Duration::from_secs(86_400));
        assert_eq!(f.orphan_grace, Duration::from_secs(3600));
    }

    #[test]
    fn every_flag_reaches_its_field() {
        let f = Flags::parse_from([
            "--mode=node",
            "--node-name=worker-1",
            "--csi-socket=unix:///run/x.sock",
            "--base-dir=/srv/cache",
            "--kubelet-dir=/var/lib/k0s/kubelet",
            "--driver-name=cache.example.com",
            "--data-on-unpublish=delete",
            "--workers=0",
            "--stats-cache-ttl=5s",
            "--shutdown-timeout=1m",
            "--metrics-addr=",
            "--kube-api-url=https://127.0.0.1:6443",
            "--kube-token-file=/t",
            "--kube-ca-file=/ca",
            "--namespace=ns",
            "--cleanup-poll-interval=10s",
            "--cleanup-timeout=2m",
            "--cleanup-retention=1h",
            "--orphan-grace=30m",
            "--log-format=json",
            "--log-level=debug",
            "--test-publish-delay=250ms",
            "--max-cache-bytes=50Gi",
            "--min-free-percent=15",
            "--eviction-interval=5m",
        ])
        .unwrap();
        let c = &f.config;
        assert_eq!((c.mode, c.node_name.as_str()), (Mode::Node, "worker-1"));
        assert_eq!(f.csi_socket, "unix:///run/x.sock");
        assert_eq!(c.base_dir, PathBuf::from("/srv/cache"));
        assert_eq!(c.kubelet_dir, PathBuf::from("/var/lib/k0s/kubelet"));
        assert_eq!(c.driver_name, "cache.example.com");
        assert_eq!(c.data_on_unpublish, DataOnUnpublish::Delete);
        assert_eq!(c.workers, 1, "at least one worker");
        assert_eq!(c.stats_cache_ttl, Duration::from_secs(5));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(60));
        assert_eq!(c.test_publish_delay, Duration::from_millis(250));
        assert_eq!(c.max_cache_bytes, 50 << 30);
        assert_eq!(c.min_free_percent, 15);
        assert_eq!(c.eviction_interval, Duration::from_secs(300));
        assert_eq!(f.metrics_addr, "");
        assert_eq!(f.kube_api_url.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(f.kube_token_file, Some(PathBuf::from("/t")));
        assert_eq!(f.kube_ca_file, Some(PathBuf::from("/ca")));
        assert_eq!(f.namespace.as_deref(), Some("ns"));
        assert_eq!(f.cleanup_poll_interval, Duration::from_secs(10));
        assert_eq!(f.cleanup_timeout, Duration::from_secs(120));
        assert_eq!(f.cleanup_retention, Duration::from_secs(3600));
        assert_eq!(f.orphan_grace, Duration::from_secs(1800));
        assert_eq!(f.log_format, LogFormat::Json);
        assert_eq!(f.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn environment_variables_are_the_documented_ones() {
        let cmd = command();
        let env = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env("node-name").as_deref(), Some("NODE_NAME"));
        assert_eq!(env("namespace").as_deref(), Some("POD_NAMESPACE"));
        let with_env = cmd.get_arguments().filter(|a| a.get_env().is_some()).count();
        assert_eq!(with_env, 2, "only --node-name and --namespace read the environment");
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for bad in [
            &["--mode=node", "--node-name="][..],
            &["--mode=controller", "--driver-name=-bad"],
            &["--mode=controller", "--driver-name=Has_Underscore"],
            &["--mode=controller", "--base-dir=relative"],
            &["--mode=controller", "--kubelet-dir=relative"],
            &["--mode=controller", "--stats-cache-ttl=1d"],
            &["--mode=controller", "--log-format=xml"],
            &["--mode=node", "--node-name=n", "--max-cache-bytes=lots"],
            &["--mode=node", "--node-name=n", "--min-free-percent=100"],
            &["--mode=node", "--node-name=n", "--eviction-interval=0s"],
            &["--mode=node", "--node-name=n", "--cleanup-poll-interval=0s"],
            &["--mode=sideways"],
            &["--mode=controller", "--no-such-flag"],
            &[],
        ] {
            assert!(Flags::parse_from(bad.iter().copied()).is_err(), "{bad:?}");
        }
    }
}
