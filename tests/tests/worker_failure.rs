//! A worker that dies takes the broker down visibly: readiness fails and the process exits
//! non-zero, so Kubernetes restarts it. Never a live broker that answers UNAVAILABLE
//! forever. The writer is killed with the hidden `--failpoint writer-panic` (it panics on
//! the first produce).

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use weir_broker::{
    groups::Groups,
    log::{Failpoint, Log, LogOptions, Record, TopicConfig},
    metrics::{self, Metrics},
    produce,
    server::{self, ServeOptions},
};
use weir_client::{Client, Record as PbRecord};
use weir_tests::{Broker, http_get};

/// The broker process: a produce fails, the broker exits with 1 and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_writer_makes_the_broker_exit_non_zero() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(dir.path(), &["--failpoint", "writer-panic"])?;
    assert!(http_get(&broker.http_addr, "/readyz")?.contains(" 200 "));
    let client = broker.client().await?;
    client
        .create_topic("t", &weir_client::TopicConfig::new(1))
        .await?;
    let produced = client
        .produce("t", None, vec![PbRecord::value("never stored")])
        .await;
    assert!(
        produced.is_err(),
        "a produce with a dead writer: {produced:?}"
    );
    let code = broker.wait_exit(Duration::from_secs(20))?;
    assert_eq!(code, Some(1), "logs:\n{}", broker.log_text());
    let logs = broker.log_text();
    assert!(
        logs.contains("the log writer thread panicked"),
        "the reason is logged:\n{logs}"
    );
    Ok(())
}

/// In-process: once the writer died, `/readyz` answers 503 although the server was marked
/// ready, and `server::run` ends with `WorkerFailed` instead of serving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_and_serving_ends_once_the_writer_died() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let options = LogOptions {
        failpoint: Some(Failpoint::WriterPanic),
        ..LogOptions::default()
    };
    let log = Arc::new(Log::open(dir.path(), &options)?);
    log.create_topic("t", TopicConfig::new(1, 0)?).await?;

    // The HTTP endpoint alone, marked ready, over the log whose writer is about to die.
    let cluster = weir_broker::cluster::Cluster::open(
        Arc::clone(&log),
        weir_broker::cluster::ClusterOptions {
            node_id: 0,
            advertise: "127.0.0.1:1".into(),
            peers: std::collections::BTreeMap::new(),
            replica: weir_broker::replica::ReplicaOptions::default(),
        },
    )
    .await?;
    let remote = weir_broker::cluster::remote::GroupsRemote::new(cluster, Arc::clone(&log));
    let groups = Groups::open(Arc::clone(&log), remote)?;
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?.to_string();
    let router = metrics::router(Arc::clone(&log), groups, Arc::new(Metrics::new()), ready);
    tokio::spawn(async move { axum::serve(http, router).await });
    let addr = http_addr.clone();
    let before = tokio::task::spawn_blocking(move || http_get(&addr, "/readyz")).await??;
    assert!(before.contains(" 200 "), "{before}");

    let produced = produce::produce(&log, "t", None, vec![Record::default()]).await;
    assert!(produced.is_err(), "{produced:?}");
    let mut failed = log.failed();
    tokio::time::timeout(Duration::from_secs(10), failed.wait_for(Option::is_some)).await??;
    let addr = http_addr.clone();
    let after = tokio::task::spawn_blocking(move || http_get(&addr, "/readyz")).await??;
    assert!(after.contains(" 503 "), "{after}");

    // A whole in-process broker on the same dead log ends on its own, with the reason.
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        server::run(
            Arc::clone(&log),
            grpc,
            http,
            std::future::pending(),
            ServeOptions::default(),
        ),
    )
    .await?;
    let err = served.expect_err("serving ends with an error");
    assert!(matches!(err, server::Error::WorkerFailed(_)), "{err}");
    assert!(err.to_string().contains("writer thread panicked"), "{err}");
    Ok(())
}

/// A broker served in-process on `127.0.0.1:0` answers like the process does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_broker_serves_and_stops_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = Arc::new(Log::open(dir.path(), &LogOptions::default())?);
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", grpc.local_addr()?);
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        log,
        grpc,
        http,
        async move {
            let _ = stopped.await;
        },
        ServeOptions::default(),
    ));
    let client = Client::connect(&url).await?;
    client
        .create_topic("t", &weir_client::TopicConfig::new(2))
        .await?;
    let acks = client
        .produce(
            "t",
            Some(1),
            vec![PbRecord::value("a"), PbRecord::value("b")],
        )
        .await?;
    assert_eq!((acks[0].partition, acks[0].base_offset), (1, 0));
    let _ = stop.send(());
    server.await??;
    Ok(())
}
