//! The `node-local-cache` binary: flags in, services wired, serve until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};

use node_local_cache::cleanup::{CleanupConfig, CleanupController, NodeCleaner};
use node_local_cache::config::{parse_duration, Config, DataOnUnpublish, Mode};
use node_local_cache::controller::{Controller, Deleter};
use node_local_cache::identity::{Identity, Readiness};
use node_local_cache::inflight::InFlight;
use node_local_cache::kube::{self, KubeConfig, KubeFlags};
use node_local_cache::logging::{self, LogFormat};
use node_local_cache::node::{Node, NodeState};
use node_local_cache::proto::grpc;
use node_local_cache::server::{self, Rpc};
use node_local_cache::{memory, metrics};

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Controller,
    Node,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DataArg {
    Keep,
    Delete,
}

/// A CSI driver for node-local cache volumes: any pod on any node, one copy per node.
#[derive(Parser)]
#[command(name = "node-local-cache", version, about)]
struct Flags {
    /// Which half of the driver to run.
    #[arg(long, value_enum)]
    mode: ModeArg,
    /// Unix socket to serve CSI on: a path or unix:///path.
    #[arg(long, default_value = "/csi/csi.sock")]
    csi_socket: String,
    /// This node's name, reported as the CSI node id (required in node mode).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where each node keeps <volume-id>/ directories.
    #[arg(long, default_value = "/var/node-local-cache")]
    base_dir: PathBuf,
    /// Kubelet's root dir; publish targets must lie below it.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// CSI driver name (as in the CSIDriver object and the StorageClass provisioner).
    #[arg(long, default_value = "node-local-cache.csi.io")]
    driver_name: String,
    /// What a node does with its copy when no pod on it uses the volume any more.
    #[arg(long, value_enum, default_value = "keep")]
    data_on_unpublish: DataArg,
    /// Threads for mount, unmount, stats and delete work.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// How long a measured volume usage is reused by NodeGetVolumeStats.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    stats_cache_ttl: Duration,
    /// How long SIGTERM waits for calls in flight before cancelling them.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Address for /metrics and /healthz (":9809" is every address); empty turns it off.
    #[arg(long, default_value = ":9809")]
    metrics_addr: String,
    /// Kubernetes API URL (default: in-cluster from KUBERNETES_SERVICE_HOST/PORT). Without one
    /// the driver runs standalone and DeleteVolume only logs.
    #[arg(long)]
    kube_api_url: Option<String>,
    /// Bearer token file, re-read when it changes (default: the service account's).
    #[arg(long)]
    kube_token_file: Option<PathBuf>,
    /// CA bundle the API server's certificate is verified against (default: the service account's).
    #[arg(long)]
    kube_ca_file: Option<PathBuf>,
    /// Namespace holding the cleanup records (default: the service account's).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// How often nodes (and the controller) poll for cleanup work, with jitter.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    cleanup_poll_interval: Duration,
    /// How long the controller waits for every node before releasing a deleted volume's PV.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    cleanup_timeout: Duration,
    /// How long a finished cleanup record is kept for nodes that were down.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cleanup_retention: Duration,
    /// How long a node keeps a volume dir whose PV is gone before deleting it.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    orphan_grace: Duration,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: FormatArg,
    /// Log filter (error, warn, info, debug, trace, or env_logger syntax); overrides RUST_LOG.
    #[arg(long)]
    log_level: Option<String>,
    /// Testing only: delay every publish, so tests can catch a call in flight.
    #[arg(long, hide = true, default_value = "0s", value_parser = parse_duration)]
    test_publish_delay: Duration,
}

impl Flags {
    fn config(self) -> Result<Config, String> {
        let mode = match self.mode {
            ModeArg::Controller => Mode::Controller,
            ModeArg::Node => Mode::Node,
        };
        let mut cfg = Config::new(mode);
        let name_ok = !self.driver_name.is_empty()
            && self.driver_name.len() <= 63
            && self
                .driver_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && self.driver_name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && self.driver_name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok {
            return Err(format!(
                "--driver-name {:?}: want at most 63 characters of [a-z0-9.-], alphanumeric at both ends",
                self.driver_name
            ));
        }
        cfg.driver_name = self.driver_name;
        cfg.node_name = self.node_name.unwrap_or_default();
        if mode == Mode::Node && cfg.node_name.is_empty() {
            return Err("--node-name (or NODE_NAME) is required in node mode".into());
        }
        for (flag, p) in [("--base-dir", &self.base_dir), ("--kubelet-dir", &self.kubelet_dir)] {
            if !p.is_absolute() {
                return Err(format!("{flag} {}: must be an absolute path", p.display()));
            }
        }
        cfg.csi_socket = server::socket_path(&self.csi_socket);
        cfg.base_dir = self.base_dir;
        cfg.kubelet_dir = self.kubelet_dir;
        cfg.data_on_unpublish = match self.data_on_unpublish {
            DataArg::Keep => DataOnUnpublish::Keep,
            DataArg::Delete => DataOnUnpublish::Delete,
        };
        cfg.workers = self.workers.max(1);
        cfg.stats_cache_ttl = self.stats_cache_ttl;
        cfg.shutdown_timeout = self.shutdown_timeout;
        cfg.test_publish_delay = self.test_publish_delay;
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let format = match flags.log_format {
        FormatArg::Text => LogFormat::Text,
        FormatArg::Json => LogFormat::Json,
    };
    logging::init(format, flags.log_level.as_deref());
    let metrics_addr = flags.metrics_addr.clone();
    let kube_flags = KubeFlags {
        api_url: flags.kube_api_url.clone(),
        token_file: flags.kube_token_file.clone(),
        ca_file: flags.kube_ca_file.clone(),
        namespace: flags.namespace.clone(),
    };
    let (poll_interval, timeout, retention, orphan_grace) = (
        flags.cleanup_poll_interval,
        flags.cleanup_timeout,
        flags.cleanup_retention,
        flags.orphan_grace,
    );
    let cfg = match flags.config() {
        Ok(cfg) => Arc::new(cfg),
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    memory::limit_arenas(memory::MAX_ARENAS);
    // Blocked before any thread starts, so every thread inherits the mask and only sigwait sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        error!("block signals: {e}");
        return ExitCode::FAILURE;
    }

    let kube = match KubeConfig::resolve(kube_flags) {
        None => {
            info!("no Kubernetes API configured: running standalone; deleted volumes stay on the nodes");
            None
        }
        Some(kc) => match kube::Client::new(kc) {
            Ok(c) => Some(c),
            Err(e) => {
                error!("Kubernetes client: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut cleanup_cfg = CleanupConfig::new(&cfg.driver_name, &cfg.node_name);
    cleanup_cfg.poll_interval = poll_interval;
    cleanup_cfg.timeout = timeout;
    cleanup_cfg.retention = retention;
    cleanup_cfg.orphan_grace = orphan_grace;

    let rpc = Rpc::new(cfg.workers, cfg.queue_depth);
    let identity_ready: Readiness;
    let mut services = Vec::new();
    match cfg.mode {
        Mode::Node => {
            let state = NodeState::new(cfg.clone(), InFlight::default());
            if let Err(e) = state.prepare_base_dir() {
                warn!("base dir {}: {e}", cfg.base_dir.display());
            }
            if !state.ready() {
                warn!(
                    "base dir {} is not usable yet; Probe reports not ready",
                    cfg.base_dir.display()
                );
            }
            let probe_state = state.clone();
            identity_ready = Arc::new(move || probe_state.ready());
            let gauge_state = state.clone();
            metrics::set_active_volumes(move || gauge_state.mounted_volumes());
            if let Some(kube) = &kube {
                NodeCleaner::new(kube.clone(), state.clone(), cleanup_cfg).run();
            }
            services.push(grpc::create_node(Node::new(state, rpc.clone())));
        }
        Mode::Controller => {
            identity_ready = Arc::new(|| true);
            let deleter = kube.map(|kube| {
                let c = CleanupController::new(kube, cleanup_cfg);
                c.clone().run();
                c as Arc<dyn Deleter>
            });
            services.push(grpc::create_controller(Controller::new(rpc.clone(), deleter)));
        }
    }
    services.push(grpc::create_identity(Identity::new(
        cfg.clone(),
        rpc.clone(),
        identity_ready.clone(),
    )));

    if !metrics_addr.is_empty() {
        match metrics::parse_addr(&metrics_addr)
            .and_then(|a| metrics::serve(a, move || identity_ready()).map_err(|e| e.to_string()))
        {
            Ok(bound) => info!("metrics on http://{bound}/metrics"),
            Err(e) => error!("metrics endpoint {metrics_addr}: {e}; serving CSI without it"),
        }
    }

    memory::start_trimming(memory::TRIM_INTERVAL);
    let running = match server::start(&cfg.csi_socket, services, rpc) {
        Ok(r) => r,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
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
    ExitCode::SUCCESS
}
