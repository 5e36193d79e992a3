//! A small blocking Kubernetes REST client: plain HTTPS with ureq and serde_json, only the calls
//! the cleanup protocol needs. TLS is always verified against the given CA; the bearer token is
//! re-read whenever its file changes (projected tokens rotate about hourly).
//!
//! Lists of objects that grow with the cluster (PVs, CSINodes, the nodes' cleanup objects) are
//! read a page at a time and reduced to the few fields used before the next page is asked for,
//! so memory holds one page, never the cluster. A list from the watch cache comes in one
//! response whatever its size; it is decoded an item at a time and each item reduced before the
//! next is read, so memory holds one item.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use log::{debug, info, warn};
use serde_core::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Value};

use crate::metrics;
use crate::time::Deadline;

/// The longest Retry-After a request waits out before it tries again; a longer one fails it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Largest response body decoded whole: one object (lists are read item by item), which etcd
/// keeps under 1.5 MiB; the bound only stops a runaway response.
const MAX_BODY: u64 = 32 << 20;
/// Largest item of a list decoded item by item, with what comes before it: etcd keeps no object
/// over 1.5 MiB (its default request limit), and JSON makes that little more. A list or a page
/// has no bound: it grows with the cluster, its memory does not.
const MAX_ITEM: u64 = 4 << 20;
/// Items per page of a paginated list: a page of PVs with their managedFields is about 1 MiB.
pub const PAGE: usize = 500;

/// Where the API is and how to authenticate; flags override the in-cluster defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    pub api_url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub namespace: String,
    pub timeout: Duration,
    /// Attempts for calls that are safe to retry.
    pub attempts: u32,
    /// First retry delay; doubled each time, with jitter.
    pub backoff: Duration,
}

/// Flag values, all optional; in-cluster defaults fill the gaps.
#[derive(Debug, Default, Clone)]
pub struct KubeFlags {
    pub api_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub namespace: Option<String>,
}

impl KubeConfig {
    /// `None` when there is no API to talk to: outside a cluster and no `--kube-api-url`.
    pub fn resolve(flags: KubeFlags) -> Option<KubeConfig> {
        let api_url = flags.api_url.filter(|u| !u.is_empty()).or_else(|| {
            let host = std::env::var("KUBERNETES_SERVICE_HOST")
                .ok()
                .filter(|h| !h.is_empty())?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            // An IPv6 service IP needs brackets in a URL.
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            Some(format!("https://{host}:{port}"))
        })?;
        let namespace = flags
            .namespace
            .filter(|n| !n.is_empty())
            .or_else(|| {
                std::fs::read_to_string(Path::new(SA_DIR).join("namespace"))
                    .ok()
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or_else(|| "node-local-cache".into());
        Some(KubeConfig {
            api_url: api_url.trim_end_matches('/').to_owned(),
            token_file: flags.token_file.unwrap_or_else(|| Path::new(SA_DIR).join("token")),
            ca_file: flags.ca_file.unwrap_or_else(|| Path::new(SA_DIR).join("ca.crt")),
            namespace,
            timeout: Duration::from_secs(10),
            attempts: 4,
            backoff: Duration::from_millis(200),
        })
    }
}

/// What went wrong with a call, by what a caller does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeError {
    NotFound,
    /// 409: exists already, or a resourceVersion precondition failed.
    Conflict(String),
    /// 410: a list or watch position too old.
    Gone,
    /// 401/403.
    Unauthorized(u16, String),
    /// 429, with the server's Retry-After.
    Throttled(Option<Duration>),
    /// 5xx.
    Server(u16, String),
    /// Other 4xx (invalid request, forbidden change).
    Rejected(u16, String),
    /// No response: connection, TLS, timeout.
    Transport(String),
    /// A response we could not read.
    BadResponse(String),
    /// The caller's deadline passed before the call could be made or retried.
    DeadlineExceeded,
}

impl KubeError {
    /// Worth trying again with the same request.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            KubeError::Throttled(_) | KubeError::Server(..) | KubeError::Transport(_)
        )
    }
}

impl fmt::Display for KubeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KubeError::NotFound => write!(f, "not found"),
            KubeError::Conflict(m) => write!(f, "conflict: {m}"),
            KubeError::Gone => write!(f, "gone (resource version too old)"),
            KubeError::Unauthorized(c, m) => write!(f, "unauthorized ({c}): {m}"),
            KubeError::Throttled(after) => write!(f, "throttled (retry after {after:?})"),
            KubeError::Server(c, m) => write!(f, "server error {c}: {m}"),
            KubeError::Rejected(c, m) => write!(f, "rejected ({c}): {m}"),
            KubeError::Transport(m) => write!(f, "no response: {m}"),
            KubeError::BadResponse(m) => write!(f, "unreadable response: {m}"),
            KubeError::DeadlineExceeded => write!(f, "the caller's deadline passed"),
        }
    }
}

impl std::error::Error for KubeError {}

pub type KubeResult<T> = Result<T, KubeError>;

/// The token as last read, and the file's mtime it was read at.
struct Token {
    modified: Option<SystemTime>,
    value: String,
}

/// The HTTP agent, the CA file's content it trusts, and that file's mtime when last read.
struct CaAgent {
    ca_modified: Option<SystemTime>,
    ca: Vec<u8>,
    agent: ureq::Agent,
}

#[derive(Clone)]
pub struct Client {
    cfg: Arc<KubeConfig>,
    agent: Arc<Mutex<CaAgent>>,
    token: Arc<Mutex<Token>>,
    /// Every call made through this handle ends by then (see `with_deadline`).
    deadline: Deadline,
}

impl Client {
    /// The client the flags, or else the pod's service account, call for; `None` when neither
    /// names an API server (standalone: deleted volumes stay on the nodes).
    pub fn from_flags(flags: KubeFlags) -> Result<Option<Client>, String> {
        let Some(cfg) = KubeConfig::resolve(flags) else {
            info!("no Kubernetes API configured: running standalone; deleted volumes stay on the nodes");
            return Ok(None);
        };
        Client::new(cfg)
            .map(Some)
            .map_err(|e| format!("Kubernetes client: {e}"))
    }

    pub fn new(cfg: KubeConfig) -> Result<Client, String> {
        let ca_modified = std::fs::metadata(&cfg.ca_file).and_then(|m| m.modified()).ok();
        let ca = read_ca(&cfg)?;
        let agent = CaAgent {
            ca_modified,
            agent: new_agent(&cfg, &ca)?,
            ca,
        };
        let client = Client {
            cfg: Arc::new(cfg),
            agent: Arc::new(Mutex::new(agent)),
            token: Arc::new(Mutex::new(Token {
                modified: None,
                value: String::new(),
            })),
            deadline: Deadline::none(),
        };
        client.bearer().map_err(|e| e.to_string())?;
        Ok(client)
    }

    /// The agent, made anew when the CA file's content changed: kubelet rewrites the projected
    /// `ca.crt` when the cluster's CA is rotated (and, unchanged, with every token refresh, so
    /// the content is compared once its mtime moves). A file that cannot be read or holds no
    /// certificate (half written) leaves the agent as it was until the next call.
    fn agent(&self) -> ureq::Agent {
        let modified = std::fs::metadata(&self.cfg.ca_file).and_then(|m| m.modified()).ok();
        let mut agent = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        if modified.is_some() && modified != agent.ca_modified {
            let fresh = read_ca(&self.cfg).and_then(|ca| {
                if ca == agent.ca {
                    return Ok(None);
                }
                new_agent(&self.cfg, &ca).map(|a| Some((ca, a)))
            });
            match fresh {
                Ok(None) => agent.ca_modified = modified,
                Ok(Some((ca, a))) => {
                    info!(
                        "the API CA file {} changed; trusting it from now on",
                        self.cfg.ca_file.display()
                    );
                    *agent = CaAgent {
                        ca_modified: modified,
                        ca,
                        agent: a,
                    };
                }
                Err(e) => debug!("{e}; keeping the CA read before"),
            }
        }
        agent.agent.clone()
    }

    pub fn namespace(&self) -> &str {
        &self.cfg.namespace
    }

    /// The same client, for work done on behalf of a caller who stops waiting at `deadline`: no
    /// request starts and no retry waits past it, and a request's timeout is cut to the time
    /// left where that is known.
    pub fn with_deadline(&self, deadline: Deadline) -> Client {
        Client {
            deadline,
            ..self.clone()
        }
    }

    /// The current token, re-read when its file's mtime moved.
    fn bearer(&self) -> KubeResult<String> {
        let path = &self.cfg.token_file;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut token = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if token.value.is_empty() || modified != token.modified {
            let value = std::fs::read_to_string(path)
                .map_err(|e| KubeError::Unauthorized(0, format!("token file {}: {e}", path.display())))?
                .trim()
                .to_owned();
            if !token.value.is_empty() && value != token.value {
                debug!("service account token rotated");
            }
            *token = Token { modified, value };
        }
        Ok(token.value.clone())
    }

    fn forget_token(&self) {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).value.clear();
    }

    /// One request, no retries; `read` decodes a successful response's body. `verb` labels the
    /// metric.
    fn once<T>(
        &self,
        verb: &'static str,
        method: &str,
        path: &str,
        body: Option<(&str, &Value)>,
        timeout: Duration,
        read: &mut dyn FnMut(&mut ureq::Body) -> KubeResult<T>,
    ) -> KubeResult<T> {
        let url = format!("{}{path}", self.cfg.api_url);
        let auth = format!("Bearer {}", self.bearer()?);
        let timeout = Some(timeout);
        let agent = self.agent();
        let result = match (method, body) {
            ("GET", _) => agent
                .get(&url)
                .config()
                .timeout_global(timeout)
                .build()
                .header("Authorization", &auth)
                .header("Accept", "application/json")
                .call(),
            // DeleteOptions in the body: preconditions have no query parameter.
            ("DELETE", Some((kind, b))) => agent
                .delete(&url)
                .config()
                .timeout_global(timeout)
                .build()
                .header("Authorization", &auth)
                .header("Content-Type", kind)
                .force_send_body()
                .send(b.to_string()),
            ("POST", Some((kind, b))) => agent
                .post(&url)
                .config()
                .timeout_global(timeout)
                .build()
                .header("Authorization", &auth)
                .header("Content-Type", kind)
                .send(b.to_string()),
            ("PATCH", Some((kind, b))) => agent
                .patch(&url)
                .config()
                .timeout_global(timeout)
                .build()
                .header("Authorization", &auth)
                .header("Content-Type", kind)
                .send(b.to_string()),
            _ => unreachable!("request shapes are fixed by the callers in this module"),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                metrics::record_kube(verb, 0);
                return Err(KubeError::Transport(e.to_string()));
            }
        };
        let status = resp.status().as_u16();
        metrics::record_kube(verb, status);
        let retry_after = resp
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if (200..=299).contains(&status) {
            return read(resp.body_mut());
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        let message = || {
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| text.chars().take(200).collect())
        };
        match status {
            404 => Err(KubeError::NotFound),
            409 => Err(KubeError::Conflict(message())),
            410 => Err(KubeError::Gone),
            401 | 403 => Err(KubeError::Unauthorized(status, message())),
            429 => Err(KubeError::Throttled(retry_after)),
            500..=599 => Err(KubeError::Server(status, message())),
            _ => Err(KubeError::Rejected(status, message())),
        }
    }

    /// `call_reading` with the body decoded whole.
    fn call(&self, verb: &'static str, method: &str, path: &str, body: Option<(&str, &Value)>) -> KubeResult<Value> {
        self.call_reading(verb, method, path, body, &mut read_value)
    }

    /// Retries what is safe to retry with jittered exponential backoff (or the server's
    /// Retry-After, up to `MAX_RETRY_AFTER`); a 401 re-reads the token
    /// once (it may have rotated between our stat and the server's check). Nothing starts or
    /// waits past the handle's deadline. `read` decodes a successful response's body; a retry
    /// reads the new response from the start.
    fn call_reading<T>(
        &self,
        verb: &'static str,
        method: &str,
        path: &str,
        body: Option<(&str, &Value)>,
        read: &mut dyn FnMut(&mut ureq::Body) -> KubeResult<T>,
    ) -> KubeResult<T> {
        let mut delay = self.cfg.backoff;
        let mut reread_token = true;
        let mut attempt = 1;
        loop {
            if self.deadline.passed() {
                return Err(KubeError::DeadlineExceeded);
            }
            let timeout = self
                .deadline
                .remaining()
                .map_or(self.cfg.timeout, |left| left.min(self.cfg.timeout));
            match self.once(verb, method, path, body, timeout, read) {
                Err(KubeError::Unauthorized(401, _)) if reread_token => {
                    reread_token = false;
                    self.forget_token();
                }
                Err(e) if e.retryable() && attempt < self.cfg.attempts => {
                    let wait = match &e {
                        // Longer than a retry is for (a proxy's hour): the caller's next poll
                        // or the provisioner's retry comes first.
                        KubeError::Throttled(Some(after)) if *after > MAX_RETRY_AFTER => return Err(e),
                        // At least what the server asked, spread so that the nodes it throttled
                        // together do not come back together.
                        KubeError::Throttled(Some(after)) => *after + jitter(*after) / 2,
                        _ => jitter(delay),
                    };
                    if self.deadline.remaining().is_some_and(|left| left <= wait) {
                        return Err(e);
                    }
                    debug!("{method} {path}: {e}; retrying in {wait:?}");
                    if !self.deadline.sleep(wait) {
                        return Err(e);
                    }
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Calls `each` with every item of the list at `path` (with `query`, no `?`), `PAGE` items a
    /// page, until it breaks. Each item is decoded as it arrives and dropped before the next, so
    /// memory holds one item, never a page: in a large teardown a page of nodes' objects passes
    /// 40 MB. A page cut off after `each` saw some of its items is not read again (`each` would
    /// see them twice): the list fails, for the caller's next pass. Read from etcd, not the watch
    /// cache: the watch cache of the apiservers this driver supports answers `resourceVersion=0`
    /// with the whole list, whatever the limit.
    fn for_each_item(
        &self,
        path: &str,
        query: &str,
        each: &mut dyn FnMut(&Value) -> ControlFlow<()>,
    ) -> KubeResult<()> {
        let mut next: Option<String> = None;
        let mut stop = false;
        loop {
            let mut url = format!("{path}?limit={PAGE}");
            if !query.is_empty() {
                url = format!("{url}&{query}");
            }
            if let Some(token) = &next {
                url = format!("{url}&continue={}", encode(token));
            }
            let mut seen = 0usize;
            next = self.call_reading("list", "GET", &url, None, &mut |body| {
                let mut visit = |item: &Value| {
                    if !stop {
                        seen += 1;
                        stop = each(item).is_break();
                    }
                };
                match read_list(body.with_config().reader(), MAX_ITEM, &mut visit) {
                    Ok(next) => Ok(next),
                    Err(KubeError::Transport(e)) if seen > 0 => {
                        Err(KubeError::BadResponse(format!("cut off after {seen} items: {e}")))
                    }
                    Err(e) => Err(e),
                }
            })?;
            if stop || next.is_none() {
                return Ok(());
            }
        }
    }

    fn ns_path(&self, resource: &str) -> String {
        format!("/api/v1/namespaces/{}/{resource}", self.cfg.namespace)
    }

    /// A ConfigMap as etcd has it now.
    pub fn get_configmap(&self, name: &str) -> KubeResult<Value> {
        self.call("get", "GET", &format!("{}/{name}", self.ns_path("configmaps")), None)
    }

    /// A ConfigMap from the apiserver's watch cache (`resourceVersion=0`): cheap for the server,
    /// at most a moment behind.
    pub fn get_configmap_cached(&self, name: &str) -> KubeResult<Value> {
        self.call(
            "get",
            "GET",
            &format!("{}/{name}?resourceVersion=0", self.ns_path("configmaps")),
            None,
        )
    }

    /// Lists from the apiserver's watch cache (`resourceVersion=0`), which answers in one
    /// response whatever the `limit`: what `keep` makes of each item, decoded as it arrives and
    /// dropped before the next one, so memory holds one item and what was kept, never the list
    /// (decoded whole, a cleanup record of ~800 bytes took ~7 KiB, managedFields included).
    pub fn list_configmaps_cached<T>(
        &self,
        label_selector: &str,
        mut keep: impl FnMut(&Value) -> Option<T>,
    ) -> KubeResult<Vec<T>> {
        let path = format!(
            "{}?labelSelector={}&resourceVersion=0",
            self.ns_path("configmaps"),
            encode(label_selector)
        );
        self.call_reading("list", "GET", &path, None, &mut |body| {
            let mut kept = Vec::new();
            read_list(body.with_config().reader(), MAX_ITEM, &mut |item| {
                kept.extend(keep(item))
            })?;
            Ok(kept)
        })
    }

    /// Every ConfigMap matching the selector, one at a time, as etcd has them now.
    pub fn for_each_configmap(&self, label_selector: &str, each: &mut dyn FnMut(&Value)) -> KubeResult<()> {
        self.for_each_item(
            &self.ns_path("configmaps"),
            &format!("labelSelector={}", encode(label_selector)),
            &mut |object| {
                each(object);
                ControlFlow::Continue(())
            },
        )
    }

    pub fn create_configmap(&self, body: &Value) -> KubeResult<Value> {
        self.call(
            "create",
            "POST",
            &self.ns_path("configmaps"),
            Some(("application/json", body)),
        )
    }

    /// JSON merge patch. Put `metadata.resourceVersion` in the patch to make it conditional.
    pub fn patch_configmap(&self, name: &str, patch: &Value) -> KubeResult<Value> {
        self.call(
            "patch",
            "PATCH",
            &format!("{}/{name}", self.ns_path("configmaps")),
            Some(("application/merge-patch+json", patch)),
        )
    }

    /// Deletes a ConfigMap only as it was at `resource_version`; false when it changed since or
    /// is gone already.
    pub fn delete_configmap_at(&self, name: &str, resource_version: &str) -> KubeResult<bool> {
        let options = json!({
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": { "resourceVersion": resource_version },
        });
        match self.call(
            "delete",
            "DELETE",
            &format!("{}/{name}", self.ns_path("configmaps")),
            Some(("application/json", &options)),
        ) {
            Ok(_) => Ok(true),
            Err(KubeError::NotFound | KubeError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn get_pv(&self, name: &str) -> KubeResult<Value> {
        self.call(
            "get",
            "GET",
            &format!("/api/v1/persistentvolumes/{}", encode(name)),
            None,
        )
    }

    /// The PVs of `driver`, as volume handle → PV name, scanning the PVs a page at a time:
    /// those whose handle is one of `handles` (stopping once every one is found), or, with
    /// `None`, all of them.
    pub fn pv_names(&self, driver: &str, handles: Option<&HashSet<String>>) -> KubeResult<HashMap<String, String>> {
        let mut names = HashMap::new();
        self.for_each_item("/api/v1/persistentvolumes", "", &mut |pv| {
            let handle = csi_handle(pv, driver).filter(|h| handles.is_none_or(|w| w.contains(*h)));
            if let (Some(handle), Some(name)) = (handle, pv["metadata"]["name"].as_str()) {
                names.insert(handle.to_owned(), name.to_owned());
            }
            if handles.is_some_and(|w| names.len() == w.len()) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        Ok(names)
    }

    /// JSON merge patch; with `metadata.resourceVersion` in it, a concurrent change gives 409
    /// instead of being overwritten.
    pub fn patch_pv(&self, name: &str, patch: &Value) -> KubeResult<Value> {
        self.call(
            "patch",
            "PATCH",
            &format!("/api/v1/persistentvolumes/{}", encode(name)),
            Some(("application/merge-patch+json", patch)),
        )
    }

    /// Names of the nodes whose CSINode lists `driver`: the nodes expected to acknowledge.
    pub fn nodes_with_driver(&self, driver: &str) -> KubeResult<Vec<String>> {
        let mut names = Vec::new();
        self.for_each_csinode(&mut |name, drivers| {
            if drivers.iter().any(|d| d["name"].as_str() == Some(driver)) {
                names.push(name.to_owned());
            }
        })?;
        Ok(names)
    }

    /// Names of every node with a CSINode, whatever drivers it lists. Kubelet makes a node's
    /// CSINode when it registers, and the garbage collector deletes it with the Node.
    pub fn nodes_in_cluster(&self) -> KubeResult<HashSet<String>> {
        let mut names = HashSet::new();
        self.for_each_csinode(&mut |name, _| {
            names.insert(name.to_owned());
        })?;
        Ok(names)
    }

    /// Calls `each` with every CSINode's name and drivers.
    fn for_each_csinode(&self, each: &mut dyn FnMut(&str, &[Value])) -> KubeResult<()> {
        self.for_each_item("/apis/storage.k8s.io/v1/csinodes", "", &mut |n| {
            if let Some(name) = n["metadata"]["name"].as_str() {
                each(name, n["spec"]["drivers"].as_array().map_or(&[], Vec::as_slice));
            }
            ControlFlow::Continue(())
        })
    }
}

fn read_ca(cfg: &KubeConfig) -> Result<Vec<u8>, String> {
    std::fs::read(&cfg.ca_file).map_err(|e| format!("CA file {}: {e}", cfg.ca_file.display()))
}

/// An agent that trusts the certificates of `pem` (the CA file's content) and nothing else.
fn new_agent(cfg: &KubeConfig, pem: &[u8]) -> Result<ureq::Agent, String> {
    let certs: Vec<_> = ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA file {}: {e}", cfg.ca_file.display()))?;
    if certs.is_empty() {
        return Err(format!("CA file {}: no certificate in it", cfg.ca_file.display()));
    }
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(cfg.timeout))
        .http_status_as_error(false)
        .max_idle_connections(2)
        .max_idle_connections_per_host(2)
        .user_agent(concat!("node-local-cache/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent())
}

/// The CSI volume handle of a PV provisioned by `driver`.
fn csi_handle<'a>(pv: &'a Value, driver: &str) -> Option<&'a str> {
    let csi = &pv["spec"]["csi"];
    (csi["driver"].as_str() == Some(driver))
        .then(|| csi["volumeHandle"].as_str())
        .flatten()
}

/// A body decoded whole as it arrives (its text is never held beside the value), up to `MAX_BODY`.
fn read_value(body: &mut ureq::Body) -> KubeResult<Value> {
    let reader = BufReader::new(body.with_config().limit(MAX_BODY).reader());
    serde_json::from_reader(reader).map_err(unreadable)
}

/// Hands each item of the list in `body` to `each`, decoded one item at a time, and returns the
/// list's `continue` token; an item, with what comes before it, may take `item_limit` bytes.
fn read_list(body: impl Read, item_limit: u64, each: &mut dyn FnMut(&Value)) -> KubeResult<Option<String>> {
    let item_bytes = Cell::new(0);
    let bounded = ItemBound {
        inner: body,
        read: &item_bytes,
        limit: item_limit,
    };
    let mut decoder = serde_json::Deserializer::from_reader(BufReader::new(bounded));
    let next = decoder
        .deserialize_map(ListItems {
            each,
            item_bytes: &item_bytes,
        })
        .map_err(unreadable)?;
    decoder.end().map_err(unreadable)?;
    Ok(next)
}

/// Why a body could not be read, by whether another try could do better: cut off (no
/// response: yes), or over a size bound or not the JSON expected (no: the same again).
fn unreadable(e: serde_json::Error) -> KubeError {
    if !e.is_io() {
        return KubeError::BadResponse(e.to_string());
    }
    let text = e.to_string();
    let e = io::Error::from(e);
    if let Some(over) = e.get_ref().and_then(|inner| inner.downcast_ref::<ItemTooLarge>()) {
        return KubeError::BadResponse(over.to_string());
    }
    match ureq::Error::from(e) {
        ureq::Error::BodyExceedsLimit(limit) => KubeError::BadResponse(format!("a response over {limit} bytes")),
        _ => KubeError::Transport(text),
    }
}

/// A list item, with what came before it, over the bound.
#[derive(Debug)]
struct ItemTooLarge(u64);

impl fmt::Display for ItemTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list item over {} bytes", self.0)
    }
}

impl std::error::Error for ItemTooLarge {}

/// Fails a read once more than `limit` bytes came since `read` was last set to 0 (at the start
/// of each item): one item's bound, met as it arrives, not once it is decoded. Under the
/// decoder's buffer, so it counts in whole reads: an item may take up to a buffer more.
struct ItemBound<'a, R> {
    inner: R,
    read: &'a Cell<u64>,
    limit: u64,
}

impl<R: Read> Read for ItemBound<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read.get() > self.limit {
            return Err(io::Error::other(ItemTooLarge(self.limit)));
        }
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// A list response: the object around `items`, of whose other fields only `metadata.continue`
/// is kept.
struct ListItems<'a> {
    each: &'a mut dyn FnMut(&Value),
    item_bytes: &'a Cell<u64>,
}

impl<'de> Visitor<'de> for ListItems<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list response")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        let ListItems { each, item_bytes } = self;
        let mut listed = false;
        let mut next = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" && !listed {
                map.next_value_seed(Items {
                    each: &mut *each,
                    item_bytes,
                })?;
                listed = true;
            } else if key == "metadata" {
                let meta: Value = map.next_value()?;
                next = meta["continue"].as_str().filter(|t| !t.is_empty()).map(str::to_owned);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        // Not a list (a proxy's error page, a Status): read as empty, every record would look gone.
        if !listed {
            return Err(de::Error::custom("a list response without items"));
        }
        Ok(next)
    }
}

/// A list's `items`: each decoded alone, handed to `each`, dropped before the next.
struct Items<'a> {
    each: &'a mut dyn FnMut(&Value),
    item_bytes: &'a Cell<u64>,
}

impl<'de> DeserializeSeed<'de> for Items<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, items: D) -> Result<(), D::Error> {
        items.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of items")
    }

    /// The apiserver may write an empty list's items as null.
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        loop {
            self.item_bytes.set(0);
            let Some(item) = items.next_element::<Value>()? else {
                return Ok(());
            };
            (self.each)(&item);
        }
    }
}

/// Percent-encoding for a query value or path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// 50–150 % of `d`, so thousands of nodes retrying together spread out.
pub fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    let seed = nanos ^ (std::process::id() as u64).rotate_left(17) ^ thread_id_bits();
    let frac = 0.5 + (splitmix(seed) % 1000) as f64 / 1000.0;
    d.mul_f64(frac)
}

fn thread_id_bits() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    thread::current().id().hash(&mut h);
    h.finish()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Logs a failed call once per distinct error text, so an outage does not flood the log.
pub struct QuietLog {
    last: Mutex<String>,
}

impl QuietLog {
    pub const fn new() -> QuietLog {
        QuietLog {
            last: Mutex::new(String::new()),
        }
    }

    pub fn failed(&self, what: &str, e: &KubeError) {
        let text = format!("{what}: {e}");
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last != text {
            warn!("Kubernetes API: {text}");
            *last = text;
        }
    }

    pub fn ok(&self) {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Default for QuietLog {
    fn default() -> Self {
        QuietLog::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_selectors() {
        assert_eq!(
            encode("node-local-cache.csi.io/cleanup=pending"),
            "node-local-cache.csi.io%2Fcleanup%3Dpending"
        );
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10));
            assert!(j >= Duration::from_secs(5) && j <= Duration::from_secs(15), "{j:?}");
        }
    }

    #[test]
    fn standalone_without_cluster_env() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert_eq!(KubeConfig::resolve(KubeFlags::default()), None);
        }
        let cfg = KubeConfig::resolve(KubeFlags {
            api_url: Some("https://10.0.0.1:6443/".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.api_url, "https://10.0.0.1:6443");
    }

    /// A list always carries `items` (null for none, as the apiserver may write an empty list). A
    /// body without it is not a list: read as an empty one, it would make every PV look gone.
    #[test]
    fn a_body_without_items_is_not_an_empty_list() {
        let count = |body: &str| {
            let mut n = 0;
            read_list(body.as_bytes(), MAX_ITEM, &mut |_| n += 1).map(|_| n)
        };
        assert_eq!(count(r#"{"items": [1]}"#).unwrap(), 1);
        assert_eq!(count(r#"{"items": null}"#).unwrap(), 0);
        assert_eq!(count(r#"{"items": []}"#).unwrap(), 0);
        assert!(count("{}").is_err());
        assert!(count(r#"{"kind": "Status"}"#).is_err());
    }

    /// A page's `continue` token is read wherever `metadata` stands; an empty one ends the list.
    #[test]
    fn a_page_names_the_next() {
        let next = |body: &str| read_list(body.as_bytes(), MAX_ITEM, &mut |_| ()).unwrap();
        assert_eq!(
            next(r#"{"metadata": {"continue": "abc", "resourceVersion": "7"}, "items": [{}]}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(
            next(r#"{"items": [], "metadata": {"continue": "x"}}"#).as_deref(),
            Some("x")
        );
        assert_eq!(next(r#"{"metadata": {"continue": ""}, "items": []}"#), None);
        assert_eq!(next(r#"{"items": []}"#), None);
    }

    /// Names of the items of a list body, read item by item.
    fn names(body: &str, item_limit: u64) -> KubeResult<Vec<String>> {
        let mut names = Vec::new();
        read_list(body.as_bytes(), item_limit, &mut |item| {
            names.extend(item["metadata"]["name"].as_str().map(str::to_owned))
        })?;
        Ok(names)
    }

    /// The same answers as `items` gives for a list decoded whole, wherever `items` comes in the
    /// object; what `keep` leaves out is not kept.
    #[test]
    fn a_list_read_item_by_item_keeps_what_the_whole_list_gave() {
        let list = r#"{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"7"},
            "items":[{"metadata":{"name":"a"}},{"data":{}},{"metadata":{"name":"c","managedFields":[{"manager":"x"}]}}]}"#;
        assert_eq!(names(list, MAX_ITEM).unwrap(), ["a", "c"]);
        let items_first = r#"{"items":[{"metadata":{"name":"a"}}],"metadata":{"continue":""},"kind":"List"}"#;
        assert_eq!(names(items_first, MAX_ITEM).unwrap(), ["a"]);
        assert!(names(r#"{"items":null}"#, MAX_ITEM).unwrap().is_empty());
        assert!(names(r#" {"items":[]} "#, MAX_ITEM).unwrap().is_empty());
        for not_a_list in [
            r#"{}"#,
            r#"{"kind":"Status","code":500}"#,
            r#"{"items":{}}"#,
            "[]",
            r#""x""#,
            "<html>",
            r#"{"items":[]} x"#,
        ] {
            assert!(
                matches!(names(not_a_list, MAX_ITEM), Err(KubeError::BadResponse(_))),
                "{not_a_list}"
            );
        }
    }

    /// One item over the bound fails the list, not to be retried; items under it do not add up.
    #[test]
    fn a_list_bounds_each_item_not_the_whole() {
        let item = |name: &str, pad: usize| {
            format!(
                r#"{{"metadata":{{"name":"{name}"}},"data":{{"k":"{}"}}}}"#,
                "x".repeat(pad)
            )
        };
        let many: Vec<String> = (0..200).map(|k| item(&k.to_string(), 900)).collect();
        let body = format!(r#"{{"items":[{}]}}"#, many.join(","));
        assert!(body.len() > 150_000);
        assert_eq!(names(&body, 64 * 1024).unwrap().len(), 200);
        let body = format!(r#"{{"items":[{},{}]}}"#, item("small", 10), item("big", 256 * 1024));
        match names(&body, 64 * 1024) {
            Err(e @ KubeError::BadResponse(_)) => assert!(!e.retryable()),
            other => panic!("{other:?}"),
        }
    }

    /// A body cut off is a transport failure, worth another try; a body over the cap on a whole
    /// response is not.
    #[test]
    fn a_body_cut_off_is_retried_one_too_large_is_not() {
        struct CutOff<'a>(&'a [u8]);
        impl Read for CutOff<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
                let n = self.0.read(buf)?;
                Ok(n)
            }
        }
        let cut = CutOff(br#"{"items":[{"metadata":{"name":"a"}},{"meta"#);
        match read_list(cut, MAX_ITEM, &mut |_| ()) {
            Err(e @ KubeError::Transport(_)) => assert!(e.retryable()),
            other => panic!("{other:?}"),
        }
        let mut body = ureq::Body::builder().data(vec![b' '; MAX_BODY as usize + 1]);
        match read_value(&mut body) {
            Err(e @ KubeError::BadResponse(_)) => assert!(!e.retryable(), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retryable_errors() {
        assert!(KubeError::Server(503, String::new()).retryable());
        assert!(KubeError::Throttled(None).retryable());
        assert!(!KubeError::Conflict(String::new()).retryable());
        assert!(!KubeError::NotFound.retryable());
    }
}
