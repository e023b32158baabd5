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

    /// The runtime's part of a changelog value: `acting` (if any) and the version of the
    /// state encoding beside it (left out when 1).
    pub fn encode(acting: Option<&Self>, state_version: u32) -> Vec<u8> {
        ActingState {
            answers: acting.map(|a| a.remembered.to_wire()).unwrap_or_default(),
            timers: acting.map(|a| a.timers.to_wire()).unwrap_or_default(),
            state_version: if state_version == 1 { 0 } else { state_version },
        }
        .encode_to_vec()
    }

    /// What [`Acting::encode`] wrote, and the state's version.
    pub fn decode(bytes: &[u8]) -> Result<(Self, u32), DecodeError> {
        let wire = ActingState::decode(bytes)
            .map_err(|e| DecodeError(format!("remembered answers and timers: {e}")))?;
        let acting = Self {
            remembered: Remembered::from_wire(wire.answers),
            timers: Timers::from_wire(wire.timers),
        };
        Ok((acting, wire.state_version.max(1)))
    }
}
