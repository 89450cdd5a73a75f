//! Real input round trip through the CLI: Loghub files produced with `weir produce` and read
//! back with `weir consume` come back byte for byte and in order for a fixed key.

use weir_tests::{Broker, lines, loghub};

/// Produces `input` with a fixed key and consumes it back; checks the output is the input
/// with a final newline added when it had none.
fn round_trip(broker: &Broker, topic: &str, input: &[u8]) -> anyhow::Result<()> {
    let out = broker.weir(&["topic", "create", topic, "--partitions", "4"], b"")?;
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Small batches so the input spans many batches and requests.
    let out = broker.weir(
        &["produce", topic, "--key", "host-1", "--batch-records", "97"],
        input,
    )?;
    assert!(
        out.status.success(),
        "produce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = lines(input);
    let n = expected.len().to_string();
    let out = broker.weir(
        &[
            "consume",
            topic,
            "--max-messages",
            &n,
            "--idle-timeout",
            "10s",
        ],
        b"",
    )?;
    assert!(
        out.status.success(),
        "consume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = input.to_vec();
    if !want.ends_with(b"\n") && !want.is_empty() {
        want.push(b'\n');
    }
    assert_eq!(
        out.stdout.len(),
        want.len(),
        "{topic}: output length differs from input length"
    );
    assert!(out.stdout == want, "{topic}: output differs from input");
    // All on one partition, because the key is fixed.
    let describe = broker.weir(&["--output", "json", "topic", "describe", topic], b"")?;
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(
        text.contains(&format!("\"messages\":{n}")),
        "describe should report {n} messages: {text}"
    );
    Ok(())
}

#[test]
fn loghub_files_come_back_byte_for_byte() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    for (topic, file) in [
        ("apache", "Apache_2k.log"),
        ("hdfs", "HDFS_2k.log"),
        ("linux", "Linux_2k.log"),
        ("zookeeper", "Zookeeper_2k.log"),
    ] {
        let input = loghub(file);
        assert!(
            input.windows(2).any(|w| w == b"\r\n"),
            "{file} has CRLF lines"
        );
        round_trip(&broker, topic, &input)?;
    }
    Ok(())
}

#[test]
fn bare_carriage_returns_empty_lines_and_a_missing_final_newline_survive() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    // Real Apache lines with bare CRs placed inside some of them, empty lines, and no final
    // newline: every byte but the `\n` separators must come back.
    let apache = loghub("Apache_2k.log");
    let mut input = Vec::new();
    for (i, line) in lines(&apache).into_iter().take(500).enumerate() {
        let mut l = line.to_vec();
        if i % 7 == 0 {
            l.splice(10..10, *b"\r");
        }
        input.extend_from_slice(&l);
        input.push(b'\n');
        if i % 50 == 0 {
            input.push(b'\n');
        }
    }
    input.extend_from_slice(b"\rlast line\r");
    assert!(input.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n'));
    round_trip(&broker, "mixed", &input)
}
