//! The node's store of volume copies: the record kept beside each copy it creates
//! (`<base-dir>/.meta/<id>`), listing and deleting copies, and the cleanup poller's view of
//! deleted volumes. The CSI Node service publishes from it; the cleanup and eviction passes
//! delete from it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info};
use nix::errno::Errno;
use nix::sys::stat::Mode;

use super::{Base, NodeState, BASE_DIR_MODE};
use crate::config::DataOnUnpublish;
use crate::error::{Error, Result};
use crate::inflight::TargetGuard;
use crate::metrics;
use crate::mounts::BindSource;
use crate::safedir;
use crate::volume;

/// What a node records beside each volume dir it creates (in `<base-dir>/.meta/<id>`, out of the
/// pods' sight): when, and for which CreateVolume name (the PV name under csi-provisioner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    pub created: SystemTime,
    pub name: String,
}

pub(super) const META_DIR: &str = ".meta";
/// `<base-dir>/.meta/cleanup-read`, whose modification time is when the cleanup poller started
/// the last pass that read the deletions and went through all of them: kept across restarts, so
/// a restarted plugin trusts a trimmed index as it did before (a rollout sent every node to list
/// every record once). Not a volume id, so never taken for a copy's record.
const INDEX_READ: &str = "cleanup-read";
/// `<base-dir>/.meta/<id>.kept`: under `--data-on-unpublish=delete`, a copy whose deletion had to
/// wait (something mounted inside it, a failed delete). The eviction pass deletes such a copy
/// once no pod mounts it; a publish takes the mark away, the copy being in use again.
const KEPT_SUFFIX: &str = ".kept";

fn kept_mark(id: &str) -> String {
    format!("{id}{KEPT_SUFFIX}")
}

/// Whether the copy `id` in the base dir `base` carries the mark of a delete that had to wait.
pub fn marked_kept(base: BorrowedFd<'_>, id: &str) -> bool {
    let mark = format!("{META_DIR}/{}", kept_mark(id));
    nix::sys::stat::fstatat(base, mark.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// What became of a copy its node was asked to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeleteOutcome {
    Deleted,
    /// Another call on the volume was under way.
    Busy,
    /// Mounted somewhere, or something is mounted inside it.
    InUse,
}

impl NodeState {
    /// Deletes this node's copy of a volume unless it is in use (mounted anywhere, something is
    /// mounted inside it, or another call on the volume is under way). Returns whether the data
    /// is gone.
    pub fn delete_data(&self, id: &str, holding: Option<&TargetGuard>) -> Result<bool> {
        Ok(self.delete_unless_used(id, holding)? == DeleteOutcome::Deleted)
    }

    /// `delete_data`, saying why a copy stayed.
    pub(crate) fn delete_unless_used(&self, id: &str, holding: Option<&TargetGuard>) -> Result<DeleteOutcome> {
        let Some(_whole) = self.inflight.lock_volume(id, holding) else {
            debug!("volume {id}: busy; data kept for now");
            return Ok(DeleteOutcome::Busy);
        };
        let base = match self.open_base(id) {
            Ok(base) => base,
            // No base dir, no copy: an unpublish that deletes must not fail for ever for it.
            Err(_) if matches!(std::fs::symlink_metadata(&self.cfg.base_dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound) =>
            {
                debug!(
                    "volume {id}: no base dir {}; nothing to delete",
                    self.cfg.base_dir.display()
                );
                return Ok(DeleteOutcome::Deleted);
            }
            Err(e) => return Err(e),
        };
        let vol_path = base.real.join(id);
        if let Some(at) = Self::mounted_somewhere(id, &vol_path)? {
            if at.starts_with(&vol_path) && at != vol_path {
                // Deleting around it would fail half-way; a pass after the unmount deletes it all.
                info!(
                    "volume {id}: something is mounted inside the copy at {}; data kept",
                    at.display()
                );
                self.mark_kept(&base, id);
            } else {
                debug!("volume {id}: still mounted at {}; data kept", at.display());
            }
            return Ok(DeleteOutcome::InUse);
        }
        let started = Instant::now();
        let existed = safedir::open_child(base.fd.as_fd(), OsStr::new(id)).is_ok();
        if let Err(e) = safedir::remove_tree(base.fd.as_fd(), OsStr::new(id)) {
            self.mark_kept(&base, id);
            return Err(Error::sys("delete volume data", id, base.real.join(&e.at), e.errno));
        }
        self.usage_cache.forget(id);
        if let Ok(meta_dir) = safedir::open_child(base.fd.as_fd(), OsStr::new(META_DIR)) {
            // With the record, any half-written one a crash left (`write_meta_record`).
            for name in [id.to_owned(), format!("{id}.new"), kept_mark(id)] {
                let _ = nix::unistd::unlinkat(meta_dir.as_fd(), name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            }
        }
        if existed {
            metrics::CLEANUP_DURATION.observe(started.elapsed());
            metrics::VOLUME_DELETE_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info!(
                "volume {id}: data deleted from {} in {:.1}ms",
                vol_path.display(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(DeleteOutcome::Deleted)
    }

    /// Marks a copy whose deletion under `--data-on-unpublish=delete` has to wait; in the other
    /// mode a copy is kept anyway. Unmarked (a read-only base dir), it waits for the next unpublish.
    fn mark_kept(&self, base: &Base, id: &str) {
        use nix::fcntl::OFlag;
        if self.cfg.data_on_unpublish != DataOnUnpublish::Delete {
            return;
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let marked = safedir::ensure_child(
            base.fd.as_fd(),
            OsStr::new(META_DIR),
            Mode::from_bits_truncate(BASE_DIR_MODE),
        )
        .and_then(|(dir, _)| {
            nix::fcntl::openat(
                dir.as_fd(),
                kept_mark(id).as_str(),
                flags,
                Mode::from_bits_truncate(0o600),
            )
        });
        if let Err(e) = marked {
            debug!("volume {id}: not marked for a later delete: {}", e.desc());
        }
    }

    /// Takes a copy's mark away (`mark_kept`): a publish uses it again.
    pub(super) fn unmark_kept(&self, base: &Base, id: &str) {
        if let Ok(dir) = safedir::open_child(base.fd.as_fd(), OsStr::new(META_DIR)) {
            let _ = nix::unistd::unlinkat(
                dir.as_fd(),
                kept_mark(id).as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    /// Where a bind of the volume dir `vol_path` (or of anything inside it) is mounted, or
    /// where something is mounted on or inside it, if anywhere. A mount inside is not the
    /// copy's and must not be deleted in: the walks step around mounts, but where the kernel
    /// cannot tell a bind from the same filesystem (before Linux 5.8) only the table shows it.
    fn mounted_somewhere(id: &str, vol_path: &Path) -> Result<Option<PathBuf>> {
        let holding = Self::mounts_where(id, vol_path, |m| vol_path.starts_with(&m.mount_point))?;
        let source = Self::bind_source(&holding, vol_path, id)?;
        Ok(Self::mounts_where(id, vol_path, |m| {
            source.shown_by(m) || m.mount_point.starts_with(vol_path)
        })?
        .first()
        .map(|m| m.mount_point.clone()))
    }

    /// Which of the copies `ids` are in use: a bind of the copy (or of anything inside it) is
    /// mounted somewhere, or something is mounted on or inside it. One read of the mount table
    /// for all of them, keeping only the lines that can matter.
    pub fn mounted_copies(&self, ids: &[String]) -> Result<HashSet<String>> {
        let base = self.open_base("")?;
        let wanted: HashSet<&OsStr> = ids.iter().map(|id| OsStr::new(id.as_str())).collect();
        let table = Self::mounts_where("", &base.real, |m| {
            base.real.starts_with(&m.mount_point)
                || m.mount_point.starts_with(&base.real)
                || m.root.components().any(|c| wanted.contains(c.as_os_str()))
        })?;
        let source = Self::bind_source(&table, &base.real, "")?;
        Ok(ids
            .iter()
            .filter(|id| {
                let copy = BindSource {
                    dev: source.dev,
                    root: source.root.join(id),
                };
                let on_copy = base.real.join(id);
                table
                    .iter()
                    .any(|m| copy.shown_by(m) || m.mount_point.starts_with(&on_copy))
            })
            .cloned()
            .collect())
    }

    /// Takes back the empty volume dir a failed publish made, unless another call on the volume
    /// is under way or a bind of the dir exists: a publish beside this one may have found the
    /// dir meanwhile, and its pod would be left writing into a deleted dir. Left in place, an
    /// empty dir costs nothing.
    pub(super) fn take_back_new_dir(&self, base: &Base, id: &str, holding: &TargetGuard) {
        let Some(whole) = self.inflight.lock_volume_briefly(id, holding) else {
            debug!("volume {id}: another call uses the new dir; left in place");
            return;
        };
        match Self::mounted_somewhere(id, &base.real.join(id)) {
            // A publish that came meanwhile waits for this lock; it asked, so it may want the dir.
            Ok(None) if whole.yield_requested() => {
                debug!("volume {id}: a publish waits for the new dir; left in place")
            }
            Ok(None) => {
                let _ = safedir::remove_child(base.fd.as_fd(), OsStr::new(id));
            }
            Ok(Some(at)) => debug!("volume {id}: the new dir is mounted at {}; left in place", at.display()),
            Err(e) => debug!("volume {id}: the new dir is left in place: {e}"),
        }
    }

    pub(super) fn write_meta(&self, base: &Base, id: &str, name: &str) -> std::result::Result<(), Errno> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Self::write_meta_record(base, id, created as u64, name)
    }

    /// Writes the record under a temporary name and renames it into place, so a reader (or a
    /// crash) never meets half a record.
    fn write_meta_record(base: &Base, id: &str, created_ms: u64, name: &str) -> std::result::Result<(), Errno> {
        use nix::fcntl::OFlag;
        use std::io::Write;
        let (dir, _) = safedir::ensure_child(
            base.fd.as_fd(),
            OsStr::new(META_DIR),
            Mode::from_bits_truncate(BASE_DIR_MODE),
        )?;
        let partial = format!("{id}.new");
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(dir.as_fd(), partial.as_str(), flags, Mode::from_bits_truncate(0o600))?;
        let text = serde_json::json!({ "createdMs": created_ms, "name": name }).to_string();
        std::fs::File::from(fd)
            .write_all(text.as_bytes())
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
        nix::fcntl::renameat(dir.as_fd(), partial.as_str(), dir.as_fd(), id)
    }

    /// Records `name` as the PV of this node's copy of `id`, once a scan of the PVs found it, so
    /// later checks ask for that PV alone. The creation time is kept; a copy without a record gets
    /// the epoch, which every check of the creation time treats as it treats a missing record.
    /// Nothing is written while another call works on the volume, when the copy is gone, or when
    /// its record names a PV already. Returns whether the name was written.
    pub fn record_pv_name(&self, id: &str, name: &str) -> Result<bool> {
        let Some(_whole) = self.inflight.lock_volume(id, None) else {
            return Ok(false);
        };
        let base = self.open_base(id)?;
        if safedir::open_child(base.fd.as_fd(), OsStr::new(id)).is_err() {
            return Ok(false);
        }
        let created_ms = match self.meta(id) {
            Some(meta) if !meta.name.is_empty() => return Ok(false),
            Some(meta) => meta.created.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
            None => 0,
        };
        Self::write_meta_record(&base, id, created_ms, name)
            .map_err(|e| Error::sys("record PV name", id, base.real.join(META_DIR).join(id), e))?;
        Ok(true)
    }

    /// The record written when this node created the volume dir, if any.
    pub fn meta(&self, id: &str) -> Option<VolumeMeta> {
        let base = self.open_base(id).ok()?;
        let v = safedir::read_json_record(base.fd.as_fd(), OsStr::new(META_DIR), id)?;
        Some(VolumeMeta {
            created: UNIX_EPOCH + std::time::Duration::from_millis(v["createdMs"].as_u64()?),
            name: v["name"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Volume ids with a dir in the base dir.
    pub fn local_volumes(&self) -> Result<Vec<String>> {
        let base = self.open_base("")?;
        // A handle of its own: reading a directory moves its offset, and the base's is shared.
        let mut dir = safedir::open_child(base.fd.as_fd(), OsStr::new("."))
            .and_then(nix::dir::Dir::from_fd)
            .map_err(|e| Error::sys("read base dir", "", &self.cfg.base_dir, e))?;
        let mut ids = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| Error::sys("read base dir", "", &self.cfg.base_dir, e))?;
            if let Ok(name) = entry.file_name().to_str() {
                if volume::check_id(name).is_ok() {
                    ids.push(name.to_owned());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Whether this node holds a dir for `id`.
    pub fn has_volume(&self, id: &str) -> bool {
        self.open_base(id)
            .is_ok_and(|b| safedir::open_child(b.fd.as_fd(), OsStr::new(id)).is_ok())
    }

    /// When the last complete cleanup pass started, as `note_index_read` left it.
    pub fn index_read(&self) -> Option<SystemTime> {
        let base = self.open_base("").ok()?;
        let dir = safedir::open_child(base.fd.as_fd(), OsStr::new(META_DIR)).ok()?;
        let st = nix::sys::stat::fstatat(dir.as_fd(), INDEX_READ, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        let file = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG;
        file.then(|| safedir::modified(&st))
    }

    /// Notes in the base dir that a cleanup pass started at `at` went through every deletion.
    pub fn note_index_read(&self, at: SystemTime) -> Result<()> {
        use nix::fcntl::OFlag;
        use nix::sys::time::TimeSpec;
        let path = || self.cfg.base_dir.join(META_DIR).join(INDEX_READ);
        let base = self.open_base("")?;
        let (dir, _) = safedir::ensure_child(
            base.fd.as_fd(),
            OsStr::new(META_DIR),
            Mode::from_bits_truncate(BASE_DIR_MODE),
        )
        .map_err(|e| Error::sys("note the cleanup read", "", path(), e))?;
        // Not blocking: a FIFO of that name would hold an open for writing until a reader came.
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        nix::fcntl::openat(dir.as_fd(), INDEX_READ, flags, Mode::from_bits_truncate(0o600))
            .and_then(|fd| nix::sys::stat::futimens(fd.as_fd(), &TimeSpec::UTIME_OMIT, &TimeSpec::from_duration(since)))
            .map_err(|e| Error::sys("note the cleanup read", "", path(), e))
    }

    /// The cleanup poller's view of deleted volumes, replaced whole on every poll.
    pub fn set_deleted(&self, deleted: HashMap<String, SystemTime>) {
        *self.deleted.lock().unwrap_or_else(|p| p.into_inner()) = deleted;
    }

    pub(super) fn deleted_at(&self, id: &str) -> Option<SystemTime> {
        self.deleted.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied()
    }

    /// Drops a volume's cached usage (its copy was trimmed).
    pub fn forget_usage(&self, id: &str) {
        self.usage_cache.forget(id);
    }

    /// Forgets a copy that eviction took away, so the next publish starts afresh, as on a node
    /// that never had it.
    pub fn forget_copy(&self, id: &str) {
        self.forget_usage(id);
        if let Ok(base) = self.open_base(id) {
            if let Ok(meta_dir) = safedir::open_child(base.fd.as_fd(), OsStr::new(META_DIR)) {
                let _ = nix::unistd::unlinkat(meta_dir.as_fd(), id, nix::unistd::UnlinkatFlags::NoRemoveDir);
            }
        }
    }
}
