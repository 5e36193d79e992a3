//! grpcio wiring: the Unix socket, the worker pool that runs blocking work off grpcio's poll
//! threads, the per-RPC bookkeeping (request id, log line, status) and graceful shutdown.

use std::collections::VecDeque;
use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake};
use std::thread;
use std::time::{Duration, Instant};

use grpcio::{Environment, RpcStatusCode, UnarySink};
use log::{debug, info, log, log_enabled, warn, Level};

use crate::error::{Error, Result};
use crate::logging::RequestScope;
use crate::metrics;
use crate::proto::Redact;

type Job = Box<dyn FnOnce() + Send>;

/// Counts jobs queued or running, so shutdown can wait for them.
#[derive(Default)]
struct Busy {
    state: Mutex<BusyState>,
    idle: Condvar,
}

/// Jobs queued or running, and how many threads wait for none to be. A condition variable's
/// notify is a syscall even with nobody waiting, and every job ends with one: it is made only
/// for a waiter.
#[derive(Default)]
struct BusyState {
    jobs: usize,
    waiters: usize,
}

impl Busy {
    fn add(&self, n: isize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.jobs = s.jobs.saturating_add_signed(n);
        let wake = s.jobs == 0 && s.waiters > 0;
        drop(s);
        if wake {
            self.idle.notify_all();
        }
    }

    fn wait_idle(&self, timeout: Duration) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.waiters += 1;
        let (mut s, _) = self
            .idle
            .wait_timeout_while(s, timeout, |s| s.jobs > 0)
            .unwrap_or_else(|p| p.into_inner());
        s.waiters -= 1;
        s.jobs == 0
    }
}

/// Jobs waiting for a worker, at most `cap` of them.
struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
    cap: usize,
    /// How often an idle worker wakes to let go of held replies.
    sweep: Duration,
}

/// The queued jobs and the workers asleep waiting for one: a job is announced only when one
/// sleeps (under load the workers find the next job without sleeping, and a notify nobody
/// waits for is still a syscall).
struct Jobs {
    queue: VecDeque<Job>,
    sleeping: usize,
}

/// How often an idle worker that still holds replies lets go of those gRPC has finished with
/// (see `HELD_REPLIES`).
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// Threads fed by a bounded queue. An idle worker sleeps on a condition variable: it costs
/// nothing until a job arrives (a channel that spins before it parks made hundreds of
/// `sched_yield`s per hundred calls on a two-core node). A job that panics is contained to
/// itself: the thread survives and the call gets INTERNAL (the sink's drop cancels it).
struct Pool {
    queue: Arc<Queue>,
    busy: Arc<Busy>,
}

impl Pool {
    fn new(name: &str, threads: usize, cap: usize) -> Pool {
        Pool::with_sweep(name, threads, cap, IDLE_SWEEP)
    }

    fn with_sweep(name: &str, threads: usize, cap: usize, sweep: Duration) -> Pool {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::with_capacity(cap),
                sleeping: 0,
            }),
            ready: Condvar::new(),
            cap: cap.max(1),
            sweep,
        });
        let busy = Arc::new(Busy::default());
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let busy = busy.clone();
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let job = queue.next();
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        log::error!("a worker job panicked; the call was cancelled");
                    }
                    busy.add(-1);
                })
                .expect("spawn worker thread");
        }
        Pool { queue, busy }
    }

    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        let mut jobs = self.queue.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.queue.len() >= self.queue.cap {
            return Err(job);
        }
        self.busy.add(1);
        jobs.queue.push_back(job);
        let wake = jobs.sleeping > 0;
        drop(jobs);
        if wake {
            self.queue.ready.notify_one();
        }
        Ok(())
    }
}

impl Queue {
    /// The next job; while there is none, the replies this thread holds are let go as they
    /// complete.
    fn next(&self) -> Job {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(job) = jobs.queue.pop_front() {
                return job;
            }
            jobs.sleeping += 1;
            // A worker with no reply to let go sleeps until a job comes: on an idle node the
            // pool makes no wake-ups at all.
            let holding = HELD_REPLIES.with_borrow(|held| !held.is_empty());
            let (guard, timed_out) = if holding {
                let (guard, waited) = self
                    .ready
                    .wait_timeout(jobs, self.sweep)
                    .unwrap_or_else(|p| p.into_inner());
                (guard, waited.timed_out())
            } else {
                (self.ready.wait(jobs).unwrap_or_else(|p| p.into_inner()), false)
            };
            jobs = guard;
            jobs.sleeping -= 1;
            if timed_out {
                drop(jobs);
                sweep_held_replies();
                jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// What every service handler uses to answer: inline for cheap calls, on the pool for anything
/// that touches mounts, the disk or the network.
#[derive(Clone)]
pub struct Rpc {
    pool: Arc<Pool>,
    next_id: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
}

impl Rpc {
    pub fn new(workers: usize, queue_depth: usize) -> Rpc {
        Rpc {
            pool: Arc::new(Pool::new("worker", workers, queue_depth)),
            next_id: Arc::new(AtomicU64::new(1)),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    fn begin<Req: Redact>(&self, method: &'static str, req: &Req) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if log_enabled!(Level::Debug) {
            let _scope = RequestScope::enter(id);
            debug!("{method} request: {}", redacted(req));
        }
        id
    }

    /// Answers on the calling (poll) thread. Only for work that cannot block.
    pub fn inline<Req: Redact, Resp>(
        &self,
        method: &'static str,
        req: Req,
        sink: UnarySink<Resp>,
        f: impl FnOnce(Req) -> Result<Resp>,
    ) {
        let started = Instant::now();
        let id = self.begin(method, &req);
        let _scope = RequestScope::enter(id);
        finish(method, started, sink, f(req));
    }

    /// Answers from a worker thread; the poll thread returns at once. `volume` names the
    /// volume in the refusal sent when the queue is full.
    pub fn blocking<Req: Redact, Resp: Send + 'static>(
        &self,
        method: &'static str,
        volume: &str,
        req: Req,
        sink: UnarySink<Resp>,
        f: impl FnOnce(Req) -> Result<Resp> + Send + 'static,
    ) {
        let started = Instant::now();
        let id = self.begin(method, &req);
        let refuse = |sink, e| {
            let _scope = RequestScope::enter(id);
            finish(method, started, sink, Err(e));
        };
        if self.stopping.load(Ordering::SeqCst) {
            return refuse(sink, Error::ShuttingDown);
        }
        // The sink waits in a slot the job takes it from, so a refused job hands it back.
        let slot = Arc::new(Mutex::new(Some((req, sink))));
        let job_slot = slot.clone();
        let job: Job = Box::new(move || {
            let taken = job_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((req, sink)) = taken {
                let _scope = RequestScope::enter(id);
                finish(method, started, sink, f(req));
            }
        });
        if self.pool.submit(job).is_err() {
            let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((_, sink)) = taken {
                let reason = "all workers busy and the queue is full; retry".to_owned();
                refuse(
                    sink,
                    Error::Unavailable {
                        volume: volume.to_owned(),
                        reason,
                    },
                );
            }
        }
    }

    fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn wait_idle(&self, timeout: Duration) -> bool {
        self.pool.busy.wait_idle(timeout)
    }
}

/// Calls that kubelet and the probes make every few seconds: logged at debug when they succeed.
fn routine(method: &str) -> bool {
    matches!(
        method,
        "Probe"
            | "GetPluginInfo"
            | "GetPluginCapabilities"
            | "NodeGetCapabilities"
            | "NodeGetInfo"
            | "NodeGetVolumeStats"
            | "ControllerGetCapabilities"
    )
}

fn finish<Resp>(method: &'static str, started: Instant, sink: UnarySink<Resp>, result: Result<Resp>) {
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1e3;
    let sent = match result {
        Ok(resp) => {
            metrics::record_rpc(method, RpcStatusCode::OK, elapsed);
            let level = if routine(method) { Level::Debug } else { Level::Info };
            log!(level, "{method} OK in {ms:.2}ms");
            sink.success(resp)
        }
        Err(e) => {
            let status = e.to_status();
            metrics::record_rpc(method, status.code(), elapsed);
            warn!("{method} {:?} in {ms:.2}ms: {e}", status.code());
            sink.fail(status)
        }
    };
    hold_reply(Box::pin(async move {
        if let Err(e) = sent.await {
            debug!("{method}: reply not delivered: {e}");
        }
    }));
}

type Reply = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// Replies this thread has sent and gRPC has not yet reported delivered. Dropping one earlier
    /// releases the last reference to the call, and the C core cancels a call released before it
    /// completes: the client would see CANCELLED instead of the answer. Each thread keeps its
    /// own and lets them go on its next call (or, on an idle worker, within `IDLE_SWEEP`), so no
    /// thread hand-off sits on the reply path.
    static HELD_REPLIES: std::cell::RefCell<Vec<Reply>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn hold_reply(reply: Reply) {
    HELD_REPLIES.with_borrow_mut(|held| held.push(reply));
    sweep_held_replies();
}

/// Drops the held replies that gRPC has finished with. Polling only reads the state the
/// completion queue already recorded, so no waker is needed.
fn sweep_held_replies() {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    HELD_REPLIES.with_borrow_mut(|held| held.retain_mut(|f| f.as_mut().poll(&mut cx).is_pending()));
}

/// The request as text with every `secrets` map emptied.
fn redacted<M: Redact>(req: &M) -> String {
    let mut copy = req.clone();
    copy.redact();
    format!("{copy:?}")
}

/// `unix:///path`, `unix:/path` or a plain path.
pub fn socket_path(arg: &str) -> PathBuf {
    let p = arg
        .strip_prefix("unix://")
        .or_else(|| arg.strip_prefix("unix:"))
        .unwrap_or(arg);
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned())
    }
}

/// Creates the socket's directory and removes a stale socket; refuses to take over a socket
/// that another process still serves, or a path that is not a socket.
pub fn prepare_socket(path: &Path) -> std::result::Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create socket dir {}: {e}", dir.display()))?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("socket {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "socket {}: exists and is not a socket; refusing to replace it",
            path.display()
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!("socket {}: another process is serving on it", path.display()));
    }
    info!("removing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|e| format!("remove stale socket {}: {e}", path.display()))
}

/// How long liveness waits for the CSI server's first frame: the poll thread answers a new
/// connection in well under a millisecond, and kubelet's probe gives up after five seconds.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the gRPC server behind `path` answers a new connection: it must send its HTTP/2
/// settings, which only a live poll thread does. Liveness asks this; the error says what failed.
pub fn answers(path: &Path, timeout: Duration) -> std::result::Result<(), String> {
    use std::io::{Read, Write};
    // The client preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
    const HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    const SETTINGS: u8 = 0x4;
    let fail = |what: &str, e: std::io::Error| format!("CSI socket {}: {what}: {e}", path.display());
    let mut s = UnixStream::connect(path).map_err(|e| fail("connect", e))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| fail("set timeout", e))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| fail("set timeout", e))?;
    s.write_all(HELLO).map_err(|e| fail("send preface", e))?;
    let mut frame = [0u8; 9];
    s.read_exact(&mut frame)
        .map_err(|e| fail("read the server's settings", e))?;
    if frame[3] != SETTINGS {
        return Err(format!(
            "CSI socket {}: the server's first frame is of type {}, not SETTINGS",
            path.display(),
            frame[3]
        ));
    }
    Ok(())
}

pub struct Running {
    server: grpcio::Server,
    rpc: Rpc,
    socket: PathBuf,
    _env: Arc<Environment>,
}

pub fn start(socket: &Path, services: Vec<grpcio::Service>, rpc: Rpc) -> std::result::Result<Running, String> {
    prepare_socket(socket)?;
    // One completion queue: handlers only validate and hand off, so one poll thread keeps up.
    let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).name_prefix("grpc-poll").build());
    let mut builder = grpcio::ServerBuilder::new(env.clone());
    for s in services {
        builder = builder.register_service(s);
    }
    let mut server = builder.build().map_err(|e| format!("build gRPC server: {e}"))?;
    if !crate::grpc_plugins::in_effect() {
        warn!("gRPC core configured with its stock plugin set (this binary does not invoke grpc_core_configuration!)");
    }
    let addr = format!("unix:{}", socket.display());
    server
        .add_listening_port(addr.clone(), grpcio::ServerCredentials::insecure())
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    server.start();
    Ok(Running {
        server,
        rpc,
        socket: socket.to_owned(),
        _env: env,
    })
}

impl Running {
    /// Stops taking calls, lets those in flight finish within `timeout`, removes the socket.
    pub fn stop(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.rpc.stop_accepting();
        let drained = block_on_timeout(self.server.shutdown(), timeout).is_some();
        if !drained {
            warn!("calls still in flight after {timeout:?}; cancelling them");
            self.server.cancel_all_calls();
        }
        if !self.rpc.wait_idle(deadline.saturating_duration_since(Instant::now())) {
            warn!("worker jobs still running at exit");
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("remove socket {}: {e}", self.socket.display());
            }
        }
        info!("stopped");
    }
}

struct ThreadWaker(thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls a future on this thread until it is ready or `timeout` passes.
pub fn block_on_timeout<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let waker = Arc::new(ThreadWaker(thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::park_timeout(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths() {
        assert_eq!(socket_path("unix:///csi/csi.sock"), Path::new("/csi/csi.sock"));
        assert_eq!(socket_path("unix:/csi/csi.sock"), Path::new("/csi/csi.sock"));
        assert_eq!(socket_path("/csi/csi.sock"), Path::new("/csi/csi.sock"));
        assert!(socket_path("rel.sock").is_absolute());
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("nlc-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/csi.sock");
        prepare_socket(&path).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(prepare_socket(&path).unwrap_err().contains("another process"));
        drop(listener);
        prepare_socket(&path).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(prepare_socket(&path).unwrap_err().contains("not a socket"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pool_contains_panics_and_drains() {
        let pool = Pool::new("t", 2, 4);
        let (tx, rx) = std::sync::mpsc::channel();
        pool.submit(Box::new(|| panic!("boom"))).ok().unwrap();
        for i in 0..3 {
            let tx = tx.clone();
            pool.submit(Box::new(move || tx.send(i).unwrap())).ok().unwrap();
        }
        assert!(pool.busy.wait_idle(Duration::from_secs(5)));
        let mut got: Vec<i32> = rx.try_iter().collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
    }

    /// Waits until `n` of the pool's workers sleep waiting for a job.
    fn wait_until_asleep(pool: &Pool, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.queue.jobs.lock().unwrap().sleeping < n {
            assert!(Instant::now() < deadline, "workers never went to sleep");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Each job that finds workers asleep wakes one. The idle sweep, which would also pick a job
    /// up, is set beyond the test's wait, so a job nobody was woken for fails it.
    #[test]
    fn each_job_wakes_a_sleeping_worker() {
        let pool = Pool::with_sweep("t", 2, 4, Duration::from_secs(3600));
        wait_until_asleep(&pool, 2);
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        for i in 0..2 {
            let started_tx = started_tx.clone();
            let release_rx = release_rx.clone();
            pool.submit(Box::new(move || {
                started_tx.send(i).unwrap();
                // Holds this worker until the test has seen both jobs start.
                let _ = release_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
            }))
            .ok()
            .unwrap();
        }
        for _ in 0..2 {
            started
                .recv_timeout(Duration::from_secs(10))
                .expect("a job waited for a worker that was never woken");
        }
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        assert!(pool.busy.wait_idle(Duration::from_secs(10)));
    }

    /// Voluntary context switches so far of each thread of this process named `name`.
    fn switches_of(name: &str) -> Vec<u64> {
        let mut seen = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            if std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim_end() == name) {
                let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                let n = status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                seen.extend(n);
            }
        }
        seen
    }

    /// An idle worker that holds no reply sleeps until a job comes: on an idle node it makes no
    /// wake-ups at all (it woke at every sweep interval, one a second per worker). One that holds
    /// a reply gRPC has not finished with still wakes to let it go.
    #[test]
    fn an_idle_worker_with_nothing_to_let_go_does_not_wake() {
        let pool = Pool::with_sweep("idle-w", 2, 4, Duration::from_millis(5));
        // Wake-ups of both workers over 40 sweep intervals.
        let woken = || {
            let before: u64 = switches_of("idle-w-0").iter().chain(&switches_of("idle-w-1")).sum();
            thread::sleep(Duration::from_millis(200));
            let after: u64 = switches_of("idle-w-0").iter().chain(&switches_of("idle-w-1")).sum();
            after - before
        };
        wait_until_asleep(&pool, 2);
        let idle = woken();

        let delivered = Arc::new(AtomicBool::new(false));
        let flag = delivered.clone();
        pool.submit(Box::new(move || {
            hold_reply(Box::pin(std::future::poll_fn(move |_| {
                if flag.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })))
        }))
        .ok()
        .unwrap();
        wait_until_asleep(&pool, 2);
        let holding = woken();
        delivered.store(true, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(50));
        let let_go = woken();

        assert!(idle <= 2, "idle workers woke {idle} times in 200 ms");
        assert!(
            holding >= 10,
            "a worker holding a reply woke only {holding} times in 200 ms"
        );
        assert!(
            let_go <= 2,
            "after letting the reply go, the workers woke {let_go} times"
        );
    }

    #[test]
    fn block_on_times_out_on_a_pending_future() {
        assert_eq!(
            block_on_timeout(std::future::pending::<()>(), Duration::from_millis(10)),
            None
        );
        assert_eq!(block_on_timeout(async { 7 }, Duration::from_millis(10)), Some(7));
    }
}
