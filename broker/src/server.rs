//! Serving: binds nothing itself (callers pass listeners, so tests can bind port 0), runs the
//! gRPC and HTTP servers, and shuts down gracefully.
//!
//! Shutdown order: mark not ready and NOT_SERVING, stop accepting, end open streams, wait
//! for in-flight requests (up to a timeout), then commit and persist everything queued.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use weir_proto::v1::{
    FILE_DESCRIPTOR_SET, admin_server::AdminServer, consumer_server::ConsumerServer,
    producer_server::ProducerServer,
};

use crate::{
    groups::Groups,
    grpc::{AdminService, ConsumerService, Context, MAX_MESSAGE_BYTES, ProducerService},
    log::Log,
    metrics::{self, Metrics},
};

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
    OpenGroups(#[source] crate::log::Error),
    /// Persisting at shutdown failed.
    #[error("closing the log: {0}")]
    CloseLog(#[from] crate::log::Error),
}

/// Serves `log` on the given listeners until `shutdown` resolves, then shuts down
/// gracefully: requests in flight finish (at most `grace`), the log commits what is queued
/// and persists.
pub async fn run(
    log: Arc<Log>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let log_for_groups = Arc::clone(&log);
    let groups = tokio::task::spawn_blocking(move || Groups::open(log_for_groups))
        .await
        .map_err(|e| Error::OpenGroups(crate::log::Error::InvalidArgument(e.to_string())))?
        .map_err(Error::OpenGroups)?;
    let ticker = tokio::spawn(Arc::clone(&groups).run(stop_rx.clone()));
    let retention = tokio::spawn(enforce_max_age(Arc::clone(&log), stop_rx.clone()));
    let ctx = Context {
        log: Arc::clone(&log),
        shutdown: stop_rx.clone(),
        metrics: Arc::clone(&metrics),
        groups: Arc::clone(&groups),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService>>().await;
    health
        .set_serving::<ProducerServer<ProducerService>>()
        .await;
    health
        .set_serving::<ConsumerServer<ConsumerService>>()
        .await;
    let grpc_addr = grpc
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let http_addr = http
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let mut stop_grpc = stop_rx.clone();
    // Accepted sockets get TCP_NODELAY: with Nagle, the tail of a large response waits for
    // the peer's delayed ACK (tens of ms). tonic's own nodelay setting only covers listeners
    // it binds itself.
    let incoming = futures::StreamExt::map(TcpListenerStream::new(grpc), |conn| {
        conn.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
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
    ready_tx.send_replace(true);
    tracing::info!(grpc_addr, http_addr, "broker ready");

    shutdown.await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    ready_tx.send_replace(false);
    health.set_not_serving::<AdminServer<AdminService>>().await;
    health
        .set_not_serving::<ProducerServer<ProducerService>>()
        .await;
    health
        .set_not_serving::<ConsumerServer<ConsumerService>>()
        .await;
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(grace, async {
        let g = grpc_task.await;
        let h = http_task.await;
        (g, h)
    })
    .await;
    match drained {
        Ok((Ok(Err(e)), _)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Ok((_, Ok(Err(e)))) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Ok(_) => {}
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "in-flight requests did not finish in time"
        ),
    }
    let _ = ticker.await;
    let _ = retention.await;
    if let Err(e) = groups.flush().await {
        tracing::warn!(error = %e, "persisting group state at shutdown failed");
    }
    log.close().await?;
    tracing::info!("log persisted; bye");
    Ok(())
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
        // Large HTTP/2 windows so big produce requests are not throttled by window updates.
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(32 * 1024 * 1024))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
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

/// How often `maxAge` is enforced: records disappear at most this long (plus the time to
/// delete them) after they pass their topic's `maxAge`.
pub const MAX_AGE_CHECK: Duration = Duration::from_secs(1);

/// Deletes records past their topic's `maxAge`, every [`MAX_AGE_CHECK`].
async fn enforce_max_age(log: Arc<Log>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(MAX_AGE_CHECK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for topic in log.topics() {
            let max_age = topic.config().max_age_ms;
            if max_age == 0 {
                continue;
            }
            let cutoff =
                crate::log::now_ms().saturating_sub(i64::try_from(max_age).unwrap_or(i64::MAX));
            for p in topic.partitions() {
                if let Err(e) = log.expire(p, cutoff).await {
                    tracing::warn!(topic = %topic.name, error = %e, "max-age enforcement failed; retrying");
                }
            }
        }
    }
}
