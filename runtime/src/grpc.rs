//! The node's one gRPC port: the applications' services, plus the standard health and
//! reflection services. Health (the server as a whole, "", and every application service) is
//! SERVING exactly when the node is ready.

use crate::cluster::tls::NodeTls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::RoutesBuilder;

use crate::readiness::Readiness;

/// How often gRPC health is brought in line with readiness.
const HEALTH_FOLLOWS_EVERY: Duration = Duration::from_millis(250);

/// What the applications mounted on the gRPC port.
#[derive(Default)]
pub(crate) struct GrpcServices {
    pub routes: RoutesBuilder,
    /// Service names, for health.
    pub names: Vec<&'static str>,
    /// Encoded `FileDescriptorSet`s, for reflection.
    pub descriptors: Vec<&'static [u8]>,
}

/// A tonic service (a generated `...Server`) that can be mounted on the node's gRPC port.
pub trait GrpcService:
    tonic::codegen::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
        Error = std::convert::Infallible,
        Response: axum::response::IntoResponse,
        Future: Send + 'static,
    > + tonic::server::NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Error = std::convert::Infallible,
            Response: axum::response::IntoResponse,
            Future: Send + 'static,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

impl GrpcServices {
    /// Mounts `service`; its health follows readiness.
    pub fn add_service<S: GrpcService>(&mut self, service: S) {
        self.names.push(S::NAME);
        self.routes.add_service(service);
    }

    /// Mounts `service` and registers its descriptor set with reflection.
    pub fn add<S: GrpcService>(&mut self, service: S, descriptor_set: &'static [u8]) {
        self.add_service(service);
        self.descriptors.push(descriptor_set);
    }
}

/// Serves until `shutdown` resolves.
pub(crate) async fn serve(
    addr: SocketAddr,
    services: GrpcServices,
    readiness: Arc<Readiness>,
    tls: Option<NodeTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let names = services.names.clone();
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
                for name in std::iter::once("").chain(names.iter().copied()) {
                    health_reporter.set_service_status(name, status).await;
                }
            }
            tokio::time::sleep(HEALTH_FOLLOWS_EVERY).await;
        }
    });
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for descriptor in services.descriptors {
        reflection = reflection.register_encoded_file_descriptor_set(descriptor);
    }
    let reflection = reflection
        .build_v1()
        .expect("the applications' descriptor sets are valid");
    let mut routes = services.routes;
    routes.add_service(health_service).add_service(reflection);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.grpc_config())?;
    }
    server
        .add_routes(routes.routes())
        .serve_with_shutdown(addr, shutdown)
        .await
}
