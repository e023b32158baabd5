//! What an application writes: an [`Entity`] type (a pure state machine the runtime drives),
//! and the codecs its state, queries and replies cross the changelog and the network with.

use std::collections::HashMap;
use std::fmt;

use crate::acting::Acting;
use crate::effects::Effects;

/// An entity's id: the Kafka record key, as UTF-8 text. Ids up to 24 bytes are stored inline
/// (no allocation per event or per restored entity).
pub type EntityId = compact_str::CompactString;

/// A map keyed by entity id, hashed with foldhash (seeded per map): SipHash on ids was a
/// visible part of restoring and dispatching.
pub(crate) type EntityMap<V> = HashMap<EntityId, V, foldhash::fast::RandomState>;

/// Longest accepted entity id in bytes, for records (longer keys are dead-lettered) and queries.
pub const MAX_ID_BYTES: usize = 256;

/// One type of sharded entity: a deterministic state machine over the events of its input
/// topic, queried by id from any node.
///
/// The runtime owns everything else: the consumer group, the shard (= partition) placement,
/// running each entity's events one at a time in partition order, passivation, the changelog and checkpoint transactions that
/// make every event count exactly once, hand-off and restore, routing a query to the node that
/// hosts the entity, and dead letters. Because [`Entity::apply`] is pure and synchronous, the
/// runtime can batch, skip replays by offset and restore from the changelog without asking the
/// application; side effects belong in another topic or service, not in `apply`.
///
/// The entity's id is the record key; the runtime partitions ids with Kafka's Java murmur2, so
/// records written by any Kafka producer with the default partitioner land on the entity's
/// shard. Records without a key, with a key that is not UTF-8 or longer than [`MAX_ID_BYTES`]
/// are dead-lettered by the runtime before [`Entity::decode`] sees them.
pub trait Entity: Sized + Send + Sync + 'static {
    /// One validated input record.
    type Event: Send + 'static;
    /// Everything durable about one entity. `Default` is the state before its first event.
    type State: Default + Clone + Send + Sync + 'static;
    /// A question about one entity.
    type Query: Clone + Send + Sync + 'static;
    /// The answer to a [`Entity::Query`].
    type Reply: Send + 'static;
    /// How states (changelog), queries and replies (between nodes) become bytes.
    type Codec: Codec<Self::State> + Codec<Self::Query> + Codec<Self::Reply>;

    /// Turns a record value into an event, or rejects it with the reason that goes to the
    /// dead-letter topic. `id` is the record key.
    fn decode(id: &str, value: Option<&[u8]>) -> Result<Self::Event, Rejection>;

    /// Applies one event. Must be deterministic: the runtime replays events after a crash and
    /// relies on the same events giving the same state. Each event is applied exactly once.
    fn apply(state: &mut Self::State, event: &Self::Event);

    /// Answers a query from the entity's current state (the default state for an entity that
    /// never had an event).
    fn query(state: &Self::State, query: &Self::Query) -> Self::Reply;

    /// Runs one input that may act: an event read from the input topic, a message from another
    /// entity ([`Effects::send`]), or a command sent with [`crate::Entities::command`]
    /// ([`Effects::is_command`]), which the entity answers with [`Effects::reply`] or
    /// [`Effects::refuse`] from the state as it is now. The caller gets that answer once the
    /// change is committed; messages and emitted records ([`Effects::emit`]) leave with the
    /// same commit. Deterministic and exactly once, like `apply`; the default applies the event
    /// (entities that never act need not write it).
    fn handle(state: &mut Self::State, event: &Self::Event, effects: &mut Effects<'_, Self>) {
        let _ = effects;
        Self::apply(state, event);
    }

    /// The version of [`Entity::State`]'s encoding this build writes, stored with every state
    /// in the changelog. Raise it when a state written by the previous build no longer
    /// decodes as the new one (a changed field type, a renamed required field), and upcast the
    /// older ones in [`Entity::migrate`]. Changes the codec reads anyway (a field added to a
    /// protobuf message) need no new version.
    const STATE_VERSION: u32 = 1;

    /// Upcasts a state written by an older build (`version` < [`Entity::STATE_VERSION`]) from
    /// its bytes: the runtime calls it while restoring and warming standbys, and writes the
    /// state in the current version the next time the entity changes. The default migrates
    /// nothing: a shard whose changelog holds an older state then refuses to restore (it
    /// processes nothing and answers no query, the node reports not ready with the reason)
    /// rather than starting its entities from an older or default state.
    fn migrate(version: u32, bytes: &[u8]) -> Result<Self::State, DecodeError> {
        let _ = bytes;
        Err(DecodeError(format!(
            "no migration from state version {version} (Entity::migrate)"
        )))
    }
}

/// Why a record cannot become an event; it is written to the dead-letter topic with this text
/// in the `dlq.reason` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl Rejection {
    /// A rejection with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Rejection {
    fn from(error: E) -> Self {
        Self(error.to_string())
    }
}

/// Bytes that do not decode as the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// A value its codec cannot write (e.g. a map with non-string keys in JSON).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

/// Encodes and decodes values of `T`. One codec type serves an entity's state, queries and
/// replies ([`Entity::Codec`]); [`Prost`] covers protobuf messages, [`Json`] (feature `json`)
/// serde types.
///
/// Encoding may fail; the runtime then reports it where it happened and loses nothing: a
/// message or timer that does not encode dead-letters its input, a reply that does not encode
/// fails the command, a state that does not encode stops its shard before its checkpoint
/// (nothing of that shard is committed; the node reports not ready with the reason).
pub trait Codec<T> {
    /// The bytes of `value`.
    fn encode(value: &T) -> Result<Vec<u8>, EncodeError>;
    /// The value in `bytes`.
    fn decode(bytes: &[u8]) -> Result<T, DecodeError>;
}

/// The codec for types deriving `prost::Message` (from a `.proto` file or by hand).
pub struct Prost;

impl<T: prost::Message + Default> Codec<T> for Prost {
    fn encode(value: &T) -> Result<Vec<u8>, EncodeError> {
        Ok(value.encode_to_vec())
    }
    fn decode(bytes: &[u8]) -> Result<T, DecodeError> {
        T::decode(bytes).map_err(|e| DecodeError(e.to_string()))
    }
}

/// The codec for serde types, as JSON (feature `json`): readable in the changelog, in
/// `kafka-console-consumer` and through the generic query routes (`curl` sends and shows
/// JSON).
#[cfg(feature = "json")]
pub struct Json;

#[cfg(feature = "json")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for Json {
    fn encode(value: &T) -> Result<Vec<u8>, EncodeError> {
        serde_json::to_vec(value).map_err(|e| EncodeError(e.to_string()))
    }
    fn decode(bytes: &[u8]) -> Result<T, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))
    }
}

/// An entity's state with the input offset it reflects. The replay rule lives here, in the
/// runtime, so no application can break it: an event at or below `last_offset` is already in
/// the state (a replay after a crash or hand-off, where states may be ahead of the committed
/// offsets) and is skipped.
///
/// An entity that acts also keeps what the runtime needs for it (`acting`): its recent
/// answers to commands with idempotency keys (a retried command is answered from them instead
/// of being applied again, on this node or the next owner) and its pending timers, written
/// with its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored<S> {
    pub state: S,
    /// Offset of the last applied event of the entity's partition; -1 before the first.
    pub last_offset: i64,
    /// Remembered answers and pending timers (`None`: none; most entities).
    pub acting: Option<Box<Acting>>,
}

impl<S: Default> Default for Stored<S> {
    fn default() -> Self {
        Self {
            state: S::default(),
            last_offset: -1,
            acting: None,
        }
    }
}

impl<S> Stored<S> {
    /// A state without remembered answers or timers.
    pub fn new(state: S, last_offset: i64) -> Self {
        Self {
            state,
            last_offset,
            acting: None,
        }
    }

    /// Runs the event at `offset` unless the state already includes it; returns whether it
    /// ran.
    pub fn apply<E: Entity<State = S>>(
        &mut self,
        offset: i64,
        event: &E::Event,
        effects: &mut Effects<'_, E>,
    ) -> bool {
        if offset <= self.last_offset {
            return false;
        }
        E::handle(&mut self.state, event, effects);
        self.last_offset = offset;
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal entity for the runtime's unit tests: sums numbers written as text.
    pub struct Sum;

    impl Entity for Sum {
        type Event = i64;
        type State = SumState;
        type Query = SumState;
        type Reply = SumState;
        type Codec = Prost;

        fn decode(_id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
            let text = std::str::from_utf8(value.unwrap_or_default())?;
            Ok(text.parse()?)
        }
        fn apply(state: &mut SumState, event: &i64) {
            state.count += 1;
            state.sum += event;
        }
        fn query(state: &SumState, _: &SumState) -> SumState {
            state.clone()
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SumState {
        #[prost(int64, tag = "1")]
        pub count: i64,
        #[prost(int64, tag = "2")]
        pub sum: i64,
    }

    #[test]
    fn replayed_offsets_are_not_applied_again() {
        let mut s = Stored::<SumState>::default();
        let run = |s: &mut Stored<SumState>, offset, event| {
            s.apply::<Sum>(offset, &event, &mut Effects::new("k", 0, offset, 0, false))
        };
        assert!(run(&mut s, 10, 100));
        assert!(run(&mut s, 12, 5));
        assert!(!run(&mut s, 12, 5), "same offset again");
        assert!(!run(&mut s, 10, 100), "older offset");
        assert_eq!(s.state, SumState { count: 2, sum: 105 });
        assert_eq!(s.last_offset, 12);
    }

    #[test]
    fn rejections_carry_the_reason() {
        assert_eq!(Sum::decode("k", Some(b"12")), Ok(12));
        let rejected = Sum::decode("k", Some(b"twelve")).unwrap_err();
        assert!(rejected.0.contains("invalid digit"), "{rejected}");
    }
}
