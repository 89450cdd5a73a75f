//! The produce path above the log: validation, routing records to partitions, encoding
//! batches and appending them.
//!
//! This module owns the rules a produce request must follow; it knows nothing of gRPC.

use std::sync::{Arc, atomic::Ordering};

pub use crate::log::Ack;
use crate::log::{
    self, AppendTicket, Error, Log, PartBatch, Record, batch, idempotence::Idempotence, partitioner,
};

/// Validates and routes `records` of `topic` and queues one batch per partition for the
/// writer; [`AppendTicket::wait`] returns one [`Ack`] per partition once all are durable.
/// Requests submitted one after another are committed in that order.
///
/// Routing: with `partition`, every record goes there; otherwise keyed records go to
/// `murmur2(key) mod partitions` and unkeyed ones to a single partition chosen round robin
/// per request (Kafka's sticky partitioner), among the partitions this broker serves.
/// Records on the same partition keep their order. A partition this broker does not serve
/// ([`Error::NotServed`]) fails the whole request.
///
/// The request is atomic: all its batches are stored or none (on a replicated topic each
/// partition's batch commits in its own Raft group, as each partition's log is its own in
/// Kafka: a request spanning partitions may be stored in some only). Nothing is written when any
/// check fails: an empty request, an unknown topic or partition, a record above the topic's
/// `max_message_bytes`, a full `Reject` topic, or (with `producer` = (id, sequence)) a
/// request that would not land on exactly one partition (unkeyed records without
/// `partition`, or keys of several partitions: sequences count per partition) or a sequence
/// out of order; a retried sequence is answered with its original acks.
pub async fn submit(
    log: &Log,
    topic: &str,
    partition: Option<u32>,
    records: Vec<Record>,
    producer: Option<Idempotence>,
) -> Result<AppendTicket, Error> {
    if records.is_empty() {
        return Err(Error::EmptyProduce);
    }
    let topic = log.topic(topic)?;
    let config = topic.config();
    for (i, r) in records.iter().enumerate() {
        let size = r.size();
        if size > config.max_message_bytes as usize {
            return Err(Error::RecordTooLarge {
                index: i,
                size,
                topic: topic.name.clone(),
                max: config.max_message_bytes,
            });
        }
    }
    if producer.is_some() && partition.is_none() && records.iter().any(|r| r.key.is_none()) {
        return Err(Error::IdempotentWithoutPartition {
            topic: topic.name.clone(),
        });
    }
    let partitions = topic.partitions();
    let count = partitions.len() as u32;
    let mut routed: Vec<(u32, Vec<Record>)> = Vec::new();
    let push = |routed: &mut Vec<(u32, Vec<Record>)>, p: u32, r: Record| match routed
        .iter_mut()
        .find(|(q, _)| *q == p)
    {
        Some((_, v)) => v.push(r),
        None => routed.push((p, vec![r])),
    };
    if let Some(p) = partition {
        topic.partition(p)?;
        routed.push((p, records));
    } else {
        let turn = topic.next_unkeyed.fetch_add(1, Ordering::Relaxed);
        let mut unkeyed = config.served.round_robin(turn, count);
        if config.replication_factor > 1 {
            // Among the partitions whose group this broker leads (a follower refuses).
            let led: Vec<u32> = partitions
                .iter()
                .filter(|p| log.leads(p))
                .map(|p| p.index)
                .collect();
            if !led.is_empty() {
                unkeyed = led[turn as usize % led.len()];
            }
        }
        for r in records {
            let p = match &r.key {
                Some(k) => partitioner::partition_for_key(k, count),
                None => unkeyed,
            };
            push(&mut routed, p, r);
        }
    }
    routed.sort_by_key(|(p, _)| *p);
    if producer.is_some() && routed.len() > 1 {
        return Err(Error::IdempotentSpansPartitions {
            topic: topic.name.clone(),
            partitions: routed.iter().map(|(p, _)| *p).collect(),
        });
    }
    for (p, _) in &routed {
        // A key that hashes to a partition of another broker: the client routes keyed
        // records itself (Kafka clients do the same from the cluster metadata).
        config.served.check(&topic.name, *p)?;
    }
    let now = log::now_ms();
    let mut batches = Vec::with_capacity(routed.len());
    for (p, recs) in routed {
        let part =
            partitions
                .get(p as usize)
                .map(Arc::clone)
                .ok_or_else(|| Error::PartitionNotFound {
                    topic: topic.name.clone(),
                    partition: p,
                    partitions: count,
                })?;
        batches.push(PartBatch {
            partition: part,
            batch: batch::encode(&recs, now),
            records: recs.len() as u32,
        });
    }
    log.submit_append(topic, batches, producer).await
}

/// [`submit`] then [`AppendTicket::wait`]: appends and returns the acks once durable.
pub async fn produce(
    log: &Log,
    topic: &str,
    partition: Option<u32>,
    records: Vec<Record>,
) -> Result<Vec<Ack>, Error> {
    submit(log, topic, partition, records, None)
        .await?
        .wait()
        .await
}
