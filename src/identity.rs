//! The CSI Identity service: who we are, what we offer, whether we are ready.

use std::path::PathBuf;
use std::sync::Arc;

use grpcio::{RpcContext, UnarySink};
use protobuf::well_known_types::wrappers::BoolValue;

use crate::config::{Config, Mode};
use crate::error::Result;
use crate::proto::csi::plugin_capability::service::Type as ServiceType;
use crate::proto::csi::{
    plugin_capability, GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use crate::proto::grpc;
use crate::server::Rpc;

/// Whether this plugin can serve right now; in node mode, whether the base dir is usable.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Liveness: the CSI server answers on `socket`, and a node's base dir was not deleted under
/// it (only a restart sees the one made again). The error says what failed.
pub fn liveness(
    socket: PathBuf,
    base_dir: Option<PathBuf>,
) -> impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static {
    move || {
        crate::server::answers(&socket, crate::server::ANSWER_TIMEOUT)?;
        base_dir.as_deref().map_or(Ok(()), crate::node::base_not_deleted)
    }
}

#[derive(Clone)]
pub struct IdentityService {
    cfg: Arc<Config>,
    rpc: Rpc,
    ready: Readiness,
}

impl IdentityService {
    pub fn new(cfg: Arc<Config>, rpc: Rpc, ready: Readiness) -> IdentityService {
        IdentityService { cfg, rpc, ready }
    }

    fn info(&self) -> GetPluginInfoResponse {
        let mut r = GetPluginInfoResponse::new();
        r.name = self.cfg.driver_name.clone();
        r.vendor_version = env!("CARGO_PKG_VERSION").to_owned();
        r.manifest.insert(
            "mode".into(),
            if self.cfg.mode == Mode::Node {
                "node"
            } else {
                "controller"
            }
            .into(),
        );
        r
    }

    fn capabilities() -> GetPluginCapabilitiesResponse {
        let mut svc = plugin_capability::Service::new();
        svc.type_ = ServiceType::CONTROLLER_SERVICE.into();
        let mut cap = PluginCapability::new();
        cap.set_service(svc);
        let mut r = GetPluginCapabilitiesResponse::new();
        r.capabilities.push(cap);
        r
    }

    fn probe_response(&self) -> Result<ProbeResponse> {
        let mut ready = BoolValue::new();
        ready.value = (self.ready)();
        let mut r = ProbeResponse::new();
        r.ready = Some(ready).into();
        Ok(r)
    }
}

impl grpc::Identity for IdentityService {
    fn get_plugin_info(&mut self, _: RpcContext, req: GetPluginInfoRequest, sink: UnarySink<GetPluginInfoResponse>) {
        self.rpc.inline("GetPluginInfo", req, sink, |_| Ok(self.info()));
    }

    fn get_plugin_capabilities(
        &mut self,
        _: RpcContext,
        req: GetPluginCapabilitiesRequest,
        sink: UnarySink<GetPluginCapabilitiesResponse>,
    ) {
        self.rpc.inline("GetPluginCapabilities", req, sink, |_| {
            Ok(IdentityService::capabilities())
        });
    }

    fn probe(&mut self, _: RpcContext, req: ProbeRequest, sink: UnarySink<ProbeResponse>) {
        self.rpc.inline("Probe", req, sink, |_| self.probe_response());
    }
}
