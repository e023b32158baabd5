//! gRPC client for the running totals.
//!
//! - `client [--addr URL]`: interactive, like the reference.
//! - `client [--addr URL] get ID... [--json]`: one-shot, for scripts.
//! - `client [--addr URL] verify --ledger FILE`: every user of a producer ledger, compared.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt};
use proto::ledger::{ExpectedTotals, Ledger};
use proto::service::user_service_client::UserServiceClient;
use proto::service::{UserStatsRequest, UserStatsResponse};
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "client", about = "Queries users' running totals from any processor node")]
struct Args {
    /// gRPC address of any processor node.
    #[arg(long, env = "PROCESSOR_ADDR", default_value = "http://127.0.0.1:8081", global = true)]
    addr: String,
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
}

#[derive(Serialize)]
struct JsonTotals<'a> {
    user_id: &'a str,
    purchases: i64,
    amount_spent: i64,
}

async fn connect(addr: &str) -> anyhow::Result<UserServiceClient<Channel>> {
    let endpoint = Channel::from_shared(addr.to_owned())
        .with_context(|| format!("invalid address {addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {addr}"))?;
    Ok(UserServiceClient::new(channel))
}

async fn query(client: &mut UserServiceClient<Channel>, id: &str) -> Result<UserStatsResponse, tonic::Status> {
    client.user_stats(UserStatsRequest { id: id.to_owned() }).await.map(|r| r.into_inner())
}

fn sentence(r: &UserStatsResponse) -> String {
    format!("User {} has made {} purchases for a total of {}p", r.id, r.total_purchases, r.amount_spent)
}

async fn interactive(mut client: UserServiceClient<Channel>) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        println!("Enter user id or :q to quit");
        std::io::stdout().flush().ok();
        let Some(line) = lines.next() else { return Ok(()) };
        let id = line.context("reading standard input")?.trim().to_owned();
        if id == ":q" {
            return Ok(());
        }
        match query(&mut client, &id).await {
            Ok(r) => println!("{}", sentence(&r)),
            Err(status) => println!("error: {:?}: {}", status.code(), status.message()),
        }
    }
}

async fn get(mut client: UserServiceClient<Channel>, ids: Vec<String>, json: bool) -> anyhow::Result<()> {
    let mut failed = 0;
    for id in &ids {
        match query(&mut client, id).await {
            Ok(r) if json => println!(
                "{}",
                serde_json::to_string(&JsonTotals { user_id: &r.id, purchases: r.total_purchases, amount_spent: r.amount_spent })?
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

async fn verify(client: UserServiceClient<Channel>, ledger_path: PathBuf, concurrency: usize) -> anyhow::Result<()> {
    let ledger = Ledger::load(&ledger_path)?;
    let users = ledger.user_ids();
    let results: Vec<(String, ExpectedTotals, Result<UserStatsResponse, tonic::Status>)> = stream::iter(users)
        .map(|id| {
            let mut client = client.clone();
            let expected = ledger.expected(&id);
            async move {
                let mut answer = query(&mut client, &id).await;
                for _ in 0..3 {
                    match &answer {
                        Err(s) if s.code() == tonic::Code::Unavailable => answer = query(&mut client, &id).await,
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
            Ok(r) if r.total_purchases == expected.purchases && r.amount_spent == expected.amount_spent => {}
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

async fn run(args: Args) -> anyhow::Result<()> {
    let client = connect(&args.addr).await?;
    match args.command {
        None => interactive(client).await,
        Some(Command::Get { ids, json }) => get(client, ids, json).await,
        Some(Command::Verify { ledger, concurrency }) => verify(client, ledger, concurrency).await,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Args = proto::cli::parse_or_exit();
    proto::cli::exit_code("client", run(args).await)
}
