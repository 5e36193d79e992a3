//! Which operations are under way, keyed by volume id and target path. Two pods using one volume
//! on one node hold different keys and never wait for each other; a duplicate of a call still in
//! flight is refused (ABORTED) rather than queued, as the CSI spec asks. Whole-volume work
//! (deleting the node's data) excludes every target operation on that volume; background work
//! that can stop half-way (trimming a cache) holds a yielding lock, which a target operation asks
//! to give way and waits for, briefly, instead of being refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a publish or unpublish waits for yielding work on its volume to stop.
pub const YIELD_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct VolumeOps {
    targets: Vec<PathBuf>,
    whole_volume: bool,
    /// Set when the whole-volume holder yields: raised to ask it to stop.
    stop: Option<Arc<AtomicBool>>,
}

#[derive(Default, Clone)]
pub struct InFlight {
    ops: Arc<Mutex<HashMap<String, VolumeOps>>>,
    released: Arc<Condvar>,
}

/// Held while an operation on (volume, target) runs; released on drop.
pub struct TargetGuard {
    owner: InFlight,
    volume: String,
    target: PathBuf,
}

/// Held while whole-volume work runs; released on drop.
pub struct VolumeGuard {
    owner: InFlight,
    volume: String,
    stop: Option<Arc<AtomicBool>>,
}

impl VolumeGuard {
    /// Whether a target operation on the volume is waiting for this (yielding) work to stop.
    pub fn yield_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

impl InFlight {
    fn map(&self) -> MutexGuard<'_, HashMap<String, VolumeOps>> {
        // A panic elsewhere cannot leave the map half-updated: every change is one insert or remove.
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A target operation. Yielding whole-volume work is asked to stop and waited for up to
    /// `YIELD_WAIT`; anything else in the way refuses the call at once. Targets are compared as
    /// bytes: callers pass what `volume::check_target` returned, which has one spelling per path.
    pub fn lock_target(&self, volume: &str, target: &Path) -> Result<TargetGuard> {
        let busy = || Error::InFlight {
            volume: volume.to_owned(),
            path: target.to_owned(),
        };
        let mut deadline = None;
        let mut map = self.map();
        while let Some(ops) = map.get(volume) {
            if ops.targets.iter().any(|t| t.as_os_str() == target.as_os_str()) {
                return Err(busy());
            }
            if !ops.whole_volume {
                break;
            }
            let Some(stop) = &ops.stop else { return Err(busy()) };
            stop.store(true, Ordering::Relaxed);
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + YIELD_WAIT);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(busy());
            }
            map = match self.released.wait_timeout(map, left) {
                Ok((m, _)) => m,
                Err(p) => p.into_inner().0,
            };
        }
        match map.get_mut(volume) {
            Some(ops) => ops.targets.push(target.to_owned()),
            None => {
                let ops = VolumeOps {
                    targets: vec![target.to_owned()],
                    ..VolumeOps::default()
                };
                map.insert(volume.to_owned(), ops);
            }
        }
        Ok(TargetGuard {
            owner: self.clone(),
            volume: volume.to_owned(),
            target: target.to_owned(),
        })
    }

    /// Whole-volume work; `None` while any other operation on the volume runs. `except` lets the
    /// holder of one target lock (an unpublish that deletes the data after it) take it too.
    pub fn lock_volume(&self, volume: &str, except: Option<&TargetGuard>) -> Option<VolumeGuard> {
        self.take_volume(volume, except, false)
    }

    /// Whole-volume work that stops when a target operation on the volume asks it to (see
    /// `VolumeGuard::yield_requested`); `None` while any other operation on the volume runs.
    pub fn lock_volume_yielding(&self, volume: &str) -> Option<VolumeGuard> {
        self.take_volume(volume, None, true)
    }

    /// A moment of whole-volume work for the holder of one target lock (a failed publish taking
    /// back the dir it made). It gives way as yielding work does: a target operation that comes
    /// meanwhile waits for it instead of being refused.
    pub fn lock_volume_briefly(&self, volume: &str, holding: &TargetGuard) -> Option<VolumeGuard> {
        self.take_volume(volume, Some(holding), true)
    }

    fn take_volume(&self, volume: &str, except: Option<&TargetGuard>, yielding: bool) -> Option<VolumeGuard> {
        let mut map = self.map();
        let ops = map.entry(volume.to_owned()).or_default();
        let others = ops
            .targets
            .iter()
            .filter(|t| except.is_none_or(|g| g.volume != volume || t.as_os_str() != g.target.as_os_str()))
            .count();
        if ops.whole_volume || others > 0 {
            return None;
        }
        ops.whole_volume = true;
        ops.stop = yielding.then(Arc::default);
        Some(VolumeGuard {
            owner: self.clone(),
            volume: volume.to_owned(),
            stop: ops.stop.clone(),
        })
    }

    /// Operations under way (for shutdown and tests).
    pub fn len(&self) -> usize {
        self.map()
            .values()
            .map(|o| o.targets.len() + usize::from(o.whole_volume))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, volume: &str, target: Option<&Path>) {
        let mut map = self.map();
        if let Some(ops) = map.get_mut(volume) {
            match target {
                Some(t) => ops.targets.retain(|x| x.as_os_str() != t.as_os_str()),
                None => {
                    ops.whole_volume = false;
                    ops.stop = None;
                }
            }
            if ops.targets.is_empty() && !ops.whole_volume {
                map.remove(volume);
            }
        }
        // Only the end of whole-volume work lets a waiting target operation on (see
        // `lock_target`); a notify is a syscall even with nobody waiting.
        if target.is_none() {
            drop(map);
            self.released.notify_all();
        }
    }
}

impl Drop for TargetGuard {
    fn drop(&mut self) {
        self.owner.release(&self.volume, Some(&self.target));
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.owner.release(&self.volume, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpcio::RpcStatusCode;

    #[test]
    fn duplicate_target_is_aborted_other_targets_proceed() {
        let f = InFlight::default();
        let a = f.lock_target("v", Path::new("/t/1")).unwrap();
        let err = f.lock_target("v", Path::new("/t/1")).err().unwrap();
        assert_eq!(err.code(), RpcStatusCode::ABORTED);
        assert!(err.to_string().contains("/t/1") && err.to_string().contains('v'));
        let _b = f.lock_target("v", Path::new("/t/2")).unwrap();
        let _c = f.lock_target("w", Path::new("/t/1")).unwrap();
        drop(a);
        let _a2 = f.lock_target("v", Path::new("/t/1")).unwrap();
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn whole_volume_excludes_targets_both_ways() {
        let f = InFlight::default();
        let t = f.lock_target("v", Path::new("/t/1")).unwrap();
        assert!(f.lock_volume("v", None).is_none());
        let g = f.lock_volume("v", Some(&t)).unwrap();
        assert!(f.lock_target("v", Path::new("/t/2")).is_err());
        assert!(f.lock_volume("v", Some(&t)).is_none());
        drop(g);
        drop(t);
        assert!(f.is_empty());
        let _g = f.lock_volume("v", None).unwrap();
        assert!(f.lock_target("v", Path::new("/t/3")).is_err());
    }

    #[test]
    fn a_target_call_asks_yielding_work_to_stop_and_gets_the_volume() {
        let f = InFlight::default();
        let work = f.lock_volume_yielding("v").unwrap();
        assert!(!work.yield_requested());
        assert!(f.lock_volume("v", None).is_none());
        let publisher = {
            let f = f.clone();
            std::thread::spawn(move || f.lock_target("v", Path::new("/t/1")).map(drop))
        };
        while !work.yield_requested() {
            std::thread::yield_now();
        }
        drop(work);
        publisher.join().unwrap().unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn yielding_work_that_never_stops_gets_the_target_call_aborted() {
        let f = InFlight::default();
        let work = f.lock_volume_yielding("v").unwrap();
        let err = f.lock_target("v", Path::new("/t/1")).err().unwrap();
        assert_eq!(err.code(), RpcStatusCode::ABORTED);
        assert!(work.yield_requested());
        // Whole-volume work that does not yield (deleting the data) is not waited for.
        drop(work);
        let _delete = f.lock_volume("v", None).unwrap();
        assert!(f.lock_target("v", Path::new("/t/1")).is_err());
    }
}
