//! Which operations are under way, keyed by volume id and target path. Two pods using one volume
//! on one node hold different keys and never wait for each other; a duplicate of a call still in
//! flight is refused (ABORTED) rather than queued, as the CSI spec asks. Whole-volume work
//! (deleting the node's data) excludes every target operation on that volume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};

#[derive(Default)]
struct VolumeOps {
    targets: Vec<PathBuf>,
    whole_volume: bool,
}

#[derive(Default, Clone)]
pub struct InFlight {
    ops: Arc<Mutex<HashMap<String, VolumeOps>>>,
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
}

impl InFlight {
    fn map(&self) -> MutexGuard<'_, HashMap<String, VolumeOps>> {
        // A panic elsewhere cannot leave the map half-updated: every change is one insert or remove.
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock_target(&self, volume: &str, target: &Path) -> Result<TargetGuard> {
        let mut map = self.map();
        let ops = map.entry(volume.to_owned()).or_default();
        if ops.whole_volume || ops.targets.iter().any(|t| t == target) {
            return Err(Error::InFlight {
                volume: volume.to_owned(),
                path: target.to_owned(),
            });
        }
        ops.targets.push(target.to_owned());
        Ok(TargetGuard {
            owner: self.clone(),
            volume: volume.to_owned(),
            target: target.to_owned(),
        })
    }

    /// Whole-volume work; `None` while any other operation on the volume runs. `except` lets the
    /// holder of one target lock (an unpublish that deletes the data after it) take it too.
    pub fn lock_volume(&self, volume: &str, except: Option<&TargetGuard>) -> Option<VolumeGuard> {
        let mut map = self.map();
        let ops = map.entry(volume.to_owned()).or_default();
        let others = ops
            .targets
            .iter()
            .filter(|t| except.is_none_or(|g| g.volume != volume || **t != g.target))
            .count();
        if ops.whole_volume || others > 0 {
            return None;
        }
        ops.whole_volume = true;
        Some(VolumeGuard {
            owner: self.clone(),
            volume: volume.to_owned(),
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
                Some(t) => ops.targets.retain(|x| x != t),
                None => ops.whole_volume = false,
            }
            if ops.targets.is_empty() && !ops.whole_volume {
                map.remove(volume);
            }
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
}
