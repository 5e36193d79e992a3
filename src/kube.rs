//! A small blocking Kubernetes REST client: plain HTTPS with ureq and serde_json, only the calls
//! the cleanup protocol needs. TLS is always verified against the given CA; the bearer token is
//! re-read whenever its file changes (projected tokens rotate about hourly).
//!
//! Lists of objects that grow with the cluster (PVs, CSINodes, the nodes' cleanup objects) are
//! read a page at a time and reduced to the few fields used before the next page is asked for,
//! so memory holds one page, never the cluster.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::BufReader;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use log::{debug, info, warn};
use serde_json::{json, Value};

use crate::metrics;
use crate::time::Deadline;

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Largest response body read: a page of a paginated list is a few MiB at most.
const MAX_BODY: u64 = 32 << 20;
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

    /// One request, no retries. `verb` labels the metric.
    fn once(
        &self,
        verb: &'static str,
        method: &str,
        path: &str,
        body: Option<(&str, &Value)>,
        timeout: Duration,
    ) -> KubeResult<Value> {
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
            // Decoded as it arrives: the body text is never held beside the parsed value.
            let reader = BufReader::new(resp.body_mut().with_config().limit(MAX_BODY).reader());
            return serde_json::from_reader(reader).map_err(|e| {
                if e.is_io() {
                    KubeError::Transport(e.to_string())
                } else {
                    KubeError::BadResponse(e.to_string())
                }
            });
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

    /// Retries what is safe to retry with jittered exponential backoff; a 401 re-reads the token
    /// once (it may have rotated between our stat and the server's check). Nothing starts or
    /// waits past the handle's deadline.
    fn call(&self, verb: &'static str, method: &str, path: &str, body: Option<(&str, &Value)>) -> KubeResult<Value> {
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
            match self.once(verb, method, path, body, timeout) {
                Err(KubeError::Unauthorized(401, _)) if reread_token => {
                    reread_token = false;
                    self.forget_token();
                }
                Err(e) if e.retryable() && attempt < self.cfg.attempts => {
                    let wait = match &e {
                        KubeError::Throttled(Some(after)) => *after,
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

    /// Calls `each` with the items of every page of the list at `path` (with `query`, no `?`),
    /// `PAGE` items a page, until it breaks. Read from etcd, not the watch cache: the watch cache
    /// of the apiservers this driver supports answers `resourceVersion=0` with the whole list,
    /// whatever the limit.
    fn for_each_page(
        &self,
        path: &str,
        query: &str,
        each: &mut dyn FnMut(Vec<Value>) -> ControlFlow<()>,
    ) -> KubeResult<()> {
        let mut next: Option<String> = None;
        loop {
            let mut url = format!("{path}?limit={PAGE}");
            if !query.is_empty() {
                url = format!("{url}&{query}");
            }
            if let Some(token) = &next {
                url = format!("{url}&continue={}", encode(token));
            }
            let mut page = self.call("list", "GET", &url, None)?;
            next = page["metadata"]["continue"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if each(items(page.take())?).is_break() || next.is_none() {
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

    /// Lists from the apiserver's watch cache (`resourceVersion=0`), in one response.
    pub fn list_configmaps_cached(&self, label_selector: &str) -> KubeResult<Vec<Value>> {
        let path = format!(
            "{}?labelSelector={}&resourceVersion=0",
            self.ns_path("configmaps"),
            encode(label_selector)
        );
        items(self.call("list", "GET", &path, None)?)
    }

    /// Every ConfigMap matching the selector, a page at a time, as etcd has them now.
    pub fn for_each_configmap(&self, label_selector: &str, each: &mut dyn FnMut(Vec<Value>)) -> KubeResult<()> {
        self.for_each_page(
            &self.ns_path("configmaps"),
            &format!("labelSelector={}", encode(label_selector)),
            &mut |page| {
                each(page);
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
        self.for_each_page("/api/v1/persistentvolumes", "", &mut |page| {
            names.extend(page.iter().filter_map(|pv| {
                let handle = csi_handle(pv, driver).filter(|h| handles.is_none_or(|w| w.contains(*h)))?;
                Some((handle.to_owned(), pv["metadata"]["name"].as_str()?.to_owned()))
            }));
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
        self.for_each_page("/apis/storage.k8s.io/v1/csinodes", "", &mut |page| {
            for n in &page {
                if let Some(name) = n["metadata"]["name"].as_str() {
                    each(name, n["spec"]["drivers"].as_array().map_or(&[], Vec::as_slice));
                }
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

fn items(list: Value) -> KubeResult<Vec<Value>> {
    match list {
        Value::Object(mut m) => match m.remove("items") {
            Some(Value::Array(items)) => Ok(items),
            Some(Value::Null) => Ok(Vec::new()),
            // Not a list (a proxy's error page, a Status): read as empty, every PV would look gone.
            None => Err(KubeError::BadResponse("a list response without items".into())),
            Some(_) => Err(KubeError::BadResponse("items is not a list".into())),
        },
        _ => Err(KubeError::BadResponse("a list response is not an object".into())),
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
        assert_eq!(items(serde_json::json!({ "items": [1] })).unwrap().len(), 1);
        assert!(items(serde_json::json!({ "items": null })).unwrap().is_empty());
        assert!(items(serde_json::json!({ "items": [] })).unwrap().is_empty());
        assert!(items(serde_json::json!({})).is_err());
        assert!(items(serde_json::json!({ "kind": "Status" })).is_err());
    }

    #[test]
    fn retryable_errors() {
        assert!(KubeError::Server(503, String::new()).retryable());
        assert!(KubeError::Throttled(None).retryable());
        assert!(!KubeError::Conflict(String::new()).retryable());
        assert!(!KubeError::NotFound.retryable());
    }
}
