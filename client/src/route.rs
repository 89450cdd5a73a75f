//! Routing calls straight to the broker that serves them (`docs/cluster.md`, "Smart
//! clients").
//!
//! Every broker of a cluster serves every call, forwarding to the partition's leader or the
//! group's coordinator when that is another broker. A client that knows where a call goes
//! saves that hop: the [`Router`] keeps the cluster's `Metadata` (each partition's leader and
//! each group's coordinator, with their addresses), refreshes it when it is older than
//! [`METADATA_MAX_AGE`] or lacks a topic or group, and learns from the leader hint
//! (`weir-leader-address`) a forwarding broker puts on its answer, as Kafka clients learn from
//! KIP-951's hints. When a leader's advertised address cannot be reached from where the
//! client runs (a Pod DNS name outside the cluster, say), calls go through the bootstrap
//! broker, which forwards them: routing is an optimisation, never a requirement.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tonic::{metadata::MetadataMap, transport::Channel};
use weir_proto::{
    partitioner,
    v1::{self as pb, cluster_client::ClusterClient},
};

/// Response header of a forwarded call naming the leader's (or coordinator's) `host:port`.
pub const LEADER_ADDRESS: &str = "weir-leader-address";

/// Age after which cached metadata is fetched again before the next routed call (Kafka's
/// `metadata.max.age.ms` is 5 minutes; leaders move on failover, so less here): 30 s.
pub const METADATA_MAX_AGE: Duration = Duration::from_secs(30);

/// Least time between two metadata fetches caused by a topic or group the metadata does not
/// know (just created, or a typo): 1 s. Calls meanwhile go through the bootstrap broker.
const MISS_REFRESH: Duration = Duration::from_secs(1);

/// Time to connect to a leader before the call goes through the bootstrap broker instead: 2 s.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for a metadata answer: 10 s. A refresh holds the lock other calls' refreshes
/// wait on, so one to a broker that stopped answering must not hold it longer; the routes are
/// then kept as they were.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a broker address that could not be connected to is not tried again: 30 s.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// What a routed call is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// A partition: its leader serves it.
    Partition(&'a str, u32),
    /// A consumer group, and its topic when the call may create it: its coordinator
    /// serves it. A group not created yet is coordinated by the leader of partition
    /// `murmur2(name) mod partitions` of its topic, as the brokers route it.
    Group(&'a str, Option<&'a str>),
}

/// Where calls go: the bootstrap channel, or a channel to the broker that serves them.
#[derive(Debug)]
pub(crate) struct Router {
    bootstrap: Channel,
    /// `host:port` of the bootstrap broker when it is one address: a leader there is
    /// reached over the bootstrap channel, not a second connection.
    bootstrap_address: Option<String>,
    direct: bool,
    state: Mutex<Routes>,
    /// One metadata fetch at a time.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Routes {
    /// Per topic, each partition's leader address (`None`: not known).
    topics: HashMap<String, Vec<Option<String>>>,
    /// Coordinator address per group.
    groups: HashMap<String, String>,
    /// When the metadata was last fetched (or a fetch failed).
    fetched: Option<Instant>,
    /// Channels to brokers by address.
    peers: HashMap<String, Peer>,
    /// Advertised address of the broker that answered the last metadata fetch: the one the
    /// bootstrap channel is connected to.
    bootstrap_at: Option<String>,
}

#[derive(Debug, Clone)]
enum Peer {
    Connected(Channel),
    Unreachable(Instant),
}

/// The channel chosen for a call: a broker's, or the bootstrap one.
#[derive(Debug, Clone)]
pub(crate) struct Chosen {
    pub channel: Channel,
    /// The broker's `host:port` when the call goes straight to it.
    pub direct: Option<String>,
    /// Whether `channel` is the bootstrap channel (also when the broker it goes to is the
    /// bootstrap broker).
    pub bootstrap: bool,
}

impl Router {
    /// A router over the `bootstrap` channel (to the one broker at `bootstrap_address`, when
    /// known); with `direct` false every call goes through it.
    pub fn new(bootstrap: Channel, bootstrap_address: Option<String>, direct: bool) -> Self {
        Self {
            bootstrap,
            bootstrap_address,
            direct,
            state: Mutex::new(Routes::default()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether calls go straight to leaders and coordinators.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The channel to the bootstrap broker(s).
    pub fn bootstrap_channel(&self) -> Channel {
        self.bootstrap.clone()
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        // The map is valid after any panic of a holder (every change is one assignment).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bootstrap(&self) -> Chosen {
        Chosen {
            channel: self.bootstrap.clone(),
            direct: None,
            bootstrap: true,
        }
    }

    /// The channel for a call about `target`: to its leader or coordinator when known and
    /// reachable, else the bootstrap one.
    pub async fn channel(&self, target: Target<'_>) -> Chosen {
        if !self.direct {
            return self.bootstrap();
        }
        let Some(address) = self.address(target).await else {
            return self.bootstrap();
        };
        match self.peer(&address).await {
            Some((channel, bootstrap)) => Chosen {
                channel,
                direct: Some(address),
                bootstrap,
            },
            None => self.bootstrap(),
        }
    }

    /// Partitions of `topic` as the metadata knows them (fetched as for a call); `None` when
    /// it does not know the topic.
    pub async fn partitions(&self, topic: &str) -> Option<u32> {
        if self.stale(|r| r.topics.contains_key(topic)) {
            self.refresh().await;
        }
        self.routes()
            .topics
            .get(topic)
            .and_then(|p| u32::try_from(p.len()).ok())
    }

    /// Whether the metadata must be fetched before answering: too old, or without what
    /// `known` looks for (and not fetched within [`MISS_REFRESH`]).
    fn stale(&self, known: impl Fn(&Routes) -> bool) -> bool {
        let routes = self.routes();
        match routes.fetched {
            None => true,
            Some(at) if at.elapsed() >= METADATA_MAX_AGE => true,
            Some(at) => !known(&routes) && at.elapsed() >= MISS_REFRESH,
        }
    }

    async fn address(&self, target: Target<'_>) -> Option<String> {
        let known = |r: &Routes| match target {
            Target::Partition(topic, p) => r
                .topics
                .get(topic)
                .is_some_and(|l| l.get(p as usize).is_some_and(Option::is_some)),
            Target::Group(g, _) => r.groups.contains_key(g),
        };
        if self.stale(known) {
            self.refresh().await;
        }
        let routes = self.routes();
        let leader = |topic: &str, p: u32| {
            routes
                .topics
                .get(topic)
                .and_then(|l| l.get(p as usize).cloned().flatten())
        };
        match target {
            Target::Partition(topic, p) => leader(topic, p),
            Target::Group(g, topic) => routes.groups.get(g).cloned().or_else(|| {
                let topic = topic?;
                let count = u32::try_from(routes.topics.get(topic)?.len()).ok()?;
                (count > 0)
                    .then(|| leader(topic, partitioner::partition_for_key(g.as_bytes(), count)))
                    .flatten()
            }),
        }
    }

    /// Fetches the metadata through the bootstrap broker and replaces the routes. A failure
    /// leaves the routes as they were (calls go through the bootstrap broker meanwhile).
    async fn refresh(&self) {
        let started = Instant::now();
        let _one = self.refreshing.lock().await;
        if self.routes().fetched.is_some_and(|at| at > started) {
            return; // another call fetched it while this one waited
        }
        let answer = tokio::time::timeout(
            REFRESH_TIMEOUT,
            ClusterClient::new(self.bootstrap.clone()).metadata(pb::MetadataRequest {}),
        )
        .await;
        let mut routes = self.routes();
        routes.fetched = Some(Instant::now());
        let Ok(Ok(m)) = answer.map(|a| a.map(tonic::Response::into_inner)) else {
            return;
        };
        let addresses: HashMap<u64, String> =
            m.brokers.into_iter().map(|b| (b.id, b.address)).collect();
        routes.bootstrap_at = addresses.get(&m.answered_by).cloned();
        let mut topics: HashMap<String, Vec<Option<String>>> = HashMap::new();
        for p in m.partitions {
            let leaders = topics.entry(p.topic).or_default();
            let i = p.partition as usize;
            if leaders.len() <= i {
                leaders.resize(i + 1, None);
            }
            leaders[i] = addresses.get(&p.leader).cloned();
        }
        routes.topics = topics;
        routes.groups = m
            .groups
            .into_iter()
            .filter_map(|g| Some((g.group, addresses.get(&g.coordinator)?.clone())))
            .collect();
    }

    /// A channel to the broker at `address`, connected on first use, and whether it is the
    /// bootstrap channel; `None` when it cannot be reached (tried again after
    /// [`UNREACHABLE_FOR`]).
    async fn peer(&self, address: &str) -> Option<(Channel, bool)> {
        {
            let routes = self.routes();
            if self.bootstrap_address.as_deref() == Some(address)
                || routes.bootstrap_at.as_deref() == Some(address)
            {
                return Some((self.bootstrap.clone(), true));
            }
            match routes.peers.get(address) {
                Some(Peer::Connected(c)) => return Some((c.clone(), false)),
                Some(Peer::Unreachable(until)) if *until > Instant::now() => return None,
                _ => {}
            }
        }
        let connected = match crate::endpoint(address) {
            Ok((_, endpoint)) => tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, endpoint.connect())
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        let peer = match &connected {
            Some(c) => Peer::Connected(c.clone()),
            None => Peer::Unreachable(Instant::now() + UNREACHABLE_FOR),
        };
        self.routes().peers.insert(address.to_owned(), peer);
        connected.map(|c| (c, false))
    }

    /// Takes what a call's answer (or error) says of where `target` lives: the leader hint
    /// of a forwarding broker, else `answered_by`, the broker a direct call reached (it
    /// served the call, so it leads). The next call about `target` goes there.
    pub fn learn(&self, target: Target<'_>, metadata: &MetadataMap, answered_by: Option<&str>) {
        if !self.direct {
            return;
        }
        let hint = metadata.get(LEADER_ADDRESS).and_then(|v| v.to_str().ok());
        let Some(address) = hint.or(answered_by) else {
            return;
        };
        let mut routes = self.routes();
        match target {
            Target::Partition(topic, p) => {
                let leaders = routes.topics.entry(topic.to_owned()).or_default();
                let i = p as usize;
                if leaders.len() <= i {
                    leaders.resize(i + 1, None);
                }
                leaders[i] = Some(address.to_owned());
            }
            Target::Group(g, _) => {
                routes.groups.insert(g.to_owned(), address.to_owned());
            }
        }
    }

    /// After a call sent straight to `address` failed in transport: forgets the route of
    /// `target` and the channel, so the next call fetches the metadata again and goes
    /// through the bootstrap broker until a leader is known.
    pub fn forget(&self, target: Target<'_>, address: &str) {
        let mut routes = self.routes();
        routes.peers.remove(address);
        match target {
            Target::Partition(topic, p) => {
                if let Some(l) = routes
                    .topics
                    .get_mut(topic)
                    .and_then(|l| l.get_mut(p as usize))
                {
                    *l = None;
                }
            }
            Target::Group(g, _) => {
                routes.groups.remove(g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A router whose bootstrap broker is a closed port: every metadata fetch fails at
    /// once, so what it routes by is only what it learned.
    fn router() -> Router {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        Router::new(channel, None, true)
    }

    fn hint(address: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(LEADER_ADDRESS, address.parse().expect("ascii"));
        m
    }

    #[tokio::test]
    async fn a_leader_hint_routes_the_next_call_of_its_partition_or_group() {
        let r = router();
        assert_eq!(r.address(Target::Partition("t", 2)).await, None);
        r.learn(Target::Partition("t", 2), &hint("b1:7070"), None);
        assert_eq!(
            r.address(Target::Partition("t", 2)).await.as_deref(),
            Some("b1:7070")
        );
        assert_eq!(
            r.address(Target::Partition("t", 1)).await,
            None,
            "only that partition"
        );
        // A hint wins over the broker a call reached; without one, that broker is kept.
        r.learn(Target::Group("g", None), &hint("b2:7070"), Some("b0:7070"));
        assert_eq!(
            r.address(Target::Group("g", None)).await.as_deref(),
            Some("b2:7070")
        );
        r.learn(
            Target::Group("h", None),
            &MetadataMap::new(),
            Some("b0:7070"),
        );
        assert_eq!(
            r.address(Target::Group("h", None)).await.as_deref(),
            Some("b0:7070")
        );
        // A transport failure of a direct call forgets the route.
        r.forget(Target::Partition("t", 2), "b1:7070");
        assert_eq!(r.address(Target::Partition("t", 2)).await, None);
    }

    #[tokio::test]
    async fn without_routing_nothing_is_learned() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            listener.local_addr().expect("addr")
        ))
        .expect("endpoint")
        .connect_lazy();
        let r = Router::new(channel, None, false);
        r.learn(Target::Partition("t", 0), &hint("b1:7070"), None);
        assert!(r.channel(Target::Partition("t", 0)).await.direct.is_none());
    }
}

#[cfg(test)]
mod bootstrap_tests {
    use super::*;

    /// A leader at the bootstrap broker's own address (as connected to, or as it advertises
    /// itself in the metadata it answered) is reached over the bootstrap channel: a
    /// standalone broker gets one connection per client, not two (found when a broker at its
    /// connection limit refused the second one).
    #[tokio::test]
    async fn a_leader_at_the_bootstrap_address_uses_the_bootstrap_channel() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let r = Router::new(channel, Some("127.0.0.1:9".into()), true);
        assert!(
            r.peer("127.0.0.1:9").await.is_some(),
            "no connection attempt"
        );
        r.routes().bootstrap_at = Some("host-a:7070".into());
        assert!(
            r.peer("host-a:7070").await.is_some(),
            "the advertised name too"
        );
        assert!(r.routes().peers.is_empty(), "no second channel");
    }
}
