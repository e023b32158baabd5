//! A node: what an application builds ([`Node`], [`EntityType`], [`Entities`]) and the wiring
//! that runs it until Ctrl-C / SIGTERM.

use std::future::IntoFuture;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::Actor;
use tokio::sync::watch;

use crate::allocation::AllocationTable;
use crate::backpressure::InFlightGate;
use crate::changelog::{self, ChangelogError};
use crate::cli::NodeConfig;
use crate::cluster::announce::Announcer;
use crate::cluster::endpoint::Endpoint;
use crate::cluster::gateway::{Gateway, GatewayArgs};
use crate::cluster::membership::{Membership, MembershipConfig, MembershipError};
use crate::cluster::query_batcher::QueryBatcher;
use crate::consumer::checkpoint::{Checkpointer, CheckpointerConfig};
use crate::consumer::{self, ConsumerError, ConsumerExit, ConsumerParts, ConsumerSettings};
use crate::entity::Entity;
use crate::grpc::GrpcServices;
use crate::handoff::Handoff;
use crate::http::Management;
use crate::kafka_admin::{self, AdminError};
use crate::kafka_health::{KafkaHealth, QuietContext, Unrecoverable};
use crate::lag::LagProbe;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::restore::Restorer;
use crate::routing::{AskError, Route, Router};
use crate::shard::{LocalShards, ShardEnv};
use crate::stats::NodeStats;

/// Where an entity type's records come from and its state goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityType {
    group: String,
    topic: String,
    dlq_topic: String,
    changelog_topic: String,
}

impl EntityType {
    /// Entities keyed by the records of `topic`, consumed by every node in consumer group
    /// `group`. The group also names the type (`/cluster/shards/<group>`, between nodes). The
    /// dead-letter topic defaults to `<topic>-dlq`, the changelog to `<group>-<topic>-state`
    /// (the states' offsets are offsets of the input topic, so a changelog serves one topic).
    pub fn new(group: impl Into<String>, topic: impl Into<String>) -> Self {
        let (group, topic) = (group.into(), topic.into());
        Self {
            dlq_topic: format!("{topic}-dlq"),
            changelog_topic: format!("{group}-{topic}-state"),
            group,
            topic,
        }
    }

    /// Another dead-letter topic.
    pub fn dlq_topic(mut self, topic: impl Into<String>) -> Self {
        self.dlq_topic = topic.into();
        self
    }

    /// Another changelog topic.
    pub fn changelog_topic(mut self, topic: impl Into<String>) -> Self {
        self.changelog_topic = topic.into();
        self
    }

    /// The consumer group, which names the type.
    pub fn group(&self) -> &str {
        &self.group
    }
    /// The input topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The dead-letter topic.
    pub fn dlq(&self) -> &str {
        &self.dlq_topic
    }
    /// The changelog topic.
    pub fn changelog(&self) -> &str {
        &self.changelog_topic
    }
}

/// Asks the entities of one type, wherever they are hosted; cheap to clone. Usable once the
/// node runs (before, every ask is [`AskError::NotRunning`]).
pub struct Entities<E: Entity> {
    router: Arc<OnceLock<Arc<Router<E>>>>,
}

impl<E: Entity> Clone for Entities<E> {
    fn clone(&self) -> Self {
        Self {
            router: self.router.clone(),
        }
    }
}

impl<E: Entity> Entities<E> {
    /// Answers `query` for the entity `id` (the record key) from whichever node hosts it, and
    /// says where the answer came from. Waits a bounded time while its shard has no owner.
    pub async fn ask(&self, id: &str, query: E::Query) -> Result<(E::Reply, Route), AskError> {
        match self.router.get() {
            Some(router) => router.ask(id, query).await,
            None => Err(AskError::NotRunning),
        }
    }
}

/// A node of the cluster, hosting an entity type and the application's gRPC services (see the
/// crate documentation for a complete application).
pub struct Node {
    config: NodeConfig,
    hosted: Vec<Box<dyn Hosted>>,
    grpc: GrpcServices,
}

impl Node {
    /// A node with this configuration, hosting nothing yet.
    pub fn new(config: NodeConfig) -> Self {
        Self {
            config,
            hosted: Vec::new(),
            grpc: GrpcServices::default(),
        }
    }

    /// Hosts the entity type `E`, consuming `spec`'s topic; returns the handle to query it.
    pub fn host<E: Entity>(&mut self, spec: EntityType) -> Entities<E> {
        let router = Arc::new(OnceLock::new());
        self.hosted.push(Box::new(HostedType::<E> {
            spec,
            router: router.clone(),
            entity: PhantomData,
        }));
        Entities { router }
    }

    /// Mounts a gRPC service (a tonic `...Server`) on the node's gRPC port; its health follows
    /// the node's readiness.
    pub fn grpc_service<S>(&mut self, service: S) -> &mut Self
    where
        S: tonic::codegen::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.grpc.names.push(S::NAME);
        self.grpc.routes.add_service(service);
        self
    }

    /// Registers an encoded `FileDescriptorSet` with gRPC reflection.
    pub fn grpc_reflection(&mut self, descriptor_set: &'static [u8]) -> &mut Self {
        self.grpc.descriptors.push(descriptor_set);
        self
    }

    /// Runs the node until Ctrl-C or SIGTERM (then hands every shard off and returns), or until
    /// something a restart cannot fix ([`NodeError::exit_code`]).
    pub async fn run(self) -> Result<(), NodeError> {
        let Self {
            config,
            mut hosted,
            grpc,
        } = self;
        match hosted.len() {
            1 => hosted.remove(0).run(config, grpc).await,
            0 => Err(NodeError::Hosting("the node hosts no entity type".into())),
            n => Err(NodeError::Hosting(format!(
                "the node was given {n} entity types; this version hosts one per node"
            ))),
        }
    }
}

/// An entity type to host, whatever its Rust type.
trait Hosted: Send {
    fn run(
        self: Box<Self>,
        config: NodeConfig,
        grpc: GrpcServices,
    ) -> BoxFuture<'static, Result<(), NodeError>>;
}

struct HostedType<E: Entity> {
    spec: EntityType,
    router: Arc<OnceLock<Arc<Router<E>>>>,
    entity: PhantomData<fn() -> E>,
}

impl<E: Entity> Hosted for HostedType<E> {
    fn run(
        self: Box<Self>,
        config: NodeConfig,
        grpc: GrpcServices,
    ) -> BoxFuture<'static, Result<(), NodeError>> {
        Box::pin(run::<E>(config, self.spec, self.router, grpc))
    }
}

/// How long a starting node waits for the input topic to appear.
const TOPIC_WAIT: Duration = Duration::from_secs(600);
const DLQ_PARTITIONS: u32 = 4;

/// Why a node did not start or stopped (each variant's message says what to fix); see
/// [`NodeError::exit_code`].
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum NodeError {
    /// What the node was asked to host cannot be hosted.
    #[error("{0}")]
    Hosting(String),
    #[error("{what} port {port} on {host} is not available: {source}")]
    PortInUse {
        what: &'static str,
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("invalid address {0}")]
    BadAddress(String),
    #[error(transparent)]
    Kafka(#[from] AdminError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("cannot create the client reading the group's committed offsets: {0}")]
    GroupOffsets(rdkafka::error::KafkaError),
    #[error("cannot start the gateway actor: {0}")]
    Gateway(String),
    #[error("changelog topic {topic} has {found} partitions but the input topic has {expected}: they must match")]
    ChangelogMismatch {
        topic: String,
        found: u32,
        expected: u32,
    },
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    #[error(transparent)]
    Unrecoverable(#[from] Unrecoverable),
    #[error("the consumer thread panicked")]
    ConsumerPanicked,
}

impl NodeError {
    /// The process exit code: one per cause a restart cannot fix (README), 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unrecoverable(cause) => cause.exit_code(),
            _ => 1,
        }
    }
}

fn socket(host: &str, port: u16) -> Result<SocketAddr, NodeError> {
    format!("{host}:{port}")
        .parse()
        .map_err(|_| NodeError::BadAddress(format!("{host}:{port}")))
}

/// Fails early with a clear message instead of a half-started node.
fn check_port_free(what: &'static str, host: &str, port: u16) -> Result<(), NodeError> {
    TcpListener::bind(socket(host, port)?)
        .map(drop)
        .map_err(|source| NodeError::PortInUse {
            what,
            host: host.into(),
            port,
            source,
        })
}

async fn run<E: Entity>(
    config: NodeConfig,
    spec: EntityType,
    handle: Arc<OnceLock<Arc<Router<E>>>>,
    grpc_services: GrpcServices,
) -> Result<(), NodeError> {
    let host = config.host.clone();
    check_port_free("remoting", &host, config.ports.remoting)?;
    check_port_free("management", &host, config.ports.management)?;
    check_port_free("gRPC", &host, config.ports.grpc)?;

    let (bootstrap, topic) = (config.bootstrap_servers.clone(), spec.topic.clone());
    let partitions = tokio::task::spawn_blocking(move || {
        kafka_admin::wait_for_topic(&bootstrap, &topic, TOPIC_WAIT)
    })
    .await
    .expect("topic wait panicked")?;
    // The node's own topics are as durable as the input unless told otherwise.
    let replication = match config.replication_factor {
        Some(n) => n,
        None => kafka_admin::replication_factor(&config.bootstrap_servers, &spec.topic)?,
    };
    kafka_admin::ensure_topic(
        &config.bootstrap_servers,
        &spec.dlq_topic,
        DLQ_PARTITIONS,
        replication,
        &[],
    )
    .await?;
    let changelog_partitions = kafka_admin::ensure_topic(
        &config.bootstrap_servers,
        &spec.changelog_topic,
        partitions,
        replication,
        &[
            ("cleanup.policy", "compact"),
            ("min.cleanable.dirty.ratio", "0.1"),
            ("segment.ms", "600000"),
        ],
    )
    .await?;
    if changelog_partitions != partitions {
        return Err(NodeError::ChangelogMismatch {
            topic: spec.changelog_topic.clone(),
            found: changelog_partitions,
            expected: partitions,
        });
    }
    let (bootstrap, changelog_topic, topic) = (
        config.bootstrap_servers.clone(),
        spec.changelog_topic.clone(),
        spec.topic.clone(),
    );
    tokio::task::spawn_blocking(move || {
        changelog::check_written_for(&bootstrap, &changelog_topic, &topic, partitions)
    })
    .await
    .expect("changelog check panicked")?;
    let node_id = config.node_id();
    tracing::info!(
        "node {node_id}: topic {} has {partitions} partitions = {partitions} shards of {}",
        spec.topic,
        spec.group
    );

    let health = KafkaHealth::new(&config.bootstrap_servers);
    tokio::spawn(health.clone().monitor(spec.topic.clone(), partitions));
    let quiet = QuietContext::new(health.clone());
    let readiness = Readiness::new(health.clone(), &spec.group);
    let table = Arc::new(AllocationTable::new(node_id.clone()));
    let local = Arc::new(LocalShards::<E>::default());
    let stats = Arc::new(NodeStats::default());
    let metrics = Arc::new(Metrics::new(&config.name, &stats));
    let gate = Arc::new(InFlightGate::new(config.max_in_flight));
    let batcher = Arc::new(QueryBatcher::new(
        config.remote_call_timeout,
        metrics.clone(),
    ));
    let router = Arc::new(Router {
        entity_type: Arc::from(spec.group.as_str()),
        partitions,
        table: table.clone(),
        local: local.clone(),
        owner_wait: config.query_wait,
        call_timeout: config.remote_call_timeout,
        batcher,
        metrics: metrics.clone(),
    });
    let _ = handle.set(router.clone());
    let endpoints: std::collections::HashMap<String, Arc<dyn Endpoint>> =
        [(spec.group.clone(), router.clone() as Arc<dyn Endpoint>)].into();
    tokio::spawn(crate::memory::trim_after_passivation(stats.clone()));
    let announcer = Arc::new(Announcer::new(&spec.group, table.clone()));
    tokio::spawn(announcer.clone().run());

    let (gateway, _) = Actor::spawn(
        None,
        Gateway,
        GatewayArgs {
            node: Arc::from(node_id.as_str()),
            endpoints: Arc::new(endpoints),
        },
    )
    .await
    .map_err(|e| NodeError::Gateway(e.to_string()))?;
    let membership = Arc::new(
        Membership::start(
            MembershipConfig {
                node_name: config.node_name(),
                host: host.clone(),
                port: config.ports.remoting,
                cookie: config.cookie.clone(),
                seeds: config.seed_nodes.clone(),
            },
            vec![announcer.clone()],
            readiness.clone(),
        )
        .await?,
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let grpc_addr = socket(&host, config.ports.grpc)?;
    let grpc = tokio::spawn(crate::grpc::serve(
        grpc_addr,
        grpc_services,
        readiness.clone(),
        shutdown(shutdown_rx.clone()),
    ));

    // One client reads the group's committed offsets, for the lag at /metrics and the restorer.
    let group_offsets = Arc::new(
        kafka_admin::group_offsets_client(&config.bootstrap_servers, &spec.group, quiet.clone())
            .map_err(NodeError::GroupOffsets)?,
    );
    let kafka_stats = Arc::new(std::sync::Mutex::new(String::new()));
    let management = Arc::new(Management {
        kafka_stats: kafka_stats.clone(),
        group: spec.group.clone(),
        node: node_id.clone(),
        partitions,
        local: local.clone(),
        table: table.clone(),
        membership: membership.clone(),
        stats: stats.clone(),
        gate: gate.clone(),
        metrics: metrics.clone(),
        lag: LagProbe::new(group_offsets.clone(), &spec.topic),
        readiness: readiness.clone(),
    });
    let http_listener = tokio::net::TcpListener::bind(socket(&host, config.ports.management)?)
        .await
        .map_err(|source| NodeError::PortInUse {
            what: "management",
            host: host.clone(),
            port: config.ports.management,
            source,
        })?;
    let http = tokio::spawn(
        axum::serve(http_listener, crate::http::router(management))
            .with_graceful_shutdown(shutdown(shutdown_rx.clone()))
            .into_future(),
    );

    let env = Arc::new(ShardEnv {
        gate: gate.clone(),
        stats: stats.clone(),
        live_entities: Arc::new(AtomicUsize::new(0)),
        max_live_entities: config.max_live_entities,
        passivate_after: config.passivate_after,
        readiness: readiness.clone(),
    });
    let restorer = Arc::new(Restorer {
        bootstrap_servers: config.bootstrap_servers.clone(),
        changelog_topic: spec.changelog_topic.clone(),
        group_offsets,
        input_topic: spec.topic.clone(),
        metrics: metrics.clone(),
        kafka_debug: config.kafka_debug.clone(),
        context: quiet.clone(),
        entity: PhantomData,
    });
    let handoff = Arc::new(Handoff::new(
        tokio::runtime::Handle::current(),
        local.clone(),
        announcer.clone(),
        env,
        restorer,
        config.drain_timeout,
    ));
    tracing::info!(
        "node {node_id} up: remoting {}, management http://{host}:{}, gRPC {grpc_addr}",
        config.ports.remoting,
        config.ports.management
    );
    // Only an admitted node takes partitions (a node the others refuse would hold shards no
    // other node's front end can reach), and only it creates its transactional producer, whose
    // initialisation fences its id.
    let mut waiting_said = false;
    let admitted = stop_signal_or(Duration::from_millis(100), || {
        if !waiting_said && !readiness.admitted() {
            waiting_said = true;
            tracing::info!(
                "waiting to be admitted to the cluster before joining the consumer group"
            );
        }
        readiness.admitted()
    })
    .await;
    let exit = if admitted {
        // One transactional id per node: a restarted node fences its previous run.
        let checkpointer_config = CheckpointerConfig {
            bootstrap: config.bootstrap_servers.clone(),
            transactional_id: format!("{}-{node_id}", spec.group),
            transaction_timeout: config.transaction_timeout,
            changelog_topic: spec.changelog_topic.clone(),
            input_topic: spec.topic.clone(),
            dlq_topic: spec.dlq_topic.clone(),
            context: quiet.clone(),
        };
        let starting = checkpointer_config.clone();
        let checkpointer = tokio::task::spawn_blocking(move || Checkpointer::new(&starting))
            .await
            .expect("checkpointer start panicked")
            .map_err(ConsumerError::from)?;
        let mut consumer = consumer::start(
            ConsumerSettings {
                bootstrap_servers: config.bootstrap_servers.clone(),
                topic: spec.topic.clone(),
                group: spec.group.clone(),
                client_id: node_id.clone(),
                session_timeout: config.session_timeout,
                commit_interval: config.commit_interval,
                partitions,
                statistics_interval: config.statistics_interval,
                debug: config.kafka_debug.clone(),
            },
            ConsumerParts {
                handoff,
                local: local.clone(),
                gate,
                stats,
                metrics,
                checkpointer,
                checkpointer_config,
                health: health.clone(),
                readiness: readiness.clone(),
                kafka_stats: kafka_stats.clone(),
                runtime: tokio::runtime::Handle::current(),
            },
        )?;
        stop_signal_or(Duration::from_millis(200), || consumer.is_finished()).await;
        readiness.set_stopping();
        tracing::info!("shutting down: handing off every shard");
        consumer.stop();
        tokio::task::spawn_blocking(move || consumer.join())
            .await
            .unwrap_or(ConsumerExit::Panicked)
    } else {
        tracing::info!("stopped before being admitted to the cluster");
        ConsumerExit::Stopped
    };
    let _ = shutdown_tx.send(true);
    let _ = grpc.await;
    let _ = http.await;
    gateway.stop(None);
    membership.server.stop(None);
    match exit {
        ConsumerExit::Stopped => {
            tracing::info!("node {node_id} stopped");
            Ok(())
        }
        ConsumerExit::Unrecoverable(cause) => Err(cause.into()),
        ConsumerExit::Panicked => Err(NodeError::ConsumerPanicked),
    }
}

/// Waits for Ctrl-C or SIGTERM, or until `done` (checked every `every`) holds; returns
/// whether `done` came first.
async fn stop_signal_or(every: Duration, mut done: impl FnMut() -> bool) -> bool {
    #[cfg(unix)]
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("cannot install the SIGTERM handler");
    loop {
        if done() {
            return true;
        }
        #[cfg(unix)]
        let term = sigterm.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return false,
            _ = term => return false,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
