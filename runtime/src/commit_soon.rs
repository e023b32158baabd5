//! The shards' call for a checkpoint now rather than at the interval: answers are owed, or
//! messages, emitted records or fired timers wait to be written.
//!
//! A flag the poll loop takes (at most once a millisecond, so batching survives), plus a wake
//! of the loop's wait for records when the flag is raised: a command run at its owner without
//! a record (`commands::direct`) brings no record that would end that wait, and its answer
//! must not wait out the loop's idle poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

type Waker = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub(crate) struct CommitSoon {
    wanted: AtomicBool,
    wake: Mutex<Option<Waker>>,
}

impl CommitSoon {
    /// A checkpoint is wanted now; wakes the poll loop if it was not already.
    pub fn request(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel) {
            if let Some(wake) = &*self.wake.lock().expect("waker lock poisoned") {
                wake();
            }
        }
    }

    /// Whether a checkpoint was wanted; clears the call.
    pub fn take(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
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
}
