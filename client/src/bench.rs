//! `client bench`: closed-loop query load. Each of `concurrency` workers sends one query, waits
//! for the answer, and sends the next, for a fixed time; latencies go into an HDR histogram.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Users;

pub struct BenchPlan {
    pub ids: Vec<String>,
    pub concurrency: usize,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub concurrency: usize,
    pub seconds: f64,
    pub queries: u64,
    pub errors: u64,
    pub qps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Ids, one per line (blank lines ignored).
pub fn read_ids(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!ids.is_empty(), "{} lists no user ids", path.display());
    Ok(ids)
}

/// Runs `plan`; worker `w` asks through `clients[w % clients.len()]` (one per connection).
pub async fn run(clients: Vec<Users>, plan: BenchPlan) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        !plan.ids.is_empty() && plan.concurrency > 0,
        "nothing to query"
    );
    let ids = Arc::new(plan.ids);
    let next = Arc::new(AtomicUsize::new(0));
    let measure_from = Instant::now() + plan.warmup;
    let end = measure_from + plan.duration;
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|w| {
            let mut client = clients[w % clients.len()].clone();
            let (ids, next) = (ids.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let mut errors = 0u64;
                loop {
                    let id = ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()].clone();
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let answer = client.stats(&id).await;
                    if sent < measure_from {
                        continue;
                    }
                    match answer {
                        Ok(_) => latencies.saturating_record(sent.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut errors = 0;
    for worker in workers {
        let (latencies, worker_errors) = worker.await.context("a bench worker panicked")?;
        all.add(&latencies).context("merging histograms")?;
        errors += worker_errors;
    }
    let seconds = plan.duration.as_secs_f64();
    Ok(BenchReport {
        concurrency: plan.concurrency,
        seconds,
        queries: all.len(),
        errors,
        qps: all.len() as f64 / seconds,
        p50_us: all.value_at_quantile(0.50),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        max_us: all.max(),
    })
}
