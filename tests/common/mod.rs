//! Harness for the end-to-end tests: a temporary tree with a fake kubelet dir and base dir, the
//! real binary started on a socket inside it, grpcio clients dialling that socket, and checks on
//! the real mount table.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{CallOption, ChannelBuilder, Environment, RpcStatusCode};
use node_local_cache::mounts;
use node_local_cache::proto::csi;
use node_local_cache::proto::csi::volume_capability::access_mode::Mode;
use node_local_cache::proto::grpc::{ControllerClient, IdentityClient, NodeClient};

pub const BIN: &str = env!("CARGO_BIN_EXE_node-local-cache");

// The clients here run with the core configuration csi-client ships with.
node_local_cache::grpc_core_configuration!(client);

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests bind-mount and must run as root"
    );
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// `/tmp/nlc-e2e-<pid>-<n>-<tag>/` with `kubelet/pods/` and `base/`; unmounts anything left under
/// it and removes it on drop (after the test has made its own assertions).
pub struct Tree {
    pub root: PathBuf,
    /// The loop device under a base dir on a filesystem image, detached on drop.
    loop_device: Option<String>,
}

impl Tree {
    pub fn new(tag: &str) -> Tree {
        require_root();
        let root = std::env::temp_dir().join(format!(
            "nlc-e2e-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("kubelet/pods")).unwrap();
        fs::create_dir_all(root.join("base")).unwrap();
        // Canonical from the start, so paths match what mountinfo reports.
        let root = fs::canonicalize(&root).unwrap();
        Tree {
            root,
            loop_device: None,
        }
    }

    /// As `new`, with the base dir on a tmpfs mounted with `options` (`size=…`, `mode=…`).
    pub fn with_tmpfs_base(tag: &str, options: Option<&str>) -> Tree {
        let tree = Tree::new(tag);
        nix::mount::mount(
            Some("tmpfs"),
            &tree.base(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            options,
        )
        .unwrap();
        tree
    }

    /// As `new`, with the base dir on a fresh btrfs of 256 MiB: an image file in the tree on a
    /// loop device. The tree's drop unmounts it and detaches the device, whatever the test did.
    pub fn with_btrfs_base(tag: &str) -> Tree {
        let mut tree = Tree::new(tag);
        let image = tree.root.join("base.img");
        fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();
        run("mkfs.btrfs", &["-q", image.to_str().unwrap()]);
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        tree.loop_device = Some(device.trim().to_owned());
        nix::mount::mount(
            Some(device.trim()),
            &tree.base(),
            Some("btrfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        tree
    }

    pub fn kubelet(&self) -> PathBuf {
        self.root.join("kubelet")
    }

    pub fn base(&self) -> PathBuf {
        self.root.join("base")
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.sock"))
    }

    /// A pod's volume dir as kubelet makes it: the parent exists, the target does not.
    pub fn target(&self, pod: &str) -> PathBuf {
        let parent = self
            .kubelet()
            .join("pods")
            .join(pod)
            .join("volumes/kubernetes.io~csi/pv");
        fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    /// Mounts whose mount point lies in this tree.
    pub fn mounts(&self) -> Vec<mounts::MountEntry> {
        mounts::read_table()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&self.root))
            .collect()
    }

    pub fn assert_no_mounts(&self) {
        let left = self.mounts();
        assert!(
            left.is_empty(),
            "mounts left behind: {:#?}",
            left.iter().map(|m| &m.mount_point).collect::<Vec<_>>()
        );
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // Deepest first; lazy so a busy mount cannot keep the next test's tree dirty.
        let mut left = self.mounts();
        left.sort_by_key(|m| std::cmp::Reverse(m.mount_point.as_os_str().len()));
        for m in left {
            let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
        // Still busy (a handle left open): the kernel detaches it when the last one closes.
        if let Some(device) = &self.loop_device {
            let _ = Command::new("losetup").args(["--detach", device]).status();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Runs a tool to completion and returns what it printed; panics with its errors if it fails.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The real binary, serving on a socket in a `Tree`.
pub struct Driver {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    env: Arc<Environment>,
}

impl Driver {
    pub fn node(tree: &Tree, name: &str, extra: &[&str]) -> Driver {
        Driver::node_with_env(tree, name, extra, &[])
    }

    /// As `node`, with these variables added to the driver's environment.
    pub fn node_with_env(tree: &Tree, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Driver {
        let base = tree.base();
        let kubelet = tree.kubelet();
        let mut args = vec![
            "--mode=node".to_owned(),
            format!("--node-name={name}"),
            format!("--base-dir={}", base.display()),
            format!("--kubelet-dir={}", kubelet.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Driver::start_with_env(tree, name, &args, env)
    }

    pub fn controller(tree: &Tree, extra: &[&str]) -> Driver {
        let mut args = vec!["--mode=controller".to_owned()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Driver::start(tree, "controller", &args)
    }

    pub fn start(tree: &Tree, name: &str, args: &[String]) -> Driver {
        Driver::start_with_env(tree, name, args, &[])
    }

    /// As `start`, with these variables added to the driver's environment.
    fn start_with_env(tree: &Tree, name: &str, args: &[String], env: &[(&str, &str)]) -> Driver {
        let socket = tree.socket(name);
        let log = tree.root.join(format!("{name}.log"));
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied())
            .args(args)
            .arg(format!("--csi-socket=unix://{}", socket.display()))
            .arg("--log-level=debug");
        if !args.iter().any(|a| a.starts_with("--metrics-addr")) {
            cmd.arg("--metrics-addr=");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
        let d = Driver {
            child: Some(child),
            socket,
            log,
            env,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists()
                && self
                    .identity()
                    .get_plugin_info(&csi::GetPluginInfoRequest::new())
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "driver did not come up; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The metrics address the driver logged (started with `--metrics-addr=127.0.0.1:0`).
    pub fn metrics_addr(&self) -> String {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("metrics on http://"))
            .expect("metrics endpoint logged");
        let start = line.find("http://").unwrap() + "http://".len();
        line[start..].trim_end_matches("/metrics").to_owned()
    }

    /// Waits until the driver has logged `needle` `count` times.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log_text().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn channel(&self) -> grpcio::Channel {
        ChannelBuilder::new(self.env.clone()).connect(&format!("unix:{}", self.socket.display()))
    }

    pub fn identity(&self) -> IdentityClient {
        IdentityClient::new(self.channel())
    }

    pub fn controller_client(&self) -> ControllerClient {
        ControllerClient::new(self.channel())
    }

    pub fn node_client(&self) -> NodeClient {
        NodeClient::new(self.channel())
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        self.wait()
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("driver did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn opt() -> CallOption {
    CallOption::default().timeout(Duration::from_secs(30))
}

/// The status code of a failed call (panics on success).
pub fn code<T: std::fmt::Debug>(r: grpcio::Result<T>) -> (RpcStatusCode, String) {
    match r {
        Err(grpcio::Error::RpcFailure(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC failure, got {other:?}"),
    }
}

pub fn mount_cap(mode: Mode, flags: &[&str]) -> csi::VolumeCapability {
    let mut m = csi::volume_capability::MountVolume::new();
    m.mount_flags = flags.iter().map(|s| s.to_string()).collect();
    let mut c = csi::VolumeCapability::new();
    c.set_mount(m);
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = mode.into();
    c.access_mode = Some(am).into();
    c
}

pub fn rw_cap() -> csi::VolumeCapability {
    mount_cap(Mode::MULTI_NODE_MULTI_WRITER, &[])
}

pub fn publish_req(volume: &str, target: &Path, readonly: bool) -> csi::NodePublishVolumeRequest {
    let mut r = csi::NodePublishVolumeRequest::new();
    r.volume_id = volume.to_owned();
    r.target_path = target.to_str().unwrap().to_owned();
    r.volume_capability = Some(rw_cap()).into();
    r.readonly = readonly;
    r
}

pub fn unpublish_req(volume: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    let mut r = csi::NodeUnpublishVolumeRequest::new();
    r.volume_id = volume.to_owned();
    r.target_path = target.to_str().unwrap().to_owned();
    r
}

pub fn stats_req(volume: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    let mut r = csi::NodeGetVolumeStatsRequest::new();
    r.volume_id = volume.to_owned();
    r.volume_path = path.to_str().unwrap().to_owned();
    r
}

pub fn create_req(name: &str, required: i64) -> csi::CreateVolumeRequest {
    let mut r = csi::CreateVolumeRequest::new();
    r.name = name.to_owned();
    r.volume_capabilities.push(rw_cap());
    if required > 0 {
        let mut range = csi::CapacityRange::new();
        range.required_bytes = required;
        r.capacity_range = Some(range).into();
    }
    r
}

pub fn volume_id(name: &str) -> String {
    node_local_cache::volume::id_for_name(name)
}

/// Whether `path` is currently the mount point of a bind of `base/<volume>`.
pub fn mounted_at(path: &Path) -> usize {
    mounts::read_table()
        .unwrap()
        .iter()
        .filter(|m| m.mount_point == path)
        .count()
}

pub fn read_all(path: &Path) -> String {
    let mut s = String::new();
    fs::File::open(path).unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Peak resident memory (`VmHWM`) of a process, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// Resident memory (`VmRSS`) of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// Sets a process's peak resident memory back to what it holds now, so the next peak is one
/// call's own.
pub fn reset_peak_rss(pid: u32) {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

fn status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The longest name a directory entry may have (NAME_MAX) made of `c`, unique by `i`.
pub fn long_name(c: char, i: usize) -> String {
    let tail = format!("-{i}");
    let mut name: String = std::iter::repeat_n(c, 255 - tail.len()).collect();
    name.push_str(&tail);
    name
}
