//! A measured model of the load the cleanup protocol puts on the Kubernetes API, in requests and
//! in bytes, at 100, 1,000 and 5,000 nodes. Simulated nodes run the real poll code against the
//! fake API server; their poll times come from a virtual clock driven by the real poll schedule
//! (`cleanup::poll_delay` at the default 30 s), so an hour of cluster time takes seconds. Bytes
//! are counted at the server, and stored sizes include the managedFields a real apiserver keeps.
//!
//! "Before" is the protocol of the previous version (every node lists the records and
//! acknowledges with an `ack.<node>` key in each record), replayed by `LegacyNode` against the
//! same server. Peak RSS is read from the real binaries (`VmHWM`); set `NLC_BEFORE_BIN` to a
//! binary of the previous version to measure its figures too (see docs/api-load.md).

mod common;
mod fake_apiserver;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use fake_apiserver::FakeApi;
use grpcio::{ChannelBuilder, EnvBuilder};
use node_local_cache::cleanup::{self, CleanupConfig, CleanupController, CleanupRecord, NodeCleaner};
use node_local_cache::config::{Config, Mode};
use node_local_cache::controller::Deleter;
use node_local_cache::inflight::InFlight;
use node_local_cache::kube::Client;
use node_local_cache::node::NodeState;
use node_local_cache::proto::csi;
use node_local_cache::proto::grpc::ControllerClient;
use node_local_cache::time::{self, Deadline};
use serde_json::json;

const DRIVER: &str = "node-local-cache.csi.io";
const NS: &str = "nlc-system";
/// Share of nodes holding a copy of the volume that gets deleted.
const HOLDERS_EVERY: usize = 10;
/// Completed records present while idle: a few deletions a day, kept 24 h.
const TOMBSTONES: usize = 20;
/// PVs in the cluster per node (of any driver): 50,000 at 5,000 nodes.
const PVS_PER_NODE: usize = 10;
const KIB: f64 = 1024.0;

/// Node names as on EKS, the length that matters for bytes.
fn node_name(i: usize) -> String {
    format!("ip-10-0-{}-{}.eu-west-1.compute.internal", i / 250, i % 250)
}

/// Deterministic uniform [0, 1) for start offsets.
fn unit(seed: u64) -> f64 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

fn fake_api(tag: &str) -> FakeApi {
    FakeApi::start(&std::env::temp_dir().join(format!("nlc-apiload-{}-{tag}", std::process::id())))
}

fn configmap_key(name: &str) -> String {
    format!("configmaps/{NS}/{name}")
}

/// The largest ConfigMap the protocol stored in the run, in bytes, and its name.
fn largest_configmap(api: &FakeApi) -> (usize, String) {
    let prefix = configmap_key("");
    api.with(|s| {
        s.writes
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, n)| (*n, k[prefix.len()..].to_owned()))
            .max()
            .unwrap_or_default()
    })
}

struct Figures {
    nodes: usize,
    idle_requests_per_node_per_30s: f64,
    idle_poll_bytes: f64,
    written_per_deletion: f64,
    largest_object: (usize, String),
    record_size: usize,
    clean_p99: Duration,
    all_node_reads_cached: bool,
}

/// The current protocol at `n` nodes: idle with `TOMBSTONES` completed records, then one volume
/// deleted that every `HOLDERS_EVERY`th node holds a copy of.
fn model(n: usize) -> Figures {
    let api = fake_api(&format!("after-{n}"));
    let cfg = CleanupConfig::new(DRIVER, "");
    let interval = cfg.poll_interval;
    let client = api.client(NS);
    let id = volume_id("pvc-load");
    api.add_pv("pvc-load", DRIVER, &id);

    let root = Tree::new(&format!("apiload-{n}"));
    let mut nodes: Vec<NodeCleaner> = Vec::with_capacity(n);
    for i in 0..n {
        let name = node_name(i);
        let dir = root.root.join(&name);
        std::fs::create_dir_all(dir.join("base")).unwrap();
        std::fs::create_dir_all(dir.join("kubelet")).unwrap();
        if i % HOLDERS_EVERY == 0 {
            std::fs::create_dir(dir.join("base").join(&id)).unwrap();
        }
        let mut c = Config::new(Mode::Node);
        c.node_name = name.clone();
        c.base_dir = dir.join("base");
        c.kubelet_dir = dir.join("kubelet");
        let state = NodeState::new(Arc::new(c), InFlight::default());
        let mut nc = cfg.clone();
        nc.node_name = name.clone();
        nodes.push(NodeCleaner::new(client.clone(), state, nc));
        api.add_node(&name, DRIVER);
    }
    // Earlier deletions, completed: their tombstones are in the index.
    let mut done_cfg = cfg.clone();
    done_cfg.timeout = Duration::ZERO;
    let done = CleanupController::new(client.clone(), done_cfg);
    for k in 0..TOMBSTONES {
        done.volume_deleted(&volume_id(&format!("pvc-old-{k}")), None, Deadline::none())
            .unwrap();
    }
    done.poll_once().unwrap();
    let ctl = CleanupController::new(client.clone(), cfg.clone());

    // Virtual time in milliseconds; each node starts at a random point of its first interval.
    // Slot `n` is the controller.
    let mut queue: BinaryHeap<Reverse<(u64, usize)>> = (0..=n)
        .map(|i| Reverse(((unit(i as u64) * interval.as_millis() as f64) as u64, i)))
        .collect();
    let ms = |d: Duration| d.as_millis() as u64;
    let warm_until = ms(interval);
    let idle_until = ms(interval * 5);
    let end = idle_until + ms(interval * 3);
    let mut requested = false;
    let (mut idle_polls, mut idle_requests, mut idle_bytes) = (0usize, 0usize, 0usize);
    let mut writes_before = 0;
    let mut cleaned: Vec<Option<u64>> = (0..n)
        .map(|i| if i % HOLDERS_EVERY == 0 { None } else { Some(0) })
        .collect();
    let mut node_reads_cached = true;

    while let Some(Reverse((t, i))) = queue.pop() {
        if t >= end {
            break;
        }
        if !requested && t >= idle_until {
            writes_before = api.write_count();
            ctl.volume_deleted(&id, Some("pvc-load"), Deadline::none()).unwrap();
            requested = true;
        }
        if i == n {
            ctl.poll_once().unwrap();
        } else {
            let before = api.request_count();
            let deleted = nodes[i].poll_once().unwrap();
            let after = api.request_count();
            if t >= warm_until && !requested {
                idle_polls += 1;
                idle_requests += after - before;
                idle_bytes += api.bytes_since(before).1;
            }
            // Orphan checks of dirs that do not know their PV's name scan PV pages from etcd,
            // at most every 15 minutes; the cleanup objects are read from the watch cache.
            node_reads_cached &= api
                .requests_since(before)
                .iter()
                .filter(|(m, p)| m == "GET" && p.contains("/configmaps"))
                .all(|(_, p)| p.contains("resourceVersion=0"));
            if requested && deleted > 0 {
                cleaned[i] = Some(t - idle_until);
            }
        }
        queue.push(Reverse((t + ms(cleanup::poll_delay(interval)), i)));
    }
    ctl.poll_once().unwrap();
    let record = api.object(&configmap_key(&cleanup::record_name(&id))).unwrap();
    assert_eq!(
        record["metadata"]["labels"][cleanup::LABEL],
        "complete",
        "every node acknowledged"
    );

    let mut times: Vec<u64> = cleaned
        .iter()
        .enumerate()
        .filter(|(i, _)| i % HOLDERS_EVERY == 0)
        .map(|(_, t)| t.expect("every holder cleaned"))
        .collect();
    times.sort_unstable();
    let p99 = times[((times.len() as f64 * 0.99).ceil() as usize).clamp(1, times.len()) - 1];
    let idle_window = Duration::from_millis(idle_until - warm_until);
    Figures {
        nodes: n,
        idle_requests_per_node_per_30s: idle_requests as f64
            / n as f64
            / (idle_window.as_secs_f64() / interval.as_secs_f64()),
        idle_poll_bytes: idle_bytes as f64 / idle_polls as f64,
        written_per_deletion: api.written_since(writes_before) as f64,
        largest_object: largest_configmap(&api),
        record_size: api.stored_size(&configmap_key(&cleanup::record_name(&id))).unwrap(),
        clean_p99: Duration::from_millis(p99),
        all_node_reads_cached: node_reads_cached,
    }
}

/// A node of the previous version, as far as the API sees it: one cached list of the records
/// per poll, and a merge patch of its own `ack.<node>` key into each pending record it has not
/// acknowledged yet.
struct LegacyNode {
    name: String,
}

impl LegacyNode {
    fn poll(&self, kube: &Client) {
        for r in kube
            .list_configmaps_cached(cleanup::LABEL, CleanupRecord::parse)
            .unwrap()
        {
            if r.pending && !r.legacy_acks.contains(&self.name) {
                let patch = json!({ "data": { format!("ack.{}", self.name): time::format(SystemTime::now()) } });
                kube.patch_configmap(&cleanup::record_name(r.volume_id()), &patch)
                    .unwrap();
            }
        }
    }
}

/// A record as the previous version left it, acknowledged by the first `acks` nodes.
fn legacy_record(id: &str, acks: usize, complete: bool) -> serde_json::Value {
    let now = time::format(SystemTime::now());
    let mut data = json!({ "volumeId": id, "requestedAt": now, "pv": format!("pvc-{id}") });
    for i in 0..acks {
        data[format!("ack.{}", node_name(i))] = now.clone().into();
    }
    if complete {
        data["completedAt"] = now.clone().into();
    }
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": cleanup::record_name(id), "labels": { cleanup::LABEL: if complete { "complete" } else { "pending" } } },
        "data": data,
    })
}

/// The previous protocol at `n` nodes. An idle poll is the same list for every node, so one is
/// measured; the deletion is replayed through every node's acknowledgement when `replay`, and
/// otherwise computed from the record's size, which grows by the same bytes with each ack.
fn legacy_model(n: usize, replay: bool) -> Figures {
    let api = fake_api(&format!("before-{n}"));
    let kube = api.client(NS);
    for k in 0..TOMBSTONES {
        api.put_configmap(
            NS,
            legacy_record(&volume_id(&format!("pvc-old-{k}")), n, true),
            "node-local-cache",
        );
    }
    let before = api.request_count();
    LegacyNode { name: node_name(0) }.poll(&kube);
    let idle_poll_bytes = api.bytes_since(before).1 as f64;

    let id = volume_id("pvc-load");
    let record = configmap_key(&cleanup::record_name(&id));
    let writes_before = api.write_count();
    api.put_configmap(NS, legacy_record(&id, 0, false), "node-local-cache");
    let empty = api.stored_size(&record).unwrap() as f64;
    let written_per_deletion = if replay {
        for i in 0..n {
            let node = LegacyNode { name: node_name(i) };
            let rec = CleanupRecord::parse(&api.object(&record).unwrap()).unwrap();
            if !rec.legacy_acks.contains(&node.name) {
                let patch = json!({ "data": { format!("ack.{}", node.name): time::format(SystemTime::now()) } });
                kube.patch_configmap(&cleanup::record_name(&id), &patch).unwrap();
            }
        }
        // The controller's completion rewrites the whole record once more.
        kube.patch_configmap(
            &cleanup::record_name(&id),
            &json!({ "metadata": { "labels": { cleanup::LABEL: "complete" } }, "data": { "completedAt": time::format(SystemTime::now()) } }),
        )
        .unwrap();
        api.written_since(writes_before) as f64
    } else {
        api.put_configmap(NS, legacy_record(&id, n, false), "node-local-cache");
        let full = api.stored_size(&record).unwrap() as f64;
        // Σ size after ack k, k = 1..n, with size linear in k; then the completion and the create.
        let per_ack = (full - empty) / n as f64;
        empty + n as f64 * empty + per_ack * (n * (n + 1) / 2) as f64 + full
    };
    Figures {
        nodes: n,
        // One list per poll, on the same schedule as now.
        idle_requests_per_node_per_30s: 30.0 / 31.5,
        idle_poll_bytes,
        written_per_deletion,
        largest_object: largest_configmap(&api),
        record_size: api.stored_size(&record).unwrap(),
        clean_p99: Duration::ZERO,
        all_node_reads_cached: true,
    }
}

fn human(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.2} GB", bytes / 1e9)
    } else if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else if bytes >= KIB {
        format!("{:.1} KiB", bytes / KIB)
    } else {
        format!("{bytes:.0} B")
    }
}

/// What kind of object a ConfigMap name is.
fn kind_of(name: &str) -> &'static str {
    if name == cleanup::INDEX_NAME {
        "index"
    } else if name.starts_with("nlc-node-") {
        "node object"
    } else {
        "record"
    }
}

fn row(label: &str, f: &Figures) {
    println!(
        "{label:6} | {:5} | {:17.2} | {:>15} | {:>24} | {:>10} | {:>26} | {:>11}",
        f.nodes,
        f.idle_requests_per_node_per_30s,
        human(f.idle_poll_bytes),
        human(f.written_per_deletion),
        human(f.written_per_deletion / f.nodes as f64),
        format!(
            "{} ({})",
            human(f.largest_object.0 as f64),
            kind_of(&f.largest_object.1)
        ),
        human(f.record_size as f64),
    );
}

#[test]
fn api_load_before_and_after_at_100_1000_and_5000_nodes() {
    println!(
        "proto  | nodes | idle req/node/30s | bytes/idle poll | written per deleted volume | per node | largest object | record size"
    );
    for n in [100, 1000] {
        row("before", &legacy_model(n, true));
    }
    let five = legacy_model(5000, false);
    row("before", &five);
    for n in [100, 1000, 5000] {
        let f = model(n);
        row("after", &f);
        println!("        p99 time to clean: {:.1}s", f.clean_p99.as_secs_f64());
        assert!(
            f.idle_requests_per_node_per_30s <= 1.0,
            "idle nodes make at most one request per 30 s: {}",
            f.idle_requests_per_node_per_30s
        );
        assert!(
            f.all_node_reads_cached,
            "nodes read the cleanup objects from the watch cache"
        );
        assert!(
            f.idle_poll_bytes <= 4.0 * KIB,
            "an idle poll with {TOMBSTONES} tombstones reads {} bytes",
            f.idle_poll_bytes
        );
        assert!(f.record_size <= 2048, "record of {} bytes", f.record_size);
        assert!(
            f.written_per_deletion / n as f64 <= KIB,
            "{} bytes written per node",
            f.written_per_deletion / n as f64
        );
        assert!(
            f.written_per_deletion <= 5e6,
            "{} bytes written",
            f.written_per_deletion
        );
        assert!(
            f.clean_p99 <= Duration::from_secs(60),
            "p99 time to clean {:?}",
            f.clean_p99
        );
    }
}

/// The orphan model: copies per node, and how they stand. Mounted copies are bound into a pod
/// target (a real bind, as a publish makes it); "unnamed" copies do not know their PV's name (made
/// by a version before the name was recorded: an empty name in the meta record, or no record).
const COPIES: usize = 10;
const MOUNTED_NAMED: usize = 2;
const MOUNTED_UNNAMED: usize = 1;
const IDLE_NAMED: usize = 4;
const IDLE_UNNAMED: usize = 2;
const IDLE_NO_META: usize = 1;
const _: () = assert!(MOUNTED_NAMED + MOUNTED_UNNAMED + IDLE_NAMED + IDLE_UNNAMED + IDLE_NO_META == COPIES);
/// Nodes whose orphan passes are run. A node's orphan pass reads only its own copies' PVs, so its
/// cost does not depend on the other nodes: the cluster-wide figures are per node × 5,000.
const ORPHAN_NODES: usize = 6;
const CLUSTER_NODES: usize = 5000;

/// What the orphan passes cost one node: requests and response bytes of the first pass after a
/// start (an upgrade), and of the passes after it.
struct OrphanFigures {
    first_requests: f64,
    first_bytes: f64,
    later_passes: usize,
    later_requests: f64,
    later_bytes: f64,
    later_lists: usize,
    mounted_pv_reads: usize,
    interval: Duration,
}

/// Requests to the PV API from number `from` on: (count, lists, response bytes, paths).
fn pv_requests_since(api: &FakeApi, from: usize) -> (usize, usize, usize, Vec<String>) {
    api.with(|s| {
        let pv: Vec<_> = s.log[from..]
            .iter()
            .filter(|e| e.target.starts_with("/api/v1/persistentvolumes"))
            .collect();
        let lists = pv
            .iter()
            .filter(|e| e.target.starts_with("/api/v1/persistentvolumes?"))
            .count();
        let bytes = pv.iter().map(|e| e.response_bytes).sum();
        (pv.len(), lists, bytes, pv.iter().map(|e| e.target.clone()).collect())
    })
}

/// `ORPHAN_NODES` nodes, each holding `COPIES` copies whose PVs all live, spread through
/// `PVS_PER_NODE` × 5,000 PVs of the cluster; the real poll code on a virtual clock for three
/// orphan passes (the first at a node's first poll, then every `orphan_grace / 4`).
fn orphan_model() -> OrphanFigures {
    let api = fake_api("orphans");
    let cfg = CleanupConfig::new(DRIVER, "");
    let interval = cfg.poll_interval;
    let client = api.client(NS);
    let total_pvs = PVS_PER_NODE * CLUSTER_NODES;
    for p in 0..total_pvs {
        api.add_pv(&format!("pvc-{p:08}"), "other.csi.example.com", &format!("vol-{p}"));
    }
    CleanupController::new(client.clone(), cfg.clone()).poll_once().unwrap();

    let idle_named = MOUNTED_NAMED + MOUNTED_UNNAMED..MOUNTED_NAMED + MOUNTED_UNNAMED + IDLE_NAMED;
    let tree = Tree::new("apiload-orphans");
    let mut nodes = Vec::with_capacity(ORPHAN_NODES);
    let mut mounted_pvs = Vec::new();
    for i in 0..ORPHAN_NODES {
        let name = node_name(i);
        let dir = tree.root.join(&name);
        std::fs::create_dir_all(dir.join("base")).unwrap();
        let mut c = Config::new(Mode::Node);
        c.node_name = name.clone();
        c.base_dir = dir.join("base");
        c.kubelet_dir = tree.kubelet();
        let state = NodeState::new(Arc::new(c), InFlight::default());
        for k in 0..COPIES {
            // Sorted among the others at a random place, so a scan meets it anywhere.
            let at = (unit((i * COPIES + k) as u64 + 7919) * total_pvs as f64) as usize;
            let pv = format!("pvc-{at:08}-{i}-{k}");
            let id = volume_id(&pv);
            api.add_pv(&pv, DRIVER, &id);
            let mounted = k < MOUNTED_NAMED + MOUNTED_UNNAMED;
            let named = k < MOUNTED_NAMED || idle_named.contains(&k);
            if k >= COPIES - IDLE_NO_META {
                std::fs::create_dir(dir.join("base").join(&id)).unwrap();
                continue;
            }
            let target = tree.target(&format!("{i}-{k}"));
            let mut req = publish_req(&id, &target, false);
            if named {
                req.volume_context
                    .insert(node_local_cache::node::CONTEXT_NAME.into(), pv.clone());
            }
            state.publish(&req).unwrap();
            if mounted {
                mounted_pvs.push(pv);
            } else {
                state.unpublish(&unpublish_req(&id, &target)).unwrap();
            }
        }
        let mut nc = cfg.clone();
        nc.node_name = name;
        nodes.push(NodeCleaner::new(client.clone(), state, nc));
    }

    let ms = |d: Duration| d.as_millis() as u64;
    let pass = cfg.orphan_grace / 4;
    let end = ms(pass * 2 + interval * 5);
    let start = Instant::now();
    let mut queue: BinaryHeap<Reverse<(u64, usize)>> = (0..ORPHAN_NODES)
        .map(|i| Reverse(((unit(i as u64) * interval.as_millis() as f64) as u64, i)))
        .collect();
    let mut passes = [0usize; ORPHAN_NODES];
    let (mut first, mut later) = ((0, 0), (0, 0, 0));
    let mut mounted_pv_reads = 0;
    while let Some(Reverse((t, i))) = queue.pop() {
        if t >= end {
            break;
        }
        let before = api.request_count();
        nodes[i].poll_once_at(start + Duration::from_millis(t)).unwrap();
        let (requests, lists, bytes, paths) = pv_requests_since(&api, before);
        mounted_pv_reads += paths
            .iter()
            .filter(|p| mounted_pvs.iter().any(|pv| p.ends_with(&format!("/{pv}"))))
            .count();
        // A poll without an orphan pass reads only the index; the first poll always has one.
        if passes[i] == 0 || requests > 0 {
            if passes[i] == 0 {
                first = (first.0 + requests, first.1 + bytes);
            } else {
                later = (later.0 + requests, later.1 + lists, later.2 + bytes);
            }
            passes[i] += 1;
        }
        queue.push(Reverse((t + ms(cleanup::poll_delay(interval)), i)));
    }
    for (i, p) in passes.iter().enumerate() {
        assert!(*p >= 3, "node {i} made {p} orphan passes in the window");
    }
    let later_passes: usize = passes.iter().map(|p| p - 1).sum();
    OrphanFigures {
        first_requests: first.0 as f64 / ORPHAN_NODES as f64,
        first_bytes: first.1 as f64 / ORPHAN_NODES as f64,
        later_passes,
        later_requests: later.0 as f64 / later_passes as f64,
        later_bytes: later.2 as f64 / later_passes as f64,
        later_lists: later.1,
        mounted_pv_reads,
        interval: pass.min(Duration::from_secs(900)),
    }
}

#[test]
fn orphan_passes_at_5000_nodes() {
    let f = orphan_model();
    let per_hour = 3600.0 / f.interval.as_secs_f64();
    println!(
        "{COPIES} copies per node ({MOUNTED_NAMED} mounted named, {MOUNTED_UNNAMED} mounted unnamed, \
         {IDLE_NAMED} idle named, {IDLE_UNNAMED} idle unnamed, {IDLE_NO_META} idle without a meta record), \
         {} PVs, a pass every {:?}",
        PVS_PER_NODE * CLUSTER_NODES,
        f.interval
    );
    println!(
        "first pass per node:  {:6.1} requests, {:>9}",
        f.first_requests,
        human(f.first_bytes)
    );
    println!(
        "later passes per node ({} measured): {:6.1} requests, {:>9}, {} lists",
        f.later_passes,
        f.later_requests,
        human(f.later_bytes),
        f.later_lists
    );
    println!(
        "steady state per node per hour: {:.1} requests, {}; at {CLUSTER_NODES} nodes: {:.2} requests/s, {}/s",
        f.later_requests * per_hour,
        human(f.later_bytes * per_hour),
        f.later_requests * per_hour * CLUSTER_NODES as f64 / 3600.0,
        human(f.later_bytes * per_hour * CLUSTER_NODES as f64 / 3600.0)
    );
    println!("requests naming a mounted copy's PV: {}", f.mounted_pv_reads);
    assert_eq!(f.mounted_pv_reads, 0, "a mounted copy is not an orphan candidate");
    assert_eq!(f.later_lists, 0, "after the first pass no copy needs a scan of the PVs");
    let idle = (IDLE_NAMED + IDLE_UNNAMED + IDLE_NO_META) as f64;
    assert!(
        f.later_requests <= idle,
        "a later pass costs at most one GET per idle copy: {} requests",
        f.later_requests
    );
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &Path, api: &FakeApi, tree: &Tree, args: &[String]) -> Running {
    let log = std::fs::File::create(tree.root.join(format!("{}.log", args[0].trim_start_matches("--mode=")))).unwrap();
    let child = Command::new(bin)
        .args(args)
        .args([
            format!("--kube-api-url={}", api.url),
            format!("--kube-token-file={}", api.token_file.display()),
            format!("--kube-ca-file={}", api.ca_file.display()),
            format!("--namespace={NS}"),
            "--cleanup-poll-interval=300ms".to_owned(),
            "--metrics-addr=".to_owned(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

/// The flags of the first node's plugin on `tree`.
fn node_args(tree: &Tree) -> [String; 5] {
    [
        "--mode=node".to_owned(),
        format!("--node-name={}", node_name(0)),
        format!("--base-dir={}", tree.base().display()),
        format!("--kubelet-dir={}", tree.kubelet().display()),
        format!("--csi-socket=unix://{}", tree.socket("node").display()),
    ]
}

fn controller_args(tree: &Tree) -> [String; 3] {
    [
        "--mode=controller".to_owned(),
        "--csi-socket".to_owned(),
        format!("unix://{}", tree.socket("ctl").display()),
    ]
}

/// A client of the controller started with `controller_args`, once its socket is there.
fn controller_client(tree: &Tree) -> ControllerClient {
    let socket = tree.socket("ctl");
    wait_until("the controller's socket", || socket.exists());
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    ControllerClient::new(ChannelBuilder::new(env).connect(&format!("unix:{}", socket.display())))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Peak RSS of the controller through a DeleteVolume (PV found by scanning `PVS_PER_NODE` × n
/// PVs) and a cleanup pass that completes a record every one of n nodes acknowledged; and of a
/// node plugin through a few polls with `TOMBSTONES` completed records. `legacy` sets the cluster
/// up as the previous version left it. Returns the controller's and the node's peak RSS, and how
/// DeleteVolume went.
fn measure_rss(bin: &Path, n: usize, legacy: bool) -> (u64, u64, String) {
    let api = fake_api(&format!("rss-{n}-{legacy}"));
    let tree = Tree::new(&format!("rss-{n}"));
    for i in 0..n {
        api.add_node(&node_name(i), DRIVER);
    }
    for p in 0..n * PVS_PER_NODE {
        api.add_pv(&format!("pvc-{p:08}"), "other.csi.example.com", &format!("vol-{p}"));
    }
    // The deleted volume's PV comes last in a scan.
    let id = volume_id("pvc-rss");
    api.add_pv("pvc-zzzzzzzz", DRIVER, &id);
    let waiting = volume_id("pvc-waiting");
    if legacy {
        api.put_configmap(NS, legacy_record(&waiting, n, false), "node-local-cache");
    } else {
        api.put_configmap(NS, legacy_record(&waiting, 0, false), "node-local-cache");
        let requested = CleanupRecord::parse(&api.object(&configmap_key(&cleanup::record_name(&waiting))).unwrap())
            .unwrap()
            .deletion;
        for i in 0..n {
            let acks = cleanup::NodeAcks {
                node: node_name(i),
                done: [requested.clone()].into(),
            };
            api.put_configmap(NS, acks.new_object(), "node-local-cache");
        }
    }
    let ctl = spawn(bin, &api, &tree, &controller_args(&tree));
    let client = controller_client(&tree);
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = id.clone();
    let sent = Instant::now();
    let deleted = match client.delete_volume(&del) {
        Ok(_) => format!("OK in {:.1}s", sent.elapsed().as_secs_f64()),
        Err(grpcio::Error::RpcFailure(s)) => format!(
            "{:?} after {:.1}s: {}",
            s.code(),
            sent.elapsed().as_secs_f64(),
            s.message()
        ),
        Err(e) => panic!("DeleteVolume: {e}"),
    };
    let record = configmap_key(&cleanup::record_name(&waiting));
    wait_until("the cleanup pass", || {
        api.object(&record)
            .is_some_and(|r| r["metadata"]["labels"][cleanup::LABEL] == "complete")
    });
    let controller_rss = peak_rss(ctl.0.id());
    drop(ctl);

    for k in 0..TOMBSTONES {
        let old = volume_id(&format!("pvc-old-{k}"));
        let obj = legacy_record(&old, if legacy { n } else { 0 }, true);
        api.put_configmap(NS, obj, "node-local-cache");
    }
    if !legacy {
        // The index a current controller keeps (the controller above has stopped).
        CleanupController::new(api.client(NS), CleanupConfig::new(DRIVER, ""))
            .poll_once()
            .unwrap();
    }
    let polls_before = api.request_count();
    let node = spawn(bin, &api, &tree, &node_args(&tree));
    wait_until("five node polls", || api.request_count() >= polls_before + 5);
    let node_rss = peak_rss(node.0.id());
    (controller_rss, node_rss, deleted)
}

/// The goal (5,000 nodes, 50,000 PVs) always; the whole table, before and after, when
/// `NLC_BEFORE_BIN` names a binary of the previous version.
#[test]
fn peak_memory_of_the_real_binaries() {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let before = std::env::var_os("NLC_BEFORE_BIN");
    let sizes: &[usize] = if before.is_some() { &[100, 1000, 5000] } else { &[5000] };
    println!("proto  | nodes | PVs    | controller peak RSS | node peak RSS | DeleteVolume");
    for &n in sizes {
        if let Some(bin) = &before {
            let (c, node, deleted) = measure_rss(Path::new(bin), n, true);
            println!(
                "before | {n:5} | {:6} | {:15.1} MiB | {:9.1} MiB | {deleted}",
                n * PVS_PER_NODE,
                mib(c),
                mib(node)
            );
        }
        let (c, node, deleted) = measure_rss(Path::new(BIN), n, false);
        println!(
            "after  | {n:5} | {:6} | {:15.1} MiB | {:9.1} MiB | {deleted}",
            n * PVS_PER_NODE,
            mib(c),
            mib(node)
        );
        assert!(deleted.starts_with("OK"), "DeleteVolume: {deleted}");
        assert!(
            mib(c) < 32.0,
            "controller peak RSS {:.1} MiB with {n} nodes and {} PVs",
            mib(c),
            n * PVS_PER_NODE
        );
    }
}

/// Records present when a node plugin lists them: what the index leaves out after a day of CI
/// deletions, or a burst, with no index a node trusts.
const LISTED_RECORDS: usize = 16_500;

/// Peak RSS of the node plugin through its first poll with `LISTED_RECORDS` records and no
/// index: a node that does not trust the index (new, back after a long absence, after a burst)
/// lists every record from the watch cache in one response. Decoded whole, that list took
/// ~7 KiB per record of ~800 bytes (130 MiB here), past the node pod's 128 Mi limit.
#[test]
fn node_memory_listing_16500_records() {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let api = fake_api("listed");
    let tree = Tree::new("listed");
    let now = SystemTime::now();
    for k in 0..LISTED_RECORDS {
        let requested = now - Duration::from_secs(5 * k as u64);
        api.put_tombstone(NS, &volume_id(&format!("pvc-listed-{k}")), requested);
    }
    let from = api.request_count();
    let node = spawn(Path::new(BIN), &api, &tree, &node_args(&tree));
    let note = tree.base().join(".meta").join("cleanup-read");
    wait_until("a pass through every record", || note.exists());
    let peak = peak_rss(node.0.id());
    let (bytes, asked) = api.with(|s| {
        s.log[from..]
            .iter()
            .find(|e| e.target.contains("labelSelector="))
            .map(|e| (e.response_bytes, e.at))
            .unwrap()
    });
    println!(
        "node peak RSS {:.1} MiB listing {LISTED_RECORDS} records (a list of {}; the pass ended {:.1} s after it was asked for)",
        mib(peak),
        human(bytes as f64),
        asked.elapsed().as_secs_f64()
    );
    assert!(
        mib(peak) < 32.0,
        "node peak RSS {:.1} MiB listing {LISTED_RECORDS} records",
        mib(peak)
    );
}

/// A namespace teardown: nodes in the cluster, and deletions pending at once, every one of them
/// listed by every node's object.
const TEARDOWN_NODES: usize = 5000;
const TEARDOWN_PENDING: usize = 200;

/// Peak RSS of the controller through a pass that completes `TEARDOWN_PENDING` records each
/// acknowledged by all of `TEARDOWN_NODES` nodes: what it keeps of the acknowledgements must not
/// grow with nodes × deletions (a name per pair was 90 MB here, past the 64 Mi limit).
#[test]
fn controller_memory_through_a_namespace_teardown() {
    teardown("teardown", TEARDOWN_NODES, TEARDOWN_PENDING);
}

/// A larger teardown: each node's object lists 1,500 deletions (~80 KB), so a page of 500 of
/// them is ~40 MB. Read a page at a time and decoded whole, that was over the 32 MiB a response
/// may take: no node's word was ever read, and the records could only time out.
#[test]
fn a_teardown_whose_node_objects_outgrow_a_page_still_completes_by_the_nodes_word() {
    teardown("big-teardown", 1000, 1500);
}

/// Sets up `pending` deletions, each acknowledged in the objects of all `nodes` nodes, runs the
/// controller (with a cleanup timeout no test waits for, so only the nodes' word completes a
/// record) until every record is complete, and holds its peak RSS under 32 MiB.
fn teardown(tag: &str, nodes: usize, pending_n: usize) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let api = fake_api(tag);
    let tree = Tree::new(tag);
    let mut pending = Vec::with_capacity(pending_n);
    for k in 0..pending_n {
        let id = volume_id(&format!("pvc-{tag}-{k}"));
        api.put_configmap(NS, legacy_record(&id, 0, false), "node-local-cache");
        let record = api.object(&configmap_key(&cleanup::record_name(&id))).unwrap();
        pending.push(CleanupRecord::parse(&record).unwrap().deletion);
    }
    for i in 0..nodes {
        api.add_node(&node_name(i), DRIVER);
        let acks = cleanup::NodeAcks {
            node: node_name(i),
            done: pending.iter().cloned().collect(),
        };
        api.put_configmap(NS, acks.new_object(), "node-local-cache");
    }
    let mut args = controller_args(&tree).to_vec();
    args.push("--cleanup-timeout=1h".to_owned());
    let ctl = spawn(Path::new(BIN), &api, &tree, &args);
    let complete = || {
        pending
            .iter()
            .filter(|d| {
                api.object(&configmap_key(&cleanup::record_name(&d.volume_id)))
                    .is_some_and(|r| r["metadata"]["labels"][cleanup::LABEL] == "complete")
            })
            .count()
    };
    wait_until("every record completed", || complete() == pending_n);
    let peak = peak_rss(ctl.0.id());
    println!(
        "controller peak RSS {:.1} MiB: {nodes} nodes, {pending_n} pending deletions",
        mib(peak)
    );
    assert!(
        mib(peak) < 32.0,
        "controller peak RSS {:.1} MiB with {nodes} nodes acknowledging {pending_n} deletions",
        mib(peak)
    );
}

/// Tombstones present in the steady state of `per_day` deletions a day kept for the 24 h
/// retention: requested evenly over the last day, newest first; and the index before the
/// controller's pass trims it, each deletion listed as it was while new.
fn steady_tombstones(api: &FakeApi, per_day: usize) {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let deletions: Vec<(String, SystemTime)> = (0..per_day)
        .map(|k| {
            let requested = now - day.mul_f64((k as f64 + 0.5) / per_day as f64);
            let id = volume_id(&format!("pvc-day-{k}"));
            api.put_tombstone(NS, &id, requested);
            (id, requested)
        })
        .collect();
    api.put_index(NS, &deletions);
}

/// Bytes a node reads per poll in the steady state of `per_day` deletions a day: a node that has
/// been polling all along, and one polling for the first time (started, or back after a long
/// absence). Every node's poll reads the same objects, so one node stands for all of them.
/// Returns (steady poll, first poll, first poll after a restart, index size stored).
fn steady_poll_bytes(per_day: usize) -> (f64, f64, f64, usize) {
    let api = fake_api(&format!("day-{per_day}"));
    let client = api.client(NS);
    steady_tombstones(&api, per_day);
    let cfg = CleanupConfig::new(DRIVER, "");
    // The pass leaves out old deletions every node polling along has read: the index covers
    // everything from the newest of them on.
    let ctl = CleanupController::new(client.clone(), cfg.clone());
    ctl.poll_once().unwrap();
    let index = api.stored_size(&configmap_key(cleanup::INDEX_NAME)).unwrap_or_default();

    let tree = Tree::new(&format!("day-{per_day}"));
    let mut c = Config::new(Mode::Node);
    c.node_name = node_name(0);
    c.base_dir = tree.base();
    c.kubelet_dir = tree.kubelet();
    let c = Arc::new(c);
    let mut nc = cfg;
    nc.node_name = node_name(0);
    let start = || {
        NodeCleaner::new(
            client.clone(),
            NodeState::new(c.clone(), InFlight::default()),
            nc.clone(),
        )
    };
    let mut node = start();
    let poll = |node: &mut NodeCleaner| {
        let before = api.request_count();
        node.poll_once().unwrap();
        api.with(|s| {
            s.log[before..]
                .iter()
                .filter(|e| e.method == "GET" && e.target.contains("/configmaps"))
                .map(|e| e.response_bytes)
                .sum::<usize>() as f64
        })
    };
    let first = poll(&mut node);
    let steady = (0..3).map(|_| poll(&mut node)).sum::<f64>() / 3.0;
    let restarted = poll(&mut start());
    (steady, first, restarted, index)
}

/// The index in a cluster with many deletions a day (CI clusters with a PVC per build): what a
/// node reads per poll, and what 5,000 nodes read together, at the mean poll period of 31.5 s.
#[test]
fn poll_bytes_by_deletions_per_day_at_5000_nodes() {
    const NODES: f64 = 5000.0;
    let period = 30.0 * 1.05;
    println!(
        "deletions/day | index stored | bytes/steady poll | 5,000 nodes, per s | bytes/first poll | after a restart"
    );
    for per_day in [100, 1000, 5000] {
        let (steady, first, restarted, index) = steady_poll_bytes(per_day);
        println!(
            "{per_day:13} | {:>12} | {:>17} | {:>16}/s | {:>16} | {:>15}",
            human(index as f64),
            human(steady),
            human(steady * NODES / period),
            human(first),
            human(restarted)
        );
        assert!(
            restarted <= steady * 1.5,
            "a restarted node reads {} on its first poll against {} a steady poll",
            human(restarted),
            human(steady)
        );
    }
}

/// Nodes that left the cluster in the model of node churn: a fifth of the live nodes, about a
/// week of an autoscaled 5,000-node cluster replacing 150 nodes a day.
const DEPARTED: usize = 1000;

/// The objects of nodes that left, at 5,000 nodes: what a controller pass with a pending
/// deletion reads before and after the sweep that deletes them, and what the hourly sweep costs.
#[test]
fn objects_of_departed_nodes_at_5000_nodes() {
    const LIVE: usize = 5000;
    let api = fake_api("departed");
    let client = api.client(NS);
    let old = cleanup::Deletion {
        volume_id: volume_id("pvc-long-gone"),
        requested_ms: time::to_millis(SystemTime::now() - Duration::from_secs(7 * 24 * 3600)),
    };
    for i in 0..LIVE + DEPARTED {
        if i < LIVE {
            api.add_node(&node_name(i), DRIVER);
        }
        let acks = cleanup::NodeAcks {
            node: node_name(i),
            done: [old.clone()].into(),
        };
        api.put_configmap(NS, acks.new_object(), "node-local-cache");
    }
    let id = volume_id("pvc-departed");
    api.add_pv("pvc-departed", DRIVER, &id);
    let ctl = CleanupController::new(client, CleanupConfig::new(DRIVER, ""));
    ctl.volume_deleted(&id, None, Deadline::none()).unwrap();
    let node_objects = || {
        api.with(|s| {
            s.objects
                .keys()
                .filter(|k| k.starts_with(&configmap_key("nlc-node-")))
                .count()
        })
    };
    // The bytes of one pass, and of its sweep's lists (the CSINodes, and the node objects a
    // second time).
    let pass = |at: Instant| {
        let from = api.request_count();
        ctl.poll_once_at(at).unwrap();
        let (sent, received) = api.bytes_since(from);
        (sent + received) as f64
    };
    let t0 = Instant::now();
    let hour = Duration::from_secs(3600);
    pass(t0);
    let before = pass(t0 + Duration::from_secs(30));
    let first = pass(t0 + hour);
    let second = pass(t0 + 2 * hour);
    let after = pass(t0 + 2 * hour + Duration::from_secs(30));
    println!(
        "{LIVE} nodes, {DEPARTED} departed: a pass with a pending deletion reads {} with their objects, {} after the sweep; a pass with a sweep {} (first) and {} (deleting); objects {} -> {}",
        human(before),
        human(after),
        human(first),
        human(second),
        LIVE + DEPARTED,
        node_objects()
    );
    assert_eq!(
        node_objects(),
        LIVE,
        "the departed nodes' objects are deleted, the others kept"
    );
    let per_object = (before - after) / DEPARTED as f64;
    let stored = api
        .stored_size(&configmap_key(&cleanup::node_object_name(&node_name(0))))
        .unwrap() as f64;
    println!(
        "each departed node's object: {} a pass (stored {})",
        human(per_object),
        human(stored)
    );
    assert!(
        per_object >= stored * 0.9,
        "a pass reads {} less per departed object; each is {} stored",
        human(per_object),
        human(stored)
    );
    println!(
        "the hourly sweep over {LIVE} nodes: {} an hour, {}/s",
        human(first - before),
        human((first - before) / 3600.0)
    );
}

/// Deletions after the controller restarted, in a cluster of `CLUSTER_NODES` nodes with
/// `PVS_PER_NODE` PVs each, a fifth of them this driver's.
const RESTART_DELETIONS: usize = 200;

/// A namespace teardown right after the controller restarted (an upgrade, a reschedule): it
/// knows no CreateVolume names, so it finds each PV among all of them. csi-provisioner sends the
/// deletions concurrently; the controller's pool runs four at once. Counts the PV requests and
/// their bytes at the server, and asserts they stay near one scan of the PVs.
#[test]
fn deletions_after_a_controller_restart_at_5000_nodes() {
    let api = fake_api("restart-deletions");
    let total = PVS_PER_NODE * CLUSTER_NODES;
    let mut ours = Vec::new();
    for p in 0..total {
        let name = format!("pvc-{p:08}");
        if p % 5 == 0 {
            let id = volume_id(&name);
            api.add_pv(&name, DRIVER, &id);
            ours.push(id);
        } else {
            api.add_pv(&name, "other.csi.example.com", &format!("vol-{p}"));
        }
    }
    // The volumes deleted, spread through the PVs as a scan meets them.
    let deleted: Vec<String> = (0..RESTART_DELETIONS)
        .map(|k| ours[(unit(k as u64 + 31) * ours.len() as f64) as usize].clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let ctl = CleanupController::new(api.client(NS), CleanupConfig::new(DRIVER, ""));
    let from = api.request_count();
    let queue = std::sync::Mutex::new(deleted.iter());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some(id) = queue.lock().unwrap().next() else { return };
                ctl.volume_deleted(id, None, Deadline::none()).unwrap();
            });
        }
    });
    let (requests, lists, bytes, _) = pv_requests_since(&api, from);
    let scan = total.div_ceil(500);
    println!(
        "{} deletions after a restart, {total} PVs ({} of this driver): {requests} PV requests, {lists} list pages ({:.1} scans), {} read",
        deleted.len(),
        ours.len(),
        lists as f64 / scan as f64,
        human(bytes as f64)
    );
    assert!(
        lists <= 2 * scan,
        "the deletions share the scans of the PVs: {lists} pages, a scan is {scan}"
    );
}

/// Peak RSS of the real controller through a DeleteVolume after a restart when every one of the
/// cluster's 50,000 PVs is this driver's: the scan keeps each one's handle and name.
#[test]
fn controller_memory_keeping_a_scan_of_the_pvs() {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let api = fake_api("scan-rss");
    let tree = Tree::new("scan-rss");
    let total = PVS_PER_NODE * CLUSTER_NODES;
    for p in 0..total {
        let name = format!("pvc-{p:08}");
        api.add_pv(&name, DRIVER, &volume_id(&name));
    }
    let ctl = spawn(Path::new(BIN), &api, &tree, &controller_args(&tree));
    let client = controller_client(&tree);
    let idle = peak_rss(ctl.0.id());
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = volume_id(&format!("pvc-{:08}", total - 1));
    client.delete_volume(&del).unwrap();
    let peak = peak_rss(ctl.0.id());
    println!(
        "controller peak RSS {:.1} MiB after a scan keeping {total} PVs ({:.1} MiB before the call)",
        mib(peak),
        mib(idle)
    );
    assert!(mib(peak) < 32.0, "controller peak RSS {:.1} MiB", mib(peak));
}

/// Deletions in the model of a namespace teardown.
const BURST: usize = 2_500;
/// csi-provisioner's pace through a teardown: several DeleteVolume calls a second.
const BURST_APART: Duration = Duration::from_millis(200);
/// The controller writes the index at most this often outside its passes.
const INDEX_COALESCE: Duration = Duration::from_secs(5);

/// The index through a namespace teardown: `BURST` DeleteVolume calls at the provisioner's pace
/// (on a virtual clock), then the controller's next pass. etcd keeps every version written until
/// compaction (every 5 minutes; its quota is 2 GiB by default), so what counts is the bytes
/// written to the index. Asserts at most one index write per `INDEX_COALESCE` of the burst (plus
/// the pass), bytes far below one whole index per deletion, and every deletion listed after the
/// pass.
#[test]
fn index_writes_through_a_burst_of_deletions() {
    let api = fake_api("burst");
    // A node that finishes nothing keeps the records pending: the pass writes the index only.
    api.add_node(&node_name(0), DRIVER);
    let mut cfg = CleanupConfig::new(DRIVER, "");
    cfg.timeout = Duration::from_secs(3600);
    let ctl = CleanupController::new(api.client(NS), cfg);
    let pvs = api.add_pvs(DRIVER, (0..BURST).map(|k| format!("pvc-burst-{k:05}")));
    let key = configmap_key(cleanup::INDEX_NAME);
    let from = api.write_count();
    let t0 = Instant::now();
    let started = Instant::now();
    for (k, (pv, id)) in pvs.iter().enumerate() {
        ctl.volume_deleted_at(id, Some(pv), Deadline::none(), t0 + BURST_APART * k as u32)
            .unwrap();
    }
    let burst = BURST_APART * BURST as u32;
    ctl.poll_once_at(t0 + burst).unwrap();
    let (writes, bytes) = api.with(|s| {
        s.writes[from..]
            .iter()
            .filter(|(k, _)| *k == key)
            .fold((0usize, 0usize), |(c, b), (_, n)| (c + 1, b + n))
    });
    let stored = api.object(&key).unwrap();
    let listed: std::collections::HashSet<String> = cleanup::IndexEntry::parse_index(&stored)
        .into_iter()
        .map(|e| e.deletion.volume_id)
        .collect();
    println!(
        "{BURST} deletions {BURST_APART:?} apart and a pass: {writes} index writes, {} written to the index ({} per deletion), index stored {}; {:.1} s in the test",
        human(bytes as f64),
        human(bytes as f64 / BURST as f64),
        human(api.stored_size(&key).unwrap() as f64),
        started.elapsed().as_secs_f64()
    );
    assert!(
        pvs.iter().all(|(_, id)| listed.contains(id)),
        "after the pass the index lists every deletion"
    );
    let windows = (burst.as_secs_f64() / INDEX_COALESCE.as_secs_f64()).ceil() as usize;
    assert!(
        writes <= windows + 2,
        "{writes} index writes in a burst of {burst:?}: at most one per {INDEX_COALESCE:?}, and the pass"
    );
    assert!(bytes < 16_000_000, "{} written to the index", human(bytes as f64));
}
