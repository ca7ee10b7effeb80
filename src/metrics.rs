//! Prometheus metrics, exposed at `/metrics` (OpenMetrics text) by the `server` module.
//!
//! Every name starts with `jelou_worker_`; counters end in `_total`, durations are in
//! seconds, as Prometheus' naming conventions ask.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    /// `success` or `failure`.
    pub(crate) status: &'static str,
    /// The failure kind, or `none` on success.
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClassLabels {
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `error` when no response came.
    pub(crate) class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RetryLabels {
    /// Where the job waits: `delay_queue` (parked), `retry_queue` (checkpointed, the
    /// rest slept by its next consumer), `wait_queue` (order on: its partition's wait
    /// queue) or `in_process` (a short wait, or the broker could not take it).
    pub(crate) mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct NodeLabels {
    /// `host:port` of the broker node in use.
    pub(crate) node: String,
}

/// All the worker's metrics.
pub struct Metrics {
    registry: Registry,
    pub(crate) jobs_finished: Family<OutcomeLabels, Counter>,
    pub(crate) http_attempts: Family<ClassLabels, Counter>,
    pub(crate) request_duration: Histogram,
    pub(crate) job_latency: Histogram,
    pub(crate) jobs_in_flight: Gauge,
    pub(crate) retries_scheduled: Family<RetryLabels, Counter>,
    pub(crate) results_unroutable: Counter,
    pub(crate) publishes_refused: Counter,
    pub(crate) broker_connects: Counter,
    pub(crate) broker_connected: Gauge,
    pub(crate) broker_node: Family<NodeLabels, Gauge>,
    pub(crate) broker_failovers: Counter,
    pub(crate) circuit_state: Gauge,
    pub(crate) rate_limited_waits: Counter,
    pub(crate) jobs_handed_back: Counter,
    pub(crate) order: OrderMetrics,
    current_node: std::sync::Mutex<Option<String>>,
}

/// `amqp.prefetch` of the worker this process runs; 0 until [`set_prefetch`].
static PREFETCH: AtomicI64 = AtomicI64::new(0);

/// Records `amqp.prefetch` for `jelou_worker_prefetch` (`run` does, at start).
pub fn set_prefetch(prefetch: u16) {
    PREFETCH.store(i64::from(prefetch), Ordering::Relaxed);
}

/// What belongs to the process rather than to one worker's [`Metrics`], read at each
/// scrape: the log lines [`crate::logging`] had to drop, and the prefetch.
#[derive(Debug)]
struct ProcessFigures;

impl Collector for ProcessFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = ConstCounter::new(crate::logging::dropped_lines());
        dropped.encode(encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because the log buffer was full (stderr read too slowly)",
            None,
            dropped.metric_type(),
        )?)?;
        let prefetch = PREFETCH.load(Ordering::Relaxed);
        if prefetch > 0 {
            let prefetch = ConstGauge::new(prefetch);
            prefetch.encode(encoder.encode_descriptor(
                "prefetch",
                "amqp.prefetch: jobs in flight at most from the jobs queue (the retry queue adds up to a quarter)",
                None,
                prefetch.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Values of `jelou_worker_circuit_state`.
pub(crate) mod circuit {
    pub(crate) const CLOSED: i64 = 0;
    pub(crate) const OPEN_OUTAGE: i64 = 1;
    pub(crate) const OPEN_CREDENTIALS: i64 = 2;
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("jelou_worker");
        // Each metric is registered under its name and kept for the worker to update.
        fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
            registry.register(name, help, metric.clone());
            metric
        }
        let order = OrderMetrics::register(&mut registry);
        registry.register_collector(Box::new(ProcessFigures));
        Self {
            jobs_finished: add(
                &mut registry,
                "jobs_finished",
                "Jobs finished, by status and failure kind",
                Family::<OutcomeLabels, Counter>::default(),
            ),
            http_attempts: add(
                &mut registry,
                "http_attempts",
                "HTTP attempts to Jelou, by status class",
                Family::<ClassLabels, Counter>::default(),
            ),
            request_duration: add(
                &mut registry,
                "jelou_request_duration_seconds",
                "Duration of one HTTP attempt to Jelou",
                Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            ),
            job_latency: add(
                &mut registry,
                "job_latency_seconds",
                "From the job's AMQP timestamp (set by the producer) to its result",
                Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            ),
            jobs_in_flight: add(
                &mut registry,
                "jobs_in_flight",
                "Jobs received and not yet finished",
                Gauge::default(),
            ),
            retries_scheduled: add(
                &mut registry,
                "retries_scheduled",
                "Retries scheduled, by where the job waits",
                Family::<RetryLabels, Counter>::default(),
            ),
            results_unroutable: add(
                &mut registry,
                "results_unroutable",
                "Results the broker returned because no queue is bound to receive them",
                Counter::default(),
            ),
            publishes_refused: add(
                &mut registry,
                "publishes_refused",
                "Publishes the broker refused (nack): results, dead letters or retries it could not take",
                Counter::default(),
            ),
            broker_connects: add(
                &mut registry,
                "broker_connects",
                "Connections made to the broker (the first one included)",
                Counter::default(),
            ),
            broker_connected: add(
                &mut registry,
                "broker_connected",
                "1 while connected and consuming, else 0",
                Gauge::default(),
            ),
            broker_node: add(
                &mut registry,
                "broker_node",
                "1 for the broker node in use",
                Family::<NodeLabels, Gauge>::default(),
            ),
            broker_failovers: add(
                &mut registry,
                "broker_failovers",
                "Reconnections that went to another broker node than the previous connection",
                Counter::default(),
            ),
            circuit_state: add(
                &mut registry,
                "circuit_state",
                "0 closed, 1 open (Jelou failing), 2 open (credentials refused)",
                Gauge::default(),
            ),
            rate_limited_waits: add(
                &mut registry,
                "rate_limited_waits",
                "Attempts delayed by the per-bot rate limit or a 429 pause",
                Counter::default(),
            ),
            jobs_handed_back: add(
                &mut registry,
                "jobs_handed_back",
                "Jobs handed back to the queue unfinished (shutdown)",
                Counter::default(),
            ),
            order,
            current_node: std::sync::Mutex::new(None),
            registry,
        }
    }

    /// Records the node a new connection went to.
    pub(crate) fn connected_to(&self, node: &str) {
        self.broker_connects.inc();
        let mut current = self.current_node.lock().expect("not poisoned");
        if let Some(old) = current.take() {
            if old != node {
                self.broker_failovers.inc();
            }
            self.broker_node.remove(&NodeLabels { node: old });
        }
        self.broker_node
            .get_or_create(&NodeLabels {
                node: node.to_string(),
            })
            .set(1);
        *current = Some(node.to_string());
    }

    /// Counts one HTTP attempt by its status (`None`: no response).
    pub(crate) fn attempt(&self, status: Option<u16>, seconds: f64) {
        let class = match status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            _ => "error",
        };
        self.http_attempts
            .get_or_create(&ClassLabels { class })
            .inc();
        self.request_duration.observe(seconds);
    }

    /// The OpenMetrics text of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WaitLabels {
    /// Why a job waits: `user_order` (behind an earlier job of its user),
    /// `bot_pause` (a 429), `bot_pace` (`jelou.rate_limit_per_second`), `user_pace`
    /// (`order.user_min_interval_ms`) or `retry` (its next attempt).
    pub reason: &'static str,
}

/// The reasons of [`WaitLabels`].
pub(crate) const WAIT_REASONS: [&str; 5] =
    ["user_order", "bot_pause", "bot_pace", "user_pace", "retry"];

/// What waits and why, and the partitions of the work this worker owns (order on).
pub(crate) struct OrderMetrics {
    /// Jobs this worker holds that wait now, by reason (order on: the jobs of the
    /// partitions it owns; parked jobs of an unordered worker wait on the broker).
    pub(crate) waiting: Family<WaitLabels, Gauge>,
    pub(crate) waits: Family<WaitLabels, Counter>,
    pub(crate) partitions_owned: Gauge,
    pub(crate) router_active: Gauge,
}

impl OrderMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            waiting: Family::default(),
            waits: Family::default(),
            partitions_owned: Gauge::default(),
            router_active: Gauge::default(),
        };
        registry.register(
            "order_waiting",
            "Jobs held by this worker that wait now, by reason",
            m.waiting.clone(),
        );
        registry.register(
            "order_waits",
            "Times a job had to wait before its attempt, by reason",
            m.waits.clone(),
        );
        registry.register(
            "order_partitions_owned",
            "Partitions of the ordered work this worker owns now",
            m.partitions_owned.clone(),
        );
        registry.register(
            "order_router_active",
            "1 while this worker routes the jobs queue into the partitions",
            m.router_active.clone(),
        );
        // Every reason from the start, at zero: a panel or an alert over them has a
        // series before the first wait.
        for reason in WAIT_REASONS {
            let _ = m.waiting.get_or_create(&WaitLabels { reason });
            let _ = m.waits.get_or_create(&WaitLabels { reason });
        }
        m
    }

    /// Counts one wait.
    pub(crate) fn waited(&self, reason: &'static str) {
        self.waits.get_or_create(&WaitLabels { reason }).inc();
    }

    /// Adds `delta` to the jobs waiting now for `reason`.
    pub(crate) fn waiting_add(&self, reason: &'static str, delta: i64) {
        if delta != 0 {
            self.waiting
                .get_or_create(&WaitLabels { reason })
                .inc_by(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_conventional_names() {
        let m = Metrics::new();
        m.jobs_finished
            .get_or_create(&OutcomeLabels {
                status: "success",
                kind: "none",
            })
            .inc();
        m.attempt(Some(503), 0.1);
        m.connected_to("127.0.0.1:5672");
        m.connected_to("127.0.0.1:5673");
        let text = m.render();
        assert!(
            text.contains(r#"jelou_worker_jobs_finished_total{status="success",kind="none"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jelou_worker_http_attempts_total{class="5xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("jelou_worker_jelou_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(r#"jelou_worker_broker_node{node="127.0.0.1:5673"} 1"#),
            "{text}"
        );
        assert!(!text.contains("5672\""), "{text}");
        assert!(
            text.contains("jelou_worker_broker_connects_total 2"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE jelou_worker_log_lines_dropped counter\njelou_worker_log_lines_dropped_total 0\n"),
            "{text}"
        );
        set_prefetch(64);
        assert!(
            m.render()
                .contains("# TYPE jelou_worker_prefetch gauge\njelou_worker_prefetch 64\n"),
            "{text}"
        );
    }
}
