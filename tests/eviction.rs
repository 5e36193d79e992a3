//! Bounded caches: the eviction pass on real copies in a tmpfs base dir, driven through the
//! library (NodeState publishes and unpublishes with real bind mounts, Evictor::pass trims and
//! evicts), and once through the real binaries (CreateVolume's parameter, the node's flags, the
//! log line and the metrics).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use grpcio::RpcStatusCode;
use node_local_cache::config::{Config, Mode};
use node_local_cache::eviction::{self, Done, Evictor, Limits, Policy};
use node_local_cache::inflight::InFlight;
use node_local_cache::metrics::EvictionReason;
use node_local_cache::node::NodeState;
use node_local_cache::safedir;

const KIB: u64 = 1024;
/// tmpfs allocates whole pages: a file of this size holds exactly this many bytes of blocks.
const FILE: u64 = 16 * KIB;

/// A tree whose base dir is a tmpfs of `size_kib`, with a NodeState on it.
struct Node {
    tree: Tree,
    state: Arc<NodeState>,
    inflight: InFlight,
}

/// The node and its eviction pass.
fn node(tag: &str, size_kib: u64, configure: impl FnOnce(&mut Config)) -> (Node, Evictor) {
    node_on(
        Tree::with_tmpfs_base(tag, Some(&format!("size={size_kib}k,mode=0700"))),
        configure,
    )
}

/// As `node`, on a tree with its base dir already mounted.
fn node_on(tree: Tree, configure: impl FnOnce(&mut Config)) -> (Node, Evictor) {
    let mut cfg = Config::new(Mode::Node);
    cfg.node_name = "node-a".into();
    cfg.base_dir = tree.base();
    cfg.kubelet_dir = tree.kubelet();
    cfg.stats_cache_ttl = Duration::ZERO;
    cfg.min_free_percent = 0;
    configure(&mut cfg);
    let inflight = InFlight::default();
    let state = NodeState::new(Arc::new(cfg), inflight.clone());
    let evictor = Evictor::new(state.clone(), inflight.clone());
    (Node { tree, state, inflight }, evictor)
}

impl Node {
    fn copy(&self, id: &str) -> PathBuf {
        self.tree.base().join(id)
    }

    fn base_fd(&self) -> std::os::fd::OwnedFd {
        safedir::open_dir(&self.tree.base()).unwrap()
    }

    /// A copy left by a pod that went away `unpublished_secs_ago`.
    fn idle_copy(&self, id: &str, limits: Limits, unpublished_secs_ago: u64) -> PathBuf {
        let target = self.publish(id, &format!("seed-{id}"), limits);
        self.unpublish(id, &target);
        eviction::note_unpublish(self.base_fd().as_fd(), id, ago(unpublished_secs_ago)).unwrap();
        self.copy(id)
    }

    fn publish(&self, id: &str, pod: &str, limits: Limits) -> PathBuf {
        let target = self.tree.target(pod);
        let mut req = publish_req(id, &target, false);
        limits.to_context(&mut req.volume_context);
        self.state.publish(&req).unwrap();
        target
    }

    /// Hands the node new limits for copy `id`, as a publish bringing them would.
    fn set_limits(&self, id: &str, limits: Limits) {
        let base = self.base_fd();
        eviction::note_publish(base.as_fd(), safedir::identity(base.as_fd()).unwrap(), id, limits).unwrap();
    }

    fn unpublish(&self, id: &str, target: &Path) {
        self.state.unpublish(&unpublish_req(id, target)).unwrap();
    }
}

fn ago(secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(secs)
}

/// A file of `bytes` last read `read_ago` and last written `written_ago` seconds ago.
fn file_used(path: &Path, bytes: u64, read_ago: u64, written_ago: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = fs::File::create(path).unwrap();
    f.set_len(0).unwrap();
    (&f).write_all(&vec![7u8; bytes as usize]).unwrap();
    f.set_times(
        fs::FileTimes::new()
            .set_accessed(ago(read_ago))
            .set_modified(ago(written_ago)),
    )
    .unwrap();
}

fn file(path: &Path, bytes: u64, age: u64) {
    file_used(path, bytes, age, age);
}

/// Regular files below `dir` (relative paths), not following symlinks or entering mounts.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

fn bytes_of(dir: &Path) -> u64 {
    safedir::usage(safedir::open_dir(dir).unwrap()).unwrap().bytes
}

fn lru(capacity: u64) -> Limits {
    Limits {
        capacity,
        policy: Policy::LruFiles,
    }
}

fn whole_copy(capacity: u64) -> Limits {
    Limits {
        capacity,
        policy: Policy::WholeCopy,
    }
}

#[test]
fn lru_files_trims_the_least_recently_used_files_down_to_the_low_water_mark() {
    let (n, mut evictor) = node("lru", 16 * 1024, |_| {});
    let id = volume_id("pvc-lru");
    let copy = n.idle_copy(&id, lru(400 * KIB), 60);
    // 40 files of 16 KiB, f00 the oldest, spread over nested dirs: 640 KiB against 400 KiB.
    for i in 0..40u64 {
        file(&copy.join(format!("d{}/sub/f{i:02}", i % 3)), FILE, 10_000 - i * 100);
    }
    // Written long ago but read a minute ago: recently used, so it stays.
    file_used(&copy.join("read-recently"), FILE, 60, 100_000);
    let before = files(&copy);

    let report = evictor.pass().unwrap();
    let [Done::Trimmed {
        id: trimmed,
        reason,
        trimmed: t,
    }] = report.done.as_slice()
    else {
        panic!("{report:#?}");
    };
    assert_eq!((trimmed, *reason), (&id, EvictionReason::Capacity));
    assert!(!t.yielded);
    // Down to 90 % of 400 KiB = 360 KiB: 656 KiB held, 296 KiB (19 files) to go.
    let left = bytes_of(&copy);
    assert!(left <= 360 * KIB && left > 360 * KIB - FILE, "{left}");
    let gone: BTreeSet<String> = before.difference(&files(&copy)).cloned().collect();
    let oldest: BTreeSet<String> = (0..19u64).map(|i| format!("d{}/sub/f{i:02}", i % 3)).collect();
    assert_eq!(gone, oldest);
    assert!(copy.join("read-recently").exists());
    assert_eq!(t.files, 19);
    assert_eq!(t.freed, 19 * FILE);

    // Under its capacity now: the next pass leaves it alone.
    assert!(evictor.pass().unwrap().done.is_empty());
}

#[test]
fn a_copy_in_use_is_never_trimmed_and_is_reported_then_trimmed_after_the_last_unpublish() {
    let (n, mut evictor) = node("in-use", 16 * 1024, |_| {});
    let id = volume_id("pvc-in-use");
    let limits = lru(64 * KIB);
    let target = n.publish(&id, "pod-1", limits);
    let second = n.publish(&id, "pod-2", limits);
    for i in 0..10u64 {
        file(&target.join(format!("f{i}")), FILE, 5_000 - i);
    }

    let report = evictor.pass().unwrap();
    assert!(report.done.is_empty(), "{report:#?}");
    assert_eq!(report.plan.over_capacity_in_use, 1);
    assert_eq!(files(&target).len(), 10);
    let stats = n.state.stats(&stats_req(&id, &target)).unwrap();
    assert!(stats.volume_condition.abnormal);
    let message = &stats.volume_condition.message;
    assert!(
        message.contains(&id) && message.contains("over its capacity of 65536 bytes"),
        "{message}"
    );

    // One pod gone, one still there: still in use.
    n.unpublish(&id, &target);
    assert!(evictor.pass().unwrap().done.is_empty());
    assert_eq!(files(&n.copy(&id)).len(), 10);

    n.unpublish(&id, &second);
    let report = evictor.pass().unwrap();
    assert!(
        matches!(report.done.as_slice(), [Done::Trimmed { trimmed, .. }] if trimmed.files == 7),
        "{report:#?}"
    );
    assert!(bytes_of(&n.copy(&id)) <= 64 * KIB * 9 / 10);
    let kept: BTreeSet<String> = (7..10).map(|i| format!("f{i}")).collect();
    assert_eq!(files(&n.copy(&id)), kept);
    n.tree.assert_no_mounts_but_base();
}

#[test]
fn the_node_budget_evicts_the_least_recently_used_idle_copy_then_trims_the_next() {
    let (n, mut evictor) = node("budget", 16 * 1024, |c| c.max_cache_bytes = 200 * KIB);
    let [oldest, middle, newest, busy] = ["pvc-a", "pvc-b", "pvc-c", "pvc-busy"].map(volume_id);
    for (id, unpublished) in [(&oldest, 3_000), (&middle, 2_000), (&newest, 1_000)] {
        let copy = n.idle_copy(id, lru(0), unpublished);
        for i in 0..5u64 {
            file(&copy.join(format!("f{i}")), FILE, 10_000 - i);
        }
    }
    // In use and the oldest of all: never a candidate.
    let target = n.publish(&busy, "pod-busy", lru(0));
    for i in 0..5u64 {
        file(&target.join(format!("f{i}")), FILE, 20_000);
    }
    // 320 KiB against 200 KiB: down to 180 KiB, 140 to free. The oldest idle copy (80) goes
    // whole, then 60 KiB of the next: its 4 oldest files.
    let report = evictor.pass().unwrap();
    assert_eq!(report.budget, Some(200 * KIB));
    assert_eq!(report.done.len(), 2, "{report:#?}");
    assert_eq!(
        report.done[0],
        Done::Evicted {
            id: oldest.clone(),
            reason: EvictionReason::Budget,
            bytes: 5 * FILE
        }
    );
    assert!(matches!(&report.done[1], Done::Trimmed { id, trimmed, .. } if *id == middle && trimmed.files == 4));
    assert!(!n.copy(&oldest).exists());
    assert_eq!(files(&n.copy(&middle)), BTreeSet::from(["f4".to_owned()]));
    assert_eq!(files(&n.copy(&newest)).len(), 5);
    assert_eq!(files(&target).len(), 5);
    // Nothing of the evicted copy is left: not its data, not its records, not the trash.
    assert!(n.state.meta(&middle).is_some() && n.state.meta(&oldest).is_none());
    assert!(eviction::read_record(n.base_fd().as_fd(), &oldest).is_none());
    assert!(fs::read_dir(n.tree.base().join(".trash")).unwrap().next().is_none());

    // The next pod on this node starts with an empty cache, as on a node that never had one.
    let again = n.publish(&oldest, "pod-again", lru(0));
    assert!(files(&again).is_empty());
    assert!(n.state.meta(&oldest).is_some());
    n.unpublish(&oldest, &again);
    n.unpublish(&busy, &target);
    n.tree.assert_no_mounts_but_base();
}

/// The limits of each copy are written when a publish brings new ones and read from memory
/// otherwise; memory is kept per base dir, so another base dir (a node remade, or a second node
/// in this process) gets its own record.
#[test]
fn a_publish_writes_the_limits_only_when_they_change_and_per_base_dir() {
    use std::os::unix::fs::MetadataExt;
    let (a, _) = node("limits-a", 16 * 1024, |_| {});
    let (b, _) = node("limits-b", 16 * 1024, |_| {});
    let id = volume_id("pvc-limits");
    let record = |n: &Node| n.tree.base().join(".eviction").join(&id);
    let limits_of = |n: &Node| eviction::read_record(n.base_fd().as_fd(), &id).map(|r| r.limits);

    let t = a.publish(&id, "pod-1", lru(100 * KIB));
    assert_eq!(limits_of(&a), Some(lru(100 * KIB)));
    let written = fs::metadata(record(&a)).unwrap();
    let t2 = a.publish(&id, "pod-2", lru(100 * KIB));
    let again = fs::metadata(record(&a)).unwrap();
    assert_eq!(
        (written.ino(), written.mtime_nsec()),
        (again.ino(), again.mtime_nsec()),
        "same limits: nothing written"
    );
    a.unpublish(&id, &t2);
    let t2 = a.publish(&id, "pod-2", lru(200 * KIB));
    assert_eq!(limits_of(&a), Some(lru(200 * KIB)));

    let tb = b.publish(&id, "pod-1", lru(200 * KIB));
    assert_eq!(
        limits_of(&b),
        Some(lru(200 * KIB)),
        "the other base dir has its own record"
    );
    for (n, t) in [(&a, &t), (&a, &t2), (&b, &tb)] {
        n.unpublish(&id, t);
    }
    a.tree.assert_no_mounts_but_base();
}

/// Every unpublish notes the copy's last use. Writing a new record file for it (create, write,
/// rename) cost an inode allocation per unpublish: on ext4 that was a quarter of the plugin's CPU
/// in publish/unpublish cycles. The note is the record's modification time, set in place.
#[test]
fn an_unpublish_notes_the_last_use_in_place_and_a_new_pass_reads_it() {
    use std::os::unix::fs::MetadataExt;
    let (n, _) = node("last-use", 16 * 1024, |c| c.max_cache_bytes = 100 * KIB);
    let [old, new] = ["pvc-old", "pvc-new"].map(volume_id);
    let record = |id: &str| fs::metadata(n.tree.base().join(".eviction").join(id)).unwrap();
    let mut inodes = Vec::new();
    for id in [&old, &new] {
        let target = n.publish(id, &format!("pod-{id}"), lru(0));
        file(&target.join("f"), 4 * FILE, 100);
        n.unpublish(id, &target);
        inodes.push(record(id).ino());
    }
    // The older unpublish is noted as older still; neither note may replace the file.
    eviction::note_unpublish(n.base_fd().as_fd(), &old, ago(600)).unwrap();
    eviction::note_unpublish(n.base_fd().as_fd(), &new, ago(60)).unwrap();
    assert_eq!(inodes, [record(&old).ino(), record(&new).ino()]);
    let modified = record(&new).modified().unwrap();
    assert!(modified < ago(30) && modified > ago(90), "{modified:?}");

    // A pass that starts afresh (a restarted plugin) knows the order from the disk alone.
    let mut fresh = Evictor::new(n.state.clone(), n.inflight.clone());
    let report = fresh.pass().unwrap();
    assert!(
        matches!(&report.done[..], [Done::Trimmed { id, .. }] if *id == old),
        "{report:#?}"
    );
    assert_eq!(files(&n.copy(&new)), BTreeSet::from(["f".to_owned()]));
}
#[test]
fn min_free_percent_holds_free_space_on_the_base_dirs_filesystem() {
    // 1 MiB tmpfs, 20 % to stay free; two idle copies of 384 KiB (and the node's records) leave
    // 23 % free, 80 KiB more bring it under.
    let (n, mut evictor) = node("min-free", 1024, |c| c.min_free_percent = 20);
    let [a, b] = ["pvc-a", "pvc-b"].map(volume_id);
    for (id, unpublished) in [(&a, 2_000), (&b, 1_000)] {
        let copy = n.idle_copy(id, lru(0), unpublished);
        for i in 0..24u64 {
            file(&copy.join(format!("f{i:02}")), FILE, 10_000 - i);
        }
    }
    assert!(evictor.pass().unwrap().done.is_empty());
    file(&n.copy(&b).join("late"), 5 * FILE, 1);
    let report = evictor.pass().unwrap();
    assert!(
        matches!(report.done.as_slice(), [Done::Trimmed { id, .. }] if *id == a),
        "{report:#?}"
    );
    let vfs = nix::sys::statvfs::statvfs(&n.tree.base()).unwrap();
    assert!(vfs.blocks_available() * 100 >= vfs.blocks() * 20, "{vfs:?}");
}

#[test]
fn a_publish_racing_an_eviction_sees_the_whole_old_copy_or_an_empty_one() {
    let (n, mut evictor) = node("race", 512 * 1024, |_| {});
    let whole = whole_copy(64 * KIB);
    let mut outcomes = BTreeSet::new();
    for round in 0..4u32 {
        let id = volume_id(&format!("pvc-race-{round}"));
        let copy = n.idle_copy(&id, whole, 100);
        for i in 0..20_000u32 {
            fs::write(copy.join(format!("f{i:05}")), b"x").unwrap();
        }
        let (target, seen) = std::thread::scope(|s| {
            let pass = s.spawn(|| evictor.pass().unwrap());
            if round % 2 == 0 {
                // Even rounds: as soon as the pass holds the volume, so the publish meets the
                // eviction itself. Odd rounds start a little later each time.
                while n.inflight.is_empty() && !pass.is_finished() {
                    std::thread::yield_now();
                }
            } else {
                std::thread::sleep(Duration::from_micros(400 * u64::from(round)));
            }
            let target = n.publish(&id, &format!("pod-{round}"), whole);
            // What the pod sees at once, while the pass may still be at work.
            let seen = files(&target).len();
            pass.join().unwrap();
            (target, seen)
        });
        assert!(
            seen == 20_000 || seen == 0,
            "round {round}: a publish saw {seen} of 20000 files"
        );
        outcomes.insert(seen);
        n.unpublish(&id, &target);
    }
    eprintln!("outcomes seen: {outcomes:?}");
    n.tree.assert_no_mounts_but_base();
}

#[test]
fn a_trim_stops_for_a_publish_of_its_volume() {
    let (n, mut evictor) = node("yield", 512 * 1024, |_| {});
    let id = volume_id("pvc-yield");
    let copy = n.idle_copy(&id, lru(4 * KIB), 100);
    // Enough files that the trim lasts far longer than this thread can be kept off a busy CPU:
    // the publish below must find it under way.
    for d in 0..80u32 {
        let dir = copy.join(format!("d{d:03}"));
        fs::create_dir(&dir).unwrap();
        for i in 0..500u32 {
            fs::write(dir.join(format!("f{i:03}")), b"x").unwrap();
        }
    }
    let (report, target) = std::thread::scope(|s| {
        let pass = s.spawn(|| evictor.pass().unwrap());
        // The trim holds the volume once the pass has measured the copies.
        while n.inflight.is_empty() {
            assert!(!pass.is_finished(), "the pass ended before it took the volume");
            std::thread::yield_now();
        }
        let target = n.publish(&id, "pod", lru(4 * KIB));
        (pass.join().unwrap(), target)
    });
    assert!(
        matches!(report.done.as_slice(), [Done::Trimmed { trimmed, .. }] if trimmed.yielded),
        "{report:#?}"
    );
    // Stopped before it had deleted everything (how far it got depends on when the publish came).
    assert!(!files(&target).is_empty());
    n.unpublish(&id, &target);
}

#[test]
fn hostile_trees_are_trimmed_and_evicted_as_the_safe_delete_handles_them() {
    let (n, mut evictor) = node("hostile", 16 * 1024, |_| {});
    let id = volume_id("pvc-hostile");
    let copy = n.idle_copy(&id, lru(4 * KIB), 100);
    let outside = n.tree.root.join("outside");
    file(&outside.join("precious"), FILE, 50_000);
    // Links older than anything: the first to go, and only the links.
    symlink(&outside, copy.join("link-dir")).unwrap();
    symlink(outside.join("precious"), copy.join("link-file")).unwrap();
    let long_ago = nix::sys::time::TimeSpec::from_duration(ago(60_000).duration_since(SystemTime::UNIX_EPOCH).unwrap());
    for link in ["link-dir", "link-file"] {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &copy.join(link),
            &long_ago,
            &long_ago,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
    file(&copy.join("old"), FILE, 40_000);
    // Another filesystem mounted inside the copy: not the copy's, so the copy is left alone
    // while it is there.
    let inner = copy.join("mnt");
    fs::create_dir(&inner).unwrap();
    let mount_inner = || {
        nix::mount::mount(
            Some("tmpfs"),
            &inner,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        file(&inner.join("foreign"), FILE, 50_000);
    };
    mount_inner();
    // Deeper than a walk goes (256 levels): left to the whole-copy delete.
    let mut deep = copy.join("deep");
    for _ in 0..300 {
        deep = deep.join("d");
    }
    file(&deep.join("bottom"), FILE, 50_000);

    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Skipped { .. }]), "{report:#?}");
    assert!(copy.join("old").exists() && inner.join("foreign").exists());
    nix::mount::umount(&inner).unwrap();
    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Trimmed { .. }]), "{report:#?}");
    assert!(!copy.join("old").exists());
    assert!(!copy.join("link-file").exists() && !copy.join("link-dir").exists());
    assert_eq!(read_all(&outside.join("precious")).len() as u64, FILE);
    assert!(deep.join("bottom").exists());
    mount_inner();

    // Evicted whole: refused while a filesystem is mounted inside, then everything goes,
    // however deep.
    file(&copy.join("again"), FILE, 10);
    n.set_limits(&id, whole_copy(4 * KIB));
    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Skipped { .. }]), "{report:#?}");
    assert!(inner.join("foreign").exists());
    nix::mount::umount(&inner).unwrap();
    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Evicted { .. }]), "{report:#?}");
    assert!(!copy.exists());
    assert!(fs::read_dir(n.tree.base().join(".trash")).unwrap().next().is_none());
    assert!(outside.join("precious").exists());
}

/// A bind mount from the base dir's own filesystem inside a copy shows the same device as the
/// copy, so only the mount itself tells it apart: an unpublish that deletes, the cleanup's
/// deletion, a trim and a whole-copy eviction leave the copy for later, none deletes in the
/// bind's source, and the usage counts none of it.
#[test]
fn a_same_filesystem_bind_inside_a_copy_is_never_deleted_trimmed_or_counted() {
    let (n, mut evictor) = node("same-fs-bind", 16 * 1024, |cfg| {
        cfg.data_on_unpublish = node_local_cache::config::DataOnUnpublish::Delete;
    });
    let id = volume_id("pvc-same-fs-bind");
    let precious = n.tree.base().join("precious");
    file(&precious.join("important"), FILE, 50_000);
    let target = n.publish(&id, "pod", lru(4 * KIB));
    let copy = n.copy(&id);
    let inner = copy.join("sub");
    fs::create_dir(&inner).unwrap();
    nix::mount::mount(
        Some(&precious),
        &inner,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let kept = || {
        assert_eq!(read_all(&precious.join("important")).len() as u64, FILE);
    };
    let only_the_copy = safedir::usage(safedir::open_dir(&copy).unwrap()).unwrap();
    assert_eq!(only_the_copy.inodes, 1, "the bind is not counted: {only_the_copy:?}");
    assert!(only_the_copy.bytes < FILE, "{only_the_copy:?}");

    // The unpublish that deletes finds the copy in use and keeps it.
    n.unpublish(&id, &target);
    kept();
    assert!(copy.exists());
    // So does the cleanup's deletion.
    assert!(!n.state.delete_data(&id, None).unwrap());
    kept();
    // The trim leaves it alone: the bind's file is older than anything.
    file(&copy.join("own"), FILE, 40_000);
    eviction::note_unpublish(n.base_fd().as_fd(), &id, ago(100)).unwrap();
    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Skipped { .. }]), "{report:#?}");
    kept();
    // So does the whole-copy eviction.
    n.set_limits(&id, whole_copy(4 * KIB));
    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Skipped { .. }]), "{report:#?}");
    kept();

    // Unmounted, the copy goes and the source stays.
    nix::mount::umount(&inner).unwrap();
    assert!(n.state.delete_data(&id, None).unwrap());
    assert!(!copy.exists());
    kept();
}

/// Under `--data-on-unpublish=delete`, a copy the last unpublish had to keep (something was
/// mounted inside it) goes with the first eviction pass that can delete it, instead of staying
/// until its PVC is deleted. A copy a pod mounts stays, and so does one that lost its mount
/// without an unpublish (a reboot, before kubelet publishes it again), even after such a delete
/// had to wait once: the publish since took the mark away.
#[test]
fn a_copy_the_deleting_unpublish_had_to_keep_goes_with_a_later_pass() {
    let (n, mut evictor) = node("delete-later", 16 * 1024, |cfg| {
        cfg.data_on_unpublish = node_local_cache::config::DataOnUnpublish::Delete;
    });
    let id = volume_id("pvc-delete-later");
    let busy = volume_id("pvc-delete-busy");
    let rebooted = volume_id("pvc-delete-rebooted");
    let target = n.publish(&id, "pod", lru(0));
    let busy_target = n.publish(&busy, "busy-pod", lru(0));
    let copy = n.copy(&id);
    file(&copy.join("data"), FILE, 10);
    let inner = copy.join("sub");
    fs::create_dir(&inner).unwrap();
    let tmpfs_at = |at: &Path| {
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap()
    };
    tmpfs_at(&inner);
    n.unpublish(&id, &target);
    assert!(copy.join("data").exists(), "kept while something is mounted inside");
    evictor.pass().unwrap();
    assert!(copy.join("data").exists(), "still mounted inside: kept");

    // The same kind of wait for another copy, then a pod uses it again and the node reboots:
    // its bind goes without an unpublish.
    let first = n.publish(&rebooted, "first-pod", lru(0));
    let rebooted_inner = n.copy(&rebooted).join("sub");
    fs::create_dir(&rebooted_inner).unwrap();
    tmpfs_at(&rebooted_inner);
    n.unpublish(&rebooted, &first);
    nix::mount::umount(&rebooted_inner).unwrap();
    let again = n.publish(&rebooted, "second-pod", lru(0));
    file(&n.copy(&rebooted).join("data"), FILE, 10);
    nix::mount::umount(&again).unwrap();

    nix::mount::umount(&inner).unwrap();
    // As a crash while its record was written would leave it.
    let half_written = n.tree.base().join(".meta").join(format!("{id}.new"));
    fs::write(&half_written, "{\"createdMs\":").unwrap();
    evictor.pass().unwrap();
    assert!(!copy.exists(), "the pass after the unmount deletes it");
    assert!(!half_written.exists() && !n.tree.base().join(".meta").join(&id).exists());
    assert!(n.copy(&busy).exists(), "a copy in use stays");
    assert!(
        n.copy(&rebooted).join("data").exists(),
        "a copy unmounted without an unpublish stays for its pod"
    );
    n.unpublish(&busy, &busy_target);
    assert!(!n.copy(&busy).exists());
    n.tree.assert_no_mounts_but_base();
}

/// The pass remembers the size of each idle copy it measured, so as not to walk it again; a copy
/// deleted since (by the cleanup, an orphan sweep) must not stay remembered for as long as the
/// process lives: per-pod volumes come and go by the thousand.
#[test]
fn a_pass_forgets_the_copies_that_went() {
    let (n, mut evictor) = node("forget", 16 * 1024, |_| {});
    let ids: Vec<String> = (0..3).map(|i| volume_id(&format!("pvc-forget-{i}"))).collect();
    for id in &ids {
        file(&n.idle_copy(id, lru(0), 60).join("data"), FILE, 10);
    }
    evictor.pass().unwrap();
    assert_eq!(evictor.remembered_copies(), ids.len());
    for id in &ids[1..] {
        assert!(n.state.delete_data(id, None).unwrap());
    }
    evictor.pass().unwrap();
    assert_eq!(evictor.remembered_copies(), 1, "only the copy still there");
}

/// Under `--data-on-unpublish=delete`, the last two pods of a volume on a node going at the same
/// moment (a Deployment scaled to zero): each unpublish finds the other's call under way when it
/// comes to delete, and neither may leave the copy behind for the next pod. A call that finds the
/// volume busy holds its target a while here, so that the other one finds it too.
#[test]
fn the_last_two_unpublishes_at_once_leave_no_copy() {
    let (n, _evictor) = node("delete-both", 16 * 1024, |cfg| {
        cfg.data_on_unpublish = node_local_cache::config::DataOnUnpublish::Delete;
        cfg.test_unpublish_delay = Duration::from_millis(300);
    });
    let n = Arc::new(n);
    let id = volume_id("pvc-delete-both");
    for round in 0..4 {
        let targets = [n.publish(&id, "a", lru(0)), n.publish(&id, "b", lru(0))];
        fs::write(targets[0].join("scratch"), round.to_string()).unwrap();
        let start = Arc::new(std::sync::Barrier::new(2));
        let calls: Vec<_> = targets
            .into_iter()
            .map(|target| {
                let (n, id, start) = (n.clone(), id.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    n.unpublish(&id, &target)
                })
            })
            .collect();
        for call in calls {
            call.join().unwrap();
        }
        assert!(
            !n.copy(&id).exists(),
            "round {round}: the copy outlived both of its pods"
        );
    }
    assert!(n.inflight.is_empty());
    n.tree.assert_no_mounts_but_base();
}

/// A trim's plan holds a bounded number of bytes however long the paths to its files: 4,000
/// files 250 levels of 255-byte names deep (64 KB of path each) raise the real binary's peak
/// memory by a few MB at most during the trim that deletes them all.
#[test]
fn a_trim_of_files_deep_below_long_names_keeps_memory_flat() {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode as FileMode};
    const LEVELS: usize = 250;
    const FILES: usize = 4000;
    let tree = Tree::with_tmpfs_base("trim-memory", Some("size=64m,mode=0700"));
    let d = Driver::node(&tree, "node-a", &["--eviction-interval=100ms", "--min-free-percent=0"]);
    let n = d.node_client();
    let id = volume_id("pvc-trim-memory");
    let target = tree.target("pod");
    let mut publish = publish_req(&id, &target, false);
    lru(4 * KIB).to_context(&mut publish.volume_context);
    n.node_publish_volume_opt(&publish, opt()).unwrap();
    let mut dir = safedir::open_dir(&target).unwrap();
    for level in 0..LEVELS {
        let name = long_name('d', level);
        mkdirat(dir.as_fd(), name.as_str(), FileMode::from_bits_truncate(0o755)).unwrap();
        dir = safedir::open_child(dir.as_fd(), std::ffi::OsStr::new(&name)).unwrap();
    }
    for i in 0..FILES {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC;
        let fd = openat(
            dir.as_fd(),
            format!("f{i}").as_str(),
            flags,
            FileMode::from_bits_truncate(0o644),
        )
        .unwrap();
        nix::unistd::write(&fd, b"x").unwrap();
    }
    drop(dir);
    let before = peak_rss(d.pid().as_raw() as u32);
    n.node_unpublish_volume_opt(&unpublish_req(&id, &target), opt())
        .unwrap();
    d.wait_for_log(&format!("volume {id}: trimmed {FILES} least recently used files"), 1);
    let grown = peak_rss(d.pid().as_raw() as u32).saturating_sub(before);
    eprintln!("peak memory grew by {:.1} MB through the trim", grown as f64 / 1e6);
    assert!(grown < 16_000_000, "peak memory grew by {grown} bytes through the trim");
    tree.assert_no_mounts_but_base();
}

#[test]
fn create_volume_validates_the_eviction_parameter_and_the_node_enforces_it() {
    let tree = Tree::new("binary");
    let base = tree.base();
    nix::mount::mount(
        Some("tmpfs"),
        &base,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .unwrap();
    let ctl = Driver::controller(&tree, &[]);
    let c = ctl.controller_client();
    let mut bad = create_req("pvc-bad", 0);
    bad.parameters.insert("eviction".into(), "lru".into());
    let (status, message) = code(c.create_volume(&bad));
    assert_eq!(status, RpcStatusCode::INVALID_ARGUMENT);
    assert!(
        message.contains("\"eviction\"") && message.contains("lru-files, whole-copy or none"),
        "{message}"
    );
    let mut req = create_req("pvc-binary", 64 * KIB as i64);
    req.parameters.insert("eviction".into(), "whole-copy".into());
    let volume = c.create_volume(&req).unwrap().volume.unwrap();
    let context = &volume.volume_context;
    assert_eq!(context[eviction::CONTEXT_EVICTION], "whole-copy");
    assert_eq!(context[eviction::CONTEXT_CAPACITY], "65536");
    // Asked again with another policy: a conflict, not a silent change.
    req.parameters.insert("eviction".into(), "none".into());
    assert_eq!(code(c.create_volume(&req)).0, RpcStatusCode::ALREADY_EXISTS);

    let node = Driver::node(
        &tree,
        "node-a",
        &[
            "--eviction-interval=100ms",
            "--metrics-addr=127.0.0.1:0",
            "--min-free-percent=0",
        ],
    );
    let nc = node.node_client();
    let target = tree.target("pod");
    let mut publish = publish_req(&volume.volume_id, &target, false);
    publish.volume_context = context.clone();
    nc.node_publish_volume_opt(&publish, opt()).unwrap();
    for i in 0..8 {
        fs::write(target.join(format!("f{i}")), vec![1u8; FILE as usize]).unwrap();
    }
    nc.node_unpublish_volume_opt(&unpublish_req(&volume.volume_id, &target), opt())
        .unwrap();
    node.wait_for_log(
        &format!(
            "volume {}: evicted this node's copy, 131072 bytes freed",
            volume.volume_id
        ),
        1,
    );
    assert!(!base.join(&volume.volume_id).exists());
    let metrics = http_get(&node.metrics_addr(), "/metrics");
    assert!(
        metrics.contains("node_local_cache_copies_evicted_total{reason=\"capacity\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("node_local_cache_eviction_freed_bytes_total{reason=\"capacity\",action=\"evict\"} 131072\n")
    );

    let mut bad_context = publish_req(&volume.volume_id, &target, false);
    bad_context
        .volume_context
        .insert(eviction::CONTEXT_EVICTION.into(), "sometimes".into());
    assert_eq!(
        code(nc.node_publish_volume_opt(&bad_context, opt())).0,
        RpcStatusCode::INVALID_ARGUMENT
    );
    tree.assert_no_mounts_but(&base);
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

trait BaseMounts {
    fn assert_no_mounts_but(&self, base: &Path);
    fn assert_no_mounts_but_base(&self);
}

impl BaseMounts for Tree {
    /// No mount left in the tree but the tmpfs the test put under the base dir.
    fn assert_no_mounts_but(&self, base: &Path) {
        let left: Vec<PathBuf> = self
            .mounts()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p != base)
            .collect();
        assert!(left.is_empty(), "mounts left behind: {left:#?}");
    }

    fn assert_no_mounts_but_base(&self) {
        self.assert_no_mounts_but(&self.base());
    }
}

/// A publish whose limits cannot be written (the base dir's filesystem is full) still gets them
/// honoured: the node keeps them in memory, the unpublish writes them once there is room, and
/// the pass never takes a copy published with `none` for one with the default policy.
#[test]
fn limits_that_could_not_be_written_at_publish_are_still_honoured() {
    let (n, mut evictor) = node("unwritten-limits", 1024, |c| c.max_cache_bytes = 100 * KIB);
    let [kept, other] = ["pvc-kept", "pvc-other"].map(volume_id);
    // The copy as an earlier pod on this node left it, used before the other one.
    for i in 0..5u64 {
        file(&n.copy(&kept).join(format!("f{i}")), FILE, 10_000);
    }
    let copy = n.idle_copy(&other, lru(0), 1_000);
    for i in 0..5u64 {
        file(&copy.join(format!("f{i}")), FILE, 5_000);
    }
    // Fill the filesystem: the record of the publish below cannot be written.
    let filler = n.tree.base().join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);
    let none = Limits {
        capacity: 0,
        policy: Policy::Off,
    };
    let target = n.publish(&kept, "pod-kept", none);
    fs::remove_file(&filler).unwrap();
    n.unpublish(&kept, &target);
    eviction::note_unpublish(n.base_fd().as_fd(), &kept, ago(3_000)).unwrap();

    // 160 KiB against 100: only the copy with the default policy may give.
    let report = evictor.pass().unwrap();
    assert!(
        report.done.iter().all(|d| !format!("{d:?}").contains(&kept)),
        "{report:#?}"
    );
    assert_eq!(
        files(&n.copy(&kept)).len(),
        5,
        "a copy published with `none` is never trimmed"
    );
    assert_eq!(
        eviction::read_record(n.base_fd().as_fd(), &kept).map(|r| r.limits),
        Some(none),
        "written once there was room"
    );
    n.tree.assert_no_mounts_but_base();
}

/// After a reboot, kubelet unpublishes the volumes it finds on disk: their targets are empty
/// dirs, nothing is mounted there any more. Such a copy was in use until the reboot, so the
/// unpublish notes it as used now; before, it kept the last use of an older unpublish and went
/// first, ahead of copies idle for longer.
#[test]
fn an_unpublish_after_a_reboot_notes_the_copy_as_used_until_then() {
    let (n, mut evictor) = node("reboot-lru", 16 * 1024, |c| c.max_cache_bytes = 120 * KIB);
    let [busy, idle] = ["pvc-busy-till-reboot", "pvc-idle-since-yesterday"].map(volume_id);
    let copy = n.idle_copy(&idle, lru(0), 86_400);
    for i in 0..5u64 {
        file(&copy.join(format!("f{i}")), FILE, 90_000);
    }
    // Unpublished from another pod 30 days ago, then in use until the reboot.
    n.idle_copy(&busy, lru(0), 30 * 86_400);
    let target = n.publish(&busy, "pod-busy", lru(0));
    for i in 0..5u64 {
        file(&target.join(format!("f{i}")), FILE, 90_000);
    }
    // The reboot: the mount is gone, the target dir stays.
    nix::mount::umount(&target).unwrap();
    assert!(target.exists() && mounted_at(&target) == 0);
    n.unpublish(&busy, &target);
    assert!(!target.exists());

    // 160 KiB against 120: the copy idle since yesterday gives first.
    let report = evictor.pass().unwrap();
    assert!(
        matches!(report.done.first(), Some(Done::Evicted { id, .. } | Done::Trimmed { id, .. }) if *id == idle),
        "{report:#?}"
    );
    assert_eq!(files(&n.copy(&busy)).len(), 5, "{report:#?}");
    n.tree.assert_no_mounts_but_base();
}

/// Files of this size are never inlined in btrfs's metadata: each holds exactly this many bytes
/// of blocks.
const BIG: u64 = 64 * KIB;

fn subvolume(path: &Path) {
    run("btrfs", &["subvolume", "create", path.to_str().unwrap()]);
}

/// The subvolumes a filesystem holds, as `btrfs subvolume list` prints them (deleted ones not).
fn subvolumes(fs: &Path) -> String {
    run("btrfs", &["subvolume", "list", fs.to_str().unwrap()])
}

/// What a user of a btrfs base dir can make in a copy (`dir`, a pod's view of it) without any
/// privilege: subvolume `sv` with 8 files of `BIG` (`sv/d/f0` the oldest), `sv/nested` inside it
/// with the oldest file of all, a tree deeper than a delete keeps open (64 levels) inside `sv`,
/// and a subvolume 63 levels down inside `sv`, with a dir in it.
fn subvolumes_in(dir: &Path) {
    subvolume(&dir.join("sv"));
    for i in 0..8u64 {
        file(&dir.join(format!("sv/d/f{i}")), BIG, 10_000 - i * 100);
    }
    subvolume(&dir.join("sv/nested"));
    file(&dir.join("sv/nested/g"), BIG, 20_000);
    let deep = dir.join("sv").join(std::iter::repeat_n("d", 70).collect::<PathBuf>());
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"").unwrap();
    let low = dir.join("sv").join(std::iter::repeat_n("p", 61).collect::<PathBuf>());
    fs::create_dir_all(&low).unwrap();
    subvolume(&low.join("low"));
    fs::create_dir_all(low.join("low/x")).unwrap();
    fs::write(low.join("low/x/f"), b"").unwrap();
}

/// On btrfs a pod can make a subvolume in its copy (`btrfs subvolume create`, no privilege): it
/// shows another device, but no mount sits there, so it is the copy's like any dir. NodeGetVolumeStats
/// and the pass count it, a trim deletes its files, an eviction and the cleanup delete it with the
/// copy; no subvolume is left on the filesystem. (Each used to stop at the other device: not
/// counted, not trimmed, and the copy could not be deleted.)
#[test]
fn a_btrfs_subvolume_inside_a_copy_is_counted_trimmed_and_deleted_with_it() {
    let (n, mut evictor) = node_on(Tree::with_btrfs_base("btrfs-subvolume"), |_| {});
    let [id, other] = ["pvc-subvolume", "pvc-subvolume-other"].map(volume_id);
    let target = n.publish(&id, "pod", lru(8 * BIG));
    for i in 0..2u64 {
        file(&target.join(format!("new{i}")), BIG, 10);
    }
    subvolumes_in(&target);
    let stats = n.state.stats(&stats_req(&id, &target)).unwrap();
    assert_eq!(stats.usage[0].used as u64, 11 * BIG, "{stats:?}");
    n.unpublish(&id, &target);

    // 11 files of BIG against 90 % of 8: the 4 oldest go, all in the subvolumes.
    let copy = n.copy(&id);
    let before = files(&copy);
    let report = evictor.pass().unwrap();
    assert_eq!(report.copies[0].bytes, 11 * BIG, "{report:#?}");
    assert!(
        matches!(report.done.as_slice(), [Done::Trimmed { trimmed, .. }] if trimmed.files == 4 && trimmed.freed == 4 * BIG),
        "{report:#?}"
    );
    let gone: BTreeSet<String> = before.difference(&files(&copy)).cloned().collect();
    let oldest = ["sv/nested/g", "sv/d/f0", "sv/d/f1", "sv/d/f2"].map(String::from);
    assert_eq!(gone, BTreeSet::from(oldest));
    assert_eq!(bytes_of(&copy), 7 * BIG);

    // Evicted whole: the trash keeps nothing.
    n.set_limits(&id, whole_copy(4 * KIB));
    let report = evictor.pass().unwrap();
    assert!(matches!(report.done.as_slice(), [Done::Evicted { .. }]), "{report:#?}");
    assert!(!copy.exists());
    assert!(fs::read_dir(n.tree.base().join(".trash")).unwrap().next().is_none());

    // The cleanup's deletion (DeleteVolume) of another copy.
    let target = n.publish(&other, "pod-other", lru(0));
    subvolumes_in(&target);
    n.unpublish(&other, &target);
    assert_eq!(n.state.delete_data(&other, None), Ok(true));
    assert!(!n.copy(&other).exists());
    assert_eq!(subvolumes(&n.tree.base()), "", "no subvolume left");
    n.tree.assert_no_mounts_but_base();
}

/// With `--data-on-unpublish=delete`, the unpublish deletes a copy with subvolumes inside.
#[test]
fn a_copy_with_btrfs_subvolumes_inside_goes_at_an_unpublish_that_deletes() {
    let (n, _) = node_on(Tree::with_btrfs_base("btrfs-unpublish-delete"), |cfg| {
        cfg.data_on_unpublish = node_local_cache::config::DataOnUnpublish::Delete;
    });
    let id = volume_id("pvc-subvolume-scratch");
    let target = n.publish(&id, "pod", lru(0));
    subvolumes_in(&target);
    n.unpublish(&id, &target);
    assert!(!n.copy(&id).exists());
    assert_eq!(subvolumes(&n.tree.base()), "", "no subvolume left");
    n.tree.assert_no_mounts_but_base();
}

const MIB: u64 = 1024 * KIB;

/// A file with several hard links (a pnpm store links each of its files into node_modules)
/// holds its blocks once: NodeGetVolumeStats and the pass count it once, and a trim that chooses
/// it deletes all its links and counts it freed once. Counted per link, this copy held 11 MiB
/// instead of 2, and the budget took the newer files too.
#[test]
fn a_file_with_ten_hard_links_is_counted_once_and_freed_once() {
    let (n, mut evictor) = node("hard-links", 32 * 1024, |c| c.max_cache_bytes = 3 * MIB / 2);
    let id = volume_id("pvc-hard-links");
    let target = n.publish(&id, "pod", lru(0));
    file(&target.join("store/big"), MIB, 50_000);
    fs::create_dir(target.join("links")).unwrap();
    for i in 1..10 {
        fs::hard_link(target.join("store/big"), target.join(format!("links/big{i}"))).unwrap();
    }
    let newer: BTreeSet<String> = (0..4).map(|i| format!("new{i}")).collect();
    for (i, name) in newer.iter().enumerate() {
        file(&target.join(name), MIB / 4, 100 - i as u64);
    }
    let stats = n.state.stats(&stats_req(&id, &target)).unwrap();
    let used = (stats.usage[0].used as u64, stats.usage[1].used);
    assert_eq!(used, (2 * MIB, 8), "bytes, and inodes: 3 dirs, big, 4 newer files");
    n.unpublish(&id, &target);

    // 2 MiB against a budget of 1.5: down to 1.35, 0.65 MiB to free: the old file, all its links.
    let copy = n.copy(&id);
    let report = evictor.pass().unwrap();
    assert_eq!(report.copies[0].bytes, 2 * MIB, "{report:#?}");
    assert!(
        matches!(report.done.as_slice(), [Done::Trimmed { trimmed, .. }] if trimmed.freed == MIB && trimmed.files == 10),
        "{report:#?}"
    );
    assert_eq!(files(&copy), newer);
    assert_eq!(bytes_of(&copy), MIB);
}

/// NodeGetVolumeStats remembers files with several links up to a bound
/// (`safedir::MAX_LINKED_FILES`) and counts any more once per link: in a copy of 1,000 files more
/// than that, each with two links, those 1,000 are counted twice. Remembering them raised the
/// call's peak memory by 1.8 MB (0.07 MB remembering none), and as much with 60,000 over.
#[test]
fn hard_links_are_remembered_up_to_a_bound_that_keeps_memory_flat() {
    let bound = safedir::MAX_LINKED_FILES as i64;
    let over = 1_000;
    let tree = Tree::with_tmpfs_base("links-memory", Some("size=64m,mode=0700"));
    let d = Driver::node(&tree, "node-a", &["--min-free-percent=0"]);
    let n = d.node_client();
    let id = volume_id("pvc-links-memory");
    let target = tree.target("pod");
    n.node_publish_volume_opt(&publish_req(&id, &target, false), opt())
        .unwrap();
    for dir in ["a", "b"] {
        fs::create_dir(target.join(dir)).unwrap();
    }
    for i in 0..bound + over {
        fs::File::create(target.join(format!("a/{i}"))).unwrap();
        fs::hard_link(target.join(format!("a/{i}")), target.join(format!("b/{i}"))).unwrap();
    }
    let pid = d.pid().as_raw() as u32;
    reset_peak_rss(pid);
    let before = rss(pid);
    let stats = n.node_get_volume_stats_opt(&stats_req(&id, &target), opt()).unwrap();
    let grown = peak_rss(pid).saturating_sub(before);
    eprintln!(
        "peak memory grew by {:.2} MB through the stats call",
        grown as f64 / 1e6
    );
    assert_eq!(
        stats.usage[1].used,
        3 + bound + 2 * over,
        "the root, a, b and the files"
    );
    assert!(
        grown < 4_000_000,
        "peak memory grew by {grown} bytes through the stats call"
    );
    n.node_unpublish_volume_opt(&unpublish_req(&id, &target), opt())
        .unwrap();
    tree.assert_no_mounts_but_base();
}
