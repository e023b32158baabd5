//! gRPC client for the running totals.
//!
//! - `client [--addr URL]`: interactive, like the reference.
//! - `client [--addr URL] get ID... [--json]`: one-shot, for scripts.
//! - `client [--addr URL] verify --ledger FILE`: every user of a producer ledger, compared.
//! - `client [--addr URL] bench (--ids-file FILE | --users N) --concurrency C`: closed-loop load.
//! - `client [--addr URL] deposit|withdraw ACCOUNT AMOUNT [--key K]`, `transfer FROM TO AMOUNT
//!   [--key K]`, `schedule FROM TO AMOUNT (--at-ms T | --in-ms D) [--key K]`, `balance ACCOUNT`:
//!   the bank accounts (`processor --accounts-topic`).

mod bench;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt};
use kafka_sharding::entities_service::pb::entities_client::EntitiesClient;
use kafka_sharding::entities_service::pb::AskRequest;
use kafka_sharding::owners::{OwnerDirectory, OwnerDirectoryError};
use proto::ledger::{ExpectedTotals, Ledger};
use proto::service::user_service_client::UserServiceClient;
use proto::service::{UserStatsRequest, UserStatsResponse};
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "client",
    version,
    about = "Queries users' running totals from any processor node"
)]
struct Args {
    /// gRPC address of any processor node.
    #[arg(
        long,
        env = "PROCESSOR_ADDR",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    addr: String,
    /// PEM certificate of the CA that signed the nodes' certificates, for nodes serving gRPC
    /// over TLS (`processor --tls-serve`; give the address as https://).
    #[arg(long, env = "PROCESSOR_TLS_CA", value_name = "PEM", global = true)]
    tls_ca: Option<PathBuf>,
    /// Allow answers from a standby replica at most this many milliseconds behind when no
    /// owner answers (a failover); without it only the users' owners answer.
    #[arg(long, env = "MAX_STALENESS_MS", global = true)]
    max_staleness_ms: Option<u64>,
    /// Send every query to --addr, which forwards it to the user's owner (one hop between
    /// nodes). Without it the client learns from --addr which node owns each shard and asks
    /// the owner directly, falling back to --addr when the owner cannot be reached.
    #[arg(long, global = true)]
    via_addr: bool,
    /// The processors' consumer group (their `--group`): the users' entity type, whose shard
    /// owners the client learns. A node that does not host it but hosts a single type is
    /// asked about that one.
    #[arg(
        long,
        env = "KAFKA_GROUP",
        default_value = "user-processing",
        global = true
    )]
    group: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the totals of the given users and exit.
    Get {
        #[arg(required = true)]
        ids: Vec<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Compare every user of a producer ledger with what the cluster answers.
    Verify {
        #[arg(long)]
        ledger: PathBuf,
        /// Queries in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Closed-loop query load: latency percentiles and queries/s.
    Bench {
        /// User ids to query in turn, one per line.
        #[arg(long, conflicts_with = "users", required_unless_present = "users")]
        ids_file: Option<PathBuf>,
        /// Query users "0" .. "N-1" in turn.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        users: Option<u64>,
        /// Queries in flight at once (each worker waits for its answer before the next).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        concurrency: u64,
        /// HTTP/2 connections shared by the workers: to the node given, and as many to each owner.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
        connections: u64,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        duration_secs: f64,
        #[arg(long, default_value_t = 2.0)]
        warmup_secs: f64,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Bank(Bank),
    /// Ask entity ID of any hosted TYPE (its consumer group) through the nodes' generic
    /// `Entities` service; prints the reply as text when it is UTF-8 (a JSON codec's), else
    /// as hex (protobuf).
    Ask {
        #[arg(value_name = "TYPE")]
        entity_type: String,
        id: String,
        /// The query in the type's codec, as text (JSON for a JSON codec).
        #[arg(long, conflicts_with = "query_hex")]
        query: Option<String>,
        /// The query in the type's codec, as hex bytes (protobuf); empty when neither is given.
        #[arg(long)]
        query_hex: Option<String>,
    },
    /// Print the gRPC address of the node that owns each ID (of the type `--group` names, or
    /// the nodes' only type), as the nodes' Owners service tells.
    Owner {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Bank {
    /// Deposit AMOUNT cents into ACCOUNT; prints the committed balance.
    Deposit {
        account: String,
        amount: i64,
        /// Idempotency key: a repeated call with it gets the first answer.
        #[arg(long)]
        key: Option<String>,
    },
    /// Withdraw AMOUNT cents from ACCOUNT (refused if it would overdraw).
    Withdraw {
        account: String,
        amount: i64,
        #[arg(long)]
        key: Option<String>,
    },
    /// Move AMOUNT cents from FROM to TO; prints FROM's committed balance.
    Transfer {
        from: String,
        to: String,
        amount: i64,
        #[arg(long)]
        key: Option<String>,
    },
    /// Move AMOUNT cents from FROM to TO at a time (a durable timer on FROM); prints the
    /// transfer's id. If FROM lacks the funds then, nothing moves and the refusal goes to the
    /// topic transfers-refused.
    Schedule {
        from: String,
        to: String,
        amount: i64,
        /// When, in ms since the epoch.
        #[arg(long, conflicts_with = "in_ms", required_unless_present = "in_ms")]
        at_ms: Option<i64>,
        /// When, in ms from now.
        #[arg(long)]
        in_ms: Option<u64>,
        #[arg(long)]
        key: Option<String>,
    },
    /// Print ACCOUNT's balance.
    Balance { account: String },
}

#[derive(Serialize)]
struct JsonTotals<'a> {
    user_id: &'a str,
    purchases: i64,
    amount_spent: i64,
    /// `owner` or `standby`.
    answered_by: &'a str,
    lag_records: i64,
    lag_ms: u64,
}

/// Where the node is and how to reach it.
struct Target {
    addr: String,
    tls: Option<ClientTlsConfig>,
    max_staleness_ms: Option<u64>,
    /// Ask each user's owner directly (see `--via-addr`): the users' entity type.
    direct: Option<String>,
}

impl Target {
    fn from_args(
        addr: String,
        tls_ca: Option<PathBuf>,
        max_staleness_ms: Option<u64>,
        direct: Option<String>,
    ) -> anyhow::Result<Self> {
        let tls = match tls_ca {
            Some(path) => {
                let pem = std::fs::read(&path)
                    .with_context(|| format!("cannot read --tls-ca {}", path.display()))?;
                Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            }
            None => None,
        };
        Ok(Self {
            addr,
            tls,
            max_staleness_ms,
            direct,
        })
    }
}

/// The user service, asked with the reads' staleness bound: at each user's owner when the
/// owners are known, else at the node given.
#[derive(Clone)]
struct Users {
    any_node: UserServiceClient<Channel>,
    owners: Option<Arc<OwnerDirectory>>,
    max_staleness_ms: Option<u64>,
}

impl Users {
    async fn stats(&mut self, id: &str) -> Result<UserStatsResponse, tonic::Status> {
        let request = UserStatsRequest {
            id: id.to_owned(),
            max_staleness_ms: self.max_staleness_ms,
        };
        match &self.owners {
            Some(owners) => owners
                .call(id, |channel| {
                    let request = request.clone();
                    async move { UserServiceClient::new(channel).user_stats(request).await }
                })
                .await
                .map(|r| r.into_inner()),
            None => self
                .any_node
                .user_stats(request)
                .await
                .map(|r| r.into_inner()),
        }
    }
}

async fn connect(target: &Target) -> anyhow::Result<Users> {
    let channel = connect_channel(target).await?;
    Ok(Users {
        any_node: UserServiceClient::new(channel.clone()),
        owners: owner_directory(target, channel).await,
        max_staleness_ms: target.max_staleness_ms,
    })
}

/// The shard owners, learnt through `any_node`, unless `--via-addr`; a node that cannot tell
/// them leaves every query going through it (said once on stderr).
async fn owner_directory(target: &Target, any_node: Channel) -> Option<Arc<OwnerDirectory>> {
    let group = target.direct.as_deref()?;
    match owners_of(target, any_node, group).await {
        Ok(owners) => Some(owners),
        Err(e) => {
            eprintln!(
                "client: {e}; every query goes through {} instead of to its owner",
                target.addr
            );
            None
        }
    }
}

/// The owners of `group`'s shards, or, when the node does not host that type, of the one type
/// it hosts.
async fn owners_of(
    target: &Target,
    any_node: Channel,
    group: &str,
) -> Result<Arc<OwnerDirectory>, OwnerDirectoryError> {
    let make = |tls: Option<ClientTlsConfig>| {
        move |url: &str| endpoint(url, tls.as_ref()).map_err(Into::into)
    };
    match OwnerDirectory::connect(any_node.clone(), group, make(target.tls.clone())).await {
        Err(OwnerDirectoryError::Fetch(status)) if status.code() == tonic::Code::NotFound => {
            OwnerDirectory::connect(any_node, "", make(target.tls.clone())).await
        }
        answer => answer,
    }
}

/// How a node (the one given, or an owner) is reached: the same timeouts and TLS for all.
fn endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    let mut endpoint = Channel::from_shared(url.to_owned())
        .with_context(|| format!("invalid address {url}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .with_context(|| format!("cannot use TLS for {url}"))?;
    }
    Ok(endpoint)
}

async fn connect_channel(target: &Target) -> anyhow::Result<Channel> {
    let addr = &target.addr;
    endpoint(addr, target.tls.as_ref())?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

fn sentence(r: &UserStatsResponse) -> String {
    let from = if r.answered_by == "standby" {
        format!(
            " (from a standby replica: {} changelog records, {} ms behind at most)",
            r.lag_records, r.lag_ms
        )
    } else {
        String::new()
    };
    format!(
        "User {} has made {} purchases for a total of {}p{from}",
        r.id, r.total_purchases, r.amount_spent
    )
}

async fn interactive(mut client: Users) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        println!("Enter user id or :q to quit");
        std::io::stdout().flush().ok();
        let Some(line) = lines.next() else {
            return Ok(());
        };
        let id = line.context("reading standard input")?.trim().to_owned();
        if id == ":q" {
            return Ok(());
        }
        match client.stats(&id).await {
            Ok(r) => println!("{}", sentence(&r)),
            Err(status) => println!("error: {:?}: {}", status.code(), status.message()),
        }
    }
}

async fn get(mut client: Users, ids: Vec<String>, json: bool) -> anyhow::Result<()> {
    let mut failed = 0;
    for id in &ids {
        match client.stats(id).await {
            Ok(r) if json => println!(
                "{}",
                serde_json::to_string(&JsonTotals {
                    user_id: &r.id,
                    purchases: r.total_purchases,
                    amount_spent: r.amount_spent,
                    answered_by: &r.answered_by,
                    lag_records: r.lag_records,
                    lag_ms: r.lag_ms,
                })?
            ),
            Ok(r) => println!("{}", sentence(&r)),
            Err(status) => {
                failed += 1;
                eprintln!("user {id}: {:?}: {}", status.code(), status.message());
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} queries failed", ids.len());
    }
    Ok(())
}

async fn verify(client: Users, ledger_path: PathBuf, concurrency: usize) -> anyhow::Result<()> {
    let ledger = Ledger::load(&ledger_path)?;
    let users = ledger.user_ids();
    let results: Vec<(
        String,
        ExpectedTotals,
        Result<UserStatsResponse, tonic::Status>,
    )> = stream::iter(users)
        .map(|id| {
            let mut client = client.clone();
            let expected = ledger.expected(&id);
            async move {
                let mut answer = client.stats(&id).await;
                for _ in 0..3 {
                    match &answer {
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            answer = client.stats(&id).await
                        }
                        _ => break,
                    }
                }
                (id, expected, answer)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let (mut mismatches, mut errors) = (0, 0);
    for (id, expected, answer) in &results {
        match answer {
            Ok(r)
                if r.total_purchases == expected.purchases
                    && r.amount_spent == expected.amount_spent => {}
            Ok(r) => {
                mismatches += 1;
                println!(
                    "MISMATCH user {id}: expected {} purchases / {}p, got {} / {}p",
                    expected.purchases, expected.amount_spent, r.total_purchases, r.amount_spent
                );
            }
            Err(status) => {
                errors += 1;
                println!("ERROR user {id}: {:?}: {}", status.code(), status.message());
            }
        }
    }
    println!(
        "verified {} users ({} events) against {}: {mismatches} mismatches, {errors} errors",
        results.len(),
        ledger.acknowledged_events,
        ledger_path.display()
    );
    if mismatches + errors > 0 {
        anyhow::bail!("verification failed");
    }
    Ok(())
}

fn seconds(what: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{what} must be a number of seconds >= 0, not {value}"))
}

#[allow(clippy::too_many_arguments)]
async fn bench(
    target: &Target,
    ids_file: Option<PathBuf>,
    users: Option<u64>,
    concurrency: u64,
    connections: u64,
    duration_secs: f64,
    warmup_secs: f64,
    json: bool,
) -> anyhow::Result<()> {
    let ids = match (ids_file, users) {
        (Some(path), _) => bench::read_ids(&path)?,
        (None, Some(n)) => (0..n).map(|u| u.to_string()).collect(),
        (None, None) => anyhow::bail!("give --ids-file or --users"),
    };
    let plan = bench::BenchPlan {
        ids,
        concurrency: concurrency as usize,
        connections: connections as usize,
        warmup: seconds("--warmup-secs", warmup_secs)?,
        duration: seconds("--duration-secs", duration_secs)?,
    };
    anyhow::ensure!(!plan.duration.is_zero(), "--duration-secs must be > 0");
    // One client per connection to the node given, each with its own owner directory, so
    // that asking the owners directly spreads over as many connections to each owner as
    // asking through the node given does over connections to it.
    let first = connect(target).await?;
    let mut clients = vec![first.clone()];
    for _ in 1..plan.connections.min(plan.concurrency) {
        let channel = connect_channel(target).await?;
        clients.push(Users {
            any_node: UserServiceClient::new(channel.clone()),
            // The first one's failure was said once; the others go through the node too.
            owners: match first.owners {
                Some(_) => owner_directory(target, channel).await,
                None => None,
            },
            ..first.clone()
        });
    }
    let report = bench::run(clients, plan).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} queries in {:.1} s at concurrency {}: {:.0} queries/s, p50 {} us, p99 {} us, p99.9 {} us, max {} us, {} errors",
            report.queries, report.seconds, report.concurrency, report.qps, report.p50_us, report.p99_us, report.p999_us,
            report.max_us, report.errors
        );
    }
    Ok(())
}

/// One bank command through the node given (commands reach their account's owner through
/// Kafka, so any node will do).
async fn bank(target: &Target, command: Bank) -> anyhow::Result<()> {
    use proto::bank::accounts_client::AccountsClient;
    use proto::bank::{Account, Change, TransferRequest};
    let mut accounts = AccountsClient::new(connect_channel(target).await?);
    let change = |account: String, amount, key: Option<String>| Change {
        account,
        amount,
        idempotency_key: key.unwrap_or_default(),
    };
    let answer = match command {
        Bank::Deposit {
            account,
            amount,
            key,
        } => accounts.deposit(change(account, amount, key)).await,
        Bank::Withdraw {
            account,
            amount,
            key,
        } => accounts.withdraw(change(account, amount, key)).await,
        Bank::Transfer {
            from,
            to,
            amount,
            key,
        } => {
            accounts
                .transfer(TransferRequest {
                    from,
                    to,
                    amount,
                    idempotency_key: key.unwrap_or_default(),
                    at_unix_ms: 0,
                })
                .await
        }
        Bank::Schedule {
            from,
            to,
            amount,
            at_ms,
            in_ms,
            key,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let at_unix_ms = at_ms.unwrap_or_else(|| now + in_ms.unwrap_or(0) as i64);
            let scheduled = accounts
                .schedule_transfer(TransferRequest {
                    from,
                    to,
                    amount,
                    idempotency_key: key.unwrap_or_default(),
                    at_unix_ms,
                })
                .await
                .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?;
            println!(
                "transfer {} scheduled at {at_unix_ms}",
                scheduled.into_inner().transfer_id
            );
            return Ok(());
        }
        Bank::Balance { account } => accounts.get_balance(Account { account }).await,
    };
    match answer {
        Ok(balance) => {
            let balance = balance.into_inner();
            println!("account {} has {}p", balance.account, balance.balance);
            Ok(())
        }
        Err(status) => anyhow::bail!("{:?}: {}", status.code(), status.message()),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Target::from_args(
        args.addr,
        args.tls_ca,
        args.max_staleness_ms,
        (!args.via_addr).then_some(args.group),
    )?;
    match args.command {
        None => interactive(connect(&target).await?).await,
        Some(Command::Get { ids, json }) => get(connect(&target).await?, ids, json).await,
        Some(Command::Verify {
            ledger,
            concurrency,
        }) => verify(connect(&target).await?, ledger, concurrency).await,
        Some(Command::Bank(command)) => bank(&target, command).await,
        Some(Command::Ask {
            entity_type,
            id,
            query,
            query_hex,
        }) => {
            let query = match (query, query_hex) {
                (Some(text), _) => text.into_bytes(),
                (None, Some(hex)) => decode_hex(&hex)?,
                (None, None) => Vec::new(),
            };
            let mut entities = EntitiesClient::new(connect_channel(&target).await?);
            let reply = entities
                .ask(AskRequest {
                    entity_type,
                    id,
                    query,
                    max_staleness_ms: target.max_staleness_ms,
                })
                .await
                .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?
                .into_inner();
            match String::from_utf8(reply.reply) {
                Ok(text) => println!("{text}"),
                Err(bytes) => println!("{}", encode_hex(bytes.as_bytes())),
            }
            eprintln!("(route: {})", reply.route);
            Ok(())
        }
        Some(Command::Owner { ids }) => {
            let any_node = connect_channel(&target).await?;
            let group = target.direct.clone().unwrap_or_default();
            let owners = owners_of(&target, any_node, &group).await?;
            for id in ids {
                match owners.owner_url(&id) {
                    Some(url) => println!("{id} {url}"),
                    None => println!("{id} (no owner now)"),
                }
            }
            Ok(())
        }
        Some(Command::Bench {
            ids_file,
            users,
            concurrency,
            connections,
            duration_secs,
            warmup_secs,
            json,
        }) => {
            bench(
                &target,
                ids_file,
                users,
                concurrency,
                connections,
                duration_secs,
                warmup_secs,
                json,
            )
            .await
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Args = proto::cli::parse_or_exit();
    proto::cli::exit_code("client", run(args).await)
}

/// Bytes written as hex digits (`--query-hex`).
fn decode_hex(hex: &str) -> anyhow::Result<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        anyhow::bail!("--query-hex needs an even number of hex digits");
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16)
                .map_err(|_| anyhow::anyhow!("--query-hex is not hex: {hex}"))
        })
        .collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
