//! Forwarding a data-path call to the partition's leader (`docs/cluster.md`): one hop over a
//! pooled channel, the caller's deadline carried over, the call marked so that it is never
//! forwarded again. Dropping the incoming call (the client cancelled) drops the forwarded
//! one, which cancels its HTTP/2 stream.

use std::time::Duration;

use tonic::{Request, metadata::MetadataMap};

use crate::cluster::{
    Cluster,
    route::{FORWARDED, Route},
};

/// Metadata key of the metadata log index the forwarding broker had applied.
pub(crate) const METADATA_INDEX: &str = "weir-metadata-index";

/// Response header (or error trailer) of a forwarded call: the id of the broker that
/// leads the partition or coordinates the group (Kafka's KIP-951 leader hint), so a client
/// that routes by itself sends its next call there.
pub const LEADER_ID: &str = "weir-leader-id";
/// Response header (or error trailer) of a forwarded call: that broker's advertised
/// `host:port`.
pub const LEADER_ADDRESS: &str = "weir-leader-address";

/// Names broker `id` at `address` as the leader in the answer of a call this broker
/// forwarded there ([`LEADER_ID`], [`LEADER_ADDRESS`]), on success and on error alike.
pub(crate) fn hinted<T>(
    answer: Result<tonic::Response<T>, tonic::Status>,
    id: u64,
    address: &str,
) -> Result<tonic::Response<T>, tonic::Status> {
    fn mark(m: &mut MetadataMap, id: u64, address: &str) {
        if let Ok(v) = id.to_string().parse() {
            m.insert(LEADER_ID, v);
        }
        if let Ok(v) = address.parse() {
            m.insert(LEADER_ADDRESS, v);
        }
    }
    match answer {
        Ok(r) => {
            let mut out = tonic::Response::new(r.into_inner());
            mark(out.metadata_mut(), id, address);
            Ok(out)
        }
        Err(mut status) => {
            mark(status.metadata_mut(), id, address);
            Err(status)
        }
    }
}

/// Whether another broker forwarded this call.
pub(crate) fn is_forwarded(metadata: &MetadataMap) -> bool {
    metadata.contains_key(FORWARDED)
}

/// For a forwarded call: waits until this broker has applied the metadata the forwarding
/// broker had (a topic created through it a moment ago exists here too).
pub(crate) async fn catch_up(
    cluster: &Cluster,
    metadata: &MetadataMap,
) -> Result<(), tonic::Status> {
    let index = metadata
        .get(METADATA_INDEX)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match index {
        Some(i) if i > cluster.applied_index() => {
            cluster.wait_applied(i).await.map_err(tonic::Status::from)
        }
        _ => Ok(()),
    }
}

/// Forwards a unary group call to the group's coordinator when another broker coordinates
/// it (returning its answer from the handler): `to_coordinator!(ctx, metadata, request,
/// group, topic, Client, method)`.
macro_rules! to_coordinator {
    ($ctx:expr, $metadata:expr, $req:expr, $group:expr, $topic:expr, $client:ident, $method:ident) => {
        let group_name: String = ($group).to_owned();
        let route = super::forward::group_route($ctx, &$metadata, &group_name, $topic).await?;
        if let Some((channel, id, address)) = route {
            let known = $ctx.cluster.state().groups.contains_key(&group_name);
            let index = $ctx.cluster.applied_index();
            let answer = $client::new(channel)
                .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
                .$method(super::forward::forwarded_at(&$metadata, $req, index))
                .await;
            let answer = super::forward::hinted(answer, id, &address);
            if answer.is_ok() && !known {
                // The call created the group: answered once this broker knows it too, so
                // the caller's next call through it finds the group (read-your-writes).
                $ctx.cluster
                    .settle_group(&group_name, std::time::Duration::from_secs(5))
                    .await;
            }
            return answer;
        }
    };
}
pub(crate) use to_coordinator;

/// Where a call of group `group` goes: `None` when this broker serves it (it coordinates
/// the group, or another broker forwarded the call), else a channel to the group's
/// coordinator, its id and address. `topic` names the group's topic when the call may
/// create the group.
pub(crate) async fn group_route(
    ctx: &super::Context,
    metadata: &MetadataMap,
    group: &str,
    topic: Option<&str>,
) -> Result<Option<(tonic::transport::Channel, u64, String)>, tonic::Status> {
    if is_forwarded(metadata) {
        catch_up(&ctx.cluster, metadata).await?;
        return Ok(None);
    }
    match topic {
        Some(t) => ctx.cluster.settle(t).await,
        // Without its topic, an unknown group can be routed only once its creation (through
        // any broker) is applied here: this broker catches up with the metadata leader, and
        // a group still unknown after that does not exist.
        None => {
            if !ctx.cluster.state().groups.contains_key(group) {
                ctx.cluster.catch_up().await;
            }
        }
    }
    match ctx.cluster.route_group(group, topic) {
        Route::Leader { id, address } => {
            ctx.metrics.observe_forward(id);
            Ok(Some((ctx.cluster.channel_to(&address)?, id, address)))
        }
        _ => Ok(None),
    }
}

/// `message` as a call forwarded on behalf of a call with `incoming` metadata, by a
/// broker that has applied the metadata up to `index`.
pub(crate) fn forwarded_at<T>(incoming: &MetadataMap, message: T, index: u64) -> Request<T> {
    let mut request = forwarded(incoming, message);
    with_metadata_index(&mut request, index);
    request
}

/// Marks `request` as sent by a broker that has applied the metadata up to `index`
/// (header `weir-metadata-index`): the receiving broker answers once it has applied as
/// far ([`catch_up`]), so a topic or group the caller knows exists there too.
pub(crate) fn with_metadata_index<T>(request: &mut Request<T>, index: u64) {
    request
        .metadata_mut()
        .insert(METADATA_INDEX, tonic::metadata::MetadataValue::from(index));
}

/// `message` as a call forwarded on behalf of a call with `incoming` metadata.
pub(crate) fn forwarded<T>(incoming: &MetadataMap, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(timeout) = incoming
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
    {
        request.set_timeout(timeout);
    }
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// A `grpc-timeout` header value: digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`
/// (gRPC over HTTP/2, "Timeout").
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn a_forwarded_call_keeps_the_deadline_and_is_marked() {
        let mut incoming = MetadataMap::new();
        incoming.insert(
            "grpc-timeout",
            tonic::metadata::MetadataValue::from_static("250m"),
        );
        let r = forwarded(&incoming, ());
        assert!(is_forwarded(r.metadata()));
        assert_eq!(
            r.metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
            Some("250000u")
        );
    }
}
