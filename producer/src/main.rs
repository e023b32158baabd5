//! Sample producer: random purchases for users `0..N`, keyed by user id and partitioned exactly
//! like Kafka's Java producer (murmur2), acknowledged by all replicas, idempotent.
//!
//! `--ledger FILE` writes the expected totals over every acknowledged event at the end, so any
//! run can be verified (`client verify --ledger FILE`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use proto::events::UserPurchase;
use proto::ledger::Ledger;
use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

const PRODUCTS: &[&str] = &[
    "cat t-shirt",
    "dog mug",
    "rust hoodie",
    "kafka poster",
    "actor socks",
    "shard cap",
];
/// Sends awaiting acknowledgement at once when producing as fast as possible.
const MAX_OUTSTANDING: usize = 20_000;

use kafka_sharding::logging::LogFormat;
use kafka_sharding::{ClientKind, KafkaClientArgs, KafkaConnection};

#[derive(Debug, Parser)]
#[command(
    name = "producer",
    version,
    about = "Produces random purchase events keyed by user id"
)]
struct Args {
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap_servers: String,
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user-events")]
    topic: String,
    /// Users are "0" .. "N-1".
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    users: u64,
    /// Events per second; 0 = as fast as the broker acknowledges.
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
    /// Stop after this many events (default: run until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Partitions of the topic if it has to be created.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    partitions: u32,
    /// Replicas of the topic if it has to be created (-1: the broker's default.replication.factor).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1..=32))]
    replication_factor: i32,
    /// Write the expected per-user totals of every acknowledged event here at the end (JSON).
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Give users their events in turn ("0", "1", ... "N-1", "0", ...) instead of at random:
    /// N events reach exactly N users.
    #[arg(long)]
    users_in_turn: bool,
    /// Print every event ("Sending message to user 7"); default: only when no --count is given
    /// and the rate is at most 50/s.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    kafka_client: KafkaClientArgs,
    /// How log lines are written (`RUST_LOG` sets what is logged; default: warnings).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn purchase(rng: &mut impl Rng, user: u64) -> UserPurchase {
    UserPurchase {
        user_id: user.to_string(),
        product: PRODUCTS[rng.random_range(0..PRODUCTS.len())].to_string(),
        quantity: rng.random_range(1..=5),
        price: rng.random_range(100..=20_000),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Args = proto::cli::parse_or_exit();
    proto::cli::exit_code("producer", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        use clap::CommandFactory;
        Args::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--rate must be a number >= 0",
            )
            .exit();
    }
    let properties = match args.kafka_client.properties() {
        Ok(properties) => properties,
        Err(message) => {
            use clap::CommandFactory;
            Args::command()
                .error(clap::error::ErrorKind::ValueValidation, message)
                .exit();
        }
    };
    kafka_sharding::logging::init(args.log_format, "warn");
    let kafka = KafkaConnection::new(&args.bootstrap_servers).with_properties(properties);

    let partitions = kafka_sharding::admin::ensure_topic(
        &kafka,
        &args.topic,
        args.partitions,
        args.replication_factor,
        &[],
    )
    .await
    .context("preparing the topic")?;
    eprintln!(
        "producing to {} ({partitions} partitions) at {}",
        args.topic,
        rate_label(args.rate)
    );

    // Defaults a -X may change, then what the ledger needs.
    let producer: FutureProducer = kafka
        .client_with(
            ClientKind::Producer,
            &[
                ("linger.ms", if args.rate == 0.0 { "5" } else { "0" }),
                ("message.timeout.ms", "60000"),
            ],
        )
        // Java-compatible partitioning: the processor computes shards with the same murmur2.
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .map_err(|e| anyhow::anyhow!("creating the Kafka producer: {}", kafka.describe(&e)))?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.store(true, Ordering::SeqCst);
        });
    }

    let ledger = Arc::new(Mutex::new(Ledger::new(&args.topic, args.users)));
    let verbose = args.verbose || (args.count.is_none() && args.rate > 0.0 && args.rate <= 50.0);
    let progress = args.count.map(|n| {
        let bar = ProgressBar::new(n);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} acknowledged ({per_sec}, eta {eta})")
                .expect("valid template"),
        );
        bar
    });

    let started = Instant::now();
    let mut rng = rand::rng();
    let mut outstanding = FuturesUnordered::new();
    let mut sent: u64 = 0;
    while !stop.load(Ordering::SeqCst) && args.count.is_none_or(|n| sent < n) {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                // Acknowledgements are collected while waiting for the next send.
                let _ = tokio::time::timeout(
                    wait,
                    drain_one(&mut outstanding, &ledger, progress.as_ref()),
                )
                .await;
                continue;
            }
        }
        while outstanding.len() >= MAX_OUTSTANDING {
            drain_one(&mut outstanding, &ledger, progress.as_ref()).await;
        }
        let user = if args.users_in_turn {
            sent % args.users
        } else {
            rng.random_range(0..args.users)
        };
        let event = purchase(&mut rng, user);
        if verbose {
            println!("Sending message to user {}", event.user_id);
        }
        let producer = producer.clone();
        let topic = args.topic.clone();
        outstanding.push(async move {
            let value = event.encode_to_vec();
            let record = FutureRecord::to(&topic)
                .key(event.user_id.as_bytes())
                .payload(&value);
            let acked = producer.send(record, Duration::from_secs(0)).await;
            (event, acked.map(|_| ()).map_err(|(e, _)| e))
        });
        sent += 1;
    }
    while !outstanding.is_empty() {
        drain_one(&mut outstanding, &ledger, progress.as_ref()).await;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")?;
    if let Some(bar) = &progress {
        bar.finish();
    }

    let ledger = Arc::try_unwrap(ledger)
        .expect("all sends finished")
        .into_inner()
        .expect("ledger lock");
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "acknowledged {} of {sent} events in {elapsed:.1} s ({:.0}/s); {} failed",
        ledger.acknowledged_events,
        ledger.acknowledged_events as f64 / elapsed.max(1e-9),
        ledger.failed_events
    );
    if let Some(path) = &args.ledger {
        ledger.save(path)?;
        eprintln!("ledger written to {}", path.display());
    }
    if ledger.failed_events > 0 {
        anyhow::bail!(
            "{} events were not acknowledged by the broker",
            ledger.failed_events
        );
    }
    Ok(())
}

fn rate_label(rate: f64) -> String {
    if rate == 0.0 {
        "full speed".into()
    } else {
        format!("{rate} events/s")
    }
}

async fn drain_one<F>(
    outstanding: &mut FuturesUnordered<F>,
    ledger: &Mutex<Ledger>,
    progress: Option<&ProgressBar>,
) where
    F: std::future::Future<Output = (UserPurchase, Result<(), rdkafka::error::KafkaError>)>,
{
    let Some((event, acked)) = outstanding.next().await else {
        // Nothing outstanding: let the rate limiter's timeout do the waiting.
        std::future::pending::<()>().await;
        return;
    };
    let mut ledger = ledger.lock().expect("ledger lock");
    match acked {
        Ok(()) => {
            ledger.record(&event.user_id, event.quantity, event.price);
            if let Some(bar) = progress {
                bar.inc(1);
            }
        }
        Err(e) => {
            ledger.failed_events += 1;
            eprintln!("event for user {} not acknowledged: {e}", event.user_id);
        }
    }
}
