//! A measured model of the load the cleanup protocol puts on the Kubernetes API. N simulated
//! nodes run the real poll code against the fake API server; their poll times come from a
//! virtual clock driven by the real poll schedule (`cleanup::poll_delay` at the default 30 s),
//! so an hour of cluster time takes seconds. Requests are counted at the server.

mod common;
mod fake_apiserver;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fake_apiserver::FakeApi;
use node_local_cache::cleanup::{self, CleanupConfig, NodeCleaner};
use node_local_cache::config::{Config, Mode};
use node_local_cache::controller::Deleter;
use node_local_cache::inflight::InFlight;
use node_local_cache::node::NodeState;

const DRIVER: &str = "node-local-cache.csi.io";
const NS: &str = "nlc-system";
/// Share of nodes holding a copy of the volume that gets deleted.
const HOLDERS_EVERY: usize = 10;

struct Figures {
    nodes: usize,
    idle_per_node_per_poll: f64,
    idle_rps: f64,
    deletion_requests: usize,
    clean_p50: Duration,
    clean_p99: Duration,
    clean_max: Duration,
    all_lists_cached: bool,
}

/// Deterministic uniform [0, 1) for start offsets.
fn unit(seed: u64) -> f64 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

fn model(n: usize) -> Figures {
    let api = FakeApi::start(&std::env::temp_dir().join(format!("nlc-apiload-{}-{n}", std::process::id())));
    let cfg = CleanupConfig::new(DRIVER, "");
    let interval = cfg.poll_interval;
    let client = api.client(NS);
    let id = volume_id("pvc-load");
    api.add_pv("pvc-load", DRIVER, &id);

    let root = Tree::new(&format!("apiload-{n}"));
    let mut nodes: Vec<NodeCleaner> = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("node-{i:05}");
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

    // Virtual time in milliseconds; each node starts at a random point of its first interval.
    let mut queue: BinaryHeap<Reverse<(u64, usize)>> = (0..n)
        .map(|i| Reverse(((unit(i as u64) * interval.as_millis() as f64) as u64, i)))
        .collect();
    let ms = |d: Duration| d.as_millis() as u64;
    let warm_until = ms(interval * 2);
    let idle_until = ms(interval * 12);
    let end = idle_until + ms(interval * 4);
    let mut requested = false;
    let mut idle_start_count = None;
    let mut idle_count = 0;
    let mut cleaned: Vec<Option<u64>> = (0..n)
        .map(|i| if i % HOLDERS_EVERY == 0 { None } else { Some(0) })
        .collect();
    let ctl = cleanup::Controller::new(client.clone(), cfg.clone());

    while let Some(Reverse((t, i))) = queue.pop() {
        if t >= end {
            break;
        }
        if idle_start_count.is_none() && t >= warm_until {
            idle_start_count = Some(api.requests().len());
        }
        if !requested && t >= idle_until {
            idle_count = api.requests().len() - idle_start_count.unwrap();
            api.clear_log();
            ctl.volume_deleted(&id).unwrap();
            requested = true;
        }
        let deleted = nodes[i].poll_once().unwrap();
        if requested && deleted > 0 {
            cleaned[i] = Some(t - idle_until);
        }
        queue.push(Reverse((t + ms(cleanup::poll_delay(interval)), i)));
    }
    let deletion_requests = api.requests().len();
    let all_lists_cached = api
        .requests()
        .iter()
        .filter(|(m, p)| m == "GET" && p.contains('?'))
        .all(|(_, p)| p.contains("resourceVersion=0"));

    let mut times: Vec<u64> = cleaned
        .iter()
        .enumerate()
        .filter(|(i, _)| i % HOLDERS_EVERY == 0)
        .map(|(_, t)| t.expect("every holder cleaned"))
        .collect();
    times.sort_unstable();
    let pct =
        |p: f64| Duration::from_millis(times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1]);
    let idle_window = Duration::from_millis(idle_until - warm_until);
    Figures {
        nodes: n,
        idle_per_node_per_poll: idle_count as f64 / n as f64 / (idle_window.as_secs_f64() / interval.as_secs_f64()),
        idle_rps: idle_count as f64 / idle_window.as_secs_f64(),
        deletion_requests,
        clean_p50: pct(0.50),
        clean_p99: pct(0.99),
        clean_max: *times.last().map(|t| Duration::from_millis(*t)).as_ref().unwrap(),
        all_lists_cached,
    }
}

#[test]
fn api_load_at_100_and_1000_nodes() {
    println!("nodes | idle req/node/poll | idle req/s | requests for one deletion | time to clean p50 / p99 / max");
    for n in [100, 1000] {
        let f = model(n);
        println!(
            "{:5} | {:18.3} | {:10.2} | {:25} | {:.1}s / {:.1}s / {:.1}s",
            f.nodes,
            f.idle_per_node_per_poll,
            f.idle_rps,
            f.deletion_requests,
            f.clean_p50.as_secs_f64(),
            f.clean_p99.as_secs_f64(),
            f.clean_max.as_secs_f64()
        );
        assert!(
            f.idle_per_node_per_poll <= 1.0 + 1e-9,
            "idle nodes make at most one request per poll"
        );
        assert!(f.all_lists_cached, "every list is served from the watch cache");
        assert!(
            f.clean_p99 <= Duration::from_secs(60),
            "p99 time to clean {:?}",
            f.clean_p99
        );
        // One list per node per poll, one acknowledgement per node, a few controller calls.
        assert!(f.deletion_requests <= n * 5 + 10, "{}", f.deletion_requests);
    }
    println!(
        "extrapolated to 5000 nodes: idle {:.0} req/s (one cached list per node per 30 s)",
        5000.0 / 30.0
    );
}
