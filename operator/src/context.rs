//! What every reconcile shares: the kube client, the operator's settings, connections to
//! brokers, the Event recorder, metrics, and the helpers that read broker Pods and write
//! status.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::Mutex;

use crate::{
    builders::{self, BrokerSettings, GRPC_PORT},
    crd::{Condition, ConsumerGroup, Topic},
    metrics::Metrics,
};

/// Field manager of everything the operator applies (server-side apply).
pub const FIELD_MANAGER: &str = "weir-operator";

/// Settings of the operator (its command-line flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Broker Pod template settings; `replicas` is ignored (it follows the Topics).
    pub brokers: BrokerSettings,
    /// Fewest brokers a namespace with at least one Topic runs.
    pub min_brokers: i32,
    /// Most brokers the operator sizes a namespace to (more only when placed partitions
    /// need them).
    pub max_brokers: i32,
    /// How often Ready resources are reconciled again to refresh live figures in status.
    pub status_interval: Duration,
}

/// A failed reconcile; the message says what failed and on which object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A broker refused or failed a request.
    #[error("broker {broker}: {source}")]
    Broker {
        /// Broker Pod.
        broker: String,
        /// What the broker said.
        #[source]
        source: weir_client::Error,
    },
    /// A finalizer step failed.
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    /// Something the operator cannot do yet (e.g. a broker is not Ready); retried.
    #[error("{0}")]
    Waiting(String),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Broker { .. } => "broker",
            Error::Finalizer(_) => "finalizer",
            Error::Waiting(_) => "waiting",
        }
    }
}

/// A broker Pod of a namespace as the operator sees it.
#[derive(Debug, Clone)]
pub struct BrokerPod {
    /// Pod name, `weir-broker-<ordinal>`.
    pub name: String,
    /// gRPC address `<pod IP>:7070`, when the Pod has an IP.
    pub address: Option<String>,
    /// The Pod's `Ready` condition is `True`.
    pub ready: bool,
    /// Why it is not Ready (phase or condition message), for status messages.
    pub why: String,
}

/// Shared state of the controllers.
pub struct Context {
    /// Kube client.
    pub client: Client,
    /// Operator settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    conns: Mutex<HashMap<String, weir_client::Client>>,
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// Per namespace, the broker objects last applied (their JSON) and when: applied again
    /// only when they change, or after [`REAPPLY_AFTER`] (drift by hand is repaired).
    applied: std::sync::Mutex<HashMap<String, Applied>>,
    /// The controllers' caches, once they run: Topics and broker Pods read from them, not
    /// from the API, on every reconcile.
    stores: std::sync::OnceLock<Stores>,
    /// Per namespace: the cluster's figures and metadata shared by every reconcile, and
    /// what changed through the cluster since they were read.
    namespaces: std::sync::Mutex<HashMap<String, Arc<Namespace>>>,
    /// Timestamp of the first stored record per (namespace, topic, partition), with the
    /// earliest offset it was read at: read again only when that offset moves.
    oldest: std::sync::Mutex<HashMap<PartitionKey, (u64, i64)>>,
}

/// A namespace's broker objects as last applied.
struct Applied {
    /// The StatefulSet, Services and PodDisruptionBudget as JSON.
    objects: Vec<u8>,
    /// The StatefulSet's replicas.
    replicas: i32,
    /// When.
    at: std::time::Instant,
}

/// `(namespace, topic, partition)`.
type PartitionKey = (String, String, u32);

/// The watch caches the controllers share (one watch per kind).
#[derive(Clone)]
pub struct Stores {
    /// Every Topic the operator watches.
    pub topics: Store<Topic>,
    /// Every ConsumerGroup the operator watches.
    pub groups: Store<ConsumerGroup>,
    /// The broker Pods (label selector [`builders::selector`]) the operator watches.
    pub pods: Store<Pod>,
}

/// What the operator keeps per namespace between reconciles.
#[derive(Default)]
struct Namespace {
    /// The last snapshot; one read at a time, concurrent reconciles wait and share it.
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    /// The newest cluster metadata read and when (by a snapshot or by itself).
    metadata: Mutex<Option<(std::time::Instant, Arc<weir_client::ClusterMetadata>)>>,
    /// Topics and groups (`topic/NAME`, `group/NAME`) created or changed through the
    /// cluster, and when: a snapshot read before that does not describe them.
    changed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// The cluster's figures of every topic and group of a namespace and its metadata, as read
/// at `at`.
#[derive(Debug)]
pub struct Snapshot {
    /// When it was read.
    pub at: std::time::Instant,
    /// Every topic, by name.
    pub topics: HashMap<String, weir_client::TopicInfo>,
    /// Every consumer group, by name (members, lag and pending from their coordinators).
    pub groups: HashMap<String, weir_client::GroupInfo>,
    /// Brokers and partition leaders.
    pub metadata: Arc<weir_client::ClusterMetadata>,
}

/// How long broker objects that did not change go without being applied again: 5 minutes.
pub const REAPPLY_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context; Events are reported as `weir-operator` with `instance` (the Pod name).
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(instance),
            },
        );
        Self {
            client,
            settings,
            metrics,
            recorder,
            conns: Mutex::new(HashMap::new()),
            failures: std::sync::Mutex::new(HashMap::new()),
            applied: std::sync::Mutex::new(HashMap::new()),
            stores: std::sync::OnceLock::new(),
            namespaces: std::sync::Mutex::new(HashMap::new()),
            oldest: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn namespace(&self, namespace: &str) -> Arc<Namespace> {
        let mut all = self
            .namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(all.entry(namespace.to_owned()).or_default())
    }

    /// The namespace's snapshot, read through `client` when none is younger than `max_age`
    /// (one read at a time per namespace: concurrent reconciles wait for it and share it).
    ///
    /// # Errors
    ///
    /// The broker's, when `ListTopics`, `ListGroups` or `Metadata` fails.
    pub async fn snapshot(
        &self,
        namespace: &str,
        client: &weir_client::Client,
        max_age: Duration,
    ) -> Result<Arc<Snapshot>, weir_client::Error> {
        let ns = self.namespace(namespace);
        let mut snapshot = ns.snapshot.lock().await;
        if let Some(s) = snapshot.as_ref()
            && s.at.elapsed() < max_age
        {
            return Ok(Arc::clone(s));
        }
        let at = std::time::Instant::now();
        let topics: HashMap<String, weir_client::TopicInfo> = client
            .list_topics()
            .await?
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let groups: HashMap<String, weir_client::GroupInfo> = client
            .list_groups(None)
            .await?
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let metadata = Arc::new(client.metadata().await?);
        tracing::debug!(
            namespace,
            took_ms = at.elapsed().as_millis(),
            topics = topics.len(),
            groups = groups.len(),
            "snapshot read"
        );
        let s = Arc::new(Snapshot {
            at,
            topics,
            groups,
            metadata: Arc::clone(&metadata),
        });
        *snapshot = Some(Arc::clone(&s));
        drop(snapshot);
        {
            let mut newest = ns.metadata.lock().await;
            if newest.as_ref().is_none_or(|(t, _)| *t < at) {
                *newest = Some((at, metadata));
            }
        }
        ns.changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, t| *t >= at);
        Ok(s)
    }

    /// The cluster's metadata as read after `since` (a topic created or changed then is
    /// placed in it): the newest read when it is recent enough, else read through `client`,
    /// one read at a time per namespace, so reconciles that changed topics together share
    /// one read.
    ///
    /// # Errors
    ///
    /// The broker's, when `Metadata` fails.
    pub async fn metadata_since(
        &self,
        namespace: &str,
        client: &weir_client::Client,
        since: std::time::Instant,
    ) -> Result<Arc<weir_client::ClusterMetadata>, weir_client::Error> {
        let ns = self.namespace(namespace);
        let mut newest = ns.metadata.lock().await;
        if let Some((at, m)) = newest.as_ref()
            && *at >= since
        {
            return Ok(Arc::clone(m));
        }
        let at = std::time::Instant::now();
        let m = Arc::new(client.metadata().await?);
        *newest = Some((at, Arc::clone(&m)));
        Ok(m)
    }

    /// Records that `what` (`topic/NAME`, `group/NAME`) of `namespace` was created or
    /// changed through the cluster now: snapshots read before do not describe it.
    pub fn changed(&self, namespace: &str, what: &str) {
        self.namespace(namespace)
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(what.to_owned(), std::time::Instant::now());
    }

    /// Whether `snapshot` of `namespace` still describes `what` (`topic/NAME`,
    /// `group/NAME`): nothing changed it through the cluster since it was read.
    pub fn describes(&self, namespace: &str, snapshot: &Snapshot, what: &str) -> bool {
        self.namespace(namespace)
            .changed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(what)
            .is_none_or(|t| *t < snapshot.at)
    }

    /// The timestamp (ms) of the first record of `topic`/`partition` when its earliest
    /// offset is `earliest`, if it was read before at that offset.
    pub fn oldest(
        &self,
        namespace: &str,
        topic: &str,
        partition: u32,
        earliest: u64,
    ) -> Option<i64> {
        let oldest = self
            .oldest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        oldest
            .get(&(namespace.to_owned(), topic.to_owned(), partition))
            .filter(|(at, _)| *at == earliest)
            .map(|(_, ts)| *ts)
    }

    /// Records the timestamp (ms) of the first record of `topic`/`partition` at `earliest`.
    pub fn remember_oldest(
        &self,
        namespace: &str,
        topic: &str,
        partition: u32,
        earliest: u64,
        ts: i64,
    ) {
        let mut oldest = self
            .oldest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        oldest.insert(
            (namespace.to_owned(), topic.to_owned(), partition),
            (earliest, ts),
        );
    }

    /// Reads Topics, ConsumerGroups and broker Pods from the controllers' caches from now on.
    pub fn use_stores(&self, stores: Stores) {
        let _ = self.stores.set(stores);
    }

    /// The controllers' caches once they are filled (each one's first list done); `None`
    /// before (the API is asked instead: a reconcile never waits for a watch).
    pub fn stores(&self) -> Option<&Stores> {
        use futures::FutureExt as _;
        let stores = self.stores.get()?;
        let filled = |ready: Option<Result<(), _>>| ready.is_some_and(|r| r.is_ok());
        let ready = filled(stores.topics.wait_until_ready().now_or_never())
            && filled(stores.groups.wait_until_ready().now_or_never())
            && filled(stores.pods.wait_until_ready().now_or_never());
        ready.then_some(stores)
    }

    /// The broker count last applied in `namespace` by this process, when that was less
    /// than [`REAPPLY_AFTER`] ago (else the StatefulSet is read again, and the objects
    /// applied again, so drift by hand is repaired).
    pub fn applied_replicas(&self, namespace: &str) -> Option<i32> {
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        applied
            .get(namespace)
            .filter(|a| a.at.elapsed() < REAPPLY_AFTER)
            .map(|a| a.replicas)
    }

    /// Whether `objects` (the broker objects of `namespace`, as JSON) differ from the last
    /// applied, or were applied longer than [`REAPPLY_AFTER`] ago.
    pub fn broker_objects_changed(&self, namespace: &str, objects: &[u8]) -> bool {
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        applied
            .get(namespace)
            .is_none_or(|a| a.objects != objects || a.at.elapsed() >= REAPPLY_AFTER)
    }

    /// Records `objects` (with `replicas` brokers) as applied in `namespace` (`None`:
    /// removed, or to be applied again).
    pub fn broker_objects_applied(&self, namespace: &str, objects: Option<(Vec<u8>, i32)>) {
        let mut applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match objects {
            Some((objects, replicas)) => {
                applied.insert(
                    namespace.to_owned(),
                    Applied {
                        objects,
                        replicas,
                        at: std::time::Instant::now(),
                    },
                );
            }
            None => {
                applied.remove(namespace);
            }
        }
    }

    /// Topic `name` of `namespace`: from the Topic watch's cache once the controllers run,
    /// else read from the API.
    pub async fn topic(&self, namespace: &str, name: &str) -> Result<Option<Arc<Topic>>, Error> {
        if let Some(stores) = self.stores() {
            return Ok(stores.topics.get(&ObjectRef::new(name).within(namespace)));
        }
        let api: Api<Topic> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(Arc::new))
    }

    /// The broker Pods of `namespace`, by name: from the Pod watch's cache once the
    /// controllers run, else listed from the API.
    pub async fn broker_pods(&self, namespace: &str) -> Result<HashMap<String, BrokerPod>, Error> {
        let list: Vec<Arc<Pod>> = if let Some(stores) = self.stores() {
            stores
                .pods
                .state()
                .into_iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
                .collect()
        } else {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            pods.list(&ListParams::default().labels(&builders::selector_string()))
                .await?
                .into_iter()
                .map(Arc::new)
                .collect()
        };
        Ok(list
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                let ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready");
                let is_ready = ready.is_some_and(|c| c.status == "True");
                let why = ready
                    .and_then(|c| c.message.clone())
                    .or(status.phase.clone())
                    .unwrap_or_else(|| "Pending".into());
                let name = p.name_any();
                (
                    name.clone(),
                    BrokerPod {
                        name,
                        address: status.pod_ip.map(|ip| format!("{ip}:{GRPC_PORT}")),
                        ready: is_ready,
                        why,
                    },
                )
            })
            .collect())
    }

    /// An admin/consumer client of the broker at `address` (`host:port`), connected once and
    /// reused; a connection that fails is dropped so the next call reconnects. Every call
    /// goes to that broker, which forwards what others serve
    /// ([`weir_client::Client::without_routing`]): the operator reaches brokers by Pod IP,
    /// and the few calls of a status pass are not worth a connection per broker.
    pub async fn broker(&self, name: &str, address: &str) -> Result<weir_client::Client, Error> {
        if let Some(c) = self.conns.lock().await.get(address) {
            return Ok(c.clone());
        }
        let url = format!("http://{address}");
        let client =
            tokio::time::timeout(Duration::from_secs(5), weir_client::Client::connect(&url))
                .await
                .map_err(|_| {
                    Error::Waiting(format!(
                        "broker {name} at {address} did not answer within 5s"
                    ))
                })?
                .map_err(|source| Error::Broker {
                    broker: name.to_owned(),
                    source,
                })?
                .without_routing();
        self.conns
            .lock()
            .await
            .insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// A client of the brokers of `namespace` through one address: the first Ready broker
    /// Pod (by name) of the `weir` Service's selector that answers, as a client in the
    /// cluster reaches one endpoint of the Service. Any broker serves any call (the cluster
    /// forwards), so which one does not matter. Returns the Pod's name with the client.
    ///
    /// # Errors
    ///
    /// [`Error::Waiting`] when no broker Pod is Ready or none answers.
    pub async fn cluster(&self, namespace: &str) -> Result<(String, weir_client::Client), Error> {
        let pods = self.broker_pods(namespace).await?;
        let mut ready: Vec<&BrokerPod> = pods.values().filter(|p| p.ready).collect();
        ready.sort_by(|a, b| a.name.cmp(&b.name));
        let mut tried = Vec::new();
        for pod in ready {
            let Some(address) = &pod.address else {
                continue;
            };
            match self.broker(&pod.name, address).await {
                Ok(client) => return Ok((pod.name.clone(), client)),
                Err(e) => tried.push(format!("{} ({e})", pod.name)),
            }
        }
        Err(Error::Waiting(if tried.is_empty() {
            let mut why: Vec<String> = pods
                .values()
                .map(|p| format!("{} ({})", p.name, p.why))
                .collect();
            why.sort();
            if why.is_empty() {
                "no broker Pod yet".to_owned()
            } else {
                format!("no broker is Ready: {}", why.join(", "))
            }
        } else {
            format!("no broker answered: {}", tried.join(", "))
        }))
    }

    /// Forgets the connection to `address` (after an error on it).
    pub async fn forget(&self, address: &str) {
        self.conns.lock().await.remove(address);
    }

    /// Publishes an Event about `obj` (best effort: a failure is logged, never fatal).
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }

    /// The action after a failed reconcile of `key`: requeue with exponential backoff,
    /// 1 s doubling to 5 min (controller-runtime's default rate limiter shape).
    pub fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Action {
        let secs = {
            let mut f = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = f.entry(key(obj)).or_insert(0);
            *n = (*n + 1).min(20);
            (1u64 << (*n - 1).min(9)).min(300)
        };
        self.requeue(obj, Duration::from_secs(secs))
    }

    /// Reconcile `obj` again after `after` (counted in the queue metrics once due).
    pub fn requeue<K: Resource<DynamicType = ()>>(&self, obj: &K, after: Duration) -> Action {
        self.metrics.requeued(&K::kind(&()), key(obj), after);
        Action::requeue(after)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

/// The reconciler's own error out of kube's finalizer helper as is; the helper's own
/// failures (adding or removing the finalizer) wrapped.
pub fn finalizer_error(e: kube::runtime::finalizer::Error<Error>) -> Error {
    match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    }
}

/// After a failed reconcile of `obj` (a `kind`): count it, log it, back off.
pub fn on_error<K: Resource<DynamicType = ()>>(
    kind: &str,
    obj: &K,
    error: &Error,
    ctx: &Context,
) -> Action {
    ctx.metrics.failed(kind, error.kind());
    tracing::warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), error = %error, "reconcile failed; retrying");
    ctx.backoff(obj)
}

/// The key of an object for backoff bookkeeping.
pub fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    ObjectRef::from_obj(obj).to_string()
}

/// Writes `status` to the status subresource of `obj` with server-side apply, unless
/// `previous` (the status `obj` was read with) equals it: a status that did not change is
/// not written, so idle objects keep their resourceVersion and wake no watcher.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    obj: &K,
    previous: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if previous == Some(status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// A `Ready` condition for `generation`; keeps `lastTransitionTime` of `previous` when the
/// status did not change (Kubernetes API conventions: the time the condition last changed
/// status).
pub fn ready_condition(
    previous: &[Condition],
    ready: bool,
    reason: &str,
    message: String,
    generation: i64,
) -> Condition {
    condition(previous, "Ready", ready, reason, message, generation)
}

/// Condition `type_` (`True` when `holds`), keeping the previous transition time while its
/// status stays the same (Kubernetes API conventions).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    holds: bool,
    reason: &str,
    message: String,
    generation: i64,
) -> Condition {
    let status = if holds { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| Timestamp::now().to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Seconds from `ms` to `now_ms` (both ms since the epoch); 0 when `ms` is later.
pub fn age_seconds(ms: i64, now_ms: i64) -> u64 {
    u64::try_from(now_ms.saturating_sub(ms) / 1000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_keeps_its_transition_time_until_the_status_changes() {
        let first = ready_condition(&[], false, "BrokersNotReady", "waiting".into(), 1);
        assert_eq!(first.status, "False");
        let mut old = first.clone();
        old.last_transition_time = "2026-01-01T00:00:00Z".into();
        let same = ready_condition(&[old.clone()], false, "BrokersNotReady", "still".into(), 2);
        assert_eq!(same.last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(same.observed_generation, 2);
        let flipped = ready_condition(&[old], true, "TopicReady", "ok".into(), 2);
        assert_ne!(flipped.last_transition_time, "2026-01-01T00:00:00Z");
    }

    #[test]
    fn ages_are_whole_seconds_and_never_negative() {
        assert_eq!(age_seconds(1_000, 62_500), 61);
        assert_eq!(age_seconds(5_000, 1_000), 0);
    }
}
