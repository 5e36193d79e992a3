//! An in-test Kubernetes API server over HTTPS (a CA made at test time) that models what the
//! cleanup protocol relies on: resourceVersion bumps and 409 on stale conditional writes, label
//! selectors, finalizers holding deletion, JSON merge patch, 404, 410 for compacted list
//! positions, bearer tokens, paginated lists (`limit` + `continue`, ignored with
//! `resourceVersion=0` as the watch cache of a v1.24 apiserver does), 422 for a ConfigMap whose
//! data is over 1 MiB — plus injected faults (5xx,
//! slow answers, 409 storms, a request refused for good).
//!
//! It also measures: request and response body bytes of every call, and the size a real
//! apiserver stores for each object, `managedFields` included (one entry per field manager,
//! named after the client's User-Agent, listing every field it set, as in
//! `tests/fixtures/apiserver/`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Default)]
pub struct Faults {
    /// Answer the next N requests with this status.
    pub fail_next: u32,
    pub fail_status: u16,
    /// The Retry-After a 429 carries, in seconds.
    pub retry_after: u64,
    /// Delay every answer (longer than the client's timeout makes it a timeout).
    pub delay: Option<Duration>,
    /// The next N conditional writes fail with 409 whatever their resourceVersion.
    pub conflict_next: u32,
    /// Requests refused for good, as an admission webhook would: (method, path, status).
    pub refuse: Vec<(String, String, u16)>,
    /// Objects (by key) another writer changes just before a DELETE of them arrives.
    pub written_before_delete: Vec<String>,
    /// The first request to this method and path waits, with the state unlocked, until the test
    /// lets it go: another client's requests are served in between.
    pub hold: Option<Hold>,
}

pub struct Hold {
    pub method: String,
    pub path: String,
    /// Told when the held request has arrived.
    pub arrived: std::sync::mpsc::Sender<()>,
    /// Waited on before the held request is served.
    pub go: std::sync::mpsc::Receiver<()>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub target: String,
    /// When the request arrived (before any injected delay).
    pub at: Instant,
    pub request_bytes: usize,
    pub response_bytes: usize,
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
    /// Every request, in order.
    pub log: Vec<Exchange>,
    /// Every write: the object's key and the size stored after it (what etcd writes).
    pub writes: Vec<(String, usize)>,
    /// Bumped when the CA rotates: connections opened before it are closed.
    pub tls_generation: u64,
}

pub struct FakeApi {
    pub url: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// What a new connection is served with.
    tls: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    dir: PathBuf,
}

/// A fresh CA, written to `ca_file`, and a server certificate it signed for 127.0.0.1.
fn new_tls(ca_file: &Path) -> Arc<rustls::ServerConfig> {
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
    std::fs::write(ca_file, ca.pem()).unwrap();
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
    Arc::new(config)
}

impl FakeApi {
    /// Starts on 127.0.0.1 with a fresh CA; files go to `dir`.
    pub fn start(dir: &Path) -> FakeApi {
        std::fs::create_dir_all(dir).unwrap();
        let ca_file = dir.join("ca.crt");
        let config = Arc::new(Mutex::new(new_tls(&ca_file)));
        let token_file = dir.join("token");
        std::fs::write(&token_file, "token-1\n").unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(State {
            token: "token-1".into(),
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop, config) = (state.clone(), stop.clone(), config.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = conn else { continue };
                    let (state, tls) = (state.clone(), config.lock().unwrap().clone());
                    thread::spawn(move || serve_conn(tcp, tls, state));
                }
            });
        }
        FakeApi {
            url,
            ca_file,
            token_file,
            state,
            stop,
            tls: config,
            dir: dir.to_owned(),
        }
    }

    /// The cluster's CA rotated: new connections get a certificate of a new CA, which the CA
    /// file now holds (kubelet updates the projected `ca.crt`); open connections are closed.
    pub fn rotate_ca(&self) {
        *self.tls.lock().unwrap() = new_tls(&self.ca_file);
        self.with(|s| s.tls_generation += 1);
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

    /// A PV provisioned by `driver` for `volume_id`, bound, with the fields and field managers
    /// a real one has.
    pub fn add_pv(&self, name: &str, driver: &str, volume_id: &str) {
        self.with(|s| s.add_pv(name, driver, volume_id));
    }

    /// A PV of `driver` for each name, with the volume id CreateVolume derives from it: (PV,
    /// volume id) pairs in order.
    pub fn add_pvs(&self, driver: &str, names: impl Iterator<Item = String>) -> Vec<(String, String)> {
        names
            .map(|pv| {
                let id = node_local_cache::volume::id_for_name(&pv);
                self.add_pv(&pv, driver, &id);
                (pv, id)
            })
            .collect()
    }

    /// A CSINode that lists `driver`, as the kubelet writes it.
    pub fn add_node(&self, name: &str, driver: &str) {
        self.with(|s| s.add_node(name, driver));
    }

    /// A node leaves the cluster: the garbage collector deletes its CSINode with the Node.
    pub fn remove_node(&self, name: &str) {
        self.with(|s| s.delete(&format!("csinodes//{name}")));
    }

    /// Stores `obj` (a ConfigMap in namespace `ns`) as if `manager` had created it.
    pub fn put_configmap(&self, ns: &str, obj: Value, manager: &str) {
        self.with(|s| {
            let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
            s.create_as(&format!("configmaps/{ns}/{name}"), obj, manager);
        });
    }

    /// A completed cleanup record (a tombstone) of a deletion of `id` requested at `requested`,
    /// completed a minute later, as the controller leaves it.
    pub fn put_tombstone(&self, ns: &str, id: &str, requested: std::time::SystemTime) {
        let mut obj = node_local_cache::cleanup::CleanupRecord::new_object(id, requested, &format!("pvc-{id}"));
        let record = node_local_cache::cleanup::CleanupRecord::parse(&obj).unwrap();
        merge_patch(&mut obj, &record.complete_patch(requested + Duration::from_secs(60)));
        self.put_configmap(ns, obj, "node-local-cache");
    }

    /// The cleanup index listing these deletions (volume id, request time) as complete, as a
    /// controller that listed each one when it was new left it before any trim.
    pub fn put_index(&self, ns: &str, deletions: &[(String, std::time::SystemTime)]) {
        use node_local_cache::cleanup::{Deletion, IndexEntry, INDEX_NAME};
        let entries = deletions
            .iter()
            .map(|(id, at)| IndexEntry {
                deletion: Deletion {
                    volume_id: id.clone(),
                    requested_ms: node_local_cache::time::to_millis(*at),
                },
                pending: false,
            })
            .collect();
        let index = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": INDEX_NAME },
            "data": IndexEntry::render_index(&entries, 0),
        });
        self.put_configmap(ns, index, "node-local-cache");
    }

    /// Requests served so far.
    pub fn request_count(&self) -> usize {
        self.with(|s| s.log.len())
    }

    /// Request and response body bytes of the requests from number `from` on.
    pub fn bytes_since(&self, from: usize) -> (usize, usize) {
        self.with(|s| {
            s.log[from..]
                .iter()
                .fold((0, 0), |(q, r), e| (q + e.request_bytes, r + e.response_bytes))
        })
    }

    /// Writes so far.
    pub fn write_count(&self) -> usize {
        self.with(|s| s.writes.len())
    }

    /// Bytes stored by the writes from number `from` on.
    pub fn written_since(&self, from: usize) -> usize {
        self.with(|s| s.writes[from..].iter().map(|(_, n)| n).sum())
    }

    /// The largest object stored by any write, and its key.
    pub fn largest_write(&self) -> (usize, String) {
        self.with(|s| s.writes.iter().map(|(k, n)| (*n, k.clone())).max().unwrap_or_default())
    }

    /// The size stored for the object at `key`.
    pub fn stored_size(&self, key: &str) -> Option<usize> {
        self.with(|s| s.objects.get(key).map(|o| o.to_string().len()))
    }

    /// What a user (or the provisioner) does to a PV: delete, held by finalizers.
    pub fn delete_pv(&self, name: &str) {
        self.with(|s| s.delete(&format!("persistentvolumes//{name}")));
    }

    /// An object deleted behind the clients' backs (by hand, or by another controller).
    pub fn remove_object(&self, key: &str) {
        self.with(|s| s.delete(key));
    }

    pub fn object(&self, key: &str) -> Option<Value> {
        self.with(|s| s.objects.get(key).cloned())
    }

    /// Holds the first `method` request to `path` (see `Faults::hold`): the receiver tells when
    /// it has arrived, a send on the sender lets it be served.
    pub fn hold(&self, method: &str, path: &str) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (arrived_tx, arrived) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let hold = Hold {
            method: method.to_owned(),
            path: path.to_owned(),
            arrived: arrived_tx,
            go: go_rx,
        };
        self.with(|s| s.faults.hold = Some(hold));
        (arrived, go)
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

    /// The nodes whose own cleanup object in `namespace` lists a finished deletion of `id`, sorted.
    pub fn nodes_done(&self, namespace: &str, id: &str) -> Vec<String> {
        let prefix = format!("configmaps/{namespace}/nlc-node-");
        let mut nodes: Vec<String> = self.with(|s| {
            s.objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(_, cm)| node_local_cache::cleanup::NodeAcks::parse(cm))
                .filter(|a| a.done.iter().any(|d| d.volume_id == id))
                .map(|a| a.node)
                .collect()
        });
        nodes.sort();
        nodes
    }

    pub fn rotate_token(&self, token: &str) {
        std::fs::write(&self.token_file, format!("{token}\n")).unwrap();
        self.with(|s| s.token = token.to_owned());
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.with(|s| s.log.iter().map(|e| (e.method.clone(), e.target.clone())).collect())
    }

    /// The requests from number `from` on: (method, path with query).
    pub fn requests_since(&self, from: usize) -> Vec<(String, String)> {
        self.with(|s| {
            s.log[from..]
                .iter()
                .map(|e| (e.method.clone(), e.target.clone()))
                .collect()
        })
    }

    /// When each request arrived, in order.
    pub fn arrivals(&self) -> Vec<(String, String, Instant)> {
        self.with(|s| {
            s.log
                .iter()
                .map(|e| (e.method.clone(), e.target.clone(), e.at))
                .collect()
        })
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

    /// Stores a new object as `manager` creating it: server-set metadata, managedFields.
    fn create_as(&mut self, key: &str, mut obj: Value, manager: &str) {
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = rv.into();
        obj["metadata"]["uid"] = format!("{:08x}-5e1d-4c2b-9a07-{:012x}", self.rv, self.rv).into();
        obj["metadata"]["creationTimestamp"] = NOW.into();
        let body = obj.clone();
        track_fields(&mut obj, &body, manager, None);
        self.store(key, obj);
    }

    /// Stores the object at `key` and counts the bytes a real apiserver would write.
    fn store(&mut self, key: &str, obj: Value) {
        self.writes.push((key.to_owned(), obj.to_string().len()));
        self.objects.insert(key.to_owned(), obj);
    }

    fn add_pv(&mut self, name: &str, driver: &str, volume_id: &str) {
        let key = format!("persistentvolumes//{name}");
        let claim = format!("{:032x}", self.rv + 1);
        let claim_uid = format!(
            "{}-{}-{}-{}-{}",
            &claim[..8],
            &claim[8..12],
            &claim[12..16],
            &claim[16..20],
            &claim[20..]
        );
        let obj = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": { "pv.kubernetes.io/provisioned-by": driver, "volume.kubernetes.io/provisioner-deletion-secret-name": "", "volume.kubernetes.io/provisioner-deletion-secret-namespace": "" },
            },
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "capacity": { "storage": "1Gi" },
                "claimRef": { "apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": format!("data-{name}"), "namespace": "default", "resourceVersion": "4711", "uid": claim_uid },
                "csi": { "driver": driver, "volumeHandle": volume_id, "volumeAttributes": { "node-local-cache.csi.io/name": name, "storage.kubernetes.io/csiProvisionerIdentity": format!("1764316361234-1234-{driver}") } },
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "node-local-cache",
                "volumeMode": "Filesystem",
            },
        });
        self.create_as(&key, obj, "csi-provisioner");
        let status = json!({ "status": { "phase": "Bound" } });
        let obj = self.objects.get_mut(&key).unwrap();
        merge_patch(obj, &status);
        track_fields(obj, &status, "kube-controller-manager", Some("status"));
        let obj = obj.clone();
        self.store(&key, obj);
    }

    fn add_node(&mut self, name: &str, driver: &str) {
        let owner = format!("{:032x}", self.rv + 7);
        let obj = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
            "metadata": {
                "name": name,
                "annotations": { "storage.alpha.kubernetes.io/migrated-plugins": "kubernetes.io/aws-ebs,kubernetes.io/azure-disk,kubernetes.io/cinder,kubernetes.io/gce-pd" },
                "ownerReferences": [ { "apiVersion": "v1", "kind": "Node", "name": name, "uid": owner } ],
            },
            "spec": { "drivers": [ { "name": driver, "nodeID": name, "topologyKeys": null } ] },
        });
        self.create_as(&format!("csinodes//{name}"), obj, "Go-http-client");
    }

    /// Deletion: immediate without finalizers, otherwise marked and held.
    fn delete(&mut self, key: &str) -> bool {
        let Some(obj) = self.objects.get(key) else { return false };
        let held = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if held {
            let rv = self.bump();
            let mut obj = self.objects[key].clone();
            obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
            obj["metadata"]["resourceVersion"] = rv.into();
            self.store(key, obj);
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

/// The most a ConfigMap's data may hold, keys and values counted (`MaxSecretSize`, as the
/// apiserver's validation spells it).
const CONFIGMAP_MAX_DATA: usize = 1024 * 1024;

/// The 422 a real apiserver answers for a ConfigMap whose data is over the limit.
fn configmap_too_long(kind: &str, obj: &Value) -> Option<(u16, Value)> {
    if kind != "configmaps" {
        return None;
    }
    let size: usize = ["data", "binaryData"]
        .iter()
        .filter_map(|k| obj[*k].as_object())
        .flatten()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    (size > CONFIGMAP_MAX_DATA).then(|| {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        status_body(
            422,
            "Invalid",
            &format!("ConfigMap \"{name}\" is invalid: []: Too long: must have at most {CONFIGMAP_MAX_DATA} bytes"),
        )
    })
}

/// The time written into managedFields entries and creation timestamps.
const NOW: &str = "2026-11-28T07:52:41Z";

/// Fields the apiserver sets itself: never owned by a manager.
fn server_owned(path: &[String]) -> bool {
    matches!(path, [top] if top == "f:apiVersion" || top == "f:kind")
        || matches!(path, [m, f] if m == "f:metadata" && ["f:name", "f:namespace", "f:uid", "f:resourceVersion", "f:creationTimestamp", "f:managedFields", "f:deletionTimestamp", "f:generation"].contains(&f.as_str()))
}

/// Leaf field paths a request body sets (`set`) and clears (`cleared`, JSON null), in
/// FieldsV1 spelling: `f:<name>` per map key, `v:"<value>"` per string in a list.
fn field_paths(
    v: &Value,
    path: &mut Vec<String>,
    set: &mut BTreeSet<Vec<String>>,
    cleared: &mut BTreeSet<Vec<String>>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                if !server_owned(path) {
                    field_paths(child, path, set, cleared);
                }
                path.pop();
            }
        }
        Value::Array(items) if path.len() == 2 && path[1] == "f:finalizers" => {
            // A set of strings; the patch replaces it whole: its old elements are cleared first.
            cleared.insert(path.clone());
            for item in items {
                path.push(format!("v:{item}"));
                set.insert(path.clone());
                path.pop();
            }
        }
        Value::Null => {
            cleared.insert(path.clone());
        }
        _ => {
            set.insert(path.clone());
        }
    }
}

/// A manager's fields as a FieldsV1 tree: a map it owns the existence of carries `.`.
fn fields_v1(paths: &BTreeSet<Vec<String>>) -> Value {
    let mut root = json!({});
    for p in paths {
        let mut node = &mut root;
        for (depth, step) in p.iter().enumerate() {
            let last = depth + 1 == p.len();
            node = node
                .as_object_mut()
                .unwrap()
                .entry(step.clone())
                .or_insert_with(|| json!({}));
            let top_struct = depth == 0 && ["f:metadata", "f:spec", "f:status"].contains(&step.as_str());
            if !last && !top_struct && p[depth + 1].starts_with("f:") {
                node.as_object_mut().unwrap().insert(".".into(), json!({}));
            }
        }
    }
    root
}

/// The field paths of a FieldsV1 tree (without the `.` markers).
fn paths_of(fields: &Value, path: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    let Some(m) = fields.as_object() else { return };
    let children: Vec<_> = m.iter().filter(|(k, _)| *k != ".").collect();
    if children.is_empty() && !path.is_empty() {
        out.insert(path.clone());
    }
    for (k, child) in children {
        path.push(k.clone());
        paths_of(child, path, out);
        path.pop();
    }
}

/// Updates `obj`'s managedFields for a write of `body` by `manager` (operation Update): the
/// fields it sets become its own and leave every other manager; cleared fields leave everyone.
fn track_fields(obj: &mut Value, body: &Value, manager: &str, subresource: Option<&str>) {
    let (mut set, mut cleared) = (BTreeSet::new(), BTreeSet::new());
    field_paths(body, &mut Vec::new(), &mut set, &mut cleared);
    let touched = |p: &Vec<String>| set.contains(p) || cleared.iter().any(|c| p.starts_with(c));
    let api_version = obj["apiVersion"].clone();
    let mut entries: Vec<Value> = obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
    let mut mine = BTreeSet::new();
    for e in &mut entries {
        let mut paths = BTreeSet::new();
        paths_of(&e["fieldsV1"], &mut Vec::new(), &mut paths);
        paths.retain(|p| !touched(p));
        if e["manager"] == manager && e["subresource"].as_str() == subresource {
            mine = paths;
            e["fieldsV1"] = Value::Null;
        } else {
            e["fieldsV1"] = fields_v1(&paths);
        }
    }
    entries.retain(|e| !e["fieldsV1"].is_null() && e["fieldsV1"].as_object().is_some_and(|m| !m.is_empty()));
    mine.extend(set.iter().cloned());
    if !mine.is_empty() {
        let mut entry = json!({
            "manager": manager, "operation": "Update", "apiVersion": api_version, "time": NOW,
            "fieldsType": "FieldsV1", "fieldsV1": fields_v1(&mine),
        });
        if let Some(sub) = subresource {
            entry["subresource"] = sub.into();
        }
        entries.push(entry);
    }
    obj["metadata"]["managedFields"] = Value::Array(entries);
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
    let generation = state.lock().unwrap().tls_generation;
    while let Some(req) = read_request(&mut reader) {
        if state.lock().unwrap().tls_generation != generation {
            return;
        }
        let (delay, entry) = {
            let mut s = state.lock().unwrap();
            s.log.push(Exchange {
                method: req.method.clone(),
                target: req.target.clone(),
                at: Instant::now(),
                request_bytes: req.body.len(),
                response_bytes: 0,
            });
            (s.faults.delay, s.log.len() - 1)
        };
        if let Some(d) = delay {
            thread::sleep(d);
        }
        let (status, body) = handle(&state, &req);
        let retry_after = state.lock().unwrap().faults.retry_after;
        let text = body.to_string();
        if let Some(e) = state.lock().unwrap().log.get_mut(entry) {
            e.response_bytes = text.len();
        }
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            text.len(),
            if status == 429 {
                format!("Retry-After: {retry_after}\r\n")
            } else {
                String::new()
            }
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
    let path = req.target.split_once('?').map_or(req.target.as_str(), |(p, _)| p);
    let held = {
        let mut s = state.lock().unwrap();
        let hit = s
            .faults
            .hold
            .as_ref()
            .is_some_and(|h| h.method == req.method && h.path == path);
        if hit {
            s.faults.hold.take()
        } else {
            None
        }
    };
    if let Some(h) = held {
        h.arrived.send(()).unwrap();
        h.go.recv().unwrap();
    }
    let mut s = state.lock().unwrap();
    let manager = req
        .headers
        .iter()
        .find(|(k, _)| k == "user-agent")
        .map(|(_, v)| v.split('/').next().unwrap_or_default().to_owned())
        .unwrap_or_default();
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
    if let Some((_, _, code)) = s.faults.refuse.iter().find(|(m, p, _)| *m == req.method && *p == path) {
        let code = *code;
        return status_body(
            code,
            "Forbidden",
            "admission webhook \"deny.example.com\" denied the request",
        );
    }
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
            // The watch cache (resourceVersion=0) of a v1.24 apiserver ignores limit.
            let cached = params.get("resourceVersion").is_some_and(|v| v == "0");
            let limit = params
                .get("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|_| !cached)
                .unwrap_or(usize::MAX);
            let start = match params.get("continue") {
                Some(after) => format!("{prefix}{after}\u{0}"),
                None => prefix.clone(),
            };
            let mut matching = s
                .objects
                .range(start..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(_, v)| selector_matches(&selector, &v["metadata"]["labels"]));
            let items: Vec<(String, Value)> = matching
                .by_ref()
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let more = matching.next().is_some();
            let mut meta = json!({ "resourceVersion": s.rv.to_string() });
            if more {
                if let Some((k, _)) = items.last() {
                    meta["continue"] = k[prefix.len()..].into();
                }
            }
            let items: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
            (200, json!({ "kind": "List", "metadata": meta, "items": items }))
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
            if let Some(refused) = configmap_too_long(kind, &obj) {
                return refused;
            }
            obj["metadata"]["namespace"] = ns.into();
            s.create_as(&key, obj, &manager);
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
            if let Some(refused) = configmap_too_long(kind, &next) {
                return refused;
            }
            let rv = s.bump();
            next["metadata"]["resourceVersion"] = rv.into();
            track_fields(&mut next, &patch, &manager, None);
            if next["metadata"]["deletionTimestamp"].is_string() && fins(&next).is_empty() {
                s.objects.remove(&key);
            } else {
                s.store(&key, next.clone());
            }
            (200, next)
        }
        ("DELETE", Some(n)) => {
            let key = format!("{prefix}{n}");
            if let Some(i) = s.faults.written_before_delete.iter().position(|k| *k == key) {
                s.faults.written_before_delete.remove(i);
                let rv = s.bump();
                if let Some(o) = s.objects.get_mut(&key) {
                    o["metadata"]["resourceVersion"] = rv.into();
                }
            }
            // DeleteOptions: a precondition on the resourceVersion is answered 409 when it fails.
            let options: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            if let (Some(want), Some(current)) = (
                options["preconditions"]["resourceVersion"].as_str(),
                s.objects.get(&key),
            ) {
                if Some(want) != current["metadata"]["resourceVersion"].as_str() {
                    return status_body(
                        409,
                        "Conflict",
                        &format!("Precondition failed: ResourceVersion in precondition: {want}"),
                    );
                }
            }
            if s.delete(&key) {
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

    /// The model gives the managedFields a real apiserver returned for the same writes.
    #[test]
    fn managed_fields_match_the_fixtures() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/apiserver");
        let fixture = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(format!("{dir}/{name}")).unwrap()).unwrap()
        };
        let created = fixture("create-configmap.201.json");
        let mut obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "x", "labels": created["metadata"]["labels"].clone() },
            "data": created["data"].clone(),
        });
        let body = obj.clone();
        track_fields(&mut obj, &body, "node-local-cache", None);
        assert_eq!(
            obj["metadata"]["managedFields"][0]["fieldsV1"],
            created["metadata"]["managedFields"][0]["fieldsV1"]
        );
        let patched = fixture("merge-patch-configmap.200.json");
        for node in [
            "ip-10-0-1-23.eu-west-1.compute.internal",
            "ip-10-0-7-201.eu-west-1.compute.internal",
        ] {
            let patch = json!({ "data": { format!("ack.{node}"): "2026-11-28T07:28:40.000Z" } });
            merge_patch(&mut obj, &patch);
            track_fields(&mut obj, &patch, "node-local-cache", None);
        }
        assert_eq!(
            obj["metadata"]["managedFields"],
            json!([{
                "manager": "node-local-cache", "operation": "Update", "apiVersion": "v1", "time": NOW,
                "fieldsType": "FieldsV1", "fieldsV1": patched["metadata"]["managedFields"][0]["fieldsV1"].clone(),
            }])
        );
        let pv = &fixture("list-pvs-limit1.200.json")["items"][0];
        let mut ours = json!({ "apiVersion": "v1", "metadata": {}, "spec": {} });
        let fin = json!({ "metadata": { "finalizers": ["node-local-cache.csi.io/cleanup"], "resourceVersion": "1" } });
        track_fields(&mut ours, &fin, "node-local-cache", None);
        assert_eq!(
            ours["metadata"]["managedFields"][0]["fieldsV1"],
            pv["metadata"]["managedFields"][2]["fieldsV1"]
        );
        let spec =
            json!({ "spec": pv["spec"].clone(), "metadata": { "annotations": pv["metadata"]["annotations"].clone() } });
        let mut applied = json!({ "apiVersion": "v1", "metadata": {} });
        track_fields(&mut applied, &spec, "kubectl-client-side-apply", None);
        assert_eq!(
            applied["metadata"]["managedFields"][0]["fieldsV1"],
            pv["metadata"]["managedFields"][1]["fieldsV1"]
        );
    }

    #[test]
    fn configmaps_over_a_mebibyte_are_refused() {
        let at_limit = json!({ "metadata": { "name": "x" }, "data": { "k": "v".repeat(CONFIGMAP_MAX_DATA - 1) } });
        assert!(configmap_too_long("configmaps", &at_limit).is_none());
        let over = json!({ "metadata": { "name": "x" }, "data": { "k": "v".repeat(CONFIGMAP_MAX_DATA) } });
        assert_eq!(configmap_too_long("configmaps", &over).unwrap().0, 422);
        assert!(configmap_too_long("persistentvolumes", &over).is_none());
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
