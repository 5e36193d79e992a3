//! Volume usage, measured once for every call that wants it. kubelet asks every minute for each
//! pod's volume, and several pods of a node may share one volume; a walk of a large copy takes
//! seconds and a worker. A call that comes while a walk of its volume runs gets the last
//! measurement, or waits for that walk's result if there is none, instead of walking again
//! beside it; and only so many walks run at once (half the workers), so that walks of large
//! copies leave workers to publishes. A first call for a copy being walked still waits for the
//! walk: there is nothing to answer with yet.

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

pub struct UsageCache {
    /// By volume id: the last measurement and when it ended.
    measured: Mutex<HashMap<String, (Instant, Usage)>>,
    /// By volume id: the walk under way.
    walking: Mutex<HashMap<String, Arc<Walk>>>,
    /// Walks at once, at most; a call beyond gets the last measurement, or `EAGAIN`.
    max_walks: usize,
}

impl Default for UsageCache {
    fn default() -> UsageCache {
        UsageCache::new(usize::MAX)
    }
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
    pub fn new(max_walks: usize) -> UsageCache {
        UsageCache {
            measured: Mutex::default(),
            walking: Mutex::default(),
            max_walks: max_walks.max(1),
        }
    }

    /// The volume's usage: measured within `ttl`; else, while a walk of it runs or every walk
    /// slot is taken, the last measurement however old; else the walk's result, or a new walk
    /// with `measure` (`EAGAIN` when no slot is free).
    pub fn get(&self, id: &str, ttl: Duration, measure: impl FnOnce() -> Outcome) -> Outcome {
        let last = lock(&self.measured).get(id).copied();
        if let Some((at, u)) = last {
            if at.elapsed() < ttl {
                return Ok(u);
            }
        }
        let (walk, ours) = {
            let mut walking = lock(&self.walking);
            let last = last.map(|(_, u)| u);
            match (walking.get(id), last) {
                (Some(_), Some(u)) => return Ok(u),
                (Some(walk), None) => (walk.clone(), false),
                (None, _) if walking.len() >= self.max_walks => return last.ok_or(Errno::EAGAIN),
                (None, _) => {
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

    /// A walk of `id` started on a thread of its own and held until `release` is waited on;
    /// it then measures `usage`.
    fn walk_under_way(
        cache: &Arc<UsageCache>,
        id: &'static str,
        ttl: Duration,
        usage: Usage,
    ) -> (std::thread::JoinHandle<Outcome>, Arc<Barrier>) {
        let started = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let walk = {
            let (cache, started, release) = (cache.clone(), started.clone(), release.clone());
            std::thread::spawn(move || {
                cache.get(id, ttl, || {
                    started.wait();
                    release.wait();
                    Ok(usage)
                })
            })
        };
        started.wait();
        (walk, release)
    }

    /// kubelet asks again while a long walk of the volume runs: the last measurement, however
    /// old, answers at once, instead of a second worker waiting out the walk.
    #[test]
    fn a_call_during_a_walk_gets_the_last_measurement_at_once() {
        let cache = Arc::new(UsageCache::default());
        let ttl = Duration::from_nanos(1);
        let old = Usage { bytes: 1, inodes: 1 };
        assert_eq!(cache.get("v", ttl, || Ok(old)), Ok(old));
        let (walk, release) = walk_under_way(&cache, "v", ttl, Usage { bytes: 2, inodes: 2 });
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let cache = cache.clone();
            std::thread::spawn(move || tx.send(cache.get("v", ttl, || Err(Errno::EIO))));
        }
        let during = rx.recv_timeout(Duration::from_secs(5));
        release.wait();
        assert_eq!(during, Ok(Ok(old)), "waited for the walk under way");
        assert_eq!(walk.join().unwrap(), Ok(Usage { bytes: 2, inodes: 2 }));
    }

    /// Walks of large copies on every worker would leave publishes waiting: past the cap, a
    /// call gets the last measurement of its volume, or `EAGAIN` (retry) when there is none.
    #[test]
    fn walks_past_the_cap_answer_from_the_last_measurement() {
        let cache = Arc::new(UsageCache::new(1));
        let ttl = Duration::from_nanos(1);
        let old = Usage { bytes: 1, inodes: 1 };
        assert_eq!(cache.get("b", ttl, || Ok(old)), Ok(old));
        let (walk, release) = walk_under_way(&cache, "a", ttl, Usage::default());
        assert_eq!(cache.get("b", ttl, || panic!("a second walk")), Ok(old));
        assert_eq!(cache.get("c", ttl, || panic!("a second walk")), Err(Errno::EAGAIN));
        release.wait();
        walk.join().unwrap().unwrap();
        assert_eq!(cache.get("c", ttl, || Ok(old)), Ok(old), "a slot is free again");
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
