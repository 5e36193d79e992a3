//! Everything the driver is told at start, in one struct; `main` fills it from flags.

use std::path::PathBuf;
use std::time::Duration;

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
            max_cache_bytes: 0,
            // kubelet's default hard eviction starts at 15 % free on the image filesystem, which
            // is the root filesystem on most nodes: 5 points above it leave a pass time to act.
            min_free_percent: 20,
            eviction_interval: Duration::from_secs(60),
        }
    }
}

/// `250ms`, `30s`, `5m`, `1h`, `24h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 1h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(d)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        for bad in ["", "s", "1d", "-1s", "1.5s"] {
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
}
