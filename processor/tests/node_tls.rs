//! TLS between nodes: nodes given a certificate signed by the cluster's CA form the cluster
//! (non-seed nodes find each other through the seed, over TLS) and answer for every user
//! through every node; a node whose certificate another CA signed, and a node without TLS,
//! are refused and take no partitions. Queries forwarded between nodes never cross a
//! plaintext port: through the TLS sessions, or over a query link when the management port
//! serves TLS too.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn nodes_with_tls_form_the_cluster_and_a_node_without_the_cas_certificate_is_refused() {
    require_broker();
    let mut spec = ClusterSpec::new("node-tls", 19_000);
    let dir = log_dir(&spec.name);
    let ca = NodeCa::new(&dir, "cluster");
    let stranger_ca = NodeCa::new(&dir, "stranger");
    // One seed: nodes 2 and 3 only know node 1 and must find each other.
    spec.seeds = vec![spec.remoting(1)];
    spec.create_topic(24);
    let with_tls = |i: u16| {
        let args = ca.node_args(&format!("node{i}"));
        spec.start_node_with(i, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut nodes = [with_tls(1), with_tls(2), with_tls(3)];
    wait_for_split(&nodes.iter().collect::<Vec<_>>(), 24).await;

    // The two non-seed nodes have a session with each other, not only with the seed.
    eventually(
        Duration::from_secs(30),
        "node 2 to see nodes 1 and 3 connected",
        || async {
            let members = nodes[1].get_json("/cluster/members").await?;
            let connected: Vec<String> = members["members"]
                .as_array()?
                .iter()
                .filter(|m| m["connected"] == true)
                .filter_map(|m| m["node"].as_str().map(String::from))
                .collect();
            (connected.len() == 3).then_some(())
        },
    )
    .await;

    let ledger = spec.produce(3_000, 300, "tls.json");
    // Through every node: two thirds of the users are remote queries over the TLS sessions.
    wait_for_ledger(&spec, &[1, 2, 3], &ledger, Duration::from_secs(60)).await;
    for node in &nodes {
        let remote = node
            .metric_sum(
                "processor_grpc_request_seconds_count",
                r#"route="remote",outcome="ok""#,
            )
            .await;
        assert!(
            remote > 0.0,
            "node {} answered through its peers",
            node.index
        );
        // The management ports are plaintext here (no --tls-serve): the queries went through
        // the TLS sessions, never a query link.
        let in_the_clear = node
            .metric_sum("processor_peer_queries_total", r#"transport="link""#)
            .await;
        assert_eq!(
            in_the_clear, 0.0,
            "node {} sent queries over a plaintext link",
            node.index
        );
    }

    let stranger_args = stranger_ca.node_args("node4");
    let mut stranger = spec.start_node_with(
        4,
        &stranger_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut plain = spec.start_node(5);
    eventually(
        Duration::from_secs(30),
        "the node of another CA to say the TLS handshake failed",
        || async {
            stranger
                .log()
                .contains("refused this node: the TLS handshake failed")
                .then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the node without TLS to be refused",
        || async {
            plain
                .log()
                .contains("Is TLS between nodes (--tls-cert) off on every node?")
                .then_some(())
        },
    )
    .await;
    // Long enough for a node that joined the group to have been given partitions.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for intruder in [&mut stranger, &mut plain] {
        assert_refused(&spec, intruder).await;
    }
    let assignment = group_assignment(&spec.group, &spec.topic);
    let owned: usize = assignment.values().map(|p| p.len()).sum();
    assert_eq!(
        owned, 24,
        "the cluster's nodes own every partition: {assignment:?}"
    );
    let members = nodes[0].get_json("/cluster/members").await.unwrap();
    assert_eq!(
        members["members"].as_array().unwrap().len(),
        3,
        "no refused node is a member: {members}"
    );

    stranger.stop();
    plain.stop();
    for node in &mut nodes {
        assert!(node.stop().success());
    }
}

/// `curl` over HTTPS trusting `ca`: the HTTP status, or `None` if no TLS session came about.
fn https_status(ca: &std::path::Path, url: &str) -> Option<u16> {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg(url)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (out.status.success() && code != 0).then_some(code)
}

/// `curl` over HTTPS trusting `ca`: the body, or `None` without a TLS session or a 200.
fn https_get(ca: &std::path::Path, url: &str) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args(["-sSf", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_and_the_management_port_serve_tls_with_the_node_certificate() {
    require_broker();
    let mut spec = ClusterSpec::new("serve-tls", 8_000);
    let ca = NodeCa::new(&log_dir(&spec.name), "cluster");
    spec.seeds = vec![spec.remoting(1)];
    spec.create_topic(4);
    let mut args = ca.node_args("node1");
    args.push("--tls-serve".into());
    let mut node = spec.start_node_with(1, &args.iter().map(String::as_str).collect::<Vec<_>>());

    let ready = format!("https://127.0.0.1:{}/ready", spec.management(1));
    eventually(
        Duration::from_secs(60),
        "/ready over HTTPS to answer 200",
        || async { (https_status(&ca.ca_file(), &ready) == Some(200)).then_some(()) },
    )
    .await;
    assert_eq!(
        get_status(spec.management(1), "/ready").await,
        None,
        "plain HTTP is not served"
    );

    let ledger = spec.produce(600, 60, "serve-tls.json");
    let grpc = format!("https://127.0.0.1:{}", spec.grpc(1));
    let ca_file = ca.ca_file();
    let tls = ["--tls-ca", ca_file.to_str().unwrap()];
    eventually(
        Duration::from_secs(60),
        "totals over gRPC with TLS to equal the ledger",
        || async { verify_with(&grpc, &ledger, &tls).0.then_some(()) },
    )
    .await;
    // A client that asks owners directly learns their https URLs and reaches them over TLS.
    let direct = std::process::Command::new(bin("client"))
        .args(["--addr", &grpc])
        .args(tls)
        .args(["verify", "--ledger", ledger.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&direct.stderr);
    assert!(
        direct.status.success() && !said.contains("instead of to its owner"),
        "direct over TLS: {}{said}",
        String::from_utf8_lossy(&direct.stdout)
    );
    // A second node serving TLS: node 1 forwards its users' queries over a query link to node
    // 2's management port over TLS (trusting the node CA), and node 2 to node 1's.
    let mut args2 = ca.node_args("node2");
    args2.push("--tls-serve".into());
    let mut node2 = spec.start_node_with(2, &args2.iter().map(String::as_str).collect::<Vec<_>>());
    let grpc2 = format!("https://127.0.0.1:{}", spec.grpc(2));
    for (via, management) in [(&grpc, spec.management(1)), (&grpc2, spec.management(2))] {
        let metrics = format!("https://127.0.0.1:{management}/metrics");
        eventually(
            Duration::from_secs(60),
            "every total through the node, some forwarded to the other over a TLS query link",
            || async {
                if !verify_with(via, &ledger, &tls).0 {
                    return None;
                }
                let text = https_get(&ca.ca_file(), &metrics)?;
                let over_link: f64 = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("processor_peer_queries_total{")
                            && l.contains(r#"transport="link""#)
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                (over_link > 0.0).then_some(())
            },
        )
        .await;
    }
    assert!(node2.stop().success());

    let (plain_ok, plain) = verify(&spec.grpc_url(1), &ledger);
    assert!(!plain_ok, "plain gRPC is not served: {plain}");
    let (untrusting_ok, untrusting) = verify(&grpc, &ledger);
    assert!(
        !untrusting_ok,
        "a client that does not trust the CA cannot connect: {untrusting}"
    );
    assert!(node.stop().success());
}
