//! The example as a user runs it: its producer writes events, a node (the `counter` binary, a
//! separate process) counts them, and every key's answer through the runtime's generic route
//! (`POST /entities/counters/<key>` with curl) matches what the producer wrote. Needs the real
//! broker (`scripts/kafka start`, or `scripts/test`, which starts one); fails loudly without.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Kills the node when the test ends, however it ends.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ask(management: u16, key: &str) -> Option<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "-d", "null"])
        .arg(format!(
            "http://127.0.0.1:{management}/entities/counters-test/{key}"
        ))
        .output()
        .expect("curl runs");
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

#[test]
fn the_producer_s_events_are_counted_and_answered_through_the_generic_route() {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let topic = format!("counter-events-{stamp}");
    let produced = Command::new(env!("CARGO_BIN_EXE_counter-producer"))
        .args(["--bootstrap-servers", &bootstrap(), "--topic", &topic])
        .args(["--events", "500", "--keys", "20", "--partitions", "4"])
        .output()
        .expect("the producer runs");
    assert!(
        produced.status.success(),
        "the producer failed (is the broker at {} up? `scripts/kafka start`): {}",
        bootstrap(),
        String::from_utf8_lossy(&produced.stderr)
    );
    let expected: Vec<serde_json::Value> = String::from_utf8(produced.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(expected.len(), 20);

    let (remoting, management, grpc) = (6_951, 6_961, 6_971);
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("counter-{stamp}.log"))).unwrap();
    let _node = Node(
        Command::new(env!("CARGO_BIN_EXE_counter"))
            .args([remoting, management, grpc].map(|p| p.to_string()))
            .args(["--bootstrap-servers", &bootstrap(), "--topic", &topic])
            .args([
                "--group",
                "counters-test",
                "--seed-nodes",
                &format!("127.0.0.1:{remoting}"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the node starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending = expected.clone();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "not every key answered as produced within 120 s: {pending:?}"
        );
        pending.retain(|want| {
            let key = want["key"].as_str().unwrap();
            ask(management, key).is_none_or(|got| {
                (got["events"].clone(), got["sum"].clone())
                    != (want["events"].clone(), want["sum"].clone())
            })
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    // GET takes the query as text (JSON for this codec: `null` is the query `()`).
    let want = &expected[0];
    let out = Command::new("curl")
        .arg("-sf")
        .arg(format!(
            "http://127.0.0.1:{management}/entities/counters-test/{}?query=null",
            want["key"].as_str().unwrap()
        ))
        .output()
        .expect("curl runs");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON reply");
    assert_eq!(
        (&got["events"], &got["sum"]),
        (&want["events"], &want["sum"])
    );
}
