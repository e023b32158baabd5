//! Device telemetry, the second application on the `kafka-sharding` runtime (the first is the
//! purchase sample in `processor`): devices send readings keyed by device id; each device
//! entity keeps statistics over every reading and a bounded window of the most recent ones; a
//! gRPC query asks for a summary of the last N readings with a threshold.
//!
//! - [`Devices`]: the entity (decode a reading, apply it, answer a [`Window`] query);
//! - [`service`]: the gRPC `telemetry.DeviceTelemetry` service;
//! - [`pb`]: the generated protobuf types (the record value, the gRPC contract).

pub mod service;

use kafka_sharding::{Entity, Prost, Rejection};
use prost::Message;

/// Generated protobuf types: the record value [`pb::Reading`] and the gRPC contract.
pub mod pb {
    tonic::include_proto!("telemetry");
}

/// Encoded `FileDescriptorSet` of `telemetry.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("telemetry_descriptor");

/// Readings kept per device for window queries.
pub const WINDOW: usize = 32;

/// The largest magnitude of a reading (thousandths): sums over billions of readings stay
/// within 64 bits.
pub const MAX_MAGNITUDE_MILLI: i64 = 1_000_000_000_000;

/// The entity type: one per device, keyed by device id.
pub struct Devices;

/// A validated reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub at_ms: i64,
    pub value_milli: i64,
}

/// A device's state: statistics over every reading and the last [`WINDOW`] values.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct DeviceState {
    #[prost(uint64, tag = "1")]
    pub readings: u64,
    #[prost(sint64, tag = "2")]
    pub min_milli: i64,
    #[prost(sint64, tag = "3")]
    pub max_milli: i64,
    #[prost(sint64, tag = "4")]
    pub sum_milli: i64,
    #[prost(int64, tag = "5")]
    pub last_at_ms: i64,
    /// Oldest first, at most [`WINDOW`].
    #[prost(sint64, repeated, tag = "6")]
    pub window: Vec<i64>,
}

/// A query: summarise the last `last` readings (1 to [`WINDOW`]; 0 means all kept) and count
/// those above `above_milli`.
#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct Window {
    #[prost(uint32, tag = "1")]
    pub last: u32,
    #[prost(sint64, tag = "2")]
    pub above_milli: i64,
}

/// Why a record's value is not a reading (the runtime has checked its key already).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedReading {
    #[error("record has no value")]
    MissingValue,
    #[error("value is not a telemetry.Reading protobuf: {0}")]
    Undecodable(String),
    #[error("key '{key}' and the value's device_id '{device_id}' differ")]
    KeyMismatch { key: String, device_id: String },
    #[error("value {0} is beyond +/-{MAX_MAGNITUDE_MILLI} thousandths")]
    OutOfRange(i64),
}

/// Decodes and validates a record value keyed by `device_id`.
pub fn decode_reading(device_id: &str, value: Option<&[u8]>) -> Result<Reading, MalformedReading> {
    let value = value.ok_or(MalformedReading::MissingValue)?;
    let reading =
        pb::Reading::decode(value).map_err(|e| MalformedReading::Undecodable(e.to_string()))?;
    if reading.device_id != device_id {
        return Err(MalformedReading::KeyMismatch {
            key: device_id.to_owned(),
            device_id: reading.device_id,
        });
    }
    if reading.value_milli.unsigned_abs() > MAX_MAGNITUDE_MILLI as u64 {
        return Err(MalformedReading::OutOfRange(reading.value_milli));
    }
    Ok(Reading {
        at_ms: reading.at_ms,
        value_milli: reading.value_milli,
    })
}

impl Window {
    /// How many readings the query covers, or why it is invalid.
    pub fn span(&self) -> Result<usize, String> {
        match self.last as usize {
            0 => Ok(WINDOW),
            n if n <= WINDOW => Ok(n),
            n => Err(format!("last is {n}; at most {WINDOW} readings are kept")),
        }
    }
}

impl Entity for Devices {
    type Event = Reading;
    type State = DeviceState;
    type Query = Window;
    type Reply = pb::DeviceStatsReply;
    type Codec = Prost;

    fn decode(device_id: &str, value: Option<&[u8]>) -> Result<Reading, Rejection> {
        Ok(decode_reading(device_id, value)?)
    }

    fn apply(state: &mut DeviceState, reading: &Reading) {
        let v = reading.value_milli;
        if state.readings == 0 {
            (state.min_milli, state.max_milli) = (v, v);
        } else {
            state.min_milli = state.min_milli.min(v);
            state.max_milli = state.max_milli.max(v);
        }
        state.readings += 1;
        state.sum_milli = state.sum_milli.saturating_add(v);
        state.last_at_ms = reading.at_ms;
        if state.window.len() == WINDOW {
            state.window.remove(0);
        }
        state.window.push(v);
    }

    fn query(state: &DeviceState, window: &Window) -> pb::DeviceStatsReply {
        // The service validates the span; a node asked by an older peer clamps instead.
        let span = window.span().unwrap_or(WINDOW).min(state.window.len());
        let recent = &state.window[state.window.len() - span..];
        pb::DeviceStatsReply {
            device_id: String::new(),
            readings: state.readings,
            min_milli: state.min_milli,
            max_milli: state.max_milli,
            sum_milli: state.sum_milli,
            last_at_ms: state.last_at_ms,
            recent_milli: recent.to_vec(),
            recent_sum_milli: recent.iter().sum(),
            recent_above: recent.iter().filter(|v| **v > window.above_milli).count() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(device: &str, value_milli: i64) -> Vec<u8> {
        pb::Reading {
            device_id: device.into(),
            at_ms: 1_700_000_000_000,
            value_milli,
        }
        .encode_to_vec()
    }

    #[test]
    fn malformed_readings_are_rejected_with_their_reason() {
        assert_eq!(
            decode_reading("d1", None),
            Err(MalformedReading::MissingValue)
        );
        assert!(matches!(
            decode_reading("d1", Some(b"\xff\xff")),
            Err(MalformedReading::Undecodable(_))
        ));
        assert!(matches!(
            decode_reading("d1", Some(&encode("d2", 1))),
            Err(MalformedReading::KeyMismatch { .. })
        ));
        assert_eq!(
            decode_reading("d1", Some(&encode("d1", -MAX_MAGNITUDE_MILLI - 1))),
            Err(MalformedReading::OutOfRange(-MAX_MAGNITUDE_MILLI - 1))
        );
        assert_eq!(
            decode_reading("d1", Some(&encode("d1", -5)))
                .unwrap()
                .value_milli,
            -5
        );
    }

    #[test]
    fn the_window_keeps_the_last_readings_and_the_statistics_every_reading() {
        let mut state = DeviceState::default();
        for v in 1..=40 {
            Devices::apply(
                &mut state,
                &Reading {
                    at_ms: v,
                    value_milli: v * 10,
                },
            );
        }
        assert_eq!(state.window.len(), WINDOW);
        assert_eq!(state.window[0], 90);
        let reply = Devices::query(
            &state,
            &Window {
                last: 3,
                above_milli: 385,
            },
        );
        assert_eq!(reply.recent_milli, [380, 390, 400]);
        assert_eq!(reply.recent_sum_milli, 1170);
        assert_eq!(reply.recent_above, 2);
        assert_eq!(
            (
                reply.readings,
                reply.min_milli,
                reply.max_milli,
                reply.sum_milli
            ),
            (40, 10, 400, 8200)
        );
        assert_eq!(
            Devices::query(&state, &Window::default())
                .recent_milli
                .len(),
            WINDOW
        );
        assert!(Window {
            last: 33,
            above_milli: 0
        }
        .span()
        .is_err());
    }
}
