//! Prometheus metrics as plain static atomics, rendered to the text format on demand, and the
//! small HTTP endpoint that serves them (`/metrics`) and the probes (`/livez`, `/readyz`). No
//! framework: a scrape is one pass over a few arrays.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use grpcio::RpcStatusCode;
use log::{debug, warn};
use nix::libc;

use crate::proto::grpc::SERVED;

const PREFIX: &str = "node_local_cache_";

/// Upper bounds in seconds; the last bucket is +Inf.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{PREFIX}{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{PREFIX}{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{PREFIX}{name}_count{braces} {cumulative}");
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// The RPCs this driver answers itself (the ones `build.rs` registers), then "other".
const METHODS: usize = SERVED.len() + 1;

fn method_name(i: usize) -> &'static str {
    SERVED.get(i).copied().unwrap_or("other")
}
const CODES: usize = 17;

/// gRPC's canonical status names, indexed by code; callers outside this module use `code_name`.
pub const CODE_NAMES: [&str; CODES] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// "NOT_FOUND" for NOT_FOUND; `None` for a code outside gRPC's table.
pub fn code_name(code: RpcStatusCode) -> Option<&'static str> {
    usize::try_from(i32::from(code))
        .ok()
        .and_then(|i| CODE_NAMES.get(i))
        .copied()
}

static RPC_COUNTS: [[AtomicU64; CODES]; METHODS] = [const { [const { AtomicU64::new(0) }; CODES] }; METHODS];
static RPC_DURATIONS: [Histogram; METHODS] = [const { Histogram::new() }; METHODS];

pub static VOLUME_CREATE_TOTAL: AtomicU64 = AtomicU64::new(0);
pub static VOLUME_DELETE_TOTAL: AtomicU64 = AtomicU64::new(0);
pub static MOUNT_DURATION: Histogram = Histogram::new();
pub static CLEANUP_DURATION: Histogram = Histogram::new();
pub static CLEANUP_PENDING: AtomicU64 = AtomicU64::new(0);

/// Why the eviction pass freed space: a copy over its own capacity, or the node over its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionReason {
    Capacity,
    Budget,
}

/// How it freed it: some files of a copy, or the whole copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionAction {
    Trim,
    Evict,
}

const EVICTION_REASONS: [&str; 2] = ["capacity", "budget"];
const EVICTION_ACTIONS: [&str; 2] = ["trim", "evict"];
static EVICTION_FREED: [[AtomicU64; 2]; 2] = [const { [const { AtomicU64::new(0) }; 2] }; 2];
static COPIES_EVICTED: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// Copies in use (so left alone) that are over their capacity, as of the last pass.
pub static COPIES_OVER_CAPACITY: AtomicU64 = AtomicU64::new(0);
/// Unix time of the end of the last eviction pass.
pub static EVICTION_LAST_PASS: AtomicU64 = AtomicU64::new(0);
pub static EVICTION_PASS_DURATION: Histogram = Histogram::new();
/// Bytes per copy on this node, by volume id, as of the last pass.
static COPY_BYTES: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

pub fn record_freed(reason: EvictionReason, action: EvictionAction, bytes: u64) {
    EVICTION_FREED[reason as usize][action as usize].fetch_add(bytes, Ordering::Relaxed);
    if action == EvictionAction::Evict {
        COPIES_EVICTED[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Replaces the per-copy sizes shown by `copy_bytes`.
pub fn set_copy_bytes(copies: Vec<(String, u64)>) {
    *COPY_BYTES.lock().unwrap_or_else(|p| p.into_inner()) = copies;
}

/// Why a step of the cleanup protocol failed: reading the nodes' acknowledgements, deleting a
/// local copy, reporting finished deletions, releasing a PV, completing or expiring a record,
/// writing the index, checking for orphans, reading a record; anything else counts as "other".
const CLEANUP_ERROR_REASONS: [&str; 10] = [
    "nodes",
    "local_delete",
    "ack",
    "finalizer",
    "complete",
    "expire",
    "index",
    "orphan",
    "record",
    "other",
];
static CLEANUP_ERRORS: [AtomicU64; CLEANUP_ERROR_REASONS.len()] =
    [const { AtomicU64::new(0) }; CLEANUP_ERROR_REASONS.len()];

fn cleanup_reason(reason: &str) -> usize {
    CLEANUP_ERROR_REASONS
        .iter()
        .position(|&r| r == reason)
        .unwrap_or(CLEANUP_ERROR_REASONS.len() - 1)
}

pub fn record_cleanup_error(reason: &str) {
    CLEANUP_ERRORS[cleanup_reason(reason)].fetch_add(1, Ordering::Relaxed);
}

/// Cleanup failures counted so far for `reason`.
pub fn cleanup_errors(reason: &str) -> u64 {
    CLEANUP_ERRORS[cleanup_reason(reason)].load(Ordering::Relaxed)
}

/// Kubernetes API calls by verb and HTTP status class; status 0 means no response.
const KUBE_VERBS: [&str; 6] = ["get", "list", "create", "patch", "delete", "other"];
const KUBE_CODES: [u16; 12] = [0, 200, 201, 400, 401, 403, 404, 409, 410, 422, 429, 500];
static KUBE_COUNTS: [[AtomicU64; KUBE_CODES.len() + 1]; KUBE_VERBS.len()] =
    [const { [const { AtomicU64::new(0) }; KUBE_CODES.len() + 1] }; KUBE_VERBS.len()];

pub fn record_rpc(method: &str, code: RpcStatusCode, took: Duration) {
    let m = SERVED.iter().position(|&n| n == method).unwrap_or(SERVED.len());
    let c = usize::try_from(i32::from(code))
        .ok()
        .filter(|&c| c < CODES)
        .unwrap_or(2);
    RPC_COUNTS[m][c].fetch_add(1, Ordering::Relaxed);
    RPC_DURATIONS[m].observe(took);
}

/// `status` 0 for a request that got no HTTP response. Statuses outside the table count under
/// their class's representative (e.g. 503 as 500).
pub fn record_kube(verb: &str, status: u16) {
    let v = KUBE_VERBS
        .iter()
        .position(|&n| n == verb)
        .unwrap_or(KUBE_VERBS.len() - 1);
    let c = KUBE_CODES
        .iter()
        .position(|&c| c == status)
        .unwrap_or_else(|| match status {
            200..=299 => 1,
            400..=499 => 3,
            _ => KUBE_CODES.len() - 1,
        });
    KUBE_COUNTS[v][c].fetch_add(1, Ordering::Relaxed);
}

type Gauge = Box<dyn Fn() -> u64 + Send + Sync>;
static ACTIVE_VOLUMES: OnceLock<Gauge> = OnceLock::new();

/// How `active_volumes` is computed at scrape time (volumes mounted on this node, or volumes
/// the controller knows of).
pub fn set_active_volumes(f: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = ACTIVE_VOLUMES.set(Box::new(f));
}

static ALIVE: OnceLock<Box<dyn Fn() -> std::result::Result<(), String> + Send + Sync>> = OnceLock::new();

/// What `/livez` reports: whether the CSI server answers (the error says why not). Not set:
/// alive while this endpoint answers.
pub fn set_alive(f: impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static) {
    let _ = ALIVE.set(Box::new(f));
}

static READY: OnceLock<Box<dyn Fn() -> bool + Send + Sync>> = OnceLock::new();

/// What `/readyz` and the `ready` gauge report: what Probe would say (on a node, whether the
/// base dir is usable). Not set: not ready.
pub fn set_ready(f: impl Fn() -> bool + Send + Sync + 'static) {
    let _ = READY.set(Box::new(f));
}

fn ready() -> bool {
    READY.get().is_some_and(|f| f())
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
}

pub fn render() -> String {
    let mut out = String::with_capacity(16 * 1024);
    header(&mut out, "build_info", "gauge", "Version of the running driver.");
    let _ = writeln!(out, "{PREFIX}build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

    header(
        &mut out,
        "csi_requests_total",
        "counter",
        "CSI calls answered, by method and status code.",
    );
    for (m, row) in RPC_COUNTS.iter().enumerate() {
        let m = method_name(m);
        for (code, n) in CODE_NAMES.iter().zip(row) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "{PREFIX}csi_requests_total{{method=\"{m}\",code=\"{code}\"}} {n}");
            }
        }
    }
    header(
        &mut out,
        "csi_request_duration_seconds",
        "histogram",
        "Time to answer a CSI call, by method.",
    );
    for (m, h) in RPC_DURATIONS.iter().enumerate() {
        let m = method_name(m);
        h.render(&mut out, "csi_request_duration_seconds", &format!("method=\"{m}\""));
    }

    for (name, help, v) in [
        (
            "volume_create_total",
            "Volumes created (controller) or volume dirs created on this node.",
            &VOLUME_CREATE_TOTAL,
        ),
        (
            "volume_delete_total",
            "Volumes deleted (controller) or volume dirs deleted on this node.",
            &VOLUME_DELETE_TOTAL,
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{PREFIX}{name} {}", v.load(Ordering::Relaxed));
    }
    header(
        &mut out,
        "mount_duration_seconds",
        "histogram",
        "Time to bind-mount (and remount) a volume at a target.",
    );
    MOUNT_DURATION.render(&mut out, "mount_duration_seconds", "");
    header(
        &mut out,
        "cleanup_duration_seconds",
        "histogram",
        "Time to delete a volume's data on this node.",
    );
    CLEANUP_DURATION.render(&mut out, "cleanup_duration_seconds", "");

    header(
        &mut out,
        "active_volumes",
        "gauge",
        "Volumes mounted on this node (node) or known to the controller.",
    );
    let active = ACTIVE_VOLUMES.get().map_or(0, |f| f());
    let _ = writeln!(out, "{PREFIX}active_volumes {active}");
    header(
        &mut out,
        "ready",
        "gauge",
        "1 while the driver can serve (node: its base dir opens and is writable), else 0.",
    );
    let _ = writeln!(out, "{PREFIX}ready {}", u8::from(ready()));
    header(
        &mut out,
        "cleanup_pending",
        "gauge",
        "Volume cleanups requested and not yet finished.",
    );
    let _ = writeln!(
        out,
        "{PREFIX}cleanup_pending {}",
        CLEANUP_PENDING.load(Ordering::Relaxed)
    );

    render_eviction(&mut out);

    header(
        &mut out,
        "cleanup_errors_total",
        "counter",
        "Failed steps of the cross-node cleanup, by reason; each is retried on the next poll.",
    );
    for (reason, n) in CLEANUP_ERROR_REASONS.iter().zip(&CLEANUP_ERRORS) {
        let _ = writeln!(
            out,
            "{PREFIX}cleanup_errors_total{{reason=\"{reason}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }

    header(
        &mut out,
        "kube_api_requests_total",
        "counter",
        "Kubernetes API requests, by verb and HTTP status (0: no response).",
    );
    for (verb, row) in KUBE_VERBS.iter().zip(&KUBE_COUNTS) {
        for (code, n) in KUBE_CODES.iter().zip(row) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "{PREFIX}kube_api_requests_total{{verb=\"{verb}\",code=\"{code}\"}} {n}"
                );
            }
        }
    }
    out
}

fn render_eviction(out: &mut String) {
    header(
        out,
        "copy_bytes",
        "gauge",
        "Bytes each copy on this node holds, by volume id.",
    );
    for (id, bytes) in COPY_BYTES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "{PREFIX}copy_bytes{{volume=\"{id}\"}} {bytes}");
    }
    header(
        out,
        "eviction_freed_bytes_total",
        "counter",
        "Bytes freed by eviction, by reason (capacity, budget) and action (trim, evict).",
    );
    for (reason, row) in EVICTION_REASONS.iter().zip(&EVICTION_FREED) {
        for (action, n) in EVICTION_ACTIONS.iter().zip(row) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{PREFIX}eviction_freed_bytes_total{{reason=\"{reason}\",action=\"{action}\"}} {n}"
            );
        }
    }
    header(
        out,
        "copies_evicted_total",
        "counter",
        "Whole copies evicted from this node, by reason.",
    );
    for (reason, n) in EVICTION_REASONS.iter().zip(&COPIES_EVICTED) {
        let n = n.load(Ordering::Relaxed);
        let _ = writeln!(out, "{PREFIX}copies_evicted_total{{reason=\"{reason}\"}} {n}");
    }
    header(
        out,
        "copies_over_capacity",
        "gauge",
        "Copies over their capacity that pods still mount, so cannot be trimmed yet.",
    );
    let _ = writeln!(
        out,
        "{PREFIX}copies_over_capacity {}",
        COPIES_OVER_CAPACITY.load(Ordering::Relaxed)
    );
    header(
        out,
        "eviction_last_pass_timestamp_seconds",
        "gauge",
        "Unix time the last eviction pass finished.",
    );
    let _ = writeln!(
        out,
        "{PREFIX}eviction_last_pass_timestamp_seconds {}",
        EVICTION_LAST_PASS.load(Ordering::Relaxed)
    );
    header(
        out,
        "eviction_pass_duration_seconds",
        "histogram",
        "Time an eviction pass took, trims and evictions included.",
    );
    EVICTION_PASS_DURATION.render(out, "eviction_pass_duration_seconds", "");
}

/// Limits that keep a slow or hostile client from tying up the endpoint: connections served at
/// once (a new one beyond closes the oldest), and threads, which a closed connection ends at
/// once unless `/livez` is still waiting for the CSI socket.
const MAX_CONNECTIONS: usize = 4;
const MAX_THREADS: usize = 16;
const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `:9809` means every address, IPv4 and IPv6, port 9809.
pub fn parse_addr(arg: &str) -> Result<SocketAddr, String> {
    let full = if arg.starts_with(':') {
        format!("[::]{arg}")
    } else {
        arg.to_owned()
    };
    full.parse().map_err(|e| format!("metrics address {arg:?}: {e}"))
}

/// Binds `addr`; `[::]` as one socket for both families (IPV6_V6ONLY off, whatever the
/// namespace's `net.ipv6.bindv6only` says), or IPv4 only where the kernel has no IPv6.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match addr {
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => match bind_both_families(v6.port()) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], v6.port())))
            }
            other => other,
        },
        _ => TcpListener::bind(addr),
    }
}

/// A listening IPv6 socket on every address and `port` that takes IPv4 connections as well.
/// std cannot clear IPV6_V6ONLY before the bind, and nix's socket calls would add a crate.
fn bind_both_families(port: u16) -> std::io::Result<TcpListener> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: no pointers; the descriptor returned is owned at once below.
    let raw = check(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a descriptor just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_REUSEADDR, 1 as libc::c_int),
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0),
    ] {
        // SAFETY: the option value points to a c_int on the stack whose size is passed.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    // SAFETY: all-zero is a valid sockaddr_in6 (the unspecified address, port 0).
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    // SAFETY: the address points to a sockaddr_in6 on the stack whose size is passed.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    // SAFETY: no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(TcpListener::from(fd))
}

/// Connections being served, oldest first, each with a handle to close it by, and the threads
/// serving them (closed ones included until they end).
#[derive(Default)]
struct Open {
    conns: Mutex<VecDeque<(u64, TcpStream)>>,
    threads: AtomicUsize,
}

impl Open {
    fn conns(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, TcpStream)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes connection `id` in, closing the oldest when at the cap: clients that hold
    /// connections (a request sent a byte at a time, an answer read as slowly) must not keep
    /// kubelet's probes out, or five failed liveness probes restart the plugin.
    fn admit(&self, id: u64, stream: &TcpStream) -> bool {
        if self.threads.load(Ordering::SeqCst) >= MAX_THREADS {
            return false;
        }
        let Ok(closer) = stream.try_clone() else { return false };
        let mut conns = self.conns();
        if conns.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = conns.pop_front() {
                debug!("metrics: too many open connections; closing the oldest");
                let _ = oldest.shutdown(Shutdown::Both);
            }
        }
        conns.push_back((id, closer));
        self.threads.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn done(&self, id: u64) {
        self.conns().retain(|(i, _)| *i != id);
        self.threads.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `/metrics`, `/livez` and `/readyz` on a thread of its own. Returns the bound address
/// (the port may have been 0).
pub fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = bind(addr)?;
    let bound = listener.local_addr()?;
    let open = Arc::new(Open::default());
    thread::Builder::new().name("metrics".into()).spawn(move || {
        for (id, conn) in (0u64..).zip(listener.incoming()) {
            let Ok(stream) = conn else { continue };
            if !open.admit(id, &stream) {
                debug!("metrics: too many connection threads; closing a new connection");
                continue;
            }
            let mine = open.clone();
            let spawned = thread::Builder::new().name("metrics-conn".into()).spawn(move || {
                let _ = handle(stream);
                mine.done(id);
            });
            if let Err(e) = spawned {
                open.done(id);
                warn!("metrics: cannot start a connection thread: {e}");
            }
        }
    })?;
    Ok(bound)
}

fn handle(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            );
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if method != b"GET" {
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n");
    }
    match path {
        b"/metrics" => respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(),
        ),
        // Liveness: the CSI socket answers. Never tied to readiness, so a node whose base dir is
        // unusable is reported, not restarted in a loop.
        b"/livez" => match ALIVE.get().map_or(Ok(()), |f| f()) {
            Ok(()) => respond(&mut stream, "200 OK", "text/plain", "ok\n"),
            Err(e) => {
                warn!("liveness: {e}");
                respond(&mut stream, "503 Service Unavailable", "text/plain", &format!("{e}\n"))
            }
        },
        b"/readyz" if ready() => respond(&mut stream, "200 OK", "text/plain", "ok\n"),
        b"/readyz" => respond(&mut stream, "503 Service Unavailable", "text/plain", "not ready\n"),
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n"),
    }
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "method=\"m\"");
        assert!(
            out.contains("node_local_cache_x_seconds_bucket{method=\"m\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("node_local_cache_x_seconds_bucket{method=\"m\",le=\"0.005\"} 2\n"));
        assert!(out.contains("node_local_cache_x_seconds_bucket{method=\"m\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("node_local_cache_x_seconds_count{method=\"m\"} 3\n"));
    }

    #[test]
    fn rpc_counts_render_by_method_and_code() {
        record_rpc("NodeGetInfo", RpcStatusCode::NOT_FOUND, Duration::from_millis(1));
        record_rpc("SomethingElse", RpcStatusCode::OK, Duration::from_millis(1));
        let text = render();
        assert!(text.contains("csi_requests_total{method=\"NodeGetInfo\",code=\"NOT_FOUND\"}"));
        assert!(text.contains("csi_requests_total{method=\"other\",code=\"OK\"}"));
        assert!(text.contains("build_info{version=\""));
    }

    #[test]
    fn eviction_metrics_render_by_reason_action_and_copy() {
        // The only test recording capacity trims: the count is exact.
        record_freed(EvictionReason::Capacity, EvictionAction::Trim, 4096);
        record_freed(EvictionReason::Budget, EvictionAction::Evict, 1);
        set_copy_bytes(vec![("nlc-a".into(), 123)]);
        let text = render();
        assert!(text.contains("copy_bytes{volume=\"nlc-a\"} 123\n"), "{text}");
        assert!(text.contains("eviction_freed_bytes_total{reason=\"budget\",action=\"evict\"}"));
        assert!(text.contains("eviction_freed_bytes_total{reason=\"capacity\",action=\"trim\"} 4096\n"));
        assert!(text.contains("copies_evicted_total{reason=\"budget\"}"));
        assert!(text.contains("eviction_last_pass_timestamp_seconds "));
    }

    /// kubelet probes the pod's primary address, an IPv6 one on IPv6 and most dual-stack
    /// clusters: `:PORT` must answer on both families.
    #[test]
    fn every_address_means_ipv4_and_ipv6() {
        let bound = serve(parse_addr(":0").unwrap()).unwrap();
        for host in ["127.0.0.1", "[::1]"] {
            let addr: SocketAddr = format!("{host}:{}", bound.port()).parse().unwrap();
            assert!(get(addr, "/livez").starts_with("HTTP/1.1 200 "), "{addr}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr(":9809").unwrap(), "[::]:9809".parse().unwrap());
        assert_eq!(parse_addr("127.0.0.1:1").unwrap(), "127.0.0.1:1".parse().unwrap());
        assert!(parse_addr("nope").is_err());
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn liveness_does_not_follow_readiness() {
        static READY_NOW: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        set_ready(|| READY_NOW.load(Ordering::SeqCst));
        let addr = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(get(addr, "/livez").starts_with("HTTP/1.1 200 "));
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503 "));
        assert!(get(addr, "/metrics").contains("\nnode_local_cache_ready 0\n"));
        READY_NOW.store(true, Ordering::SeqCst);
        assert!(get(addr, "/livez").starts_with("HTTP/1.1 200 "));
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200 "));
        assert!(get(addr, "/metrics").contains("\nnode_local_cache_ready 1\n"));
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 404 "), "one name per probe");
    }
}
