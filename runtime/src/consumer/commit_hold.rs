//! Fault-injection points for tests: a checkpoint stopped at an exact step. A node stopped
//! there has applied the inputs in that checkpoint and owes their answers, and none of it is
//! visible; the exactly-once argument (docs/ARCHITECTURE.md) says what must follow (the next
//! owner runs those inputs again, the caller never sees an answer from the lost attempt, a
//! zombie's late transaction fails). Tests prove that by stopping a node exactly there rather
//! than hoping a signal lands in the right millisecond.
//!
//! Each point is off unless its environment variable names a file; then, while that file
//! exists, every checkpoint that holds a state stops there, after one log line, and goes on
//! once the file is removed. The file lets a test arm the hold after start-up (when its own
//! set-up has committed).
//!
//! - [`HOLD_COMMIT_WHEN`]: after writing (states, messages, answers' changes and offsets, all
//!   delivered), before the commit.
//! - [`HOLD_WRITE_WHEN`]: after collecting the shards' checkpoints, before the transaction
//!   writes anything (a zombie whose records reach the changelog only after the next owner
//!   read it).

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

/// The environment variable naming the file whose presence holds checkpoints before their
/// commit.
pub(crate) const HOLD_COMMIT_WHEN: &str = "KAFKA_SHARDING_HOLD_COMMIT_WHEN";
/// The environment variable naming the file whose presence holds checkpoints before they write.
pub(crate) const HOLD_WRITE_WHEN: &str = "KAFKA_SHARDING_HOLD_WRITE_WHEN";

/// How often a held checkpoint looks whether its file is gone.
const LOOK_EVERY: Duration = Duration::from_millis(20);

static COMMIT_TRIGGER: LazyLock<Option<PathBuf>> =
    LazyLock::new(|| std::env::var_os(HOLD_COMMIT_WHEN).map(PathBuf::from));
static WRITE_TRIGGER: LazyLock<Option<PathBuf>> =
    LazyLock::new(|| std::env::var_os(HOLD_WRITE_WHEN).map(PathBuf::from));

/// Called between writing a checkpoint that holds `states` states and committing it.
pub(crate) fn before_commit(states: usize) {
    hold(
        COMMIT_TRIGGER.as_deref(),
        HOLD_COMMIT_WHEN,
        states,
        "written",
        "its commit",
    );
}

/// Called between collecting a checkpoint of `states` states and writing it.
pub(crate) fn before_write(states: usize) {
    hold(
        WRITE_TRIGGER.as_deref(),
        HOLD_WRITE_WHEN,
        states,
        "collected",
        "writing them",
    );
}

fn hold(trigger: Option<&Path>, variable: &str, states: usize, how: &str, before: &str) {
    let Some(trigger) = trigger else {
        return;
    };
    if states == 0 || !trigger.exists() {
        return;
    }
    tracing::warn!(
        "checkpoint holding {states} {how} states stopped before {before} ({variable} = {} exists)",
        trigger.display()
    );
    while trigger.exists() {
        std::thread::park_timeout(LOOK_EVERY);
    }
    tracing::warn!("checkpoint holding {states} {how} states goes on ({variable} removed)");
}
