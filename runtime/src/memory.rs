//! Giving freed memory back to the operating system after passivation, standby warm-ups and
//! restores.
//!
//! A drain of many distinct entities passivates entities past the live cap; glibc keeps what
//! the passivated entries (and, when entities were actors, the stopped actors) used in its
//! heaps, so the resident set stayed at that high-water mark (docs/BENCHMARKS.md). After many
//! passivations `malloc_trim` returns it. A standby warm-up
//! (whole changelog partitions read, maps grown by doubling) leaves the same kind of free
//! memory behind; `standby` trims after a large one, and `restore` after a restore that read
//! many records (its consumer's fetch buffers). (mimalloc was tried
//! instead of glibc: no throughput gain beyond run-to-run noise, and 2.7× the memory per
//! restored entity.)

use std::sync::Arc;
use std::time::Duration;

use crate::stats::NodeStats;

const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Trim only after this many passivations since the last trim (trimming walks the heaps). A
/// passivation frees a recency entry (about 100 B), so this is about 50 MB given back; at
/// 10 000 (set for 10 KB entity actors) a passivation-heavy drain walked the heaps every 2 s
/// for a megabyte.
const PASSIVATIONS_WORTH_A_TRIM: u64 = 500_000;

/// Runs until the process ends.
pub async fn trim_after_passivation(stats: Vec<Arc<NodeStats>>) {
    let mut trimmed_at = 0;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let passivated: u64 = stats.iter().map(|s| s.entities_passivated.get()).sum();
        if passivated - trimmed_at >= PASSIVATIONS_WORTH_A_TRIM {
            trimmed_at = passivated;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns glibc's free heap memory to the OS (walks the heaps: not for hot paths).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only walks and shrinks glibc's own heaps; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn release_free_memory() {}
