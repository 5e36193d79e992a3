//! Generated hostile input for the code that decides on strings alone: volume ids, request paths
//! and mountinfo lines. Over a million cases from a seeded generator (set `NLC_HOSTILE_SEED` to
//! explore other streams); every case must be decided without a panic, and each decision is
//! checked against the property it promises, not just survived.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use grpcio::RpcStatusCode;
use node_local_cache::error::Error;
use node_local_cache::mounts::{self, MountEntry};
use node_local_cache::volume;

/// Cases per property. The sum is what the issue asks for: at least a million.
const ID_CASES: usize = 500_000;
const TARGET_CASES: usize = 800_000;
const LINE_CASES: usize = 300_000;
const UNESCAPE_CASES: usize = 400_000;
const _: () = assert!(ID_CASES + TARGET_CASES + LINE_CASES + LINE_CASES / 10 + UNESCAPE_CASES >= 1_000_000);

/// splitmix64: small, fast and good enough to drive generators; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn new(stream: u64) -> Rng {
        let seed = std::env::var("NLC_HOSTILE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6e6c_635f_6675_7a7a);
        Rng(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let n = self.below(max_len + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Any Unicode scalar, weighted towards ASCII and the characters that matter to paths.
    fn char(&mut self) -> char {
        match self.below(8) {
            0 => *self.pick(&[&'/', &'.', &'\0', &'-', &'\\', &' ', &'\n']),
            1..=4 => (b' ' + self.below(95) as u8) as char,
            5 => *self.pick(&[
                &'é',
                &'ß',
                &'Ａ',
                &'／',
                &'．',
                &'\u{2215}',
                &'\u{200b}',
                &'\u{fffd}',
                &'😀',
            ]),
            _ => loop {
                if let Some(c) = char::from_u32(self.below(0x11_0000) as u32) {
                    break c;
                }
            },
        }
    }

    fn string(&mut self, max_len: usize) -> String {
        let n = self.below(max_len + 1);
        (0..n).map(|_| self.char()).collect()
    }
}

/// What a volume id must look like, written independently of `check_id`: `nlc-` and a lowercase
/// hyphenated UUID (8-4-4-4-12 hex digits).
fn is_canonical_id(id: &str) -> bool {
    let b = id.as_bytes();
    if b.len() != 40 || !id.starts_with("nlc-") {
        return false;
    }
    b[4..].iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == b'-',
        _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
    })
}

fn random_id(rng: &mut Rng) -> String {
    const HEX: &[u8] = b"0123456789abcdef";
    let mut s = String::from("nlc-");
    for i in 0..36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            s.push('-');
        } else {
            s.push(HEX[rng.below(16)] as char);
        }
    }
    s
}

/// A valid id bent slightly out of shape, the way a typo, a careless client or an attacker would.
fn near_miss_id(rng: &mut Rng) -> String {
    let mut id = if rng.chance(2) {
        volume::id_for_name(&rng.string(12))
    } else {
        random_id(rng)
    };
    for _ in 0..1 + rng.below(3) {
        let mut chars: Vec<char> = id.chars().collect();
        let at = rng.below(chars.len() + 1);
        match rng.below(12) {
            0 => id = id.to_uppercase(),
            1 => {
                if at < chars.len() {
                    chars[at] = if chars[at].is_ascii_lowercase() {
                        chars[at].to_ascii_uppercase()
                    } else {
                        chars[at].to_ascii_lowercase()
                    };
                }
                id = chars.into_iter().collect();
            }
            2 => id = id.replacen('-', "", 1 + rng.below(5)),
            3 => {
                chars.insert(at, rng.char());
                id = chars.into_iter().collect();
            }
            4 => {
                if at < chars.len() {
                    chars.remove(at);
                }
                id = chars.into_iter().collect();
            }
            5 => {
                if at < chars.len() {
                    chars[at] = rng.char();
                }
                id = chars.into_iter().collect();
            }
            6 => id = format!("{}{}", id, rng.pick(&["..", "/", "\0", "/..", "x", " ", "\n", "é"])),
            7 => {
                id = format!(
                    "{}{}",
                    rng.pick(&["..", "/", "../", "./", "\0", " ", "NLC-", "nlc-"]),
                    id
                )
            }
            8 => id = format!("nlc-{{{}}}", id.get(4..).unwrap_or("")),
            9 => id = format!("nlc-urn:uuid:{}", id.get(4..).unwrap_or("")),
            10 => {
                // The same length with a path separator or dots in the UUID part.
                if chars.len() > 5 {
                    let i = 4 + rng.below(chars.len() - 4);
                    chars[i] = *rng.pick(&[&'/', &'.', &'\0', &'g', &'G', &'_']);
                }
                id = chars.into_iter().collect();
            }
            _ => id = id.replace('-', rng.pick(&["_", "", "--", "‐"])),
        }
    }
    id
}

#[test]
fn volume_ids_accept_exactly_the_canonical_form() {
    let mut rng = Rng::new(1);
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for case in 0..ID_CASES {
        let id = match case % 5 {
            0 => String::from_utf8_lossy(&rng.bytes(48)).into_owned(),
            1 => rng.string(44),
            2 => random_id(&mut rng),
            _ => near_miss_id(&mut rng),
        };
        let got = volume::check_id(&id);
        let want = is_canonical_id(&id);
        assert_eq!(got.is_ok(), want, "case {case}: check_id({id:?}) = {got:?}");
        match got {
            Ok(()) => {
                accepted += 1;
                // An accepted id is always one plain path component.
                let mut parts = Path::new(&id).components();
                assert_eq!(parts.next(), Some(Component::Normal(OsStr::new(&id))), "{id:?}");
                assert_eq!(parts.next(), None, "{id:?}");
            }
            Err(e) => {
                rejected += 1;
                let want = if id.is_empty() {
                    RpcStatusCode::INVALID_ARGUMENT
                } else {
                    RpcStatusCode::NOT_FOUND
                };
                assert_eq!(e.code(), want, "{id:?}: {e}");
                assert_eq!(id.is_empty(), matches!(e, Error::MissingField { .. }), "{id:?}: {e}");
            }
        }
    }
    // Every id CreateVolume can hand out passes.
    for i in 0..1000 {
        volume::check_id(&volume::id_for_name(&format!("pvc-{i}"))).unwrap();
    }
    println!("check_id: {ID_CASES} cases, {accepted} accepted, {rejected} rejected");
    assert!(
        accepted > ID_CASES / 10 && rejected > ID_CASES / 2,
        "the generator lost its spread"
    );
}

/// Roots a kubelet dir may be given as; the trailing-slash form must behave like the other.
const ROOTS: [&str; 4] = ["/var/lib/kubelet", "/var/lib/kubelet/", "/k", "/tmp/nlc root/kubelet"];

/// A request path assembled from the pieces that break path checks.
fn hostile_path(rng: &mut Rng, root: &str) -> String {
    let root = root.trim_end_matches('/');
    let mut p = String::new();
    match rng.below(10) {
        0 => {}
        1 => p.push_str(&rng.string(6)),
        2 => {
            // The root as a bare string prefix, with no slash at the boundary.
            p.push_str(root);
            p.push_str(rng.pick(&["X", "-", ".", "..", "_old", "\0", " "]));
        }
        3 => p.push_str(rng.pick(&["/", "//", "/.", "/..", "./", "../"])),
        4 => p.push_str(&root.replacen('/', "//", 1)),
        5 => p.push_str(&root.to_uppercase()),
        _ => p.push_str(root),
    }
    let long = "a".repeat(255);
    let longer = "b".repeat(1 + rng.below(4200));
    for _ in 0..rng.below(7) {
        let sep = if rng.chance(12) { "" } else { "/" };
        p.push_str(sep);
        let piece = match rng.below(14) {
            0 => "..".to_owned(),
            1 => ".".to_owned(),
            2 => String::new(),
            3 => "/".to_owned(),
            4 => "\0".to_owned(),
            5 => long.clone(),
            6 if rng.chance(8) => longer.clone(),
            7 => rng.string(5),
            8 => rng
                .pick(&["...", ". .", "..\u{200b}", "．．", "a\\b", "a b", "\n"])
                .to_owned(),
            _ => rng
                .pick(&["pods", "a", "mount", "volumes", "kubernetes.io~csi", "pv"])
                .to_owned(),
        };
        p.push_str(&piece);
    }
    if rng.chance(6) {
        p.push_str(rng.pick(&["/", "//", "/.", "/..", "\0"]));
    }
    p
}

/// A path that must be accepted: the root, one to five ordinary names (any characters but `/`
/// and NUL, never `.` or `..`), maybe trailing slashes.
fn good_path(rng: &mut Rng, root: &str) -> String {
    let mut p = root.trim_end_matches('/').to_owned();
    for _ in 0..1 + rng.below(5) {
        p.push('/');
        loop {
            let name: String = (0..1 + rng.below(12))
                .map(|_| rng.char())
                .filter(|&c| c != '/' && c != '\0')
                .collect();
            if !name.is_empty() && name != "." && name != ".." {
                p.push_str(&name);
                break;
            }
        }
    }
    for _ in 0..rng.below(3) {
        p.push('/');
    }
    p
}

/// Properties of an accepted target: absolute, normalized, no NUL, strictly below `root`, the
/// request's own string minus trailing slashes, and within PATH_MAX.
fn check_accepted(path: &str, root: &Path, got: &Path) {
    let s = got.as_os_str().as_bytes();
    assert!(got.is_absolute(), "{path:?} -> {got:?}");
    assert!(!s.contains(&0), "{path:?} -> {got:?}");
    assert!(s.len() < 4096, "{path:?} longer than PATH_MAX");
    assert_eq!(s, path.trim_end_matches('/').as_bytes(), "{path:?} -> {got:?}");
    // Byte by byte: no component may be empty, `.` or `..` (Path::components hides some of them).
    assert!(
        s[1..]
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".."),
        "{path:?} -> {got:?} is not normalized"
    );
    let root_s = root.as_os_str().as_bytes();
    let root_s = root_s.strip_suffix(b"/").unwrap_or(root_s);
    assert!(
        s.len() > root_s.len() + 1 && s.starts_with(root_s) && s[root_s.len()] == b'/',
        "{path:?} -> {got:?} is not strictly below {root:?}"
    );
    assert!(
        got.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{path:?} -> {got:?}"
    );
    // A target's last component is what the driver creates and mounts on.
    let name = volume::file_name(got);
    assert!(name != "." && name != ".." && !name.is_empty());
}

#[test]
fn target_paths_accepted_are_normal_and_strictly_below_the_root() {
    let mut rng = Rng::new(2);
    let (mut accepted, mut rejected, mut missing) = (0usize, 0usize, 0usize);
    for case in 0..TARGET_CASES {
        let root_s = ROOTS[rng.below(ROOTS.len())];
        let root = Path::new(root_s);
        let must_accept = case % 10 == 1;
        let path = if must_accept {
            good_path(&mut rng, root_s)
        } else if case % 50 == 0 {
            String::from_utf8_lossy(&rng.bytes(64)).into_owned()
        } else {
            hostile_path(&mut rng, root_s)
        };
        let field = if rng.chance(2) { "target_path" } else { "volume_path" };
        let got = volume::check_target("nlc-v", field, &path, root);
        assert!(!must_accept || got.is_ok(), "{path:?} below {root:?} refused: {got:?}");
        match got {
            Ok(got) => {
                accepted += 1;
                check_accepted(&path, root, &got);
            }
            Err(e) => {
                assert_eq!(e.code(), RpcStatusCode::INVALID_ARGUMENT, "{path:?}: {e}");
                if path.is_empty() {
                    missing += 1;
                    assert!(matches!(e, Error::MissingField { .. }), "{e}");
                } else {
                    rejected += 1;
                    let text = e.to_string();
                    assert!(text.contains("nlc-v") && text.contains(field), "{path:?}: {text}");
                }
            }
        }
    }
    println!("check_target: {TARGET_CASES} cases, {accepted} accepted, {rejected} rejected, {missing} empty");
    assert!(
        accepted > TARGET_CASES / 20 && rejected > TARGET_CASES / 2,
        "the generator lost its spread"
    );
}

/// What the kernel does to a path or name in mountinfo: space, tab, newline and backslash as
/// three-digit octal escapes, every other byte as is.
fn kernel_escape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for &b in raw {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

/// Bytes that are hard on an unescaper: escape-like runs, lone backslashes, separators.
fn awkward_bytes(rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..rng.below(max_len + 1) {
        match rng.below(6) {
            0 => v.extend_from_slice(rng.pick::<[u8]>(&[b"\\", b"\\0", b"\\04", b"\\040", b"\\777", b"\\400"])),
            1 => v.push(*rng.pick(&[&b' ', &b'\t', &b'\n', &b'\\', &b'/', &b'-'])),
            2 => v.push(b'0' + rng.below(10) as u8),
            3 => v.push(rng.next() as u8),
            _ => v.push(b'a' + rng.below(26) as u8),
        }
    }
    v
}

#[test]
fn unescape_inverts_the_kernel_escaping_and_never_panics() {
    let mut rng = Rng::new(3);
    let half = UNESCAPE_CASES / 2;
    for case in 0..half {
        let raw = if case % 2 == 0 {
            rng.bytes(40)
        } else {
            awkward_bytes(&mut rng, 24)
        };
        let escaped = kernel_escape(&raw);
        assert!(!escaped.iter().any(|b| matches!(b, b' ' | b'\t' | b'\n')));
        assert_eq!(
            mounts::unescape(&escaped).as_bytes(),
            raw.as_slice(),
            "escaped {:?}",
            String::from_utf8_lossy(&escaped)
        );
    }
    for case in 0..UNESCAPE_CASES - half {
        let input = if case % 2 == 0 {
            rng.bytes(40)
        } else {
            awkward_bytes(&mut rng, 24)
        };
        let out = mounts::unescape(&input);
        // An escape is four bytes for one, so the output is never longer than the input, and
        // shorter only by whole escapes; input without a backslash passes through unchanged.
        let out = out.as_bytes();
        assert!(
            out.len() <= input.len() && (input.len() - out.len()) % 3 == 0,
            "{input:?}"
        );
        if !input.contains(&b'\\') {
            assert_eq!(out, input.as_slice());
        }
    }
    println!("unescape: {UNESCAPE_CASES} cases ({half} kernel-escaped round trips)");
}

/// A mountinfo line as the kernel writes it, and the entry it stands for.
fn random_line(rng: &mut Rng) -> (Vec<u8>, MountEntry) {
    let path = |rng: &mut Rng| {
        let mut p = b"/".to_vec();
        if !rng.chance(8) {
            p.extend(awkward_bytes(rng, 16));
        }
        p
    };
    // Namespace files (nsfs) show a root that is not a path.
    let root = if rng.chance(6) {
        format!("net:[{}]", rng.next() % 10_000_000_000).into_bytes()
    } else {
        path(rng)
    };
    let mount_point = path(rng);
    let options = [
        "rw",
        "ro",
        "rw,relatime",
        "ro,nosuid,nodev,noexec,relatime",
        "rw,noatime",
    ][rng.below(5)];
    let fs_type = if rng.chance(10) {
        String::from_utf8_lossy(&awkward_bytes(rng, 6)).into_owned()
    } else {
        rng.pick(&["ext4", "xfs", "tmpfs", "fuse.sshfs", "overlay"]).to_owned()
    };
    let source = if rng.chance(4) {
        rng.string(10).replace('\0', "")
    } else {
        rng.pick(&["/dev/sda1", "tmpfs", "none", "overlay", "server:/export dir"])
            .to_owned()
    };
    let entry = MountEntry {
        id: rng.next() % 100_000,
        parent: rng.next() % 100_000,
        dev: (rng.next() as u32 % 4096, rng.next() as u32),
        root: std::path::PathBuf::from(OsStr::from_bytes(&root)),
        mount_point: std::path::PathBuf::from(OsStr::from_bytes(&mount_point)),
        options: options.to_owned(),
        fs_type,
        source,
    };
    let mut line = format!("{} {} {}:{} ", entry.id, entry.parent, entry.dev.0, entry.dev.1).into_bytes();
    line.extend(kernel_escape(&root));
    line.push(b' ');
    line.extend(kernel_escape(&mount_point));
    line.push(b' ');
    line.extend_from_slice(entry.options.as_bytes());
    for _ in 0..rng.below(4) {
        line.extend_from_slice(
            rng.pick::<str>(&[" shared:1", " master:7", " propagate_from:2", " unbindable"])
                .as_bytes(),
        );
    }
    line.extend_from_slice(b" - ");
    line.extend(kernel_escape(entry.fs_type.as_bytes()));
    line.push(b' ');
    line.extend(kernel_escape(entry.source.as_bytes()));
    line.push(b' ');
    line.extend_from_slice(
        rng.pick::<str>(&["rw", "rw,seclabel", "ro,size=1024k,mode=755"])
            .as_bytes(),
    );
    (line, entry)
}

fn insert(line: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let tail = line.split_off(at);
    line.extend_from_slice(bytes);
    line.extend(tail);
}

/// A line damaged the way a truncated read, a fuzzer or a future kernel format would damage it.
fn mutate(rng: &mut Rng, line: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(line.len() + 1);
        match rng.below(9) {
            0 => line.truncate(at),
            1 => line.insert(at, rng.next() as u8),
            2 => {
                if at < line.len() {
                    line.remove(at);
                }
            }
            3 => {
                if at < line.len() {
                    line[at] = rng.next() as u8;
                }
            }
            4 => line.insert(at, b' '),
            5 => insert(line, at, b" - "),
            6 => insert(line, at, b"\\"),
            7 => insert(line, at, b"99999999999999999999999"),
            _ => {
                // A field dropped whole.
                let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
                let drop_at = rng.below(fields.len());
                *line = fields
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != drop_at)
                    .map(|(_, f)| f.to_vec())
                    .collect::<Vec<_>>()
                    .join(&b' ');
            }
        }
    }
}

#[test]
fn mountinfo_lines_round_trip_and_damaged_ones_never_panic() {
    let mut rng = Rng::new(4);
    let (mut valid, mut damaged, mut still_parsed) = (0usize, 0usize, 0usize);
    let mut case = 0;
    while case < LINE_CASES {
        // A table of a few lines; some of them damaged.
        let n = 1 + rng.below(6);
        let mut raw = Vec::new();
        let mut expect = Vec::new();
        for _ in 0..n {
            let (mut line, entry) = random_line(&mut rng);
            if rng.chance(2) {
                valid += 1;
                expect.push(entry);
            } else {
                damaged += 1;
                mutate(&mut rng, &mut line);
                // What still parses of it (several lines, when a newline was inserted); the rest
                // is skipped and must not take the other lines with it.
                let entries = mounts::parse(&line);
                if !entries.is_empty() {
                    still_parsed += 1;
                }
                for e in &entries {
                    assert!(e.mount_point.is_absolute(), "{e:?}");
                }
                expect.extend(entries);
            }
            raw.extend_from_slice(&line);
            raw.push(b'\n');
            case += 1;
        }
        assert_eq!(mounts::parse(&raw), expect, "{}", String::from_utf8_lossy(&raw));
    }
    // Whole tables of random bytes, and lines of random fields.
    for _ in 0..LINE_CASES / 10 {
        let raw = rng.bytes(200);
        assert!(mounts::parse(&raw).iter().all(|e| e.mount_point.is_absolute()));
    }
    let total = case + LINE_CASES / 10;
    println!(
        "mounts::parse: {total} lines ({valid} valid round trips, {damaged} damaged of which {still_parsed} still parsed, {} random tables)",
        LINE_CASES / 10
    );
    assert!(valid > LINE_CASES / 3 && damaged > LINE_CASES / 3);
}
