//! Stored forms of groups in the log's metadata keyspace: settings under `g/<group>` and
//! one cursor per partition under `o/<group>/<partition>` (keys in
//! [`crate::log::keys`]), both JSON. Older cursors without `delivered` still load.

use serde::{Deserialize, Serialize};

use super::{Error, GroupConfig, cursor::Cursor};
use crate::log::{self, keys};

/// Stored form of a group (`g/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GroupMeta {
    pub name: String,
    pub config: GroupConfig,
    /// Id of the topic the group was created on: a group whose topic was deleted and
    /// created again (a new id) is dropped at start-up.
    pub topic_id: u32,
    pub dead_lettered: u64,
}

impl GroupMeta {
    /// The `g/` entry of this group.
    pub fn entry(&self) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let value = serde_json::to_vec(self).map_err(|source| log::Error::Encode {
            what: "group settings",
            source,
        })?;
        Ok((keys::group_key(&self.name), value))
    }

    /// Parses a `g/` entry.
    pub fn decode(key: &[u8], value: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(value).map_err(|e| {
            Error::Log(log::Error::RecoverMetadata {
                key: String::from_utf8_lossy(key).into_owned(),
                detail: e.to_string(),
            })
        })
    }
}

/// Stored form of a cursor (`o/<group>/<partition>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CursorMeta {
    floor: u64,
    acked: Vec<u64>,
    /// Delivery counts that are not 1 (and, in cursors written before `delivered`, every
    /// count).
    counts: Vec<(u64, u32)>,
    /// Unacked offsets delivered once, as half-open ranges; `counts` wins where both name
    /// an offset.
    #[serde(default)]
    delivered: Vec<(u64, u64)>,
}

/// The `o/` entry of `group`'s cursor of `partition`.
pub(super) fn cursor_entry(
    group: &str,
    partition: u32,
    c: &Cursor,
) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let value = serde_json::to_vec(&CursorMeta {
        floor: c.floor(),
        acked: c.acked().collect(),
        counts: c.counts().collect(),
        delivered: c.delivered_once(),
    })
    .map_err(|source| log::Error::Encode {
        what: "group cursor",
        source,
    })?;
    Ok((keys::cursor_key(group, partition), value))
}

/// Parses an `o/` entry.
pub(super) fn decode_cursor(key: &[u8], value: &[u8]) -> Result<Cursor, Error> {
    let stored: CursorMeta = serde_json::from_slice(value).map_err(|e| {
        Error::Log(log::Error::RecoverMetadata {
            key: String::from_utf8_lossy(key).into_owned(),
            detail: e.to_string(),
        })
    })?;
    let once = stored
        .delivered
        .iter()
        .flat_map(|(from, to)| *from..*to)
        .map(|o| (o, 1));
    // Explicit counts come last so they win over the once-delivered ranges.
    Ok(Cursor::restore(
        stored.floor,
        stored.acked,
        once.chain(stored.counts),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cursor written before `delivered` existed (every count explicit) still loads.
    #[test]
    fn cursors_of_the_previous_shape_load() {
        let key = keys::cursor_key("g", 0);
        let old = br#"{"floor":5,"acked":[7],"counts":[[5,2],[6,1]]}"#;
        let c = decode_cursor(&key, old).expect("loads");
        assert_eq!(c.floor(), 5);
        assert_eq!(c.count(5), 2);
        assert_eq!(c.count(6), 1);
        let (k, v) = cursor_entry("g", 0, &c).expect("encodes");
        assert_eq!(k, key);
        let again = decode_cursor(&k, &v).expect("round trip");
        assert_eq!(again.floor(), 5);
        assert_eq!(again.count(5), 2);
        assert!(decode_cursor(&key, b"{").is_err());
    }
}
