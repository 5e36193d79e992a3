//! Bounded caches. Each node's copy of a volume is held to the volume's capacity, and all copies
//! together to the node's budget (`--max-cache-bytes`, `--min-free-percent`). A pass on a
//! low-priority thread of its own trims copies no pod mounts, least recently used files first,
//! and evicts whole idle copies, least recently unpublished first. Copies in use are never
//! touched. docs/eviction.md explains the policy.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fstatat, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::config::DataOnUnpublish;
use crate::error::{Error, Result};
use crate::inflight::{InFlight, VolumeGuard};
use crate::metrics::{self, EvictionAction, EvictionReason};
use crate::mounts::{self, BindSource, MountEntry};
use crate::node::NodeState;
use crate::safedir;
use crate::trim::{self, is_dot, reopen, Halt, Trimmed};
use crate::volume;

/// The StorageClass parameter that picks a volume's policy.
pub const PARAMETER: &str = "eviction";
/// Volume context keys CreateVolume fills, so each node learns the policy and the capacity.
pub const CONTEXT_EVICTION: &str = "node-local-cache.csi.io/eviction";
pub const CONTEXT_CAPACITY: &str = "node-local-cache.csi.io/capacity-bytes";
/// A trim or an eviction goes down to this share of the limit it enforces, so that a copy
/// growing again does not bring a pass back at once.
const LOW_WATER_PERCENT: u64 = 90;
/// `<base-dir>/.eviction/<id>`: what the node knows about each copy (policy, capacity, last use).
const RECORD_DIR: &str = ".eviction";
/// `<base-dir>/.trash/`: evicted copies, renamed here at once and deleted after.
const TRASH_DIR: &str = ".trash";
const PRIVATE_DIR_MODE: u32 = 0o700;

/// What happens to a copy over its capacity or when the node is over its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The least recently used files go first; the copy stays, smaller.
    #[default]
    LruFiles,
    /// The copy goes whole, for caches that must not be partly trimmed.
    WholeCopy,
    /// Never trimmed nor evicted.
    Off,
}

impl Policy {
    pub const ALLOWED: &'static str = "lru-files, whole-copy or none";

    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "lru-files" => Some(Policy::LruFiles),
            "whole-copy" => Some(Policy::WholeCopy),
            "none" => Some(Policy::Off),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LruFiles => "lru-files",
            Policy::WholeCopy => "whole-copy",
            Policy::Off => "none",
        }
    }

    /// The StorageClass parameter's value, default lru-files; INVALID_ARGUMENT naming the
    /// parameter and the allowed values otherwise.
    pub fn from_parameters(volume: &str, parameters: &HashMap<String, String>) -> Result<Policy> {
        match parameters.get(PARAMETER) {
            None => Ok(Policy::default()),
            Some(v) => Policy::parse(v).ok_or_else(|| {
                Error::unsupported(
                    volume,
                    format!(
                        "StorageClass parameter {PARAMETER:?} value {v:?} (allowed: {})",
                        Policy::ALLOWED
                    ),
                )
            }),
        }
    }
}

/// What the volume context tells a node about its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Bytes the copy may hold; 0 when the volume asked for no capacity.
    pub capacity: u64,
    pub policy: Policy,
}

impl Limits {
    /// The limits CreateVolume put in the volume context. A volume made before eviction existed
    /// carries none: no capacity, the default policy.
    pub fn from_context(volume: &str, context: &HashMap<String, String>) -> Result<Limits> {
        let bad = |key: &str, v: &str, want: &str| {
            Error::unsupported(volume, format!("volume context {key:?} value {v:?} (want {want})"))
        };
        let policy = match context.get(CONTEXT_EVICTION) {
            None => Policy::default(),
            Some(v) => Policy::parse(v).ok_or_else(|| bad(CONTEXT_EVICTION, v, Policy::ALLOWED))?,
        };
        let capacity = match context.get(CONTEXT_CAPACITY) {
            None => 0,
            Some(v) => v.parse().map_err(|_| bad(CONTEXT_CAPACITY, v, "a number of bytes"))?,
        };
        Ok(Limits { capacity, policy })
    }

    pub fn to_context(self, context: &mut HashMap<String, String>) {
        context.insert(CONTEXT_EVICTION.into(), self.policy.as_str().into());
        if self.capacity > 0 {
            context.insert(CONTEXT_CAPACITY.into(), self.capacity.to_string());
        }
    }
}

/// What a node keeps about one copy, beside it in `<base-dir>/.eviction/<id>`. The file's
/// modification time is the copy's last use: set in place at each unpublish (no new file, so no
/// inode to allocate on the hot path), and at each write of the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyRecord {
    pub limits: Limits,
}

/// Records are read, changed and written whole, one change at a time in this process. Held: the
/// limits each record was last read or written with, by base dir (device and inode: a base dir
/// made anew starts with nothing known) and volume, so a publish with the same limits (nearly
/// all of them) touches no file.
static RECORDS: Mutex<Known> = Mutex::new(BTreeMap::new());

/// Limits by base dir (device and inode), then by volume id, and whether the record on disk
/// holds them: a publish whose record could not be written (a full filesystem) is still known
/// here, and written at the next chance.
type Known = BTreeMap<(u64, u64), BTreeMap<String, (Limits, bool)>>;

/// The limits known for volume `id` under the base dir with this device and inode.
fn known_limits(known: &Known, base: (u64, u64), id: &str) -> Option<Limits> {
    known.get(&base)?.get(id).map(|(limits, _)| *limits)
}

/// The limits of copy `id`: the latest a publish in this process brought, else the record's,
/// else the defaults.
pub fn limits_of(base: BorrowedFd<'_>, id: &str) -> Limits {
    let known = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    safedir::identity(base)
        .ok()
        .and_then(|b| known_limits(&known, b, id))
        .or_else(|| read_record(base, id).map(|r| r.limits))
        .unwrap_or_default()
}

pub fn read_record(base: BorrowedFd<'_>, id: &str) -> Option<CopyRecord> {
    let v = safedir::read_json_record(base, OsStr::new(RECORD_DIR), id)?;
    Some(CopyRecord {
        limits: Limits {
            capacity: v["capacityBytes"].as_u64().unwrap_or(0),
            policy: v["eviction"].as_str().and_then(Policy::parse).unwrap_or_default(),
        },
    })
}

/// When the copy was last let go of (or its limits last written): the record's modification
/// time. Records of earlier versions kept a `lastUnpublishMs` field written with the file, so
/// their modification time is that moment or a little later.
fn last_use(base: BorrowedFd<'_>, id: &str) -> Option<SystemTime> {
    let dir = safedir::open_child(base, OsStr::new(RECORD_DIR)).ok()?;
    fstatat(dir.as_fd(), id, AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| safedir::modified(&st))
}

/// Written to a temporary name and renamed over the record, so a reader sees the old or the new.
fn write_record(base: BorrowedFd<'_>, id: &str, r: &CopyRecord) -> std::result::Result<(), Errno> {
    use std::io::Write;
    let (dir, _) = safedir::ensure_child(base, OsStr::new(RECORD_DIR), Mode::from_bits_truncate(PRIVATE_DIR_MODE))?;
    let v = serde_json::json!({
        "capacityBytes": r.limits.capacity,
        "eviction": r.limits.policy.as_str(),
    });
    let tmp = format!(".{id}.tmp");
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir.as_fd(), tmp.as_str(), flags, Mode::from_bits_truncate(0o600))?;
    std::fs::File::from(fd)
        .write_all(v.to_string().as_bytes())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32)))?;
    nix::fcntl::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), id)
}

fn remove_record(base: BorrowedFd<'_>, id: &str) {
    let mut known = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(records) = safedir::identity(base).ok().and_then(|b| known.get_mut(&b)) {
        records.remove(id);
    }
    if let Ok(dir) = safedir::open_child(base, OsStr::new(RECORD_DIR)) {
        let _ = unlinkat(dir.as_fd(), id, UnlinkatFlags::NoRemoveDir);
    }
}

/// A publish hands the node the volume's limits (written only when they changed).
/// `base_identity` is the base dir's device and inode, which the caller already holds.
pub fn note_publish(
    base: BorrowedFd<'_>,
    base_identity: (u64, u64),
    id: &str,
    limits: Limits,
) -> std::result::Result<(), Errno> {
    let mut known = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    let entry = known.entry(base_identity).or_default();
    if entry.get(id) == Some(&(limits, true)) {
        return Ok(());
    }
    let written = if read_record(base, id).unwrap_or_default().limits != limits {
        write_record(base, id, &CopyRecord { limits })
    } else {
        Ok(())
    };
    entry.insert(id.to_owned(), (limits, written.is_ok()));
    written
}

/// An unpublish that took a pod's mount away: the copy's last use, for least-recently-used order.
/// Sets the record's modification time in place; writes a record only for a copy that has none.
pub fn note_unpublish(base: BorrowedFd<'_>, id: &str, at: SystemTime) -> std::result::Result<(), Errno> {
    let mut known = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
    // Limits a publish could not write: written now, if there is room.
    let identity = safedir::identity(base).ok();
    if let Some((limits, written)) = identity.and_then(|b| known.get_mut(&b)?.get_mut(id)) {
        if !*written {
            write_record(base, id, &CopyRecord { limits: *limits })?;
            *written = true;
        }
    }
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mtime = TimeSpec::from_duration(since);
    let touch = || {
        let dir = safedir::open_child(base, OsStr::new(RECORD_DIR))?;
        utimensat(
            dir.as_fd(),
            id,
            &TimeSpec::UTIME_OMIT,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
    };
    match touch() {
        Err(Errno::ENOENT) => {
            let limits = identity.and_then(|b| known_limits(&known, b, id)).unwrap_or_default();
            write_record(base, id, &CopyRecord { limits })?;
            touch()
        }
        other => other,
    }
}

/// For NodeGetVolumeStats: how far a copy in use is over its capacity, when it is and its
/// policy would trim or evict it.
pub fn over_capacity(base: BorrowedFd<'_>, id: &str, used: u64) -> Option<String> {
    let limits = limits_of(base, id);
    if limits.capacity == 0 || used <= limits.capacity || limits.policy == Policy::Off {
        return None;
    }
    let over = used - limits.capacity;
    Some(format!(
        "volume {id}: this node's copy holds {used} bytes, {over} bytes ({:.0}%) over its capacity of {} \
         bytes; it is {} once no pod on this node mounts it",
        over as f64 * 100.0 / limits.capacity as f64,
        limits.capacity,
        if limits.policy == Policy::WholeCopy {
            "evicted"
        } else {
            "trimmed"
        }
    ))
}

/// One copy as a pass sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCopy {
    pub id: String,
    pub bytes: u64,
    pub limits: Limits,
    /// The last unpublish (the record's modification time), or the copy dir's for a copy with no record.
    pub last_used: SystemTime,
    pub in_use: bool,
}

/// One thing a pass does to a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Delete least recently used files until the copy holds at most `to` bytes.
    Trim {
        id: String,
        to: u64,
        reason: EvictionReason,
    },
    /// Take the whole copy away.
    Evict { id: String, reason: EvictionReason },
}

impl Step {
    fn id(&self) -> &str {
        match self {
            Step::Trim { id, .. } | Step::Evict { id, .. } => id,
        }
    }
}

/// What a pass means to do, before it does it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Copies over their capacity that pods mount: left alone, reported.
    pub over_capacity_in_use: u64,
    /// Bytes the budget wanted freed that no idle copy could give.
    pub short: u64,
}

fn low_water(limit: u64) -> u64 {
    (limit as u128 * LOW_WATER_PERCENT as u128 / 100) as u64
}

/// Each copy over its capacity first (trimmed or evicted by its policy); then, when all copies
/// together are over `budget`, idle copies least recently used first: each evicted whole while
/// what is still to be freed is at least its size, and the last one only trimmed when its policy
/// allows and that is enough. Copies in use and copies with policy `none` are never in the plan.
pub fn plan(copies: &[LocalCopy], budget: Option<u64>) -> Plan {
    let mut p = Plan::default();
    let mut after: Vec<u64> = copies.iter().map(|c| c.bytes).collect();
    for (i, c) in copies.iter().enumerate() {
        let cap = c.limits.capacity;
        if cap == 0 || c.bytes <= cap || c.limits.policy == Policy::Off {
            continue;
        }
        if c.in_use {
            p.over_capacity_in_use += 1;
            continue;
        }
        let reason = EvictionReason::Capacity;
        let id = c.id.clone();
        if c.limits.policy == Policy::WholeCopy {
            p.steps.push(Step::Evict { id, reason });
            after[i] = 0;
        } else {
            after[i] = low_water(cap);
            p.steps.push(Step::Trim {
                id,
                to: after[i],
                reason,
            });
        }
    }
    let total: u64 = after.iter().sum();
    let Some(budget) = budget.filter(|&b| total > b) else {
        return p;
    };
    let mut need = total - low_water(budget);
    let mut idle: Vec<usize> = (0..copies.len())
        .filter(|&i| !copies[i].in_use && copies[i].limits.policy != Policy::Off && after[i] > 0)
        .collect();
    idle.sort_by(|&a, &b| (copies[a].last_used, &copies[a].id).cmp(&(copies[b].last_used, &copies[b].id)));
    for i in idle {
        if need == 0 {
            break;
        }
        let c = &copies[i];
        let reason = EvictionReason::Budget;
        p.steps.retain(|s| s.id() != c.id);
        if c.limits.policy == Policy::LruFiles && after[i] > need {
            p.steps.push(Step::Trim {
                id: c.id.clone(),
                to: after[i] - need,
                reason,
            });
            need = 0;
        } else {
            p.steps.push(Step::Evict {
                id: c.id.clone(),
                reason,
            });
            need -= after[i].min(need);
        }
    }
    p.short = need;
    p
}

/// The bytes all copies may hold: the lower of `max_cache_bytes` and what keeps
/// `min_free_percent` of the filesystem free, given what the copies hold now. `None`: no limit.
pub fn node_budget(
    max_cache_bytes: u64,
    min_free_percent: u8,
    cache_bytes: u64,
    fs_bytes: u64,
    fs_available: u64,
) -> Option<u64> {
    let by_size = (max_cache_bytes > 0).then_some(max_cache_bytes);
    let by_free = (min_free_percent > 0).then(|| {
        let keep_free = (fs_bytes as u128 * min_free_percent as u128 / 100) as u64;
        (cache_bytes + fs_available).saturating_sub(keep_free)
    });
    match (by_size, by_free) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What a pass did to one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Trimmed {
        id: String,
        reason: EvictionReason,
        trimmed: Trimmed,
    },
    Evicted {
        id: String,
        reason: EvictionReason,
        bytes: u64,
    },
    /// Left alone: a publish or another call held the volume, or a pod mounts it now.
    Skipped { id: String, why: String },
}

/// What a pass saw and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PassReport {
    pub copies: Vec<LocalCopy>,
    pub budget: Option<u64>,
    pub plan: Plan,
    pub done: Vec<Done>,
}

fn reason_label(r: EvictionReason) -> &'static str {
    match r {
        EvictionReason::Capacity => "over its capacity",
        EvictionReason::Budget => "node over its cache budget",
    }
}

/// The base dir as one pass uses it.
struct PassBase {
    fd: OwnedFd,
    real: PathBuf,
    /// Where the base dir lives as mountinfo names it.
    source: BindSource,
}

/// The eviction pass and what it remembers between passes.
pub struct Evictor {
    node: Arc<NodeState>,
    inflight: InFlight,
    /// Sizes of idle copies, by id, with the last use they were measured at: nothing writes to a
    /// copy no pod mounts, so it is walked again only after a pod has used it.
    measured: HashMap<String, (SystemTime, u64)>,
}

impl Evictor {
    pub fn new(node: Arc<NodeState>, inflight: InFlight) -> Evictor {
        Evictor {
            node,
            inflight,
            measured: HashMap::new(),
        }
    }

    /// Runs passes every `--eviction-interval` on a thread of its own, at the lowest CPU and I/O
    /// priority, for as long as the process lives. A pass cut short by the process ending
    /// leaves whole files and, at worst, a trash dir the next start empties.
    pub fn start(self) -> std::io::Result<()> {
        std::thread::Builder::new().name("eviction".into()).spawn(move || {
            lower_priority();
            let mut this = self;
            loop {
                std::thread::sleep(this.node.config().eviction_interval);
                if let Err(e) = this.pass() {
                    warn!("eviction pass: {e}");
                }
            }
        })?;
        Ok(())
    }

    fn open_base(&self) -> Result<PassBase> {
        let path = &self.node.config().base_dir;
        let not_ready = |reason: String| Error::NodeNotReady {
            volume: String::new(),
            path: path.clone(),
            reason,
        };
        let fd = safedir::open_dir(path).map_err(|e| not_ready(e.desc().into()))?;
        let real = safedir::real_path(fd.as_fd()).map_err(|e| Error::sys("resolve base dir", "", path, e))?;
        let holding = read_mounts(|m| real.starts_with(&m.mount_point), &real)?;
        let source = BindSource::of_dir(&holding, &real)
            .ok_or_else(|| not_ready("no mount in /proc/self/mountinfo contains the base dir".into()))?;
        Ok(PassBase { fd, real, source })
    }

    /// Idle copies whose size the pass remembers.
    #[doc(hidden)]
    pub fn remembered_copies(&self) -> usize {
        self.measured.len()
    }

    /// One look at every copy on the node, and the trims and evictions it calls for.
    pub fn pass(&mut self) -> Result<PassReport> {
        let started = Instant::now();
        let base = self.open_base()?;
        empty_trash(base.fd.as_fd());
        let uses = read_mounts(|m| base.source.shown_by(m), &base.real)?;
        let mut report = PassReport::default();
        let copies = self.node.local_volumes()?;
        // Copies deleted since the last pass (cleanup, orphans) are forgotten with them.
        let listed: std::collections::HashSet<&str> = copies.iter().map(String::as_str).collect();
        self.measured.retain(|id, _| listed.contains(id.as_str()));
        for id in copies {
            let copy_root = base.source.root.join(&id);
            let in_use = uses.iter().any(|m| shown_below(m, &base.source, &copy_root));
            match self.look_at(&base, &id, in_use) {
                Ok(c) => report.copies.push(c),
                Err(e) => warn!("eviction: {e}"),
            }
        }
        if self.node.config().data_on_unpublish == DataOnUnpublish::Delete {
            // A copy whose delete had to wait (something was mounted inside) goes once it can;
            // one a publish holds or a pod mounts is kept by `delete_data` itself. An unmarked
            // idle copy may be a pod's after a reboot, before kubelet publishes it again.
            report
                .copies
                .retain(|c| c.in_use || !crate::node::marked_kept(base.fd.as_fd(), &c.id) || !self.delete_kept(&c.id));
        }
        metrics::set_copy_bytes(report.copies.iter().map(|c| (c.id.clone(), c.bytes)).collect());
        let vfs = nix::sys::statvfs::fstatvfs(base.fd.as_fd())
            .map_err(|e| Error::sys("statvfs", "", &self.node.config().base_dir, e))?;
        let frsize = vfs.fragment_size() as u64;
        let cfg = self.node.config();
        report.budget = node_budget(
            cfg.max_cache_bytes,
            cfg.min_free_percent,
            report.copies.iter().map(|c| c.bytes).sum(),
            vfs.blocks() as u64 * frsize,
            vfs.blocks_available() as u64 * frsize,
        );
        report.plan = plan(&report.copies, report.budget);
        metrics::COPIES_OVER_CAPACITY.store(report.plan.over_capacity_in_use, std::sync::atomic::Ordering::Relaxed);
        for step in report.plan.steps.clone() {
            let copy = report.copies.iter().find(|c| c.id == step.id()).cloned();
            if let Some(copy) = copy {
                report.done.push(self.run(&base, &copy, &step));
            }
        }
        if report.plan.short > 0 {
            warn!(
                "eviction: {} bytes more should go to bring the node's copies to 90 % of its cache \
                 budget of {} bytes, but they are in copies that pods use or with eviction: none",
                report.plan.short,
                report.budget.unwrap_or_default()
            );
        }
        self.prune_records(&base);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        metrics::EVICTION_LAST_PASS.store(now.as_secs(), std::sync::atomic::Ordering::Relaxed);
        metrics::EVICTION_PASS_DURATION.observe(started.elapsed());
        debug!(
            "eviction pass: {} copies, {} steps, {:.1}ms",
            report.copies.len(),
            report.done.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(report)
    }

    /// Deletes a marked copy under `--data-on-unpublish=delete` (`delete_data` logs it); whether
    /// it went.
    fn delete_kept(&self, id: &str) -> bool {
        self.node.delete_data(id, None).unwrap_or_else(|e| {
            warn!("volume {id}: data kept by --data-on-unpublish=delete: {e}");
            false
        })
    }

    fn look_at(&mut self, base: &PassBase, id: &str, in_use: bool) -> Result<LocalCopy> {
        let path = base.real.join(id);
        let record = CopyRecord {
            limits: limits_of(base.fd.as_fd(), id),
        };
        let last_used = match last_use(base.fd.as_fd(), id) {
            Some(t) => t,
            None => {
                let st = fstatat(base.fd.as_fd(), id, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| Error::sys("stat copy", id, &path, e))?;
                safedir::modified(&st)
            }
        };
        let cached = self.measured.get(id).filter(|(at, _)| !in_use && *at == last_used);
        let bytes = match cached {
            Some(&(_, bytes)) => bytes,
            None => {
                let root = safedir::open_child(base.fd.as_fd(), OsStr::new(id))
                    .map_err(|e| Error::sys("open copy", id, &path, e))?;
                let bytes = trim::measure(root).map_err(|(e, at)| Error::sys("measure copy", id, path.join(at), e))?;
                if in_use {
                    self.measured.remove(id);
                } else {
                    self.measured.insert(id.to_owned(), (last_used, bytes));
                }
                bytes
            }
        };
        Ok(LocalCopy {
            id: id.to_owned(),
            bytes,
            limits: record.limits,
            last_used,
            in_use,
        })
    }

    /// Takes the volume's lock as a publish does and checks again that no mount shows the copy:
    /// the mount table read for the plan may be a while old. Also returns a mount point inside
    /// the copy, if anything (another filesystem, a bind) is mounted there.
    fn claim(&self, base: &PassBase, id: &str) -> std::result::Result<(VolumeGuard, Option<PathBuf>), String> {
        let guard = self
            .inflight
            .lock_volume_yielding(id)
            .ok_or_else(|| "another call on the volume is under way".to_owned())?;
        let copy_root = base.source.root.join(id);
        let copy_path = base.real.join(id);
        let mounts = read_mounts(
            |m| base.source.shown_by(m) || m.mount_point.starts_with(&copy_path),
            &base.real,
        )
        .map_err(|e| e.to_string())?;
        if let Some(m) = mounts.iter().find(|m| shown_below(m, &base.source, &copy_root)) {
            return Err(format!("mounted at {}", m.mount_point.display()));
        }
        let inner = mounts.iter().find(|m| m.mount_point.starts_with(&copy_path));
        Ok((guard, inner.map(|m| m.mount_point.clone())))
    }

    fn run(&mut self, base: &PassBase, copy: &LocalCopy, step: &Step) -> Done {
        let id = copy.id.clone();
        let (guard, inner_mount) = match self.claim(base, &id) {
            Ok(g) => g,
            Err(why) => {
                debug!("eviction: volume {id} left alone: {why}");
                return Done::Skipped { id, why };
            }
        };
        self.measured.remove(&id);
        // A whole-copy eviction could not delete it all, and what is mounted inside is not the
        // copy's to trim (the walks step around mounts, but on kernels before 5.8 only the table
        // tells a bind from the same filesystem). The rest of the node's copies can go.
        if let Some(at) = inner_mount {
            let action = match step {
                Step::Trim { .. } => "trimmed",
                Step::Evict { .. } => "evicted",
            };
            warn!(
                "volume {id}: not {action}: something is mounted inside it at {}",
                at.display()
            );
            return Done::Skipped {
                id,
                why: format!("a mount inside at {}", at.display()),
            };
        }
        match step {
            Step::Trim { to, reason, .. } => self.trim_copy(base, copy, *to, *reason, &guard),
            Step::Evict { reason, .. } => self.evict_copy(base, copy, *reason, guard),
        }
    }

    fn trim_copy(
        &self,
        base: &PassBase,
        copy: &LocalCopy,
        to: u64,
        reason: EvictionReason,
        guard: &VolumeGuard,
    ) -> Done {
        let id = copy.id.clone();
        let path = base.real.join(&id);
        let root = match safedir::open_child(base.fd.as_fd(), OsStr::new(&id)) {
            Ok(fd) => fd,
            Err(e) => {
                return Done::Skipped {
                    id,
                    why: format!("open {}: {}", path.display(), e.desc()),
                }
            }
        };
        let started = Instant::now();
        let result = trim::trim(root.as_fd(), to, copy.bytes.saturating_sub(to), &|| {
            guard.yield_requested()
        });
        self.node.forget_usage(&id);
        let trimmed = match result {
            Ok(t) => t,
            Err(Halt::Failed(e, at)) => {
                warn!("volume {id}: trim stopped at {}: {}", path.join(at).display(), e.desc());
                return Done::Skipped {
                    id,
                    why: e.desc().into(),
                };
            }
            Err(Halt::Yielded) => Trimmed {
                yielded: true,
                ..Trimmed::default()
            },
        };
        metrics::record_freed(reason, EvictionAction::Trim, trimmed.freed);
        if let Some((e, at)) = &trimmed.stuck_at {
            warn!(
                "volume {id}: {} bytes in files that cannot be deleted were left; first {}: {}",
                trimmed.stuck,
                path.join(at).display(),
                e.desc()
            );
        }
        info!(
            "volume {id}: trimmed {} least recently used files, {} bytes freed in {:.2}s ({}; {} bytes \
             before, target {to}){}",
            trimmed.files,
            trimmed.freed,
            started.elapsed().as_secs_f64(),
            reason_label(reason),
            trimmed.before,
            if trimmed.yielded {
                "; stopped early for a publish"
            } else {
                ""
            }
        );
        Done::Trimmed { id, reason, trimmed }
    }

    /// Renames the copy into the trash at once (a publish after this finds no copy and starts an
    /// empty one; a publish before it finds the whole copy), then deletes it without the lock.
    fn evict_copy(&self, base: &PassBase, copy: &LocalCopy, reason: EvictionReason, guard: VolumeGuard) -> Done {
        let id = copy.id.clone();
        let path = base.real.join(&id);
        let trash = match safedir::ensure_child(
            base.fd.as_fd(),
            OsStr::new(TRASH_DIR),
            Mode::from_bits_truncate(PRIVATE_DIR_MODE),
        ) {
            Ok((fd, _)) => fd,
            Err(e) => {
                warn!("volume {id}: not evicted: trash dir: {}", e.desc());
                return Done::Skipped {
                    id,
                    why: e.desc().into(),
                };
            }
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let name = format!("{id}.{}", now.as_nanos());
        if let Err(e) = renameat2(
            base.fd.as_fd(),
            id.as_str(),
            trash.as_fd(),
            name.as_str(),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            warn!(
                "volume {id}: not evicted: move {} to the trash: {}",
                path.display(),
                e.desc()
            );
            return Done::Skipped {
                id,
                why: e.desc().into(),
            };
        }
        remove_record(base.fd.as_fd(), &id);
        self.node.forget_copy(&id);
        drop(guard);
        metrics::record_freed(reason, EvictionAction::Evict, copy.bytes);
        let idle = SystemTime::now().duration_since(copy.last_used).unwrap_or_default();
        info!(
            "volume {id}: evicted this node's copy, {} bytes freed ({}; unused for {}s)",
            copy.bytes,
            reason_label(reason),
            idle.as_secs()
        );
        if let Err(e) = safedir::remove_tree(trash.as_fd(), OsStr::new(&name)) {
            warn!(
                "volume {id}: evicted copy {}: delete stopped at {}: {}; retried next pass",
                base.real.join(TRASH_DIR).join(&name).display(),
                e.at.display(),
                e.errno.desc()
            );
        }
        Done::Evicted {
            id,
            reason,
            bytes: copy.bytes,
        }
    }

    /// Records of copies that are gone (deleted by the cleanup, or with data-on-unpublish=delete).
    fn prune_records(&self, base: &PassBase) {
        let Ok(dir) = safedir::open_child(base.fd.as_fd(), OsStr::new(RECORD_DIR)) else {
            return;
        };
        let Ok(dir) = Dir::from_fd(dir) else { return };
        let names: Vec<String> = dir
            .into_iter()
            .flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_owned))
            .filter(|n| volume::check_id(n).is_ok())
            .collect();
        for id in names {
            // Yielding, so a publish that arrives meanwhile waits the moment this takes instead
            // of being refused.
            let Some(_guard) = self.inflight.lock_volume_yielding(&id) else {
                continue;
            };
            if matches!(
                safedir::open_child(base.fd.as_fd(), OsStr::new(&id)),
                Err(Errno::ENOENT)
            ) {
                remove_record(base.fd.as_fd(), &id);
            }
        }
    }
}

/// Whether a mount shows `copy_root` (a dir on the base dir's filesystem) or anything below it,
/// live or deleted.
fn shown_below(m: &MountEntry, base: &BindSource, copy_root: &Path) -> bool {
    let root = m.root.as_os_str().as_bytes();
    let root = Path::new(OsStr::from_bytes(root.strip_suffix(b"//deleted").unwrap_or(root)));
    m.dev == base.dev && root.starts_with(copy_root)
}

fn read_mounts(keep: impl FnMut(&MountEntry) -> bool, path: &Path) -> Result<Vec<MountEntry>> {
    mounts::read_matching(keep).map_err(|e| Error::sys("read /proc/self/mountinfo", "", path, e))
}

/// Deletes whatever evicted copies are left in the trash (a delete cut short, a mount inside).
fn empty_trash(base: BorrowedFd<'_>) {
    let Ok(trash) = safedir::open_child(base, OsStr::new(TRASH_DIR)) else {
        return;
    };
    let Ok(list) = reopen(trash.as_fd()).and_then(Dir::from_fd) else {
        return;
    };
    let names: Vec<std::ffi::OsString> = list
        .into_iter()
        .flatten()
        .filter(|e| !is_dot(e.file_name()))
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
        .collect();
    for name in names {
        if let Err(e) = safedir::remove_tree(trash.as_fd(), &name) {
            debug!(
                "eviction: trash {}: delete stopped at {}: {}",
                Path::new(&name).display(),
                e.at.display(),
                e.errno.desc()
            );
        }
    }
}

/// Nice 19 and the lowest best-effort I/O priority for the calling thread: a pass gives way to
/// the pods and to the gRPC workers.
fn lower_priority() {
    use nix::libc;
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers; `tid` is this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS as _, tid as libc::id_t, 19) } != 0 {
        debug!("eviction: setpriority: {}", Errno::last().desc());
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    const LOWEST: libc::c_long = 7;
    // SAFETY: ioprio_set takes plain integers; `tid` is this thread's own id.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT | LOWEST,
        )
    };
    if rc != 0 {
        debug!("eviction: ioprio_set: {}", Errno::last().desc());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(id: &str, bytes: u64, capacity: u64, policy: Policy, last_used: u64, in_use: bool) -> LocalCopy {
        LocalCopy {
            id: id.into(),
            bytes,
            limits: Limits { capacity, policy },
            last_used: UNIX_EPOCH + std::time::Duration::from_secs(last_used),
            in_use,
        }
    }

    #[test]
    fn policies_parse_and_default_to_lru_files() {
        let mut p = HashMap::new();
        assert_eq!(Policy::from_parameters("v", &p).unwrap(), Policy::LruFiles);
        for (text, want) in [
            ("lru-files", Policy::LruFiles),
            ("whole-copy", Policy::WholeCopy),
            ("none", Policy::Off),
        ] {
            p.insert(PARAMETER.to_owned(), text.to_owned());
            assert_eq!(Policy::from_parameters("v", &p).unwrap(), want);
            assert_eq!(want.as_str(), text);
        }
        p.insert(PARAMETER.to_owned(), "LRU".to_owned());
        let e = Policy::from_parameters("v", &p).unwrap_err();
        assert_eq!(e.code(), grpcio::RpcStatusCode::INVALID_ARGUMENT);
        let text = e.to_string();
        assert!(
            text.contains("\"eviction\"") && text.contains("lru-files, whole-copy or none"),
            "{text}"
        );
    }

    #[test]
    fn limits_round_trip_through_the_volume_context() {
        let limits = Limits {
            capacity: 1 << 30,
            policy: Policy::WholeCopy,
        };
        let mut ctx = HashMap::new();
        limits.to_context(&mut ctx);
        assert_eq!(Limits::from_context("v", &ctx).unwrap(), limits);
        assert_eq!(Limits::from_context("v", &HashMap::new()).unwrap(), Limits::default());
        ctx.insert(CONTEXT_CAPACITY.into(), "lots".into());
        assert!(Limits::from_context("v", &ctx)
            .unwrap_err()
            .to_string()
            .contains("capacity-bytes"));
    }

    #[test]
    fn capacity_trims_idle_copies_to_low_water_and_reports_busy_ones() {
        let copies = [
            copy("a", 150, 100, Policy::LruFiles, 1, false),
            copy("b", 150, 100, Policy::WholeCopy, 1, false),
            copy("c", 150, 100, Policy::LruFiles, 1, true),
            copy("d", 150, 100, Policy::Off, 1, false),
            copy("e", 50, 100, Policy::LruFiles, 1, false),
            copy("f", 150, 0, Policy::LruFiles, 1, false),
        ];
        let p = plan(&copies, None);
        let capacity = EvictionReason::Capacity;
        assert_eq!(
            p.steps,
            vec![
                Step::Trim {
                    id: "a".into(),
                    to: 90,
                    reason: capacity
                },
                Step::Evict {
                    id: "b".into(),
                    reason: capacity
                },
            ]
        );
        assert_eq!(p.over_capacity_in_use, 1);
    }

    #[test]
    fn budget_evicts_least_recently_used_idle_copies_then_trims_the_next() {
        let copies = [
            copy("new", 400, 0, Policy::LruFiles, 300, false),
            copy("old", 300, 0, Policy::LruFiles, 100, false),
            copy("busy", 500, 0, Policy::LruFiles, 1, true),
            copy("kept", 500, 0, Policy::Off, 2, false),
            copy("mid", 300, 0, Policy::LruFiles, 200, false),
        ];
        // 2000 bytes against a budget of 1500: down to 1350, 650 to free.
        let p = plan(&copies, Some(1500));
        let budget = EvictionReason::Budget;
        assert_eq!(
            p.steps,
            vec![
                Step::Evict {
                    id: "old".into(),
                    reason: budget
                },
                Step::Evict {
                    id: "mid".into(),
                    reason: budget
                },
                Step::Trim {
                    id: "new".into(),
                    to: 350,
                    reason: budget
                },
            ]
        );
        assert_eq!(p.short, 0);
        assert_eq!(plan(&copies, Some(2000)).steps, vec![]);
        // Only in-use and `none` copies left: reported short, nothing touched.
        let stuck = [copies[2].clone(), copies[3].clone()];
        let p = plan(&stuck, Some(500));
        assert!(p.steps.is_empty());
        assert_eq!(p.short, 1000 - 450);
    }

    #[test]
    fn one_step_per_copy_when_capacity_and_budget_both_call_for_one() {
        // Trimmed to 90 for its capacity, that is still over the budget's 45: one deeper trim.
        let copies = [copy("a", 200, 100, Policy::LruFiles, 1, false)];
        let budget = EvictionReason::Budget;
        assert_eq!(
            plan(&copies, Some(50)).steps,
            vec![Step::Trim {
                id: "a".into(),
                to: 45,
                reason: budget
            }]
        );
        let copies = [
            copy("a", 200, 100, Policy::LruFiles, 1, false),
            copy("b", 200, 0, Policy::LruFiles, 2, false),
        ];
        assert_eq!(
            plan(&copies, Some(50)).steps,
            vec![
                Step::Evict {
                    id: "a".into(),
                    reason: budget
                },
                Step::Trim {
                    id: "b".into(),
                    to: 45,
                    reason: budget
                },
            ]
        );
    }

    #[test]
    fn a_copy_is_in_use_while_any_mount_shows_it_or_a_dir_inside_it() {
        // The plugin's container sees the host's /data/nlc at /var/node-local-cache.
        let table = mounts::parse(
            b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
              2 1 8:1 /data/nlc /var/node-local-cache rw - ext4 /dev/sda1 rw\n\
              3 1 8:1 /data/nlc/nlc-a/sub /var/lib/kubelet/pods/p/x rw - ext4 /dev/sda1 rw\n\
              4 1 8:1 /data/nlc/nlc-b//deleted /var/lib/kubelet/pods/q/y rw - ext4 /dev/sda1 rw\n\
              5 1 0:9 /data/nlc/nlc-c /var/lib/kubelet/pods/r/z rw - tmpfs tmpfs rw\n",
        );
        let base = BindSource::of_dir(&table, Path::new("/var/node-local-cache")).unwrap();
        let in_use = |id: &str| table.iter().any(|m| shown_below(m, &base, &base.root.join(id)));
        assert!(in_use("nlc-a") && in_use("nlc-b"));
        // Another filesystem that happens to have the same path; a name that only starts alike.
        assert!(!in_use("nlc-c") && !in_use("nlc-ab"));
    }

    #[test]
    fn budget_is_the_lower_of_both_flags() {
        assert_eq!(node_budget(0, 0, 10, 1000, 500), None);
        assert_eq!(node_budget(100, 0, 10, 1000, 500), Some(100));
        // 20 % of 1000 kept free: the copies may grow by 300 beyond their 10.
        assert_eq!(node_budget(0, 20, 10, 1000, 500), Some(310));
        assert_eq!(node_budget(200, 20, 10, 1000, 500), Some(200));
        // Already under the free-space floor: the budget is below what the copies hold.
        assert_eq!(node_budget(0, 20, 300, 1000, 100), Some(200));
        assert_eq!(node_budget(0, 50, 0, 1000, 100), Some(0));
    }
}
