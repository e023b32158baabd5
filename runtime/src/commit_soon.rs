//! The shards' call for a checkpoint now rather than at the interval: answers are owed, or
//! messages, emitted records or fired timers wait to be written.
//!
//! A flag the poll loop takes (at most once a millisecond, so batching survives), plus a wake
//! of the loop's wait for records when the flag is raised: a command run at its owner without
//! a record (`commands::direct`) brings no record that would end that wait, and its answer
//! must not wait out the loop's idle poll.
//!
//! It also *gathers*: when a checkpoint gave out answers to several callers, the next one
//! waits until those answers are [`GATHER`] old, so the callers' next commands ride with it.
//! Started at once, it would carry only the commands that were waiting already, the answered
//! callers' next ones would wait for the one after, and concurrent callers would settle into
//! halves that each wait for two checkpoints (docs/BENCHMARKS.md, "Commands run at their
//! owner"). A lone caller is answered alone and never waits for this.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Waker = Box<dyn Fn() + Send + Sync>;

/// How long after answers to several callers went out the next checkpoint for answers waits.
pub(crate) const GATHER: Duration = Duration::from_millis(1);

pub(crate) struct CommitSoon {
    wanted: AtomicBool,
    wake: Mutex<Option<Waker>>,
    base: Instant,
    /// When answers last went out (ns after `base`).
    answered_at: AtomicU64,
    /// Answers given out since the last call was taken.
    answered: AtomicUsize,
}

impl Default for CommitSoon {
    fn default() -> Self {
        Self {
            wanted: AtomicBool::default(),
            wake: Mutex::default(),
            base: Instant::now(),
            answered_at: AtomicU64::default(),
            answered: AtomicUsize::default(),
        }
    }
}

impl CommitSoon {
    /// A shard gave out `count` answers (a checkpoint committed their changes).
    pub fn answered(&self, count: usize) {
        let now = self.base.elapsed().as_nanos() as u64;
        self.answered_at.store(now, Ordering::Release);
        self.answered.fetch_add(count, Ordering::AcqRel);
    }

    /// Whether the next checkpoint should wait for the commands of callers just answered
    /// (several were, less than `gather` ago).
    pub fn gathering(&self, gather: Duration) -> bool {
        if self.answered.load(Ordering::Acquire) < 2 {
            return false;
        }
        let since = self.base.elapsed().saturating_sub(Duration::from_nanos(
            self.answered_at.load(Ordering::Acquire),
        ));
        since < gather
    }

    /// A checkpoint is wanted now; wakes the poll loop if it was not already.
    pub fn request(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel) {
            if let Some(wake) = &*self.wake.lock().expect("waker lock poisoned") {
                wake();
            }
        }
    }

    /// Whether a checkpoint was wanted; clears the call (and the answers counted for
    /// [`Self::gathering`]: the checkpoint now starting gathers what came since).
    pub fn take(&self) -> bool {
        let wanted = self.wanted.swap(false, Ordering::AcqRel);
        if wanted {
            self.answered.store(0, Ordering::Release);
        }
        wanted
    }

    /// Whether a checkpoint is wanted (not cleared).
    pub fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Keeps the call for the next look (a checkpoint was in flight), without a wake.
    pub fn keep(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// How to wake the poll loop (`None`: the loop has stopped).
    pub fn wake_with(&self, wake: Option<Waker>) {
        *self.wake.lock().expect("waker lock poisoned") = wake;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn a_call_wakes_the_loop_once_until_taken() {
        let soon = CommitSoon::default();
        soon.request();
        assert!(soon.take(), "a call without a waker is still kept");
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = wakes.clone();
        soon.wake_with(Some(Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })));
        soon.request();
        soon.request();
        assert_eq!(wakes.load(Ordering::Relaxed), 1, "raised once, woken once");
        assert!(soon.is_wanted());
        assert!(soon.take());
        assert!(!soon.take(), "taken");
        soon.keep();
        assert_eq!(wakes.load(Ordering::Relaxed), 1, "kept without a wake");
        assert!(soon.take());
        soon.request();
        assert_eq!(wakes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn answers_to_several_callers_hold_the_next_checkpoint_briefly_and_one_does_not() {
        let soon = CommitSoon::default();
        soon.answered(1);
        assert!(!soon.gathering(Duration::from_secs(60)), "a lone caller");
        soon.answered(3);
        assert!(soon.gathering(Duration::from_secs(60)));
        assert!(!soon.gathering(Duration::ZERO), "gathered long enough");
        soon.request();
        assert!(soon.take());
        assert!(
            !soon.gathering(Duration::from_secs(60)),
            "the checkpoint that started carries them"
        );
    }
}
