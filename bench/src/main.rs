//! The benchmark harness: runs the release binaries (processor nodes as separate processes,
//! producer, `client bench`) against a real Kafka broker and prints markdown tables, every
//! figure next to a baseline measured in the same run. Run it through `scripts/bench`, which
//! builds the binaries and starts a broker of its own.

mod bare_jobs;
mod kafka;
mod machine;
mod nodes;
mod progress;
mod report;
mod scenarios;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use nodes::Setup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Throughput,
    Queries,
    Rebalance,
    State,
    Nodes,
    Commands,
}

#[derive(Debug, Parser)]
#[command(
    version,
    name = "bench",
    about = "Benchmarks the cluster against a real Kafka broker; prints markdown"
)]
struct Args {
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap_servers: String,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Node logs and id files.
    #[arg(long, default_value = "target/bench")]
    log_dir: PathBuf,
    /// Events pre-filled for the throughput run.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,
    /// Users of the throughput, query and rebalance runs.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    users: u64,
    /// Give the throughput run's users their events in turn ("0", "1", ...) instead of at
    /// random: with as many users as events, every event is a new entity.
    #[arg(long)]
    users_in_turn: bool,
    /// Users whose state one node holds in the restore and memory runs.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    state_users: u64,
    /// Partitions of the accounts' topic in the commands scenario (a checkpoint writes to the
    /// changelog partitions of the accounts it changed).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=128))]
    accounts_partitions: u32,
    /// Runs of each throughput measurement (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=20))]
    repeat: u64,
    /// Scenarios to run (queries and rebalance need throughput's nodes).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,queries,rebalance,state,nodes,commands"
    )]
    scenarios: Vec<Scenario>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Args = proto::cli::parse_or_exit();
    proto::cli::exit_code("bench", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    for bin in ["processor", "producer", "client"] {
        let path = args.bin_dir.join(bin);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: build with `cargo build --release --workspace`",
            path.display()
        );
    }
    std::fs::create_dir_all(&args.log_dir)?;
    let setup = Setup {
        bin_dir: args.bin_dir.clone(),
        log_dir: args.log_dir.clone(),
        bootstrap: args.bootstrap_servers.clone(),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let topic = format!("bench-events-{stamp}");
    let wants = |s: Scenario| args.scenarios.contains(&s);
    anyhow::ensure!(
        wants(Scenario::Throughput) || !(wants(Scenario::Queries) || wants(Scenario::Rebalance)),
        "the queries and rebalance scenarios run on the throughput scenario's two nodes: include throughput"
    );

    let mut tables = Vec::new();
    if wants(Scenario::Throughput) {
        let (table, nodes) = scenarios::throughput::run(
            &setup,
            &topic,
            args.events,
            args.users,
            args.users_in_turn,
            args.repeat as usize,
        )
        .await?;
        println!("{}", table.render());
        tables.push(table);
        if wants(Scenario::Queries) {
            let table = scenarios::queries::run(&setup, &nodes, args.users).await?;
            println!("{}", table.render());
            tables.push(table);
        }
        if wants(Scenario::Rebalance) {
            scenarios::queries::stable_split(&nodes).await?;
            for table in scenarios::rebalance::run(&setup, &topic, nodes, args.users).await? {
                println!("{}", table.render());
                tables.push(table);
            }
        }
    }
    if wants(Scenario::State) {
        let (restore, memory) =
            scenarios::state::run(&setup, &format!("bench-state-{stamp}"), args.state_users)
                .await?;
        println!("{}\n{}", restore.render(), memory.render());
    }
    if wants(Scenario::Commands) {
        for table in scenarios::commands::run(&setup, stamp, args.accounts_partitions).await? {
            println!("{}", table.render());
        }
    }
    if wants(Scenario::Nodes) {
        for table in scenarios::nodes::run(
            &setup,
            &format!("bench-nodes-{stamp}"),
            args.events,
            args.users,
        )
        .await?
        {
            println!("{}", table.render());
        }
    }
    Ok(())
}
