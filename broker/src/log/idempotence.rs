//! Idempotent producers: a request with `(producer id, sequence)` is stored once, however
//! often it is retried, and a retry is answered with the original acks.
//!
//! Kafka's rule (KIP-98, `ProducerStateManager`), per producer and partition: the next
//! sequence is accepted, a remembered one is a retry, anything else is refused. An
//! idempotent request therefore lands on one partition (the produce path refuses one that
//! would span several). The state lives with the partition, at its leader, and is written in
//! the same atomic batch as the records it describes (key [`super::keys::producer_key`]), so
//! it survives restarts exactly as the records do; a request forwarded to the leader keeps
//! its guarantee, since the leader holds the state.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::Ack;

/// Requests per producer and partition whose acks are remembered to answer retries (Kafka
/// keeps 5 batches per partition; a client here may keep more in flight on a stream).
pub const PRODUCER_WINDOW: usize = 64;

/// Producer id and sequence of an idempotent request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idempotence {
    /// The producer's id (non-zero).
    pub producer_id: u64,
    /// The request's sequence on its partition, from 0.
    pub sequence: u64,
}

/// A sequence that does not follow the producer's last one. Nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SequenceError {
    /// A producer new to the partition must start at 0.
    #[error(
        "producer {producer_id} is new to {topic}/{partition}: its first sequence must be 0, got {got}"
    )]
    FirstNotZero {
        /// Producer id.
        producer_id: u64,
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Sequence sent.
        got: u64,
    },
    /// Sequences were skipped: requests were lost between the producer and the broker.
    #[error(
        "out-of-order sequence for producer {producer_id} on {topic}/{partition}: expected {expected}, got {got} (requests {expected}..{got} are missing)"
    )]
    Gap {
        /// Producer id.
        producer_id: u64,
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// The next sequence.
        expected: u64,
        /// Sequence sent.
        got: u64,
    },
    /// A retry older than the remembered window.
    #[error(
        "sequence {got} of producer {producer_id} on {topic}/{partition} is older than the last {PRODUCER_WINDOW} remembered (latest {last}); it cannot be answered"
    )]
    Forgotten {
        /// Producer id.
        producer_id: u64,
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Sequence sent.
        got: u64,
        /// Highest sequence stored.
        last: u64,
    },
}

/// Deduplication state of one producer on one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProducerState {
    /// Highest sequence appended.
    pub last: Option<u64>,
    /// Acks of the last requests, oldest first.
    pub recent: VecDeque<(u64, Vec<Ack>)>,
}

/// What to do with an idempotent request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SequenceCheck {
    /// The next sequence: append it.
    New,
    /// A retry of a stored request: answer with its acks, store nothing.
    Duplicate(Vec<Ack>),
}

impl ProducerState {
    /// Applies Kafka's rule to `idem` against this state (`None`: a producer new to the
    /// partition `topic`/`partition`).
    pub fn check(
        state: Option<&Self>,
        topic: &str,
        partition: u32,
        idem: Idempotence,
    ) -> Result<SequenceCheck, SequenceError> {
        let got = idem.sequence;
        let producer_id = idem.producer_id;
        match state.and_then(|s| s.last) {
            None if got == 0 => Ok(SequenceCheck::New),
            None => Err(SequenceError::FirstNotZero {
                producer_id,
                topic: topic.to_owned(),
                partition,
                got,
            }),
            Some(last) if got == last + 1 => Ok(SequenceCheck::New),
            Some(last) if got > last + 1 => Err(SequenceError::Gap {
                producer_id,
                topic: topic.to_owned(),
                partition,
                expected: last + 1,
                got,
            }),
            Some(last) => state
                .and_then(|s| s.recent.iter().find(|(q, _)| *q == got))
                .map(|(_, acks)| SequenceCheck::Duplicate(acks.clone()))
                .ok_or_else(|| SequenceError::Forgotten {
                    producer_id,
                    topic: topic.to_owned(),
                    partition,
                    got,
                    last,
                }),
        }
    }

    /// Records that `sequence` was appended with `acks`, forgetting the oldest beyond
    /// [`PRODUCER_WINDOW`].
    pub fn record(&mut self, sequence: u64, acks: Vec<Ack>) {
        self.last = Some(sequence);
        self.recent.push_back((sequence, acks));
        while self.recent.len() > PRODUCER_WINDOW {
            self.recent.pop_front();
        }
    }
}

/// `(topic id, partition, producer id)`: whose state a [`ProducerState`] is.
pub(crate) type ProducerKey = (u32, u32, u64);

/// Idempotent producers' state of every partition.
pub(crate) type Producers = HashMap<ProducerKey, ProducerState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn idem(sequence: u64) -> Idempotence {
        Idempotence {
            producer_id: 9,
            sequence,
        }
    }

    #[test]
    fn sequences_follow_kafkas_rule() {
        assert_eq!(
            ProducerState::check(None, "t", 0, idem(0)),
            Ok(SequenceCheck::New)
        );
        assert!(matches!(
            ProducerState::check(None, "t", 0, idem(1)),
            Err(SequenceError::FirstNotZero { got: 1, .. })
        ));
        let mut s = ProducerState::default();
        let ack = Ack {
            partition: 0,
            base_offset: 10,
            record_count: 2,
        };
        s.record(0, vec![ack]);
        assert_eq!(
            ProducerState::check(Some(&s), "t", 0, idem(0)),
            Ok(SequenceCheck::Duplicate(vec![ack]))
        );
        assert_eq!(
            ProducerState::check(Some(&s), "t", 0, idem(1)),
            Ok(SequenceCheck::New)
        );
        let gap = ProducerState::check(Some(&s), "t", 0, idem(3)).expect_err("gap");
        assert!(gap.to_string().contains("expected 1, got 3"), "{gap}");
    }

    #[test]
    fn only_the_last_window_of_requests_is_remembered() {
        let mut s = ProducerState::default();
        for q in 0..=PRODUCER_WINDOW as u64 {
            s.record(q, Vec::new());
        }
        assert_eq!(s.recent.len(), PRODUCER_WINDOW);
        assert!(matches!(
            ProducerState::check(Some(&s), "t", 0, idem(0)),
            Err(SequenceError::Forgotten { got: 0, .. })
        ));
        assert!(matches!(
            ProducerState::check(Some(&s), "t", 0, idem(1)),
            Ok(SequenceCheck::Duplicate(_))
        ));
    }

    /// State written by earlier versions (acks as `[partition, base, count]` arrays) still
    /// loads.
    #[test]
    fn stored_state_keeps_its_json_shape() {
        let stored = br#"{"last":3,"recent":[[3,[[1,40,2]]]]}"#;
        let s: ProducerState = serde_json::from_slice(stored).expect("parses");
        assert_eq!(s.last, Some(3));
        assert_eq!(
            s.recent[0].1,
            vec![Ack {
                partition: 1,
                base_offset: 40,
                record_count: 2
            }]
        );
        assert_eq!(
            serde_json::to_vec(&s).expect("encodes"),
            stored.to_vec(),
            "written back in the same shape"
        );
    }
}
