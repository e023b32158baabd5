//! Writes `--events` numbered events for keys `k0..k<keys>` to `--topic` (created with
//! `--partitions` if missing), each on its key's shard; prints each key's expected count as
//! JSON lines (`{"key":"k3","events":4,"sum":42}`) for checking the node's answers.

use std::collections::BTreeMap;

use clap::Parser;
use kafka_sharding::{KafkaConnection, KeyedProducer};

#[derive(Parser)]
#[command(
    name = "counter-producer",
    about = "Writes events for the counter example"
)]
struct Args {
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap_servers: String,
    #[arg(long, default_value = "counter-events")]
    topic: String,
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    #[arg(long, default_value_t = 1_000)]
    events: u64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let kafka = KafkaConnection::new(args.bootstrap_servers);
    let producer = KeyedProducer::create(&kafka, &args.topic, args.partitions).await?;
    let mut expected: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for n in 0..args.events {
        let key = format!("k{}", n % args.keys);
        let value = (n % 100) as i64;
        producer.send(&key, value.to_string().as_bytes()).await?;
        let entry = expected.entry(key).or_default();
        entry.0 += 1;
        entry.1 += value;
    }
    for (key, (events, sum)) in expected {
        println!(
            "{}",
            serde_json::json!({ "key": key, "events": events, "sum": sum })
        );
    }
    Ok(())
}
