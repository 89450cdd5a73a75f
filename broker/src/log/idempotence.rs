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

use prost::encoding::{decode_varint, encode_varint};
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

    /// The stored form of `state` (`None`: a producer new to the partition) once
    /// `sequence` is recorded with `acks`, as [`Self::record`] would leave it, without
    /// changing or cloning it (the writer encodes a request's state before the request takes
    /// effect).
    pub fn encode_recorded(state: Option<&Self>, sequence: u64, acks: &[Ack]) -> Vec<u8> {
        let recent = state.map(|s| &s.recent);
        let kept = recent.map_or(0, |r| r.len().min(PRODUCER_WINDOW - 1));
        let skip = recent.map_or(0, |r| r.len() - kept);
        let entries = recent
            .into_iter()
            .flatten()
            .skip(skip)
            .map(|(q, a)| (*q, a.as_slice()))
            .chain(std::iter::once((sequence, acks)));
        encode_state(Some(sequence), kept + 1, entries)
    }

    /// The stored form of this state: [`STATE_FORMAT`], a byte 0 (no sequence yet) or 1
    /// followed by the last sequence, then LEB128 varints: the number of remembered requests, and per request, oldest first, its
    /// sequence minus the previous one's, its number of acks and per ack the partition, the
    /// base offset minus the previous ack's and the record count. About 6 bytes per request
    /// (the JSON form took about 25, and 4 KiB was no rarity for a full window).
    pub fn encode(&self) -> Vec<u8> {
        encode_state(
            self.last,
            self.recent.len(),
            self.recent.iter().map(|(q, a)| (*q, a.as_slice())),
        )
    }

    /// Reads a stored state: the form [`Self::encode`] writes, or the JSON of versions
    /// before it (it starts with `{`).
    ///
    /// # Errors
    ///
    /// What is wrong with the bytes (cut short, an unknown format, a value out of range,
    /// bytes left over), for the caller to name the key.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.first() {
            Some(b'{') => serde_json::from_slice(bytes).map_err(|e| format!("bad JSON: {e}")),
            Some(&STATE_FORMAT) => decode_state(&bytes[1..]),
            Some(other) => Err(format!(
                "unknown format {other} (expected {STATE_FORMAT}, or JSON)"
            )),
            None => Err("empty value".into()),
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

/// First byte of a producer state's stored form ([`ProducerState::encode`]).
pub(crate) const STATE_FORMAT: u8 = 1;

fn encode_state<'a>(
    last: Option<u64>,
    count: usize,
    entries: impl Iterator<Item = (u64, &'a [Ack])>,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(12 + count * 8);
    buf.push(STATE_FORMAT);
    match last {
        None => buf.push(0),
        Some(l) => {
            buf.push(1);
            encode_varint(l, &mut buf);
        }
    }
    encode_varint(count as u64, &mut buf);
    let (mut seq, mut base) = (0u64, 0u64);
    for (q, acks) in entries {
        // Wrapping differences: any state round-trips, ascending ones take a byte or two.
        encode_varint(q.wrapping_sub(seq), &mut buf);
        seq = q;
        encode_varint(acks.len() as u64, &mut buf);
        for a in acks {
            encode_varint(u64::from(a.partition), &mut buf);
            encode_varint(a.base_offset.wrapping_sub(base), &mut buf);
            base = a.base_offset;
            encode_varint(u64::from(a.record_count), &mut buf);
        }
    }
    buf
}

fn decode_state(mut buf: &[u8]) -> Result<ProducerState, String> {
    fn varint(buf: &mut &[u8], what: &str) -> Result<u64, String> {
        decode_varint(buf).map_err(|_| format!("cut short or malformed at the {what}"))
    }
    fn small(v: u64, what: &str) -> Result<u32, String> {
        u32::try_from(v).map_err(|_| format!("{what} {v} is beyond u32"))
    }
    let last = match buf.split_first() {
        Some((0, rest)) => {
            buf = rest;
            None
        }
        Some((1, rest)) => {
            buf = rest;
            Some(varint(&mut buf, "last sequence")?)
        }
        Some((other, _)) => return Err(format!("last sequence marker {other} (expected 0 or 1)")),
        None => return Err("cut short before the last sequence".into()),
    };
    let count = varint(&mut buf, "request count")?;
    // Bounded by what the bytes can hold, not by the count they claim.
    let mut recent =
        VecDeque::with_capacity(usize::try_from(count).map_or(0, |c| c.min(PRODUCER_WINDOW)));
    let (mut seq, mut base) = (0u64, 0u64);
    for _ in 0..count {
        seq = seq.wrapping_add(varint(&mut buf, "sequence")?);
        let n = varint(&mut buf, "ack count")?;
        let mut acks = Vec::with_capacity(usize::try_from(n).map_or(0, |n| n.min(16)));
        for _ in 0..n {
            let partition = small(varint(&mut buf, "partition")?, "partition")?;
            base = base.wrapping_add(varint(&mut buf, "base offset")?);
            let record_count = small(varint(&mut buf, "record count")?, "record count")?;
            acks.push(Ack {
                partition,
                base_offset: base,
                record_count,
            });
        }
        recent.push_back((seq, acks));
    }
    if !buf.is_empty() {
        return Err(format!("{} bytes after the last request", buf.len()));
    }
    Ok(ProducerState { last, recent })
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

    fn ack(partition: u32, base_offset: u64, record_count: u32) -> Ack {
        Ack {
            partition,
            base_offset,
            record_count,
        }
    }

    /// A full window of a producer that appends 200 records per request.
    fn full_window() -> ProducerState {
        let mut s = ProducerState::default();
        for q in 0..PRODUCER_WINDOW as u64 + 10 {
            s.record(q + 1_000_000, vec![ack(3, 5_000_000 + q * 200, 200)]);
        }
        s
    }

    #[test]
    fn stored_states_read_back_as_written() {
        let mut odd = full_window();
        // Sequences and offsets that go down, several acks, values at their limits.
        odd.recent[5].0 = 3;
        odd.recent[6].1 = vec![ack(u32::MAX, u64::MAX, u32::MAX), ack(0, 0, 0)];
        odd.recent[7].1.clear();
        let states = [
            ProducerState::default(),
            // What a replica's sequencer builds for a gap: a last sequence and no acks.
            ProducerState {
                last: Some(7),
                recent: VecDeque::new(),
            },
            ProducerState {
                last: Some(u64::MAX),
                recent: VecDeque::new(),
            },
            full_window(),
            odd,
        ];
        for s in states {
            let bytes = s.encode();
            assert_eq!(bytes[0], STATE_FORMAT);
            assert_eq!(ProducerState::decode(&bytes), Ok(s));
        }
    }

    #[test]
    fn a_request_costs_a_few_bytes_of_state() {
        let s = full_window();
        let bytes = s.encode();
        let json = serde_json::to_vec(&s).expect("encodes");
        assert!(
            bytes.len() <= 8 * PRODUCER_WINDOW,
            "{} bytes for {PRODUCER_WINDOW} requests (JSON: {})",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn the_state_a_request_will_leave_is_encoded_without_changing_the_state() {
        for state in [None, Some(ProducerState::default()), Some(full_window())] {
            let acks = [ack(3, 9_000_000, 17), ack(4, 12, 1)];
            let bytes = ProducerState::encode_recorded(state.as_ref(), 2_000_000, &acks);
            let mut after = state.clone().unwrap_or_default();
            after.record(2_000_000, acks.to_vec());
            assert_eq!(bytes, after.encode());
            assert!(after.recent.len() <= PRODUCER_WINDOW);
        }
    }

    #[test]
    fn damaged_states_are_refused_with_what_is_wrong() {
        let bytes = full_window().encode();
        let cases: [(Vec<u8>, &str); 6] = [
            (Vec::new(), "empty value"),
            (vec![STATE_FORMAT, 2, 0], "last sequence marker 2"),
            (vec![7, 0, 0], "unknown format 7"),
            (bytes[..bytes.len() - 1].to_vec(), "cut short"),
            (
                [&bytes[..], &[0]].concat(),
                "1 bytes after the last request",
            ),
            // One request whose ack names partition 2^32.
            (
                vec![
                    STATE_FORMAT,
                    1,
                    0,
                    1,
                    0,
                    1,
                    0x80,
                    0x80,
                    0x80,
                    0x80,
                    0x10,
                    0,
                    1,
                ],
                "partition 4294967296 is beyond u32",
            ),
        ];
        for (bytes, expected) in cases {
            let e = ProducerState::decode(&bytes).expect_err("refused");
            assert!(e.contains(expected), "{e:?} should say {expected:?}");
        }
        // A count far beyond what the bytes hold fails on the bytes, without allocating it.
        let huge = [
            STATE_FORMAT,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x7f,
        ];
        assert!(ProducerState::decode(&huge).is_err());
    }

    /// State written by earlier versions (acks as `[partition, base, count]` arrays) still
    /// loads.
    #[test]
    fn stored_state_keeps_its_json_shape() {
        let stored = br#"{"last":3,"recent":[[3,[[1,40,2]]]]}"#;
        let s = ProducerState::decode(stored).expect("parses");
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
