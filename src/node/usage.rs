//! Volume usage, measured once for every call that wants it. kubelet asks every minute for each
//! pod's volume, and several pods of a node may share one volume; a walk of a large copy takes
//! seconds and a worker. A call that comes while a walk of its volume runs waits for that walk's
//! result instead of walking again beside it.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::safedir::Usage;

type Outcome = std::result::Result<Usage, Errno>;

/// A walk under way, and its outcome once it ends.
#[derive(Default)]
struct Walk {
    outcome: Mutex<Option<Outcome>>,
    ended: Condvar,
}

#[derive(Default)]
pub struct UsageCache {
    /// By volume id: the last measurement and when it ended.
    measured: Mutex<HashMap<String, (Instant, Usage)>>,
    /// By volume id: the walk under way.
    walking: Mutex<HashMap<String, Arc<Walk>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends a walk for those waiting on it, however `measure` returned: a panic in it must not leave
/// them waiting for ever.
struct Ending<'a> {
    cache: &'a UsageCache,
    id: &'a str,
    walk: Arc<Walk>,
    outcome: Outcome,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        lock(&self.cache.walking).remove(self.id);
        *lock(&self.walk.outcome) = Some(self.outcome);
        self.walk.ended.notify_all();
    }
}

impl UsageCache {
    /// The volume's usage: measured within `ttl`, else from the walk under way, else from a new
    /// walk with `measure`.
    pub fn get(&self, id: &str, ttl: Duration, measure: impl FnOnce() -> Outcome) -> Outcome {
        if let Some((at, u)) = lock(&self.measured).get(id) {
            if at.elapsed() < ttl {
                return Ok(*u);
            }
        }
        let (walk, ours) = {
            let mut walking = lock(&self.walking);
            match walking.get(id) {
                Some(walk) => (walk.clone(), false),
                None => {
                    let walk = Arc::new(Walk::default());
                    walking.insert(id.to_owned(), walk.clone());
                    (walk, true)
                }
            }
        };
        if !ours {
            let mut outcome = lock(&walk.outcome);
            loop {
                if let Some(outcome) = *outcome {
                    return outcome;
                }
                outcome = walk.ended.wait(outcome).unwrap_or_else(|p| p.into_inner());
            }
        }
        let mut ending = Ending {
            cache: self,
            id,
            walk,
            // What the waiters get if `measure` panics.
            outcome: Err(Errno::EIO),
        };
        ending.outcome = measure();
        if let (Ok(u), false) = (ending.outcome, ttl.is_zero()) {
            lock(&self.measured).insert(id.to_owned(), (Instant::now(), u));
        }
        ending.outcome
    }

    /// Drops a volume's measurement (its copy was deleted or trimmed).
    pub fn forget(&self, id: &str) {
        lock(&self.measured).remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn calls_during_a_walk_share_it_and_a_panic_ends_it() {
        let cache = Arc::new(UsageCache::default());
        let walks = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let first = {
            let (cache, walks, started, release) = (cache.clone(), walks.clone(), started.clone(), release.clone());
            std::thread::spawn(move || {
                cache.get("v", Duration::ZERO, || {
                    walks.fetch_add(1, Ordering::SeqCst);
                    started.wait();
                    release.wait();
                    Ok(Usage { bytes: 7, inodes: 3 })
                })
            })
        };
        started.wait();
        let second = {
            let (cache, walks) = (cache.clone(), walks.clone());
            std::thread::spawn(move || {
                cache.get("v", Duration::ZERO, || {
                    walks.fetch_add(1, Ordering::SeqCst);
                    Ok(Usage::default())
                })
            })
        };
        // The second call is waiting on the first walk before it is let go.
        while lock(&cache.walking).get("v").is_some_and(|w| Arc::strong_count(w) < 3) {
            std::thread::yield_now();
        }
        release.wait();
        let want = Ok(Usage { bytes: 7, inodes: 3 });
        assert_eq!(first.join().unwrap(), want);
        assert_eq!(second.join().unwrap(), want);
        assert_eq!(walks.load(Ordering::SeqCst), 1);

        // With no walk under way, a call walks afresh (ttl zero keeps nothing).
        assert_eq!(
            cache.get("v", Duration::ZERO, || Ok(Usage::default())),
            Ok(Usage::default())
        );
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cache.get("v", Duration::ZERO, || panic!("walk failed"))
        }));
        assert!(panicked.is_err());
        assert!(lock(&cache.walking).is_empty(), "a panicked walk is over");
    }

    #[test]
    fn a_measurement_is_reused_within_its_ttl_and_forgotten_on_request() {
        let cache = UsageCache::default();
        let ttl = Duration::from_secs(60);
        let u = Usage { bytes: 1, inodes: 1 };
        assert_eq!(cache.get("v", ttl, || Ok(u)), Ok(u));
        assert_eq!(cache.get("v", ttl, || Err(Errno::EIO)), Ok(u));
        cache.forget("v");
        assert_eq!(cache.get("v", ttl, || Err(Errno::EIO)), Err(Errno::EIO));
    }
}
