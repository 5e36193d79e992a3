//! What a big volume costs the node plugin: measuring its usage, NodeGetVolumeStats through the
//! real binary (the first call walks the tree, later ones are served from the stats cache), and
//! deleting it with `safedir::remove_tree` next to `rm -rf`.
//!
//! `cargo bench --bench fs`, as root. `NLC_BENCH_FILES` sets the tree size (default 100000, in
//! 100 directories); `NLC_BENCH_JSON=<path>` also writes the figures as one JSON object. The bench
//! profile inherits release, so this reuses the release build's gRPC C core.
//!
//! Cold runs of the tree walk start after `sync` and `echo 3 > /proc/sys/vm/drop_caches`, so every
//! directory and inode comes from disk (where that file is not writable they are warm, and the
//! table says so).
//!
//! Deletions compare identical trees, alternating which tool goes first, each run after a `sync`.
//! `NLC_BENCH_DELETE` picks where, as a comma list (default `tmpfs,disk`):
//! - `tmpfs`: a tmpfs mounted for the bench; no disk at all, so this compares the two tools' own
//!   work (syscalls and CPU);
//! - `disk`: the temp dir's filesystem with the tree still cached, as a node deletes a volume it
//!   was just using; the disk's write-back and discard costs are in it;
//! - `disk-cold`: the same with caches dropped first, as a node deletes a volume long unused.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use node_local_cache::proto::csi;
use node_local_cache::proto::csi::volume_capability::access_mode::Mode;
use node_local_cache::proto::grpc::{IdentityClient, NodeClient};
use node_local_cache::{mounts, safedir, volume};
use serde_json::json;

const DRIVER: &str = env!("CARGO_BIN_EXE_node-local-cache");
const DIRS: usize = 100;
const FILE_BYTES: &[u8] = b"node-local-cache bench file: a few bytes, as in a cache of small objects\n";
const ROUNDS: usize = 3;
/// Cached NodeGetVolumeStats calls timed after the first one.
const CACHED_CALLS: usize = 200;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `files` small files spread over up to `DIRS` directories below `dir`.
fn make_tree(dir: &Path, files: usize) {
    let dirs = files.clamp(1, DIRS);
    for d in 0..dirs {
        fs::create_dir_all(dir.join(format!("d{d:03}"))).expect("create bench dir");
    }
    for f in 0..files {
        let path = dir.join(format!("d{:03}/f{f:06}", f % dirs));
        fs::write(path, FILE_BYTES).expect("write bench file");
    }
}

/// Flushes and empties the page, dentry and inode caches; false where the kernel does not let us.
fn drop_caches() -> bool {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", b"3").is_ok()
}

fn best(v: &[Duration]) -> Duration {
    v.iter().copied().min().unwrap_or_default()
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or_default()
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    let rank = (sorted.len() * pct).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The filesystem type of the mount that holds `path`.
fn fs_type(path: &Path) -> String {
    let table = mounts::read_table().unwrap_or_default();
    table
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map_or_else(|| "?".to_owned(), |m| m.fs_type.clone())
}

/// (a) `safedir::usage()` on the tree: cold runs, then warm ones.
fn bench_usage(tree: &Path, files: usize, cold: bool) -> (Vec<Duration>, Vec<Duration>) {
    let dirs = files.clamp(1, DIRS);
    let measure = || {
        let fd = safedir::open_dir(tree).expect("open tree");
        let started = Instant::now();
        let u = safedir::usage(fd).expect("usage");
        let took = started.elapsed();
        assert_eq!(u.inodes, (files + dirs + 1) as u64, "usage counted the wrong tree");
        took
    };
    let cold_runs = (0..ROUNDS)
        .map(|_| {
            if cold {
                drop_caches();
            }
            measure()
        })
        .collect();
    let warm_runs = (0..ROUNDS).map(|_| measure()).collect();
    (cold_runs, warm_runs)
}

/// The node plugin on a socket in its own temporary tree; stopped, unmounted and removed on drop.
struct Plugin {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
}

impl Plugin {
    fn start(root: &Path) -> Plugin {
        let socket = root.join("csi.sock");
        let log = fs::File::create(root.join("plugin.log")).expect("create plugin log");
        let child = Command::new(DRIVER)
            .arg("--mode=node")
            .arg("--node-name=bench")
            .arg(format!("--base-dir={}", root.join("base").display()))
            .arg(format!("--kubelet-dir={}", root.join("kubelet").display()))
            .arg(format!("--csi-socket=unix://{}", socket.display()))
            .arg("--metrics-addr=")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start node-local-cache");
        Plugin {
            child: Some(child),
            root: root.to_owned(),
            socket,
        }
    }

    fn channel(&self, env: &std::sync::Arc<grpcio::Environment>) -> grpcio::Channel {
        ChannelBuilder::new(env.clone()).connect(&format!("unix:{}", self.socket.display()))
    }

    fn wait_ready(&self, env: &std::sync::Arc<grpcio::Environment>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // A channel that failed to connect backs off for a second: try the socket first.
            if UnixStream::connect(&self.socket).is_ok() {
                let call = CallOption::default().timeout(Duration::from_secs(1));
                if let Ok(r) = IdentityClient::new(self.channel(env)).probe_opt(&csi::ProbeRequest::new(), call) {
                    if r.ready.as_ref().is_none_or(|b| b.value) {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "node-local-cache did not become ready; log:\n{}",
            fs::read_to_string(self.root.join("plugin.log")).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop();
        let mut left: Vec<PathBuf> = mounts::read_table()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.root))
            .collect();
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in left {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

struct StatsResult {
    first: Duration,
    cached: Vec<Duration>,
}

/// (b) NodeGetVolumeStats through the real binary on a published volume holding the tree.
fn bench_stats(scratch: &Path, files: usize, cold: bool) -> StatsResult {
    let root = scratch.join("plugin");
    fs::create_dir_all(root.join("kubelet/pods/bench/volumes/kubernetes.io~csi/pv")).expect("kubelet dir");
    let id = volume::id_for_name("fs-bench");
    make_tree(&root.join("base").join(&id), files);
    let plugin = Plugin::start(&root);
    let env = std::sync::Arc::new(EnvBuilder::new().cq_count(1).build());
    plugin.wait_ready(&env);
    let node = NodeClient::new(plugin.channel(&env));
    let call = || CallOption::default().timeout(Duration::from_secs(120));
    let target = root.join("kubelet/pods/bench/volumes/kubernetes.io~csi/pv/mount");
    let target_str = target.to_str().expect("utf-8 temp path").to_owned();

    let mut publish = csi::NodePublishVolumeRequest::new();
    publish.volume_id = id.clone();
    publish.target_path = target_str.clone();
    let mut cap = csi::VolumeCapability::new();
    cap.set_mount(csi::volume_capability::MountVolume::new());
    let mut mode = csi::volume_capability::AccessMode::new();
    mode.mode = Mode::MULTI_NODE_MULTI_WRITER.into();
    cap.access_mode = Some(mode).into();
    publish.volume_capability = Some(cap).into();
    node.node_publish_volume_opt(&publish, call())
        .expect("NodePublishVolume");

    let mut stats = csi::NodeGetVolumeStatsRequest::new();
    stats.volume_id = id.clone();
    stats.volume_path = target_str.clone();
    if cold {
        drop_caches();
    }
    let started = Instant::now();
    let first = node
        .node_get_volume_stats_opt(&stats, call())
        .expect("NodeGetVolumeStats");
    let first_took = started.elapsed();
    let inodes = first
        .usage
        .iter()
        .find(|u| u.unit.enum_value() == Ok(csi::volume_usage::Unit::INODES));
    let dirs = files.clamp(1, DIRS);
    assert_eq!(
        inodes.map(|u| u.used),
        Some((files + dirs + 1) as i64),
        "stats counted the wrong tree"
    );
    let cached = (0..CACHED_CALLS)
        .map(|_| {
            let started = Instant::now();
            node.node_get_volume_stats_opt(&stats, call())
                .expect("NodeGetVolumeStats");
            started.elapsed()
        })
        .collect();

    let mut unpublish = csi::NodeUnpublishVolumeRequest::new();
    unpublish.volume_id = id;
    unpublish.target_path = target_str;
    node.node_unpublish_volume_opt(&unpublish, call())
        .expect("NodeUnpublishVolume");
    drop(plugin);
    StatsResult {
        first: first_took,
        cached,
    }
}

/// Where and how a deletion comparison runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DeleteOn {
    Tmpfs,
    Disk,
    DiskCold,
}

impl DeleteOn {
    fn parse(list: &str) -> Vec<DeleteOn> {
        list.split(',')
            .map(|w| match w.trim() {
                "tmpfs" => DeleteOn::Tmpfs,
                "disk" => DeleteOn::Disk,
                "disk-cold" => DeleteOn::DiskCold,
                other => panic!("NLC_BENCH_DELETE: unknown {other:?} (tmpfs, disk, disk-cold)"),
            })
            .collect()
    }

    fn label(self, disk_fs: &str) -> String {
        match self {
            DeleteOn::Tmpfs => "tmpfs".to_owned(),
            DeleteOn::Disk => format!("{disk_fs}, cached"),
            DeleteOn::DiskCold => format!("{disk_fs}, caches dropped"),
        }
    }
}

/// A tmpfs mounted on `dir` for as long as it lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf) -> Tmpfs {
        fs::create_dir_all(&dir).expect("create tmpfs dir");
        nix::mount::mount(
            Some("nlc-fsbench"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=50%,mode=0700"),
        )
        .expect("mount tmpfs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.0);
    }
}

/// (c) Deleting identical trees in `dir` with `remove_tree` and with `rm -rf`, alternating which
/// goes first; each deletion starts after a `sync`, and a cache drop when `drop` is set.
fn bench_delete(dir: &Path, files: usize, drop: bool) -> (Vec<Duration>, Vec<Duration>) {
    let parent = safedir::open_dir(dir).expect("open deletion dir");
    let prepare = || {
        nix::unistd::sync();
        if drop {
            drop_caches();
        }
    };
    let (mut ours, mut rm) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        make_tree(&dir.join("ours"), files);
        make_tree(&dir.join("rm"), files);
        let run_ours = |ours: &mut Vec<Duration>| {
            prepare();
            let started = Instant::now();
            safedir::remove_tree(parent.as_fd(), OsStr::new("ours")).expect("remove_tree");
            ours.push(started.elapsed());
        };
        let run_rm = |rm: &mut Vec<Duration>| {
            prepare();
            let started = Instant::now();
            let status = Command::new("rm")
                .arg("-rf")
                .arg(dir.join("rm"))
                .status()
                .expect("run rm");
            rm.push(started.elapsed());
            assert!(status.success(), "rm -rf failed");
        };
        if round % 2 == 0 {
            run_ours(&mut ours);
            run_rm(&mut rm);
        } else {
            run_rm(&mut rm);
            run_ours(&mut ours);
        }
        assert!(!dir.join("ours").exists() && !dir.join("rm").exists());
    }
    (ours, rm)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the fs bench bind-mounts (NodePublishVolume) and drops caches: run it as root"
    );
    let files: usize = std::env::var("NLC_BENCH_FILES")
        .ok()
        .map(|s| s.parse().expect("NLC_BENCH_FILES must be a number"))
        .unwrap_or(100_000);
    let scratch = std::env::temp_dir().join(format!("nlc-fsbench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).expect("create scratch dir");
    let scratch = fs::canonicalize(&scratch).expect("canonical scratch dir");
    let cold = drop_caches();
    let fs_kind = fs_type(&scratch);

    let usage_tree = scratch.join("usage");
    make_tree(&usage_tree, files);
    let (usage_cold, usage_warm) = bench_usage(&usage_tree, files, cold);
    let parent = safedir::open_dir(&scratch).expect("open scratch dir");
    safedir::remove_tree(parent.as_fd(), OsStr::new("usage")).expect("remove usage tree");

    let stats = bench_stats(&scratch, files, cold);
    let mut cached = stats.cached.clone();
    cached.sort_unstable();
    let (cached_p50, cached_p99) = (percentile(&cached, 50), percentile(&cached, 99));
    let cached_max = *cached.last().expect("cached calls ran");

    let delete_on = DeleteOn::parse(&std::env::var("NLC_BENCH_DELETE").unwrap_or_else(|_| "tmpfs,disk".into()));
    let mut deletions = Vec::new();
    for &on in &delete_on {
        let runs = match on {
            DeleteOn::Tmpfs => {
                let tmpfs = Tmpfs::mount(scratch.join("tmpfs"));
                bench_delete(&tmpfs.0, files, false)
            }
            DeleteOn::Disk => bench_delete(&scratch, files, false),
            DeleteOn::DiskCold if cold => bench_delete(&scratch, files, true),
            DeleteOn::DiskCold => continue,
        };
        deletions.push((on, runs));
    }
    let _ = fs::remove_dir_all(&scratch);

    let which = if cold {
        "walks cold: sync + drop_caches before each"
    } else {
        "/proc/sys/vm/drop_caches is not writable: walks are WARM"
    };
    println!(
        "fs bench: {files} files of {} B in {} dirs under {} ({fs_kind}); {which}",
        FILE_BYTES.len(),
        files.clamp(1, DIRS),
        std::env::temp_dir().display()
    );
    println!("{:<52} {:>22} {:>8} {:>6}", "measurement", "result", "goal", "");
    let line = |what: &str, result: String, goal: &str, met: Option<bool>| {
        println!("{what:<52} {result:>22} {goal:>8} {:>6}", met.map_or("", verdict));
    };
    let best_median = |v: &[Duration]| format!("{:.1} / {:.1} ms", ms(best(v)), ms(median(v)));
    line(
        &format!("safedir::usage() cold, best / median of {ROUNDS}"),
        best_median(&usage_cold),
        "",
        None,
    );
    line(
        &format!("safedir::usage() warm, best / median of {ROUNDS}"),
        best_median(&usage_warm),
        "",
        None,
    );
    line(
        "NodeGetVolumeStats first call (cold walk)",
        format!("{:.1} ms", ms(stats.first)),
        "",
        None,
    );
    line(
        &format!("NodeGetVolumeStats cached, p50 / p99 of {CACHED_CALLS}"),
        format!("{:.3} / {:.3} ms", ms(cached_p50), ms(cached_p99)),
        "<= 5 ms",
        Some(ms(cached_p99) <= 5.0),
    );
    let mut delete_json = serde_json::Map::new();
    for (on, (ours, rm)) in &deletions {
        let label = on.label(&fs_kind);
        let ratio = ms(best(ours)) / ms(best(rm)).max(1e-9);
        line(
            &format!("remove_tree(), {label}, best / median of {ROUNDS}"),
            best_median(ours),
            "",
            None,
        );
        line(
            &format!("rm -rf (with its exec), {label}, best / median"),
            best_median(rm),
            "",
            None,
        );
        line(
            &format!("remove_tree / rm -rf, {label}, best vs best"),
            format!("{ratio:.2}x"),
            "<= 1.1x",
            Some(ratio <= 1.1),
        );
        let ms3 = |d: &Duration| (ms(*d) * 1e3).round() / 1e3;
        delete_json.insert(
            format!("{on:?}").to_lowercase(),
            json!({
                "remove_tree_ms": ours.iter().map(ms3).collect::<Vec<_>>(),
                "rm_rf_ms": rm.iter().map(ms3).collect::<Vec<_>>(),
                "ratio_best": (ratio * 100.0).round() / 100.0,
            }),
        );
    }

    if let Ok(path) = std::env::var("NLC_BENCH_JSON") {
        let ms3 = |d: Duration| (ms(d) * 1e3).round() / 1e3;
        let all = |v: &[Duration]| v.iter().map(|&d| ms3(d)).collect::<Vec<_>>();
        let doc = json!({
            "files": files,
            "dirs": files.clamp(1, DIRS),
            "filesystem": fs_kind,
            "caches_dropped": cold,
            "usage_cold_ms": all(&usage_cold),
            "usage_warm_ms": all(&usage_warm),
            "stats_first_ms": ms3(stats.first),
            "stats_cached_p50_ms": ms3(cached_p50),
            "stats_cached_p99_ms": ms3(cached_p99),
            "stats_cached_max_ms": ms3(cached_max),
            "delete": delete_json,
        });
        fs::write(&path, format!("{doc}\n")).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}
