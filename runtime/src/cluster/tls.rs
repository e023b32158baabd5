//! TLS between nodes: the actor cluster's sessions run over mutually authenticated TLS when
//! a node is given a certificate, its key and the CA that signs every node's certificate.
//!
//! Both directions verify: a node accepts a session only from a peer presenting a certificate
//! signed by the CA (so a node without one is refused before the cookie is even read), and it
//! dials a peer only if the peer's certificate is signed by the CA and names the host it dialled
//! (the seed's host as given, or the host a peer advertises). The cookie is still checked inside
//! the TLS session. ractor_cluster's listener takes the acceptor; outgoing sessions are opened
//! with its `connect_enc` (see `membership`).
//!
//! The same certificate may also serve gRPC and the management port (`--tls-serve`): server
//! TLS only there, since their clients are applications and operators' tools, which trust the
//! CA but have no node certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The PEM files a node's TLS is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTlsFiles {
    /// This node's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The certificate(s) of the CA that signs every node's certificate.
    pub ca: PathBuf,
}

/// Why a node's TLS could not be set up (each variant's message names the file and why).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum NodeTlsError {
    #[error("cannot read the {what} in {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the CA certificate in {path} is not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("the certificate {cert} and key {key} do not make a TLS configuration: {reason}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// A node's TLS, loaded and checked once at start: what accepts and what dials sessions.
#[derive(Clone)]
pub struct NodeTls {
    files: NodeTlsFiles,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// Server TLS for HTTP clients (no client certificate asked), HTTP/2 and HTTP/1.1.
    serving: TlsAcceptor,
    /// The certificate chain and key as read, for tonic's own TLS configuration.
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Reads the PEM files and builds both sides' configuration; every problem with a file is
    /// reported here, not at the first session.
    pub fn load(files: NodeTlsFiles) -> Result<Self, NodeTlsError> {
        let certs = read_all::<CertificateDer<'static>>(&files.cert, "certificate")?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| NodeTlsError::Read {
            what: "private key",
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in read_all::<CertificateDer<'static>>(&files.ca, "CA certificate")? {
            roots.add(ca).map_err(|e| NodeTlsError::BadCa {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let config_error = |e: &dyn fmt::Display| NodeTlsError::Config {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        };
        // One provider, named: the build has no other, and naming it keeps a second one
        // appearing in the dependency tree from turning into a panic at start.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| NodeTlsError::BadCa {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| config_error(&e))?;
        let mut serving = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&e))?
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| config_error(&e))?;
        serving.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| config_error(&e))?;
        let read = |path: &Path, what| {
            std::fs::read(path).map_err(|e| NodeTlsError::Read {
                what,
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        Ok(Self {
            cert_pem: read(&files.cert, "certificate")?,
            key_pem: read(&files.key, "private key")?,
            files,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            serving: TlsAcceptor::from(Arc::new(serving)),
        })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &NodeTlsFiles {
        &self.files
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    pub(crate) fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }

    /// tonic's server TLS with this node's certificate.
    pub(crate) fn grpc_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_pem,
            &self.key_pem,
        ))
    }

    /// `listener` with server TLS (this node's certificate) on every connection, for axum.
    pub(crate) fn serve_https(
        &self,
        mut listener: tokio::net::TcpListener,
    ) -> std::io::Result<HttpsListener> {
        let local = listener.local_addr()?;
        let (tx, accepted) = tokio::sync::mpsc::channel(64);
        let acceptor = self.serving.clone();
        // Handshakes run on their own tasks: a slow or silent client cannot hold up the others.
        tokio::spawn(async move {
            while !tx.is_closed() {
                let (stream, addr) = axum::serve::Listener::accept(&mut listener).await;
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        // Port scanners and plain-HTTP clients are not news.
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {addr} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {addr} timed out"),
                    }
                });
            }
        });
        Ok(HttpsListener { accepted, local })
    }
}

/// Connections whose TLS handshake completed, for axum.
pub(crate) struct HttpsListener {
    accepted: tokio::sync::mpsc::Receiver<(TlsStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accepting task only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The name a dialled peer's certificate must carry: the host part of `host:port`.
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("'{host}' is neither a DNS name nor an IP address"))
}

fn read_all<T: PemObject>(path: &Path, what: &'static str) -> Result<Vec<T>, NodeTlsError> {
    let items = T::pem_file_iter(path)
        .and_then(|items| items.collect::<Result<Vec<T>, _>>())
        .map_err(|e| NodeTlsError::Read {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if items.is_empty() {
        return Err(NodeTlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_of_the_address() {
        assert_eq!(
            server_name("node-1.cluster.local:2551").unwrap(),
            ServerName::try_from("node-1.cluster.local").unwrap()
        );
        assert_eq!(
            server_name("127.0.0.1:2551").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:2551").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert!(server_name("bad host:1").is_err());
    }

    /// A CA and one certificate it signs for 127.0.0.1, written as PEM files into `dir`.
    fn make_ca(dir: &Path, name: &str) -> NodeTlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let files = NodeTlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, ca.pem()).unwrap();
        files
    }

    /// Dials `server` from `client` over an in-memory pipe; Ok once a byte made the round trip
    /// (with TLS 1.3 the client finishes before the server has judged its certificate).
    async fn session(client: &NodeTls, server: &NodeTls) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(16 * 1024);
        let acceptor = server.acceptor();
        let served = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            s.write_all(&byte).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())
        });
        let dialled = async {
            let mut c = client
                .connector()
                .connect(server_name("127.0.0.1:1")?, a)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(&[7]).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
        .await;
        let served = served.await.unwrap();
        dialled.and(served)
    }

    #[tokio::test]
    async fn nodes_of_one_ca_talk_and_a_node_of_another_is_refused_both_ways() {
        let dir = std::env::temp_dir().join(format!("node-tls-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ours = make_ca(&dir, "ours");
        let node = NodeTls::load(ours.clone()).unwrap();
        let theirs = NodeTls::load(make_ca(&dir, "theirs")).unwrap();
        // Their certificate with our CA: they trust us, we do not accept them.
        let trusting_stranger = NodeTls::load(NodeTlsFiles {
            ca: ours.ca.clone(),
            ..theirs.files().clone()
        })
        .unwrap();

        session(&node, &node).await.expect("same CA");
        let err = session(&theirs, &node).await.unwrap_err();
        assert!(
            err.contains("UnknownIssuer"),
            "the dialler refuses us: {err}"
        );
        let err = session(&trusting_stranger, &node).await.unwrap_err();
        assert!(
            !err.is_empty(),
            "we refuse a certificate our CA did not sign"
        );
        let err = session(&node, &theirs).await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("node-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = NodeTlsFiles {
            cert: empty.clone(),
            key: dir.join("absent.key"),
            ca: empty.clone(),
        };
        let err = NodeTls::load(files.clone()).unwrap_err().to_string();
        assert!(err.contains("empty.pem holds no PEM certificate"), "{err}");
        let err = NodeTls::load(NodeTlsFiles {
            cert: dir.join("absent.pem"),
            ..files
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot read the certificate in") && err.contains("absent.pem"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
