//! What a newcomer meets first, each with one clear line that says what to do: an address
//! without a scheme, a broker that is not running, the HTTP port instead of the gRPC one,
//! host names to listen on, a data directory already in use, plain logs in files, an offset
//! without a partition, and a limit below its minimum.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use weir_tests::{Broker, bin};

/// Runs `weir` with `args`; returns (exit code, stdout, stderr).
fn weir(args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let out = Command::new(bin("weir"))
        .args(args)
        .env_remove("WEIR_BROKER")
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

fn one_line(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
}

#[test]
fn the_cli_takes_host_port_and_says_what_is_wrong_with_an_address() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    // HOST:PORT without a scheme.
    let (code, out, err) = weir(&["--broker", &broker.addr, "topic", "list"])?;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("TOPIC"), "{out}");

    // Nothing listens: the cause once, and what to check.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (code, _, err) = weir(&["--broker", &free.to_string(), "topic", "list"])?;
    assert_eq!(code, Some(1));
    one_line(&err);
    assert!(
        err.starts_with(&format!(
            "weir: cannot connect to the broker at http://{free}: "
        )),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
    assert!(err.contains("is weir-broker running there?"), "{err}");
    assert!(!err.contains("transport error"), "{err}");

    // The broker's HTTP port instead of its gRPC port.
    let (code, _, err) = weir(&["--broker", &broker.http_addr, "topic", "list"])?;
    assert_eq!(code, Some(1));
    one_line(&err);
    assert!(err.contains("does not speak gRPC"), "{err}");
    assert!(err.contains("HTTP port"), "{err}");
    Ok(())
}

#[test]
fn consume_offset_needs_a_partition_and_limits_state_their_minimum() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let (code, _, err) = weir(&["--broker", &broker.addr, "consume", "t", "--offset", "5"])?;
    assert_eq!(code, Some(2), "a usage error: {err}");
    assert!(err.contains("--partition"), "{err}");

    let (code, _, err) = weir(&[
        "--broker",
        &broker.addr,
        "topic",
        "create",
        "small",
        "--max-bytes",
        "1KiB",
    ])?;
    assert_eq!(code, Some(1));
    one_line(&err);
    assert!(
        err.contains("max_bytes is 1024; it must be at least"),
        "{err}"
    );
    Ok(())
}

/// Starts `weir-broker` with `args`; returns the child and its stderr lines up to "broker
/// ready" (or to its exit).
fn start_broker(args: &[&str]) -> anyhow::Result<(std::process::Child, Vec<String>)> {
    let mut child = Command::new(bin("weir-broker"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let ready = line.contains("broker ready");
            if tx.send(line).is_err() || ready {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let ready = line.contains("broker ready");
        lines.push(line);
        if ready {
            break;
        }
    }
    Ok((child, lines))
}

#[test]
fn the_broker_listens_on_host_names_and_refuses_a_data_directory_in_use() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_string_lossy().into_owned();
    // Host names resolve; text logs to a pipe carry no colour codes.
    let (mut first, lines) = start_broker(&[
        "--data-dir",
        &data,
        "--listen",
        "localhost:0",
        "--http-listen",
        "localhost:0",
        "--log-format",
        "text",
    ])?;
    let text = lines.join("\n");
    assert!(text.contains("broker ready"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a log file: {text:?}"
    );

    // A second broker on the same directory: one line that says so, exit 1.
    let out = Command::new(bin("weir-broker"))
        .args([
            "--data-dir",
            &data,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .output()?;
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("weir-broker: ")
            && last.contains("another broker is using the data directory"),
        "{err}"
    );
    assert!(!err.contains("FjallError"), "{err}");

    // A URL where an address belongs is refused with what to write instead.
    let out = Command::new(bin("weir-broker"))
        .args(["--data-dir", &data, "--listen", "http://127.0.0.1:7070"])
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("expected HOST:PORT"), "{err}");
    Ok(())
}

/// A 10,000-character name is refused or not found with a short message that quotes its
/// beginning only (a whole quote would not fit in a gRPC status).
#[test]
fn huge_names_get_short_errors() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let huge = "n".repeat(10_000);
    for args in [
        vec!["topic", "create", huge.as_str()],
        vec!["topic", "describe", huge.as_str()],
        vec!["group", "describe", huge.as_str()],
        vec![
            "consume",
            huge.as_str(),
            "--group",
            huge.as_str(),
            "--max-messages",
            "1",
        ],
    ] {
        let mut all = vec!["--broker", broker.addr.as_str()];
        all.extend(args.iter().copied());
        let (code, _, err) = weir(&all)?;
        let what = args[..2].join(" ");
        assert!(err.len() < 600, "{what}: {} bytes", err.len());
        assert_eq!(code, Some(1), "{what}: {err}");
        one_line(&err);
        assert!(
            err.contains("INVALID_ARGUMENT") || err.contains("NOT_FOUND"),
            "{what}: {err}"
        );
        assert!(!err.contains("h2 protocol error"), "{err}");
    }
    Ok(())
}
