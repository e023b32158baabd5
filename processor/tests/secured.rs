//! A broker whose client listener is SASL_SSL (SCRAM-SHA-512 over TLS with a self-signed
//! certificate), started by `scripts/kafka`: nodes and the producer reach it configured only
//! through `-X` or a properties file; a wrong password ends the node with a clear error instead
//! of a hang; no password reaches a log.

mod support;

use std::time::Duration;

use support::*;

const PASSWORD: &str = "app-secret";

fn sasl_properties(broker: &Broker, password: &str) -> Vec<(String, String)> {
    [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", "app"),
        ("sasl.password", password),
        ("ssl.ca.location", broker.ca_file().to_str().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn as_flags(properties: &[(String, String)]) -> Vec<String> {
    properties
        .iter()
        .flat_map(|(k, v)| ["-X".to_string(), format!("{k}={v}")])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_reach_a_sasl_ssl_broker_through_flags_or_a_file_and_a_wrong_password_exits_clearly()
{
    let broker = Broker::start_secured(19_700, 19_705);
    let properties = sasl_properties(&broker, PASSWORD);
    let mut spec = ClusterSpec::new("secured", 11_000);
    spec.bootstrap = broker.secured_bootstrap();
    spec.producer_args = as_flags(&properties);
    spec.create_topic(4);

    // Node 1 through -X only, node 2 through a properties file only.
    let file = log_dir(&spec.name).join("client.properties");
    let text: String = properties
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    std::fs::write(&file, text).unwrap();
    let flags = as_flags(&properties);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node1 = spec.start_node_with(1, &flags);
    let node2 = spec.start_node_with(2, &["--kafka-config", file.to_str().unwrap()]);
    wait_for_split(&[&node1, &node2], 4).await;
    let ledger = spec.produce(600, 40, "ledger.json");
    wait_for_ledger(&spec, &[1, 2], &ledger, Duration::from_secs(90)).await;

    // A wrong password: a clear error and a non-zero exit within a bound, not a hang.
    let wrong = as_flags(&sasl_properties(&broker, "not-the-password"));
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let mut node3 = spec.start_node_with(3, &wrong);
    let code = node3
        .exit_code_within(Duration::from_secs(60))
        .expect("a node with a wrong password must exit, not wait");
    let log3 = node3.log();
    assert_eq!(
        code, 3,
        "exit code 3: Kafka refused the credentials; {log3}"
    );
    assert!(
        log3.contains("refused this client's credentials"),
        "the error says the credentials were refused: {log3}"
    );
    for (node, log) in [(1, node1.log()), (2, node2.log()), (3, log3)] {
        for secret in [PASSWORD, "not-the-password"] {
            assert!(!log.contains(secret), "node {node} logged a password");
        }
    }
}
