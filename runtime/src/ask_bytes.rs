//! Asking any hosted type with its codec's bytes, without knowing the type: what the generic
//! routes (`POST /entities/<type>/<id>` on the management port) use, so an application
//! exposes its queries with no code beyond its codec. The query is decoded with the type's
//! codec on this node and routed like [`crate::Entities::ask`] (same owner wait, errors and
//! staleness option); the reply comes back in the same codec.

use futures::future::BoxFuture;

use crate::entity::{Codec, DecodeError, EncodeError, Entity};
use crate::routing::{AskError, Consistency, Route, Router};

/// Why a query by bytes got no reply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BytesAskError {
    /// The bytes are not a query of the type (in its codec).
    #[error("the query does not decode: {0}")]
    BadQuery(#[source] DecodeError),
    #[error(transparent)]
    Ask(#[from] AskError),
    /// The entity's reply does not encode with the type's codec.
    #[error("the reply does not encode: {0}")]
    Unencodable(#[source] EncodeError),
}

/// One hosted type, asked with its codec's bytes.
pub(crate) trait AskBytes: Send + Sync {
    fn ask_bytes<'a>(
        &'a self,
        id: &'a str,
        query: &'a [u8],
        consistency: Consistency,
    ) -> BoxFuture<'a, Result<(Vec<u8>, Route), BytesAskError>>;
}

impl<E: Entity> AskBytes for Router<E> {
    fn ask_bytes<'a>(
        &'a self,
        id: &'a str,
        query: &'a [u8],
        consistency: Consistency,
    ) -> BoxFuture<'a, Result<(Vec<u8>, Route), BytesAskError>> {
        Box::pin(async move {
            let query =
                <E::Codec as Codec<E::Query>>::decode(query).map_err(BytesAskError::BadQuery)?;
            let (reply, route) = self.ask(id, query, consistency).await?;
            let reply = <E::Codec as Codec<E::Reply>>::encode(&reply)
                .map_err(BytesAskError::Unencodable)?;
            Ok((reply, route))
        })
    }
}
