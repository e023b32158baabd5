//! A fault-injection point for tests: a checkpoint that has written its states (and sent its
//! offsets) into the open transaction but not committed it. A node killed there has applied
//! the inputs in that checkpoint and owes their answers, and none of it is visible: the
//! exactly-once argument (docs/ARCHITECTURE.md) says the next owner runs those inputs again
//! and the caller never sees an answer from the lost attempt. Tests prove that by stopping a
//! node exactly there rather than hoping a SIGKILL lands in the right millisecond.
//!
//! Off unless the environment variable [`HOLD_COMMIT_WHEN`] names a file; then, while that
//! file exists, every checkpoint that wrote a state stops before its commit, for good, after
//! one log line. The file lets a test arm the hold after start-up (when its own set-up has
//! committed).

use std::path::PathBuf;
use std::sync::LazyLock;

/// The environment variable naming the file whose presence arms the hold.
pub(crate) const HOLD_COMMIT_WHEN: &str = "KAFKA_SHARDING_HOLD_COMMIT_WHEN";

static TRIGGER: LazyLock<Option<PathBuf>> =
    LazyLock::new(|| std::env::var_os(HOLD_COMMIT_WHEN).map(PathBuf::from));

/// Called between writing a checkpoint (its `states` state records, messages, answers' changes
/// and offsets, all delivered) and committing its transaction.
pub(crate) fn before_commit(states: usize) {
    let Some(trigger) = TRIGGER.as_ref() else {
        return;
    };
    if states == 0 || !trigger.exists() {
        return;
    }
    tracing::warn!(
        "checkpoint holding {states} written states stopped before its commit ({HOLD_COMMIT_WHEN} = {} exists)",
        trigger.display()
    );
    loop {
        std::thread::park();
    }
}
