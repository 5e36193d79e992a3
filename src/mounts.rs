//! The mount table and the mount syscalls: parsing `/proc/self/mountinfo`, telling our volume
//! binds from anything else, bind, read-only remount and unmount.

use std::ffi::{CString, OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::libc;
use nix::mount::{MntFlags, MsFlags};

/// One line of mountinfo (proc(5)); only the fields the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    pub dev: (u32, u32),
    /// The directory of the source filesystem that is mounted here.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// A bind of the volume dir.
    Ours,
    /// A bind of the volume dir, whose directory has since been deleted.
    OursDeleted,
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

/// Whether `name` in `parent` is where a mount sits, from `statx` without reading the mount
/// table (which, on a node with thousands of mounts, takes the kernel milliseconds to produce).
/// `None` when the kernel cannot say (before Linux 5.8): the caller reads the table. A symlink
/// at `name` is not followed.
pub fn is_mount_point(parent: BorrowedFd<'_>, name: &OsStr) -> Result<Option<bool>, Errno> {
    let name = CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut buf = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `name` is NUL-terminated and outlives the call; `buf` is writable and exactly the
    // struct statx fills; `parent` stays open while it is borrowed.
    let rc = unsafe {
        libc::statx(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_TYPE,
            buf.as_mut_ptr(),
        )
    };
    Errno::result(rc)?;
    // SAFETY: the buffer started zeroed, and statx succeeded, so every field holds a value.
    let stx = unsafe { buf.assume_init() };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & bit == 0 {
        return Ok(None);
    }
    Ok(Some(stx.stx_attributes & bit != 0))
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
pub fn read_matching(keep: impl FnMut(&MountEntry) -> bool) -> Result<Vec<MountEntry>, Errno> {
    let file = std::fs::File::open("/proc/self/mountinfo").map_err(io_errno)?;
    filter_lines(std::io::BufReader::with_capacity(READ_CHUNK, file), keep)
}

/// One read of mountinfo: the kernel hands it out a page at a time.
const READ_CHUNK: usize = 16 * 1024;

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32))
}

/// The lines of a mount table that parse and that `keep` accepts; EINVAL for a malformed line.
fn filter_lines(
    mut reader: impl std::io::BufRead,
    mut keep: impl FnMut(&MountEntry) -> bool,
) -> Result<Vec<MountEntry>, Errno> {
    let mut kept = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).map_err(io_errno)? == 0 {
            return Ok(kept);
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.is_empty() {
            continue;
        }
        let entry = parse_line(text).ok_or(Errno::EINVAL)?;
        if keep(&entry) {
            kept.push(entry);
        }
    }
}

/// A mountinfo line that does not have the shape proc(5) gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
}

pub fn parse(raw: &[u8]) -> Result<Vec<MountEntry>, ParseError> {
    raw.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| parse_line(l).ok_or(ParseError { line: i + 1 }))
        .collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
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
    let options = String::from_utf8(fields.next()?.to_vec()).ok()?;
    // Optional fields end with a lone "-".
    loop {
        if fields.next()? == b"-" {
            break;
        }
    }
    let fs_type = String::from_utf8(unescape(fields.next()?).into_vec()).ok()?;
    let source = String::from_utf8_lossy(unescape(fields.next()?).as_bytes()).into_owned();
    if !root.is_absolute() || !mount_point.is_absolute() {
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

    pub fn needs_remount(self) -> bool {
        self != BindFlags::default()
    }

    /// Whether an existing mount carries exactly these flags (the ones we can set).
    pub fn matches(self, m: &MountEntry) -> bool {
        m.read_only() == self.read_only
            && m.has_option("nosuid") == self.nosuid
            && m.has_option("nodev") == self.nodev
            && m.has_option("noexec") == self.noexec
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

/// A bind mount ignores MS_RDONLY and friends on creation; they take effect only on a remount.
/// `mount_root` must name the root of the new bind (an fd opened through it), never the dir below.
/// Restrictions the bind inherited from its source (nosuid, nodev, noexec, atime) are kept: a
/// remount replaces all of them, and dropping one would loosen the source's rules.
pub fn remount_bind(mount_root: &Path, flags: BindFlags) -> Result<(), Errno> {
    use nix::sys::statvfs::FsFlags;
    let inherited = nix::sys::statvfs::statvfs(mount_root)?.flags();
    let mut ms = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags.ms_flags();
    for (fs, m) in [
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
        parse(SAMPLE.as_bytes()).unwrap()
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
        let broken = format!("{SAMPLE}not a mountinfo line\n");
        assert_eq!(filter_lines(broken.as_bytes(), |_| true), Err(Errno::EINVAL));
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
    fn rejects_malformed_lines() {
        for bad in [
            "",
            "x 27 0:21 / /proc rw - proc proc rw",
            "1 2 0:1 / /p rw shared:1",
            "1 2 01 / /p rw - a b c",
            "1 2 0:1 rel /p rw - a b c",
        ] {
            if bad.is_empty() {
                assert_eq!(parse(bad.as_bytes()).unwrap(), vec![]);
            } else {
                assert_eq!(parse(bad.as_bytes()), Err(ParseError { line: 1 }), "{bad}");
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

    #[test]
    fn subpath_mounts_count_as_uses() {
        let t = parse(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 8:1 /base/nlc-a/sub/dir /pod/x rw - ext4 /dev/sda1 rw\n3 1 8:1 /base/nlc-ab /pod/y rw - ext4 /dev/sda1 rw\n").unwrap();
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
        )
        .unwrap();
        let s = BindSource::of_dir(&t, Path::new("/var/node-local-cache/nlc-a")).unwrap();
        assert_eq!(
            s,
            BindSource {
                dev: (8, 3),
                root: "/data/nlc/nlc-a".into()
            }
        );
    }

    #[test]
    fn statx_tells_a_mount_point_without_following_symlinks() {
        let dir = std::env::temp_dir().join(format!("nlc-mounts-statx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["a", "b"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(dir.join("b"), dir.join("link")).unwrap();
        let fd = nix::fcntl::open(&dir, nix::fcntl::OFlag::O_DIRECTORY, nix::sys::stat::Mode::empty()).unwrap();
        let at = |name: &str| is_mount_point(fd.as_fd(), OsStr::new(name));
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

    #[test]
    fn flags_match_and_describe() {
        let t = table();
        let ro = BindFlags {
            read_only: true,
            nosuid: true,
            ..Default::default()
        };
        assert!(ro.matches(&t[4]));
        assert!(!BindFlags::default().matches(&t[4]));
        assert!(BindFlags::default().matches(&t[3]));
        assert_eq!(ro.describe(), "ro,nosuid");
        assert!(!BindFlags::default().needs_remount());
    }
}
