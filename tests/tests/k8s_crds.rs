//! The CRDs on the real API server: valid resources are accepted, invalid ones are refused
//! at apply time with a message that says what is wrong, and `kubectl get` shows the printer
//! columns from status (so a wrong JSON path cannot pass).

use weir_tests::k8s::ControlPlane;

use weir_tests::operator::install_crds as install;

fn topic(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: Topic\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

fn group(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: ConsumerGroup\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

#[test]
#[allow(clippy::too_many_lines)] // one table of cases
fn invalid_topics_and_groups_are_refused_at_apply_with_a_clear_message() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    install(cp)?;
    let ns = cp.namespace("crd-validation")?;
    // Resources that exist first, for the update cases.
    cp.apply(&ns, &topic("grows", "{partitions: 3}"))?;
    cp.apply(
        &ns,
        &topic("fixed", "{partitions: 1, retention: {policy: Limits}}"),
    )?;
    cp.apply(&ns, &group("g", "{topic: grows, type: Ordered}"))?;
    let long = "t".repeat(250);
    // (what, manifest, expected part of the API server's message)
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "zero partitions",
            topic("z", "{partitions: 0}"),
            "should be greater than or equal to 1",
        ),
        (
            "absurd partitions",
            topic("a", "{partitions: 5000}"),
            "should be less than or equal to 1024",
        ),
        (
            "missing partitions",
            topic("m", "{}"),
            "spec.partitions: Required value",
        ),
        (
            "fewer partitions",
            topic("grows", "{partitions: 2}"),
            "partitions can only grow",
        ),
        (
            "unknown overflow",
            topic("o", "{partitions: 1, overflow: Sometimes}"),
            "Unsupported value: \"Sometimes\"",
        ),
        (
            "unknown durability",
            topic("d", "{partitions: 1, durability: Eventually}"),
            "Unsupported value: \"Eventually\"",
        ),
        (
            "unknown deletion policy",
            topic("p", "{partitions: 1, deletionPolicy: Maybe}"),
            "Unsupported value: \"Maybe\"",
        ),
        (
            "malformed max age",
            topic("age", "{partitions: 1, retention: {maxAge: 10 days}}"),
            "spec.retention.maxAge: Invalid value",
        ),
        (
            "malformed max bytes",
            topic(
                "bytes",
                "{partitions: 1, retention: {maxBytes: 1 gigabyte}}",
            ),
            "spec.retention.maxBytes: Invalid value",
        ),
        (
            "malformed max message bytes",
            topic("mmb", "{partitions: 1, maxMessageBytes: lots}"),
            "spec.maxMessageBytes: Invalid value",
        ),
        (
            "an even replication factor",
            topic("rf", "{partitions: 1, replicationFactor: 2}"),
            "replicationFactor must be 1, 3 or 5",
        ),
        (
            "a replication factor above 5",
            topic("rf", "{partitions: 1, replicationFactor: 7}"),
            "should be less than or equal to 5",
        ),
        (
            "a replicated topic with size limits refusing produce",
            topic(
                "rf",
                "{partitions: 1, replicationFactor: 3, overflow: Reject, retention: {maxMessages: 10}}",
            ),
            "size limits with overflow Reject need replicationFactor 1",
        ),
        (
            "retention policy changed",
            topic("fixed", "{partitions: 1, retention: {policy: WorkQueue}}"),
            "retention.policy is immutable",
        ),
        (
            "name longer than 249",
            topic(&long, "{partitions: 1}"),
            "at most 249 characters",
        ),
        (
            "group type changed",
            group("g", "{topic: grows, type: Shared}"),
            "type is immutable",
        ),
        (
            "group topic changed",
            group("g", "{topic: other, type: Ordered}"),
            "topic is immutable",
        ),
        (
            "zero max deliveries",
            group("g0", "{topic: grows, maxDeliveries: 0}"),
            "should be greater than or equal to 1",
        ),
        (
            "ack wait past a day",
            group("aw2", "{topic: grows, type: Shared, ackWait: 2d}"),
            "ackWait must be between 100ms and 24h",
        ),
        (
            "ack wait below 100ms",
            group("aw3", "{topic: grows, type: Shared, ackWait: 5ms}"),
            "ackWait must be between 100ms and 24h",
        ),
        (
            "max age below a second",
            topic("young", "{partitions: 1, retention: {maxAge: 10ms}}"),
            "maxAge must be at least 1s",
        ),
        (
            "max age past 100 years",
            topic("old", "{partitions: 1, retention: {maxAge: 5300w}}"),
            "maxAge must be at most 100 years",
        ),
        (
            "max age below a second, in parts",
            topic(
                "young2",
                "{partitions: 1, retention: {maxAge: 900ms50000us}}",
            ),
            "maxAge must be at least 1s",
        ),
        (
            "max bytes below 64 KiB",
            topic(
                "tiny",
                "{partitions: 1, retention: {maxBytes: 1KiB}, maxMessageBytes: 512B}",
            ),
            "retention.maxBytes must be at least 64KiB and at least maxMessageBytes",
        ),
        (
            "max bytes below the default max message bytes",
            topic("small", "{partitions: 1, retention: {maxBytes: 512KiB}}"),
            "retention.maxBytes must be at least 64KiB and at least maxMessageBytes",
        ),
        (
            "max bytes below max message bytes",
            topic(
                "small2",
                "{partitions: 1, retention: {maxBytes: 2MiB}, maxMessageBytes: 4.5MiB}",
            ),
            "retention.maxBytes must be at least 64KiB and at least maxMessageBytes",
        ),
        (
            "max message bytes past 16 MiB",
            topic("huge", "{partitions: 1, maxMessageBytes: 17MiB}"),
            "maxMessageBytes must be at most 16MiB",
        ),
        (
            "a bounded work queue that would drop work",
            topic(
                "wq",
                "{partitions: 1, retention: {policy: WorkQueue, maxMessages: 10}}",
            ),
            "needs overflow: Reject",
        ),
        (
            "a dead-letter topic that is the topic",
            group("dl", "{topic: grows, deadLetterTopic: grows}"),
            "deadLetterTopic must differ from topic",
        ),
        (
            "a dead-letter topic with a space",
            group("dl2", "{topic: grows, deadLetterTopic: 'dead letters'}"),
            "spec.deadLetterTopic: Invalid value",
        ),
        (
            "a default dead-letter topic past 249 characters",
            group(
                "g".repeat(200).as_str(),
                &format!("{{topic: {}}}", "t".repeat(60)),
            ),
            "set spec.deadLetterTopic",
        ),
        (
            "ack wait past a day in parts",
            group("aw4", "{topic: grows, type: Shared, ackWait: 1d1s}"),
            "ackWait must be between 100ms and 24h",
        ),
        (
            "max deliveries on an Ordered group",
            group("od", "{topic: grows, type: Ordered, maxDeliveries: 3}"),
            "maxDeliveries applies to Shared groups only",
        ),
        (
            "malformed ack wait",
            group("aw", "{topic: grows, ackWait: 30 seconds}"),
            "spec.ackWait: Invalid value",
        ),
        (
            "reset to neither an end nor a time",
            group("rt", "{topic: grows, resetTo: yesterday}"),
            "spec.resetTo: Invalid value",
        ),
    ];
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for (what, manifest, expected) in &cases {
        let out = cp.run(
            "kubectl",
            &["apply", "-n", &ns, "-f", "-"],
            Some(manifest.as_bytes()),
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{what}: accepted"));
        } else if !stderr.contains(expected) {
            failures.push(format!("{what}: message {stderr:?} lacks {expected:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Values at the bounds are taken.
    cp.apply(
        &ns,
        &topic(
            "bounds",
            "{partitions: 1, retention: {maxAge: 36500d, maxBytes: 64KiB, maxMessages: 1000}, maxMessageBytes: 64KiB}",
        ),
    )?;
    cp.apply(
        &ns,
        &topic(
            "bounds2",
            "{partitions: 1, retention: {maxAge: 1s, maxBytes: 1MiB}}",
        ),
    )?;
    cp.apply(
        &ns,
        &topic("bounds3", "{partitions: 1, replicationFactor: 5}"),
    )?;
    cp.run(
        "kubectl",
        &["delete", "-n", &ns, "topic", "bounds", "bounds2", "bounds3"],
        None,
    )?;
    // Nothing refused was stored, and growing is fine.
    let names = cp.kubectl(&["get", "topics", "-n", &ns, "-o", "name"])?;
    assert_eq!(names.lines().count(), 2, "{names}");
    cp.apply(&ns, &topic("grows", "{partitions: 5}"))?;
    Ok(())
}

#[test]
fn kubectl_get_shows_the_printer_columns_from_status() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    install(cp)?;
    let ns = cp.namespace("crd-columns")?;
    cp.apply(&ns, &topic("orders", "{partitions: 3}"))?;
    cp.apply(&ns, &group("mailer", "{topic: orders, type: Shared}"))?;
    cp.kubectl(&[
        "patch", "topic", "orders", "-n", &ns, "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"messages":42,"bytes":4200,"conditions":[{"type":"Ready","status":"True","reason":"Reconciled","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
    ])?;
    cp.kubectl(&[
        "patch", "consumergroup", "mailer", "-n", &ns, "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"members":2,"lag":7,"conditions":[{"type":"Ready","status":"False","reason":"NoBrokers","message":"waiting","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
    ])?;
    let topics = cp.kubectl(&["get", "topics", "-n", &ns])?;
    let mut lines = topics.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        vec!["NAME", "PARTITIONS", "READY", "MESSAGES", "BYTES", "AGE"]
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..5], &["orders", "3", "True", "42", "4200"]);
    let groups = cp.kubectl(&["get", "consumergroups", "-n", &ns])?;
    let mut lines = groups.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        vec!["NAME", "TOPIC", "TYPE", "MEMBERS", "LAG", "READY"]
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row, vec!["mailer", "orders", "Shared", "2", "7", "False"]);
    // kubectl explain shows the field docs.
    let explain = cp.kubectl(&["explain", "topic.spec.partitions"])?;
    assert!(
        explain.contains("Number of partitions, 1 to 1024"),
        "{explain}"
    );
    Ok(())
}

#[test]
fn the_examples_are_valid_resources() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    install(cp)?;
    let ns = cp.namespace("examples")?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples");
    for file in ["topic.yaml", "consumergroup.yaml", "topic-replicated.yaml"] {
        let path = dir.join(file);
        cp.kubectl(&["apply", "-n", &ns, "-f", &path.to_string_lossy()])?;
    }
    let spec = cp.kubectl(&[
        "get",
        "topic",
        "orders",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.retention.maxAge}",
    ])?;
    assert_eq!(spec, "10d");
    let group = cp.kubectl(&[
        "get",
        "consumergroup",
        "inventory",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.type}",
    ])?;
    assert_eq!(group, "Shared");
    let rf = cp.kubectl(&[
        "get",
        "topic",
        "payments",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.replicationFactor}",
    ])?;
    assert_eq!(rf, "3");
    Ok(())
}
