//! node-local-cache: a CSI driver for per-node cache volumes. See docs/design.md for the design.

pub mod cleanup;
pub mod config;
pub mod controller;
pub mod error;
pub mod eviction;
pub mod grpc_plugins;
pub mod identity;
pub mod inflight;
pub mod kube;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod proto;
pub mod safedir;
pub mod sched;
pub mod server;
pub mod time;
pub mod trim;
pub mod volume;
