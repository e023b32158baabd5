//! The counter in memory (kafka-sharding's test kit): no broker needed.

use counter::{Count, Counter};
use kafka_sharding::testkit::TestKit;

#[test]
fn counts_and_sums_per_key_and_rejects_what_is_not_a_number() {
    let mut kit = TestKit::<Counter>::new();
    for value in ["5", " 7\n", "-2"] {
        kit.record("k1", Some(value.as_bytes())).unwrap();
    }
    kit.record("k2", Some(b"40")).unwrap();
    assert!(
        kit.record("k1", Some(b"five")).is_err(),
        "dead-lettered on a node"
    );
    assert_eq!(kit.query("k1", &()), Count { events: 3, sum: 10 });
    assert_eq!(kit.query("k2", &()), Count { events: 1, sum: 40 });
    assert_eq!(kit.query("k3", &()), Count::default());
}

#[test]
fn a_replayed_event_counts_once_and_states_survive_the_changelog() {
    let mut kit = TestKit::<Counter>::new();
    kit.record("k1", Some(b"5")).unwrap();
    let offset = kit.last_offset("k1");
    assert!(!kit.replay("k1", offset, &5), "already counted");
    kit.restart();
    assert_eq!(kit.query("k1", &()), Count { events: 1, sum: 5 });
}
