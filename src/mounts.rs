//! The mount table and the mount syscalls: parsing `/proc/self/mountinfo`, telling our volume
//! binds from anything else, bind, read-only remount and unmount.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{debug, warn};
use nix::errno::Errno;
use nix::libc;
use nix::mount::{MntFlags, MsFlags};

use crate::safedir::fd_path;

/// One line of mountinfo (proc(5)); only the fields the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    pub dev: (u32, u32),
    /// What of the source filesystem is mounted here: a directory for most filesystems, but not
    /// always a path (`net:[4026532178]` for a network namespace file).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,…`).
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.has_option("ro")
    }

    pub fn has_option(&self, opt: &str) -> bool {
        self.options.split(',').any(|o| o == opt)
    }
}

/// Where a volume's directory lives as the kernel names it: the device and the path inside
/// that filesystem. Every bind of the volume dir shows exactly this `dev` and `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindSource {
    pub dev: (u32, u32),
    pub root: PathBuf,
}

/// How a mount at a target relates to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// A bind of the volume dir.
    Ours,
    /// A bind of the volume dir, whose directory has since been deleted.
    OursDeleted,
    /// A bind of the volume dir as it was before another filesystem was mounted over the base
    /// dir (or a dir above it): the pod holds a copy the base dir no longer shows.
    OursHidden,
    /// Something else.
    Foreign,
}

impl BindSource {
    /// The bind source of `<dir>` where `dir` is an absolute, symlink-free path: the deepest mount
    /// whose mount point contains it (the last one listed, when several are stacked there).
    pub fn of_dir(table: &[MountEntry], dir: &Path) -> Option<BindSource> {
        let containing = table
            .iter()
            .filter(|m| dir.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.as_os_str().len())?;
        let covering = table.iter().rev().find(|m| m.mount_point == containing.mount_point)?;
        let rest = dir.strip_prefix(&covering.mount_point).ok()?;
        let root = if rest.as_os_str().is_empty() {
            covering.root.clone()
        } else {
            covering.root.join(rest)
        };
        Some(BindSource {
            dev: covering.dev,
            root,
        })
    }

    /// What `dir` showed before the mounts stacked on top of it came: the same path on each
    /// filesystem mounted at or above it, but for the one `of_dir` gives. A mount root the
    /// kernel marks deleted names the dir it was.
    pub fn earlier_of_dir(table: &[MountEntry], dir: &Path) -> Vec<BindSource> {
        let current = BindSource::of_dir(table, dir);
        table
            .iter()
            .filter_map(|m| {
                let rest = dir.strip_prefix(&m.mount_point).ok()?;
                let root = m.root.as_os_str().as_bytes();
                let root = Path::new(OsStr::from_bytes(root.strip_suffix(b"//deleted").unwrap_or(root)));
                // Only a path can be joined: an nsfs entry's root is "net:[...]".
                root.is_absolute().then(|| BindSource {
                    dev: m.dev,
                    root: if rest.as_os_str().is_empty() {
                        root.to_owned()
                    } else {
                        root.join(rest)
                    },
                })
            })
            .filter(|s| Some(s) != current.as_ref())
            .collect()
    }

    /// How `m`, a mount at a target, relates to `dir` (whose bind source this is) in `table`: a
    /// bind made before a filesystem was mounted over `dir` or above it is still `dir`'s.
    pub fn binding_at(&self, table: &[MountEntry], dir: &Path, m: &MountEntry) -> Binding {
        match self.classify(m) {
            Binding::Foreign
                if BindSource::earlier_of_dir(table, dir)
                    .iter()
                    .any(|s| s.classify(m) != Binding::Foreign) =>
            {
                Binding::OursHidden
            }
            binding => binding,
        }
    }

    /// Whether `m` shows this directory or anything inside it, live or deleted.
    pub fn shown_by(&self, m: &MountEntry) -> bool {
        let root = m.root.as_os_str().as_bytes();
        let root = Path::new(OsStr::from_bytes(root.strip_suffix(b"//deleted").unwrap_or(root)));
        m.dev == self.dev && root.starts_with(&self.root)
    }

    pub fn classify(&self, m: &MountEntry) -> Binding {
        if m.dev != self.dev {
            return Binding::Foreign;
        }
        if m.root == self.root {
            return Binding::Ours;
        }
        // The kernel appends "//deleted" to the root of a bind whose source dir was removed.
        let mut deleted = self.root.as_os_str().to_owned();
        deleted.push("//deleted");
        if m.root.as_os_str() == deleted {
            Binding::OursDeleted
        } else {
            Binding::Foreign
        }
    }
}

/// What `statx` tells of a name in a directory, not following a symlink there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountPointCheck {
    /// Whether a mount sits there; `None` when the kernel cannot say (before Linux 5.8): the
    /// caller reads the table.
    pub mounted: Option<bool>,
    /// Device and inode of what is there (the root of the top mount, if one sits there), if it
    /// is a directory.
    pub dir: Option<(u64, u64)>,
}

/// Whether `name` in `parent` is where a mount sits, from `statx` without reading the mount
/// table (which, on a node with thousands of mounts, takes the kernel milliseconds to produce),
/// and what directory shows there, from the same call. A symlink at `name` is not followed.
pub fn check_mount_point(parent: BorrowedFd<'_>, name: &OsStr) -> Result<MountPointCheck, Errno> {
    let name = CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)?;
    let st = crate::safedir::stat_at(parent, &name)?;
    Ok(MountPointCheck {
        mounted: st.mount_root,
        dir: st.is_dir().then_some((st.dev, st.ino)),
    })
}

/// The mounts stacked at `path`, bottom first.
pub fn at<'a>(table: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    table.iter().filter(|m| m.mount_point == path).collect()
}

/// Every mount anywhere that shows the volume dir or anything inside it (a pod's subPath), live
/// or deleted: while one exists, the volume's data is in use.
pub fn uses_of<'a>(table: &'a [MountEntry], source: &BindSource) -> Vec<&'a MountEntry> {
    table.iter().filter(|m| source.shown_by(m)).collect()
}

/// How many distinct volume dirs directly below `base` are bind-mounted somewhere.
pub fn volumes_mounted(table: &[MountEntry], base: &BindSource) -> usize {
    let mut names: Vec<&OsStr> = table
        .iter()
        .filter(|m| m.dev == base.dev && m.root.parent() == Some(base.root.as_path()))
        .filter_map(|m| m.root.file_name())
        .collect();
    names.sort();
    names.dedup();
    names.len()
}

/// The whole mount table.
pub fn read_table() -> Result<Vec<MountEntry>, Errno> {
    read_matching(|_| true)
}

/// The entries of the mount table that `keep` accepts, in table order. The table is read a line
/// at a time, so memory stays one line plus what is kept: a busy node has thousands of mounts,
/// and holding them all on every call left the allocator's high-water mark at the largest
/// table ever seen.
///
/// Before Linux 5.8 a read that takes several `read(2)` calls has no cursor: a mount removed
/// between two of them (pods come and go all the time) can make it skip an entry that stays, and
/// a missed bind of a copy would let its deletion go ahead. There the table is read until two
/// reads agree, as Kubernetes' mount-utils does; `EAGAIN` when they never do.
pub fn read_matching(mut keep: impl FnMut(&MountEntry) -> bool) -> Result<Vec<MountEntry>, Errno> {
    let cursor = reads_have_a_cursor();
    let mut read = || {
        let file = std::fs::File::open("/proc/self/mountinfo").map_err(io_errno)?;
        let reader = std::io::BufReader::with_capacity(READ_CHUNK, file);
        if cursor {
            filter_lines(reader, &mut keep).map(|kept| (kept, 0))
        } else {
            filter_lines_digest(reader, &mut keep)
        }
    };
    if cursor {
        return read().map(|(kept, _)| kept);
    }
    until_two_agree(read, MAX_READS)
}

/// Reads of a table without a cursor before giving up.
const MAX_READS: usize = 5;

/// What `read` gives once two reads in a row have the same digest.
fn until_two_agree<T>(mut read: impl FnMut() -> Result<(T, u64), Errno>, tries: usize) -> Result<T, Errno> {
    let (_, mut digest) = read()?;
    for _ in 1..tries {
        let (kept, again) = read()?;
        if again == digest {
            return Ok(kept);
        }
        digest = again;
    }
    Err(Errno::EAGAIN)
}

/// Whether this kernel reads mountinfo with a cursor (Linux 5.8 and later).
fn reads_have_a_cursor() -> bool {
    static CURSOR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CURSOR.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|r| release_at_least(&r, (5, 8)))
    })
}

/// Whether a kernel release such as `4.18.0-553.el8_10.x86_64` is at least `want`.
fn release_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse().ok());
    let minor = parts.next().and_then(|p| p.parse().ok());
    matches!((major, minor), (Some(major), Some(minor)) if (major, minor) >= want)
}

/// One read of mountinfo: the kernel hands it out a page at a time.
const READ_CHUNK: usize = 16 * 1024;

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32))
}

/// `filter_lines`, and a digest of the whole table.
fn filter_lines_digest(
    reader: impl std::io::BufRead,
    keep: impl FnMut(&MountEntry) -> bool,
) -> Result<(Vec<MountEntry>, u64), Errno> {
    use std::hash::Hasher;
    let mut digest = std::hash::DefaultHasher::new();
    let kept = filter_lines_seen(reader, keep, |line| digest.write(line))?;
    Ok((kept, digest.finish()))
}

/// The lines of a mount table that parse and that `keep` accepts. A line that does not parse is
/// skipped (and reported once): one odd entry must not hide every other mount on the node.
fn filter_lines(
    reader: impl std::io::BufRead,
    keep: impl FnMut(&MountEntry) -> bool,
) -> Result<Vec<MountEntry>, Errno> {
    filter_lines_seen(reader, keep, |_| {})
}

/// `filter_lines`, showing `seen` every line read.
fn filter_lines_seen(
    mut reader: impl std::io::BufRead,
    mut keep: impl FnMut(&MountEntry) -> bool,
    mut seen: impl FnMut(&[u8]),
) -> Result<Vec<MountEntry>, Errno> {
    let mut kept = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io_errno)? == 0 {
            return Ok(kept);
        }
        seen(&line);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.is_empty() {
            continue;
        }
        match parse_line(text) {
            Some(entry) if keep(&entry) => kept.push(entry),
            Some(_) => {}
            None => report_skipped(text),
        }
    }
}

/// Set once the first unparsable line has been logged: a node's table is read on many calls,
/// and the same odd line would otherwise fill the log.
static SKIP_REPORTED: AtomicBool = AtomicBool::new(false);

fn report_skipped(line: &[u8]) {
    let shown = String::from_utf8_lossy(&line[..line.len().min(256)]).into_owned();
    if SKIP_REPORTED.swap(true, Ordering::Relaxed) {
        debug!("mountinfo: skipped a line that does not parse: {shown}");
    } else {
        warn!("mountinfo: skipped a line that does not parse (reported once): {shown}");
    }
}

/// Every entry of a mount table that parses, in order; lines that do not are skipped.
pub fn parse(raw: &[u8]) -> Vec<MountEntry> {
    raw.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let entry = parse_line(l);
            if entry.is_none() {
                report_skipped(l);
            }
            entry
        })
        .collect()
}

/// One mountinfo line (proc(5)): `id parent major:minor root mount-point options [optional
/// fields…] - fs-type source super-options`. The root is whatever the filesystem names it: a path
/// for most, but `net:[4026532178]` for a namespace file (nsfs) and other forms for pseudo
/// filesystems, so only the mount point must be a path.
pub fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let mut fields = line.split(|&b| b == b' ');
    let id = num(fields.next()?)?;
    let parent = num(fields.next()?)?;
    let (major, minor) = {
        let d = fields.next()?;
        let colon = d.iter().position(|&b| b == b':')?;
        (num(&d[..colon])? as u32, num(&d[colon + 1..])? as u32)
    };
    let root = PathBuf::from(unescape(fields.next()?));
    let mount_point = PathBuf::from(unescape(fields.next()?));
    let options = String::from_utf8_lossy(fields.next()?).into_owned();
    // Optional fields end with a lone "-".
    loop {
        if fields.next()? == b"-" {
            break;
        }
    }
    let fs_type = String::from_utf8_lossy(unescape(fields.next()?).as_bytes()).into_owned();
    let source = String::from_utf8_lossy(unescape(fields.next()?).as_bytes()).into_owned();
    if root.as_os_str().is_empty() || !mount_point.is_absolute() {
        return None;
    }
    Some(MountEntry {
        id,
        parent,
        dev: (major, minor),
        root,
        mount_point,
        options,
        fs_type,
        source,
    })
}

fn num(field: &[u8]) -> Option<u64> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
pub fn unescape(field: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (field[i], octal) {
            (b'\\', Some(d)) if d[0] <= b'3' => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

/// Flags a publish may ask for beyond read-only (from the capability's mount_flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

impl BindFlags {
    fn ms_flags(self) -> MsFlags {
        let mut f = MsFlags::empty();
        f.set(MsFlags::MS_RDONLY, self.read_only);
        f.set(MsFlags::MS_NOSUID, self.nosuid);
        f.set(MsFlags::MS_NODEV, self.nodev);
        f.set(MsFlags::MS_NOEXEC, self.noexec);
        f
    }

    /// The same flags as `mount_setattr` takes them.
    fn mount_attr(self) -> u64 {
        [
            (self.read_only, libc::MOUNT_ATTR_RDONLY),
            (self.nosuid, libc::MOUNT_ATTR_NOSUID),
            (self.nodev, libc::MOUNT_ATTR_NODEV),
            (self.noexec, libc::MOUNT_ATTR_NOEXEC),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |attr, (_, bit)| attr | bit)
    }

    pub fn needs_remount(self) -> bool {
        self != BindFlags::default()
    }

    /// Why an existing mount does not serve a request for these flags, or `None` when it does.
    /// Read-only must be as asked, in either direction; a restriction asked for must be there,
    /// and one there must be asked for or `inherited`: a bind takes its source's flags, and a base
    /// dir on a `nosuid,nodev` filesystem gives every publish those (kubelet repeats a publish
    /// after each restart and must get OK), but a restriction only an earlier publish asked for
    /// is not what this one asks for.
    pub fn unmet_by(self, m: &MountEntry, inherited: BindFlags) -> Option<String> {
        if m.read_only() != self.read_only {
            let (asked, there) = if self.read_only {
                ("read-only", "read-write")
            } else {
                ("read-write", "read-only")
            };
            return Some(format!("already published {there} ({}), not {asked}", m.options));
        }
        let restrictions = [
            (self.nosuid, inherited.nosuid, "nosuid"),
            (self.nodev, inherited.nodev, "nodev"),
            (self.noexec, inherited.noexec, "noexec"),
        ];
        let missing: Vec<&str> = restrictions
            .iter()
            .filter(|&&(asked, _, name)| asked && !m.has_option(name))
            .map(|&(_, _, name)| name)
            .collect();
        if !missing.is_empty() {
            return Some(format!(
                "already published with options {}, without the requested {}",
                m.options,
                missing.join(",")
            ));
        }
        let unasked: Vec<&str> = restrictions
            .iter()
            .filter(|&&(asked, from_base, name)| !asked && !from_base && m.has_option(name))
            .map(|&(_, _, name)| name)
            .collect();
        if unasked.is_empty() {
            None
        } else {
            Some(format!(
                "already published with options {}: {} asked for by an earlier publish, not by this one",
                m.options,
                unasked.join(",")
            ))
        }
    }

    /// The restrictions of the mount `dir` is on: what every bind of `dir` takes from it, or,
    /// for a bind's own root, what the bind ended up with.
    pub fn of_mount(dir: BorrowedFd) -> Result<BindFlags, Errno> {
        use nix::sys::statvfs::FsFlags;
        let f = nix::sys::statvfs::fstatvfs(dir)?.flags();
        Ok(BindFlags {
            read_only: f.contains(FsFlags::ST_RDONLY),
            nosuid: f.contains(FsFlags::ST_NOSUID),
            nodev: f.contains(FsFlags::ST_NODEV),
            noexec: f.contains(FsFlags::ST_NOEXEC),
        })
    }

    pub fn describe(self) -> String {
        let mut s = String::from(if self.read_only { "ro" } else { "rw" });
        for (on, name) in [(self.nosuid, "nosuid"), (self.nodev, "nodev"), (self.noexec, "noexec")] {
            if on {
                s.push(',');
                s.push_str(name);
            }
        }
        s
    }
}

/// Binds `source` onto `target`. Both are usually `/proc/self/fd/N` paths of directories opened
/// without following symlinks, so nothing is re-resolved between the checks and the mount.
pub fn bind(source: &Path, target: &Path) -> Result<(), Errno> {
    nix::mount::mount(Some(source), target, None::<&Path>, MsFlags::MS_BIND, None::<&Path>)
}

/// Whether `open_tree` and `move_mount` may be used: cleared when the kernel lacks them (before
/// Linux 5.2) or a seccomp profile refuses them.
static MOUNT_API: AtomicBool = AtomicBool::new(true);

/// Whether `mount_setattr` may be used: cleared when the kernel lacks it (before Linux 5.12) or
/// a seccomp profile refuses it.
static SETATTR_API: AtomicBool = AtomicBool::new(true);

/// What `bind_handles` made.
#[derive(Debug)]
pub struct Bound {
    /// The flags asked for are on the bind already; otherwise only a remount (`remount_bind`)
    /// sets them.
    pub with_flags: bool,
    /// The new mount's root, when the bind was made through handles: what the mount inherited
    /// and was given can be read from it without looking the target up again.
    pub root: Option<OwnedFd>,
}

/// Binds the directory `source` onto the directory `target`, both open handles: a clone of the
/// source (`open_tree`) attached on the target (`move_mount`), the same non-recursive bind as
/// `bind`, propagated the same way. Through handles the kernel walks no `/proc/self/fd` path and
/// copies no option page: 13 µs instead of 20 per bind on the development machine. `flags` are
/// set on the clone before it is attached (`mount_setattr`), so a read-only bind is never
/// writable, not even for a moment; they are only ever added to what the clone inherited. Where
/// those syscalls are missing or refused: `bind` on the handles' `/proc/self/fd` paths, or a
/// plain bind through handles, and the caller remounts.
pub fn bind_handles(source: BorrowedFd<'_>, target: BorrowedFd<'_>, flags: BindFlags) -> Result<Bound, Errno> {
    if MOUNT_API.load(Ordering::Relaxed) {
        match clone_tree(source) {
            Ok(tree) => {
                let with_flags = set_flags(tree.as_fd(), flags)?;
                attach_tree(tree.as_fd(), target)?;
                return Ok(Bound {
                    with_flags,
                    root: Some(tree),
                });
            }
            // EPERM is also a missing capability; `bind` then fails the same way.
            Err(Errno::ENOSYS | Errno::EPERM) => {
                MOUNT_API.store(false, Ordering::Relaxed);
                debug!("open_tree unavailable; binding through /proc/self/fd paths");
            }
            Err(e) => return Err(e),
        }
    }
    bind(&fd_path(source), &fd_path(target)).map(|()| Bound {
        with_flags: false,
        root: None,
    })
}

/// Sets `flags` on the detached clone `tree`, if there are any and `mount_setattr` works: whether
/// the clone now carries them.
fn set_flags(tree: BorrowedFd<'_>, flags: BindFlags) -> Result<bool, Errno> {
    if !flags.needs_remount() || !SETATTR_API.load(Ordering::Relaxed) {
        return Ok(false);
    }
    match add_mount_attr(tree, flags.mount_attr()) {
        Ok(()) => Ok(true),
        Err(Errno::ENOSYS | Errno::EPERM) => {
            SETATTR_API.store(false, Ordering::Relaxed);
            debug!("mount_setattr unavailable; setting a bind's flags with a remount");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Adds the `MOUNT_ATTR_*` bits `set` to the mount behind `mount` (never clears one).
fn add_mount_attr(mount: BorrowedFd<'_>, set: u64) -> Result<(), Errno> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the path is a NUL-terminated literal; `attr` is a live mount_attr of the size
    // passed; `mount` stays open while it is borrowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    Errno::result(rc).map(drop)
}

/// A detached copy of the mount at `dir`, rooted at `dir`: unmounted again when its handle is
/// closed before it is attached.
fn clone_tree(dir: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: the path is a NUL-terminated literal; `dir` stays open while it is borrowed; the
    // syscall takes no other memory.
    let rc = unsafe { libc::syscall(libc::SYS_open_tree, dir.as_raw_fd(), c"".as_ptr(), flags) };
    let fd = Errno::result(rc)?;
    let fd = libc::c_int::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches the detached mount `tree` on the directory `target`.
fn attach_tree(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: both paths are NUL-terminated literals; both handles stay open while borrowed; the
    // syscall takes no other memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    Errno::result(rc).map(drop)
}

/// A bind mount ignores MS_RDONLY and friends on creation; they take effect only on a remount.
/// `mount_root` must name the root of the new bind (an fd opened through it), never the dir below.
/// Restrictions the bind inherited from its source (read-only, nosuid, nodev, noexec, atime) are
/// kept: a remount replaces all of them, and dropping one would loosen the source's rules.
pub fn remount_bind(mount_root: &Path, flags: BindFlags) -> Result<(), Errno> {
    use nix::sys::statvfs::FsFlags;
    let inherited = nix::sys::statvfs::statvfs(mount_root)?.flags();
    let mut ms = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags.ms_flags();
    for (fs, m) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if inherited.contains(fs) {
            ms |= m;
        }
    }
    nix::mount::mount(None::<&Path>, mount_root, None::<&Path>, ms, None::<&Path>)
}

/// Takes a mount made moments ago off `mount_point` at once, even while something holds it open.
pub fn detach(mount_point: &Path) -> Result<(), Errno> {
    nix::mount::umount2(mount_point, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH)
}

/// Unmounts the top mount at `target`, never following a symlink there.
pub fn unmount(target: &Path) -> Result<(), Errno> {
    nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 27 8:1 /var/node-local-cache /var/node-local-cache rw,relatime shared:1 master:2 - ext4 /dev/sda1 rw
41 27 8:1 /var/node-local-cache/nlc-a /var/lib/kubelet/pods/p/mount rw,relatime shared:1 - ext4 /dev/sda1 rw
42 41 8:1 /var/node-local-cache/nlc-a /var/lib/kubelet/pods/p/mount ro,nosuid,relatime shared:1 - ext4 /dev/sda1 rw
43 27 8:1 /var/node-local-cache/nlc-b//deleted /var/lib/kubelet/pods/q/mount rw - ext4 /dev/sda1 rw
44 27 0:50 / /var/lib/kubelet/pods/r/mount rw - tmpfs tmpfs rw
45 27 0:51 / /mnt/with\\040space\\011tab\\012nl\\134bs rw - tmpfs my\\040src rw
";

    fn table() -> Vec<MountEntry> {
        parse(SAMPLE.as_bytes())
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn line_count(raw: &[u8]) -> usize {
        raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count()
    }

    #[test]
    fn parses_fields_and_optional_tags() {
        let t = table();
        assert_eq!(t.len(), 8);
        assert_eq!(t[2].id, 30);
        assert_eq!(t[2].parent, 27);
        assert_eq!(t[2].dev, (8, 1));
        assert_eq!(t[2].root, Path::new("/var/node-local-cache"));
        assert_eq!(t[2].fs_type, "ext4");
        assert_eq!(t[2].source, "/dev/sda1");
        assert!(t[4].read_only() && t[4].has_option("nosuid"));
    }

    #[test]
    fn filtering_reader_keeps_matches_in_order_across_chunk_boundaries() {
        let all = table();
        let wanted = |m: &MountEntry| m.id % 2 == 0;
        let expect: Vec<MountEntry> = all.iter().filter(|m| wanted(m)).cloned().collect();
        assert!(!expect.is_empty() && expect.len() < all.len());
        for chunk in [1, 7, 64, 1 << 16] {
            let reader = std::io::BufReader::with_capacity(chunk, SAMPLE.as_bytes());
            assert_eq!(filter_lines(reader, wanted).unwrap(), expect, "chunk {chunk}");
        }
        let mut seen = 0;
        filter_lines(SAMPLE.as_bytes(), |_| {
            seen += 1;
            false
        })
        .unwrap();
        assert_eq!(seen, all.len());
        // A line that does not parse is skipped, never a reason to refuse the rest.
        let broken = format!("not a mountinfo line\n{SAMPLE}1 2 0:1\n");
        assert_eq!(filter_lines(broken.as_bytes(), |_| true).unwrap(), all);
    }

    #[test]
    fn unescapes_octal_exactly() {
        let t = table();
        assert_eq!(t[7].mount_point.as_os_str().as_bytes(), b"/mnt/with space\ttab\nnl\\bs");
        assert_eq!(t[7].source, "my src");
        // Not an escape: left as written.
        assert_eq!(unescape(b"a\\9zz\\").as_bytes(), b"a\\9zz\\");
        assert_eq!(unescape(b"\\777").as_bytes(), b"\\777");
    }

    #[test]
    fn skips_malformed_lines_and_keeps_the_rest() {
        for bad in [
            "x 27 0:21 / /proc rw - proc proc rw",
            "1 2 0:1 / /p rw shared:1",
            "1 2 01 / /p rw - a b c",
            "1 2 0:1 / rel rw - a b c",
            "1 2 0:1  /p rw - a b c",
            "1 2 0:1 / /p rw - a",
        ] {
            assert_eq!(parse_line(bad.as_bytes()), None, "{bad}");
            let raw = format!("{bad}\n{SAMPLE}");
            assert_eq!(parse(raw.as_bytes()), table(), "{bad}");
        }
        assert_eq!(parse(b""), vec![]);
    }

    #[test]
    fn roots_that_are_not_paths_parse() {
        let line = b"45 27 0:4 net:[4026532178] /run/netns/cni-c3a97dfb rw - nsfs nsfs rw";
        let m = parse_line(line).unwrap();
        assert_eq!(m.root, Path::new("net:[4026532178]"));
        assert_eq!(m.mount_point, Path::new("/run/netns/cni-c3a97dfb"));
        assert_eq!((m.fs_type.as_str(), m.dev), ("nsfs", (0, 4)));
        let base = BindSource {
            dev: (0, 4),
            root: "/var/node-local-cache".into(),
        };
        assert_eq!(base.classify(&m), Binding::Foreign);
        assert!(!base.shown_by(&m));
    }

    /// The host namespace of a real node with pods: CNI nsfs entries, shared kubelet dir, one
    /// published volume of this driver.
    #[test]
    fn a_real_nodes_host_table_parses_whole() {
        let raw = fixture("mountinfo-node-host.txt");
        let t = parse(&raw);
        assert_eq!(t.len(), line_count(&raw));
        assert_eq!(t.iter().filter(|m| m.fs_type == "nsfs").count(), 2);
        let vol = "/var/node-local-cache/nlc-5c5bce66-f3aa-56ae-b3f4-2d59a38ff9f3";
        let source = BindSource::of_dir(&t, Path::new(vol)).unwrap();
        assert_eq!(source.root, Path::new(vol));
        let uses = uses_of(&t, &source);
        assert_eq!(uses.len(), 1);
        assert!(uses[0].mount_point.ends_with("mount"));
        assert_eq!(source.classify(uses[0]), Binding::Ours);
        let base = BindSource::of_dir(&t, Path::new("/var/node-local-cache")).unwrap();
        assert_eq!(volumes_mounted(&t, &base), 1);
    }

    /// The node plugin's own container: read-only overlay root, the base dir and kubelet dir as
    /// host binds, cgroup roots that are long paths.
    #[test]
    fn the_plugin_containers_table_parses_whole() {
        let raw = fixture("mountinfo-node-plugin-container.txt");
        let t = parse(&raw);
        assert_eq!(t.len(), line_count(&raw));
        let root = t.iter().find(|m| m.mount_point == Path::new("/")).unwrap();
        assert!(root.read_only() && root.fs_type == "overlay");
        // The container's base dir is the host's, so a volume dir keeps the host's root path:
        // binds made from inside the container match what the host table shows.
        let s = BindSource::of_dir(&t, Path::new("/var/node-local-cache/nlc-x")).unwrap();
        assert_eq!(s.root, Path::new("/var/node-local-cache/nlc-x"));
        let kubelet = at(&t, Path::new("/var/lib/kubelet"));
        assert_eq!(kubelet.len(), 1);
        assert!(kubelet[0].has_option("relatime"));
    }

    /// Every line of both captured tables, fed through the streaming reader in awkward chunks,
    /// gives the same entries as the whole-table parse.
    #[test]
    fn captured_tables_stream_like_they_parse() {
        for name in ["mountinfo-node-host.txt", "mountinfo-node-plugin-container.txt"] {
            let raw = fixture(name);
            let whole = parse(&raw);
            for chunk in [1, 100, 4096] {
                let reader = std::io::BufReader::with_capacity(chunk, raw.as_slice());
                assert_eq!(filter_lines(reader, |_| true).unwrap(), whole, "{name} chunk {chunk}");
            }
        }
    }

    #[test]
    fn classifies_binds() {
        let t = table();
        let base = BindSource::of_dir(&t, Path::new("/var/node-local-cache")).unwrap();
        assert_eq!(base.root, Path::new("/var/node-local-cache"));
        let a = BindSource::of_dir(&t, Path::new("/var/node-local-cache/nlc-a")).unwrap();
        assert_eq!(
            a,
            BindSource {
                dev: (8, 1),
                root: "/var/node-local-cache/nlc-a".into()
            }
        );
        let stack = at(&t, Path::new("/var/lib/kubelet/pods/p/mount"));
        assert_eq!(stack.len(), 2);
        assert_eq!(a.classify(stack[1]), Binding::Ours);
        let b = BindSource::of_dir(&t, Path::new("/var/node-local-cache/nlc-b")).unwrap();
        assert_eq!(b.classify(&t[5]), Binding::OursDeleted);
        assert_eq!(a.classify(&t[5]), Binding::Foreign);
        assert_eq!(a.classify(&t[6]), Binding::Foreign);
        assert_eq!(uses_of(&t, &a).len(), 2);
        assert_eq!(uses_of(&t, &b).len(), 1);
        assert_eq!(volumes_mounted(&t, &base), 1);
    }

    /// The plugin's container with a disk mounted over the base dir since (a late local-SSD
    /// set-up, seen through HostToContainer propagation): what the dir showed before is the
    /// host's path on the root disk; the nsfs and overlay entries of the captured table add
    /// nothing that could pass for it.
    #[test]
    fn earlier_sources_are_the_dirs_under_a_later_mount() {
        let mut raw = fixture("mountinfo-node-plugin-container.txt");
        let base = parse(&raw)
            .into_iter()
            .find(|m| m.mount_point == Path::new("/var/node-local-cache"))
            .unwrap();
        raw.extend_from_slice(b"9999 1 259:0 / /var/node-local-cache rw - xfs /dev/nvme0n1 rw\n");
        let t = parse(&raw);
        let dir = Path::new("/var/node-local-cache/nlc-x");
        let now = BindSource::of_dir(&t, dir).unwrap();
        assert_eq!((now.dev, now.root.as_path()), ((259, 0), Path::new("/nlc-x")));
        let earlier = BindSource::earlier_of_dir(&t, dir);
        let before = BindSource {
            dev: base.dev,
            root: base.root.join("nlc-x"),
        };
        assert!(earlier.contains(&before), "{earlier:?}");
        assert!(!earlier.contains(&now));
        assert!(earlier.iter().all(|s| s.root.ends_with("nlc-x")), "{earlier:?}");
        // A base dir deleted on the host: its mount's root carries the kernel's mark.
        let t =
            parse(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 8:1 /var/nlc//deleted /var/nlc rw - ext4 /dev/sda1 rw\n");
        let earlier = BindSource::earlier_of_dir(&t, Path::new("/var/nlc/nlc-x"));
        let bind = parse(b"3 1 8:1 /var/nlc/nlc-x//deleted /pod rw - ext4 /dev/sda1 rw\n");
        assert!(
            earlier.iter().any(|s| s.classify(&bind[0]) == Binding::OursDeleted),
            "{earlier:?}"
        );
    }

    /// Before Linux 5.8 a read can skip an entry when another goes meanwhile: the table is
    /// read until two reads agree (the one that skipped is not trusted), and refused when they
    /// never do.
    #[test]
    fn a_table_without_a_cursor_is_read_until_two_reads_agree() {
        let raw = fixture("mountinfo-node-host.txt");
        let whole = filter_lines_digest(raw.as_slice(), |_| true).unwrap();
        let mut skipped = raw.clone();
        let second_line = skipped.iter().position(|&b| b == b'\n').unwrap() + 1;
        let end = second_line + skipped[second_line..].iter().position(|&b| b == b'\n').unwrap() + 1;
        skipped.drain(second_line..end);
        let skipped = filter_lines_digest(skipped.as_slice(), |_| true).unwrap();
        assert_ne!(skipped.1, whole.1, "a skipped entry changes the digest");
        let mut reads = vec![whole.clone(), whole.clone(), skipped.clone()];
        let got = until_two_agree(|| Ok(reads.pop().unwrap()), 5).unwrap();
        assert_eq!(
            (got.len(), reads.len()),
            (whole.0.len(), 0),
            "three reads, the agreeing ones kept"
        );
        let mut churn = vec![whole.clone(), skipped.clone(), whole.clone(), skipped.clone(), whole];
        assert_eq!(until_two_agree(|| Ok(churn.pop().unwrap()), 5), Err(Errno::EAGAIN));
        for (release, cursor) in [
            ("4.18.0-553.el8_10.x86_64", false),
            ("5.4.0-1103-aws", false),
            ("5.8.0", true),
            ("5.10.228-219.884.amzn2.x86_64", true),
            ("6.18.0\n", true),
            ("garbage", false),
        ] {
            assert_eq!(release_at_least(release, (5, 8)), cursor, "{release}");
        }
    }

    #[test]
    fn subpath_mounts_count_as_uses() {
        let t = parse(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 8:1 /base/nlc-a/sub/dir /pod/x rw - ext4 /dev/sda1 rw\n3 1 8:1 /base/nlc-ab /pod/y rw - ext4 /dev/sda1 rw\n");
        let a = BindSource {
            dev: (8, 1),
            root: "/base/nlc-a".into(),
        };
        let uses = uses_of(&t, &a);
        assert_eq!(uses.len(), 1);
        assert_eq!(uses[0].id, 2);
    }

    #[test]
    fn bind_source_follows_a_base_dir_that_is_itself_a_bind() {
        // The node container sees the host's dir /data/nlc mounted at /var/node-local-cache.
        let t = parse(
            b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 8:3 /data/nlc /var/node-local-cache rw - xfs /dev/sdb rw\n",
        );
        let s = BindSource::of_dir(&t, Path::new("/var/node-local-cache/nlc-a")).unwrap();
        assert_eq!(
            s,
            BindSource {
                dev: (8, 3),
                root: "/data/nlc/nlc-a".into()
            }
        );
    }

    /// A fresh directory for one test (named for it), holding the directories `subs`.
    fn scratch(test: &str, subs: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nlc-mounts-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in subs {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        dir
    }

    fn open_dir(path: &Path) -> OwnedFd {
        nix::fcntl::open(path, nix::fcntl::OFlag::O_DIRECTORY, nix::sys::stat::Mode::empty()).unwrap()
    }

    /// A scratch dir holding dirs `a` and `b` and a symlink `link` to `b`, and a handle on it.
    fn scratch_with_link(name: &str) -> (PathBuf, OwnedFd) {
        let dir = scratch(name, &["a", "b"]);
        std::os::unix::fs::symlink(dir.join("b"), dir.join("link")).unwrap();
        let fd = open_dir(&dir);
        (dir, fd)
    }

    #[test]
    fn statx_tells_a_mount_point_without_following_symlinks() {
        let (dir, fd) = scratch_with_link("statx");
        let at = |name: &str| check_mount_point(fd.as_fd(), OsStr::new(name)).map(|c| c.mounted);
        assert_eq!(at("b"), Ok(Some(false)));
        bind(&dir.join("a"), &dir.join("b")).unwrap();
        let seen = (at("b"), at("link"), at("a"), at("missing"));
        detach(&dir.join("b")).unwrap();
        assert_eq!(
            seen,
            (Ok(Some(true)), Ok(Some(false)), Ok(Some(false)), Err(Errno::ENOENT))
        );
        assert_eq!(at("b"), Ok(Some(false)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The directory `check_mount_point` reports is the one `stat` shows: the bind's root while
    /// bound, the directory itself before and after, nothing for a symlink.
    #[test]
    fn statx_shows_the_dir_on_top_as_stat_does() {
        use std::os::unix::fs::MetadataExt;
        let (dir, fd) = scratch_with_link("statx-dir");
        let at = |name: &str| check_mount_point(fd.as_fd(), OsStr::new(name)).map(|c| c.dir);
        let stat = |name: &str| {
            let m = std::fs::symlink_metadata(dir.join(name)).unwrap();
            (m.dev(), m.ino())
        };
        let (a, b) = (stat("a"), stat("b"));
        bind(&dir.join("a"), &dir.join("b")).unwrap();
        let seen = (at("b"), stat("b"));
        detach(&dir.join("b")).unwrap();
        let after = (at("a"), at("b"), at("link"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(a, b);
        assert_eq!(seen, (Ok(Some(a)), a));
        assert_eq!(after, (Ok(Some(a)), Ok(Some(b)), Ok(None)));
    }

    /// The bind through handles (`open_tree` + `move_mount`) and the one through `/proc/self/fd`
    /// paths (`mount`) make the same mount, neither carries a mount inside the source along, and
    /// both reach the peers of a shared mount: kubelet sees a node plugin's binds only through
    /// that propagation.
    #[test]
    fn a_bind_through_handles_is_the_bind_through_paths() {
        let dir = scratch("handles", &["src/inner", "shared", "peer"]);
        std::fs::write(dir.join("src/data"), b"cached").unwrap();
        let inner = dir.join("src/inner");
        nix::mount::mount(Some("tmpfs"), &inner, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        let (shared, peer) = (dir.join("shared"), dir.join("peer"));
        let propagation = |path: &Path, flag: MsFlags| {
            nix::mount::mount(None::<&Path>, path, None::<&Path>, flag, None::<&Path>).unwrap();
        };
        // A peer group of its own: `shared` and `peer` show the same directory, and a mount
        // under one appears under the other.
        bind(&shared, &shared).unwrap();
        propagation(&shared, MsFlags::MS_PRIVATE);
        propagation(&shared, MsFlags::MS_SHARED);
        bind(&shared, &peer).unwrap();
        for sub in ["by-handles", "by-paths"] {
            std::fs::create_dir(shared.join(sub)).unwrap();
        }
        let (src, by_handles) = (open_dir(&dir.join("src")), open_dir(&shared.join("by-handles")));
        let attached = clone_tree(src.as_fd()).and_then(|tree| attach_tree(tree.as_fd(), by_handles.as_fd()));
        let by_paths = open_dir(&shared.join("by-paths"));
        bind(&fd_path(src.as_fd()), &fd_path(by_paths.as_fd())).unwrap();
        let table = read_table().unwrap();
        let at = |p: PathBuf| table.iter().find(|m| m.mount_point == p).cloned();
        let seen = [
            at(shared.join("by-handles")),
            at(shared.join("by-paths")),
            at(peer.join("by-handles")),
            at(peer.join("by-paths")),
        ];
        let carried: Vec<_> = ["by-handles/inner", "by-paths/inner"]
            .into_iter()
            .filter_map(|sub| at(shared.join(sub)))
            .collect();
        let data = std::fs::read(peer.join("by-handles/data")).ok();
        for m in [
            shared.join("by-handles"),
            shared.join("by-paths"),
            peer.clone(),
            shared.clone(),
            inner,
        ] {
            let _ = detach(&m);
        }
        drop((src, by_handles, by_paths));
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(attached, Ok(()));
        let [Some(handles), Some(paths), Some(peer_handles), Some(peer_paths)] = seen else {
            panic!("a bind is missing from the mount table: {seen:#?}");
        };
        for (m, like) in [(&handles, &paths), (&peer_handles, &handles), (&peer_paths, &paths)] {
            assert_eq!(
                (&m.root, m.dev, &m.options, &m.fs_type),
                (&like.root, like.dev, &like.options, &like.fs_type),
                "{m:?} against {like:?}"
            );
        }
        assert_eq!(data.as_deref(), Some(&b"cached"[..]));
        assert!(carried.is_empty(), "a bind carried a submount along: {carried:?}");
    }

    /// Flags asked for are added to what a bind inherits, never put in its place: from a
    /// read-only source, a bind asked for `noexec` alone is read-only and noexec, whether the flags
    /// come with the bind (`mount_setattr` on the clone) or from a remount after it.
    #[test]
    fn a_bind_keeps_its_sources_read_only() {
        let dir = scratch("ro-source", &["src", "with-flags", "remounted"]);
        let src = dir.join("src");
        bind(&src, &src).unwrap();
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        nix::mount::mount(None::<&Path>, &src, None::<&Path>, ro, None::<&Path>).unwrap();
        let noexec = BindFlags {
            noexec: true,
            ..Default::default()
        };
        let (src_fd, with_flags) = (open_dir(&src), open_dir(&dir.join("with-flags")));
        let bound = bind_handles(src_fd.as_fd(), with_flags.as_fd(), noexec).map(|b| b.with_flags);
        let remounted = dir.join("remounted");
        bind(&src, &remounted).unwrap();
        let remount = remount_bind(&remounted, noexec);
        let table = read_table().unwrap();
        let options = |p: PathBuf| table.iter().find(|m| m.mount_point == p).map(|m| m.options.clone());
        let seen = (options(dir.join("with-flags")), options(remounted.clone()));
        for m in [dir.join("with-flags"), remounted, src] {
            let _ = detach(&m);
        }
        drop((src_fd, with_flags));
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!((bound, remount), (Ok(true), Ok(())));
        for options in [seen.0, seen.1] {
            let options = options.expect("a bind is missing from the mount table");
            let set: Vec<&str> = options.split(',').collect();
            assert!(set.contains(&"ro") && set.contains(&"noexec"), "{options}");
        }
    }

    /// A target removed after it was opened takes no mount: ENOENT, which the node plugin
    /// reports as a target that changed while it was being mounted.
    #[test]
    fn a_bind_onto_a_removed_dir_is_refused() {
        let dir = scratch("removed", &["src", "gone"]);
        let (src, gone) = (open_dir(&dir.join("src")), open_dir(&dir.join("gone")));
        std::fs::remove_dir(dir.join("gone")).unwrap();
        let by_handles = bind_handles(src.as_fd(), gone.as_fd(), BindFlags::default()).map(|b| b.with_flags);
        let by_paths = bind(&fd_path(src.as_fd()), &fd_path(gone.as_fd()));
        let left: Vec<_> = read_table()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&dir))
            .collect();
        drop((src, gone));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((by_handles, by_paths), (Err(Errno::ENOENT), Err(Errno::ENOENT)));
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn flags_are_compared_with_what_was_asked() {
        let t = table();
        let none = BindFlags::default();
        let ro = BindFlags {
            read_only: true,
            nosuid: true,
            ..Default::default()
        };
        assert_eq!(ro.unmet_by(&t[4], none), None);
        let plain_ro = BindFlags {
            read_only: true,
            ..Default::default()
        };
        let base_nosuid = BindFlags {
            nosuid: true,
            ..Default::default()
        };
        // nosuid inherited, not asked for: still the same publish.
        assert_eq!(plain_ro.unmet_by(&t[4], base_nosuid), None);
        // nosuid neither asked for nor inherited: an earlier publish asked for it.
        let extra = plain_ro.unmet_by(&t[4], none).unwrap();
        assert!(extra.contains("nosuid") && extra.contains("earlier publish"), "{extra}");
        let rw = none.unmet_by(&t[4], base_nosuid).unwrap();
        assert!(rw.contains("read-only") && rw.contains("not read-write"), "{rw}");
        assert!(ro.unmet_by(&t[3], none).unwrap().contains("read-write"));
        let noexec = BindFlags {
            noexec: true,
            ..Default::default()
        };
        assert!(noexec.unmet_by(&t[3], none).unwrap().contains("noexec"));
        let hardened = parse_line(b"9 1 0:60 /nlc-a /t rw,nosuid,nodev,noexec,noatime - tmpfs tmpfs rw").unwrap();
        let base_hardened = BindFlags {
            nosuid: true,
            nodev: true,
            noexec: true,
            ..Default::default()
        };
        for asked in [none, noexec] {
            assert_eq!(asked.unmet_by(&hardened, base_hardened), None, "{}", asked.describe());
        }
        let unasked = none.unmet_by(&hardened, base_nosuid).unwrap();
        assert!(
            unasked.contains("nodev,noexec asked for by an earlier publish"),
            "{unasked}"
        );
        assert_eq!(ro.describe(), "ro,nosuid");
        assert!(!BindFlags::default().needs_remount());
    }
}
