//! `csi-bench`: publish/unpublish load for any CSI node plugin over its Unix socket, next to the
//! floor no plugin can beat: the same mkdir, bind mount, unmount and rmdir done here directly with
//! syscalls, at the same concurrency.
//!
//! Each worker owns one target, `<target-root>/bench-<i>/mount`, and makes the parent itself as
//! kubelet does; the plugin makes and removes `mount`. A plugin that asks for staging gets one
//! NodeStageVolume first; with `--controller-socket` the volume comes from CreateVolume. As many
//! NodeGetCapabilities calls, at the same concurrency, show what any call costs with no work in
//! it. `--probe` only times how soon the plugin answers a ready Probe (after starting it, when
//! given its command line after `--`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{value_parser, Arg, ArgAction, ArgMatches};
use grpcio::{CallOption, ChannelBuilder, Environment};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode as FileMode;
use serde_json::{json, Value};

use node_local_cache::config::parse_duration;
use node_local_cache::mounts;
use node_local_cache::proto::csi;
use node_local_cache::proto::csi::node_service_capability::rpc::Type as NodeRpc;
use node_local_cache::proto::csi::volume_capability::access_mode::Mode;
use node_local_cache::proto::grpc::{ControllerClient, IdentityClient, NodeClient};
use node_local_cache::server::socket_path;
use node_local_cache::volume;

node_local_cache::grpc_core_configuration!(client);

/// `--access-mode` values, as clap's kebab-case names of the CSI modes.
const ACCESS_MODES: [(&str, Mode); 7] = [
    ("single-node-writer", Mode::SINGLE_NODE_WRITER),
    ("single-node-reader-only", Mode::SINGLE_NODE_READER_ONLY),
    ("single-node-single-writer", Mode::SINGLE_NODE_SINGLE_WRITER),
    ("single-node-multi-writer", Mode::SINGLE_NODE_MULTI_WRITER),
    ("multi-node-reader-only", Mode::MULTI_NODE_READER_ONLY),
    ("multi-node-single-writer", Mode::MULTI_NODE_SINGLE_WRITER),
    ("multi-node-multi-writer", Mode::MULTI_NODE_MULTI_WRITER),
];

struct Flags {
    node_socket: String,
    controller_socket: Option<String>,
    create_delete: usize,
    volume_id: Option<String>,
    target_root: Option<PathBuf>,
    cycles: usize,
    concurrency: usize,
    readonly: bool,
    access_mode: Mode,
    no_floor: bool,
    json: bool,
    fail_on_error: bool,
    timeout: Duration,
    client_threads: usize,
    probe: bool,
    exec: Vec<String>,
}

fn opt(name: &'static str, value: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).value_name(value).help(help)
}

fn switch(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).action(ArgAction::SetTrue).help(help)
}

fn count(name: &'static str, value: &'static str, default: &'static str, help: &'static str) -> Arg {
    opt(name, value, help)
        .default_value(default)
        .value_parser(value_parser!(usize))
}

fn command() -> clap::Command {
    clap::Command::new("csi-bench")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Publish/unpublish load for a CSI node plugin, compared with the bare mount syscalls")
        .args([
            opt("node-socket", "NODE_SOCKET", "The node plugin's socket: a path or unix:///path").required(true),
            opt(
                "controller-socket",
                "CONTROLLER_SOCKET",
                "A controller plugin's socket: the volume is made with CreateVolume and deleted at the end",
            ),
            count(
                "create-delete",
                "CREATE_DELETE",
                "0",
                "Also time this many CreateVolume + DeleteVolume pairs on the controller",
            )
            .requires("controller-socket"),
            opt(
                "volume-id",
                "VOLUME_ID",
                "The volume to publish; default a fresh nlc-<uuid>, which node-local-cache serves with no controller at all",
            ),
            opt(
                "target-root",
                "TARGET_ROOT",
                "Where targets go (DIR/bench-<i>/mount); must lie below the plugin's kubelet dir",
            )
            .value_parser(value_parser!(PathBuf))
            .required_unless_present("probe"),
            count("cycles", "CYCLES", "1000", "Publish + unpublish cycles in all, shared by the workers"),
            count("concurrency", "CONCURRENCY", "16", "Workers, each with its own target"),
            switch("readonly", "Publish read-only (the floor then remounts read-only too)"),
            opt("access-mode", "ACCESS_MODE", "Access mode in the volume capability")
                .default_value("multi-node-multi-writer")
                .value_parser(ACCESS_MODES.map(|(name, _)| name)),
            switch("no-floor", "Skip the syscall floor"),
            switch("json", "Print one JSON object instead of the table"),
            switch("fail-on-error", "Exit 1 when any call failed (a mount left behind always does)"),
            opt("timeout", "TIMEOUT", "Deadline of each call")
                .default_value("30s")
                .value_parser(parse_duration),
            count("client-threads", "CLIENT_THREADS", "1", "Client completion-queue threads"),
            switch(
                "probe",
                "Only wait for the first ready Probe, print how long it took and exit. With a command after `--`, start it first and count from its exec; it keeps running after we exit",
            ),
            Arg::new("exec")
                .value_name("EXEC")
                .num_args(0..)
                .last(true)
                .requires("probe")
                .help("The plugin to start for --probe, with its arguments"),
        ])
}

impl Flags {
    fn from_matches(m: &ArgMatches) -> Flags {
        let text = |id: &str| m.get_one::<String>(id).cloned();
        let number = |id: &str| m.get_one::<usize>(id).copied().unwrap_or_default();
        let access = text("access-mode").unwrap_or_default();
        Flags {
            node_socket: text("node-socket").unwrap_or_default(),
            controller_socket: text("controller-socket"),
            create_delete: number("create-delete"),
            volume_id: text("volume-id"),
            target_root: m.get_one::<PathBuf>("target-root").cloned(),
            cycles: number("cycles"),
            concurrency: number("concurrency"),
            readonly: m.get_flag("readonly"),
            access_mode: ACCESS_MODES
                .iter()
                .find(|(name, _)| *name == access)
                .map_or(Mode::MULTI_NODE_MULTI_WRITER, |&(_, mode)| mode),
            no_floor: m.get_flag("no-floor"),
            json: m.get_flag("json"),
            fail_on_error: m.get_flag("fail-on-error"),
            timeout: m.get_one::<Duration>("timeout").copied().unwrap_or_default(),
            client_threads: number("client-threads"),
            probe: m.get_flag("probe"),
            exec: m
                .get_many::<String>("exec")
                .map_or_else(Vec::new, |v| v.cloned().collect()),
        }
    }
}

/// Latencies of one operation, by nearest rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    count: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

/// The smallest sample with at least `pct` percent of all samples at or below it.
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    let rank = (sorted.len() * pct).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summarize(samples: &[Duration]) -> Option<Summary> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let max = *sorted.last()?;
    Some(Summary {
        count: sorted.len(),
        p50: percentile(&sorted, 50),
        p90: percentile(&sorted, 90),
        p99: percentile(&sorted, 99),
        max,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rounded to the microsecond, so the JSON stays readable.
fn ms_json(d: Duration) -> f64 {
    (ms(d) * 1e3).round() / 1e3
}

impl Summary {
    fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "p50_ms": ms_json(self.p50),
            "p90_ms": ms_json(self.p90),
            "p99_ms": ms_json(self.p99),
            "max_ms": ms_json(self.max),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    count: usize,
    example: String,
}

/// What the workers of one phase saw: latencies by operation and failures by "<call> <code>".
#[derive(Debug, Default)]
struct Record {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    failures: BTreeMap<String, Failure>,
}

impl Record {
    fn took(&mut self, op: &'static str, d: Duration) {
        self.latencies.entry(op).or_default().push(d);
    }

    fn failed(&mut self, call: &str, code: &str, message: String) {
        let f = self.failures.entry(format!("{call} {code}")).or_insert(Failure {
            count: 0,
            example: message,
        });
        f.count += 1;
    }

    fn merge(&mut self, other: Record) {
        for (op, mut v) in other.latencies {
            self.latencies.entry(op).or_default().append(&mut v);
        }
        for (key, f) in other.failures {
            self.failures
                .entry(key)
                .and_modify(|mine| mine.count += f.count)
                .or_insert(f);
        }
    }

    fn summary(&self, op: &str) -> Option<Summary> {
        self.latencies.get(op).and_then(|v| summarize(v))
    }

    fn failure_count(&self) -> usize {
        self.failures.values().map(|f| f.count).sum()
    }
}

/// A phase: its record and how long it ran from the first worker's start to the last one's end.
struct Phase {
    record: Record,
    wall: Duration,
}

impl Phase {
    /// Completed `op`s (cycles, calls) per second of wall time.
    fn throughput(&self, op: &str) -> f64 {
        let done = self.record.latencies.get(op).map_or(0, Vec::len);
        done as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs `cycles` calls of `one(worker, record)` spread over `concurrency` threads.
fn run_phase(concurrency: usize, cycles: usize, one: impl Fn(usize, &mut Record) + Sync) -> Phase {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let records: Vec<Record> = thread::scope(|s| {
        let workers: Vec<_> = (0..concurrency)
            .map(|i| {
                let (next, one) = (&next, &one);
                s.spawn(move || {
                    let mut r = Record::default();
                    while next.fetch_add(1, Ordering::Relaxed) < cycles {
                        one(i, &mut r);
                    }
                    r
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect()
    });
    let wall = started.elapsed();
    let mut record = Record::default();
    for r in records {
        record.merge(r);
    }
    Phase { record, wall }
}

/// The status code's name (`ABORTED`) and message of a failed call.
fn describe(e: &grpcio::Error) -> (String, String) {
    match e {
        grpcio::Error::RpcFailure(s) => {
            // Displayed as "10-ABORTED".
            let code = s.code().to_string();
            let name = code.split_once('-').map_or(code.as_str(), |(_, n)| n).to_owned();
            (name, s.message().to_owned())
        }
        other => ("TRANSPORT".to_owned(), other.to_string()),
    }
}

fn capability(access: Mode) -> csi::VolumeCapability {
    let mut c = csi::VolumeCapability::new();
    c.set_mount(csi::volume_capability::MountVolume::new());
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = access.into();
    c.access_mode = Some(am).into();
    c
}

/// The volume as the node service needs it.
struct Volume {
    id: String,
    context: HashMap<String, String>,
    staging: Option<String>,
    /// Made by CreateVolume here, so DeleteVolume at the end.
    created: bool,
}

struct Clients {
    node: NodeClient,
    controller: Option<ControllerClient>,
    call: CallOption,
}

impl Clients {
    fn call(&self) -> CallOption {
        self.call.clone()
    }
}

fn channel(env: &Arc<Environment>, socket: &str) -> grpcio::Channel {
    ChannelBuilder::new(env.clone()).connect(&format!("unix:{}", socket_path(socket).display()))
}

/// One publish + unpublish. The unpublish runs after a failed publish too, as kubelet would for
/// a mount in an uncertain state, but only a cycle that fully worked is timed as one.
fn publish_cycle(
    c: &Clients,
    publish: &csi::NodePublishVolumeRequest,
    unpublish: &csi::NodeUnpublishVolumeRequest,
    r: &mut Record,
) {
    let started = Instant::now();
    let published = match c.node.node_publish_volume_opt(publish, c.call()) {
        Ok(_) => {
            r.took("publish", started.elapsed());
            true
        }
        Err(e) => {
            let (code, msg) = describe(&e);
            r.failed("NodePublishVolume", &code, msg);
            false
        }
    };
    let unpublish_started = Instant::now();
    match c.node.node_unpublish_volume_opt(unpublish, c.call()) {
        Ok(_) if published => {
            r.took("unpublish", unpublish_started.elapsed());
            r.took("cycle", started.elapsed());
        }
        Ok(_) => {}
        Err(e) => {
            let (code, msg) = describe(&e);
            r.failed("NodeUnpublishVolume", &code, msg);
        }
    }
}

/// The same work as a publish + unpublish with nothing in between: mkdir, bind mount (and the
/// read-only remount), unmount, rmdir.
fn floor_cycle(source: &Path, target: &Path, readonly: bool, r: &mut Record) {
    let fail = |r: &mut Record, step: &str, e: Errno| r.failed(step, &format!("{e:?}"), e.desc().to_owned());
    let started = Instant::now();
    if let Err(e) = nix::unistd::mkdir(target, FileMode::from_bits_truncate(0o750)) {
        return fail(r, "mkdir", e);
    }
    let mounted =
        nix::mount::mount(Some(source), target, None::<&Path>, MsFlags::MS_BIND, None::<&Path>).and_then(|()| {
            if !readonly {
                return Ok(());
            }
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            nix::mount::mount(None::<&Path>, target, None::<&Path>, ro, None::<&Path>)
        });
    if let Err(e) = mounted {
        let _ = nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW);
        let _ = std::fs::remove_dir(target);
        return fail(r, "mount", e);
    }
    r.took("publish", started.elapsed());
    let unmount_started = Instant::now();
    if let Err(e) = nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        // Detached so the floor leaves nothing behind; the failure still counts.
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(target);
        return fail(r, "umount", e);
    }
    if let Err(e) = std::fs::remove_dir(target) {
        return fail(r, "rmdir", Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    }
    r.took("unpublish", unmount_started.elapsed());
    r.took("cycle", started.elapsed());
}

/// Mount points at or below `root`, as /proc/self/mountinfo lists them now.
fn mounts_below(root: &Path) -> Result<Vec<PathBuf>, String> {
    let table = mounts::read_table().map_err(|e| format!("read /proc/self/mountinfo: {}", e.desc()))?;
    Ok(table
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .map(|m| m.mount_point)
        .collect())
}

fn fresh_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("csi-bench-{}-{nanos}", std::process::id())
}

fn create_volume(
    ctl: &ControllerClient,
    name: &str,
    cap: &csi::VolumeCapability,
    call: CallOption,
) -> grpcio::Result<csi::Volume> {
    let mut req = csi::CreateVolumeRequest::new();
    req.name = name.to_owned();
    req.volume_capabilities.push(cap.clone());
    let resp = ctl.create_volume_opt(&req, call)?;
    Ok(resp.volume.into_option().unwrap_or_default())
}

fn delete_volume(ctl: &ControllerClient, id: &str, call: CallOption) -> grpcio::Result<()> {
    let mut req = csi::DeleteVolumeRequest::new();
    req.volume_id = id.to_owned();
    ctl.delete_volume_opt(&req, call).map(|_| ())
}

/// CreateVolume + DeleteVolume pairs, each on a fresh name.
fn create_delete_phase(c: &Clients, flags: &Flags, cap: &csi::VolumeCapability) -> Option<Phase> {
    let ctl = c.controller.as_ref()?;
    if flags.create_delete == 0 {
        return None;
    }
    let base = fresh_name();
    let seq = AtomicUsize::new(0);
    Some(run_phase(flags.concurrency, flags.create_delete, |_, r| {
        let name = format!("{base}-{}", seq.fetch_add(1, Ordering::Relaxed));
        let started = Instant::now();
        let vol = match create_volume(ctl, &name, cap, c.call()) {
            Ok(v) => v,
            Err(e) => {
                let (code, msg) = describe(&e);
                return r.failed("CreateVolume", &code, msg);
            }
        };
        r.took("create", started.elapsed());
        let delete_started = Instant::now();
        match delete_volume(ctl, &vol.volume_id, c.call()) {
            Ok(()) => {
                r.took("delete", delete_started.elapsed());
                r.took("cycle", started.elapsed());
            }
            Err(e) => {
                let (code, msg) = describe(&e);
                r.failed("DeleteVolume", &code, msg);
            }
        }
    }))
}

/// How the plugin came up for --probe.
struct Ready {
    took: Duration,
    attempts: u32,
    /// The plugin we started, if we did.
    pid: Option<u32>,
}

/// Starts the plugin when given one, then polls Probe until it says it is ready.
fn wait_ready(env: &Arc<Environment>, flags: &Flags) -> Result<Ready, String> {
    let path = socket_path(&flags.node_socket);
    let started = Instant::now();
    let pid = match flags.exec.split_first() {
        Some((program, args)) => {
            let child = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("start {program}: {e}"))?;
            Some(child.id())
        }
        None => None,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        // A channel that failed to connect backs off for a second; try the socket by hand first
        // and give every attempt its own channel.
        if UnixStream::connect(&path).is_ok() {
            let identity = IdentityClient::new(channel(env, &flags.node_socket));
            let call = CallOption::default().timeout(Duration::from_secs(1));
            if let Ok(resp) = identity.probe_opt(&csi::ProbeRequest::new(), call) {
                // An unset `ready` means ready (CSI spec).
                if resp.ready.as_ref().is_none_or(|b| b.value) {
                    return Ok(Ready {
                        took: started.elapsed(),
                        attempts,
                        pid,
                    });
                }
            }
        }
        if started.elapsed() > flags.timeout {
            return Err(format!(
                "{}: no ready Probe within {:?} ({attempts} attempts)",
                path.display(),
                flags.timeout
            ));
        }
        thread::sleep(Duration::from_micros(100));
    }
}

/// Everything measured, for the table and the JSON.
struct Report {
    plugin: String,
    volume: String,
    target_root: PathBuf,
    /// NodeGetCapabilities at the same concurrency: what a call costs with no work in it.
    round_trip: Phase,
    driver: Phase,
    floor: Option<Phase>,
    create_delete: Option<Phase>,
    mounts_left: Vec<PathBuf>,
}

impl Report {
    fn ratio(&self) -> Option<f64> {
        let ours = self.driver.record.summary("cycle")?.p50;
        let floor = self.floor.as_ref()?.record.summary("cycle")?.p50;
        Some(ms(ours) / ms(floor).max(1e-9))
    }

    fn phase_json(phase: &Phase, ops: &[&str]) -> Value {
        let mut o = serde_json::Map::new();
        for op in ops {
            o.insert(
                (*op).to_owned(),
                phase.record.summary(op).map_or(Value::Null, Summary::to_json),
            );
        }
        o.insert(
            "throughput_per_s".into(),
            // The last op is the whole one: "cycle" or "call".
            json!((phase.throughput(ops.last().copied().unwrap_or("cycle")) * 10.0).round() / 10.0),
        );
        o.insert("wall_ms".into(), json!(ms_json(phase.wall)));
        let errors: serde_json::Map<String, Value> = phase
            .record
            .failures
            .iter()
            .map(|(k, f)| (k.clone(), json!({"count": f.count, "example": f.example})))
            .collect();
        o.insert("errors".into(), Value::Object(errors));
        Value::Object(o)
    }

    fn to_json(&self, flags: &Flags) -> Value {
        json!({
            "plugin": self.plugin,
            "volume_id": self.volume,
            "target_root": self.target_root,
            "cycles": flags.cycles,
            "concurrency": flags.concurrency,
            "readonly": flags.readonly,
            "round_trip": Self::phase_json(&self.round_trip, &["call"]),
            "driver": Self::phase_json(&self.driver, &["publish", "unpublish", "cycle"]),
            "floor": self.floor.as_ref().map(|p| Self::phase_json(p, &["publish", "unpublish", "cycle"])),
            "cycle_p50_vs_floor": self.ratio().map(|r| (r * 100.0).round() / 100.0),
            "create_delete": self.create_delete.as_ref().map(|p| Self::phase_json(p, &["create", "delete", "cycle"])),
            "mounts_left": self.mounts_left.len(),
        })
    }

    fn table(&self, flags: &Flags) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "csi-bench: {} cycles, {} workers{}, volume {} on {}, targets below {}",
            flags.cycles,
            flags.concurrency,
            if flags.readonly { ", read-only" } else { "" },
            self.volume,
            self.plugin,
            self.target_root.display()
        );
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "max"
        );
        let mut row = |name: &str, s: Option<Summary>| {
            let _ = match s {
                Some(s) => writeln!(
                    out,
                    "{name:<20} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    s.count,
                    ms(s.p50),
                    ms(s.p90),
                    ms(s.p99),
                    ms(s.max)
                ),
                None => writeln!(out, "{name:<20} {:>8}", 0),
            };
        };
        let d = &self.driver.record;
        row("publish", d.summary("publish"));
        row("unpublish", d.summary("unpublish"));
        row("cycle", d.summary("cycle"));
        row("NodeGetCapabilities", self.round_trip.record.summary("call"));
        if let Some(f) = &self.floor {
            row("floor mkdir+mount", f.record.summary("publish"));
            row("floor umount+rmdir", f.record.summary("unpublish"));
            row("floor cycle", f.record.summary("cycle"));
        }
        if let Some(cd) = &self.create_delete {
            row("CreateVolume", cd.record.summary("create"));
            row("DeleteVolume", cd.record.summary("delete"));
        }
        let _ = write!(out, "throughput: {:.1} cycles/s", self.driver.throughput("cycle"));
        if let Some(f) = &self.floor {
            let _ = write!(out, " (floor {:.1} cycles/s)", f.throughput("cycle"));
        }
        out.push('\n');
        if let Some(r) = self.ratio() {
            let _ = writeln!(out, "cycle p50 vs floor p50: {r:.2}x");
        }
        let phases = [
            ("", Some(&self.round_trip)),
            ("", Some(&self.driver)),
            ("floor ", self.floor.as_ref()),
            ("", self.create_delete.as_ref()),
        ];
        let mut any = false;
        for (prefix, phase) in phases {
            for (key, f) in phase.map(|p| &p.record.failures).into_iter().flatten() {
                any = true;
                let _ = writeln!(out, "error: {prefix}{key} x{}: {}", f.count, f.example);
            }
        }
        if !any {
            out.push_str("errors: none\n");
        }
        let _ = writeln!(
            out,
            "mounts left below {}: {}",
            self.target_root.display(),
            self.mounts_left.len()
        );
        for m in &self.mounts_left {
            let _ = writeln!(out, "  {}", m.display());
        }
        out
    }
}

/// Makes the volume the workers publish: given, created, or a fresh id; staged when the plugin
/// wants staging.
fn prepare_volume(c: &Clients, flags: &Flags, root: &Path, cap: &csi::VolumeCapability) -> Result<Volume, String> {
    let mut vol = Volume {
        id: String::new(),
        context: HashMap::new(),
        staging: None,
        created: false,
    };
    match (&flags.volume_id, &c.controller) {
        (Some(id), _) => vol.id = id.clone(),
        (None, Some(ctl)) => {
            let v = create_volume(ctl, &fresh_name(), cap, c.call()).map_err(|e| format!("CreateVolume: {e}"))?;
            vol.id = v.volume_id;
            vol.context = v.volume_context;
            vol.created = true;
        }
        (None, None) => vol.id = volume::id_for_name(&fresh_name()),
    }
    let caps = c
        .node
        .node_get_capabilities_opt(&csi::NodeGetCapabilitiesRequest::new(), c.call())
        .map_err(|e| format!("NodeGetCapabilities: {e}"))?;
    let stages = caps
        .capabilities
        .iter()
        .any(|cap| cap.rpc().type_.enum_value() == Ok(NodeRpc::STAGE_UNSTAGE_VOLUME));
    if stages {
        let staging = root.join("bench-staging");
        std::fs::create_dir_all(&staging).map_err(|e| format!("create {}: {e}", staging.display()))?;
        let mut req = csi::NodeStageVolumeRequest::new();
        req.volume_id = vol.id.clone();
        req.staging_target_path = staging.to_string_lossy().into_owned();
        req.volume_capability = Some(cap.clone()).into();
        req.volume_context = vol.context.clone();
        c.node
            .node_stage_volume_opt(&req, c.call())
            .map_err(|e| format!("NodeStageVolume: {e}"))?;
        vol.staging = Some(req.staging_target_path);
    }
    Ok(vol)
}

fn release_volume(c: &Clients, vol: &Volume) -> Result<(), String> {
    if let Some(staging) = &vol.staging {
        let mut req = csi::NodeUnstageVolumeRequest::new();
        req.volume_id = vol.id.clone();
        req.staging_target_path = staging.clone();
        c.node
            .node_unstage_volume_opt(&req, c.call())
            .map_err(|e| format!("NodeUnstageVolume: {e}"))?;
        let _ = std::fs::remove_dir(staging);
    }
    if let (true, Some(ctl)) = (vol.created, &c.controller) {
        delete_volume(ctl, &vol.id, c.call()).map_err(|e| format!("DeleteVolume: {e}"))?;
    }
    Ok(())
}

/// NodeGetCapabilities calls, as many and as concurrent as the cycles: the plugin's and gRPC's
/// cost of any call, which publish and unpublish pay on top of their own work.
fn round_trip_phase(c: &Clients, flags: &Flags) -> Phase {
    let req = csi::NodeGetCapabilitiesRequest::new();
    run_phase(flags.concurrency, flags.cycles, |_, r| {
        let started = Instant::now();
        match c.node.node_get_capabilities_opt(&req, c.call()) {
            Ok(_) => r.took("call", started.elapsed()),
            Err(e) => {
                let (code, msg) = describe(&e);
                r.failed("NodeGetCapabilities", &code, msg);
            }
        }
    })
}

fn driver_phase(
    c: &Clients,
    flags: &Flags,
    root: &Path,
    vol: &Volume,
    cap: &csi::VolumeCapability,
) -> Result<Phase, String> {
    let mut requests = Vec::with_capacity(flags.concurrency);
    for i in 0..flags.concurrency {
        let parent = root.join(format!("bench-{i}"));
        std::fs::create_dir_all(&parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        let target = parent.join("mount").to_string_lossy().into_owned();
        let mut publish = csi::NodePublishVolumeRequest::new();
        publish.volume_id = vol.id.clone();
        publish.target_path = target.clone();
        publish.staging_target_path = vol.staging.clone().unwrap_or_default();
        publish.volume_capability = Some(cap.clone()).into();
        publish.readonly = flags.readonly;
        publish.volume_context = vol.context.clone();
        let mut unpublish = csi::NodeUnpublishVolumeRequest::new();
        unpublish.volume_id = vol.id.clone();
        unpublish.target_path = target;
        requests.push((publish, unpublish));
    }
    let phase = run_phase(flags.concurrency, flags.cycles, |i, r| {
        let (publish, unpublish) = &requests[i];
        publish_cycle(c, publish, unpublish, r);
    });
    for i in 0..flags.concurrency {
        // Not empty when a target was left behind: that is reported, not cleaned.
        let _ = std::fs::remove_dir(root.join(format!("bench-{i}")));
    }
    Ok(phase)
}

fn floor_phase(flags: &Flags, root: &Path) -> Result<Phase, String> {
    let source = root.join("bench-floor-source");
    std::fs::create_dir_all(&source).map_err(|e| format!("create {}: {e}", source.display()))?;
    let mut targets = Vec::with_capacity(flags.concurrency);
    for i in 0..flags.concurrency {
        let parent = root.join(format!("bench-floor-{i}"));
        std::fs::create_dir_all(&parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        targets.push(parent.join("mount"));
    }
    let phase = run_phase(flags.concurrency, flags.cycles, |i, r| {
        floor_cycle(&source, &targets[i], flags.readonly, r)
    });
    for t in &targets {
        if let Some(parent) = t.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    let _ = std::fs::remove_dir(&source);
    Ok(phase)
}

fn run(flags: &Flags) -> Result<ExitCode, String> {
    let env = Arc::new(
        grpcio::EnvBuilder::new()
            .cq_count(flags.client_threads.max(1))
            .name_prefix("bench-cq")
            .build(),
    );
    if flags.probe {
        let ready = wait_ready(&env, flags)?;
        if flags.json {
            let doc = json!({"ready_ms": ms_json(ready.took), "attempts": ready.attempts, "pid": ready.pid});
            println!("{doc}");
        } else {
            print!(
                "ready after {:.1} ms ({} Probe attempts)",
                ms(ready.took),
                ready.attempts
            );
            match ready.pid {
                Some(pid) => println!("; plugin pid {pid}"),
                None => println!(),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if flags.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let root = flags
        .target_root
        .as_ref()
        .expect("clap requires --target-root without --probe");
    std::fs::create_dir_all(root).map_err(|e| format!("create {}: {e}", root.display()))?;
    // As the kernel names it, so mountinfo comparisons hold.
    let root = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;

    let call = CallOption::default().timeout(flags.timeout);
    let clients = Clients {
        node: NodeClient::new(channel(&env, &flags.node_socket)),
        controller: flags
            .controller_socket
            .as_ref()
            .map(|s| ControllerClient::new(channel(&env, s))),
        call,
    };
    // Also connects the channel, so the first timed call does not pay for that.
    let info = IdentityClient::new(channel(&env, &flags.node_socket))
        .get_plugin_info_opt(&csi::GetPluginInfoRequest::new(), clients.call())
        .map_err(|e| format!("GetPluginInfo on {}: {e}", flags.node_socket))?;
    let plugin = format!("{} {}", info.name, info.vendor_version);

    let cap = capability(flags.access_mode);
    let vol = prepare_volume(&clients, flags, &root, &cap)?;
    let round_trip = round_trip_phase(&clients, flags);
    let driver = driver_phase(&clients, flags, &root, &vol, &cap)?;
    let mounts_left = mounts_below(&root)?;
    let floor = if flags.no_floor {
        None
    } else {
        Some(floor_phase(flags, &root)?)
    };
    let create_delete = create_delete_phase(&clients, flags, &cap);
    let released = release_volume(&clients, &vol);

    let report = Report {
        plugin,
        volume: vol.id.clone(),
        target_root: root,
        round_trip,
        driver,
        floor,
        create_delete,
        mounts_left,
    };
    if flags.json {
        println!("{}", report.to_json(flags));
    } else {
        print!("{}", report.table(flags));
    }
    released?;
    let failed = report.round_trip.record.failure_count()
        + report.driver.record.failure_count()
        + report.create_delete.as_ref().map_or(0, |p| p.record.failure_count())
        + report.floor.as_ref().map_or(0, |p| p.record.failure_count());
    if !report.mounts_left.is_empty() {
        eprintln!("csi-bench: {} mounts left behind", report.mounts_left.len());
        return Ok(ExitCode::FAILURE);
    }
    if flags.fail_on_error && failed > 0 {
        eprintln!("csi-bench: {failed} calls failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let flags = Flags::from_matches(&command().get_matches());
    if !flags.probe && !nix::unistd::geteuid().is_root() {
        eprintln!("csi-bench: must run as root (the floor bind-mounts, and so does the plugin)");
        return ExitCode::from(2);
    }
    match run(&flags) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("csi-bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_consistent() {
        command().debug_assert();
        let m = command()
            .try_get_matches_from([
                "csi-bench",
                "--node-socket=/s",
                "--probe",
                "--",
                "plugin",
                "--mode=node",
            ])
            .unwrap();
        let f = Flags::from_matches(&m);
        assert_eq!(f.exec, ["plugin", "--mode=node"]);
        assert_eq!(f.access_mode, Mode::MULTI_NODE_MULTI_WRITER);
        assert!(
            command()
                .try_get_matches_from(["csi-bench", "--node-socket=/s"])
                .is_err(),
            "--target-root or --probe"
        );
    }

    fn millis(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let hundred: Vec<u64> = (1..=100).rev().collect();
        let s = summarize(&millis(&hundred)).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));

        let one = summarize(&millis(&[7])).unwrap();
        assert_eq!(
            (one.p50, one.p99, one.max),
            (
                Duration::from_millis(7),
                Duration::from_millis(7),
                Duration::from_millis(7)
            )
        );

        // Three samples: p50 is the second, p90 and p99 the third.
        let three = summarize(&millis(&[30, 10, 20])).unwrap();
        assert_eq!(three.p50, Duration::from_millis(20));
        assert_eq!(three.p90, Duration::from_millis(30));

        // 1000 samples: p99 is the 990th, not the max.
        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(summarize(&millis(&thousand)).unwrap().p99, Duration::from_millis(990));

        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn records_merge_latencies_and_failures() {
        let mut a = Record::default();
        a.took("publish", Duration::from_millis(1));
        a.failed("NodePublishVolume", "ABORTED", "first".into());
        let mut b = Record::default();
        b.took("publish", Duration::from_millis(3));
        b.took("cycle", Duration::from_millis(4));
        b.failed("NodePublishVolume", "ABORTED", "second".into());
        b.failed("NodeUnpublishVolume", "INTERNAL", "x".into());
        a.merge(b);
        assert_eq!(a.summary("publish").unwrap().count, 2);
        assert_eq!(a.summary("cycle").unwrap().max, Duration::from_millis(4));
        assert_eq!(a.summary("unpublish"), None);
        assert_eq!(
            a.failures["NodePublishVolume ABORTED"],
            Failure {
                count: 2,
                example: "first".into()
            }
        );
        assert_eq!(a.failure_count(), 3);
    }

    #[test]
    fn throughput_counts_completed_cycles() {
        let mut record = Record::default();
        for _ in 0..50 {
            record.took("cycle", Duration::from_millis(1));
        }
        record.took("publish", Duration::from_millis(1));
        let phase = Phase {
            record,
            wall: Duration::from_millis(500),
        };
        assert!((phase.throughput("cycle") - 100.0).abs() < 1e-9);
        assert_eq!(phase.throughput("call"), 0.0);
    }

    #[test]
    fn phases_run_every_cycle_once_across_workers() {
        let phase = run_phase(4, 103, |i, r| {
            assert!(i < 4);
            r.took("cycle", Duration::from_micros(1));
        });
        assert_eq!(phase.record.summary("cycle").unwrap().count, 103);
    }

    #[test]
    fn status_codes_are_named() {
        let e = grpcio::Error::RpcFailure(grpcio::RpcStatus::with_message(
            grpcio::RpcStatusCode::ABORTED,
            "busy".into(),
        ));
        assert_eq!(describe(&e), ("ABORTED".to_owned(), "busy".to_owned()));
    }

    #[test]
    fn json_summary_rounds_to_microseconds() {
        let s = summarize(&[Duration::from_nanos(1_234_567)]).unwrap().to_json();
        assert_eq!(s["p50_ms"], json!(1.235));
        assert_eq!(s["count"], json!(1));
    }
}
