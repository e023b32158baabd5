//! The query link: the queries (and commands) a node forwards to a shard's owner, over one
//! connection to the owner's management port (an HTTP/1.1 upgrade to [`PROTOCOL`], then
//! length-delimited frames), with as few thread hand-offs as a round trip allows.
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
//! Both ends write what is ready in one write: the owner every answer ready at once, and the
//! asking node the frames of requests that came while another request was writing (that one
//! writes them with its own). A write costs a system call here and a wake-up there, about as
//! much as the rest of a forwarded query (docs/BENCHMARKS.md).
//!
//! The cluster session stays the way when the link cannot be taken: the owner's management URL
//! is not known yet, the operator chose it (`--peer-queries remoting`), node TLS without TLS on
//! the management port (with node TLS a query never crosses in the clear), or the owner's port
//! did not take the link (then for [`RETRY_LINK_AFTER`], with one log line).
//!
//! A command forwarded over the link runs at the owner as one sent there would
//! (`commands::direct`): without a record, answered once its change commits. The owner
//! *declines* one its shard does not take, and the sending node writes it as a record instead.
//! Commands do not take the session: without a link they are written as records.
//!
//! The link answers reads and runs commands that any client of the node's public routes
//! (`Entities` on the gRPC port, `/entities/...` on this port) can already send, so it asks no
//! more of a caller.
//!
//! A frame is a `u32` big-endian length, then an `u64` little-endian request id, then the
//! protobuf message (`LinkRequest` towards the owner, `LinkAnswer` back). An owner still takes
//! [`PROTOCOL_V1`] (bare `EntityQuery` and `EntityAnswer`, no commands) from older nodes; an
//! older owner refuses this build's [`PROTOCOL`], whose queries then take the session for a
//! while (see [`RETRY_LINK_AFTER`]) and commands the record.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::cluster::endpoint::{self, CallError, Endpoint};
use crate::cluster::tls::{self, NodeTls};
use crate::cluster::wire::{
    link_answer, link_request, CommandAnswer, EntityAnswer, EntityCommand, EntityQuery, LinkAnswer,
    LinkRequest,
};

/// Where the management port takes the link.
pub(crate) const PATH: &str = "/cluster/query-link";
/// The protocol the connection is upgraded to (`Upgrade:` header).
pub(crate) const PROTOCOL: &str = "kafka-sharding-query-link/2";
/// The protocol of older builds, still served: queries only, framed bare.
pub(crate) const PROTOCOL_V1: &str = "kafka-sharding-query-link/1";
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

/// `LinkRequest`'s field numbers (`proto/cluster.proto`).
const QUERY_TAG: u32 = 1;
const COMMAND_TAG: u32 = 2;

/// The frame of a `LinkRequest` holding `message` as its field `tag`, written from a borrow
/// (so a request that finds no link is given back to its caller as it was).
fn request_frame(id: u64, tag: u32, message: &impl Message) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + 16 + message.encoded_len());
    out.put_u64_le(id);
    prost::encoding::message::encode(tag, message, &mut out);
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

/// Which protocol a link speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// [`PROTOCOL_V1`]: `EntityQuery` frames answered with `EntityAnswer` frames.
    V1,
    /// [`PROTOCOL`]: `LinkRequest` frames answered with `LinkAnswer` frames.
    V2,
}

impl Version {
    fn of(protocol: &[u8]) -> Option<Self> {
        if protocol.eq_ignore_ascii_case(PROTOCOL.as_bytes()) {
            Some(Self::V2)
        } else if protocol.eq_ignore_ascii_case(PROTOCOL_V1.as_bytes()) {
            Some(Self::V1)
        } else {
            None
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Self::V1 => PROTOCOL_V1,
            Self::V2 => PROTOCOL,
        }
    }

    fn request(self, frame: BytesMut) -> Result<(u64, LinkRequest), String> {
        match self {
            Self::V1 => unframe::<EntityQuery>(frame).map(|(id, query)| {
                let request = Some(link_request::Request::Query(query));
                (id, LinkRequest { request })
            }),
            Self::V2 => unframe::<LinkRequest>(frame),
        }
    }

    fn answer(self, id: u64, answer: LinkAnswer) -> Bytes {
        match (self, answer.answer) {
            (Self::V1, Some(link_answer::Answer::Query(answer))) => frame(id, &answer),
            // A V1 link carries queries only (`request`), so it gets no other answer.
            (Self::V1, _) => frame(id, &EntityAnswer::default()),
            (Self::V2, answer) => frame(id, &LinkAnswer { answer }),
        }
    }
}

/// `GET /cluster/query-link` with `Upgrade: kafka-sharding-query-link/2` (or `/1`): answers the
/// link's queries from this node's shards (and standbys) and runs its commands there, never
/// forwarding on.
pub(crate) fn accept(
    endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    mut req: Request,
) -> Response {
    let version = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| Version::of(v.as_bytes()));
    let upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let (Some(version), Some(upgrade)) = (version, upgrade) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("{PATH} is the query link between nodes: an HTTP/1.1 upgrade to {PROTOCOL}"),
        )
            .into_response();
    };
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => serve(endpoints, TokioIo::new(upgraded), version).await,
            Err(e) => tracing::debug!("a query link was not upgraded: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(
            header::UPGRADE,
            HeaderValue::from_static(version.protocol()),
        )
        .body(Body::empty())
        .expect("a static response")
}

/// One link's requests, answered as they complete, until the asking node closes it.
async fn serve(
    endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    version: Version,
) {
    let (read, write) = tokio::io::split(io);
    let mut requests = FramedRead::new(read, codec());
    let mut answers = FramedWrite::new(write, codec());
    let mut answering = FuturesUnordered::new();
    loop {
        tokio::select! {
            read = requests.next() => match read {
                Some(Ok(bytes)) => match version.request(bytes) {
                    Ok((id, LinkRequest { request: Some(request) })) => {
                        answering.push(respond(endpoints.clone(), id, request));
                    }
                    Ok((_, LinkRequest { request: None })) => {
                        tracing::warn!("closing a query link: an empty request");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("closing a query link: an undecodable request ({e})");
                        return;
                    }
                },
                // Closed by the asking node (or broken): its waiting requests fail over there.
                Some(Err(_)) | None => return,
            },
            Some((id, answer)) = answering.next(), if !answering.is_empty() => {
                // Every answer ready by now goes out in one write.
                if answers.feed(version.answer(id, answer)).await.is_err() {
                    return;
                }
                while let Some(Some((id, answer))) = answering.next().now_or_never() {
                    if answers.feed(version.answer(id, answer)).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut answers).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One request's answer, by the endpoint of its entity type.
fn respond(
    endpoints: Arc<HashMap<String, Arc<dyn Endpoint>>>,
    id: u64,
    request: link_request::Request,
) -> futures::future::BoxFuture<'static, (u64, LinkAnswer)> {
    Box::pin(async move {
        let answer = match request {
            link_request::Request::Query(query) => {
                link_answer::Answer::Query(endpoint::answer(&endpoints, query).await)
            }
            link_request::Request::Command(command) => {
                link_answer::Answer::Command(endpoint::command(&endpoints, command).await)
            }
        };
        let answer = Some(answer);
        (id, LinkAnswer { answer })
    })
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

type Waiting = Mutex<HashMap<u64, oneshot::Sender<LinkAnswer>>>;

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

type Out = FramedWrite<WriteHalf<Box<dyn Io>>, LengthDelimitedCodec>;

/// One open link to a peer.
struct Link {
    /// The connection's writing half, held by whichever request is writing (see
    /// [`Link::write`]).
    out: Arc<tokio::sync::Mutex<Out>>,
    /// Frames handed to the request that holds `out`.
    queued: Arc<Mutex<Vec<Bytes>>>,
    /// Set once the link is dropped: a request that finds it set takes another way.
    closed: AtomicBool,
    waiting: Arc<Waiting>,
    next_id: AtomicU64,
}

impl Link {
    fn new(out: Out) -> Self {
        Self {
            out: Arc::new(tokio::sync::Mutex::new(out)),
            queued: Arc::new(Mutex::new(Vec::new())),
            closed: AtomicBool::new(false),
            waiting: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        }
    }

    /// Writes `frame` with whatever other requests queued meanwhile. Requests that find the
    /// connection being written leave their frames for the writer and return, so concurrent
    /// requests share one write (one system call, one wake-up at the owner) instead of taking
    /// turns, while a lone request still writes its own frame at once.
    async fn write(&self, frame: Bytes) -> std::io::Result<()> {
        self.queued.lock().expect("link queue lock").push(frame);
        let Ok(out) = self.out.clone().try_lock_owned() else {
            // The writer looks at the queue again after it lets go of the connection.
            return Ok(());
        };
        let mut writer = Writer {
            out: Some(out),
            queued: self.queued.clone(),
            hand_over: true,
        };
        // With other requests in flight, the ones already runnable queue their frames first
        // and share the write. A request alone on the link writes at once.
        if self.waiting.lock().expect("link lock").len() > 1 {
            tokio::task::yield_now().await;
        }
        writer.drain().await
    }
}

/// The request writing a link's queued frames. Dropped before it finished (its request was
/// given up mid-write), it leaves the rest to a task of its own, so frames other requests
/// queued are not left unwritten.
struct Writer {
    out: Option<tokio::sync::OwnedMutexGuard<Out>>,
    queued: Arc<Mutex<Vec<Bytes>>>,
    /// Whether a drop before the end hands the rest to a task of its own.
    hand_over: bool,
}

impl Writer {
    /// Writes the queued frames until none are left once the connection is let go. After a
    /// failed write it lets go at once: the link is being dropped.
    async fn drain(&mut self) -> std::io::Result<()> {
        let written = self.write_queued().await;
        if written.is_err() {
            self.out = None;
        }
        written
    }

    async fn write_queued(&mut self) -> std::io::Result<()> {
        loop {
            let Some(out) = self.out.as_mut() else {
                return Ok(());
            };
            loop {
                let frames = std::mem::take(&mut *self.queued.lock().expect("link queue lock"));
                if frames.is_empty() {
                    break;
                }
                for frame in frames {
                    out.feed(frame).await?;
                }
                SinkExt::<Bytes>::flush(&mut **out).await?;
            }
            // A frame queued after the last look but before this lets go found the connection
            // taken: look once more, writing it unless another request took over.
            let lock = tokio::sync::OwnedMutexGuard::mutex(out).clone();
            self.out = None;
            if self.queued.lock().expect("link queue lock").is_empty() {
                return Ok(());
            }
            match lock.try_lock_owned() {
                Ok(out) => self.out = Some(out),
                Err(_) => return Ok(()),
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let Some(out) = self.out.take() else {
            return;
        };
        // Once only: a writer dropped in its own task (the runtime shutting down) lets the
        // frames go with the link. So does one dropped without a runtime.
        if !self.hand_over {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = Writer {
            out: Some(out),
            queued: self.queued.clone(),
            hand_over: false,
        };
        runtime.spawn(async move {
            let _ = rest.drain().await;
        });
    }
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
        let framed = |id| request_frame(id, QUERY_TAG, &query);
        match self.call(url, framed, self.call_timeout).await {
            None => Err(query),
            Some(Ok(link_answer::Answer::Query(answer))) => Ok(Ok(answer)),
            Some(Ok(_)) => Ok(Err(CallError::Remote(
                "a query answered as a command".into(),
            ))),
            Some(Err(e)) => Ok(Err(e)),
        }
    }

    /// Has the peer whose management port is at `url` run `command`, waiting up to `timeout`
    /// for its answer; the command back when that peer is not to be asked over a link (the
    /// caller then writes it as a record).
    pub async fn command(
        self: &Arc<Self>,
        url: &Arc<str>,
        command: EntityCommand,
        timeout: Duration,
    ) -> Result<Result<CommandAnswer, CallError>, EntityCommand> {
        let framed = |id| request_frame(id, COMMAND_TAG, &command);
        match self.call(url, framed, timeout).await {
            None => Err(command),
            Some(Ok(link_answer::Answer::Command(answer))) => Ok(Ok(answer)),
            Some(Ok(_)) => Ok(Err(CallError::Remote(
                "a command answered as a query".into(),
            ))),
            Some(Err(e)) => Ok(Err(e)),
        }
    }

    /// One request over the link to `url` (`framed` writes its frame, given its id); `None`
    /// when there is no link to take.
    async fn call(
        self: &Arc<Self>,
        url: &Arc<str>,
        framed: impl FnOnce(u64) -> Bytes,
        timeout: Duration,
    ) -> Option<Result<link_answer::Answer, CallError>> {
        let link = self.link(url).await?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        link.waiting.lock().expect("link lock").insert(id, reply);
        // Forgets the request however this ends: answered, timed out, failed, or the caller gone.
        let _forget = Forget {
            waiting: &link.waiting,
            id,
        };
        // Dropped after it was taken from the table: its waiting requests were failed already
        // (`drop_link` closes before it clears them), so this one must not wait there.
        if link.closed.load(Ordering::SeqCst) {
            return None;
        }
        if let Err(e) = link.write(framed(id)).await {
            self.drop_link(url, &link, &e.to_string());
            return None;
        }
        Some(match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(LinkAnswer {
                answer: Some(answer),
            })) => Ok(answer),
            Ok(Ok(LinkAnswer { answer: None })) => Err(CallError::Remote("an empty answer".into())),
            // The link closed under the request.
            Ok(Err(_)) => Err(CallError::Dropped),
            Err(_) => Err(CallError::Timeout),
        })
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
                Some(Ok(bytes)) => match unframe::<LinkAnswer>(bytes) {
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
        link.closed.store(true, Ordering::SeqCst);
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
        Link::new(FramedWrite::new(write, codec())),
        FramedRead::new(read, codec()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::entity_answer;

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

    fn command(id: &str) -> EntityCommand {
        EntityCommand {
            entity_type: "users".into(),
            id: id.into(),
            command: b"+1".to_vec(),
            idempotency_key: Some("k".into()),
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

    #[test]
    fn a_request_framed_from_a_borrow_is_the_link_request_of_its_kind() {
        let unframed = |bytes: Bytes| Version::V2.request(BytesMut::from(&bytes[..])).unwrap();
        let (id, asked) = unframed(request_frame(7, QUERY_TAG, &query("a")));
        assert_eq!(id, 7);
        assert_eq!(
            asked.request,
            Some(link_request::Request::Query(query("a")))
        );
        let (_, sent) = unframed(request_frame(8, COMMAND_TAG, &command("b")));
        assert_eq!(
            sent.request,
            Some(link_request::Request::Command(command("b")))
        );
    }

    /// An older node's link (protocol /1): bare queries, answered with bare answers.
    #[tokio::test]
    async fn an_owner_still_answers_an_older_nodes_queries_framed_bare() {
        let (asking, owner) = tokio::io::duplex(4096);
        tokio::spawn(serve(echo_endpoints(), owner, Version::V1));
        let (read, write) = tokio::io::split(asking);
        let mut out = FramedWrite::new(write, codec());
        let mut answers = FramedRead::new(read, codec());
        out.send(frame(3, &query("old"))).await.unwrap();
        let answer = answers.next().await.unwrap().unwrap();
        let (id, answer) = unframe::<EntityAnswer>(answer).unwrap();
        assert_eq!(id, 3);
        assert_eq!(
            answer.result,
            Some(entity_answer::Result::Reply(b"old".to_vec()))
        );
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
        let timeout = Duration::from_secs(1);
        assert_eq!(
            links.command(&url, command("7"), timeout).await.err(),
            Some(command("7")),
            "a command is given back too (its caller writes the record)"
        );
    }

    #[tokio::test]
    async fn the_owner_closes_a_link_that_sends_an_undecodable_query() {
        let (asking, owner) = tokio::io::duplex(1024);
        let serving = tokio::spawn(serve(Arc::new(HashMap::new()), owner, Version::V2));
        let mut out = FramedWrite::new(asking, codec());
        out.send(Bytes::from_static(b"xyz")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the link is closed")
            .unwrap();
    }

    /// Frames read off the far end of a link's connection.
    async fn frames_read(far: tokio::io::DuplexStream, count: usize) -> Vec<Bytes> {
        let mut read = FramedRead::new(far, codec());
        let mut frames = Vec::new();
        while frames.len() < count {
            let next = tokio::time::timeout(Duration::from_secs(5), read.next()).await;
            frames.push(next.expect("the frame arrives").unwrap().unwrap().freeze());
        }
        frames
    }

    #[tokio::test]
    async fn a_frame_queued_behind_a_writer_given_up_mid_write_is_still_written() {
        // A buffer smaller than the first frame: its writer blocks until the far end reads.
        let (near, far) = tokio::io::duplex(16);
        let (_, write) = tokio::io::split(Box::new(near) as Box<dyn Io>);
        let link = Arc::new(Link::new(FramedWrite::new(write, codec())));
        let first = Bytes::from(vec![1u8; 1024]);
        let writing = tokio::spawn({
            let link = link.clone();
            let first = first.clone();
            async move { link.write(first).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !writing.is_finished(),
            "the first writer waits on the far end"
        );
        // Finds the connection taken: queued for the writer, and back at once.
        let second = Bytes::from_static(b"second");
        tokio::time::timeout(Duration::from_secs(1), link.write(second.clone()))
            .await
            .expect("a queued frame does not wait for the write")
            .unwrap();
        writing.abort();
        assert!(writing.await.unwrap_err().is_cancelled());
        assert_eq!(frames_read(far, 2).await, vec![first, second]);
    }

    #[tokio::test]
    async fn many_queries_at_once_over_one_link_each_get_their_own_answer() {
        let url = serve_echo_links().await;
        let links = links(PeerTransport::Link);
        let ids: Vec<String> = (0..500).map(|i| format!("user-{i}")).collect();
        let answers =
            futures::future::join_all(ids.iter().map(|id| links.ask(&url, query(id)))).await;
        for (id, answered) in ids.iter().zip(answers) {
            let answer = answered.expect("asked over the link").expect("answered");
            assert_eq!(
                answer.result,
                Some(entity_answer::Result::Reply(id.as_bytes().to_vec()))
            );
        }
    }

    /// Answers a query with its id, after a delay that reverses the order of "a" and "b"; runs
    /// a command into its id and command, declining entity "elsewhere".
    struct Echo(Arc<crate::allocation::AllocationTable>);

    impl Endpoint for Echo {
        fn table(&self) -> &Arc<crate::allocation::AllocationTable> {
            &self.0
        }
        fn answer(&self, query: EntityQuery) -> futures::future::BoxFuture<'_, EntityAnswer> {
            Box::pin(async move {
                let wait = if query.id == "a" { 50 } else { 0 };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                EntityAnswer {
                    result: Some(entity_answer::Result::Reply(query.id.into_bytes())),
                }
            })
        }
        fn command(&self, command: EntityCommand) -> futures::future::BoxFuture<'_, CommandAnswer> {
            use crate::cluster::wire::{command_answer, command_outcome, CommandOutcome, NotOwner};
            Box::pin(async move {
                let result = match command.id.as_str() {
                    "elsewhere" => command_answer::Result::Declined(NotOwner {}),
                    id => command_answer::Result::Outcome(CommandOutcome {
                        result: Some(command_outcome::Result::Reply(
                            [id.as_bytes(), &command.command].concat(),
                        )),
                    }),
                };
                CommandAnswer {
                    result: Some(result),
                }
            })
        }
    }

    fn echo_endpoints() -> Arc<HashMap<String, Arc<dyn Endpoint>>> {
        Arc::new(HashMap::from([(
            "users".to_string(),
            Arc::new(Echo(Arc::new(crate::allocation::AllocationTable::new(
                "n1",
            )))) as Arc<dyn Endpoint>,
        )]))
    }

    /// A management port taking links to the [`Echo`] endpoint; its URL.
    async fn serve_echo_links() -> Arc<str> {
        let endpoints = echo_endpoints();
        let app = axum::Router::new().route(
            PATH,
            axum::routing::get(move |req: Request| async move { accept(endpoints, req) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Arc::from(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// A link to a port that serves the upgrade: answers come back to the queries that asked,
    /// also when answered out of order.
    #[tokio::test]
    async fn queries_and_commands_over_a_link_get_their_own_answers() {
        use crate::cluster::wire::{command_answer, command_outcome};
        let url = serve_echo_links().await;
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

        // Commands on the same link, beside queries: each its own answer.
        let timeout = Duration::from_secs(5);
        let (ran, asked, declined) = tokio::join!(
            links.command(&url, command("c"), timeout),
            links.ask(&url, query("a")),
            links.command(&url, command("elsewhere"), timeout),
        );
        let ran = ran.expect("sent over the link").expect("answered").result;
        let Some(command_answer::Result::Outcome(outcome)) = ran else {
            panic!("{ran:?}");
        };
        assert_eq!(
            outcome.result,
            Some(command_outcome::Result::Reply(b"c+1".to_vec()))
        );
        let asked = asked.unwrap().unwrap();
        assert_eq!(
            asked.result,
            Some(entity_answer::Result::Reply(b"a".to_vec()))
        );
        let declined = declined.unwrap().unwrap().result;
        assert!(
            matches!(declined, Some(command_answer::Result::Declined(_))),
            "{declined:?}"
        );
        let mut other_type = command("d");
        other_type.entity_type = "carts".into();
        let declined = links
            .command(&url, other_type, timeout)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(declined.result, Some(command_answer::Result::Declined(_))),
            "a type the owner does not host is declined: {declined:?}"
        );
    }
}
