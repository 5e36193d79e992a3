//! The least-recently-used trim of one copy: a walk that never follows a symlink or enters a
//! mount (a bind from the same filesystem included) picks the oldest files that cover what must
//! be freed, and a second walk deletes them where it finds them, through the directories it
//! holds open. The plan keeps a few dozen bytes a file and no paths, so memory stays flat on
//! copies of millions of files and under paths of any length. It stops as soon as its caller
//! says so.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::dir::Type;
use nix::errno::Errno;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::safedir::{self, LinkedFiles, Stat, Visit, WalkEntry};

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
/// Files no unlink could remove that one trim keeps in mind, to choose others instead (16 bytes
/// each); a trim that meets more stops there.
const MAX_STUCK: usize = 64 * 1024;

/// A file a trim may delete, known by its device and inode (a walk does not leave the copy's
/// filesystem, but each btrfs subvolume in it numbers its inodes anew). Ordered by last use, so a
/// max-heap's top is the newest kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    used: (i64, i64),
    id: (u64, u64),
    bytes: u64,
}

/// What one walk of a copy found.
#[derive(Debug, Default)]
struct Scan {
    bytes: u64,
    /// The oldest files, oldest first: at most `MAX_CANDIDATES`, and no more than cover `need`.
    oldest: Vec<Candidate>,
    /// Whether every listing showed a file's own inode, on its directory's device (some
    /// filesystems, overlayfs among them, may list another): then the deleting walk stats only
    /// the files it looks for.
    listed_inodes_hold: bool,
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

fn failed_at<'e>(entry: &'e WalkEntry<'_>) -> impl Fn(Errno) -> Halt + 'e {
    |e| Halt::Failed(e, entry.path())
}

/// Walks a copy, adding up its bytes as `safedir::usage` does and keeping the oldest files
/// that cover `need` bytes (none when `need` is 0), a file with several links once, none of the
/// `stuck` ones.
fn walk(
    root: OwnedFd,
    need: u64,
    stuck: &HashSet<(u64, u64)>,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<Scan, Halt> {
    let mut heap = BinaryHeap::new();
    let mut heap_bytes = 0u64;
    let mut below = 0u64;
    let mut listed_inodes_hold = true;
    let mut seen = 0u64;
    let mut linked = LinkedFiles::default();
    let root = safedir::walk_tree(
        root,
        MAX_DEPTH,
        |entry| {
            seen += 1;
            if seen % STOP_CHECK_EVERY == 0 && stop() {
                return Err(Halt::Yielded);
            }
            let Some(st) = entry.stat().map_err(failed_at(entry))? else {
                return Ok(Visit::Skip);
            };
            if !linked.first_sight(&st) {
                return Ok(Visit::Skip);
            }
            below += st.bytes;
            if st.is_dir() {
                return Ok(Visit::Enter);
            }
            listed_inodes_hold &= (st.dev, st.ino) == (entry.dev, entry.ino);
            if need == 0 || stuck.contains(&(st.dev, st.ino)) {
                return Ok(Visit::Skip);
            }
            heap_bytes += st.bytes;
            heap.push(Candidate {
                used: last_use(&st),
                id: (st.dev, st.ino),
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
            Ok(Visit::Skip)
        },
        Halt::Failed,
    )?;
    Ok(Scan {
        bytes: root.bytes + below,
        oldest: heap.into_sorted_vec(),
        listed_inodes_hold,
    })
}

/// What a deleting walk did.
#[derive(Debug, Default)]
struct Deleted {
    files: u64,
    freed: u64,
    yielded: bool,
}

/// Walks the copy again and deletes the files the scan chose where it meets them, each only if
/// it is still that file and unused since. Files are deleted in the walk's order, not oldest
/// first: all of them are among the oldest.
/// A file no unlink removes goes into `stuck`, with its bytes in `done`.
fn delete_chosen(
    copy: BorrowedFd<'_>,
    scan: &Scan,
    stuck: &mut HashSet<(u64, u64)>,
    trimmed: &mut Trimmed,
    stop: &dyn Fn() -> bool,
) -> Result<Deleted, Halt> {
    let mut chosen: HashMap<(u64, u64), Candidate> = scan.oldest.iter().map(|c| (c.id, *c)).collect();
    let mut done = Deleted::default();
    let root = reopen(copy).map_err(|e| Halt::Failed(e, PathBuf::new()))?;
    let mut seen = 0u64;
    let walked = safedir::walk_tree(
        root,
        MAX_DEPTH,
        |entry| {
            seen += 1;
            if seen % STOP_CHECK_EVERY == 0 && stop() {
                return Err(Halt::Yielded);
            }
            let listed_dir = entry.kind == Some(Type::Directory);
            let listed = (entry.dev, entry.ino);
            if listed_dir || (scan.listed_inodes_hold && entry.kind.is_some() && !chosen.contains_key(&listed)) {
                return Ok(if listed_dir { Visit::Enter } else { Visit::Skip });
            }
            let Some(st) = entry.stat().map_err(failed_at(entry))? else {
                return Ok(Visit::Skip);
            };
            if st.is_dir() {
                return Ok(Visit::Enter);
            }
            let Some(c) = chosen.get(&(st.dev, st.ino)) else {
                return Ok(Visit::Skip);
            };
            if last_use(&st) > c.used {
                return Ok(Visit::Skip);
            }
            if stop() {
                return Err(Halt::Yielded);
            }
            // The blocks go with the last link: every link met goes, and only the last frees.
            let last_link = st.nlink < 2;
            match unlinkat(entry.dir, entry.name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    done.files += 1;
                    done.freed += if last_link { st.bytes } else { 0 };
                }
                Err(Errno::ENOENT | Errno::EISDIR) => {}
                // This file alone (immutable, append-only dir, mounted on): the trim goes on
                // around it instead of stopping at it on every pass.
                Err(e @ (Errno::EPERM | Errno::EACCES | Errno::EBUSY)) if stuck.len() < MAX_STUCK => {
                    if stuck.insert((st.dev, st.ino)) {
                        trimmed.stuck += st.bytes;
                    }
                    trimmed.stuck_at.get_or_insert_with(|| (e, entry.path()));
                    chosen.remove(&(st.dev, st.ino));
                }
                Err(e) => return Err(Halt::Failed(e, entry.path())),
            }
            if last_link {
                chosen.remove(&(st.dev, st.ino));
            }
            // The chosen files together just cover `need`; met in the walk's order, the oldest
            // (emptied files, links) may come last, so all of them go.
            Ok(if chosen.is_empty() { Visit::Stop } else { Visit::Skip })
        },
        Halt::Failed,
    );
    match walked {
        Ok(_) => Ok(done),
        Err(Halt::Yielded) => Ok(Deleted { yielded: true, ..done }),
        Err(e) => Err(e),
    }
}

/// What a trim did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trimmed {
    /// Names deleted: each link of a file with several.
    pub files: u64,
    /// Bytes of the files whose last link went.
    pub freed: u64,
    /// Bytes the copy held when the trim began.
    pub before: u64,
    /// Whether it stopped early for a publish.
    pub yielded: bool,
    /// Bytes of chosen files no unlink could remove: later walks chose others instead.
    pub stuck: u64,
    /// The first of them, and why.
    pub stuck_at: Option<(Errno, PathBuf)>,
}

/// Deletes the least recently used files below `copy` until it holds at most `to` bytes (or
/// nothing more can go: directories stay), walking it again when one walk's oldest files were
/// not enough. `hint` is what the caller expects to free (bounds the first walk's memory).
/// Files that cannot be deleted stay, and later walks choose others.
pub fn trim(copy: BorrowedFd<'_>, to: u64, hint: u64, stop: &dyn Fn() -> bool) -> std::result::Result<Trimmed, Halt> {
    let mut done = Trimmed::default();
    let mut stuck = HashSet::new();
    let mut need = hint.max(1);
    for round in 0..MAX_ROUNDS {
        let root = reopen(copy).map_err(|e| Halt::Failed(e, PathBuf::new()))?;
        let scan = match walk(root, need, &stuck, stop) {
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
        let stuck_before = stuck.len();
        let deleted = delete_chosen(copy, &scan, &mut stuck, &mut done, stop)?;
        done.files += deleted.files;
        done.freed += deleted.freed;
        if deleted.yielded {
            done.yielded = true;
            return Ok(done);
        }
        // A round that freed nothing and met no new stuck file has nothing left to try.
        if deleted.freed >= need || (deleted.freed == 0 && stuck.len() == stuck_before) {
            break;
        }
        need -= deleted.freed;
    }
    Ok(done)
}

/// Bytes below a copy, counted as the trim counts them (blocks, as `safedir::usage` does).
pub fn measure(root: OwnedFd) -> Result<u64, (Errno, PathBuf)> {
    match walk(root, 0, &HashSet::new(), &|| false) {
        Ok(scan) => Ok(scan.bytes),
        Err(Halt::Failed(e, at)) => Err((e, at)),
        Err(Halt::Yielded) => Err((Errno::EINTR, PathBuf::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nlc-trim-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Sets or clears a file attribute (`+i` immutable, `+a` append-only) with chattr.
    fn chattr(flag: &str, path: &Path) {
        let done = std::process::Command::new("chattr").arg(flag).arg(path).status();
        assert!(done.is_ok_and(|s| s.success()), "chattr {flag} {}", path.display());
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
        let scan = walk(safedir::open_dir(&d).unwrap(), 3 * one, &HashSet::new(), &|| false).unwrap();
        let inodes: Vec<_> = scan.oldest.iter().map(|c| c.id.1).collect();
        let ino = |name: &str| fs::metadata(d.join(name)).unwrap().ino();
        assert_eq!(inodes, [ino("f0"), ino("f1"), ino("f2")]);
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

    /// Where listings may name other inodes than a stat shows (overlayfs), the deleting walk
    /// stats every file instead of trusting them, and finds the chosen ones all the same.
    #[test]
    fn the_deleting_walk_finds_the_chosen_files_without_the_listed_inodes() {
        let d = tmp("listed");
        fs::create_dir_all(d.join("sub")).unwrap();
        let one = ten_files(&d.join("sub"));
        let mut scan = walk(safedir::open_dir(&d).unwrap(), 3 * one, &HashSet::new(), &|| false).unwrap();
        assert!(scan.listed_inodes_hold, "tmp's filesystem lists each file's own inode");
        scan.listed_inodes_hold = false;
        let copy = safedir::open_dir(&d).unwrap();
        let deleted = delete_chosen(
            copy.as_fd(),
            &scan,
            &mut HashSet::new(),
            &mut Trimmed::default(),
            &|| false,
        )
        .unwrap();
        assert_eq!((deleted.files, deleted.freed, deleted.yielded), (3, 3 * one, false));
        let left: Vec<_> = (0..10).filter(|i| d.join(format!("sub/f{i}")).exists()).collect();
        assert_eq!(left, [3, 4, 5, 6, 7, 8, 9]);
        fs::remove_dir_all(&d).unwrap();
    }

    /// A file's blocks go with its last link: a trim deletes every link of a file it chose and
    /// counts as freed only what that freed, nothing for a file still linked outside the copy.
    #[test]
    fn a_trim_counts_as_freed_only_what_a_last_link_frees() {
        let d = tmp("links");
        let copy = d.join("copy");
        fs::create_dir_all(copy.join("a")).unwrap();
        let one = ten_files(&copy);
        let measured = || measure(safedir::open_dir(&copy).unwrap()).unwrap();
        let before = measured();
        for i in 1..4 {
            fs::hard_link(copy.join("f0"), copy.join(format!("a/l{i}"))).unwrap();
        }
        fs::hard_link(copy.join("f1"), d.join("outside")).unwrap();
        assert_eq!(measured(), before, "f0 counted once");
        let fd = safedir::open_dir(&copy).unwrap();
        let t = trim(fd.as_fd(), before - 2 * one, 2 * one, &|| false).unwrap();
        assert_eq!(
            (t.files, t.freed),
            (5, one),
            "f0, its 3 links and f1: only f0 freed blocks"
        );
        assert!(!copy.join("f1").exists() && d.join("outside").exists());
        let left = (0..10).filter(|i| copy.join(format!("f{i}")).exists()).count();
        assert_eq!((left, fs::read_dir(copy.join("a")).unwrap().count()), (8, 0));
        fs::remove_dir_all(&d).unwrap();
    }

    /// A file no unlink can remove (immutable, or in an append-only dir) is trimmed around: the
    /// next oldest go instead, so the copy still comes under its target, pass after pass.
    #[test]
    fn a_file_that_cannot_be_deleted_is_trimmed_around() {
        let d = tmp("stuck");
        let one = ten_files(&d);
        let measured = || measure(safedir::open_dir(&d).unwrap()).unwrap();
        let before = measured();
        chattr("+i", &d.join("f0"));
        let fd = safedir::open_dir(&d).unwrap();
        let t = trim(fd.as_fd(), before - 3 * one, 3 * one, &|| false);
        let after = measured();
        chattr("-i", &d.join("f0"));
        let t = t.unwrap();
        assert_eq!((t.files, t.freed, t.stuck), (3, 3 * one, one), "{t:?}");
        let left: Vec<_> = (0..10).filter(|i| d.join(format!("f{i}")).exists()).collect();
        assert_eq!(left, [0, 4, 5, 6, 7, 8, 9]);
        assert!(
            after <= before - 3 * one,
            "{after} bytes left, target {}",
            before - 3 * one
        );
        fs::remove_dir_all(&d).unwrap();
    }

    /// More stuck files than one walk keeps in mind (a dir of old files made append-only, where
    /// no unlink succeeds) do not hide the rest: the next walk chooses others.
    #[test]
    fn more_stuck_files_than_a_walk_keeps_leave_the_rest_to_trim() {
        let d = tmp("stuck-many");
        let one = ten_files(&d);
        let old = d.join("old");
        fs::create_dir(&old).unwrap();
        let at = SystemTime::now() - Duration::from_secs(5000);
        for i in 0..MAX_CANDIDATES + 1000 {
            let f = fs::File::create(old.join(i.to_string())).unwrap();
            f.set_times(fs::FileTimes::new().set_accessed(at).set_modified(at))
                .unwrap();
        }
        let before = measure(safedir::open_dir(&d).unwrap()).unwrap();
        chattr("+a", &old);
        let fd = safedir::open_dir(&d).unwrap();
        let t = trim(fd.as_fd(), before - 3 * one, 3 * one, &|| false);
        chattr("-a", &old);
        let t = t.unwrap();
        assert_eq!((t.files, t.freed), (3, 3 * one), "{t:?}");
        assert!(matches!(t.stuck_at, Some((Errno::EPERM, _))), "{t:?}");
        let left: Vec<_> = (0..10).filter(|i| d.join(format!("f{i}")).exists()).collect();
        assert_eq!(left, [3, 4, 5, 6, 7, 8, 9]);
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
        assert_eq!(fs::read_dir(&d).unwrap().count(), 8);
        fs::remove_dir_all(&d).unwrap();
    }
}
