//! Scenario 2: closed-loop gRPC load given node 1's address, with `client bench`: for users
//! hosted on node 1 (local) and on node 2 (remote: node 1 forwards, one hop over its query link),
//! both with `--via-addr`; and for node 2's users by a client that learns the owners from node 1
//! and asks node 2 itself (direct, the client's default).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use kafka_sharding::partitioner::partition_for_key;
use serde_json::Value;

use crate::nodes::{wait_until, NodeProcess, Setup};
use crate::report::{verdict, Table};

const CONCURRENCIES: [u32; 2] = [1, 32];
const SECONDS: &str = "10";

/// Waits until the two nodes' shard sets are disjoint, cover all 128 partitions and are both
/// non-empty; returns node 1's.
pub async fn stable_split(nodes: &[NodeProcess; 2]) -> anyhow::Result<BTreeSet<u32>> {
    wait_until(
        Duration::from_secs(120),
        "a stable split of the partitions between the two nodes",
        || async {
            let a: BTreeSet<u32> = nodes[0].shards().await?.into_iter().collect();
            let b: BTreeSet<u32> = nodes[1].shards().await?.into_iter().collect();
            (!a.is_empty() && !b.is_empty() && a.is_disjoint(&b) && a.len() + b.len() == 128)
                .then_some(a)
        },
    )
    .await
}

pub async fn run(setup: &Setup, nodes: &[NodeProcess; 2], users: u64) -> anyhow::Result<Table> {
    let on_node1 = stable_split(nodes).await?;
    // A settled table on both nodes before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (local, remote): (Vec<String>, Vec<String>) = (0..users)
        .map(|u| u.to_string())
        .partition(|id| on_node1.contains(&partition_for_key(id.as_bytes(), 128)));
    let mut table = Table::new(
        &format!("Queries through node 1 (closed loop, {SECONDS} s each after 2 s warm-up; {} local users, {} remote)", local.len(), remote.len()),
        &["concurrency", "users", "queries/s", "p50", "p99", "p99.9", "errors", "÷ local", "target", ""],
    );
    for concurrency in CONCURRENCIES {
        let mut reports = Vec::new();
        for (name, ids, via_addr) in [
            ("local", &local, true),
            ("remote", &remote, true),
            ("direct", &remote, false),
        ] {
            eprintln!("queries: {name} users at concurrency {concurrency}");
            let file = setup.log_dir.join(format!("{name}-ids.txt"));
            std::fs::write(&file, ids.join("\n"))?;
            reports.push(client_bench(
                setup,
                &nodes[0].grpc_url(),
                &file,
                concurrency,
                via_addr,
            )?);
        }
        let l = &reports[0];
        let us = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let fmt_us = |v: f64| {
            if v >= 1000.0 {
                format!("{:.2} ms", v / 1000.0)
            } else {
                format!("{v:.0} µs")
            }
        };
        for (name, report) in ["local", "remote", "direct"].into_iter().zip(&reports) {
            let p99_ratio = us(report, "p99_us") / us(l, "p99_us");
            let qps_ratio = us(report, "qps") / us(l, "qps");
            let ratio = format!("p99 × {p99_ratio:.2}, qps × {qps_ratio:.2}");
            let (ratio, target, met) = match name {
                // Issue 18's goal at concurrency 1; at 32 the first targets (docs/BENCHMARKS.md).
                "remote" if concurrency == 1 => (ratio, "p99 ≤ 1.5×", verdict(p99_ratio <= 1.5)),
                "remote" => (
                    ratio,
                    "p99 ≤ 2×, qps ≥ 0.5×",
                    verdict(p99_ratio <= 2.0 && qps_ratio >= 0.5),
                ),
                "direct" => (ratio, "p99 ≤ 1.5×", verdict(p99_ratio <= 1.5)),
                _ => (String::new(), "", String::new()),
            };
            table.row(vec![
                concurrency.to_string(),
                name.into(),
                format!("{:.0}", us(report, "qps")),
                fmt_us(us(report, "p50_us")),
                fmt_us(us(report, "p99_us")),
                fmt_us(us(report, "p999_us")),
                format!("{}", us(report, "errors")),
                ratio,
                target.into(),
                met,
            ]);
        }
    }
    table.note("The client, both nodes and the broker share the machine's cores; the client is `client bench` (release). local, remote: `--via-addr` (node 1 answers, forwarding node 2's users one hop); direct: node 2's users, the client asking node 2 itself after learning the owners from node 1. Each run spreads its workers over 4 HTTP/2 connections: to node 1, or (direct) to each owner.");
    Ok(table)
}

fn client_bench(
    setup: &Setup,
    addr: &str,
    ids: &std::path::Path,
    concurrency: u32,
    via_addr: bool,
) -> anyhow::Result<Value> {
    let out = Command::new(setup.bin("client"))
        .args(["--addr", addr])
        .args(via_addr.then_some("--via-addr"))
        .args(["bench", "--ids-file", ids.to_str().context("path")?])
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--duration-secs",
            SECONDS,
            "--warmup-secs",
            "2",
            "--json",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "client bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}
