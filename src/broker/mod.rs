//! Everything that talks to RabbitMQ besides consuming: connecting (to one node of a
//! cluster among several), the topology of the contract's section 5 plus the delay
//! queues, and publishing with publisher confirms.
//!
//! Every broker operation here is bounded by `amqp.operation_timeout_ms`: a frozen
//! node must never hang the worker (a `queue.bind` can otherwise wait a minute). A
//! publish the broker keeps refusing (nack) is bounded by it too.

use std::{
    collections::HashMap,
    future::Future,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    uri::AMQPUri,
};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpSettings, QueueType, redact_url};

pub(crate) mod acks;
pub(crate) mod consume;

/// What went wrong with the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker ({urls}): {reason}")]
    Connect { urls: String, reason: String },
    #[error("broker operation `{op}` got no answer within amqp.operation_timeout_ms ({ms} ms)")]
    Timeout { op: &'static str, ms: u128 },
    #[error("broker operation `{op}` failed: {source}")]
    Amqp {
        op: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "{what} already exists with arguments other than this configuration declares ({detail}); \
         change {key} to match it, or delete it so that it is declared anew"
    )]
    Mismatch {
        what: String,
        key: &'static str,
        detail: String,
    },
    #[error(
        "{what} does not exist and amqp.declare_topology is false: declare it (key {key}) or set amqp.declare_topology = true"
    )]
    Missing { what: String, key: &'static str },
    #[error("TLS setting {key}: {problem}")]
    Tls { key: &'static str, problem: String },
    #[error(
        "the broker refused (nack) a publish to exchange `{exchange}` with routing key `{routing_key}` \
         {refusals} times over {ms} ms, and refusals there have lasted amqp.operation_timeout_ms: a queue \
         it routes to cannot take it (full with x-overflow = reject-publish, or a quorum queue without a majority)"
    )]
    Refused {
        exchange: String,
        routing_key: String,
        ms: u128,
        refusals: u64,
    },
}

impl BrokerError {
    /// True when retrying cannot help: the configuration or the broker's state must change.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BrokerError::Mismatch { .. } | BrokerError::Missing { .. } | BrokerError::Tls { .. }
        )
    }
}

/// Runs a broker operation under the timeout.
pub async fn bounded<T>(
    timeout: Duration,
    op: &'static str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(BrokerError::Amqp { op, source }),
        Err(_) => Err(BrokerError::Timeout {
            op,
            ms: timeout.as_millis(),
        }),
    }
}

/// An open connection and the node it reached.
pub struct Connected {
    pub connection: Connection,
    /// `host:port` of the node, for logs and metrics.
    pub node: String,
    /// Where in `amqp.url` a reconnection should start: the node after this one.
    pub next_start: usize,
}

/// Connects to the first node of `amqp.url` that answers, starting at a random one so
/// that many workers spread over a cluster's nodes.
pub async fn connect(amqp: &AmqpSettings, connection_name: &str) -> Result<Connected, BrokerError> {
    connect_from(amqp, connection_name, None).await
}

/// Connects to the first node of `amqp.url` that answers, starting at index `start`
/// (random when `None`).
///
/// The supervisor passes [`Connected::next_start`] of the connection it lost: a worker
/// that lost its node tries the others before coming back to it. That matters for a
/// frozen node (a stopped VM, a long GC pause, a network blackhole): its kernel still
/// accepts the TCP connection and then nothing answers, so trying it first would cost a
/// whole `amqp.operation_timeout_ms` before the next node is tried.
pub async fn connect_from(
    amqp: &AmqpSettings,
    connection_name: &str,
    start: Option<usize>,
) -> Result<Connected, BrokerError> {
    let urls: Vec<&str> = amqp.url.expose().collect();
    let start = start.unwrap_or_else(|| fastrand::usize(..urls.len())) % urls.len();
    let tls = tls_config(amqp)?;
    let mut reasons = Vec::new();
    for i in 0..urls.len() {
        let raw = urls[(start + i) % urls.len()];
        let mut uri = AMQPUri::from_str(raw).map_err(|e| BrokerError::Connect {
            urls: redact_url(raw),
            reason: e.replace(raw, "<url>"),
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(amqp.heartbeat_secs);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(amqp.operation_timeout_ms);
        }
        if uri.query.frame_max.is_none() {
            // lapin keeps a receive and a send buffer of 32 frames each, zero-filled: at
            // RabbitMQ's default frame_max (128 KiB) that is 8 MiB resident per
            // connection. 16 KiB frames make it 1 MiB; a large job is only split into
            // more frames. (Measured with jelou-bench: idle RSS 17.6 → 9.9 MiB.)
            uri.query.frame_max = Some(16_384);
        }
        let node = format!("{}:{}", uri.authority.host, uri.authority.port);
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let builder = lapin::ConnectionBuilder::new()
            .map_err(|e| BrokerError::Connect {
                urls: amqp.url.to_string(),
                reason: e.to_string(),
            })?
            .with_uri(uri)
            .with_properties(properties)
            .with_tls_config(tls.clone());
        match tokio::time::timeout(amqp.operation_timeout(), builder.connect()).await {
            Ok(Ok(connection)) => {
                return Ok(Connected {
                    connection,
                    node,
                    next_start: (start + i + 1) % urls.len(),
                });
            }
            Ok(Err(e)) => reasons.push(format!("{node}: {e}")),
            Err(_) => reasons.push(format!(
                "{node}: no answer within amqp.operation_timeout_ms"
            )),
        }
    }
    Err(BrokerError::Connect {
        urls: amqp.url.to_string(),
        reason: reasons.join("; "),
    })
}

/// The TLS files of `amqp.*`, read and checked here so that a wrong file fails the
/// start naming its key: lapin would only fail each connection attempt (and, for a CA
/// file without a certificate, silently fall back to the system's roots).
fn tls_config(amqp: &AmqpSettings) -> Result<OwnedTLSConfig, BrokerError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| BrokerError::Tls {
            key,
            problem: format!("{}: {e}", path.display()),
        })
    };
    let problem = |key: &'static str, path: &std::path::Path, what: String| BrokerError::Tls {
        key,
        problem: format!("{}: {what}", path.display()),
    };
    let certificates = |key: &'static str, path: &std::path::Path| {
        let pem = read(key, path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| problem(key, path, format!("not a PEM file: {e}")))?;
        if certs.is_empty() {
            return Err(problem(key, path, "no PEM certificate in it".into()));
        }
        Ok(pem)
    };
    let cert_chain = match &amqp.tls_ca_file {
        Some(path) => Some(
            String::from_utf8(certificates("amqp.tls_ca_file", path)?)
                .map_err(|_| problem("amqp.tls_ca_file", path, "not a PEM text file".into()))?,
        ),
        None => None,
    };
    let identity = match (&amqp.tls_client_cert_file, &amqp.tls_client_key_file) {
        (Some(cert), Some(key)) => {
            let pem = certificates("amqp.tls_client_cert_file", cert)?;
            let key_pem = read("amqp.tls_client_key_file", key)?;
            // The parser lapin uses (PKCS#8, and PKCS#1 or SEC1 keys too). Its error
            // never quotes the file, so no key material can reach a log.
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                problem(
                    "amqp.tls_client_key_file",
                    key,
                    format!("no PEM private key in it ({e})"),
                )
            })?;
            Some(OwnedIdentity::PKCS8 { pem, key: key_pem })
        }
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// One queue of the worker's topology.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub args: FieldTable,
    /// The configuration key to change when the queue clashes or is missing.
    pub key: &'static str,
}

/// The names and arguments of everything the worker uses on the broker.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs_queue: String,
    pub queue_type: QueueType,
    pub result_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Delay queues, shortest first: `<jobs_queue>.delay.<secs>s`.
    pub delays: Vec<Duration>,
    /// With order on (`order.enabled`), the number of partitions (`order.partitions`);
    /// 0 with order off.
    pub partitions: u16,
}

impl Topology {
    pub fn new(amqp: &AmqpSettings, delays: Vec<Duration>) -> Self {
        Self {
            jobs_queue: amqp.jobs_queue.clone(),
            queue_type: amqp.queue_type,
            result_exchange: amqp.result_exchange.clone(),
            dead_letter_exchange: amqp.dead_letter_exchange.clone(),
            dead_letter_queue: amqp.dead_letter_queue.clone(),
            delays,
            partitions: 0,
        }
    }

    /// The topology `settings` describe, delay queues included.
    pub fn for_settings(settings: &crate::config::Settings) -> Self {
        let delays = delay_buckets(
            Duration::from_millis(settings.retry.park_threshold_ms),
            Duration::from_millis(settings.retry.max_elapsed_ms),
        );
        let mut topology = Self::new(&settings.amqp, delays);
        if settings.order.enabled {
            topology.partitions = settings.order.partitions;
        }
        topology
    }

    /// `<jobs_queue>.order.<p>`: the jobs of partition `p`, in the order the router
    /// took them from the jobs queue.
    pub fn partition_queue(&self, p: u16) -> String {
        format!("{}.order.{p}", self.jobs_queue)
    }

    /// `<jobs_queue>.order.<p>.wait`: partition `p`'s jobs that wait (a retry, a
    /// paused or paced bot or user, a user's later jobs).
    pub fn wait_queue(&self, p: u16) -> String {
        format!("{}.order.{p}.wait", self.jobs_queue)
    }

    /// `<jobs_queue>.order.<p>.lock`: holds partition `p`'s ownership token.
    pub fn lock_queue(&self, p: u16) -> String {
        format!("{}.order.{p}.lock", self.jobs_queue)
    }

    /// `<jobs_queue>.order.router`: holds the router's token.
    pub fn router_queue(&self) -> String {
        format!("{}.order.router", self.jobs_queue)
    }

    /// `<jobs_queue>.order.members`: every worker of the fleet consumes it (it holds
    /// no messages), so its consumer count is the fleet's size.
    pub fn members_queue(&self) -> String {
        format!("{}.order.members", self.jobs_queue)
    }

    /// The ordered-work queues: one consumer at a time each.
    fn ordered_queue_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_string(self.queue_type.as_str()));
        consume::single_active_consumer(t)
    }

    /// `<jobs_queue>.retry`: where jobs come back for their next attempt (from a
    /// delay queue, or checkpointed with their retry state), consumed beside the jobs
    /// queue so that a retry never waits behind the backlog.
    pub fn retry_queue(&self) -> String {
        format!("{}.retry", self.jobs_queue)
    }

    /// Name of the delay queue that holds a job for `delay`.
    pub fn delay_queue(&self, delay: Duration) -> String {
        format!("{}.delay.{}s", self.jobs_queue, delay.as_secs())
    }

    /// Every queue the worker declares (or checks), with the configuration key that
    /// names it and the arguments it is declared with: the one list that the
    /// declaration, the check, the demo, the benchmark and the tests all use.
    pub fn queues(&self) -> Vec<QueueSpec> {
        let mut queues = vec![
            QueueSpec {
                name: self.jobs_queue.clone(),
                args: self.jobs_queue_args(),
                key: "amqp.jobs_queue / amqp.queue_type / amqp.dead_letter_exchange",
            },
            QueueSpec {
                name: self.retry_queue(),
                args: self.jobs_queue_args(),
                key: "amqp.queue_type (the retry queue is named after amqp.jobs_queue)",
            },
            QueueSpec {
                name: self.dead_letter_queue.clone(),
                args: self.dead_letter_queue_args(),
                key: "amqp.dead_letter_queue / amqp.queue_type",
            },
        ];
        queues.extend(self.delays.iter().map(|d| QueueSpec {
            name: self.delay_queue(*d),
            args: self.delay_queue_args(*d),
            key: "amqp.queue_type (delay queues are named after amqp.jobs_queue)",
        }));
        queues.extend(self.ordered_queues());
        queues
    }

    /// With order on: the router's, each partition's and its wait queue, and the
    /// members queue (classic: it never holds a message).
    fn ordered_queues(&self) -> Vec<QueueSpec> {
        if self.partitions == 0 {
            return Vec::new();
        }
        let key = "order.partitions / amqp.queue_type (the ordered-work queues are named after amqp.jobs_queue)";
        let spec = |name| QueueSpec {
            name,
            args: self.ordered_queue_args(),
            key,
        };
        let mut members = FieldTable::default();
        members.insert("x-queue-type".into(), long_string("classic"));
        let mut queues = vec![
            spec(self.router_queue()),
            QueueSpec {
                name: self.members_queue(),
                args: members,
                key,
            },
        ];
        for p in 0..self.partitions {
            queues.push(spec(self.partition_queue(p)));
            queues.push(spec(self.wait_queue(p)));
            queues.push(spec(self.lock_queue(p)));
        }
        queues
    }

    /// The names of [`Topology::queues`].
    pub fn queue_names(&self) -> Vec<String> {
        self.queues().into_iter().map(|q| q.name).collect()
    }

    /// The longest delay queue not longer than `wait`, if any.
    pub fn delay_for(&self, wait: Duration) -> Option<Duration> {
        self.delays.iter().rev().find(|d| **d <= wait).copied()
    }

    /// Contract section 5: exactly `x-queue-type` and `x-dead-letter-exchange`.
    pub fn jobs_queue_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_string(self.queue_type.as_str()));
        t.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange),
        );
        t
    }

    /// Contract section 5: exactly `x-queue-type`.
    pub fn dead_letter_queue_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_string(self.queue_type.as_str()));
        t
    }

    /// A delay queue: messages expire after `delay` and are dead-lettered to the retry
    /// queue through the default exchange. On quorum queues dead-lettering is made
    /// at-least-once, so a parked job survives a node failure.
    pub fn delay_queue_args(&self, delay: Duration) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_string(self.queue_type.as_str()));
        t.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        t.insert("x-dead-letter-exchange".into(), long_string(""));
        t.insert(
            "x-dead-letter-routing-key".into(),
            long_string(&self.retry_queue()),
        );
        if self.queue_type == QueueType::Quorum {
            t.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            t.insert("x-overflow".into(), long_string("reject-publish"));
        }
        t
    }

    /// Declares everything. A declaration that clashes with an existing one fails with
    /// [`BrokerError::Mismatch`] naming the key to change.
    pub async fn declare(&self, conn: &Connection, timeout: Duration) -> Result<(), BrokerError> {
        let ch = bounded(timeout, "channel.open", conn.create_channel()).await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.guard(
            bounded(
                timeout,
                "exchange.declare",
                ch.exchange_declare(
                    self.result_exchange.as_str().into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                ),
            )
            .await,
            format!("exchange `{}`", self.result_exchange),
            "amqp.result_exchange",
        )?;
        let ch = self.reopen_if_closed(conn, ch, timeout).await?;
        self.guard(
            bounded(
                timeout,
                "exchange.declare",
                ch.exchange_declare(
                    self.dead_letter_exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                ),
            )
            .await,
            format!("exchange `{}`", self.dead_letter_exchange),
            "amqp.dead_letter_exchange",
        )?;
        for QueueSpec { name, args, key } in self.queues() {
            let ch = self.reopen_if_closed(conn, ch.clone(), timeout).await?;
            self.guard(
                bounded(
                    timeout,
                    "queue.declare",
                    ch.queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions::durable(),
                        args.clone(),
                    ),
                )
                .await
                .map(|_| ()),
                format!("queue `{name}` (arguments {})", describe_args(&args)),
                key,
            )?;
        }
        bounded(
            timeout,
            "queue.bind",
            ch.queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let _ = ch.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// Checks passively that everything exists (`amqp.declare_topology = false`, and
    /// after a failover, when a full declaration could block on a recovering node).
    pub async fn verify(&self, conn: &Connection, timeout: Duration) -> Result<(), BrokerError> {
        let mut missing = Vec::new();
        let exchanges = [
            (&self.result_exchange, "amqp.result_exchange"),
            (&self.dead_letter_exchange, "amqp.dead_letter_exchange"),
        ];
        for (name, key) in exchanges {
            let ch = bounded(timeout, "channel.open", conn.create_channel()).await?;
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match bounded(
                timeout,
                "exchange.declare",
                ch.exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Topic,
                    passive,
                    FieldTable::default(),
                ),
            )
            .await
            {
                Ok(()) => {
                    let _ = ch.close(200, "checked".into()).await;
                }
                Err(e) if is_not_found(&e) => missing.push((format!("exchange `{name}`"), key)),
                Err(e) => return Err(e),
            }
        }
        for QueueSpec { name, key, .. } in self.queues() {
            let ch = bounded(timeout, "channel.open", conn.create_channel()).await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match bounded(
                timeout,
                "queue.declare",
                ch.queue_declare(name.as_str().into(), passive, FieldTable::default()),
            )
            .await
            {
                Ok(_) => {
                    let _ = ch.close(200, "checked".into()).await;
                }
                Err(e) if is_not_found(&e) => missing.push((format!("queue `{name}`"), key)),
                Err(e) => return Err(e),
            }
        }
        match missing.first() {
            None => Ok(()),
            Some((_, key)) => Err(BrokerError::Missing {
                what: missing
                    .iter()
                    .map(|(w, _)| w.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                key,
            }),
        }
    }

    fn guard(
        &self,
        r: Result<(), BrokerError>,
        what: String,
        key: &'static str,
    ) -> Result<(), BrokerError> {
        match r {
            Err(BrokerError::Amqp { source, .. }) if is_precondition_failed(&source) => {
                Err(BrokerError::Mismatch {
                    what,
                    key,
                    detail: source.to_string(),
                })
            }
            other => other,
        }
    }

    async fn reopen_if_closed(
        &self,
        conn: &Connection,
        ch: Channel,
        timeout: Duration,
    ) -> Result<Channel, BrokerError> {
        if ch.status().connected() {
            Ok(ch)
        } else {
            bounded(timeout, "channel.open", conn.create_channel()).await
        }
    }
}

/// Powers of two seconds, from the largest not above `park_threshold` (at least 1 s)
/// up to the largest not above `max_elapsed`: a wait is parked in the longest that
/// fits, then in shorter ones, so no job waits behind a longer one.
pub fn delay_buckets(park_threshold: Duration, max_elapsed: Duration) -> Vec<Duration> {
    let mut buckets = Vec::new();
    let mut secs: u64 = 1;
    while secs * 2 <= park_threshold.as_secs() {
        secs *= 2;
    }
    while Duration::from_secs(secs) <= max_elapsed && secs <= 1 << 30 {
        buckets.push(Duration::from_secs(secs));
        secs *= 2;
    }
    buckets
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn describe_args(args: &FieldTable) -> String {
    let parts: Vec<String> = args
        .inner()
        .iter()
        .map(|(k, v)| match v {
            AMQPValue::LongString(s) => format!("{k}={}", String::from_utf8_lossy(s.as_bytes())),
            AMQPValue::LongLongInt(n) => format!("{k}={n}"),
            other => format!("{k}={other:?}"),
        })
        .collect();
    parts.join(", ")
}

fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => Some(err.get_id()),
        _ => None,
    }
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    amqp_code(e) == Some(406) || e.to_string().contains("PRECONDITION_FAILED")
}

fn is_not_found(e: &BrokerError) -> bool {
    match e {
        BrokerError::Amqp { source, .. } => {
            amqp_code(source) == Some(404) || source.to_string().contains("NOT_FOUND")
        }
        _ => false,
    }
}

/// How a confirmed publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Confirmed and routed to at least one queue.
    Routed,
    /// Confirmed, but returned: no queue is bound to receive it (mandatory publish).
    Unroutable,
}

/// A channel in confirm mode; cheap to clone, safe to use from many tasks.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    timeout: Duration,
    refusals: Arc<Refusals>,
}

impl Publisher {
    pub async fn open(conn: &Connection, timeout: Duration) -> Result<Self, BrokerError> {
        let channel = bounded(timeout, "channel.open", conn.create_channel()).await?;
        bounded(
            timeout,
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Self {
            channel,
            timeout,
            refusals: Arc::new(Refusals::default()),
        })
    }

    /// Counts every refused publish (nack) in `counter` (the worker's
    /// `jelou_worker_publishes_refused_total`).
    pub fn counting_refusals(mut self, counter: Counter) -> Self {
        self.refusals = Arc::new(Refusals {
            counter: Some(counter),
            ..Refusals::default()
        });
        self
    }

    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Closes the channel (after its confirms have all arrived).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(self.timeout, self.channel.close(200, "done".into())).await;
    }

    /// Publishes `mandatory` and waits for the broker's confirm.
    ///
    /// A nack (the broker could not take the message: a queue it routes to is full with
    /// `x-overflow = reject-publish`, or is a quorum queue without a majority) is
    /// retried with a growing pause, but only for `amqp.operation_timeout_ms` from the
    /// first refusal of the episode (refusals to the same exchange and routing key, up
    /// to a confirmed publish). Then it fails with [`BrokerError::Refused`], and so do
    /// all publishes of this channel still waiting to retry: the caller drops the
    /// connection, so that its unacked jobs go back to the queue instead of holding
    /// their prefetch slots. One warning when an episode starts, one info line when it
    /// ends or is given up; the refusals in between are only counted.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Published, BrokerError> {
        let mut pause = Duration::from_millis(50);
        // This publish's own refusals, for its error.
        let mut refused: Option<(Instant, u64)> = None;
        let refused_error = |refused: Option<(Instant, u64)>| {
            let (first, times) = refused.unwrap_or((Instant::now(), 0));
            BrokerError::Refused {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                ms: first.elapsed().as_millis(),
                refusals: times,
            }
        };
        // Once this channel gave up, its connection is being dropped: a publish that
        // fails then fails because of the refusals, which were reported already.
        let failed = |e: BrokerError, refused| {
            if self.refusals.given_up.is_cancelled() {
                refused_error(refused)
            } else {
                e
            }
        };
        loop {
            let confirm = bounded(
                self.timeout,
                "basic.publish",
                self.channel.basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties.clone(),
                ),
            )
            .await
            .map_err(|e| failed(e, refused))?;
            let confirmation = bounded(self.timeout, "publisher confirm", confirm)
                .await
                .map_err(|e| failed(e, refused))?;
            let published = match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => Published::Routed,
                Confirmation::Ack(Some(_)) => Published::Unroutable,
                Confirmation::Nack(_) => {
                    let started = self.refusals.refused(exchange, routing_key, self.timeout);
                    refused.get_or_insert((Instant::now(), 0)).1 += 1;
                    let give_up = || {
                        self.refusals.give_up(exchange, routing_key);
                        refused_error(refused)
                    };
                    let Some(started) = started else {
                        return Err(give_up());
                    };
                    let give_up_at = started + self.timeout;
                    let now = Instant::now();
                    if now >= give_up_at {
                        return Err(give_up());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause.min(give_up_at - now)) => {}
                        _ = self.refusals.given_up.cancelled() => return Err(give_up()),
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            self.refusals.confirmed(exchange, routing_key);
            return Ok(published);
        }
    }
}

/// The refused publishes (nacks) of one publisher channel, by destination
/// (exchange, routing key): an episode starts with a refusal and ends with a confirmed
/// publish, or when this channel gives up.
#[derive(Default)]
struct Refusals {
    episodes: Mutex<HashMap<(String, String), Episode>>,
    /// Cancelled when a publish gave up: every publish waiting to retry gives up too,
    /// at once, so that their jobs' outcomes are kept before the connection is gone.
    given_up: CancellationToken,
    /// False while no episode is open: what every confirmed publish checks first.
    any: AtomicBool,
    counter: Option<Counter>,
}

struct Episode {
    started: Instant,
    refusals: u64,
}

impl Refusals {
    /// Counts a refusal; returns when its episode started, or `None` when this
    /// channel has given up already.
    fn refused(&self, exchange: &str, routing_key: &str, bound: Duration) -> Option<Instant> {
        if let Some(counter) = &self.counter {
            counter.inc();
        }
        let mut episodes = self.episodes.lock().expect("not poisoned");
        // Checked under the lock that `give_up` cancels it under: a refusal that
        // comes in while another publish gives up starts no new episode.
        if self.given_up.is_cancelled() {
            return None;
        }
        let episode = episodes
            .entry((exchange.to_string(), routing_key.to_string()))
            .or_insert_with(|| {
                tracing::warn!(
                    exchange,
                    routing_key,
                    give_up_after_ms = bound.as_millis() as u64,
                    "the broker refuses publishes (nack): a queue they are routed to cannot take them; \
                     retrying for up to amqp.operation_timeout_ms, then giving up"
                );
                Episode {
                    started: Instant::now(),
                    refusals: 0,
                }
            });
        episode.refusals += 1;
        self.any.store(true, Ordering::Relaxed);
        Some(episode.started)
    }

    /// A publish to this destination was confirmed: its episode, if any, is over.
    fn confirmed(&self, exchange: &str, routing_key: &str) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let mut episodes = self.episodes.lock().expect("not poisoned");
        let ended = episodes.remove(&(exchange.to_string(), routing_key.to_string()));
        self.any.store(!episodes.is_empty(), Ordering::Relaxed);
        drop(episodes);
        if let Some(e) = ended {
            tracing::info!(
                exchange,
                routing_key,
                refusals = e.refusals,
                duration_ms = e.started.elapsed().as_millis() as u64,
                "the broker takes publishes again"
            );
        }
    }

    /// Gives up on this channel (every publish waiting to retry gives up too); the
    /// destination's episode ends here.
    fn give_up(&self, exchange: &str, routing_key: &str) {
        let mut episodes = self.episodes.lock().expect("not poisoned");
        self.given_up.cancel();
        // Absent when another publish to it already gave up and said so.
        let ended = episodes.remove(&(exchange.to_string(), routing_key.to_string()));
        drop(episodes);
        if let Some(e) = ended {
            tracing::info!(
                exchange,
                routing_key,
                refusals = e.refusals,
                duration_ms = e.started.elapsed().as_millis() as u64,
                "gave up on refused publishes: the connection is dropped, its unfinished jobs go back to the queue"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_buckets_cover_threshold_to_max_elapsed() {
        let secs = |v: Vec<Duration>| v.into_iter().map(|d| d.as_secs()).collect::<Vec<_>>();
        assert_eq!(
            secs(delay_buckets(
                Duration::from_secs(5),
                Duration::from_secs(900)
            )),
            [4, 8, 16, 32, 64, 128, 256, 512]
        );
        assert_eq!(
            secs(delay_buckets(Duration::ZERO, Duration::from_secs(5))),
            [1, 2, 4]
        );
        assert!(delay_buckets(Duration::from_secs(5), Duration::from_millis(900)).is_empty());
    }

    #[test]
    fn a_wait_goes_to_the_longest_bucket_that_fits() {
        let t = Topology::new(
            &AmqpSettings::default(),
            delay_buckets(Duration::from_secs(5), Duration::from_secs(900)),
        );
        assert_eq!(
            t.delay_for(Duration::from_secs(100)),
            Some(Duration::from_secs(64))
        );
        assert_eq!(t.delay_for(Duration::from_secs(3)), None);
        assert_eq!(
            t.delay_queue(Duration::from_secs(64)),
            "jelou.jobs.delay.64s"
        );
    }

    #[test]
    fn refusals_make_one_episode_per_destination_until_confirmed_or_given_up() {
        let counter = Counter::default();
        let r = Refusals {
            counter: Some(counter.clone()),
            ..Refusals::default()
        };
        let bound = Duration::from_secs(1);
        let first = r.refused("x", "success", bound).unwrap();
        assert_eq!(r.refused("x", "success", bound), Some(first));
        let other = r.refused("x", "failure", bound).unwrap();
        assert!(other >= first);
        // A confirm ends its destination's episode only.
        r.confirmed("x", "success");
        assert_eq!(r.refused("x", "failure", bound), Some(other));
        assert!(r.refused("x", "success", bound).is_some());
        let key = |k: &str| ("x".to_string(), k.to_string());
        assert_eq!(r.episodes.lock().unwrap()[&key("success")].refusals, 1);
        // Once given up, refusals are counted but start nothing.
        r.give_up("x", "failure");
        assert!(r.given_up.is_cancelled());
        assert_eq!(r.refused("x", "failure", bound), None);
        assert!(!r.episodes.lock().unwrap().contains_key(&key("failure")));
        assert_eq!(counter.get(), 6);
    }

    #[test]
    fn contract_arguments_are_exact() {
        let t = Topology::new(&AmqpSettings::default(), vec![]);
        let keys = |f: FieldTable| f.inner().keys().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(
            keys(t.jobs_queue_args()),
            ["x-dead-letter-exchange", "x-queue-type"]
        );
        assert_eq!(keys(t.dead_letter_queue_args()), ["x-queue-type"]);
    }
}
