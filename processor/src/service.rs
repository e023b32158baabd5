//! The sample's gRPC front end: any node answers for any user (the runtime routes the query to
//! the node hosting the user's shard).

use std::time::Duration;

use kafka_sharding::owners::with_route;
use kafka_sharding::{AskError, Consistency, Entities, Route};
use proto::service::user_service_server::{UserService, UserServiceServer};
use proto::service::{UserStatsRequest, UserStatsResponse};
use tonic::{Request, Response, Status};

use crate::purchases::Purchases;

pub struct UserStatsService {
    users: Entities<Purchases>,
}

impl UserStatsService {
    /// The tonic server to mount on the node.
    pub fn server(users: Entities<Purchases>) -> UserServiceServer<Self> {
        UserServiceServer::new(Self { users })
    }
}

#[tonic::async_trait]
impl UserService for UserStatsService {
    async fn user_stats(
        &self,
        request: Request<UserStatsRequest>,
    ) -> Result<Response<UserStatsResponse>, Status> {
        let request = request.into_inner();
        let consistency = match request.max_staleness_ms {
            None => Consistency::Strong,
            Some(ms) => Consistency::BoundedStaleness(Duration::from_millis(ms)),
        };
        let id = request.id;
        match self.users.ask_with(&id, (), consistency).await {
            Ok((totals, route)) => {
                let (answered_by, lag_records, lag_ms) = match route {
                    Route::Standby(lag) => ("standby", lag.records, lag.behind.as_millis() as u64),
                    Route::Local | Route::Remote => ("owner", 0, 0),
                };
                let response = Response::new(UserStatsResponse {
                    id,
                    total_purchases: totals.purchases,
                    amount_spent: totals.amount_spent,
                    answered_by: answered_by.into(),
                    lag_records,
                    lag_ms,
                });
                // Tells clients that route by owner (`owners::OwnerDirectory`) when to refresh.
                Ok(with_route(response, route))
            }
            Err(e) => Err(status(&e)),
        }
    }
}

fn status(error: &AskError) -> Status {
    error.to_status("user id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_sharding::MAX_ID_BYTES;

    #[test]
    fn invalid_ids_are_invalid_arguments_and_no_owner_is_unavailable() {
        assert_eq!(
            status(&AskError::InvalidId(0)).code(),
            tonic::Code::InvalidArgument
        );
        let long = status(&AskError::InvalidId(MAX_ID_BYTES + 1));
        assert_eq!(long.code(), tonic::Code::InvalidArgument);
        assert!(long.message().contains("at most 256"), "{}", long.message());
        let unavailable = AskError::Unavailable {
            shard: 3,
            waited_ms: 5_000,
            last_error: None,
        };
        assert_eq!(status(&unavailable).code(), tonic::Code::Unavailable);
        assert_eq!(
            status(&AskError::NotRunning).code(),
            tonic::Code::Unavailable
        );
    }
}
