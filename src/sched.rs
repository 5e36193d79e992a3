//! The process's CPU scheduling policy. The plugin runs beside the workloads on every node, and
//! each call wakes its threads three times (poll thread, worker, poll thread again); under the
//! default policy every such wake-up may preempt whatever runs on that CPU. As a batch process
//! its woken threads wait for the running task's turn instead: no preemption of the node's
//! workloads, fewer switches on a busy node. On an idle CPU a wake-up runs at once either way.

use log::warn;
use nix::libc;

/// Puts the calling thread, and so every thread it starts afterwards, under `SCHED_BATCH` (the
/// default policy with wake-up preemption off; no privilege needed). Call before any thread
/// starts.
pub fn run_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a live sched_param the call only reads; pid 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        let e = std::io::Error::last_os_error();
        warn!("sched_setscheduler(SCHED_BATCH): {e}; the plugin's threads keep the default policy");
    }
}
