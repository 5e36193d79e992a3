//! The least-recently-used trim of one copy: a walk that never follows a symlink or enters a
//! mount (a bind from the same filesystem included), keeps only the oldest files that cover what must be freed (memory stays
//! flat on copies of millions of files), and deletes them through directories opened again
//! without following symlinks. It stops as soon as its caller says so.

use std::collections::BinaryHeap;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::safedir::{self, Stat};

/// Files a trim keeps in mind per walk of a copy: the oldest ones. A copy needing more is walked
/// again; memory stays flat however many files the copy holds.
const MAX_CANDIDATES: usize = 16 * 1024;
/// Directory levels walked below a copy (as deep as `safedir::usage` counts); deeper files are
/// neither counted nor trimmed, but go with the copy when it is evicted whole.
const MAX_DEPTH: usize = 256;
/// Entries walked between checks whether a publish is waiting.
const STOP_CHECK_EVERY: u64 = 256;
/// Walk-and-delete rounds in one trim before the pass moves on.
const MAX_ROUNDS: usize = 64;

/// A file a trim may delete. Ordered by last use, so a max-heap's top is the newest kept.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    used: (i64, i64),
    path: PathBuf,
    ino: u64,
    bytes: u64,
}

/// What one walk of a copy found.
#[derive(Debug, Default)]
struct Scan {
    bytes: u64,
    /// The oldest files, oldest first: at most `MAX_CANDIDATES`, and no more than cover `need`.
    oldest: Vec<Candidate>,
}

/// Why a walk or a trim stopped early.
#[derive(Debug, PartialEq, Eq)]
pub enum Halt {
    /// A publish for the volume is waiting.
    Yielded,
    Failed(Errno, PathBuf),
}

/// When a file was last used: the later of its access and modification times. Under relatime
/// (the usual default) the access time moves at most once a day, after a read; under noatime
/// it never moves, and the modification time is all there is; each is a lower bound.
fn last_use(st: &Stat) -> (i64, i64) {
    st.atime.max(st.mtime)
}

pub fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

/// A fresh handle on an opened directory, reading from its start.
pub fn reopen(dir: BorrowedFd<'_>) -> std::result::Result<OwnedFd, Errno> {
    safedir::open_child(dir, OsStr::new("."))
}

/// Walks a copy without following symlinks or entering mounts, one open directory
/// per level, adding up its bytes as `safedir::usage` does and keeping the oldest files that
/// cover `need` bytes (none when `need` is 0).
fn walk(root: OwnedFd, need: u64, stop: &dyn Fn() -> bool) -> std::result::Result<Scan, Halt> {
    let failed = |e, at: &Path| Halt::Failed(e, at.to_owned());
    let st = safedir::stat_fd(root.as_fd()).map_err(|e| failed(e, Path::new("")))?;
    let dev = st.dev;
    let mut scan = Scan {
        bytes: st.bytes,
        oldest: Vec::new(),
    };
    let mut heap = BinaryHeap::new();
    let mut heap_bytes = 0u64;
    let root = Dir::from_fd(root).map_err(|e| failed(e, Path::new("")))?;
    let mut levels = vec![(root.into_iter(), PathBuf::new())];
    let mut seen = 0u64;
    while let Some((entries, at)) = levels.last_mut() {
        let Some(entry) = entries.next() else {
            levels.pop();
            continue;
        };
        let entry = entry.map_err(|e| failed(e, at))?;
        let name = entry.file_name();
        if is_dot(name) {
            continue;
        }
        seen += 1;
        if seen % STOP_CHECK_EVERY == 0 && stop() {
            return Err(Halt::Yielded);
        }
        // SAFETY: the descriptor belongs to `entries`, which stays in `levels` (open) for as long
        // as this borrow is used: below, before any level is popped.
        let dir = unsafe { BorrowedFd::borrow_raw(entries.as_raw_fd()) };
        let path = at.join(OsStr::from_bytes(name.to_bytes()));
        let st = match safedir::stat_at(dir, name) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(failed(e, &path)),
        };
        // A mount inside (another filesystem or a bind): not the copy's, neither counted nor
        // trimmed.
        if st.is_mount_boundary(dev) {
            continue;
        }
        scan.bytes += st.bytes;
        if st.is_dir() {
            if levels.len() >= MAX_DEPTH {
                continue;
            }
            let sub = match safedir::open_walkable_child(dir, path.file_name().unwrap_or_default(), dev) {
                Ok(Some(fd)) => fd,
                Ok(None) | Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(failed(e, &path)),
            };
            let sub = Dir::from_fd(sub).map_err(|e| failed(e, &path))?;
            levels.push((sub.into_iter(), path));
            continue;
        }
        if need == 0 {
            continue;
        }
        heap_bytes += st.bytes;
        heap.push(Candidate {
            used: last_use(&st),
            path,
            ino: st.ino,
            bytes: st.bytes,
        });
        // Drop the newest while the rest still cover `need`, or while there are too many.
        while let Some(top) = heap.peek() {
            let rest = heap_bytes - top.bytes;
            if heap.len() <= MAX_CANDIDATES && rest < need {
                break;
            }
            heap_bytes = rest;
            heap.pop();
        }
    }
    scan.oldest = heap.into_sorted_vec();
    Ok(scan)
}

/// Deletes one file the walk chose, if it is still that file and still unused since: each
/// directory on the way is opened again without following symlinks or entering a mount.
/// Returns the bytes freed (0 when the file has changed or gone).
fn delete_candidate(root: BorrowedFd<'_>, dev: u64, c: &Candidate) -> std::result::Result<u64, Errno> {
    let (Some(parent), Some(name)) = (c.path.parent(), c.path.file_name()) else {
        return Ok(0);
    };
    let mut held: Option<OwnedFd> = None;
    for part in parent.components() {
        let at = held.as_ref().map_or(root, |f| f.as_fd());
        let next = match safedir::open_walkable_child(at, part.as_os_str(), dev) {
            Ok(Some(fd)) => fd,
            Ok(None) | Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => return Ok(0),
            Err(e) => return Err(e),
        };
        held = Some(next);
    }
    let dir = held.as_ref().map_or(root, |f| f.as_fd());
    let name = std::ffi::CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)?;
    let st = match safedir::stat_at(dir, &name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(0),
        Err(e) => return Err(e),
    };
    if st.is_dir() || st.is_mount_boundary(dev) || st.ino != c.ino || last_use(&st) > c.used {
        return Ok(0);
    }
    match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(st.bytes),
        Err(Errno::ENOENT | Errno::EISDIR) => Ok(0),
        Err(e) => Err(e),
    }
}

/// What a trim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmed {
    pub files: u64,
    pub freed: u64,
    /// Bytes the copy held when the trim began.
    pub before: u64,
    /// Whether it stopped early for a publish.
    pub yielded: bool,
}

/// Deletes the least recently used files below `copy` until it holds at most `to` bytes (or
/// nothing more can go: directories stay), walking it again when one walk's oldest files were
/// not enough. `hint` is what the caller expects to free (bounds the first walk's memory).
pub fn trim(copy: BorrowedFd<'_>, to: u64, hint: u64, stop: &dyn Fn() -> bool) -> std::result::Result<Trimmed, Halt> {
    let dev = safedir::stat_fd(copy).map_err(|e| Halt::Failed(e, PathBuf::new()))?.dev;
    let mut done = Trimmed::default();
    let mut need = hint.max(1);
    for round in 0..MAX_ROUNDS {
        let root = reopen(copy).map_err(|e| Halt::Failed(e, PathBuf::new()))?;
        let scan = match walk(root, need, stop) {
            Err(Halt::Yielded) => {
                done.yielded = true;
                return Ok(done);
            }
            other => other?,
        };
        if round == 0 {
            done.before = scan.bytes;
        }
        if scan.bytes <= to {
            break;
        }
        need = scan.bytes - to;
        let mut freed = 0;
        for c in &scan.oldest {
            if stop() {
                done.yielded = true;
                return Ok(done);
            }
            let bytes = delete_candidate(copy, dev, c).map_err(|e| Halt::Failed(e, c.path.clone()))?;
            if bytes > 0 || c.bytes == 0 {
                done.files += 1;
            }
            freed += bytes;
            if freed >= need {
                break;
            }
        }
        done.freed += freed;
        if freed == 0 || freed >= need {
            break;
        }
        need -= freed;
    }
    Ok(done)
}

/// Bytes below a copy, counted as the trim counts them (blocks, as `safedir::usage` does).
pub fn measure(root: OwnedFd) -> Result<u64, (Errno, PathBuf)> {
    match walk(root, 0, &|| false) {
        Ok(scan) => Ok(scan.bytes),
        Err(Halt::Failed(e, at)) => Err((e, at)),
        Err(Halt::Yielded) => Err((Errno::EINTR, PathBuf::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nlc-trim-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Ten files, `f0` the least recently used; returns the bytes one of them holds.
    fn ten_files(d: &Path) -> u64 {
        for i in 0..10u64 {
            let path = d.join(format!("f{i}"));
            fs::write(&path, [1u8; 4096]).unwrap();
            let at = SystemTime::now() - Duration::from_secs(1000 - i * 10);
            let times = fs::FileTimes::new().set_accessed(at).set_modified(at);
            fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_times(times)
                .unwrap();
        }
        fs::metadata(d.join("f0")).unwrap().blocks() * 512
    }

    #[test]
    fn a_walk_keeps_the_oldest_files_that_cover_the_need_oldest_first() {
        let d = tmp("walk");
        let one = ten_files(&d);
        assert!(one > 0);
        let scan = walk(safedir::open_dir(&d).unwrap(), 3 * one, &|| false).unwrap();
        let names: Vec<_> = scan.oldest.iter().map(|c| c.path.display().to_string()).collect();
        assert_eq!(names, ["f0", "f1", "f2"]);
        assert!(scan.bytes >= 10 * one);
        assert_eq!(measure(safedir::open_dir(&d).unwrap()).unwrap(), scan.bytes);
        fs::remove_dir_all(&d).unwrap();
    }

    /// A bind from the same filesystem inside a copy is not the copy's: its files, older than
    /// any, are neither counted nor trimmed.
    #[test]
    fn a_same_filesystem_bind_inside_a_copy_is_not_trimmed() {
        let d = tmp("same-fs-bind");
        let copy = d.join("copy");
        fs::create_dir_all(copy.join("sub")).unwrap();
        let one = ten_files(&copy);
        fs::create_dir_all(d.join("precious")).unwrap();
        ten_files(&d.join("precious"));
        let old = SystemTime::now() - Duration::from_secs(100_000);
        let f = fs::File::options().write(true).open(d.join("precious/f0")).unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(old).set_modified(old))
            .unwrap();
        nix::mount::mount(
            Some(&d.join("precious")),
            &copy.join("sub"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let measured = measure(safedir::open_dir(&copy).unwrap());
        let fd = safedir::open_dir(&copy).unwrap();
        let trimmed = trim(fd.as_fd(), 0, 2 * one, &|| false);
        nix::mount::umount(&copy.join("sub")).unwrap();
        let left = (0..10).filter(|i| d.join(format!("precious/f{i}")).exists()).count();
        assert_eq!(left, 10, "the bind's source is untouched");
        assert!(measured.unwrap() < 15 * one, "the bind is not counted");
        assert_eq!(trimmed.unwrap().files, 10, "the copy's own files went");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_trim_stops_at_once_when_asked() {
        let d = tmp("stop");
        ten_files(&d);
        let asked = AtomicUsize::new(0);
        let stop = || asked.fetch_add(1, Ordering::Relaxed) >= 2;
        let copy = safedir::open_dir(&d).unwrap();
        let t = trim(copy.as_fd(), 0, u64::MAX, &stop).unwrap();
        assert!(t.yielded && t.files == 2, "{t:?}");
        assert!(!d.join("f0").exists() && !d.join("f1").exists() && d.join("f2").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
