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
/// per request (Kafka's sticky partitioner). Records on the same partition keep their order.
///
/// Nothing is written when any check fails: an empty request, an unknown topic or
/// partition, or a record above the topic's `max_message_bytes` fail the whole request.
/// Appends to several partitions are durable independently: when one fails after another
/// succeeded, the error is returned and the successful part stays stored.
pub async fn submit(
    log: &Log,
    topic: &str,
    partition: Option<u32>,
    records: Vec<Record>,
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
        let unkeyed = topic.next_unkeyed.fetch_add(1, Ordering::Relaxed) % count.max(1);
        for r in records {
            let p = match &r.key {
                Some(k) => partitioner::partition_for_key(k, count),
                None => unkeyed,
            };
            push(&mut routed, p, r);
        }
    }
    routed.sort_by_key(|(p, _)| *p);
    let now = log::now_ms();
    let mut tickets = Vec::with_capacity(routed.len());
    for (p, recs) in routed {
        let part = partitions
            .get(p as usize)
            .map(Arc::clone)
            .ok_or_else(|| Error::InvalidArgument(format!("partition {p} does not exist")))?;
        let n = recs.len() as u32;
        let ticket = log
            .submit_append(part, batch::encode(&recs, now), n)
            .await?;
        tickets.push((p, n, ticket));
    }
    Ok(Pending { tickets })
}

/// A produce request whose batches are queued for the writer, in order.
#[derive(Debug)]
pub struct Pending {
    tickets: Vec<(u32, u32, AppendTicket)>,
}

impl Pending {
    /// Waits until every batch of the request is durable; returns the acks in ascending
    /// partition order.
    pub async fn wait(self) -> Result<Vec<Ack>, Error> {
        let mut acks = Vec::with_capacity(self.tickets.len());
        for (partition, record_count, ticket) in self.tickets {
            acks.push(Ack {
                partition,
                base_offset: ticket.wait().await?,
                record_count,
            });
        }
        Ok(acks)
    }
}

/// [`submit`] then [`Pending::wait`]: appends and returns the acks once durable.
pub async fn produce(
    log: &Log,
    topic: &str,
    partition: Option<u32>,
    records: Vec<Record>,
) -> Result<Vec<Ack>, Error> {
    submit(log, topic, partition, records).await?.wait().await
}
