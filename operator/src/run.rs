//! The controllers wired together: Topic and ConsumerGroup reconcilers, the watches that
//! wake them, and leader election with a `coordination.k8s.io` Lease so that only one
//! replica reconciles at a time.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{Controller, reflector::ObjectRef, watcher},
};
use kube_lease_manager::LeaseManagerBuilder;

use crate::{
    builders,
    context::{Context, Settings},
    crd::{ConsumerGroup, Topic},
    group,
    metrics::Metrics,
    topic,
};

/// Where and how the operator runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Namespace to watch; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Namespace of the leader Lease.
    pub lease_namespace: String,
    /// Name of the leader Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease and in Events (the Pod name in a cluster).
    pub instance: String,
    /// Lease duration in seconds: a leader that stops renewing loses it after this long.
    pub lease_seconds: u64,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until SIGTERM/SIGINT.
pub async fn controllers(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let broker_pods = watcher::Config::default().labels(
        &builders::selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    );

    let topics = Controller::new(api::<Topic>(&client, namespace), watcher::Config::default());
    let store = topics.store();
    ctx.use_topic_store(store.clone());
    let topics = topics
        // A broker Pod that changes (Ready, restarted, IP) concerns every Topic of its
        // namespace.
        .watches(api::<Pod>(&client, namespace), broker_pods, move |pod| {
            let ns = pod.namespace();
            store
                .state()
                .into_iter()
                .filter(|t| t.namespace() == ns)
                .map(|t| ObjectRef::from_obj(t.as_ref()))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(topic::reconcile, topic::error_policy, Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "topic controller");
            }
        });

    let groups = Controller::new(
        api::<ConsumerGroup>(&client, namespace),
        watcher::Config::default(),
    );
    let store = groups.store();
    let groups = groups
        // A Topic that changes (Ready, placement) concerns the groups that read it.
        .watches(
            api::<Topic>(&client, namespace),
            watcher::Config::default(),
            move |t| {
                let ns = t.namespace();
                let name = t.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|g| g.namespace() == ns && g.spec.topic == name)
                    .map(|g| ObjectRef::from_obj(g.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(group::reconcile, group::error_policy, Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "consumer group controller");
            }
        });
    futures::join!(topics, groups);
}

/// Waits for the leader Lease, then runs the controllers while holding it. Losing the Lease
/// ends the process with an error (client-go's leader election does the same) so that a
/// restarted replica starts again as a follower; SIGTERM releases the Lease at once.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    options: RunOptions,
) -> anyhow::Result<()> {
    let manager = LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.instance)
        .with_duration(options.lease_seconds)
        .with_grace(options.lease_seconds.div_ceil(3).max(1))
        .build()
        .await?;
    metrics.set_ready();
    let (mut leading, task) = manager.watch().await;
    tracing::info!(lease = %options.lease_name, namespace = %options.lease_namespace, identity = %options.instance, "waiting to lead");
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            r = leading.changed() => r?,
            _ = &mut stop => return Ok(()),
        }
    }
    tracing::info!(identity = %options.instance, "leading; starting the controllers");
    metrics.set_leader(true);
    let ctx = Arc::new(Context::new(
        client,
        settings,
        Arc::clone(&metrics),
        options.instance.clone(),
    ));
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    tokio::select! {
        () = controllers(ctx, options.namespace.as_deref()) => {
            tracing::info!("controllers stopped; releasing the lease");
            metrics.set_leader(false);
            drop(leading);
            if let Ok(Ok(manager)) = task.await {
                let _ = manager.release().await;
            }
            Ok(())
        }
        () = lost => {
            metrics.set_leader(false);
            anyhow::bail!("lost the leader lease {}; exiting so that the new leader alone reconciles", options.lease_name)
        }
    }
}
