//! Errors of the client: what went wrong, in one line that says what to do.

use tonic::{Code, Status};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker address did not parse.
    #[error(
        "invalid broker address {address:?}: {reason}; expected HOST:PORT or http://HOST:PORT, e.g. 127.0.0.1:7070"
    )]
    InvalidAddress {
        /// The address given.
        address: String,
        /// What the parser said.
        reason: String,
    },
    /// The broker could not be reached. `reason` is the innermost cause (e.g. `Connection
    /// refused (os error 111)`), without the layers of transport wrappers around it.
    #[error(
        "cannot connect to the broker at {url}: {reason}; is weir-broker running there? (set --broker or WEIR_BROKER)"
    )]
    Connect {
        /// The URL dialled.
        url: String,
        /// The innermost cause.
        reason: String,
    },
    /// Something answered at the address, but not with gRPC (for example the broker's HTTP
    /// port, 7071 by default, instead of its gRPC port, 7070).
    #[error(
        "the server at {url} does not speak gRPC ({reason}); is that the broker's HTTP port? Its gRPC port is --listen (default 7070)"
    )]
    NotGrpc {
        /// The URL dialled.
        url: String,
        /// What the gRPC layer saw.
        reason: String,
    },
    /// The broker answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Status),
    /// A response lacked a field the contract requires.
    #[error("malformed response from the broker: {0}")]
    Malformed(&'static str),
    /// The stream to the broker closed.
    #[error("the stream to the broker closed")]
    StreamClosed,
    /// No answer came within the client's request timeout ([`crate::REQUEST_TIMEOUT`] unless
    /// [`crate::Client::with_request_timeout`] set another). Whether the broker did what was
    /// asked is unknown: a [`crate::Producer`] retries with the same sequence, so a retried
    /// produce is stored once.
    #[error(
        "no answer from the broker at {url} within {after_ms} ms; the outcome is unknown, retry the request (the client's request timeout is set by Client::with_request_timeout)"
    )]
    Timeout {
        /// The URL of the broker the call went to.
        url: String,
        /// How long the call waited, in ms (its long-poll wait included).
        after_ms: u64,
    },
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

impl Error {
    /// The gRPC status code when the broker refused the request.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// Whether a failed request may not have reached the broker, so that retrying it (with
    /// the same producer id and sequence, for a produce) is safe and may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::StreamClosed | Self::Timeout { .. } => true,
            Self::Status(s) => matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ),
            _ => false,
        }
    }

    /// Maps a status of a call to `url`: transport failures become [`Error::Connect`],
    /// answers without gRPC framing [`Error::NotGrpc`], the rest [`Error::Status`].
    pub(crate) fn from_call(url: &str, status: Status) -> Self {
        let message = status.message();
        if message.contains("grpc-status header missing")
            || message.contains("invalid content-type")
            || message.contains("h2 protocol error")
        {
            return Self::NotGrpc {
                url: url.to_owned(),
                reason: message.to_owned(),
            };
        }
        if status.code() == Code::Unavailable
            && let Some(source) = std::error::Error::source(&status)
        {
            return Self::Connect {
                url: url.to_owned(),
                reason: innermost(source),
            };
        }
        Self::Status(status)
    }
}

/// The message of the innermost error of a chain (the one that says what really happened).
pub(crate) fn innermost(mut e: &(dyn std::error::Error + 'static)) -> String {
    while let Some(inner) = e.source() {
        e = inner;
    }
    e.to_string()
}

/// Upper-snake name of a gRPC code, as in the gRPC spec (`NOT_FOUND`, `DATA_LOSS`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
