//! The Topic reconciler: brokers of the namespace sized and applied, partitions placed,
//! the topic created or updated on each broker that serves some of them, status written;
//! on deletion, data removed per `deletionPolicy` before the finalizer is released.

use std::{sync::Arc, time::Instant};

use k8s_openapi::{
    api::{apps::v1::StatefulSet, core::v1::Service, policy::v1::PodDisruptionBudget},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
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
    crd::{DeletionPolicy, PartitionPlacement, Topic, TopicStatus},
};

/// Finalizer on every Topic: its data is handled per `deletionPolicy` before it goes.
pub const FINALIZER: &str = "weir.dev/topic-data";

/// Reconciles one Topic (the controller's entry point).
pub async fn reconcile(topic: Arc<Topic>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
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

/// The live Topics of `ns` (not being deleted), sorted by name.
async fn live_topics(ctx: &Context, ns: &str) -> Result<Vec<Topic>, Error> {
    let api: Api<Topic> = Api::namespaced(ctx.client.clone(), ns);
    let mut topics: Vec<Topic> = api
        .list(&kube::api::ListParams::default())
        .await?
        .into_iter()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
        .collect();
    topics.sort_by_key(ResourceExt::name_any);
    Ok(topics)
}

/// Applies the namespace's broker objects, sized for `topics` and owned by them (several
/// non-controller owner references: the objects go with the last Topic, and while Topics
/// exist none of them alone takes the brokers away). Returns the broker count.
async fn apply_brokers(ctx: &Context, ns: &str, topics: &[Topic]) -> Result<i32, Error> {
    let placed: Vec<(u32, &[PartitionPlacement])> = topics
        .iter()
        .map(|t| {
            (
                t.spec.partitions,
                t.status.as_ref().map_or(&[][..], |s| &s.placement[..]),
            )
        })
        .collect();
    let replicas =
        builders::broker_count(&placed, ctx.settings.min_brokers, ctx.settings.max_brokers);
    let owners: Vec<OwnerReference> = topics
        .iter()
        .filter_map(|t| {
            let mut r = t.controller_owner_ref(&())?;
            r.controller = None;
            r.block_owner_deletion = None;
            Some(r)
        })
        .collect();
    let settings = BrokerSettings {
        replicas,
        ..ctx.settings.brokers.clone()
    };
    let mut sts = builders::statefulset(ns, &settings);
    sts.metadata.owner_references = Some(owners.clone());
    server_side_apply(
        &Api::<StatefulSet>::namespaced(ctx.client.clone(), ns),
        &sts,
    )
    .await?;
    for mut svc in [builders::headless_service(ns), builders::client_service(ns)] {
        svc.metadata.owner_references = Some(owners.clone());
        server_side_apply(&Api::<Service>::namespaced(ctx.client.clone(), ns), &svc).await?;
    }
    let mut pdb = builders::pod_disruption_budget(ns);
    pdb.metadata.owner_references = Some(owners);
    server_side_apply(
        &Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), ns),
        &pdb,
    )
    .await?;
    Ok(replicas)
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

/// What one pass over the brokers found.
#[derive(Default)]
struct Observed {
    waiting: Vec<String>,
    messages: u64,
    bytes: u64,
    oldest_ms: Option<i64>,
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
            apply_status(&api, topic, &status).await?;
            ctx.event(topic, true, "InvalidSpec", "Validate", e.to_string())
                .await;
            return Ok(Action::await_change());
        }
    };

    let topics = live_topics(ctx, &ns).await?;
    let replicas = apply_brokers(ctx, &ns, &topics).await?;
    let names: Vec<String> = (0..replicas).map(builders::broker_name).collect();
    let mut placement = builders::place(topic.spec.partitions, &names, &previous.placement);
    let pods = ctx.broker_pods(&ns).await?;
    for p in &mut placement {
        if let Some(addr) = pods
            .get(&p.broker)
            .filter(|b| b.ready)
            .and_then(|b| b.address.clone())
        {
            p.address = addr;
        } else if let Some(old) = previous
            .placement
            .iter()
            .find(|o| o.partition == p.partition && o.broker == p.broker)
        {
            p.address.clone_from(&old.address);
        }
    }

    let mut seen = Observed::default();
    for (broker, _, served) in builders::brokers_of(&placement) {
        let Some(pod) = pods.get(&broker).filter(|b| b.ready) else {
            let why = pods
                .get(&broker)
                .map_or_else(|| "not created yet".to_owned(), |b| b.why.clone());
            seen.waiting.push(format!("{broker} ({why})"));
            continue;
        };
        let Some(address) = pod.address.clone() else {
            seen.waiting.push(format!("{broker} (no Pod IP yet)"));
            continue;
        };
        let want = convert::broker_share(&config, &served);
        match ensure_on_broker(ctx, topic, &name, &broker, &address, &want, &mut seen).await {
            Ok(()) => {}
            Err(e) => {
                ctx.forget(&address).await;
                seen.waiting.push(format!("{broker} ({e})"));
            }
        }
    }

    let brokers = builders::brokers_of(&placement).len();
    let (ready, reason, message) = if seen.waiting.is_empty() {
        (
            true,
            "TopicReady",
            format!("{} partitions on {brokers} brokers", topic.spec.partitions),
        )
    } else {
        (
            false,
            "BrokersNotReady",
            format!("waiting for brokers: {}", seen.waiting.join(", ")),
        )
    };
    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let status = TopicStatus {
        conditions: vec![ready_condition(
            &previous.conditions,
            ready,
            reason,
            message,
            generation,
        )],
        observed_generation: generation,
        placement,
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
    apply_status(&api, topic, &status).await?;
    ctx.succeeded(&context::key(topic));
    Ok(if ready {
        Action::requeue(ctx.settings.status_interval)
    } else {
        Action::requeue(std::time::Duration::from_secs(2))
    })
}

/// Creates or updates the topic on one broker and adds its live figures to `seen`.
async fn ensure_on_broker(
    ctx: &Context,
    topic: &Topic,
    name: &str,
    broker: &str,
    address: &str,
    want: &pb::TopicConfig,
    seen: &mut Observed,
) -> Result<(), Error> {
    let client = ctx.broker(broker, address).await?;
    let err = |source| Error::Broker {
        broker: broker.to_owned(),
        source,
    };
    let want_config = weir_client::TopicConfig::from(want.clone());
    let desc = match client.describe_topic(name).await {
        Ok(d) => {
            if convert::topic_matches(&pb::TopicConfig::from(&d.config), want) {
                d
            } else {
                let d = client.update_topic(name, &want_config).await.map_err(err)?;
                ctx.event(
                    topic,
                    false,
                    "TopicUpdated",
                    "Update",
                    format!(
                        "updated on {broker}: partitions {:?} of {}",
                        want.served_partitions, want.partitions
                    ),
                )
                .await;
                d
            }
        }
        Err(e) if e.code() == Some(Code::NotFound) => {
            let d = client.create_topic(name, &want_config).await.map_err(err)?;
            ctx.event(
                topic,
                false,
                "TopicCreated",
                "Create",
                format!(
                    "created on {broker}: partitions {:?} of {}",
                    want.served_partitions, want.partitions
                ),
            )
            .await;
            d
        }
        Err(e) => return Err(err(e)),
    };
    seen.messages += desc.messages;
    seen.bytes += desc.bytes;
    for p in desc.partitions.iter().filter(|p| p.messages > 0) {
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
            seen.oldest_ms = Some(seen.oldest_ms.map_or(ts, |o| o.min(ts)));
        }
    }
    Ok(())
}

/// Deletion: with `Delete`, the topic goes from every broker that has it (a broker that
/// cannot be reached keeps the finalizer until it can); with `Retain` nothing is touched.
/// Then the brokers are resized for the remaining Topics.
async fn cleanup(topic: &Topic, ctx: &Context) -> Result<Action, Error> {
    let ns = topic.namespace().unwrap_or_default();
    let name = topic.name_any();
    let placement = topic
        .status
        .as_ref()
        .map(|s| s.placement.clone())
        .unwrap_or_default();
    if topic.spec.deletion_policy == DeletionPolicy::Delete {
        let pods = ctx.broker_pods(&ns).await?;
        for (broker, _, _) in &builders::brokers_of(&placement) {
            let Some(address) = pods
                .get(broker)
                .filter(|b| b.ready)
                .and_then(|b| b.address.clone())
            else {
                if pods.contains_key(broker) {
                    return Err(Error::Waiting(format!(
                        "topic {name}: broker {broker} is not Ready; its data is deleted once it is"
                    )));
                }
                // The broker Pod is gone (scaled away or never created): nothing to reach.
                continue;
            };
            let client = ctx.broker(broker, &address).await?;
            match client.delete_topic(&name).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NotFound) => {}
                Err(source) => {
                    ctx.forget(&address).await;
                    return Err(Error::Broker {
                        broker: broker.clone(),
                        source,
                    });
                }
            }
        }
        ctx.event(
            topic,
            false,
            "DataDeleted",
            "Delete",
            format!("deleted topic {name} from its brokers (deletionPolicy Delete)"),
        )
        .await;
    } else {
        ctx.event(
            topic,
            false,
            "DataRetained",
            "Delete",
            format!("kept the records of topic {name} on its brokers (deletionPolicy Retain)"),
        )
        .await;
    }
    let topics = live_topics(ctx, &ns).await?;
    apply_brokers(ctx, &ns, &topics).await?;
    ctx.succeeded(&context::key(topic));
    Ok(Action::await_change())
}
