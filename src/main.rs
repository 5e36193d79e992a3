//! The `node-local-cache` binary: flags in, services wired, serve until SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use grpcio::Service;
use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};

use node_local_cache::cleanup::{CleanupConfig, CleanupController, NodeCleaner};
use node_local_cache::config::{Config, Flags, Mode};
use node_local_cache::controller::{ControllerService, Deleter};
use node_local_cache::eviction::Evictor;
use node_local_cache::identity::{self, IdentityService, Readiness};
use node_local_cache::inflight::InFlight;
use node_local_cache::kube::{self, KubeFlags};
use node_local_cache::logging;
use node_local_cache::node::{NodeService, NodeState};
use node_local_cache::proto::grpc;
use node_local_cache::server::{self, Rpc};
use node_local_cache::{memory, metrics, sched};

// gRPC's core with a server's plugins only: this binary never dials.
node_local_cache::grpc_core_configuration!(server);

/// The node plugin: the Node service, this node's side of the cleanup protocol, and the
/// eviction pass that holds its copies to their limits.
fn node_services(
    cfg: &Arc<Config>,
    rpc: &Rpc,
    kube: Option<kube::Client>,
    cleanup_cfg: CleanupConfig,
) -> Result<(Readiness, Service), String> {
    let inflight = InFlight::default();
    let state = NodeState::new(cfg.clone(), inflight.clone());
    if let Err(e) = state.prepare_base_dir() {
        warn!("base dir {}: {e}", cfg.base_dir.display());
    }
    // Before anything runs on the base dir: the poller, the eviction thread, the socket.
    state.claim_base_dir()?;
    if !state.ready() {
        warn!(
            "base dir {} is not usable yet; Probe reports not ready",
            cfg.base_dir.display()
        );
    }
    let probe_state = state.clone();
    let gauge_state = state.clone();
    metrics::set_active_volumes(move || gauge_state.mounted_volumes());
    if let Some(kube) = kube {
        NodeCleaner::new(kube, state.clone(), cleanup_cfg).run();
    }
    if let Err(e) = Evictor::new(state.clone(), inflight).start() {
        error!("cannot start the eviction thread: {e}; copies are not held to their limits");
    }
    let ready: Readiness = Arc::new(move || probe_state.ready());
    Ok((ready, grpc::create_node(NodeService::new(state, rpc.clone()))))
}

/// The controller: the Controller service, and the cleanup protocol's controller side.
fn controller_services(rpc: &Rpc, kube: Option<kube::Client>, cleanup_cfg: CleanupConfig) -> (Readiness, Service) {
    let deleter = kube.map(|kube| {
        let c = CleanupController::new(kube, cleanup_cfg);
        c.clone().run();
        c as Arc<dyn Deleter>
    });
    let service = grpc::create_controller(ControllerService::new(rpc.clone(), deleter));
    (Arc::new(|| true), service)
}

fn main() -> ExitCode {
    let flags = match Flags::from_env() {
        Ok(flags) => flags,
        Err(e) => {
            // Logging is not set up before the flags say how; clap's own errors look the same.
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(flags.log_format, flags.log_level.as_deref());
    match serve(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM or SIGINT; an error is why it could not start.
fn serve(flags: Flags) -> Result<(), String> {
    let mut cfg = flags.config;
    cfg.csi_socket = server::socket_path(&flags.csi_socket);
    let cfg = Arc::new(cfg);
    memory::limit_arenas(memory::MAX_ARENAS);
    sched::run_as_batch();
    // Blocked before any thread starts, so every thread inherits the mask and only sigwait sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| format!("block signals: {e}"))?;

    let kube = kube::Client::from_flags(KubeFlags {
        api_url: flags.kube_api_url,
        token_file: flags.kube_token_file,
        ca_file: flags.kube_ca_file,
        namespace: flags.namespace,
    })?;
    let mut cleanup_cfg = CleanupConfig::new(&cfg.driver_name, &cfg.node_name);
    cleanup_cfg.poll_interval = flags.cleanup_poll_interval;
    cleanup_cfg.timeout = flags.cleanup_timeout;
    cleanup_cfg.retention = flags.cleanup_retention;
    cleanup_cfg.orphan_grace = flags.orphan_grace;

    let rpc = Rpc::new(cfg.workers, cfg.queue_depth);
    let (ready, service) = match cfg.mode {
        Mode::Node => node_services(&cfg, &rpc, kube, cleanup_cfg)?,
        Mode::Controller => controller_services(&rpc, kube, cleanup_cfg),
    };
    let identity = grpc::create_identity(IdentityService::new(cfg.clone(), rpc.clone(), ready.clone()));

    if !flags.metrics_addr.is_empty() {
        metrics::set_ready(move || ready());
        let base = (cfg.mode == Mode::Node).then(|| cfg.base_dir.clone());
        metrics::set_alive(identity::liveness(cfg.csi_socket.clone(), base));
        match metrics::parse_addr(&flags.metrics_addr).and_then(|a| metrics::serve(a).map_err(|e| e.to_string())) {
            Ok(bound) => info!("metrics on http://{bound}/metrics"),
            Err(e) => error!("metrics endpoint {}: {e}; serving CSI without it", flags.metrics_addr),
        }
    }

    memory::start_trimming(memory::TRIM_INTERVAL);
    let running = server::start(&cfg.csi_socket, vec![service, identity], rpc)?;
    info!(
        "node-local-cache {} serving {} mode as {} on {}",
        env!("CARGO_PKG_VERSION"),
        if cfg.mode == Mode::Node { "node" } else { "controller" },
        cfg.driver_name,
        cfg.csi_socket.display()
    );
    match signals.wait() {
        Ok(sig) => info!("{sig}: stopping"),
        Err(e) => error!("waiting for signals: {e}; stopping"),
    }
    running.stop(cfg.shutdown_timeout);
    Ok(())
}
