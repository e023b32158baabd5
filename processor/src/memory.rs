//! Giving freed memory back to the operating system after passivation.
//!
//! A fast drain of many distinct users activates entity actors faster than the soft live-actor
//! cap can passivate them (an entity with events in flight is not passivated), so the live
//! count overshoots the cap for a while and passivation catches up on the next ticks. glibc
//! keeps the freed memory in its heaps, so the resident set stayed at that high-water mark
//! (measured: docs/BENCHMARKS.md). After entities were passivated, `malloc_trim` returns it.

use std::sync::Arc;
use std::time::Duration;

use crate::stats::NodeStats;

const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Trim only after this many passivations since the last trim (trimming walks the heaps).
const PASSIVATIONS_WORTH_A_TRIM: u64 = 10_000;

/// Runs until the process ends.
pub async fn trim_after_passivation(stats: Arc<NodeStats>) {
    let mut trimmed_at = 0;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let passivated = stats.entities_passivated.get();
        if passivated - trimmed_at >= PASSIVATIONS_WORTH_A_TRIM {
            trimmed_at = passivated;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks and shrinks glibc's own heaps; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
