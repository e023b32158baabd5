//! A node's command line and configuration.
//!
//! `<binary> <remoting-port> <management-port> <grpc-port>`, or `<binary> N` for ports 2550+N,
//! 8550+N, 8080+N. Every option has an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::query_link::PeerTransport;
use crate::cluster::tls::{NodeTls, NodeTlsFiles};
use crate::kafka_config::{KafkaConnection, KafkaProperties, KafkaProperty};
use crate::logging::LogFormat;

/// The cookie a node has unless told otherwise (refused off loopback).
pub const DEFAULT_COOKIE: &str = "kafka-sharding-cookie";

/// The command-line options of a node, for an application to flatten into its own CLI
/// (`#[command(flatten)]`); every option has an environment fallback.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Either three ports (remoting, management, gRPC) or one node number N
    /// (ports 2550+N, 8550+N, 8080+N).
    #[arg(value_name = "PORTS", num_args = 1..=3, required = true)]
    pub ports: Vec<u16>,

    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,

    /// Cluster seed nodes (host:port of their remoting ports), comma separated.
    #[arg(
        long,
        env = "SEED_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:2551,127.0.0.1:2552"
    )]
    pub seed_nodes: Vec<String>,

    /// Shared secret nodes authenticate each other with.
    #[arg(long, env = "CLUSTER_COOKIE", default_value = DEFAULT_COOKIE)]
    pub cookie: String,

    /// Host peers and clients reach this node at (its advertised address, part of its node id);
    /// its ports bind to it too unless --bind-host is given.
    #[arg(
        long,
        visible_alias = "advertise-host",
        env = "NODE_HOST",
        default_value = "127.0.0.1"
    )]
    pub host: String,

    /// IP address the node's ports bind to (default: --host), e.g. 0.0.0.0 in a container
    /// reached by a DNS name. Off loopback, a default cookie is refused.
    #[arg(long, env = "NODE_BIND_HOST")]
    pub bind_host: Option<String>,

    /// PEM certificate (chain) this node presents to its peers: with --tls-key and --tls-ca,
    /// sessions between nodes run over mutually authenticated TLS. Every node of a cluster
    /// needs it (its certificate naming the host peers dial), or none.
    #[arg(long, env = "NODE_TLS_CERT", value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "NODE_TLS_KEY", value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate of the CA that signs every node's certificate: peers whose certificate
    /// it did not sign are refused.
    #[arg(long, env = "NODE_TLS_CA", value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// Join the consumer groups as a static member (KIP-345; group.instance.id is the node id):
    /// a node restarted within the session timeout gets its own partitions back and no other
    /// node's move. A stopped node then keeps its partitions until the session timeout, since
    /// it does not leave the group.
    #[arg(long, env = "KAFKA_STATIC_MEMBERSHIP")]
    pub static_membership: bool,

    /// Serve gRPC and the management port over TLS too, with --tls-cert and --tls-key (server
    /// TLS: clients trust the CA of --tls-ca and need no certificate of their own).
    #[arg(long, env = "NODE_TLS_SERVE", requires = "tls_cert")]
    pub tls_serve: bool,

    /// Standby replicas per shard: other nodes that keep its state warm by tailing its
    /// changelog, so a node taking the shard over (a failover) reads only the changelog's tail
    /// and queries allowing staleness can be answered while it moves. Each replica costs about
    /// as much memory as the owner's state (~110 B per entity in the bench); 0 turns them off.
    #[arg(long, env = "STANDBY_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=16))]
    pub standby_replicas: u16,

    /// Kafka consumer session timeout: how long a silent node keeps its partitions.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u64,

    /// How long a query waits for a shard that has no known owner (rebalance) before UNAVAILABLE.
    #[arg(long, env = "QUERY_WAIT_MS", default_value_t = 5_000)]
    pub query_wait_ms: u64,

    /// How long a command waits for its committed answer (its write to Kafka included) before
    /// UNAVAILABLE; its outcome is then unknown, and a retry with the same idempotency key
    /// gets it. Longer than a failover (session timeout + restore).
    #[arg(long, env = "COMMAND_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub command_timeout_ms: u64,

    /// Timeout of one call to another node.
    #[arg(long, env = "REMOTE_CALL_TIMEOUT_MS", default_value_t = 2_000)]
    pub remote_call_timeout_ms: u64,

    /// How a query for an entity hosted elsewhere reaches its owner: `link`, one connection to
    /// the owner's management port (fewer thread hand-offs; used when both ends are plaintext
    /// or both serve TLS with --tls-serve), or `remoting`, through the ractor_cluster session.
    /// `link` falls back to the session while the owner's port cannot be reached.
    #[arg(long, env = "PEER_QUERIES", value_enum, default_value_t = PeerTransport::Link)]
    pub peer_queries: PeerTransport,

    /// Events dispatched to entities but not yet acknowledged, across all shards (backpressure).
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 20_000)]
    pub max_in_flight: usize,

    /// How often a checkpoint transaction commits changed states and consumed offsets.
    #[arg(long, env = "COMMIT_INTERVAL_MS", default_value_t = 500)]
    pub commit_interval_ms: u64,

    /// Transaction timeout: how long an open transaction of a crashed node can block the
    /// restore of its partitions.
    #[arg(long, env = "KAFKA_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000)]
    pub transaction_timeout_ms: u64,

    /// An entity inactive this long is passivated (no longer live; its state is kept).
    #[arg(long, env = "PASSIVATE_AFTER_MS", default_value_t = 120_000)]
    pub passivate_after_ms: u64,

    /// How often librdkafka's consumer statistics are refreshed for `/cluster/kafka-stats` (0 = off;
    /// producing them delays fetches on a busy node, so they are for diagnosis).
    #[arg(long, env = "KAFKA_STATISTICS_INTERVAL_MS", default_value_t = 0)]
    pub statistics_interval_ms: u64,

    /// librdkafka debug contexts for the node's consumer, restorer and checkpoint producer (e.g.
    /// `fetch`, `cgrp`, `eos`), logged at debug level under `librdkafka` (set
    /// `RUST_LOG=info,librdkafka=debug`). Verbose: for diagnosis.
    #[arg(long, env = "KAFKA_DEBUG")]
    pub kafka_debug: Option<String>,

    /// Cap on live entities on this node (about 100 bytes each beyond their state); the least
    /// recently active are passivated.
    #[arg(long, env = "MAX_LIVE_ENTITIES", default_value_t = 1_000_000)]
    pub max_live_entities: usize,

    /// Replicas of the topics the node creates (changelog, dead letters); default: the input
    /// topic's replication factor.
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", value_parser = clap::value_parser!(i32).range(1..=32))]
    pub replication_factor: Option<i32>,

    /// How long a revoked shard may take to finish its in-flight events before hand-off.
    #[arg(long, env = "DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// `-X` and `--kafka-config`: the operator's Kafka client properties.
    #[command(flatten)]
    pub kafka_client: KafkaClientArgs,

    /// How log lines are written (`RUST_LOG` sets what is logged).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Kafka client properties from the operator (see `kafka_config`), for any binary to flatten.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaClientArgs {
    /// A Kafka client property, `KEY=VALUE` (repeatable), for every client; prefix the key with
    /// `consumer.`, `producer.` or `admin.` for one kind. Also `KAFKA_CLIENT_<KEY>` variables
    /// (`KAFKA_CLIENT_SASL_USERNAME`). Keys the runtime owns are refused; secrets are never shown.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub kafka_property: Vec<KafkaProperty>,

    /// A Java properties file of Kafka client properties (`-X` and the environment win over it).
    #[arg(long, env = "KAFKA_CONFIG_FILE", value_name = "FILE")]
    pub kafka_config: Option<std::path::PathBuf>,
}

impl KafkaClientArgs {
    /// The properties from the file, the process environment and the flags; the error is a
    /// usage message (it names the key and source, never a secret value).
    pub fn properties(&self) -> Result<KafkaProperties, String> {
        KafkaProperties::from_sources(
            self.kafka_config.as_deref(),
            // vars() would panic on a variable that is not UTF-8, anyone's.
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
            &self.kafka_property,
        )
        .map_err(|e| e.to_string())
    }
}

/// The IP address `host` names (itself when it is one).
fn resolve_host(host: &str) -> Result<std::net::IpAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    (host, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(|addr| addr.ip())
        .ok_or_else(|| format!("--host '{host}' does not resolve; give --bind-host"))
}

/// The three ports of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// ractor_cluster sessions between nodes.
    pub remoting: u16,
    /// Management HTTP.
    pub management: u16,
    /// gRPC front end.
    pub grpc: u16,
}

impl Ports {
    /// Resolves `[N]` or `[remoting, management, grpc]`; anything else is a usage error.
    pub fn from_args(ports: &[u16]) -> Result<Self, String> {
        match *ports {
            [n] if (1..=999).contains(&n) => Ok(Self {
                remoting: 2550 + n,
                management: 8550 + n,
                grpc: 8080 + n,
            }),
            [n] => Err(format!("node number {n} is out of range 1..=999")),
            [remoting, management, grpc] => {
                if remoting == management || remoting == grpc || management == grpc {
                    return Err("the three ports must differ".into());
                }
                if remoting == 0 || management == 0 || grpc == 0 {
                    return Err("ports must be non-zero".into());
                }
                Ok(Self {
                    remoting,
                    management,
                    grpc,
                })
            }
            _ => Err(format!(
                "expected 1 or 3 ports (remoting management grpc), got {}",
                ports.len()
            )),
        }
    }
}

/// Everything a node needs, validated (see [`NodeArgs`] for what each option means).
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct NodeConfig {
    /// The application's name: node names are `<name>-<remoting port>`, metric names start
    /// with `<name>_`.
    pub name: String,
    pub ports: Ports,
    pub host: String,
    /// The address the ports bind to.
    pub bind_host: std::net::IpAddr,
    /// How the node's Kafka clients reach Kafka: bootstrap servers and the operator's properties.
    pub kafka: KafkaConnection,
    pub seed_nodes: Vec<String>,
    pub cookie: String,
    /// TLS for sessions between nodes, loaded from --tls-cert/--tls-key/--tls-ca.
    pub tls: Option<NodeTls>,
    /// Whether gRPC and the management port use `tls` too.
    pub tls_serve: bool,
    pub session_timeout: Duration,
    pub static_membership: bool,
    /// Standby replicas per shard (`--standby-replicas`).
    pub standby_replicas: usize,
    pub query_wait: Duration,
    pub command_timeout: Duration,
    pub remote_call_timeout: Duration,
    pub peer_queries: PeerTransport,
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    pub drain_timeout: Duration,
    pub transaction_timeout: Duration,
    pub passivate_after: Duration,
    pub max_live_entities: usize,
    pub statistics_interval: Duration,
    pub kafka_debug: Option<String>,
    pub replication_factor: Option<i32>,
    pub log_format: LogFormat,
}

impl NodeConfig {
    /// Validates `args` for the application called `name`; the error is a usage message.
    pub fn from_args(name: &str, args: NodeArgs) -> Result<Self, String> {
        let ports = Ports::from_args(&args.ports)?;
        for seed in &args.seed_nodes {
            if seed.parse::<SocketAddr>().is_err() && !seed.contains(':') {
                return Err(format!("seed node '{seed}' is not host:port"));
            }
        }
        if args.max_in_flight == 0 {
            return Err("--max-in-flight must be at least 1".into());
        }
        if args.max_live_entities == 0 {
            return Err("--max-live-entities must be at least 1".into());
        }
        let kafka_properties = args.kafka_client.properties()?;
        let bind_host = match &args.bind_host {
            Some(ip) => ip
                .parse()
                .map_err(|_| format!("--bind-host '{ip}' is not an IP address"))?,
            None => resolve_host(&args.host)?,
        };
        let tls = match (args.tls_cert, args.tls_key, args.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(NodeTls::load(NodeTlsFiles { cert, key, ca }).map_err(|e| e.to_string())?)
            }
            (None, None, None) => None,
            _ => return Err("--tls-cert, --tls-key and --tls-ca go together".into()),
        };
        let config = Self {
            tls,
            tls_serve: args.tls_serve,
            kafka: KafkaConnection::new(args.bootstrap_servers).with_properties(kafka_properties),
            name: name.to_string(),
            ports,
            transaction_timeout: Duration::from_millis(args.transaction_timeout_ms),
            passivate_after: Duration::from_millis(args.passivate_after_ms),
            max_live_entities: args.max_live_entities,
            statistics_interval: Duration::from_millis(args.statistics_interval_ms),
            kafka_debug: args.kafka_debug.filter(|d| !d.is_empty()),
            replication_factor: args.replication_factor,
            log_format: args.log_format,
            host: args.host,
            bind_host,
            seed_nodes: args.seed_nodes,
            cookie: args.cookie,
            session_timeout: Duration::from_millis(args.session_timeout_ms),
            static_membership: args.static_membership,
            standby_replicas: usize::from(args.standby_replicas),
            query_wait: Duration::from_millis(args.query_wait_ms),
            command_timeout: Duration::from_millis(args.command_timeout_ms),
            remote_call_timeout: Duration::from_millis(args.remote_call_timeout_ms),
            peer_queries: args.peer_queries,
            max_in_flight: args.max_in_flight,
            commit_interval: Duration::from_millis(args.commit_interval_ms),
            drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        };
        config.refuse_default_cookie(DEFAULT_COOKIE)?;
        Ok(config)
    }

    /// Refuses `default` as the cookie when the ports are reachable from other machines: anyone
    /// who can read the source could join the cluster. [`NodeConfig::from_args`] checks the
    /// runtime's [`DEFAULT_COOKIE`]; an application that gives `--cookie` another default checks
    /// that one with this.
    pub fn refuse_default_cookie(&self, default: &str) -> Result<(), String> {
        if self.cookie == default && !self.bind_host.is_loopback() {
            return Err(format!(
                "the node binds to {} with the default cookie: give every node the same --cookie \
                 (or CLUSTER_COOKIE) of your own",
                self.bind_host
            ));
        }
        Ok(())
    }

    /// The ractor_cluster node name (the full name peers see is `<name>@<host>`).
    pub fn node_name(&self) -> String {
        format!("{}-{}", self.name, self.ports.remoting)
    }

    /// This node's identity in the shard table, in announcements and as Kafka `client.id`.
    pub fn node_id(&self) -> String {
        format!("{}@{}", self.node_name(), self.host)
    }

    /// Where clients reach this node's gRPC port (its advertised host), as the owners service
    /// tells them.
    pub fn grpc_url(&self) -> String {
        self.url(self.ports.grpc)
    }

    /// Where other nodes reach this node's management port (its advertised host), for the
    /// query link.
    pub fn management_url(&self) -> String {
        self.url(self.ports.management)
    }

    fn url(&self, port: u16) -> String {
        let scheme = if self.tls.is_some() && self.tls_serve {
            "https"
        } else {
            "http"
        };
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_number_gives_the_reference_ports() {
        assert_eq!(
            Ports::from_args(&[2]).unwrap(),
            Ports {
                remoting: 2552,
                management: 8552,
                grpc: 8082
            }
        );
    }

    #[test]
    fn three_ports_are_taken_as_given() {
        assert_eq!(
            Ports::from_args(&[2551, 8551, 8081]).unwrap(),
            Ports {
                remoting: 2551,
                management: 8551,
                grpc: 8081
            }
        );
    }

    #[test]
    fn two_ports_or_clashing_ports_are_rejected() {
        assert!(Ports::from_args(&[2551, 8551]).is_err());
        assert!(Ports::from_args(&[2551, 2551, 8081]).is_err());
        assert!(Ports::from_args(&[0]).is_err());
    }

    #[test]
    fn node_names_follow_the_application_and_the_remoting_port() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        let args = <Cli as clap::Parser>::parse_from(["app", "1"]).node;
        let cfg = NodeConfig::from_args("app", args).unwrap();
        assert_eq!(cfg.node_id(), "app-2551@127.0.0.1");
    }
}
