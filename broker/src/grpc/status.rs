//! The one mapping from the broker's errors to gRPC status codes
//! (<https://grpc.io/docs/guides/status-codes/>): bad input is `INVALID_ARGUMENT`, a
//! request that does not fit the state is `FAILED_PRECONDITION`, a full `Reject` topic is
//! `RESOURCE_EXHAUSTED` with a retry hint, damage is `DATA_LOSS`, shutting down is
//! `UNAVAILABLE`, and storage failures are `INTERNAL`.

use tonic::{Code, Status};

use crate::{Error, cluster, groups, log, validate::InvalidConfig};

/// Longest status message sent, in bytes: gRPC clients refuse responses whose metadata
/// exceeds their limit (8 KiB by default in grpc-go and tonic), so an error that quotes a
/// large input is cut here rather than lost as `RESOURCE_EXHAUSTED` on the client.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// What a `RESOURCE_EXHAUSTED` answer asks the client to wait before retrying, in ms
/// (gRPC's retry pushback, proposal A6).
const RETRY_PUSHBACK_MS: &str = "1000";

fn log_code(e: &log::Error) -> Code {
    use log::Error as E;
    match e {
        E::TopicNotFound(_) | E::PartitionNotFound { .. } => Code::NotFound,
        E::TopicExists { .. } => Code::AlreadyExists,
        E::NotServed { .. } | E::Sequence(_) => Code::FailedPrecondition,
        E::InvalidConfig(_)
        | E::EmptyProduce
        | E::IdempotentSpansPartitions { .. }
        | E::IdempotentWithoutPartition { .. }
        | E::RecordTooLarge { .. }
        | E::PartitionsShrink { .. } => Code::InvalidArgument,
        E::TopicFull { .. } | E::DiskFull { .. } => Code::ResourceExhausted,
        E::OffsetOutOfRange { .. } => Code::OutOfRange,
        E::Corrupt { .. } | E::Missing { .. } | E::Damaged { .. } => Code::DataLoss,
        E::ShuttingDown | E::NotLeader { .. } | E::OutcomeUnknown { .. } | E::InFlight { .. } => {
            Code::Unavailable
        }
        _ => Code::Internal,
    }
}

fn group_code(e: &groups::Error) -> Code {
    use groups::Error as E;
    match e {
        E::GroupNotFound(_) | E::GroupDeleted(_) | E::NotMember { .. } => Code::NotFound,
        E::GroupExists { .. } => Code::AlreadyExists,
        E::CoordinatorMoved(_) => Code::Unavailable,
        E::JoinMismatch { .. } | E::Ack { .. } => Code::FailedPrecondition,
        E::Immutable { .. }
        | E::NoPartition { .. }
        | E::MalformedAck { .. }
        | E::PullNothing
        | E::InvalidConfig(_) => Code::InvalidArgument,
        E::Log(e) => log_code(e),
        E::Cluster { code, .. } => Code::from(*code),
        _ => Code::Internal,
    }
}

fn cluster_code(e: &cluster::Error) -> Code {
    match e {
        cluster::Error::NoLeader(_) | cluster::Error::NotLeader => Code::Unavailable,
        cluster::Error::Remote { code, .. } => Code::from(*code),
        cluster::Error::Log(e) => log_code(e),
        _ => Code::Internal,
    }
}

impl From<cluster::Error> for Status {
    fn from(e: cluster::Error) -> Self {
        Error::from(e).into()
    }
}

/// `message` cut to [`MAX_STATUS_MESSAGE_BYTES`] on a character boundary.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut end = MAX_STATUS_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Log(e) => log_code(e),
            Error::Group(e) => group_code(e),
            Error::InvalidConfig(_) => Code::InvalidArgument,
            Error::Cluster(e) => cluster_code(e),
        };
        let mut status = Status::new(code, bounded(e.to_string()));
        if code == Code::ResourceExhausted
            && let Ok(v) = RETRY_PUSHBACK_MS.parse()
        {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
        status
    }
}

impl From<log::Error> for Status {
    fn from(e: log::Error) -> Self {
        Error::from(e).into()
    }
}

impl From<groups::Error> for Status {
    fn from(e: groups::Error) -> Self {
        Error::from(e).into()
    }
}

impl From<InvalidConfig> for Status {
    fn from(e: InvalidConfig) -> Self {
        Error::from(e).into()
    }
}

/// A status as the `Error` message of a stream response (`ProduceStream`, `Subscribe`).
pub(crate) fn to_pb(s: &Status) -> weir_proto::v1::Error {
    weir_proto::v1::Error {
        code: s.code() as i32,
        message: s.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_documented_codes() {
        let s = Status::from(log::Error::TopicNotFound("t".into()));
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "topic \"t\" does not exist");
        let full = Status::from(log::Error::TopicFull {
            topic: "t".into(),
            limit: "max_messages",
            unit: "messages",
            held: 10,
            max: 10,
            adding: 1,
        });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.metadata().get("grpc-retry-pushback-ms").is_some());
        let group = Status::from(groups::Error::Log(log::Error::ShuttingDown));
        assert_eq!(group.code(), Code::Unavailable);
        let member = Status::from(groups::Error::NotMember {
            group: "g".into(),
            member: "m".into(),
        });
        assert_eq!(member.code(), Code::NotFound);
    }

    #[test]
    fn long_messages_are_cut() {
        let long = Status::from(InvalidConfig::new("x", "é".repeat(5000)));
        assert_eq!(long.code(), Code::InvalidArgument);
        assert!(long.message().len() <= MAX_STATUS_MESSAGE_BYTES + '…'.len_utf8());
        assert!(long.message().ends_with('…'));
    }
}
