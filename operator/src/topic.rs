//! The Topic reconciler: brokers of the namespace sized and applied, the topic created or
//! updated through the cluster (any Ready broker; the cluster's controller places the
//! partitions), status written with each partition's leader and live figures; on deletion,
//! data removed per `deletionPolicy` before the finalizer is released.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{PersistentVolumeClaim, Service},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use serde::Serialize;
use tonic::Code;
use weir_client::pb;

use crate::{
    builders::{self, BrokerSettings},
    context::{self, Context, Error, FIELD_MANAGER, apply_status, ready_condition},
    convert,
    crd::{Condition, DeletionPolicy, PartitionPlacement, Topic, TopicSpec, TopicStatus},
};

/// Finalizer on every Topic: its data is handled per `deletionPolicy` before it goes.
pub const FINALIZER: &str = "weir.dev/topic-data";

/// Reconciles one Topic (the controller's entry point).
pub async fn reconcile(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.started("Topic", context::key(topic.as_ref()));
    let ns = topic.namespace().unwrap_or_default();
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, topic, |event| async {
        match event {
            Finalizer::Apply(t) => apply(&t, &ctx).await,
            Finalizer::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(context::finalizer_error);
    ctx.metrics.reconciled("Topic", started.elapsed());
    result
}

/// What the controller does after a failed reconcile: count, log, back off.
#[allow(clippy::needless_pass_by_value)] // the signature kube's `Controller::run` takes
pub fn error_policy(topic: Arc<Topic>, error: &Error, ctx: Arc<Context>) -> Action {
    context::on_error("Topic", topic.as_ref(), error, &ctx)
}

/// How many brokers each live Topic of `ns` (not being deleted) spreads over: its
/// partitions (leaders spread one per broker) or its replication factor (each copy on its
/// own broker), whichever is more. From the Topic watch's cache (no API call, nothing
/// cloned), and from the API when the cache has none (the cache may lag, and no Topic means
/// the brokers go).
async fn live_partitions(ctx: &Context, ns: &str) -> Result<Vec<u32>, Error> {
    if let Some(stores) = ctx.stores() {
        let partitions: Vec<u32> = stores
            .topics
            .state()
            .iter()
            .filter(|t| {
                t.metadata.namespace.as_deref() == Some(ns)
                    && t.metadata.deletion_timestamp.is_none()
            })
            .map(|t| width(&t.spec))
            .collect();
        if !partitions.is_empty() {
            return Ok(partitions);
        }
    }
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .list(&kube::api::ListParams::default())
        .await?
        .into_iter()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .map(|t| width(&t.spec))
        .collect())
}

/// The brokers a Topic of `spec` spreads over (see [`live_partitions`]).
fn width(spec: &TopicSpec) -> u32 {
    spec.partitions.max(spec.replication_factor)
}

/// Applies the namespace's broker objects (StatefulSet, Services, PodDisruptionBudget),
/// sized for Topics of `partitions`. Returns the broker count.
///
/// The objects have no owner references (one per Topic made every object, and every
/// reconcile's apply, grow with the Topics): the operator deletes them when the namespace's
/// last Topic goes. They are applied only when they change (or after
/// [`context::REAPPLY_AFTER`], so drift by hand is repaired), never on every Topic's pass.
///
/// The count follows the widest Topic within the operator's bounds. While Topics exist it
/// shrinks one broker at a time ([`scale_down_step`]): the last broker first leaves the
/// cluster, which it may only once it holds no partition, then the StatefulSet shrinks and
/// the broker's volume claim is deleted (a broker that comes back under its ordinal starts
/// empty and joins as a new one).
async fn apply_brokers(ctx: &Context, ns: &str, partitions: &[u32]) -> Result<i32, Error> {
    let sts_api = Api::<StatefulSet>::namespaced(ctx.client.clone(), ns);
    if partitions.is_empty() {
        if sts_api.get_opt(builders::BROKERS).await?.is_some() {
            delete_brokers(ctx, ns).await?;
        }
        ctx.broker_objects_applied(ns, None);
        return Ok(0);
    }
    // What this process applied a moment ago, or else what the StatefulSet says.
    let known = ctx.applied_replicas(ns);
    let current = match known {
        Some(r) => r,
        None => sts_api
            .get_opt(builders::BROKERS)
            .await?
            .and_then(|s| s.spec.replicas)
            .unwrap_or(0),
    };
    let wanted = builders::broker_count(
        partitions,
        ctx.settings.min_brokers,
        ctx.settings.max_brokers,
    );
    let (replicas, removed) = if wanted >= current {
        (wanted, None)
    } else {
        match scale_down_step(ctx, ns, current).await {
            Some(gone) => (current - 1, Some(gone)),
            None => (current, None),
        }
    };
    let settings = BrokerSettings {
        replicas,
        ..ctx.settings.brokers.clone()
    };
    let sts = builders::statefulset(ns, &settings);
    let services = [builders::headless_service(ns), builders::client_service(ns)];
    let pdb = builders::pod_disruption_budget(ns);
    let objects = serde_json::to_vec(&(&sts, &services, &pdb))
        .map_err(|e| Error::Waiting(format!("encoding the broker objects of {ns}: {e}")))?;
    if known.is_none() || ctx.broker_objects_changed(ns, &objects) {
        server_side_apply(&sts_api, &sts).await?;
        for svc in &services {
            server_side_apply(&Api::<Service>::namespaced(ctx.client.clone(), ns), svc).await?;
        }
        server_side_apply(
            &Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), ns),
            &pdb,
        )
        .await?;
        ctx.broker_objects_applied(ns, Some((objects, replicas)));
        ctx.metrics.broker_objects_applied();
    }
    if let Some(gone) = removed {
        // The broker left the cluster holding nothing: its volume has nothing to keep, and a
        // broker that comes back under its ordinal must start empty (its old metadata log
        // says it was removed). The claim protection waits for the Pod to be gone.
        let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns);
        let name = builders::data_claim(gone);
        if delete_if_present(&claims, &name).await? {
            tracing::info!(namespace = ns, claim = %name, "volume claim of the removed broker deleted");
        }
    }
    Ok(replicas)
}

/// Deletes the namespace's broker objects (its last Topic went). Their volume claims stay,
/// as a StatefulSet's do: a `Retain` Topic's records are on them.
async fn delete_brokers(ctx: &Context, ns: &str) -> Result<(), Error> {
    delete_if_present(
        &Api::<StatefulSet>::namespaced(ctx.client.clone(), ns),
        builders::BROKERS,
    )
    .await?;
    for svc in [builders::headless_service(ns), builders::client_service(ns)] {
        let name = svc.metadata.name.unwrap_or_default();
        delete_if_present(&Api::<Service>::namespaced(ctx.client.clone(), ns), &name).await?;
    }
    delete_if_present(
        &Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), ns),
        builders::BROKERS,
    )
    .await?;
    tracing::info!(namespace = ns, "no Topic left: broker objects deleted");
    Ok(())
}

/// Deletes `name`; one that is gone already is fine. Returns whether it was there.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &kube::api::DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One step towards fewer brokers: the broker with the highest ordinal (`current - 1`, the
/// one a StatefulSet removes) leaves the cluster once it holds no partition, asked of the
/// cluster (which checks again when it applies the removal, so a topic placed there
/// meanwhile keeps it). Returns its ordinal once it is out of the cluster; `None` keeps the
/// count (it still holds partitions, which would be lost with it: moving them comes with
/// replication; or the cluster cannot be asked now).
async fn scale_down_step(ctx: &Context, ns: &str, current: i32) -> Option<i32> {
    let last = current - 1;
    let id = u64::try_from(last).ok()?;
    let (_, client) = ctx.cluster(ns).await.ok()?;
    let metadata = client.metadata().await.ok()?;
    let held = metadata
        .partitions
        .iter()
        .filter(|p| p.leader == id || p.replicas.contains(&id))
        .count();
    if held > 0 {
        tracing::debug!(
            namespace = ns,
            broker = id,
            partitions = held,
            "fewer brokers wanted, but the last one holds partitions: kept"
        );
        return None;
    }
    match client.remove_broker(id).await {
        Ok(()) => {
            tracing::info!(
                namespace = ns,
                broker = id,
                "broker removed from the cluster; the StatefulSet shrinks"
            );
            Some(last)
        }
        Err(e) if e.code() == Some(Code::NotFound) => Some(last),
        Err(e) => {
            tracing::warn!(namespace = ns, broker = id, error = %e, "removing the broker from the cluster failed; retried at the next reconcile");
            None
        }
    }
}

async fn server_side_apply<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource + Serialize + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        obj.meta().name.as_deref().unwrap_or_default(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// What one pass through the cluster found.
#[derive(Default)]
struct Observed {
    messages: u64,
    bytes: u64,
    oldest_ms: Option<i64>,
    placement: Vec<PartitionPlacement>,
}

// One reconcile pass, read top to bottom: validate, place, sync brokers, write status.
#[allow(clippy::too_many_lines)]
async fn apply(topic: &Topic, ctx: &Context) -> Result<Action, Error> {
    let ns = topic.namespace().unwrap_or_default();
    let name = topic.name_any();
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = topic.metadata.generation.unwrap_or(0);
    let previous = topic.status.clone().unwrap_or_default();

    let config = match convert::topic_config(&topic.spec) {
        Ok(c) => c,
        Err(e) => {
            // A value the schema let through but the broker cannot take: say so and wait
            // for the spec to change (retrying cannot help).
            let status = TopicStatus {
                conditions: vec![ready_condition(
                    &previous.conditions,
                    false,
                    "InvalidSpec",
                    e.to_string(),
                    generation,
                )],
                observed_generation: generation,
                ..previous.clone()
            };
            apply_status(&api, topic, topic.status.as_ref(), &status).await?;
            ctx.event(topic, true, "InvalidSpec", "Validate", e.to_string())
                .await;
            return Ok(Action::await_change());
        }
    };

    let partitions = live_partitions(ctx, &ns).await?;
    let brokers = apply_brokers(ctx, &ns, &partitions).await?;
    let (ready, reason, message, seen) =
        match sync_topic(ctx, topic, &ns, &name, &config, brokers).await {
            Ok(seen) => {
                let leaders: std::collections::BTreeSet<&str> =
                    seen.placement.iter().map(|p| p.broker.as_str()).collect();
                (
                    true,
                    "TopicReady",
                    format!(
                        "{} partitions, led by {} brokers",
                        topic.spec.partitions,
                        leaders.len()
                    ),
                    seen,
                )
            }
            Err(e) => (
                false,
                "BrokersNotReady",
                format!("waiting for the brokers: {e}"),
                Observed {
                    placement: previous.placement.clone(),
                    ..Observed::default()
                },
            ),
        };
    // Replicas on broker Pods that are not Ready (also while the topic is not Ready: the
    // last known placement).
    let pods = ctx.broker_pods(&ns).await?;
    let not_ready = not_ready(&pods, seen.placement.iter().flat_map(|p| &p.replicas));
    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let status = TopicStatus {
        conditions: vec![
            ready_condition(&previous.conditions, ready, reason, message, generation),
            under_replicated(
                &previous.conditions,
                &seen.placement,
                &not_ready,
                generation,
            ),
        ],
        observed_generation: generation,
        placement: seen.placement,
        messages: if ready {
            seen.messages
        } else {
            previous.messages
        },
        bytes: if ready { seen.bytes } else { previous.bytes },
        oldest_message_age_seconds: seen.oldest_ms.map(|ms| context::age_seconds(ms, now_ms)),
        settings: Some(convert::effective(&config)),
    };
    if previous
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
        != Some(if ready { "True" } else { "False" })
    {
        ctx.event(
            topic,
            !ready,
            reason,
            "Reconcile",
            status.conditions[0].message.clone(),
        )
        .await;
    }
    apply_status(&api, topic, topic.status.as_ref(), &status).await?;
    ctx.succeeded(&context::key(topic));
    Ok(if ready {
        // The interval grows with the namespace's Topics (10 ms each past 100): every
        // Topic's pass shares one snapshot read, but a status that changed is written by
        // itself.
        let per_topic = std::time::Duration::from_millis(10).saturating_mul(
            u32::try_from(partitions.len().saturating_sub(100)).unwrap_or(u32::MAX),
        );
        ctx.requeue(topic, ctx.settings.status_interval + per_topic)
    } else {
        ctx.requeue(topic, std::time::Duration::from_secs(2))
    })
}

/// Creates or updates the topic through the cluster (one address: any Ready broker
/// forwards to the controller) and reads its live figures and each partition's leader. A
/// new topic is created only once all `brokers` are Ready, so the controller spreads its
/// partitions over all of them (it places over the brokers it knows).
async fn sync_topic(
    ctx: &Context,
    topic: &Topic,
    ns: &str,
    name: &str,
    want: &pb::TopicConfig,
    brokers: i32,
) -> Result<Observed, Error> {
    let (broker, client) = ctx.cluster(ns).await?;
    let pods = ctx.broker_pods(ns).await?;
    let ready = pods.values().filter(|p| p.ready).count();
    let may_create = ready >= usize::try_from(brokers).unwrap_or(usize::MAX);
    let result = sync_topic_with(ctx, topic, (ns, name), want, &client, may_create).await;
    if let Err(Error::Broker { .. }) = &result
        && let Some(address) = pods.get(&broker).and_then(|p| p.address.clone())
    {
        ctx.forget(&address).await;
    }
    let seen = result.map_err(|e| match e {
        Error::Broker { source, .. } => Error::Broker { broker, source },
        other => other,
    })?;
    // A partition whose leader is not Ready is unavailable: the topic is not Ready either.
    let down: Vec<String> = not_ready(&pods, seen.placement.iter().map(|p| &p.broker))
        .into_iter()
        .map(|(b, why)| format!("{b} ({why})"))
        .collect();
    if !down.is_empty() {
        return Err(Error::Waiting(format!(
            "partition leaders not Ready: {}",
            down.join(", ")
        )));
    }
    Ok(seen)
}

/// The topic's figures and placement from the namespace's snapshot (one `ListTopics` and
/// one `Metadata` per half status interval for all Topics, [`Context::snapshot`]); the topic
/// is created or updated, and asked for by itself, only when the snapshot lacks it or its
/// settings differ. The first record's timestamp of a partition is fetched only when its
/// earliest offset moved.
async fn sync_topic_with(
    ctx: &Context,
    topic: &Topic,
    (ns, name): (&str, &str),
    want: &pb::TopicConfig,
    client: &weir_client::Client,
    may_create: bool,
) -> Result<Observed, Error> {
    let err = |source| Error::Broker {
        broker: String::new(),
        source,
    };
    let want_config = weir_client::TopicConfig::from(want.clone());
    let snap = ctx
        .snapshot(ns, client, ctx.settings.status_interval / 2)
        .await
        .map_err(err)?;
    let what = format!("topic/{name}");
    let known = match snap.topics.get(name) {
        Some(d) if ctx.describes(ns, &snap, &what) => Ok(d.clone()),
        // Not in the snapshot (created since, or not yet), or changed since it was read.
        _ => client.describe_topic(name).await,
    };
    let mut changed = true;
    let desc = match known {
        Ok(d) if convert::topic_matches(&pb::TopicConfig::from(&d.config), want) => {
            changed = false;
            d
        }
        Ok(_) => {
            let d = client.update_topic(name, &want_config).await.map_err(err)?;
            ctx.event(
                topic,
                false,
                "TopicUpdated",
                "Update",
                format!("updated: {} partitions", want.partitions),
            )
            .await;
            d
        }
        Err(e) if e.code() == Some(Code::NotFound) => {
            if !may_create {
                return Err(Error::Waiting(
                    "not every broker is Ready yet; the topic is created once they are, so its partitions spread over all of them".into(),
                ));
            }
            let d = client.create_topic(name, &want_config).await.map_err(err)?;
            ctx.event(
                topic,
                false,
                "TopicCreated",
                "Create",
                format!("created: {} partitions", want.partitions),
            )
            .await;
            d
        }
        Err(e) => return Err(err(e)),
    };
    // Reads of the metadata that begin from now on see the topic as it is now.
    let settled = Instant::now();
    if changed {
        ctx.changed(ns, &what);
    }
    let mut seen = Observed {
        messages: desc.messages,
        bytes: desc.bytes,
        ..Observed::default()
    };
    for p in desc.partitions.iter().filter(|p| p.messages > 0) {
        if let Some(ts) = ctx.oldest(ns, name, p.partition, p.earliest_offset) {
            seen.oldest_ms = Some(seen.oldest_ms.map_or(ts, |o| o.min(ts)));
            continue;
        }
        // The oldest record of a partition is its first stored one.
        let first = weir_client::FetchOptions {
            max_records: Some(1),
            ..weir_client::FetchOptions::default()
        };
        if let Ok(f) = client
            .fetch(name, p.partition, p.earliest_offset, first)
            .await
            && let Some(ts) = f.records.first().map(|r| {
                r.record
                    .timestamp
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            })
        {
            ctx.remember_oldest(ns, name, p.partition, p.earliest_offset, ts);
            seen.oldest_ms = Some(seen.oldest_ms.map_or(ts, |o| o.min(ts)));
        }
    }
    let mut placement = placement_of(&snap.metadata, name);
    if changed || placement.len() != want.partitions as usize {
        // Placed a moment ago: the snapshot's metadata does not have it yet. Topics
        // created together share one read.
        let metadata = ctx.metadata_since(ns, client, settled).await.map_err(err)?;
        placement = placement_of(&metadata, name);
    }
    seen.placement = placement;
    Ok(seen)
}

/// Which of `brokers` (Pod names) are not Ready, with why ("no Pod" for one that does not
/// exist), sorted and once each.
fn not_ready<'a>(
    pods: &std::collections::HashMap<String, context::BrokerPod>,
    brokers: impl Iterator<Item = &'a String>,
) -> BTreeMap<String, String> {
    brokers
        .filter(|b| !pods.get(*b).is_some_and(|p| p.ready))
        .map(|b| {
            let why = pods.get(b).map_or("no Pod", |p| p.why.as_str());
            (b.clone(), why.to_owned())
        })
        .collect()
}

/// The broker Pod of broker id `id` (its ordinal).
fn pod_of(id: u64) -> String {
    builders::broker_name(i32::try_from(id).unwrap_or(i32::MAX))
}

/// The `UnderReplicated` condition of a topic placed as `placement`: `True` naming the
/// partitions with fewer replicas in sync than replicas and the Pods they wait for,
/// `Unknown` before the partitions are placed. A
/// replica on a broker Pod that is not Ready (`not_ready`, with why) counts as out of sync
/// at once: its leader notices only after `--replica-lag-max`.
fn under_replicated(
    previous: &[Condition],
    placement: &[PartitionPlacement],
    not_ready: &BTreeMap<String, String>,
    generation: i64,
) -> Condition {
    if placement.is_empty() {
        // Nothing placed yet: neither in sync nor behind.
        let mut c = context::condition(
            previous,
            "UnderReplicated",
            false,
            "NotPlacedYet",
            "the topic's partitions are not placed on brokers yet".into(),
            generation,
        );
        c.status = "Unknown".into();
        if let Some(p) = previous
            .iter()
            .find(|p| p.type_ == "UnderReplicated" && p.status == "Unknown")
        {
            c.last_transition_time.clone_from(&p.last_transition_time);
        }
        return c;
    }
    let lagging: Vec<String> = placement
        .iter()
        .filter_map(|p| {
            let out: Vec<String> = p
                .replicas
                .iter()
                .filter(|r| !p.in_sync.contains(r) || not_ready.contains_key(*r))
                .map(|r| match not_ready.get(r) {
                    Some(why) => format!("{r} (not Ready: {why})"),
                    None => r.clone(),
                })
                .collect();
            (!out.is_empty())
                .then(|| format!("partition {} waits for {}", p.partition, out.join(", ")))
        })
        .collect();
    if lagging.is_empty() {
        context::condition(
            previous,
            "UnderReplicated",
            false,
            "AllReplicasInSync",
            "every partition has all its replicas in sync".into(),
            generation,
        )
    } else {
        context::condition(
            previous,
            "UnderReplicated",
            true,
            "ReplicasBehind",
            lagging.join("; "),
            generation,
        )
    }
}

/// Each partition's leader of topic `name` in `metadata`, by partition.
fn placement_of(metadata: &weir_client::ClusterMetadata, name: &str) -> Vec<PartitionPlacement> {
    let mut placement: Vec<PartitionPlacement> = metadata
        .partitions
        .iter()
        .filter(|p| p.topic == name)
        .map(|p| PartitionPlacement {
            partition: p.partition,
            broker: pod_of(p.leader),
            address: metadata
                .brokers
                .iter()
                .find(|b| b.id == p.leader)
                .map(|b| b.address.clone())
                .unwrap_or_default(),
            replicas: p.replicas.iter().copied().map(pod_of).collect(),
            in_sync: p.in_sync.iter().copied().map(pod_of).collect(),
        })
        .collect();
    placement.sort_by_key(|p| p.partition);
    placement
}

/// Deletion: with `Delete`, the topic is deleted through the cluster (while brokers run
/// but none is Ready, the finalizer stays until one is); with `Retain` nothing is touched.
/// Then the brokers are resized for the remaining Topics.
async fn cleanup(topic: &Topic, ctx: &Context) -> Result<Action, Error> {
    let ns = topic.namespace().unwrap_or_default();
    let name = topic.name_any();
    if topic.spec.deletion_policy == DeletionPolicy::Delete {
        if ctx.broker_pods(&ns).await?.is_empty() {
            // No broker Pod (scaled away or never created): nothing to reach.
        } else {
            let (broker, client) = ctx.cluster(&ns).await?;
            match client.delete_topic(&name).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NotFound) => {}
                Err(source) => return Err(Error::Broker { broker, source }),
            }
        }
        ctx.event(
            topic,
            false,
            "DataDeleted",
            "Delete",
            format!("deleted topic {name} from the brokers (deletionPolicy Delete)"),
        )
        .await;
    } else {
        ctx.event(
            topic,
            false,
            "DataRetained",
            "Delete",
            format!("kept the records of topic {name} on the brokers (deletionPolicy Retain)"),
        )
        .await;
    }
    let partitions = live_partitions(ctx, &ns).await?;
    apply_brokers(ctx, &ns, &partitions).await?;
    ctx.succeeded(&context::key(topic));
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(partition: u32, replicas: &[&str], in_sync: &[&str]) -> PartitionPlacement {
        PartitionPlacement {
            partition,
            broker: replicas[0].into(),
            address: String::new(),
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
            in_sync: in_sync.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// `UnderReplicated`: Unknown before placement, False with every replica in sync on a
    /// Ready Pod, True naming the partition and the Pods out of sync or not Ready.
    #[test]
    fn under_replicated_names_the_replicas_behind() {
        let none = BTreeMap::new();
        let unknown = under_replicated(&[], &[], &none, 1);
        assert_eq!(
            (unknown.status.as_str(), unknown.reason.as_str()),
            ("Unknown", "NotPlacedYet")
        );
        let all = ["weir-broker-0", "weir-broker-1", "weir-broker-2"];
        let fine = under_replicated(&[], &[placed(0, &all, &all)], &none, 1);
        assert_eq!(fine.status, "False");
        let behind = under_replicated(
            std::slice::from_ref(&fine),
            &[placed(0, &all, &all), placed(1, &all, &all[..2])],
            &none,
            2,
        );
        assert_eq!(behind.status, "True");
        assert_eq!(behind.message, "partition 1 waits for weir-broker-2");
        let down = BTreeMap::from([("weir-broker-1".to_owned(), "no Pod".to_owned())]);
        let not_ready = under_replicated(&[], &[placed(0, &all, &all)], &down, 2);
        assert_eq!(not_ready.status, "True");
        assert_eq!(
            not_ready.message,
            "partition 0 waits for weir-broker-1 (not Ready: no Pod)"
        );
        // A single replica in sync is not under-replicated.
        let one = under_replicated(&[], &[placed(0, &all[..1], &all[..1])], &none, 1);
        assert_eq!(one.status, "False");
    }
}
