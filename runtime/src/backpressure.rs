//! Bounds the events dispatched to shards but not yet run.
//!
//! The consumer thread acquires before dispatching a batch and blocks while the window is
//! full; shards release as they run the batches. This is the reference's "ask, not tell":
//! a slow entity slows the consumer instead of growing mailboxes without bound.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub struct InFlightGate {
    limit: usize,
    in_flight: Mutex<usize>,
    freed: Condvar,
}

impl InFlightGate {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            in_flight: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Blocks (the calling OS thread, never a tokio worker) until `n` more events fit, or
    /// `timeout` passes. Returns whether the events were admitted. A batch larger than the
    /// whole window is admitted once nothing else is in flight, so it cannot wait forever.
    pub fn acquire(&self, n: usize, timeout: Duration) -> bool {
        let guard = self.in_flight.lock().expect("gate lock poisoned");
        let (mut guard, result) = self
            .freed
            .wait_timeout_while(guard, timeout, |in_flight| {
                *in_flight != 0 && *in_flight + n > self.limit
            })
            .expect("gate lock poisoned");
        if result.timed_out() && *guard != 0 && *guard + n > self.limit {
            return false;
        }
        *guard += n;
        true
    }

    pub fn release(&self, n: usize) {
        let mut guard = self.in_flight.lock().expect("gate lock poisoned");
        *guard = guard.saturating_sub(n);
        drop(guard);
        self.freed.notify_all();
    }

    pub fn in_flight(&self) -> usize {
        *self.in_flight.lock().expect("gate lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_full_window_blocks_until_released() {
        let gate = Arc::new(InFlightGate::new(10));
        assert!(gate.acquire(10, Duration::from_millis(10)));
        assert!(
            !gate.acquire(1, Duration::from_millis(20)),
            "window is full"
        );
        let g = gate.clone();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            g.release(5);
        });
        assert!(gate.acquire(5, Duration::from_secs(5)));
        releaser.join().unwrap();
        assert_eq!(gate.in_flight(), 10);
    }

    #[test]
    fn an_oversized_batch_is_admitted_when_idle() {
        let gate = InFlightGate::new(10);
        assert!(gate.acquire(50, Duration::from_millis(10)));
        gate.release(50);
        assert_eq!(gate.in_flight(), 0);
    }
}
