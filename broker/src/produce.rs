//! The produce path above the log: validation, routing records to partitions, encoding
//! batches and appending them.
//!
//! This module owns the rules a produce request must follow; it knows nothing of gRPC.

use std::sync::{Arc, atomic::Ordering};

use crate::log::{self, AppendTicket, Error, Log, Record, batch, partitioner};

/// Where the records of one partition landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Partition index.
    pub partition: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records; they have offsets `base_offset..base_offset + record_count`.
    pub record_count: u32,
}

/// Validates and routes `records` of `topic` and queues one batch per partition for the
/// writer; [`Pending::wait`] returns one [`Ack`] per partition once all are durable.
/// Requests submitted one after another are committed in that order.
///
/// Routing: with `partition`, every record goes there; otherwise keyed records go to
/// `murmur2(key) mod partitions` and unkeyed ones to a single partition chosen round robin
/// per request (Kafka's sticky partitioner), among the partitions this broker serves.
/// Records on the same partition keep their order. A partition this broker does not serve
/// ([`Error::NotServed`]) fails the whole request.
///
/// The request is atomic: all its batches are stored or none. Nothing is written when any
/// check fails: an empty request, an unknown topic or partition, a record above the topic's
/// `max_message_bytes`, a full `Reject` topic, or (with `producer` = (id, sequence)) a
/// sequence out of order; a retried sequence is answered with its original acks.
pub async fn submit(
    log: &Log,
    topic: &str,
    partition: Option<u32>,
    records: Vec<Record>,
    producer: Option<(u64, u64)>,
) -> Result<Pending, Error> {
    if records.is_empty() {
        return Err(Error::InvalidArgument(
            "a produce request needs at least one record; this one has none".into(),
        ));
    }
    let topic = log.topic(topic)?;
    let config = topic.config();
    for (i, r) in records.iter().enumerate() {
        let size = r.size();
        if size > config.max_message_bytes as usize {
            return Err(Error::InvalidArgument(format!(
                "record {i} is {size} bytes (key + value + headers); topic {:?} accepts at most {} bytes per record (max_message_bytes)",
                topic.name, config.max_message_bytes
            )));
        }
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
        let unkeyed = config.served.round_robin(turn, count);
        for r in records {
            let p = match &r.key {
                Some(k) => partitioner::partition_for_key(k, count),
                None => unkeyed,
            };
            push(&mut routed, p, r);
        }
    }
    routed.sort_by_key(|(p, _)| *p);
    for (p, _) in &routed {
        // A key that hashes to a partition of another broker: the client routes keyed
        // records itself (Kafka clients do the same from the cluster metadata).
        config.served.check(&topic.name, *p)?;
    }
    let now = log::now_ms();
    let mut batches = Vec::with_capacity(routed.len());
    for (p, recs) in routed {
        let part = partitions
            .get(p as usize)
            .map(Arc::clone)
            .ok_or_else(|| Error::InvalidArgument(format!("partition {p} does not exist")))?;
        batches.push((part, batch::encode(&recs, now), recs.len() as u32));
    }
    let ticket = log.submit_append(topic, batches, producer).await?;
    Ok(Pending { ticket })
}

/// A produce request queued for the writer.
#[derive(Debug)]
pub struct Pending {
    ticket: AppendTicket,
}

impl Pending {
    /// Waits until the request is durable; returns the acks in ascending partition order.
    pub async fn wait(self) -> Result<Vec<Ack>, Error> {
        Ok(self
            .ticket
            .wait()
            .await?
            .into_iter()
            .map(|(partition, base_offset, record_count)| Ack {
                partition,
                base_offset,
                record_count,
            })
            .collect())
    }
}

/// [`submit`] then [`Pending::wait`]: appends and returns the acks once durable.
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
