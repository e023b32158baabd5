//! Giving freed memory back to the operating system after passivation, standby warm-ups and
//! restores.
//!
//! A drain of many distinct entities passivates entities past the live cap; the allocator keeps
//! what the passivated entries used, so the resident set stayed at that high-water mark
//! (docs/BENCHMARKS.md). After many passivations the free memory is released: glibc's
//! `malloc_trim`, or with the `jemalloc` feature a purge of jemalloc's arenas (which otherwise
//! return unused pages only as later allocations let them decay). A standby warm-up (whole
//! changelog partitions read, maps grown by doubling) leaves the same kind of free memory
//! behind; `standby` releases it after a large one, and `restore` after a restore that read
//! many records (its consumer's fetch buffers). (mimalloc as Rust's allocator was tried: no
//! throughput gain beyond run-to-run noise, and 2.7× the memory per restored entity.)

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

/// Returns jemalloc's unused pages to the OS (every arena's; `arena.<all>.purge`).
#[cfg(feature = "jemalloc")]
pub(crate) fn release_free_memory() {
    // jemalloc's MALLCTL_ARENAS_ALL: the purge applies to every arena.
    const PURGE_EVERY_ARENA: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated name, and no old or new value: the call reads and writes
    // nothing of ours.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_EVERY_ARENA.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// Returns glibc's free heap memory to the OS (walks the heaps: not for hot paths).
#[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only walks and shrinks glibc's own heaps; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(
    not(feature = "jemalloc"),
    not(all(target_os = "linux", target_env = "gnu"))
))]
pub(crate) fn release_free_memory() {}
