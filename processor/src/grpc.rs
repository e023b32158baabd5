//! The gRPC front end: any node answers for any user (locally or one hop to the owner), plus
//! the standard health and reflection services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use proto::service::user_service_server::{UserService, UserServiceServer};
use proto::service::{UserStatsRequest, UserStatsResponse};
use tonic::{Request, Response, Status};

use crate::event::MAX_USER_ID_BYTES;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::routing::{RouteError, Router};

pub struct UserStatsService {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl UserService for UserStatsService {
    async fn user_stats(
        &self,
        request: Request<UserStatsRequest>,
    ) -> Result<Response<UserStatsResponse>, Status> {
        let started = Instant::now();
        let id = request.into_inner().id;
        if let Err(status) = validate_user_id(&id) {
            self.metrics
                .observe_grpc("none", "invalid_argument", started.elapsed());
            return Err(status);
        }
        match self.router.totals(&id).await {
            Ok((totals, route)) => {
                self.metrics
                    .observe_grpc(route.label(), "ok", started.elapsed());
                Ok(Response::new(UserStatsResponse {
                    id,
                    total_purchases: totals.purchases,
                    amount_spent: totals.amount_spent,
                }))
            }
            Err(e @ RouteError::Unavailable { .. }) => {
                self.metrics
                    .observe_grpc("none", "unavailable", started.elapsed());
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}

pub fn validate_user_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("user id must not be empty"));
    }
    if id.len() > MAX_USER_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "user id is {} bytes; at most {MAX_USER_ID_BYTES} are allowed",
            id.len()
        )));
    }
    Ok(())
}

/// How often gRPC health is brought in line with readiness.
const HEALTH_FOLLOWS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Serves until `shutdown` resolves. gRPC health (the server as a whole, "", and the user
/// service) is SERVING exactly when the node is ready.
pub async fn serve(
    addr: SocketAddr,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        use tonic_health::ServingStatus;
        let mut serving = None;
        loop {
            let now = readiness.ready();
            if serving != Some(now) {
                serving = Some(now);
                let status = if now {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health_reporter.set_service_status("", status).await;
                if now {
                    health_reporter
                        .set_serving::<UserServiceServer<UserStatsService>>()
                        .await;
                } else {
                    health_reporter
                        .set_not_serving::<UserServiceServer<UserStatsService>>()
                        .await;
                }
            }
            tokio::time::sleep(HEALTH_FOLLOWS_EVERY).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(UserServiceServer::new(UserStatsService { router, metrics }))
        .serve_with_shutdown(addr, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_overlong_ids_are_invalid_arguments() {
        assert_eq!(
            validate_user_id("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let long = "7".repeat(MAX_USER_ID_BYTES + 1);
        assert_eq!(
            validate_user_id(&long).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(validate_user_id(&"7".repeat(MAX_USER_ID_BYTES)).is_ok());
    }
}
