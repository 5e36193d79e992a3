//! Day two on production nodes, with the real binary: base dirs on filesystems mounted
//! `nosuid`, `nodev`, `noexec`, `noatime` (hardened hosts) or read-only, and kubelet's own call
//! sequences around restarts, where every repeat of a call must answer OK.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use grpcio::RpcStatusCode;
use nix::mount::MsFlags;
use node_local_cache::proto::csi::volume_capability::access_mode::Mode;

/// Puts a fresh tmpfs with `flags` on the tree's base dir, as a hardened host mounts `/var` or a
/// dedicated cache disk. The tree's drop unmounts it.
fn hardened_base(tree: &Tree, flags: MsFlags) {
    nix::mount::mount(
        Some("tmpfs"),
        &tree.base(),
        Some("tmpfs"),
        flags,
        Some("size=16m,mode=0700"),
    )
    .unwrap();
}

fn with_flags(
    mut req: node_local_cache::proto::csi::NodePublishVolumeRequest,
    flags: &[&str],
) -> node_local_cache::proto::csi::NodePublishVolumeRequest {
    req.volume_capability = Some(mount_cap(Mode::MULTI_NODE_MULTI_WRITER, flags)).into();
    req
}

const HARDENED: [(&str, MsFlags); 6] = [
    ("nosuid", MsFlags::MS_NOSUID),
    ("nodev", MsFlags::MS_NODEV),
    ("noexec", MsFlags::MS_NOEXEC),
    ("noatime", MsFlags::MS_NOATIME),
    ("nosuid,nodev", MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV)),
    (
        "nosuid,nodev,noexec,noatime",
        MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC)
            .union(MsFlags::MS_NOATIME),
    ),
];

/// kubelet repeats NodePublishVolume with the same arguments after every restart: on a base dir
/// whose filesystem carries restrictions, the bind inherits them, and the repeat must still be OK
/// (it was ALREADY_EXISTS: "already published with options rw,nosuid,nodev,relatime, not rw").
#[test]
fn repeated_publishes_on_hardened_base_dirs_answer_ok() {
    for (name, flags) in HARDENED {
        let tree = Tree::new("hardened");
        hardened_base(&tree, flags);
        let d = Driver::node(&tree, "node-a", &[]);
        let n = d.node_client();
        let vol = volume_id("pvc-hardened");
        let rw = tree.target("rw");
        let ro = tree.target("ro");
        let noexec = tree.target("noexec");
        let requests = [
            publish_req(&vol, &rw, false),
            publish_req(&vol, &ro, true),
            with_flags(publish_req(&vol, &noexec, false), &["noexec", "nosuid"]),
        ];
        for req in &requests {
            for attempt in 1..=3 {
                n.node_publish_volume_opt(req, opt())
                    .unwrap_or_else(|e| panic!("base {name}: publish at {} attempt {attempt}: {e:?}", req.target_path));
            }
            assert_eq!(
                mounted_at(Path::new(&req.target_path)),
                1,
                "base {name}: {}",
                req.target_path
            );
        }
        // What was asked for holds: the read-only one refuses writes, the others take them.
        fs::write(rw.join("f"), b"x").unwrap();
        let err = fs::write(ro.join("g"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "base {name}");
        // Real conflicts stay conflicts, in both directions.
        for (target, readonly) in [(&rw, true), (&ro, false)] {
            let (c, msg) = code(n.node_publish_volume(&publish_req(&vol, target, readonly)));
            assert_eq!(c, RpcStatusCode::ALREADY_EXISTS, "base {name}: {msg}");
            assert!(msg.contains(&vol) && msg.contains(target.to_str().unwrap()), "{msg}");
        }
        // kubelet polls stats every minute per volume; repeats are plain OK too.
        for _ in 0..2 {
            n.node_get_volume_stats(&stats_req(&vol, &rw)).unwrap();
        }
        for req in &requests {
            for _ in 0..2 {
                n.node_unpublish_volume(&unpublish_req(&vol, Path::new(&req.target_path)))
                    .unwrap();
            }
            assert_eq!(mounted_at(Path::new(&req.target_path)), 0, "base {name}");
            assert!(!Path::new(&req.target_path).exists(), "base {name}");
        }
        assert_eq!(
            fs::read(tree.base().join(&vol).join("f")).unwrap(),
            b"x",
            "base {name}: data kept"
        );
    }
}

/// A restriction asked for that the existing mount lacks is a real conflict.
#[test]
fn a_missing_requested_flag_is_a_conflict() {
    let tree = Tree::new("flag-conflict");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-flag-conflict");
    let target = tree.target("pod");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    let (c, msg) = code(n.node_publish_volume(&with_flags(publish_req(&vol, &target, false), &["noexec"])));
    assert_eq!(c, RpcStatusCode::ALREADY_EXISTS, "{msg}");
    assert!(msg.contains("noexec"), "{msg}");
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    assert_eq!(mounted_at(&target), 0);
}

/// A restriction an earlier publish asked for, which the base dir's filesystem does not carry, is
/// not what a publish without it asks for (a PV's `mountOptions` edited while its pods run): the
/// repeat is a conflict, not an OK over a mount the pod did not ask for. Restrictions the base
/// gives every bind stay fine (`repeated_publishes_on_hardened_base_dirs_answer_ok`).
#[test]
fn a_restriction_the_publish_does_not_ask_for_is_a_conflict() {
    let tree = Tree::new("extra-flag");
    hardened_base(&tree, MsFlags::MS_NOSUID);
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-extra-flag");
    let target = tree.target("pod");
    let first = with_flags(publish_req(&vol, &target, false), &["noexec", "nodev"]);
    n.node_publish_volume(&first).unwrap();
    // The base's own nosuid is never named as the conflict.
    for (asked, unasked) in [
        (&[][..], "nodev,noexec"),
        (&["noexec"][..], "nodev"),
        (&["nodev", "nosuid"][..], "noexec"),
    ] {
        let (c, msg) = code(n.node_publish_volume(&with_flags(publish_req(&vol, &target, false), asked)));
        assert_eq!(c, RpcStatusCode::ALREADY_EXISTS, "asked {asked:?}: {msg}");
        assert!(msg.contains(&vol) && msg.contains(target.to_str().unwrap()), "{msg}");
        assert!(
            msg.contains(&format!(": {unasked} asked for by an earlier publish")),
            "{msg}"
        );
    }
    // The same flags again, and with the base's restriction spelled out, are plain repeats.
    n.node_publish_volume(&first).unwrap();
    n.node_publish_volume(&with_flags(
        publish_req(&vol, &target, false),
        &["noexec", "nodev", "nosuid"],
    ))
    .unwrap();
    assert_eq!(mounted_at(&target), 1);
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    assert_eq!(mounted_at(&target), 0);
}

/// A base dir whose filesystem went read-only (a disk remounted `ro` after errors, or a read-only
/// bind): a read-write publish is refused with FAILED_PRECONDITION and leaves nothing behind,
/// instead of handing the pod a read-only volume that every later repeat would conflict with.
#[test]
fn a_read_only_base_refuses_read_write_publishes_and_serves_read_only_ones() {
    let remounts = [
        ("remount,ro", MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY),
        (
            "remount,bind,ro",
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        ),
    ];
    for (name, remount) in remounts {
        let tree = Tree::new("ro-base");
        hardened_base(&tree, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        let d = Driver::node(&tree, "node-a", &[]);
        let n = d.node_client();
        let vol = volume_id("pvc-ro-base");
        let first = tree.target("first");
        n.node_publish_volume(&publish_req(&vol, &first, false)).unwrap();
        fs::write(first.join("kept"), b"x").unwrap();
        n.node_unpublish_volume(&unpublish_req(&vol, &first)).unwrap();
        nix::mount::mount(
            None::<&str>,
            &tree.base(),
            None::<&str>,
            remount | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .unwrap();

        let rw = tree.target("rw");
        for _ in 0..2 {
            let (c, msg) = code(n.node_publish_volume(&publish_req(&vol, &rw, false)));
            assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{name}: {msg}");
            assert!(msg.contains(&vol) && msg.contains("read-only"), "{name}: {msg}");
            assert_eq!(mounted_at(&rw), 0, "{name}: no mount left behind");
            assert!(!rw.exists(), "{name}: the target dir it made is gone");
        }
        // A read-write publish that asks for a restriction as well: the bind must not lose the
        // base's read-only on the way to gaining the restriction.
        let restricted = tree.target("rw-noexec");
        for _ in 0..2 {
            let req = with_flags(publish_req(&vol, &restricted, false), &["noexec"]);
            let (c, msg) = code(n.node_publish_volume(&req));
            assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{name}: {msg}");
            assert!(msg.contains(&vol) && msg.contains("read-only"), "{name}: {msg}");
            assert_eq!(mounted_at(&restricted), 0, "{name}: no mount left behind");
            assert!(!restricted.exists(), "{name}: the target dir it made is gone");
        }
        let ro = tree.target("ro");
        for _ in 0..2 {
            n.node_publish_volume(&publish_req(&vol, &ro, true))
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        assert_eq!(mounted_at(&ro), 1);
        assert_eq!(fs::read(ro.join("kept")).unwrap(), b"x", "{name}");
        n.node_unpublish_volume(&unpublish_req(&vol, &ro)).unwrap();
        assert_eq!(mounted_at(&ro), 0, "{name}");
    }
}

/// What kubelet does around its own restart and the plugin's, on a `nosuid,nodev` base dir:
/// publish; the plugin restarts; kubelet restarts and publishes again with the same arguments
/// (OK, still one mount); stats every minute; unpublish of the volume it reconstructed from disk
/// (OK, nothing left); a repeated unpublish (OK).
#[test]
fn kubelet_and_plugin_restarts_on_a_hardened_base() {
    let tree = Tree::new("restart-hardened");
    hardened_base(&tree, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
    let vol = volume_id("pvc-restart-hardened");
    let target = tree.target("pod");
    let req = publish_req(&vol, &target, false);

    let mut d = Driver::node(&tree, "node-a", &[]);
    d.node_client().node_publish_volume(&req).unwrap();
    fs::write(target.join("build-cache"), b"warm").unwrap();
    assert!(d.terminate().success());

    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    n.node_publish_volume(&req).unwrap();
    assert_eq!(mounted_at(&target), 1, "the repeat made no second mount");
    let stats = n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    assert!(!stats.volume_condition.abnormal, "{}", stats.volume_condition.message);
    assert_eq!(fs::read(target.join("build-cache")).unwrap(), b"warm");
    for _ in 0..2 {
        n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    }
    assert_eq!(mounted_at(&target), 0);
    assert!(!target.exists());
    assert_eq!(fs::read(tree.base().join(&vol).join("build-cache")).unwrap(), b"warm");
}

/// Every node with CNI has namespace files bind-mounted (`/run/netns/cni-…`), whose mountinfo root
/// is `net:[…]`, not a path. One such line made the whole table unreadable: publish answered
/// INTERNAL ("read /proc/self/mountinfo failed: Invalid argument") and no copy was ever deleted.
#[test]
fn a_network_namespace_mount_does_not_break_the_mount_table() {
    let tree = Tree::new("nsfs");
    let netns = tree.root.join("cni-netns");
    fs::write(&netns, b"").unwrap();
    nix::mount::mount(
        Some("/proc/self/ns/net"),
        &netns,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    assert!(
        tree.mounts()
            .iter()
            .any(|m| m.fs_type == "nsfs" && !m.root.is_absolute()),
        "the table shows the namespace file with its non-path root"
    );
    let d = Driver::node(&tree, "node-a", &["--data-on-unpublish=delete"]);
    let n = d.node_client();
    let vol = volume_id("pvc-nsfs");
    let target = tree.target("pod");
    for _ in 0..2 {
        n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    }
    n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    // Deleting the copy reads the table to prove nothing else mounts it.
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    assert_eq!(mounted_at(&target), 0);
    assert!(!tree.base().join(&vol).exists(), "the copy was deleted on unpublish");
    let log = d.log_text();
    assert!(!log.contains("Invalid argument"), "{log}");
}

/// A target something still has a file open in (a container's last process exiting, or any
/// process that forked while it had the file open) cannot be unmounted yet: that is for kubelet
/// to retry, so UNAVAILABLE, never FAILED_PRECONDITION; once the file is closed it unpublishes.
#[test]
fn a_busy_target_answers_unavailable_until_it_is_free() {
    let tree = Tree::new("busy");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-busy");
    let target = tree.target("pod");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    let open = fs::File::create(target.join("held-open")).unwrap();
    let (c, msg) = code(n.node_unpublish_volume(&unpublish_req(&vol, &target)));
    assert_eq!(c, RpcStatusCode::UNAVAILABLE, "{msg}");
    assert!(msg.contains(&vol) && msg.contains(target.to_str().unwrap()), "{msg}");
    assert_eq!(mounted_at(&target), 1, "still mounted, nothing lost");
    drop(open);
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    assert_eq!(mounted_at(&target), 0);
    assert!(tree.base().join(&vol).join("held-open").exists(), "data kept");
}

/// `--data-on-unpublish=delete` on a base dir that went read-only: the unmount works and the
/// target goes, but the copy cannot be deleted. The unpublish is done all the same (the copy
/// stays for a later pass); failing it made every retry of kubelet fail the same way, and the
/// pod never finished terminating.
#[test]
fn an_unpublish_whose_data_cannot_be_deleted_is_still_done() {
    let tree = Tree::new("ro-delete");
    hardened_base(&tree, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
    let d = Driver::node(&tree, "node-a", &["--data-on-unpublish=delete"]);
    let n = d.node_client();
    let vol = volume_id("pvc-ro-delete");
    let seed = tree.target("seed");
    n.node_publish_volume(&publish_req(&vol, &seed, false)).unwrap();
    fs::write(seed.join("kept"), b"x").unwrap();
    let ro = tree.target("ro");
    n.node_publish_volume(&publish_req(&vol, &ro, true)).unwrap();
    n.node_unpublish_volume(&unpublish_req(&vol, &seed)).unwrap();
    nix::mount::mount(
        None::<&str>,
        &tree.base(),
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .unwrap();
    for attempt in 0..2 {
        n.node_unpublish_volume(&unpublish_req(&vol, &ro))
            .unwrap_or_else(|e| panic!("unpublish {attempt}: {e:?}"));
        assert_eq!(mounted_at(&ro), 0);
        assert!(!ro.exists(), "the target dir is gone");
    }
    assert_eq!(
        fs::read(tree.base().join(&vol).join("kept")).unwrap(),
        b"x",
        "the copy stays for a later pass"
    );
}
