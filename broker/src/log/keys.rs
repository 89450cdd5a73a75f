//! The on-disk key schema: every key the broker writes, built and parsed here only.
//!
//! One fjall database, two keyspaces. Integers inside keys are big-endian, so keys sort
//! numerically; integers inside fixed-size values are documented with each value.
//!
//! `records` keyspace:
//!
//! | key | value |
//! | --- | --- |
//! | `topic id (u32) ‖ partition (u32) ‖ base offset (u64)` | a record batch with its CRC32C ([`super::batch`]) |
//!
//! `meta` keyspace:
//!
//! | key | value | written by |
//! | --- | --- | --- |
//! | `v/schema` | schema version, u32 big-endian ([`SCHEMA_VERSION`]) | open (migration) |
//! | `n/topic-id` | next topic id, u32 big-endian (little-endian in schema 1) | topic creation |
//! | `t/<topic name>` | topic settings, id, creation time (JSON) | topic admin |
//! | `p/<topic id (u32)><partition (u32)>` | partition counters: next offset, earliest offset, bytes (3 × u64 little-endian) | every commit, in the same batch as the records |
//! | `q/<topic id (u32)><partition (u32)><producer id (u64)>` | idempotent producer's last sequence on the partition and recent acks (binary, `idempotence::ProducerState::encode`; JSON before schema 4) | appends with a producer id |
//! | `g/<group name>` | group settings, topic id, dead-lettered count (JSON) | group admin, dead letters |
//! | `o/<group name>/<partition (u32)>` | ack floor, acks above it, delivery counts (JSON) | group acks, every tick |
//! | `l/<topic id (u32)><partition (u32)><first offset (u64)>` | end of a range of lost records whose loss was accepted (u64 big-endian) | `weir topic repair` |
//!
//! Schema versions: 1 had no `v/schema` key and stored `n/topic-id` little-endian; opening
//! a schema-1 database rewrites that value big-endian and writes `v/schema` = 2, in one
//! atomic batch ([`super::recovery`]). Schema 2 kept idempotent producers' state per topic
//! (`q/<topic id><producer id>`); schema 3 keeps it per partition (Kafka's KIP-98), and
//! opening a schema-2 database drops the per-topic entries in the same batch as the
//! version: they cannot be split by partition, and a producer that carries on after the
//! upgrade starts its partitions' sequences at 0. Schema 4 writes producers' states in a
//! binary form of about 6 bytes per remembered request instead of JSON (about 25), and
//! reads both, so nothing is rewritten when it opens a schema-3 database; the version
//! tells a broker before it that it cannot read the directory.

//! `raft` keyspace, partition replica groups (replicated partitions, `crate::replica`; the
//! metadata group's own keys there are one letter long, `crate::cluster::store`):
//!
//! | key | value |
//! | --- | --- |
//! | `R` ‖ group ‖ `e` ‖ index (u64) | an entry of the group's Raft log: [`ReplicaEntry`]; a `Records` entry's batch is in `records` at its base offset |
//! | `R` ‖ group ‖ `v` | the vote (JSON) |
//! | `R` ‖ group ‖ `c` | the committed log id (JSON) |
//! | `R` ‖ group ‖ `p` | the last purged log id (JSON) |
//! | `R` ‖ group ‖ `s` | the point of a snapshot about to be installed (JSON) |
//! | `R` ‖ group ‖ `d` | damage found at start-up and not repaired yet: offsets lost, last log id the replica had (JSON) |
//! | `R` ‖ group ‖ `a` | the state machine: last applied log id, membership, end offset (JSON) |
//! | `R` ‖ group ‖ `q` ‖ producer id (u64) | an idempotent producer's last sequence and recent acks on the partition, as applied (as `q/`) |
//!
//! where group = cluster topic id (u64) ‖ partition (u32), 12 bytes.

/// Current schema version, stored under [`SCHEMA_KEY`].
pub const SCHEMA_VERSION: u32 = 4;
/// Key of the schema version.
pub const SCHEMA_KEY: &[u8] = b"v/schema";
/// Key of the next topic id.
pub const TOPIC_ID_KEY: &[u8] = b"n/topic-id";
/// Prefix of topic settings.
pub const TOPIC_PREFIX: &[u8] = b"t/";
/// Prefix of idempotent producers' state.
pub const PRODUCER_PREFIX: &[u8] = b"q/";
/// Prefix of group settings.
pub const GROUP_PREFIX: &[u8] = b"g/";
/// Prefix of accepted lost ranges.
pub const LOSS_PREFIX: &[u8] = b"l/";

/// Metadata key of an accepted lost range of a partition starting at `from`:
/// `l/` ‖ partition prefix ‖ from (big-endian).
pub fn loss_key(prefix: [u8; 8], from: u64) -> [u8; 18] {
    let mut key = [0u8; 18];
    key[..2].copy_from_slice(LOSS_PREFIX);
    key[2..10].copy_from_slice(&prefix);
    key[10..].copy_from_slice(&from.to_be_bytes());
    key
}

/// `(partition prefix, from)` of a [`loss_key`]; `None` for a malformed key.
pub fn parse_loss_key(key: &[u8]) -> Option<([u8; 8], u64)> {
    if key.len() != 18 || !key.starts_with(LOSS_PREFIX) {
        return None;
    }
    let prefix: [u8; 8] = key.get(2..10)?.try_into().ok()?;
    let from = u64::from_be_bytes(key.get(10..18)?.try_into().ok()?);
    Some((prefix, from))
}

/// `topic id ‖ partition index`, big-endian: the prefix of every record key of a partition.
pub fn partition_prefix(topic_id: u32, partition: u32) -> [u8; 8] {
    let mut prefix = [0u8; 8];
    prefix[..4].copy_from_slice(&topic_id.to_be_bytes());
    prefix[4..].copy_from_slice(&partition.to_be_bytes());
    prefix
}

/// Record key of the batch of a partition starting at `offset`: prefix ‖ offset (big-endian).
pub fn record_key(prefix: [u8; 8], offset: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&prefix);
    key[8..].copy_from_slice(&offset.to_be_bytes());
    key
}

/// Base offset of a record key (its last 8 bytes); `None` for a key that is not 16 bytes.
pub fn record_key_offset(key: &[u8]) -> Option<u64> {
    if key.len() != 16 {
        return None;
    }
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Metadata key of a partition's counters: `p/` ‖ prefix.
pub fn partition_meta_key(prefix: [u8; 8]) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(b"p/");
    key[2..].copy_from_slice(&prefix);
    key
}

/// Metadata key of a topic's settings: `t/<name>`.
pub fn topic_key(name: &str) -> Vec<u8> {
    [TOPIC_PREFIX, name.as_bytes()].concat()
}

/// Metadata key of an idempotent producer's state on a partition:
/// `q/` ‖ partition prefix ‖ producer id (big-endian), 18 bytes.
pub fn producer_key(prefix: [u8; 8], producer_id: u64) -> [u8; 18] {
    let mut key = [0u8; 18];
    key[..2].copy_from_slice(PRODUCER_PREFIX);
    key[2..10].copy_from_slice(&prefix);
    key[10..].copy_from_slice(&producer_id.to_be_bytes());
    key
}

/// `(topic id, partition, producer id)` of a [`producer_key`]; `None` for a malformed key
/// (schema 2's 14-byte per-topic keys included).
pub fn parse_producer_key(key: &[u8]) -> Option<(u32, u32, u64)> {
    if key.len() != 18 || !key.starts_with(PRODUCER_PREFIX) {
        return None;
    }
    let topic = u32::from_be_bytes(key.get(2..6)?.try_into().ok()?);
    let partition = u32::from_be_bytes(key.get(6..10)?.try_into().ok()?);
    let producer = u64::from_be_bytes(key.get(10..18)?.try_into().ok()?);
    Some((topic, partition, producer))
}

/// Metadata key of a group's settings: `g/<name>`.
pub fn group_key(name: &str) -> Vec<u8> {
    [GROUP_PREFIX, name.as_bytes()].concat()
}

/// Prefix of a group's cursors: `o/<name>/`.
pub fn cursor_prefix(group: &str) -> Vec<u8> {
    [b"o/", group.as_bytes(), b"/"].concat()
}

/// Metadata key of a group's cursor of `partition`: `o/<name>/<partition (u32 BE)>`.
pub fn cursor_key(group: &str, partition: u32) -> Vec<u8> {
    let mut k = cursor_prefix(group);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// A partition replica group's id in keys: cluster topic id ‖ partition, big-endian.
pub type GroupKey = [u8; 12];

/// The [`GroupKey`] of partition `partition` of the topic with cluster id `topic_id`.
pub fn group_key_of(topic_id: u64, partition: u32) -> GroupKey {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&topic_id.to_be_bytes());
    key[8..].copy_from_slice(&partition.to_be_bytes());
    key
}

/// `raft` keyspace key of a replica group's single value `tag` (`v`, `c`, `p`, `a`):
/// `R` ‖ group ‖ tag.
pub fn replica_key(group: GroupKey, tag: u8) -> [u8; 14] {
    let mut key = [0u8; 14];
    key[0] = b'R';
    key[1..13].copy_from_slice(&group);
    key[13] = tag;
    key
}

/// `raft` keyspace key of a consumer group's cursor of `partition` kept in a replica
/// group's state: `R` ‖ group ‖ `o` ‖ group name ‖ 0 ‖ partition (big-endian). Group names
/// hold no 0 byte ([`crate::validate`]), so one group's keys share
/// [`replica_cursor_prefix`] and no other's.
pub fn replica_cursor_key(group: GroupKey, name: &str, partition: u32) -> Vec<u8> {
    let mut key = replica_cursor_prefix(group, name);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// The prefix of consumer group `name`'s cursor keys in a replica group's state.
pub fn replica_cursor_prefix(group: GroupKey, name: &str) -> Vec<u8> {
    let mut key = replica_key(group, b'o').to_vec();
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key
}

/// `raft` keyspace key of a replica group's log entry `index`: `R` ‖ group ‖ `e` ‖ index.
pub fn replica_entry_key(group: GroupKey, index: u64) -> [u8; 22] {
    let mut key = [0u8; 22];
    key[..14].copy_from_slice(&replica_key(group, b'e'));
    key[14..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The index of a [`replica_entry_key`]; `None` for another key.
pub fn parse_replica_entry_key(key: &[u8]) -> Option<u64> {
    if key.len() != 22 || key.get(13) != Some(&b'e') {
        return None;
    }
    Some(u64::from_be_bytes(key.get(14..22)?.try_into().ok()?))
}

/// What a replica group's log entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEntryKind {
    /// A record batch of `records` records, stored in `records` at the entry's base offset.
    Records {
        /// Records in the batch.
        records: u32,
        /// The idempotent producer's `(id, sequence)` of the request, if any.
        producer: Option<(u64, u64)>,
    },
    /// A new leader's blank entry.
    Blank,
    /// A membership change: openraft's membership (JSON).
    Membership(Vec<u8>),
    /// Consumer groups' cursors of the partitions whose state this partition keeps (the
    /// coordinator partition's log, `docs/replication.md`), opaque to the log.
    Cursors(Vec<u8>),
    /// Retention: every record below this offset is deleted on every replica.
    Trim(u64),
}

/// A replica group's log entry as stored under [`replica_entry_key`]: term u64, base offset
/// u64, kind u8 (0 records, 1 blank, 2 membership, 3 cursors, 4 trim), then for records the
/// record count (u32) and, from an idempotent producer, its id and sequence (2 × u64), or the
/// membership JSON, or the cursors' bytes, or the trim's earliest offset (u64); integers
/// big-endian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaEntry {
    /// Raft term of the leader that wrote it (the batch's leader epoch).
    pub term: u64,
    /// Offset of its first record; entries without records hold the offset of the next
    /// record.
    pub base_offset: u64,
    /// What it holds.
    pub kind: ReplicaEntryKind,
}

impl ReplicaEntry {
    /// The offset after its records.
    pub fn end_offset(&self) -> u64 {
        match self.kind {
            ReplicaEntryKind::Records { records, .. } => self.base_offset + u64::from(records),
            _ => self.base_offset,
        }
    }

    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(21);
        out.extend_from_slice(&self.term.to_be_bytes());
        out.extend_from_slice(&self.base_offset.to_be_bytes());
        match &self.kind {
            ReplicaEntryKind::Records { records, producer } => {
                out.push(0);
                out.extend_from_slice(&records.to_be_bytes());
                if let Some((id, sequence)) = producer {
                    out.extend_from_slice(&id.to_be_bytes());
                    out.extend_from_slice(&sequence.to_be_bytes());
                }
            }
            ReplicaEntryKind::Blank => out.push(1),
            ReplicaEntryKind::Membership(json) => {
                out.push(2);
                out.extend_from_slice(json);
            }
            ReplicaEntryKind::Cursors(bytes) => {
                out.push(3);
                out.extend_from_slice(bytes);
            }
            ReplicaEntryKind::Trim(earliest) => {
                out.push(4);
                out.extend_from_slice(&earliest.to_be_bytes());
            }
        }
        out
    }

    /// Parses [`ReplicaEntry::encode`]'s bytes; `None` when malformed.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let term = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let base_offset = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        let kind = match bytes.get(16)? {
            0 => ReplicaEntryKind::Records {
                records: u32::from_be_bytes(bytes.get(17..21)?.try_into().ok()?),
                producer: match bytes.get(21..37) {
                    Some(p) => Some((
                        u64::from_be_bytes(p.get(..8)?.try_into().ok()?),
                        u64::from_be_bytes(p.get(8..)?.try_into().ok()?),
                    )),
                    None => None,
                },
            },
            1 => ReplicaEntryKind::Blank,
            2 => ReplicaEntryKind::Membership(bytes.get(17..)?.to_vec()),
            3 => ReplicaEntryKind::Cursors(bytes.get(17..)?.to_vec()),
            4 => ReplicaEntryKind::Trim(u64::from_be_bytes(bytes.get(17..25)?.try_into().ok()?)),
            _ => return None,
        };
        Some(Self {
            term,
            base_offset,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_sort_by_partition_then_offset() {
        let a = record_key(partition_prefix(1, 0), 255);
        let b = record_key(partition_prefix(1, 0), 256);
        let c = record_key(partition_prefix(1, 1), 0);
        assert!(a < b && b < c);
        assert_eq!(record_key_offset(&b), Some(256));
        assert_eq!(record_key_offset(&b[..15]), None);
    }

    #[test]
    fn producer_keys_round_trip() {
        let k = producer_key(partition_prefix(7, 3), u64::MAX - 1);
        assert_eq!(parse_producer_key(&k), Some((7, 3, u64::MAX - 1)));
        assert_eq!(
            parse_producer_key(&k[..14]),
            None,
            "schema 2's per-topic key"
        );
        assert_eq!(parse_producer_key(b"g/xxxxxxxxxxxx"), None);
    }

    #[test]
    fn loss_keys_round_trip_and_sort_by_offset() {
        let p = partition_prefix(3, 1);
        let k = loss_key(p, 1000);
        assert_eq!(parse_loss_key(&k), Some((p, 1000)));
        assert!(loss_key(p, 999) < k && k < loss_key(p, 1001));
        assert_eq!(parse_loss_key(&k[..17]), None);
    }

    #[test]
    fn cursor_keys_of_one_group_share_its_prefix_only() {
        let k = cursor_key("g", 3);
        assert!(k.starts_with(&cursor_prefix("g")));
        assert!(!k.starts_with(&cursor_prefix("g2")));
        assert!(!cursor_key("g2", 0).starts_with(&cursor_prefix("g")));
        assert_eq!(&k[k.len() - 4..], &3u32.to_be_bytes());
    }

    #[test]
    fn replica_entries_round_trip_and_their_keys_sort_by_index() {
        let g = group_key_of(9, 2);
        for kind in [
            ReplicaEntryKind::Records {
                records: 7,
                producer: None,
            },
            ReplicaEntryKind::Records {
                records: 7,
                producer: Some((u64::MAX, 3)),
            },
            ReplicaEntryKind::Blank,
            ReplicaEntryKind::Membership(b"{}".to_vec()),
            ReplicaEntryKind::Cursors(br#"{"group":"g"}"#.to_vec()),
            ReplicaEntryKind::Trim(u64::MAX - 1),
        ] {
            let e = ReplicaEntry {
                term: 3,
                base_offset: 100,
                kind,
            };
            assert_eq!(ReplicaEntry::decode(&e.encode()), Some(e));
        }
        assert_eq!(ReplicaEntry::decode(&[0; 10]), None);
        let (a, b) = (replica_entry_key(g, 255), replica_entry_key(g, 256));
        assert!(a < b && b < replica_entry_key(group_key_of(9, 3), 0));
        assert_eq!(parse_replica_entry_key(&b), Some(256));
        assert_eq!(parse_replica_entry_key(&replica_key(g, b'v')), None);
        // Cursors: one group's keys under its prefix only; a cursors entry moves no offset.
        let k = replica_cursor_key(g, "g", 3);
        assert!(k.starts_with(&replica_cursor_prefix(g, "g")));
        assert!(!replica_cursor_key(g, "g2", 3).starts_with(&replica_cursor_prefix(g, "g")));
        let cursors = ReplicaEntry {
            term: 1,
            base_offset: 40,
            kind: ReplicaEntryKind::Cursors(Vec::new()),
        };
        assert_eq!(cursors.end_offset(), 40);
    }
}
