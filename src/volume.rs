//! Volume ids and the request paths that name volumes: what is well-formed, decided on strings
//! alone. The checks that need the filesystem (symlinks, mounts) live in `safedir` and `mounts`.

use std::path::{Component, Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::mounts::BindFlags;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::Access_type;
use crate::proto::csi::VolumeCapability;

pub const ID_PREFIX: &str = "nlc-";
/// `nlc-` and a hyphenated lowercase UUID.
pub const ID_LEN: usize = ID_PREFIX.len() + 36;

/// Fixed namespace for name-derived ids: the same CreateVolume name gives the same id on every
/// controller, with no state kept anywhere.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x3c0f_7d52_a1e4_4b8e_9f36_5d2c_8a71_e04b);

/// Longest target path accepted, as the kernel's PATH_MAX including the terminating NUL.
const PATH_MAX: usize = 4095;

/// The volume id that CreateVolume returns for `name`.
pub fn id_for_name(name: &str) -> String {
    format!(
        "{ID_PREFIX}{}",
        Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).hyphenated()
    )
}

/// Accepts exactly `nlc-` followed by a lowercase hyphenated UUID, so an id is always a single,
/// safe path component.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::missing("volume_id", ""));
    }
    let well_formed = id.len() == ID_LEN && id.starts_with(ID_PREFIX) && is_hyphenated_uuid(&id[ID_PREFIX.len()..]);
    if well_formed {
        Ok(())
    } else {
        Err(Error::BadVolumeId {
            id: id.to_owned(),
            path: PathBuf::new(),
        })
    }
}

/// The text `Uuid::hyphenated` writes: 8-4-4-4-12 lowercase hex digits. Checked byte by byte
/// (every call checks an id, and parsing and printing it again allocated).
fn is_hyphenated_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// `check_id` for a call that names a path, so a refusal names it too.
pub fn check_id_at(id: &str, path: &str) -> Result<()> {
    check_id(id).map_err(|e| e.at_path(Path::new(path)))
}

/// A target path from a request: absolute, no `.` or `..`, no empty components, no NUL, strictly
/// below `root` (the kubelet dir). Symlinks are decided later, on opened directory handles.
pub fn check_target(volume: &str, field: &'static str, path: &str, root: &Path) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(Error::missing(field, volume));
    }
    let bad = |reason: &str| Err(Error::bad_path(volume, path, format!("{field} {reason}")));
    if path.len() > PATH_MAX {
        return bad("is longer than PATH_MAX");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return bad("must not be /");
    }
    if trimmed[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("must be normalized (no empty, . or .. components)");
    }
    let p = PathBuf::from(trimmed);
    match p.strip_prefix(root) {
        Ok(rest) if rest.components().next().is_some() => Ok(p),
        _ => bad(&format!("must be below the kubelet dir {}", root.display())),
    }
}

/// The last component of a checked path. Checked paths always have one.
pub fn file_name(path: &Path) -> &std::ffi::OsStr {
    match path.components().next_back() {
        Some(Component::Normal(name)) => name,
        _ => unreachable!("check_target only returns paths that end in a normal component"),
    }
}

/// Access modes a node-local cache serves. Every node has its own copy, so writers on different
/// nodes never meet; the two single-node-single-writer modes need a capability we do not claim.
fn mode_supported(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SINGLE_NODE_WRITER
            | Mode::SINGLE_NODE_READER_ONLY
            | Mode::MULTI_NODE_READER_ONLY
            | Mode::MULTI_NODE_SINGLE_WRITER
            | Mode::MULTI_NODE_MULTI_WRITER
    )
}

/// Checks one capability: a mount volume (never block), a supported access mode, and only the
/// mount flags a bind mount can honour. Returns those flags, read-only included when the mode
/// or the flags ask for it.
pub fn check_capability(volume: &str, cap: &VolumeCapability) -> Result<BindFlags> {
    let mount = match &cap.access_type {
        Some(Access_type::Mount(m)) => m,
        Some(Access_type::Block(_)) => {
            return Err(Error::unsupported(volume, "access type block (only mount volumes)"))
        }
        None => return Err(Error::missing("volume_capability.access_type", volume)),
    };
    let mode = match cap.access_mode.as_ref().map(|m| m.mode.enum_value()) {
        None => return Err(Error::missing("volume_capability.access_mode", volume)),
        Some(Ok(mode)) => mode,
        Some(Err(n)) => return Err(Error::unsupported(volume, format!("access mode {n}"))),
    };
    if !mode_supported(mode) {
        return Err(Error::unsupported(volume, format!("access mode {mode:?}")));
    }
    let mut flags = BindFlags {
        read_only: matches!(mode, Mode::SINGLE_NODE_READER_ONLY | Mode::MULTI_NODE_READER_ONLY),
        ..BindFlags::default()
    };
    for flag in &mount.mount_flags {
        match flag.as_str() {
            "ro" => flags.read_only = true,
            "rw" | "defaults" => {}
            "nosuid" => flags.nosuid = true,
            "nodev" => flags.nodev = true,
            "noexec" => flags.noexec = true,
            other => {
                return Err(Error::unsupported(
                    volume,
                    format!("mount flag {other:?} (a bind mount takes ro, nosuid, nodev, noexec)"),
                ))
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpcio::RpcStatusCode;

    #[test]
    fn ids_are_stable_and_valid() {
        let a = id_for_name("pvc-1");
        assert_eq!(a, id_for_name("pvc-1"));
        assert_ne!(a, id_for_name("pvc-2"));
        assert_eq!(a.len(), ID_LEN);
        check_id(&a).unwrap();
    }

    #[test]
    fn malformed_ids_are_rejected() {
        let good = id_for_name("x");
        let upper = good.to_uppercase().replacen("NLC-", "nlc-", 1);
        let simple = format!("nlc-{}", good[4..].replace('-', ""));
        for bad in [
            "nlc-",
            "../etc",
            "nlc-../../etc/passwd-000000000000000000000",
            &upper,
            &simple,
            &format!("{good}x"),
            &format!("xyz{}", &good[3..]),
            &format!("nlc-{{{}}}", &good[4..]),
        ] {
            let err = check_id(bad).unwrap_err();
            assert_eq!(err.code(), RpcStatusCode::NOT_FOUND, "{bad}");
            assert!(err.to_string().contains(bad));
            let err = check_id_at(bad, "/k/pods/p/mount").unwrap_err();
            assert!(err.to_string().contains("/k/pods/p/mount"), "{err}");
        }
        assert!(matches!(check_id(""), Err(Error::MissingField { .. })));
    }

    /// The byte check accepts exactly what parsing the UUID and printing it back did.
    #[test]
    fn the_uuid_check_agrees_with_parsing_and_printing() {
        let by_parsing = |s: &str| Uuid::try_parse(s).is_ok_and(|u| u.hyphenated().to_string() == s);
        let good = id_for_name("y")[ID_PREFIX.len()..].to_owned();
        let mut cases = vec![
            good.clone(),
            good.to_uppercase(),
            good.replace('-', ""),
            format!("{{{good}}}"),
            format!("urn:uuid:{good}"),
            "00000000-0000-0000-0000-000000000000".to_owned(),
            "ffffffff-ffff-ffff-ffff-ffffffffffff".to_owned(),
        ];
        // Every byte position of a good id, replaced by each byte that matters to the check.
        for i in 0..good.len() {
            for b in [b'-', b'0', b'9', b'a', b'f', b'g', b'A', b'F', b'/', b'.', b' ', 0xc3] {
                let mut v = good.clone().into_bytes();
                v[i] = b;
                if let Ok(s) = String::from_utf8(v) {
                    cases.push(s);
                }
            }
        }
        for c in &cases {
            assert_eq!(is_hyphenated_uuid(c), by_parsing(c), "{c:?}");
        }
    }

    fn cap(mode: Mode, block: bool, flags: &[&str]) -> VolumeCapability {
        let mut c = VolumeCapability::new();
        if block {
            c.set_block(Default::default());
        } else {
            let mut m = crate::proto::csi::volume_capability::MountVolume::new();
            m.mount_flags = flags.iter().map(|s| s.to_string()).collect();
            c.set_mount(m);
        }
        let mut am = crate::proto::csi::volume_capability::AccessMode::new();
        am.mode = mode.into();
        c.access_mode = Some(am).into();
        c
    }

    #[test]
    fn capabilities() {
        assert_eq!(
            check_capability("v", &cap(Mode::MULTI_NODE_MULTI_WRITER, false, &[])).unwrap(),
            BindFlags::default()
        );
        let ro = check_capability("v", &cap(Mode::MULTI_NODE_READER_ONLY, false, &["noexec"])).unwrap();
        assert!(ro.read_only && ro.noexec && !ro.nosuid);
        assert!(
            check_capability("v", &cap(Mode::SINGLE_NODE_WRITER, false, &["ro"]))
                .unwrap()
                .read_only
        );
        for bad in [
            cap(Mode::SINGLE_NODE_WRITER, true, &[]),
            cap(Mode::UNKNOWN, false, &[]),
            cap(Mode::SINGLE_NODE_SINGLE_WRITER, false, &[]),
            cap(Mode::SINGLE_NODE_WRITER, false, &["uid=0"]),
            VolumeCapability::new(),
        ] {
            let e = check_capability("nlc-v", &bad).unwrap_err();
            assert_eq!(e.code(), RpcStatusCode::INVALID_ARGUMENT, "{e}");
            assert!(e.to_string().contains("nlc-v"));
        }
    }

    #[test]
    fn targets_must_be_absolute_normal_and_below_root() {
        let root = Path::new("/var/lib/kubelet");
        let ok = check_target("v", "target_path", "/var/lib/kubelet/pods/u/volumes/x/mount/", root).unwrap();
        assert_eq!(ok, Path::new("/var/lib/kubelet/pods/u/volumes/x/mount"));
        assert_eq!(file_name(&ok), "mount");
        for bad in [
            "relative/path",
            "/var/lib/kubelet/../etc",
            "/var/lib/kubelet/pods/./x",
            "/var/lib/kubelet//pods",
            "/var/lib/kubelet",
            "/var/lib/kubeletX/pods",
            "/etc/passwd",
            "/",
            "/var/lib/kubelet/a\0b",
        ] {
            let err = check_target("v", "target_path", bad, root).unwrap_err();
            assert_eq!(err.code(), RpcStatusCode::INVALID_ARGUMENT, "{bad:?}");
        }
        assert!(matches!(
            check_target("v", "target_path", "", root),
            Err(Error::MissingField { .. })
        ));
    }
}
