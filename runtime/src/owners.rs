//! Which node owns each shard, for clients: the `Owners` gRPC service every node serves, and
//! [`OwnerDirectory`], the client side that sends each request straight to its entity's owner.
//!
//! Any node answers for any entity, but a node that does not host the entity forwards the query
//! one hop (gateway to gateway), and that hop costs more than the query: about ten thread
//! hand-offs against three (docs/BENCHMARKS.md). A client that knows the shard → owner table
//! and the key → shard function asks the owner itself, so every query it sends is local where
//! it lands. The table is advisory, never needed for a correct answer: a node asked about a
//! shard it no longer owns still forwards (or waits for a new owner), and marks its answer
//! with [`ROUTE_HEADER`], which tells the directory to fetch the table again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::allocation::AllocationTable;
use crate::partitioner::partition_for_key;
use crate::routing::Route;

/// The generated protocol (`runtime/proto/owners.proto` documents it).
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("kafka_sharding.owners.v1");
}

/// Encoded `FileDescriptorSet` of the owners and entities services, for gRPC reflection.
pub(crate) const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("services_descriptor");

/// Response header an application's gRPC handler sets (with [`with_route`]) to say how the
/// node answered: `local`, `remote` (forwarded to the owner) or `standby`.
pub const ROUTE_HEADER: &str = "kafka-sharding-route";

/// Marks `response` with the route its answer took (see [`ROUTE_HEADER`]).
pub fn with_route<T>(mut response: Response<T>, route: Route) -> Response<T> {
    response
        .metadata_mut()
        .insert(ROUTE_HEADER, AsciiMetadataValue::from_static(route.label()));
    response
}

/// One hosted entity type, as the service reports it.
pub(crate) struct OwnedType {
    pub name: String,
    pub partitions: u32,
    pub table: Arc<AllocationTable>,
}

/// The server side: this node's allocation tables, with the owners' gRPC URLs.
pub(crate) struct OwnersService {
    pub types: Vec<OwnedType>,
}

impl OwnersService {
    pub fn server(self) -> pb::owners_server::OwnersServer<Self> {
        pb::owners_server::OwnersServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::owners_server::Owners for OwnersService {
    async fn shard_owners(
        &self,
        request: Request<pb::ShardOwnersRequest>,
    ) -> Result<Response<pb::ShardOwnersResponse>, Status> {
        let wanted = request.into_inner().entity_type;
        let entity_types: Vec<pb::EntityTypeOwners> = self
            .types
            .iter()
            .filter(|t| wanted.is_empty() || t.name == wanted)
            .map(|t| pb::EntityTypeOwners {
                entity_type: t.name.clone(),
                partitions: t.partitions,
                owner_urls: t.table.owner_urls(t.partitions),
            })
            .collect();
        if entity_types.is_empty() {
            let hosted: Vec<&str> = self.types.iter().map(|t| t.name.as_str()).collect();
            return Err(Status::not_found(format!(
                "this node hosts no entity type '{wanted}' (it hosts: {})",
                hosted.join(", ")
            )));
        }
        Ok(Response::new(pb::ShardOwnersResponse { entity_types }))
    }
}

/// Why an [`OwnerDirectory`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OwnerDirectoryError {
    /// The node asked did not answer the owners service.
    #[error("the node did not give its shard owners: {0}")]
    Fetch(#[from] Status),
    /// The node hosts no such entity type.
    #[error("the node hosts no entity type '{0}'")]
    UnknownType(String),
    /// No type was named and the node hosts several (or none).
    #[error("name the entity type: the node hosts {0:?}")]
    Ambiguous(Vec<String>),
}

/// Why an owner's URL gave no endpoint (the directory then sends its shards to the node given).
pub type EndpointError = Box<dyn std::error::Error + Send + Sync>;

/// Makes the endpoint of an owner's URL.
type MakeEndpoint = dyn Fn(&str) -> Result<Endpoint, EndpointError> + Send + Sync;

/// How long a refresh waits after the last one: a burst of forwarded answers (every query in
/// flight when a shard moved) fetches the table once.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(250);

/// The client side: a gRPC channel to the owner of each entity's shard, learnt from any node
/// and refreshed when a node says it had to forward.
///
/// ```no_run
/// # async fn demo(any_node: tonic::transport::Channel) -> Result<(), Box<dyn std::error::Error>> {
/// use kafka_sharding::owners::OwnerDirectory;
/// let owners = OwnerDirectory::connect(any_node, "users", |url| {
///     Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?)
/// })
/// .await?;
/// // Per request: the owner's channel (or the node given, while the owner is not known).
/// let channel = owners.channel_for("user-7");
/// # Ok(()) }
/// ```
pub struct OwnerDirectory {
    entity_type: String,
    any_node: Channel,
    endpoint: Box<MakeEndpoint>,
    table: RwLock<OwnerTable>,
    refresh: Mutex<Refresh>,
}

#[derive(Default)]
struct OwnerTable {
    partitions: u32,
    /// Index = shard: the owner's URL and channel; `None` while it has no known owner.
    owners: Vec<Option<(String, Channel)>>,
    /// One (lazily connected) channel per node, kept across refreshes.
    channels: HashMap<String, Channel>,
}

#[derive(Default)]
struct Refresh {
    running: bool,
    last: Option<Instant>,
}

impl OwnerDirectory {
    /// Fetches `entity_type`'s table through `any_node` ("": the one type that node hosts).
    /// `endpoint` makes the endpoint of an owner's URL (timeouts and TLS as the caller's own);
    /// channels to owners connect lazily.
    pub async fn connect(
        any_node: Channel,
        entity_type: &str,
        endpoint: impl Fn(&str) -> Result<Endpoint, EndpointError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, OwnerDirectoryError> {
        let mut directory = Self {
            entity_type: entity_type.to_owned(),
            any_node,
            endpoint: Box::new(endpoint),
            table: RwLock::new(OwnerTable::default()),
            refresh: Mutex::new(Refresh::default()),
        };
        let owners = directory.fetch_owners().await?;
        directory.entity_type = owners.entity_type.clone();
        directory.install(owners);
        Ok(Arc::new(directory))
    }

    /// The entity type whose owners this directory follows.
    pub fn entity_type(&self) -> &str {
        &self.entity_type
    }

    /// The channel to `id`'s owner, or to the node the directory was made with while the
    /// owner is not known.
    pub fn channel_for(&self, id: &str) -> Channel {
        self.owner_of(id).unwrap_or_else(|| self.any_node.clone())
    }

    /// The channel to `id`'s owner, if known.
    pub fn owner_of(&self, id: &str) -> Option<Channel> {
        self.with_owner(id, |(_, channel)| channel.clone())
    }

    /// The gRPC URL of `id`'s owner, if known.
    pub fn owner_url(&self, id: &str) -> Option<String> {
        self.with_owner(id, |(url, _)| url.clone())
    }

    fn with_owner<T>(&self, id: &str, f: impl FnOnce(&(String, Channel)) -> T) -> Option<T> {
        let table = self.table.read().expect("owner table lock poisoned");
        if table.partitions == 0 {
            return None;
        }
        let shard = partition_for_key(id.as_bytes(), table.partitions) as usize;
        table.owners.get(shard)?.as_ref().map(f)
    }

    /// Sends a request for `id`: to its owner, and on a failure to reach the owner again
    /// through the node the directory was made with (which forwards); after the answer, a
    /// forwarded one ([`ROUTE_HEADER`]) or a failed owner refreshes the table in the
    /// background.
    pub async fn call<T, F, Fut>(self: &Arc<Self>, id: &str, send: F) -> Result<Response<T>, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let Some(owner) = self.owner_of(id) else {
            let answer = send(self.any_node.clone()).await;
            self.refresh_soon();
            return answer;
        };
        match send(owner).await {
            Ok(response) => {
                self.observe(response.metadata());
                Ok(response)
            }
            // The owner is unreachable (gone, or a transport error): any node routes.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                self.refresh_soon();
                send(self.any_node.clone()).await
            }
            Err(status) => Err(status),
        }
    }

    /// Refreshes the table if `metadata` says the answer was not local.
    pub fn observe(self: &Arc<Self>, metadata: &MetadataMap) {
        let route = metadata.get(ROUTE_HEADER).and_then(|v| v.to_str().ok());
        if matches!(route, Some(r) if r != Route::Local.label()) {
            self.refresh_soon();
        }
    }

    /// Fetches the table again in the background, unless a fetch is running or ran within
    /// the last 250 ms (`REFRESH_AT_MOST_EVERY`).
    pub fn refresh_soon(self: &Arc<Self>) {
        {
            let mut refresh = self.refresh.lock().expect("refresh lock poisoned");
            if refresh.running
                || refresh
                    .last
                    .is_some_and(|t| t.elapsed() < REFRESH_AT_MOST_EVERY)
            {
                return;
            }
            refresh.running = true;
        }
        let directory = self.clone();
        tokio::spawn(async move {
            // A failed fetch keeps the old table: the caller's fallback still answers.
            let _ = directory.fetch().await;
            let mut refresh = directory.refresh.lock().expect("refresh lock poisoned");
            refresh.running = false;
            refresh.last = Some(Instant::now());
        });
    }

    async fn fetch(&self) -> Result<(), OwnerDirectoryError> {
        let owners = self.fetch_owners().await?;
        self.install(owners);
        Ok(())
    }

    async fn fetch_owners(&self) -> Result<pb::EntityTypeOwners, OwnerDirectoryError> {
        let mut client = pb::owners_client::OwnersClient::new(self.any_node.clone());
        let mut types = client
            .shard_owners(pb::ShardOwnersRequest {
                entity_type: self.entity_type.clone(),
            })
            .await?
            .into_inner()
            .entity_types;
        if self.entity_type.is_empty() && types.len() == 1 {
            return Ok(types.remove(0));
        }
        if self.entity_type.is_empty() {
            return Err(OwnerDirectoryError::Ambiguous(
                types.into_iter().map(|t| t.entity_type).collect(),
            ));
        }
        types
            .into_iter()
            .find(|t| t.entity_type == self.entity_type)
            .ok_or_else(|| OwnerDirectoryError::UnknownType(self.entity_type.clone()))
    }

    fn install(&self, owners: pb::EntityTypeOwners) {
        let mut table = self.table.write().expect("owner table lock poisoned");
        let mut channels = std::mem::take(&mut table.channels);
        let shards = owners
            .owner_urls
            .into_iter()
            .map(|url| {
                if url.is_empty() {
                    return None;
                }
                if let Some(channel) = channels.get(&url) {
                    return Some((url, channel.clone()));
                }
                // An owner URL this client cannot use (e.g. no TLS for https) is skipped: its
                // shards go through the node given.
                let channel = (self.endpoint)(&url).ok()?.connect_lazy();
                channels.insert(url.clone(), channel.clone());
                Some((url, channel))
            })
            .collect();
        *table = OwnerTable {
            partitions: owners.partitions,
            owners: shards,
            channels,
        };
    }
}
