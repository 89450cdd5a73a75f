//! The ConsumerGroup reconciler: the group created or updated through the cluster (its
//! coordinator keeps it), a declared `resetTo` applied once, status filled with members,
//! lag and pending acks per partition as the coordinator sees them; on deletion the group
//! goes from the cluster.

use std::{sync::Arc, time::Instant};

use kube::{
    Api, ResourceExt,
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use tonic::Code;

use crate::{
    context::{self, Context, Error, apply_status, ready_condition},
    convert,
    crd::{AppliedReset, ConsumerGroup, ConsumerGroupStatus, GroupPartitionStatus},
};

/// Finalizer on every ConsumerGroup: the group is deleted from the brokers before it goes
/// (a forgotten group would hold back `WorkQueue` deletion forever).
pub const FINALIZER: &str = "weir.dev/group";

/// Reconciles one ConsumerGroup (the controller's entry point).
pub async fn reconcile(group: Arc<ConsumerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics
        .started("ConsumerGroup", context::key(group.as_ref()));
    let ns = group.namespace().unwrap_or_default();
    let api: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, group, |event| async {
        match event {
            Finalizer::Apply(g) => apply(&g, &ctx).await,
            Finalizer::Cleanup(g) => cleanup(&g, &ctx).await,
        }
    })
    .await
    .map_err(context::finalizer_error);
    ctx.metrics.reconciled("ConsumerGroup", started.elapsed());
    result
}

/// What the controller does after a failed reconcile: count, log, back off.
#[allow(clippy::needless_pass_by_value)] // the signature kube's `Controller::run` takes
pub fn error_policy(group: Arc<ConsumerGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    context::on_error("ConsumerGroup", group.as_ref(), error, &ctx)
}

async fn write_not_ready(
    api: &Api<ConsumerGroup>,
    group: &ConsumerGroup,
    previous: &ConsumerGroupStatus,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let generation = group.metadata.generation.unwrap_or(0);
    let status = ConsumerGroupStatus {
        conditions: vec![ready_condition(
            &previous.conditions,
            false,
            reason,
            message,
            generation,
        )],
        observed_generation: generation,
        ..previous.clone()
    };
    apply_status(api, group, group.status.as_ref(), &status).await
}

// One reconcile pass, read top to bottom: validate, place, sync brokers, write status.
#[allow(clippy::too_many_lines)]
async fn apply(group: &ConsumerGroup, ctx: &Context) -> Result<Action, Error> {
    let ns = group.namespace().unwrap_or_default();
    let name = group.name_any();
    let api: Api<ConsumerGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = group.metadata.generation.unwrap_or(0);
    let previous = group.status.clone().unwrap_or_default();
    let retry = std::time::Duration::from_secs(2);

    let config = match convert::group_config(&name, &group.spec) {
        Ok(c) => c,
        Err(e) => {
            write_not_ready(&api, group, &previous, "InvalidSpec", e.to_string()).await?;
            ctx.event(group, true, "InvalidSpec", "Validate", e.to_string())
                .await;
            return Ok(Action::await_change());
        }
    };
    let reset = match group
        .spec
        .reset_to
        .as_deref()
        .map(convert::reset_position)
        .transpose()
    {
        Ok(r) => r,
        Err(e) => {
            write_not_ready(&api, group, &previous, "InvalidSpec", e.to_string()).await?;
            return Ok(Action::await_change());
        }
    };
    let Some(topic) = ctx.topic(&ns, &group.spec.topic).await? else {
        write_not_ready(
            &api,
            group,
            &previous,
            "TopicNotFound",
            format!(
                "topic {} does not exist in namespace {ns}",
                group.spec.topic
            ),
        )
        .await?;
        return Ok(ctx.requeue(group, retry));
    };
    let tstatus = topic.status.clone().unwrap_or_default();
    let topic_ready = tstatus
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !topic_ready {
        write_not_ready(
            &api,
            group,
            &previous,
            "TopicNotReady",
            format!("topic {} is not Ready yet", group.spec.topic),
        )
        .await?;
        return Ok(ctx.requeue(group, retry));
    }

    let apply_reset = match (&group.spec.reset_to, &previous.last_reset) {
        (Some(to), Some(last)) => *to != last.to,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let mut status = ConsumerGroupStatus {
        observed_generation: generation,
        last_reset: previous.last_reset.clone(),
        ..ConsumerGroupStatus::default()
    };
    let mut waiting = Vec::new();
    let result = sync_group(
        ctx,
        group,
        &ns,
        &name,
        &config,
        apply_reset.then_some(reset).flatten(),
    )
    .await;
    match result {
        Ok(desc) => {
            // The coordinator sees the whole group: members, lag and acks cluster-wide.
            status.members = desc.members.len() as u32;
            status.pending = desc.pending;
            status.dead_lettered = desc.dead_lettered;
            status.lag = desc.lag;
            for p in &desc.partitions {
                let leader = tstatus
                    .placement
                    .iter()
                    .find(|x| x.partition == p.partition)
                    .map(|x| x.broker.clone())
                    .unwrap_or_default();
                status.partitions.push(GroupPartitionStatus {
                    partition: p.partition,
                    broker: leader,
                    committed_offset: p.committed_offset,
                    next_offset: p.next_offset,
                    lag: p.lag,
                    pending: p.pending,
                    owner: p.owner.clone().unwrap_or_default(),
                });
            }
        }
        Err(e) => waiting.push(e.to_string()),
    }
    status.partitions.sort_by_key(|p| p.partition);
    if waiting.is_empty()
        && apply_reset
        && let Some(to) = &group.spec.reset_to
    {
        status.last_reset = Some(AppliedReset {
            to: to.clone(),
            generation,
        });
        ctx.event(
            group,
            false,
            "GroupReset",
            "Reset",
            format!("moved to {to}"),
        )
        .await;
    }
    let ready = waiting.is_empty();
    let (reason, message) = if ready {
        ("GroupReady", format!("lag {}", status.lag))
    } else {
        (
            "BrokersNotReady",
            format!("waiting for the brokers: {}", waiting.join(", ")),
        )
    };
    status.conditions = vec![ready_condition(
        &previous.conditions,
        ready,
        reason,
        message,
        generation,
    )];
    if !ready {
        // Keep the last known figures rather than report a partial sum.
        status.members = previous.members;
        status.lag = previous.lag;
        status.pending = previous.pending;
        status.dead_lettered = previous.dead_lettered;
        status.partitions = previous.partitions.clone();
    }
    apply_status(&api, group, group.status.as_ref(), &status).await?;
    ctx.succeeded(&context::key(group));
    Ok(if ready {
        // The interval grows with the namespace's groups (10 ms each past 100), as the
        // Topics' does.
        let groups = match ctx.stores() {
            Some(s) => s
                .groups
                .state()
                .iter()
                .filter(|g| g.metadata.namespace.as_deref() == Some(ns.as_str()))
                .count(),
            None => 0,
        };
        let per_group = std::time::Duration::from_millis(10)
            .saturating_mul(u32::try_from(groups.saturating_sub(100)).unwrap_or(u32::MAX));
        ctx.requeue(group, ctx.settings.status_interval + per_group)
    } else {
        ctx.requeue(group, retry)
    })
}

/// Creates or updates the group through the cluster (any Ready broker forwards to the
/// group's coordinator), applies a pending reset, and describes it: from the namespace's
/// snapshot ([`Context::snapshot`], shared with every Topic and group) unless it is missing
/// there or its settings differ.
async fn sync_group(
    ctx: &Context,
    group: &ConsumerGroup,
    ns: &str,
    name: &str,
    config: &weir_client::pb::GroupConfig,
    reset: Option<weir_client::pb::StartPosition>,
) -> Result<weir_client::GroupInfo, Error> {
    let (broker, client) = ctx.cluster(ns).await?;
    let err = |source| Error::Broker {
        broker: broker.clone(),
        source,
    };
    let want = weir_client::GroupConfig::try_from(config.clone()).map_err(err)?;
    let snap = ctx
        .snapshot(ns, &client, ctx.settings.status_interval / 2)
        .await
        .map_err(err)?;
    let what = format!("group/{name}");
    // A snapshot read after the group's last change through this operator is the truth
    // about it, absence included: asking a broker about a group it does not know waits for
    // the group to appear (read-your-writes across brokers), up to a second.
    let current = ctx.describes(ns, &snap, &what);
    let known = match snap.groups.get(name) {
        Some(d) if current => Some(d.clone()),
        None if current => None,
        _ => match client.describe_group(name).await {
            Ok(d) => Some(d),
            Err(e) if e.code() == Some(Code::NotFound) => None,
            Err(e) => return Err(err(e)),
        },
    };
    let mut changed = true;
    let mut desc = match known {
        Some(d) if convert::group_matches(&(&d.config).into(), config) => {
            changed = false;
            d
        }
        Some(_) => client.update_group(name, &want).await.map_err(err)?,
        None => match client.create_group(name, &want).await {
            Ok(d) => {
                ctx.event(group, false, "GroupCreated", "Create", "created".into())
                    .await;
                d
            }
            // Created meanwhile (by another client) with other settings.
            Err(e) if e.code() == Some(Code::AlreadyExists) => {
                client.update_group(name, &want).await.map_err(err)?
            }
            Err(e) => return Err(err(e)),
        },
    };
    if let Some(to) = reset {
        desc = client
            .reset_group(name, Some(to).into())
            .await
            .map_err(err)?;
        changed = true;
    }
    if changed {
        ctx.changed(ns, &what);
    }
    Ok(desc)
}

/// Deletion: the group is deleted through the cluster; a Topic that is gone took its
/// groups with it, and without broker Pods there is nothing to reach.
async fn cleanup(group: &ConsumerGroup, ctx: &Context) -> Result<Action, Error> {
    let ns = group.namespace().unwrap_or_default();
    let name = group.name_any();
    if ctx.topic(&ns, &group.spec.topic).await?.is_none() || ctx.broker_pods(&ns).await?.is_empty()
    {
        return Ok(Action::await_change());
    }
    let (broker, client) = ctx.cluster(&ns).await?;
    match client.delete_group(&name).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(Code::NotFound) => {}
        Err(source) => return Err(Error::Broker { broker, source }),
    }
    Ok(Action::await_change())
}
