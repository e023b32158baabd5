//! A stand-in broker for machines without Java: librdkafka's in-process mock cluster, kept
//! alive in this process so other processes can connect to it. It is a test double (no
//! CreateTopics, a ~3 s initial rebalance delay, nothing persisted): the project's tests run
//! against the real broker started by `scripts/kafka`.
//!
//! `kafka-mock --topic user-events --partitions 128 [--dlq-topic user-events-dlq]` prints
//! `bootstrap=<host:port>` once ready and serves until killed.

use clap::Parser;
use rdkafka::mocking::MockCluster;

#[derive(Parser)]
#[command(
    version,
    name = "kafka-mock",
    about = "librdkafka's mock Kafka cluster, for demos where Java is missing"
)]
struct Args {
    #[arg(long, default_value = "user-events")]
    topic: String,
    #[arg(long, default_value_t = 128)]
    partitions: i32,
    #[arg(long)]
    dlq_topic: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(&args.topic, args.partitions, 1)?;
    let dlq = args
        .dlq_topic
        .unwrap_or_else(|| format!("{}-dlq", args.topic));
    cluster.create_topic(&dlq, 4, 1)?;
    println!("bootstrap={}", cluster.bootstrap_servers());
    loop {
        std::thread::park();
    }
}
