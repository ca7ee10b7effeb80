//! `TestEnv`: one test's world on the broker, removed when it is dropped.

use std::time::Duration;

use futures_util::StreamExt;
use jelou_worker::{
    config::{AmqpUrls, QueueType, Settings},
    stand_in::StandIn,
};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind, options::*, types::FieldTable};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{
    broker::{CLIENT_ID, CLIENT_SECRET, broker_url, connect},
    cleanup::Leftovers,
    received::Received,
};

/// One test's world: its own queue and exchange names, a results queue that receives
/// every result, and a stand-in Jelou.
pub struct TestEnv {
    pub name: String,
    pub settings: Settings,
    pub jelou: StandIn,
    pub conn: Connection,
    pub channel: Channel,
    pub results_queue: String,
    pub extra_queues: Vec<String>,
}

impl TestEnv {
    pub async fn new(test: &str) -> Self {
        Self::with_queue_type(test, QueueType::Quorum).await
    }

    pub async fn with_queue_type(test: &str, queue_type: QueueType) -> Self {
        let conn = connect().await;
        let channel = conn.create_channel().await.unwrap();
        let jelou = StandIn::start().await.unwrap();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let name = format!("test.{test}.{id}");
        let settings = test_settings(&name, queue_type, &jelou);
        let env = Self {
            results_queue: format!("{name}.collected"),
            name,
            settings,
            jelou,
            conn,
            channel,
            extra_queues: vec![],
        };
        // Declared once `env` exists, so that its `Drop` removes them even if this fails.
        env.collect_results().await;
        env
    }

    /// Declares the results queue, bound to the result exchange with `#`: it exists
    /// before the worker, so no result is unroutable.
    async fn collect_results(&self) {
        let exchange = self.settings.amqp.result_exchange.as_str();
        let queue = self.results_queue.as_str();
        self.channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Declares the worker's topology (as the worker would) so jobs can be published
    /// before it starts.
    pub async fn declare(&self) {
        jelou_worker::broker::Topology::for_settings(&self.settings)
            .declare(&self.conn, Duration::from_secs(5))
            .await
            .unwrap();
    }

    /// Starts the worker in this process; stop it with the returned handle.
    pub fn start_worker(&self) -> Worker {
        self.start_worker_with(self.settings.clone())
    }

    pub fn start_worker_with(&self, settings: Settings) -> Worker {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(jelou_worker::worker::run(settings, shutdown.clone()));
        Worker { shutdown, handle }
    }

    /// Publishes a raw body to the jobs queue (publisher-confirmed).
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = ch
            .basic_publish(
                "".into(),
                self.settings.amqp.jobs_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker refused a test job");
        assert!(
            confirm.take_message().is_none(),
            "test job unroutable: declare the topology first"
        );
        let _ = ch.close(200, "done".into()).await;
    }

    pub async fn publish(&self, job: &Value) {
        self.publish_raw(job.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    /// Waits for `n` results, at most `timeout`; fails the test if fewer came.
    pub async fn results(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                self.results_queue.as_str().into(),
                format!("collector-{}", uuid::Uuid::new_v4())
                    .as_str()
                    .into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => out.push(Received::from(d)),
                Ok(other) => panic!("results consumer ended: {other:?}"),
                Err(_) => panic!(
                    "only {} of {n} results within {timeout:?}: {:#?}",
                    out.len(),
                    out
                ),
            }
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    /// Waits for exactly one result.
    pub async fn result(&self) -> Received {
        self.results(1, Duration::from_secs(20)).await.remove(0)
    }

    /// Asserts that no further result arrives within `window`.
    pub async fn no_more_results(&self, window: Duration) {
        tokio::time::sleep(window).await;
        assert_eq!(
            self.message_count(&self.results_queue.clone()).await,
            0,
            "an unexpected extra result"
        );
    }

    /// Takes every message now in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Received> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(Received::from(m.delivery));
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    pub async fn dead_letters(&self) -> Vec<Received> {
        let q = self.settings.amqp.dead_letter_queue.clone();
        self.drain(&q).await
    }

    pub async fn message_count(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "done".into()).await;
        q.message_count()
    }
}

/// A worker's settings for a test: its own names under `name`, the stand-in Jelou,
/// small timeouts and short retries.
fn test_settings(name: &str, queue_type: QueueType, jelou: &StandIn) -> Settings {
    let mut settings = Settings::default();
    settings.amqp = settings.amqp.namespaced(name);
    settings.amqp.url = AmqpUrls::parse(&broker_url()).unwrap();
    settings.amqp.queue_type = queue_type;
    settings.amqp.prefetch = 32;
    settings.amqp.operation_timeout_ms = 5_000;
    settings.jelou.base_url = jelou.base_url();
    settings.jelou.client_id = Some(CLIENT_ID.into());
    settings.jelou.client_secret = Some(CLIENT_SECRET.into());
    settings.jelou.request_timeout_ms = 2_000;
    settings.retry.initial_interval_ms = 20;
    settings.retry.max_interval_ms = 200;
    settings.retry.max_attempts = 4;
    settings.retry.max_elapsed_ms = 30_000;
    settings.retry.park_threshold_ms = 5_000;
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.shutdown.grace_period_ms = 5_000;
    // Fewer partitions than the default: each is two quorum queues to declare and
    // delete per test. The order tests that need more say so.
    settings.order.partitions = 4;
    settings
}

/// Deletes everything the test declared, whether it passed or panicked. `Drop`
/// cannot await, so the deletion runs on a thread of its own with its own runtime
/// and connection, and the test waits for it.
impl Drop for TestEnv {
    fn drop(&mut self) {
        Leftovers::of(self).delete_blocking();
    }
}

/// A worker running in this process.
pub struct Worker {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Stops it as SIGTERM would and returns how `run` ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("the worker stops within its grace period")
            .expect("the worker task did not panic")
    }
}
