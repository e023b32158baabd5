//! The accounts entity driven in memory with the runtime's test kit: commands and their
//! answers, idempotency keys, transfers as messages, emitted records, scheduled transfers on
//! the virtual clock, the replay rule and the changelog round trip. No broker: the same
//! behaviour on a cluster is `processor/tests/accounts.rs` and `money.rs`.

use std::time::Duration;

use accounts::{Accounts, Completed, Op, Refused, TRANSFERS_COMPLETED, TRANSFERS_REFUSED};
use kafka_sharding::testkit::{Effect, TestKit};
use kafka_sharding::CommandError;

fn deposit(amount: i64) -> Op {
    Op::Deposit { amount }
}

fn records(kit: &mut TestKit<Accounts>, topic: &str) -> Vec<(String, Vec<u8>)> {
    kit.take_effects()
        .into_iter()
        .filter_map(|effect| match effect {
            Effect::Record {
                topic: t,
                key,
                value,
            } if t == topic => Some((String::from_utf8(key.unwrap()).unwrap(), value.unwrap())),
            _ => None,
        })
        .collect()
}

#[test]
fn commands_are_answered_from_the_state_they_ran_on_and_once_per_key() {
    let mut kit = TestKit::<Accounts>::new();
    assert_eq!(kit.command("alice", &deposit(500), Some("d-1")), Ok(500));
    assert_eq!(
        kit.command("alice", &deposit(500), Some("d-1")),
        Ok(500),
        "a retry with the same key is answered as the first time"
    );
    assert_eq!(kit.query("alice", &()), 500, "and did not run again");
    assert_eq!(
        kit.command("alice", &Op::Withdraw { amount: 501 }, Some("w-1")),
        Err(CommandError::Refused(accounts::INSUFFICIENT_FUNDS.into()))
    );
    assert_eq!(
        kit.command("alice", &Op::Withdraw { amount: 200 }, None),
        Ok(300)
    );
    assert!(matches!(
        kit.command("alice", &deposit(-5), None),
        Err(CommandError::Refused(_))
    ));
    assert_eq!(
        kit.query("nobody", &()),
        0,
        "an unknown account has the default state"
    );
}

#[test]
fn a_transfer_debits_credits_by_message_and_emits_its_completion_once() {
    let mut kit = TestKit::<Accounts>::new();
    kit.command("alice", &deposit(500), None).unwrap();
    let transfer = Op::TransferOut {
        to: "bob".into(),
        amount: 200,
        transfer_id: Some("t-1".into()),
    };
    assert_eq!(kit.command("alice", &transfer, Some("t-1")), Ok(300));
    assert_eq!(
        kit.query("bob", &()),
        200,
        "the credit message was delivered"
    );
    let completed = records(&mut kit, TRANSFERS_COMPLETED);
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].0, "t-1");
    let record: Completed = serde_json::from_slice(&completed[0].1).unwrap();
    assert_eq!(
        (record.from.as_str(), record.to.as_str(), record.amount),
        ("alice", "bob", 200)
    );
    // A retry runs nothing: no second debit, credit or completion.
    assert_eq!(kit.command("alice", &transfer, Some("t-1")), Ok(300));
    assert_eq!((kit.query("alice", &()), kit.query("bob", &())), (300, 200));
    assert!(records(&mut kit, TRANSFERS_COMPLETED).is_empty());
}

#[test]
fn a_scheduled_transfer_fires_once_when_due_and_a_short_one_is_refused() {
    let mut kit = TestKit::<Accounts>::new();
    kit.command("alice", &deposit(300), None).unwrap();
    let (now, at) = (kit.now_ms(), kit.now_ms() + 60_000);
    let schedule = |id: &str, amount| Op::ScheduleTransfer {
        to: "carol".into(),
        amount,
        at_ms: at,
        transfer_id: id.into(),
        requested_ms: now,
    };
    kit.command("alice", &schedule("s-1", 100), Some("s-1"))
        .unwrap();
    kit.command("alice", &schedule("s-2", 1_000), Some("s-2"))
        .unwrap();
    assert_eq!(
        kit.timers("alice"),
        [("s-1".to_string(), at), ("s-2".to_string(), at)]
    );
    kit.restart();
    assert_eq!(
        kit.timers("alice").len(),
        2,
        "timers are kept with the state"
    );
    kit.advance(Duration::from_secs(59));
    assert_eq!(kit.query("carol", &()), 0, "not yet due");
    kit.advance(Duration::from_secs(1));
    assert_eq!(
        (kit.query("alice", &()), kit.query("carol", &())),
        (200, 100)
    );
    assert!(kit.timers("alice").is_empty());
    let effects = kit.take_effects();
    let refused: Vec<Refused> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record { topic, value, .. } if topic == TRANSFERS_REFUSED => {
                Some(serde_json::from_slice(value.as_ref().unwrap()).unwrap())
            }
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].amount, 1_000);
    assert_eq!(refused[0].reason, accounts::INSUFFICIENT_FUNDS);
    kit.advance(Duration::from_secs(3_600));
    assert_eq!(kit.query("carol", &()), 100, "each timer fired once");
}

#[test]
fn a_scheduled_transfer_retried_after_its_time_gets_the_first_answer_and_a_new_one_is_refused() {
    let mut kit = TestKit::<Accounts>::new();
    kit.command("alice", &deposit(300), None).unwrap();
    let at = kit.now_ms() + 1_000;
    let schedule = |id: &str, requested_ms| Op::ScheduleTransfer {
        to: "carol".into(),
        amount: 100,
        at_ms: at,
        transfer_id: id.into(),
        requested_ms,
    };
    let first = schedule("s-1", kit.now_ms());
    assert_eq!(kit.command("alice", &first, Some("s-1")), Ok(300));
    kit.advance(Duration::from_secs(2));
    assert_eq!(kit.query("carol", &()), 100);
    // The caller never saw the first answer and retries, its time now past: the first answer,
    // and nothing more moves.
    let retry = schedule("s-1", kit.now_ms());
    assert_eq!(kit.command("alice", &retry, Some("s-1")), Ok(300));
    kit.advance(Duration::from_secs(2));
    assert_eq!(
        (kit.query("alice", &()), kit.query("carol", &())),
        (200, 100)
    );
    // A call the account never took, asked after its time: refused, nothing scheduled.
    let late = schedule("s-2", kit.now_ms());
    match kit.command("alice", &late, Some("s-2")) {
        Err(CommandError::Refused(why)) => {
            assert!(why.starts_with(accounts::SCHEDULED_IN_THE_PAST), "{why}")
        }
        other => panic!("a late schedule answered {other:?}"),
    }
    assert!(kit.timers("alice").is_empty());
    kit.advance(Duration::from_secs(2));
    assert_eq!(kit.query("carol", &()), 100);
}

#[test]
fn a_replayed_offset_changes_nothing_and_records_decode_as_on_a_node() {
    let mut kit = TestKit::<Accounts>::new();
    kit.record("dave", Some(br#"{"Deposit":{"amount":70}}"#))
        .unwrap();
    let offset = kit.last_offset("dave");
    assert!(
        !kit.replay("dave", offset, &deposit(70)),
        "already in the state"
    );
    assert_eq!(kit.query("dave", &()), 70);
    assert!(kit.replay("dave", offset + 10, &deposit(5)));
    assert_eq!(kit.query("dave", &()), 75);
    assert!(
        kit.record("dave", Some(b"not json")).is_err(),
        "a node dead-letters it"
    );
    assert_eq!(kit.query("dave", &()), 75);
    kit.restart();
    assert_eq!(kit.state("dave").map(|a| a.balance), Some(75));
}
