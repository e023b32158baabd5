//! The query link: the queries a node forwards to a shard's owner, over one connection to the
//! owner's management port (an HTTP/1.1 upgrade to [`PROTOCOL`], then length-delimited frames),
//! with as few thread hand-offs as a round trip allows.
//!
//! Through ractor_cluster a forwarded query crosses about a dozen hand-offs: the asking task,
//! the remote-actor proxy, the node-session and TCP-writer actors here; the reader,
//! node-session, gateway, answer task and shard at the owner; and the way back
//! (docs/BENCHMARKS.md). A gRPC call was tried instead and cost more, not less (tonic's buffer
//! task, HTTP/2 framing on both sides). On the link, the asking task writes its frame itself and
//! the link's reader task hands it the answer; at the owner one task per link reads the
//! queries, asks the shards (each query a future of that task, so a slow shard holds up only
//! its own answer) and writes the answers. The messages are those ractor_cluster carries
//! between gateways (`EntityQuery`, `EntityAnswer`), answered by the same endpoints, so the
//! routing loop treats both transports alike.
//!
//! The cluster session stays the way when the link cannot be taken: the owner's management URL
//! is not known yet, the operator chose it (`--peer-queries remoting`), node TLS without TLS on
//! the management port (with node TLS a query never crosses in the clear), or the owner's port
//! did not take the link (then for [`RETRY_LINK_AFTER`], with one log line).
//!
//! The link answers reads that any client of the node's public query routes (`Entities` on the
//! gRPC port, `/entities/...` on this port) can already make, so it asks no more of a caller.
//!
//! A frame is a `u32` big-endian length, then an `u64` little-endian request id, then the
//! protobuf message (`EntityQuery` towards the owner, `EntityAnswer` back).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::cluster::endpoint::{self, CallError, Endpoint};
use crate::cluster::tls::{self, NodeTls};
use crate::cluster::wire::{EntityAnswer, EntityQuery};

/// Where the management port takes the link.
pub(crate) const PATH: &str = "/cluster/query-link";
/// The protocol the connection is upgraded to (`Upgrade:` header).
pub(crate) const PROTOCOL: &str = "kafka-sharding-query-link/1";
/// A frame's size at most (a query or an answer with its entity's reply).
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long a peer whose port did not take the link is asked through the session instead.
pub(crate) const RETRY_LINK_AFTER: Duration = Duration::from_secs(10);

/// How a query for an entity hosted on another node reaches it (`--peer-queries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PeerTransport {
    /// The query link to the owner's management port, falling back to the cluster session.
    #[default]
    Link,
    /// Always the ractor_cluster session (gateway to gateway).
    Remoting,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

fn frame(id: u64, message: &impl Message) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + message.encoded_len());
    out.put_u64_le(id);
    message.encode(&mut out).expect("a BytesMut grows to fit");
    out.freeze()
}

fn unframe<M: Message + Default>(mut frame: BytesMut) -> Result<(u64, M), String> {
    if frame.len() < 8 {
        return Err(format!(
            "a frame of {} bytes has no request id",
            frame.len()
        ));
    }
    let id = frame.get_u64_le();
    M::decode(frame).map(|m| (id, m)).map_err(|e| e.to_string())
}

// ---- the owner's side ----

/// `GET /cluster/query-link` with `Upgrade: kafka-sharding-query-link/1`: answers the link's
/// queries from this node's shards (and standbys), never forwarding on.
pub(crate) fn accept(
    endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    mut req: Request,
) -> Response {
    let wanted = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
    let upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let (true, Some(upgrade)) = (wanted, upgrade) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("{PATH} is the query link between nodes: an HTTP/1.1 upgrade to {PROTOCOL}"),
        )
            .into_response();
    };
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => serve(endpoints, TokioIo::new(upgraded)).await,
            Err(e) => tracing::debug!("a query link was not upgraded: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, HeaderValue::from_static(PROTOCOL))
        .body(Body::empty())
        .expect("a static response")
}

/// One link's queries, answered as they complete, until the asking node closes it.
async fn serve(
    endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
) {
    let (read, write) = tokio::io::split(io);
    let mut queries = FramedRead::new(read, codec());
    let mut answers = FramedWrite::new(write, codec());
    let mut answering = FuturesUnordered::new();
    loop {
        tokio::select! {
            read = queries.next() => match read {
                Some(Ok(bytes)) => match unframe::<EntityQuery>(bytes) {
                    Ok((id, query)) => {
                        let endpoints = endpoints.clone();
                        answering.push(async move {
                            (id, endpoint::answer(&endpoints, query).await)
                        });
                    }
                    Err(e) => {
                        tracing::warn!("closing a query link: an undecodable query ({e})");
                        return;
                    }
                },
                // Closed by the asking node (or broken): its waiting queries fail over there.
                Some(Err(_)) | None => return,
            },
            Some((id, answer)) = answering.next(), if !answering.is_empty() => {
                if answers.send(frame(id, &answer)).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---- the asking side ----

/// Which peer URLs this node may link to, and how.
#[derive(Clone)]
enum Scheme {
    /// `--peer-queries remoting`: none.
    None,
    /// No node TLS: `http://` URLs.
    Plain,
    /// Node TLS served on the management port too: `https://` URLs, trusting the node CA.
    Tls(TlsConnector),
    /// Node TLS on the sessions only: none (the peers' management ports are plaintext).
    SessionsOnly,
}

type Waiting = Mutex<HashMap<u64, oneshot::Sender<EntityAnswer>>>;

/// Removes a query from its link's waiting ones when dropped.
struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.lock().expect("link lock").remove(&self.id);
    }
}

/// One open link to a peer.
struct Link {
    out: tokio::sync::Mutex<FramedWrite<WriteHalf<Box<dyn Io>>, LengthDelimitedCodec>>,
    waiting: Arc<Waiting>,
    next_id: AtomicU64,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// This node's links to its peers, one per peer, opened on first use.
pub(crate) struct QueryLinks {
    scheme: Scheme,
    call_timeout: Duration,
    links: DashMap<Arc<str>, Arc<Link>>,
    /// Per peer, held while its link is opened, so concurrent first queries open one (and a
    /// peer that does not answer holds up only its own).
    opening: DashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>,
    /// Peers whose port did not take the link, since when.
    refused: Mutex<HashMap<Arc<str>, Instant>>,
}

impl QueryLinks {
    pub fn new(
        transport: PeerTransport,
        tls: Option<&NodeTls>,
        tls_serve: bool,
        call_timeout: Duration,
    ) -> Arc<Self> {
        let scheme = match (transport, tls) {
            (PeerTransport::Remoting, _) => Scheme::None,
            (PeerTransport::Link, None) => Scheme::Plain,
            (PeerTransport::Link, Some(_)) if !tls_serve => Scheme::SessionsOnly,
            (PeerTransport::Link, Some(tls)) => Scheme::Tls(tls.connector()),
        };
        Arc::new(Self {
            scheme,
            call_timeout,
            links: DashMap::new(),
            opening: DashMap::new(),
            refused: Mutex::new(HashMap::new()),
        })
    }

    /// Asks the peer whose management port is at `url`; the query back when that peer is not
    /// to be asked over a link (the caller then uses the session).
    pub async fn ask(
        self: &Arc<Self>,
        url: &Arc<str>,
        query: EntityQuery,
    ) -> Result<Result<EntityAnswer, CallError>, EntityQuery> {
        let Some(link) = self.link(url).await else {
            return Err(query);
        };
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        link.waiting.lock().expect("link lock").insert(id, reply);
        // Forgets the query however this ends: answered, timed out, failed, or the caller gone.
        let _forget = Forget {
            waiting: &link.waiting,
            id,
        };
        let sent = link.out.lock().await.send(frame(id, &query)).await;
        if let Err(e) = sent {
            self.drop_link(url, &link, &e.to_string());
            return Err(query);
        }
        match tokio::time::timeout(self.call_timeout, answer).await {
            Ok(Ok(answer)) => Ok(Ok(answer)),
            // The link closed under the query.
            Ok(Err(_)) => Ok(Err(CallError::Dropped)),
            Err(_) => Ok(Err(CallError::Timeout)),
        }
    }

    /// The open link to `url`, opening one if needed; `None` if it is not to be used now.
    async fn link(self: &Arc<Self>, url: &Arc<str>) -> Option<Arc<Link>> {
        if let Some(link) = self.links.get(url) {
            return Some(link.clone());
        }
        let tls = match (&self.scheme, url.split_once("://").map(|(s, _)| s)) {
            (Scheme::Plain, Some("http")) => None,
            (Scheme::Tls(tls), Some("https")) => Some(tls.clone()),
            _ => return None,
        };
        let opening = self.opening.entry(url.clone()).or_default().clone();
        let _opening = opening.lock().await;
        if let Some(link) = self.links.get(url) {
            return Some(link.clone());
        }
        if self.refused_now(url) {
            return None;
        }
        match tokio::time::timeout(self.call_timeout, open(url, tls)).await {
            Ok(Ok((link, incoming))) => {
                let link = Arc::new(link);
                self.links.insert(url.clone(), link.clone());
                tokio::spawn(
                    self.clone()
                        .read_answers(url.clone(), link.clone(), incoming),
                );
                tracing::debug!("query link to {url} open");
                Some(link)
            }
            Ok(Err(e)) => {
                self.refuse(url, &e);
                None
            }
            Err(_) => {
                self.refuse(url, "timed out");
                None
            }
        }
    }

    /// Hands each answer to its query until the link closes; then the queries still waiting
    /// fail (their callers try again, through the session while the peer is set aside).
    async fn read_answers(
        self: Arc<Self>,
        url: Arc<str>,
        link: Arc<Link>,
        mut incoming: FramedRead<ReadHalf<Box<dyn Io>>, LengthDelimitedCodec>,
    ) {
        let why = loop {
            match incoming.next().await {
                Some(Ok(bytes)) => match unframe::<EntityAnswer>(bytes) {
                    Ok((id, answer)) => {
                        let waiting = link.waiting.lock().expect("link lock").remove(&id);
                        if let Some(waiting) = waiting {
                            let _ = waiting.send(answer);
                        }
                    }
                    Err(e) => break format!("an undecodable answer ({e})"),
                },
                Some(Err(e)) => break e.to_string(),
                None => break "closed by the peer".to_string(),
            }
        };
        self.drop_link(&url, &link, &why);
    }

    fn drop_link(&self, url: &Arc<str>, link: &Arc<Link>, why: &str) {
        if self
            .links
            .remove_if(url, |_, open| Arc::ptr_eq(open, link))
            .is_some()
        {
            tracing::info!("query link to {url} closed: {why}");
        }
        link.waiting.lock().expect("link lock").clear();
    }

    fn refused_now(&self, url: &Arc<str>) -> bool {
        let mut refused = self.refused.lock().expect("refusals lock");
        match refused.get(url) {
            Some(since) if since.elapsed() < RETRY_LINK_AFTER => true,
            Some(_) => {
                refused.remove(url);
                false
            }
            None => false,
        }
    }

    /// Asks `url` through the session for a while; one log line per refusal, not per query.
    fn refuse(&self, url: &Arc<str>, why: &str) {
        let mut refused = self.refused.lock().expect("refusals lock");
        if refused.insert(url.clone(), Instant::now()).is_none() {
            tracing::warn!(
                "no query link to {url} ({why}); its queries go through the cluster session for {} s",
                RETRY_LINK_AFTER.as_secs()
            );
        }
    }
}

type Incoming = FramedRead<ReadHalf<Box<dyn Io>>, LengthDelimitedCodec>;

/// Connects to `url` (`http://host:port` or `https://...`) and upgrades the connection.
async fn open(url: &str, tls: Option<TlsConnector>) -> Result<(Link, Incoming), String> {
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .ok_or_else(|| format!("{url} is not a URL"))?;
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let io: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(tls) => Box::new(
            tls.connect(tls::server_name(authority)?, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?,
        ),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection.with_upgrades());
    let request = hyper::Request::get(PATH)
        .header(header::HOST, authority)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("the peer answered {}", response.status()));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| e.to_string())?;
    // The upgrade hands back the connection as hyper's IO; the link reads and writes it with
    // tokio's traits.
    let io: Box<dyn Io> = Box::new(TokioIo::new(upgraded));
    let (read, write) = tokio::io::split(io);
    Ok((
        Link {
            out: tokio::sync::Mutex::new(FramedWrite::new(write, codec())),
            waiting: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        },
        FramedRead::new(read, codec()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(transport: PeerTransport) -> Arc<QueryLinks> {
        QueryLinks::new(transport, None, false, Duration::from_millis(500))
    }

    fn query(id: &str) -> EntityQuery {
        EntityQuery {
            entity_type: "users".into(),
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_frame_gives_back_its_id_and_message_and_a_short_one_is_an_error() {
        let bytes = frame(42, &query("7"));
        let (id, back) = unframe::<EntityQuery>(BytesMut::from(&bytes[..])).unwrap();
        assert_eq!((id, back), (42, query("7")));
        assert!(unframe::<EntityQuery>(BytesMut::from(&b"1234"[..])).is_err());
    }

    #[tokio::test]
    async fn a_remoting_node_and_a_plaintext_node_asked_for_https_link_to_nobody() {
        let url: Arc<str> = Arc::from("http://127.0.0.1:1");
        assert!(links(PeerTransport::Remoting).link(&url).await.is_none());
        let https: Arc<str> = Arc::from("https://127.0.0.1:1");
        assert!(
            links(PeerTransport::Link).link(&https).await.is_none(),
            "no CA to trust an https peer with"
        );
    }

    #[tokio::test]
    async fn a_peer_whose_port_refuses_is_asked_through_the_session_for_a_while() {
        // Nothing listens on the port: the link is not opened and the query is given back.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: Arc<str> = Arc::from(format!("http://127.0.0.1:{port}"));
        let links = links(PeerTransport::Link);
        assert_eq!(links.ask(&url, query("7")).await.err(), Some(query("7")));
        assert!(links.refused_now(&url), "set aside after the refusal");
    }

    #[tokio::test]
    async fn the_owner_closes_a_link_that_sends_an_undecodable_query() {
        let (asking, owner) = tokio::io::duplex(1024);
        let serving = tokio::spawn(serve(Arc::new(HashMap::new()), owner));
        let mut out = FramedWrite::new(asking, codec());
        out.send(Bytes::from_static(b"xyz")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the link is closed")
            .unwrap();
    }

    /// A link to a port that serves the upgrade: answers come back to the queries that asked,
    /// also when answered out of order.
    #[tokio::test]
    async fn queries_over_a_link_get_their_own_answers() {
        use crate::allocation::AllocationTable;
        use crate::cluster::wire::entity_answer;
        use futures::future::BoxFuture;

        /// Answers with the id, after a delay that reverses the order of "a" and "b".
        struct Echo(Arc<AllocationTable>);
        impl Endpoint for Echo {
            fn table(&self) -> &Arc<AllocationTable> {
                &self.0
            }
            fn answer(&self, query: EntityQuery) -> BoxFuture<'_, EntityAnswer> {
                Box::pin(async move {
                    let wait = if query.id == "a" { 50 } else { 0 };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    EntityAnswer {
                        result: Some(entity_answer::Result::Reply(query.id.into_bytes())),
                    }
                })
            }
        }
        let endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>> = Arc::new(HashMap::from([(
            "users".to_string(),
            Arc::new(Echo(Arc::new(AllocationTable::new("n1")))) as Arc<dyn Endpoint>,
        )]));
        let app = axum::Router::new().route(
            PATH,
            axum::routing::get(move |req: Request| async move { accept(endpoints, req) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Arc<str> = Arc::from(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let links = links(PeerTransport::Link);
        let (a, b) = tokio::join!(links.ask(&url, query("a")), links.ask(&url, query("b")));
        for (asked, answered) in [("a", a), ("b", b)] {
            let answer = answered.expect("asked over the link").expect("answered");
            assert_eq!(
                answer.result,
                Some(entity_answer::Result::Reply(asked.as_bytes().to_vec()))
            );
        }
        // A query whose caller gave up (its future dropped) leaves nothing behind on the link.
        let link = links.link(&url).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(5), links.ask(&url, query("a"))).await;
        assert!(link.waiting.lock().unwrap().is_empty());
        let mut other_type = query("c");
        other_type.entity_type = "carts".into();
        let answer = links.ask(&url, other_type).await.unwrap().unwrap();
        assert!(
            matches!(answer.result, Some(entity_answer::Result::Error(ref e)) if e.contains("carts")),
            "{answer:?}"
        );
    }
}
