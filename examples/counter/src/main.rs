//! A counter node: `counter 1 --topic counter-events --group counters` (node 1: ports 2551,
//! 8551, 8081; `--help` lists the rest). Ask it with
//! `curl -X POST localhost:8551/entities/counters/<key> -d null`.

use counter::Counter;
use kafka_sharding::app::{run, TypeArgs};

fn main() -> std::process::ExitCode {
    run("counter", |node, counters: TypeArgs| {
        node.host::<Counter>(counters.entity_type());
        Ok(())
    })
}
