//! Prometheus metrics of the operator and its HTTP endpoint (`/metrics`, `/healthz`,
//! `/readyz`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// A due reconcile not started this long after it was due is taken for one of an object
/// that went (kube's scheduler dropped it): 10 minutes.
const STALE_DUE: Duration = Duration::from_secs(600);

use axum::{Router, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of a reconcile: the resource kind (`Topic`, `ConsumerGroup`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Resource kind.
    pub kind: String,
}

/// Labels of a failed reconcile: kind and error class (`kube`, `broker`, `waiting`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Resource kind.
    pub kind: String,
    /// Error class.
    pub error: String,
}

/// A count read when the metrics are scraped (e.g. the objects in a watch cache).
type CountFn = Box<dyn Fn() -> usize + Send + Sync>;

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    queue_depth: Family<KindLabels, Gauge>,
    queue_oldest: Family<KindLabels, Gauge<f64, AtomicU64>>,
    queue_wait: Family<KindLabels, Histogram>,
    watched: Family<KindLabels, Gauge>,
    leader: Gauge,
    broker_applies: Counter,
    ready: AtomicBool,
    /// Reconciles due and not started, by (kind, object): since when they are due (a watch
    /// event: at once; a requeue: after its delay).
    due: Mutex<HashMap<(String, String), Instant>>,
    /// Per kind, how many objects its watch cache holds.
    counts: Mutex<Vec<(String, CountFn)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles run, by resource kind",
            reconciles.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by resource kind and error class",
            errors.clone(),
        );
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took, seconds",
            duration.clone(),
        );
        let queue_depth = Family::<KindLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Reconciles due and not started (woken by a watch event, or a requeue whose delay passed), by resource kind",
            queue_depth.clone(),
        );
        let queue_oldest = Family::<KindLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "queue_oldest_seconds",
            "How long the longest-waiting due reconcile has waited, seconds, by resource kind",
            queue_oldest.clone(),
        );
        let queue_wait = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
            ])
        });
        registry.register(
            "queue_wait_seconds",
            "Time from a reconcile being due to its start, seconds, by resource kind",
            queue_wait.clone(),
        );
        let watched = Family::<KindLabels, Gauge>::default();
        registry.register(
            "objects_watched",
            "Objects in the operator's watch caches, by kind (Topic, ConsumerGroup, Pod)",
            watched.clone(),
        );
        let broker_applies = Counter::default();
        registry.register(
            "broker_object_applies",
            "Applies of a namespace's broker objects (StatefulSet, Services, PodDisruptionBudget): only when they change, never per Topic",
            broker_applies.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            queue_depth,
            queue_oldest,
            queue_wait,
            watched,
            leader,
            broker_applies,
            ready: AtomicBool::new(false),
            due: Mutex::new(HashMap::new()),
            counts: Mutex::new(Vec::new()),
        }
    }

    /// Records that a reconcile of `object` (a `kind`) is due now (a watch event woke it).
    pub fn queued(&self, kind: &str, object: String) {
        self.due_at(kind, object, Instant::now());
    }

    /// Records that a reconcile of `object` (a `kind`) is due after `delay` (a requeue).
    pub fn requeued(&self, kind: &str, object: String, delay: Duration) {
        self.due_at(kind, object, Instant::now() + delay);
    }

    fn due_at(&self, kind: &str, object: String, at: Instant) {
        let mut due = self.due.lock().unwrap_or_else(PoisonError::into_inner);
        due.entry((kind.to_owned(), object))
            .and_modify(|t| *t = (*t).min(at))
            .or_insert(at);
    }

    /// Records that the reconcile of `object` (a `kind`) starts: its wait since it was due
    /// goes into `weir_operator_queue_wait_seconds`.
    pub fn started(&self, kind: &str, object: String) {
        let due = self
            .due
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(kind.to_owned(), object));
        if let Some(at) = due {
            self.queue_wait
                .get_or_create(&KindLabels { kind: kind.into() })
                .observe(Instant::now().saturating_duration_since(at).as_secs_f64());
        }
    }

    /// Reports the objects of `kind` watched as `count()` at every scrape.
    pub fn watch_count(&self, kind: &str, count: impl Fn() -> usize + Send + Sync + 'static) {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind.to_owned(), Box::new(count)));
    }

    /// Sets the gauges read at scrape time: queue depth and oldest wait, objects watched.
    fn refresh(&self) {
        let now = Instant::now();
        let mut per_kind: HashMap<String, (i64, Duration)> = HashMap::new();
        {
            let mut due = self.due.lock().unwrap_or_else(PoisonError::into_inner);
            // An object deleted while a requeue was pending never starts: forgotten once
            // it is long overdue.
            due.retain(|_, at| now.saturating_duration_since(*at) < STALE_DUE);
            for ((kind, _), at) in due.iter() {
                let e = per_kind.entry(kind.clone()).or_default();
                if *at <= now {
                    e.0 += 1;
                    e.1 = e.1.max(now - *at);
                }
            }
        }
        for kind in ["Topic", "ConsumerGroup"] {
            let (depth, oldest) = per_kind.remove(kind).unwrap_or_default();
            let l = KindLabels { kind: kind.into() };
            self.queue_depth.get_or_create(&l).set(depth);
            self.queue_oldest
                .get_or_create(&l)
                .set(oldest.as_secs_f64());
        }
        for (kind, count) in self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            self.watched
                .get_or_create(&KindLabels { kind: kind.clone() })
                .set(i64::try_from(count()).unwrap_or(i64::MAX));
        }
    }

    /// Counts a reconcile of `kind` that took `took`.
    pub fn reconciled(&self, kind: &str, took: Duration) {
        let l = KindLabels { kind: kind.into() };
        self.reconciles.get_or_create(&l).inc();
        self.duration.get_or_create(&l).observe(took.as_secs_f64());
    }

    /// Counts one apply of a namespace's broker objects.
    pub fn broker_objects_applied(&self) {
        self.broker_applies.inc();
    }

    /// Counts a failed reconcile.
    pub fn failed(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                error: error.into(),
            })
            .inc();
    }

    /// Sets whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Marks the operator ready (it reached the API server).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        self.refresh();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process runs) and `/readyz` (it reached the API
/// server) on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let m = Arc::clone(&metrics);
    let app = Router::new()
        .route("/metrics", get(move || async move { m.encode() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if metrics.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not connected to the API server yet",
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
