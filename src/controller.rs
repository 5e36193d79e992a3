//! The CSI Controller service. A volume is only a name and an id until a node first publishes
//! it, so creation needs no storage; deletion hands the volume to the cross-node cleanup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use grpcio::{RpcContext, UnarySink};
use log::{debug, info};

use crate::error::{Error, Result};
use crate::eviction::{self, Limits, Policy};
use crate::metrics;
use crate::proto::csi::controller_service_capability::rpc::Type as RpcType;
use crate::proto::csi::{
    controller_service_capability, validate_volume_capabilities_response::Confirmed, ControllerGetCapabilitiesRequest,
    ControllerGetCapabilitiesResponse, ControllerServiceCapability, CreateVolumeRequest, CreateVolumeResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse,
    Volume,
};
use crate::proto::grpc;
use crate::server::Rpc;
use crate::time::Deadline;
use crate::volume;

/// StorageClass parameters that csi-provisioner adds itself; beside them only `eviction` is taken.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// What to do when a volume is deleted: the cleanup protocol, or nothing in standalone mode.
/// Both calls answer within `deadline`, the caller's, or fail with a retryable error.
pub trait Deleter: Send + Sync {
    /// `name` is the volume's CreateVolume name (its PV's name under csi-provisioner) when this
    /// process created it.
    fn volume_deleted(&self, volume_id: &str, name: Option<&str>, deadline: Deadline) -> Result<()>;

    /// Whether the deletion of an earlier volume with this id is still under way.
    fn creation_blocked(&self, _volume_id: &str, _deadline: Deadline) -> Result<bool> {
        Ok(false)
    }
}

struct VolumeRecord {
    name: String,
    capacity: i64,
    eviction: Policy,
}

#[derive(Clone)]
pub struct ControllerService {
    rpc: Rpc,
    /// Capacity per created volume, to tell a repeated CreateVolume from a conflicting one.
    /// Lost on restart, which only makes the next repeat accept its new capacity.
    volumes: Arc<Mutex<HashMap<String, VolumeRecord>>>,
    deleter: Option<Arc<dyn Deleter>>,
}

impl ControllerService {
    pub fn new(rpc: Rpc, deleter: Option<Arc<dyn Deleter>>) -> ControllerService {
        let c = ControllerService {
            rpc,
            volumes: Arc::default(),
            deleter,
        };
        let volumes = c.volumes.clone();
        metrics::set_active_volumes(move || volumes.lock().map_or(0, |v| v.len() as u64));
        c
    }

    pub fn create(&self, req: &CreateVolumeRequest, deadline: &Deadline) -> Result<CreateVolumeResponse> {
        if req.name.is_empty() {
            return Err(Error::missing("name", ""));
        }
        let id = volume::id_for_name(&req.name);
        if req.volume_capabilities.is_empty() {
            return Err(Error::missing("volume_capabilities", &id));
        }
        for cap in &req.volume_capabilities {
            volume::check_capability(&id, cap)?;
        }
        if req.volume_content_source.is_some() {
            return Err(Error::unsupported(
                &id,
                "volume_content_source (no snapshots or clones of a cache)",
            ));
        }
        let policy = check_parameters(&id, &req.parameters, &req.mutable_parameters)?;
        let (required, limit) = req
            .capacity_range
            .as_ref()
            .map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
        if required < 0 || limit < 0 || (limit > 0 && required > limit) {
            return Err(Error::BadCapacity {
                volume: id,
                reason: format!("capacity range required_bytes={required} limit_bytes={limit} cannot be met"),
            });
        }
        let capacity = if required > 0 { required } else { limit };

        let volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = volumes.get(&id) {
            let fits = (required == 0 || existing.capacity >= required) && (limit == 0 || existing.capacity <= limit);
            if existing.eviction != policy {
                return Err(Error::conflict(
                    &id,
                    "",
                    format!(
                        "name {:?} exists with eviction {}, not {}",
                        existing.name,
                        existing.eviction.as_str(),
                        policy.as_str()
                    ),
                ));
            }
            if !fits {
                return Err(Error::conflict(
                    &id,
                    "",
                    format!(
                        "name {:?} exists with capacity {} bytes, outside the requested range {required}..{limit}",
                        existing.name, existing.capacity
                    ),
                ));
            }
            debug!("volume {id} for name {:?} exists already", req.name);
            return Ok(response(&id, &existing.name, existing.capacity, policy));
        }
        drop(volumes);
        if let Some(d) = &self.deleter {
            if d.creation_blocked(&id, deadline.clone())? {
                return Err(Error::Unavailable {
                    volume: id,
                    reason: format!(
                        "name {:?}: the cleanup of an earlier volume with this name is still running; retry",
                        req.name
                    ),
                });
            }
        }
        let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        volumes.insert(
            id.clone(),
            VolumeRecord {
                name: req.name.clone(),
                capacity,
                eviction: policy,
            },
        );
        metrics::VOLUME_CREATE_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(
            "created volume {id} for name {:?} ({capacity} bytes, eviction {})",
            req.name,
            policy.as_str()
        );
        Ok(response(&id, &req.name, capacity, policy))
    }

    pub fn delete(&self, req: &DeleteVolumeRequest, deadline: &Deadline) -> Result<DeleteVolumeResponse> {
        let id = &req.volume_id;
        if id.is_empty() {
            return Err(Error::missing("volume_id", ""));
        }
        if volume::check_id(id).is_err() {
            debug!("volume {id:?} is not one of ours; nothing to delete");
            return Ok(DeleteVolumeResponse::new());
        }
        let name = self
            .volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| r.name.clone());
        match &self.deleter {
            Some(d) => d.volume_deleted(id, name.as_deref(), deadline.clone())?,
            None => info!("volume {id} deleted; no Kubernetes API configured, so nodes keep their copies"),
        }
        if self
            .volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
        {
            metrics::VOLUME_DELETE_TOTAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(DeleteVolumeResponse::new())
    }

    pub fn validate(req: &ValidateVolumeCapabilitiesRequest) -> Result<ValidateVolumeCapabilitiesResponse> {
        let id = &req.volume_id;
        if id.is_empty() {
            return Err(Error::missing("volume_id", ""));
        }
        if volume::check_id(id).is_err() {
            return Err(Error::not_found(id, "", "not a volume of this driver"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::missing("volume_capabilities", id));
        }
        let mut r = ValidateVolumeCapabilitiesResponse::new();
        // Confirmed only as far as checked: what CreateVolume or a publish would refuse is not.
        match req
            .volume_capabilities
            .iter()
            .try_for_each(|c| volume::check_capability(id, c).map(drop))
            .and_then(|()| check_parameters(id, &req.parameters, &req.mutable_parameters))
            .and_then(|_| Limits::from_context(id, &req.volume_context).map(drop))
        {
            Ok(()) => {
                let mut confirmed = Confirmed::new();
                confirmed.volume_capabilities = req.volume_capabilities.clone();
                confirmed.volume_context = req.volume_context.clone();
                confirmed.parameters = req.parameters.clone();
                r.confirmed = Some(confirmed).into();
            }
            Err(e) => r.message = e.to_string(),
        }
        Ok(r)
    }

    fn capabilities() -> ControllerGetCapabilitiesResponse {
        let mut rpc = controller_service_capability::RPC::new();
        rpc.type_ = RpcType::CREATE_DELETE_VOLUME.into();
        let mut cap = ControllerServiceCapability::new();
        cap.set_rpc(rpc);
        let mut r = ControllerGetCapabilitiesResponse::new();
        r.capabilities.push(cap);
        r
    }
}

/// The policy a volume's parameters ask for. Only csi-provisioner's own `csi.storage.k8s.io/…`
/// and `eviction` are taken, so a typo is refused, not ignored; and no mutable parameters: with
/// no MODIFY_VOLUME, a VolumeAttributesClass (which csi-provisioner passes as mutable
/// parameters whatever the driver's capabilities) would be named on the PV and never honoured.
fn check_parameters(
    id: &str,
    parameters: &HashMap<String, String>,
    mutable_parameters: &HashMap<String, String>,
) -> Result<Policy> {
    let only = eviction::PARAMETER;
    if let Some(key) = mutable_parameters.keys().min() {
        return Err(Error::unsupported(
            id,
            format!("mutable parameter {key:?} (no VolumeAttributesClass: set {only:?} in the StorageClass)"),
        ));
    }
    if let Some(key) = parameters
        .keys()
        .find(|k| !k.starts_with(PROVISIONER_PREFIX) && *k != only)
    {
        return Err(Error::unsupported(
            id,
            format!("StorageClass parameter {key:?} (this driver takes only {only:?})"),
        ));
    }
    Policy::from_parameters(id, parameters)
}

/// No accessible_topology: any node may use the volume, so the scheduler never pins a pod. The
/// name (the PV name under csi-provisioner), the capacity and the eviction policy travel to the
/// nodes in the volume context: each node holds its copy to them.
fn response(id: &str, name: &str, capacity: i64, eviction: Policy) -> CreateVolumeResponse {
    let mut v = Volume::new();
    v.volume_id = id.to_owned();
    v.volume_context
        .insert(crate::node::CONTEXT_NAME.into(), name.to_owned());
    Limits {
        capacity: capacity.max(0) as u64,
        policy: eviction,
    }
    .to_context(&mut v.volume_context);
    v.capacity_bytes = capacity;
    let mut r = CreateVolumeResponse::new();
    r.volume = Some(v).into();
    r
}

/// The deadline the caller set on this call; the work done for it on a worker keeps it.
fn caller_deadline(ctx: &RpcContext) -> Deadline {
    let d = ctx.deadline();
    Deadline::probe(move || d.exceeded())
}

impl grpc::Controller for ControllerService {
    fn create_volume(&mut self, ctx: RpcContext, req: CreateVolumeRequest, sink: UnarySink<CreateVolumeResponse>) {
        let this = self.clone();
        let deadline = caller_deadline(&ctx);
        let subject = if req.name.is_empty() {
            String::new()
        } else {
            volume::id_for_name(&req.name)
        };
        self.rpc.blocking("CreateVolume", &subject, req, sink, move |req| {
            this.create(&req, &deadline)
        });
    }

    fn delete_volume(&mut self, ctx: RpcContext, req: DeleteVolumeRequest, sink: UnarySink<DeleteVolumeResponse>) {
        let this = self.clone();
        let deadline = caller_deadline(&ctx);
        let subject = req.volume_id.clone();
        self.rpc.blocking("DeleteVolume", &subject, req, sink, move |req| {
            this.delete(&req, &deadline)
        });
    }

    fn validate_volume_capabilities(
        &mut self,
        _: RpcContext,
        req: ValidateVolumeCapabilitiesRequest,
        sink: UnarySink<ValidateVolumeCapabilitiesResponse>,
    ) {
        self.rpc.inline("ValidateVolumeCapabilities", req, sink, |req| {
            ControllerService::validate(&req)
        });
    }

    fn controller_get_capabilities(
        &mut self,
        _: RpcContext,
        req: ControllerGetCapabilitiesRequest,
        sink: UnarySink<ControllerGetCapabilitiesResponse>,
    ) {
        self.rpc.inline("ControllerGetCapabilities", req, sink, |_| {
            Ok(ControllerService::capabilities())
        });
    }
}
