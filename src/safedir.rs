//! Directory work that never follows a symlink where a directory must be: everything happens
//! relative to opened directory handles (`openat` with `O_NOFOLLOW`), so a path swapped for a
//! symlink after it was checked is refused instead of followed.

use std::ffi::{CStr, OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::libc;
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{unlinkat, UnlinkatFlags};

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_CLOEXEC);

/// Opens a directory. Symlinks in the leading components are followed (a node may link its
/// kubelet dir elsewhere); a symlink as the last component is refused with ELOOP or ENOTDIR.
pub fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(path, DIR_FLAGS | OFlag::O_NOFOLLOW, Mode::empty())
}

/// Opens a directory, following symlinks all the way (for the parent of a target).
fn open_dir_following(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(path, DIR_FLAGS, Mode::empty())
}

/// Cleared once `openat2` turned out to be missing (Linux before 5.6) or filtered out by a
/// seccomp profile.
static OPENAT2_WORKS: AtomicBool = AtomicBool::new(true);

/// Opens a directory, following symlinks all the way, and returns it with its `real_path`.
///
/// When no component of a normalized absolute path is a symlink, the kernel's name for the dir
/// is the path itself: `openat2` with `RESOLVE_NO_SYMLINKS` opens it only in that case, so the
/// name needs no `readlink` through `/proc/self/fd` (3.5 µs on the development machine). A path
/// with a symlink in it, or a kernel without `openat2`, takes the long way; so does every error,
/// which then comes from the plain open.
pub fn open_dir_resolved(path: &Path) -> Result<(OwnedFd, PathBuf), Errno> {
    if OPENAT2_WORKS.load(Ordering::Relaxed) && is_normalized_absolute(path) {
        let how = nix::fcntl::OpenHow::new()
            .flags(DIR_FLAGS)
            .resolve(nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS);
        match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
            Ok(fd) => return Ok((fd, path.to_owned())),
            Err(Errno::ENOSYS | Errno::EPERM | Errno::EINVAL | Errno::E2BIG) => {
                OPENAT2_WORKS.store(false, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
    open_resolved_long_way(path)
}

fn open_resolved_long_way(path: &Path) -> Result<(OwnedFd, PathBuf), Errno> {
    let fd = open_dir_following(path)?;
    let real = real_path(fd.as_fd())?;
    Ok((fd, real))
}

/// Absolute, with no empty, `.` or `..` component: a path whose text is the kernel's name for
/// what it opens when nothing on the way is a symlink.
fn is_normalized_absolute(path: &Path) -> bool {
    let bytes = path.as_os_str().as_bytes();
    match bytes.strip_prefix(b"/") {
        Some([]) => true,
        Some(rest) => rest
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".."),
        None => false,
    }
}

/// Opens `name` inside `parent`, refusing a symlink.
pub fn open_child(parent: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(parent, name, DIR_FLAGS | OFlag::O_NOFOLLOW, Mode::empty())
}

/// A small JSON record the driver keeps beside the copies, `<dir>/<subdir>/<name>`: `None` when
/// it is missing, a symlink, not JSON, or cut off at 4 KiB (none of ours is that large).
pub fn read_json_record(dir: BorrowedFd<'_>, subdir: &OsStr, name: &str) -> Option<serde_json::Value> {
    use std::io::Read;
    let sub = open_child(dir, subdir).ok()?;
    let fd = openat(
        sub.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    std::fs::File::from(fd).take(4096).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// Opens `name` inside `parent`, creating it with exactly the permission bits `mode` if it is
/// missing, whatever the umask. Returns the handle and whether this call created the directory.
pub fn ensure_child(parent: BorrowedFd<'_>, name: &OsStr, mode: Mode) -> Result<(OwnedFd, bool), Errno> {
    // A name removed between mkdirat's EEXIST and the open is made again, a few times.
    for _ in 0..3 {
        let created = match mkdirat(parent, name, mode) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => return Err(e),
        };
        match open_child(parent, name) {
            Ok(fd) => {
                if created && umask_strips(mode) {
                    if let Err(e) = fchmod(fd.as_fd(), mode) {
                        drop(fd);
                        let _ = unlinkat(parent, name, UnlinkatFlags::RemoveDir);
                        return Err(e);
                    }
                }
                return Ok((fd, created));
            }
            Err(Errno::ENOENT) if !created => continue,
            Err(e) => {
                if created {
                    let _ = unlinkat(parent, name, UnlinkatFlags::RemoveDir);
                }
                return Err(e);
            }
        }
    }
    Err(Errno::ENOENT)
}

/// Whether the umask takes any of `mode`'s bits off a new directory (then `ensure_child` puts
/// them back). Under the usual 022 a target's 0750 comes out whole, and a publish skips a chmod.
fn umask_strips(mode: Mode) -> bool {
    process_umask().is_none_or(|umask| mode.bits() & umask != 0)
}

/// The process's umask, read once from `/proc/self/status` (reading it with umask(2) would set
/// it for a moment under the other threads). The plugin never changes its umask; unknown when
/// the file cannot be read.
fn process_umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let value = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(value.trim(), 8).ok()
    })
}

/// As `ensure_child`, for a name that is there nearly every time (a volume's dir on its second
/// and later publish): one open when it is.
pub fn open_or_ensure_child(parent: BorrowedFd<'_>, name: &OsStr, mode: Mode) -> Result<(OwnedFd, bool), Errno> {
    match open_child(parent, name) {
        Ok(fd) => Ok((fd, false)),
        Err(Errno::ENOENT) => ensure_child(parent, name, mode),
        Err(e) => Err(e),
    }
}

/// Removes the empty directory `name` inside `parent`.
pub fn remove_child(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

/// Waits for any rename under way in the directory `parent`.
///
/// The kernel checks that a rename does not move a mount point before it takes the lock a mount
/// takes, so a rename in a target's directory that started before a bind can still carry the
/// new mount point away under another name. Every rename holds the locks of the directories it
/// moves a name out of and into from before that check until it is done, and a lookup of a
/// name the kernel has never seen takes the same lock; once it returns, a mount placed on a
/// directory named in `parent` stays there (a rename that moves it out or in held this lock).
pub fn settle_renames(parent: BorrowedFd<'_>) -> Result<(), Errno> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // A fresh name every time: one the dentry cache already knows (even as absent) is found
    // without the lock. Monotonic time keeps names fresh across restarts of the plugin.
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!(".node-local-cache-settle.{}.{}.{seq}", now.tv_sec(), now.tv_nsec());
    match openat(
        parent,
        name.as_str(),
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(_) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A path through which syscalls that take only paths (mount) reach an opened handle.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The absolute, symlink-free path of an opened directory, as the kernel names it (and as
/// mountinfo does).
pub fn real_path(fd: BorrowedFd<'_>) -> Result<PathBuf, Errno> {
    nix::fcntl::readlink(&fd_path(fd)).map(PathBuf::from)
}

/// A stat's modification time.
pub fn modified(st: &nix::sys::stat::FileStat) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32)
}

/// Device and inode: the identity of what a handle refers to.
pub fn identity(fd: BorrowedFd<'_>) -> Result<(u64, u64), Errno> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Device and inode of the directory `name` inside `parent` (of the mount on top of it, if any),
/// not following a symlink: what `open_child` and `identity` would give, in one stat.
pub fn child_dir_identity(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(u64, u64), Errno> {
    dir_identity_of(&fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?)
}

/// Device and inode from a stat that did not follow a symlink, if it shows a directory.
fn dir_identity_of(st: &nix::sys::stat::FileStat) -> Result<(u64, u64), Errno> {
    if st.st_mode & libc_s_ifmt() != libc_s_ifdir() {
        return Err(Errno::ENOTDIR);
    }
    Ok((st.st_dev, st.st_ino))
}

/// What a stat shows of a name (not following a symlink there) or of an open handle, with
/// whether it is the root of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub mode: u32,
    pub dev: u64,
    pub ino: u64,
    /// Bytes of the blocks allocated (`du`'s count).
    pub bytes: u64,
    /// Hard links to it.
    pub nlink: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    /// Whether a mount's root is what shows here; `None` where the kernel cannot say (before
    /// Linux 5.8, or statx filtered out by a seccomp profile).
    pub mount_root: Option<bool>,
}

impl Stat {
    pub fn is_dir(&self) -> bool {
        self.mode & libc_s_ifmt() == libc_s_ifdir()
    }

    /// Whether a walk in a directory on device `dev` must stop here: a mount sits here. The
    /// kernel's word on the mount root decides: a bind from the same filesystem shows the same
    /// device, and a btrfs subvolume (which any user can make) shows another one with no mount
    /// there, so it is walked like any directory. Where the kernel cannot say, another device
    /// stands for another filesystem (a subvolume is then a boundary too), and callers check the
    /// mount table before they delete.
    pub fn is_mount_boundary(&self, dev: u64) -> bool {
        self.mount_root.unwrap_or(self.dev != dev)
    }

    fn from_stat(st: &nix::sys::stat::FileStat) -> Stat {
        // u64 on x86_64, u32 on arm64.
        let nlink: libc::nlink_t = st.st_nlink;
        Stat {
            mode: st.st_mode,
            dev: st.st_dev,
            ino: st.st_ino,
            bytes: st.st_blocks as u64 * 512,
            nlink: nlink as u64,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            mount_root: None,
        }
    }
}

/// Cleared once `statx` turned out to be missing (Linux before 4.11) or filtered out.
static STATX_WORKS: AtomicBool = AtomicBool::new(true);

/// Stats `name` in `dir`, not following a symlink there.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Stat, Errno> {
    statx_or_stat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
}

/// Stats an open handle.
pub fn stat_fd(fd: BorrowedFd<'_>) -> Result<Stat, Errno> {
    statx_or_stat(fd, c"", libc::AT_EMPTY_PATH)
}

fn statx_or_stat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> Result<Stat, Errno> {
    if STATX_WORKS.load(Ordering::Relaxed) {
        let mut buf = MaybeUninit::<libc::statx>::zeroed();
        // SAFETY: `name` is NUL-terminated and outlives the call; `buf` is writable and exactly
        // the struct statx fills; `dir` stays open while it is borrowed.
        let rc = unsafe {
            libc::statx(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::AT_STATX_SYNC_AS_STAT,
                libc::STATX_BASIC_STATS,
                buf.as_mut_ptr(),
            )
        };
        match Errno::result(rc) {
            Ok(_) => {
                // SAFETY: the buffer started zeroed, and statx succeeded, so every field holds a
                // value.
                let stx = unsafe { buf.assume_init() };
                let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
                return Ok(Stat {
                    mode: u32::from(stx.stx_mode),
                    // The device as stat's st_dev encodes it, so the two compare.
                    dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
                    ino: stx.stx_ino,
                    bytes: stx.stx_blocks * 512,
                    nlink: u64::from(stx.stx_nlink),
                    atime: (stx.stx_atime.tv_sec, i64::from(stx.stx_atime.tv_nsec)),
                    mtime: (stx.stx_mtime.tv_sec, i64::from(stx.stx_mtime.tv_nsec)),
                    mount_root: (stx.stx_attributes_mask & bit != 0).then_some(stx.stx_attributes & bit != 0),
                });
            }
            Err(Errno::ENOSYS | Errno::EPERM) => STATX_WORKS.store(false, Ordering::Relaxed),
            Err(e) => return Err(e),
        }
    }
    let st = if name.is_empty() {
        fstat(dir)?
    } else {
        fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?
    };
    Ok(Stat::from_stat(&st))
}

/// Opens the directory `name` in `parent` (on device `dev`) for a walk to enter, refusing a
/// symlink, with its device: `Ok(None)` when a mount sits there (placed there after the name
/// was stated, perhaps), so the walk steps around it.
fn open_walkable_child(parent: BorrowedFd<'_>, name: &OsStr, dev: u64) -> Result<Option<(OwnedFd, u64)>, Errno> {
    let fd = open_child(parent, name)?;
    let st = stat_fd(fd.as_fd())?;
    Ok((!st.is_mount_boundary(dev)).then_some((fd, st.dev)))
}

/// Bytes and inodes used below a directory, like `du -s --apparent-size`'s block count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// Directory levels `usage` keeps open; deeper subtrees are not counted, so handles stay bounded.
const MAX_USAGE_LEVELS: usize = 256;

/// Files with more than one link a walk remembers, to count each once. 57,344 fill a table of
/// 65,536 buckets of 16-byte keys without growing it, about 1.1 MB: at the bound and past it, a
/// NodeGetVolumeStats call's peak memory grew by 1.8 MB (its last growth included), against
/// 0.07 MB remembering none. Beyond, a file is counted once per link: a copy with more linked
/// files than that (a large pnpm store) is over-counted, and the budget frees more than it must,
/// never less.
pub const MAX_LINKED_FILES: usize = 56 * 1024;

/// The files with several links a walk has counted (see `MAX_LINKED_FILES`).
#[derive(Default)]
pub struct LinkedFiles(std::collections::HashSet<(u64, u64)>);

impl LinkedFiles {
    /// Whether the walk meets this file for the first time, so it is to be counted.
    pub fn first_sight(&mut self, st: &Stat) -> bool {
        if st.nlink < 2 || st.is_dir() {
            return true;
        }
        let id = (st.dev, st.ino);
        if self.0.len() < MAX_LINKED_FILES {
            self.0.insert(id)
        } else {
            !self.0.contains(&id)
        }
    }
}

/// Walks a tree without following symlinks or entering a mount (a bind from the same
/// filesystem included): what is mounted inside is not counted, btrfs subvolumes are. A file
/// with several links is counted once. Subtrees deeper than `MAX_USAGE_LEVELS` are not counted.
pub fn usage(root: OwnedFd) -> Result<Usage, Errno> {
    let mut below = Usage::default();
    let mut linked = LinkedFiles::default();
    let root = walk_tree(
        root,
        MAX_USAGE_LEVELS,
        |entry| {
            // Deleted while we walked (a cache changes under us) or a mount: not counted.
            let Some(st) = entry.stat()? else {
                return Ok(Visit::Skip);
            };
            if !linked.first_sight(&st) {
                return Ok(Visit::Skip);
            }
            below.inodes += 1;
            below.bytes += st.bytes;
            Ok(if st.is_dir() { Visit::Enter } else { Visit::Skip })
        },
        |errno, _| errno,
    )?;
    Ok(Usage {
        bytes: root.bytes + below.bytes,
        inodes: 1 + below.inodes,
    })
}

/// What a walk does after `walk_tree`'s visitor has seen an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    Skip,
    /// Walk the directory (unless a mount sits there, or it is too deep).
    Enter,
    /// End the walk here.
    Stop,
}

/// One level of a walk: its open directory, read as the walk goes, its name and its device
/// (another one inside a btrfs subvolume).
struct WalkLevel {
    entries: nix::dir::OwningIter,
    name: std::ffi::CString,
    dev: u64,
}

/// An entry a walk met, in the directory the walk holds open.
pub struct WalkEntry<'a> {
    pub dir: BorrowedFd<'a>,
    pub name: &'a CStr,
    /// The inode the directory entry names, from the listing (no stat).
    pub ino: u64,
    pub kind: Option<Type>,
    /// The device of the directory the entry is in (a file in it shows the same).
    pub dev: u64,
    levels: &'a [WalkLevel],
}

impl WalkEntry<'_> {
    /// What the entry is, not following a symlink; `None` when it has gone or a mount sits there
    /// (not the tree's).
    pub fn stat(&self) -> Result<Option<Stat>, Errno> {
        match stat_at(self.dir, self.name) {
            Ok(st) if st.is_mount_boundary(self.dev) => Ok(None),
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entry's path relative to the walk's root, made only when asked (for a message).
    pub fn path(&self) -> PathBuf {
        walk_path(self.levels, Some(self.name))
    }
}

fn walk_path(levels: &[WalkLevel], name: Option<&CStr>) -> PathBuf {
    levels
        .iter()
        .skip(1)
        .map(|l| l.name.as_c_str())
        .chain(name)
        .map(|n| OsStr::from_bytes(n.to_bytes()))
        .collect()
}

/// Walks the tree below `root` depth first with one open directory per level, so memory grows
/// with its depth, never its width, and holds no path. Never follows a symlink or enters a mount
/// (a btrfs subvolume is none: walked); directories `max_levels` below the root are not entered.
/// `visit` sees every entry but `.` and `..`, and says whether to walk a directory; an error
/// reading or opening a directory is `fail(errno, path relative to the root)`. Returns what the
/// root is.
pub fn walk_tree<E>(
    root: OwnedFd,
    max_levels: usize,
    mut visit: impl FnMut(&WalkEntry<'_>) -> Result<Visit, E>,
    fail: impl Fn(Errno, PathBuf) -> E,
) -> Result<Stat, E> {
    let root_stat = stat_fd(root.as_fd()).map_err(|e| fail(e, PathBuf::new()))?;
    let root = Dir::from_fd(root).map_err(|e| fail(e, PathBuf::new()))?;
    let mut levels = vec![WalkLevel {
        entries: root.into_iter(),
        name: std::ffi::CString::default(),
        dev: root_stat.dev,
    }];
    while let Some(level) = levels.last_mut() {
        let entry = match level.entries.next() {
            None => {
                levels.pop();
                continue;
            }
            Some(Err(e)) => return Err(fail(e, walk_path(&levels, None))),
            Some(Ok(entry)) => entry,
        };
        let name = entry.file_name();
        if is_dot(name) {
            continue;
        }
        let (raw, dev) = (level.entries.as_raw_fd(), level.dev);
        // SAFETY: the descriptor belongs to the last level, which stays in `levels` (open) for
        // as long as this borrow is used: below, before any level is popped.
        let dir = unsafe { BorrowedFd::borrow_raw(raw) };
        let seen = WalkEntry {
            dir,
            name,
            ino: entry.ino(),
            kind: entry.file_type(),
            dev,
            levels: &levels,
        };
        match visit(&seen)? {
            Visit::Skip => continue,
            Visit::Stop => break,
            Visit::Enter if levels.len() >= max_levels => continue,
            Visit::Enter => {}
        }
        let (sub, sub_dev) = match open_walkable_child(dir, OsStr::from_bytes(name.to_bytes()), dev) {
            Ok(Some(opened)) => opened,
            Ok(None) | Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
            Err(e) => return Err(fail(e, walk_path(&levels, Some(name)))),
        };
        let sub = Dir::from_fd(sub).map_err(|e| fail(e, walk_path(&levels, Some(name))))?;
        levels.push(WalkLevel {
            entries: sub.into_iter(),
            name: name.to_owned(),
            dev: sub_dev,
        });
    }
    Ok(root_stat)
}

fn libc_s_ifmt() -> u32 {
    nix::sys::stat::SFlag::S_IFMT.bits()
}

fn libc_s_ifdir() -> u32 {
    nix::sys::stat::SFlag::S_IFDIR.bits()
}

fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

/// Why a tree could not be removed completely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveError {
    pub errno: Errno,
    /// Path of the entry that failed, relative to the tree's root.
    pub at: PathBuf,
}

/// Deletes `name` inside `parent` and everything below it, btrfs subvolumes included (root may
/// remove an empty one, Linux 4.18 and later). Never follows a symlink (a link is removed, not
/// its target) and never descends into a mount, a bind from the same filesystem included: a
/// mount inside the tree fails the removal with EXDEV and is left alone.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), RemoveError> {
    let top = Path::new(name);
    let root = match open_child(parent, name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(RemoveError {
                errno: e,
                at: top.to_owned(),
            })
        }
    };
    remove_contents(root, top)?;
    match unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(RemoveError {
            errno: e,
            at: top.to_owned(),
        }),
    }
}

/// Open directory levels kept at once; deeper subtrees are moved up to the root first, so any
/// depth is removed with bounded handles and no recursion.
const MAX_OPEN_LEVELS: usize = 64;
/// Re-reads of one directory that found entries left over before giving up with ENOTEMPTY.
const MAX_REFILLS: u32 = 8;

struct Level {
    dir: Dir,
    name: OsString,
    at: PathBuf,
    /// Its device: another than its parent's at a btrfs subvolume's root.
    dev: u64,
    pending: Vec<(OsString, Option<Type>)>,
    refills: u32,
}

impl Level {
    fn open(fd: OwnedFd, name: OsString, at: PathBuf, dev: u64) -> Result<Level, RemoveError> {
        let dir = Dir::from_fd(fd).map_err(|errno| RemoveError { errno, at: at.clone() })?;
        Ok(Level {
            dir,
            name,
            at,
            dev,
            pending: Vec::new(),
            refills: 0,
        })
    }

    /// Reads the directory again; false when it is empty.
    fn refill(&mut self) -> Result<bool, RemoveError> {
        if self.refills == MAX_REFILLS {
            return Err(RemoveError {
                errno: Errno::ENOTEMPTY,
                at: self.at.clone(),
            });
        }
        self.refills += 1;
        // A fresh handle on the same directory reads it from the start.
        let again = openat(self.dir.as_fd(), ".", DIR_FLAGS, Mode::empty()).and_then(Dir::from_fd);
        self.dir = again.map_err(|errno| RemoveError {
            errno,
            at: self.at.clone(),
        })?;
        for entry in self.dir.iter() {
            let entry = entry.map_err(|errno| RemoveError {
                errno,
                at: self.at.clone(),
            })?;
            if !is_dot(entry.file_name()) {
                self.pending.push((
                    OsStr::from_bytes(entry.file_name().to_bytes()).to_owned(),
                    entry.file_type(),
                ));
            }
        }
        Ok(!self.pending.is_empty())
    }
}

/// Empties the directory behind `root`.
fn remove_contents(root: OwnedFd, at: &Path) -> Result<(), RemoveError> {
    let fail = |errno, at: &Path| RemoveError {
        errno,
        at: at.to_owned(),
    };
    let dev = stat_fd(root.as_fd()).map_err(|e| fail(e, at))?.dev;
    let mut levels = vec![Level::open(root, OsString::new(), at.to_owned(), dev)?];
    let mut moved = 0u64;
    while let Some(level) = levels.last_mut() {
        let Some((name, kind)) = level.pending.pop() else {
            if level.refill()? {
                continue;
            }
            let done = levels.pop().expect("non-empty");
            let Some(parent) = levels.last() else { return Ok(()) };
            match unlinkat(parent.dir.as_fd(), done.name.as_os_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                Err(e) => return Err(fail(e, &done.at)),
            }
        };
        let child_at = level.at.join(&name);
        let is_dir = match kind {
            Some(Type::Directory) => true,
            Some(_) => false,
            None => match fstatat(
                level.dir.as_fd(),
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st.st_mode & libc_s_ifmt() == libc_s_ifdir(),
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(fail(e, &child_at)),
            },
        };
        if !is_dir {
            match unlinkat(level.dir.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                // Replaced by a directory since the listing was read.
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(fail(e, &child_at)),
            }
        }
        let child = match open_child(level.dir.as_fd(), &name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            // Swapped for a symlink or a file since the listing was read: unlink that instead.
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                match unlinkat(level.dir.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(fail(e, &child_at)),
                }
            }
            Err(e) => return Err(fail(e, &child_at)),
        };
        let parent_dev = level.dev;
        let st = stat_fd(child.as_fd()).map_err(|e| fail(e, &child_at))?;
        if st.is_mount_boundary(parent_dev) {
            return Err(fail(Errno::EXDEV, &child_at));
        }
        // A rename takes nothing out of its btrfs subvolume but a subvolume's root: so that
        // is never the deepest level, and a subtree too deep goes up to the top of its
        // subvolume, a subvolume's root to the tree's root.
        let subvolume = st.dev != parent_dev;
        if levels.len() < MAX_OPEN_LEVELS - usize::from(subvolume) {
            levels.push(Level::open(child, name, child_at, st.dev)?);
            continue;
        }
        drop(child);
        let top = if subvolume {
            0
        } else {
            levels.iter().rposition(|l| l.dev != parent_dev).map_or(0, |i| i + 1)
        };
        moved += 1;
        let parent_fd = levels[levels.len() - 1].dir.as_fd();
        let root_fd = levels[top].dir.as_fd();
        loop {
            moved += 1;
            let new_name = OsString::from(format!(".nlc-deep-{moved}"));
            match renameat2(
                parent_fd,
                name.as_os_str(),
                root_fd,
                new_name.as_os_str(),
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => break,
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(fail(e, &child_at)),
            }
        }
        levels[top].refills = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nlc-safedir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn open_refuses_symlinked_last_component_only() {
        let d = tmp("open");
        fs::create_dir(d.join("real")).unwrap();
        symlink(d.join("real"), d.join("link")).unwrap();
        assert!(matches!(open_dir(&d.join("link")), Err(Errno::ELOOP | Errno::ENOTDIR)));
        // A symlinked parent is fine.
        fs::create_dir(d.join("real/inner")).unwrap();
        open_dir(&d.join("link/inner")).unwrap();
        let parent = open_dir(&d).unwrap();
        assert!(matches!(
            open_child(parent.as_fd(), OsStr::new("link")),
            Err(Errno::ELOOP | Errno::ENOTDIR)
        ));
        assert_eq!(
            real_path(open_dir(&d.join("link/inner")).unwrap().as_fd()).unwrap(),
            d.join("real/inner")
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn open_dir_resolved_names_the_dir_as_the_kernel_does() {
        let d = tmp("resolved");
        fs::create_dir_all(d.join("real/inner")).unwrap();
        symlink(d.join("real"), d.join("link")).unwrap();
        symlink("real", d.join("rel")).unwrap();
        for (path, want) in [
            (d.join("real/inner"), d.join("real/inner")),
            (d.join("link/inner"), d.join("real/inner")),
            (d.join("rel/inner"), d.join("real/inner")),
            (d.join("link"), d.join("real")),
        ] {
            let canonical = fs::canonicalize(&want).unwrap();
            let (fd, real) = open_dir_resolved(&path).unwrap();
            assert_eq!(real, canonical, "{}", path.display());
            assert_eq!(real_path(fd.as_fd()).unwrap(), canonical, "{}", path.display());
            let (fd, real) = open_resolved_long_way(&path).unwrap();
            assert_eq!((real_path(fd.as_fd()).unwrap(), real), (canonical.clone(), canonical));
        }
        for (path, want) in [
            (d.join("missing"), Errno::ENOENT),
            (d.join("link/missing"), Errno::ENOENT),
        ] {
            assert_eq!(open_dir_resolved(&path).err(), Some(want), "{}", path.display());
        }
        fs::write(d.join("file"), b"").unwrap();
        assert_eq!(open_dir_resolved(&d.join("file")).err(), Some(Errno::ENOTDIR));
        assert!(OPENAT2_WORKS.load(Ordering::Relaxed), "this kernel has openat2");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn child_dir_identity_is_what_an_open_child_shows() {
        let d = tmp("child-identity");
        fs::create_dir_all(d.join("vol")).unwrap();
        fs::create_dir_all(d.join("target")).unwrap();
        symlink(d.join("vol"), d.join("link")).unwrap();
        fs::write(d.join("file"), b"").unwrap();
        let parent = open_dir(&d).unwrap();
        let opened = |name: &str| identity(open_child(parent.as_fd(), OsStr::new(name)).unwrap().as_fd()).unwrap();
        assert_eq!(child_dir_identity(parent.as_fd(), OsStr::new("vol")), Ok(opened("vol")));
        nix::mount::mount(
            Some(&d.join("vol")),
            &d.join("target"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let seen = child_dir_identity(parent.as_fd(), OsStr::new("target"));
        let top = opened("target");
        nix::mount::umount(&d.join("target")).unwrap();
        assert_eq!(
            (seen, top),
            (Ok(opened("vol")), opened("vol")),
            "the mount's root, as open shows it"
        );
        for (name, want) in [
            ("link", Errno::ENOTDIR),
            ("file", Errno::ENOTDIR),
            ("missing", Errno::ENOENT),
        ] {
            assert_eq!(
                child_dir_identity(parent.as_fd(), OsStr::new(name)),
                Err(want),
                "{name}"
            );
            assert!(open_child(parent.as_fd(), OsStr::new(name)).is_err(), "{name}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn normalized_absolute_paths() {
        for ok in ["/", "/a", "/a/b", "/a/.b", "/a/b..c"] {
            assert!(is_normalized_absolute(Path::new(ok)), "{ok}");
        }
        for bad in [
            "", "a", "a/b", "//a", "/a//b", "/a/", "/a/./b", "/a/../b", "/.", "/a/..",
        ] {
            assert!(!is_normalized_absolute(Path::new(bad)), "{bad}");
        }
    }

    /// The umask `ensure_child` goes by is the one a child process inherits and reports.
    #[test]
    fn the_umask_is_read_as_a_shell_reports_it() {
        let out = std::process::Command::new("sh").args(["-c", "umask"]).output().unwrap();
        let shell = u32::from_str_radix(String::from_utf8_lossy(&out.stdout).trim(), 8).unwrap();
        assert_eq!(process_umask(), Some(shell));
        assert_eq!(umask_strips(Mode::from_bits_truncate(0o777)), shell & 0o777 != 0);
    }

    #[test]
    fn ensure_child_creates_with_mode_and_is_idempotent() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("ensure");
        let parent = open_dir(&d).unwrap();
        let (_, created) = ensure_child(parent.as_fd(), OsStr::new("v"), Mode::from_bits_truncate(0o777)).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(d.join("v")).unwrap().permissions().mode() & 0o777, 0o777);
        let (_, created) = ensure_child(parent.as_fd(), OsStr::new("v"), Mode::from_bits_truncate(0o777)).unwrap();
        assert!(!created);
        symlink("/etc", d.join("evil")).unwrap();
        assert!(ensure_child(parent.as_fd(), OsStr::new("evil"), Mode::from_bits_truncate(0o777)).is_err());
        // The open-first variant: the same answers, made or found.
        let mode = Mode::from_bits_truncate(0o750);
        let (_, created) = open_or_ensure_child(parent.as_fd(), OsStr::new("w"), mode).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(d.join("w")).unwrap().permissions().mode() & 0o777, 0o750);
        let (fd, created) = open_or_ensure_child(parent.as_fd(), OsStr::new("w"), mode).unwrap();
        assert!(!created);
        assert_eq!(
            identity(fd.as_fd()),
            child_dir_identity(parent.as_fd(), OsStr::new("w"))
        );
        for name in ["evil", "file"] {
            fs::write(d.join("file"), b"").unwrap();
            let e = open_or_ensure_child(parent.as_fd(), OsStr::new(name), mode).err();
            assert!(matches!(e, Some(Errno::ELOOP | Errno::ENOTDIR)), "{name}: {e:?}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn remove_tree_keeps_symlink_targets() {
        let d = tmp("remove");
        let outside = d.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("precious"), b"keep").unwrap();
        let vol = d.join("vol");
        fs::create_dir_all(vol.join("a/b/c")).unwrap();
        fs::write(vol.join("a/b/c/f"), b"x").unwrap();
        fs::write(vol.join("top"), b"y").unwrap();
        symlink(&outside, vol.join("a/link-dir")).unwrap();
        symlink(outside.join("precious"), vol.join("link-file")).unwrap();
        let parent = open_dir(&d).unwrap();
        remove_tree(parent.as_fd(), OsStr::new("vol")).unwrap();
        assert!(!vol.exists());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"keep");
        // Already gone: nothing to do.
        remove_tree(parent.as_fd(), OsStr::new("vol")).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn remove_tree_handles_any_depth() {
        let d = tmp("deep");
        let mut p = d.join("vol");
        for _ in 0..300 {
            p = p.join("d");
        }
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("leaf"), b"x").unwrap();
        let parent = open_dir(&d).unwrap();
        remove_tree(parent.as_fd(), OsStr::new("vol")).unwrap();
        assert!(!d.join("vol").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    /// A bind of a directory of the same filesystem: same device as everything around it.
    fn bind(from: &Path, to: &Path) {
        nix::mount::mount(Some(from), to, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>).unwrap();
    }

    /// A bind from the same filesystem inside a tree is a boundary as another filesystem is:
    /// the removal stops there with EXDEV and deletes nothing of the bind's source, and the
    /// usage counts none of it.
    #[test]
    fn a_same_filesystem_bind_inside_a_tree_is_neither_removed_nor_counted() {
        let d = tmp("same-fs-bind");
        fs::create_dir_all(d.join("precious")).unwrap();
        fs::write(d.join("precious/important"), vec![1u8; 8192]).unwrap();
        fs::create_dir_all(d.join("vol/a/sub")).unwrap();
        bind(&d.join("precious"), &d.join("vol/a/sub"));
        let u = usage(open_dir(&d.join("vol")).unwrap());
        let parent = open_dir(&d).unwrap();
        let removed = remove_tree(parent.as_fd(), OsStr::new("vol"));
        nix::mount::umount(&d.join("vol/a/sub")).unwrap();
        assert_eq!(fs::read(d.join("precious/important")).unwrap().len(), 8192);
        assert_eq!(u.map(|u| u.inodes), Ok(2), "the root and a/, not the bind");
        assert_eq!(
            removed.map_err(|e| (e.errno, e.at)),
            Err((Errno::EXDEV, PathBuf::from("vol/a/sub")))
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn usage_counts_without_following_links() {
        let d = tmp("usage");
        fs::create_dir_all(d.join("v/sub")).unwrap();
        fs::write(d.join("v/sub/f"), vec![1u8; 8192]).unwrap();
        symlink("/usr", d.join("v/link")).unwrap();
        let u = usage(open_dir(&d.join("v")).unwrap()).unwrap();
        assert_eq!(u.inodes, 4);
        assert!(u.bytes >= 8192, "{u:?}");
        fs::remove_dir_all(&d).unwrap();
    }
}
