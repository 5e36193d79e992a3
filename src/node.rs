//! The CSI Node service: each node keeps `<base-dir>/<volume-id>/` and bind-mounts it into the
//! pods' target paths. Every step works on opened directory handles, decides "is it mounted"
//! from mountinfo, and undoes what it made when a later step fails.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use grpcio::{RpcContext, UnarySink};
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::stat::Mode;

use crate::config::{Config, DataOnUnpublish};
use crate::error::{Error, Result};
use crate::eviction;
use crate::inflight::InFlight;
use crate::metrics;
use crate::mounts::{self, BindFlags, BindSource, Binding, MountPointCheck};
use crate::proto::csi::node_service_capability::rpc::Type as NodeRpc;
use crate::proto::csi::volume_usage::Unit;
use crate::proto::csi::{
    node_service_capability, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    VolumeCondition, VolumeUsage,
};
use crate::proto::grpc;
use crate::safedir::{self, Usage};
use crate::server::Rpc;
use crate::volume;

mod store;
mod usage;

use store::META_DIR;
pub use store::{marked_kept, VolumeMeta};

/// Volume dirs are open to the pod's user; the base dir (0700) keeps other host users out.
const VOLUME_DIR_MODE: u32 = 0o777;
const BASE_DIR_MODE: u32 = 0o700;
const TARGET_DIR_MODE: u32 = 0o750;
/// Unmounts tried on one target in one unpublish (a crash may have stacked mounts there).
const MAX_STACKED: usize = 16;
/// Extra unmount attempts while a target is busy (5, 10, 20, 40 ms apart).
const BUSY_RETRIES: usize = 4;

pub struct NodeState {
    cfg: Arc<Config>,
    inflight: InFlight,
    /// Volume usage by id, reused for `stats_cache_ttl` and shared by calls during a walk.
    usage_cache: usage::UsageCache,
    /// Volumes deleted cluster-wide and when, as last seen by the cleanup poller: a local copy
    /// older than that belongs to a deleted incarnation and must not be published again.
    deleted: Mutex<HashMap<String, SystemTime>>,
    /// The kubelet dir with the node's own symlinks resolved, once it has resolved: every
    /// publish, unpublish and stats call compares against it.
    kubelet_real: std::sync::OnceLock<PathBuf>,
    /// The base dir as last opened, reused while its path still names the same directory.
    base: Mutex<Option<Arc<Base>>>,
    /// This process's lock on the base dir, held until it ends (`claim_base_dir`).
    claim: std::sync::OnceLock<nix::fcntl::Flock<OwnedFd>>,
}

/// Why a base dir whose path shows a directory deleted since (a mount of a dir removed from its
/// own filesystem: the host removed the hostPath dir the pod's mount shows) is unusable.
const BASE_DELETED: &str =
    "base dir was deleted (its mount shows the removed dir); only a restart of the plugin sees the one made again";

/// Liveness's word on the base dir: any unusable base dir is only reported (not ready), but one
/// deleted under the plugin's mount of it (the host removed the hostPath dir) stays deleted for
/// this process, and a restart is what mounts the dir made again.
pub fn base_not_deleted(base_dir: &Path) -> std::result::Result<(), String> {
    match nix::sys::stat::lstat(base_dir) {
        Ok(st) if st.st_nlink == 0 => Err(format!("{}: {BASE_DELETED}", base_dir.display())),
        _ => Ok(()),
    }
}

/// The volume_context key CreateVolume fills with its name, so nodes learn the PV name.
pub const CONTEXT_NAME: &str = "node-local-cache.csi.io/name";

/// The base dir, opened without following a symlink at its last component.
struct Base {
    fd: OwnedFd,
    real: PathBuf,
    /// Device and inode, to tell whether the path still names this directory.
    identity: (u64, u64),
}

/// A target's parent dir (opened following the node's own symlinks) and the target's name in it.
struct Target {
    requested: PathBuf,
    parent: OwnedFd,
    name: OsString,
    /// The target as mountinfo names it.
    real: PathBuf,
}

impl NodeState {
    pub fn new(cfg: Arc<Config>, inflight: InFlight) -> Arc<NodeState> {
        Arc::new(NodeState {
            // Half the workers at most walk copies for stats; the others stay for publishes.
            usage_cache: usage::UsageCache::new(cfg.workers / 2),
            cfg,
            inflight,
            deleted: Mutex::default(),
            kubelet_real: std::sync::OnceLock::new(),
            base: Mutex::default(),
            claim: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Creates the base dir if it is missing; leaves an existing one (or a symlink) as it is.
    /// Opening it (`ready` does at start) closes it to other users.
    pub fn prepare_base_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(BASE_DIR_MODE)
            .create(&self.cfg.base_dir)
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes the base dir for this process alone until it ends (the kernel lets go however it
    /// ends). Two plugins on one base dir would each take the other's copies for their own,
    /// trimming, evicting and collecting them under locks the other cannot see, so the second
    /// must not start. A base dir that cannot be opened now is not claimed: the plugin starts not
    /// ready, and the lock waits for the next start.
    pub fn claim_base_dir(&self) -> std::result::Result<(), String> {
        use nix::fcntl::{Flock, FlockArg};
        let path = &self.cfg.base_dir;
        let Ok(fd) = safedir::open_dir(path) else {
            return Ok(());
        };
        match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                let _ = self.claim.set(lock);
                Ok(())
            }
            Err((_, Errno::EWOULDBLOCK)) => Err(format!(
                "base dir {}: another node plugin holds it; two plugins must not share a base dir",
                path.display()
            )),
            Err((_, e)) => {
                warn!("base dir {}: not locked for this plugin: {}", path.display(), e.desc());
                Ok(())
            }
        }
    }

    /// Volume dirs are open to every user (pods run as any user), so the base dir is what keeps
    /// the node's other users out of the copies. One made by someone else is closed here: kubelet
    /// makes a missing hostPath dir 0755. An owner other than us could open it again: said, not
    /// refused.
    fn close_to_others(fd: BorrowedFd<'_>, path: &Path) {
        let Ok(st) = nix::sys::stat::fstat(fd) else {
            return;
        };
        let mode = st.st_mode & 0o7777;
        let closed = mode & !0o077;
        if mode != closed {
            match nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(closed)) {
                Ok(()) => info!(
                    "base dir {}: mode {mode:04o} let the node's other users in; now {closed:04o}",
                    path.display()
                ),
                Err(e) => warn!(
                    "base dir {}: mode {mode:04o} lets the node's other users in, and it cannot be changed: {}",
                    path.display(),
                    e.desc()
                ),
            }
        }
        if st.st_uid != nix::unistd::geteuid().as_raw() {
            warn!(
                "base dir {}: owned by uid {}, who can let other users in again",
                path.display(),
                st.st_uid
            );
        }
    }

    /// Ready when the base dir opens without following a symlink and is writable.
    pub fn ready(&self) -> bool {
        self.open_base("").is_ok() && nix::unistd::access(&self.cfg.base_dir, nix::unistd::AccessFlags::W_OK).is_ok()
    }

    /// The base dir's handle. Every call checks with one stat that the path still names the dir
    /// the handle has open (a removed, replaced or mounted-over base dir is opened afresh), instead
    /// of opening and resolving it each time.
    fn open_base(&self, volume: &str) -> Result<Arc<Base>> {
        let path = &self.cfg.base_dir;
        let cached = self.base.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let seen = nix::sys::stat::lstat(path);
        let deleted = seen.as_ref().is_ok_and(|st| st.st_nlink == 0);
        if let (Some(base), Ok(st)) = (cached, &seen) {
            if !deleted && (st.st_dev, st.st_ino) == base.identity {
                return Ok(base);
            }
        }
        let not_ready = |reason: &str| Error::NodeNotReady {
            volume: volume.to_owned(),
            path: path.clone(),
            reason: reason.to_owned(),
        };
        if deleted {
            return Err(not_ready(BASE_DELETED));
        }
        let fd = safedir::open_dir(path).map_err(|e| match e {
            Errno::ENOENT => not_ready("base dir does not exist"),
            Errno::ELOOP | Errno::ENOTDIR => {
                not_ready("base dir is a symlink or not a directory; refusing to follow it")
            }
            e => not_ready(e.desc()),
        })?;
        Self::close_to_others(fd.as_fd(), path);
        let real = safedir::real_path(fd.as_fd()).map_err(|e| Error::sys("resolve base dir", volume, path, e))?;
        let identity = safedir::identity(fd.as_fd()).map_err(|e| Error::sys("stat base dir", volume, path, e))?;
        let base = Arc::new(Base { fd, real, identity });
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = Some(base.clone());
        Ok(base)
    }

    /// The restrictions a bind of the volume dir takes from the filesystem under it: what a
    /// repeated publish may find on its target without having asked for it.
    fn inherited(&self, id: &str, base: &Base) -> Result<BindFlags> {
        let vol = safedir::open_child(base.fd.as_fd(), OsStr::new(id));
        let dir = vol.as_ref().map_or(base.fd.as_fd(), |fd| fd.as_fd());
        BindFlags::of_mount(dir).map_err(|e| Error::sys("statvfs", id, base.real.join(id), e))
    }

    /// The base dir's path as mountinfo names it, even when the dir itself is unusable (`base`
    /// is `None`: so a target can still be unpublished after someone removed the base dir).
    fn base_real(&self, base: Option<&Base>) -> PathBuf {
        base.map_or_else(|| self.cfg.base_dir.clone(), |b| b.real.clone())
    }

    fn kubelet_real(&self, volume: &str) -> Result<&Path> {
        if let Some(p) = self.kubelet_real.get() {
            return Ok(p);
        }
        let real = safedir::open_dir_resolved(&self.cfg.kubelet_dir)
            .map(|(_, real)| real)
            .map_err(|e| Error::NodeNotReady {
                volume: volume.to_owned(),
                path: self.cfg.kubelet_dir.clone(),
                reason: e.desc().into(),
            })?;
        Ok(self.kubelet_real.get_or_init(|| real))
    }

    fn open_target(&self, volume: &str, target: &Path) -> Result<Target> {
        let parent_path = target.parent().expect("checked targets have a parent");
        let (parent, real_parent) = safedir::open_dir_resolved(parent_path).map_err(|e| match e {
            Errno::ENOENT => Error::not_found(volume, target, "parent directory does not exist"),
            Errno::ENOTDIR => Error::bad_path(volume, target, "a parent is not a directory"),
            e => Error::sys("open and resolve parent dir", volume, target, e),
        })?;
        let kubelet = self.kubelet_real(volume)?;
        if !real_parent.starts_with(kubelet) {
            return Err(Error::bad_path(
                volume,
                target,
                format!(
                    "resolves to {}, outside the kubelet dir {}",
                    real_parent.display(),
                    kubelet.display()
                ),
            ));
        }
        let name = volume::file_name(target).to_owned();
        Ok(Target {
            requested: target.to_owned(),
            real: real_parent.join(&name),
            parent,
            name,
        })
    }

    /// The mounts `keep` accepts; `path` names what the caller is working on, for errors.
    fn mounts_where(
        volume: &str,
        path: &Path,
        keep: impl FnMut(&mounts::MountEntry) -> bool,
    ) -> Result<Vec<mounts::MountEntry>> {
        mounts::read_matching(keep).map_err(|e| Error::sys("read /proc/self/mountinfo", volume, path, e))
    }

    /// The mounts that hold a volume's dir (what `bind_source` needs) and those stacked at
    /// `target`: all a publish, unpublish or stats call looks at.
    fn mounts_for(volume: &str, vol_dir: &Path, target: &Path, path: &Path) -> Result<Vec<mounts::MountEntry>> {
        Self::mounts_where(volume, path, |m| {
            m.mount_point == target || vol_dir.starts_with(&m.mount_point)
        })
    }

    fn bind_source(table: &[mounts::MountEntry], vol_dir: &Path, volume: &str) -> Result<BindSource> {
        BindSource::of_dir(table, vol_dir).ok_or_else(|| Error::NodeNotReady {
            volume: volume.to_owned(),
            path: vol_dir.to_owned(),
            reason: "no mount in /proc/self/mountinfo contains the base dir".into(),
        })
    }

    /// `None` when nothing is mounted at the target; else (statx says something is, or cannot
    /// tell) the device and inode of the directory on top, if statx could show it. "Nothing" is
    /// final, so the common publish and unpublish never read the mount table.
    fn mounted_top(t: &Target) -> Option<Option<(u64, u64)>> {
        match mounts::check_mount_point(t.parent.as_fd(), &t.name) {
            Ok(MountPointCheck {
                mounted: Some(false), ..
            })
            | Err(Errno::ENOENT) => None,
            Ok(check) => Some(check.dir),
            Err(_) => Some(None),
        }
    }

    /// Whether the directory on top at the target (`top`, from `mounted_top`) is this volume's
    /// dir itself (same device and inode): our own bind, known without the mount table. Anything
    /// else (a foreign mount, a volume dir gone or unreadable) is left to the table to tell apart.
    fn shows_volume(base: Option<&Base>, id: &str, top: Option<(u64, u64)>) -> bool {
        let (Some(base), Some(top)) = (base, top) else {
            return false;
        };
        safedir::child_dir_identity(base.fd.as_fd(), OsStr::new(id)) == Ok(top)
    }

    pub fn publish(&self, req: &NodePublishVolumeRequest) -> Result<()> {
        let id = req.volume_id.as_str();
        volume::check_id_at(id, &req.target_path)?;
        let target = volume::check_target(id, "target_path", &req.target_path, &self.cfg.kubelet_dir)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Error::missing("volume_capability", id).at_path(&target))?;
        let mut flags = volume::check_capability(id, cap).map_err(|e| e.at_path(&target).exceeding_capabilities())?;
        flags.read_only |= req.readonly;
        let limits = eviction::Limits::from_context(id, &req.volume_context).map_err(|e| e.at_path(&target))?;
        let guard = self.inflight.lock_target(id, &target)?;
        if !self.cfg.test_publish_delay.is_zero() {
            std::thread::sleep(self.cfg.test_publish_delay);
        }

        let base = self.open_base(id)?;
        let t = self.open_target(id, &target)?;
        let vol_path = base.real.join(id);
        let table = if Self::mounted_top(&t).is_some() {
            Self::mounts_for(id, &vol_path, &t.real, &target)?
        } else {
            Vec::new()
        };
        if let Some(top) = mounts::at(&table, &t.real).last() {
            let source = Self::bind_source(&table, &vol_path, id)?;
            return match source.binding_at(&table, &vol_path, top) {
                Binding::Ours | Binding::OursDeleted | Binding::OursHidden => {
                    match flags.unmet_by(top, self.inherited(id, &base)?) {
                        None => {
                            debug!(
                                "volume {id} already published at {} ({})",
                                target.display(),
                                flags.describe()
                            );
                            Ok(())
                        }
                        Some(reason) => Err(Error::conflict(id, &target, reason)),
                    }
                }
                Binding::Foreign => Err(Error::conflict(
                    id,
                    &target,
                    format!(
                        "already a mount of {} {} on {}",
                        top.fs_type,
                        top.root.display(),
                        top.source
                    ),
                )),
            };
        }

        if let Some(deleted) = self.deleted_at(id) {
            let stale = safedir::open_child(base.fd.as_fd(), OsStr::new(id)).is_ok()
                && self.meta(id).is_none_or(|m| m.created <= deleted);
            if stale {
                return Err(Error::Unavailable {
                    volume: id.to_owned(),
                    reason: format!(
                        "{} holds data of a deleted volume with this id; it is being removed, retry",
                        vol_path.display()
                    ),
                });
            }
        }
        let (vol_fd, made_vol) = safedir::open_or_ensure_child(
            base.fd.as_fd(),
            OsStr::new(id),
            Mode::from_bits_truncate(VOLUME_DIR_MODE),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => Error::NodeNotReady {
                volume: id.to_owned(),
                path: vol_path.clone(),
                reason: "volume dir is a symlink or not a directory; refusing to follow it".into(),
            },
            e => Error::sys("create volume dir", id, &vol_path, e),
        })?;
        let undo_vol = || {
            if made_vol {
                self.take_back_new_dir(&base, id, &guard);
            }
        };
        let (tgt_fd, made_tgt) =
            match safedir::ensure_child(t.parent.as_fd(), &t.name, Mode::from_bits_truncate(TARGET_DIR_MODE)) {
                Ok(v) => v,
                Err(e) => {
                    undo_vol();
                    return Err(match e {
                        Errno::ELOOP | Errno::ENOTDIR => {
                            Error::bad_path(id, &target, "target is a symlink or not a directory")
                        }
                        Errno::ENOENT => Error::conflict(id, &target, "target changed while it was being created"),
                        e => Error::sys("create target dir", id, &target, e),
                    });
                }
            };
        // The bind sits on the directory we opened, wherever a rename may since have moved it:
        // undo takes it off there, not at whatever now has the target's name.
        let undo = |tgt_fd: &OwnedFd, mounted: bool| {
            if mounted {
                let landed = safedir::real_path(tgt_fd.as_fd()).unwrap_or_else(|_| t.real.clone());
                if let Err(e) = mounts::detach(&landed) {
                    warn!("volume {id}: undo mount at {}: {}", landed.display(), e.desc());
                }
            }
            if made_tgt {
                let _ = safedir::remove_child(t.parent.as_fd(), &t.name);
            }
            undo_vol();
        };

        // What the target must show once the bind landed; asked before anything is mounted, so
        // a failure here has nothing to take off.
        let want = match safedir::identity(vol_fd.as_fd()) {
            Ok(want) => want,
            Err(e) => {
                undo(&tgt_fd, false);
                return Err(Error::sys("stat volume dir", id, &vol_path, e));
            }
        };
        let started = Instant::now();
        let bound = match mounts::bind_handles(vol_fd.as_fd(), tgt_fd.as_fd(), flags) {
            Ok(bound) => bound,
            Err(e) => {
                undo(&tgt_fd, false);
                return Err(match e {
                    Errno::ENOENT => Error::conflict(id, &target, "target changed while it was being mounted"),
                    e => Error::sys("bind mount", id, &target, e),
                });
            }
        };
        // A rename that began before the bind may still move the new mount point; after this
        // the mount stays where it is, so the checks below hold once they pass.
        if let Err(e) = safedir::settle_renames(t.parent.as_fd()) {
            drop(bound);
            undo(&tgt_fd, true);
            return Err(Error::sys("wait for renames next to the target", id, &target, e));
        }
        // Looking the name up again crosses into the new mount: proof that it landed on the
        // target. The bind's own handle, or else the name opened again, reaches its root.
        let landed_here = safedir::real_path(tgt_fd.as_fd()).is_ok_and(|p| p == t.real)
            && safedir::child_dir_identity(t.parent.as_fd(), &t.name) == Ok(want);
        let mount_root = match (landed_here, bound.root) {
            (true, Some(root)) => Some(root),
            (true, None) => safedir::open_child(t.parent.as_fd(), &t.name)
                .ok()
                .filter(|fd| safedir::identity(fd.as_fd()) == Ok(want)),
            (false, _) => None,
        };
        let Some(mount_root) = mount_root else {
            undo(&tgt_fd, true);
            return Err(Error::conflict(
                id,
                &target,
                "target changed while it was being mounted",
            ));
        };
        if flags.needs_remount() && !bound.with_flags {
            if let Err(e) = mounts::remount_bind(&safedir::fd_path(mount_root.as_fd()), flags) {
                drop(mount_root);
                undo(&tgt_fd, true);
                return Err(Error::sys("remount with the requested flags", id, &target, e));
            }
        }
        // A bind inherits read-only from its source: a read-write publish must not hand the pod a
        // read-only volume (and a repeat of it would then conflict with what it made).
        if !flags.read_only {
            let ro = BindFlags::of_mount(mount_root.as_fd()).map(|f| f.read_only);
            if ro != Ok(false) {
                drop(mount_root);
                undo(&tgt_fd, true);
                return Err(match ro {
                    Err(e) => Error::sys("statvfs", id, &target, e),
                    Ok(_) => Error::NodeNotReady {
                        volume: id.to_owned(),
                        path: vol_path,
                        reason: "the base dir's filesystem is read-only; a read-write publish cannot be served".into(),
                    },
                });
            }
        }
        metrics::MOUNT_DURATION.observe(started.elapsed());
        if made_vol {
            let name = req.volume_context.get(CONTEXT_NAME).cloned().unwrap_or_default();
            if let Err(e) = self.write_meta(&base, id, &name) {
                warn!(
                    "volume {id}: record {}: {}",
                    base.real.join(META_DIR).join(id).display(),
                    e.desc()
                );
            }
            metrics::VOLUME_CREATE_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if self.cfg.data_on_unpublish == DataOnUnpublish::Delete {
            self.unmark_kept(&base, id);
        }
        if let Err(e) = eviction::note_publish(base.fd.as_fd(), base.identity, id, limits) {
            warn!(
                "volume {id}: record its capacity under {}: {}",
                base.real.display(),
                e.desc()
            );
        }
        info!(
            "volume {id} published at {} ({})",
            t.requested.display(),
            flags.describe()
        );
        Ok(())
    }

    /// Unmounts, trying again for a moment while the mount is busy: a process that forks while
    /// it has a file open in the volume keeps the mount busy until the child execs or exits,
    /// and a container's last processes may still be exiting. Busy after that is for the caller
    /// to retry.
    fn unmount_when_free(path: &Path) -> std::result::Result<(), Errno> {
        let mut wait = Duration::from_millis(5);
        for _ in 0..BUSY_RETRIES {
            match mounts::unmount(path) {
                Err(Errno::EBUSY) => {
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                other => return other,
            }
        }
        mounts::unmount(path)
    }

    pub fn unpublish(&self, req: &NodeUnpublishVolumeRequest) -> Result<()> {
        let id = req.volume_id.as_str();
        volume::check_id_at(id, &req.target_path)?;
        let target = volume::check_target(id, "target_path", &req.target_path, &self.cfg.kubelet_dir)?;
        let guard = self.inflight.lock_target(id, &target)?;
        let t = match self.open_target(id, &target) {
            Err(Error::NotFound { .. }) => {
                debug!(
                    "volume {id}: parent of {} is gone; nothing to unpublish",
                    target.display()
                );
                return Ok(());
            }
            other => other?,
        };
        // The base dir's handle, checked once per call and only if something is to be noted.
        let base_cell = std::cell::OnceCell::new();
        let base = || base_cell.get_or_init(|| self.open_base(id).ok()).as_deref();
        let mut unmounted = 0;
        while let Some(top) = Self::mounted_top(&t) {
            if !Self::shows_volume(base(), id, top) {
                let vol_dir = self.base_real(base()).join(id);
                let table = Self::mounts_for(id, &vol_dir, &t.real, &target)?;
                let Some(top) = mounts::at(&table, &t.real).last().copied() else {
                    break;
                };
                let source = Self::bind_source(&table, &vol_dir, id)?;
                if source.binding_at(&table, &vol_dir, top) == Binding::Foreign {
                    return Err(Error::ForeignMount {
                        volume: id.to_owned(),
                        path: target,
                        what: format!("{} {} on {}", top.fs_type, top.root.display(), top.source),
                    });
                }
            }
            if unmounted == MAX_STACKED {
                return Err(Error::sys(
                    "unmount (too many stacked mounts)",
                    id,
                    &target,
                    Errno::EBUSY,
                ));
            }
            match Self::unmount_when_free(&t.real) {
                // EINVAL: no longer a mount point; someone else unmounted it first.
                Ok(()) | Err(Errno::EINVAL) => unmounted += 1,
                Err(Errno::EBUSY) => {
                    return Err(Error::Unavailable {
                        volume: id.to_owned(),
                        reason: format!(
                            "path {}: cannot unmount yet: something still has a file or directory open in it; retry",
                            target.display()
                        ),
                    })
                }
                Err(e) => return Err(Error::sys("unmount", id, &target, e)),
            }
        }
        // A target dir left with nothing mounted is a publish the node lost (a reboot, or an
        // unmount behind our back): that copy was in use until then.
        let mut left_behind = false;
        match safedir::remove_child(t.parent.as_fd(), &t.name) {
            Ok(()) => left_behind = unmounted == 0,
            Err(Errno::ENOENT) => {}
            // Never delete data: a non-empty dir that is not a mount was written by someone else.
            Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
                warn!(
                    "volume {id}: target {} is not empty and not a mount; leaving it",
                    target.display()
                )
            }
            Err(Errno::ENOTDIR) => {
                return Err(Error::bad_path(
                    id,
                    &target,
                    "target is a symlink or a file, not a directory; left in place",
                ))
            }
            Err(e) => return Err(Error::sys("remove target dir", id, &target, e)),
        }
        if unmounted > 0 || left_behind {
            if let Some(base) = base() {
                if let Err(e) = eviction::note_unpublish(base.fd.as_fd(), id, SystemTime::now()) {
                    warn!(
                        "volume {id}: record its last use under {}: {}",
                        base.real.display(),
                        e.desc()
                    );
                }
            }
            info!("volume {id} unpublished from {}", target.display());
        } else {
            debug!("volume {id}: nothing mounted at {}", target.display());
        }
        if self.cfg.data_on_unpublish == DataOnUnpublish::Delete {
            // Another call on the volume under way may be the unpublish of its last other pod,
            // which found this one under way in turn: once this call lets go of its target,
            // it tries again, so whichever of the two lets go last deletes.
            let deleted = match self.delete_unless_used(id, Some(&guard)) {
                Ok(store::DeleteOutcome::Busy) => {
                    std::thread::sleep(self.cfg.test_unpublish_delay);
                    drop(guard);
                    self.delete_unless_used(id, None)
                }
                other => other,
            };
            // The target is gone already: kubelet's retry would find nothing to unmount and fail
            // the same way, so a copy that cannot go now (a read-only base, something mounted in
            // it) stays for the next unpublish or the cleanup instead of holding the pod.
            if let Err(e) = deleted {
                warn!(
                    "volume {id}: unpublished from {}, but its data stays: {e}",
                    target.display()
                );
            }
        }
        Ok(())
    }

    pub fn stats(&self, req: &NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        let id = req.volume_id.as_str();
        volume::check_id_at(id, &req.volume_path)?;
        // The spec's "volume does not exist on the specified path": any path that cannot be a
        // publish target of ours (relative, outside the kubelet dir) is one.
        let path =
            volume::check_target(id, "volume_path", &req.volume_path, &self.cfg.kubelet_dir).map_err(|e| match e {
                Error::BadPath { volume, path, reason } => Error::NotFound {
                    volume,
                    path,
                    reason: format!("not a publish target of this volume: {reason}"),
                },
                e => e,
            })?;
        let not_published = || Error::not_found(id, &path, "not a publish target of this volume");
        let t = match self.open_target(id, &path) {
            // A path that leads out of the kubelet dir or through a file is no target either.
            Err(Error::NotFound { .. } | Error::BadPath { .. }) => return Err(not_published()),
            other => other?,
        };
        // The base dir's handle, checked once for the whole call.
        let base = self.open_base(id).ok();
        let vol_dir = self.base_real(base.as_deref()).join(id);
        let table = Self::mounts_for(id, &vol_dir, &t.real, &path)?;
        let source = Self::bind_source(&table, &vol_dir, id)?;
        let binding = mounts::at(&table, &t.real)
            .last()
            .map(|m| source.binding_at(&table, &vol_dir, m));
        let mut condition = VolumeCondition::new();
        match binding {
            None | Some(Binding::Foreign) => return Err(not_published()),
            Some(Binding::OursDeleted) => {
                condition.abnormal = true;
                condition.message = format!(
                    "volume {id}: the node's data dir was deleted while mounted at {}",
                    path.display()
                );
            }
            Some(Binding::OursHidden) => {
                condition.abnormal = true;
                condition.message = format!(
                    "volume {id}: a filesystem was mounted over the base dir {} since this pod's publish at {}; \
                     the pod keeps the copy underneath until it restarts",
                    self.cfg.base_dir.display(),
                    path.display()
                );
            }
            Some(Binding::Ours) => {
                let vol = base
                    .as_ref()
                    .map(|b| safedir::child_dir_identity(b.fd.as_fd(), OsStr::new(id)));
                if !matches!(vol, Some(Ok(_))) {
                    condition.abnormal = true;
                    condition.message = format!(
                        "volume {id}: the node's data dir {} is missing",
                        self.cfg.base_dir.join(id).display()
                    );
                }
            }
        }
        // The copy mounted there is measured from the base dir: a walk through the target would
        // hold the pod's mount busy for its whole length, and an unpublish then could not unmount.
        let copy = match (binding, &base) {
            (Some(Binding::Ours), Some(b)) => safedir::open_child(b.fd.as_fd(), OsStr::new(id)).ok(),
            _ => None,
        };
        let root = match copy {
            Some(fd) => fd,
            None => safedir::open_child(t.parent.as_fd(), &t.name).map_err(|e| match e {
                // Unpublished since the table was read.
                Errno::ENOENT => not_published(),
                e => Error::sys("open volume path", id, &path, e),
            })?,
        };
        let vfs = nix::sys::statvfs::fstatvfs(root.as_fd()).map_err(|e| Error::sys("statvfs", id, &path, e))?;
        let used = match binding {
            Some(Binding::Ours) => self.usage(id, root, &path)?,
            // Not the node's copy (deleted, or under a filesystem mounted since): measured on
            // its own, never kept as the copy's measurement.
            _ => safedir::usage(root).map_err(|e| Error::sys("measure volume usage", id, &path, e))?,
        };
        if !condition.abnormal {
            let over = base
                .as_ref()
                .and_then(|b| eviction::over_capacity(b.fd.as_fd(), id, used.bytes));
            if let Some(message) = over {
                condition.abnormal = true;
                condition.message = message;
            }
        }
        let frsize = vfs.fragment_size() as i64;
        let mut bytes = VolumeUsage::new();
        bytes.unit = Unit::BYTES.into();
        bytes.total = vfs.blocks() as i64 * frsize;
        bytes.available = vfs.blocks_available() as i64 * frsize;
        bytes.used = used.bytes as i64;
        let mut inodes = VolumeUsage::new();
        inodes.unit = Unit::INODES.into();
        inodes.total = vfs.files() as i64;
        inodes.available = vfs.files_available() as i64;
        inodes.used = used.inodes as i64;
        let mut r = NodeGetVolumeStatsResponse::new();
        r.usage = vec![bytes, inodes];
        r.volume_condition = Some(condition).into();
        Ok(r)
    }

    fn usage(&self, id: &str, root: OwnedFd, path: &Path) -> Result<Usage> {
        self.usage_cache
            .get(id, self.cfg.stats_cache_ttl, || {
                let started = Instant::now();
                let u = safedir::usage(root)?;
                debug!(
                    "volume {id}: measured {} inodes, {} bytes in {:.1}ms",
                    u.inodes,
                    u.bytes,
                    started.elapsed().as_secs_f64() * 1e3
                );
                Ok(u)
            })
            .map_err(|e| match e {
                Errno::EAGAIN => Error::Unavailable {
                    volume: id.to_owned(),
                    reason: format!("path {}: other volumes are being measured; retry", path.display()),
                },
                e => Error::sys("measure volume usage", id, path, e),
            })
    }

    /// Volumes bind-mounted on this node now (the `active_volumes` gauge).
    pub fn mounted_volumes(&self) -> u64 {
        let Ok(base) = self.open_base("") else {
            return 0;
        };
        let Some(source) = mounts::read_matching(|m| base.real.starts_with(&m.mount_point))
            .ok()
            .and_then(|holding| BindSource::of_dir(&holding, &base.real))
        else {
            return 0;
        };
        mounts::read_matching(|m| m.dev == source.dev && m.root.parent() == Some(source.root.as_path()))
            .map_or(0, |binds| mounts::volumes_mounted(&binds, &source) as u64)
    }
}

#[derive(Clone)]
pub struct NodeService {
    state: Arc<NodeState>,
    rpc: Rpc,
}

impl NodeService {
    pub fn new(state: Arc<NodeState>, rpc: Rpc) -> NodeService {
        NodeService { state, rpc }
    }

    fn capabilities() -> NodeGetCapabilitiesResponse {
        let mut r = NodeGetCapabilitiesResponse::new();
        for t in [NodeRpc::GET_VOLUME_STATS, NodeRpc::VOLUME_CONDITION] {
            let mut rpc = node_service_capability::RPC::new();
            rpc.type_ = t.into();
            let mut cap = NodeServiceCapability::new();
            cap.set_rpc(rpc);
            r.capabilities.push(cap);
        }
        r
    }
}

impl grpc::Node for NodeService {
    fn node_publish_volume(
        &mut self,
        _: RpcContext,
        req: NodePublishVolumeRequest,
        sink: UnarySink<NodePublishVolumeResponse>,
    ) {
        let state = self.state.clone();
        let subject = req.volume_id.clone();
        self.rpc.blocking("NodePublishVolume", &subject, req, sink, move |req| {
            state.publish(&req).map(|()| NodePublishVolumeResponse::new())
        });
    }

    fn node_unpublish_volume(
        &mut self,
        _: RpcContext,
        req: NodeUnpublishVolumeRequest,
        sink: UnarySink<NodeUnpublishVolumeResponse>,
    ) {
        let state = self.state.clone();
        let subject = req.volume_id.clone();
        self.rpc
            .blocking("NodeUnpublishVolume", &subject, req, sink, move |req| {
                state.unpublish(&req).map(|()| NodeUnpublishVolumeResponse::new())
            });
    }

    fn node_get_volume_stats(
        &mut self,
        _: RpcContext,
        req: NodeGetVolumeStatsRequest,
        sink: UnarySink<NodeGetVolumeStatsResponse>,
    ) {
        let state = self.state.clone();
        let subject = req.volume_id.clone();
        self.rpc
            .blocking("NodeGetVolumeStats", &subject, req, sink, move |req| state.stats(&req));
    }

    fn node_get_capabilities(
        &mut self,
        _: RpcContext,
        req: NodeGetCapabilitiesRequest,
        sink: UnarySink<NodeGetCapabilitiesResponse>,
    ) {
        self.rpc
            .inline("NodeGetCapabilities", req, sink, |_| Ok(NodeService::capabilities()));
    }

    fn node_get_info(&mut self, _: RpcContext, req: NodeGetInfoRequest, sink: UnarySink<NodeGetInfoResponse>) {
        let node_id = self.state.cfg.node_name.clone();
        self.rpc.inline("NodeGetInfo", req, sink, |_| {
            let mut r = NodeGetInfoResponse::new();
            r.node_id = node_id;
            Ok(r)
        });
    }
}
