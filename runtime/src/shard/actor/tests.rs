use super::timers::unix_ms;
use super::*;
use crate::backpressure::InFlightGate;
use crate::cluster::wire::CommandOutcome;
use crate::commands::{CommandMeta, Direct, DirectCommand};
use crate::effects::HEADER_MESSAGE_FROM;
use crate::entity::tests::{Sum, SumState};
use crate::entity::{Prost, Rejection};
use crate::partitioner::partition_for_key;
use crate::readiness::GroupReadiness;
use crate::shard::messages::OutRecord;
use crate::timers::{PendingTimer, HEADER_TIMER};
use std::sync::atomic::AtomicUsize;

/// Sums like [`Sum`], but its `apply` panics on 13 after counting it (a half-applied event).
struct Unlucky;

impl Entity for Unlucky {
    type Event = i64;
    type State = SumState;
    type Query = SumState;
    type Reply = SumState;
    type Codec = Prost;

    fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
        Sum::decode(id, value)
    }
    fn apply(state: &mut SumState, event: &i64) {
        state.count += 1;
        assert_ne!(*event, 13, "unlucky number");
        state.sum += event;
    }
    fn query(state: &SumState, _: &SumState) -> SumState {
        state.clone()
    }
}

fn env(max_live: usize) -> Arc<ShardEnv> {
    Arc::new(ShardEnv {
        gate: Arc::new(InFlightGate::new(1_000)),
        stats: Arc::new(NodeStats::default()),
        live_entities: Arc::new(AtomicUsize::new(0)),
        max_live_entities: max_live,
        passivate_after: Duration::from_secs(600),
        readiness: Arc::new(GroupReadiness::new("g")),
        input_topic: "input".into(),
        commands: Arc::new(crate::commands::PendingCommands::new("me".into())),
        destinations: Arc::new(crate::effects::Destinations::default()),
        commit_soon: Arc::default(),
        changed_states: Arc::default(),
    })
}

fn events(records: &[(i64, &str, i64)]) -> Vec<ConsumedRecord<i64>> {
    records
        .iter()
        .map(|(offset, id, value)| ConsumedRecord {
            offset: *offset,
            at_ms: 0,
            content: RecordContent::Event((*id).into(), *value),
        })
        .collect()
}

async fn start<E: Entity>(env: &Arc<ShardEnv>) -> ActorRef<ShardMsg<E>> {
    let args = ShardArgs {
        shard: 3,
        env: env.clone(),
    };
    let (shard, _) = Actor::spawn(None, ShardActor::<E>::new(), args)
        .await
        .unwrap();
    shard
}

async fn ask<E: Entity<Query = SumState, Reply = SumState>>(
    shard: &ActorRef<ShardMsg<E>>,
    id: &str,
) -> SumState {
    shard
        .call(
            |reply| ShardMsg::Query {
                id: id.into(),
                query: SumState::default(),
                reply,
            },
            None,
        )
        .await
        .unwrap()
        .unwrap()
        .expect("the shard is not refused")
}

#[tokio::test]
async fn a_refused_shard_runs_nothing_commits_nothing_and_answers_why() {
    let env = env(100);
    let shard = start::<Sum>(&env).await;
    env.gate.acquire(2, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(events(&[(0, "a", 5)])))
        .unwrap();
    let query = |shard: ActorRef<ShardMsg<Sum>>| async move {
        shard
            .call(
                |reply| ShardMsg::Query {
                    id: "a".into(),
                    query: SumState::default(),
                    reply,
                },
                None,
            )
            .await
            .unwrap()
            .unwrap()
    };
    let waiting = tokio::spawn(query(shard.clone()));
    shard
        .cast(ShardMsg::Refused("offset 7 does not decode".into()))
        .unwrap();
    assert_eq!(
        waiting.await.unwrap().unwrap_err().as_ref(),
        "offset 7 does not decode",
        "a query that waited for the restore"
    );
    shard
        .cast(ShardMsg::Consumed(events(&[(1, "a", 6)])))
        .unwrap();
    assert!(query(shard.clone()).await.is_err());
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.commit_offset, None, "no offset committed");
    assert!(checkpoint.states.is_empty());
    assert_eq!(env.gate.in_flight(), 0, "dropped batches left the window");
    assert_eq!(env.readiness.refused().1, [3]);
    shard.stop(None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        env.readiness.refused().1.is_empty(),
        "a shard that left is no longer refused here"
    );
}

/// An entity that acts: a command adds its value to the sum unless that would make it
/// negative (then it is refused); it answers with the new state.
struct Guarded;

impl Entity for Guarded {
    type Event = i64;
    type State = SumState;
    type Query = SumState;
    type Reply = SumState;
    type Codec = Prost;

    fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
        Sum::decode(id, value)
    }
    fn apply(state: &mut SumState, event: &i64) {
        Sum::apply(state, event)
    }
    fn query(state: &SumState, _: &SumState) -> SumState {
        state.clone()
    }
    fn handle(state: &mut SumState, event: &i64, effects: &mut Effects<'_, Self>) {
        if state.sum + event < 0 {
            effects.refuse("insufficient funds");
            return;
        }
        Self::apply(state, event);
        effects.reply(state.clone());
    }
}

fn command(
    offset: i64,
    id: &str,
    value: i64,
    request: u64,
    key: Option<&str>,
) -> ConsumedRecord<i64> {
    ConsumedRecord {
        offset,
        at_ms: 1_000 + offset,
        content: RecordContent::Command(
            id.into(),
            Ok(value),
            Box::new(CommandMeta {
                reply_to: "me".into(),
                request,
                idempotency_key: key.map(String::from),
                at_ms: 1_000 + offset,
            }),
        ),
    }
}

#[tokio::test]
async fn commands_are_answered_after_their_checkpoint_commits_and_once_per_key() {
    let env = env(100);
    let shard = start::<Guarded>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    let (mut deposit, mut overdraw) = (env.commands.register(), env.commands.register());
    env.gate.acquire(2, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(vec![
            command(5, "acc", 100, deposit.request, Some("d-1")),
            command(6, "acc", -150, overdraw.request, Some("w-1")),
        ]))
        .unwrap();
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert!(env.commit_soon.is_wanted(), "answers owed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        deposit.arrived().is_none(),
        "no answer before the change is committed"
    );
    // The checkpoint's state includes the change and the remembered answers.
    let (_, stored) = &checkpoint.states[0];
    assert_eq!(stored.state, SumState { count: 1, sum: 100 });
    assert!(stored
        .acting
        .as_ref()
        .unwrap()
        .remembered
        .get("d-1")
        .is_some());
    shard
        .cast(ShardMsg::Checkpointed {
            seq: checkpoint.seq,
        })
        .unwrap();
    let reply = |outcome: CommandOutcome| match outcome.result {
        Some(crate::cluster::wire::command_outcome::Result::Reply(bytes)) => {
            <Prost as crate::entity::Codec<SumState>>::decode(&bytes).unwrap()
        }
        other => panic!("not a reply: {other:?}"),
    };
    assert_eq!(
        reply(deposit.outcome().await.unwrap()),
        SumState { count: 1, sum: 100 }
    );
    assert_eq!(
        overdraw.outcome().await.unwrap().result,
        Some(crate::cluster::wire::command_outcome::Result::Refused(
            "insufficient funds".into()
        ))
    );

    // The deposit retried with its key (a new record, through another node): the first
    // answer, not a second deposit. A replayed record without a key: nothing.
    let (mut retry, mut replayed) = (env.commands.register(), env.commands.register());
    env.gate.acquire(2, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(vec![
            command(9, "acc", 100, retry.request, Some("d-1")),
            command(5, "acc", 100, replayed.request, None),
        ]))
        .unwrap();
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    shard
        .cast(ShardMsg::Checkpointed {
            seq: checkpoint.seq,
        })
        .unwrap();
    assert_eq!(
        reply(retry.outcome().await.unwrap()),
        SumState { count: 1, sum: 100 }
    );
    assert_eq!(ask(&shard, "acc").await, SumState { count: 1, sum: 100 });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        replayed.arrived().is_none(),
        "a keyless replay gets no answer"
    );
    shard.stop(None);
}

/// A command sent to the shard without a record (`commands::direct`): its answer as the
/// shard gives it, or `None` if the shard dropped it unanswered.
async fn direct<E: Entity>(
    shard: &ActorRef<ShardMsg<E>>,
    id: &str,
    value: &str,
    key: Option<&str>,
) -> tokio::sync::oneshot::Receiver<Direct> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    shard
        .cast(ShardMsg::Command(Box::new(DirectCommand {
            id: id.into(),
            value: value.as_bytes().to_vec(),
            idempotency_key: key.map(String::from),
            answer,
        })))
        .unwrap();
    answered
}

async fn commit(shard: &ActorRef<ShardMsg<Guarded>>) -> Checkpoint<SumState> {
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    shard
        .cast(ShardMsg::Checkpointed {
            seq: checkpoint.seq,
        })
        .unwrap();
    checkpoint
}

fn sum_of(answer: Direct) -> SumState {
    match answer {
        Direct::Answered(CommandOutcome {
            result: Some(crate::cluster::wire::command_outcome::Result::Reply(bytes)),
        }) => <Prost as crate::entity::Codec<SumState>>::decode(&bytes).unwrap(),
        other => panic!("not a reply: {other:?}"),
    }
}

#[tokio::test]
async fn a_direct_command_is_declined_until_the_shard_may_commit_it() {
    let env = env(100);
    let shard = start::<Guarded>(&env).await;
    assert_eq!(
        direct(&shard, "acc", "5", None).await.await.unwrap(),
        Direct::Declined,
        "restoring"
    );
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    assert_eq!(
        direct(&shard, "acc", "5", None).await.await.unwrap(),
        Direct::Declined,
        "nothing consumed: no offset whose generation fences the commit"
    );
    env.gate.acquire(1, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(events(&[(0, "other", 1)])))
        .unwrap();
    let answered = direct(&shard, "acc", "5", Some("k")).await;
    let checkpoint = commit(&shard).await;
    assert_eq!(
        checkpoint.commit_offset,
        Some(1),
        "its offset commits with it"
    );
    assert_eq!(
        sum_of(answered.await.unwrap()),
        SumState { count: 1, sum: 5 }
    );
    shard.call(ShardMsg::Drain, None).await.unwrap().unwrap();
    assert_eq!(
        direct(&shard, "acc", "5", Some("k")).await.await.unwrap(),
        Direct::Declined,
        "handing off: even a remembered key goes to the next owner as a record"
    );
    shard.stop(None);
}

#[tokio::test]
async fn a_direct_command_is_answered_after_its_commit_and_dropped_unanswered_with_its_shard() {
    let env = env(100);
    let shard = start::<Guarded>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    env.gate.acquire(1, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(events(&[(0, "acc", 100)])))
        .unwrap();
    env.commit_soon.take();
    let mut deposit = direct(&shard, "acc", "50", Some("d-1")).await;
    let overdraw = direct(&shard, "acc", "-500", None).await;
    let mut garbage = direct(&shard, "acc", "fifty", None).await;
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert!(env.commit_soon.is_wanted(), "answers owed");
    match garbage.try_recv() {
        Ok(Direct::Answered(outcome)) => assert!(
            matches!(&outcome.result, Some(crate::cluster::wire::command_outcome::Result::Failed(r)) if r.contains("does not decode")),
            "{outcome:?}"
        ),
        other => panic!("an undecodable command is answered at once: {other:?}"),
    }
    assert!(deposit.try_recv().is_err(), "no answer before the commit");
    let (_, stored) = &checkpoint.states[0];
    assert_eq!(stored.state, SumState { count: 2, sum: 150 });
    assert_eq!(stored.last_offset, 0, "a direct command has no offset");
    shard
        .cast(ShardMsg::Checkpointed {
            seq: checkpoint.seq,
        })
        .unwrap();
    assert_eq!(
        sum_of(deposit.await.unwrap()),
        SumState { count: 2, sum: 150 }
    );
    assert_eq!(
        overdraw.await.unwrap(),
        Direct::Answered(refused("insufficient funds"))
    );
    // The same key again, directly or as a record: the first answer, nothing more.
    let again = direct(&shard, "acc", "50", Some("d-1")).await;
    let mut as_record = env.commands.register();
    env.gate.acquire(1, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(vec![command(
            1,
            "acc",
            50,
            as_record.request,
            Some("d-1"),
        )]))
        .unwrap();
    commit(&shard).await;
    assert_eq!(
        sum_of(again.await.unwrap()),
        SumState { count: 2, sum: 150 }
    );
    assert!(as_record.outcome().await.is_some());
    assert_eq!(ask(&shard, "acc").await, SumState { count: 2, sum: 150 });
    // Applied, then the shard stops before a checkpoint commits it: the caller is told at
    // once (the oneshot closes) instead of waiting out its timeout.
    let lost = direct(&shard, "acc", "1", None).await;
    shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    shard.stop(None);
    assert!(lost.await.is_err(), "dropped unanswered");
}

fn refused(reason: &str) -> CommandOutcome {
    CommandOutcome {
        result: Some(crate::cluster::wire::command_outcome::Result::Refused(
            reason.into(),
        )),
    }
}

/// Sends each positive event on as a message to entity "to-<value>" of its own type, sends
/// one to a type the node does not host, and emits a record.
struct Relay;

impl Entity for Relay {
    type Event = SumState;
    type State = SumState;
    type Query = SumState;
    type Reply = SumState;
    type Codec = Prost;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<SumState, Rejection> {
        Ok(<Prost as crate::entity::Codec<SumState>>::decode(
            value.unwrap_or_default(),
        )?)
    }
    fn apply(state: &mut SumState, event: &SumState) {
        state.count += 1;
        state.sum += event.sum;
    }
    fn query(state: &SumState, _: &SumState) -> SumState {
        state.clone()
    }
    fn handle(state: &mut SumState, event: &SumState, effects: &mut Effects<'_, Self>) {
        Self::apply(state, event);
        if event.sum > 0 {
            let forward = SumState {
                count: 0,
                sum: -event.sum,
            };
            effects.send(format!("to-{}", event.sum), forward.clone());
            effects.send_to::<Guarded>("elsewhere", 1);
            effects.emit("relayed", Some(effects.id().as_bytes()), Some(vec![7]));
        }
    }
}

#[tokio::test]
async fn messages_and_emitted_records_leave_with_the_checkpoint_and_a_bad_one_is_dead_lettered() {
    let mut destinations = crate::effects::Destinations::default();
    destinations.add(std::any::TypeId::of::<Relay>(), "relay-input", 8);
    let env = Arc::new(ShardEnv {
        destinations: Arc::new(destinations),
        ..Arc::into_inner(env(100)).unwrap()
    });
    let shard = start::<Relay>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    env.gate.acquire(1, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(vec![ConsumedRecord {
            offset: 4,
            at_ms: 0,
            content: RecordContent::Event("a".into(), SumState { count: 0, sum: 5 }),
        }]))
        .unwrap();
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.states.len(), 1);
    let mut records = Vec::new();
    let mut letters = Vec::new();
    for outgoing in checkpoint.outgoing {
        match outgoing {
            Outgoing::Record(r) => records.push(*r),
            Outgoing::DeadLetter(l) => letters.push(*l),
            Outgoing::Reroute(_) => panic!("nothing to re-route"),
        }
    }
    assert_eq!(records.len(), 2, "the message and the emitted record");
    let message = &records[0];
    assert_eq!(message.topic, "relay-input");
    assert_eq!(message.partition, Some(partition_for_key(b"to-5", 8)));
    assert_eq!(message.key.as_deref(), Some(&b"to-5"[..]));
    assert_eq!(
        <Prost as crate::entity::Codec<SumState>>::decode(message.value.as_deref().unwrap()),
        Ok(SumState { count: 0, sum: -5 })
    );
    assert_eq!(
        message.headers,
        vec![(HEADER_MESSAGE_FROM, "input/a".to_string())]
    );
    let emitted = &records[1];
    assert_eq!(
        (
            emitted.topic.as_str(),
            emitted.partition,
            emitted.key.as_deref()
        ),
        ("relayed", None, Some(&b"a"[..]))
    );
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("a type this node does not host"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].source_offset, 4);
    shard.stop(None);
}

/// Sets a timer "ring" at its input's time + n ms for a positive n (its message: -1),
/// cancels it on 0, and counts the rings (negative inputs).
struct Alarm;

impl Entity for Alarm {
    type Event = i64;
    type State = SumState;
    type Query = SumState;
    type Reply = SumState;
    type Codec = Prost;

    fn decode(id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
        Sum::decode(id, value)
    }
    fn apply(state: &mut SumState, event: &i64) {
        Sum::apply(state, event)
    }
    fn query(state: &SumState, _: &SumState) -> SumState {
        state.clone()
    }
    fn handle(state: &mut SumState, event: &i64, effects: &mut Effects<'_, Self>) {
        match *event {
            0 => effects.cancel_timer("ring"),
            n if n > 0 => effects
                .set_timer("ring", effects.now_ms() + n, -1)
                .expect("within the limits"),
            n => Self::apply(state, &n),
        }
    }
}

/// The records a checkpoint writes for entities' effects.
fn records<S>(checkpoint: Checkpoint<S>) -> Vec<OutRecord> {
    checkpoint
        .outgoing
        .into_iter()
        .filter_map(|o| match o {
            Outgoing::Record(r) => Some(*r),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_timer_fires_once_when_due_from_the_state_that_holds_it_and_a_cancelled_one_never() {
    let env = env(100);
    let shard = start::<Alarm>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    // Inputs stamped 10 s ago: "a" rings 10.1 s after its input (100 ms from now), "b"
    // too but is cancelled, "c" is set for a day and then reset to ring with "a".
    let then = unix_ms() - 10_000;
    let input = |offset, id: &str, n| ConsumedRecord {
        offset,
        at_ms: then,
        content: RecordContent::Event(id.into(), n),
    };
    env.gate.acquire(5, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(vec![
            input(1, "a", 10_100),
            input(2, "b", 10_100),
            input(3, "b", 0),
            input(4, "c", 86_400_000),
            input(5, "c", 10_100),
        ]))
        .unwrap();
    let checkpoint = |shard: ActorRef<ShardMsg<Alarm>>| async move {
        shard
            .call(ShardMsg::Checkpoint, None)
            .await
            .unwrap()
            .unwrap()
    };
    let first = checkpoint(shard.clone()).await;
    let pending = |c: &Checkpoint<SumState>, id: &str| {
        let (_, stored) = c.states.iter().find(|(i, _)| i == id).unwrap();
        stored.acting.as_ref().map_or(0, |a| a.timers.len())
    };
    assert_eq!(
        (
            pending(&first, "a"),
            pending(&first, "b"),
            pending(&first, "c")
        ),
        (1, 0, 1),
        "the timers travel in the states"
    );
    let seq = first.seq;
    assert!(records(first).is_empty(), "nothing is due yet");
    shard.cast(ShardMsg::Checkpointed { seq }).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fired = checkpoint(shard.clone()).await;
    let seq = fired.seq;
    assert_eq!(fired.states.len(), 2, "a and c lost their timers");
    assert!(fired.states.iter().all(|(_, s)| s.acting.is_none()));
    let mut rings = records(fired);
    rings.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(rings.len(), 2, "a and c rang, b was cancelled");
    for (ring, id) in rings.iter().zip(["a", "c"]) {
        assert_eq!(ring.topic, "input");
        assert_eq!(ring.partition, Some(3), "the entity's own partition");
        assert_eq!(ring.key.as_deref(), Some(id.as_bytes()));
        assert_eq!(
            <Prost as crate::entity::Codec<i64>>::decode(ring.value.as_deref().unwrap()),
            Ok(-1)
        );
        assert_eq!(
            ring.headers,
            vec![
                (HEADER_MESSAGE_FROM, format!("input/{id}")),
                (HEADER_TIMER, "ring".to_string())
            ]
        );
    }
    shard.cast(ShardMsg::Checkpointed { seq }).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(records(checkpoint(shard.clone()).await).is_empty(), "once");
    assert_eq!(env.stats.timers_fired.get(), 2);
    shard.stop(None);

    // A restored state with an overdue timer (a standby's, a new owner's): it fires at once.
    let mut overdue = Stored::new(SumState::default(), 9);
    overdue
        .acting
        .get_or_insert_default()
        .timers
        .set(PendingTimer::new("late", then, &[], None));
    let shard = start::<Alarm>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: [("d".into(), overdue)].into_iter().collect(),
            timers: true,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let restored = checkpoint(shard.clone()).await;
    assert_eq!(restored.states.len(), 1);
    let rings = records(restored);
    assert_eq!(rings.len(), 1);
    assert_eq!(rings[0].headers[1], (HEADER_TIMER, "late".to_string()));
    shard.stop(None);
}

#[tokio::test]
async fn a_timer_set_by_a_command_run_without_a_record_fires_when_due() {
    let env = env(100);
    let shard = start::<Alarm>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    env.gate.acquire(1, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(vec![ConsumedRecord {
            offset: 0,
            at_ms: unix_ms(),
            content: RecordContent::Event("other".into(), -1),
        }]))
        .unwrap();
    // Its clock is the owner's: the timer is due 100 ms from now. No record follows that
    // would wake the shard: the command itself must arm the wake-up.
    let set = direct(&shard, "a", "100", None).await;
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    shard
        .cast(ShardMsg::Checkpointed {
            seq: checkpoint.seq,
        })
        .unwrap();
    assert!(matches!(set.await, Ok(Direct::Answered(_))));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fired = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    let rings = records(fired);
    assert_eq!(rings.len(), 1, "the timer fired");
    assert_eq!(rings[0].key.as_deref(), Some(&b"a"[..]));
    shard.stop(None);
}

async fn counts<E: Entity>(shard: &ActorRef<ShardMsg<E>>) -> EntityCounts {
    shard
        .call(ShardMsg::EntityCounts, None)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_shard_runs_its_entities_in_partition_order_and_skips_replays() {
    let env = env(100);
    let shard = start::<Sum>(&env).await;
    // Consumed before the restore: waits, then runs on top of the restored states.
    env.gate.acquire(3, Duration::ZERO);
    shard
        .cast(ShardMsg::Consumed(events(&[
            (10, "a", 5),
            (11, "b", 7),
            (12, "a", 1),
        ])))
        .unwrap();
    let restored = EntityMap::from_iter([(
        EntityId::from("a"),
        // Offset 10 is already in this state: a replay.
        Stored::new(SumState { count: 1, sum: 100 }, 10),
    )]);
    shard
        .cast(ShardMsg::Restored {
            states: restored,
            timers: false,
        })
        .unwrap();
    assert_eq!(ask(&shard, "a").await, SumState { count: 2, sum: 101 });
    assert_eq!(ask(&shard, "b").await, SumState { count: 1, sum: 7 });
    assert_eq!(ask(&shard, "never").await, SumState::default());
    assert_eq!(env.gate.in_flight(), 0, "the batch released its window");
    assert_eq!(env.stats.events_skipped_replayed.get(), 1);
    assert_eq!(env.stats.events_processed_local.get(), 2);
    assert_eq!(
        env.changed_states.load(Ordering::Relaxed),
        2,
        "two states wait for the next checkpoint, and the consumer is told"
    );

    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.commit_offset, Some(13));
    let mut states = checkpoint.states;
    states.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        states,
        vec![
            ("a".into(), Stored::new(SumState { count: 2, sum: 101 }, 12)),
            ("b".into(), Stored::new(SumState { count: 1, sum: 7 }, 11)),
        ]
    );
    shard
        .cast(ShardMsg::Checkpointed {
            seq: checkpoint.seq,
        })
        .unwrap();
    let next = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert!(
        next.is_empty(),
        "nothing changed since the committed checkpoint"
    );
    let _ = shard.call(ShardMsg::Drain, None).await.unwrap();
    shard.stop(None);
}

#[tokio::test]
async fn the_live_cap_passivates_the_least_recently_active_and_keeps_their_state() {
    let env = env(2);
    let shard = start::<Sum>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    shard
        .cast(ShardMsg::Consumed(events(&[
            (0, "a", 1),
            (1, "b", 2),
            (2, "c", 3),
            (3, "d", 4),
        ])))
        .unwrap();
    let after = counts(&shard).await;
    assert_eq!((after.live, after.known), (2, 4));
    assert_eq!(env.live_entities.load(Ordering::Relaxed), 2);
    assert_eq!(env.stats.entities_passivated.get(), 2);
    // A query brings a passivated entity back, with its state, and passivates another.
    assert_eq!(ask(&shard, "a").await, SumState { count: 1, sum: 1 });
    let after = counts(&shard).await;
    assert_eq!((after.live, after.known), (2, 4));
    assert_eq!(env.stats.entities_passivated.get(), 3);
    shard.stop(None);
}

#[tokio::test]
async fn an_apply_that_panics_dead_letters_its_event_and_the_shard_goes_on() {
    let env = env(100);
    let shard = start::<Unlucky>(&env).await;
    shard
        .cast(ShardMsg::Restored {
            states: EntityMap::default(),
            timers: false,
        })
        .unwrap();
    shard
        .cast(ShardMsg::Consumed(events(&[
            (0, "a", 1),
            (1, "a", 13),
            (2, "a", 2),
            (3, "b", 13),
        ])))
        .unwrap();
    // The half-applied event's count stays (no rollback), its sum does not.
    assert_eq!(ask(&shard, "a").await, SumState { count: 3, sum: 3 });
    let checkpoint = shard
        .call(ShardMsg::Checkpoint, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        checkpoint.commit_offset,
        Some(4),
        "the poison events count as done"
    );
    let letters: Vec<_> = checkpoint
        .outgoing
        .iter()
        .map(|o| match o {
            Outgoing::DeadLetter(letter) => letter,
            other => panic!("only dead letters expected, got {other:?}"),
        })
        .collect();
    assert_eq!(letters.len(), 2);
    assert_eq!(
        (letters[0].key.as_deref(), letters[0].source_offset),
        (Some(&b"a"[..]), 1)
    );
    assert_eq!(
        (
            letters[1].source_topic.as_str(),
            letters[1].source_partition
        ),
        ("input", 3)
    );
    assert!(
        letters[0].reason.contains("unlucky number"),
        "{}",
        letters[0].reason
    );
    assert_eq!(env.stats.dead_lettered.get(), 2);
    // Replayed (a crash before this checkpoint committed), the poison event is skipped with
    // the state that recorded it.
    let b = checkpoint.states.iter().find(|(id, _)| id == "b").unwrap();
    assert_eq!(b.1.last_offset, 3);
    assert_eq!(b.1.state, SumState { count: 1, sum: 0 });
    shard.stop(None);
}
