//! grpcurl discovers the services through reflection and sees health SERVING.

use std::process::Command;

use weir_tests::{Broker, grpcurl};

#[test]
fn grpcurl_lists_weir_services_and_health_reports_serving() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let grpcurl = grpcurl()?;

    let out = Command::new(&grpcurl)
        .args(["-plaintext", &broker.addr, "list"])
        .output()?;
    assert!(
        out.status.success(),
        "grpcurl list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let services = String::from_utf8(out.stdout)?;
    for s in [
        "weir.v1.Admin",
        "weir.v1.Producer",
        "weir.v1.Consumer",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == s),
            "{s} missing from:\n{services}"
        );
    }

    let out = Command::new(&grpcurl)
        .args(["-plaintext", &broker.addr, "describe", "weir.v1.Producer"])
        .output()?;
    let described = String::from_utf8(out.stdout)?;
    assert!(described.contains("rpc ProduceStream ( stream .weir.v1.ProduceStreamRequest ) returns ( stream .weir.v1.ProduceStreamResponse )"), "{described}");

    let out = Command::new(&grpcurl)
        .args(["-plaintext", &broker.addr, "grpc.health.v1.Health/Check"])
        .output()?;
    assert!(String::from_utf8(out.stdout)?.contains("\"status\": \"SERVING\""));

    // A call through reflection alone: create a topic with JSON.
    let out = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-d",
            r#"{"name":"via-grpcurl","config":{"partitions":3}}"#,
            &broker.addr,
            "weir.v1.Admin/CreateTopic",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.contains("\"created\": true"));
    Ok(())
}
