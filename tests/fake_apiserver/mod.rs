//! An in-test Kubernetes API server over HTTPS (a CA made at test time) that models what the
//! cleanup protocol relies on: resourceVersion bumps and 409 on stale conditional writes, label
//! selectors, finalizers holding deletion, JSON merge patch, 404, 410 for compacted list
//! positions, bearer tokens — plus injected faults (5xx, slow answers, 409 storms).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Default)]
pub struct Faults {
    /// Answer the next N requests with this status.
    pub fail_next: u32,
    pub fail_status: u16,
    /// Delay every answer (longer than the client's timeout makes it a timeout).
    pub delay: Option<Duration>,
    /// The next N conditional writes fail with 409 whatever their resourceVersion.
    pub conflict_next: u32,
}

#[derive(Default)]
pub struct State {
    pub rv: u64,
    /// Keyed by "kind/namespace/name" ("configmaps/ns/x", "persistentvolumes//pv-1").
    pub objects: BTreeMap<String, Value>,
    pub token: String,
    pub faults: Faults,
    /// List positions older than this are gone (410).
    pub compacted_below: u64,
    /// Every request: (method, path with query).
    pub log: Vec<(String, String)>,
}

pub struct FakeApi {
    pub url: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
}

impl FakeApi {
    /// Starts on 127.0.0.1 with a fresh CA; files go to `dir`.
    pub fn start(dir: &Path) -> FakeApi {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake-apiserver-ca");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();

        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "token-1\n").unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(State {
            token: "token-1".into(),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = conn else { continue };
                    let (state, config) = (state.clone(), config.clone());
                    thread::spawn(move || serve_conn(tcp, config, state));
                }
            });
        }
        FakeApi {
            url,
            ca_file,
            token_file,
            state,
            stop,
            dir: dir.to_owned(),
        }
    }

    pub fn kube_config(&self, namespace: &str) -> node_local_cache::kube::KubeConfig {
        node_local_cache::kube::KubeConfig {
            api_url: self.url.clone(),
            token_file: self.token_file.clone(),
            ca_file: self.ca_file.clone(),
            namespace: namespace.to_owned(),
            timeout: Duration::from_secs(2),
            attempts: 3,
            backoff: Duration::from_millis(20),
        }
    }

    pub fn client(&self, namespace: &str) -> node_local_cache::kube::Client {
        node_local_cache::kube::Client::new(self.kube_config(namespace)).unwrap()
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// A PV provisioned by `driver` for `volume_id`.
    pub fn add_pv(&self, name: &str, driver: &str, volume_id: &str) {
        self.with(|s| {
            let obj = json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": { "name": name },
                "spec": { "csi": { "driver": driver, "volumeHandle": volume_id }, "persistentVolumeReclaimPolicy": "Delete" },
            });
            s.insert(&format!("persistentvolumes//{name}"), obj);
        });
    }

    /// A CSINode that lists `driver`.
    pub fn add_node(&self, name: &str, driver: &str) {
        self.with(|s| {
            let obj = json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                "metadata": { "name": name },
                "spec": { "drivers": [ { "name": driver, "nodeID": name } ] },
            });
            s.insert(&format!("csinodes//{name}"), obj);
        });
    }

    /// What a user (or the provisioner) does to a PV: delete, held by finalizers.
    pub fn delete_pv(&self, name: &str) {
        self.with(|s| s.delete(&format!("persistentvolumes//{name}")));
    }

    pub fn object(&self, key: &str) -> Option<Value> {
        self.with(|s| s.objects.get(key).cloned())
    }

    /// The finalizers of PV `pv`; `None` once the PV is gone.
    pub fn pv_finalizers(&self, pv: &str) -> Option<Vec<String>> {
        self.object(&format!("persistentvolumes//{pv}")).map(|p| {
            p["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
    }

    pub fn rotate_token(&self, token: &str) {
        std::fs::write(&self.token_file, format!("{token}\n")).unwrap();
        self.with(|s| s.token = token.to_owned());
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.with(|s| s.log.clone())
    }

    pub fn clear_log(&self) {
        self.with(|s| s.log.clear());
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("https://"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl State {
    fn bump(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn insert(&mut self, key: &str, mut obj: Value) {
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = rv.into();
        obj["metadata"]["uid"] = format!("uid-{}", self.rv).into();
        self.objects.insert(key.to_owned(), obj);
    }

    /// Deletion: immediate without finalizers, otherwise marked and held.
    fn delete(&mut self, key: &str) -> bool {
        let Some(obj) = self.objects.get(key) else { return false };
        let held = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if held {
            let rv = self.bump();
            let obj = self.objects.get_mut(key).unwrap();
            obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
            obj["metadata"]["resourceVersion"] = rv.into();
        } else {
            self.objects.remove(key);
        }
        true
    }
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn selector_matches(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k].as_str() == Some(v.trim_start_matches('='))
        } else {
            labels.get(term).is_some()
        }
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(r: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

fn serve_conn(tcp: TcpStream, config: Arc<rustls::ServerConfig>, state: Arc<Mutex<State>>) {
    // Answers go out whole at once; without this, delayed ACKs cost ~40 ms a request.
    let _ = tcp.set_nodelay(true);
    let conn = rustls::ServerConnection::new(config).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    let mut reader = BufReader::new(tls);
    while let Some(req) = read_request(&mut reader) {
        let delay = state.lock().unwrap().faults.delay;
        if let Some(d) = delay {
            thread::sleep(d);
        }
        let (status, body) = handle(&state, &req);
        let text = body.to_string();
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            text.len(),
            if status == 429 { "Retry-After: 0\r\n" } else { "" }
        );
        let out = reader.get_mut();
        if out
            .write_all(format!("{head}{text}").as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code }),
    )
}

fn handle(state: &Mutex<State>, req: &Request) -> (u16, Value) {
    let mut s = state.lock().unwrap();
    s.log.push((req.method.clone(), req.target.clone()));
    let auth = req
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if auth != format!("Bearer {}", s.token) {
        return status_body(401, "Unauthorized", "bad token");
    }
    if s.faults.fail_next > 0 {
        s.faults.fail_next -= 1;
        let code = if s.faults.fail_status == 0 {
            500
        } else {
            s.faults.fail_status
        };
        return status_body(code, "InternalError", "injected fault");
    }
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect();
    // Routes: /api/v1/namespaces/{ns}/configmaps[/name], /api/v1/persistentvolumes[/name],
    // /apis/storage.k8s.io/v1/csinodes.
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (kind, ns, name) = match segs.as_slice() {
        ["api", "v1", "namespaces", ns, "configmaps"] => ("configmaps", *ns, None),
        ["api", "v1", "namespaces", ns, "configmaps", name] => ("configmaps", *ns, Some(decode(name))),
        ["api", "v1", "persistentvolumes"] => ("persistentvolumes", "", None),
        ["api", "v1", "persistentvolumes", name] => ("persistentvolumes", "", Some(decode(name))),
        ["apis", "storage.k8s.io", "v1", "csinodes"] => ("csinodes", "", None),
        _ => return status_body(404, "NotFound", "no such route"),
    };
    let prefix = format!("{kind}/{ns}/");
    match (req.method.as_str(), name) {
        ("GET", None) => {
            if let Some(rv) = params.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()) {
                if rv != 0 && rv < s.compacted_below {
                    return status_body(410, "Expired", "too old resource version");
                }
            }
            let selector = params.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = s
                .objects
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v)
                .filter(|v| selector_matches(&selector, &v["metadata"]["labels"]))
                .cloned()
                .collect();
            (
                200,
                json!({ "kind": "List", "metadata": { "resourceVersion": s.rv.to_string() }, "items": items }),
            )
        }
        ("GET", Some(n)) => match s.objects.get(&format!("{prefix}{n}")) {
            Some(o) => (200, o.clone()),
            None => status_body(404, "NotFound", &format!("{kind} {n} not found")),
        },
        ("POST", None) => {
            let mut obj: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return status_body(400, "BadRequest", &e.to_string()),
            };
            let Some(n) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
                return status_body(422, "Invalid", "name required");
            };
            let key = format!("{prefix}{n}");
            if s.objects.contains_key(&key) {
                return status_body(409, "AlreadyExists", &format!("{kind} {n} already exists"));
            }
            obj["metadata"]["namespace"] = ns.into();
            s.insert(&key, obj);
            (201, s.objects[&key].clone())
        }
        ("PATCH", Some(n)) => {
            let key = format!("{prefix}{n}");
            let Some(current) = s.objects.get(&key).cloned() else {
                return status_body(404, "NotFound", &format!("{kind} {n} not found"));
            };
            let patch: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return status_body(400, "BadRequest", &e.to_string()),
            };
            if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
                if s.faults.conflict_next > 0 {
                    s.faults.conflict_next -= 1;
                    return status_body(409, "Conflict", "injected conflict");
                }
                if Some(want) != current["metadata"]["resourceVersion"].as_str() {
                    return status_body(409, "Conflict", "the object has been modified");
                }
            }
            let mut next = current.clone();
            merge_patch(&mut next, &patch);
            let fins = |v: &Value| -> Vec<String> {
                v["metadata"]["finalizers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            };
            if current["metadata"]["deletionTimestamp"].is_string()
                && fins(&next).iter().any(|f| !fins(&current).contains(f))
            {
                return status_body(
                    422,
                    "Invalid",
                    "no new finalizers can be added if the object is being deleted",
                );
            }
            let rv = s.bump();
            next["metadata"]["resourceVersion"] = rv.into();
            if next["metadata"]["deletionTimestamp"].is_string() && fins(&next).is_empty() {
                s.objects.remove(&key);
            } else {
                s.objects.insert(key, next.clone());
            }
            (200, next)
        }
        ("DELETE", Some(n)) => {
            if s.delete(&format!("{prefix}{n}")) {
                (200, json!({ "kind": "Status", "status": "Success" }))
            } else {
                status_body(404, "NotFound", &format!("{kind} {n} not found"))
            }
        }
        _ => status_body(405, "MethodNotAllowed", "not modelled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({ "a": { "b": 1, "c": 2 }, "d": [1] });
        merge_patch(&mut t, &json!({ "a": { "b": null, "e": 3 }, "d": [2] }));
        assert_eq!(t, json!({ "a": { "c": 2, "e": 3 }, "d": [2] }));
    }

    #[test]
    fn selectors() {
        let labels = json!({ "x": "1", "y": "2" });
        assert!(selector_matches("x=1", &labels));
        assert!(selector_matches("x", &labels));
        assert!(selector_matches("x=1,y!=3", &labels));
        assert!(!selector_matches("x=2", &labels));
        assert!(!selector_matches("z", &labels));
    }
}
