//! The controllers wired together: Topic and ConsumerGroup reconcilers, the watches that
//! wake them, and leader election with a `coordination.k8s.io` Lease so that only one
//! replica reconciles at a time.

use std::{collections::HashMap, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt, controller,
        reflector::{self, ObjectRef},
        watcher::{self, watcher},
    },
};
use kube_lease_manager::LeaseManagerBuilder;

use crate::{
    builders,
    context::{self, Context, Settings, Stores},
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

/// Reconciles of one kind that run at once: bounds the operator's memory and the requests
/// in flight when thousands of objects change together.
const CONCURRENCY: u16 = 16;

/// A hash of `property`.
fn hash_of(property: impl std::hash::Hash) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut h = DefaultHasher::new();
    property.hash(&mut h);
    h.finish()
}

/// What was last seen of each object, to tell which watch events change what a reader
/// acts on (kube's predicate filter, keyed by the reader's own property).
struct Seen<K: kube::Resource<DynamicType = ()>> {
    last: HashMap<ObjectRef<K>, u64>,
    property: fn(&K) -> u64,
}

impl<K: kube::Resource<DynamicType = ()>> Seen<K> {
    fn new(property: fn(&K) -> u64) -> Self {
        Self {
            last: HashMap::new(),
            property,
        }
    }

    /// Whether `obj`'s property changed since it was last seen (the first time: yes; an
    /// object being deleted: always, and it is forgotten).
    fn changed(&mut self, obj: &K) -> bool {
        let key = ObjectRef::from_obj(obj);
        if obj.meta().deletion_timestamp.is_some() {
            self.last.remove(&key);
            return true;
        }
        let h = (self.property)(obj);
        self.last.insert(key, h) != Some(h)
    }
}

/// What a Topic's reconcile acts on: its spec (generation), finalizers and deletion.
fn topic_trigger(t: &Topic) -> u64 {
    hash_of((
        &t.metadata.uid,
        t.metadata.generation,
        &t.metadata.finalizers,
    ))
}

/// What a ConsumerGroup's reconcile acts on, as [`topic_trigger`].
fn group_trigger(g: &ConsumerGroup) -> u64 {
    hash_of((
        &g.metadata.uid,
        g.metadata.generation,
        &g.metadata.finalizers,
    ))
}

/// What a Topic's groups read of it: whether it is Ready and its partitions' leaders.
fn topic_for_groups(t: &Topic) -> u64 {
    let status = t.status.as_ref();
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let leaders: Vec<(u32, &str)> = status
        .map(|s| {
            s.placement
                .iter()
                .map(|p| (p.partition, p.broker.as_str()))
                .collect()
        })
        .unwrap_or_default();
    hash_of((&t.metadata.uid, ready.map(|c| c.status.as_str()), leaders))
}

/// What the Topics read of a broker Pod: Ready or not, its address, its phase.
fn pod_for_topics(p: &Pod) -> u64 {
    let status = p.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    hash_of((
        &p.metadata.uid,
        ready,
        status.and_then(|s| s.pod_ip.as_deref()),
        status.and_then(|s| s.phase.as_deref()),
    ))
}

/// Drops from a cached object what the operator never reads (managed fields, annotations
/// such as kubectl's last-applied copy of the whole object): the caches stay small.
fn trim_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
}

/// A broker Pod as cached: its metadata and the status fields the operator reads.
fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata);
    pod.spec = None;
    if let Some(s) = pod.status.as_mut() {
        *s = PodStatus {
            conditions: s.conditions.take(),
            phase: s.phase.take(),
            pod_ip: s.pod_ip.take(),
            ..PodStatus::default()
        };
    }
}

/// The objects of `kind` as `api` watches them (with backoff; failures logged), each
/// `trim`med and then cached through `writer`.
fn cached_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: impl FnMut(&mut K) + Send + 'static,
    writer: reflector::store::Writer<K>,
    kind: &'static str,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .applied_objects()
        .inspect(move |r| {
            if let Err(e) = r {
                tracing::warn!(kind, error = %e, "watch failed; retried with backoff");
            }
        })
}

/// Runs both controllers until SIGTERM/SIGINT.
///
/// One watch per kind (Topics, ConsumerGroups, broker Pods), trimmed of what is never
/// read, fills the caches the controllers and every reconcile read. A reconcile is woken
/// by a change it acts on (spec, finalizers, deletion), never by the status it writes; a
/// broker Pod wakes its namespace's Topics when its readiness or address changes; a Topic
/// wakes its groups when its readiness or leaders change (from the Topic watch: no second
/// one).
#[allow(clippy::too_many_lines)] // the wiring, read top to bottom
pub async fn controllers(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let (topics, topic_writer) = reflector::store::<Topic>();
    let (groups, group_writer) = reflector::store::<ConsumerGroup>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    ctx.use_stores(Stores {
        topics: topics.clone(),
        groups: groups.clone(),
        pods: pods.clone(),
    });
    for (kind, count) in [
        ("Topic", {
            let s = topics.clone();
            Box::new(move || s.len()) as Box<dyn Fn() -> usize + Send + Sync>
        }),
        ("ConsumerGroup", {
            let s = groups.clone();
            Box::new(move || s.len())
        }),
        ("Pod", {
            let s = pods.clone();
            Box::new(move || s.len())
        }),
    ] {
        ctx.metrics.watch_count(kind, count);
    }

    // Topics: the Topic controller's trigger, and (through a channel) its groups'.
    let (wake_groups, group_wakes) =
        futures::channel::mpsc::unbounded::<ObjectRef<ConsumerGroup>>();
    let metrics = Arc::clone(&ctx.metrics);
    let store = groups.clone();
    let mut for_groups = Seen::new(topic_for_groups);
    let mut for_topic = Seen::new(topic_trigger);
    let topic_events = cached_watch(
        api::<Topic>(&client, namespace),
        watcher::Config::default(),
        |t: &mut Topic| trim_meta(&mut t.metadata),
        topic_writer,
        "Topic",
    )
    .filter(move |r| {
        let Ok(t) = r else {
            return std::future::ready(false);
        };
        if for_groups.changed(t) {
            let (ns, name) = (t.namespace(), t.name_any());
            for g in store
                .state()
                .iter()
                .filter(|g| g.namespace() == ns && g.spec.topic == name)
            {
                metrics.queued("ConsumerGroup", context::key(g.as_ref()));
                // The receiver lives as long as the group controller.
                let _ = wake_groups.unbounded_send(ObjectRef::from_obj(g.as_ref()));
            }
        }
        let wake = for_topic.changed(t);
        if wake {
            metrics.queued("Topic", context::key(t));
        }
        std::future::ready(wake)
    });

    // Broker Pods: a change of readiness or address wakes the namespace's Topics.
    let mut seen = Seen::new(pod_for_topics);
    let pod_events = cached_watch(
        api::<Pod>(&client, namespace),
        watcher::Config::default().labels(&builders::selector_string()),
        trim_pod,
        pod_writer,
        "Pod",
    )
    .filter(move |r| std::future::ready(r.as_ref().is_ok_and(|p| seen.changed(p))));

    let config = controller::Config::default().concurrency(CONCURRENCY);
    let metrics = Arc::clone(&ctx.metrics);
    let store = topics.clone();
    let topic_controller = Controller::for_stream(topic_events, topics)
        .with_config(config.clone())
        .watches_stream(pod_events, move |pod| {
            let ns = pod.namespace();
            store
                .state()
                .into_iter()
                .filter(|t| t.namespace() == ns)
                .map(|t| {
                    metrics.queued("Topic", context::key(t.as_ref()));
                    ObjectRef::from_obj(t.as_ref())
                })
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(topic::reconcile, topic::error_policy, Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "topic controller");
            }
        });

    let metrics = Arc::clone(&ctx.metrics);
    let mut seen = Seen::new(group_trigger);
    let group_events = cached_watch(
        api::<ConsumerGroup>(&client, namespace),
        watcher::Config::default(),
        |g: &mut ConsumerGroup| trim_meta(&mut g.metadata),
        group_writer,
        "ConsumerGroup",
    )
    .filter(move |r| {
        let wake = r.as_ref().is_ok_and(|g| seen.changed(g));
        if let (true, Ok(g)) = (wake, r) {
            metrics.queued("ConsumerGroup", context::key(g));
        }
        std::future::ready(wake)
    });
    let group_controller = Controller::for_stream(group_events, groups)
        .with_config(config)
        .reconcile_on(group_wakes)
        .shutdown_on_signal()
        .run(group::reconcile, group::error_policy, Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "consumer group controller");
            }
        });
    futures::join!(topic_controller, group_controller);
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
        () = Box::pin(controllers(ctx, options.namespace.as_deref())) => {
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
