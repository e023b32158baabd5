//! A node's `main` in three lines: [`run`] parses the runtime's command line ([`NodeArgs`])
//! and the application's own (`A`, any `clap::Args`, e.g. one [`TypeArgs`] per hosted type),
//! initialises logging, lets the application host its types, runs the node and exits with the
//! documented codes (2 bad arguments, 3 refused credentials, 4 input topic deleted, 5 its
//! partition count changed, 1 anything else).
//!
//! ```no_run
//! # use kafka_sharding::{Entity, Prost, Rejection};
//! # struct Counter;
//! # impl Entity for Counter {
//! #     type Event = (); type State = (); type Query = (); type Reply = (); type Codec = Prost;
//! #     fn decode(_: &str, _: Option<&[u8]>) -> Result<(), Rejection> { Ok(()) }
//! #     fn apply(_: &mut (), _: &()) {}
//! #     fn query(_: &(), _: &()) {}
//! # }
//! use kafka_sharding::app::{run, TypeArgs};
//!
//! fn main() -> std::process::ExitCode {
//!     run("counter", |node, counters: TypeArgs| {
//!         node.host::<Counter>(counters.entity_type());
//!         Ok(())
//!     })
//! }
//! ```
//!
//! `counter 1 --topic counter-events --group counters` then runs node 1; its entities answer
//! at `POST /entities/counters/<id>` and through gRPC `Entities/Ask` with no more code.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::cli::{NodeArgs, NodeConfig};
use crate::node::{EntityType, Node};

/// Logging unless `RUST_LOG` says otherwise: the runtime's lines at info, the actor
/// framework's only when they matter.
const DEFAULT_LOG_FILTER: &str = "info,ractor_cluster=error,ractor=warn";

/// One hosted entity type's Kafka names on the command line: `--topic`, `--group`,
/// `--dlq-topic`, `--changelog-topic` (flatten it once; further types declare theirs with
/// [`type_args!`](crate::type_args), named with a prefix).
#[derive(Debug, Clone, clap::Args)]
pub struct TypeArgs {
    /// The entity type's input topic (its partition count is the shard count).
    #[arg(long, env = "KAFKA_TOPIC")]
    pub topic: String,
    /// The consumer group every node of the cluster shares for this type (it names the type:
    /// `/entities/<group>/<id>`).
    #[arg(long, env = "KAFKA_GROUP")]
    pub group: String,
    /// Where records that cannot be processed go (default: `<topic>-dlq`).
    #[arg(long, env = "KAFKA_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// The compacted topic holding every entity's state (default: `<group>-<topic>-state`).
    #[arg(long, env = "KAFKA_CHANGELOG_TOPIC")]
    pub changelog_topic: Option<String>,
}

impl TypeArgs {
    /// The [`EntityType`] these options name.
    pub fn entity_type(&self) -> EntityType {
        let mut spec = EntityType::new(&self.group, &self.topic);
        if let Some(dlq) = &self.dlq_topic {
            spec = spec.dlq_topic(dlq);
        }
        if let Some(changelog) = &self.changelog_topic {
            spec = spec.changelog_topic(changelog);
        }
        spec
    }
}

/// The command line [`run`] parses: the node's options and the application's.
#[derive(Debug, clap::Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    app: A,
}

/// Runs a node called `name` (its binary; part of its node id): parses the command line
/// (the node's options and `A`), initialises logging (`--log-format`, `RUST_LOG`), calls
/// `host` to host the application's types and mount its services, runs the node until it is
/// stopped, and returns the process's exit code. An error from `host` is a usage error.
pub fn run<A: clap::Args>(
    name: &'static str,
    host: impl FnOnce(&mut Node, A) -> Result<(), String>,
) -> ExitCode {
    let command = Cli::<A>::command().name(name).bin_name(name);
    let usage_error = |message: String| -> ! {
        let mut command = Cli::<A>::command().name(name).bin_name(name);
        command
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit()
    };
    let cli = match command
        .try_get_matches()
        .and_then(|matches| Cli::<A>::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let config = NodeConfig::from_args(name, cli.node).unwrap_or_else(|m| usage_error(m));
    crate::logging::init(config.log_format, DEFAULT_LOG_FILTER);
    let mut node = Node::new(config);
    if let Err(message) = host(&mut node, cli.app) {
        usage_error(message);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(node.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{name}: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Declares the command-line options of one more hosted entity type, named with a prefix, for
/// a node that hosts several (a [`TypeArgs`] can be flattened only once): `--<prefix>-topic`
/// (the type is hosted only when it is given), `--<prefix>-group` (default `group`),
/// `--<prefix>-dlq-topic` and `--<prefix>-changelog-topic`, each with an environment fallback
/// (`<ENV>_TOPIC`, `<ENV>_GROUP`, ...); `what` names the type in `--help`. The struct derives
/// `clap::Args`, so the application depends on `clap` (features `derive` and `env`) and
/// flattens it beside the rest.
///
/// ```
/// use clap::Parser;
/// use kafka_sharding::app::TypeArgs;
///
/// kafka_sharding::type_args! {
///     /// Device telemetry, hosted with `--telemetry-topic`.
///     pub struct TelemetryArgs {
///         prefix: "telemetry", env: "TELEMETRY", group: "device-telemetry", what: "device telemetry"
///     }
/// }
/// kafka_sharding::type_args! {
///     pub struct CartArgs { prefix: "carts", env: "CARTS", group: "carts", what: "shopping carts" }
/// }
///
/// #[derive(clap::Parser)]
/// struct Cli {
///     #[command(flatten)]
///     users: TypeArgs,
///     #[command(flatten)]
///     telemetry: TelemetryArgs,
///     #[command(flatten)]
///     carts: CartArgs,
/// }
///
/// let cli = Cli::parse_from([
///     "node", "--topic", "events", "--group", "users",
///     "--telemetry-topic", "readings", "--carts-topic", "cart-ops", "--carts-dlq-topic", "bad-carts",
/// ]);
/// let telemetry = cli.telemetry.entity_type().unwrap().unwrap();
/// assert_eq!((telemetry.group(), telemetry.topic()), ("device-telemetry", "readings"));
/// let carts = cli.carts.entity_type().unwrap().unwrap();
/// assert_eq!((carts.group(), carts.dlq()), ("carts", "bad-carts"));
/// assert_eq!(cli.users.entity_type().topic(), "events");
///
/// let without = Cli::parse_from(["node", "--topic", "events", "--group", "users"]);
/// assert!(without.telemetry.entity_type().unwrap().is_none(), "hosted only with its topic");
/// let empty = Cli::parse_from(["node", "--topic", "e", "--group", "u", "--carts-topic", ""]);
/// assert!(empty.carts.entity_type().is_err());
/// ```
#[macro_export]
macro_rules! type_args {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            prefix: $prefix:literal, env: $env:literal, group: $group:literal, what: $what:literal $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Args)]
        $vis struct $name {
            #[arg(
                long = concat!($prefix, "-topic"),
                id = concat!($prefix, "-topic"),
                value_name = "TOPIC",
                env = concat!($env, "_TOPIC"),
                help = concat!("Host ", $what, ", consuming this topic (its partition count is the shard count)")
            )]
            pub topic: Option<String>,
            #[arg(
                long = concat!($prefix, "-group"),
                id = concat!($prefix, "-group"),
                value_name = "GROUP",
                env = concat!($env, "_GROUP"),
                default_value = $group,
                help = concat!("The consumer group every node shares for ", $what, " (with --", $prefix, "-topic)")
            )]
            pub group: String,
            #[arg(
                long = concat!($prefix, "-dlq-topic"),
                id = concat!($prefix, "-dlq-topic"),
                value_name = "TOPIC",
                env = concat!($env, "_DLQ_TOPIC"),
                help = concat!("Where records of ", $what, " that cannot be processed go (default: <", $prefix, "-topic>-dlq)")
            )]
            pub dlq_topic: Option<String>,
            #[arg(
                long = concat!($prefix, "-changelog-topic"),
                id = concat!($prefix, "-changelog-topic"),
                value_name = "TOPIC",
                env = concat!($env, "_CHANGELOG_TOPIC"),
                help = concat!("The compacted topic holding the states of ", $what, " (default: <", $prefix, "-group>-<", $prefix, "-topic>-state)")
            )]
            pub changelog_topic: Option<String>,
        }

        impl $name {
            /// The entity type these options name: `None` without `--<prefix>-topic`; an
            /// error (a usage message) for an empty topic or group.
            pub fn entity_type(&self) -> Result<Option<$crate::EntityType>, String> {
                let Some(topic) = &self.topic else {
                    return Ok(None);
                };
                if topic.is_empty() || self.group.is_empty() {
                    return Err(concat!(
                        "--", $prefix, "-topic and --", $prefix, "-group must not be empty"
                    ).to_owned());
                }
                let mut spec = $crate::EntityType::new(&self.group, topic);
                if let Some(dlq) = &self.dlq_topic {
                    spec = spec.dlq_topic(dlq);
                }
                if let Some(changelog) = &self.changelog_topic {
                    spec = spec.changelog_topic(changelog);
                }
                Ok(Some(spec))
            }
        }
    };
}
