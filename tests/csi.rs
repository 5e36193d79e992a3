//! End-to-end: the real binary on a temporary socket, every RPC over that socket with grpcio,
//! real bind mounts in a temporary tree, and the mount table checked after each test.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::*;
use grpcio::RpcStatusCode;
use node_local_cache::proto::csi;
use node_local_cache::proto::csi::volume_capability::access_mode::Mode;

#[test]
fn identity_answers_in_both_modes() {
    let tree = Tree::new("identity");
    let ctl = Driver::controller(&tree, &[]);
    let node = Driver::node(&tree, "node-a", &[]);
    for d in [&ctl, &node] {
        for _ in 0..2 {
            let info = d.identity().get_plugin_info(&csi::GetPluginInfoRequest::new()).unwrap();
            assert_eq!(info.name, "node-local-cache.csi.io");
            assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
            let caps = d
                .identity()
                .get_plugin_capabilities(&csi::GetPluginCapabilitiesRequest::new())
                .unwrap();
            assert_eq!(caps.capabilities.len(), 1);
            assert_eq!(
                caps.capabilities[0].service().type_.enum_value(),
                Ok(csi::plugin_capability::service::Type::CONTROLLER_SERVICE)
            );
            let probe = d.identity().probe(&csi::ProbeRequest::new()).unwrap();
            assert!(probe.ready.value, "not ready");
        }
        // The binary configured gRPC's core with its own plugin set (src/grpc_plugins.rs).
        assert!(!d.log_text().contains("stock plugin set"), "log:\n{}", d.log_text());
    }
    tree.assert_no_mounts();
}

/// The node plugin never dials: its gRPC core is configured with a server's plugins only, so
/// the linker leaves the client channel out of the binary (src/grpc_plugins.rs). The client
/// channel's trace flags name themselves in the binary that has it, as csi-client does.
/// At `--log-level=debug` every request is logged, but never its `secrets`: neither the
/// controller's nor the node's (csi-provisioner and kubelet pass them on from the StorageClass).
#[test]
fn the_debug_log_shows_requests_without_their_secrets() {
    let tree = Tree::new("redact");
    // Drivers in tests run at --log-level=debug.
    let ctl = Driver::controller(&tree, &[]);
    let mut create = create_req("pvc-redact", 0);
    create.secrets.insert("password".into(), "create-hunter2".into());
    let id = ctl
        .controller_client()
        .create_volume(&create)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let mut validate = csi::ValidateVolumeCapabilitiesRequest::new();
    validate.volume_id = id.clone();
    validate.volume_capabilities.push(rw_cap());
    validate.secrets.insert("password".into(), "validate-hunter2".into());
    ctl.controller_client().validate_volume_capabilities(&validate).unwrap();

    let node = Driver::node(&tree, "node-a", &[]);
    let target = tree.target("pod");
    let mut publish = publish_req(&id, &target, false);
    publish.secrets.insert("password".into(), "publish-hunter2".into());
    node.node_client().node_publish_volume(&publish).unwrap();
    node.node_client()
        .node_unpublish_volume(&unpublish_req(&id, &target))
        .unwrap();

    for log in [ctl.log_text(), node.log_text()] {
        assert!(!log.contains("hunter2"), "a secret in the log:\n{log}");
    }
    let (ctl_log, node_log) = (ctl.log_text(), node.log_text());
    assert!(
        ctl_log.contains("CreateVolume request") && ctl_log.contains("pvc-redact"),
        "{ctl_log}"
    );
    assert!(
        node_log.contains("NodePublishVolume request") && node_log.contains(&id),
        "{node_log}"
    );
    tree.assert_no_mounts();
}

#[test]
fn the_node_plugin_carries_no_client_channel() {
    let node = fs::read(BIN).unwrap();
    let client = fs::read(env!("CARGO_BIN_EXE_csi-client")).unwrap();
    let has = |bin: &[u8], name: &str| bin.windows(name.len()).any(|w| w == name.as_bytes());
    for name in ["client_channel_lb_call", "retry_filter", "subchannel_pool"] {
        assert!(
            has(&client, name),
            "csi-client has no {name}: this check has gone stale"
        );
        assert!(
            !has(&node, name),
            "the node plugin links gRPC's client channel ({name})"
        );
    }
}

/// Every call passes each filter of the server's stack; src/grpc_plugins.rs keeps out the ones
/// a CSI Unix socket never needs (the call tracer and the auth filters) and the message-size
/// filter, whose check the handlers make themselves. The core names the
/// stack it builds for a connection when asked to trace it.
#[test]
fn a_call_passes_only_the_filters_it_needs() {
    let tree = Tree::new("filters");
    let trace = [("GRPC_TRACE", "channel_stack"), ("GRPC_VERBOSITY", "debug")];
    let node = Driver::node_with_env(&tree, "node-a", &[], &trace);
    assert!(node.identity().probe(&csi::ProbeRequest::new()).unwrap().ready.value);
    let log = node.log_text();
    let stack: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("CHANNEL_STACK: init SERVER_CHANNEL"))
        .skip(1)
        .map_while(|l| l.split("CHANNEL_STACK:   filter ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(
        stack,
        ["server", "deadline", "http-server", "compression", "connected"],
        "log:\n{log}"
    );
    tree.assert_no_mounts();
}

/// gRPC's 4 MiB receive limit holds without the message-size filter (src/grpc_plugins.rs leaves
/// it out; the compression filter checks the same limit): a bigger request is refused with
/// RESOURCE_EXHAUSTED and leaves nothing behind, and one just under the limit is served.
#[test]
fn a_request_over_the_receive_limit_is_refused() {
    let tree = Tree::new("oversize");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-big");
    let target = tree.target("pod1");

    let mut big = publish_req(&vol, &target, false);
    big.volume_context.insert("filler".into(), "x".repeat(5 << 20));
    let (c, msg) = code(n.node_publish_volume_opt(&big, opt()));
    assert_eq!(c, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("larger than max") && msg.contains("4194304"), "{msg}");
    assert!(!target.exists(), "a refused request made {}", target.display());
    assert!(!tree.base().join(&vol).exists());

    let mut under = publish_req(&vol, &target, false);
    under
        .volume_context
        .insert("filler".into(), "x".repeat((4 << 20) - 4096));
    n.node_publish_volume_opt(&under, opt()).unwrap();
    assert_eq!(mounted_at(&target), 1);
    n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), opt())
        .unwrap();
    tree.assert_no_mounts();
}

/// A node may link its kubelet dir elsewhere; kubelet then sends target paths through the link.
/// The mount lands at the real path (where mountinfo shows it), and repeats, stats and
/// unpublish find it there.
#[test]
fn targets_through_a_symlinked_kubelet_dir() {
    let tree = Tree::new("linked-kubelet");
    let linked = tree.root.join("linked-kubelet");
    symlink(tree.kubelet(), &linked).unwrap();
    let args = [
        "--mode=node".to_owned(),
        "--node-name=node-a".to_owned(),
        format!("--base-dir={}", tree.base().display()),
        format!("--kubelet-dir={}", linked.display()),
    ];
    let node = Driver::start(&tree, "node-a", &args);
    let n = node.node_client();
    let vol = volume_id("pvc-linked-kubelet");
    let real = tree.target("pod1");
    let target = linked.join(real.strip_prefix(tree.kubelet()).unwrap());
    for _ in 0..2 {
        n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
        assert_eq!(mounted_at(&real), 1);
    }
    fs::write(target.join("f"), b"x").unwrap();
    assert!(tree.base().join(&vol).join("f").exists());
    n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    assert_eq!(mounted_at(&real), 0);
    assert!(!real.exists());
    tree.assert_no_mounts();
}

#[test]
fn probe_is_not_ready_with_a_symlinked_base_dir() {
    let tree = Tree::new("probe-symlink");
    let real = tree.root.join("real-base");
    fs::create_dir(&real).unwrap();
    let link = tree.root.join("linked-base");
    symlink(&real, &link).unwrap();
    let node = Driver::start(
        &tree,
        "node-a",
        &[
            "--mode=node".into(),
            "--node-name=node-a".into(),
            format!("--base-dir={}", link.display()),
            format!("--kubelet-dir={}", tree.kubelet().display()),
            "--metrics-addr=127.0.0.1:0".into(),
        ],
    );
    let probe = node.identity().probe(&csi::ProbeRequest::new()).unwrap();
    assert!(!probe.ready.value);
    // What the DaemonSet's probes see: alive (no restart), not ready, and the gauge says why.
    let addr = node.metrics_addr();
    assert_eq!(http(&addr, b"GET /livez HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(http(&addr, b"GET /readyz HTTP/1.1\r\n\r\n").0, 503);
    let (_, metrics) = http(&addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(metrics.contains("\nnode_local_cache_ready 0\n"), "{metrics}");
    let vol = volume_id("pvc-symlinked-base");
    let target = tree.target("pod1");
    let (c, msg) = code(
        node.node_client()
            .node_publish_volume(&publish_req(&vol, &target, false)),
    );
    assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains(&vol) && msg.contains(link.to_str().unwrap()), "{msg}");
    assert!(
        fs::read_dir(&real).unwrap().next().is_none(),
        "nothing may be created through the link"
    );
    assert!(!target.exists());
    tree.assert_no_mounts();
}

/// The plugin keeps the base dir open between calls. A base dir moved away and made again, or
/// replaced by a symlink, while it runs must be seen at the next call: copies land in the dir the
/// path names now, and a symlink is refused as at start.
#[test]
fn a_base_dir_replaced_while_the_plugin_runs_is_seen_at_the_next_call() {
    let tree = Tree::new("base-replaced");
    let node = Driver::node(&tree, "node-a", &[]);
    let client = node.node_client();
    let vol = volume_id("pvc-base-replaced");
    let target = tree.target("pod1");
    client.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    client.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();

    let moved = tree.root.join("base-moved");
    fs::rename(tree.base(), &moved).unwrap();
    fs::create_dir(tree.base()).unwrap();
    client.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    fs::write(target.join("new"), "x").unwrap();
    assert!(
        tree.base().join(&vol).join("new").exists(),
        "the copy is in the new base dir"
    );
    assert!(!moved.join(&vol).join("new").exists());
    client.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();

    fs::rename(tree.base(), tree.root.join("base-moved-2")).unwrap();
    symlink(&moved, tree.base()).unwrap();
    let (c, msg) = code(client.node_publish_volume(&publish_req(&vol, &target, false)));
    assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains(&vol) && msg.contains("symlink"), "{msg}");
    assert!(!node.identity().probe(&csi::ProbeRequest::new()).unwrap().ready.value);
    assert!(!target.exists());
    tree.assert_no_mounts();
}

/// In the pod, the base dir is a mount of the host's dir (a hostPath volume). The host removing
/// that dir leaves the mount showing a deleted dir, where nothing can be made: the node must say
/// so (not ready, publishes FAILED_PRECONDITION naming the base dir), and since only a new
/// process gets a mount of the dir made again, liveness fails too, so kubelet restarts the plugin.
#[test]
fn a_base_dir_deleted_on_the_host_is_reported_and_restarts_the_plugin() {
    let tree = Tree::new("base-deleted");
    let host = tree.root.join("host-dir");
    fs::create_dir(&host).unwrap();
    nix::mount::mount(
        Some(&host),
        &tree.base(),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let node = Driver::node(&tree, "node-a", &["--metrics-addr=127.0.0.1:0"]);
    let addr = node.metrics_addr();
    let client = node.node_client();
    let (vol, other) = (volume_id("pvc-base-deleted"), volume_id("pvc-base-deleted-2"));
    let target = tree.target("pod1");
    client.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    client.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();

    fs::remove_dir_all(&host).unwrap();
    let ready = node.identity().probe(&csi::ProbeRequest::new()).unwrap().ready.value;
    let publish = code(client.node_publish_volume(&publish_req(&other, &target, false)));
    let probes = [
        http(&addr, b"GET /readyz HTTP/1.1\r\n\r\n"),
        http(&addr, b"GET /livez HTTP/1.1\r\n\r\n"),
    ];
    nix::mount::umount2(&tree.base(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(!ready, "Probe says ready on a deleted base dir");
    let (c, msg) = publish;
    assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{msg}");
    assert!(
        msg.contains(&other) && msg.contains(tree.base().to_str().unwrap()) && msg.contains("deleted"),
        "{msg}"
    );
    assert_eq!(probes[0].0, 503, "/readyz");
    assert_eq!(probes[1].0, 503, "/livez: {}", probes[1].1);
    assert!(probes[1].1.contains("deleted"), "{}", probes[1].1);
    assert!(!target.exists());
    tree.assert_no_mounts();
}

/// kubelet makes a missing hostPath dir 0755 (`DirectoryOrCreate`), and a base dir open to the
/// node's other users lets them into every copy (volume dirs are 0777, for the pods' users). The
/// plugin closes it at start, and when it opens a base dir made again while it runs.
#[test]
fn the_base_dir_is_closed_to_other_users() {
    let tree = Tree::new("base-mode");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    fs::set_permissions(tree.base(), fs::Permissions::from_mode(0o755)).unwrap();
    let node = Driver::node(&tree, "node-a", &[]);
    assert!(node.identity().probe(&csi::ProbeRequest::new()).unwrap().ready.value);
    assert_eq!(mode(&tree.base()), 0o700, "at start");

    fs::rename(tree.base(), tree.root.join("base-old")).unwrap();
    fs::create_dir(tree.base()).unwrap();
    fs::set_permissions(tree.base(), fs::Permissions::from_mode(0o755)).unwrap();
    let client = node.node_client();
    let vol = volume_id("pvc-base-mode");
    let target = tree.target("pod1");
    client.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    assert_eq!(mode(&tree.base()), 0o700, "made again while it runs");
    client.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    tree.assert_no_mounts();
}

/// Liveness is the CSI socket answering, not only the metrics thread: a plugin whose socket is
/// gone (its dir wiped) serves nobody, and only a restart makes the socket again.
#[test]
fn livez_fails_once_the_csi_socket_stops_answering() {
    let tree = Tree::new("livez");
    let node = Driver::node(&tree, "node-a", &["--metrics-addr=127.0.0.1:0"]);
    let addr = node.metrics_addr();
    assert_eq!(http(&addr, b"GET /livez HTTP/1.1\r\n\r\n").0, 200);
    // Asked over and over, it keeps answering.
    for _ in 0..20 {
        assert_eq!(http(&addr, b"GET /livez HTTP/1.1\r\n\r\n").0, 200);
    }
    fs::remove_file(&node.socket).unwrap();
    let (code, body) = http(&addr, b"GET /livez HTTP/1.1\r\n\r\n");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(node.socket.to_str().unwrap()), "{body}");
    // Readiness stays what Probe says: the base dir is fine.
    assert_eq!(http(&addr, b"GET /readyz HTTP/1.1\r\n\r\n").0, 200);
}

#[test]
fn controller_creates_deletes_and_validates() {
    let tree = Tree::new("controller");
    let d = Driver::controller(&tree, &[]);
    let c = d.controller_client();

    let created = c.create_volume_opt(&create_req("pvc-1", 1 << 30), opt()).unwrap();
    let v = created.volume.unwrap();
    assert_eq!(v.volume_id, volume_id("pvc-1"));
    assert!(v.volume_id.starts_with("nlc-") && v.volume_id.len() == 40);
    assert_eq!(v.capacity_bytes, 1 << 30);
    assert!(v.accessible_topology.is_empty(), "volumes must have no topology");
    // Same name, compatible: same volume.
    let again = c.create_volume(&create_req("pvc-1", 1 << 30)).unwrap();
    assert_eq!(again.volume.volume_id, v.volume_id);
    // Same name, larger than what exists: ALREADY_EXISTS.
    let (code1, msg) = code(c.create_volume(&create_req("pvc-1", 2 << 30)));
    assert_eq!(code1, RpcStatusCode::ALREADY_EXISTS);
    assert!(msg.contains(&v.volume_id), "{msg}");

    let mut no_name = create_req("", 0);
    no_name.name.clear();
    assert_eq!(code(c.create_volume(&no_name)).0, RpcStatusCode::INVALID_ARGUMENT);
    let mut no_caps = create_req("pvc-2", 0);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(&no_caps)).0, RpcStatusCode::INVALID_ARGUMENT);
    let mut block = create_req("pvc-3", 0);
    block.volume_capabilities[0].set_block(Default::default());
    assert_eq!(code(c.create_volume(&block)).0, RpcStatusCode::INVALID_ARGUMENT);
    let mut mode = create_req("pvc-4", 0);
    mode.volume_capabilities[0] = mount_cap(Mode::UNKNOWN, &[]);
    assert_eq!(code(c.create_volume(&mode)).0, RpcStatusCode::INVALID_ARGUMENT);
    let mut param = create_req("pvc-5", 0);
    param.parameters.insert("color".into(), "blue".into());
    assert_eq!(code(c.create_volume(&param)).0, RpcStatusCode::INVALID_ARGUMENT);
    let mut provisioner_param = create_req("pvc-6", 0);
    provisioner_param
        .parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "x".into());
    c.create_volume(&provisioner_param).unwrap();
    let mut bad_range = create_req("pvc-7", 10);
    bad_range.capacity_range.as_mut().unwrap().limit_bytes = 5;
    assert_eq!(code(c.create_volume(&bad_range)).0, RpcStatusCode::OUT_OF_RANGE);

    let mut validate = csi::ValidateVolumeCapabilitiesRequest::new();
    validate.volume_id = v.volume_id.clone();
    validate.volume_capabilities.push(rw_cap());
    for _ in 0..2 {
        let r = c.validate_volume_capabilities(&validate).unwrap();
        assert_eq!(r.confirmed.volume_capabilities.len(), 1, "{}", r.message);
    }
    validate.volume_capabilities[0].set_block(Default::default());
    let r = c.validate_volume_capabilities(&validate).unwrap();
    assert!(r.confirmed.is_none() && r.message.contains("block"), "{}", r.message);
    validate.volume_id = "pvc-not-ours".into();
    assert_eq!(
        code(c.validate_volume_capabilities(&validate)).0,
        RpcStatusCode::NOT_FOUND
    );
    validate.volume_id = v.volume_id.clone();
    validate.volume_capabilities.clear();
    assert_eq!(
        code(c.validate_volume_capabilities(&validate)).0,
        RpcStatusCode::INVALID_ARGUMENT
    );

    for _ in 0..2 {
        let caps = c
            .controller_get_capabilities(&csi::ControllerGetCapabilitiesRequest::new())
            .unwrap();
        let types: Vec<_> = caps
            .capabilities
            .iter()
            .map(|c| c.rpc().type_.enum_value().unwrap())
            .collect();
        assert_eq!(
            types,
            vec![csi::controller_service_capability::rpc::Type::CREATE_DELETE_VOLUME]
        );
    }

    let mut del = csi::DeleteVolumeRequest::new();
    assert_eq!(code(c.delete_volume(&del)).0, RpcStatusCode::INVALID_ARGUMENT);
    del.volume_id = v.volume_id.clone();
    c.delete_volume(&del).unwrap();
    c.delete_volume(&del).unwrap();
    del.volume_id = "something-else".into();
    c.delete_volume(&del).unwrap();
    // After deletion the name may be created again with another capacity.
    assert_eq!(
        c.create_volume(&create_req("pvc-1", 2 << 30))
            .unwrap()
            .volume
            .capacity_bytes,
        2 << 30
    );

    assert_eq!(
        code(c.list_volumes(&csi::ListVolumesRequest::new())).0,
        RpcStatusCode::UNIMPLEMENTED
    );
    assert_eq!(
        code(c.controller_publish_volume(&csi::ControllerPublishVolumeRequest::new())).0,
        RpcStatusCode::UNIMPLEMENTED
    );
    assert_eq!(
        code(c.get_capacity(&csi::GetCapacityRequest::new())).0,
        RpcStatusCode::UNIMPLEMENTED
    );
    tree.assert_no_mounts();
}

/// A PVC naming a VolumeAttributesClass reaches CreateVolume with the class's parameters as
/// `mutable_parameters`: csi-provisioner sends them whatever the driver's capabilities. This
/// driver has no MODIFY_VOLUME and no mutable parameter, so they are refused, as an unknown
/// StorageClass parameter is: a class asking for `eviction: none` must not give a volume that
/// quietly trims. ValidateVolumeCapabilities confirms only what it checked: parameters,
/// mutable parameters and a volume context CreateVolume or a publish would refuse are not
/// confirmed, and the reason is given.
#[test]
fn mutable_parameters_are_refused_not_ignored() {
    let tree = Tree::new("controller-mutable");
    let d = Driver::controller(&tree, &[]);
    let c = d.controller_client();

    let mut req = create_req("pvc-vac", 1 << 30);
    req.mutable_parameters.insert("eviction".into(), "none".into());
    for _ in 0..2 {
        let (status, msg) = code(c.create_volume(&req));
        assert_eq!(status, RpcStatusCode::INVALID_ARGUMENT, "{msg}");
        assert!(
            msg.contains("eviction") && msg.contains("VolumeAttributesClass"),
            "{msg}"
        );
    }
    // Refused, so nothing was created: the same name without the class is a new volume.
    req.mutable_parameters.clear();
    req.parameters.insert("eviction".into(), "none".into());
    let v = c.create_volume(&req).unwrap().volume.unwrap();

    let mut validate = csi::ValidateVolumeCapabilitiesRequest::new();
    validate.volume_id = v.volume_id.clone();
    validate.volume_capabilities.push(rw_cap());
    validate.volume_context = v.volume_context.clone();
    validate.parameters = req.parameters.clone();
    let r = c.validate_volume_capabilities(&validate).unwrap();
    assert_eq!(r.confirmed.parameters, req.parameters, "{}", r.message);
    assert_eq!(r.confirmed.volume_context, v.volume_context);

    let mut unknown = validate.clone();
    unknown.parameters.insert("color".into(), "blue".into());
    let mut bad_eviction = validate.clone();
    bad_eviction.parameters.insert("eviction".into(), "sometimes".into());
    let mut mutable = validate.clone();
    mutable.mutable_parameters.insert("eviction".into(), "none".into());
    let mut bad_context = validate.clone();
    bad_context
        .volume_context
        .insert(node_local_cache::eviction::CONTEXT_EVICTION.into(), "often".into());
    for (what, req, reason) in [
        ("an unknown parameter", unknown, "color"),
        ("a bad eviction", bad_eviction, "sometimes"),
        ("a mutable parameter", mutable, "VolumeAttributesClass"),
        ("a volume context a node refuses", bad_context, "often"),
    ] {
        let r = c.validate_volume_capabilities(&req).unwrap();
        assert!(r.confirmed.is_none(), "{what} confirmed");
        assert!(r.message.contains(reason), "{what}: {}", r.message);
    }
    tree.assert_no_mounts();
}

#[test]
fn publish_unpublish_round_trip_is_idempotent_and_keeps_data() {
    let tree = Tree::new("roundtrip");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-roundtrip");
    let target = tree.target("pod1");

    for _ in 0..2 {
        n.node_publish_volume_opt(&publish_req(&vol, &target, false), opt())
            .unwrap();
        assert_eq!(mounted_at(&target), 1, "exactly one mount at the target");
    }
    fs::write(target.join("hello"), b"cached").unwrap();
    assert_eq!(fs::read(tree.base().join(&vol).join("hello")).unwrap(), b"cached");

    for _ in 0..2 {
        let info = n.node_get_info(&csi::NodeGetInfoRequest::new()).unwrap();
        assert_eq!(info.node_id, "node-a");
        assert!(info.accessible_topology.is_none());
        let caps = n
            .node_get_capabilities(&csi::NodeGetCapabilitiesRequest::new())
            .unwrap();
        let types: Vec<_> = caps
            .capabilities
            .iter()
            .map(|c| c.rpc().type_.enum_value().unwrap())
            .collect();
        use csi::node_service_capability::rpc::Type;
        assert_eq!(types, vec![Type::GET_VOLUME_STATS, Type::VOLUME_CONDITION]);
    }

    for _ in 0..2 {
        n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
        assert_eq!(mounted_at(&target), 0);
        assert!(!target.exists(), "the target dir is removed");
    }
    // The node's copy survives for the next pod.
    let target2 = tree.target("pod2");
    n.node_publish_volume(&publish_req(&vol, &target2, false)).unwrap();
    assert_eq!(fs::read(target2.join("hello")).unwrap(), b"cached");
    n.node_unpublish_volume(&unpublish_req(&vol, &target2)).unwrap();

    assert_eq!(
        code(n.node_stage_volume(&csi::NodeStageVolumeRequest::new())).0,
        RpcStatusCode::UNIMPLEMENTED
    );
    assert_eq!(
        code(n.node_expand_volume(&csi::NodeExpandVolumeRequest::new())).0,
        RpcStatusCode::UNIMPLEMENTED
    );
    tree.assert_no_mounts();
}

#[test]
fn read_only_publish_refuses_writes() {
    let tree = Tree::new("readonly");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-ro");
    let rw = tree.target("writer");
    n.node_publish_volume(&publish_req(&vol, &rw, false)).unwrap();
    fs::write(rw.join("data"), b"x").unwrap();

    let ro = tree.target("reader");
    for _ in 0..2 {
        n.node_publish_volume(&publish_req(&vol, &ro, true)).unwrap();
    }
    assert_eq!(fs::read(ro.join("data")).unwrap(), b"x");
    let err = fs::write(ro.join("new"), b"y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    // The read-write publish is unaffected by the read-only remount of the other bind.
    fs::write(rw.join("still-writable"), b"z").unwrap();
    // Same target, other flags: ALREADY_EXISTS.
    let (c, msg) = code(n.node_publish_volume(&publish_req(&vol, &ro, false)));
    assert_eq!(c, RpcStatusCode::ALREADY_EXISTS);
    assert!(msg.contains(&vol) && msg.contains(ro.to_str().unwrap()), "{msg}");
    // Read-only through the access mode and a mount flag too.
    let ro2 = tree.target("reader2");
    let mut req = publish_req(&vol, &ro2, false);
    req.volume_capability = Some(mount_cap(Mode::MULTI_NODE_READER_ONLY, &["noexec"])).into();
    n.node_publish_volume(&req).unwrap();
    assert_eq!(
        fs::write(ro2.join("new"), b"y").unwrap_err().raw_os_error(),
        Some(nix::libc::EROFS)
    );
    let entry = tree.mounts().into_iter().find(|m| m.mount_point == ro2).unwrap();
    assert!(entry.read_only() && entry.has_option("noexec"), "{}", entry.options);

    for t in [&rw, &ro, &ro2] {
        n.node_unpublish_volume(&unpublish_req(&vol, t)).unwrap();
    }
    tree.assert_no_mounts();
}

#[test]
fn bad_input_gets_exact_codes_and_names_volume_and_path() {
    let tree = Tree::new("badinput");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-bad");
    let target = tree.target("pod1");
    let t = target.to_str().unwrap();

    let cases: Vec<(&str, csi::NodePublishVolumeRequest, RpcStatusCode)> = vec![
        (
            "bad id",
            publish_req("pvc-123", &target, false),
            RpcStatusCode::NOT_FOUND,
        ),
        (
            "traversal id",
            publish_req("../../etc", &target, false),
            RpcStatusCode::NOT_FOUND,
        ),
        (
            "uppercase id",
            publish_req(&vol.to_uppercase(), &target, false),
            RpcStatusCode::NOT_FOUND,
        ),
        (
            "relative target",
            publish_req(&vol, Path::new("kubelet/pods/x/mount"), false),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "dotdot target",
            publish_req(&vol, &tree.kubelet().join("pods/../../base/mount"), false),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "outside kubelet dir",
            publish_req(&vol, &tree.root.join("elsewhere"), false),
            RpcStatusCode::INVALID_ARGUMENT,
        ),
        (
            "no parent",
            publish_req(&vol, &tree.kubelet().join("pods/none/x/mount"), false),
            RpcStatusCode::NOT_FOUND,
        ),
    ];
    for (what, req, want) in cases {
        let (got, msg) = code(n.node_publish_volume(&req));
        assert_eq!(got, want, "{what}: {msg}");
        assert!(
            msg.contains(&req.volume_id),
            "{what}: message {msg:?} must name the volume"
        );
        if got != RpcStatusCode::INVALID_ARGUMENT || what.contains("target") || what.contains("kubelet") {
            assert!(
                msg.contains(&req.target_path),
                "{what}: message {msg:?} must name the path"
            );
        }
    }

    let mut missing = publish_req(&vol, &target, false);
    missing.target_path.clear();
    let (c, msg) = code(n.node_publish_volume(&missing));
    assert_eq!(c, RpcStatusCode::INVALID_ARGUMENT);
    assert!(msg.contains("target_path") && msg.contains(&vol), "{msg}");
    // A missing field is INVALID_ARGUMENT; capabilities the volume does not offer are the spec's
    // "exceeds capabilities", FAILED_PRECONDITION. Each message names the volume and the path.
    let mut no_id = publish_req(&vol, &target, false);
    no_id.volume_id.clear();
    let mut no_cap = publish_req(&vol, &target, false);
    no_cap.volume_capability = None.into();
    let mut no_mode = publish_req(&vol, &target, false);
    no_mode.volume_capability.as_mut().unwrap().access_mode = None.into();
    let mut block = publish_req(&vol, &target, false);
    block.volume_capability.as_mut().unwrap().set_block(Default::default());
    let mut flag = publish_req(&vol, &target, false);
    flag.volume_capability = Some(mount_cap(Mode::SINGLE_NODE_WRITER, &["uid=1000"])).into();
    let mut mode = publish_req(&vol, &target, false);
    mode.volume_capability = Some(mount_cap(Mode::SINGLE_NODE_SINGLE_WRITER, &[])).into();
    let mut context = publish_req(&vol, &target, false);
    context
        .volume_context
        .insert("node-local-cache.csi.io/capacity-bytes".into(), "lots".into());
    for (what, req, want) in [
        ("no volume id", no_id, RpcStatusCode::INVALID_ARGUMENT),
        ("no capability", no_cap, RpcStatusCode::INVALID_ARGUMENT),
        ("no access mode", no_mode, RpcStatusCode::INVALID_ARGUMENT),
        ("bad volume context", context, RpcStatusCode::INVALID_ARGUMENT),
        ("block", block, RpcStatusCode::FAILED_PRECONDITION),
        ("mount flag", flag, RpcStatusCode::FAILED_PRECONDITION),
        ("access mode", mode, RpcStatusCode::FAILED_PRECONDITION),
    ] {
        let (c, msg) = code(n.node_publish_volume(&req));
        assert_eq!(c, want, "{what}: {msg}");
        assert!(
            msg.contains(&req.volume_id) && msg.contains(&req.target_path),
            "{what}: message {msg:?} must name the volume and the path"
        );
    }
    assert!(!target.exists());

    // A symlinked target is refused and nothing is mounted through it.
    let victim = tree.root.join("victim");
    fs::create_dir(&victim).unwrap();
    symlink(&victim, &target).unwrap();
    let (c, msg) = code(n.node_publish_volume(&publish_req(&vol, &target, false)));
    assert_eq!(c, RpcStatusCode::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains(t) && msg.contains(&vol), "{msg}");
    assert_eq!(mounted_at(&victim), 0);
    let (c, _) = code(n.node_unpublish_volume(&unpublish_req(&vol, &target)));
    assert_eq!(c, RpcStatusCode::INVALID_ARGUMENT);
    assert!(
        fs::symlink_metadata(&target).unwrap().file_type().is_symlink(),
        "the link is left alone"
    );
    fs::remove_file(&target).unwrap();

    // A parent that links out of the kubelet dir is refused.
    let pods = tree.kubelet().join("pods/escape");
    symlink(&victim, &pods).unwrap();
    let (c, msg) = code(n.node_publish_volume(&publish_req(&vol, &pods.join("mount"), false)));
    assert_eq!(c, RpcStatusCode::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("outside the kubelet dir"), "{msg}");

    // A symlinked volume dir is refused without following it.
    let vol2 = volume_id("pvc-linked-voldir");
    symlink(&victim, tree.base().join(&vol2)).unwrap();
    let (c, msg) = code(n.node_publish_volume(&publish_req(&vol2, &tree.target("pod2"), false)));
    assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains(&vol2), "{msg}");

    // Unpublish and stats validate the same way. An id that no volume of ours can have is the
    // spec's "volume does not exist".
    assert_eq!(
        code(n.node_unpublish_volume(&unpublish_req("nope", &target))).0,
        RpcStatusCode::NOT_FOUND
    );
    assert_eq!(
        code(n.node_unpublish_volume(&unpublish_req(&vol, Path::new("rel")))).0,
        RpcStatusCode::INVALID_ARGUMENT
    );
    let mut no_target = unpublish_req(&vol, &target);
    no_target.target_path.clear();
    assert_eq!(
        code(n.node_unpublish_volume(&no_target)).0,
        RpcStatusCode::INVALID_ARGUMENT
    );
    let mut no_path = stats_req(&vol, &target);
    no_path.volume_path.clear();
    assert_eq!(
        code(n.node_get_volume_stats(&no_path)).0,
        RpcStatusCode::INVALID_ARGUMENT
    );
    // NodeGetVolumeStats: NOT_FOUND for a volume that does not exist and for a path where the
    // volume is not published, as csi-sanity asks (it sends a fake id and the relative
    // "some/path"), through a link out of the kubelet dir or a file on the way included; a
    // missing field stays INVALID_ARGUMENT.
    let file = tree.kubelet().join("pods/a-file");
    fs::write(&file, b"").unwrap();
    for (id, path) in [
        ("fake-vol-id-1234", target.as_path()),
        ("x", target.as_path()),
        (vol.as_str(), Path::new("some/path")),
        (vol.as_str(), tree.root.join("elsewhere").as_path()),
        (vol.as_str(), pods.join("mount").as_path()),
        (vol.as_str(), file.join("v/mount").as_path()),
    ] {
        let (c, msg) = code(n.node_get_volume_stats(&stats_req(id, path)));
        assert_eq!(c, RpcStatusCode::NOT_FOUND, "{id} at {}: {msg}", path.display());
        assert!(msg.contains(id) && msg.contains(path.to_str().unwrap()), "{msg}");
    }
    let mut no_id = stats_req(&vol, &target);
    no_id.volume_id.clear();
    assert_eq!(code(n.node_get_volume_stats(&no_id)).0, RpcStatusCode::INVALID_ARGUMENT);
    assert_eq!(
        code(n.node_get_volume_stats(&stats_req(&vol, &target))).0,
        RpcStatusCode::NOT_FOUND
    );
    // Unpublishing something never published is fine (kubelet retries otherwise).
    n.node_unpublish_volume(&unpublish_req(&vol, &tree.target("never")))
        .unwrap();
    assert!(
        fs::read_dir(&victim).unwrap().next().is_none(),
        "nothing written through any link"
    );
    tree.assert_no_mounts();
}

#[test]
fn foreign_mounts_are_never_ours() {
    let tree = Tree::new("foreign");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-foreign");
    let target = tree.target("pod1");
    fs::create_dir(&target).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let (c, msg) = code(n.node_publish_volume(&publish_req(&vol, &target, false)));
    assert_eq!(c, RpcStatusCode::ALREADY_EXISTS, "{msg}");
    let (c, msg) = code(n.node_unpublish_volume(&unpublish_req(&vol, &target)));
    assert_eq!(c, RpcStatusCode::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("tmpfs") && msg.contains(&vol), "{msg}");
    assert_eq!(mounted_at(&target), 1, "the foreign mount stays");
    // Another volume's bind is foreign too.
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    let other = volume_id("pvc-other");
    n.node_publish_volume(&publish_req(&other, &target, false)).unwrap();
    assert_eq!(
        code(n.node_publish_volume(&publish_req(&vol, &target, false))).0,
        RpcStatusCode::ALREADY_EXISTS
    );
    assert_eq!(
        code(n.node_unpublish_volume(&unpublish_req(&vol, &target))).0,
        RpcStatusCode::FAILED_PRECONDITION
    );
    n.node_unpublish_volume(&unpublish_req(&other, &target)).unwrap();
    tree.assert_no_mounts();
}

/// The first two publishes of a volume on a node, at once: one to a good target, one that fails
/// after it made the volume dir (its target is a file). The failed one may take back only a dir
/// nobody else uses: the good one's pod must never be left writing into a deleted dir.
#[test]
fn a_failed_first_publish_never_takes_the_dir_from_one_beside_it() {
    let tree = Tree::new("undo-race");
    let node = Driver::node(&tree, "node-a", &[]);
    for i in 0..300 {
        let vol = volume_id(&format!("pvc-undo-race-{i}"));
        let good = tree.target(&format!("good{i}"));
        let bad = tree.target(&format!("bad{i}"));
        fs::write(&bad, "a file where the target dir goes").unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let failing = {
            let (n, req, b) = (node.node_client(), publish_req(&vol, &bad, false), barrier.clone());
            thread::spawn(move || {
                b.wait();
                n.node_publish_volume_opt(&req, opt())
            })
        };
        barrier.wait();
        let client = node.node_client();
        if let Err(e) = client.node_publish_volume(&publish_req(&vol, &good, false)) {
            panic!("round {i}: the good publish failed: {e:?}");
        }
        let (c, msg) = code(failing.join().unwrap());
        assert!(c != RpcStatusCode::OK, "{msg}");
        fs::write(good.join("f"), "written by the pod").unwrap();
        assert!(
            tree.base().join(&vol).join("f").exists(),
            "round {i}: the pod writes into a dir that is no longer the volume's copy"
        );
        client.node_unpublish_volume(&unpublish_req(&vol, &good)).unwrap();
    }
    tree.assert_no_mounts();
}

#[test]
fn concurrent_publishes_and_in_flight_duplicates() {
    let tree = Tree::new("concurrent");
    let d = Driver::node(&tree, "node-a", &["--workers=8", "--test-publish-delay=500ms"]);
    let vol = volume_id("pvc-shared");
    let targets: Vec<_> = (0..32).map(|i| tree.target(&format!("pod{i}"))).collect();

    // A duplicate of a call still in flight gets ABORTED, deterministically: the first call
    // holds its lock through a long publish delay (its own plugin, so the rest stays quick).
    {
        let tree = Tree::new("inflight");
        let slow = Driver::node(&tree, "node-a", &["--test-publish-delay=3s"]);
        let target = tree.target("pod0");
        let first = {
            let (n, req) = (slow.node_client(), publish_req(&vol, &target, false));
            thread::spawn(move || n.node_publish_volume_opt(&req, opt()))
        };
        // Logged as the call is handed to a worker, which takes the lock at once.
        slow.wait_for_log("NodePublishVolume request", 1);
        thread::sleep(Duration::from_millis(200));
        let (c, msg) = code(
            slow.node_client()
                .node_publish_volume(&publish_req(&vol, &target, false)),
        );
        assert_eq!(c, RpcStatusCode::ABORTED, "{msg}");
        first.join().unwrap().unwrap();
        slow.node_client()
            .node_unpublish_volume(&unpublish_req(&vol, &target))
            .unwrap();
        tree.assert_no_mounts();
    }

    // 32 publishes to distinct targets of one volume at once, each with a duplicate racing it.
    let barrier = Arc::new(Barrier::new(64));
    let calls: Vec<_> = targets
        .iter()
        .flat_map(|t| [t.clone(), t.clone()])
        .map(|t| {
            let (n, req, b) = (d.node_client(), publish_req(&vol, &t, false), barrier.clone());
            thread::spawn(move || {
                b.wait();
                n.node_publish_volume_opt(&req, opt())
            })
        })
        .collect();
    let results: Vec<_> = calls.into_iter().map(|h| h.join().unwrap()).collect();
    for (pair, t) in results.chunks(2).zip(&targets) {
        let ok = pair.iter().filter(|r| r.is_ok()).count();
        assert!(ok >= 1, "{}: {pair:?}; log:\n{}", t.display(), d.log_text());
        for r in pair.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(r, Err(grpcio::Error::RpcFailure(s)) if s.code() == RpcStatusCode::ABORTED),
                "{r:?}; log:\n{}",
                d.log_text()
            );
        }
        assert_eq!(mounted_at(t), 1, "{} must be mounted exactly once", t.display());
    }
    // Writes through one target are seen through all: one volume, one node.
    fs::write(targets[5].join("f"), b"1").unwrap();
    assert_eq!(fs::read(targets[31].join("f")).unwrap(), b"1");

    let calls: Vec<_> = targets
        .iter()
        .map(|t| {
            let (n, req) = (d.node_client(), unpublish_req(&vol, t));
            thread::spawn(move || n.node_unpublish_volume_opt(&req, opt()))
        })
        .collect();
    for h in calls {
        h.join().unwrap().unwrap();
    }
    tree.assert_no_mounts();
}

#[test]
fn stats_report_usage_and_condition() {
    let tree = Tree::new("stats");
    let d = Driver::node(&tree, "node-a", &["--stats-cache-ttl=0s"]);
    let n = d.node_client();
    let vol = volume_id("pvc-stats");
    let target = tree.target("pod1");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    for i in 0..3 {
        fs::write(target.join(format!("f{i}")), vec![7u8; 4096]).unwrap();
    }
    fs::create_dir(target.join("sub")).unwrap();
    for _ in 0..2 {
        let s = n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
        use csi::volume_usage::Unit;
        let bytes = s.usage.iter().find(|u| u.unit.enum_value() == Ok(Unit::BYTES)).unwrap();
        let inodes = s
            .usage
            .iter()
            .find(|u| u.unit.enum_value() == Ok(Unit::INODES))
            .unwrap();
        assert!(bytes.used >= 3 * 4096, "{bytes:?}");
        assert!(
            bytes.total > 0 && bytes.available > 0 && bytes.available <= bytes.total,
            "{bytes:?}"
        );
        assert_eq!(inodes.used, 5, "the dir, three files and a subdir");
        assert!(inodes.total >= inodes.available, "{inodes:?}");
        assert!(!s.volume_condition.abnormal, "{}", s.volume_condition.message);
    }
    // A path that is not one of its publish targets.
    let (c, msg) = code(n.node_get_volume_stats(&stats_req(&vol, &tree.target("elsewhere"))));
    assert_eq!(c, RpcStatusCode::NOT_FOUND, "{msg}");
    assert_eq!(
        code(n.node_get_volume_stats(&stats_req(&volume_id("pvc-other"), &target))).0,
        RpcStatusCode::NOT_FOUND
    );

    // The node's data dir vanishes under a live mount: reported, not hidden.
    fs::remove_dir_all(tree.base().join(&vol)).unwrap_or_else(|_| {
        // The mounted dir itself cannot go while busy on some kernels; empty it and rename it away.
        fs::rename(tree.base().join(&vol), tree.root.join("moved")).unwrap();
    });
    let s = n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    assert!(s.volume_condition.abnormal, "a vanished data dir must be reported");
    assert!(
        s.volume_condition.message.contains(&vol),
        "{}",
        s.volume_condition.message
    );
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    tree.assert_no_mounts();
}

/// A node plugin that measures usage afresh at every call, its base dir on a tmpfs: making and
/// removing hundreds of thousands of files on this machine's disk takes from seconds to minutes.
fn stats_node(tag: &str) -> (Tree, Driver) {
    let tree = Tree::with_tmpfs_base(tag, None);
    let d = Driver::node(&tree, "node-a", &["--stats-cache-ttl=0s"]);
    (tree, d)
}

/// `dirs` directories of `files` empty files each, under `root`.
fn fill(root: &Path, dirs: usize, files: usize) {
    for i in 0..dirs {
        let dir = root.join(format!("d{i}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..files {
            fs::File::create(dir.join(f.to_string())).unwrap();
        }
    }
}

/// kubelet asks for stats every minute and may unpublish at any moment, and a walk of a large
/// copy takes a while. The walk must not hold the pod's mount busy: an unpublish during it
/// unmounts at once instead of answering UNAVAILABLE.
#[test]
fn an_unpublish_during_a_stats_walk_is_not_refused() {
    let (tree, d) = stats_node("stats-walk");
    let n = d.node_client();
    let vol = volume_id("pvc-stats-walk");
    let target = tree.target("pod1");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    // Far longer to walk than unpublish waits for a busy mount (75 ms).
    fill(&target, 200, 1000);
    let walk = {
        let (n, req) = (d.node_client(), stats_req(&vol, &target));
        thread::spawn(move || n.node_get_volume_stats(&req))
    };
    d.wait_for_log("NodeGetVolumeStats request", 1);
    thread::sleep(Duration::from_millis(20));
    if let Err(e) = n.node_unpublish_volume(&unpublish_req(&vol, &target)) {
        panic!("unpublish during the walk: {e:?}");
    }
    let stats = walk
        .join()
        .unwrap()
        .expect("the walk began while the volume was published");
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit.enum_value() == Ok(csi::volume_usage::Unit::INODES))
        .unwrap();
    assert_eq!(inodes.used, 1 + 200 + 200_000);
    assert_eq!(mounted_at(&target), 0);
}

/// A cache may put hundreds of thousands of files in one directory. Measuring it must not hold
/// their names: the plugin's peak memory may not grow with the size of a directory.
#[test]
fn a_stats_walk_holds_no_more_memory_for_a_large_directory() {
    let (tree, d) = stats_node("stats-wide");
    let n = d.node_client();
    let vol = volume_id("pvc-stats-wide");
    let target = tree.target("pod1");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    let peak_kib = || {
        let status = fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let dir = target.join("flat");
    fs::create_dir(&dir).unwrap();
    for f in 0..10 {
        fs::File::create(dir.join(format!("file-{f:07}"))).unwrap();
    }
    n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    let before = peak_kib();
    for f in 10..500_000 {
        fs::File::create(dir.join(format!("file-{f:07}"))).unwrap();
    }
    let s = n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    assert_eq!(s.usage[1].used, 2 + 500_000);
    let grew = peak_kib() - before;
    assert!(
        grew < 4096,
        "the peak grew by {grew} KiB for one directory of 500,000 files"
    );
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    assert_eq!(mounted_at(&target), 0);
}

/// Pods of one node sharing a volume each get a stats call a minute. Calls that come during a
/// walk of that volume share it: one walk, not one per pod, each holding a worker.
#[test]
fn stats_calls_during_a_walk_share_it() {
    let (tree, d) = stats_node("stats-shared");
    let n = d.node_client();
    let vol = volume_id("pvc-stats-shared");
    let targets: Vec<_> = (0..4).map(|i| tree.target(&format!("pod{i}"))).collect();
    for t in &targets {
        n.node_publish_volume(&publish_req(&vol, t, false)).unwrap();
    }
    fill(&targets[0], 100, 1000);
    let barrier = Arc::new(Barrier::new(targets.len()));
    let calls: Vec<_> = targets
        .iter()
        .map(|t| {
            let (n, req, b) = (d.node_client(), stats_req(&vol, t), barrier.clone());
            thread::spawn(move || {
                b.wait();
                n.node_get_volume_stats(&req)
            })
        })
        .collect();
    for c in calls {
        let s = c.join().unwrap().unwrap();
        assert_eq!(s.usage[1].used, 1 + 100 + 100_000);
    }
    let walks = d.log_text().matches(&format!("volume {vol}: measured")).count();
    assert_eq!(walks, 1, "four calls at once, {walks} walks");
    for t in &targets {
        n.node_unpublish_volume(&unpublish_req(&vol, t)).unwrap();
        assert_eq!(mounted_at(t), 0);
    }
}

/// A stats call's walk keeps one open directory per level, not the names of every directory it
/// has still to visit: 30,000 subdirectories with 255-byte names side by side raise the real
/// binary's peak memory by well under what those names take (8 MB).
#[test]
fn a_stats_walk_of_a_wide_tree_keeps_memory_flat() {
    const DIRS: usize = 30_000;
    let tree = Tree::with_tmpfs_base("wide-stats", Some("size=64m,nr_inodes=100k"));
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-wide-stats");
    let target = tree.target("pod");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    for i in 0..DIRS {
        fs::create_dir(target.join(long_name('w', i))).unwrap();
    }
    let before = peak_rss(d.pid().as_raw() as u32);
    let stats = n.node_get_volume_stats(&stats_req(&vol, &target)).unwrap();
    let grown = peak_rss(d.pid().as_raw() as u32).saturating_sub(before);
    eprintln!(
        "peak memory grew by {:.2} MB through the stats call",
        grown as f64 / 1e6
    );
    let inodes = stats
        .usage
        .iter()
        .find(|u| u.unit.enum_value() == Ok(csi::volume_usage::Unit::INODES));
    assert_eq!(inodes.map(|u| u.used), Some(1 + DIRS as i64));
    assert!(
        grown < 2_000_000,
        "peak memory grew by {grown} bytes through the stats call"
    );
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
}

#[test]
fn data_on_unpublish_delete_waits_for_the_last_user() {
    let tree = Tree::new("scratch");
    let d = Driver::node(&tree, "node-a", &["--data-on-unpublish=delete"]);
    let n = d.node_client();
    let vol = volume_id("pvc-scratch");
    let (a, b) = (tree.target("a"), tree.target("b"));
    n.node_publish_volume(&publish_req(&vol, &a, false)).unwrap();
    n.node_publish_volume(&publish_req(&vol, &b, false)).unwrap();
    fs::write(a.join("tmp"), b"scratch").unwrap();
    n.node_unpublish_volume(&unpublish_req(&vol, &a)).unwrap();
    assert_eq!(fs::read(b.join("tmp")).unwrap(), b"scratch", "still used by b");
    n.node_unpublish_volume(&unpublish_req(&vol, &b)).unwrap();
    assert!(!tree.base().join(&vol).exists(), "deleted after the last unpublish");

    // The base dir removed under a live mount: nothing is left to delete, and the pod's
    // unpublish must not fail for ever.
    n.node_publish_volume(&publish_req(&vol, &a, false)).unwrap();
    fs::remove_dir_all(tree.base()).unwrap();
    if let Err(e) = n.node_unpublish_volume(&unpublish_req(&vol, &a)) {
        panic!("unpublish with the base dir gone: {e:?}");
    }
    assert!(!a.exists());
    tree.assert_no_mounts();
}

/// A disk the host mounts over the base dir after pods published (a local-SSD set-up that runs
/// late): their binds still show the copies on the filesystem underneath. kubelet's repeated
/// publish, its stats and the unpublish when the pod goes must still know them for ours, or the
/// pod stays Terminating until someone unmounts it by hand.
#[test]
fn binds_made_before_a_disk_was_mounted_over_the_base_dir_are_still_ours() {
    let tree = Tree::new("overmount");
    let d = Driver::node(&tree, "node-a", &[]);
    let n = d.node_client();
    let vol = volume_id("pvc-overmount");
    let target = tree.target("pod1");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    fs::write(target.join("before"), b"on the root disk").unwrap();
    fs::write(target.join("large"), vec![1u8; 2 << 20]).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &tree.base(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .unwrap();
    if let Err(e) = n.node_publish_volume(&publish_req(&vol, &target, false)) {
        panic!("kubelet's repeated publish: {e:?}");
    }
    let stats = n.node_get_volume_stats(&stats_req(&vol, &target));
    let stats = stats.unwrap_or_else(|e| panic!("stats: {e:?}"));
    assert!(
        stats.volume_condition.abnormal,
        "the pod is not on the node's copy: {stats:?}"
    );
    assert!(
        stats.usage[0].used >= 1 << 20,
        "the copy underneath is measured: {stats:?}"
    );
    // A pod started since gets the copy on the new filesystem; its size is its own, not the
    // measurement of the copy underneath.
    let since = tree.target("pod2");
    n.node_publish_volume(&publish_req(&vol, &since, false)).unwrap();
    let stats = n.node_get_volume_stats(&stats_req(&vol, &since)).unwrap();
    assert!(!stats.volume_condition.abnormal, "{stats:?}");
    assert!(stats.usage[0].used < 1 << 20, "the new copy's own size: {stats:?}");
    n.node_unpublish_volume(&unpublish_req(&vol, &since)).unwrap();
    if let Err(e) = n.node_unpublish_volume(&unpublish_req(&vol, &target)) {
        panic!("unpublish: {e:?}");
    }
    assert!(!target.exists());
    // The plugin holds the base dir it now sees open: detached, not unmounted.
    nix::mount::umount2(&tree.base(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(
        fs::read(tree.base().join(&vol).join("before")).unwrap(),
        b"on the root disk"
    );
    tree.assert_no_mounts();
}

#[test]
fn sigterm_lets_a_call_in_flight_finish() {
    let tree = Tree::new("sigterm");
    let mut d = Driver::node(&tree, "node-a", &["--test-publish-delay=1500ms"]);
    let vol = volume_id("pvc-sigterm");
    let target = tree.target("pod1");
    let call = {
        let (n, req) = (d.node_client(), publish_req(&vol, &target, false));
        thread::spawn(move || n.node_publish_volume_opt(&req, opt()))
    };
    d.wait_for_log("NodePublishVolume request", 1);
    thread::sleep(Duration::from_millis(200));
    let status = d.terminate();
    assert!(status.success(), "exit status {status:?}; log:\n{}", d.log_text());
    call.join().unwrap().expect("the call in flight completes");
    assert_eq!(mounted_at(&target), 1);
    assert!(!d.socket.exists(), "socket removed on exit");
    assert!(d.log_text().contains("SIGTERM"), "{}", d.log_text());

    // A new plugin process finds the mount and cleans it up.
    let d2 = Driver::node(&tree, "node-a", &[]);
    d2.node_client()
        .node_publish_volume(&publish_req(&vol, &target, false))
        .unwrap();
    assert_eq!(mounted_at(&target), 1, "a restart does not stack a second mount");
    d2.node_client()
        .node_unpublish_volume(&unpublish_req(&vol, &target))
        .unwrap();
    tree.assert_no_mounts();
}

#[test]
fn socket_is_taken_over_only_when_stale() {
    let tree = Tree::new("socket");
    let d = Driver::controller(&tree, &[]);
    // A second process on a live socket refuses to start.
    let out = std::process::Command::new(BIN)
        .args(["--mode=controller", "--metrics-addr="])
        .arg(format!("--csi-socket={}", d.socket.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another process is serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.identity().probe(&csi::ProbeRequest::new()).unwrap();
    drop(d);

    // After kill -9 the socket file is stale: the next start replaces it.
    assert!(tree.socket("controller").exists());
    let d = Driver::controller(&tree, &[]);
    d.identity().probe(&csi::ProbeRequest::new()).unwrap();
    assert!(d.log_text().contains("removing stale socket"), "{}", d.log_text());

    // Node mode needs a node name.
    let out = std::process::Command::new(BIN)
        .args(["--mode=node", "--metrics-addr="])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-name"));
}

#[test]
fn json_logs_carry_one_request_id_per_call() {
    let tree = Tree::new("jsonlog");
    let d = Driver::node(&tree, "node-a", &["--log-format=json"]);
    let vol = volume_id("pvc-json");
    let target = tree.target("pod1");
    d.node_client()
        .node_publish_volume(&publish_req(&vol, &target, false))
        .unwrap();
    d.node_client()
        .node_unpublish_volume(&unpublish_req(&vol, &target))
        .unwrap();
    let lines: Vec<serde_json::Value> = d
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let publish: Vec<_> = lines
        .iter()
        .filter(|l| l["msg"].as_str().unwrap().contains("NodePublishVolume"))
        .collect();
    assert!(publish.len() >= 2, "request and outcome lines: {publish:#?}");
    let id = &publish[0]["req"];
    assert!(id.as_u64().unwrap() > 0);
    assert!(publish.iter().all(|l| &l["req"] == id), "{publish:#?}");
    assert!(
        lines
            .iter()
            .any(|l| &l["req"] == id && l["msg"].as_str().unwrap().contains("published at")),
        "the work logs under the same id"
    );
    tree.assert_no_mounts();
}

/// One HTTP/1.1 exchange with the metrics endpoint: (status, body).
fn http(addr: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Checks one exposition line of the Prometheus text format (0.0.4).
fn valid_prometheus_line(line: &str) -> bool {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    if let Some(rest) = line.strip_prefix("# HELP ") {
        return rest
            .split_once(' ')
            .is_some_and(|(n, help)| name_ok(n) && !help.is_empty());
    }
    if let Some(rest) = line.strip_prefix("# TYPE ") {
        return rest
            .split_once(' ')
            .is_some_and(|(n, t)| name_ok(n) && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t));
    }
    let (series, value) = match line.rsplit_once(' ') {
        Some(x) => x,
        None => return false,
    };
    let value_ok = value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value);
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.strip_suffix('}')),
        None => (series, Some("")),
    };
    let Some(labels) = labels else { return false };
    let labels_ok = labels.is_empty()
        || labels.split("\",").all(|pair| {
            pair.split_once("=\"")
                .is_some_and(|(k, v)| name_ok(k) && !v.trim_end_matches('"').contains('"'))
        });
    name_ok(name) && value_ok && labels_ok
}

#[test]
fn metrics_after_real_calls_are_valid_prometheus_text() {
    let tree = Tree::new("metrics");
    let d = Driver::node(&tree, "node-a", &["--metrics-addr=127.0.0.1:0"]);
    let addr = d.metrics_addr();
    let n = d.node_client();
    let vol = volume_id("pvc-metrics");
    let target = tree.target("pod1");
    n.node_publish_volume(&publish_req(&vol, &target, false)).unwrap();
    let _ = n.node_publish_volume(&publish_req("bad", &target, false));

    let (status, body) = http(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    for line in body.lines() {
        assert!(valid_prometheus_line(line), "not Prometheus text: {line:?}");
    }
    for want in [
        "node_local_cache_csi_requests_total{method=\"NodePublishVolume\",code=\"OK\"} 1",
        "node_local_cache_csi_requests_total{method=\"NodePublishVolume\",code=\"NOT_FOUND\"} 1",
        "node_local_cache_mount_duration_seconds_count 1",
        "node_local_cache_volume_create_total 1",
        "node_local_cache_active_volumes 1",
        "node_local_cache_build_info{version=\"",
        "node_local_cache_csi_request_duration_seconds_bucket{method=\"NodePublishVolume\",le=\"+Inf\"} 2",
    ] {
        assert!(body.contains(want), "missing {want:?} in:\n{body}");
    }
    assert!(body.contains("\nnode_local_cache_ready 1\n"), "{body}");
    assert_eq!(http(&addr, b"GET /readyz HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(http(&addr, b"GET /livez HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(http(&addr, b"GET /nope HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(&addr, &[b'A'; 20_000]).0, 431, "an oversized request is refused");

    // Clients that connect and say nothing hold no more than the connection cap (beyond it the
    // oldest is closed); CSI calls carry on meanwhile, and the endpoint serves as they leave.
    let idle: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    n.node_unpublish_volume(&unpublish_req(&vol, &target)).unwrap();
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = http(&addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        if status == 200 {
            assert!(body.contains("node_local_cache_active_volumes 0"), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "metrics endpoint did not recover");
        thread::sleep(Duration::from_millis(100));
    }
    tree.assert_no_mounts();
}

/// Every thread of a running node plugin, gRPC's own and the workers included, is under
/// SCHED_BATCH: its wake-ups for a call never preempt the node's workloads.
#[test]
fn every_thread_runs_as_a_batch_task() {
    const SCHED_BATCH: u32 = 3;
    let tree = Tree::new("sched-batch");
    let node = Driver::node(&tree, "node-a", &[]);
    let vol = volume_id("pvc-sched-batch");
    let target = tree.target("pod1");
    let n = node.node_client();
    n.node_publish_volume_opt(&publish_req(&vol, &target, false), opt())
        .unwrap();
    n.node_unpublish_volume_opt(&unpublish_req(&vol, &target), opt())
        .unwrap();
    let tasks = fs::read_dir(format!("/proc/{}/task", node.pid())).unwrap();
    let mut seen = Vec::new();
    for task in tasks {
        let dir = task.unwrap().path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap().trim().to_owned();
        let stat = fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces: the
        // policy is field 41, the 39th after it.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let policy: u32 = after.split(' ').nth(38).unwrap().parse().unwrap();
        seen.push((comm, policy));
    }
    assert!(
        seen.iter().any(|(c, _)| c == "worker-0") && seen.iter().any(|(c, _)| c == "grpc-poll-0"),
        "{seen:?}"
    );
    assert!(seen.iter().all(|&(_, p)| p == SCHED_BATCH), "{seen:?}");
}
