//! An actor-sharding cluster runtime aligned with Kafka.
//!
//! Every node of a cluster consumes each entity type's input topic in that type's consumer group
//! (a node hosts one type or several, side by side: [`Node::host`] once per type). Shard id
//! == Kafka partition, so each entity lives on the node that consumes its key's partition and
//! processing never crosses the network; any node answers queries for any entity by routing to
//! the node that hosts it, during and after rebalances. Entity state is durable and every event
//! counts exactly once: changed states, consumed offsets, re-routed records and dead letters
//! commit in one Kafka transaction per checkpoint, and a new owner restores exactly what was
//! committed. Nodes survive broker outages and fencing, and take no partitions until admitted
//! to the cluster.
//!
//! An application writes an [`Entity`] (a deterministic state machine: decode a record, apply
//! an event, answer a query), hosts it on a [`Node`] (in three lines with [`app::run`]) and
//! asks it through [`Entities`], or from outside with no code at all: every node answers
//! `POST /entities/<type>/<id>` on its management port and `Entities/Ask` on its gRPC port for
//! every hosted type, routed to the owner. An entity that *acts* writes [`Entity::handle`] too:
//! through [`Effects`] it answers commands ([`Entities::command`], answered once the change is
//! committed, once per idempotency key), messages other entities, emits records to any topic
//! and sets durable timers, each exactly once with the state change that caused it (the
//! example on [`Effects`]; the accounts application in the repository). [`KeyedProducer`]
//! writes the input on the entities' shards; `testkit` (feature `testkit`) drives an entity in
//! memory for tests; [`Entity::STATE_VERSION`] and [`Entity::migrate`] evolve its state (a state
//! a build cannot read is refused, never skipped).
//!
//! ```
//! use kafka_sharding::app::{run, TypeArgs};
//! use kafka_sharding::{Entity, Json, Rejection};
//! use serde::{Deserialize, Serialize};
//!
//! /// Per key: how many events, and the sum of their values (numbers as text).
//! struct Counter;
//!
//! #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
//! struct Count { events: i64, sum: i64 }
//!
//! impl Entity for Counter {
//!     type Event = i64;
//!     type State = Count;
//!     type Query = ();
//!     type Reply = Count;
//!     type Codec = Json; // the changelog, the network and the generic routes speak JSON
//!
//!     fn decode(_id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
//!         Ok(std::str::from_utf8(value.unwrap_or_default())?.trim().parse()?)
//!     }
//!     fn apply(count: &mut Count, value: &i64) {
//!         count.events += 1;
//!         count.sum += value;
//!     }
//!     fn query(count: &Count, _: &()) -> Count {
//!         count.clone()
//!     }
//! }
//!
//! /// The node: `counter 1 --topic counter-events --group counters`; then
//! /// `curl -X POST localhost:8551/entities/counters/key-7 -d null` answers `{"events":..}`.
//! fn main() -> std::process::ExitCode {
//!     run("counter", |node, counters: TypeArgs| {
//!         let handle = node.host::<Counter>(counters.entity_type());
//!         // `handle.ask("key-7", ()).await` answers from any node, once the node runs.
//!         drop(handle);
//!         Ok(())
//!     })
//! }
//! # let _ = main; // not run here: it would start a node
//!
//! let mut count = Count::default();
//! Counter::apply(&mut count, &Counter::decode("key-7", Some(b"5")).unwrap());
//! assert_eq!(count, Count { events: 1, sum: 5 });
//! assert!(Counter::decode("key-7", Some(b"five")).is_err()); // a dead letter, with the reason
//! ```
//!
//! In a test, without a broker: `testkit::TestKit::<Counter>::new()` (feature `testkit`) takes
//! records, events, commands and a virtual clock, and shows states, answers and effects.
//!
//! Internals (`docs/ARCHITECTURE.md` maps them): the consumer thread and its rebalance
//! callbacks drive the hand-off protocol; shard actors hold their entities as cells and run
//! their events; a checkpoint thread commits the transactions; the restorer reads changelogs;
//! the gateway (the only remotable actor) answers peers; the management HTTP server serves
//! `/alive`, `/ready`, `/metrics` and `/cluster/*`.

#![warn(missing_docs)]

mod acting;
mod allocation;
pub mod app;
mod ask_bytes;
mod backpressure;
mod changelog;
mod cli;
mod cluster;
mod commands;
mod commit_soon;
mod consumer;
mod dlq;
mod effects;
pub mod entities_service;
mod entity;
mod fencing;
mod grpc;
mod handoff;
mod http;
mod kafka_admin;
mod kafka_batch;
mod kafka_config;
mod kafka_health;
mod lag;
pub mod logging;
mod memory;
mod metrics;
mod node;
pub mod owners;
pub mod partitioner;
mod producer;
mod readiness;
mod restore;
mod routing;
mod shard;
mod standby;
mod stats;
#[cfg(feature = "testkit")]
pub mod testkit;
mod timers;

pub use changelog::{
    decode_value as decode_changelog_value, CHANGELOG_READER_DEFAULTS, CHANGELOG_TOPIC_CONFIG,
};
pub use cli::{KafkaClientArgs, NodeArgs, NodeConfig, Ports, DEFAULT_COOKIE};
pub use cluster::endpoint::CallError;
pub use cluster::tls::{NodeTls, NodeTlsError, NodeTlsFiles};
pub use commands::{CommandError, MAX_IDEMPOTENCY_KEY_BYTES};
pub use consumer::checkpoint::{delivered, CHECKPOINT_PRODUCER_DEFAULTS};
pub use effects::Effects;
#[cfg(feature = "json")]
pub use entity::Json;
pub use entity::{
    Codec, DecodeError, EncodeError, Entity, EntityId, Prost, Rejection, MAX_ID_BYTES,
};
pub use grpc::GrpcService;
pub use kafka_config::{
    ClientKind, KafkaConfigError, KafkaConnection, KafkaProperties, KafkaProperty,
};
pub use node::{Entities, EntityType, Node, NodeError};
pub use producer::{KeyedProducer, ProducerError};
pub use routing::{AskError, Consistency, Route};
pub use standby::Staleness;
pub use timers::{TimerError, MAX_TIMERS_PER_ENTITY, MAX_TIMER_DELAY, MAX_TIMER_NAME_BYTES};

/// Kafka topic administration an application's producer may need.
pub mod admin {
    pub use crate::kafka_admin::{ensure_topic, AdminError};
}

/// Dead letters: the records an entity type could not process, with the reason and their origin
/// (the `dead-letters` binary lists and replays them).
pub mod dead_letters {
    pub use crate::dlq::{DeadLetter, NotADeadLetter};
}

/// Header names on the records the runtime writes.
pub mod headers {
    pub use crate::changelog::{
        HEADER_FORMAT as CHANGELOG_FORMAT, HEADER_INPUT_TOPIC as CHANGELOG_INPUT_TOPIC,
    };
    pub use crate::consumer::checkpoint::HEADER_REROUTED_FROM as REROUTED_FROM;
    pub use crate::dlq::{
        HEADER_OFFSET as DLQ_OFFSET, HEADER_PARTITION as DLQ_PARTITION,
        HEADER_REASON as DLQ_REASON, HEADER_TOPIC as DLQ_TOPIC,
    };
    pub use crate::effects::HEADER_MESSAGE_FROM as MESSAGE_FROM;
    pub use crate::timers::HEADER_TIMER as TIMER;
}
