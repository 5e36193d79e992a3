//! The PV of each of this driver's volumes, as the last scan of the PVs found them.
//!
//! DeleteVolume needs the volume's PV (to hold it with the finalizer). csi-provisioner gives the
//! PV's name to CreateVolume only, so a controller that restarted since the volume was created
//! has to look for it among all PVs: every upgrade or reschedule of the controller made each
//! later deletion of an older volume a scan of its own (~80 MB read from etcd at 50,000 PVs, 10 s).
//! Here one scan keeps the handle and name of every PV of the driver: deletions that were waiting
//! while it ran share it, and later ones find their PV in what it kept.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::kube::{KubeError, KubeResult};
use crate::time::Deadline;

/// How often a caller waiting for another caller's scan checks its own deadline.
const DEADLINE_CHECK: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct PvNames {
    state: Mutex<Scans>,
    scanned: Condvar,
}

/// What the last whole scan found, and which scans have started and finished. Scans are
/// numbered; a caller needs one that started after it asked, since a scan under way may have
/// passed its PV's place already.
#[derive(Default)]
struct Scans {
    by_handle: HashMap<String, String>,
    started: u64,
    finished: u64,
    running: bool,
}

impl PvNames {
    /// The PV name the last scan saw for `handle`.
    pub fn known(&self, handle: &str) -> Option<String> {
        self.lock().by_handle.get(handle).cloned()
    }

    /// Forgets `handle`: its volume is deleted, or the name kept for it named another PV.
    pub fn forget(&self, handle: &str) {
        self.lock().by_handle.remove(handle);
    }

    /// The PV of `handle` after a scan that started after this call: the one this caller runs
    /// (`scan` lists every PV of the driver, handle to name), or one it waited for. A failed
    /// scan, or a deadline passing, is the caller's error; callers still waiting try again.
    pub fn scan_for(
        &self,
        handle: &str,
        deadline: &Deadline,
        scan: impl FnOnce() -> KubeResult<HashMap<String, String>>,
    ) -> KubeResult<Option<String>> {
        let mut s = self.lock();
        let asked = s.started;
        while s.running {
            if deadline.passed() {
                return Err(KubeError::DeadlineExceeded);
            }
            s = self
                .scanned
                .wait_timeout(s, DEADLINE_CHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if s.finished > asked {
                return Ok(s.by_handle.get(handle).cloned());
            }
        }
        s.running = true;
        s.started += 1;
        let number = s.started;
        drop(s);
        let found = scan();
        let mut s = self.lock();
        s.running = false;
        let result = found.map(|all| {
            // Taken as it is: a copy into another form would hold both at once.
            s.by_handle = all;
            s.finished = number;
            s.by_handle.get(handle).cloned()
        });
        drop(s);
        self.scanned.notify_all();
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scans> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn all(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(h, n)| (h.to_string(), n.to_string())).collect()
    }

    #[test]
    fn callers_waiting_on_a_scan_that_started_before_them_get_a_new_one() {
        let names = Arc::new(PvNames::default());
        let scans = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let (names, scans) = (names.clone(), scans.clone());
            std::thread::spawn(move || {
                names.scan_for("a", &Deadline::none(), || {
                    scans.fetch_add(1, Ordering::SeqCst);
                    entered_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(all(&[("a", "pv-a")]))
                })
            })
        };
        entered_rx.recv().unwrap();
        // These ask while the first scan runs: it may have passed their PVs already.
        let later: Vec<_> = ["b", "c"]
            .into_iter()
            .map(|h| {
                let (names, scans) = (names.clone(), scans.clone());
                std::thread::spawn(move || {
                    names.scan_for(h, &Deadline::none(), || {
                        scans.fetch_add(1, Ordering::SeqCst);
                        Ok(all(&[("a", "pv-a"), ("b", "pv-b"), ("c", "pv-c")]))
                    })
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        release_tx.send(()).unwrap();
        assert_eq!(first.join().unwrap().unwrap().as_deref(), Some("pv-a"));
        let got: Vec<_> = later.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
        assert_eq!(got, vec![Some("pv-b".to_owned()), Some("pv-c".to_owned())]);
        assert_eq!(
            scans.load(Ordering::SeqCst),
            2,
            "one scan for both that came while the first ran"
        );
        assert_eq!(names.known("c").as_deref(), Some("pv-c"));
        names.forget("c");
        assert_eq!(names.known("c"), None);
    }

    #[test]
    fn a_failed_scan_keeps_what_the_last_whole_one_found() {
        let names = PvNames::default();
        names
            .scan_for("a", &Deadline::none(), || Ok(all(&[("a", "pv-a")])))
            .unwrap();
        let e = names.scan_for("b", &Deadline::none(), || Err(KubeError::DeadlineExceeded));
        assert!(matches!(e, Err(KubeError::DeadlineExceeded)));
        assert_eq!(names.known("a").as_deref(), Some("pv-a"));
    }

    #[test]
    fn a_caller_whose_deadline_passes_while_it_waits_gives_up() {
        let names = Arc::new(PvNames::default());
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let running = {
            let names = names.clone();
            std::thread::spawn(move || {
                names.scan_for("a", &Deadline::none(), || {
                    entered_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(HashMap::new())
                })
            })
        };
        entered_rx.recv().unwrap();
        let passed = Deadline::at(std::time::Instant::now());
        let e = names.scan_for("b", &passed, || unreachable!("a scan runs already"));
        assert!(matches!(e, Err(KubeError::DeadlineExceeded)));
        release_tx.send(()).unwrap();
        assert_eq!(running.join().unwrap().unwrap(), None);
    }
}
