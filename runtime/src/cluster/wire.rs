//! Node-to-node message types (generated from `proto/cluster.proto`) and their ractor
//! serialisation. Decoding never panics: a frame that does not decode becomes the type's
//! default, which every receiver treats as an error/empty answer.

include!(concat!(env!("OUT_DIR"), "/cluster.rs"));

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
    EntityQuery,
    EntityAnswer,
    QueryBatch,
    QueryBatchAnswer,
    PeersRequest,
    PeerAddresses,
    CommandReply
);

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::BytesConvertable;

    #[test]
    fn messages_round_trip_and_garbage_decodes_to_empty() {
        let q = EntityQuery {
            entity_type: "accounts".into(),
            id: "7".into(),
            shard: 45,
            query: vec![1, 2],
            standby_within_ms: Some(250),
        };
        assert_eq!(EntityQuery::from_bytes(q.clone().into_bytes()), q);
        let empty_reply = EntityAnswer {
            result: Some(entity_answer::Result::Reply(Vec::new())),
        };
        assert_eq!(
            EntityAnswer::from_bytes(empty_reply.clone().into_bytes()),
            empty_reply,
            "an empty reply is still a reply"
        );
        let garbage = EntityAnswer::from_bytes(vec![0xff, 0xff, 0xff]);
        assert!(garbage.result.is_none());
    }
}
