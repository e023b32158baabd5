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
//! owner"). A lone caller is answered alone and never waits for this. The gathering ends
//! early, with a wake of the loop, once every shard of the commit has answered and as many new
//! answers are owed as were given out: the answered callers are back, and waiting longer would
//! only hold their commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Waker = Box<dyn Fn() + Send + Sync>;

/// How long after answers to several callers went out the next checkpoint for answers waits.
pub(crate) const GATHER: Duration = Duration::from_millis(1);

#[derive(Default)]
pub(crate) struct CommitSoon {
    wanted: AtomicBool,
    wake: Mutex<Option<Waker>>,
    gather: Mutex<Gather>,
}

/// What the gathering counts since the last call was taken.
#[derive(Default)]
struct Gather {
    /// The commit whose answers are going out, and how many of its shards have not said yet
    /// how many they gave (each says once, see [`CommitSoon::answered`]).
    commit: u64,
    shards_to_answer: usize,
    /// Answers given out, and when the last went out.
    answered: usize,
    answered_at: Option<Instant>,
    /// Answers owed (see [`CommitSoon::owed_answer`]).
    owed: usize,
    /// Of those, the ones owed before the first answer went out: callers that were not
    /// answered, whose commands do not count as the answered ones' return.
    owed_before_answers: usize,
}

impl Gather {
    /// Several callers were answered, every shard of the commit has answered, and as many
    /// new answers are owed as went out.
    fn all_back(&self) -> bool {
        self.answered >= 2
            && self.shards_to_answer == 0
            && self.owed >= self.owed_before_answers + self.answered
    }
}

impl CommitSoon {
    /// One of the `shards` shards that commit `commit` (numbered by the checkpoint thread)
    /// included gave out `count` answers. Every shard of the commit says so, with none too:
    /// the gathering waits for all of them, or the callers of the first shard to answer, back
    /// before the other shards answered theirs, would end it.
    pub fn answered(&self, commit: u64, shards: usize, count: usize) {
        let back = {
            let mut g = self.gather.lock().expect("gather lock poisoned");
            if g.commit != commit {
                g.commit = commit;
                g.shards_to_answer = shards;
            }
            g.shards_to_answer = g.shards_to_answer.saturating_sub(1);
            if count > 0 {
                if g.answered == 0 {
                    g.owed_before_answers = g.owed;
                }
                g.answered += count;
                g.answered_at = Some(Instant::now());
            }
            g.all_back()
        };
        if back {
            self.wanted.store(true, Ordering::Release);
            self.wake();
        }
    }

    /// A command's answer is owed (a checkpoint is wanted). When that brings the answered
    /// callers all back, the gathering is over: the loop is woken to start the checkpoint now
    /// rather than at its next look.
    pub fn owed_answer(&self) {
        let back = {
            let mut g = self.gather.lock().expect("gather lock poisoned");
            g.owed += 1;
            g.all_back()
        };
        if back {
            self.wanted.store(true, Ordering::Release);
            self.wake();
        } else {
            self.request();
        }
    }

    /// Whether the next checkpoint should wait for the commands of callers just answered
    /// (several were, less than `gather` ago, and not all are back).
    pub fn gathering(&self, gather: Duration) -> bool {
        let g = self.gather.lock().expect("gather lock poisoned");
        if g.answered < 2 || g.all_back() {
            return false;
        }
        g.answered_at.is_some_and(|at| at.elapsed() < gather)
    }

    /// A checkpoint is wanted now; wakes the poll loop if it was not already.
    pub fn request(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(wake) = &*self.wake.lock().expect("waker lock poisoned") {
            wake();
        }
    }

    /// Whether a checkpoint was wanted; clears the call (and what was counted for
    /// [`Self::gathering`]: the checkpoint now starting gathers what came since).
    pub fn take(&self) -> bool {
        let wanted = self.wanted.swap(false, Ordering::AcqRel);
        if wanted {
            let mut g = self.gather.lock().expect("gather lock poisoned");
            *g = Gather {
                commit: g.commit,
                shards_to_answer: g.shards_to_answer,
                ..Gather::default()
            };
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
        soon.answered(1, 2, 1);
        assert!(!soon.gathering(Duration::from_secs(60)), "a lone caller");
        soon.answered(1, 2, 3);
        assert!(soon.gathering(Duration::from_secs(60)));
        assert!(!soon.gathering(Duration::ZERO), "gathered long enough");
        soon.request();
        assert!(soon.take());
        assert!(
            !soon.gathering(Duration::from_secs(60)),
            "the checkpoint that started carries them"
        );
    }

    #[test]
    fn the_gathering_ends_with_a_wake_once_the_answered_callers_are_back() {
        let soon = CommitSoon::default();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = wakes.clone();
        soon.wake_with(Some(Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })));
        soon.owed_answer();
        assert_eq!(wakes.load(Ordering::Relaxed), 1, "the first call wakes");
        assert!(soon.take());
        // A caller not in the checkpoint now running is owed before its answers go out.
        soon.owed_answer();
        soon.answered(7, 2, 2);
        soon.answered(7, 2, 1);
        let gather = Duration::from_secs(60);
        assert!(soon.gathering(gather), "three callers answered, none back");
        soon.owed_answer();
        soon.owed_answer();
        assert!(soon.gathering(gather), "two of three back");
        let before = wakes.load(Ordering::Relaxed);
        soon.owed_answer();
        assert!(!soon.gathering(gather), "all three back");
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            before + 1,
            "woken when the last is back"
        );
        assert!(soon.take());
    }

    #[test]
    fn the_gathering_waits_for_every_shard_of_the_commit() {
        let soon = CommitSoon::default();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = wakes.clone();
        soon.wake_with(Some(Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })));
        let gather = Duration::from_secs(60);
        // Commit 3 included three shards: the first answers two callers, and they are back
        // before the second has answered its own.
        soon.answered(3, 3, 2);
        soon.owed_answer();
        soon.owed_answer();
        assert!(soon.gathering(gather), "two shards have not answered yet");
        soon.answered(3, 3, 2);
        soon.owed_answer();
        soon.owed_answer();
        assert!(soon.gathering(gather), "the third shard has not said");
        let before = wakes.load(Ordering::Relaxed);
        soon.answered(3, 3, 0);
        assert!(
            !soon.gathering(gather),
            "every shard answered, every caller back"
        );
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            before + 1,
            "the last shard's word wakes the loop"
        );
        assert!(soon.take());
        // The next commit counts its own shards.
        soon.answered(4, 2, 2);
        soon.owed_answer();
        soon.owed_answer();
        assert!(
            soon.gathering(gather),
            "one of commit 4's two shards has not said"
        );
    }
}
