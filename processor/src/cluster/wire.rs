//! Node-to-node message types (generated from `proto/cluster.proto`) and their ractor
//! serialisation. Decoding never panics: a frame that does not decode becomes the type's
//! default, which every receiver treats as an error/empty answer.

include!(concat!(env!("OUT_DIR"), "/cluster.rs"));

/// The changelog value (`proto/state.proto`).
pub use state::EntityState as StoredEntity;
mod state {
    include!(concat!(env!("OUT_DIR"), "/state.rs"));
}

macro_rules! bytes_convertable_via_prost {
    ($($ty:ty),* $(,)?) => {$(
        impl ractor::BytesConvertable for $ty {
            fn into_bytes(self) -> Vec<u8> {
                prost::Message::encode_to_vec(&self)
            }
            fn from_bytes(bytes: Vec<u8>) -> Self {
                prost::Message::decode(bytes.as_slice()).unwrap_or_else(|e| {
                    tracing::error!("undecodable {} from a peer: {e}", stringify!($ty));
                    Self::default()
                })
            }
        }
    )*};
}

bytes_convertable_via_prost!(
    OwnershipAnnouncement,
    TotalsQuery,
    TotalsAnswer,
    TotalsBatch,
    TotalsBatchAnswer
);

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::BytesConvertable;

    #[test]
    fn messages_round_trip_and_garbage_decodes_to_empty() {
        let q = TotalsQuery {
            user_id: "7".into(),
            shard: 45,
        };
        assert_eq!(TotalsQuery::from_bytes(q.clone().into_bytes()), q);
        let garbage = TotalsAnswer::from_bytes(vec![0xff, 0xff, 0xff]);
        assert!(garbage.result.is_none());
    }
}
