//! What the runtime keeps for an entity that acts, beside its state: its answers to recent
//! commands with idempotency keys (`commands::remembered`) and its pending timers (`timers`).
//! Written in the entity's changelog record with the state (`changelog::encode`), so both
//! move and commit with it; an entity that never acted has none and pays one pointer.

use prost::Message;

use crate::cluster::wire::ActingState;
use crate::commands::Remembered;
use crate::entity::DecodeError;
use crate::timers::Timers;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Acting {
    pub remembered: Remembered,
    pub timers: Timers,
}

impl Acting {
    pub fn is_empty(&self) -> bool {
        self.remembered.is_empty() && self.timers.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        ActingState {
            answers: self.remembered.to_wire(),
            timers: self.timers.to_wire(),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let wire = ActingState::decode(bytes)
            .map_err(|e| DecodeError(format!("remembered answers and timers: {e}")))?;
        Ok(Self {
            remembered: Remembered::from_wire(wire.answers),
            timers: Timers::from_wire(wire.timers),
        })
    }
}
