//! Command line of a processor node.
//!
//! `processor <remoting-port> <management-port> <grpc-port>` as in the reference, or
//! `processor N` for ports 2550+N, 8550+N, 8080+N. Every option has an environment fallback.

use clap::{CommandFactory, FromArgMatches, Parser};
use kafka_sharding::{EntityType, NodeArgs, NodeConfig};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "processor",
    version,
    about = "A cluster node: consumes its Kafka partitions, hosts the matching user entities, answers gRPC for any user",
    after_help = "Examples:\n  processor 2551 8551 8081\n  processor 2        # ports 2552 8552 8082"
)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,

    /// Input topic; its partition count is the shard count.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user-events")]
    pub topic: String,

    /// Consumer group shared by every node of the cluster.
    #[arg(long, env = "KAFKA_GROUP", default_value = "user-processing")]
    pub group: String,

    /// Topic receiving records that cannot be processed (default: `<topic>-dlq`).
    #[arg(long, env = "KAFKA_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    /// Compacted topic holding every entity's latest state (default: `<group>-<topic>-state`; the
    /// states' offsets are offsets of the input topic, so a changelog serves one topic only).
    #[arg(long, env = "KAFKA_CHANGELOG_TOPIC")]
    pub changelog_topic: Option<String>,

    /// Device telemetry, the second application: `--telemetry-topic` (hosted when given),
    /// `--telemetry-group`, `--telemetry-dlq-topic`, `--telemetry-changelog-topic`.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// Bank accounts, the third application (`bank.Accounts` on the gRPC port):
    /// `--accounts-topic` (hosted when given), `--accounts-group`, ...
    #[command(flatten)]
    pub accounts: AccountsArgs,
}

kafka_sharding::type_args! {
    /// The options of the device telemetry type.
    pub struct TelemetryArgs {
        prefix: "telemetry", env: "TELEMETRY", group: "device-telemetry", what: "device telemetry"
    }
}

kafka_sharding::type_args! {
    /// The options of the bank accounts type.
    pub struct AccountsArgs {
        prefix: "accounts", env: "ACCOUNTS", group: "accounts",
        what: "bank accounts (gRPC bank.Accounts)"
    }
}

/// What a processor node hosts.
#[derive(Debug, Clone)]
pub struct Hosting {
    pub purchases: EntityType,
    /// With `--telemetry-topic`.
    pub telemetry: Option<EntityType>,
    /// With `--accounts-topic`.
    pub accounts: Option<EntityType>,
}

/// The sample's default cookie (the runtime's is generic).
const COOKIE: &str = "user-processing-cookie";

impl Args {
    /// The command line, with the sample's defaults.
    pub fn command_with_defaults() -> clap::Command {
        Self::command().mut_arg("cookie", |a| a.default_value(COOKIE))
    }

    /// Parses `argv` (for tests).
    pub fn try_parse_from_args<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::from_arg_matches(&Self::command_with_defaults().try_get_matches_from(argv)?)
    }

    /// The node's configuration and the entity types' topics; the error is a usage message.
    pub fn into_config(self) -> Result<(NodeConfig, Hosting), String> {
        if self.topic.is_empty() || self.group.is_empty() {
            return Err("--topic and --group must not be empty".into());
        }
        let telemetry = self.telemetry.entity_type()?;
        if telemetry
            .as_ref()
            .is_some_and(|t| t.topic() == self.topic || t.group() == self.group)
        {
            return Err(
                "device telemetry needs its own topic and group (--telemetry-topic, --telemetry-group)"
                    .into(),
            );
        }
        let accounts = self.accounts.entity_type()?;
        if accounts.as_ref().is_some_and(|a| {
            a.topic() == self.topic
                || a.group() == self.group
                || telemetry
                    .as_ref()
                    .is_some_and(|t| t.topic() == a.topic() || t.group() == a.group())
        }) {
            return Err(
                "accounts need their own topic and group (--accounts-topic, --accounts-group)"
                    .into(),
            );
        }
        let mut purchases = EntityType::new(self.group, self.topic);
        if let Some(dlq) = self.dlq_topic {
            purchases = purchases.dlq_topic(dlq);
        }
        if let Some(changelog) = self.changelog_topic {
            purchases = purchases.changelog_topic(changelog);
        }
        let config = NodeConfig::from_args("processor", self.node)?;
        config.refuse_default_cookie(COOKIE)?;
        Ok((
            config,
            Hosting {
                purchases,
                telemetry,
                accounts,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlq_and_changelog_topics_default_from_the_input_topic() {
        let args = Args::try_parse_from_args(["processor", "1", "--topic", "t1"]).unwrap();
        let (config, hosting) = args.into_config().unwrap();
        assert_eq!(hosting.purchases.dlq(), "t1-dlq");
        assert_eq!(hosting.purchases.changelog(), "user-processing-t1-state");
        assert!(hosting.telemetry.is_none());
        assert_eq!(config.node_id(), "processor-2551@127.0.0.1");
        assert_eq!(config.cookie, COOKIE);
    }

    #[test]
    fn ports_follow_the_reference() {
        let args = Args::try_parse_from_args(["processor", "2551", "8551", "8081"]).unwrap();
        let (config, _) = args.into_config().unwrap();
        assert_eq!(
            (
                config.ports.remoting,
                config.ports.management,
                config.ports.grpc
            ),
            (2551, 8551, 8081)
        );
        let two = Args::try_parse_from_args(["processor", "2551", "8551"]).unwrap();
        assert!(two.into_config().is_err());
    }

    #[test]
    fn telemetry_is_hosted_on_its_own_topic_and_group() {
        let args =
            Args::try_parse_from_args(["processor", "1", "--telemetry-topic", "readings"]).unwrap();
        let telemetry = args.into_config().unwrap().1.telemetry.unwrap();
        assert_eq!(
            (telemetry.group(), telemetry.dlq(), telemetry.changelog()),
            (
                "device-telemetry",
                "readings-dlq",
                "device-telemetry-readings-state"
            )
        );
        let named = Args::try_parse_from_args([
            "processor",
            "1",
            "--telemetry-topic",
            "readings",
            "--telemetry-dlq-topic",
            "bad-readings",
            "--telemetry-changelog-topic",
            "device-states",
        ])
        .unwrap();
        let telemetry = named.into_config().unwrap().1.telemetry.unwrap();
        assert_eq!(
            (telemetry.dlq(), telemetry.changelog()),
            ("bad-readings", "device-states")
        );
        let empty = Args::try_parse_from_args(["processor", "1", "--telemetry-topic", ""]).unwrap();
        assert!(empty.into_config().is_err());
        let same =
            Args::try_parse_from_args(["processor", "1", "--telemetry-topic", "user-events"])
                .unwrap();
        assert!(same.into_config().is_err());
    }

    #[test]
    fn accounts_are_hosted_on_their_own_topic_and_group() {
        let args =
            Args::try_parse_from_args(["processor", "1", "--accounts-topic", "bank"]).unwrap();
        let accounts = args.into_config().unwrap().1.accounts.unwrap();
        assert_eq!(
            (accounts.group(), accounts.changelog()),
            ("accounts", "accounts-bank-state")
        );
        let same = Args::try_parse_from_args(["processor", "1", "--accounts-topic", "user-events"])
            .unwrap();
        assert!(same.into_config().is_err());
    }
}
