//! Handing freed heap memory back to the kernel. glibc keeps what a burst of calls freed inside
//! its per-thread arenas, where only the free space at an arena's very top is ever returned on
//! its own. On a plugin that idles between bursts that is resident memory held for nothing, on
//! every node; a thread of its own trims the heap now and then.

use std::time::Duration;

use log::warn;
use nix::libc;

/// How often the heap is trimmed. A trim walks the allocator's free lists (well under a
/// millisecond here) and calls come rarely, so once a minute costs nothing that shows.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// How many malloc arenas the process may have. glibc gives contending threads arenas of their
/// own, up to 8 per core, each holding its own free memory; the plugin allocates little, so
/// two are plenty, and the soak's resident memory stops creeping up an arena at a time.
pub const MAX_ARENAS: i32 = 2;

/// Caps the number of malloc arenas. Call before any thread starts.
pub fn limit_arenas(max: i32) {
    // SAFETY: mallopt takes plain integers and changes only the allocator's settings.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, max) } != 1 {
        warn!("mallopt(M_ARENA_MAX, {max}) refused; the allocator keeps its default arenas");
    }
}

/// Returns the free pages of every arena to the kernel; true when any were released.
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and changes only the allocator's own state, under
    // the allocator's locks, so it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Trims the heap every `interval` for the life of the process.
pub fn start_trimming(interval: Duration) {
    let spawned = std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            trim();
        });
    if let Err(e) = spawned {
        warn!("heap trimming thread: {e}; freed memory stays with the allocator");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn trim_returns_memory_freed_below_a_live_allocation() {
        // 64 MiB in small blocks, then one block above them that stays: the free space is no
        // longer at the top of its arena, so only a trim can hand it back.
        let blocks: Vec<Box<[u8; 4096]>> = (0..16 * 1024).map(|i| Box::new([i as u8; 4096])).collect();
        let pin = Box::new([1u8; 4096]);
        drop(blocks);
        let before = rss_anon_kib();
        assert!(trim(), "nothing was released");
        let after = rss_anon_kib();
        assert_eq!(pin[0], 1);
        assert!(
            before.saturating_sub(after) > 32 * 1024,
            "RssAnon {before} KiB before the trim, {after} KiB after"
        );
    }
}
