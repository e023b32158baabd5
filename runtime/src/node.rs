//! A node: what an application builds ([`Node`], [`EntityType`], [`Entities`]) and the wiring
//! that runs it until Ctrl-C / SIGTERM.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock, Weak};
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
use crate::cluster::peer_health::PeerHealth;
use crate::cluster::query_batcher::QueryBatcher;
use crate::cluster::query_link::QueryLinks;
use crate::commands::{CommandError, CommandSender, PendingCommands};
use crate::commit_soon::CommitSoon;
use crate::consumer::checkpoint::{Checkpointer, CheckpointerConfig};
use crate::consumer::{
    self, ConsumerError, ConsumerExit, ConsumerHandle, ConsumerParts, ConsumerSettings,
};
use crate::effects::Destinations;
use crate::entity::{Codec, Entity};
use crate::fencing::transactional_id;
use crate::grpc::GrpcServices;
use crate::handoff::Handoff;
use crate::http::{Management, TypeView};
use crate::kafka_admin::{self, AdminError};
use crate::kafka_health::{self, KafkaHealth, QuietContext, Unrecoverable};
use crate::lag::LagProbe;
use crate::metrics::MetricsRegistry;
use crate::readiness::Readiness;
use crate::restore::Restorer;
use crate::routing::{AskError, Consistency, Route, Router};
use crate::shard::{LocalShards, ShardEnv};
use crate::standby::{Reader as StandbyReader, Standbys};
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
        self.ask_with(id, query, Consistency::Strong).await
    }

    /// Sends `command` to the entity `id`, wherever it is hosted, and returns its answer once
    /// the change it made is committed (see [`Entity::handle`]). When the entity's shard is on
    /// this node, the shard runs it directly; when it is on a peer, it goes over the query link
    /// and the owner's shard runs it the same way; when neither takes it (no link, the shard
    /// restoring or handing off, no owner known) it is written to the type's input topic for
    /// whoever owns the partition to read. Run at the owner, it is ordered after what the shard
    /// has read of its partition, not after every record already committed there (a message
    /// sent a moment ago may still be on its way). `idempotency_key` makes a retry of the same
    /// command (after a timeout, through any node) get the first answer instead of running
    /// again. Errors:
    /// [`CommandError`] (`Unavailable`: the outcome is unknown; retry with the same key).
    pub async fn command(
        &self,
        id: &str,
        command: E::Event,
        idempotency_key: Option<&str>,
    ) -> Result<E::Reply, CommandError>
    where
        E::Codec: Codec<E::Event>,
    {
        let Some(router) = self.router.get() else {
            return Err(CommandError::NotRunning);
        };
        let value = <E::Codec as Codec<E::Event>>::encode(&command)
            .map_err(|e| CommandError::Failed(format!("the command does not encode: {e}")))?;
        let outcome = router.command(id, value, idempotency_key).await?;
        crate::commands::answer::<E>(outcome)
    }

    /// [`Entities::ask`] with a choice of how fresh the answer must be: with
    /// [`Consistency::BoundedStaleness`], while no owner answers (a failover), a standby
    /// replica that is at most that far behind answers instead ([`Route::Standby`]).
    pub async fn ask_with(
        &self,
        id: &str,
        query: E::Query,
        consistency: Consistency,
    ) -> Result<(E::Reply, Route), AskError> {
        match self.router.get() {
            Some(router) => router.ask(id, query, consistency).await,
            None => Err(AskError::NotRunning),
        }
    }
}

/// A node of the cluster, hosting one or more entity types and the applications' gRPC services
/// (see the crate documentation for a complete application).
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

    /// Hosts the entity type `E`, consuming `spec`'s topic in `spec`'s group; returns the handle
    /// to query it. Call it once per type: each type needs its own group, input and changelog
    /// topic ([`Node::run`] refuses a shared one).
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
    pub fn grpc_service<S: crate::grpc::GrpcService>(&mut self, service: S) -> &mut Self {
        self.grpc.add_service(service);
        self
    }

    /// Registers an encoded `FileDescriptorSet` with gRPC reflection.
    pub fn grpc_reflection(&mut self, descriptor_set: &'static [u8]) -> &mut Self {
        self.grpc.descriptors.push(descriptor_set);
        self
    }

    /// Runs the node until Ctrl-C or SIGTERM (then hands every shard of every type off and
    /// returns), or until something a restart cannot fix ([`NodeError::exit_code`]).
    pub async fn run(self) -> Result<(), NodeError> {
        let Self {
            config,
            hosted,
            grpc,
        } = self;
        if hosted.is_empty() {
            return Err(NodeError::Hosting("the node hosts no entity type".into()));
        }
        for (i, h) in hosted.iter().enumerate() {
            let spec = h.spec();
            if let Some(other) = hosted[..i].iter().map(|o| o.spec()).find(|o| {
                o.group == spec.group
                    || o.topic == spec.topic
                    || o.changelog_topic == spec.changelog_topic
            }) {
                return Err(NodeError::Hosting(format!(
                    "two entity types share a group, input or changelog topic ({} on {}, {} on {}): \
                     each type needs its own",
                    other.group, other.topic, spec.group, spec.topic
                )));
            }
        }
        run(config, hosted, grpc).await
    }
}

/// An entity type to host, whatever its Rust type.
trait Hosted: Send {
    fn spec(&self) -> &EntityType;

    /// The Rust type of its entities (messages name their target by it).
    fn entity(&self) -> std::any::TypeId;

    /// Builds the type's shards, routing and hand-off; its consumer starts when the returned
    /// [`HostedParts::consumer`] is awaited (only once the node is admitted).
    fn start(
        self: Box<Self>,
        node: &NodeShared,
        partitions: u32,
    ) -> BoxFuture<'static, Result<HostedParts, NodeError>>;
}

struct HostedType<E: Entity> {
    spec: EntityType,
    router: Arc<OnceLock<Arc<Router<E>>>>,
    entity: PhantomData<fn() -> E>,
}

impl<E: Entity> Hosted for HostedType<E> {
    fn spec(&self) -> &EntityType {
        &self.spec
    }

    fn entity(&self) -> std::any::TypeId {
        std::any::TypeId::of::<E>()
    }

    fn start(
        self: Box<Self>,
        node: &NodeShared,
        partitions: u32,
    ) -> BoxFuture<'static, Result<HostedParts, NodeError>> {
        Box::pin(start_type::<E>(
            node.clone(),
            self.spec,
            self.router,
            partitions,
        ))
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
    #[error("cannot create the client asking for the changelog's ends: {0}")]
    ChangelogEnds(rdkafka::error::KafkaError),
    #[error("cannot create the producer of commands: {0}")]
    CommandProducer(rdkafka::error::KafkaError),
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
            Self::Kafka(AdminError::NotAuthorized { .. }) => 3,
            _ => 1,
        }
    }
}

fn socket(host: &str, port: u16) -> Result<SocketAddr, NodeError> {
    format!("{host}:{port}")
        .parse()
        .map_err(|_| NodeError::BadAddress(format!("{host}:{port}")))
}

/// Binds the management port and serves `router` on it (over TLS with `--tls-serve`) until
/// `shutdown`.
async fn serve_management(
    config: &NodeConfig,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, NodeError> {
    let in_use = |source| NodeError::PortInUse {
        what: "management",
        host: config.bind_host.to_string(),
        port: config.ports.management,
        source,
    };
    let listener = tokio::net::TcpListener::bind(socket(
        &config.bind_host.to_string(),
        config.ports.management,
    )?)
    .await
    .map_err(in_use)?;
    Ok(match config.tls.as_ref().filter(|_| config.tls_serve) {
        Some(tls) => tokio::spawn(
            axum::serve(tls.serve_https(listener).map_err(in_use)?, router)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        ),
        None => tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        ),
    })
}

/// Aborts a task when dropped (a no-op once it has ended).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

/// What every hosted type of the node shares.
#[derive(Clone)]
struct NodeShared {
    config: Arc<NodeConfig>,
    node_id: String,
    health: Arc<KafkaHealth>,
    quiet: QuietContext,
    readiness: Arc<Readiness>,
    metrics: Arc<MetricsRegistry>,
    gate: Arc<InFlightGate>,
    /// Live entities over every type: the cap (`--max-live-entities`) is the node's.
    live_entities: Arc<AtomicUsize>,
    /// Commands this node sent (any type), waiting for their answers.
    commands: Arc<PendingCommands>,
    /// Where messages to each hosted type go.
    destinations: Arc<Destinations>,
    /// The query links to the peers (forwarded queries, any type).
    links: Arc<QueryLinks>,
    /// Whether the peers answer what this node forwards (any type).
    peers: Arc<PeerHealth>,
}

/// One started entity type: what the node's front ends need of it, and its consumer to start.
struct HostedParts {
    group: String,
    endpoint: Arc<dyn Endpoint>,
    announcer: Arc<Announcer>,
    view: TypeView,
    stats: Arc<NodeStats>,
    consumer: BoxFuture<'static, Result<ConsumerHandle, NodeError>>,
}

/// Checks (and creates) an entity type's topics; returns its partition count.
async fn prepare_topics(config: &NodeConfig, spec: &EntityType) -> Result<u32, NodeError> {
    let kafka = &config.kafka;
    let (waiting, topic) = (kafka.clone(), spec.topic.clone());
    let input = tokio::task::spawn_blocking(move || {
        kafka_admin::wait_for_topic(&waiting, &topic, TOPIC_WAIT)
    })
    .await
    .expect("topic wait panicked")?;
    let partitions = input.partitions;
    // The node's own topics are as durable as the input unless told otherwise.
    let replication = config.replication_factor.unwrap_or(input.replication);
    kafka_admin::ensure_topic(kafka, &spec.dlq_topic, DLQ_PARTITIONS, replication, &[]).await?;
    let changelog_partitions = kafka_admin::ensure_topic(
        kafka,
        &spec.changelog_topic,
        partitions,
        replication,
        changelog::CHANGELOG_TOPIC_CONFIG,
    )
    .await?;
    if changelog_partitions != partitions {
        return Err(NodeError::ChangelogMismatch {
            topic: spec.changelog_topic.clone(),
            found: changelog_partitions,
            expected: partitions,
        });
    }
    let (checking, changelog_topic, topic) = (
        kafka.clone(),
        spec.changelog_topic.clone(),
        spec.topic.clone(),
    );
    tokio::task::spawn_blocking(move || {
        changelog::check_written_for(&checking, &changelog_topic, &topic, partitions)
    })
    .await
    .expect("changelog check panicked")?;
    tracing::info!(
        "node {}: topic {} has {partitions} partitions = {partitions} shards of {}",
        config.node_id(),
        spec.topic,
        spec.group
    );
    Ok(partitions)
}

/// Builds one entity type's part of the node (everything generic over `E` lives here).
async fn start_type<E: Entity>(
    node: NodeShared,
    spec: EntityType,
    handle: Arc<OnceLock<Arc<Router<E>>>>,
    partitions: u32,
) -> Result<HostedParts, NodeError> {
    let config = node.config.clone();
    let readiness = node.readiness.group(&spec.group);
    let table = Arc::new(AllocationTable::new(node.node_id.clone()));
    let local = Arc::new(LocalShards::<E>::default());
    let (stats, metrics) = node
        .metrics
        .entity_type(&spec.group, &spec.topic, partitions);
    let (stats, metrics) = (Arc::new(stats), Arc::new(metrics));
    let batcher = Arc::new(QueryBatcher::new(
        config.remote_call_timeout,
        metrics.clone(),
    ));
    let standbys = Arc::new(Standbys::<E>::new(
        config.standby_replicas,
        partitions,
        table.clone(),
        metrics.clone(),
        readiness.clone(),
    ));
    // One client asks for the changelog's ends, for the standbys' lag and the restores.
    let changelog_ends = Arc::new(
        changelog::ChangelogEnds::new(&config.kafka, &node.quiet)
            .map_err(NodeError::ChangelogEnds)?,
    );
    standbys.start(StandbyReader {
        kafka: config.kafka.clone(),
        changelog_topic: spec.changelog_topic.clone(),
        ends: changelog_ends.clone(),
        context: node.quiet.clone(),
        kafka_debug: config.kafka_debug.clone(),
    });
    let router = Arc::new(Router {
        entity_type: Arc::from(spec.group.as_str()),
        partitions,
        table: table.clone(),
        local: local.clone(),
        owner_wait: config.query_wait,
        call_timeout: config.remote_call_timeout,
        batcher,
        links: node.links.clone(),
        peers: node.peers.clone(),
        metrics: metrics.clone(),
        standbys: standbys.clone(),
        commands: CommandSender::new(
            &config.kafka,
            node.quiet.clone(),
            &spec.topic,
            partitions,
            node.commands.clone(),
            config.command_timeout,
        )
        .map_err(NodeError::CommandProducer)?,
    });
    let _ = handle.set(router.clone());
    let commit_soon = Arc::new(CommitSoon::default());
    let changed_states = Arc::new(AtomicUsize::new(0));
    let announcer = Arc::new(Announcer::new(
        &spec.group,
        table.clone(),
        config.grpc_url(),
        config.management_url(),
    ));
    tokio::spawn(announcer.clone().run());

    // One client reads the group's committed offsets, for the lag at /metrics and the restorer.
    let group_offsets = Arc::new(
        kafka_admin::group_offsets_client(&config.kafka, &spec.group, node.quiet.clone())
            .map_err(NodeError::GroupOffsets)?,
    );
    kafka_health::serve_idle_clients(vec![
        Arc::downgrade(&group_offsets) as Weak<dyn kafka_health::IdleClient>,
        Arc::downgrade(&changelog_ends) as Weak<dyn kafka_health::IdleClient>,
    ]);
    let kafka_stats = Arc::new(std::sync::Mutex::new(String::new()));
    let view = TypeView {
        group: spec.group.clone(),
        partitions,
        local: local.clone(),
        table: table.clone(),
        stats: stats.clone(),
        metrics: metrics.clone(),
        lag: Arc::new(LagProbe::new(group_offsets.clone(), &spec.topic)),
        kafka_stats: kafka_stats.clone(),
        asker: router.clone(),
    };
    let env = Arc::new(ShardEnv {
        gate: node.gate.clone(),
        stats: stats.clone(),
        live_entities: node.live_entities.clone(),
        max_live_entities: config.max_live_entities,
        passivate_after: config.passivate_after,
        readiness: readiness.clone(),
        input_topic: spec.topic.clone(),
        commands: node.commands.clone(),
        destinations: node.destinations.clone(),
        commit_soon: commit_soon.clone(),
        changed_states: changed_states.clone(),
    });
    let restorer = Arc::new(Restorer {
        group: spec.group.clone(),
        kafka: config.kafka.clone(),
        changelog_topic: spec.changelog_topic.clone(),
        group_offsets,
        input_topic: spec.topic.clone(),
        changelog_ends,
        metrics: metrics.clone(),
        kafka_debug: config.kafka_debug.clone(),
        context: node.quiet.clone(),
        standbys,
        node: node.node_id.clone(),
    });
    restorer.fence_departures_early(announcer.table().clone());
    let handoff = Arc::new(Handoff::new(
        tokio::runtime::Handle::current(),
        local.clone(),
        announcer.clone(),
        env,
        restorer,
        config.drain_timeout,
    ));
    let consumer = {
        let (node, spec, stats) = (node.clone(), spec.clone(), stats.clone());
        Box::pin(async move {
            // One transactional id per node and type: a restarted node fences its previous run.
            let checkpointer_config = CheckpointerConfig {
                kafka: config.kafka.clone(),
                transactional_id: transactional_id(&spec.group, &node.node_id),
                node: node.node_id.clone(),
                transaction_timeout: config.transaction_timeout,
                changelog_topic: spec.changelog_topic.clone(),
                input_topic: spec.topic.clone(),
                dlq_topic: spec.dlq_topic.clone(),
                context: node.quiet.clone(),
                kafka_debug: config.kafka_debug.clone(),
            };
            let starting = checkpointer_config.clone();
            let checkpointer = tokio::task::spawn_blocking(move || Checkpointer::new(&starting))
                .await
                .expect("checkpointer start panicked")
                .map_err(ConsumerError::from)?;
            let consumer = consumer::start(
                ConsumerSettings {
                    kafka: config.kafka.clone(),
                    topic: spec.topic.clone(),
                    group: spec.group.clone(),
                    client_id: node.node_id.clone(),
                    session_timeout: config.session_timeout,
                    commit_interval: config.commit_interval,
                    partitions,
                    statistics_interval: config.statistics_interval,
                    debug: config.kafka_debug.clone(),
                    static_membership: config.static_membership,
                },
                ConsumerParts {
                    handoff,
                    local,
                    gate: node.gate.clone(),
                    stats,
                    metrics,
                    checkpointer,
                    checkpointer_config,
                    health: node.health.clone(),
                    readiness,
                    kafka_stats,
                    runtime: tokio::runtime::Handle::current(),
                    commit_soon,
                    changed_states,
                },
            )?;
            Ok(consumer)
        }) as BoxFuture<'static, Result<ConsumerHandle, NodeError>>
    };
    Ok(HostedParts {
        group: spec.group.clone(),
        endpoint: router,
        announcer,
        view,
        stats,
        consumer,
    })
}

async fn run(
    config: NodeConfig,
    hosted: Vec<Box<dyn Hosted>>,
    grpc_services: GrpcServices,
) -> Result<(), NodeError> {
    let host = config.host.clone();
    let bind = config.bind_host.to_string();
    check_port_free("remoting", &bind, config.ports.remoting)?;
    check_port_free("gRPC", &bind, config.ports.grpc)?;

    // The management port answers at once (alive, not ready, metrics), while the topics are
    // prepared: that can wait for the input topic for `TOPIC_WAIT`.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let metrics = Arc::new(MetricsRegistry::new(&config.name));
    let starting = Arc::new(Mutex::new(String::from("preparing the topics")));
    let routes = crate::http::Switch::new(crate::http::starting(starting.clone(), metrics.clone()));
    let http = serve_management(&config, routes.router(), shutdown(shutdown_rx.clone())).await?;
    // Ends the management port's task should the node fail to start.
    let _http_guard = AbortOnDrop(http.abort_handle());

    let mut partitions = Vec::with_capacity(hosted.len());
    for h in &hosted {
        let spec = h.spec();
        *starting.lock().expect("status lock poisoned") = format!(
            "checking the topics of {} (waiting for its input topic {} if it does not exist yet)",
            spec.group, spec.topic
        );
        partitions.push(prepare_topics(&config, spec).await?);
    }
    *starting.lock().expect("status lock poisoned") = "starting the entity types".into();
    let node_id = config.node_id();
    let health = KafkaHealth::new(&config.kafka);
    tokio::spawn(
        health.clone().monitor(
            hosted
                .iter()
                .zip(&partitions)
                .map(|(h, n)| (h.spec().topic.clone(), *n))
                .collect(),
        ),
    );
    let groups: Vec<String> = hosted.iter().map(|h| h.spec().group.clone()).collect();
    // Messages between entities go to their type's input topic (the first type hosted with
    // that Rust type, should one be hosted twice).
    let mut destinations = Destinations::default();
    for (h, n) in hosted.iter().zip(&partitions).rev() {
        destinations.add(h.entity(), &h.spec().topic, *n);
    }
    let shared = NodeShared {
        node_id: node_id.clone(),
        quiet: QuietContext::new(health.clone()),
        readiness: Readiness::new(health.clone(), groups.iter().map(String::as_str)),
        metrics,
        gate: Arc::new(InFlightGate::new(config.max_in_flight)),
        live_entities: Arc::new(AtomicUsize::new(0)),
        commands: Arc::new(PendingCommands::new(Arc::from(node_id.as_str()))),
        destinations: Arc::new(destinations),
        links: QueryLinks::new(
            config.peer_queries,
            config.tls.as_ref(),
            config.tls_serve,
            config.remote_call_timeout,
        ),
        peers: PeerHealth::new(),
        health,
        config: Arc::new(config),
    };
    let (config, readiness) = (shared.config.clone(), shared.readiness.clone());

    let mut started = Vec::with_capacity(hosted.len());
    for (h, n) in hosted.into_iter().zip(partitions) {
        started.push(h.start(&shared, n).await?);
    }
    tokio::spawn(crate::memory::trim_after_passivation(
        started.iter().map(|t| t.stats.clone()).collect(),
    ));
    let endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>> = Arc::new(
        started
            .iter()
            .map(|t| (t.group.clone(), t.endpoint.clone()))
            .collect(),
    );
    let (gateway, _) = Actor::spawn(
        None,
        Gateway,
        GatewayArgs {
            node: Arc::from(node_id.as_str()),
            endpoints: endpoints.clone(),
            commands: shared.commands.clone(),
        },
    )
    .await
    .map_err(|e| NodeError::Gateway(e.to_string()))?;
    let membership = Arc::new(
        Membership::start(
            MembershipConfig {
                node_name: config.node_name(),
                host: host.clone(),
                bind_host: config.bind_host,
                port: config.ports.remoting,
                cookie: config.cookie.clone(),
                seeds: config.seed_nodes.clone(),
                tls: config.tls.clone(),
            },
            started.iter().map(|t| t.announcer.clone()).collect(),
            readiness.clone(),
        )
        .await?,
    );

    // Every node tells clients which node owns each shard (see `owners`).
    let mut grpc_services = grpc_services;
    let owners = crate::owners::OwnersService {
        types: started
            .iter()
            .map(|t| crate::owners::OwnedType {
                name: t.group.clone(),
                partitions: t.view.partitions,
                table: t.view.table.clone(),
            })
            .collect(),
    };
    grpc_services.add(owners.server(), crate::owners::FILE_DESCRIPTOR_SET);
    // Any hosted type can be asked without a service of the application's (its descriptor is
    // in the owners' set).
    let entities = crate::entities_service::EntitiesService {
        types: started
            .iter()
            .map(|t| (t.group.clone(), t.view.asker.clone()))
            .collect(),
    };
    grpc_services.add_service(entities.server());

    let grpc_addr = socket(&bind, config.ports.grpc)?;
    let grpc = tokio::spawn(crate::grpc::serve(
        grpc_addr,
        grpc_services,
        readiness.clone(),
        config.tls.clone().filter(|_| config.tls_serve),
        shutdown(shutdown_rx.clone()),
    ));

    let mut consumers = Vec::with_capacity(started.len());
    let mut views = Vec::with_capacity(started.len());
    for t in started {
        views.push(t.view);
        consumers.push((t.group, t.consumer));
    }
    let management = Arc::new(Management {
        node: node_id.clone(),
        types: views,
        membership: membership.clone(),
        gate: shared.gate.clone(),
        metrics: shared.metrics.clone(),
        readiness: readiness.clone(),
        endpoints,
        peers: shared.peers.clone(),
    });
    routes.replace(crate::http::router(management));
    let serves_tls = config.tls.is_some() && config.tls_serve;
    let (remoting_tls, scheme, grpc_tls) = (
        if config.tls.is_some() { " (TLS)" } else { "" },
        if serves_tls { "https" } else { "http" },
        if serves_tls { " (TLS)" } else { "" },
    );
    tracing::info!(
        "node {node_id} up: remoting {bind}:{}{remoting_tls}, management {scheme}://{bind}:{}, gRPC {grpc_addr}{grpc_tls}, hosting {}",
        config.ports.remoting,
        config.ports.management,
        groups.join(", ")
    );
    // Only an admitted node takes partitions (a node the others refuse would hold shards no
    // other node's front end can reach), and only it creates its transactional producers, whose
    // initialisation fences their ids.
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
        let mut running = Vec::with_capacity(consumers.len());
        let mut failed = None;
        for (group, start) in consumers {
            match start.await {
                Ok(handle) => running.push(handle),
                Err(e) => {
                    tracing::error!("the consumer of {group} did not start: {e}");
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() {
            // Any type's consumer ending (for what a restart cannot fix) ends the node.
            stop_signal_or(Duration::from_millis(200), || {
                running.iter().any(ConsumerHandle::is_finished)
            })
            .await;
        }
        readiness.set_stopping();
        tracing::info!("shutting down: handing off every shard");
        // Every type hands off at once: each consumer leaves its group on its own thread.
        for consumer in &mut running {
            consumer.stop();
        }
        let mut exits = Vec::with_capacity(running.len());
        for mut consumer in running {
            exits.push(
                tokio::task::spawn_blocking(move || consumer.join())
                    .await
                    .unwrap_or(ConsumerExit::Panicked),
            );
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(exits
                .into_iter()
                .find(|e| *e != ConsumerExit::Stopped)
                .unwrap_or(ConsumerExit::Stopped)),
        }
    } else {
        tracing::info!("stopped before being admitted to the cluster");
        Ok(ConsumerExit::Stopped)
    };
    let _ = shutdown_tx.send(true);
    let _ = grpc.await;
    let _ = http.await;
    gateway.stop(None);
    membership.server.stop(None);
    match exit? {
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
