//! Reliability under faults and hostile surroundings, end to end: the real binary killed under
//! load and restarted, restarts with live mounts, paths swapped for symlinks while calls run, a
//! full disk, and an expired Kubernetes API token. Each test states the figure it measures.

mod common;
mod fake_apiserver;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fake_apiserver::FakeApi;
use grpcio::{CallOption, RpcStatusCode};
use nix::fcntl::{renameat2, RenameFlags};
use node_local_cache::cleanup::{self, CleanupConfig, CleanupController, NodeCleaner, FINALIZER};
use node_local_cache::config::{Config, Mode};
use node_local_cache::controller::Deleter;
use node_local_cache::inflight::InFlight;
use node_local_cache::kube::KubeError;
use node_local_cache::mounts::{self, BindSource};
use node_local_cache::node::NodeState;
use node_local_cache::proto::csi;
use node_local_cache::proto::grpc::NodeClient;
use node_local_cache::safedir;
use node_local_cache::time::Deadline;

/// A call's outcome by status code name ("OK", "UNAVAILABLE", …), for counting.
fn outcome<T>(r: &grpcio::Result<T>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(grpcio::Error::RpcFailure(s)) => {
            // Displayed as "14-UNAVAILABLE".
            let code = s.code().to_string();
            code.split_once('-').map_or(code.clone(), |(_, name)| name.to_owned())
        }
        Err(other) => format!("transport error {other}"),
    }
}

fn short_call() -> CallOption {
    CallOption::default().timeout(Duration::from_secs(10))
}

/// Kubelet's way with a call that was not answered: the same request again until it succeeds.
/// Only answers that mean "not done, try again" are retried; anything else fails the test.
/// Returns the codes of the attempts that failed before the success.
fn until_ok<T>(what: &str, mut call: impl FnMut() -> grpcio::Result<T>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failed = Vec::new();
    loop {
        let r = call();
        let seen = outcome(&r);
        match r {
            Ok(_) => return failed,
            Err(grpcio::Error::RpcFailure(s))
                if matches!(
                    s.code(),
                    RpcStatusCode::UNAVAILABLE | RpcStatusCode::ABORTED | RpcStatusCode::DEADLINE_EXCEEDED
                ) => {}
            Err(e) => panic!("{what}: not a retryable answer: {e:?}"),
        }
        failed.push(seen);
        assert!(
            Instant::now() < deadline,
            "{what}: still failing after 90 s: {failed:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn tally(into: &mut BTreeMap<String, usize>, codes: &[String]) {
    for c in codes {
        *into.entry(c.clone()).or_default() += 1;
    }
}

/// What one client of the crash test did.
#[derive(Default)]
struct ClientReport {
    cycles: usize,
    replayed_publishes: usize,
    replayed_unpublishes: usize,
    failures: BTreeMap<String, usize>,
}

/// One pod's worth of work per cycle: publish (retried until OK), exactly one mount there, a file
/// written into the volume through it, unpublish (retried until OK), nothing left at the target.
fn crash_client(node: NodeClient, volume: String, targets: Vec<PathBuf>, done: Arc<AtomicUsize>) -> ClientReport {
    let mut report = ClientReport::default();
    for target in &targets {
        let publish = publish_req(&volume, target, false);
        let failed = until_ok(&format!("publish {}", target.display()), || {
            node.node_publish_volume_opt(&publish, short_call())
        });
        report.replayed_publishes += usize::from(!failed.is_empty());
        tally(&mut report.failures, &failed);
        assert_eq!(
            mounted_at(target),
            1,
            "{}: one mount after publish (replayed after {failed:?})",
            target.display()
        );
        let name = file_name_for(target);
        fs::write(target.join(&name), content_for(&name)).unwrap();

        let unpublish = unpublish_req(&volume, target);
        let failed = until_ok(&format!("unpublish {}", target.display()), || {
            node.node_unpublish_volume_opt(&unpublish, short_call())
        });
        report.replayed_unpublishes += usize::from(!failed.is_empty());
        tally(&mut report.failures, &failed);
        assert_eq!(mounted_at(target), 0, "{}: unmounted", target.display());
        assert!(!target.exists(), "{}: target dir removed", target.display());
        report.cycles += 1;
        done.fetch_add(1, Ordering::SeqCst);
    }
    report
}

/// `pods/<pod>/volumes/kubernetes.io~csi/pv/mount` → `<pod>`: unique per target.
fn file_name_for(target: &Path) -> String {
    target
        .ancestors()
        .nth(4)
        .and_then(Path::file_name)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn content_for(name: &str) -> String {
    format!("written by {name} through its publish target\n").repeat(8)
}

/// 16 clients run 1,008 publish/unpublish cycles on their own targets while the plugin is
/// killed with SIGKILL three times and restarted on the same socket. Every unanswered call is
/// replayed until OK: no mount is ever stacked, every target ends unmounted and removed, and
/// every file written through a target is in the node's copy of its volume.
#[test]
fn kill_9_under_load_loses_no_call_and_no_data() {
    const CLIENTS: usize = 16;
    const CYCLES_PER_CLIENT: usize = 63;
    const TOTAL: usize = CLIENTS * CYCLES_PER_CLIENT;
    const KILL_AFTER: [usize; 3] = [TOTAL / 4, TOTAL / 2, 3 * TOTAL / 4];
    let tree = Tree::new("crash");
    let args = ["--workers=8"];
    let mut driver = Driver::node(&tree, "node-a", &args);
    let volumes: Vec<String> = (0..4).map(|i| volume_id(&format!("pvc-crash-{i}"))).collect();
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let targets: Vec<PathBuf> = (0..CYCLES_PER_CLIENT)
                .map(|k| tree.target(&format!("c{c:02}-k{k:03}")))
                .collect();
            let (node, volume, done) = (driver.node_client(), volumes[c % volumes.len()].clone(), done.clone());
            thread::spawn(move || crash_client(node, volume, targets, done))
        })
        .collect();

    let mut kills = Vec::new();
    for at in KILL_AFTER {
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.load(Ordering::SeqCst) < at {
            assert!(
                Instant::now() < deadline,
                "the load stalled; log:\n{}",
                driver.log_text()
            );
            thread::sleep(Duration::from_millis(2));
        }
        kills.push(done.load(Ordering::SeqCst));
        driver.kill9();
        // Down long enough for the clients to see refused connections, as during a real restart.
        thread::sleep(Duration::from_millis(300));
        driver = Driver::node(&tree, "node-a", &args);
        assert!(
            driver.log_text().contains("removing stale socket"),
            "{}",
            driver.log_text()
        );
    }

    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let (mut cycles, mut replayed_publishes, mut replayed_unpublishes) = (0, 0, 0);
    for c in clients {
        let r = c.join().expect("a client failed");
        cycles += r.cycles;
        replayed_publishes += r.replayed_publishes;
        replayed_unpublishes += r.replayed_unpublishes;
        for (code, n) in r.failures {
            *failures.entry(code).or_default() += n;
        }
    }
    assert_eq!(cycles, TOTAL);
    assert!(
        replayed_publishes + replayed_unpublishes > 0,
        "no call was cut off by the kills: the test did not test anything"
    );

    let mut files = 0;
    for (c, volume) in (0..CLIENTS).map(|c| (c, &volumes[c % volumes.len()])) {
        for k in 0..CYCLES_PER_CLIENT {
            let name = format!("c{c:02}-k{k:03}");
            let path = tree.base().join(volume).join(&name);
            let got = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(got, content_for(&name), "{}", path.display());
            files += 1;
        }
    }
    let pods_left: Vec<_> = fs::read_dir(tree.kubelet().join("pods"))
        .unwrap()
        .map(|e| e.unwrap().path().join("volumes/kubernetes.io~csi/pv/mount"))
        .filter(|t| t.exists())
        .collect();
    assert!(pods_left.is_empty(), "targets left: {pods_left:?}");
    tree.assert_no_mounts();
    println!(
        "crash under load: {cycles} cycles by {CLIENTS} clients in {:.1}s; SIGKILL after {kills:?} cycles; \
         {replayed_publishes} publishes and {replayed_unpublishes} unpublishes replayed; failed attempts {failures:?}; \
         {files} files intact, 0 lost; mounts left 0",
        started.elapsed().as_secs_f64()
    );
    driver.terminate();
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Term,
    Kill,
}

fn restart(driver: &mut Driver, tree: &Tree, how: Stop) -> Driver {
    match how {
        Stop::Term => {
            let status = driver.terminate();
            assert!(status.success(), "{status:?}; log:\n{}", driver.log_text());
        }
        Stop::Kill => driver.kill9(),
    }
    Driver::node(tree, "node-a", &["--stats-cache-ttl=0s"])
}

/// Live mounts survive a plugin restart (SIGTERM or SIGKILL): the new process answers a repeated
/// publish with OK without stacking a second mount, refuses other flags, reports stats, and
/// unpublishes cleanly.
fn restart_with_live_mounts(how: Stop) {
    let tree = Tree::new(&format!("restart-{how:?}"));
    let mut driver = Driver::node(&tree, "node-a", &["--stats-cache-ttl=0s"]);
    let vol = volume_id(&format!("pvc-restart-{how:?}"));
    let (rw, ro) = (tree.target("writer"), tree.target("reader"));
    let n = driver.node_client();
    n.node_publish_volume_opt(&publish_req(&vol, &rw, false), opt())
        .unwrap();
    n.node_publish_volume_opt(&publish_req(&vol, &ro, true), opt()).unwrap();
    fs::write(rw.join("before"), b"kept across the restart").unwrap();

    for round in 0..2 {
        driver = restart(&mut driver, &tree, how);
        let n = driver.node_client();
        for _ in 0..2 {
            n.node_publish_volume_opt(&publish_req(&vol, &rw, false), opt())
                .unwrap();
            n.node_publish_volume_opt(&publish_req(&vol, &ro, true), opt()).unwrap();
        }
        assert_eq!(mounted_at(&rw), 1, "round {round}: no second mount on the writer");
        assert_eq!(mounted_at(&ro), 1, "round {round}: no second mount on the reader");
        let (c, msg) = code(n.node_publish_volume_opt(&publish_req(&vol, &ro, false), opt()));
        assert_eq!(c, RpcStatusCode::ALREADY_EXISTS, "{msg}");
        assert_eq!(read_all(&ro.join("before")), "kept across the restart");
        assert_eq!(
            fs::write(ro.join("x"), b"y").unwrap_err().raw_os_error(),
            Some(nix::libc::EROFS),
            "still read-only after the restart"
        );
        let stats = n.node_get_volume_stats_opt(&stats_req(&vol, &rw), opt()).unwrap();
        assert!(!stats.volume_condition.abnormal, "{}", stats.volume_condition.message);
    }

    driver = restart(&mut driver, &tree, how);
    let n = driver.node_client();
    for t in [&rw, &ro] {
        for _ in 0..2 {
            n.node_unpublish_volume_opt(&unpublish_req(&vol, t), opt()).unwrap();
        }
        assert!(!t.exists(), "{} removed", t.display());
    }
    assert_eq!(
        fs::read(tree.base().join(&vol).join("before")).unwrap(),
        b"kept across the restart"
    );
    tree.assert_no_mounts();
    driver.terminate();
}

#[test]
fn restart_by_sigterm_with_live_mounts() {
    restart_with_live_mounts(Stop::Term);
}

#[test]
fn restart_by_sigkill_with_live_mounts() {
    restart_with_live_mounts(Stop::Kill);
}

/// Names and contents below `dir`, never following links: what "nothing changed in the victim"
/// is checked against.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                todo.push(p.clone());
                out.insert(p, b"<dir>".to_vec());
            } else if meta.is_file() {
                out.insert(p.clone(), fs::read(&p).unwrap());
            } else {
                out.insert(
                    p.clone(),
                    fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes(),
                );
            }
        }
    }
    out
}

/// A directory outside the kubelet dir that an attacker would like the driver to mount on, mount
/// from, or write into.
fn make_victim(tree: &Tree) -> PathBuf {
    let victim = tree.root.join("victim");
    fs::create_dir_all(victim.join("sub/deeper")).unwrap();
    fs::write(victim.join("canary"), b"do not touch").unwrap();
    fs::write(victim.join("sub/deeper/canary"), b"nor this").unwrap();
    victim
}

/// Nothing is mounted on the victim or below it, and no mount shows the victim or anything
/// inside it: it can neither be covered nor exposed through a target.
fn assert_victim_unmounted(victim: &Path, step: &str) {
    let table = mounts::read_table().unwrap();
    let on: Vec<_> = table.iter().filter(|m| m.mount_point.starts_with(victim)).collect();
    assert!(on.is_empty(), "{step}: mounted on the victim: {on:#?}");
    let source = BindSource::of_dir(&table, victim).unwrap();
    let exposed = mounts::uses_of(&table, &source);
    assert!(exposed.is_empty(), "{step}: the victim is exposed by {exposed:#?}");
}

/// What a race run saw: every call's outcome, and every broken promise with how often it broke
/// and the first message. Broken promises are collected rather than fatal at once (the victim
/// aside), so one run reports all of them.
#[derive(Default)]
struct RaceLog {
    outcomes: BTreeMap<String, usize>,
    violations: BTreeMap<String, (usize, String)>,
}

impl RaceLog {
    /// Records one call. A racing call may end OK or with a code that names the problem;
    /// INTERNAL (or anything else) is a failure to decide.
    fn call<T>(&mut self, what: &str, r: &grpcio::Result<T>) -> String {
        let code = outcome(r);
        *self.outcomes.entry(format!("{what} {code}")).or_default() += 1;
        let precise = matches!(
            code.as_str(),
            "OK" | "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "ALREADY_EXISTS" | "NOT_FOUND"
        );
        if !precise {
            let message = match r {
                Err(grpcio::Error::RpcFailure(s)) => s.message().to_owned(),
                _ => String::new(),
            };
            // "volume V: path P: bind mount failed: …" grouped by what failed.
            let why = message.splitn(3, ": ").nth(2).unwrap_or(&message).to_owned();
            self.violation(format!("{what} answered {code}: {why}"), message);
        }
        code
    }

    fn violation(&mut self, kind: String, example: String) {
        self.violations.entry(kind).or_insert((0, example)).0 += 1;
    }

    /// Mounts in the tree anywhere but `target`: recorded, then removed so the run goes on.
    fn stray_mounts(&mut self, tree: &Tree, target: &Path, after: &str) {
        for m in tree.mounts().into_iter().filter(|m| m.mount_point != target) {
            let name = m
                .mount_point
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            self.violation(format!("mount left behind at {name} after {after}"), format!("{m:?}"));
            nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
    }

    fn assert_clean(&self, race: &str, driver: &Driver) {
        assert!(
            self.violations.is_empty(),
            "{race}: {} kinds of broken promise:\n{}\noutcomes: {:?}\nlast plugin log lines:\n{}",
            self.violations.len(),
            self.violations
                .iter()
                .map(|(kind, (n, example))| format!("  {n} × {kind}\n      first: {example}"))
                .collect::<Vec<_>>()
                .join("\n"),
            self.outcomes,
            driver
                .log_text()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A thread that swaps `path` between a directory and a symlink to `victim` until finished (or
/// dropped, so a failing test does not leave it running), by atomic exchange with `alt` and,
/// unless `atomic_only`, by remove-and-recreate (which leaves moments with nothing there).
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<usize>>,
}

impl Swapper {
    /// Stops the thread; returns how many swaps it made.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn swapper(path: PathBuf, alt: PathBuf, victim: PathBuf, atomic_only: bool) -> Swapper {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_seen = stop.clone();
    let thread = thread::spawn(move || {
        let mut swaps = 0usize;
        let mut i = 0u64;
        while !stop_seen.load(Ordering::Relaxed) {
            i += 1;
            let done = if atomic_only || i % 3 != 0 {
                renameat2(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    nix::fcntl::AT_FDCWD,
                    &alt,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .is_ok()
            } else {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_symlink() => {
                        fs::remove_file(&path).is_ok() && fs::create_dir(&path).is_ok()
                    }
                    // Fails while it is mounted on or not empty; that is the point.
                    Ok(_) => fs::remove_dir(&path).is_ok() && symlink(&victim, &path).is_ok(),
                    Err(_) => {
                        if i % 2 == 0 {
                            fs::create_dir(&path).is_ok()
                        } else {
                            symlink(&victim, &path).is_ok()
                        }
                    }
                }
            };
            swaps += usize::from(done);
        }
        swaps
    });
    Swapper {
        stop,
        thread: Some(thread),
    }
}

/// Publish and unpublish while another thread swaps the target between a real directory and a
/// symlink to a victim directory outside the kubelet dir (by atomic exchange with a sibling, and
/// by remove-and-recreate). Nothing may ever be mounted on or from the victim, nothing in it may
/// change, every call must end OK or with a precise code, and no mount may be left anywhere but
/// on the target, where unpublish finds it.
#[test]
fn target_swapped_for_a_symlink_during_calls() {
    const ATTEMPTS: usize = 3000;
    let tree = Tree::new("race-target");
    let driver = Driver::node(&tree, "node-a", &[]);
    let n = driver.node_client();
    let vol = volume_id("pvc-race-target");
    let victim = make_victim(&tree);
    let before = snapshot(&victim);
    let target = tree.target("racer");
    let alt = target.with_file_name("mount.alt");
    symlink(&victim, &alt).unwrap();
    let swaps = swapper(target.clone(), alt.clone(), victim.clone(), false);

    let mut log = RaceLog::default();
    for i in 0..ATTEMPTS {
        let (what, code) = if i % 2 == 0 {
            let r = n.node_publish_volume_opt(&publish_req(&vol, &target, false), short_call());
            // Published means mounted right there, and a mount point cannot be swapped away.
            if r.is_ok() && mounted_at(&target) != 1 {
                log.violation(
                    "publish OK but nothing mounted at the target".into(),
                    format!("attempt {i}"),
                );
            }
            ("publish", log.call("publish", &r))
        } else {
            let r = n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), short_call());
            ("unpublish", log.call("unpublish", &r))
        };
        log.stray_mounts(&tree, &target, &format!("{what} {code}"));
        assert_victim_unmounted(&victim, &format!("attempt {i}: {what} {code}"));
        if i % 100 == 0 {
            assert_eq!(snapshot(&victim), before, "attempt {i}: the victim changed");
        }
    }
    let swaps = swaps.finish();

    // Calm again: no links left, and the driver cleans up what it mounted.
    for p in [&target, &alt] {
        if fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(p).unwrap();
        }
    }
    let r = n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), opt());
    log.call("final unpublish", &r);
    r.unwrap();
    log.stray_mounts(&tree, &target, "the final unpublish");
    let _ = fs::remove_dir(&alt);
    assert_eq!(snapshot(&victim), before, "the victim changed");
    println!(
        "target swap race: {ATTEMPTS} calls, {swaps} swaps, outcomes {:?}, violations {:?}",
        log.outcomes,
        log.violations.iter().map(|(k, (n, _))| (k, n)).collect::<Vec<_>>()
    );
    log.assert_clean("target swap race", &driver);
    tree.assert_no_mounts();
    assert!(
        log.outcomes.contains_key("publish OK") && log.outcomes.keys().any(|k| k.starts_with("publish INVALID")),
        "the race never bit: {:?}",
        log.outcomes
    );
}

/// The kernel race behind the target-swap test, without the plugin around it: a directory in
/// the target's place is bound while another thread keeps exchanging its name with a symlink's.
/// A rename that passed its mount-point check before the bind may still carry the new mount
/// point away under the other name (on 6.x kernels, a few in every thousand binds here without
/// the wait). Once `settle_renames` returns, a bind found at the name must stay there.
#[test]
fn a_settled_bind_is_never_carried_off_by_a_rename() {
    const BINDS: usize = 5_000;
    let tree = Tree::new("settle");
    let source = tree.base().join("source");
    fs::create_dir(&source).unwrap();
    let want = fs::metadata(&source).unwrap().ino();
    let parent = tree.target("racer").parent().unwrap().to_owned();
    let (name, alt) = (parent.join("racer"), parent.join("alt"));
    fs::create_dir(&name).unwrap();
    symlink(&tree.root, &alt).unwrap();
    let parent_fd = safedir::open_dir(&parent).unwrap();
    let source_fd = safedir::open_dir(&source).unwrap();
    let swaps = swapper(name.clone(), alt.clone(), tree.root.clone(), true);

    let ino_at = |p: &Path| fs::symlink_metadata(p).map(|m| m.ino()).ok();
    let (mut checked, mut carried_off) = (0, Vec::new());
    while checked < BINDS {
        let Ok(dir) = safedir::open_child(parent_fd.as_fd(), OsStr::new("racer")) else {
            continue;
        };
        mounts::bind_handles(source_fd.as_fd(), dir.as_fd(), mounts::BindFlags::default()).unwrap();
        safedir::settle_renames(parent_fd.as_fd()).unwrap();
        let found_here = ino_at(&name) == Some(want);
        // Long enough for a rename that was under way to finish.
        thread::sleep(Duration::from_micros(200));
        let at_alt = ino_at(&alt) == Some(want);
        if found_here {
            checked += 1;
            if at_alt {
                carried_off.push(checked);
            }
        }
        // Where the mount is now cannot change any more: it is a settled mount point.
        let mount_point = if at_alt { &alt } else { &name };
        mounts::detach(mount_point).unwrap_or_else(|e| panic!("detach {}: {e}", mount_point.display()));
    }
    let swaps = swaps.finish();
    println!(
        "settled binds: {checked} found in place, {swaps} swaps, carried off {}",
        carried_off.len()
    );
    assert!(
        carried_off.is_empty(),
        "binds carried off after settling: {carried_off:?}"
    );
    assert!(swaps > 0, "the swapper never ran");
    tree.assert_no_mounts();
}

/// Publish and unpublish while another thread swaps the node's volume dir (holding data) with
/// a symlink to a victim directory, by atomic exchange. The same promises as for the target.
#[test]
fn volume_dir_swapped_for_a_symlink_during_calls() {
    const ATTEMPTS: usize = 3000;
    let tree = Tree::new("race-voldir");
    let driver = Driver::node(&tree, "node-a", &[]);
    let n = driver.node_client();
    let vol = volume_id("pvc-race-voldir");
    let victim = make_victim(&tree);
    let before = snapshot(&victim);
    let target = tree.target("racer");
    // The volume dir exists (with data) before the race starts.
    n.node_publish_volume_opt(&publish_req(&vol, &target, false), opt())
        .unwrap();
    fs::write(target.join("data"), b"the volume's own").unwrap();
    n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), opt())
        .unwrap();
    let vol_dir = tree.base().join(&vol);
    let alt = tree.base().join(format!("{vol}.alt"));
    symlink(&victim, &alt).unwrap();
    let swaps = swapper(vol_dir.clone(), alt.clone(), victim.clone(), true);

    let mut log = RaceLog::default();
    for i in 0..ATTEMPTS {
        let (what, code) = if i % 2 == 0 {
            let r = n.node_publish_volume_opt(&publish_req(&vol, &target, false), short_call());
            ("publish", log.call("publish", &r))
        } else {
            let r = n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), short_call());
            ("unpublish", log.call("unpublish", &r))
        };
        if mounted_at(&target) > 1 {
            log.violation(format!("mounts stacked after {what} {code}"), format!("attempt {i}"));
        }
        log.stray_mounts(&tree, &target, &format!("{what} {code}"));
        assert_victim_unmounted(&victim, &format!("attempt {i}: {what} {code}"));
        if i % 100 == 0 {
            assert_eq!(snapshot(&victim), before, "attempt {i}: the victim changed");
        }
    }
    let swaps = swaps.finish();

    // Calm again: the real dir back under its name, then the driver cleans up.
    if fs::symlink_metadata(&vol_dir).is_ok_and(|m| m.file_type().is_symlink()) {
        renameat2(
            nix::fcntl::AT_FDCWD,
            &vol_dir,
            nix::fcntl::AT_FDCWD,
            &alt,
            RenameFlags::RENAME_EXCHANGE,
        )
        .unwrap();
    }
    let r = n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), opt());
    log.call("final unpublish", &r);
    r.unwrap();
    log.stray_mounts(&tree, &target, "the final unpublish");
    assert!(!target.exists());
    assert_eq!(fs::read(vol_dir.join("data")).unwrap(), b"the volume's own");
    assert_eq!(snapshot(&victim), before, "the victim changed");
    println!(
        "volume dir swap race: {ATTEMPTS} calls, {swaps} swaps, outcomes {:?}, violations {:?}",
        log.outcomes,
        log.violations.iter().map(|(k, (n, _))| (k, n)).collect::<Vec<_>>()
    );
    log.assert_clean("volume dir swap race", &driver);
    tree.assert_no_mounts();
    assert!(
        log.outcomes.contains_key("publish OK") && log.outcomes.contains_key("publish FAILED_PRECONDITION"),
        "the race never bit: {:?}",
        log.outcomes
    );
}

fn mount_tmpfs(at: &Path, options: &str) {
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(options),
    )
    .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", at.display()));
}

/// Fills a filesystem to the last block and the last inode; returns the files made.
fn fill(dir: &Path) -> Vec<PathBuf> {
    use std::io::Write;
    let mut made = Vec::new();
    let full = |e: &std::io::Error| e.raw_os_error() == Some(nix::libc::ENOSPC);
    for i in 0.. {
        let p = dir.join(format!("filler-{i}"));
        match fs::File::create(&p) {
            Ok(mut f) => {
                made.push(p);
                if i == 0 {
                    let block = [0x5au8; 4096];
                    loop {
                        match f.write_all(&block) {
                            Ok(()) => {}
                            Err(e) if full(&e) => break,
                            Err(e) => panic!("fill {}: {e}", dir.display()),
                        }
                    }
                }
            }
            Err(e) if full(&e) => break,
            Err(e) => panic!("fill {}: {e}", dir.display()),
        }
    }
    made
}

/// What a publish that failed must leave: no volume dir, no record, no target dir, no mount.
fn assert_nothing_half_made(tree: &Tree, vol: &str, target: &Path) {
    assert!(!tree.base().join(vol).exists(), "a volume dir was left for {vol}");
    assert!(
        !tree.base().join(".meta").join(vol).exists(),
        "a record was left for {vol}"
    );
    assert!(
        fs::symlink_metadata(target).is_err(),
        "a target dir was left at {}",
        target.display()
    );
    assert_eq!(mounted_at(target), 0);
}

/// The base dir on a 64 KiB, 8-inode tmpfs: a new volume on a full disk is refused with
/// RESOURCE_EXHAUSTED and leaves nothing half made (also when the target's side is the full
/// one), while Probe and publishes of volumes already there go on working, and space freed
/// makes the refused publish work.
#[test]
fn full_disk_refuses_new_volumes_and_keeps_serving() {
    let tree = Tree::new("disk-full");
    mount_tmpfs(&tree.base(), "size=64k,nr_inodes=8,mode=700");
    let mut driver = Driver::node(&tree, "node-a", &[]);
    let n = driver.node_client();
    let existing = volume_id("pvc-existing");
    let first = tree.target("first");
    n.node_publish_volume_opt(&publish_req(&existing, &first, false), opt())
        .unwrap();
    fs::write(first.join("small"), b"fits").unwrap();
    n.node_unpublish_volume_opt(&unpublish_req(&existing, &first), opt())
        .unwrap();

    // The target's filesystem is the full one: the volume dir made for the call is taken back.
    let cramped = tree.target("cramped");
    mount_tmpfs(cramped.parent().unwrap(), "size=4k,nr_inodes=1");
    let fresh = volume_id("pvc-fresh");
    let (c, msg) = code(n.node_publish_volume_opt(&publish_req(&fresh, &cramped, false), opt()));
    assert_eq!(c, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains(&fresh) && msg.contains(cramped.to_str().unwrap()), "{msg}");
    assert_nothing_half_made(&tree, &fresh, &cramped);

    // The base dir is the full one.
    let fillers = fill(&tree.base());
    assert!(
        fs::create_dir(tree.base().join("probe-dir")).is_err(),
        "the base dir still has room"
    );
    let target = tree.target("refused");
    let mut refused = 0;
    for _ in 0..3 {
        let (c, msg) = code(n.node_publish_volume_opt(&publish_req(&fresh, &target, false), opt()));
        assert_eq!(c, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
        assert!(msg.contains(&fresh), "{msg}");
        assert_nothing_half_made(&tree, &fresh, &target);
        refused += 1;
    }

    // Everything else goes on.
    let probe = driver.identity().probe(&csi::ProbeRequest::new()).unwrap();
    assert!(probe.ready.value, "a full disk is not a broken node");
    let second = tree.target("second");
    n.node_publish_volume_opt(&publish_req(&existing, &second, false), opt())
        .unwrap();
    assert_eq!(mounted_at(&second), 1);
    assert_eq!(read_all(&second.join("small")), "fits");
    n.node_get_volume_stats_opt(&stats_req(&existing, &second), opt())
        .unwrap();
    n.node_unpublish_volume_opt(&unpublish_req(&existing, &second), opt())
        .unwrap();
    assert!(!second.exists());

    // Space freed: the same call now works.
    for f in &fillers {
        fs::remove_file(f).unwrap();
    }
    n.node_publish_volume_opt(&publish_req(&fresh, &target, false), opt())
        .unwrap();
    assert_eq!(mounted_at(&target), 1);
    n.node_unpublish_volume_opt(&unpublish_req(&fresh, &target), opt())
        .unwrap();
    println!(
        "disk full: {refused} publishes refused with RESOURCE_EXHAUSTED on a full base dir, 1 on a full target \
         filesystem, {} filler files; 0 dirs or mounts half made",
        fillers.len()
    );
    driver.terminate();
    for m in [cramped.parent().unwrap(), &tree.base()] {
        nix::mount::umount2(m, nix::mount::MntFlags::empty()).unwrap();
    }
    tree.assert_no_mounts();
}

const DRIVER: &str = "node-local-cache.csi.io";
const NS: &str = "nlc-system";

fn cleanup_config(node: &str) -> CleanupConfig {
    let mut c = CleanupConfig::new(DRIVER, node);
    c.poll_interval = Duration::from_millis(50);
    c.timeout = Duration::from_secs(600);
    c.retention = Duration::from_secs(3600);
    c.orphan_grace = Duration::from_secs(3600);
    c
}

fn record_state(api: &FakeApi, id: &str) -> String {
    api.object(&format!("configmaps/{NS}/{}", cleanup::record_name(id)))
        .and_then(|r| r["metadata"]["labels"][cleanup::LABEL].as_str().map(str::to_owned))
        .unwrap_or_else(|| "gone".into())
}

/// A pod on the node writes into the volume and goes away; the node keeps its copy.
fn use_volume(state: &NodeState, tree: &Tree, id: &str, pv: &str) {
    let target = tree.target(&format!("pod-{pv}"));
    let mut req = publish_req(id, &target, false);
    req.volume_context
        .insert(node_local_cache::node::CONTEXT_NAME.into(), pv.into());
    state.publish(&req).unwrap();
    fs::write(target.join("data"), pv).unwrap();
    state.unpublish(&unpublish_req(id, &target)).unwrap();
}

/// The API server stops taking the service account token (it expired) before the kubelet has
/// written the new one: every cleanup poll, the node's and the controller's, fails with 401 and
/// nothing is deleted or acknowledged. Once the file holds the new token, the same pollers finish
/// the cleanup without a restart.
#[test]
fn expired_token_stops_cleanup_until_the_file_is_rotated() {
    let api = FakeApi::start(&std::env::temp_dir().join(format!("nlc-fakeapi-{}-expiry", std::process::id())));
    let tree = Tree::new("token-expiry");
    let mut cfg = Config::new(Mode::Node);
    cfg.node_name = "node-0".into();
    cfg.base_dir = tree.base();
    cfg.kubelet_dir = tree.kubelet();
    let state = NodeState::new(Arc::new(cfg), InFlight::default());
    let mut node = NodeCleaner::new(api.client(NS), state.clone(), cleanup_config("node-0"));
    api.add_node("node-0", DRIVER);
    let (gone, live) = (volume_id("pvc-expiry"), volume_id("pvc-expiry-live"));
    api.add_pv("pvc-expiry", DRIVER, &gone);
    api.add_pv("pvc-expiry-live", DRIVER, &live);
    use_volume(&state, &tree, &gone, "pvc-expiry");
    use_volume(&state, &tree, &live, "pvc-expiry-live");
    assert_eq!(node.poll_once().unwrap(), 0, "the first token works");
    let ctl = CleanupController::new(api.client(NS), cleanup_config(""));
    ctl.volume_deleted(&gone, None, Deadline::none()).unwrap();
    assert_eq!(
        api.pv_finalizers("pvc-expiry").unwrap_or_default(),
        vec![FINALIZER.to_owned()]
    );

    // Expired: refused by the server; the token file still holds the old one.
    api.with(|s| s.token = "token-2".into());
    api.clear_log();
    const FAILED_POLLS: usize = 5;
    for i in 0..FAILED_POLLS {
        match node.poll_once() {
            Err(KubeError::Unauthorized(401, _)) => {}
            other => panic!("node poll {i} with an expired token: {other:?}"),
        }
        assert!(matches!(ctl.poll_once(), Err(KubeError::Unauthorized(401, _))));
        assert!(tree.base().join(&gone).join("data").exists(), "deleted without an ack");
    }
    let refused = api.requests().len();
    assert!(refused >= 2 * FAILED_POLLS, "the polls reached the server: {refused}");
    assert!(api.nodes_done(NS, &gone).is_empty());
    assert_eq!(record_state(&api, &gone), "pending");
    assert_eq!(
        api.pv_finalizers("pvc-expiry").unwrap_or_default(),
        vec![FINALIZER.to_owned()],
        "PV held"
    );

    // The kubelet writes the new token: the next polls finish the job.
    api.rotate_token("token-2");
    assert_eq!(node.poll_once().unwrap(), 1);
    assert!(!tree.base().join(&gone).exists());
    assert_eq!(api.nodes_done(NS, &gone), vec!["node-0".to_owned()]);
    ctl.poll_once().unwrap();
    assert_eq!(record_state(&api, &gone), "complete");
    assert!(
        api.pv_finalizers("pvc-expiry").unwrap_or_default().is_empty(),
        "the PV is released"
    );
    assert_eq!(read_all(&tree.base().join(&live).join("data")), "pvc-expiry-live");
    assert_eq!(
        api.pv_finalizers("pvc-expiry-live").unwrap_or_default(),
        Vec::<String>::new()
    );
    tree.assert_no_mounts();
    println!(
        "token expiry: {FAILED_POLLS} node and {FAILED_POLLS} controller polls refused (401, {refused} requests), \
         0 deletions, 0 acks; after rotation 1 volume cleaned, PV released"
    );
}

/// kubelet's HTTP probe: a GET with its 5 s timeout; the status, or 0 when the connection was
/// closed or timed out without an answer (a failed probe).
fn probe(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.34\r\n\r\n"
    )
    .is_err()
    {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Any pod of the cluster can reach the metrics port. Clients that hold connections there
/// (sending a request a byte at a time, or nothing, and connecting again when closed) must never
/// keep kubelet's liveness and readiness probes out: five failed liveness probes in a row and
/// kubelet restarts the plugin, so such a client could restart it in a loop. Nor may they make
/// the plugin start a thread per connection.
#[test]
fn slow_clients_on_the_metrics_port_never_fail_the_probes() {
    use std::io::Write;
    let tree = Tree::new("metrics-slow");
    let node = Driver::node(&tree, "node-a", &["--metrics-addr=127.0.0.1:0"]);
    let addr = node.metrics_addr();
    assert_eq!(probe(&addr, "/livez"), 200);
    let threads = || fs::read_dir(format!("/proc/{}/task", node.pid())).unwrap().count();
    let idle_threads = threads();

    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..24)
        .map(|i| {
            let (addr, stop, held) = (addr.clone(), stop.clone(), held.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
                        continue;
                    };
                    held.fetch_add(1, Ordering::Relaxed);
                    s.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
                    // Even clients trickle a header that never ends; odd ones say nothing. Both
                    // come back a moment after the plugin closes their connection.
                    while !stop.load(Ordering::Relaxed) {
                        let closed = if i % 2 == 0 {
                            thread::sleep(Duration::from_millis(250));
                            s.write_all(b"G").is_err() || s.peek(&mut [0]).is_ok()
                        } else {
                            s.peek(&mut [0]).is_ok()
                        };
                        if closed {
                            thread::sleep(Duration::from_millis(250));
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    while held.load(Ordering::Relaxed) < 24 {
        thread::sleep(Duration::from_millis(10));
    }
    let mut failed = Vec::new();
    let mut most_threads = 0;
    for round in 0..20 {
        thread::sleep(Duration::from_millis(250));
        for path in ["/livez", "/readyz"] {
            let status = probe(&addr, path);
            if status != 200 {
                failed.push(format!("round {round} {path}: {status}"));
            }
        }
        most_threads = most_threads.max(threads());
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    eprintln!(
        "40 probes beside 24 slow clients ({} connections): {} failed; threads {idle_threads} idle, at most {most_threads}",
        held.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(failed.is_empty(), "probes failed: {failed:?}");
    assert!(
        most_threads <= idle_threads + 8,
        "the plugin ran {most_threads} threads beside slow clients ({idle_threads} idle)"
    );
}
