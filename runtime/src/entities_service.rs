//! The `Entities` gRPC service every node serves (`runtime/proto/entities.proto`): any hosted
//! type asked with its codec's bytes (see `ask_bytes`), so an application needs no gRPC code to
//! expose its queries. Typed services of the application's own stay possible beside it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::ask_bytes::{AskBytes, BytesAskError};
use crate::routing::Consistency;

/// The generated protocol (`runtime/proto/entities.proto` documents it).
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("kafka_sharding.entities.v1");
}

/// The server side: the hosted types by name (their consumer group).
pub(crate) struct EntitiesService {
    pub types: HashMap<String, Arc<dyn AskBytes>>,
}

impl EntitiesService {
    pub fn server(self) -> pb::entities_server::EntitiesServer<Self> {
        pb::entities_server::EntitiesServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::entities_server::Entities for EntitiesService {
    async fn ask(
        &self,
        request: Request<pb::AskRequest>,
    ) -> Result<Response<pb::AskReply>, Status> {
        let request = request.into_inner();
        let Some(asker) = self.types.get(&request.entity_type) else {
            let mut hosted: Vec<&str> = self.types.keys().map(String::as_str).collect();
            hosted.sort_unstable();
            return Err(Status::not_found(format!(
                "no entity type '{}' on this node; it hosts {}",
                request.entity_type,
                hosted.join(", ")
            )));
        };
        let consistency = match request.max_staleness_ms {
            Some(ms) => Consistency::BoundedStaleness(Duration::from_millis(ms)),
            None => Consistency::Strong,
        };
        match asker
            .ask_bytes(&request.id, &request.query, consistency)
            .await
        {
            Ok((reply, route)) => Ok(crate::owners::with_route(
                Response::new(pb::AskReply {
                    reply,
                    route: route.label().into(),
                }),
                route,
            )),
            Err(BytesAskError::BadQuery(e)) => Err(Status::invalid_argument(format!(
                "the query does not decode as a query of {}: {e}",
                request.entity_type
            ))),
            Err(BytesAskError::Ask(e)) => Err(e.to_status("entity id")),
            Err(e @ BytesAskError::Unencodable(_)) => Err(Status::internal(e.to_string())),
        }
    }
}
