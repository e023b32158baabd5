//! Bad command lines get a usage message and exit code 2 (no broker needed).

mod support;

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(support::bin(bin)).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn processor_rejects_wrong_port_arguments_with_usage() {
    for args in [
        &[][..],
        &["2551", "8551"][..],
        &["2551", "2551", "8081"][..],
        &["nope"][..],
        &["1", "--bogus"][..],
    ] {
        let (code, stderr) = run("processor", args);
        assert_eq!(
            code, 2,
            "processor {args:?} should exit 2, stderr: {stderr}"
        );
        assert!(
            stderr.contains("Usage:"),
            "processor {args:?} prints usage: {stderr}"
        );
    }
}

#[test]
fn producer_and_client_reject_bad_arguments_with_usage() {
    for (bin, args) in [
        ("producer", &["--rate", "fast"][..]),
        ("producer", &["--users", "0"][..]),
        ("producer", &["--rate", "-1"][..]),
        ("client", &["get"][..]),
        ("client", &["verify"][..]),
        ("client", &["frobnicate"][..]),
    ] {
        let (code, stderr) = run(bin, args);
        assert_eq!(code, 2, "{bin} {args:?} should exit 2, stderr: {stderr}");
        assert!(
            stderr.contains("Usage:"),
            "{bin} {args:?} prints usage: {stderr}"
        );
    }
}

#[test]
fn every_binary_prints_its_version() {
    for bin in ["processor", "producer", "client"] {
        let out = Command::new(support::bin(bin))
            .arg("--version")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin} --version failed: {out:?}");
        assert_eq!(
            stdout.trim(),
            format!("{bin} {}", env!("CARGO_PKG_VERSION")),
            "{bin} --version"
        );
    }
}

#[test]
fn kafka_properties_the_runtime_owns_or_cannot_read_are_usage_errors_without_secrets() {
    for (args, says) in [
        (
            &["1", "-X", "enable.auto.commit=true"][..],
            "enable.auto.commit",
        ),
        (
            &["1", "-X", "consumer.isolation.level=read_uncommitted"][..],
            "isolation.level",
        ),
        (
            &["1", "--kafka-config", "/nonexistent/client.properties"][..],
            "cannot read",
        ),
        (&["1", "-X", "no-equals-sign"][..], "key=value"),
    ] {
        let (code, stderr) = run("processor", args);
        assert_eq!(code, 2, "processor {args:?}: {stderr}");
        assert!(stderr.contains(says), "processor {args:?}: {stderr}");
    }
    let (code, stderr) = run(
        "producer",
        &["-X", "partitioner=random", "-X", "sasl.password=p4ss"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("partitioner") && !stderr.contains("p4ss"),
        "{stderr}"
    );
}

#[test]
fn binding_beyond_loopback_needs_a_cookie_of_ones_own_and_an_ip() {
    let (code, stderr) = run("processor", &["1", "--bind-host", "0.0.0.0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("default cookie"), "{stderr}");
    let (code, stderr) = run("processor", &["1", "--bind-host", "somewhere"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not an IP address"), "{stderr}");
}
