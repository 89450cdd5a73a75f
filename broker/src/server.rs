//! Serving: binds nothing itself (callers pass listeners, so tests can bind port 0), runs the
//! gRPC and HTTP servers, and shuts down gracefully.
//!
//! Shutdown order: mark not ready and NOT_SERVING, stop accepting, end open streams, wait
//! for in-flight requests (up to a timeout), then commit and persist everything queued.
//! The same order runs when a worker dies (the log's writer, a periodic job): then
//! [`run`] returns [`Error::WorkerFailed`] and the process exits non-zero.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use weir_proto::v1::{
    FILE_DESCRIPTOR_SET, admin_server::AdminServer, cluster_server::ClusterServer,
    consumer_server::ConsumerServer, producer_server::ProducerServer, raft_server::RaftServer,
};

use crate::{
    cluster::{BrokerId, Cluster, ClusterOptions},
    connections::{ConnectionStats, HttpListener, accept_limited},
    groups::Groups,
    grpc::{
        AdminService, ClusterService, ConsumerService, Context, MAX_MESSAGE_BYTES, ProducerService,
        RaftService,
    },
    jobs,
    log::Log,
    metrics::{self, Metrics},
};

/// Settings of serving.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest a graceful shutdown waits for in-flight requests.
    pub grace: Duration,
    /// How often writes that were not fsynced at once (`Buffered` topics, group acks) are
    /// fsynced.
    pub buffered_flush_interval: Duration,
    /// Most connections the gRPC port holds at once ([`crate::connections::FdBudget`]).
    pub grpc_connections: usize,
    /// Most connections the HTTP port holds at once.
    pub http_connections: usize,
    /// `--node-id`: this broker's id in the cluster.
    pub node_id: BrokerId,
    /// `--advertise`: `host:port` peers and clients use to reach the gRPC port; `None` for
    /// the bound address (this host's name when bound to every interface).
    pub advertise: Option<String>,
    /// `--peers`: the metadata group's initial voters (empty: a cluster of one).
    pub peers: std::collections::BTreeMap<BrokerId, String>,
    /// Timings of replicated partitions' Raft groups.
    pub replica: crate::replica::ReplicaOptions,
}

impl Default for ServeOptions {
    /// 10 s grace, fsync every 1 s, 1024 gRPC and 64 HTTP connections.
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            buffered_flush_interval: Duration::from_secs(1),
            grpc_connections: 1024,
            http_connections: 64,
            node_id: 0,
            advertise: None,
            peers: std::collections::BTreeMap::new(),
            replica: crate::replica::ReplicaOptions::default(),
        }
    }
}

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The reflection service could not load the descriptor set.
    #[error("building the reflection service: {0}")]
    BuildReflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    ServeGrpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("serving HTTP: {0}")]
    ServeHttp(#[source] std::io::Error),
    /// Group state could not be loaded.
    #[error("loading consumer groups: {0}")]
    OpenGroups(#[source] crate::groups::Error),
    /// A worker the broker depends on died or storage failed; the broker shut down and must
    /// be restarted to recover.
    #[error("{0}; the broker stopped and must be restarted to recover")]
    WorkerFailed(String),
    /// Persisting at shutdown failed.
    #[error("closing the log: {0}")]
    CloseLog(#[from] crate::log::Error),
    /// The cluster's metadata group could not be started or joined.
    #[error("joining the cluster: {0}")]
    Cluster(#[from] crate::cluster::Error),
}

/// Loads the consumer groups this broker coordinates.
async fn open_groups(log: &Arc<Log>, cluster: &Arc<Cluster>) -> Result<Arc<Groups>, Error> {
    let log_for_groups = Arc::clone(log);
    let remote = crate::cluster::remote::GroupsRemote::new(Arc::clone(cluster), Arc::clone(log));
    match tokio::task::spawn_blocking(move || Groups::open(log_for_groups, remote)).await {
        Ok(opened) => opened.map_err(Error::OpenGroups),
        Err(e) => Err(Error::WorkerFailed(format!("loading consumer groups: {e}"))),
    }
}

/// Serves `log` on the given listeners until `shutdown` resolves, then shuts down
/// gracefully: requests in flight finish (at most `options.grace`), the log commits what is
/// queued and persists. When a worker dies first (the log reports a failure), the broker
/// turns unready at once, shuts down the same way and returns [`Error::WorkerFailed`].
pub async fn run(
    log: Arc<Log>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> Result<(), Error> {
    let cluster = Cluster::open(
        Arc::clone(&log),
        ClusterOptions {
            node_id: options.node_id,
            advertise: options
                .advertise
                .clone()
                .or_else(|| options.peers.get(&options.node_id).cloned())
                .unwrap_or_else(|| default_advertise(&grpc)),
            peers: options.peers.clone(),
            replica: options.replica,
        },
    )
    .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let groups = open_groups(&log, &cluster).await?;
    cluster.spawn_metrics(Arc::clone(&metrics));
    metrics.watch_replicas(Arc::clone(cluster.replicas()));
    let jobs = jobs::spawn(&log, &groups, options.buffered_flush_interval, &stop_rx);
    let ctx = Context {
        log: Arc::clone(&log),
        shutdown: stop_rx.clone(),
        metrics: Arc::clone(&metrics),
        groups: Arc::clone(&groups),
        cluster: Arc::clone(&cluster),
    };

    // NOT_SERVING (the overall status too, which Kubernetes' gRPC probes ask) until this
    // broker has joined the cluster: a Pod is Ready only once the controller knows it.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, false).await;
    let grpc_addr = local_addr(&grpc);
    let http_addr = local_addr(&http);
    let mut stop_grpc = stop_rx.clone();
    // Bounded, silent connections closed, TCP_NODELAY set (`connections`).
    let connection_stats = Arc::new(ConnectionStats::default());
    let http_local = http.local_addr().map_err(Error::ServeHttp)?;
    let incoming = futures::StreamExt::map(
        ReceiverStream::new(accept_limited(
            grpc,
            "grpc",
            options.grpc_connections,
            Arc::clone(&connection_stats),
        )),
        |(conn, _)| Ok::<_, std::io::Error>(conn),
    );
    let http = HttpListener {
        incoming: accept_limited(
            http,
            "http",
            options.http_connections,
            Arc::clone(&connection_stats),
        ),
        addr: http_local,
    };
    let grpc_server =
        grpc_router(&ctx, health_service)?.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_grpc.wait_for(|s| *s).await;
        });
    let mut stop_http = stop_rx.clone();
    let http_server = axum::serve(
        http,
        metrics::router(Arc::clone(&log), Arc::clone(&groups), metrics, ready_rx),
    )
    .with_graceful_shutdown(async move {
        let _ = stop_http.wait_for(|s| *s).await;
    });
    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(async move { http_server.await });
    // Peers reach this broker's metadata node from here on; ready once in the cluster.
    let local_groups = groups
        .list(None)
        .iter()
        .map(|g| (g.name.clone(), g.config()))
        .collect();
    // A broker whose peers are down waits here (not ready) until a majority is up; a stop
    // signal meanwhile ends it cleanly, as Kubernetes expects of a Pod it deletes.
    let mut shutdown = std::pin::pin!(shutdown);
    match join_or_stop(&cluster, &log, local_groups, &mut shutdown).await {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(join_error(&log, e)),
        None => {
            tracing::info!("stopped before joining the cluster");
            stop_tx.send_replace(true);
            drain(grpc_task, http_task, jobs, options.grace).await;
            return close(&cluster, &log).await;
        }
    }
    ready_tx.send_replace(true);
    set_health(&health, true).await;
    tracing::info!(grpc_addr, http_addr, "broker ready");

    let failure = until_stop_or_failure(&log, &mut shutdown).await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    unready(&ready_tx, &health, &cluster, failure.is_none()).await;
    stop_tx.send_replace(true);
    drain(grpc_task, http_task, jobs, options.grace).await;
    if let Some(reason) = failure {
        // Storage may be poisoned: persist nothing more, recovery starts from what is on disk.
        return Err(Error::WorkerFailed(reason));
    }
    flush_groups(&groups, options.grace).await;
    close(&cluster, &log).await
}

/// Persists every group's state, waiting at most `grace`: a group whose coordinator
/// partition is led here writes through Raft, which a broker whose gRPC server is closed
/// may no longer commit.
async fn flush_groups(groups: &crate::groups::Groups, grace: Duration) {
    match tokio::time::timeout(grace, groups.flush()).await {
        Ok(Ok(())) => tracing::info!("group state persisted"),
        Ok(Err(e)) => tracing::warn!(error = %e, "persisting group state at shutdown failed"),
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "persisting group state at shutdown did not finish in time"
        ),
    }
}

/// Joins the cluster, unless `shutdown` resolves first (`None`).
async fn join_or_stop(
    cluster: &Cluster,
    log: &Log,
    groups: Vec<(String, crate::groups::GroupConfig)>,
    shutdown: impl Future<Output = ()>,
) -> Option<Result<(), crate::cluster::Error>> {
    tokio::select! {
        joined = cluster.join(log, groups) => Some(joined),
        () = shutdown => None,
    }
}

/// Why joining the cluster failed: a worker's failure when one came first.
fn join_error(log: &Log, e: crate::cluster::Error) -> Error {
    match log.failed().borrow().clone() {
        Some(reason) => Error::WorkerFailed(reason),
        None => e.into(),
    }
}

/// Stops the metadata node and the replicas (waiting at most [`RAFT_STOP_WAIT`]), then
/// closes the log (commits what is queued, persists).
async fn close(cluster: &Cluster, log: &Log) -> Result<(), Error> {
    if tokio::time::timeout(RAFT_STOP_WAIT, cluster.shutdown())
        .await
        .is_ok()
    {
        tracing::info!("Raft nodes stopped");
    } else {
        tracing::warn!(
            wait_ms = RAFT_STOP_WAIT.as_millis() as u64,
            "the Raft nodes did not stop in time; closing the log anyway"
        );
    }
    log.close().await?;
    tracing::info!("log persisted; bye");
    Ok(())
}

/// Turns the broker unready (HTTP and gRPC health); when it stops cleanly (`hand_over`),
/// hands the leadership of the partitions it leads to other replicas while peers can still
/// reach it, so they get new leaders at once instead of after an election timeout.
async fn unready(
    ready: &watch::Sender<bool>,
    health: &tonic_health::server::HealthReporter,
    cluster: &Cluster,
    hand_over: bool,
) {
    ready.send_replace(false);
    set_health(health, false).await;
    if hand_over {
        cluster.replicas().hand_over(HANDOVER_WAIT).await;
    }
}

/// Longest a stopping broker waits for its Raft nodes (the metadata group's and the
/// replicas') to stop: 10 s. What they had not stored by then was not acknowledged.
const RAFT_STOP_WAIT: Duration = Duration::from_secs(10);

/// Longest a stopping broker waits for the partitions it leads to take new leaders.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// Waits up to `grace` for the servers to finish in-flight requests, then for the jobs.
async fn drain(
    grpc_task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    jobs: Vec<tokio::task::JoinHandle<()>>,
    grace: Duration,
) {
    let drained = tokio::time::timeout(grace, async {
        let g = grpc_task.await;
        let h = http_task.await;
        (g, h)
    })
    .await;
    match drained {
        Ok((Ok(Err(e)), _)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Ok((_, Ok(Err(e)))) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Ok(_) => tracing::info!("in-flight requests finished"),
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "in-flight requests did not finish in time"
        ),
    }
    for job in jobs {
        if let Err(e) = job.await {
            tracing::warn!(error = %e, "a periodic job ended abnormally");
        }
    }
    tracing::info!("periodic jobs stopped");
}

/// Waits for `shutdown` or for a worker's failure; returns the failure's reason.
async fn until_stop_or_failure(
    log: &Log,
    shutdown: impl Future<Output = ()> + Send,
) -> Option<String> {
    let mut failed = log.failed();
    tokio::select! {
        () = shutdown => None,
        reason = failed.wait_for(Option::is_some) => {
            let reason = match reason {
                Ok(r) => (*r).clone().unwrap_or_default(),
                Err(_) => "the log stopped".to_owned(),
            };
            tracing::error!(reason, "a worker failed; shutting down so the broker restarts and recovers");
            Some(reason)
        }
    }
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// The address peers and clients are told when `--advertise` is not given: the bound
/// address, with this host's name in place of an unspecified IP (`0.0.0.0`, `::`).
fn default_advertise(grpc: &TcpListener) -> String {
    match grpc.local_addr() {
        Ok(a) if a.ip().is_unspecified() => {
            let host = rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned();
            format!("{host}:{}", a.port())
        }
        Ok(a) => a.to_string(),
        Err(_) => "localhost:7070".into(),
    }
}

/// Most concurrent streams (calls) on one gRPC connection. A broker's connection to a peer
/// carries one open `PartitionAppends` stream for every partition it leads with a replica
/// on that peer, besides the calls of the moment, and a client waits for a free stream
/// before it opens one: 16,384 leaves room for thousands of partitions per broker.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16_384;

/// Most streams a peer may reset before the server accepted them, on one connection, before
/// the connection is closed (GOAWAY with `ENHANCE_YOUR_CALM`): as many as it may have open.
/// This is h2's guard against the rapid-reset attack (CVE-2023-44487), 20 by default. A
/// broker's Raft peers multiplex every group's heartbeats and appends on one connection and
/// cancel those that time out; after a pause of either side hundreds of resets arrive at
/// once, and at 20 the guard closed the connection, failing every group's calls on it and
/// setting off elections.
pub const MAX_PENDING_ACCEPT_RESETS: usize = MAX_STREAMS_PER_CONNECTION as usize;

/// Marks the broker (the overall status, service `""`) and every `weir.v1` service
/// SERVING or NOT_SERVING in `grpc.health.v1`.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let overall = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", overall).await;
    if serving {
        health.set_serving::<AdminServer<AdminService>>().await;
        health
            .set_serving::<ProducerServer<ProducerService>>()
            .await;
        health
            .set_serving::<ConsumerServer<ConsumerService>>()
            .await;
    } else {
        health.set_not_serving::<AdminServer<AdminService>>().await;
        health
            .set_not_serving::<ProducerServer<ProducerService>>()
            .await;
        health
            .set_not_serving::<ConsumerServer<ConsumerService>>()
            .await;
    }
}

/// Every gRPC service of the broker: weir.v1, health, reflection (v1 and v1alpha, so older
/// grpcurl versions work too).
fn grpc_router(
    ctx: &Context,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::transport::server::Router, Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(Server::builder()
        // A peer that vanished (half-open connection) stops answering pings and is closed.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        // Large HTTP/2 windows so big produce requests are not throttled by window updates.
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(32 * 1024 * 1024))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(ClusterServer::new(ClusterService::new(Arc::clone(
            &ctx.cluster,
        ))))
        .add_service(
            RaftServer::new(RaftService::new(Arc::clone(&ctx.cluster)))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(AdminService::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ProducerServer::new(ProducerService::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ConsumerServer::new(ConsumerService::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
}
