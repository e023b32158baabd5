//! The counter entity: per key, how many events and the sum of their values (records whose
//! value is a decimal number; anything else is dead-lettered).

use kafka_sharding::{Entity, Json, Rejection};
use serde::{Deserialize, Serialize};

/// The entity type: one counter per record key.
pub struct Counter;

/// A counter's state, and the answer to a query.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub events: u64,
    pub sum: i64,
}

impl Entity for Counter {
    type Event = i64;
    type State = Count;
    type Query = ();
    type Reply = Count;
    type Codec = Json;

    fn decode(_id: &str, value: Option<&[u8]>) -> Result<i64, Rejection> {
        Ok(std::str::from_utf8(value.unwrap_or_default())?
            .trim()
            .parse()?)
    }
    fn apply(count: &mut Count, value: &i64) {
        count.events += 1;
        count.sum += value;
    }
    fn query(count: &Count, _: &()) -> Count {
        count.clone()
    }
}
