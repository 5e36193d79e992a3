//! The cross-node cleanup protocol against the fake API server: several simulated nodes (each
//! with its own base dir and real bind mounts) and the controller, driven one poll at a time.

mod common;
mod fake_apiserver;

use std::fs;
use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use fake_apiserver::FakeApi;
use grpcio::RpcStatusCode;
use node_local_cache::cleanup::{self, CleanupConfig, CleanupController, NodeAcks, NodeCleaner, FINALIZER};
use node_local_cache::config::{Config, Mode};
use node_local_cache::controller::{ControllerService, Deleter};
use node_local_cache::inflight::InFlight;
use node_local_cache::node::NodeState;
use node_local_cache::proto::csi;
use node_local_cache::server::Rpc;
use node_local_cache::time::Deadline;
use serde_json::json;

const DRIVER: &str = "node-local-cache.csi.io";
const NS: &str = "nlc-system";

struct SimNode {
    name: String,
    tree: Tree,
    state: Arc<NodeState>,
    cleaner: NodeCleaner,
}

impl SimNode {
    fn new(api: &FakeApi, name: &str, cfg: &CleanupConfig) -> SimNode {
        let tree = Tree::new(name);
        let (state, cleaner) = SimNode::start(api, name, &tree, cfg);
        api.add_node(name, DRIVER);
        SimNode {
            name: name.to_owned(),
            tree,
            state,
            cleaner,
        }
    }

    /// The node's plugin started on `tree`: its state and its cleanup poller.
    fn start(api: &FakeApi, name: &str, tree: &Tree, cfg: &CleanupConfig) -> (Arc<NodeState>, NodeCleaner) {
        let mut c = Config::new(Mode::Node);
        c.node_name = name.to_owned();
        c.base_dir = tree.base();
        c.kubelet_dir = tree.kubelet();
        let state = NodeState::new(Arc::new(c), InFlight::default());
        let mut ccfg = cfg.clone();
        ccfg.node_name = name.to_owned();
        let cleaner = NodeCleaner::new(api.client(NS), state.clone(), ccfg);
        (state, cleaner)
    }

    /// The cleanup poller of this node's plugin started again, on the same base dir.
    fn restarted(&self, api: &FakeApi, cfg: &CleanupConfig) -> NodeCleaner {
        SimNode::start(api, &self.name, &self.tree, cfg).1
    }

    /// A pod on this node writes `file` into the volume, then goes away (the copy stays).
    fn use_volume(&self, id: &str, pv: &str, file: &str) {
        let target = self.tree.target(&format!("pod-{file}"));
        let mut req = publish_req(id, &target, false);
        req.volume_context
            .insert(node_local_cache::node::CONTEXT_NAME.into(), pv.into());
        self.state.publish(&req).unwrap();
        fs::write(target.join(file), file).unwrap();
        self.state.unpublish(&unpublish_req(id, &target)).unwrap();
    }

    fn has(&self, id: &str) -> bool {
        self.tree.base().join(id).exists()
    }

    fn poll(&mut self) -> usize {
        self.cleaner.poll_once().unwrap()
    }
}

fn config(timeout: Duration) -> CleanupConfig {
    let mut c = CleanupConfig::new(DRIVER, "");
    c.poll_interval = Duration::from_millis(50);
    c.timeout = timeout;
    c.retention = Duration::from_secs(3600);
    c.orphan_grace = Duration::from_secs(3600);
    c
}

fn record(api: &FakeApi, id: &str) -> Option<serde_json::Value> {
    api.object(&format!("configmaps/{NS}/{}", cleanup::record_name(id)))
}

fn state_of(api: &FakeApi, id: &str) -> String {
    record(api, id)
        .map(|r| {
            r["metadata"]["labels"][cleanup::LABEL]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_else(|| "gone".into())
}

/// What the previous version stored as data keys of a record: its acknowledgements included.
fn data_keys(api: &FakeApi, id: &str) -> Vec<String> {
    let mut keys: Vec<String> = record(api, id)
        .map(|r| r["data"].as_object().unwrap().keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

fn delete(ctl: &CleanupController, id: &str) -> node_local_cache::error::Result<()> {
    ctl.volume_deleted(id, None, Deadline::none())
}

/// The real binary in controller mode against `api`, its passes `poll` apart.
fn controller_binary(api: &FakeApi, tree: &Tree, poll: &str) -> Driver {
    let args = [
        format!("--kube-api-url={}", api.url),
        format!("--kube-token-file={}", api.token_file.display()),
        format!("--kube-ca-file={}", api.ca_file.display()),
        format!("--namespace={NS}"),
        format!("--cleanup-poll-interval={poll}"),
    ];
    Driver::controller(tree, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn api(tag: &str) -> FakeApi {
    FakeApi::start(&std::env::temp_dir().join(format!("nlc-fakeapi-{}-{tag}", std::process::id())))
}

#[test]
fn deleted_volume_is_wiped_on_every_node_and_released() {
    let api = api("all");
    let cfg = config(Duration::from_secs(600));
    let mut nodes: Vec<SimNode> = (0..3).map(|i| SimNode::new(&api, &format!("node-{i}"), &cfg)).collect();
    let id = volume_id("pvc-all");
    api.add_pv("pvc-all", DRIVER, &id);
    for n in &nodes {
        n.use_volume(&id, "pvc-all", "data");
    }
    // Another volume stays untouched throughout.
    let other = volume_id("pvc-other");
    api.add_pv("pvc-other", DRIVER, &other);
    nodes[0].use_volume(&other, "pvc-other", "keep");

    let mut cc = cfg.clone();
    cc.retention = Duration::ZERO;
    let ctl = CleanupController::new(api.client(NS), cc);
    delete(&ctl, &id).unwrap();
    delete(&ctl, &id).unwrap();
    assert_eq!(state_of(&api, &id), "pending");
    assert_eq!(api.pv_finalizers("pvc-all").unwrap(), vec![FINALIZER.to_owned()]);
    // The provisioner deletes the PV next; our finalizer holds it.
    api.delete_pv("pvc-all");
    assert!(api.pv_finalizers("pvc-all").is_some(), "held while nodes clean up");

    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "pending", "no node has acknowledged yet");
    for n in &mut nodes {
        assert_eq!(n.poll(), 1);
        assert!(!n.has(&id), "{} still has the volume", n.name);
    }
    assert_eq!(api.nodes_done(NS, &id), vec!["node-0", "node-1", "node-2"]);
    assert_eq!(
        data_keys(&api, &id),
        vec!["joinedAt", "pv", "requestedAt", "volumeId"],
        "the record holds nothing per node (the repeated DeleteVolume noted when it joined)"
    );
    ctl.poll_once().unwrap();
    assert_eq!(api.pv_finalizers("pvc-all"), None, "the PV is released and gone");
    assert_eq!(state_of(&api, &id), "complete");
    assert_eq!(
        data_keys(&api, &id),
        vec!["completedAt", "pv", "requestedAt", "volumeId"]
    );
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "gone", "the record expires after its retention");
    let index = api.object(&format!("configmaps/{NS}/{}", cleanup::INDEX_NAME)).unwrap();
    assert_eq!(index["data"]["records"], "", "the expired record left the index");
    assert_eq!(
        fs::read(nodes[0].tree.base().join(&other).join("keep")).unwrap(),
        b"keep"
    );
    for n in &nodes {
        n.tree.assert_no_mounts();
    }
}

#[test]
fn a_node_that_was_down_cleans_up_when_it_returns() {
    let api = api("down");
    let cfg = config(Duration::from_secs(5));
    let mut nodes: Vec<SimNode> = (0..3).map(|i| SimNode::new(&api, &format!("node-{i}"), &cfg)).collect();
    let id = volume_id("pvc-down");
    api.add_pv("pvc-down", DRIVER, &id);
    for n in &nodes {
        n.use_volume(&id, "pvc-down", "data");
    }
    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    delete(&ctl, &id).unwrap();
    nodes[0].poll();
    nodes[1].poll();
    ctl.poll_once().unwrap();
    assert_eq!(
        state_of(&api, &id),
        "pending",
        "node-2 has not acknowledged and the timeout has not passed: {}",
        record(&api, &id).unwrap()
    );
    std::thread::sleep(Duration::from_millis(5100));
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "complete", "the timeout releases the volume");
    assert_eq!(api.pv_finalizers("pvc-down").unwrap(), Vec::<String>::new());
    // node-2 comes back: the tombstone tells it to clean up.
    assert!(nodes[2].has(&id));
    assert_eq!(nodes[2].poll(), 1);
    assert!(!nodes[2].has(&id));
    assert_eq!(nodes[2].poll(), 0, "nothing left to do");
}

#[test]
fn rapid_create_delete_create_keeps_the_new_volume() {
    let api = api("rapid");
    let cfg = config(Duration::from_millis(200));
    let mut a = SimNode::new(&api, "node-a", &cfg);
    let mut b = SimNode::new(&api, "node-b", &cfg);
    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    let controller = ControllerService::new(Rpc::new(1, 8), Some(ctl.clone() as Arc<dyn Deleter>));
    let none = Deadline::none();

    let id = controller
        .create(&create_req("pvc-rapid", 0), &none)
        .unwrap()
        .volume
        .volume_id
        .clone();
    api.add_pv("pvc-rapid", DRIVER, &id);
    a.use_volume(&id, "pvc-rapid", "old");
    b.use_volume(&id, "pvc-rapid", "old");
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = id.clone();
    api.clear_log();
    controller.delete(&del, &none).unwrap();
    assert!(
        !api.requests()
            .iter()
            .any(|(m, p)| m == "GET" && p.starts_with("/api/v1/persistentvolumes?")),
        "the PV is found by the name CreateVolume was given, not by a scan: {:?}",
        api.requests()
    );
    // While the cleanup runs, the same name cannot come back.
    let err = controller.create(&create_req("pvc-rapid", 0), &none).unwrap_err();
    assert_eq!(err.code(), RpcStatusCode::UNAVAILABLE, "{err}");
    a.poll();
    assert!(!a.has(&id));
    std::thread::sleep(Duration::from_millis(250));
    ctl.poll_once().unwrap();
    assert_eq!(
        state_of(&api, &id),
        "complete",
        "released by the timeout; node-b was away"
    );

    // Created again under the same name (same id), used on node-a.
    assert_eq!(
        controller
            .create(&create_req("pvc-rapid", 0), &none)
            .unwrap()
            .volume
            .volume_id,
        id
    );
    std::thread::sleep(Duration::from_millis(5));
    a.use_volume(&id, "pvc-rapid", "new");
    // node-b returns and removes only the old incarnation; node-a keeps the new one.
    b.poll();
    a.poll();
    assert!(!b.has(&id));
    assert_eq!(fs::read(a.tree.base().join(&id).join("new")).unwrap(), b"new");
    assert!(!a.tree.base().join(&id).join("old").exists());
}

#[test]
fn api_outage_delays_but_never_breaks_cleanup() {
    let api = api("outage");
    let cfg = config(Duration::from_secs(600));
    let mut nodes: Vec<SimNode> = (0..2).map(|i| SimNode::new(&api, &format!("node-{i}"), &cfg)).collect();
    let id = volume_id("pvc-outage");
    let live = volume_id("pvc-live");
    api.add_pv("pvc-outage", DRIVER, &id);
    api.add_pv("pvc-live", DRIVER, &live);
    for n in &nodes {
        n.use_volume(&id, "pvc-outage", "data");
        n.use_volume(&live, "pvc-live", "live");
    }
    let ctl = CleanupController::new(api.client(NS), cfg.clone());

    // DeleteVolume during an outage is refused with a retryable code, never a silent OK.
    api.with(|s| {
        s.faults.fail_next = 100;
        s.faults.fail_status = 503;
    });
    let err = delete(&ctl, &id).unwrap_err();
    assert_eq!(err.code(), RpcStatusCode::UNAVAILABLE, "{err}");
    assert!(err.to_string().contains(&id));
    api.with(|s| s.faults.fail_next = 0);
    delete(&ctl, &id).unwrap();

    // 500s and then answers slower than the client's timeout: polls fail, nothing is deleted.
    api.with(|s| {
        s.faults.fail_next = 20;
        s.faults.fail_status = 500;
    });
    for n in &mut nodes {
        assert!(n.cleaner.poll_once().is_err());
        assert!(n.has(&id));
    }
    api.with(|s| {
        s.faults.fail_next = 0;
        s.faults.delay = Some(Duration::from_millis(2500));
    });
    assert!(nodes[0].cleaner.poll_once().is_err(), "timed out");
    assert!(nodes[0].has(&id));
    api.with(|s| s.faults.delay = None);

    // Recovered: cleanup completes; the live volume is untouched everywhere.
    for n in &mut nodes {
        n.poll();
        assert!(!n.has(&id));
        assert_eq!(fs::read(n.tree.base().join(&live).join("live")).unwrap(), b"live");
    }
    // A 409 storm on the PV finalizer is retried through.
    api.with(|s| s.faults.conflict_next = 3);
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "complete");
    assert_eq!(api.pv_finalizers("pvc-outage").unwrap(), Vec::<String>::new());
    assert_eq!(api.pv_finalizers("pvc-live").unwrap(), Vec::<String>::new());
}

#[test]
fn rotated_token_is_picked_up() {
    let api = api("token");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    n.poll();
    api.rotate_token("token-2");
    n.poll();
    let ctl = CleanupController::new(api.client(NS), cfg);
    ctl.poll_once().unwrap();
    // The old token is refused outright.
    api.with(|s| s.token = "token-3".into());
    assert!(n.cleaner.poll_once().is_err());
}

/// The cluster's CA rotated (kubelet rewrites the projected `ca.crt`; the API server then
/// presents a certificate of the new CA): the next calls trust the new CA without a restart.
#[test]
fn a_rotated_api_ca_is_picked_up() {
    let api = api("ca");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    n.poll();
    let ctl = CleanupController::new(api.client(NS), cfg);
    ctl.poll_once().unwrap();
    api.rotate_ca();
    n.cleaner.poll_once().expect("a node polls after the CA rotated");
    ctl.poll_once().expect("the controller polls after the CA rotated");
}

#[test]
fn symlinks_inside_a_volume_never_lead_the_deletion_outside() {
    let api = api("symlink");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    let id = volume_id("pvc-link");
    api.add_pv("pvc-link", DRIVER, &id);
    let outside = n.tree.root.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), b"keep").unwrap();
    n.use_volume(&id, "pvc-link", "data");
    let vol = n.tree.base().join(&id);
    symlink(&outside, vol.join("escape-dir")).unwrap();
    symlink(outside.join("precious"), vol.join("escape-file")).unwrap();
    fs::create_dir_all(vol.join("a/b")).unwrap();
    symlink("../../../../outside", vol.join("a/b/up")).unwrap();

    delete(&CleanupController::new(api.client(NS), cfg), &id).unwrap();
    assert_eq!(n.poll(), 1);
    assert!(!vol.exists());
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"keep");
}

#[test]
fn a_mounted_volume_waits_until_unmounted() {
    let api = api("mounted");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    let id = volume_id("pvc-mounted");
    api.add_pv("pvc-mounted", DRIVER, &id);
    let target = n.tree.target("busy-pod");
    n.state.publish(&publish_req(&id, &target, false)).unwrap();
    fs::write(target.join("in-use"), b"x").unwrap();
    delete(&CleanupController::new(api.client(NS), cfg), &id).unwrap();
    assert_eq!(n.poll(), 0);
    assert_eq!(
        fs::read(target.join("in-use")).unwrap(),
        b"x",
        "data in use is never deleted"
    );
    assert!(api.nodes_done(NS, &id).is_empty(), "no ack while mounted");
    n.state.unpublish(&unpublish_req(&id, &target)).unwrap();
    assert_eq!(n.poll(), 1);
    assert!(!n.has(&id));
    assert_eq!(api.nodes_done(NS, &id), vec!["node-0"]);
    n.tree.assert_no_mounts();
}

#[test]
fn orphans_go_after_the_grace_and_retained_volumes_stay() {
    let api = api("orphan");
    let mut cfg = config(Duration::from_secs(600));
    cfg.orphan_grace = Duration::from_millis(200);
    let mut n = SimNode::new(&api, "node-0", &cfg);
    let orphan = volume_id("pvc-orphan");
    let retained = volume_id("pvc-retained");
    let unnamed = volume_id("pvc-unnamed");
    api.add_pv("pvc-retained", DRIVER, &retained);
    n.use_volume(&orphan, "pvc-orphan", "x");
    n.use_volume(&retained, "pvc-retained", "x");
    // A dir that does not know its PV's name is checked against the PV list, page by page.
    fs::create_dir(n.tree.base().join(&unnamed)).unwrap();
    assert_eq!(n.poll(), 0, "first sighting starts the grace period");
    assert!(n.has(&orphan) && n.has(&unnamed));
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(n.poll(), 2);
    assert!(!n.has(&orphan) && !n.has(&unnamed));
    assert!(n.has(&retained), "a volume with a live PV is never an orphan");
    let pv_lists = api
        .requests()
        .iter()
        .filter(|(m, p)| m == "GET" && p.starts_with("/api/v1/persistentvolumes?"))
        .count();
    assert!(pv_lists >= 1);
}

/// The PV requests made since the log was cleared: (method, path).
fn pv_requests(api: &FakeApi) -> Vec<(String, String)> {
    api.requests()
        .into_iter()
        .filter(|(_, p)| p.starts_with("/api/v1/persistentvolumes"))
        .collect()
}

#[test]
fn orphan_checks_skip_mounted_copies_and_remember_what_a_scan_found() {
    let api = api("orphan-cost");
    let mut cfg = config(Duration::from_secs(600));
    cfg.orphan_grace = Duration::from_millis(200);
    let mut n = SimNode::new(&api, "node-0", &cfg);
    let mounted = volume_id("pvc-mounted");
    let unnamed = volume_id("pvc-unnamed");
    api.add_pv("pvc-mounted", DRIVER, &mounted);
    api.add_pv("pvc-unnamed", DRIVER, &unnamed);
    let target = n.tree.target("pod-mounted");
    let mut req = publish_req(&mounted, &target, false);
    req.volume_context
        .insert(node_local_cache::node::CONTEXT_NAME.into(), "pvc-mounted".into());
    n.state.publish(&req).unwrap();
    // Made by a version that recorded no name.
    fs::create_dir(n.tree.base().join(&unnamed)).unwrap();

    api.clear_log();
    assert_eq!(n.poll(), 0);
    let first = pv_requests(&api);
    assert_eq!(
        first.len(),
        1,
        "one scan for the unnamed copy, nothing for the mounted one: {first:?}"
    );
    assert!(first[0].1.starts_with("/api/v1/persistentvolumes?"));
    assert_eq!(
        n.state.meta(&unnamed).unwrap().name,
        "pvc-unnamed",
        "the scan's find is recorded"
    );

    std::thread::sleep(Duration::from_millis(60));
    api.clear_log();
    n.poll();
    assert_eq!(
        pv_requests(&api),
        vec![("GET".to_owned(), "/api/v1/persistentvolumes/pvc-unnamed".to_owned())],
        "a later pass asks for the recorded PV alone"
    );

    // Gone PV, mounted copy: kept as long as it is mounted, however long that is.
    api.delete_pv("pvc-mounted");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(n.poll(), 0);
    }
    assert!(n.has(&mounted), "a mounted copy is never an orphan");
    n.state.unpublish(&unpublish_req(&mounted, &target)).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(n.poll(), 0, "unmounted: the grace starts now");
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(n.poll(), 1);
    assert!(!n.has(&mounted) && n.has(&unnamed));
    n.tree.assert_no_mounts();
}

#[test]
fn every_list_is_served_from_the_watch_cache() {
    let api = api("cache");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    // The controller keeps the index the nodes read.
    CleanupController::new(api.client(NS), cfg.clone()).poll_once().unwrap();
    api.clear_log();
    for _ in 0..5 {
        n.poll();
    }
    let log = api.requests();
    assert_eq!(log.len(), 5, "an idle node makes one request per poll: {log:?}");
    assert!(
        log.iter().all(|(m, p)| m == "GET" && p.contains("resourceVersion=0")),
        "{log:?}"
    );
}

/// The real binaries, wired to the fake API by flags: DeleteVolume over gRPC ends with the
/// node's copy gone and the PV released.
#[test]
fn binaries_run_the_protocol_end_to_end() {
    let api = api("binaries");
    let tree = Tree::new("cleanup-e2e");
    let kube_flags = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("--kube-api-url={}", api.url),
            format!("--kube-token-file={}", api.token_file.display()),
            format!("--kube-ca-file={}", api.ca_file.display()),
            format!("--namespace={NS}"),
            "--cleanup-poll-interval=200ms".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let ctl = Driver::controller(&tree, &kube_flags(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    let node_args = kube_flags(&[]);
    let node = Driver::node(
        &tree,
        "node-0",
        &node_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    api.add_node("node-0", DRIVER);

    let created = ctl
        .controller_client()
        .create_volume(&create_req("pvc-e2e", 0))
        .unwrap();
    let v = created.volume.unwrap();
    api.add_pv("pvc-e2e", DRIVER, &v.volume_id);
    let target = tree.target("pod1");
    let mut req = publish_req(&v.volume_id, &target, false);
    req.volume_context = v.volume_context.clone();
    node.node_client().node_publish_volume(&req).unwrap();
    fs::write(target.join("f"), b"x").unwrap();
    node.node_client()
        .node_unpublish_volume(&unpublish_req(&v.volume_id, &target))
        .unwrap();
    assert!(tree.base().join(&v.volume_id).exists());

    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = v.volume_id.clone();
    ctl.controller_client().delete_volume(&del).unwrap();
    api.delete_pv("pvc-e2e");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tree.base().join(&v.volume_id).exists() || state_of(&api, &v.volume_id) != "complete" {
        assert!(
            std::time::Instant::now() < deadline,
            "cleanup did not finish; node log:\n{}\ncontroller log:\n{}",
            node.log_text(),
            ctl.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api.pv_finalizers("pvc-e2e"), None, "the PV is released and gone");
    tree.assert_no_mounts();
}

/// One record whose writes are always refused (an admission webhook, say) must not hold up the
/// others: both other volumes are wiped everywhere, completed and released, and the failure is
/// counted. Before, every pass stopped at the first failed request, so the record that sorts
/// first blocked all the rest, forever.
#[test]
fn one_refused_record_does_not_stop_the_others() {
    let api = api("refused");
    let cfg = config(Duration::from_secs(600));
    let mut nodes: Vec<SimNode> = (0..2).map(|i| SimNode::new(&api, &format!("node-{i}"), &cfg)).collect();
    let mut vols: Vec<(String, String)> = ["pvc-r1", "pvc-r2", "pvc-r3"]
        .iter()
        .map(|pv| (volume_id(pv), pv.to_string()))
        .collect();
    // The refused record is the one every pass meets first.
    vols.sort();
    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    for (id, pv) in &vols {
        api.add_pv(pv, DRIVER, id);
        for n in &nodes {
            n.use_volume(id, pv, "data");
        }
        delete(&ctl, id).unwrap();
    }
    let refused = &vols[0].0;
    let path = format!("/api/v1/namespaces/{NS}/configmaps/{}", cleanup::record_name(refused));
    api.with(|s| s.faults.refuse.push(("PATCH".into(), path, 403)));
    let errors_before = node_local_cache::metrics::cleanup_errors("complete");
    for _ in 0..3 {
        for n in &mut nodes {
            let _ = n.cleaner.poll_once();
        }
        let _ = ctl.poll_once();
    }
    for (id, pv) in &vols[1..] {
        assert_eq!(state_of(&api, id), "complete", "{pv}");
        assert_eq!(api.pv_finalizers(pv).unwrap(), Vec::<String>::new(), "{pv} released");
        for n in &nodes {
            assert!(!n.has(id), "{} still has {pv}", n.name);
        }
    }
    assert_eq!(state_of(&api, refused), "pending", "its completion is refused");
    assert!(node_local_cache::metrics::cleanup_errors("complete") >= errors_before + 3);
}

/// A cluster upgraded from the version that kept acknowledgements in the record (`ack.<node>`
/// keys) and had no index: its pending record completes from old and new acknowledgements, its
/// tombstone still reaches a node that was away, and the completed record drops the old keys.
#[test]
fn a_record_written_by_the_previous_version_is_still_cleaned_up() {
    let api = api("upgrade");
    let cfg = config(Duration::from_secs(600));
    let mut fresh = SimNode::new(&api, "node-new", &cfg);
    // node-old acknowledged before its plugin was upgraded, and is down now.
    api.add_node("node-old", DRIVER);
    let (pending, tombstone) = (volume_id("pvc-old-pending"), volume_id("pvc-old-done"));
    api.add_pv("pvc-old-pending", DRIVER, &pending);
    fresh.use_volume(&pending, "pvc-old-pending", "data");
    fresh.use_volume(&tombstone, "pvc-old-done", "data");
    std::thread::sleep(Duration::from_millis(5));
    let now = node_local_cache::time::format(std::time::SystemTime::now());
    let legacy = |id: &str, pv: &str, complete: bool| {
        let mut obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": cleanup::record_name(id), "labels": { cleanup::LABEL: if complete { "complete" } else { "pending" } } },
            "data": { "volumeId": id, "requestedAt": now, "pv": pv, "ack.node-old": now },
        });
        if complete {
            obj["data"]["completedAt"] = now.clone().into();
        }
        api.put_configmap(NS, obj, "node-local-cache");
    };
    legacy(&pending, "pvc-old-pending", false);
    legacy(&tombstone, "pvc-old-done", true);
    let pv = api.object("persistentvolumes//pvc-old-pending").unwrap();
    let mut held = pv.clone();
    held["metadata"]["finalizers"] = json!([FINALIZER]);
    api.with(|s| s.objects.insert("persistentvolumes//pvc-old-pending".into(), held));

    // New node, no index yet (the controller is still the old one): it reads the records.
    assert_eq!(fresh.poll(), 2);
    assert!(!fresh.has(&pending) && !fresh.has(&tombstone));
    assert_eq!(api.nodes_done(NS, &pending), vec!["node-new"]);
    // New controller: node-old's legacy key and node-new's object make everyone.
    let ctl = CleanupController::new(api.client(NS), cfg);
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &pending), "complete");
    assert_eq!(api.pv_finalizers("pvc-old-pending").unwrap(), Vec::<String>::new());
    assert_eq!(
        data_keys(&api, &pending),
        vec!["completedAt", "pv", "requestedAt", "volumeId"],
        "the tombstone keeps nothing per node"
    );
    let index = api.object(&format!("configmaps/{NS}/{}", cleanup::INDEX_NAME)).unwrap();
    let lines: Vec<&str> = index["data"]["records"].as_str().unwrap().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l.ends_with(" complete")), "{lines:?}");
    api.clear_log();
    assert_eq!(fresh.poll(), 0);
    assert_eq!(api.requests().len(), 1, "the index now answers the poll");
}

/// Two node plugins on one base dir (a second install with its default base dir, a plugin
/// started by hand) would each take the other's copies for their own, trimming, evicting and
/// collecting them under locks the other cannot see. The second refuses to start: it serves
/// nothing and asks the API nothing. Once the first has stopped, a new one starts.
#[test]
fn a_second_node_plugin_on_the_same_base_dir_refuses_to_start() {
    let api = api("second");
    let tree = Tree::new("second-plugin");
    let flags = |poll: &str| {
        vec![
            format!("--kube-api-url={}", api.url),
            format!("--kube-token-file={}", api.token_file.display()),
            format!("--kube-ca-file={}", api.ca_file.display()),
            format!("--namespace={NS}"),
            format!("--cleanup-poll-interval={poll}"),
        ]
    };
    let first_flags = flags("1h");
    let mut first = Driver::node(
        &tree,
        "node-0",
        &first_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let start = Instant::now();
    while api.requests().is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    api.clear_log();

    let second_socket = tree.socket("second");
    let mut second = std::process::Command::new(BIN)
        .args([
            "--mode=node",
            "--node-name=node-0",
            "--metrics-addr=",
            "--eviction-interval=100ms",
        ])
        .arg(format!("--base-dir={}", tree.base().display()))
        .arg(format!("--kubelet-dir={}", tree.kubelet().display()))
        .arg(format!("--csi-socket={}", second_socket.display()))
        .args(flags("100ms"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(10) {
            second.kill().unwrap();
            second.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second plugin kept running ({status:?}); its log:\n{stderr}"
    );
    assert!(
        stderr.contains("another node plugin") && stderr.contains(&tree.base().display().to_string()),
        "{stderr}"
    );
    assert!(!second_socket.exists(), "it never served");
    assert_eq!(api.requests(), vec![], "it asked the API nothing");

    first.identity().probe(&csi::ProbeRequest::new()).unwrap();
    first.terminate();
    drop(first);
    let again = Driver::node(
        &tree,
        "node-0",
        &first_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    again.identity().probe(&csi::ProbeRequest::new()).unwrap();
}

/// A record that cannot be read (edited by hand: no volume id, no request time) holds its PV's
/// finalizer for good, since no pass can complete it. The controller says so: the pass counts it
/// under `cleanup_errors_total{reason="record"}` (and logs it once), and goes on with the others.
#[test]
fn an_unreadable_record_is_reported_and_the_others_still_complete() {
    let api = api("unreadable");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    let ctl = CleanupController::new(api.client(NS), cfg);
    let id = volume_id("pvc-readable");
    api.add_pv("pvc-readable", DRIVER, &id);
    api.put_configmap(
        NS,
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": "nlc-cleanup-edited", "labels": { cleanup::LABEL: "pending" } },
            "data": { "volumeId": "not-a-volume-id" },
        }),
        "kubectl-edit",
    );
    delete(&ctl, &id).unwrap();
    n.poll();
    let before = node_local_cache::metrics::cleanup_errors("record");
    ctl.poll_once().unwrap();
    assert_eq!(node_local_cache::metrics::cleanup_errors("record"), before + 1);
    assert_eq!(state_of(&api, &id), "complete", "the readable record completed");
}

/// csi-provisioner gives DeleteVolume a deadline (its --timeout); once it has passed, the
/// driver starts no further API request and leaves no half-written record behind: a retry with
/// time enough finishes the job.
#[test]
fn delete_volume_stops_at_the_callers_deadline() {
    let api = api("deadline");
    let tree = Tree::new("cleanup-deadline");
    let ctl = controller_binary(&api, &tree, "1h");
    let id = volume_id("pvc-deadline");
    api.add_pv("pvc-deadline", DRIVER, &id);
    // The controller's first pass (at start, it writes the index) is over before the slow API
    // sets in.
    let index = format!("configmaps/{NS}/{}", cleanup::INDEX_NAME);
    let start = std::time::Instant::now();
    while api.object(&index).is_none() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    api.with(|s| s.faults.delay = Some(Duration::from_millis(1500)));
    api.clear_log();
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = id.clone();
    let timeout = Duration::from_secs(2);
    let sent = std::time::Instant::now();
    let err = ctl
        .controller_client()
        .delete_volume_opt(&del, grpcio::CallOption::default().timeout(timeout))
        .unwrap_err();
    assert!(
        matches!(&err, grpcio::Error::RpcFailure(s) if s.code() == RpcStatusCode::DEADLINE_EXCEEDED),
        "{err:?}"
    );
    // Long enough for a driver that kept going to make every call of a DeleteVolume.
    std::thread::sleep(Duration::from_secs(6));
    let late: Vec<_> = api
        .arrivals()
        .into_iter()
        .filter(|(_, _, at)| at.duration_since(sent) > timeout + Duration::from_millis(500))
        .map(|(m, p, at)| format!("{m} {p} at {:?}", at.duration_since(sent)))
        .collect();
    assert!(late.is_empty(), "requests after the caller's deadline: {late:?}");
    assert!(
        matches!(state_of(&api, &id).as_str(), "gone" | "pending"),
        "a record is whole or absent"
    );
    api.with(|s| s.faults.delay = None);
    ctl.controller_client().delete_volume(&del).unwrap();
    assert_eq!(state_of(&api, &id), "pending");
    assert_eq!(api.pv_finalizers("pvc-deadline").unwrap(), vec![FINALIZER.to_owned()]);
    assert!(ctl.log_text().contains("deadline passed"), "{}", ctl.log_text());
}

/// The controller reads the CSINodes and the nodes' objects a page at a time (500 a page): a node
/// on the second page that has not finished holds the record, and its report releases it.
#[test]
fn acknowledgements_are_read_past_the_first_page() {
    let api = api("pages");
    let cfg = config(Duration::from_secs(600));
    let id = volume_id("pvc-pages");
    api.add_pv("pvc-pages", DRIVER, &id);
    let ctl = CleanupController::new(api.client(NS), cfg);
    delete(&ctl, &id).unwrap();
    let deletion = cleanup::CleanupRecord::parse(&record(&api, &id).unwrap())
        .unwrap()
        .deletion;
    let report = |i: usize| {
        let acks = NodeAcks {
            node: format!("node-{i:04}"),
            done: [deletion.clone()].into(),
        };
        api.put_configmap(NS, acks.new_object(), "node-local-cache");
    };
    const NODES: usize = 1203;
    for i in 0..NODES {
        api.add_node(&format!("node-{i:04}"), DRIVER);
        if i != NODES - 1 {
            report(i);
        }
    }
    api.clear_log();
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "pending", "the last node has not finished");
    let pages = |what: &str| {
        api.requests()
            .iter()
            .filter(|(m, p)| m == "GET" && p.contains(what) && p.contains("limit=500"))
            .count()
    };
    assert_eq!(pages("/csinodes"), 3);
    assert_eq!(pages("cleanup-node"), 3);
    report(NODES - 1);
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "complete");
    assert_eq!(api.pv_finalizers("pvc-pages").unwrap(), Vec::<String>::new());
}

/// Deletions no index listed in the model of an outgrown index: the newest of `outgrown`'s.
const NEVER_LISTED: usize = 500;

/// 16,500 tombstones of the last 23 hours (~16,400 deletions in the retention outgrow the 1 MiB a
/// ConfigMap may hold: CI clusters with a PVC per build), and the index as it was while it still
/// fit: the newest `NEVER_LISTED` deletions came after it. Returns their ids, newest first.
fn outgrown(api: &FakeApi) -> Vec<String> {
    const TOMBSTONES: usize = 16_500;
    let now = SystemTime::now();
    let span = Duration::from_secs(23 * 3600);
    let mut listed = Vec::new();
    let mut never_listed = Vec::new();
    for k in 0..TOMBSTONES {
        let id = volume_id(&format!("pvc-ci-{k}"));
        let requested = now - span.mul_f64((k + 1) as f64 / TOMBSTONES as f64);
        api.put_tombstone(NS, &id, requested);
        if k >= NEVER_LISTED {
            listed.push((id, requested));
        } else {
            never_listed.push(id);
        }
    }
    api.put_index(NS, &listed);
    never_listed
}

/// Past the 1 MiB a ConfigMap may hold, the index cannot list every tombstone. A new deletion
/// must still reach a node that polls along and one that reads for the first time, within a poll.
#[test]
fn a_deletion_reaches_the_nodes_when_the_tombstones_outgrow_a_configmap() {
    let api = api("outgrown");
    let mut cfg = config(Duration::from_secs(600));
    cfg.retention = Duration::from_secs(24 * 3600);
    outgrown(&api);
    let mut polling = SimNode::new(&api, "node-polling", &cfg);
    polling.poll();

    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    ctl.poll_once().unwrap();
    let id = volume_id("pvc-new");
    api.add_pv("pvc-new", DRIVER, &id);
    polling.use_volume(&id, "pvc-new", "data");
    let mut fresh = SimNode::new(&api, "node-fresh", &cfg);
    fresh.use_volume(&id, "pvc-new", "data");
    delete(&ctl, &id).unwrap();
    polling.poll();
    assert!(!polling.has(&id), "a node polling along cleaned up");
    fresh.poll();
    assert!(!fresh.has(&id), "a node reading for the first time cleaned up");

    // A DeleteVolume this soon after the pass's write leaves its line to the next write.
    ctl.poll_once().unwrap();
    let key = format!("configmaps/{NS}/{}", cleanup::INDEX_NAME);
    let stored = api.object(&key).unwrap();
    let listed = stored["data"]["records"].as_str().unwrap();
    assert!(listed.len() <= 512 * 1024, "index of {} bytes", listed.len());
    assert!(listed.contains(&id), "the new deletion is listed");
}

/// Through a namespace teardown the controller writes the index at most every 5 s outside its
/// passes: a DeleteVolume that comes sooner leaves its line, and the controller's run loop
/// writes it within those 5 s, without waiting for its next pass.
#[test]
fn a_deletion_left_out_of_an_index_write_is_listed_within_seconds() {
    let api = api("coalesce");
    let tree = Tree::new("cleanup-coalesce");
    let ctl = controller_binary(&api, &tree, "1h");
    let key = format!("configmaps/{NS}/{}", cleanup::INDEX_NAME);
    let listed = |id: &str| {
        api.object(&key)
            .and_then(|o| o["data"]["records"].as_str().map(|r| r.contains(id)))
            .unwrap_or(false)
    };
    let start = Instant::now();
    while api.object(&key).is_none() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let passes = || {
        api.requests()
            .iter()
            .filter(|(m, p)| {
                m == "GET"
                    && p.contains("labelSelector=node-local-cache.csi.io%2Fcleanup")
                    && !p.contains("cleanup-node")
            })
            .count()
    };
    let passes_before = passes();
    let written = Instant::now();
    let ids: Vec<String> = (0..3).map(|k| volume_id(&format!("pvc-coalesce-{k}"))).collect();
    let sent = Instant::now();
    for id in &ids {
        let mut del = csi::DeleteVolumeRequest::new();
        del.volume_id = id.clone();
        ctl.controller_client().delete_volume(&del).unwrap();
    }
    if written.elapsed() < Duration::from_secs(4) {
        assert!(
            !ids.iter().all(|id| listed(id)),
            "deletions this soon after the pass's write are not written at once"
        );
    }
    while !ids.iter().all(|id| listed(id)) {
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the index does not list every deletion: {}",
            ctl.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("listed {:?} after the first DeleteVolume", sent.elapsed());
    assert_eq!(passes(), passes_before, "written between passes");
}

/// A deletion no index listed that is already past the budget when a pass first trims (older
/// than 20 minutes) raises coversFrom, so that every node lists the records. A node that did not
/// poll between that pass and the next (passes come 15–45 s apart, polls every 30–33 s) must
/// still learn of it after the next pass; otherwise its copy waits for orphan collection.
#[test]
fn a_deletion_never_in_the_index_reaches_a_node_that_did_not_poll_between_two_passes() {
    let api = api("raised");
    let mut cfg = config(Duration::from_secs(600));
    cfg.retention = Duration::from_secs(24 * 3600);
    let never_listed = outgrown(&api);
    // The oldest of them, ~42 minutes old: the first trim leaves it out.
    let id = never_listed.last().unwrap();
    let mut node = SimNode::new(&api, "node-between", &cfg);
    // A copy made before the deletion (no meta record: any deletion of it applies).
    fs::create_dir(node.tree.base().join(id)).unwrap();
    node.poll();
    assert!(node.has(id), "the index the node trusts does not list the deletion");

    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    ctl.poll_once().unwrap();
    ctl.poll_once().unwrap();
    let index = api.object(&format!("configmaps/{NS}/{}", cleanup::INDEX_NAME)).unwrap();
    assert!(
        !index["data"]["records"].as_str().unwrap().contains(id.as_str()),
        "the index leaves the deletion out"
    );
    node.poll();
    assert!(
        !node.has(id),
        "the node trusted an index that never listed the deletion (coversFrom {})",
        cleanup::IndexEntry::covers_from(&index)
    );
}

/// Autoscaled clusters replace nodes every day. The object of a node that left is deleted once
/// its CSINode has been missing at two sweeps ten minutes or more apart; the objects of nodes
/// still there stay, whatever drivers their CSINode lists (a plugin restarting is unlisted for a
/// moment), and so does that of a node back before the second sweep. An object that changed
/// since the sweep listed it is not deleted.
#[test]
fn objects_of_nodes_that_left_the_cluster_are_deleted() {
    let api = api("nodes-left");
    let cfg = config(Duration::from_secs(60));
    let names = ["node-a", "node-gone", "node-restarting", "node-back"];
    let mut nodes: Vec<SimNode> = names.iter().map(|n| SimNode::new(&api, n, &cfg)).collect();
    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    let (id, pv) = (volume_id("pvc-left"), "pvc-left");
    api.add_pv(pv, DRIVER, &id);
    for n in &nodes {
        n.use_volume(&id, pv, "f");
    }
    delete(&ctl, &id).unwrap();
    for n in &mut nodes {
        n.poll();
    }
    let object = |node: &str| api.object(&format!("configmaps/{NS}/{}", cleanup::node_object_name(node)));
    for n in names {
        assert!(object(n).is_some(), "{n} reported its cleanup");
    }

    api.remove_node("node-gone");
    api.remove_node("node-back");
    api.with(|s| s.objects.get_mut("csinodes//node-restarting").unwrap()["spec"]["drivers"] = json!([]));
    let t0 = Instant::now();
    let hour = Duration::from_secs(3600);
    ctl.poll_once_at(t0).unwrap();
    ctl.poll_once_at(t0 + hour).unwrap();
    assert!(
        object("node-gone").is_some(),
        "a node missing at one sweep only is not gone yet"
    );
    api.add_node("node-back", DRIVER);

    ctl.poll_once_at(t0 + hour + Duration::from_secs(30)).unwrap();
    assert!(object("node-gone").is_some(), "the next sweep is an hour away");
    ctl.poll_once_at(t0 + 2 * hour).unwrap();
    assert!(
        object("node-gone").is_none(),
        "the object of a node gone for an hour is deleted"
    );
    assert!(object("node-a").is_some());
    assert!(
        object("node-restarting").is_some(),
        "a CSINode without the driver is a node still there"
    );
    assert!(
        object("node-back").is_some(),
        "a node back before the second sweep keeps its object"
    );

    // The precondition: an object written since it was listed stays.
    let client = api.client(NS);
    let name = cleanup::node_object_name("node-a");
    let current = object("node-a").unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!client.delete_configmap_at(&name, "1").unwrap());
    assert!(object("node-a").is_some(), "a stale resourceVersion deletes nothing");
    assert!(client.delete_configmap_at(&name, &current).unwrap());
    assert!(object("node-a").is_none());
}

/// A rollout restarts the plugin on every node. A node that went through the deletions before
/// its restart trusts a trimmed index after it, as it did before (one small GET instead of a list
/// of every record of the retention); one whose last complete pass is older than what the index
/// leaves out, or that never noted one (a base dir of an earlier version), lists the records.
#[test]
fn a_restarted_node_trusts_the_index_it_read_before() {
    let api = api("restarted");
    let mut cfg = config(Duration::from_secs(600));
    cfg.retention = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let day = Duration::from_secs(23 * 3600);
    let deletions: Vec<(String, SystemTime)> = (0..1000)
        .map(|k| {
            let requested = now - day.mul_f64((k as f64 + 0.5) / 1000.0);
            let id = volume_id(&format!("pvc-day-{k}"));
            api.put_tombstone(NS, &id, requested);
            (id, requested)
        })
        .collect();
    // As the controller keeps it: each deletion was listed while new, and the trim leaves out
    // old ones nodes polling along have read.
    api.put_index(NS, &deletions);
    let ctl = CleanupController::new(api.client(NS), cfg.clone());
    ctl.poll_once().unwrap();
    let index = api.object(&format!("configmaps/{NS}/{}", cleanup::INDEX_NAME)).unwrap();
    assert!(
        cleanup::IndexEntry::covers_from(&index) > 0,
        "the index leaves out old deletions"
    );
    let lists = |from: usize| {
        api.requests_since(from)
            .iter()
            .filter(|(m, p)| m == "GET" && p.contains("labelSelector="))
            .count()
    };
    let mut node = SimNode::new(&api, "node-r", &cfg);
    let from = api.request_count();
    node.poll();
    assert_eq!(lists(from), 1, "a node's first pass lists the records");

    let from = api.request_count();
    node.restarted(&api, &cfg).poll_once().unwrap();
    assert_eq!(lists(from), 0, "a restarted node reads the index only");

    let note = node.tree.base().join(".meta").join("cleanup-read");
    fs::File::options()
        .write(true)
        .open(&note)
        .unwrap()
        .set_modified(now - 2 * Duration::from_secs(24 * 3600))
        .unwrap();
    let from = api.request_count();
    node.restarted(&api, &cfg).poll_once().unwrap();
    assert_eq!(lists(from), 1, "a last complete pass two days ago does not count");

    fs::remove_file(&note).unwrap();
    let from = api.request_count();
    node.restarted(&api, &cfg).poll_once().unwrap();
    assert_eq!(lists(from), 1, "without a note the records are listed");
}

/// Something other than a file where the note goes (a FIFO, which an open for writing waits on
/// until a reader comes) costs a logged failure, never a poller stuck for good.
#[test]
fn a_fifo_in_place_of_the_read_note_does_not_hold_the_poller() {
    let api = api("fifo-note");
    let cfg = config(Duration::from_secs(600));
    let mut node = SimNode::new(&api, "node-fifo", &cfg);
    node.poll();
    let note = node.tree.base().join(".meta").join("cleanup-read");
    fs::remove_file(&note).unwrap();
    nix::unistd::mkfifo(&note, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = node.cleaner.poll_once().map(drop);
        let _ = done.send(result.is_ok());
    });
    // Far beyond a poll's few milliseconds; a poller held by the FIFO never answers.
    let answered = finished.recv_timeout(Duration::from_secs(30));
    assert_eq!(answered, Ok(true), "the poll finished despite the FIFO");
}

/// A tombstone past its retention is deleted only as the controller listed it: when another
/// write reached it in between (a DeleteVolume of the same id making it pending again), the
/// expiry leaves it, and a later pass judges it afresh.
#[test]
fn a_tombstone_written_since_it_was_listed_is_not_expired() {
    let api = api("expiry-race");
    let cfg = config(Duration::from_secs(600));
    let id = volume_id("pvc-expiry");
    api.put_tombstone(NS, &id, SystemTime::now() - Duration::from_secs(2 * 24 * 3600));
    let key = format!("configmaps/{NS}/{}", cleanup::record_name(&id));
    api.with(|s| s.faults.written_before_delete.push(key.clone()));
    let ctl = CleanupController::new(api.client(NS), cfg);
    ctl.poll_once().unwrap();
    assert!(api.object(&key).is_some(), "written after the list: not expired");
    let index = api.object(&format!("configmaps/{NS}/{}", cleanup::INDEX_NAME)).unwrap();
    assert!(
        index["data"]["records"].as_str().unwrap().contains(&id),
        "and still in the index"
    );
    ctl.poll_once().unwrap();
    assert!(api.object(&key).is_none(), "unchanged since listed: expired");
}

/// Whether the PV `name` carries the cleanup finalizer.
fn held(api: &FakeApi, name: &str) -> bool {
    api.pv_finalizers(name)
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// A restarted controller knows no CreateVolume names, so it finds the PV of an older volume by
/// a scan of the PVs. Deletions waiting at once share one scan, and what a scan found serves the
/// deletions after it; a PV made since the last scan, or re-made under another name with the
/// same volume handle, is found by a new one.
#[test]
fn deletions_after_a_restart_share_a_scan_of_the_pvs() {
    let api = api("restart-scan");
    let cfg = config(Duration::from_secs(600));
    // Another driver's PVs first: a scan reads three pages of 500 before it meets ours.
    for p in 0..1200 {
        api.add_pv(
            &format!("pvc-other-{p:05}"),
            "other.csi.example.com",
            &format!("vol-{p}"),
        );
    }
    let old = api.add_pvs(DRIVER, (0..10).map(|k| format!("pvc-zold-{k}")));
    let pages = || {
        pv_requests(&api)
            .iter()
            .filter(|(_, p)| p.starts_with("/api/v1/persistentvolumes?"))
            .count()
    };
    let ctl = CleanupController::new(api.client(NS), cfg);
    api.clear_log();
    // Eight at once, as csi-provisioner's workers send them after the restart.
    std::thread::scope(|s| {
        for (_, id) in &old[..8] {
            let ctl = &ctl;
            s.spawn(move || delete(ctl, id).unwrap());
        }
    });
    assert!(
        pages() <= 2 * 3,
        "eight deletions waiting at once share a scan (a second one for those that came while it ran): {} pages",
        pages()
    );
    for (pv, _) in &old[..8] {
        assert!(held(&api, pv), "{pv} holds the cleanup finalizer");
    }

    api.clear_log();
    delete(&ctl, &old[8].1).unwrap();
    assert_eq!(pages(), 0, "a volume the last scan saw needs no new scan");
    assert!(held(&api, &old[8].0));

    // Made after the last scan (a statically provisioned PV): one more scan finds it.
    let late = volume_id("pvc-zlate");
    api.add_pv("pvc-zlate", DRIVER, &late);
    api.clear_log();
    delete(&ctl, &late).unwrap();
    assert_eq!(pages(), 3, "one scan for a PV made since the last one");
    assert!(held(&api, "pvc-zlate"));

    // Re-made under another name with the same handle (a Retain volume bound again): the name
    // the scan saw is gone, and a new scan finds the PV that holds the volume now.
    let (old_name, id) = &old[9];
    api.delete_pv(old_name);
    api.add_pv("pvc-zrebound", DRIVER, id);
    api.clear_log();
    delete(&ctl, id).unwrap();
    assert_eq!(pages(), 3);
    assert!(held(&api, "pvc-zrebound"), "the PV that holds the volume now is held");
}

/// A DeleteVolume retried while a pass completes the record it joins (the first call wrote the
/// record and failed before holding the PV; the pass releases a PV it finds free): the PV must
/// not end up held by a finalizer no later pass removes, which would leave it Terminating for
/// good once csi-provisioner deletes it.
#[test]
fn a_retried_deletion_racing_the_completion_never_leaves_the_pv_held() {
    let api = api("finalizer-race");
    // The cleanup timeout passes at once: a pass completes every pending record.
    let cfg = config(Duration::ZERO);
    let id = volume_id("pvc-race");
    api.add_pv("pvc-race", DRIVER, &id);
    api.put_configmap(
        NS,
        cleanup::CleanupRecord::new_object(&id, SystemTime::now(), "pvc-race"),
        "node-local-cache",
    );
    let ctl = CleanupController::new(api.client(NS), cfg);
    let (arrived, go) = api.hold("PATCH", "/api/v1/persistentvolumes/pvc-race");
    std::thread::scope(|s| {
        let retry = s.spawn(|| delete(&ctl, &id));
        // The retry is about to hold the PV; a pass completes the record meanwhile.
        arrived.recv().unwrap();
        ctl.poll_once().unwrap();
        assert_eq!(state_of(&api, &id), "complete");
        go.send(()).unwrap();
        retry.join().unwrap().unwrap();
    });
    for _ in 0..3 {
        ctl.poll_once().unwrap();
    }
    assert_eq!(state_of(&api, &id), "complete");
    let finalizers = api.pv_finalizers("pvc-race").unwrap();
    assert!(
        !finalizers.iter().any(|f| f == FINALIZER),
        "the PV is released once its record completes: {finalizers:?}"
    );
}

/// The other order: a pass has released the PV and is about to mark the record complete when a
/// retried DeleteVolume holds the PV again and joins the record. The completion is conditional
/// on the record as listed, so it leaves the joined record to the next pass, which releases the
/// PV again; an unconditional one left the PV held under a complete record.
#[test]
fn a_completion_racing_a_retried_deletion_leaves_the_record_to_the_next_pass() {
    let api = api("completion-race");
    let cfg = config(Duration::ZERO);
    let id = volume_id("pvc-late");
    api.add_pv("pvc-late", DRIVER, &id);
    let ctl = CleanupController::new(api.client(NS), cfg);
    delete(&ctl, &id).unwrap();
    let (arrived, go) = api.hold(
        "PATCH",
        &format!("/api/v1/namespaces/{NS}/configmaps/{}", cleanup::record_name(&id)),
    );
    std::thread::scope(|s| {
        let pass = s.spawn(|| ctl.poll_once().unwrap());
        // The pass released the PV and its completion waits; the retry comes in between.
        arrived.recv().unwrap();
        assert!(api.pv_finalizers("pvc-late").unwrap().is_empty());
        delete(&ctl, &id).unwrap();
        go.send(()).unwrap();
        pass.join().unwrap();
    });
    assert_eq!(
        state_of(&api, &id),
        "pending",
        "joined after it was listed: left to the next pass"
    );
    ctl.poll_once().unwrap();
    assert_eq!(state_of(&api, &id), "complete");
    assert!(
        api.pv_finalizers("pvc-late").unwrap().is_empty(),
        "the PV is released once its record completes"
    );
}

/// A node that does not trust the index lists every record from the watch cache, in one
/// response (`limit` is ignored there). Past what used to cap a response body (32 MiB: 42,000
/// records of ~790 bytes with their managedFields) the list still yields, in one request, the entry of
/// every record as read from the stored objects, and skips what is not a record as before; the
/// node deletes its copy of a volume whose record comes last.
#[test]
fn records_listed_past_the_old_body_cap_are_all_read() {
    const RECORDS: usize = 48_000;
    let api = api("past-cap");
    let mut cfg = config(Duration::from_secs(600));
    cfg.retention = Duration::from_secs(24 * 3600);
    let mut ids: Vec<String> = (0..RECORDS).map(|k| volume_id(&format!("pvc-many-{k}"))).collect();
    ids.sort();
    let last = ids.pop().unwrap();
    let mut n = SimNode::new(&api, "node-many", &cfg);
    n.use_volume(&last, "pvc-last", "data");
    // Served whole: the fake server builds the ~38 MB answer before it sends it, past the
    // 2 s the fake's client config allows.
    let kube = node_local_cache::kube::Client::new(node_local_cache::kube::KubeConfig {
        timeout: Duration::from_secs(60),
        ..api.kube_config(NS)
    })
    .unwrap();
    let mut ncfg = cfg.clone();
    ncfg.node_name = n.name.clone();
    n.cleaner = NodeCleaner::new(kube.clone(), n.state.clone(), ncfg);
    let now = SystemTime::now();
    for (k, id) in ids.iter().enumerate() {
        api.put_tombstone(NS, id, now - Duration::from_millis(k as u64 * 2000));
    }
    // Pending, requested after the copy was made.
    let pending = cleanup::CleanupRecord::new_object(&last, SystemTime::now(), "pvc-last");
    api.put_configmap(NS, pending, "node-local-cache");
    // Labelled like a record, but none: no volume id, and one that is not a volume id.
    for (name, data) in [
        ("nlc-cleanup-junk-0", json!({ "note": "x" })),
        (
            "nlc-cleanup-junk-1",
            json!({ "volumeId": "../etc", "requestedAt": "2026-01-01T00:00:00Z" }),
        ),
    ] {
        let obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": name, "labels": { cleanup::LABEL: "pending" } },
            "data": data,
        });
        api.put_configmap(NS, obj, "kubectl");
    }
    let mut expected: Vec<cleanup::IndexEntry> = api.with(|s| {
        s.objects
            .range(format!("configmaps/{NS}/")..format!("configmaps/{NS}0"))
            .filter(|(_, o)| !o["metadata"]["labels"][cleanup::LABEL].is_null())
            .filter_map(|(_, o)| cleanup::CleanupRecord::parse(o))
            .map(|r| r.index_entry())
            .collect()
    });
    assert_eq!(expected.len(), RECORDS);

    let from = api.request_count();
    let mut listed = kube
        .list_configmaps_cached(cleanup::LABEL, |cm| {
            cleanup::CleanupRecord::parse(cm).map(|r| r.index_entry())
        })
        .unwrap();
    let (_, bytes) = api.bytes_since(from);
    assert_eq!(api.request_count() - from, 1, "one request");
    assert!(bytes > 32 << 20, "the list was {bytes} bytes, not past the old cap");
    listed.sort();
    expected.sort();
    assert!(listed == expected, "the list yields every record's entry");

    assert!(n.has(&last));
    assert_eq!(n.poll(), 1);
    assert!(!n.has(&last), "the copy of the record listed last is deleted");
}

/// The index is what every node reads on every poll; a node that finds none lists every record
/// instead. Deleted or rewritten behind the controller's back (by hand, a restore from backup),
/// the next pass writes it again from the records.
#[test]
fn an_index_changed_behind_the_controllers_back_is_mended_by_the_next_pass() {
    let api = api("index-gone");
    let cfg = config(Duration::from_secs(600));
    let id = volume_id("pvc-index-gone");
    api.add_pv("pvc-index-gone", DRIVER, &id);
    let ctl = CleanupController::new(api.client(NS), cfg);
    delete(&ctl, &id).unwrap();
    ctl.poll_once().unwrap();
    let key = format!("configmaps/{NS}/{}", cleanup::INDEX_NAME);
    let written = api.object(&key).unwrap()["data"].clone();
    assert!(written["records"].as_str().unwrap().contains(&id));
    api.with(|s| s.objects.remove(&key));
    ctl.poll_once().unwrap();
    assert_eq!(
        api.object(&key).map(|o| o["data"].clone()),
        Some(written.clone()),
        "written again"
    );
    let mut emptied = api.object(&key).unwrap();
    emptied["data"]["records"] = "".into();
    api.put_configmap(NS, emptied, "kubectl");
    ctl.poll_once().unwrap();
    assert_eq!(api.object(&key).unwrap()["data"], written, "mended");
}

/// A node may write its own object only (deploy/admission-node.yaml), but it chooses the
/// object's labels and data. Dressed as a pending record of a live volume, that object must not
/// make any node delete the volume's copy: a record is one only under its volume's record name,
/// which no node may write.
#[test]
fn a_node_object_dressed_as_a_record_deletes_nothing() {
    let api = api("dressed");
    let cfg = config(Duration::from_secs(600));
    let mut n1 = SimNode::new(&api, "node-1", &cfg);
    let mut n2 = SimNode::new(&api, "node-2", &cfg);
    let ctl = CleanupController::new(api.client(NS), cfg);
    let id = volume_id("pvc-live");
    api.add_pv("pvc-live", DRIVER, &id);
    n2.use_volume(&id, "pvc-live", "data");
    api.put_configmap(
        NS,
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": cleanup::node_object_name("node-1"),
                "labels": { cleanup::LABEL: "pending", cleanup::NODE_LABEL: "" },
            },
            "data": { "node": "node-1", "done": "", "volumeId": id, "requestedAt": "2999-01-01T00:00:00.000Z" },
        }),
        "node-1",
    );
    // Both ways a node learns of deletions: the index the controller keeps, and the records
    // listed directly (a node with no index to trust).
    ctl.poll_once().unwrap();
    n1.poll();
    n2.poll();
    assert!(n2.has(&id), "a live volume's copy was deleted");
    api.remove_object(&format!("configmaps/{NS}/{}", cleanup::INDEX_NAME));
    n2.poll();
    assert!(n2.has(&id), "a live volume's copy was deleted by listing the records");
}

/// A 429 whose Retry-After asks for an hour (a proxy in front of the API server): the node's
/// poll gives up at once and tries at its next period, instead of its cleanup thread sleeping
/// for the hour.
#[test]
fn a_long_retry_after_does_not_hold_the_poller() {
    let api = api("retry-after");
    let cfg = config(Duration::from_secs(600));
    let mut n = SimNode::new(&api, "node-0", &cfg);
    api.with(|s| {
        s.faults.fail_next = 1;
        s.faults.fail_status = 429;
        s.faults.retry_after = 3600;
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(n.cleaner.poll_once().is_err());
    });
    let failed = done
        .recv_timeout(Duration::from_secs(30))
        .expect("the poll waited out an hour's Retry-After");
    assert!(failed, "the throttled poll reports its failure");
}
