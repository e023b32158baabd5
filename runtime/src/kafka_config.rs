//! Kafka client properties from the operator: `-X key=value` (kcat's spelling, repeatable), a
//! Java properties file (`--kafka-config FILE`, as Kafka's tools take `--command-config`) and
//! `KAFKA_CLIENT_<KEY>` environment variables, applied to every Kafka client a binary creates.
//!
//! A key may target one kind of client with a `consumer.`, `producer.` or `admin.` prefix, as
//! Kafka Streams does; unprefixed keys go to every client. Later sources win: file, then
//! environment, then flags. Keys the runtime must own for correctness (isolation level,
//! transactional id, auto commit, partitioner, ...) are refused with the reason, never silently
//! overridden. Values of secret keys (passwords, secrets, private keys, JAAS and OAUTHBEARER
//! configs) never appear in `Debug` output or errors.

use std::fmt;
use std::path::{Path, PathBuf};

use rdkafka::config::ClientConfig;

/// The kinds of Kafka client a binary creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Group consumers, changelog readers, metadata and offset probes.
    Consumer,
    /// Transactional checkpoint producers and the sample producer.
    Producer,
    /// Topic administration.
    Admin,
}

impl ClientKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Consumer => "consumer.",
            Self::Producer => "producer.",
            Self::Admin => "admin.",
        }
    }
}

/// How to reach Kafka: the bootstrap servers and the operator's client properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    /// `host:port,...`
    pub bootstrap: String,
    /// Applied to every client before the runtime's own settings.
    pub properties: KafkaProperties,
}

impl KafkaConnection {
    /// Plain `bootstrap` servers, no properties.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            properties: KafkaProperties::default(),
        }
    }

    /// With the operator's `properties`.
    pub fn with_properties(mut self, properties: KafkaProperties) -> Self {
        self.properties = properties;
        self
    }

    /// A client configuration of `kind`: the bootstrap servers and the properties for it; the
    /// caller adds what the client needs (after, so a property cannot undo it).
    pub fn client(&self, kind: ClientKind) -> ClientConfig {
        self.client_with(kind, &[])
    }

    /// [`KafkaConnection::client`] with tuning `defaults` that the operator's properties may
    /// change (a batch size, a fetch wait); what the runtime owns the caller sets after.
    pub fn client_with(&self, kind: ClientKind, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        self.properties.apply(kind, &mut config);
        config
    }

    /// A Kafka client's error text, secrets removed.
    pub fn describe(&self, error: &impl fmt::Display) -> String {
        self.properties.redact(&error.to_string())
    }
}

/// Keys the runtime sets itself, with what to use instead.
const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --bootstrap-servers"),
    ("metadata.broker.list", "use --bootstrap-servers"),
    (
        "group.id",
        "the entity type's group names it (EntityType / --group)",
    ),
    (
        "client.id",
        "the node id is the client id (it maps assignments to nodes)",
    ),
    (
        "group.instance.id",
        "use --static-membership (the node id is the instance id)",
    ),
    (
        "group.protocol",
        "the hand-off runs in the classic protocol's rebalance callbacks",
    ),
    (
        "partition.assignment.strategy",
        "the hand-off needs cooperative-sticky",
    ),
    (
        "transactional.id",
        "each node and type fences its own (<group>-<node id>)",
    ),
    ("enable.idempotence", "exactly-once needs it on"),
    ("acks", "exactly-once needs acks=all"),
    (
        "isolation.level",
        "restores and offsets must read committed data only",
    ),
    (
        "enable.auto.commit",
        "offsets are committed in the checkpoint transactions",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed in the checkpoint transactions",
    ),
    (
        "auto.offset.reset",
        "a group without offsets must start at the beginning",
    ),
    ("enable.partition.eof", "the runtime sets it per client"),
    (
        "partitioner",
        "keys must hash with murmur2, as shard = partition assumes",
    ),
    ("session.timeout.ms", "use --session-timeout-ms"),
    ("transaction.timeout.ms", "use --transaction-timeout-ms"),
    ("statistics.interval.ms", "use --statistics-interval-ms"),
    ("debug", "use --kafka-debug"),
];

/// Whether a key's value is a secret (shown as `[redacted]`).
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
        "ssl_key",
        "token",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Why the properties cannot be used (the message names the key and source, never a secret).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum KafkaConfigError {
    #[error("cannot read Kafka properties file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source_name}: '{text}' is not key=value")]
    Malformed { source_name: String, text: String },
    #[error("{source_name}: Kafka property {key} is set by the runtime ({why})")]
    Owned {
        source_name: String,
        key: String,
        why: &'static str,
    },
}

/// One property as given; its `Debug` hides secret values.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaProperty {
    /// The key, with its `consumer.` / `producer.` / `admin.` prefix if any.
    pub key: String,
    /// The value.
    pub value: String,
}

impl fmt::Debug for KafkaProperty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_secret(&self.key) {
            write!(f, "{}=[redacted]", self.key)
        } else {
            write!(f, "{}={}", self.key, self.value)
        }
    }
}

impl std::str::FromStr for KafkaProperty {
    type Err = String;

    /// `key=value`, for `-X` (the error never echoes the text: it may hold a secret).
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok(Self {
                key: key.trim().to_string(),
                value: value.to_string(),
            }),
            _ => Err("expected key=value, e.g. -X security.protocol=SASL_SSL".into()),
        }
    }
}

/// Every property from every source, in precedence order (later wins).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties {
    entries: Vec<KafkaProperty>,
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.entries).finish()
    }
}

impl KafkaProperties {
    /// Reads the file (if any), the `KAFKA_CLIENT_*` variables of `env`, then `flags`, refusing
    /// keys the runtime owns.
    pub fn from_sources(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[KafkaProperty],
    ) -> Result<Self, KafkaConfigError> {
        let mut properties = Self::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KafkaConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let name = path.display().to_string();
            for property in parse_properties(&name, &text)? {
                properties.push(&name, property)?;
            }
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(name, value)| {
                let key = name.strip_prefix("KAFKA_CLIENT_")?;
                Some((key.to_ascii_lowercase().replace('_', "."), value))
            })
            .collect();
        env.sort();
        for (key, value) in env {
            properties.push("environment", KafkaProperty { key, value })?;
        }
        for flag in flags {
            properties.push("-X", flag.clone())?;
        }
        Ok(properties)
    }

    fn push(&mut self, source_name: &str, property: KafkaProperty) -> Result<(), KafkaConfigError> {
        let bare = ["consumer.", "producer.", "admin."]
            .iter()
            .find_map(|p| property.key.strip_prefix(p))
            .unwrap_or(&property.key);
        if let Some((_, why)) = OWNED.iter().find(|(k, _)| *k == bare) {
            return Err(KafkaConfigError::Owned {
                source_name: source_name.to_string(),
                key: property.key,
                why,
            });
        }
        self.entries.push(property);
        Ok(())
    }

    /// The properties for a client of `kind`, prefixes removed, later entries winning.
    pub fn for_kind(&self, kind: ClientKind) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for entry in &self.entries {
            let key = match ["consumer.", "producer.", "admin."]
                .iter()
                .find(|p| entry.key.starts_with(**p))
            {
                Some(p) if *p == kind.prefix() => &entry.key[p.len()..],
                Some(_) => continue,
                None => entry.key.as_str(),
            };
            out.retain(|(k, _)| *k != key);
            out.push((key, &entry.value));
        }
        out
    }

    /// Sets the properties for a client of `kind` on `config`.
    pub fn apply(&self, kind: ClientKind, config: &mut ClientConfig) {
        for (key, value) in self.for_kind(kind) {
            config.set(key, value);
        }
    }

    /// `text` with every secret value replaced (for messages from Kafka clients, which may
    /// quote a value they reject).
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for entry in self.entries.iter().filter(|e| is_secret(&e.key)) {
            if !entry.value.is_empty() {
                out = out.replace(&entry.value, "[redacted]");
            }
        }
        out
    }
}

/// The `key=value` lines of a Java properties file (`#` / `!` comments, `=` / `:` / space
/// separators, `\` line continuations).
fn parse_properties(source_name: &str, text: &str) -> Result<Vec<KafkaProperty>, KafkaConfigError> {
    let mut out = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        if logical.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!'))
        {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            logical.push_str(continued);
            continue;
        }
        logical.push_str(line);
        let entry = std::mem::take(&mut logical);
        let split = entry.find(['=', ':', ' ', '\t']);
        let (key, value) = match split {
            Some(i) => (
                entry[..i].trim(),
                entry[i + 1..]
                    .trim_start_matches([' ', '\t', '=', ':'])
                    .trim_end(),
            ),
            None => (entry.trim(), ""),
        };
        if key.is_empty() || split.is_none() {
            return Err(KafkaConfigError::Malformed {
                source_name: source_name.to_string(),
                text: if is_secret(key) {
                    format!("{key}=[redacted]")
                } else {
                    entry.clone()
                },
            });
        }
        out.push(KafkaProperty {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(text: &str) -> KafkaProperty {
        text.parse().unwrap()
    }

    #[test]
    fn a_properties_file_env_and_flags_apply_in_order_with_prefixes() {
        let dir = std::env::temp_dir().join(format!("kafka-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.properties");
        std::fs::write(
            &file,
            "# a comment\n! another\nsecurity.protocol=SASL_SSL\nsasl.mechanisms: SCRAM-SHA-512\n\
             sasl.username alice\nconsumer.fetch.max.bytes=1000\nlinger.ms = 5\\\n  0\n",
        )
        .unwrap();
        let p = KafkaProperties::from_sources(
            Some(&file),
            [
                ("KAFKA_CLIENT_SASL_USERNAME".to_string(), "bob".to_string()),
                ("PATH".to_string(), "/bin".to_string()),
            ],
            &[flag("producer.linger.ms=7"), flag("sasl.password=s3cr3t=x")],
        )
        .unwrap();
        let consumer = p.for_kind(ClientKind::Consumer);
        assert!(consumer.contains(&("security.protocol", "SASL_SSL")));
        assert!(consumer.contains(&("sasl.mechanisms", "SCRAM-SHA-512")));
        assert!(
            consumer.contains(&("sasl.username", "bob")),
            "env wins over the file"
        );
        assert!(consumer.contains(&("sasl.password", "s3cr3t=x")));
        assert!(consumer.contains(&("fetch.max.bytes", "1000")));
        assert!(consumer.contains(&("linger.ms", "50")), "continued line");
        let producer = p.for_kind(ClientKind::Producer);
        assert!(producer.contains(&("linger.ms", "7")), "a flag wins");
        assert!(!producer.iter().any(|(k, _)| *k == "fetch.max.bytes"));
        assert_eq!(p.for_kind(ClientKind::Admin).len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_the_runtime_owns_are_refused_with_the_reason() {
        for key in [
            "isolation.level",
            "consumer.enable.auto.commit",
            "producer.transactional.id",
            "partitioner",
        ] {
            let e =
                KafkaProperties::from_sources(None, [], &[flag(&format!("{key}=x"))]).unwrap_err();
            assert!(matches!(e, KafkaConfigError::Owned { .. }), "{key}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = KafkaProperties::from_sources(
            None,
            [("KAFKA_CLIENT_GROUP_ID".to_string(), "g".to_string())],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("environment: Kafka property group.id"),
            "{e}"
        );
    }

    #[test]
    fn secrets_never_show() {
        let p = KafkaProperties::from_sources(
            None,
            [],
            &[
                flag("sasl.password=hunter2"),
                flag("ssl.key.password=pw9"),
                flag("sasl.username=al"),
            ],
        )
        .unwrap();
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw9"),
            "{shown}"
        );
        assert!(shown.contains("sasl.username=al"), "{shown}");
        assert_eq!(
            p.redact("bad value hunter2 for x"),
            "bad value [redacted] for x"
        );
        assert!("=v".parse::<KafkaProperty>().is_err());
        let e = parse_properties("f", "sasl.password\n").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }
}
